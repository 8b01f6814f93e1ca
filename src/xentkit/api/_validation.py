"""Array checks shared by the public functions (options: ``xentkit._options``; class indices:
``xentkit._labels``).

Every check raises ``TypeError`` or ``ValueError`` naming the argument, what was expected and
what was received, before any array reaches a compiled kernel (kernels do not bounds-check).
"""

from __future__ import annotations

import numbers
import operator

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from .._options import as_array, describe, dtype_name, refuse_valueless
from ..reference.reductions import FLOAT_MAX
from ._half import narrowed, narrowed_into

FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_HALF = np.dtype(np.float16)


def as_float_array(value: ArrayLike, name: str) -> np.ndarray:
    """``value`` as a floating-point ndarray (float16, float32 or float64), never copied needlessly.

    Integer, boolean, complex and non-numeric inputs are a ``TypeError``.
    """
    array = as_array(value, name)
    if array.dtype.type not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point array (float16, float32 or float64), "
            f"got dtype {array.dtype}"
        )
    if not array.dtype.isnative:  # e.g. big-endian '>f4' read from a file: kernels need native
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a computation runs in: float16 is computed in float32."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def normalize_axis(axis: object, ndim: int, name: str = "axis") -> int:
    """``axis`` as a non-negative int in ``[0, ndim)``."""
    if type(axis) is int and -ndim <= axis < ndim:  # the usual case, without the ABC check
        return axis % ndim
    if isinstance(axis, bool | np.bool_) or str(getattr(axis, "dtype", "")) in ("bool", "torch.bool"):
        raise TypeError(f"{name} must be an int, got {describe(axis)}")
    refuse_valueless(axis, name, "an int")
    if not isinstance(axis, numbers.Integral):
        try:  # an integer of another kind that says so (a 0-d integer array, as NumPy takes)
            axis = operator.index(axis)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{name} must be an int, got {describe(axis)}") from None
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{name} must be in [{-ndim}, {ndim}) for an input with {ndim} dimensions, got {axis}"
        )
    return axis % ndim


def class_axis(array: np.ndarray, axis: object, name: str) -> int:
    """``axis`` of ``array`` normalized, checked to hold at least one class."""
    return class_axis_of_shape(array.shape, axis, name)


def class_axis_of_shape(shape: tuple[int, ...], axis: object, name: str) -> int:
    """:func:`class_axis` from the shape alone (NumPy arrays, and tensors on any device)."""
    shape = tuple(shape)
    if not shape:
        raise ValueError(f"{name} must have at least one dimension (the classes), got a scalar")
    axis = normalize_axis(axis, len(shape))
    if shape[axis] == 0:
        raise ValueError(f"{name} must have at least one class along axis {axis}, got shape {shape}")
    return axis


def check_weight_layout(numeric: bool, shape: tuple[int, ...], num_classes: int | None, dtype: object) -> None:
    """The class weights' rules from metadata alone (NumPy arrays, and tensors on any device): a
    numeric dtype (``numeric``: integer or floating) and shape ``(num_classes,)``; ``None``: one
    value per class of a vocabulary of V classes that the caller checks later (the
    vocabulary-parallel forms: V is known once the ranks have agreed)."""
    if not numeric:
        raise TypeError(f"weight must be a numeric array, got dtype {dtype_name(dtype)}")
    if len(shape) != 1 or (num_classes is not None and shape[0] != num_classes):
        wanted = "be 1-D" if num_classes is None else f"have shape ({num_classes},)"
        raise ValueError(f"weight must {wanted}, one value per class, got shape {tuple(shape)}")


def check_broadcasts_to(name: str, shape: tuple[int, ...], target: tuple[int, ...]) -> None:
    """An elementwise factor's shape (``weight``, ``pos_weight``) broadcasting to the input's
    ``target`` shape without widening it, else a ValueError naming it; from shapes alone, so
    that arrays and tensors on any device share the rule and its message. Size by size, from the
    last (not ``np.broadcast_shapes``, which would make a traced, symbolic size a constant:
    ``torch.export`` of a dynamic batch): each 1 or the target's."""
    fits = len(shape) <= len(target) and all(
        size == 1 or size == wanted for size, wanted in zip(reversed(shape), reversed(target), strict=False)
    )
    if not fits:
        raise ValueError(f"{name} must broadcast to the input's shape {tuple(target)}, got shape {tuple(shape)}")


def check_class_weight(weight: ArrayLike | None, num_classes: int, dtype: np.dtype) -> np.ndarray | None:
    """A per-class weight vector of length ``num_classes`` in ``dtype``, or None."""
    if weight is None:
        return None
    array = as_array(weight, "weight")
    check_weight_layout(array.dtype.kind in "fiu", array.shape, num_classes, array.dtype)
    return rounded(array, dtype)


def same_shape(array: np.ndarray, name: str, reference: np.ndarray, reference_name: str) -> None:
    if array.shape != reference.shape:
        raise ValueError(
            f"{name} must have the shape of {reference_name} {reference.shape}, got {array.shape}"
        )


