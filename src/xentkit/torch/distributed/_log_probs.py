"""The vocabulary-parallel token log-probabilities: :func:`vocab_parallel_linear_log_probs` and its
autograd Function.

Rank r holds the rows ``[start_r, start_r + V_r)`` of the output weight. With z = (x Wᵀ + b)/T,
one pass over this rank's columns of a row (the row backends of ``xentkit.torch._log_prob_rows``,
formulas in :mod:`xentkit.reference.log_probs`) gives

    m_r = max_{j in shard} z_j,   s_r = Σ_j exp(z_j − m_r),   u_r = Σ_j exp(z_j − m_r)·(z_j − m_r)
    z_y,r = z_y on the rank whose shard holds y, 0 elsewhere (a label outside the shard is not read)

with s_r kept as its excess e_r = s_r − 1 (the max's own terms counted apart), and the row's
statistics are a max and sums of these (``reference.log_probs.merge_partials``)::

    M   = max_r m_r                                          all-reduce MAX   r float64 per chunk
    K   = #{r: m_r = M}                                      ┐
    E   = (K − 1) + Σ_{m_r = M} e_r + Σ_{m_r < M} s_r·exp(m_r − M)     │
    U   = Σ_r exp(m_r − M)·(u_r + s_r·(m_r − M))             ├ all-reduce SUM 4r float64 per chunk
    z_y = Σ_r z_y,r                                          ┘

from which every rank computes the same log p(y) = (z_y − M) − log1p(E), H = log1p(E) − U/(1 + E)
and lse = M + log1p(E) (``reference.log_probs.row_statistics``; E = S − 1 summed without the
max's terms, so that a confident token's log p keeps its digits). Backward recomputes each
chunk's local logits and writes this rank's columns of ∂/∂z with the row's (M, E), so that
p_j = exp(z_j − M)/(1 + E) is the full softmax; ∂/∂W_r and ∂/∂b_r stay local,
∂/∂x = Σ_r dz_r·W_r is all-reduced (SUM, N·D).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, overload

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx

from ..._options import Integer, LogProbOptions, Real, check_flag, select_outputs
from ...reference.log_probs import merge_partials, row_statistics
from .. import _bridge
from .._chunks import (
    add_chunk_gradients,
    finish_gradients,
    gradient_buffers,
    idle_chunks,
    logit_chunks,
)
from .._log_prob_rows import TorchRows
from ..log_probs import _coefficients, _rows_backend
from ._agreement import (
    _agree,
    _Agreement,
    _check_linear_shards,
    _check_target,
    _has_graph,
    _local_record,
)
from ._communication import CommunicationStats, _Communicator
from ._rows import _chunk_rows
from ._shards import _new_buffer

_NAME = "vocab_parallel_linear_log_probs"


@dataclasses.dataclass(frozen=True)
class _LogProbPlan:
    """What every pass of one call needs besides the tensors (identical on every rank except
    ``labels`` and ``rows``)."""

    communicator: _Communicator
    agreement: _Agreement
    options: LogProbOptions
    rows: type  # the row backend: NumbaRows, TritonRows or TorchRows
    valid: Tensor  # (N,) bool: not ignored
    labels: Tensor  # (N,) int64: target − start_r (outside [0, V_r): another shard's), −1 if ignored
    chunk_rows: int
    idle: tuple[bool, ...]  # per chunk: no valid row, so no matmul and no collective on any rank

    def chunk(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        return self.labels[start:stop], self.valid[start:stop]


def _matrices(input: Tensor, weight: Tensor, bias: Tensor | None, rows: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """``[N, D]`` input, ``[V_r, D]`` weight and ``[V_r]`` bias, detached and contiguous."""
    x = input.detach().reshape(rows, input.shape[-1]).contiguous()
    w = weight.detach().contiguous()
    return x, w, None if bias is None else bias.detach().contiguous()


def _shard_statistics(logits: Tensor, plan: _LogProbPlan, start: int, stop: int) -> tuple[Tensor, ...]:
    """This rank's (m_r, e_r, u_r, z_y,r) of rows ``start:stop``, float64 (e_r = s_r − 1). A shard
    row with no finite class (an empty shard, or −inf only) has s_r = 0 (e_r = −1) and m_r = −inf,
    so that it never raises the row's max M."""
    labels, valid = plan.chunk(start, stop)
    if logits.shape[1] == 0:  # an empty shard: nothing to read (the torch ops would index column 0)
        n = stop - start
        zeros = torch.zeros(n, dtype=torch.float64, device=logits.device)
        return torch.full_like(zeros, -math.inf), zeros - 1, zeros, zeros
    pieces = plan.rows.statistics(logits, labels, valid, plan.options.temperature)
    m, e, u, z_target = (piece.to(torch.float64) for piece in pieces)
    return torch.where(e == -1, -math.inf, m), e, u, z_target


