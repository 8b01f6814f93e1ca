"""float16 arrays to and from the compute dtype, for the api's half-precision paths: one home.

The api computes float16 inputs in float32 (``_validation.compute_dtype``) and rounds the results
back. NumPy's casts give the right values (the kernels give the same bits, NaNs aside: see
``xentkit.kernels.half``), but its float32 → float16 cast takes ~70 ns for each
value that lands among float16's subnormals (a gradient's entries mostly do) and its float16 →
float32 cast ~2-8 ns; arrays of at least ``KERNEL_MIN_VALUES`` values go through
``xentkit.kernels.half`` instead (the same bits, ~1 ns a value, on Numba's threads), except under
``use_reference`` (NumPy alone). Results keep the memory layout NumPy's ``astype`` gives them.
"""

from __future__ import annotations

import numpy as np

from ._config import reference_enabled

__all__ = ["KERNEL_MIN_VALUES", "narrowed", "narrowed_into", "widen_into", "widened"]

# Arrays of fewer values take NumPy's casts (a kernel call costs a few microseconds)
KERNEL_MIN_VALUES = 1 << 12

_HALF = np.dtype(np.float16)
_FLOAT32 = np.dtype(np.float32)
_WIDE = (np.dtype(np.float32), np.dtype(np.float64))


def _kernels():
    from ..kernels import half

    return half


def _takes_kernel(array: np.ndarray) -> bool:
    """A large array, the kernels in use, and writeable memory (a read-only array would compile
    a specialization of its own: NumPy's cast serves it)."""
    return array.size >= KERNEL_MIN_VALUES and array.flags.writeable and not reference_enabled()


def _in_memory_order(array: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """``array`` transposed so that it is C-contiguous, and the axes that transpose it back, when
    some order of its axes makes it contiguous (a ``moveaxis`` or ``.T`` view of a contiguous
    array); None otherwise."""
    if array.flags.c_contiguous:
        return array, tuple(range(array.ndim))
    order = sorted(range(array.ndim), key=lambda axis: -abs(array.strides[axis]))
    view = array.transpose(order)
    if not view.flags.c_contiguous:
        return None
    return view, tuple(np.argsort(order))


def narrowed(array: np.ndarray) -> np.ndarray | None:
    """``array`` (float32 or float64) rounded to a new float16 array in its memory layout, by the
    kernel; None where NumPy's cast is the one to use (a small array, the reference, another
    dtype, a layout no order of axes makes contiguous). No overflow warning (±inf beyond 65504)."""
    if array.dtype not in _WIDE or not _takes_kernel(array):
        return None
    ordered = _in_memory_order(array)
    if ordered is None:
        return None
    view, back = ordered
    out = np.empty(view.shape, dtype=_HALF)
    _kernels().narrow_to_half(view, out)
    return out.transpose(back)


def narrowed_into(out: np.ndarray, values: np.ndarray) -> bool:
    """Write ``values`` (float32 or float64) rounded into the float16 ``out`` (of their shape)
    by the kernel, when it applies; False where the caller is to use NumPy's cast."""
    if out.dtype != _HALF or values.dtype not in _WIDE or out.shape != values.shape or not _takes_kernel(values):
        return False  # (another shape: NumPy's broadcasting copy, or its error)
    if out.flags.c_contiguous and values.flags.c_contiguous and out.flags.writeable:
        _kernels().narrow_to_half(values, out)
        return True
    rounded = narrowed(values)
    if rounded is None:
        return False
    np.copyto(out, rounded)  # (float16 to float16: a plain copy)
    return True


def widened(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` as ``dtype`` (``astype(dtype, copy=False)``), a float16 array widened to float32
    by the kernel where it applies."""
    if array.dtype != _HALF or dtype != _FLOAT32 or not _takes_kernel(array):
        return array.astype(dtype, copy=False)
    ordered = _in_memory_order(array)
    if ordered is None:
        return array.astype(dtype)
    view, back = ordered
    out = np.empty(view.shape, dtype=_FLOAT32)
    _kernels().widen_half(view, out)
    return out.transpose(back)


def widen_into(out: np.ndarray, halves: np.ndarray) -> None:
    """Write the float16 ``halves`` into the C-contiguous float32 ``out`` of their shape."""
    if halves.flags.c_contiguous and halves.shape == out.shape and out.dtype == _FLOAT32 and _takes_kernel(halves):
        _kernels().widen_half(halves, out)
    else:
        np.copyto(out, halves)
