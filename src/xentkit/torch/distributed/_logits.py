"""The logits form: :func:`vocab_parallel_cross_entropy` and its autograd Function."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from ..._options import Integer, LossOptions, Real
from .. import _bridge
from ._agreement import _agree, _check_device, _check_target, _check_weight, _local_record
from ._algebra import _coefficients, _combine, _row_losses
from ._communication import CommunicationStats, _Communicator
from ._rows import _Plan, _plan
from ._shards import _new_buffer, _shard_gradient, _shard_statistics, shard_backend

_NAME = "vocab_parallel_cross_entropy"


class _VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """forward: pass 1, two all-reduces of O(N), loss, and (when a gradient is wanted) pass 2
    writing the shard's gradient for an upstream gradient of 1. backward: that gradient times the
    upstream gradient (per row for "none"); no communication.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, logits_shard: Tensor, plan: _Plan, want_grad: bool) -> Tensor:
        rows = plan.rows.valid.shape[0]  # not reshape(-1, V_r): an empty shard has V_r = 0
        z = logits_shard.detach().reshape(rows, logits_shard.shape[-1]).contiguous()
        local = _shard_statistics(z, plan.rows, plan)
        stats = _combine(local, plan)
        main, z_term = _row_losses(stats, plan.rows, plan)
        loss = plan.reduction_plan.reduce(main, z_term)
        ctx.reduction = plan.options.reduction
        ctx.input_dtype = logits_shard.dtype
        _bridge.first_order_anchors(ctx, logits_shard)
        kept_gradient = None
        if want_grad:
            g, g_z = plan.reduction_plan.scales(1.0)
            # a float16 shard's gradient is kept in float32 until backward has scaled it (rounded
            # to float16 at an upstream of 1, a loss scaler's factor would find its small entries 0)
            gradient = _new_buffer(tuple(z.shape), z, dtype=_bridge.kept_gradient_dtype(z.dtype))
            _shard_gradient(z, plan.rows, plan, stats.shift, _coefficients(stats, plan.rows, plan, g, g_z), gradient)
            kept_gradient = gradient.view(logits_shard.shape)
        _bridge.keep_for_backward(ctx, {"gradient": kept_gradient})
        dtype = _bridge.autocast_dtype(logits_shard.dtype, logits_shard)  # (float32 under autocast)
        if ctx.reduction == "none":
            return loss.to(dtype).reshape(logits_shard.shape[:-1])
        return loss.to(dtype)

    @staticmethod
    @_bridge.first_order_only(_NAME)
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, None, None]:
        _, kept = _bridge.kept_for_backward(ctx)
        gradient, owned = _bridge.take_saved_gradient(kept, "gradient")
        factor = grad_output.unsqueeze(-1) if ctx.reduction == "none" else grad_output
        return _bridge.scale_gradient(gradient, factor, owned).to(ctx.input_dtype), None, None  # (rounded once)


