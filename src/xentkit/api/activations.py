"""Public softmax, log-softmax, logsumexp, sigmoid and their backward passes."""

from __future__ import annotations

import numbers
from typing import SupportsIndex

import numpy as np
from numpy.typing import ArrayLike

from .. import reference
from .._options import as_array, check_flag
from ._config import reference_enabled
from ._half import widened
from ._rows import class_axis_last, class_rows, kernel_array, widened_blocks, widening_step
from ._validation import (
    as_float_array,
    class_axis,
    compute_dtype,
    copy_rounded,
    rounded,
    same_shape,
)


def _prepare(x: ArrayLike, name: str) -> tuple[np.ndarray, np.dtype]:
    array = as_float_array(x, name)
    return widened(array, compute_dtype(array.dtype)), array.dtype


def _classes(x: np.ndarray, axis: int, name: str) -> int:
    return class_axis(x, axis, name)


def _by_rows(array: np.ndarray, axis: int, what: str) -> np.ndarray:
    """The fused kernel (``xentkit.kernels.activations``) along ``axis``, ``what`` "softmax",
    "log_softmax" or "logsumexp": the class axis moved last, rows of the compute dtype, the
    result in the array's layout (logsumexp: without ``axis``, float64)."""
    from ..kernels import activations as kernel

    moved = class_axis_last(array, axis)
    rows = kernel_array(moved.reshape(-1, moved.shape[-1]) if moved.ndim != 2 else moved)
    kind = {"softmax": kernel.SOFTMAX, "log_softmax": kernel.LOG_SOFTMAX, "logsumexp": kernel.LOGSUMEXP}[what]
    result = kernel.softmax_rows(rows, kind)
    del rows  # (a row copy along another axis: freed before the copy back, two arrays alive, not three)
    if what == "logsumexp":
        return result.reshape(moved.shape[:-1])
    back = np.moveaxis(result.reshape(moved.shape), -1, axis)
    return back if back.flags.c_contiguous else np.ascontiguousarray(back)  # (as NumPy's own)


def _kernel_result(original: np.ndarray, axis: int, what: str) -> np.ndarray:
    """:func:`_by_rows` of ``original`` (any float dtype) rounded to its dtype. float16 beyond a
    block is widened block by block (``_rows.widened_blocks``) and each block's result rounded
    into the output as it comes: a whole float32 copy and a float32 result had taken 4 times the
    input's bytes besides the output. Rows are computed alone: the same bits either way."""
    work = compute_dtype(original.dtype)
    rows = class_rows(original, axis)  # ([batch, sequence, vocabulary]: blocks of rows)
    source, source_axis = (original, axis) if rows is None else (rows, 1)
    step = widening_step(source, source_axis, work)
    if not step:
        return rounded(_by_rows(widened(original, work), axis, what), original.dtype)
    shape = original.shape if what != "logsumexp" else original.shape[:axis] + original.shape[axis + 1 :]
    result = np.empty(shape, dtype=original.dtype)
    target = result if rows is None else result.reshape(source.shape if what != "logsumexp" else source.shape[:1])
    for start, stop, block in widened_blocks(source, step, work):
        copy_rounded(target[start:stop], _by_rows(block, source_axis, what))
    return result


def _kernels_take(array: np.ndarray) -> bool:
    """Whether the kernels run this call: not under ``use_reference``, and at least one class."""
    return array.size > 0 and not reference_enabled()


def softmax(x: ArrayLike, axis: SupportsIndex = -1) -> np.ndarray:
    """Softmax along ``axis``: ``softmax(x)_i = exp(x_i − m) / Σ_j exp(x_j − m)``, ``m = max_j x_j``.

    Subtracting the maximum (Caffe's SoftmaxLayer) leaves the result unchanged and keeps every
    exponent ≤ 0, so no input the dtype can hold overflows. Shapes: at least one dimension, with
    at least one class along ``axis``, e.g. ``[batch, classes]`` (a 0-d input or an empty class
    axis is a ValueError); the output has the input's shape and dtype (float16 is computed in
    float32). Computed by a
    fused kernel (``xentkit.kernels.activations``: each row's max and sum in one read, then one
    write); ``use_reference(True)`` runs the NumPy formula. The kernel's exponential flushes
    probabilities below the dtype's smallest normal to 0 (float32: entries more than 87 below
    the row's max; float64: 708), where torch and the reference keep subnormal values (8e-40
    for ``[0, −90]`` in float32); :func:`log_softmax` keeps every entry.
    See also :func:`log_softmax`, :func:`softmax_backward`.

    >>> import numpy as np, xentkit
    >>> np.round(xentkit.softmax([3.0, 1.0, -3.0]), 4)
    array([0.8789, 0.1189, 0.0022])
    """
    original = as_float_array(x, "x")
    axis = _classes(original, axis, "x")
    if _kernels_take(original):
        return _kernel_result(original, axis, "softmax")
    return rounded(reference.softmax(original.astype(compute_dtype(original.dtype), copy=False), axis=axis), original.dtype)


def log_softmax(x: ArrayLike, axis: SupportsIndex = -1) -> np.ndarray:
    """Log-softmax along ``axis``: ``log_softmax(x)_i = x_i − logsumexp(x)``.

    Exact where ``log(softmax(x))`` underflows to −inf. Shapes as :func:`softmax`; the same fused
    kernel (one read for each row's max and sum, one write). The kernel sums each row in float64,
    the max's terms counted apart from the rest δ: the top class of a confident row,
    −log1p(δ) ≈ −δ, keeps its relative accuracy (−4.2e-18 for ``[0, −40]``; ``docs/precision.md``).
    See also :func:`log_softmax_backward`, :func:`nll_loss`.

    >>> import numpy as np, xentkit
    >>> np.round(xentkit.log_softmax([3.0, 1.0, -3.0]), 4)
    array([-0.1291, -2.1291, -6.1291])
    """
    original = as_float_array(x, "x")
    axis = _classes(original, axis, "x")
    if _kernels_take(original):
        return _kernel_result(original, axis, "log_softmax")
    return rounded(reference.log_softmax(original.astype(compute_dtype(original.dtype), copy=False), axis=axis), original.dtype)


