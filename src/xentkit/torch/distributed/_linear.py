"""The fused linear form: :func:`vocab_parallel_linear_cross_entropy`, its chunked pass and its
autograd Function."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx

from ..._options import Integer, LossOptions, Real
from .. import _bridge
from .._chunks import add_chunk_gradients, finish_gradients, gradient_buffers, logit_chunks
from ._agreement import (
    _agree,
    _check_linear_shards,
    _check_target,
    _check_weight,
    _has_graph,
    _local_record,
)
from ._algebra import _coefficients, _combine, _row_losses, _RowStatistics
from ._communication import CommunicationStats, _Communicator
from ._rows import _chunk_rows, _Plan, _plan
from ._shards import _new_buffer, _shard_gradient, _shard_statistics, shard_backend

_NAME = "vocab_parallel_linear_cross_entropy"


@dataclasses.dataclass
class _LinearPass:
    main: Tensor | None  # per-row main term (forward only)
    z_term: Tensor | None
    stats: _RowStatistics | None  # the rows' statistics (forward only)
    grad_input: Tensor | None
    grad_weight: Tensor | None
    grad_bias: Tensor | None


def _linear_pass(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    plan: _Plan,
    *,
    known: _RowStatistics | None,
    g: Tensor | float,
    g_z: Tensor | float,
    want: tuple[bool, bool, bool],
) -> _LinearPass:
    """One sweep over the row chunks. Per chunk of r rows (one reused ``[r, V_r]`` buffer):

    1. ``logits = x_chunk W_rᵀ (+ b_r)``
    2. forward (``known`` None): pass 1 and the chunk's two all-reduces (O(r) floats), the losses;
       backward of "none": the statistics stored by forward, no communication
    3. gradient (when ``want``): pass 2 overwrites the logits with ``dz``, then
       ``grad_x[chunk] = dz W_r``, ``grad_W_r += dzᵀ x_chunk``, ``grad_b_r += Σ_rows dz``

    and after the chunks ``grad_x`` is all-reduced (SUM over ranks: x is replicated).
    ``want[0]`` must be the same on every rank (it decides a collective).
    """
    n, width = x.shape[0], w.shape[0]
    device = x.device
    buffer = _new_buffer((min(plan.chunk_rows, n), width), x)
    grads = gradient_buffers(x, w, b, want, zero_input=True, new_buffer=_new_buffer)
    forward = known is None
    main = torch.zeros(n, dtype=torch.float64, device=device) if forward else None
    z_term = torch.zeros(n, dtype=torch.float64, device=device) if forward and plan.options.z_loss else None
    pieces: list[_RowStatistics] = []
    # 1. logits = x W^T (+ b), chunk by chunk into the reused buffer
    for start, stop, x_chunk, logits in logit_chunks(x, w, b, buffer, plan.chunk_rows):
        rows = plan.rows.slice(start, stop)
        # 2. the rows' statistics over all ranks, and the losses
        if forward:
            stats = _combine(_shard_statistics(logits, rows, plan), plan)
            pieces.append(stats)
            chunk_main, chunk_z = _row_losses(stats, rows, plan)
            main[start:stop] = chunk_main
            if z_term is not None:
                z_term[start:stop] = chunk_z
        else:
            stats = known.slice(start, stop)
        if not any(want):
            continue
        # 3. dz over the logits (in place), then the three gradients
        g_chunk = g[start:stop] if isinstance(g, Tensor) else g
        g_z_chunk = g_z[start:stop] if isinstance(g_z, Tensor) else g_z
        _shard_gradient(logits, rows, plan, stats.shift, _coefficients(stats, rows, plan, g_chunk, g_z_chunk), logits)
        add_chunk_gradients(logits, x_chunk, w, grads, start, stop)
    grad_input, grad_weight, grad_bias = finish_gradients(grads, w, b)
    if grad_input is not None:
        plan.communicator.all_reduce(grad_input, dist.ReduceOp.SUM)
    all_stats = None
    if forward:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        all_stats = _RowStatistics(
            torch.cat([p.shift for p in pieces]) if pieces else empty,
            torch.cat([p.excess for p in pieces]) if pieces else empty,
            torch.cat([p.target_logit for p in pieces]) if pieces else empty,
            torch.cat([p.sum_z for p in pieces]) if pieces and plan.smoothing else None,
        )
    return _LinearPass(main, z_term, all_stats, grad_input, grad_weight, grad_bias)


class _VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """"mean"/"sum": every gradient is computed in forward (grad_input all-reduced there) and
    backward scales them. "none": forward computes the losses and keeps the rows' statistics
    (4·N floats); backward recomputes the logits chunk by chunk with the per-row upstream
    gradient (no statistics communicated) and all-reduces grad_input.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        linear_weight_shard: Tensor,
        linear_bias_shard: Tensor | None,
        plan: _Plan,
        want: tuple[bool, bool, bool],
    ) -> Tensor:
        x = input.detach().reshape(plan.rows.valid.shape[0], input.shape[-1]).contiguous()
        w = linear_weight_shard.detach().contiguous()
        b = None if linear_bias_shard is None else linear_bias_shard.detach().contiguous()
        ctx.plan = plan
        ctx.input_shape = input.shape
        ctx.want = want
        _bridge.first_order_anchors(ctx, input, linear_weight_shard, linear_bias_shard)
        if plan.options.reduction == "none":
            result = _linear_pass(x, w, b, plan, known=None, g=1.0, g_z=1.0, want=(False, False, False))
            _bridge.keep_for_backward(ctx, {}, input, linear_weight_shard, linear_bias_shard)
            ctx.row_statistics = result.stats
            loss = plan.reduction_plan.reduce(result.main, result.z_term)
            return loss.to(_bridge.at_least_float32(input.dtype)).reshape(input.shape[:-1])
        g, g_z = plan.reduction_plan.scales(1.0)
        result = _linear_pass(x, w, b, plan, known=None, g=g, g_z=g_z, want=want)
        grad_input = None if result.grad_input is None else result.grad_input.view(input.shape)
        _bridge.keep_for_backward(ctx, dict(zip(
            _bridge.LINEAR_GRADIENT_NAMES, (grad_input, result.grad_weight, result.grad_bias), strict=True
        )))
        # float32 for half inputs, as linear_cross_entropy (docs/precision.md)
        return plan.reduction_plan.reduce(result.main, result.z_term).to(_bridge.at_least_float32(input.dtype))

    @staticmethod
    @_bridge.first_order_only(_NAME)
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        plan: _Plan = ctx.plan
        needs = ctx.needs_input_grad[:3]
        if plan.options.reduction == "none":
            if _bridge.batched_backward(grad_output):
                _bridge.refuse_batched_backward(
                    f"xentkit.torch.distributed.{_NAME} with reduction='none'",
                    "its input gradient is all-reduced over the ranks, which a batch of upstream "
                    "gradients cannot be",
                    "call torch.autograd.grad once per upstream gradient (a loop), or use reduction='mean' or 'sum'",
                )
            (input, linear_weight_shard, linear_bias_shard), _ = _bridge.kept_for_backward(ctx)
            g, g_z = plan.reduction_plan.scales(grad_output.reshape(-1).to(torch.float64))
            result = _linear_pass(
                input.detach().reshape(plan.rows.valid.shape[0], input.shape[-1]).contiguous(),
                linear_weight_shard.detach().contiguous(),
                None if linear_bias_shard is None else linear_bias_shard.detach().contiguous(),
                plan,
                known=ctx.row_statistics,
                g=g,
                g_z=g_z,
                want=ctx.want,
            )
            gradients = (
                None if result.grad_input is None else result.grad_input.view(ctx.input_shape),
                result.grad_weight,
                result.grad_bias,
            )
            return (*(gradient if need else None for gradient, need in zip(gradients, needs, strict=True)), None, None)
        return (*_bridge.hand_over_gradients(ctx, _bridge.LINEAR_GRADIENT_NAMES, grad_output), None, None)


