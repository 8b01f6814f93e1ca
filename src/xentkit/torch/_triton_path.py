"""The Triton path of ``xentkit.torch``: which backend a call takes, and the autograd Function that
runs :mod:`xentkit.triton`'s kernel.

Backends (``LossOptions.backend``): "torch" always runs plain torch ops; "auto" takes the Triton
kernels for CUDA tensors they handle, the Numba kernels for CPU tensors they handle, torch ops for
the rest; "triton" insists on the Triton kernels and says why when it cannot have them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .._labels import check_index_layout, check_labels
from .._options import LossOptions
from ..reference.cross_entropy import z_term
from ..reference.reductions import ReductionPlan
from . import _bridge

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# probability targets are read in their own dtype (float32 arithmetic)
PROBABILITY_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _triton_importable() -> bool:
    from .. import triton as xentkit_triton

    return xentkit_triton.available()


def tensor_reason(input: Tensor) -> str | None:
    """Why no Triton kernel can run on ``input`` (its dtype, its device, torch.compile, a missing
    triton package), or None when one can. Shared by every Triton path of ``xentkit.torch``."""
    if input.dtype not in TRITON_DTYPES:
        return f"it takes float32, float16 and bfloat16 logits, got {input.dtype}"
    if input.device.type != "cuda" and not (input.device.type == "cpu" and _interpreted()):
        return (
            f"it runs CUDA tensors (and CPU tensors only under Triton's interpreter, "
            f"TRITON_INTERPRET=1), got a tensor on {input.device}"
        )
    if torch.compiler.is_compiling():
        return "it does not run under torch.compile"
    if not _triton_importable():
        return "the triton package is not installed"
    return None


def triton_reason(
    input: Tensor, target: Tensor, weight: Tensor | None, *, probabilities: bool = False
) -> str | None:
    """Why the Triton cross-entropy cannot run this call, or None when it can. ``probabilities``:
    whether the caller's kernels take probability targets (``cross_entropy``'s do; the linear
    form's not yet)."""
    if torch.is_floating_point(target):
        if not probabilities:
            return "probability targets are not on the Triton path yet"
        if target.dtype not in PROBABILITY_DTYPES:
            return f"it reads float16, bfloat16, float32 and float64 probability targets, got {target.dtype}"
    # a kernel would read another device's memory (torch ops then raise torch's own error)
    for name, tensor in (("target", target), ("weight", weight)):
        if tensor is not None and tensor.device != input.device:
            return f"the {name} is on {tensor.device} but the logits are on {input.device}"
    if torch.is_grad_enabled() and (target.requires_grad or (weight is not None and weight.requires_grad)):
        return "it differentiates with respect to the logits only (target or weight requires grad)"
    return tensor_reason(input)


def use_triton(options: LossOptions, input: Tensor, target: Tensor, weight: Tensor | None) -> bool:
    """Whether ``cross_entropy`` takes the Triton path; ``backend="triton"`` raises if it cannot."""
    if options.backend == "torch":
        return False
    if options.backend == "auto" and input.device.type != "cuda":
        return False
    reason = triton_reason(input, target, weight, probabilities=True)
    if reason is not None and options.backend == "triton":
        raise ValueError(f"backend='triton' cannot run this call: {reason}")
    return reason is None


def unit_factors(plan: ReductionPlan, device: torch.device) -> Tensor:
    """The plan's (main, z) gradient factors for an upstream gradient of 1 (the "mean"
    denominators' inverses, or 0) as a float32 ``[2]`` device tensor for ``row_gradient``."""
    return torch.stack([torch.as_tensor(f, dtype=torch.float32, device=device) for f in plan.scales(1.0)])


def _rows(input: Tensor) -> Tensor:
    """The logits as contiguous ``[rows, C]`` with the class axis (1, or 0 unbatched) last."""
    if input.dim() == 1:
        return input.detach().reshape(1, -1).contiguous()
    return input.detach().movedim(1, -1).reshape(-1, input.shape[1]).contiguous()


class TritonCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy on :mod:`xentkit.triton`'s kernels. forward: pass 1 and the loss (two
    launches, one read of the logits), then the labels are checked (one wait for the device);
    the logits and each row's max and sum are kept. backward: pass 2 with the upstream gradient
    read on the device (one launch: one read and one write), no synchronization, and no
    logits-sized buffer held between forward and backward. The "mean" denominators reach the
    kernel as device factors of the upstream gradient: backward launches nothing else.

    Probability targets (floating, of the input's shape) take the same two passes, which read
    them as ``[rows, C]`` in their dtype (a copy only for ``(N, C, d1, ..., dk)`` layouts); as on
    the CPU no row is ignored, "mean" divides by the number of rows, and there are no labels to
    check (no wait for the device)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions,
        grad_enabled: bool,
    ) -> Tensor:
        from ..triton.cross_entropy import row_statistics

        _bridge.first_order_anchors(ctx, input)
        options.check_fits(torch.float32, torch.finfo(torch.float32).max)  # the kernels' arithmetic
        class_axis = 1 if input.dim() >= 2 else 0
        sample_shape = input.shape[:class_axis] + input.shape[class_axis + 1 :]
        probabilities = target.is_floating_point() and target.shape == input.shape
        if not probabilities:
            check_index_layout(
                not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool),
                tuple(target.shape), tuple(sample_shape), dtype_name=str(target.dtype),
            )
        rows = _rows(input)
        # the kernels' target: [rows, C] probabilities in their dtype, or [rows] int64 labels
        rows_target = _rows(target) if probabilities else target.detach().reshape(-1).long().contiguous()
        loss_rows, lse, stats = row_statistics(
            rows, rows_target, weight, options.ignore_index, options.label_smoothing, options.softcap
        )
        # everything below is queued behind the kernels; the label check's wait comes last
        if probabilities:
            valid = torch.ones_like(lse, dtype=torch.bool)
            plan = ReductionPlan.of_rows(options.reduction, rows.shape[0])
        else:
            valid, plan = ReductionPlan.of_targets(
                options.reduction, rows_target, options.ignore_index, weight, dtype=torch.float32
            )
        loss = plan.reduce(loss_rows, z_term(lse, valid, options.z_loss))
        if grad_enabled and ctx.needs_input_grad[0]:
            # the "mean" denominators as factors of the upstream gradient, read by the kernel
            ctx.save_for_backward(input, rows_target, stats, weight, unit_factors(plan, rows.device))
            ctx.options = options
        if not probabilities:
            check_labels(rows_target, rows.shape[1], options.ignore_index)  # the kernels read no bad label
        if options.reduction == "none":
            loss = loss.reshape(sample_shape)
        return loss.to(input.dtype)

    @staticmethod
    @_bridge.first_order_only("cross_entropy")
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        from ..triton.cross_entropy import row_gradient

        input, rows_target, stats, weight, factors = ctx.saved_tensors
        options: LossOptions = ctx.options
        rows = _rows(input)
        upstream = grad_output.detach().reshape(-1)
        if upstream.numel() == 1:
            upstream = upstream.expand(rows.shape[0])
        # pass 2 writes over the rows when they are a private copy (a layout with the classes not
        # last) or, with inplace_backward, the logits themselves; else into a new buffer
        private = rows.data_ptr() != input.data_ptr() or rows.numel() == 0
        over_input = options.inplace_backward and not private
        gradient = row_gradient(
            rows, rows_target, weight, stats, options.ignore_index, options.label_smoothing,
            options.z_loss, options.softcap, upstream, upstream,
            rows if private or over_input else torch.empty_like(rows), factors,
        )
        if over_input:  # a node that saved the logits now raises torch's version error
            torch.autograd.graph.increment_version(input)
        shape = input.shape
        if len(shape) <= 1:
            gradient = gradient.reshape(shape)
        else:  # back from [rows, C] to (N, C, d1, ..., dk)
            gradient = gradient.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
        return gradient, None, None, None, None
