"""The losses in plain torch ops: the path for CUDA and other devices, bfloat16, and gradients with
respect to targets or weights, which xentkit's NumPy api does not compute.

They keep xentkit's semantics where they differ from torch's: z-loss and softcap, and a "mean"
whose denominator is 0 (every target ignored) gives 0 rather than NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._labels import _bad_labels, check_labels
from .._options import LossOptions
from ..reference.cross_entropy import z_term
from ..reference.reductions import ReductionPlan
from . import _bridge


def _label_plan(
    target: Tensor, weight: Tensor | None, options: LossOptions, dtype: torch.dtype, num_classes: int,
    classes: str | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, ReductionPlan]:
    """``(labels, bad, valid, plan)``: the hard labels as int64, the non-ignored mask and their
    reduction plan (Σ w_y and the count as tensors: no device synchronization).

    The labels are checked (the kernel paths' ValueError rather than torch's IndexError) unless
    ``check_labels=False``, under torch.compile, under ``torch.vmap`` (batched labels cannot be
    branched on), or on meta and fake tensors (which hold no labels). Then a label outside ``[0, C)`` that
    is not ``ignore_index`` is not looked at: ``labels`` has it replaced by a class in range
    (nothing reads out of bounds, no device-side assert) and ``bad`` marks its row, whose loss and gradient the caller makes NaN, as the Triton kernels do (the row
    takes a class that is not ``ignore_index``, so that it keeps a gradient for NaN to flow
    through); under torch.compile on CPU tensors, unless ``check_labels=False``, an op in the graph
    raises eager's ValueError then (``_bridge.labels_checked_in_graph``). In the "mean" it counts as the Triton path counts it: as a non-ignored row without
    class weights, not at all with them (its class, so its weight, is unknown). With one class
    and ``ignore_index=0`` no class can stand in: the labels are checked then (where a check can
    wait for them)."""
    valid = bad = None
    stand_in = 1 if options.ignore_index == 0 and num_classes > 1 else 0
    can_wait = _bridge.values_readable(target)
    # int64 (a uint8 target must not wrap −100 to 156), uint64 labels beyond int64 refused first
    labels = _bridge.int64_labels(target, num_classes, options.ignore_index, classes)
    if can_wait and (options.check_labels or stand_in == options.ignore_index):
        valid = check_labels(labels, num_classes, options.ignore_index, classes=classes)
    else:  # (one class and ignore_index 0 under torch.compile: the bad rows' loss alone is NaN)
        # (compiled on the CPU, checked: by an op in the graph, eager's ValueError)
        labels = _bridge.labels_checked_in_graph(labels, num_classes, options.ignore_index, classes, check=options.check_labels)
        bad = _bad_labels(labels, num_classes, options.ignore_index)
        labels = torch.where(bad, stand_in, labels)
        if weight is not None:
            valid = (labels != options.ignore_index) & ~bad
    valid, plan = ReductionPlan.of_targets(
        options.reduction, labels, options.ignore_index, weight, dtype=_bridge.at_least_float32(dtype), valid=valid
    )
    return labels, bad, valid, plan


def _nan_where(values: Tensor, bad: Tensor | None) -> Tensor:
    """``values`` with the rows marked ``bad`` NaN, their gradient NaN too (a product, not a
    select, so that NaN reaches the logits' gradient of those rows)."""
    if bad is None:
        return values
    return values * torch.where(bad, torch.nan, 1.0).to(values.dtype)


def _probability_cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float, class_dim: int
) -> Tensor:
    """Per-sample cross-entropy against class probabilities, as the kernels and the reference
    compute it: −Σ_c w_c·q'_c·log p_c with q' = (1 − ε)·q + ε/C, and 0·log 0 = 0 where a masked
    class (log p = −inf) has no weighted target mass w_c·q'_c: it adds nothing, to the loss or
    to any gradient (torch's product is NaN there; tests/test_nonfinite.py). Every other term is
    torch's product, with its gradients (a target that requires grad gets −w_c·log p_c)."""
    classes = input.shape[class_dim]
    log_p = torch.log_softmax(input, class_dim)
    # the targets in the logits' arithmetic or better: a half-precision target beside float32 or
    # float64 logits had its smoothed mass (1 − ε)·q + ε/C rounded in half precision (0.2% off a
    # float64 loss, its gradient 1%; a review)
    target = target.to(torch.promote_types(target.dtype, log_p.dtype))
    mass = target * (1 - label_smoothing) + label_smoothing / classes if label_smoothing else target
    if weight is not None:
        mass = mass * weight.reshape([classes if dim == class_dim else 1 for dim in range(input.dim())])
    return -_weighted_term(mass, log_p).sum(class_dim)