# Not traced by torch.compile (a graph break: it runs eagerly): its label checks and collectives
# need the tensors' values, and the compiler's functionalization is a torch.func transform.
@_bridge.eager_only
def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    linear_weight_shard: Tensor,
    target: Tensor,
    *,
    group: object = None,
    vocab_start: int | None = None,
    linear_bias_shard: Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: Integer = -100,
    reduction: str = "mean",
    label_smoothing: Real = 0.0,
    z_loss: Real = 0.0,
    chunk_size: int | None = None,
    backend: str = "auto",
    stats: CommunicationStats | None = None,
) -> Tensor:
    r"""Cross-entropy of ``input @ W.T + b`` with W's rows (the vocabulary) split across ranks,
    never materializing the logits, not even this rank's ``[N, V_r]`` slice.

    Equals :func:`vocab_parallel_cross_entropy` of the shard logits ``input @ W_r.T + b_r`` (and
    the single-process ``cross_entropy(input @ W.T + b, target)``). Rows are processed
    ``chunk_size`` at a time (default: a chunk's logits at most 1/16 of the widest shard's logits
    and at most 16 MiB, at least 2 MiB); per chunk: local logits, pass 1, an all-reduce MAX of
    ``r`` and SUM of ``3r`` (``4r``) float64, then the shard's ``dz`` in place of the logits and
    ``∂loss/∂x += dz·W_r``, ``∂loss/∂W_r += dzᵀ·x``, ``∂loss/∂b_r += Σ_rows dz``.

    ``input`` is replicated, so its gradient ``Σ_r dz_r·W_r`` is all-reduced (SUM over ranks,
    N·D floats): the standard tensor-parallel cost of backward through a column-parallel layer
    (Megatron's ``copy_to_tensor_model_parallel_region``); the weight and bias gradients stay
    local. For "mean"/"sum" it happens in forward (with every gradient; backward only scales);
    for "none" in backward, which recomputes the logits chunk by chunk with the per-row upstream
    gradient and the row statistics kept by forward (one more matmul per chunk, no statistics
    communicated). Every rank must call backward, with the same upstream gradient.

    Args:
        input: ``[N, D]`` (or ``[..., D]``) float tensor, the same on every rank.
        linear_weight_shard: ``[V_r, D]``, this rank's rows of the output weight (classes
            ``vocab_start .. vocab_start + V_r``), the input's dtype and device.
        target: ``[N]`` (input's leading shape) int64 labels in ``[0, V)`` or ``ignore_index``,
            the same on every rank.
        linear_bias_shard: None or ``[V_r]``, this rank's slice of the output bias.
        chunk_size: rows per chunk (the same on every rank), or None for the default.
        group, vocab_start, weight, ignore_index, reduction, label_smoothing, z_loss, backend,
            stats: as :func:`vocab_parallel_cross_entropy` (the backend runs the passes over each
            chunk's shard logits; the matmuls are torch's).

    Returns:
        The loss, a scalar or ``input.shape[:-1]`` for ``reduction="none"``: float32 for
        float16/bfloat16 inputs (as :func:`xentkit.torch.linear_cross_entropy`), else the input's dtype.
        First-order only: differentiating the gradients (``create_graph=True``) raises.

    Raises:
        ValueError: on every rank, as :func:`vocab_parallel_cross_entropy` (also for shapes of the
            weight/bias shards and a ``chunk_size`` that differs between ranks).
    """
    input, linear_weight_shard, linear_bias_shard = _bridge.autocast_operands(
        input, linear_weight_shard, linear_bias_shard
    )
    device = input.device if isinstance(input, Tensor) else torch.device("cpu")
    communicator = _Communicator(group, device, stats)
    state: dict[str, object] = {}
    grad_enabled = torch.is_grad_enabled()

    def local_checks() -> dict[str, int]:
        features, width = _check_linear_shards(
            input, linear_weight_shard, linear_bias_shard, saves_operands=reduction == "none"
        )
        options = LossOptions(
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            z_loss=z_loss, chunk_size=chunk_size, backend=backend,
        )
        labels = _check_target(
            target, tuple(input.shape[:-1]), "the input's shape without in_features", input, linear_weight_shard,
            linear_bias_shard,
        )
        class_weight = _check_weight(weight)
        state.update(options=options, labels=labels, weight=class_weight, shards=shard_backend(input, options))
        return _local_record(
            sample_shape=tuple(input.shape[:-1]), width=width, vocab_start=vocab_start, labels=labels,
            weight=class_weight, options=options, dtype=input.dtype,
            features=features, wants_input_grad=grad_enabled and input.requires_grad,
            backward_graph=_has_graph(grad_enabled, input, linear_weight_shard, linear_bias_shard)
            if options.reduction == "none" else None,
        )

    agreement = _agree(communicator, _NAME, local_checks)
    options: LossOptions = state["options"]  # type: ignore[assignment]
    labels = state["labels"]
    chunk_rows = _chunk_rows(labels.shape[0], max(agreement.widths), options.chunk_size, input.element_size())  # type: ignore[union-attr]
    plan = _plan(
        communicator, agreement, options, labels, state["weight"], device, state["shards"], chunk_rows  # type: ignore[arg-type]
    )
    want = (
        agreement.wants_input_grad,
        grad_enabled and linear_weight_shard.requires_grad,
        grad_enabled and linear_bias_shard is not None and linear_bias_shard.requires_grad,
    )
    return _VocabParallelLinearCrossEntropyFunction.apply(
        input, linear_weight_shard, linear_bias_shard, plan, want
    )
