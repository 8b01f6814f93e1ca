"""Token log-probabilities, entropies and log-sum-exps, with their vector-Jacobian product.

What reinforcement learning on language models (PPO, GRPO) and evaluation need per position:
the log-probability of the token that was sampled and the entropy of the distribution, at a
sampling temperature T. Per row (class axis last), with z = logits / T:

    lse = log Σ_c exp z_c,     p = softmax(z) = exp(z − lse)
    log p(y) = z_y − lse                               (≤ 0)
    H = −Σ_c p_c log p_c = lse − Σ_c p_c z_c           (≥ 0)

and for upstream gradients g (of log p(y)), h (of H) and k (of lse), per row:

    ∂/∂z_j = g·([j = y] − p_j) − h·p_j·(z_j − lse + H) + k·p_j
    ∂/∂logits = ∂/∂z / T

A row whose target is ``ignore_index`` gets log p 0, H 0, lse 0 and a zero gradient.

Two forms live here. :func:`log_probs_and_entropy` and :func:`log_probs_backward` are the oracle,
written from the definitions for clarity. :func:`row_statistics` and
:func:`gradient_coefficients` are the algebra every fast path shares (the Numba kernel, the
chunked linear forms, the vocabulary-parallel shards): a pass over a row gives, with m its max,

    e = s − 1,  s = Σ_j exp(z_j − m),   u = Σ_j exp(z_j − m)·(z_j − m)      (e ≥ 0, u ≤ 0)

the excess e summed with the max's own terms (each exactly 1) counted apart, so that a confident
row's e keeps its digits (s = 1 + e rounded would lose those below 2⁻⁵³: at e = 1e-14 a percent
of it, from e < 1e-16 all of it). From them lse = m + log1p(e), H = log1p(e) − u/(1 + e) (a sum
of two terms ≥ 0, never negative) and log p(y) = (z_y − m) − log1p(e) (both terms ≤ 0, never
positive). The gradient is written as

    ∂/∂z_j = a·[j = y] + p_j·(b + c·(z_j − m)),   p_j = exp(z_j − m)/(1 + e),
    a = g,  b = k − g − h·(H − log s),  c = −h.

Partial (m, e, u) over pieces of a row (vocabulary shards) merge as m = max_k m_k,
e = (K − 1) + Σ_{k at m} e_k + Σ_{k below m} (1 + e_k)·exp(m_k − m) with K the pieces at the
row's max, u = Σ_k exp(m_k − m)·(u_k + (1 + e_k)·(m_k − m)) (:func:`merge_partials`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .activations import log_sum_exp_shifted, row_max
from .reductions import _torch_tensor, masked

__all__ = [
    "EXPONENT_FLOOR",
    "gradient_coefficients",
    "log_probs_and_entropy",
    "log_probs_backward",
    "merge_partials",
    "row_statistics",
]


def _log1p(values: Any) -> Any:
    return values.log1p() if _torch_tensor(values) else np.log1p(values)


def _exp(values: Any) -> Any:
    return values.exp() if _torch_tensor(values) else np.exp(values)


# Where an exponent d = z − m (≤ 0) multiplies its own exp(d), as in exp(d)·d of the entropy's sum
# or s·δ when a piece's sums are restated at a larger max, d is floored here first: exp(−1000) is
# already 0 in every dtype, and the floored product stays finite, never 0·(−inf) = NaN. Every
# backend (the Numba and Triton kernels, the torch ops) takes its floor from here.
EXPONENT_FLOOR = -1000.0


def _floored(values: Any, floor: float = EXPONENT_FLOOR) -> Any:
    return values.clamp_min(floor) if _torch_tensor(values) else np.maximum(values, floor)


def _softmax_parts(logits: np.ndarray, temperature: float) -> tuple[np.ndarray, ...]:
    """z, its row max m (0 where not finite), z − m, log s, p and the rows holding +inf, class
    axis last. As torch: a row with a +inf logit has NaN probabilities and log-probabilities
    (and lse +inf); a NaN spreads over its row."""
    t = logits.dtype.type(temperature)
    m_logits, top_index = row_max(logits)
    with np.errstate(over="ignore"):  # x/T beyond the dtype: +inf, and the row NaN, as torch
        z = logits / t
        positive_infinity = m_logits / t == np.inf  # (T > 0: the max of z is max x / T)
        m_logits = np.where(np.isfinite(m_logits), m_logits, 0)
        m = m_logits / t
    # over: z − m of a row spanning more than the dtype's range is −inf, as it should be
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # shifted before scaled: (x − max x)/T rounds once, where x/T − max(x/T) would carry
        # x/T's rounding (of a logit near 1e4, 1e-12 of it) into every z − m; where x − max x
        # overflows (a row spanning more than the dtype's range), x/T − max x/T
        difference = logits - m_logits
        shifted = np.where(np.isfinite(difference) | ~np.isfinite(logits), difference / t, z - m)
        log_s = log_sum_exp_shifted(shifted, top_index)  # log1p of the part beyond 1: confident rows
        p = np.where(positive_infinity, np.nan, np.exp(shifted - log_s))
    return z, m, shifted, log_s, p


def _p_times(p: np.ndarray, values: np.ndarray) -> np.ndarray:
    """p·values with 0·(−inf) = 0: a masked (−inf) class has p = 0 and adds nothing."""
    with np.errstate(invalid="ignore"):
        return np.where(p == 0, 0, p * values)


def log_probs_and_entropy(
    logits: np.ndarray, target: np.ndarray, *, temperature: float = 1.0, ignore_index: int = -100
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(log_probs, entropy, lse)`` per row of ``logits`` (``[..., C]``) for class indices
    ``target`` (``[...]``), each with the rows' shape and the logits' dtype."""
    _, m, shifted, log_s, p = _softmax_parts(logits, temperature)
    valid = target != ignore_index
    safe = np.where(valid, target, 0)
    with np.errstate(invalid="ignore"):
        log_p = np.where(np.isnan(p), np.nan, shifted - log_s)
        log_p_y = np.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
        entropy = -np.sum(_p_times(p, log_p), axis=-1)
        lse = (m + log_s)[..., 0]
    zero = logits.dtype.type(0)
    return np.where(valid, log_p_y, zero), np.where(valid, entropy, zero), np.where(valid, lse, zero)


