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


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _triton_importable() -> bool:
    from .. import triton as xentkit_triton

    return xentkit_triton.available()


def triton_reason(input: Tensor, target: Tensor, weight: Tensor | None) -> str | None:
    """Why the Triton cross-entropy cannot run this call, or None when it can."""
    if input.device.type != "cuda" and not (input.device.type == "cpu" and _interpreted()):
        return (
            f"it runs CUDA tensors (and CPU tensors only under Triton's interpreter, "
            f"TRITON_INTERPRET=1), got a tensor on {input.device}"
        )
    if input.dtype not in TRITON_DTYPES:
        return f"it takes float32, float16 and bfloat16 logits, got {input.dtype}"
    if torch.is_floating_point(target):
        return "probability targets are not on the Triton path yet"
    if torch.is_grad_enabled() and (target.requires_grad or (weight is not None and weight.requires_grad)):
        return "it differentiates with respect to the logits only (target or weight requires grad)"
    if torch.compiler.is_compiling():
        return "it does not run under torch.compile"
    if not _triton_importable():
        return "the triton package is not installed"
    return None


def use_triton(options: LossOptions, input: Tensor, target: Tensor, weight: Tensor | None) -> bool:
    """Whether ``cross_entropy`` takes the Triton path; ``backend="triton"`` raises if it cannot."""
    if options.backend == "torch":
        return False
    if options.backend == "auto" and input.device.type != "cuda":
        return False
    reason = triton_reason(input, target, weight)
    if reason is not None and options.backend == "triton":
        raise ValueError(f"backend='triton' cannot run this call: {reason}")
    return reason is None


def _rows(input: Tensor) -> Tensor:
    """The logits as contiguous ``[rows, C]`` with the class axis (1, or 0 unbatched) last."""
    if input.dim() == 1:
        return input.detach().reshape(1, -1).contiguous()
    return input.detach().movedim(1, -1).reshape(-1, input.shape[1]).contiguous()


class TritonCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy on :func:`xentkit.triton.cross_entropy_rows`: forward computes the loss and
    the gradient for an upstream gradient of 1 (per row for "none") in one launch; backward
    scales it."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions,
        grad_enabled: bool,
    ) -> Tensor:
        from ..triton import cross_entropy_rows

        _bridge.first_order_anchors(ctx, input)
        class_axis = 1 if input.dim() >= 2 else 0
        sample_shape = input.shape[:class_axis] + input.shape[class_axis + 1 :]
        check_index_layout(
            not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool),
            tuple(target.shape), tuple(sample_shape), dtype_name=str(target.dtype),
        )
        rows = _rows(input)
        labels = target.detach().reshape(-1).long().contiguous()
        valid = check_labels(labels, rows.shape[1], options.ignore_index)  # the kernel trusts them
        target_weight = None
        if weight is not None:
            target_weight = weight.detach().float()[labels.masked_fill(~valid, 0)] * valid
        plan = ReductionPlan.of_labels(options.reduction, valid, target_weight, dtype=torch.float32)
        want_grad = grad_enabled and ctx.needs_input_grad[0]
        gradient = main_scale = z_scale = None
        if want_grad:
            gradient = torch.empty_like(rows)
            main_scale, z_scale = (
                torch.as_tensor(scale, dtype=torch.float32, device=rows.device).expand(rows.shape[0])
                for scale in plan.scales(1.0)
            )
        loss_rows, lse = cross_entropy_rows(
            rows, labels, weight, **options.formula_arguments(), grad_scale=main_scale,
            z_grad_scale=z_scale, grad_out=gradient,
        )
        loss = plan.reduce(loss_rows, z_term(lse, valid, options.z_loss))
        ctx.reduction = options.reduction
        ctx.input_shape = input.shape
        ctx.gradient = gradient
        if options.reduction == "none":
            loss = loss.reshape(target.shape)
        return loss.to(input.dtype)

    @staticmethod
    @_bridge.first_order_only("cross_entropy")
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        gradient, owned = _bridge.take_saved_gradient(ctx, "gradient", "cross_entropy")
        upstream = grad_output.reshape(-1, 1) if ctx.reduction == "none" else grad_output
        gradient = _bridge.scale_gradient(gradient, upstream, owned, check_one_on_device=True)
        shape = ctx.input_shape
        if len(shape) <= 1:
            gradient = gradient.reshape(shape)
        else:  # back from [rows, C] to (N, C, d1, ..., dk)
            gradient = gradient.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
        return gradient, None, None, None, None
