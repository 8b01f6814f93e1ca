"""The losses in plain torch ops: the path for CUDA and other devices, bfloat16, and gradients with
respect to targets or weights, which xentkit's NumPy api does not compute.

They keep xentkit's semantics where they differ from torch's: z-loss and softcap, and a "mean"
whose denominator is 0 (every target ignored) gives 0 rather than NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._labels import check_labels
from .._options import LossOptions
from ..reference.cross_entropy import z_term
from ..reference.reductions import ReductionPlan
from . import _bridge


def _label_plan(
    target: Tensor, weight: Tensor | None, options: LossOptions, dtype: torch.dtype, num_classes: int
) -> tuple[Tensor, ReductionPlan]:
    """The non-ignored mask of hard labels and their reduction plan (Σ w_y and the count as
    tensors: no device synchronization)."""
    # the kernel paths' error rather than torch's IndexError (not while tracing, nor on meta
    # tensors, which hold no labels to check)
    labels = target.long()  # int64: a uint8 target must not wrap −100 to 156
    valid = None
    if not torch.compiler.is_compiling() and target.device.type != "meta":
        valid = check_labels(labels, num_classes, options.ignore_index)
    return ReductionPlan.of_targets(
        options.reduction, labels, options.ignore_index, weight, dtype=_bridge.at_least_float32(dtype), valid=valid
    )


def cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions,
    result_dtype: torch.dtype | None = None,
) -> Tensor:
    """``torch.nn.functional.cross_entropy`` plus xentkit's softcap, z-loss and "mean" of nothing = 0.
    The loss is computed in float32 or better and returned in ``result_dtype`` (default: the
    input's dtype, as torch)."""
    result_dtype = result_dtype or input.dtype
    hard = not torch.is_floating_point(target)
    if input.dtype in (torch.float16, torch.bfloat16):
        # per-row losses in float32 too (torch would round each to the input's dtype): one
        # rounding, at the end
        input = input.float()
        weight = None if weight is None else weight.float()
        target = target if hard else target.float()
    if options.softcap is not None and input.is_floating_point():
        options.check_fits(input.dtype, torch.finfo(input.dtype).max)
    if options.softcap is not None:
        input = options.softcap * torch.tanh(input / options.softcap)
    class_dim = 1 if input.dim() >= 2 else 0
    if hard:  # first: a bad label is the kernel paths' ValueError, not torch's IndexError
        valid, plan = _label_plan(target, weight, options, input.dtype, input.shape[class_dim])
    main = F.cross_entropy(  # ignore_index is for class indices (probabilities: as the kernels, unused)
        input, target, weight, ignore_index=options.ignore_index if hard else -100, reduction="none",
        label_smoothing=options.label_smoothing,
    )
    if not hard:
        valid = torch.ones(main.shape, dtype=torch.bool, device=main.device)
        plan = ReductionPlan.of_rows(options.reduction, main.numel())
    z = None
    if options.z_loss:
        z = z_term(torch.logsumexp(input, dim=class_dim), valid, options.z_loss)
    return plan.reduce(main, z).to(result_dtype)


def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions) -> Tensor:
    """``torch.nn.functional.nll_loss`` with xentkit's "mean" of nothing = 0."""
    classes = input.shape[1 if input.dim() >= 2 else 0]
    plan = _label_plan(target, weight, options, input.dtype, classes)[1]
    main = F.nll_loss(input, target, weight, ignore_index=options.ignore_index, reduction="none")
    return plan.reduce(main).to(input.dtype)


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
