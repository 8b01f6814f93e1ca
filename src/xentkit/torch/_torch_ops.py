"""The losses in plain torch ops: the path for CUDA and other devices, bfloat16, and gradients with
respect to targets or weights, which xentkit's NumPy api does not compute.

They keep xentkit's semantics where they differ from torch's: z-loss and softcap, and a "mean"
whose denominator is 0 (every target ignored) gives 0 rather than NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _divide_or_zero(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, and 0 (with gradient 0, not NaN) where the denominator is 0."""
    nonzero = denominator != 0
    safe = torch.where(nonzero, denominator, torch.ones_like(denominator))
    return torch.where(nonzero, numerator / safe, torch.zeros_like(numerator))


def _target_weight_sum(target: Tensor, weight: Tensor | None, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """Σ w[y] over the non-ignored hard labels: torch's "mean" denominator."""
    valid = target.long() != ignore_index  # int64: a uint8 target must not wrap −100 to 156
    if weight is None:
        return valid.sum().to(dtype)
    picked = weight[target.masked_fill(~valid, 0)]
    return (picked * valid).sum().to(dtype)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> Tensor:
    """``torch.nn.functional.cross_entropy`` plus xentkit's softcap, z-loss and "mean" of nothing = 0."""
    if softcap is not None:
        input = softcap * torch.tanh(input / softcap)
    hard_labels = not torch.is_floating_point(target)
    if reduction == "mean" and hard_labels:
        total = F.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction="sum",
            label_smoothing=label_smoothing,
        )
        loss = _divide_or_zero(total, _target_weight_sum(target, weight, ignore_index, total.dtype))
    else:
        loss = F.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing,
        )
    if z_loss == 0.0:
        return loss
    class_dim = 1 if input.dim() >= 2 else 0
    lse = torch.logsumexp(input, dim=class_dim)
    z_term = z_loss * lse.square()
    if hard_labels:
        valid = target.long() != ignore_index  # int64: a uint8 target must not wrap −100 to 156
        z_term = torch.where(valid, z_term, torch.zeros_like(z_term))
        count = valid.sum().to(z_term.dtype)
    else:
        count = torch.tensor(float(z_term.numel()), dtype=z_term.dtype, device=z_term.device)
    if reduction == "none":
        return loss + z_term
    if reduction == "sum":
        return loss + z_term.sum()
    return loss + _divide_or_zero(z_term.sum(), count)


def nll_loss(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str
) -> Tensor:
    """``torch.nn.functional.nll_loss`` with xentkit's "mean" of nothing = 0."""
    if reduction != "mean":
        return F.nll_loss(input, target, weight, ignore_index=ignore_index, reduction=reduction)
    total = F.nll_loss(input, target, weight, ignore_index=ignore_index, reduction="sum")
    return _divide_or_zero(total, _target_weight_sum(target, weight, ignore_index, total.dtype))


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    reduction: str,
    pos_weight: Tensor | None,
) -> Tensor:
    """``torch.nn.functional.binary_cross_entropy_with_logits`` (the same semantics)."""
    return F.binary_cross_entropy_with_logits(
        input, target, weight, reduction=reduction, pos_weight=pos_weight
    )