def logsumexp(x: ArrayLike, axis: SupportsIndex = -1, keepdims: bool = False) -> np.ndarray:
    """``log Σ_i exp(x_i)`` along ``axis``, computed as ``m + log Σ_i exp(x_i − m)``, ``m = max x``.

    Shapes: the input's shape without ``axis`` (kept as 1 with ``keepdims=True``). A slice that
    is all −inf gives −inf. The fused kernel of :func:`softmax`, one read of each row.

    >>> import numpy as np, xentkit
    >>> np.round(xentkit.logsumexp([1000.0, 1000.0]), 4)
    np.float64(1000.6931)
    """
    original = as_float_array(x, "x")
    axis = _classes(original, axis, "x")
    keep = _keepdims(keepdims)
    if _kernels_take(original):
        lse = _kernel_result(original, axis, "logsumexp")
        return np.expand_dims(lse, axis) if keep else lse
    array = original.astype(compute_dtype(original.dtype), copy=False)
    return rounded(reference.logsumexp(array, axis=axis, keepdims=keep), original.dtype)


def _keepdims(value: object) -> bool:
    """A bool, or 0 / 1 as NumPy takes them; anything else (a string, an array) is a TypeError."""
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    return check_flag(value, "keepdims")


def sigmoid(x: ArrayLike) -> np.ndarray:
    """Logistic function ``σ(x) = 1 / (1 + exp(−x))``, elementwise, with no overflow for any x.

    >>> import numpy as np, xentkit
    >>> np.round(xentkit.sigmoid([-800.0, 0.0, 1.5]), 4)
    array([0.    , 0.5   , 0.8176])
    """
    array, dtype = _prepare(x, "x")
    return reference.sigmoid(array).astype(dtype, copy=False)


def log_sigmoid(x: ArrayLike) -> np.ndarray:
    """``log σ(x) = min(x, 0) − log1p(exp(−|x|))``, elementwise; exact for large negative x.

    >>> import numpy as np, xentkit
    >>> np.round(xentkit.log_sigmoid([-20.0, 0.0, 2.0]), 4)
    array([-20.    ,  -0.6931,  -0.1269])
    """
    array, dtype = _prepare(x, "x")
    return np.asarray(reference.log_sigmoid(array)).astype(dtype, copy=False)  # (0-d: an array)


def _backward_inputs(
    values: ArrayLike, grad: ArrayLike, names: tuple[str, str], axis: int
) -> tuple[np.ndarray, np.ndarray, np.dtype, int]:
    first = as_float_array(values, names[0])
    second = as_array(grad, names[1])
    if second.dtype.kind in "iu":  # e.g. a one-hot [0, 1, 0]: in the values' dtype, as every
        second = rounded(second, first.dtype)  # other upstream gradient (upstream_gradient)
    elif second.dtype.kind == "f":
        second = as_float_array(second, names[1])
    else:
        raise TypeError(f"{names[1]} must be a floating-point or integer array, got dtype {second.dtype}")
    same_shape(second, names[1], first, names[0])
    dtype = np.result_type(first.dtype, second.dtype)
    work = compute_dtype(dtype)
    axis = _classes(first, axis, names[0])
    return widened(first, work), widened(second, work), dtype, axis


def softmax_backward(probs: ArrayLike, grad_probs: ArrayLike, axis: SupportsIndex = -1) -> np.ndarray:
    """Vector-Jacobian product of softmax: ``dx_i = p_i·(g_i − Σ_j g_j·p_j)``.

    ``probs`` is the softmax output ``p``, ``grad_probs`` the gradient ``g`` of a loss with
    respect to ``p`` (same shape; floating-point, or integer as a one-hot, then taken in
    ``probs``' dtype); returns the gradient with respect to the softmax input, in the dtype the
    two promote to. The Jacobian ``∂p_j/∂x_i = p_j·(δ_ij − p_i)`` is never formed.

    >>> import numpy as np, xentkit
    >>> p = xentkit.softmax([3.0, 1.0, -3.0])
    >>> np.round(xentkit.softmax_backward(p, [-1 / p[0], 0.0, 0.0]), 4)  # d(−log p_0)/dx
    array([-0.1211,  0.1189,  0.0022])
    """
    p, g, dtype, axis = _backward_inputs(probs, grad_probs, ("probs", "grad_probs"), axis)
    return rounded(reference.softmax_backward(p, g, axis=axis), dtype)


def log_softmax_backward(log_probs: ArrayLike, grad_log_probs: ArrayLike, axis: SupportsIndex = -1) -> np.ndarray:
    """Vector-Jacobian product of log-softmax: ``dx_i = g_i − p_i·Σ_j g_j``, ``p = exp(log_probs)``.

    ``grad_log_probs`` as ``grad_probs`` of :func:`softmax_backward` (same shape, float or integer).

    >>> import numpy as np, xentkit
    >>> log_p = xentkit.log_softmax([3.0, 1.0, -3.0])
    >>> np.round(xentkit.log_softmax_backward(log_p, [-1.0, 0.0, 0.0]), 4)  # softmax − onehot
    array([-0.1211,  0.1189,  0.0022])
    """
    log_p, g, dtype, axis = _backward_inputs(
        log_probs, grad_log_probs, ("log_probs", "grad_log_probs"), axis
    )
    return rounded(reference.log_softmax_backward(log_p, g, axis=axis), dtype)