def upstream_gradient(grad_output: ArrayLike | None, reduction: str, sample_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The upstream gradient broadcast to the per-sample shape ("none") or a scalar."""
    if grad_output is None:
        return np.ones(sample_shape if reduction == "none" else (), dtype=dtype)
    array = as_array(grad_output, "grad_output")
    if array.dtype.kind not in "fiu":
        raise TypeError(f"grad_output must be numeric, got dtype {array.dtype}")
    array = rounded(array, dtype)
    if reduction == "none":
        try:
            return np.broadcast_to(array, sample_shape)
        except ValueError:
            raise ValueError(
                f"grad_output must broadcast to the per-sample loss shape {sample_shape} "
                f"for reduction='none', got shape {array.shape}"
            ) from None
    if array.size != 1:
        raise ValueError(
            f"grad_output must be a scalar for reduction={reduction!r}, got shape {array.shape}"
        )
    return array.reshape(())


# Two upstream-gradient rules, kept apart because they answer different questions (both end as
# the kernels' [rows] float64 through ``_rows.RowLayout.per_row``):
# - ``upstream_gradient``, of a loss: its shape follows the reduction (exactly one value for
#   "mean"/"sum", which the reduction then scales, e.g. by 1/Σw; one per sample for "none"),
#   and it defaults to 1 (the gradient of loss.sum());
# - ``output_gradient``, of one of several per-row outputs (log_probs' log p(y), entropy, lse):
#   always broadcast to the rows' shape, never scaled, and it defaults to 0 (an output nobody
#   used adds nothing); its messages name that output.


def output_gradient(
    value: ArrayLike | None, name: str, sample_shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray | float:
    """The upstream gradient of a per-row output: 0.0 when None, else rounded to ``dtype`` (the
    logits' compute dtype, as the reference takes it: 1e39 is inf in float32) and broadcast to
    ``sample_shape`` in float64."""
    if value is None:
        return 0.0
    array = as_array(value, name)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a numeric array, got {describe(value)}")
    try:
        return np.broadcast_to(rounded(array, dtype).astype(np.float64, copy=False), sample_shape)
    except ValueError:
        raise ValueError(
            f"{name} must broadcast to the rows' shape {sample_shape} (the logits' shape without the "
            f"class axis), got shape {array.shape}"
        ) from None


def check_out(out: object, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``out`` when it is a writeable array of ``shape`` and ``dtype`` (in either byte order: the
    logits themselves, big-endian as read from a file, are a valid ``out``)."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {describe(out)}")
    if out.shape != shape or out.dtype.newbyteorder("=") != dtype.newbyteorder("="):
        raise ValueError(
            f"out must have shape {shape} and dtype {dtype} (those of the gradient), "
            f"got shape {out.shape} and dtype {out.dtype}"
        )
    if not out.flags.writeable:
        raise ValueError("out must be a writeable array, got a read-only one")
    if overlaps_itself(out):
        raise ValueError(
            f"out must not hold one memory location at two positions (the gradient's elements would overwrite "
            f"each other), got an array of shape {out.shape} with strides {out.strides}"
        )
    return out


_EXACT_OVERLAP_LIMIT = 1 << 22  # elements whose offsets overlaps_itself compares (32 MiB of them)


def overlaps_itself(array: np.ndarray) -> bool:
    """Whether two elements of ``array`` share memory (a 0-stride view, ``as_strided`` rows that
    overlap). Each axis's stride at least the span of the shorter-strided axes before it (every
    array NumPy makes but such views) answers no at once, an axis of stride 0 yes; otherwise
    the element offsets are compared, exactly (reversing an axis moves the offsets, it does not
    change their gaps), up to 2**22 elements: a larger such view is taken as sharing (as
    :func:`overlaps` takes what is too hard to tell)."""
    axes = sorted((abs(stride), size) for stride, size in zip(array.strides, array.shape, strict=True) if size > 1)
    if array.size == 0:
        return False
    if axes and axes[0][0] == 0:
        return True
    span = array.itemsize
    for stride, size in axes:
        if stride < span:
            break
        span += stride * (size - 1)
    else:
        return False
    if array.size > _EXACT_OVERLAP_LIMIT:
        return True
    offsets = np.zeros(1, dtype=np.int64)
    for stride, size in axes:
        offsets = (offsets[:, None] + np.arange(size, dtype=np.int64) * stride).ravel()
    offsets.sort()
    return bool(np.any(np.diff(offsets) < array.itemsize))


def overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` share an element: their bounds first (cheap, and the usual
    answer), then the exact question, with its work bounded (interleaved columns of one array,
    ``x[:, ::2]`` and ``x[:, 1::2]``, share bounds but no element); too hard to tell is taken
    as sharing."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=10_000))
    except _TOO_HARD:
        return True


_TOO_HARD = getattr(np, "exceptions", np).TooHardError  # (NumPy < 1.25: at the top level)


def copy_rounded(out: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` written into ``out`` (its dtype), a finite value beyond that dtype's range as ±inf
    (as :func:`rounded`), without NumPy's overflow warning; returns ``out``."""
    if narrowed_into(out, values):
        return out
    if values.dtype.itemsize > out.dtype.itemsize:
        with np.errstate(over="ignore"):
            np.copyto(out, values, casting="unsafe")
    else:
        np.copyto(out, values, casting="unsafe")
    return out


def rounded(values: ArrayLike, dtype: DTypeLike) -> np.ndarray:
    """``values`` as ``dtype`` (no copy when they are already): a finite value beyond the
    dtype's range becomes ±inf, as in torch, without NumPy's overflow warning. The warning is
    silenced only where a narrowing cast could overflow (a context manager costs microseconds
    that small problems notice)."""
    array = np.asarray(values)
    dtype = np.dtype(dtype)
    largest = FLOAT_MAX.get(dtype) if array.dtype.itemsize > dtype.itemsize else None
    if largest is not None and (array.ndim or not abs(float(array)) <= largest):
        if dtype == _HALF:
            half = narrowed(array)  # (NumPy's cast to float16 is slow on small values)
            if half is not None:
                return half
        with np.errstate(over="ignore"):
            return array.astype(dtype)
    return array.astype(dtype, copy=False)

