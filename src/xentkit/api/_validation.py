"""Input checks shared by the public functions.

Every check raises ``TypeError`` or ``ValueError`` naming the argument, what was expected and
what was received, before any array reaches a compiled kernel (kernels do not bounds-check).
"""

from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike

REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def describe(value: object) -> str:
    """A short description of a received value for error messages."""
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return f"{type(value).__name__} {value!r}"[:120]


def as_float_array(value: ArrayLike, name: str) -> np.ndarray:
    """``value`` as a floating-point ndarray (float16, float32 or float64), never copied needlessly.

    Integer, boolean, complex and non-numeric inputs are a ``TypeError``.
    """
    try:
        array = np.asarray(value)
    except Exception as error:  # ragged lists and the like
        raise TypeError(f"{name} must be a numeric array, got {describe(value)}: {error}") from None
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
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {describe(axis)}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{name} must be in [{-ndim}, {ndim}) for an input with {ndim} dimensions, got {axis}"
        )
    return axis % ndim


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    return str(reduction)


def check_fraction(value: object, name: str) -> float:
    """A real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {describe(value)}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_nonnegative(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a non-negative float, got {describe(value)}")
    value = float(value)
    if not value >= 0.0 or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return value


def check_softcap(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"softcap must be None or a positive float, got {describe(value)}")
    value = float(value)
    if not value > 0.0 or not np.isfinite(value):
        raise ValueError(f"softcap must be None or a finite float > 0, got {value}")
    return value


_INT64 = np.iinfo(np.int64)


def check_ignore_index(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {describe(value)}")
    if not _INT64.min <= int(value) <= _INT64.max:
        raise ValueError(f"ignore_index must fit in int64, got {int(value)}")
    return int(value)


def check_class_weight(weight: ArrayLike | None, num_classes: int, dtype: np.dtype) -> np.ndarray | None:
    """A per-class weight vector of length ``num_classes`` in ``dtype``, or None."""
    if weight is None:
        return None
    array = np.asarray(weight)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"weight must be a numeric array, got dtype {array.dtype}")
    if array.shape != (num_classes,):
        raise ValueError(
            f"weight must have shape ({num_classes},), one value per class, got shape {array.shape}"
        )
    return array.astype(dtype, copy=False)


def hard_labels(target: ArrayLike, sample_shape: tuple[int, ...]) -> np.ndarray:
    """Integer class indices with the sample shape, as int64."""
    array = np.asarray(target)
    if array.dtype.kind not in "iu":
        raise TypeError(
            f"target of class indices must have an integer dtype, got dtype {array.dtype} "
            f"(class probabilities must have the logits' shape)"
        )
    if array.shape != sample_shape:
        raise ValueError(
            f"target must have shape {sample_shape} (class indices) or the logits' shape "
            f"(class probabilities), got shape {array.shape}"
        )
    if array.dtype == np.uint64 and array.size and array.max() > _INT64.max:
        # checked before the cast to int64, which would wrap such a label (even onto ignore_index)
        position = tuple(int(i) for i in np.argwhere(array > _INT64.max)[0])
        raise ValueError(
            f"target has label {int(array[position])} at position {position}, too large for a class index"
        )
    return array.astype(np.int64, copy=False)


def check_labels(labels: np.ndarray, num_classes: int, ignore_index: int, name: str = "target") -> np.ndarray:
    """Boolean mask of the non-ignored samples; raises if a label is outside ``[0, num_classes)``."""
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        label = int(labels[position])
        raise ValueError(
            f"{name} has label {label} at position {position} but logits have {num_classes} "
            f"classes (labels must be in [0, {num_classes}) or equal ignore_index={ignore_index})"
        )
    return valid


def probability_target(target: ArrayLike, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    array = np.asarray(target)
    if array.dtype.kind != "f":
        raise TypeError(
            f"target with the logits' shape {shape} holds class probabilities and must be "
            f"floating-point, got dtype {array.dtype}"
        )
    return array.astype(dtype, copy=False)


def same_shape(array: np.ndarray, name: str, reference: np.ndarray, reference_name: str) -> None:
    if array.shape != reference.shape:
        raise ValueError(
            f"{name} must have the shape of {reference_name} {reference.shape}, got {array.shape}"
        )


def upstream_gradient(grad_output: ArrayLike | None, reduction: str, sample_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The upstream gradient broadcast to the per-sample shape ("none") or a scalar."""
    if grad_output is None:
        return np.ones(sample_shape if reduction == "none" else (), dtype=dtype)
    array = np.asarray(grad_output)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"grad_output must be numeric, got dtype {array.dtype}")
    array = array.astype(dtype, copy=False)
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


def check_out(out: object, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {describe(out)}")
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(
            f"out must have shape {shape} and dtype {dtype} (those of the gradient), "
            f"got shape {out.shape} and dtype {out.dtype}"
        )
    if not out.flags.writeable:
        raise ValueError("out must be a writeable array, got a read-only one")
    return out
