"""One rank's shard of a vocabulary-parallel cross-entropy on the GPU: statistics, then gradient.

The Triton twin of :mod:`xentkit.kernels.vocab_parallel`, with its contract (the combining over
ranks and the formulas of loss and gradient: :mod:`xentkit.torch.distributed`). Rank r holds the
columns ``[start_r, start_r + V_r)`` of the logits; its ``[N, V_r]`` shard z (float32, float16 or
bfloat16; arithmetic in float32) is cut into chunks of ``BLOCK`` classes, one program per
(row, chunk) (the chunks, their partials and the merge of a row's chunks: :mod:`._chunks`).
Rows are labelled by their column in this shard: ``local_labels[i] ≥ 0`` is the target's column
here, ``-1`` a target on another rank, ``-2`` an ignored row.

    pass 1, ``_partials_kernel`` (one read of the shard), per chunk k of a row:
        m_k = max_j z_j  (NaN ignored: s_k carries it),  t_k = m_k (0 if m_k = −inf)
        s_k = K_k + r_k:  K_k = #{j: z_j = m_k},  r_k = Σ_{z_j < m_k} exp(z_j − t_k)
        (the max's terms counted apart, ``_chunks.split_sum``)
        S_k = Σ_j w_j·(z_j − t_k),  W_k = Σ_j w_j      (label smoothing only; S_k scaled by 2^-32)

    the row, ``_combine_kernel`` (one program per row, merging the row's few partials):
        m_r = max_k m_k,  t_r = m_r (0 if m_r = −inf)
        s_r = Σ_k s_k·exp(t_k − t_r)                    (a chunk with s_k = 0 adds exactly 0),
              kept as its excess e_r = s_r − 1 (``_chunks.merge_counted``), returned in float64:
              a confident row's e_r keeps its digits (summed in float32 with the max's term
              inside, those below 6e-8 were lost; 1 + e_r in float64, those below 1e-16)
        S'_r = Σ_k (S_k + W_k·(t_k − t_r)) = Σ_j w_j·(z_j − t_r)
        z_y = z_y when the row's label is a column of this shard, else 0 (not read)

    and the host function returns, in float64 as the Numba kernel does, (m_r, e_r, z_y, S'_r): the
    weighted sum stays relative to the shard's shift (the caller restates it at the row's max M
    with W_r·(t_r − M)), so that it keeps float32's relative precision in the spread z_j − t_r,
    not in the logits' offset (rows near +1e4 lose nothing to it). Each chunk's S_k is summed in
    float32 with its terms scaled by 2^-32 (exactly), the chunks' restated sums in float64, so
    that logits spanning ±3e38 do not overflow it (they had: a loss of inf where the true one is
    1.5e37, a review, 2026-12-07; the Numba kernel sums in float64).

    pass 2, ``_gradient_kernel`` (one read and one write of the shard), with per-row float64
    coefficients the caller computed from the rows' global statistics (M: the row's max over
    every rank, c, σ and the target entry as ``xentkit.torch.distributed._algebra``):
        grad_ij = c_i·exp(z_ij − M_i) − σ_i·w_j,   grad_{i,y} = target_grad_i (y in this shard)

Ignored rows are not read: statistics (−inf, −1, 0, 0) (an empty sum) and a zero gradient row. Pass 2 reads each
element before writing it, in the same program, and writes the target entry there too, so the
gradient may be written over the logits (in place). Special values as the Numba kernel: a NaN
makes the row's e_r (hence loss and gradient) NaN; a +inf logit gives e_r = NaN (exp(inf − inf));
a −inf logit is a masked class (exp = 0; with label smoothing S_z = −inf, the loss +inf).

Offsets grow with the rows in int64, as :mod:`._chunks` says (logits past 2^31 elements,
``tests/test_triton_int64.py``).

No validation: the caller passes a contiguous shard, ``local_labels`` ``[N]`` int64 and float64
``[V_r]`` class weights (read as float32) or None. A label outside ``[0, V_r)`` is not read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _chunks

__all__ = ["shard_softmax_grad", "shard_softmax_stats"]

# Classes per program at most, read on every call: tests and benchmarks lower it for this module.
MAX_BLOCK = _chunks.MAX_BLOCK

# S_k's terms are summed scaled by 2^-SUM_Z_EXPONENT: 8192 terms of a span up to 2·3.4e38, times a
# class weight, stay finite in float32 (only terms below about 2^-94 lose digits to subnormals, an
# absolute 2^-117 each at most, nothing beside the loss's other terms)
SUM_Z_EXPONENT = 32
SUM_Z_SCALE: tl.constexpr = tl.constexpr(2.0**-SUM_Z_EXPONENT)
SUM_Z_UNSCALE: tl.constexpr = tl.constexpr(2.0**SUM_Z_EXPONENT)

# ``local_labels``: −1 marks a target on another rank, −2 an ignored row (as
# xentkit.kernels.vocab_parallel); the kernels test for −2 only.


@triton.jit
def _partials_kernel(
    logits_ptr,
    logits_stride,
    labels_ptr,
    weight_ptr,
    part_ptr,
    part_plane,
    n_cols,
    n_chunks,
    HAS_WEIGHT: tl.constexpr,
    SUM_Z: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, cols, inside = _chunks.columns(n_cols, BLOCK)
    if tl.load(labels_ptr + row) == -2:
        return  # an ignored row: the combine writes its statistics without reading the partials
    x = tl.load(logits_ptr + row * logits_stride + cols, mask=inside, other=0.0).to(tl.float32)
    z = tl.where(inside, x, float("-inf"))
    # ---- 1. m_k = max z_j (NaN ignored), t_k = m_k (0 if −inf: never exp(−inf − (−inf))),
    #         s_k = Σ exp(z_j − t_k) ----
    m = tl.max(tl.where(z == z, z, float("-inf")), 0)
    t = _chunks.shift(m, False)
    rest, count = _chunks.split_sum(z, m, tl.exp(z - t))  # the max's terms counted apart
    slot, plane = _chunks.slot(part_ptr, part_plane, row, n_chunks)
    tl.store(slot, m)
    tl.store(slot + plane, rest)
    tl.store(slot + 2 * plane, count)
    if SUM_Z:
        # ---- 2. S_k = Σ w_j·(z_j − t_k) and W_k = Σ w_j (lanes past the row add 0) ----
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        else:
            w = tl.where(inside, 1.0, 0.0)
        # a class of weight 0 adds 0, even masked (−inf: 0·log 0 = 0, as the reference); each
        # term scaled by 2^-SUM_Z_EXPONENT (exactly: a power of 2), so that neither z − t nor the
        # chunk's sum overflows float32 where the logits span ±3e38 (the combine scales back in
        # float64)
        scaled = z * SUM_Z_SCALE - t * SUM_Z_SCALE
        tl.store(slot + 3 * plane, tl.sum(w * tl.where(inside & (w != 0.0), scaled, 0.0), 0))
        tl.store(slot + 4 * plane, tl.sum(w, 0))


@triton.jit
def _combine_kernel(
    logits_ptr,
    logits_stride,
    labels_ptr,
    part_ptr,
    part_plane,
    max_ptr,
    excess_ptr,
    target_ptr,
    shifted_sum_z_ptr,
    n_cols,
    n_chunks,
    SUM_Z: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    """One program per row: the row's partials merged into (m_r, e_r, S'_r), and z_y."""
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: see the module docstring
    slots, mine, plane = _chunks.row_slots(part_ptr, part_plane, row, n_chunks, CHUNKS)
    y = tl.load(labels_ptr + row)
    if y == -2:
        tl.store(max_ptr + row, float("-inf"))
        tl.store(excess_ptr + row, -1.0)
        tl.store(target_ptr + row, 0.0)
        tl.store(shifted_sum_z_ptr + row, 0.0)
        return
    # ---- 3. m_r = max m_k, t_r = m_r (0 if −inf), e_r = s_r − 1 kept apart from the max's
    #         terms (a confident row's e_r keeps its digits), stored in float64 ----
    m, t, e, t_k, _, _ = _chunks.merge_counted(slots, mine, plane, 1.0, False, False)
    tl.store(max_ptr + row, m)
    tl.store(excess_ptr + row, e.to(tl.float64))
    # ---- 4. S'_r = Σ_k (S_k + W_k·(t_k − t_r)), restated at the row's shift, in float64 (the
    #         chunks' S_k scaled back: a span of ±3e38 overflowed float32) ----
    if SUM_Z:
        sum_k = tl.load(slots + 3 * plane, mask=mine, other=0.0).to(tl.float64) * SUM_Z_UNSCALE
        weight_k = tl.load(slots + 4 * plane, mask=mine, other=0.0).to(tl.float64)
        restated = sum_k + tl.where(weight_k == 0.0, 0.0, weight_k * (t_k.to(tl.float64) - t.to(tl.float64)))
        tl.store(shifted_sum_z_ptr + row, tl.sum(tl.where(mine, restated, 0.0), 0))
    else:
        tl.store(shifted_sum_z_ptr + row, 0.0)
    # ---- 5. z_y, read only when the label is one of this shard's columns ----
    here = (y >= 0) & (y < n_cols)
    z_y = tl.load(logits_ptr + row * logits_stride + tl.where(here, y, 0), mask=here, other=0.0)
    tl.store(target_ptr + row, tl.where(here, z_y.to(tl.float32), 0.0))


@triton.jit
def _gradient_kernel(
    logits_ptr,
    logits_stride,
    labels_ptr,
    shift_ptr,
    coef_ptr,
    smooth_ptr,
    target_grad_ptr,
    weight_ptr,
    grad_ptr,
    grad_stride,
    n_cols,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per (row, chunk): the chunk's gradient from the row's coefficients."""
    row, cols, inside = _chunks.columns(n_cols, BLOCK)
    grad_row = grad_ptr + row * grad_stride
    y = tl.load(labels_ptr + row)
    if y == -2:
        tl.store(grad_row + cols, tl.zeros([BLOCK], tl.float32), mask=inside)
        return
    shift = tl.load(shift_ptr + row).to(tl.float32)  # a max of the logits: exact in float32
    coef = tl.load(coef_ptr + row).to(tl.float32)
    x = tl.load(logits_ptr + row * logits_stride + cols, mask=inside, other=0.0).to(tl.float32)
    # ---- Pass 2: grad_ij = c_i·exp(z_ij − M_i) − σ_i·w_j ----
    grad = coef * tl.exp(x - shift)
    if HAS_SMOOTH:
        sigma = tl.load(smooth_ptr + row).to(tl.float32)
        if HAS_WEIGHT:
            grad -= sigma * tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        else:
            grad -= sigma
    # the target entry (the caller's float64 value; y < 0 matches no column)
    grad = tl.where(cols == y, tl.load(target_grad_ptr + row).to(tl.float32), grad)
    tl.store(grad_row + cols, grad, mask=inside)