# Not traced by torch.compile (a graph break: it runs eagerly): its label checks and collectives
# need the tensors' values, and the compiler's functionalization is a torch.func transform.
@_bridge.eager_only
def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    *,
    group: object = None,
    vocab_start: int | None = None,
    weight: Tensor | None = None,
    ignore_index: Integer = -100,
    reduction: str = "mean",
    label_smoothing: Real = 0.0,
    z_loss: Real = 0.0,
    backend: str = "auto",
    stats: CommunicationStats | None = None,
) -> Tensor:
    r"""Softmax cross-entropy of logits split by vocabulary across the ranks of ``group``.

    Every rank calls it with its own slice of the logits and the same ``target``; every rank gets
    the same loss, the single-process ``xentkit.torch.cross_entropy(full_logits, target, ...)``
    (= ``torch.nn.functional.cross_entropy`` plus xentkit's z-loss), and its slice of the full
    gradient. With lse = M + log S combined over ranks (module docstring) and V = Σ_r V_r:

        loss_i = (1 − ε)·w_y·(lse − z_y) + (ε/V)·Σ_c w_c·(lse − z_c) + λ·lse²

    Communication: one all-gather of a small int64 record per rank (validation, shard offsets),
    then an all-reduce MAX of N float64 and an all-reduce SUM of 3N (4N with label smoothing)
    float64: 32·N (40·N) bytes, independent of V. Backward communicates nothing: the forward pass
    stores the shard's gradient (N × V_r, what torch keeps for its softmax) and backward scales it.

    Args:
        logits_shard: ``[N, V_r]`` (or ``[..., V_r]``: class axis last, Megatron's ``[s, b, V/p]``)
            float tensor, the columns ``vocab_start .. vocab_start + V_r`` of the full logits.
            CPU float32/float64 run xentkit's Numba kernels, CUDA float32/float16/bfloat16 its
            Triton kernels, anything else torch ops (float16/bfloat16 computed in float32). Any
            rank's V_r may differ (uneven shards), even be 0.
        target: ``[N]`` (the logits' leading shape) integer class indices in ``[0, V)`` of the
            full vocabulary, or ``ignore_index``; the same on every rank (checked by a digest).
        group: the ``torch.distributed`` process group (default: the world). Without an
            initialized process group the call runs as a world of one.
        vocab_start: the first class of this rank's shard; None (on every rank) puts the shards in
            rank order, ``Σ_{q<r} V_q``, from the gathered widths. Given on every rank, the shards
            must tile ``[0, V)``.
        weight: None or the full ``[V]`` class-weight vector, the same on every rank (each rank
            uses its slice for the smoothing term and ``w_y`` of every target). Constant: no
            gradient flows to it.
        ignore_index, reduction, label_smoothing: as ``torch.nn.functional.cross_entropy``;
            "mean" divides by Σ w_y over non-ignored rows and gives 0 (not NaN) when that is 0.
        z_loss: λ ≥ 0, adds λ·lse² per non-ignored row ("mean": over their count).
        backend: the shard passes' implementation, the same on every rank: "auto" (CUDA tensors:
            the Triton kernels; CPU float32/float64: the Numba kernels; otherwise torch ops),
            "triton" (a ValueError on every rank, saying why, where Triton cannot run: CPU tensors
            only under its interpreter, ``TRITON_INTERPRET=1``) or "torch" (torch ops).
        stats: optional :class:`CommunicationStats` that counts this call's collectives.

    Returns:
        The loss in the logits' dtype: a scalar, or the target's shape for ``reduction="none"``
        (backward takes a per-row upstream gradient, which must be the same on every rank).
        First-order only: differentiating the gradient (``create_graph=True``) raises.

    Raises:
        ValueError: on every rank when any rank's input is invalid or the ranks disagree (shapes,
            labels outside ``[0, V)``, differing target/weight/options, shards that do not tile
            the vocabulary); the message names the rank(s). A rank whose own check raised a
            TypeError raises that type; the other ranks raise ValueError.

    Example (without a process group: a world of one, plain cross-entropy):
        >>> import torch
        >>> from xentkit.torch.distributed import vocab_parallel_cross_entropy
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], requires_grad=True)
        >>> loss = vocab_parallel_cross_entropy(logits, torch.tensor([0, 2]))
        >>> loss
        tensor(0.2056, grad_fn=<_VocabParallelCrossEntropyFunctionBackward>)

        On P ranks each passes its columns, e.g. ``logits[:, start:stop]`` with
        ``start, stop = vocab_shard_range(V, P, rank)``, and gets the same loss; ``loss.backward()``
        gives each rank ``logits.grad[:, start:stop]``.

    See also: :func:`vocab_parallel_linear_cross_entropy` (the logits never materialized),
    :func:`vocab_shard_range`.
    """
    device = logits_shard.device if isinstance(logits_shard, Tensor) else torch.device("cpu")
    communicator = _Communicator(group, device, stats)
    state: dict[str, object] = {}

    def local_checks() -> dict[str, int]:
        if not isinstance(logits_shard, Tensor):
            raise TypeError(f"logits_shard must be a tensor, got {type(logits_shard).__name__}")
        if not logits_shard.is_floating_point():  # a wrong type: TypeError, as the other losses
            raise TypeError(
                "logits_shard must be a floating tensor of shape (N, V_r) (class axis last), "
                f"got dtype {str(logits_shard.dtype).removeprefix('torch.')}"
            )
        if logits_shard.dim() == 0:
            raise ValueError(
                "logits_shard must be a floating tensor of shape (N, V_r) (class axis last), got a 0-d tensor"
            )
        _bridge.check_dense(logits_shard, "logits_shard")
        _check_device(logits_shard, "logits_shard")
        options = LossOptions(
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            z_loss=z_loss, backend=backend,
        )
        sample_shape = tuple(logits_shard.shape[:-1])
        labels = _check_target(target, sample_shape, "the logits' shape without the class axis", logits_shard)
        class_weight = _check_weight(weight)
        state.update(
            options=options, labels=labels, weight=class_weight, shards=shard_backend(logits_shard, options)
        )
        return _local_record(
            sample_shape=sample_shape, width=logits_shard.shape[-1], vocab_start=vocab_start,
            labels=labels, weight=class_weight, options=options, dtype=logits_shard.dtype,
        )

    agreement = _agree(communicator, _NAME, local_checks)
    plan = _plan(
        communicator, agreement, state["options"], state["labels"], state["weight"], device,  # type: ignore[arg-type]
        state["shards"],  # type: ignore[arg-type]
    )
    want_grad = torch.is_grad_enabled() and logits_shard.requires_grad
    return _VocabParallelCrossEntropyFunction.apply(logits_shard, plan, want_grad)
