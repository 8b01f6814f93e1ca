"""Reference softmax, log-softmax, logsumexp and sigmoid, with their vector-Jacobian products.

Written for clarity on floating-point NumPy arrays that are already validated.
"""

from __future__ import annotations

import numpy as np


def logsumexp(x: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """log Σ_i exp(x_i) = m + log Σ_i exp(x_i − m) with m = max_i x_i.

    Subtracting the maximum keeps every exponent ≤ 0, so nothing overflows. A row that is all
    −inf has no finite maximum: its logsumexp is −inf (m is replaced by 0 to avoid −inf − −inf).
    """
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    with np.errstate(divide="ignore"):
        out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log softmax(x)_i = x_i − logsumexp(x)."""
    return x - logsumexp(x, axis=axis, keepdims=True)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """softmax(x)_i = exp(x_i − m) / Σ_j exp(x_j − m), m = max_j x_j (Caffe's SoftmaxLayer)."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(x - m)
    with np.errstate(invalid="ignore"):  # an all −inf slice is 0/0: NaN, as in PyTorch
        return e / np.sum(e, axis=axis, keepdims=True)


def softmax_backward(probs: np.ndarray, grad_probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """VJP of softmax: dx_i = p_i (g_i − Σ_j g_j p_j), from ∂p_j/∂x_i = p_j (δ_ij − p_i)."""
    inner = np.sum(grad_probs * probs, axis=axis, keepdims=True)
    return probs * (grad_probs - inner)


def log_softmax_backward(log_probs: np.ndarray, grad_log_probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """VJP of log-softmax: dx_i = g_i − p_i Σ_j g_j, from ∂ log p_j/∂x_i = δ_ij − p_i."""
    return grad_log_probs - np.exp(log_probs) * np.sum(grad_log_probs, axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) = 1 / (1 + exp(−x)), evaluated as exp(x) / (1 + exp(x)) for x < 0 so exp never overflows."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    """log σ(x) = min(x, 0) − log1p(exp(−|x|)): exact for large |x| of either sign."""
    return np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))
