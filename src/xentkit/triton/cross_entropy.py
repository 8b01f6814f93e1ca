"""Fused cross-entropy on the GPU: per-row loss and log-sum-exp, then the gradient.

The Triton twin of :mod:`xentkit.kernels.cross_entropy`, with the same formulas (reference:
:mod:`xentkit.reference.cross_entropy`). The ``[N, V]`` logits (float32, float16 or bfloat16;
arithmetic in float32) are cut into chunks of ``BLOCK`` classes, one program per (row, chunk),
so that every row keeps many programs busy whatever N (the chunks, their partials and the merge
of a row's chunks: :mod:`._chunks`):

    pass 1, ``_partials_kernel`` (one read of the logits):
        z_j = s·tanh(x_j/s)                   (z_j = x_j without a softcap)
        per chunk c:  m_c = max_j z_j,  t_c = m_c (0 if the chunk has no finite value),
                      K_c = #{j: z_j = m_c},  r_c = Σ_{j: z_j < m_c} exp(z_j − t_c)
                      (the max's terms counted apart: ``_chunks.split_sum``),
                      S_c = Σ_j w_j·(z_j − t_c),  W_c = Σ_j w_j        (label smoothing only;
                      a class of w_j = 0 adds 0 to S_c, even at z_j = −inf)
                      F_c = #{j: z_j > −inf}  (smoothing, probabilities: whether a gap
                      lse − t_c of 0 is exact, see ``_mass_at_lse``)

    the loss, ``_loss_kernel`` (one program per row, combining the row's few partials):
        M = max_c m_c,  e = d − 1 = (K − 1) + Σ_c r'_c  (``_chunks.merge_counted``: K the
        count of the row's max terms, r'_c = r_c at a chunk holding them, (K_c + r_c)·exp(t_c − M)
        elsewhere),  log d = log1p(e),  lse = M + log d
        loss = (1−ε)·w_y·((M − z_y) + log d) + (ε/V)·Σ_c (W_c·(lse − t_c) − S_c)
        and (M, e) kept per row for pass 2

    pass 2, ``_grad_kernel`` (one read and one write of the logits), with the upstream gradient
    read on the device (so ``xentkit.torch`` runs it in backward, with no synchronization):
        p_j     = exp(z_j − M)/d
        grad_ij = s'(x_ij)·(g_i·(p_j·A − (1−ε)·w_y·[j = y] − ε·w_j/V) + g^z_i·2·λ·lse·p_j)
        A       = (1−ε)·w_y + ε·W/V,  W = Σ_j w_j,  s'(x) = 1 − tanh²(x/s)  (1 without a softcap;
                  4e/(1 + e)², e = exp(−2|x/s|), where tanh is near ±1)
        at the max (z_j = M, p_j = 1/d): p_j·A − mass_j = (A − mass_j) − A·e/d, so that the
        target entry of a confident row keeps its −e/d (1/d − 1 would round it away)

A confident row's sum d = 1 + δ would hold δ only to float32's half ulp of 1 (6e-8): its loss
log(1 + δ) came out 0 below that, and its target entry's gradient cancelled. With the max's
terms counted apart, e = δ is kept to float32's relative accuracy, the loss log1p(e) and the
target's gradient too (``tests/test_triton.py::test_a_confident_row_keeps_its_small_loss_and_gradient``).

Probability targets (``target`` an ``[N, V]`` float tensor q, read in its dtype, instead of ``[N]``
labels) take the same passes with ``PROBABILITIES`` set, the weighted smoothed target
r_j = w_j·q'_j, q'_j = (1−ε)·q_j + ε/V, in place of the label's terms:

    pass 1:    per chunk also  R_c = Σ_j r_j,  S_c = Σ_j r_j·(z_j − t_c)        (0 where r_j = 0)
               (r_j the target here; the chunk's sums r_c above are the exponentials'), R_c in
               two parts as the exponentials: the mass at the chunk's max, and below it
    the loss:  loss = −Σ_j r_j·(z_j − lse) = Σ_c (R_c·(lse − t_c) − S_c),  and A = Σ_c R_c kept
               (every term ≥ 0 for q ≥ 0: t_c ≤ lse and z_j ≤ t_c, so nothing cancels), as
               A_top, the mass at the row's max, and A_rest (``stats_rows``)
    pass 2:    grad_ij = s'(x_ij)·(g_i·(p_j·A − r_j) + g^z_i·2·λ·lse·p_j), at the max
               g_i·((A_top − r_j) + A_rest − A·e/d): a confident row's A − r_max (the mass off
               the max, say a smoothing's ε) keeps its own relative accuracy, not float32's of A

No row is ignored (``ignore_index`` is not read), as on the CPU; a class with r_j = 0 adds
nothing, so a masked (−inf) logit is harmless where the target puts no mass on it.

Pass 2 reads each element before writing it, in the same program, so the gradient may be
written over the logits (in place). Ignored rows are not read: loss 0, lse 0, a zero gradient
row. A −inf logit is a masked class (probability 0); a NaN in a row makes that row NaN.

``tanh`` is computed here (Cephes' single-precision scheme: an odd polynomial below 0.625, the
exponential form above, both within a few float32 ulps) so that the interpreter and the GPU run
the same arithmetic, as far as they can: the launches turn off contraction (no fused
multiply-add, which the interpreter never makes: ``_chunks.EXACT``). What still differs:
``tl.exp`` (``ex2.approx`` on the GPU, NumPy's exp on the interpreter); float32 ``/`` (the GPU's
``div.full.f32``, within 2 ulps, NumPy's correctly rounded: the softcap's tanh and slope, the
gradient's coefficient, ``_chunks.log1p``'s quotient); and a float32 value stored into a bfloat16
gradient (the GPU rounds to nearest even, ``cvt.rn.bf16.f32``; Triton 3.8's interpreter was seen
to truncate, one bfloat16 ulp lower; a review). Pass 1, the loss kernel and pass 2 run the same
instructions on each, so a row's max still gives z − m = 0 exactly.

Offsets (audited for logits of more than 2^31 elements; 65536 × 262144 is a real shape): every
offset that grows with the rows is computed in int64, the row index (``program_id(0)``, cast to
int64) times a row stride, and the planes of the per-chunk partials (k·rows·chunks, as
:mod:`._chunks`) and of the rows' statistics (k·rows) from int64 copies of their sizes; offsets
within a row are int32 (V up to 2^31 less one block: a column index is the block's start plus its lane). Tested under the interpreter on strided views whose row
offsets pass 2^31 (``tests/test_triton_int64.py``).

Class weights are prepared for the kernels (float32, contiguous, and their sum W) on each call, or
once by the caller for many calls (:class:`ClassWeights`, as the chunks of the linear form do).

No validation: the caller passes contiguous rows, labels in ``[0, V)`` or ``ignore_index``
(or probability rows of the logits' shape).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _chunks, stats_rows

__all__ = ["ClassWeights", "cross_entropy_rows", "row_gradient", "row_statistics"]

# Classes per program at most, read on every call: tests and benchmarks lower it for this module.
MAX_BLOCK = _chunks.MAX_BLOCK


@triton.jit
def _tanh(u):
    a = tl.abs(u)
    s = u * u
    small = ((((-5.70498872745e-3 * s + 2.06390887954e-2) * s - 5.37397155531e-2) * s
              + 1.33314422036e-1) * s - 3.33332819422e-1) * s * u + u
    large = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    large = tl.where(u < 0, -large, large)
    return tl.where(a < 0.625, small, large)


@triton.jit
def _tanh_slope(u, t):
    """1 − tanh²(u) given t = ``_tanh(u)``: 4e/(1 + e)², e = exp(−2|u|), where |t| is near 1 (the
    difference 1 − t² would lose its digits: at u = 8 a few percent, from u = 10 all of them)."""
    e = tl.exp(-2.0 * tl.abs(u))
    inv = 1.0 / (1.0 + e)
    return tl.where(tl.abs(u) < 0.625, 1.0 - t * t, 4.0 * e * inv * inv)


@triton.jit
def _capped(x, inside, softcap, HAS_SOFTCAP: tl.constexpr):
    """The logits in float32 after the softcap; lanes past the row are −inf."""
    if HAS_SOFTCAP:
        x = softcap * _tanh(x / softcap)
    return tl.where(inside, x, float("-inf"))


@triton.jit
def _mass_at_lse(mass, gap, lone):
    """A chunk's Σ_j mass_j·(lse − t_c), ``gap`` = lse − t_c ≥ 0: 0 for a chunk without mass
    (signed weights summing to 0 drop only this term, never the chunk's S_c). Where the float32
    gap is 0 at the chunk of the row's max (its excess e is 0: the other terms underflowed) and the row has another
    finite logit (not ``lone``), the true gap is positive but below float32's resolution: a finite mass adds 0, an
    infinite one its own ±inf, as exact arithmetic gives (never inf·0 = NaN). In a row of one
    finite logit (``lone``) the gap is exactly 0: mass·0, NaN for an infinite mass as in torch.
    A NaN mass stays NaN. (``_mass_off_max``: the rule for mass known to lie off the max.)"""
    at_max = tl.where(lone, mass * 0.0, tl.where(tl.abs(mass) < float("inf"), 0.0, mass))
    return tl.where(mass == 0.0, 0.0, tl.where(gap == 0.0, at_max, mass * gap))


@triton.jit
def _mass_off_max(mass, gap):
    """``_mass_at_lse`` for mass off the row's max (probability targets keep it apart): where the
    gap is 0, a finite mass adds 0 and an infinite one its own ±inf, in a row of one finite logit
    too, whose other classes are masked and carry their ±inf in S_c (the whole chunk's mass·0
    had made a masked class's infinite weight NaN, where torch and the kernels give +inf: a
    review)."""
    return _mass_at_lse(mass, gap, gap != gap)


@triton.jit
def _weighted_target(target_row, weight_ptr, cols, inside, n_cols, eps, HAS_WEIGHT: tl.constexpr,
                     HAS_SMOOTHING: tl.constexpr):
    """r_j = w_j·q'_j with q'_j = (1−ε)·q_j + ε/V, in float32; 0 on lanes past the row."""
    q = tl.load(target_row + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_SMOOTHING:
        q = tl.where(inside, (1.0 - eps) * q + eps / n_cols, 0.0)
    if HAS_WEIGHT:
        q = q * tl.load(weight_ptr + cols, mask=inside, other=0.0)
    return q


@triton.jit
def _partials_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    target_stride,
    weight_ptr,
    part_ptr,
    part_plane,
    n_cols,
    n_chunks,
    ignore_index,
    eps,
    softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PROBABILITIES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, cols, inside = _chunks.columns(n_cols, BLOCK)
    slot, plane = _chunks.slot(part_ptr, part_plane, row, n_chunks)
    if not PROBABILITIES:
        y = tl.load(target_ptr + row)
        if y == ignore_index:
            return
    x = tl.load(logits_ptr + row * logits_stride + cols, mask=inside, other=0.0).to(tl.float32)
    z = _capped(x, inside, softcap, HAS_SOFTCAP)
    m = tl.max(z, 0)
    shift = _chunks.shift(m, False)  # t_c: never exp(−inf − (−inf))
    rest, count = _chunks.split_sum(z, m, tl.exp(z - shift))  # the max's terms counted apart
    tl.store(slot, m)
    tl.store(slot + plane, rest)
    tl.store(slot + 2 * plane, count)
    if PROBABILITIES:
        r = _weighted_target(target_ptr + row * target_stride, weight_ptr, cols, inside, n_cols, eps,
                             HAS_WEIGHT, HAS_SMOOTHING)
        # S_c = Σ r_j·(z_j − t_c): a class the target leaves out adds 0, never 0·(−inf), and so
        # does the chunk's maximum (z_j − t_c = 0: never inf·0 for an infinite weight)
        tl.store(slot + 3 * plane, tl.sum(tl.where((r == 0.0) | (z == shift), 0.0, r * (z - shift)), 0))
        # R_c in two parts, as the exponentials: the target mass below the chunk's max, and at it
        # (a chunk of m = ±inf: the loss kernel adds the two back together)
        top = z == m
        tl.store(slot + 4 * plane, tl.sum(tl.where(top, 0.0, r), 0))
        # the finite logits, counted in int32: this form (not a float sum, and not split_sum's
        # test of m above) compiles without a spill at BLOCK 4096 and 8192 on sm_80
        tl.store(slot + 5 * plane, tl.sum((z > float("-inf")).to(tl.int32), 0).to(tl.float32))
        tl.store(slot + 6 * plane, tl.sum(tl.where(top, r, 0.0), 0))
    elif HAS_SMOOTHING:
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=inside, other=0.0)
        else:
            w = tl.where(inside, 1.0, 0.0)
        # lanes past the row add 0 (z = −inf there), and so does a class of weight 0, even masked
        # (−inf: 0·log 0 = 0, as the reference; torch gives NaN; a capped z is finite, and the
        # softcap build has no register to spare for the test). The chunk's maximum adds 0, not
        # w·0: NaN for an infinite weight, whose class torch gives w·(lse − z) = ±inf
        counted = inside & (z != shift)
        if not HAS_SOFTCAP:
            counted = counted & (w != 0.0)
        tl.store(slot + 3 * plane, tl.sum(tl.where(counted, w * (z - shift), 0.0), 0))
        tl.store(slot + 4 * plane, tl.sum(w, 0))
        tl.store(slot + 5 * plane, tl.sum(tl.where(z > float("-inf"), 1.0, 0.0), 0))  # finite logits


@triton.jit
def _loss_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    weight_ptr,
    part_ptr,
    part_plane,
    loss_ptr,
    lse_ptr,
    stats_ptr,
    n_rows,
    n_cols,
    n_chunks,
    ignore_index,
    eps,
    softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PROBABILITIES: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    """One program per row: the row's partials combined into M, d, lse and the loss (and A for
    probability targets)."""
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: see the module docstring
    rows = tl.cast(n_rows, tl.int64)
    slots, mine, plane = _chunks.row_slots(part_ptr, part_plane, row, n_chunks, CHUNKS)
    if not PROBABILITIES:
        y = tl.load(target_ptr + row)
        if y == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            tl.store(stats_ptr + row, 0.0)
            tl.store(stats_ptr + rows + row, 0.0)
            return
    # M (kept as the row's shift: 0 for a row of −inf), e = d − 1, and the chunks' shifts t_c
    _, m, e, shifts, _, _ = _chunks.merge_counted(slots, mine, plane, 1.0, False, False)
    log_d = _chunks.log1p(e)
    lse = m + log_d
    # lse − t_c per chunk as (M − t_c) + log d, not from the float32 lse: that one has lost up to
    # half an ulp of M (5e-4 at logits near +1e4), which the mass terms below would carry
    gaps = (m - shifts) + log_d
    # a chunk of only −inf (a masked stretch of the row): its Σ_j mass_j·(lse − z_j) is all in −S_c
    # (±inf for any mass, 0 for none), and its mass·(lse − 0) term would only add inf·gap to it,
    # NaN for an infinite class weight where the gap is 0 or negative (a review)
    masked = tl.load(slots, mask=mine, other=0.0) == float("-inf")
    if PROBABILITIES:
        s_z = tl.load(slots + 3 * plane, mask=mine, other=0.0)
        below = tl.load(slots + 4 * plane, mask=mine, other=0.0)
        lone = tl.sum(tl.load(slots + 5 * plane, mask=mine, other=0.0), 0) <= 1.0
        at_top = tl.load(slots + 6 * plane, mask=mine, other=0.0)
        r_c = below + at_top
        # + 0·lse: a row whose softmax is NaN (a NaN or +inf logit, or only −inf) has a NaN loss
        # also where its targets carry no mass, as its gradient (0 otherwise)
        mass_terms = tl.where(masked, 0.0, _mass_at_lse(at_top, gaps, lone) + _mass_off_max(below, gaps))
        loss = tl.sum(mass_terms - s_z, 0) + 0.0 * lse
        tl.store(loss_ptr + row, loss)
        # A = Σ_j r_j for pass 2, in two parts: the target mass at the row's max (the chunks
        # holding it: M finite, their counts > 0) and the rest, so that A − r_max keeps its digits
        top = (shifts == m) & (tl.load(slots + 2 * plane, mask=mine, other=0.0) > 0.0)
        tl.store(stats_ptr + 2 * rows + row, tl.sum(tl.where(top, below, r_c), 0))
        tl.store(stats_ptr + 3 * rows + row, tl.sum(tl.where(top, at_top, 0.0), 0))
    else:
        # a label outside [0, V) (refused by the caller afterwards) reads nothing out of bounds
        known = (y >= 0) & (y < n_cols)
        safe_y = tl.where(known, y, 0)
        z_y = tl.load(logits_ptr + row * logits_stride + safe_y).to(tl.float32)
        if HAS_SOFTCAP:
            z_y = softcap * _tanh(z_y / softcap)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + safe_y)
        else:
            w_y = 1.0
        loss = (1.0 - eps) * w_y * ((m - z_y) + log_d)
        if HAS_WEIGHT:  # a target of weight 0 adds nothing, even masked (0·log 0 = 0, as the reference)
            loss = tl.where((w_y == 0.0) & (z_y == float("-inf")) & (tl.abs(lse) < float("inf")), 0.0, loss)
        if HAS_SMOOTHING:
            s_z = tl.load(slots + 3 * plane, mask=mine, other=0.0)
            w_c = tl.load(slots + 4 * plane, mask=mine, other=0.0)
            lone = tl.sum(tl.load(slots + 5 * plane, mask=mine, other=0.0), 0) <= 1.0
            # Σ_c w_c·(lse − z_c) per block, as W_k·(lse − shift_k) − S_k; a block whose weights
            # sum to 0 (signed weights) drops only its W term, never its weighted logits S_k
            loss += eps / n_cols * tl.sum(tl.where(masked, 0.0, _mass_at_lse(w_c, gaps, lone)) - s_z, 0)
        tl.store(loss_ptr + row, tl.where(known, loss, float("nan")))
    tl.store(lse_ptr + row, lse)
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + rows + row, e)


@triton.jit
def _grad_kernel(
    logits_ptr,
    logits_stride,
    target_ptr,
    target_stride,
    weight_ptr,
    weight_sum_ptr,
    stats_ptr,
    grad_ptr,
    grad_stride,
    grad_scale_ptr,
    grad_scale_stride,
    z_grad_scale_ptr,
    z_grad_scale_stride,
    factor_ptr,
    n_rows,
    n_cols,
    ignore_index,
    eps,
    z_loss,
    softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    PROBABILITIES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per (row, chunk): the chunk's gradient from the row's M and d (and A), with
    g = grad_scale[row]·factor[0] and g^z = z_grad_scale[row]·factor[1]."""
    row, cols, inside = _chunks.columns(n_cols, BLOCK)
    rows = tl.cast(n_rows, tl.int64)  # int64 offsets: see the module docstring
    grad_row = grad_ptr + row * grad_stride
    if not PROBABILITIES:
        y = tl.load(target_ptr + row)
        if y == ignore_index:
            tl.store(grad_row + cols, tl.zeros([BLOCK], tl.float32), mask=inside)
            return
    m = tl.load(stats_ptr + row)
    e = tl.load(stats_ptr + rows + row)  # e = d − 1, kept apart from the max's terms
    d = 1.0 + e
    lse = m + _chunks.log1p(e)
    # a factor of 0 is a "mean" of nothing: gradient 0 whatever the upstream gradient (not 0·∞)
    factor = tl.load(factor_ptr)
    g = tl.where(factor == 0.0, 0.0, tl.load(grad_scale_ptr + row * grad_scale_stride).to(tl.float32) * factor)
    # the gradient is g·(A·p_j − [target mass]_j) + g^z·2·λ·lse·p_j: ``main`` = g·A for probability
    # targets, g·(1−ε)·w_y for labels, whose A adds the smoothing's ε·W/V to ``other`` with the z term
    other = 0.0
    if PROBABILITIES:
        a_rest = g * tl.load(stats_ptr + 2 * rows + row)  # g·A, A = A_rest + A_top
        a_top = g * tl.load(stats_ptr + 3 * rows + row)
        main = a_rest + a_top
    else:
        known = (y >= 0) & (y < n_cols)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + tl.where(known, y, 0))
        else:
            w_y = 1.0
        main = g * ((1.0 - eps) * w_y)  # without smoothing no W term (0·W is NaN for W = inf)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                weight_sum = tl.load(weight_sum_ptr)  # W, summed by the host function on the device
            else:
                weight_sum = n_cols * 1.0
            other = g * (eps * weight_sum / n_cols)
    if HAS_Z:
        z_factor = tl.load(factor_ptr + 1)
        g_z = tl.where(
            z_factor == 0.0, 0.0, tl.load(z_grad_scale_ptr + row * z_grad_scale_stride).to(tl.float32) * z_factor
        )
        other += g_z * 2.0 * z_loss * lse
    coef = (main + other) / d
    if not PROBABILITIES:
        coef = tl.where(known, coef, float("nan"))
    x = tl.load(logits_ptr + row * logits_stride + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        u = x / softcap
        t = _tanh(u)
        z = softcap * t
        slope = _tanh_slope(u, t)  # (here: u and t die, one value stays live to the end)
    else:
        z = x
    # at the row's max (p_j = 1/d exactly): main·p_j − mass_j = (main − mass_j) − main·e/d, with
    # no cancellation for a confident row (whose p_j − 1 = −e/d would round to 0 or an ulp); where
    # that form is NaN (∞ − ∞, an infinite class weight) the plain one, which torch's value follows;
    # so too for an infinite (or NaN) upstream gradient, where torch's order g·p_j·A − g·w_j is
    # NaN (∞ − ∞) and the regrouped form would give −∞ (as the Numba kernels: a review)
    at_max = z == m
    regroup = tl.abs(main) < float("inf")
    if PROBABILITIES:
        r = g * _weighted_target(target_ptr + row * target_stride, weight_ptr, cols, inside, n_cols, eps,
                                 HAS_WEIGHT, HAS_SMOOTHING)
        grad = coef * tl.exp(z - m) - r
        # main − r_j = (g·A_top − r_j) + g·A_rest: exactly g·A_rest at a lone max; only where
        # p_max > 1/2 (e < 1), as the Numba kernels: in a flat row main − main·e/d cancels (a
        # review: 3e-4 relative at 32000 classes), where the plain form keeps the entry's digits
        precise = tl.where(regroup & (e < 1.0), ((a_top - r) + a_rest) + (other - main * e) / d, float("nan"))
        grad = tl.where(at_max, tl.where(precise == precise, precise, grad), grad)
    else:
        label = cols == y
        grad = coef * tl.exp(z - m) - tl.where(label, main, 0.0)
        precise = tl.where(regroup, (other - main * e) / d, float("nan"))
        grad = tl.where(label & at_max, tl.where(precise == precise, precise, grad), grad)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                grad -= g * eps / n_cols * tl.load(weight_ptr + cols, mask=inside, other=0.0)
            else:
                grad -= g * eps / n_cols
    if HAS_SOFTCAP:
        grad = grad * slope
    tl.store(grad_row + cols, grad, mask=inside)


def _flags(
    weight: Tensor | ClassWeights | None, label_smoothing: float, softcap: float | None, target: Tensor
) -> dict:
    return {
        "HAS_WEIGHT": weight is not None,
        "HAS_SMOOTHING": label_smoothing > 0.0,
        "HAS_SOFTCAP": softcap is not None,
        "PROBABILITIES": target.is_floating_point(),
    }


@dataclasses.dataclass(frozen=True)
class ClassWeights:
    """Class weights as the kernels read them, prepared once for many calls on one problem (the
    chunks of ``xentkit.torch``'s linear cross-entropy): ``values`` the ``[V]`` weights as a
    contiguous float32 tensor on the logits' device; ``total`` W = Σ_j w_j, summed in float64 then
    rounded to float32, a ``[1]`` tensor left on the device (no synchronization), which pass 2 of
    hard labels with label smoothing reads (None when not asked for: :meth:`total_wanted`).
    :func:`row_statistics` and :func:`row_gradient` take one in place of ``weight``; a plain
    tensor is prepared on each call."""

    values: Tensor
    total: Tensor | None

    @staticmethod
    def total_wanted(target: Tensor, label_smoothing: float) -> bool:
        """Whether pass 2 reads W for ``target``: hard labels with label smoothing (A's ε·W/V)."""
        return not target.is_floating_point() and label_smoothing > 0.0

    @classmethod
    def of(
        cls, weight: Tensor | ClassWeights | None, device: torch.device, *, with_total: bool
    ) -> ClassWeights | None:
        """``weight`` prepared for the kernels on ``device`` (None stays None; prepared weights
        come back as they are, their total added when asked for and missing). ``with_total``:
        whether W is wanted (pass 2 of hard labels)."""
        if weight is None:
            return None
        if isinstance(weight, ClassWeights):
            if weight.total is not None or not with_total:
                return weight
            values = weight.values
        else:
            values = weight.to(device=device, dtype=torch.float32).contiguous()
        total = values.sum(dtype=torch.float64).to(torch.float32).reshape(1) if with_total else None
        return cls(values, total)


@_chunks.on_tensor_device
def row_statistics(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | ClassWeights | None,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1 and the loss: ``(loss, lse, stats)``, float32, ``stats`` the rows' max M and excess
    e = d − 1 of their sum d (``[2, N]``; ``[4, N]`` for probability targets, with A = Σ_j w_j·q'_j
    in two parts: :func:`stats_rows`) for :func:`row_gradient`. ``target``: ``[N]`` int64 labels, or ``[N, V]`` class probabilities
    (float, contiguous rows); ``weight``: ``[V]``, :class:`ClassWeights` or None. Two launches; a
    label outside ``[0, V)`` gives NaN (nothing is read out of bounds), for the caller to
    refuse."""
    n_rows, n_cols = logits.shape
    device = logits.device
    flags = _flags(weight, label_smoothing, softcap, target)
    probabilities = flags["PROBABILITIES"]
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=device)
    stats = torch.empty((stats_rows(probabilities), n_rows), dtype=torch.float32, device=device)
    if n_rows == 0:
        return loss, lse, stats
    weights = ClassWeights.of(weight, device, with_total=False)
    layout = _chunks.Layout.of(n_rows, n_cols, MAX_BLOCK)
    part = layout.partials(7 if probabilities else 6 if label_smoothing > 0.0 else 3, device)
    cap = 1.0 if softcap is None else _chunks.float32_argument(softcap)
    any_weight = loss if weights is None else weights.values  # any pointer when unused
    target_stride = target.stride(0) if probabilities else 1
    _partials_kernel[layout.grid](
        logits, logits.stride(0), target, target_stride, any_weight, part, layout.plane, n_cols,
        layout.chunks, int(ignore_index), _chunks.float32_argument(label_smoothing), cap, **layout.per_chunk, **flags,
    )
    _loss_kernel[(n_rows,)](
        logits, logits.stride(0), target, any_weight, part, layout.plane, loss, lse, stats,
        n_rows, n_cols, layout.chunks, int(ignore_index), _chunks.float32_argument(label_smoothing), cap,
        **layout.per_row, **flags,
    )
    return loss, lse, stats


@_chunks.on_tensor_device
def row_gradient(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | ClassWeights | None,
    stats: Tensor,
    grad_scale: Tensor,
    z_grad_scale: Tensor,
    grad_out: Tensor,
    factors: Tensor | None = None,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> Tensor:
    """Pass 2: the gradient into ``grad_out`` (which may be ``logits``), from :func:`row_statistics`'
    ``stats`` for the same ``target`` (labels or probabilities). Row i's main term is scaled by
    ``grad_scale[i]·factors[0]``, its z term by ``z_grad_scale[i]·factors[1]``: ``grad_scale`` /
    ``z_grad_scale`` are ``[N]`` (any float dtype; a stride of 0 broadcasts one value),
    ``factors`` a float32 ``[2]`` (ones when None), all read on the device: no synchronization.
    ``weight``: ``[V]`` (cast and summed here), :class:`ClassWeights` prepared once for many
    calls, or None. The formula's options come by keyword (``LossOptions.formula_arguments()``).
    One launch (and the weights' cast and sum for a plain ``weight``)."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return grad_out
    device = logits.device
    flags = _flags(weight, label_smoothing, softcap, target)
    # W stays on the device (no synchronization); hard labels only
    weights = ClassWeights.of(weight, device, with_total=ClassWeights.total_wanted(target, label_smoothing))
    values = stats if weights is None else weights.values  # any pointer when unused
    total = stats if weights is None or weights.total is None else weights.total
    if factors is None:
        factors = torch.ones(2, dtype=torch.float32, device=device)
    layout = _chunks.Layout.of(n_rows, n_cols, MAX_BLOCK)
    _grad_kernel[layout.grid](
        logits, logits.stride(0), target, target.stride(0) if flags["PROBABILITIES"] else 1,
        values, total, stats, grad_out, grad_out.stride(0), grad_scale, grad_scale.stride(0),
        z_grad_scale, z_grad_scale.stride(0), factors, n_rows, n_cols, int(ignore_index),
        _chunks.float32_argument(label_smoothing), _chunks.float32_argument(z_loss), 1.0 if softcap is None else _chunks.float32_argument(softcap),
        HAS_Z=z_loss > 0.0, **layout.per_chunk, **flags,
    )
    return grad_out


def cross_entropy_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad_scale: Tensor | None,
    z_grad_scale: Tensor | None,
    grad_out: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Per-row loss and log-sum-exp (float32 ``[N]``), and the gradient into ``grad_out``.

    The contract of :func:`xentkit.kernels.cross_entropy_rows`, on tensors: ``logits`` a
    contiguous ``[N, V]`` float32/float16/bfloat16 tensor, ``target`` ``[N]`` int64 labels (each
    in ``[0, V)`` or ``ignore_index``) or ``[N, V]`` class probabilities (float16, bfloat16,
    float32 or float64 with contiguous rows, read in their dtype; no row is ignored), ``weight``
    ``[V]`` or None, ``grad_scale`` / ``z_grad_scale`` ``[N]`` (a stride of 0 broadcasts one
    value; None means ones), ``grad_out`` a contiguous ``[N, V]`` tensor (it may be ``logits``
    itself) or None for the loss alone. The z-loss term is not in the returned loss (the caller
    adds ``z_loss·lse²``). Three launches with a gradient (:func:`row_statistics`, then
    :func:`row_gradient`), two without; the weights prepared once for both.
    """
    formula = {
        "ignore_index": ignore_index, "label_smoothing": label_smoothing, "z_loss": z_loss, "softcap": softcap,
    }
    with_total = grad_out is not None and ClassWeights.total_wanted(target, label_smoothing)
    # prepared once for both passes (no rows: nothing to prepare, nothing read)
    weights = ClassWeights.of(weight, logits.device, with_total=with_total) if len(logits) else None
    loss, lse, stats = row_statistics(logits, target, weights, **formula)
    if grad_out is not None:
        one = torch.ones((), dtype=torch.float32, device=logits.device).expand(logits.shape[0])
        row_gradient(
            logits, target, weights, stats, one if grad_scale is None else grad_scale,
            one if z_grad_scale is None else z_grad_scale, grad_out, **formula,
        )
    return loss, lse
