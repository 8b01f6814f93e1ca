"""``linear_cross_entropy`` on CUDA: chunked cuBLAS matmuls around :mod:`xentkit.triton`'s kernels.

Per chunk of rows, into one reused ``[rows, V]`` buffer of the input's dtype (the class weights
cast and summed once for every chunk: :class:`xentkit.triton.cross_entropy.ClassWeights`):

1. ``logits = x_chunk Wᵀ (+ b)``                            (cuBLAS, ``out=`` the buffer)
2. pass 1 and the rows' losses (:func:`xentkit.triton.cross_entropy.row_statistics`)
3. pass 2 writes the gradient **over the logits** (``row_gradient(..., grad_out=logits)``), scaled
   by the batch's reduction plan (the "mean" denominators read on the device)
4. ``grad_x[chunk] = dz W``, ``grad_W += dzᵀ x_chunk``, ``grad_b += Σ_rows dz``   (cuBLAS)

"mean"/"sum" compute every gradient in forward, so backward only scales them by the upstream
gradient (``_bridge.hand_over_gradients``; skipped when it is 1, which costs one wait for the
device, cheap next to the matmuls).
"none" computes the losses in forward, keeps each row's max and sum, and redoes the chunks in
backward with the per-row upstream gradient read on the device (one more matmul per chunk).

Precision: the kernels work in float32; ``grad_W`` and ``grad_b`` add the chunks' contributions
into float32 accumulators (:func:`xentkit.torch._chunks.gradient_buffers`; one cuBLAS call per
chunk with a float32 output) and are rounded to the weight's dtype once, after the last chunk.
Memory: for float16/bfloat16 weights that accumulator is a float32 ``[V, D]`` buffer while the
chunks run, twice the weight-dtype gradient (2 GiB for a 128256 × 4096 bfloat16 output layer,
against 1 GiB), three times during the final cast; float32 weights need nothing extra. Rounding
once instead of once per chunk is the precision contract (docs/precision.md);
``accumulate_in_float32=False`` trades it back for that memory (the chunks added in the weight's
dtype, one rounding each, as Liger-Kernel does by default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .._labels import check_labels
from .._options import LossOptions
from ..reference.cross_entropy import z_term
from . import _bridge
from ._chunks import (
    Gradients,
    add_chunk_gradients,
    finish_gradients,
    gradient_buffers,
    logit_chunks,
)
from ._triton_path import gradient_rows, row_plan, triton_reason, unit_factors

if TYPE_CHECKING:
    from ..triton.cross_entropy import ClassWeights


def linear_reason(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None
) -> str | None:
    """Why the Triton linear cross-entropy cannot run this call, or None when it can."""
    reason = triton_reason(input, target, weight)
    if reason is not None:
        return reason
    if input.dim() != 2 or linear_weight.dim() != 2:
        return "it takes a 2-D input and a 2-D linear_weight"
    return None  # dtypes, devices, the bias: _linear_checks.check_linear refused a mix before asking


class TritonLinearCrossEntropyFunction(torch.autograd.Function):
    """See the module docstring."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        linear_weight: Tensor,
        linear_bias: Tensor | None,
        target: Tensor,
        weight: Tensor | None,
        options: LossOptions,
        grad_enabled: bool,
    ) -> Tensor:
        from ..triton.cross_entropy import ClassWeights, row_statistics

        _bridge.first_order_anchors(ctx, input, linear_weight, linear_bias)
        options.check_fits(torch.float32, torch.finfo(torch.float32).max)  # the kernels' arithmetic
        x = input.detach().contiguous()
        w = linear_weight.detach().contiguous()
        b = None if linear_bias is None else linear_bias.detach().contiguous()
        n, classes = x.shape[0], w.shape[0]
        probabilities = target.is_floating_point()
        if probabilities:  # [N, V] rows of q, read in their dtype; "mean" over the rows
            labels = target.detach().reshape(n, classes).contiguous()
        else:
            labels = target.detach().reshape(-1).long().contiguous()
        valid, plan = row_plan(labels, weight, options, classes)
        want = tuple(grad_enabled and ctx.needs_input_grad[i] for i in range(3))
        now = any(want) and options.reduction != "none"  # "none": gradients in backward
        factors = unit_factors(plan, x.device) if now else None
        # W only for the gradients of hard labels
        class_weights = ClassWeights.of(weight, x.device, with_total=now and not probabilities)
        one = torch.ones((), dtype=torch.float32, device=x.device)  # forward's upstream gradient
        grads = gradient_buffers(
            x, w, b, want if now else (False, False, False), widen=options.accumulate_in_float32
        )
        loss_rows = torch.empty(n, dtype=torch.float32, device=x.device)
        lse_rows = torch.empty(n, dtype=torch.float32, device=x.device)
        stats = torch.empty((3 if probabilities else 2, n), dtype=torch.float32, device=x.device)
        buffer = torch.empty((min(options.chunk_size, n), classes), dtype=x.dtype, device=x.device)
        for start, stop, x_chunk, logits in logit_chunks(x, w, b, buffer, options.chunk_size):
            loss_rows[start:stop], lse_rows[start:stop], stats[:, start:stop] = row_statistics(
                logits, labels[start:stop], class_weights, **options.formula_arguments()
            )
            if now:
                _chunk_gradients(logits, x_chunk, w, labels[start:stop], class_weights, stats[:, start:stop],
                                 options, one, factors, grads, start, stop)
        if not probabilities and options.check_labels:
            check_labels(labels, classes, options.ignore_index, classes=f"linear_weight has {classes} rows (classes)")
        loss = plan.reduce(loss_rows, z_term(lse_rows, valid, options.z_loss))
        ctx.options = options
        if options.reduction == "none" and any(want):
            ctx.save_for_backward(input, linear_weight, linear_bias, labels, weight, stats)
            ctx.want = want
        for name, gradient in zip(_bridge.LINEAR_GRADIENT_NAMES, finish_gradients(grads, w, b), strict=True):
            setattr(ctx, name, gradient)
        return loss.to(_bridge.at_least_float32(x.dtype))  # float32 for half inputs (docs/precision.md)

    @staticmethod
    @_bridge.first_order_only("linear_cross_entropy")
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        options: LossOptions = ctx.options
        if options.reduction == "none":
            from ..triton.cross_entropy import ClassWeights

            input, linear_weight, linear_bias, labels, weight, stats = ctx.saved_tensors
            x, w = input.detach().contiguous(), linear_weight.detach().contiguous()
            b = None if linear_bias is None else linear_bias.detach().contiguous()
            grads = gradient_buffers(x, w, b, ctx.want, widen=options.accumulate_in_float32)
            upstream = grad_output.detach().reshape(-1)
            ones = torch.ones(2, dtype=torch.float32, device=x.device)
            class_weights = ClassWeights.of(weight, x.device, with_total=not labels.is_floating_point())
            buffer = torch.empty((min(options.chunk_size, x.shape[0]), w.shape[0]), dtype=x.dtype, device=x.device)
            for start, stop, x_chunk, logits in logit_chunks(x, w, b, buffer, options.chunk_size):
                _chunk_gradients(logits, x_chunk, w, labels[start:stop], class_weights, stats[:, start:stop],
                                 options, upstream[start:stop], ones, grads, start, stop)
            return (*finish_gradients(grads, w, b), None, None, None, None)
        # loss.backward() passes 1: one wait for the device saves a pass over each gradient
        gradients = _bridge.hand_over_gradients(
            ctx, _bridge.LINEAR_GRADIENT_NAMES, grad_output, "linear_cross_entropy",
            read_one_on_device=True,
        )
        return (*gradients, None, None, None, None)


def _chunk_gradients(
    logits: Tensor, x_chunk: Tensor, w: Tensor, labels: Tensor, weight: ClassWeights | None,
    stats: Tensor, options: LossOptions, upstream: Tensor, factors: Tensor, grads: Gradients,
    start: int, stop: int,
) -> None:
    """Pass 2 over the chunk's logits (in place; ``upstream``: one value for every row, or one
    per row; ``weight`` prepared once for every chunk), then the three matmuls into ``grads``."""
    gradient_rows(logits, labels, weight, stats.contiguous(), factors, upstream, options, logits)
    add_chunk_gradients(logits, x_chunk, w, grads, start, stop)

