"""Reference NLL, binary cross-entropy, quadratic cost, entropy and KL divergence, with gradients.

Inputs are validated by the api. Each function returns ``(loss, grad)`` where ``grad`` is
∂loss/∂(first argument) times the upstream gradient; the loss is unreduced ("none") here and the
api reduces it, except where the reduction changes the gradient (noted).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .activations import log_sigmoid, sigmoid


def xlogy(q: np.ndarray, log_p: np.ndarray) -> np.ndarray:
    """q·log p with 0·log 0 = 0, so a masked (−inf) class with zero target mass or class weight
    adds nothing; 0·NaN stays NaN, so a row whose softmax is NaN (a NaN or +inf logit, or only
    −inf) has a NaN loss whatever its targets, as its gradient."""
    with np.errstate(invalid="ignore", over="ignore"):  # (beyond the dtype: ±inf, as torch)
        return np.where((q == 0) & ~np.isnan(log_p), 0, q * log_p)


def nll_loss_and_grad(
    log_probs: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray | None,
    ignore_index: int,
    grad_scale: np.ndarray | float = 1.0,
    *,
    want_grad: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per-sample NLL −w_y·log p_y (class axis last; 0 for a class of weight 0 whose log p is
    −inf: 0·log 0 = 0, as the cross-entropy's), its weight w_y, and
    ∂/∂log p = −w_y·onehot(y), times ``grad_scale`` (the upstream gradient and the reduction's
    scale, per sample or one for all).

    Returns ``(per_sample, w_y, grad)``; ignored samples have loss, weight and gradient 0. Only the
    targets' entries are scaled: the others are 0 whatever the scale (0·inf would be NaN), as torch's.
    ``want_grad=False``: ``grad`` is None (no array of the log-probabilities' size is made).
    """
    valid = labels != ignore_index
    safe = np.where(valid, labels, 0)
    w_y = np.where(valid, 1 if weight is None else weight[safe], 0).astype(log_probs.dtype)
    picked = np.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    with np.errstate(invalid="ignore", over="ignore"):  # an ignored row's −inf: 0·(−inf), then masked
        per_sample = np.where(valid, -xlogy(w_y, picked), 0).astype(log_probs.dtype)
        if not want_grad:
            return per_sample, w_y, None
        target_grad = np.where(valid, -w_y * grad_scale, 0).astype(log_probs.dtype)
    grad = np.zeros(log_probs.shape, dtype=log_probs.dtype)
    np.put_along_axis(grad, safe[..., None], target_grad[..., None], axis=-1)
    return per_sample, w_y, grad