def _weighted_term(weight: Tensor, log_p: Tensor) -> Tensor:
    """w·log p with 0·log 0 = 0 where a class of weight 0 is masked (log p = −inf), in the value
    and in every gradient (torch's product gives NaN); elsewhere the product, with its gradients
    (a weight that requires grad gets log p, at 0 too). The select is on log p, inside the
    product: outside it, the product's gradient would still be 0·(−inf)."""
    return weight * torch.where((weight == 0) & (log_p == -math.inf), 0.0, log_p)


def _weighted_picked(log_p: Tensor, labels: Tensor, weight: Tensor, valid: Tensor, class_dim: int) -> Tensor:
    """w_y·log p_y per sample (``_weighted_term``'s 0·log 0 = 0), 0 where not ``valid`` (the label
    is ``ignore_index``); ``labels`` in range otherwise (``_label_plan``'s)."""
    safe = torch.where(valid, labels, 0).unsqueeze(class_dim)
    picked = log_p.gather(class_dim, safe).squeeze(class_dim)
    # (index_select, not weight[index] nor take: under torch.compile those read a 0-d index's value)
    w_y = weight.index_select(0, safe.reshape(-1)).reshape(picked.shape)
    return torch.where(valid, _weighted_term(w_y, picked), 0.0)


def _weighted_cross_entropy(
    input: Tensor, labels: Tensor, weight: Tensor, options: LossOptions, class_dim: int
) -> Tensor:
    """Per-sample cross-entropy of class indices (``_label_plan``'s: in range but for
    ``ignore_index``) with class weights, as the kernels and the reference compute it:
    (1 − ε)·w_y·(−log p_y) + (ε/C)·Σ_c w_c·(−log p_c), 0 on ignored rows, where a class of weight 0
    adds nothing even masked (−inf: 0·log 0 = 0, as the same targets given as probabilities;
    torch's ``cross_entropy`` gives NaN there, its gradient finite)."""
    classes = input.shape[class_dim]
    log_p = torch.log_softmax(input, class_dim)
    valid = labels != options.ignore_index  # (a bad label's row too: its stand-in class counts)
    main = 0.0 - _weighted_picked(log_p, labels, weight, valid, class_dim)  # (+0, as the kernels)
    if options.label_smoothing:
        shape = [classes if dim == class_dim else 1 for dim in range(input.dim())]
        smooth = -_weighted_term(weight.reshape(shape), log_p).sum(class_dim)
        main = (1 - options.label_smoothing) * main + (options.label_smoothing / classes) * smooth
    return torch.where(valid, main, 0.0)


def _logsumexp(input: Tensor, dim: int) -> Tensor:
    """``logsumexp`` along ``dim`` as m + logsumexp(x − m), m the row's max held constant (its
    value is the same; its gradient is still softmax(x), as lse(x) = c + lse(x − c) for any c).
    ``torch.logsumexp``'s own backward takes exp(x − lse) with lse rounded at the logits'
    magnitude: float32 logits near 1e4 (an ulp of 1e-3) gave the z-loss gradient 2.4e-4 off,
    where x − m is exact and the shifted lse small (a review). A row without a finite max
    shifts by 0."""
    m = input.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    return torch.logsumexp(input - m, dim=dim) + m.squeeze(dim)


def cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions,
    result_dtype: torch.dtype | None = None, classes: str | None = None,
) -> Tensor:
    """``torch.nn.functional.cross_entropy`` plus xentkit's softcap, z-loss and "mean" of nothing = 0.
    The loss is computed in float32 or better and returned in ``result_dtype`` (default: torch's,
    ``_bridge.loss_dtype``). ``classes``: what holds the classes, for the label error (default:
    the logits)."""
    result_dtype = result_dtype or _bridge.loss_dtype(input, target, weight)
    hard = not torch.is_floating_point(target)
    class_dim, _, _ = _bridge.sample_layout(input, target)
    _bridge.check_class_weight(weight, input.shape[class_dim])
    if weight is not None and weight.dtype != input.dtype:  # any numeric weight, as the kernels
        weight = weight.to(_bridge.at_least_float32(input.dtype))
    if input.dtype in (torch.float16, torch.bfloat16):
        # per-row losses in float32 too (torch would round each to the input's dtype): one
        # rounding, at the end
        input = input.float()
        weight = None if weight is None else weight.float()
        target = target if hard else target.float()
    if options.softcap is not None and input.is_floating_point():
        options.check_fits(input.dtype, torch.finfo(input.dtype).max, torch.finfo(input.dtype).tiny)
    if options.softcap is not None:
        input = options.softcap * torch.tanh(input / options.softcap)
    bad = None
    if hard:  # first: a bad label is the kernel paths' ValueError, not torch's IndexError
        target, bad, valid, plan = _label_plan(
            target, weight, options, input.dtype, input.shape[class_dim], classes
        )
    if hard and weight is not None:
        main = _nan_where(_weighted_cross_entropy(input, target, weight, options, class_dim), bad)
    elif hard:
        main = F.cross_entropy(
            input, target, weight, ignore_index=options.ignore_index, reduction="none",
            label_smoothing=options.label_smoothing,
        )
        main = _nan_where(main, bad)
    else:  # (ignore_index is for class indices: as the kernels, unused)
        main = _probability_cross_entropy(input, target, weight, options.label_smoothing, class_dim)
    if not hard:
        valid = torch.ones(main.shape, dtype=torch.bool, device=main.device)
        plan = ReductionPlan.of_rows(options.reduction, main.numel())
    z = None
    if options.z_loss:
        z = z_term(_logsumexp(input, class_dim), valid, options.z_loss)
    return plan.reduce(main, z).to(result_dtype)


