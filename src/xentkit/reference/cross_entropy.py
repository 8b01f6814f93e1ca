"""Reference softmax cross-entropy with its exact gradient.

The oracle every fast path is tested against. Inputs are validated by the api; here the class
axis is already last: ``logits`` has shape ``(..., C)`` and ``target`` either ``(...)`` (integer
class indices, ``labels`` below) or ``(..., C)`` (class probabilities).

Per sample, with z the (optionally soft-capped) logits, ``lse = logsumexp(z)``,
``log p = z − lse``, class weights w (ones if not given), smoothing ε and C classes:

    hard label y:     loss = (1 − ε)·w_y·(−log p_y) + (ε/C)·Σ_c w_c·(−log p_c)
    probabilities q:  loss = −Σ_c w_c·q'_c·log p_c,   q' = (1 − ε)·q + ε/C
    z-loss:           loss += z_loss·lse²

and the gradients (seed 002: softmax minus one-hot, plus each option's term)

    hard label y:     ∂loss/∂z_j = p_j·((1 − ε)·w_y + ε·W/C) − (1 − ε)·w_y·[j = y] − ε·w_j/C,  W = Σ_c w_c
    probabilities q:  ∂loss/∂z_j = p_j·Σ_c w_c·q'_c − w_j·q'_j
    z-loss:           ∂/∂z_j += 2·z_loss·lse·p_j
    softcap s:        z = s·tanh(x/s),  ∂z/∂x = 1 − tanh²(x/s) = 4e/(1 + e)², e = exp(−2|x/s|)

Reductions follow ``torch.nn.functional.cross_entropy``: "mean" divides hard-label losses by
Σ w_y over non-ignored samples and probability-target losses by the number of samples. The z
term is not class-weighted; under "mean" it is divided by the number of non-ignored samples.
When a "mean" denominator is 0 (nothing to average), the loss and gradient are 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import numpy as np

from .activations import log_of_top_and_rest, row_max, top_and_rest
from .losses import xlogy
from .reductions import ReductionPlan, masked


def z_term(lse: Any, valid: Any, z_loss: float) -> Any:
    """PaLM's auxiliary loss per row, ``z_loss·lse²`` on the non-ignored rows and 0 on the others;
    None when ``z_loss`` is 0. Rows may be NumPy arrays or torch tensors."""
    if not z_loss:
        return None
    if isinstance(lse, np.ndarray):
        with np.errstate(over="ignore"):  # beyond the dtype: inf, as torch
            return masked(z_loss * lse * lse, valid)
    return masked(z_loss * lse * lse, valid)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _quiet_invalid(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """``function`` under ``np.errstate(invalid="ignore")``: its NaNs (∞ − ∞ of class weights of
    both signs, summed over rows or classes) are torch's values, which torch gives without a
    warning. (Its signature stays visible to type checkers.)"""

    @functools.wraps(function)
    def quiet(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with np.errstate(invalid="ignore"):
            return function(*args, **kwargs)

    return quiet


@_quiet_invalid
def cross_entropy_and_grad(
    logits: np.ndarray,
    target: np.ndarray,
    *,
    axis: int = -1,
    weight: np.ndarray | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    grad_output: np.ndarray | float | None = None,
    want_grad: bool = True,
    plan: ReductionPlan | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Loss (reduced as ``reduction`` asks) and ∂loss/∂logits times ``grad_output``.

    ``target`` holds class probabilities when it has the logits' shape, class indices otherwise.
    ``grad_output`` (default 1) is a scalar for "mean"/"sum" and has the sample shape for "none".
    The loss is float64 for "mean"/"sum" and has the logits' dtype for "none"; the gradient has
    the logits' dtype and shape. Inputs must already be valid (the api checks them). ``plan``
    replaces the reduction plan of these rows (``reduction`` must be its reduction): a caller
    that walks the rows in chunks passes the whole batch's denominators.
    """
    probabilities = target.shape == logits.shape
    logits = np.moveaxis(logits, axis, -1)
    if probabilities:
        target = np.moveaxis(target, axis, -1)
    if grad_output is None:
        grad_output = np.ones(logits.shape[:-1] if reduction == "none" else ())
    with np.errstate(over="ignore"):  # beyond the logits' dtype: ±inf, as torch
        grad_output = np.asarray(grad_output, dtype=logits.dtype)
    num_classes = logits.shape[-1]
    dtype = logits.dtype
    eps = label_smoothing
    weight = np.ones(num_classes, dtype=dtype) if weight is None else np.asarray(weight, dtype=dtype)

    # Soft-capping (Gemma 2) bounds every logit to (−s, s) before the softmax.
    if softcap is not None:
        tanh = np.tanh(logits / softcap)
        z = softcap * tanh
    else:
        z = logits
    # Shift by the row maximum m (all exponents ≤ 0), then log p = (z − m) − log s with
    # s = Σ exp(z − m). Taking p = exp(z − m)/s rather than exp(z − lse) keeps p exact when
    # |m| is so large that m + log s rounds to m. A row of −inf shifts by 0 (no −inf − (−inf));
    # a +inf or NaN maximum stays, so that row is NaN (+inf: ∞ − ∞), as in PyTorch.
    m, top_index = row_max(z)
    m = np.where(m == -np.inf, 0, m)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # (over: z − m of ±max)
        shifted = z - m
        top, rest = top_and_rest(shifted, top_index)  # s = t + δ, t the argmax's term
        s = top + rest
        log_s = log_of_top_and_rest(top, rest)  # log1p of the part beyond 1: confident rows
        log_p = shifted - log_s  # −inf logits give −inf log-probabilities, i.e. p = 0
        p = np.exp(shifted) / s
        # p − 1 at a class of the max (its term exactly 1): −δ/s, δ = s − 1 the rest (other ties'
        # 1s included); p − 1 rounded keeps ~1e-16 of a confident row's −δ (its target gradient)
        p_minus_one_at_max = -rest / s
        lse = m + log_s

    if probabilities:
        valid = np.ones(logits.shape[:-1], dtype=bool)
        q = (1 - eps) * target + eps / num_classes if eps > 0 else target
        per_sample = -np.sum(xlogy(q * weight, log_p), axis=-1)
        if plan is None:
            plan = ReductionPlan.of_rows(reduction, valid.size)
    else:
        valid = target != ignore_index
        safe = np.where(valid, target, 0)
        w_y = np.where(valid, weight[safe], 0)
        log_p_y = np.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
        # a class of weight 0 adds nothing, even masked (−inf): 0·log 0 = 0, as the same loss of
        # probability targets (torch: NaN), here and in the smoothing term
        per_sample = np.where(valid, -(1 - eps) * xlogy(w_y, log_p_y), 0)
        if eps > 0:  # only then, so that a masked class does not make 0·inf = NaN
            smooth = -np.sum(xlogy(weight, log_p), axis=-1)
            per_sample = per_sample + np.where(valid, eps / num_classes * smooth, 0)
        if plan is None:
            plan = ReductionPlan.of_labels(reduction, valid, w_y)

    lse = lse[..., 0]
    loss = plan.reduce(per_sample, z_term(lse, valid, z_loss))
    loss = loss.astype(dtype) if reduction == "none" else loss

    if not want_grad:
        return loss, None

    main_scale, z_scale = (scale[..., None] for scale in plan.scales(grad_output))
    # Each row's gradient is g·(p_j·A − c_j): g its upstream, A the row's total weight, c_j
    # class j's own share (the formulas above, before z-loss and softcap). It has two orders,
    # because neither is right for every g; each row is computed in the one it needs, never both:
    # - finite g: factored, g·(p_j·A − c_j). The difference is rounded before g scales it, so a
    #   confident row's target entry (p_y·A ≈ c_y, cancelling) stays as accurate as it gets; term
    #   by term, g·A·p_y and g·c_y are rounded apart before they cancel, a little less accurate.
    # - infinite or NaN g: term by term, (g·A)·p_j − g·c_j, which is how PyTorch gets its values:
    #   NaN at the target (∞ − ∞), NaN where p_j = 0 (0·∞), and a term that is off (no smoothing:
    #   no c_j off the target) adds nothing rather than 0·∞. Factored, those entries are ±∞.
    # ``rows`` is ``...`` (every row) or a boolean mask of rows. The kernels give the same values.
    if probabilities:
        wq = weight * q  # c_j = w_j·q'_j
        mass = np.sum(wq, axis=-1, keepdims=True)  # A = Σ_c w_c·q'_c
    else:
        onehot = np.arange(num_classes) == safe[..., None]
        # A; without smoothing no Σw term: 0·Σw is NaN when a class no sample has weighs inf
        mass = ((1 - eps) * w_y + (eps * np.sum(weight) / num_classes if eps else 0))[..., None]

    def factored(rows: Any, g: np.ndarray) -> np.ndarray:
        if probabilities:
            return g * (p[rows] * mass[rows] - wq[rows])
        # the target's own term on the target alone (not w_y·0 elsewhere: NaN for w_y = ±inf)
        target_share = np.where(onehot[rows], (1 - eps) * w_y[rows][..., None], 0)
        if eps:
            target_share = target_share + eps * weight / num_classes
        return g * (p[rows] * mass[rows] - target_share)

    def term_by_term(rows: Any, g: np.ndarray) -> np.ndarray:
        if probabilities:
            share = g * wq[rows]
        else:
            share = (1 - eps) * w_y[rows][..., None] * onehot[rows] + eps * weight / num_classes
            share = g * share
            if eps == 0:  # off the target there is no term: nothing, not 0·g = NaN
                share = np.where(onehot[rows], share, 0)
        return (g * mass[rows]) * p[rows] - share

    finite = np.isfinite(main_scale)
    with np.errstate(invalid="ignore"):  # a non-finite g's ∞ − ∞ and 0·∞, NaN as wanted
        if finite.all():
            grad = factored(..., main_scale)
        elif not finite.any():
            grad = term_by_term(..., main_scale)
        else:  # "none" with some rows' g infinite or NaN: each set of rows in its order
            finite_rows = np.broadcast_to(finite[..., 0], p.shape[:-1])
            g = np.broadcast_to(main_scale, (*p.shape[:-1], 1))
            parts = [
                (finite_rows, factored(finite_rows, g[finite_rows])),
                (~finite_rows, term_by_term(~finite_rows, g[~finite_rows])),
            ]
            grad = np.empty(p.shape, np.result_type(*(part for _, part in parts)))
            for rows, part in parts:
                grad[rows] = part
    g = np.broadcast_to(main_scale, (*p.shape[:-1], 1))[..., 0]
    if probabilities:
        # a class of its row's max with p > 1/2, for a finite g and A: p·A − w·q' regrouped as
        # A·(p − 1) + (A − w·q'), p − 1 = −δ/s exact (as the kernels take it: a one-hot target
        # at a confident row's max keeps its −δ/s)
        at_max = (shifted == 0) & (top == 1) & (p_minus_one_at_max > -0.5) & np.isfinite(g)[..., None]
        at_max &= np.isfinite(mass)
        if at_max.any():
            with np.errstate(invalid="ignore", over="ignore"):
                regrouped = g[..., None] * (mass * p_minus_one_at_max + (mass - wq))
            grad = np.where(at_max, regrouped, grad)
    else:
        # a target at its row's max, for a finite g and A: the same terms regrouped,
        # p_y·A − (1−ε)·w_y − ε·w_y/C = (1−ε)·w_y·(p_y − 1) + (ε/C)·(W·p_y − w_y), with
        # p_y − 1 = −δ/s exact (as the kernels take it)
        shifted_y = np.take_along_axis(shifted, safe[..., None], axis=-1)[..., 0]
        at_max = valid & (shifted_y == 0) & (top[..., 0] == 1) & np.isfinite(g) & np.isfinite(mass[..., 0])
        if at_max.any():
            p_y = np.take_along_axis(p, safe[..., None], axis=-1)[..., 0]
            share = (1 - eps) * w_y * p_minus_one_at_max[..., 0]
            if eps:
                share = share + eps / num_classes * (np.sum(weight) * p_y - w_y)
            # (by mask, not by index: a single row's arrays are 0-d)
            target_entry = at_max[..., None] & (np.arange(grad.shape[-1]) == safe[..., None])
            grad = np.where(target_entry, (g * share)[..., None], grad)
    if z_loss:
        # an infinite upstream times p_j = 0: NaN, as above; a huge one overflows to ±inf
        with np.errstate(invalid="ignore", over="ignore"):
            grad = grad + z_scale * (2 * z_loss * lse[..., None] * p)
    if softcap is not None:  # 1 − tanh²(u) = 4e/(1 + e)², e = exp(−2|u|): no cancellation near |tanh| = 1
        e = np.exp(-2 * np.abs(logits / softcap))
        grad = grad * (4 * e / (1 + e) ** 2)
    if not probabilities:  # ignored rows: 0, whatever they hold (NaN, ±inf)
        grad = np.where(valid[..., None], grad, 0)
    return loss, np.moveaxis(grad.astype(dtype, copy=False), -1, axis)
