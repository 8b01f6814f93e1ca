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
    batched_chunk_gradients,
    detached,
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
    """Why the Triton linear cross-entropy cannot run this call, or None when it can (under
    torch.compile too: the custom ops of ``_linear_ops``)."""
    flat = input.dim() == 2 and linear_weight.dim() == 2
    # (the grid's rows: the input's, which bound each chunk's launch)
    grid = (input.shape[0], linear_weight.shape[0]) if flat else None
    reason = triton_reason(input, target, weight, linear_weight, linear_bias, compiled=True, name="input", grid=grid)
    if reason is None and not flat:
        return "it takes a 2-D input and a 2-D linear_weight"
    return reason  # (dtypes, devices, the bias: _linear_checks.check_linear refused a mix before asking)


def rows_target(target: Tensor, rows: int, classes: int, ignore_index: int) -> Tensor:
    """The kernels' targets: ``[rows]`` int64 labels (cast as every path casts them:
    ``_bridge.int64_labels``), or ``[rows, V]`` probabilities (read in their dtype)."""
    if target.is_floating_point():
        return target.detach().reshape(rows, classes).contiguous()
    # (the message's text for uint64 labels alone: formatted, a traced class count would be pinned)
    text = _classes_text(classes) if target.dtype == torch.uint64 else None
    labels = _bridge.int64_labels(target.detach(), classes, ignore_index, text)
    return labels.reshape(-1).contiguous()


def _classes_text(classes: int) -> str:
    """What holds the classes, in a label error."""
    return f"linear_weight has {classes} rows (classes)"


def forward_chunks(
    x: Tensor, w: Tensor, b: Tensor | None, labels: Tensor, weight: Tensor | None, options: LossOptions,
    want: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor | None, ...]]:
    """The forward over the chunks (steps 1-4 of the module docstring) on contiguous detached
    ``x``, ``w``, ``b`` and :func:`rows_target`'s ``labels``: ``(loss, valid, stats, gradients)``,
    the float32 loss (reduced, or per row), the rows counted by the reduction, the rows' pass-1
    statistics, and for "mean"/"sum" the gradients wanted (input, weight, bias) for an
    upstream gradient of 1 (None for the others, and for "none"). No label is checked and
    nothing waits for the device: a bad label makes its row NaN. Shared by the eager Function
    and the custom ops of ``torch.compile`` (``_linear_ops``)."""
    from ..triton import stats_rows
    from ..triton.cross_entropy import ClassWeights, row_statistics

    options.check_fits(torch.float32, torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny)  # the kernels' arithmetic
    n, classes = x.shape[0], w.shape[0]
    probabilities = labels.is_floating_point()
    valid, plan = row_plan(labels, weight, options, classes)
    now = any(want) and options.reduction != "none"  # "none": gradients in backward
    factors = unit_factors(plan, x.device) if now else None
    # W only for the gradients of hard labels with label smoothing
    class_weights = ClassWeights.of(
        weight, x.device, with_total=now and ClassWeights.total_wanted(labels, options.label_smoothing)
    )
    one = torch.ones((), dtype=torch.float32, device=x.device)  # forward's upstream gradient
    grads = gradient_buffers(
        x, w, b, want if now else (False, False, False), widen=options.accumulate_in_float32
    )
    loss_rows = torch.empty(n, dtype=torch.float32, device=x.device)
    lse_rows = torch.empty(n, dtype=torch.float32, device=x.device)
    stats = torch.empty((stats_rows(probabilities), n), dtype=torch.float32, device=x.device)
    buffer = torch.empty((min(options.chunk_size, n), classes), dtype=x.dtype, device=x.device)
    for start, stop, x_chunk, logits in logit_chunks(x, w, b, buffer, options.chunk_size):
        loss_rows[start:stop], lse_rows[start:stop], stats[:, start:stop] = row_statistics(
            logits, labels[start:stop], class_weights, **options.formula_arguments()
        )
        if now:
            _chunk_gradients(logits, x_chunk, w, labels[start:stop], class_weights, stats[:, start:stop],
                             options, one, factors, grads, start, stop)
    loss = plan.reduce(loss_rows, z_term(lse_rows, valid, options.z_loss))
    return loss, valid, stats, finish_gradients(grads, w, b)


