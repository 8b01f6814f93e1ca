"""Combining the shards, then each row's loss and gradient coefficients (O(N), float64, on every
rank); the formulas are those of the package docstring."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch import Tensor

from ...reference.cross_entropy import z_term
from ...reference.log_probs import merge_partials
from ._rows import _Plan, _Rows


@dataclasses.dataclass(frozen=True)
class _RowStatistics:
    """The full rows' statistics (float64 ``[n]``), identical on every rank."""

    shift: Tensor  # M (0 where the whole row is −inf)
    excess: Tensor  # E = S − 1, S = Σ_j exp(z_j − M) over all V classes (the max's terms apart)
    target_logit: Tensor  # z_y
    sum_z: Tensor | None  # S_z = Σ_j w_j·(z_j − M) (label smoothing only)

    @property
    def log_total(self) -> Tensor:
        """log S = log1p(E): a confident row's log S ≈ E keeps its digits."""
        return torch.log1p(self.excess)

    @property
    def lse(self) -> Tensor:
        return self.shift + self.log_total

    def slice(self, start: int, stop: int) -> _RowStatistics:
        return _RowStatistics(
            self.shift[start:stop], self.excess[start:stop], self.target_logit[start:stop],
            None if self.sum_z is None else self.sum_z[start:stop],
        )


def _combine(local: tuple[Tensor, Tensor, Tensor, Tensor], plan: _Plan) -> _RowStatistics:
    """Two all-reduces: MAX of the shard maxima (n floats), then SUM of whether each shard holds
    the row's max, the excesses restated at it, the target logit and (label smoothing) the
    weighted logit sums restated at it (3n or 4n floats): E = (K − 1) + Σ_{m_r = M} e_r +
    Σ_{m_r < M} s_r·exp(t_r − M) with K the shards holding the max, whose terms (exactly 1 each)
    are never summed into E, and S_z = Σ_r (S'_r + W_r·(t_r − M)) = Σ_j w_j·(z_j − M), the shards'
    S'_r = Σ w_j·(z_j − t_r) relative to their own shift t_r.
    """
    row_max, row_excess, target, sum_z = local
    device = row_max.device
    communicator = plan.communicator
    global_max = communicator.all_reduce(row_max.clone(), dist.ReduceOp.MAX)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    shift = torch.where(torch.isfinite(global_max), global_max, zero)
    # the shard's (top, e') restated at M, as the log-probabilities' shards merge theirs (the
    # holder of M keeps its excess; u is not needed here)
    tops, scaled, _ = merge_partials(row_max, row_excess, torch.zeros_like(row_excess), global_max)
    if plan.smoothing:
        local_shift = torch.where(torch.isfinite(row_max), row_max, zero)
        sum_z = sum_z + _local_weight_sum(plan) * (local_shift - shift)
    packed = torch.stack([tops, scaled, target, sum_z] if plan.smoothing else [tops, scaled, target])
    communicator.all_reduce(packed, dist.ReduceOp.SUM)
    excess = (packed[0] - 1.0) + packed[1]
    return _RowStatistics(shift, excess, packed[2], packed[3] if plan.smoothing else None)


def _local_weight_sum(plan: _Plan) -> float:
    """W_r = Σ w_j over this rank's classes (their count without class weights)."""
    if plan.weight_local_array is None:
        return float(plan.agreement.width)
    return float(plan.weight_local_array.sum())


def _row_losses(stats: _RowStatistics, rows: _Rows, plan: _Plan) -> tuple[Tensor, Tensor | None]:
    """Per row: the main term (1 − ε)·w_y·(lse − z_y) + (ε/V)·(W·log S − S_z) and the z term λ·lse²
    (None without z-loss), both 0 for ignored rows.
    """
    eps = plan.options.label_smoothing
    log_total = stats.log_total
    lse = stats.shift + log_total
    zero = torch.zeros((), dtype=torch.float64, device=lse.device)
    # lse − z_y as (M − z_y) + log S: M + log S would round log S = δ of a confident row to an
    # ulp of M (2e-12 at logits near 1e4)
    main = (1.0 - eps) * rows.target_weight * ((stats.shift - stats.target_logit) + log_total)
    # a target of weight 0 adds nothing, even masked (0·log 0 = 0, as the reference)
    masked = (rows.target_weight == 0) & (stats.target_logit == -math.inf) & lse.isfinite()
    main = torch.where(masked, zero, main)
    if eps > 0.0:
        # Σ_c w_c·(lse − z_c) = W·log S − Σ w_c·(z_c − M): small terms, where W·lse − Σ w_c·z_c of
        # huge logits (a row of −3e38) cancelled to garbage
        main = main + (eps / plan.agreement.vocab_size) * (plan.weight_sum * log_total - stats.sum_z)
    return torch.where(rows.valid, main, zero), z_term(lse, rows.valid, plan.options.z_loss)


def _coefficients(
    stats: _RowStatistics, rows: _Rows, plan: _Plan, g: Tensor | float, g_z: Tensor | float
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-row coefficients of pass 2 (float64), so that c·exp(z_j − M) = coefficient·p_j:

        A   = (1 − ε)·w_y + ε·W/V
        c   = (g·A + g^z·2·λ·lse) / S
        σ   = ε·g/V                                      (None without label smoothing)
        target entry = c·exp(z_y − M) − (1 − ε)·w_y·g − σ·w_y

    all 0 for ignored rows. Where the target is the row's max (z_y = M, p_y = 1/S), for a finite
    g and A, the target entry's c − (1 − ε)·w_y·g is taken as
    −(1 − ε)·w_y·g·E/S + (g·ε·W/V + g^z·2·λ·lse)/S (p_y − 1 = −E/S), which does not cancel for a
    confident row, as the single-process kernels take it. ``g``, ``g^z``: the reduction's scales of the upstream gradient
    (:meth:`ReductionPlan.scales`), scalars or one per row.
    """
    eps = plan.options.label_smoothing
    vocab = plan.agreement.vocab_size
    lse = stats.lse
    zero = torch.zeros((), dtype=torch.float64, device=lse.device)
    w_y = rows.target_weight
    a = (1.0 - eps) * w_y
    other = zero  # the numerator's terms beside the target's own (1 − ε)·w_y·g
    if eps > 0.0:  # (not 0·W: NaN when a class no sample has weighs inf)
        a = a + eps * plan.weight_sum / vocab
        other = g * (eps * plan.weight_sum / vocab)
    numerator = g * a
    if plan.options.z_loss != 0.0:
        z_part = g_z * 2.0 * plan.options.z_loss * lse
        numerator = numerator + z_part
        other = other + z_part
    total = 1.0 + stats.excess
    coef = torch.where(rows.valid, numerator / total, zero)
    smooth = None
    main = (1.0 - eps) * w_y * g
    target_grad = coef * torch.exp(stats.target_logit - stats.shift) - main
    # the target at the row's max: p_y − 1 = −E/S, not p_y − 1 rounded (an infinite or NaN g or
    # A keeps the plain form, torch's order, as the kernels)
    at_max = (stats.target_logit == stats.shift) & torch.isfinite(main) & torch.isfinite(a)
    target_grad = torch.where(at_max, (other - main * stats.excess) / total, target_grad)
    if eps > 0.0:
        smooth = torch.where(rows.valid, eps * g / vocab * torch.ones_like(lse), zero)
        target_grad = target_grad - smooth * w_y
    target_grad = torch.where(rows.valid, target_grad, zero)
    return coef, smooth, target_grad
