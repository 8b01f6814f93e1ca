"""Class-index targets: the one home of the label rules and their messages.

Framework-free, over NumPy arrays (torch callers pass ``tensor.numpy()`` views). Used by the api,
``xentkit.torch.linear_cross_entropy`` and the vocabulary-parallel functions, each naming what
holds the classes ("logits have 10 classes", "linear_weight has 10 rows (classes)", "the
vocabulary has V = 10 classes ...").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._options import as_array
from ._options import dtype_name as _dtype_name

__all__ = [
    "LabelError", "as_class_indices", "check_index_layout", "check_labels", "holds_probabilities", "label_error",
]

_INT64_MAX = np.iinfo(np.int64).max
# The expected shape of a target that may hold class indices or class probabilities (the
# cross-entropy's); callers whose targets are indices only word their own.
_INDICES_OR_PROBABILITIES = "(class indices) or the logits' shape (class probabilities)"


def as_class_indices(
    target: object,
    sample_shape: tuple[int, ...],
    *,
    expected_shape: str = _INDICES_OR_PROBABILITIES,
    dtype_name: object = None,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    classes: str | None = None,
    logits_shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """``target`` as int64 class indices of shape ``sample_shape`` (no copy when already int64).

    A non-integer dtype is a ``TypeError``, a wrong shape or a uint64 label beyond int64 (which
    the cast would wrap, even onto ``ignore_index``) a ``ValueError``. ``dtype_name`` names the
    caller's dtype when the array is a converted view (a torch bfloat16 target, say). With
    ``num_classes`` (and ``ignore_index``, and ``classes`` as in :func:`check_labels`) the error for
    such uint64 labels names the first bad label of any kind, as :func:`check_labels` would: one
    beyond int64, or one outside ``[0, num_classes)`` before it. ``logits_shape``: named in the
    shape error where probabilities are taken (:func:`check_index_layout`).
    """
    array = as_array(target, "target")
    if not (array.dtype.kind in "iu" and array.shape == tuple(sample_shape)):  # names only on error
        check_index_layout(
            array.dtype.kind in "iu", array.shape, sample_shape,
            dtype_name=dtype_name or array.dtype, expected_shape=expected_shape, logits_shape=logits_shape,
        )
    # (by kind and size: a big-endian '>u8' is not == np.uint64, and its cast wrapped silently)
    if array.dtype.kind == "u" and array.dtype.itemsize == 8 and array.size and array.max() > _INT64_MAX:
        bad = array > _INT64_MAX
        if num_classes is not None:
            bad |= _bad_labels(array, num_classes, -100 if ignore_index is None else ignore_index)
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        label = int(array[position])
        if label <= _INT64_MAX and num_classes is not None:
            raise label_error(
                label, position, num_classes, -100 if ignore_index is None else ignore_index,
                classes or _logits_classes(num_classes),
            )
        raise LabelError(f"target has label {label} at position {position}, too large for a class index")
    return array.astype(np.int64, copy=False)


def holds_probabilities(
    shape: tuple[int, ...], logits_shape: tuple[int, ...], *, floating: bool, dtype_name: object
) -> bool:
    """Whether a target of ``shape`` holds class probabilities: it has the logits' shape (torch's
    rule), from metadata alone. Such a target must be floating-point: a ``TypeError`` (torch:
    "Expected floating point type for target with class probabilities"), on every path the same
    (other targets are class indices: :func:`check_index_layout`)."""
    # (the ranks first: an index target's sizes are never compared with the logits', which under
    # torch.compile or torch.export would guard on, say, a pixel count differing from the classes)
    if len(shape) != len(logits_shape) or tuple(shape) != tuple(logits_shape):
        return False
    if not floating:
        raise TypeError(
            f"target with the logits' shape {tuple(logits_shape)} holds class probabilities and must be "
            f"floating-point, got dtype {_dtype_name(dtype_name)}"
        )
    return True


def check_index_layout(
    integer: bool,
    shape: tuple[int, ...],
    sample_shape: tuple[int, ...],
    *,
    dtype_name: object,
    expected_shape: str = _INDICES_OR_PROBABILITIES,
    logits_shape: tuple[int, ...] | None = None,
) -> None:
    """The dtype and shape rules of class indices, from metadata alone (for tensors on any
    device): a non-integer dtype is a ``TypeError``, a shape other than ``sample_shape`` a
    ``ValueError`` (also for a floating target that has neither layout where probabilities are
    taken); ``expected_shape`` words the expected shape (the probabilities' hint only with
    the default, a target that may hold them), and names ``logits_shape`` where given (the fused
    linear forms take no logits to look at)."""
    may_hold_probabilities = expected_shape == _INDICES_OR_PROBABILITIES
    if not integer and may_hold_probabilities and tuple(shape) != tuple(sample_shape):
        # neither layout: a floating target of another shape (class probabilities of another
        # batch, say) is a shape error, as torch's ("Expected input batch_size (4) to match target
        # batch_size (3)"), not one about the dtype of class indices
        raise ValueError(
            f"target must have shape {sample_shape} {_worded(expected_shape, logits_shape)}, got shape {tuple(shape)} of dtype {_dtype_name(dtype_name)}"
        )
    if not integer:  # (the hint on probabilities only where the caller takes them)
        hint = " (class probabilities must have the logits' shape)" if may_hold_probabilities else ""
        raise TypeError(f"target of class indices must have an integer dtype, got dtype {_dtype_name(dtype_name)}{hint}")
    if tuple(shape) != tuple(sample_shape):
        raise ValueError(f"target must have shape {sample_shape} {_worded(expected_shape, logits_shape)}, got shape {tuple(shape)}")


def _worded(expected_shape: str, logits_shape: tuple[int, ...] | None) -> str:
    """The expected layouts of :func:`check_index_layout`'s errors, naming the logits' shape where
    it is known (worded only on error: under torch.compile the shapes are symbols)."""
    if expected_shape == _INDICES_OR_PROBABILITIES and logits_shape is not None:
        return f"(class indices) or the logits' shape {tuple(logits_shape)} (class probabilities)"
    return expected_shape


def _logits_classes(num_classes: int) -> str:
    return f"logits have {num_classes} classes"


class LabelError(ValueError, IndexError):
    """A class index outside ``[0, C)`` that is not ``ignore_index``: a ``ValueError`` (xentkit's
    rule for bad values), and an ``IndexError`` too, as torch's losses raise for it ("Target 10 is
    out of bounds."), so that code catching either keeps working."""