def _statistics(x: Tensor, w: Tensor, b: Tensor | None, plan: _LogProbPlan) -> tuple[Tensor, ...]:
    """The rows' (M, E, U, z_y) over every rank, float64 ``[N]`` (E = S − 1); ignored rows' are
    never read.

    Per chunk of rows: ``logits = x_chunk W_rᵀ (+ b_r)`` into one reused buffer, the shard's
    statistics, an all-reduce MAX of m_r, each rank's (e_r, u_r) restated at M, an all-reduce SUM
    of (whether the rank holds M, e, u, z_y): E = (the ranks holding M − 1) + Σ e.
    """
    n = x.shape[0]
    device = x.device
    m, e, u, z_target = (torch.zeros(n, dtype=torch.float64, device=device) for _ in range(4))
    buffer = _new_buffer((min(plan.chunk_rows, n), w.shape[0]), x)
    communicator = plan.communicator
    for start, stop, _, logits in logit_chunks(x, w, b, buffer, plan.chunk_rows, skip=plan.idle):
        m_r, e_r, u_r, z_r = _shard_statistics(logits, plan, start, stop)
        m_total = communicator.all_reduce(m_r.clone(), dist.ReduceOp.MAX)
        top, e_part, u_part = merge_partials(m_r, e_r, u_r, m_total)
        sums = communicator.all_reduce(torch.stack([top, e_part, u_part, z_r]), dist.ReduceOp.SUM)
        m[start:stop] = m_total
        tops, e_sum, u[start:stop], z_target[start:stop] = sums.unbind()
        e[start:stop] = (tops - 1) + e_sum
    return m, e, u, z_target