def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions) -> Tensor:
    """``torch.nn.functional.nll_loss`` with xentkit's "mean" of nothing = 0, and 0·log 0 = 0 for
    a target of class weight 0 whose log-probability is −inf (torch: NaN). Computed in float32 or
    better, as :func:`cross_entropy`: half-precision per-row losses are not rounded before the
    reduction (torch rounds each weighted one: a bfloat16 "sum" of mixed-sign weights came out
    an ulp and more off, a review), and the loss is rounded once, to torch's dtype."""
    class_dim, _, _ = _bridge.sample_layout(input, target, "log_probs", probabilities_allowed=False)
    classes = input.shape[class_dim]
    _bridge.check_class_weight(weight, classes)
    result_dtype = _bridge.loss_dtype(input, target)
    compute = _bridge.at_least_float32(input.dtype)
    # the weights in float32 or better (any numeric weight, as the kernels): the picked half
    # log-probabilities promote to it in w_y·log p_y, with no float32 copy of all of them
    if weight is not None and weight.dtype != compute:
        weight = weight.to(compute)
    labels, bad, _, plan = _label_plan(
        target, weight, options, input.dtype, classes, f"log_probs have {classes} classes"
    )
    if weight is None:
        main = F.nll_loss(input, labels, weight, ignore_index=options.ignore_index, reduction="none")
    else:  # (F.nll_loss's −w_y·log p_y is NaN at 0·(−inf); it cannot differentiate the weight either)
        valid = labels != options.ignore_index  # (a bad label's row too: its stand-in class counts)
        main = 0.0 - _weighted_picked(input, labels, weight, valid, class_dim)  # (+0, as the kernels)
    return plan.reduce(_nan_where(main, bad)).to(result_dtype)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    reduction: str,
    pos_weight: Tensor | None,
) -> Tensor:
    """``torch.nn.functional.binary_cross_entropy_with_logits`` with xentkit's "mean" of nothing
    (no element) = 0, as on the kernels (torch: NaN). Half-precision operands (bfloat16, float16)
    are computed in float32, from the stable form (below), and the loss rounded once to the
    target's dtype, as torch returns it (float32 under autocast):
    torch's bfloat16 kernel computes in bfloat16 (a review measured losses up to 200% off, and a
    float32 loss of bfloat16 logits 56% off), and its float32 formula cancels."""
    if reduction == "mean" and input.numel() == 0:  # (the plan's mean of nothing: 0, with its empty graph)
        nothing = binary_cross_entropy_with_logits(input, target, weight, "none", pos_weight)
        return ReductionPlan.of_rows("mean", 0).reduce(nothing).to(nothing.dtype)
    operands = (input, target, weight, pos_weight)
    if all(t is None or _bridge.at_least_float32(t.dtype) == t.dtype for t in operands):
        return F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)
    for name, factor in (("weight", weight), ("pos_weight", pos_weight)):
        if factor is not None and factor.requires_grad and torch.is_grad_enabled():  # (torch's rule at every dtype)
            raise RuntimeError(
                f"The function 'binary_cross_entropy_with_logits' is not differentiable with respect to "
                f"argument '{name}'. This input cannot have requires_grad True."
            )
    input, target, weight, pos_weight = (None if t is None else t.to(_bridge.at_least_float32(t.dtype)) for t in operands)
    # the stable form w·[(1 − y)·softplus(x) + pw·y·softplus(−x)], two terms ≥ 0 (for y in [0, 1]),
    # not torch's (1 − y)·x + log(1 + e^−x), whose terms cancel in float32 for x < 0 and a small y
    # (4.9% off at x = −20, y = 1e-6), nor its gradient σ(x)·(pw·y + 1 − y) − pw·y (75% off at
    # x = 16.5, pw = 4; a review): softplus's own gradient is σ, computed where it is small
    positive = target if pos_weight is None else pos_weight * target
    loss = (1 - target) * F.softplus(input) + positive * F.softplus(-input)
    if weight is not None:
        loss = loss * weight
    loss = loss.sum() if reduction == "sum" else loss.mean() if reduction == "mean" else loss
    return loss.to(_bridge.autocast_dtype(operands[1].dtype, operands[0]))  # (under autocast float32, as torch)