@_chunks.on_tensor_device
def shard_softmax_stats(
    logits: Tensor, local_labels: Tensor, weight: Tensor | None, want_sum_z: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pass 1 over a contiguous ``[N, V_r]`` float32/float16/bfloat16 shard (one read, two
    launches).

    ``local_labels`` ``[N]`` int64 (column here, ``-1`` elsewhere, ``-2`` ignored); ``weight`` this
    shard's ``[V_r]`` float64 class weights or None; ``want_sum_z`` computes ``S'_r`` (only label
    smoothing needs it). Returns four ``[N]`` float64 tensors on the logits' device,
    ``(m_r, e_r = s_r − 1, z_y or 0, S'_r = Σ_j w_j·(z_j − t_r) or 0)`` as the module docstring;
    ignored rows give ``(−inf, −1, 0, 0)``.
    """
    n_rows, n_cols = logits.shape
    device = logits.device
    if n_rows == 0 or n_cols == 0:  # nothing to read: every row (−inf, −1, 0, 0), an empty sum
        zeros = torch.zeros(n_rows, dtype=torch.float64, device=device)
        return torch.full_like(zeros, -torch.inf), zeros - 1.0, zeros.clone(), zeros.clone()
    layout = _chunks.Layout.of(n_rows, n_cols, MAX_BLOCK)
    part = layout.partials(5 if want_sum_z else 3, device)
    row_max, target = (torch.empty(n_rows, dtype=torch.float32, device=device) for _ in range(2))
    row_excess, shifted = (torch.empty(n_rows, dtype=torch.float64, device=device) for _ in range(2))
    has_weight = weight is not None
    any_weight = weight if has_weight else part  # never read without HAS_WEIGHT
    _partials_kernel[layout.grid](
        logits, logits.stride(0), local_labels, any_weight, part, layout.plane, n_cols,
        layout.chunks, HAS_WEIGHT=has_weight, SUM_Z=bool(want_sum_z), **layout.per_chunk,
    )
    _combine_kernel[(n_rows,)](
        logits, logits.stride(0), local_labels, part, layout.plane, row_max, row_excess, target,
        shifted, n_cols, layout.chunks, SUM_Z=bool(want_sum_z), **layout.per_row,
    )
    row_max64 = row_max.to(torch.float64)
    # S'_r = Σ w_j·(z_j − t_r), relative to the shard's shift, as the Numba shards return it (the
    # caller restates it at the row's max; t_r = 0 for rows with no finite logit, ignored rows)
    sum_z = shifted if want_sum_z else torch.zeros(n_rows, dtype=torch.float64, device=device)
    return row_max64, row_excess, target.to(torch.float64), sum_z


@_chunks.on_tensor_device
def shard_softmax_grad(
    logits: Tensor,
    local_labels: Tensor,
    shift: Tensor,
    coef: Tensor,
    smooth: Tensor | None,
    target_grad: Tensor,
    weight: Tensor | None,
    out: Tensor,
) -> Tensor:
    """Pass 2 (one read and one write, one launch): ``out[i, j] = coef_i·exp(z_ij − shift_i) −
    smooth_i·w_j``, then ``out[i, y_i] = target_grad_i`` for rows whose label is in this shard;
    ignored rows get 0.

    ``logits`` and ``out`` are contiguous ``[N, V_r]`` on one device, ``out`` of the logits'
    dtype or float32 (a float16 shard's gradient kept until a loss scale reaches it); ``out``
    may be ``logits`` itself (in place). ``shift``, ``coef``, ``target_grad`` and ``smooth``
    (None: no smoothing term) are ``[N]`` float tensors (float64 from the caller, read as
    float32), ``weight`` ``[V_r]`` or None (all ones). Returns ``out``.
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0 or n_cols == 0:
        return out
    layout = _chunks.Layout.of(n_rows, n_cols, MAX_BLOCK)
    has_weight = weight is not None
    has_smooth = smooth is not None
    coef = coef.contiguous()
    _gradient_kernel[layout.grid](
        logits, logits.stride(0), local_labels, shift.contiguous(), coef,
        smooth.contiguous() if has_smooth else coef, target_grad.contiguous(),
        weight if has_weight else coef, out, out.stride(0), n_cols,
        HAS_WEIGHT=has_weight, HAS_SMOOTH=has_smooth, **layout.per_chunk,
    )
    return out
