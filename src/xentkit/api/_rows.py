"""The kernels' row layout, for the api functions that call a fused kernel (cross-entropy,
log-probabilities): one home for the way there and back.

The kernels take plain C-contiguous arrays (``docs/CONTRACTS.md``): the logits as a
``[rows, classes]`` matrix, the labels and every per-row coefficient as ``[rows]`` arrays, and a
``[rows, classes]`` buffer for the gradient. :class:`RowLayout` builds them from the caller's
layout (any class axis, any leading shape) and puts the gradient back into it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from numpy.typing import ArrayLike

from ._half import widen_into

__all__ = [
    "WIDEN_BLOCK_BYTES", "RowLayout", "class_axis_last", "class_rows", "kernel_array", "widened_blocks", "widening_step",
]

# The bytes of one block of a half-precision array widened to the compute dtype block by block
# (:func:`widening_step`): a whole float32 copy had doubled a float16 call's memory, and its
# float32 result (softmax) had added two more times the input's bytes.
WIDEN_BLOCK_BYTES = 2**22


def kernel_array(array: np.ndarray, dtype: object = None) -> np.ndarray:
    """``array`` as a C-contiguous, writeable array of ``dtype``: what the kernels are compiled
    for (read-only memory, a ``np.broadcast_to`` view or a frozen array, would otherwise fail
    inside Numba's typing or compile a specialization of its own); copied only when needed."""
    contiguous = np.ascontiguousarray(array, dtype=dtype)
    return contiguous if contiguous.flags.writeable else contiguous.copy()


def class_axis_last(array: np.ndarray, axis: int) -> np.ndarray:
    """``array`` with ``axis`` moved last (the array itself when it is last already: moveaxis
    costs microseconds that small problems notice)."""
    return array if axis == array.ndim - 1 else np.moveaxis(array, axis, -1)


def class_rows(array: np.ndarray, axis: int) -> np.ndarray | None:
    """``array`` as ``[rows, classes]`` (a view) where it has more than two dimensions, the class
    axis last and C-contiguous memory (a language model's ``[batch, sequence, vocabulary]``
    logits), for :func:`widening_step` to cut its rows rather than its first axis (a batch of one
    sequence had been one block); None otherwise."""
    if array.ndim > 2 and axis == array.ndim - 1 and array.flags.c_contiguous:
        return array.reshape(-1, array.shape[-1])
    return None


def widening_step(array: np.ndarray, axis: int, dtype: np.dtype) -> int:
    """How many entries of ``array``'s first axis to widen to ``dtype`` at a time
    (:func:`widened_blocks`), or 0 to convert the whole array at once: when it is ``dtype``
    already, when its copy in ``dtype`` fits in one block of ``WIDEN_BLOCK_BYTES``, or when the
    first axis is the class axis ``axis`` (a row would be cut)."""
    if array.dtype == dtype or array.ndim < 2 or axis == 0 or array.size == 0:
        return 0
    per_entry = dtype.itemsize * (array.size // array.shape[0])
    if per_entry * array.shape[0] <= WIDEN_BLOCK_BYTES:
        return 0
    return max(1, WIDEN_BLOCK_BYTES // per_entry)


def widened_blocks(array: np.ndarray, step: int, dtype: np.dtype) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(start, stop, block)`` over ``array``'s first axis, ``step`` entries at a time (the last
    block may be shorter): ``block`` is ``array[start:stop]`` converted to ``dtype`` into one
    C-contiguous buffer that every block reuses (each block is gone when the next one comes)."""
    entries = array.shape[0]
    per_entry = array.size // entries
    buffer = np.empty(min(step, entries) * per_entry, dtype=dtype)
    for start in range(0, entries, step):
        stop = min(start + step, entries)
        block = buffer[: (stop - start) * per_entry].reshape((stop - start, *array.shape[1:]))
        widen_into(block, array[start:stop])
        yield start, stop, block


class RowLayout:
    """``logits`` (already in the compute dtype, ``axis`` normalized) with the class axis moved
    last (``moved``, the samples' shape ``sample_shape``) and as the kernels' C-contiguous
    ``[rows, classes]`` ``matrix`` (a copy only when the moved logits are not contiguous).

    ``private``: the caller made ``logits`` itself (a dtype conversion), so they and the matrix
    may be overwritten by the gradient; so may a contiguous copy made here. The caller's own
    arrays are never written, except an ``out=`` handed to :meth:`gradient_buffer` (which may be
    the logits: in place).

    A slotted class built once per call, its checks kept to a few comparisons: small problems
    are timed in microseconds.
    """

    __slots__ = ("_last", "_out", "axis", "classes", "matrix", "moved", "private", "rows", "sample_shape")

    def __init__(self, logits: np.ndarray, axis: int, private: bool) -> None:
        self.axis = axis
        self._last = axis == logits.ndim - 1
        self._out: np.ndarray | None = None  # the caller's out=, once the kernel writes there
        self.moved = moved = class_axis_last(logits, axis)
        self.sample_shape: tuple[int, ...] = moved.shape[:-1]
        self.classes: int = moved.shape[-1]
        self.rows: int = math.prod(self.sample_shape)
        contiguous = kernel_array(moved)  # ``moved`` itself when it is C-contiguous and writeable
        self.matrix = contiguous.reshape(self.rows, self.classes)
        self.private = private or contiguous is not moved

    def labels(self, labels: np.ndarray) -> np.ndarray:
        """Class indices of the samples' shape as the kernels' contiguous int64 ``[rows]``."""
        return kernel_array(labels, np.int64).reshape(self.rows)

    def targets(self, targets: np.ndarray) -> np.ndarray:
        """Class probabilities of the logits' layout (and dtype) as the kernels' C-contiguous
        ``[rows, classes]``, moved as the logits were."""
        return kernel_array(class_axis_last(targets, self.axis)).reshape(self.rows, self.classes)

    def per_row(self, value: ArrayLike | float) -> np.ndarray:
        """A per-row coefficient (a float, an array of one value, or one value per sample with
        the samples' shape, broadcast views included) as the kernels' contiguous float64
        ``[rows]``."""
        if type(value) is float:  # the common scalar: no array conversion
            return np.full(self.rows, value)
        array = np.asarray(value, dtype=np.float64)
        if array.size == 1:
            return np.full(self.rows, float(array.reshape(())))
        return np.ascontiguousarray(array).reshape(self.rows)

    def gradient_buffer(self, out: np.ndarray | None = None) -> np.ndarray:
        """The ``[rows, classes]`` array the kernel writes the gradient into: the caller's ``out``
        when it is laid out as the matrix already (class axis last, the compute dtype,
        C-contiguous; it may be the logits themselves), else the matrix when it is ``private``,
        else a new array. ``out`` is assumed checked (the logits' shape, writeable, the logits
        or no overlap with them)."""
        if out is not None and self._last and out.dtype == self.matrix.dtype and out.flags.c_contiguous:
            self._out = out
            return out.reshape(self.rows, self.classes)
        return self.matrix if self.private else np.empty_like(self.matrix)

    def in_layout(self, grad: np.ndarray) -> np.ndarray:
        """A gradient of ``[rows, classes]`` (or of the moved shape) in the logits' layout:
        the caller's ``out`` itself when :meth:`gradient_buffer` chose it."""
        if self._out is not None:
            return self._out
        grad = grad.reshape(self.moved.shape)
        return grad if self._last else np.moveaxis(grad, -1, self.axis)
