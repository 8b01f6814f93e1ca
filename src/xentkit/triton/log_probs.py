"""Token log-probabilities and entropies on the GPU: per-row statistics, then the gradient.

The Triton twin of :mod:`xentkit.kernels.log_probs`, with its contract (formulas:
:mod:`xentkit.reference.log_probs`). The ``[N, V]`` logits x (float32, float16 or bfloat16;
arithmetic in float32, each row's merge in float64) are cut into chunks of ``BLOCK`` classes, one
program per (row, chunk) (the chunks, their partials and the merge of a row's chunks:
:mod:`._chunks`). With c = 1/T, z_j = x_j·c, and every exponent shifted before it is scaled,
d_j = (x_j − max x)·c (x_j − max x is exact near the max, so d_j is off by a rounding of itself,
not by an ulp of max|x|/T, as on the CPU):

    pass 1, ``_partials_kernel`` (one read of the logits), per chunk k of a row:
        m_k = max_j x_j  (NaN ignored: the sums below carry it),  t_k = m_k (0 if not finite)
        d_j = (x_j − t_k)·c,  K_k = #{j: x_j = m_k},  r_k = Σ_{x_j < m_k} exp(d_j)
        (the max's terms, exactly 1, counted apart: ``_chunks.split_sum``),
        u_k = Σ_j exp(d_j)·max(d_j, −1000)

    the row, ``_combine_kernel`` (one program per row, merging the row's few partials as
    ``reference.log_probs.merge_partials``, in float64; shifts finite, ``FINITE_SHIFT`` of
    :mod:`._chunks`):
        M = max_k m_k,  t = M (0 if not finite),  δ_k = (t_k − t)·c,  s_k = K_k + r_k
        e = s − 1 = (Σ_{k at M} K_k − 1) + Σ_{k at M} r_k + Σ_{k below M} s_k·exp(δ_k)
        u = Σ_k exp(δ_k)·(u_k + s_k·δ_k)
        m = M·c,  z_y = x_y·c when the row's target y is in [0, V), else 0 (not read)
    gives each row's (m, e, u, z_y) in float64; ``reference.log_probs.row_statistics`` turns them
    into log p(y) = (z_y − m) − log1p(e) ≤ 0, H = log1p(e) − u/(1 + e) ≥ 0 and
    lse = m + log1p(e), in the caller or (``finished``) in this kernel, with the same operations
    in the same order (log1p as ``_chunks.log1p``), rounded once to float32.

    pass 2, ``_gradient_kernel`` (one read and one write of the logits), given per-row (m, e)
    and the coefficients (a, t, k) of ∂/∂z_j = a·[j = y] + p_j·(b + k·(z_j − m)), b = t − a, s = 1 + e, with
    max x = m/c back in float32 (exactly: m/c is within 1e-15 of it):
        grad_j = exp(d_j)·(c·b/s + c·k/s·max(d_j, −1000)),   d_j = (x_j − max x)·c
        grad_y = c·(a·(1 − p_y) + p_y·(t + k·(z_y − m)))   (float64; 1 − p_y = e/s where y
        is at the max: a + p_y·b, and 1 − 1/s, cancel for a confident row)

Why float64 per row: m and z_y in float32 would each carry half an ulp of max|x|/T (at logits
near 1e4 and T = 0.7, 5e-4 in log p); s summed as 1 + δ in float32 would keep δ only to 6e-8 (a
confident token's log p = −log s came out 0). Counting the max's terms apart and merging in
float64 into the excess e = s − 1 (never 1 + e rounded) keeps both; the per-element work stays
in float32.

Exactness: the launches turn off floating-point contraction (``enable_fp_fusion=False``, as every
launch of this package: ``_chunks.EXACT``), so that d_j is computed as the max saw it: the max's
own term is d = 0 and is counted, never exponentiated, hence e ≥ 0 (log s ≥ 0, log p(y) ≤ 0) and
u ≤ 0 (H ≥ 0), also for bfloat16 logits. The max(·, −1000) makes a masked class (d = −inf,
exp = 0) add 0, not 0·(−inf).

Pass 2 reads each element before writing it, in the same program (x_y too, from the program's
own block), so the gradient may be written over the logits (in place). A row that is not
``valid`` (its target is ignore_index) is not read: (m, e, u, z_y) = (0, 0, 0, 0) and a zero
gradient row. Special values, as the Numba kernel and torch: a NaN makes the row's e and u NaN
(so log p, H, lse and the gradient); a +inf logit gives m = +inf and e = +inf (sums unshifted:
lse +inf, log p, H and the gradient NaN); −inf logits are masked classes, and a row of −inf only
has m = −inf, e = −1 (s = 0: NaN downstream).

Offsets grow with the rows in int64, as :mod:`._chunks` says (logits past 2^31 elements,
``tests/test_triton_int64.py``).

No validation: the caller passes contiguous rows, ``labels`` ``[N]`` int64, ``valid`` ``[N]``
bool. A label outside [0, V) is not read (z_y 0, no target entry in the gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.log_probs import EXPONENT_FLOOR
from . import _chunks

_FLOOR: tl.constexpr = tl.constexpr(EXPONENT_FLOOR)  # (a Triton global must be a constexpr)

__all__ = ["log_prob_gradient", "log_prob_statistics"]

# Classes per program at most, read on every call: tests and benchmarks lower it for this module.
MAX_BLOCK = _chunks.MAX_BLOCK


@triton.jit
def _scale64(scale_hi, scale_lo):
    """c = 1/T in float64, from its two float32 parts (Triton's float arguments are float32)."""
    return tl.cast(scale_hi, tl.float64) + tl.cast(scale_lo, tl.float64)


@triton.jit
def _partials_kernel(
    logits_ptr,
    logits_stride,
    valid_ptr,
    part_ptr,
    part_plane,
    n_cols,
    n_chunks,
    scale,
    BLOCK: tl.constexpr,
):
    row, cols, inside = _chunks.columns(n_cols, BLOCK)
    if tl.load(valid_ptr + row) == 0:
        return  # the combine writes the row's (0, 0, 0, 0) without reading the partials
    # ---- Pass 1: the chunk's max of x, and its sums at t_k, shifted before they are scaled ----
    x = tl.load(logits_ptr + row * logits_stride + cols, mask=inside, other=0.0).to(tl.float32)
    x = tl.where(inside, x, float("-inf"))
    m = tl.max(tl.where(x == x, x, float("-inf")), 0)  # NaN ignored: the sums carry it
    # t_k = 0 when m_k = −inf (never exp(−inf − (−inf))) or +inf (s_k = +inf: lse +inf)
    d = (x - _chunks.shift(m, True)) * scale
    e = tl.exp(d)
    rest, count = _chunks.split_sum(x, m, e)  # the max's terms (d = 0, exp 1) counted apart
    slot, plane = _chunks.slot(part_ptr, part_plane, row, n_chunks)
    tl.store(slot, m)
    tl.store(slot + plane, rest)
    tl.store(slot + 2 * plane, count)
    tl.store(slot + 3 * plane, tl.sum(e * tl.maximum(d, _FLOOR), 0))


@triton.jit
def _combine_kernel(
    logits_ptr,
    logits_stride,
    labels_ptr,
    valid_ptr,
    part_ptr,
    part_plane,
    m_ptr,
    e_ptr,
    u_ptr,
    z_target_ptr,
    log_p_ptr,
    entropy_ptr,
    lse_ptr,
    log_s_ptr,
    kept_ptr,
    n_cols,
    n_chunks,
    scale_hi,
    scale_lo,
    CHUNKS: tl.constexpr,
    FINISH: tl.constexpr,
):
    """One program per row, in float64: the row's partials merged into (m, e, u), and z_y; with
    ``FINISH`` also the row's log p(y), H, lse (rounded once to float32), log s and H again
    (kept for backward, float64) (``reference.log_probs.row_statistics``; 0 on rows that are not
    valid)."""
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: see the module docstring
    slots, mine, plane = _chunks.row_slots(part_ptr, part_plane, row, n_chunks, CHUNKS)
    if tl.load(valid_ptr + row) == 0:
        tl.store(m_ptr + row, 0.0)
        tl.store(e_ptr + row, 0.0)
        tl.store(u_ptr + row, 0.0)
        tl.store(z_target_ptr + row, 0.0)
        if FINISH:
            tl.store(log_p_ptr + row, 0.0)
            tl.store(entropy_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            tl.store(log_s_ptr + row, 0.0)
            tl.store(kept_ptr + row, 0.0)
        return
    c = _scale64(scale_hi, scale_lo)
    # ---- the row: M = max m_k of x; the excess e = s − 1 and each chunk's u_k restated at
    #      t = shift(M), in float64 ----
    big, t, e, t_k, factor, s_k = _chunks.merge_counted(slots, mine, plane, c, True, True)
    u_k = tl.load(slots + 3 * plane, mask=mine, other=0.0).to(tl.float64)
    # δ_k = (t_k − t)·c ≤ 0, the difference of two float32 taken in float64 (exact); the chunks of
    # the row's max keep u_k as it is (δ = 0); an empty chunk (s_k = 0: only −inf) adds nothing,
    # whatever its factor; δ floored at −1000 (its factor is 0 already): s_k·δ stays finite, never
    # 0·(−inf) = NaN for a chunk far below the row's max
    delta = (t_k.to(tl.float64) - t.to(tl.float64)) * c
    at_max = delta == 0.0
    restated = factor * (u_k + tl.where(at_max, 0.0, s_k * tl.maximum(delta, _FLOOR)))
    u = tl.sum(tl.where(s_k == 0.0, 0.0, tl.where(at_max, u_k, restated)), 0)
    m = big.to(tl.float64) * c
    # z_y, read only for a label in [0, V)
    y = tl.load(labels_ptr + row)
    known = (y >= 0) & (y < n_cols)
    x_y = tl.load(logits_ptr + row * logits_stride + tl.where(known, y, 0)).to(tl.float32)
    z_y = tl.where(known, x_y.to(tl.float64) * c, 0.0)
    tl.store(m_ptr + row, m)
    tl.store(e_ptr + row, e)
    tl.store(u_ptr + row, u)
    tl.store(z_target_ptr + row, z_y)
    if FINISH:  # row_statistics' algebra, in its order, in float64
        log_s = _chunks.log1p(e)
        entropy = log_s - u / (1.0 + e)
        tl.store(log_p_ptr + row, (((z_y - m) - log_s) + (m - m)).to(tl.float32))  # NaN for an infinite max
        tl.store(entropy_ptr + row, entropy.to(tl.float32))
        tl.store(lse_ptr + row, (m + log_s).to(tl.float32))
        # kept for backward in float64: its coefficient b = … − h·(H − log s) cancels for a
        # confident row, whose H − log s (about −δ) float32 copies would lose
        tl.store(log_s_ptr + row, log_s)
        tl.store(kept_ptr + row, entropy)


@triton.jit
def _gradient_kernel(
    logits_ptr,
    logits_stride,
    labels_ptr,
    valid_ptr,
    m_ptr,
    e_ptr,
    a_ptr,
    a_stride,
    b_ptr,
    b_stride,
    k_ptr,
    k_stride,
    grad_ptr,
    grad_stride,
    n_cols,
    scale_hi,
    scale_lo,
    BLOCK: tl.constexpr,
):
    """One program per (row, chunk): the chunk's gradient from the row's (m, e) and (a, t, k)."""
    row, cols, inside = _chunks.columns(n_cols, BLOCK)
    grad_row = grad_ptr + row * grad_stride
    if tl.load(valid_ptr + row) == 0:
        tl.store(grad_row + cols, tl.zeros([BLOCK], tl.float32), mask=inside)
        return
    c = _scale64(scale_hi, scale_lo)
    m = tl.load(m_ptr + row).to(tl.float64)
    e = tl.load(e_ptr + row).to(tl.float64)
    s = 1.0 + e
    a = tl.load(a_ptr + row * a_stride).to(tl.float64)
    t = tl.load(b_ptr + row * b_stride).to(tl.float64)  # the target's coefficient t = a + b
    k = tl.load(k_ptr + row * k_stride).to(tl.float64)
    # the float32 max of x back from m = max x·c (exactly: m/c is within 1e-15 of it), so that
    # d_j = (x_j − max x)·c is shifted before it is scaled, as in pass 1
    m_x = (m / c).to(tl.float32)
    coef_b = (c * (t - a) / s).to(tl.float32)
    coef_k = (c * k / s).to(tl.float32)
    # ---- Pass 2: grad_j = exp(d_j)·(c·b/s + c·k/s·d_j), d_j = (x_j − max x)·c ----
    x = tl.load(logits_ptr + row * logits_stride + cols, mask=inside, other=0.0).to(tl.float32)
    d = (x - m_x) * scale_hi
    e_d = tl.exp(d)  # (exp(d)·K before ·d: K·d overflows at the tiniest temperatures)
    grad = e_d * coef_b + (e_d * coef_k) * tl.maximum(d, _FLOOR)
    # the target's entry c·(a·(1 − p_y) + p_y·(t + k·d_y)) in float64, its 1 − p_y = e/s
    # where y is at the max (d_y = 0), where a + p_y·b and 1 − 1/s cancel for a confident row;
    # y outside [0, V) matches no stored lane
    # x_y from this program's own block (another chunk's program may have written its gradient
    # over the logits already: in place), so only in the chunk that holds y
    y = tl.load(labels_ptr + row)
    start = tl.program_id(1) * BLOCK
    if (y >= start) & (y < start + BLOCK):
        x_y = tl.sum(tl.where(cols == y, x, 0.0), 0)
        d_y = x_y.to(tl.float64) * c - m
        p_y = tl.exp(d_y) / s
        rest_y = tl.where(d_y == 0.0, e / s, 1.0 - p_y)
        t_y = tl.where(tl.abs(a) < float("inf"), t, a + (t - a))  # torch's chain: ∞ − ∞ = NaN there
        target = c * (a * rest_y + p_y * (t_y + k * tl.maximum(d_y, _FLOOR)))
        grad = tl.where(cols == y, target.to(tl.float32), grad)
    tl.store(grad_row + cols, grad, mask=inside)


def _scale_parts(temperature: float) -> tuple[float, float]:
    """c = 1/T as two float32 values (hi, lo) whose sum is c to about 2⁻⁴⁸: Triton passes a float
    argument as float32; the kernels rebuild c in float64 (``_scale64``) and scale in float32 by hi."""
    scale = 1.0 / float(temperature)
    high = _chunks.float32_argument(scale)
    return high, _chunks.float32_argument(scale - high)


def _valid_bytes(valid: Tensor) -> Tensor:
    return valid.contiguous().view(torch.uint8)


@_chunks.on_tensor_device
def log_prob_statistics(
    logits: Tensor, labels: Tensor, valid: Tensor, temperature: float = 1.0,
    finished: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pass 1 over a contiguous ``[N, V]`` float32/float16/bfloat16 tensor: ``(m, e, u, z_target)``,
    each ``[N]`` float64 on the logits' device (see the module docstring). ``labels`` ``[N]``
    int64, ``valid`` ``[N]`` bool; nothing is validated. ``finished``: five contiguous tensors
    of N elements each (any shape; float32 for the first three, float64 for the last two) that
    receive each row's log p(y), H, lse, log s and H again (``reference.log_probs.row_statistics``, 0 on rows that are not valid), or None.
    Two launches."""
    n_rows, n_cols = logits.shape
    device = logits.device
    m, e, u, z_target = (torch.empty(n_rows, dtype=torch.float64, device=device) for _ in range(4))
    if n_rows == 0:
        return m, e, u, z_target
    scale_hi, scale_lo = _scale_parts(temperature)
    valid_bytes = _valid_bytes(valid)
    layout = _chunks.Layout.of(n_rows, n_cols, MAX_BLOCK)
    part = layout.partials(4, device)
    _partials_kernel[layout.grid](
        logits, logits.stride(0), valid_bytes, part, layout.plane, n_cols, layout.chunks, scale_hi,
        **layout.per_chunk,
    )
    _combine_kernel[(n_rows,)](
        logits, logits.stride(0), labels, valid_bytes, part, layout.plane, m, e, u, z_target,
        *((m,) * 5 if finished is None else finished), n_cols, layout.chunks, scale_hi, scale_lo,
        **layout.per_row,
        FINISH=finished is not None,
    )
    return m, e, u, z_target


@_chunks.on_tensor_device
def log_prob_gradient(
    logits: Tensor,
    labels: Tensor,
    valid: Tensor,
    temperature: float,
    m: Tensor,
    e: Tensor,
    coefficients: tuple[Tensor, Tensor, Tensor],
    grad_out: Tensor,
) -> Tensor:
    """Pass 2: writes ∂/∂logits into ``grad_out`` (a contiguous ``[N, V]`` tensor of the logits'
    dtype; it may be ``logits`` itself) from the rows' (m, e) of :func:`log_prob_statistics` and
    the coefficients (a, t, k) of ``reference.log_probs.gradient_coefficients``, each ``[N]`` or
    a single value (0-dim), any float dtype, on the logits' device. One launch. Returns
    ``grad_out``."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return grad_out
    # one value for every row: a stride of 0; float64 rows are read as they are
    a, b, k = (c.reshape(-1).expand(n_rows) for c in coefficients)
    layout = _chunks.Layout.of(n_rows, n_cols, MAX_BLOCK)
    _gradient_kernel[layout.grid](
        logits, logits.stride(0), labels, _valid_bytes(valid), m.contiguous(), e.contiguous(),
        a, a.stride(0), b, b.stride(0), k, k.stride(0), grad_out, grad_out.stride(0), n_cols,
        *_scale_parts(temperature), **layout.per_chunk,
    )
    return grad_out
