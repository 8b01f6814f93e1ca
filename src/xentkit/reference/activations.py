"""Reference softmax, log-softmax, logsumexp and sigmoid, with their vector-Jacobian products.

Written for clarity on floating-point NumPy arrays that are already validated.
"""

from __future__ import annotations

import numpy as np


def _shift(m: np.ndarray) -> np.ndarray:
    """The row maxima to subtract: an all −inf row has no finite maximum and is shifted by 0
    (−inf − −inf would be NaN); +inf and NaN stay, so such rows give what torch gives."""
    return np.where(m == -np.inf, 0, m)


def row_max(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """``(max, argmax)`` along ``axis``, both keepdims (a NaN is the max of its row)."""
    top_index = np.expand_dims(np.argmax(x, axis=axis), axis)
    return np.take_along_axis(x, top_index, axis=axis), top_index


def top_and_rest(shifted: np.ndarray, top_index: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """``(t, δ)`` of d = x − max x, ``top_index`` the argmax (both keepdims): t = exp(d) at the
    argmax (1, or 0 for a row of −inf, NaN for a +inf or NaN shifted by 0) and the rest
    δ = Σ_{i ≠ argmax} exp(d_i), so that s = Σ_i exp(d_i) = t + δ."""
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.exp(shifted)
        top = np.take_along_axis(terms, top_index, axis=axis)
        np.put_along_axis(terms, top_index, 0, axis=axis)
        return top, np.sum(terms, axis=axis, keepdims=True)


def log_sum_exp_shifted(shifted: np.ndarray, top_index: np.ndarray, axis: int = -1) -> np.ndarray:
    """log Σ_i exp(d_i) for d = x − max x, ``top_index`` the argmax (both keepdims): with the
    largest term t (1, at the max) set apart, log1p(δ) of the rest δ = Σ_{i ≠ argmax} exp(d_i).

    log s of the sum s = 1 + δ loses δ's digits to the rounding of 1 + δ (a confident row's loss
    log(1 + δ) ≈ δ: at δ = 1e-14 a percent of it, from δ < 1e-16 all of it); log1p keeps them.
    Rows whose largest term is not 1 (all −inf: t = 0; a +inf or NaN shifted by 0) take
    log(t + δ): −inf, +inf or NaN, as before."""
    return log_of_top_and_rest(*top_and_rest(shifted, top_index, axis))


def log_of_top_and_rest(top: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """log(t + δ) of :func:`top_and_rest`'s parts: log1p(δ) where t is 1."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(top == 1, np.log1p(rest), np.log(top + rest))


def logsumexp(x: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """log Σ_i exp(x_i) = m + log Σ_i exp(x_i − m) with m = max_i x_i.

    Subtracting the maximum keeps every exponent ≤ 0, so nothing overflows; the log of the sum
    is taken as :func:`log_sum_exp_shifted` does (log1p of its part beyond 1). A row that is all
    −inf gives −inf, a row holding +inf gives +inf and one holding NaN gives NaN (as torch).
    """
    m, top_index = row_max(x, axis)
    m = np.where(np.isinf(m), 0, m)  # ±inf rows: exp(x) itself, Σ = +inf or 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # exp(inf) = inf
        out = m + log_sum_exp_shifted(x - m, top_index, axis)
    return out if keepdims else np.squeeze(out, axis=axis)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log softmax(x)_i = (x_i − m) − log Σ_j exp(x_j − m) = x_i − logsumexp(x). A row holding
    +inf or NaN, or all −inf, is NaN (as torch)."""
    # over: x − m of a row spanning more than the dtype's range is −inf, as it should be
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        m, top_index = row_max(x, axis)
        shifted = x - _shift(m)
        return shifted - log_sum_exp_shifted(shifted, top_index, axis)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """softmax(x)_i = exp(x_i − m) / Σ_j exp(x_j − m), m = max_j x_j (Caffe's SoftmaxLayer). A
    row holding +inf or NaN, or all −inf (0/0), is NaN (as torch)."""
    with np.errstate(invalid="ignore", over="ignore"):  # over: as in log_softmax
        e = np.exp(x - _shift(np.max(x, axis=axis, keepdims=True)))
        return e / np.sum(e, axis=axis, keepdims=True)


def softmax_backward(probs: np.ndarray, grad_probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """VJP of softmax: dx_i = p_i (g_i − Σ_j g_j p_j), from ∂p_j/∂x_i = p_j (δ_ij − p_i)."""
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite g: NaN and inf, as torch
        inner = np.sum(grad_probs * probs, axis=axis, keepdims=True)
        return probs * (grad_probs - inner)


def log_softmax_backward(log_probs: np.ndarray, grad_log_probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """VJP of log-softmax: dx_i = g_i − p_i Σ_j g_j, from ∂ log p_j/∂x_i = δ_ij − p_i."""
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite g: NaN and inf, as torch
        return grad_log_probs - np.exp(log_probs) * np.sum(grad_log_probs, axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) = 1 / (1 + exp(−x)), evaluated as exp(x) / (1 + exp(x)) for x < 0 so exp never overflows."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    """log σ(x) = min(x, 0) − log1p(exp(−|x|)): exact for large |x| of either sign."""
    return np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))