def binary_cross_entropy_with_logits_and_grad(
    logits: np.ndarray, target: np.ndarray, weight: np.ndarray | None, pos_weight: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """ℓ = −w·[pw·y·log σ(x) + (1 − y)·log(1 − σ(x))],  ∂ℓ/∂x = w·[(1 − y)·σ(x) − pw·y·σ(−x)].

    log(1 − σ(x)) = log σ(−x) and 1 − σ(x) = σ(−x), more accurate than subtracting from 1 (the
    gradient in torch's form σ(x)·(pw·y + 1 − y) − pw·y cancels: 0 at y = 1, x = 40, for
    −4.2e-18). A non-finite target or pos_weight takes torch's form, and so its NaN.
    """
    pw = 1 if pos_weight is None else pos_weight
    w = 1 if weight is None else weight
    with np.errstate(invalid="ignore", over="ignore"):  # x = ±inf: 0·inf terms are NaN, as torch
        loss = 0.0 - w * (pw * target * log_sigmoid(logits) + (1 - target) * log_sigmoid(-logits))
        accurate = (1 - target) * sigmoid(logits) - pw * target * sigmoid(-logits)
        torchs = sigmoid(logits) * (pw * target + 1 - target) - pw * target
        grad = w * np.where(np.isfinite(pw * target), accurate, torchs)
        # x = −inf: torch computes the same loss as w·((1 − y)·x − (1 + (pw − 1)·y)·log σ(x)),
        # which is ∞ − ∞ = NaN there for y in (0, 1] (±inf where a target outside [0, 1] or a
        # negative pos_weight tips it), where the form above gives +∞ for y > 0; torch's value,
        # as for every non-finite input
        at_neg_inf = w * ((1 - target) * logits - (1 + (pw - 1) * target) * log_sigmoid(logits))
        loss = np.where(logits == -np.inf, at_neg_inf, loss)
    return loss, grad


# PyTorch clamps log(p) at −100 so that p = 0 gives a finite loss, and the gradient's denominator
# p·(1 − p) at 1e-12 — as a float32 constant (9.99999996e-13), also for float64 tensors: its
# float64 gradient at p = 0, y = 1 is −1.0000000039958e12, not −1e12. The same here, to agree
# with torch.nn.functional.binary_cross_entropy.
_LOG_FLOOR = -100.0
_GRAD_EPSILON = float(np.float32(1e-12))


def binary_cross_entropy_and_grad(
    probs: np.ndarray, target: np.ndarray, weight: np.ndarray | None, *, want_grad: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """ℓ = −w·[y·log p + (1 − y)·log(1 − p)],  ∂ℓ/∂p = w·(p − y) / (p·(1 − p)) (None without
    ``want_grad``)."""
    w = 1 if weight is None else weight
    with np.errstate(divide="ignore"):
        log_p = np.maximum(np.log(probs), _LOG_FLOOR)
        log_1mp = np.maximum(np.log1p(-probs), _LOG_FLOOR)
    with np.errstate(over="ignore", invalid="ignore"):  # beyond the dtype: inf, as torch
        loss = 0.0 - w * (target * log_p + (1 - target) * log_1mp)
        if not want_grad:
            return loss, None
        grad = w * (probs - target) / np.maximum(probs * (1 - probs), _GRAD_EPSILON)
    return loss, grad


def quadratic_cost_and_grad(
    prediction: np.ndarray, target: np.ndarray, norm: float = 1.0, upstream: Any = 1
) -> tuple[np.ndarray, np.ndarray]:
    """ℓ = (ŷ − y)²,  ∂ℓ/∂ŷ = 2·(ŷ − y)  (per element; the seeds' cost is its mean), the gradient
    as torch's mse_loss forms it: (ŷ − y)·(2·``norm``)·``upstream``, ``norm`` the reduction's
    factor (1/n for a mean, at most 1) applied first, so that neither 2·(ŷ − y) (a mean's large
    differences) nor 2·upstream overflows before the other factor brings it back."""
    with np.errstate(over="ignore", invalid="ignore"):  # beyond the dtype: inf, as torch
        difference = prediction - target
        return difference * difference, difference * (2.0 * norm) * upstream


def entropy_and_grad(p: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """H(p) = −Σ_i p_i·log p_i (0·log 0 = 0),  ∂H/∂p_i = −(log p_i + 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.log(p)
        terms = np.where(p == 0, 0, p * log_p)
    return 0.0 - np.sum(terms, axis=axis), -(log_p + 1)  # 0 − x: no −0.0 for certain outcomes


def kl_divergence_and_grad(p: np.ndarray, q: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """KL(p‖q) = Σ_i p_i·(log p_i − log q_i);  ∂/∂p_i = log p_i − log q_i + 1,  ∂/∂q_i = −p_i/q_i.

    Terms with p_i = 0 add 0; p_i > 0 with q_i = 0 makes the divergence +inf.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # −p/q of a denormal q: −inf
        # log(p/q) as log1p((p − q)/q) where q/2 ≤ p ≤ 2q: close distributions (the KL of two
        # that differ by 1e-6 is ~1e-13) would lose half their digits to log p − log q; farther
        # apart log p − log q is the accurate one ((p − q)/q rounds to −1 for p ≪ q)
        near = (p >= 0.5 * q) & (p <= 2 * q)
        log_ratio = np.where(near, np.log1p((p - q) / np.where(near, q, 1)), np.log(p) - np.log(q))
        terms = np.where(p == 0, 0, p * log_ratio)
        grad_q = np.where(p == 0, 0, -p / q)
        total = np.sum(terms, axis=axis)  # +inf + −inf (an infinite p beside an infinite q): NaN
    return total, log_ratio + 1, grad_q
