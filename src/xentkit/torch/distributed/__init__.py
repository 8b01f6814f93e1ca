"""Cross-entropy over a vocabulary split across tensor-parallel ranks, without gathering logits.

When the output layer is split by vocabulary (Megatron-LM's column-parallel output layer and its
``vocab_parallel_cross_entropy``), rank r holds the columns ``[start_r, start_r + V_r)`` of the
logits z (N × V). Softmax cross-entropy needs only four numbers per row from the whole row, and
each is a max or a sum of per-shard pieces (see :mod:`xentkit.kernels.vocab_parallel`)::

    M   = max_r m_r                          m_r = max over shard r          all-reduce MAX  (N)
    S   = Σ_r s_r·exp(t_r − M)               s_r = Σ_shard exp(z_j − t_r)     ┐
    z_y = Σ_r [y in shard r]·z_y                                              ├ all-reduce SUM
    S_z = Σ_r Σ_shard w_j·(z_j − M)          (label smoothing only)           ┘ (3N or 4N)
    lse = M + log S

with S summed as its excess E = S − 1 (each shard's max terms, exactly 1, counted apart and the
shards holding M counted in the all-reduce; log S = log1p(E) keeps a confident row's digits),
and S_z summed from each shard's Σ w_j·(z_j − t_r) restated at M with its Σ w_j·(t_r − M) (small
terms where the logits are huge: W·lse − Σ w_j·z_j of a row filled with −3e38 cancelled to
garbage), so a step communicates O(N) float64s (32·N or 40·N bytes per rank), never O(N·V). Then, on every
rank, with class weights w (ones by default), W = Σ_c w_c, smoothing ε, z-loss λ:

    loss_i = (1 − ε)·w_y·(lse − z_y) + (ε/V)·(W·log S − S_z) + λ·lse²        (0 for ignored rows)

and rank r computes its own columns of the gradient locally, p_j = exp(z_j − lse):

    ∂loss_i/∂z_j = g_i·(p_j·((1 − ε)·w_y + ε·W/V) − (1 − ε)·w_y·[j = y] − ε·w_j/V) + g^z_i·2·λ·lse·p_j

with g_i, g^z_i the reduction's coefficients ("mean": 1/Σ w_y over non-ignored rows and 1/(number
of non-ignored rows); "sum" and "none": 1). The loss equals, on every rank, the single-process
``xentkit.torch.cross_entropy`` / ``torch.nn.functional.cross_entropy`` (plus xentkit's z-loss) of
the full logits, and each rank's gradient is its slice of the full gradient.

Before any other collective every call validates its input locally and all-gathers one small
int64 record per rank (error flag, row count, shard width and start, label range, digests of
target and class weights, the options): bad input on any rank raises a ``ValueError`` on every
rank naming the rank and the problem, instead of leaving the others waiting in a collective. The
same record gives the shard offsets when ``vocab_start`` is None (rank order).

The fused form :func:`vocab_parallel_linear_cross_entropy` computes the logits chunk by chunk
from the rank's rows of the output weight and all-reduces each chunk's statistics; its input is
replicated, so its gradient ``∂loss/∂x = Σ_r dz_r·W_r`` is all-reduced (SUM, N·D floats), the
standard tensor-parallel cost of a column-parallel layer's backward.

:func:`vocab_parallel_linear_log_probs` gives per-token log p(y), entropy and lse (what PPO /
GRPO need) from the same shard layout, with the same agreement first: per chunk an all-reduce MAX
of each row's shard max and a SUM of (Σ exp, Σ exp·z restated at that max, z_y, whether the
shard holds the max: the max's terms counted apart), 40·N bytes per call; backward recomputes the local logits and all-reduces the input gradient.

Every function is the same on any ``torch.distributed`` group (gloo on CPU, NCCL on GPU) and
with no process group at all (a single process holding the whole vocabulary).

The package, by job: ``_communication`` (the counted collectives, :func:`vocab_shard_range`),
``_agreement`` (local checks, the gathered record, the checks across ranks), ``_rows`` (the row
plan every rank derives from the targets and options), ``_shards`` (the two passes over a shard:
Numba kernels, Triton kernels or torch ops), ``_algebra`` (combining the shards, row losses, gradient
coefficients), ``_logits``, ``_linear`` and ``_log_probs`` (the autograd Functions and the public
functions). Options are checked by :class:`xentkit._options.LossOptions` (``LogProbOptions`` for
the log-probabilities), labels worded by
:mod:`xentkit._labels`, reductions planned by :class:`xentkit.reference.reductions.ReductionPlan`
and the backward guarded by :mod:`xentkit.torch._bridge`, as in the rest of xentkit.
"""

from __future__ import annotations

from ._agreement import _FIELDS as _FIELDS
from ._communication import CommunicationStats, vocab_shard_range
from ._linear import vocab_parallel_linear_cross_entropy
from ._log_probs import vocab_parallel_linear_log_probs
from ._logits import vocab_parallel_cross_entropy

__all__ = [
    "CommunicationStats",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_log_probs",
    "vocab_shard_range",
]

# The settings below are read from this module at call time, so setting them here takes effect.

# Set to False to run the shard passes on torch ops even where the Numba or Triton kernels apply
# (tests use it to check the torch-ops path, which CPU float16/bfloat16 tensors always take).
USE_KERNELS = True

# Temporaries of the torch-ops path: a chunk of rows takes at most this many bytes per buffer.
TORCH_CHUNK_BYTES = 8 * 2**20

# Chunk sizing of the linear forms (xentkit.torch._chunks.chunk_rows with this budget, on every
# device): a chunk's logits take at most 1/16 of the shard's logits and at most the budget, but at
# least the floor.
CHUNK_FRACTION = 16
CHUNK_BUDGET_BYTES = 16 * 2**20
CHUNK_FLOOR_BYTES = 2 * 2**20

# The public functions live in submodules, where doctest.testmod(this package) does not look;
# their examples are this package's doctests too.
__test__ = {
    "vocab_parallel_cross_entropy": vocab_parallel_cross_entropy,
    "vocab_parallel_linear_log_probs": vocab_parallel_linear_log_probs,
    "vocab_shard_range": vocab_shard_range,
}