def backward_chunks(
    x: Tensor, w: Tensor, b: Tensor | None, labels: Tensor, weight: Tensor | None, stats: Tensor,
    upstream: Tensor, options: LossOptions, want: tuple[bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """The "none" backward: the chunks' logits again, pass 2 with the per-row ``upstream``
    gradient (read on the device), and the matmuls; the gradients wanted (else None)."""
    from ..triton.cross_entropy import ClassWeights

    grads = gradient_buffers(x, w, b, want, widen=options.accumulate_in_float32)
    upstream = upstream.detach().reshape(-1)
    ones = torch.ones(2, dtype=torch.float32, device=x.device)
    class_weights = ClassWeights.of(
        weight, x.device, with_total=ClassWeights.total_wanted(labels, options.label_smoothing)
    )
    buffer = torch.empty((min(options.chunk_size, x.shape[0]), w.shape[0]), dtype=x.dtype, device=x.device)
    for start, stop, x_chunk, logits in logit_chunks(x, w, b, buffer, options.chunk_size):
        _chunk_gradients(logits, x_chunk, w, labels[start:stop], class_weights, stats[:, start:stop],
                         options, upstream[start:stop], ones, grads, start, stop)
    return finish_gradients(grads, w, b)


def _batched_backward_chunks(
    x: Tensor, w: Tensor, b: Tensor | None, labels: Tensor, weight: Tensor | None, stats: Tensor,
    upstream: Tensor, options: LossOptions, want: tuple[bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """:func:`backward_chunks` for a batched upstream gradient (``_bridge.batched_backward``):
    pass 2 at upstream ones (row i's gradient is linear in its own g_i), times the rows' batched
    g, and the matmuls out of place (``_chunks.batched_chunk_gradients``)."""
    from ..triton.cross_entropy import ClassWeights

    ones = torch.ones(2, dtype=torch.float32, device=x.device)
    unit_upstream = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    class_weights = ClassWeights.of(
        weight, x.device, with_total=ClassWeights.total_wanted(labels, options.label_smoothing)
    )
    per_row = upstream.reshape(-1, 1)

    def chunk_gradient(logits: Tensor, start: int, stop: int) -> Tensor:
        gradient_rows(logits, labels[start:stop], class_weights, stats[:, start:stop].contiguous(), ones,
                      unit_upstream[start:stop], options, logits)
        return _bridge.batched_product(logits, per_row[start:stop])

    return batched_chunk_gradients(
        x, w, b, options.chunk_size, want, chunk_gradient, widen=options.accumulate_in_float32
    )


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
        _bridge.first_order_anchors(ctx, input, linear_weight, linear_bias)
        x, w, b = detached(input, linear_weight, linear_bias)
        classes = w.shape[0]
        labels = rows_target(target, x.shape[0], classes, options.ignore_index)
        want = tuple(grad_enabled and ctx.needs_input_grad[i] for i in range(3))
        loss, _valid, stats, gradients = forward_chunks(x, w, b, labels, weight, options, want)
        if not labels.is_floating_point() and options.check_labels:
            check_labels(labels, classes, options.ignore_index, classes=_classes_text(classes))
        ctx.options = options
        saved = (input, linear_weight, linear_bias, labels, weight, stats)
        ctx.want = want
        _bridge.keep_for_backward(
            ctx, dict(zip(_bridge.LINEAR_GRADIENT_NAMES, gradients, strict=True)),
            *(saved if options.reduction == "none" and any(want) else ()),
        )
        return loss.to(_bridge.at_least_float32(x.dtype))  # float32 for half inputs (docs/precision.md)

    @staticmethod
    @_bridge.first_order_only("linear_cross_entropy")
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        options: LossOptions = ctx.options
        if options.reduction == "none":
            (input, linear_weight, linear_bias, labels, weight, stats), _ = _bridge.kept_for_backward(ctx)
            x, w, b = detached(input, linear_weight, linear_bias)
            if _bridge.batched_backward(grad_output):  # (is_grads_batched: out of place, by linearity)
                gradients = _batched_backward_chunks(x, w, b, labels, weight, stats, grad_output, options, ctx.want)
                return (*gradients, None, None, None, None)
            gradients = backward_chunks(x, w, b, labels, weight, stats, grad_output, options, ctx.want)
            return (*gradients, None, None, None, None)
        # loss.backward() passes 1: one wait for the device saves a pass over each gradient
        gradients = _bridge.hand_over_gradients(
            ctx, _bridge.LINEAR_GRADIENT_NAMES, grad_output, read_one_on_device=True
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