def log_probs_backward(
    logits: np.ndarray,
    target: np.ndarray,
    grad_log_probs: np.ndarray | None,
    grad_entropy: np.ndarray | None = None,
    grad_lse: np.ndarray | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> np.ndarray:
    """∂(Σ g·log p(y) + Σ h·H + Σ k·lse)/∂logits for per-row upstream gradients g, h, k
    (None: 0), in the logits' dtype and shape (class axis last)."""
    _, _, shifted, log_s, p = _softmax_parts(logits, temperature)
    rows = logits.shape[:-1]
    dtype = logits.dtype
    g, h, k = (
        np.zeros(rows, dtype) if grad is None else np.broadcast_to(np.asarray(grad, dtype), rows)
        for grad in (grad_log_probs, grad_entropy, grad_lse)
    )
    valid = target != ignore_index
    safe = np.where(valid, target, 0)
    with np.errstate(invalid="ignore", over="ignore"):
        log_p = np.where(np.isnan(p), np.nan, shifted - log_s)
        onehot = np.arange(logits.shape[-1]) == safe[..., None]
        entropy = -np.sum(_p_times(p, log_p), axis=-1, keepdims=True)
        # [j = y] − p_j as −expm1(log p_j) at the target: 1 − p_y with p_y near 1 (a confident
        # row) would cancel; expm1 of the log keeps its digits
        grad = (
            g[..., None] * np.where(onehot, -np.expm1(log_p), -p)
            - h[..., None] * _p_times(p, log_p + entropy)
            + k[..., None] * p
        )
        finite = np.isfinite(g) & np.isfinite(h) & np.isfinite(k)
        if not finite.all():
            # a row with an infinite or NaN upstream gradient gets what autograd's chain through
            # log p gives (torch's NaN and ±inf): G = ∂/∂log p = g·onehot − h·p·(log p + 1), then
            # the log-softmax VJP G − p·ΣG and the lse's k·p (equal to the form above for finite
            # values, which loses less to cancellation on confident rows)
            upstream = np.where(onehot, g[..., None], 0) - h[..., None] * _p_times(p, log_p + 1)
            chain = upstream - p * np.sum(upstream, axis=-1, keepdims=True) + k[..., None] * p
            grad = np.where(finite[..., None], grad, chain)
    grad = np.where(valid[..., None], grad, 0) / dtype.type(temperature)
    return grad.astype(dtype, copy=False)


def row_statistics(
    m: Any, e: Any, u: Any, z_target: Any, valid: Any
) -> tuple[Any, Any, Any, Any]:
    """``(log_probs, entropy, lse, log_s)`` from a pass's (m, e, u) (e = s − 1, the excess of the
    sum of exponentials) and the target's z_y, 0 on rows that are not ``valid``. NumPy arrays or
    torch tensors (float64 or float32); with tensors, differentiable by autograd when ``m`` is
    held constant (detached: it is a shift)."""
    if _torch_tensor(e):  # (no floating-point warnings to silence; torch.compile traces this)
        return _row_statistics(m, e, u, z_target, valid)
    # a row of −inf only (e = −1): NaN, as torch; a log-probability beyond the range: −inf
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _row_statistics(m, e, u, z_target, valid)


def _row_statistics(m: Any, e: Any, u: Any, z_target: Any, valid: Any) -> tuple[Any, Any, Any, Any]:
    log_s = _log1p(e)  # log s = log(1 + e), the digits of a small e kept
    # + (m − m): NaN when the max is ±inf (torch's log_softmax is NaN there), else 0
    log_probs = ((z_target - m) - log_s) + (m - m)
    entropy = log_s - u / (1 + e)
    lse = m + log_s
    return masked(log_probs, valid), masked(entropy, valid), masked(lse, valid), log_s


def gradient_coefficients(
    log_s: Any, entropy: Any, grad_log_probs: Any, grad_entropy: Any, grad_lse: Any
) -> tuple[Any, Any, Any]:
    """``(a, t, c)`` per row with ∂/∂z_j = a·[j = y] + p_j·((t − a) + c·(z_j − m)), from the
    upstream gradients g, h, k (arrays or scalars; 0 for an output nobody used): a = g, c = −h,
    and t = k − h·(H − log s), the target's own coefficient (its entry is
    a·(1 − p_y) + p_y·(t + c·(z_y − m))), formed without g: a confident target's entry keeps
    h·(H − log s) where it is below an ulp of g (a review, 2026-12-07: t taken as a + b with
    b = k − g − h·(H − log s) rounded it away, 13% off at a gap of 40, the wrong sign at 50)."""
    a = grad_log_probs
    t = grad_lse - grad_entropy * (entropy - log_s)
    c = -grad_entropy
    return a, t, c


def merge_partials(m: Any, e: Any, u: Any, m_total: Any) -> tuple[Any, Any, Any]:
    """A piece's (e, u), taken at its own max m (e = s − 1), restated at the row's max
    ``m_total`` ≥ m: ``(top, e', u')``, summed over the pieces they give the row's
    e = (Σ top − 1) + Σ e' and u = Σ u'. A piece at the row's max has top 1 and keeps
    e' = e, u' = u (its max's terms stay counted apart, never 1 + e rounded); a piece below it
    has top 0, e' = (1 + e)·exp(m − m_total) and u' = exp(m − m_total)·(u + (1 + e)·(m − m_total)).
    A piece with nothing in it (s = 0, e = −1, m = −inf) gives (0, 0, 0) below a finite max; a row
    of such pieces only, top 1 and e' = −1 each: e = −1 (s = 0)."""
    with np.errstate(invalid="ignore"):
        # the piece holding the max keeps (e, u) as they are, also when that max is ±inf (never
        # exp(inf − inf)); an empty piece adds 0, never 0·(−inf); the shift floored
        # (EXPONENT_FLOOR): s·shift stays finite for a piece ~1e306 or more below the row's max
        apart = m != m_total
        s = 1 + e
        factor = _exp(masked(m - m_total, apart))
        shift = masked(_floored(m - m_total), apart & (s > 0))
        top = masked(factor, ~apart)  # 1 at the row's max, else 0 (in the pieces' dtype)
        below = masked(s * factor, apart)
        return top, masked(e, ~apart) + below, factor * (u + s * shift)