def label_error(
    label: int, position: tuple[int, ...], num_classes: int, ignore_index: int, classes: str,
    name: str = "target",
) -> LabelError:
    """The error for a label outside ``[0, num_classes)``; ``classes`` says what holds them."""
    return LabelError(
        f"{name} has label {label} at position {position} but {classes} "
        f"(labels must be in [0, {num_classes}) or equal ignore_index={ignore_index})"
    )


def _bad_labels(labels: Any, num_classes: int, ignore_index: int, valid: Any = None) -> Any:
    """The labels' rule as a mask (NumPy arrays of any integer dtype, or tensors): True where a
    label is outside ``[0, num_classes)`` and not ``ignore_index`` (``valid``: the mask
    ``labels != ignore_index`` when the caller has it)."""
    if valid is None:
        valid = labels != ignore_index
    return valid & ((labels < 0) | (labels >= num_classes))


def _compiled_scan() -> Any:
    """``xentkit.kernels.labels.first_bad_label``, imported on first use (it loads Numba); None
    where Numba's compiler is off (``NUMBA_DISABLE_JIT=1``: the kernels refuse to load), so that
    the label check falls back to NumPy's scan (compiled torch graphs check their labels so)."""
    if not _SCAN:
        try:
            from .kernels.labels import first_bad_label
        except RuntimeError:
            first_bad_label = None
        _SCAN.append(first_bad_label)
    return _SCAN[0]


_SCAN: list[Any] = []


def check_labels(
    labels: np.ndarray, num_classes: int, ignore_index: int, *, classes: str | None = None,
    name: str = "target", compiled: bool = False,
) -> np.ndarray:
    """Boolean mask of the non-ignored samples; raises :func:`label_error` for the first label
    outside ``[0, num_classes)``. ``classes`` defaults to "logits have C classes".

    ``labels`` may also be a torch tensor (the mask is then a tensor on its device; a GPU tensor
    costs one wait for the device, to know whether to raise). ``compiled``: int64 NumPy labels
    are scanned by Numba's compiled loop (``xentkit.kernels.labels``; for callers that run the
    Numba kernels anyway: it loads Numba), else by NumPy."""
    valid = labels != ignore_index
    found: Any = None  # the first bad label's position, once found
    if isinstance(labels, np.ndarray):
        if labels.size == 0:
            return valid
        scan = _compiled_scan() if compiled else None
        if scan is not None:
            index = scan(labels, num_classes, ignore_index)
            if index < 0:
                return valid
            found = np.unravel_index(index, labels.shape)
        elif labels.min() >= 0 and labels.max() < num_classes:
            return valid  # every label in range (two reductions, cheaper than the mask below)
    if found is None:
        bad = _bad_labels(labels, num_classes, ignore_index, valid)
        if not bad.any():
            return valid
        # (a tensor: read by torch, not viewed by NumPy, which a torch.func transform refuses
        # even for a tensor it does not wrap)
        found = np.argwhere(bad)[0] if isinstance(labels, np.ndarray) else bad.nonzero()[0].tolist()
    position = tuple(int(i) for i in found)
    raise label_error(
        int(labels[position].item()), position, num_classes, ignore_index,
        classes or _logits_classes(num_classes), name,
    )