class _VocabParallelLinearLogProbsFunction(torch.autograd.Function):
    """forward: the chunked statistics (module docstring), four numbers per row kept.
    backward: per chunk the local logits again, their gradient in place, the local weight and
    bias gradients and this rank's part of the input gradient, all-reduced at the end."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, input: Tensor, linear_weight_shard: Tensor, linear_bias_shard: Tensor | None,
        plan: _LogProbPlan,
    ) -> tuple[Tensor, Tensor, Tensor]:
        _bridge.first_order_anchors(ctx, input, linear_weight_shard, linear_bias_shard)
        x, w, b = _matrices(input, linear_weight_shard, linear_bias_shard, plan.valid.shape[0])
        m, e, u, z_target = _statistics(x, w, b, plan)
        log_p, entropy, lse, log_s = row_statistics(m, e, u, z_target, plan.valid)
        ctx.plan = plan
        ctx.m, ctx.e, ctx.log_s, ctx.entropy = m, e, log_s, entropy
        ctx.save_for_backward(input, linear_weight_shard, linear_bias_shard)
        return _bridge.own_outputs((log_p, entropy, lse), _bridge.at_least_float32(x.dtype), input.shape[:-1])

    @staticmethod
    @_bridge.first_order_only(_NAME, _bridge.LOG_PROBS_DOUBLE_BACKWARD)
    def backward(ctx: FunctionCtx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        if _bridge.batched_backward(*grads):
            _bridge.refuse_batched_backward(
                f"xentkit.torch.distributed.{_NAME}",
                "its input gradient is all-reduced over the ranks, which a batch of upstream gradients cannot be",
                "call torch.autograd.grad once per upstream gradient (a loop)",
            )
        plan: _LogProbPlan = ctx.plan
        input, linear_weight_shard, linear_bias_shard = ctx.saved_tensors
        _, want_w, want_b = ctx.needs_input_grad[:3]
        x, w, b = _matrices(input, linear_weight_shard, linear_bias_shard, plan.valid.shape[0])
        n = x.shape[0]
        # the input gradient is summed over ranks: computed wherever any rank wants it
        buffers = gradient_buffers(
            x, w, b, (plan.agreement.wants_input_grad, want_w, want_b), zero_input=True, new_buffer=_new_buffer
        )
        if w.shape[0] and any(buffer is not None for buffer in buffers):
            coefficients = _coefficients(ctx, grads)
            # the (M, E) the row backend takes: as xentkit.torch.linear_log_probs keeps them
            dtype = plan.rows.statistics_dtype(x.dtype, x.device)
            m, e = ctx.m.to(dtype), ctx.e.to(dtype)
            buffer = _new_buffer((min(plan.chunk_rows, n), w.shape[0]), x)
            for start, stop, x_chunk, logits in logit_chunks(x, w, b, buffer, plan.chunk_rows, skip=plan.idle):
                labels, valid = plan.chunk(start, stop)
                part = tuple(c.expand(n)[start:stop] if c.dim() == 0 else c[start:stop] for c in coefficients)
                dz = plan.rows.gradient(
                    logits, labels, valid, plan.options.temperature, m[start:stop], e[start:stop], part, logits,
                )
                add_chunk_gradients(dz, x_chunk, w, buffers, start, stop)
        grad_x, grad_w, grad_b = finish_gradients(buffers, w, b)
        if grad_x is not None:
            plan.communicator.all_reduce(grad_x, dist.ReduceOp.SUM)
            grad_x = grad_x.view(input.shape) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, grad_b, None


# The result's type follows the return_* flags (a type checker picks the overload from literals).
@overload
def vocab_parallel_linear_log_probs(
    input: Tensor, linear_weight_shard: Tensor, target: Tensor, *, linear_bias_shard: Tensor | None = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[False] = ..., return_lse: Literal[False] = ..., chunk_size: int | None = ..., group: object = ..., vocab_start: int | None = ..., backend: str = ..., stats: CommunicationStats | None = ...,
) -> Tensor: ...
@overload
def vocab_parallel_linear_log_probs(
    input: Tensor, linear_weight_shard: Tensor, target: Tensor, *, linear_bias_shard: Tensor | None = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[True], return_lse: Literal[False] = ..., chunk_size: int | None = ..., group: object = ..., vocab_start: int | None = ..., backend: str = ..., stats: CommunicationStats | None = ...,
) -> tuple[Tensor, Tensor]: ...
@overload
def vocab_parallel_linear_log_probs(
    input: Tensor, linear_weight_shard: Tensor, target: Tensor, *, linear_bias_shard: Tensor | None = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[False] = ..., return_lse: Literal[True], chunk_size: int | None = ..., group: object = ..., vocab_start: int | None = ..., backend: str = ..., stats: CommunicationStats | None = ...,
) -> tuple[Tensor, Tensor]: ...
@overload
def vocab_parallel_linear_log_probs(
    input: Tensor, linear_weight_shard: Tensor, target: Tensor, *, linear_bias_shard: Tensor | None = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[True], return_lse: Literal[True], chunk_size: int | None = ..., group: object = ..., vocab_start: int | None = ..., backend: str = ..., stats: CommunicationStats | None = ...,
) -> tuple[Tensor, Tensor, Tensor]: ...
@overload
def vocab_parallel_linear_log_probs(
    input: Tensor, linear_weight_shard: Tensor, target: Tensor, *, linear_bias_shard: Tensor | None = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: bool = ..., return_lse: bool = ..., chunk_size: int | None = ..., group: object = ..., vocab_start: int | None = ..., backend: str = ..., stats: CommunicationStats | None = ...,
) -> Tensor | tuple[Tensor, ...]: ...


# Not traced by torch.compile (a graph break: it runs eagerly): its label checks and collectives
# need the tensors' values, and the compiler's functionalization is a torch.func transform.
@_bridge.eager_only
def vocab_parallel_linear_log_probs(
    input: Tensor,
    linear_weight_shard: Tensor,
    target: Tensor,
    *,
    linear_bias_shard: Tensor | None = None,
    temperature: Real = 1.0,
    ignore_index: Integer = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
    chunk_size: int | None = None,
    group: object = None,
    vocab_start: int | None = None,
    backend: str = "auto",
    stats: CommunicationStats | None = None,
) -> Tensor | tuple[Tensor, ...]:
    r"""Per-token log-probabilities (and entropies, log-sum-exps) of ``input @ W.T + b`` at
    temperature T, with W's rows (the vocabulary) split across ranks, never materializing the
    logits, not even this rank's ``[N, V_r]`` slice.

    The values and gradients of the single-process :func:`xentkit.torch.linear_log_probs` on the
    full weight: with z = (x Wᵀ + b)/T, lse = log Σ_c exp z_c and p = softmax(z),
    log p(y) = z_y − lse (≤ 0) and H = lse − Σ_c p_c·z_c (≥ 0), the same on every rank. Rows are
    processed ``chunk_size`` at a time (default as :func:`vocab_parallel_linear_cross_entropy`);
    per chunk: local logits, one pass for this shard's (max, Σ exp, Σ exp·z, z_y), an all-reduce
    MAX of ``r`` and SUM of ``4r`` float64 (40·N bytes per call, whatever V). Backward recomputes
    each chunk's local logits, writes their gradient in place from the rows' statistics and the
    upstream gradients, then ``∂/∂W_r = dzᵀ·x`` and ``∂/∂b_r = Σ_rows dz`` stay local and
    ``∂/∂x = Σ_r dz_r·W_r`` is all-reduced (SUM, N·D floats: ``input`` is replicated). Every rank
    must call backward, with the same upstream gradients.

    Args:
        input: ``[N, D]`` (or ``[..., D]``) float tensor, the same on every rank.
        linear_weight_shard: ``[V_r, D]``, this rank's rows of the output weight (classes
            ``vocab_start .. vocab_start + V_r``), the input's dtype and device; V_r may differ
            between ranks, even be 0.
        target: ``[N]`` (input's leading shape) integer labels in ``[0, V)`` of the full
            vocabulary, or ``ignore_index``; the same on every rank (checked by a digest).
        linear_bias_shard: None or ``[V_r]``, this rank's slice of the output bias.
        temperature: T > 0, the same on every rank: the distribution is softmax(z / T).
        ignore_index: the label of positions to skip: log-prob, entropy and lse 0, no gradient.
        return_entropy, return_lse: also return H and lse, in that order after the log-probs.
        chunk_size: rows per chunk (the same on every rank), or None for the default.
        group, vocab_start, stats: as :func:`vocab_parallel_cross_entropy`.
        backend: "auto" (CPU float32/float64: xentkit's Numba kernels; CUDA: xentkit's Triton
            kernels; otherwise torch ops, in float32 for float16/bfloat16), "triton" (CUDA, or
            CPU tensors under Triton's interpreter; otherwise a ValueError) or "torch".

    Returns:
        ``log_probs``, or ``(log_probs, entropy)``, ``(log_probs, lse)``,
        ``(log_probs, entropy, lse)``: each of the target's shape, float32 (float64 for float64
        input), differentiable with respect to input, the weight shard and the bias shard with any
        upstream gradients. First-order only: differentiating the gradients raises.

    Raises:
        ValueError: on every rank when any rank's input is invalid or the ranks disagree (shapes,
            labels outside ``[0, V)``, differing target, temperature, ignore_index or chunk_size,
            shards that do not tile the vocabulary); the message names the rank(s). A rank whose
            own check raised a TypeError raises that type; the other ranks raise ValueError.

    Example (without a process group: a world of one, :func:`xentkit.torch.linear_log_probs`):
        >>> import torch
        >>> from xentkit.torch.distributed import vocab_parallel_linear_log_probs
        >>> x = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
        >>> W = torch.tensor([[0.5, -0.5], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
        >>> lp, h = vocab_parallel_linear_log_probs(x, W, torch.tensor([2, 0]), temperature=0.5,
        ...                                         return_entropy=True)
        >>> lp.detach(), h.detach()
        (tensor([-0.1328, -0.4927]), tensor([0.3993, 0.7426]))

        On P ranks each passes its rows, ``W[start:stop]`` with
        ``start, stop = vocab_shard_range(V, P, rank)``, and gets the same numbers.

    See also: :func:`vocab_parallel_linear_cross_entropy`, :func:`xentkit.torch.linear_log_probs`.
    """
    input, linear_weight_shard, linear_bias_shard = _bridge.autocast_operands(
        input, linear_weight_shard, linear_bias_shard
    )
    device = input.device if isinstance(input, Tensor) else torch.device("cpu")
    communicator = _Communicator(group, device, stats)
    state: dict[str, object] = {}
    grad_enabled = torch.is_grad_enabled()

    def local_checks() -> dict[str, int]:
        features, width = _check_linear_shards(input, linear_weight_shard, linear_bias_shard, saves_operands=True)
        options = LogProbOptions(temperature, ignore_index, chunk_size, backend)
        _bridge.check_temperature_fits(options, input.dtype)
        state.update(
            options=options,
            flags=(check_flag(return_entropy, "return_entropy"), check_flag(return_lse, "return_lse")),
            labels=_check_target(
                target, tuple(input.shape[:-1]), "the input's shape without in_features", input,
                linear_weight_shard, linear_bias_shard,
            ),
            rows=_rows_backend(input, options, linear_weight_shard, linear_bias_shard, name="input"),
        )
        labels: np.ndarray = state["labels"]  # type: ignore[assignment]
        return _local_record(
            sample_shape=tuple(input.shape[:-1]), width=width, vocab_start=vocab_start, labels=labels, weight=None,
            options=options, dtype=input.dtype, features=features,
            wants_input_grad=grad_enabled and input.requires_grad,
            backward_graph=_has_graph(grad_enabled, input, linear_weight_shard, linear_bias_shard),
        )

    agreement = _agree(communicator, _NAME, local_checks)
    plan = _plan(communicator, agreement, state, device, input.element_size())
    results = _VocabParallelLinearLogProbsFunction.apply(input, linear_weight_shard, linear_bias_shard, plan)
    return select_outputs(results, *state["flags"])  # type: ignore[misc]


def _plan(
    communicator: _Communicator, agreement: _Agreement, state: dict[str, object], device: torch.device,
    item_bytes: int,
) -> _LogProbPlan:
    """The call's plan from the agreed record and this rank's checked arguments (``item_bytes``:
    of the input's dtype, the chunks' buffers')."""
    from . import USE_KERNELS  # the package's switch, read at call time (tests turn it off)

    options: LogProbOptions = state["options"]  # type: ignore[assignment]
    labels: np.ndarray = state["labels"]  # type: ignore[assignment]
    n = labels.shape[0]
    valid = labels != options.ignore_index
    # valid labels lie in [0, V) (agreed), so target − start cannot overflow
    local = np.where(valid, labels, agreement.start - 1) - agreement.start
    chunk_rows = _chunk_rows(n, max(agreement.widths), options.chunk_size, item_bytes)
    return _LogProbPlan(
        communicator=communicator,
        agreement=agreement,
        options=options,
        rows=state["rows"] if USE_KERNELS else TorchRows,  # type: ignore[arg-type]
        valid=torch.from_numpy(valid).to(device),
        labels=torch.from_numpy(local).to(device),
        chunk_rows=chunk_rows,
        idle=idle_chunks(valid, chunk_rows),
    )
