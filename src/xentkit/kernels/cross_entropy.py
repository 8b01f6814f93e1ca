"""Fused cross-entropy kernel: per-row loss and gradient in one read of the logits.

For each row i (``prange`` over rows; a row of C classes, label y, logits x):

    Pass 1 (one read of the row, online softmax; Milakov & Gimelshein, arXiv 1805.02867):
        z_j = softcap·tanh(x_j/softcap)   (z_j = x_j without a softcap)
        processed in blocks of ``block`` classes that stay in L1 between two short loops:
            b   = max_{j in block} z_j                          (vector maxnum)
            if b > m:  s ← s·exp(m − b);  m ← b                 (rescale the running sum)
            s  += Σ_{j in block} exp(z_j − m)                   (in the dtype's lanes; if b = m
                                                                as #{z_j = m} + Σ_{z_j < m};
                                                                float64 total)
            S_z += Σ_{j in block} w_j·(z_j − r)                  (only with label smoothing;
                                                                r = the running max, S_z moved
                                                                with it: −W_seen·(b − r); a
                                                                class of w_j = 0 adds 0, even
                                                                at z_j = −inf)
        lse = m + log(s)

    Loss (float64):
        loss_i = (1−ε)·w_y·((m − z_y) + log s) + (ε/C)·(W·((m − r) + log s) − S_z),  W = Σ_c w_c
               = (1−ε)·w_y·(lse − z_y) + (ε/C)·Σ_c w_c·(lse − z_c)

    Pass 2 (one write of the row; exp recomputed, no probabilities stored):
        A   = (1−ε)·w_y + ε·W/C
        c   = (g_i·A + g^z_i·2·λ_z·lse) / s          so that c·exp(z_j − m) = coefficient·p_j
        β_j = −ε·g_i·w_j/C
        grad_ij = s'(x_ij)·(c·exp(z_j − m) + β_j),   s'(x) = 1 − tanh²(x/softcap)  (1 without cap)
    then the target entry is rewritten in float64 (it needs the −(1−ε)·w_y·g_i term):
        grad_iy = s'(x_iy)·(g_i·(p_y·A − (1−ε)·w_y − ε·w_y/C) + g^z_i·2·λ_z·lse·p_y),
        p_y = exp((z_y − m) − log s)

Pass 2 reads x_ij and then writes grad_ij of the same element, and x_iy is saved before pass 2,
so ``grad_out`` may be the logits array itself (in place). In place, the pass-2 loops take the
single array as both source and destination, so LLVM sees one pointer and vectorizes them
without an aliasing check.

Accuracy: exponentials in the logits' dtype (``_exp.py``: ≤ 1 ulp); a block's sum in that
dtype over the vector lanes, also for blocks holding the running max: there the terms equal to the
max (exactly 1) are counted apart and the others, each below 1, summed in the dtype's lanes
(``_block_sum_exp_top``; float64 lanes, ``_block_sum_exp_wide``, only for infinite maxima, and
``_block_sum_exp_capped_top`` with a softcap); everything across blocks and per row in float64,
where the row keeps its excess e = s − 1 = (count of max terms − 1) + the rest, and takes
log s = log1p(e): a confident row's loss log1p(e) ≈ e (1e-15, say) and its target gradient
−e/s keep their relative accuracy (the float32 rounding of the exponents x − m, ~1e-7
relative; float64 within a few ulps). For float32 logits, measured against the float64
reference on the same values (``tests/test_numerics.py`` and ``tests/test_accuracy_bounds.py``):
the per-row loss is within 4e-7·max(1, loss) absolute (about 1e-7 relative for losses of order
1); with a softcap s the capped logits carry float32's rounding of s·tanh(x/s), and the bound
becomes 4·ulp(s) + 4e-7 absolute (ulp(30) = 1.9e-6).

Special values: a −inf logit contributes exp(−inf) = 0 and gradient 0 (blocks of −inf before
the first finite block are summed with shift 0, never as exp(−inf − (−inf))); a NaN anywhere in
a row makes that row's loss and gradient NaN, and so does a +inf logit (∞ − ∞, as in PyTorch);
an infinite upstream gradient g gives PyTorch's values too (g·p_j, NaN where p_j = 0 and at the
target, g·p_y·A − g·w_y = ∞ − ∞; an option that is off adds no 0·g term). Finite logits of any
size (±1e30 in float32, ±1e300 in float64) stay finite because every exponent is z_j − max ≤ 0. Ignored rows get loss
0, lse 0 and a zero gradient row.

Drivers: ``_cross_entropy_rows_kernel`` gives each thread whole rows (the usual case; also run
on the calling thread alone for small problems). ``_cross_entropy_split_kernel`` is for fewer
rows than threads with long rows: it cuts rows into segments, runs pass 1 per segment, merges
the segments' (m, s, S_z) per row, then runs pass 2 per segment. ``_cross_entropy_tile_kernel``
is for rows of at most ``TILE_MAX_CLASSES`` classes (10-class classifiers, say), where a row is
shorter than a vector loop's body: it takes tiles of whole rows and computes their exponentials
in one flat loop across the rows, stores them, and builds each row's gradient from them (the
same loss formula, ``_finish_row``, and pass 2's gradient arithmetic).

Developers: Numba's cache (``cache=True``, in ``__pycache__``) is keyed on each kernel's own file
only; after editing ``_exp.py``, or helpers here that other modules' kernels inline (the tile
helpers in ``probabilities.py``'s tile kernel, ``_pass1`` and ``_finish_row``), delete
``src/xentkit/kernels/__pycache__`` or the old code stays compiled in.

No validation here: the api checks shapes, dtypes and labels before calling.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from xentkit.kernels._exp import (
    capped_product,
    difference,
    fast_exp,
    fast_exp_nonpositive,
    fast_log1p,
    fast_tanh,
    like,
    maxnum,
)
from xentkit.kernels._jit import KERNEL_OPTIONS, LOOP_FLAGS, helper_options
from xentkit.kernels._threading import (
    prefer_tbb,
    running_on,
    runs_serial,
    serial_build,
    threads_for,
)

# Numba's threading layer, chosen before any kernel starts threads: TBB (fork-safe) where it is
# ours to choose; see _threading.
THREADING_LAYER = prefer_tbb()

# The per-block loops (reassoc, contract; inlined into the kernels) and the kernels' own options
# (no fast-math flags): see ``kernels._jit``.
_JIT = helper_options(LOOP_FLAGS)
_KERNEL_JIT = KERNEL_OPTIONS

# Problems up to this many logits run on one thread: waking the thread pool costs more than it
# saves (tens of microseconds on idle cores, milliseconds when other processes hold them).
SERIAL_MAX_ELEMENTS = 1 << 16

# Fewer rows than threads: rows of at least 2·MIN_SEGMENT classes are cut into segments of at
# least MIN_SEGMENT classes, processed in parallel. Large, because the split kernel has three
# parallel loops, and each waits for every thread: on a machine whose cores are busy with other
# processes a thread can take a scheduler slice (milliseconds) to join.
MIN_SEGMENT = 65536

# Rows of at most this many classes (and no longer than ``block``) take the tile kernel: a row's
# loops are shorter than the vector loop's body there, so the row kernel's exponentials ran in the
# scalar remainder loop, one per element. The tile kernel takes TILE_ELEMENTS logits of whole rows
# at a time and computes their exponentials in one flat loop, vectorized across rows, kept for the
# gradient. Measured on 2 AVX2 cores (float32, 655360 logits, fastest of 41 calls, row kernel →
# tile kernel): 10 classes 3.35 → 2.51 ms, 16 2.18 → 1.86, 24 1.73 → 1.63, 28 1.69 → 1.57,
# 32 1.20 → 1.33 (slower), 64 0.81 → 1.05. Probability targets have their own limit
# (``probabilities.TILE_MAX_CLASSES``). Since the tile's row maxima are taken by a select (not
# maxnum) the tile kernel is ahead at 32 classes too: on an AVX-512 machine (whose 16-lane vector
# loops are longer still), 655360 float32 logits, kernel alone, best of 41, row → tile: one
# thread 2.29 → 1.74 ms, two threads 1.13 → 0.91 (40 and 48 classes ahead there too,
# 64 behind: 1.19 → 1.69; on the AVX2 machine the select's ~15% would bring 32 to about level,
# 48 still behind).
TILE_MAX_CLASSES = 32
TILE_ELEMENTS = 4096

# Classes per pass-1 block: 1024 (4 KiB of float32) stays in L1 between the block's two loops,
# and is long enough for the per-block work to vanish (512-1024 measured fastest on 4096×32000
# and 1024×128256).
DEFAULT_BLOCK = 1024


# ---------------------------------------------------------------------------------------------
# Pass 1 pieces (read-only, one block of one row)
# ---------------------------------------------------------------------------------------------


@njit(**_JIT)
def _block_max(row, start, stop):  # pragma: no cover - compiled
    """max_j row[j] over [start, stop), NaN ignored (the sums below propagate NaN)."""
    seg = row[start:stop]
    m = like(-np.inf, row)
    for j in range(seg.shape[0]):
        m = maxnum(m, seg[j])
    return m


@njit(**_JIT)
def _short_max(row, start, stop):  # pragma: no cover - compiled
    """``_block_max`` by a select, for rows too short to reach maxnum's vector loop (under 32
    classes), where maxnum's NaN handling costs three instructions an element. The tile kernels
    take it for every row (``_tile_exponentials``), the softmax and the log-prob statistics
    kernels for such rows (one thread, 655360 float32 logits,
    best of 41, an AVX-512 machine: softmax at 10 / 16 / 24 classes 1.63 → 1.34, 1.13 → 0.81,
    0.99 → 0.67 ms; statistics 2.47 → 2.38, 1.77 → 1.56, 1.66 → 1.39; 3% slower at 40 and 128,
    level at 64). In pass 1 (cross-entropy rows, log-softmax, logsumexp) it measured level or
    slower, and is not used."""
    m = like(-np.inf, row)
    for j in range(start, stop):
        v = row[j]
        m = v if v > m else m
    return m


@njit(**_JIT)
def _block_sum_exp(row, start, stop, shift):  # pragma: no cover - compiled
    """Σ_j exp(row[j] − shift) over [start, stop), summed in the array's dtype (vector lanes)."""
    seg = row[start:stop]
    acc = like(0.0, row)
    for j in range(seg.shape[0]):
        acc += fast_exp_nonpositive(seg[j] - shift)
    return np.float64(acc)


@njit(**_JIT)
def _block_sum_exp_wide(row, start, stop, shift):  # pragma: no cover - compiled
    """As ``_block_sum_exp`` but summed in float64, for the blocks holding the running max.

    There one term is exactly 1, and a float32 sum would round 1 + δ to float32's 6e-8: for a
    confident row (loss = log(1 + δ) ≈ δ small) that is a large relative error. In float64 the
    loss keeps its relative accuracy; the other blocks' terms are scaled by exp(m_block − m) and
    their float32 rounding stays relative to δ. (Half the vector width, but only for the few
    blocks that raise or tie the max.)
    """
    seg = row[start:stop]
    acc = 0.0
    for j in range(seg.shape[0]):
        acc += np.float64(fast_exp_nonpositive(seg[j] - shift))
    return acc


@njit(**_JIT)
def _block_sum_exp_top(row, start, stop, shift):  # pragma: no cover - compiled
    """``_block_sum_exp_wide``'s sum at the dtype's full vector width, for a block whose max is the
    finite ``shift``, in two parts ``(k, δ)`` (float64): k the number of terms equal to the max
    (each exactly 1) and δ = Σ_{row[j] < shift} exp(row[j] − shift) summed in the array's dtype.
    Every term of δ is below 1, so its rounding stays relative to δ, and kept apart from k it
    stays so in the row's excess e = s − 1 = (k − 1) + δ (what a confident row's loss log1p(e)
    needs) without float64 lanes. A NaN goes to δ (NaN ≥ shift is false) and makes it NaN.
    Counts are exact in float32 up to 2^24 terms per block."""
    seg = row[start:stop]
    zero = like(0.0, row)
    one = like(1.0, row)
    below = zero
    ties = zero
    for j in range(seg.shape[0]):
        x = seg[j]
        top = x >= shift
        term = fast_exp_nonpositive(x - shift)
        below += zero if top else term
        ties += one if top else zero
    return np.float64(ties), np.float64(below)


@njit(**_JIT)
def _block_sum_exp_capped(row, start, stop, shift, cap, inv_cap):  # pragma: no cover
    """Σ_j exp(cap·tanh(row[j]/cap) − shift) over [start, stop), summed in the array's dtype."""
    seg = row[start:stop]
    acc = like(0.0, row)
    for j in range(seg.shape[0]):
        t, _ = fast_tanh(seg[j] * inv_cap)
        acc += fast_exp_nonpositive(capped_product(cap, t) - shift)
    return np.float64(acc)


@njit(**_JIT)
def _block_sum_exp_capped_top(row, start, stop, shift, cap, inv_cap):  # pragma: no cover
    """The capped block sum Σ exp(cap·tanh(x/cap) − shift) in two parts ``(k, δ)``, as
    ``_block_sum_exp_top`` (and for its reasons, summed in the array's dtype): k the number of
    capped logits equal to the finite max ``shift``, δ the sum of the other terms. (Summed in
    float64, with a float32 row's terms widened one by one, this loop took 40 times as long:
    38 ns a logit, against 0.9 ns; a review found softcapped cross-entropy 60-90 times slower
    than without the cap.)"""
    seg = row[start:stop]
    zero = like(0.0, row)
    one = like(1.0, row)
    ties = zero
    below = zero
    for j in range(seg.shape[0]):
        t, _ = fast_tanh(seg[j] * inv_cap)
        z = capped_product(cap, t)
        top = z >= shift
        term = fast_exp_nonpositive(z - shift)
        below += zero if top else term
        ties += one if top else zero
    return np.float64(ties), np.float64(below)


@njit(**_JIT)
def _block_sum_z(row, start, stop, weight, has_weight, ref):  # pragma: no cover - compiled
    """``(Σ_j w_j·(row[j] − ref), Σ_j w_j)`` over [start, stop) in float64 (w_j = 1 without
    weights: the second is the class count), in one loop. A class of weight 0 adds 0, even
    masked (row[j] = −inf: 0·log 0 = 0, as the reference's smoothing term)."""
    seg = row[start:stop]
    acc = 0.0
    if has_weight:
        wseg = weight[start:stop]
        total = 0.0
        for j in range(seg.shape[0]):
            w = np.float64(wseg[j])
            acc += 0.0 if w == 0.0 else w * difference(np.float64(seg[j]), ref)
            total += w
        return acc, total
    for j in range(seg.shape[0]):
        acc += difference(np.float64(seg[j]), ref)
    return acc, np.float64(seg.shape[0])


@njit(**_JIT)
def _block_sum_z_capped(
    row, start, stop, weight, has_weight, ref, cap, inv_cap
):  # pragma: no cover
    """``(Σ_j w_j·(cap·tanh(row[j]/cap) − ref), Σ_j w_j)`` over [start, stop) in float64."""
    seg = row[start:stop]
    acc = 0.0
    if has_weight:
        wseg = weight[start:stop]
        total = 0.0
        for j in range(seg.shape[0]):
            t, _ = fast_tanh(seg[j] * inv_cap)
            w = np.float64(wseg[j])
            acc += w * (np.float64(capped_product(cap, t)) - ref)
            total += w
        return acc, total
    for j in range(seg.shape[0]):
        t, _ = fast_tanh(seg[j] * inv_cap)
        acc += np.float64(capped_product(cap, t)) - ref
    return acc, np.float64(seg.shape[0])


# ---------------------------------------------------------------------------------------------
# Pass 2 pieces (a row or a segment of one). Each comes twice: source → destination, and in
# place (one array: no aliasing check, so LLVM vectorizes it).
# ---------------------------------------------------------------------------------------------


@njit(**_JIT)
def _grad(x, g, m, c, beta):  # pragma: no cover - compiled
    """g[j] = c·exp(x[j] − m) + β  (one row)."""
    for j in range(x.shape[0]):
        g[j] = c * fast_exp_nonpositive(x[j] - m) + beta


@njit(**_JIT)
def _grad_inplace(x, m, c, beta):  # pragma: no cover - compiled
    for j in range(x.shape[0]):
        x[j] = c * fast_exp_nonpositive(x[j] - m) + beta


@njit(**_JIT)
def _grad_weighted(x, g, m, c, beta, w):  # pragma: no cover - compiled
    """g[j] = c·exp(x[j] − m) + β·w_j  (one row)."""
    for j in range(x.shape[0]):
        g[j] = c * fast_exp_nonpositive(x[j] - m) + beta * w[j]


@njit(**_JIT)
def _grad_weighted_inplace(x, m, c, beta, w):  # pragma: no cover - compiled
    for j in range(x.shape[0]):
        x[j] = c * fast_exp_nonpositive(x[j] - m) + beta * w[j]


@njit(**_JIT)
def _grad_capped(x, g, m, c, beta, w, has_weight, cap, inv_cap):  # pragma: no cover
    """g[j] = s'(x_j)·(c·exp(z_j − m) + β·w_j), z = cap·tanh(x/cap), s' = 1 − tanh² (one row)."""
    if has_weight:
        for j in range(x.shape[0]):
            t, d = fast_tanh(x[j] * inv_cap)
            g[j] = d * (c * fast_exp_nonpositive(capped_product(cap, t) - m) + beta * w[j])
    else:
        for j in range(x.shape[0]):
            t, d = fast_tanh(x[j] * inv_cap)
            g[j] = d * (c * fast_exp_nonpositive(capped_product(cap, t) - m) + beta)


@njit(**_JIT)
def _grad_capped_inplace(x, m, c, beta, w, has_weight, cap, inv_cap):  # pragma: no cover
    if has_weight:
        for j in range(x.shape[0]):
            t, d = fast_tanh(x[j] * inv_cap)
            x[j] = d * (c * fast_exp_nonpositive(capped_product(cap, t) - m) + beta * w[j])
    else:
        for j in range(x.shape[0]):
            t, d = fast_tanh(x[j] * inv_cap)
            x[j] = d * (c * fast_exp_nonpositive(capped_product(cap, t) - m) + beta)


@njit(**_JIT)
def _zero_row(g):  # pragma: no cover - compiled
    zero = like(0.0, g)
    for j in range(g.shape[0]):
        g[j] = zero


@njit(forceinline=True, **_KERNEL_JIT)
def _ignored_row(loss_rows, lse_rows, r, grad, want_grad):  # pragma: no cover - compiled
    """Row ``r``'s target is ``ignore_index``: loss 0, lse 0 and (``want_grad``) a zero gradient
    in row ``r`` of ``grad`` (the whole [N, C] gradient, the logits in place: indexed, not viewed)."""
    loss_rows[r] = 0.0
    lse_rows[r] = 0.0
    if want_grad:
        zero = like(0.0, grad)
        for j in range(grad.shape[1]):
            grad[r, j] = zero


# ---------------------------------------------------------------------------------------------
# One row, in three steps (shared by the row kernel and the split-row kernel)
# ---------------------------------------------------------------------------------------------


@njit(forceinline=True, **_KERNEL_JIT)
def _pass1(row, start, stop, weight, has_weight, eps, softcap, block):  # pragma: no cover
    """Pass 1 over row[start:stop]: ``(m, e, S_z, r)``.

    m = max z_j, e = s − 1 the excess of s = Σ exp(z_j − m) over the max's own term (−1 for a
    row without a finite max: s = 0), S_z = Σ w_j·(z_j − r) (only when ε > 0), r = the running
    max once finite (0 while there is none), in blocks of ``block`` classes. s is kept in two
    parts, k the number of terms equal to the running max (each exactly 1) and the sum of the
    others, and e = (k − 1) + rest: a confident row's excess (its loss log1p(e) ≈ e, 1e-15 say)
    keeps its relative accuracy, where log of the float64 sum 1 + e rounded it to ~1e-16
    absolute. When the max rises, both parts scale into the rest. S_z follows r as s
    follows m: when the max rises from r to b, S_z −= W_seen·(b − r), W_seen = Σ w_j over the
    classes summed so far. (Kept at the first finite max instead, r stayed far below m after a
    first block of very negative logits, −1e300 or a dtype's min masking classes of weight 0,
    and the loss's W·(m − r) − S_z cancelled to garbage: 5.2e283 for 6.688, NaN at float64's
    min.)
    """
    capped = softcap > 0.0
    cap = like(softcap, row)
    inv_cap = like(1.0 / softcap if capped else 1.0, row)
    neg_inf = like(-np.inf, row)
    pos_inf = like(np.inf, row)
    zero = like(0.0, row)
    m = neg_inf
    ties = 0.0  # terms equal to the running max (exactly 1 each)
    rest = 0.0  # the other terms
    sum_z = 0.0
    ref = 0.0
    weight_seen = 0.0
    for block_start in range(start, stop, block):
        block_stop = min(block_start + block, stop)
        b = _block_max(row, block_start, block_stop)
        if capped:
            # tanh is increasing: max_j z_j = cap·tanh(max_j x_j / cap)
            tb, _ = fast_tanh(b * inv_cap)
            b = cap * tb
        if b > m:
            # s·exp(m_old − m_new); while m_old = −inf, s is 0 (or NaN) and stays so: no exp
            if m != neg_inf:
                rest = (ties + rest) * math.exp(np.float64(m) - np.float64(b))
                ties = 0.0
                # (no weight seen: nothing to move, and 0·∞ would be NaN for a span beyond the dtype)
                if eps > 0.0 and weight_seen != 0.0:
                    sum_z -= weight_seen * (np.float64(b) - ref)
            ref = np.float64(b)
            m = b
        # while every logit so far is −inf (or NaN), shift by 0: exp(−inf) = 0, NaN stays NaN
        shift = m if m > neg_inf else zero
        # a block holding the running max has terms exactly 1: counted apart from the rest
        # (_block_sum_exp_top; with an infinite max, or blocks of −inf, all to the rest)
        if capped:  # (a capped max is finite, for ±inf logits too; NaN goes to the rest)
            if b == m:
                block_ties, block_rest = _block_sum_exp_capped_top(row, block_start, block_stop, m, cap, inv_cap)
                ties += block_ties
                rest += block_rest
            else:
                rest += _block_sum_exp_capped(row, block_start, block_stop, shift, cap, inv_cap)
        elif b == m:
            if neg_inf < m < pos_inf:  # the max's terms are exactly 1, every other one below
                block_ties, block_rest = _block_sum_exp_top(row, block_start, block_stop, m)
                ties += block_ties
                rest += block_rest
            else:  # blocks of −inf (shift 0), or a +inf logit (∞ − ∞: NaN, as torch)
                rest += _block_sum_exp_wide(row, block_start, block_stop, shift)
        else:
            rest += _block_sum_exp(row, block_start, block_stop, shift)
        if eps > 0.0:
            if capped:
                block_z, block_w = _block_sum_z_capped(
                    row, block_start, block_stop, weight, has_weight, ref, cap, inv_cap
                )
            else:
                block_z, block_w = _block_sum_z(row, block_start, block_stop, weight, has_weight, ref)
            sum_z += block_z
            weight_seen += block_w
    return m, (ties - 1.0) + rest, sum_z, ref


@njit(forceinline=True, **_KERNEL_JIT)
def log_of_excess(excess):  # pragma: no cover - compiled
    """log s = log1p(e) of a row's excess e = s − 1 (libm's, one row at a time), −inf for s = 0
    and NaN for NaN; above e = 1/4 as log(1 + e), which rounds to within 4 ulps of it there and
    costs half of log1p (measured 5 against 10 ns a call: log-softmax of 32-class rows is ~20%
    slower with log1p everywhere)."""
    return math.log(1.0 + excess) if excess > 0.25 else math.log1p(excess)


@njit(forceinline=True, **_KERNEL_JIT)
def _finish_row(  # pragma: no cover - compiled
    m, excess, sum_z, ref, x_y, w_y, n_classes, weight_sum, eps, z_loss, softcap, g, g_z, vector=False
):
    """From pass-1 statistics (``excess`` e = s − 1): ``(loss, lse, c, β, grad_y)`` in float64.
    ``vector`` (a constant at each call site, folded once inlined): the vectorizable log1p and exp
    (within a few ulps), for a loop over rows that LLVM vectorizes (``_tile_finish``); else
    libm's, faster one row at a time.

    loss = (1−ε)·w_y·((m − z_y) + log s) + (ε/C)·(W·((m − r) + log s) − S_z)
         = (1−ε)·w_y·(lse − z_y) + (ε/C)·Σ_c w_c·(lse − z_c)
    written around m so that log s survives when |m| ≫ log s (m = 1e30, say), and log s taken as
    log1p(e), so that a confident row's loss keeps its relative accuracy.
    c = (g·A + g_z·2·λ_z·lse)/s and β = −ε·g/C are pass 2's coefficients, A = (1−ε)·w_y + ε·W/C;
    grad_y = s'(x_y)·(g·(p_y·A − (1−ε)·w_y − ε·w_y/C) + g_z·2·λ_z·lse·p_y) is the target entry
    (with p_y − 1 = −e/s where z_y is the max). z_y is computed as pass 1 computes z (working
    dtype), s'(x_y) in float64.
    """
    if softcap > 0.0:
        t_y, _ = fast_tanh(x_y * like(1.0 / softcap, x_y))
        z_y = np.float64(like(softcap, x_y) * t_y)
        _, d_y = fast_tanh(np.float64(x_y) / softcap)
    else:
        z_y = np.float64(x_y)
        d_y = 1.0
    m64 = np.float64(m)
    s = 1.0 + excess
    log_s = fast_log1p(excess) if vector else log_of_excess(excess)
    lse = m64 + log_s
    # a target of weight 0 adds nothing, even masked (z_y = −inf in a row of finite lse: log p_y =
    # −inf, 0·log 0 = 0, as the reference)
    masked = (w_y == 0.0) & (z_y == -math.inf) & (abs(lse) < math.inf)  # (no branch: the tile loop vectorizes)
    loss = 0.0 if masked else (1.0 - eps) * w_y * ((m64 - z_y) + log_s)
    if eps > 0.0:
        loss += (eps / n_classes) * (weight_sum * ((m64 - ref) + log_s) - sum_z)
    # An absent option adds no term (not 0·g, which is NaN for g = ±inf, nor 0·W, NaN for an
    # infinite weight on a class no sample has): torch's behaviour.
    a = (1.0 - eps) * w_y
    if eps > 0.0:
        a += eps * weight_sum / n_classes
    z_coef = 2.0 * z_loss * lse * g_z if z_loss > 0.0 else 0.0  # d(λ_z·lse²)/dlse · upstream
    c = (g * a + z_coef) / s
    beta = -eps * g / n_classes if eps > 0.0 else 0.0
    p_y = fast_exp((z_y - m64) - log_s) if vector else math.exp((z_y - m64) - log_s)
    if math.isfinite(g) and z_y == m64 and math.isfinite(a):
        # the target at the row's max: p_y − 1 = −e/s, not p_y − 1 rounded (for a confident row
        # that left ~1e-16 of its −e, the loss's own size); the same terms regrouped,
        # p_y·A − (1−ε)·w_y − ε·w_y/C = (1−ε)·w_y·(p_y − 1) + (ε/C)·(W·p_y − w_y)
        target = (1.0 - eps) * w_y * (-excess / s)
        if eps > 0.0:
            target += (eps / n_classes) * (weight_sum * p_y - w_y)
        grad_y = d_y * (g * target + z_coef * p_y)
    elif math.isfinite(g):
        grad_y = d_y * (g * (p_y * a - (1.0 - eps) * w_y - eps * w_y / n_classes) + z_coef * p_y)
    else:
        # an infinite (or NaN) upstream: torch's order, g·p_y·A − g·w_y, which is NaN (∞ − ∞)
        # where the factored form would give −∞
        target_term = g * ((1.0 - eps) * w_y + eps * w_y / n_classes)
        grad_y = d_y * ((g * p_y * a - target_term) + z_coef * p_y)
    return loss, lse, c, beta, grad_y


@njit(forceinline=True, **_KERNEL_JIT)
def _pass2(  # pragma: no cover - compiled
    row, dst, start, stop, m, c, beta, weight_work, has_weight, eps, softcap, in_place
):
    """Pass 2 over [start, stop): dst_j = s'(x_j)·(c·exp(z_j − m) + β·w_j) (w_j = 1 without
    weights). In place (``dst`` is ``row``) the loops take the one array, so LLVM vectorizes them
    without an aliasing check.
    """
    capped = softcap > 0.0
    c = like(c, row)
    beta = like(beta, row)
    src = row[start:stop]
    out = dst[start:stop]
    w = weight_work[start:stop] if has_weight else weight_work
    # β·w_j only with label smoothing: without it β is 0, and 0·w_j would be NaN for an infinite
    # weight on a class no sample has
    smooth_weighted = has_weight and eps > 0.0
    if capped:
        cap = like(softcap, row)
        inv_cap = like(1.0 / softcap, row)
        if in_place:
            _grad_capped_inplace(src, m, c, beta, w, smooth_weighted, cap, inv_cap)
        else:
            _grad_capped(src, out, m, c, beta, w, smooth_weighted, cap, inv_cap)
    elif smooth_weighted:
        if in_place:
            _grad_weighted_inplace(src, m, c, beta, w)
        else:
            _grad_weighted(src, out, m, c, beta, w)
    elif in_place:
        _grad_inplace(src, m, c, beta)
    else:
        _grad(src, out, m, c, beta)


# ---------------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------------


@njit(parallel=True, **_KERNEL_JIT)
def _cross_entropy_rows_kernel(  # pragma: no cover - compiled
    logits,
    labels,
    weight,
    weight_work,
    has_weight,
    weight_sum,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    grad_scale,
    z_grad_scale,
    grad_out,
    want_grad,
    in_place,
    block,
    loss_rows,
    lse_rows,
):
    """Every row, spread over Numba's threads (``prange`` over rows): pass 1, loss, pass 2.

    ``softcap`` 0 means no cap; without weights ``has_weight`` is False and ``weight`` /
    ``weight_work`` are 1-element dummies; ``grad_out``, ``grad_scale`` and ``z_grad_scale`` are
    dummies unless ``want_grad`` (in place ``grad_out`` is the logits themselves).
    """
    n_rows, n_classes = logits.shape
    eps = label_smoothing
    for i in prange(n_rows):
        row = logits[i]
        dst = row if in_place else grad_out[i]
        y = labels[i]
        if y == ignore_index:
            _ignored_row(loss_rows, lse_rows, i, grad_out, want_grad)
            continue
        # ---- Pass 1: m = max_j z_j, e = Σ_j exp(z_j − m) − 1 (one read of the row) ----
        m, excess, sum_z, ref = _pass1(row, 0, n_classes, weight, has_weight, eps, softcap, block)
        # ---- Loss and pass-2 coefficients (x_y read before pass 2 may overwrite it) ----
        g = grad_scale[i] if want_grad else 0.0
        g_z = z_grad_scale[i] if want_grad else 0.0
        w_y = weight[y] if has_weight else 1.0
        loss, lse, c, beta, grad_y = _finish_row(
            m, excess, sum_z, ref, row[y], w_y, n_classes, weight_sum, eps, z_loss, softcap, g, g_z
        )
        loss_rows[i] = loss
        lse_rows[i] = lse
        if want_grad:
            # ---- Pass 2: grad_ij = s'(x_ij)·(c·exp(z_j − m) + β·w_j) (one write) ----
            _pass2(
                row, dst, 0, n_classes, m, c, beta, weight_work, has_weight, eps, softcap, in_place
            )
            # the target entry: −(1−ε)·w_y·g on top of the smooth terms, in float64
            dst[y] = grad_y


# the row kernel on the calling thread alone, for one thread and one segment (see serial_build)
_cross_entropy_rows_serial = serial_build(_cross_entropy_rows_kernel, "_cross_entropy_rows_serial", **_KERNEL_JIT)


# ---------------------------------------------------------------------------------------------
# The tile kernel: rows of few classes, a tile of whole rows at a time
# ---------------------------------------------------------------------------------------------


@njit(**_JIT)
def _tile_exps(x, shifts, e):  # pragma: no cover - compiled
    """e_k = exp(x_k − shift_k) over a tile's flat logits (one loop across its rows)."""
    for k in range(x.shape[0]):
        e[k] = fast_exp_nonpositive(x[k] - shifts[k])


@njit(**_JIT)
def _tile_exps_capped(x, shifts, e, d, cap, inv_cap):  # pragma: no cover - compiled
    """e_k = exp(cap·tanh(x_k/cap) − shift_k) and d_k = 1 − tanh²(x_k/cap) over a flat tile."""
    for k in range(x.shape[0]):
        t, d_k = fast_tanh(x[k] * inv_cap)
        e[k] = fast_exp_nonpositive(capped_product(cap, t) - shifts[k])
        d[k] = d_k


@njit(forceinline=True, **_KERNEL_JIT)
def _tile_sum(e, start, stop):  # pragma: no cover - compiled
    """The excess Σ e[start:stop] − 1 in float64 of a row's sum of exponentials, as ``_pass1``
    gives it: the terms of the row's max (exactly 1) counted apart from the others (each below 1),
    which are summed on their own, so that a confident row's excess keeps its relative accuracy
    (added to 1 term by term it would round at ulp(1)): floor(e) is 1 for those and 0 for the
    others (all in [0, 1]), NaN for NaN, so no branch. −1 for a row of −inf (s = 0). One loop in
    a fixed order, no reassoc flag: the parallel and serial builds add alike."""
    ties = 0.0
    below = 0.0
    for k in range(start, stop):
        v = np.float64(e[k])
        top = np.floor(v)  # 1 for a term of the max, 0 for the others (all in [0, 1]), NaN for NaN
        ties += top
        below += v - top
    return (ties - 1.0) + below


@njit(**helper_options({"contract"}))
def _tile_grad_plain(e, start, grad, r, n_classes, c, beta):  # pragma: no cover - compiled
    """grad[r, j] = c·e_j + β from the row's exponentials e[start:]: ``_grad``'s arithmetic (a
    fused multiply-add where the CPU has one, as there) on the kept exponentials. ``grad`` is the
    whole [N, C] gradient (the logits, in place) indexed by row: no view of the row, whose
    reference count would cost more than the row's arithmetic at 10 classes."""
    for j in range(n_classes):
        grad[r, j] = c * e[start + j] + beta


@njit(**_JIT)
def _tile_grad(e, d, start, grad, r, n_classes, c, beta, w, smooth_weighted, capped):  # pragma: no cover
    """grad[r, j] = s'(x_j)·(c·e_j + β·w_j), from the row's exponentials e[start:] (``_pass2``'s
    formula without recomputing them), with a softcap or weighted smoothing (the plain case:
    ``_tile_grad_plain``)."""
    if capped and smooth_weighted:
        for j in range(n_classes):
            grad[r, j] = d[start + j] * (c * e[start + j] + beta * w[j])
    elif capped:
        for j in range(n_classes):
            grad[r, j] = d[start + j] * (c * e[start + j] + beta)
    else:
        for j in range(n_classes):
            grad[r, j] = c * e[start + j] + beta * w[j]


@njit(forceinline=True, **_KERNEL_JIT)
def _tiles(n_rows, n_classes):  # pragma: no cover - compiled
    """``(tile_rows, n_tiles)``: whole rows of about TILE_ELEMENTS logits a tile, and how many."""
    tile_rows = max(1, TILE_ELEMENTS // max(n_classes, 1))
    return tile_rows, (n_rows + tile_rows - 1) // tile_rows


# rows of _tile_finish's float64 work array: inputs e = s − 1, S_z, r, w_y, g, g_z; outputs loss,
# lse, c, β, grad_y
_TILE_WORK = 11


@njit(**_KERNEL_JIT)
def _tile_finish(found, work, n_classes, weight_sum, eps, z_loss, softcap):  # pragma: no cover
    """``_finish_row`` for each row of a tile, in one loop over the rows: ``found`` holds each
    row's m and x_y (the logits' dtype), ``work`` (float64, ``_TILE_WORK`` × rows) its s, S_z,
    r, w_y, g, g_z (s as its excess e = s − 1), and receives its loss, lse, c, β and grad_y. The
    log1p, exp and division of every row then run in vector lanes (measured in a loop of its own on AVX2, one thread: 6.1 ns
    a row, against 12.8 ns with libm's log and exp one row at a time)."""
    for i in range(work.shape[1]):
        loss, lse, c, beta, grad_y = _finish_row(
            found[0, i], work[0, i], work[1, i], work[2, i], found[1, i], work[3, i], n_classes, weight_sum,
            eps, z_loss, softcap, work[4, i], work[5, i], True,
        )
        work[6, i] = loss
        work[7, i] = lse
        work[8, i] = c
        work[9, i] = beta
        work[10, i] = grad_y


@njit(**_KERNEL_JIT)
def _tile_exponentials(logits, first, rows, capped, cap, inv_cap):  # pragma: no cover - compiled
    """The first step of a tile of ``rows`` rows from row ``first`` (both tile kernels):
    ``(maxima, e, d)``, each row's max m of z (the capped logits), e = exp(z − shift) of every
    logit of the tile (shift = m, or 0 for a row of −inf) in one flat loop across the rows, and
    d = s'(x) with a softcap (a 1-element dummy without)."""
    n_classes = logits.shape[1]
    size = rows * n_classes
    neg_inf = like(-np.inf, logits)
    zero = like(0.0, logits)
    shifts = np.empty(size, logits.dtype)
    e = np.empty(size, logits.dtype)
    d = np.empty(size if capped else 1, logits.dtype)
    maxima = np.empty(rows, logits.dtype)
    flat = logits[first : first + rows].reshape(size)
    for i in range(rows):
        # The row's max, NaN ignored, from the flat tile (a view of each row would cost its
        # reference count), by ``_short_max``'s select, not ``maxnum`` (one thread, 655360 float32
        # logits, kernel alone, best of 41: 32 classes 2.05 -> 1.74 ms, 16 classes 2.21 -> 1.98,
        # on an AVX-512 machine).
        b = _short_max(flat, i * n_classes, (i + 1) * n_classes)
        if capped:  # tanh is increasing: max_j z_j = cap·tanh(max_j x_j / cap)
            tb, _ = fast_tanh(b * inv_cap)
            b = cap * tb
        maxima[i] = b
        shift = b if b > neg_inf else zero
        for j in range(i * n_classes, (i + 1) * n_classes):
            shifts[j] = shift
    if capped:
        _tile_exps_capped(flat, shifts, e, d, cap, inv_cap)
    else:
        _tile_exps(flat, shifts, e)
    return maxima, e, d


@njit(parallel=True, **_KERNEL_JIT)
def _cross_entropy_tile_kernel(  # pragma: no cover - compiled
    logits,
    labels,
    weight,
    weight_work,
    has_weight,
    weight_sum,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    grad_scale,
    z_grad_scale,
    grad_out,
    want_grad,
    in_place,
    block,
    loss_rows,
    lse_rows,
):
    """The row kernel's contract and arguments (``block`` unused: each row is one block) for rows
    of at most ``TILE_MAX_CLASSES`` classes, ``prange`` over tiles of whole rows:

        per row:   m = max_j z_j, its shift (m, or 0 if m = −inf) for each of its classes
        the tile:  e_k = exp(z_k − shift_k), one flat loop over the tile's logits (vectorized
                   across rows), with s'(x_k) for a softcap
        per row:   s = Σ_j e_j (float64), S_z, x_y, w_y and the upstream gradients, gathered
        the tile:  ``_tile_finish``: ``_finish_row`` (the loss and pass 2's coefficients) for
                   every row in one loop, vectorized across rows (its log1p and exp:
                   ``fast_log1p``, ``fast_exp``)
        per row:   the loss, and the gradient c·e_j + β·w_j from the stored e_j

    The same statistics as one pass-1 block of the row kernel (s with the max's terms counted
    apart, as ``_block_sum_exp_top``, but in float64), the loss from the same ``_finish_row``, the
    gradient with pass 2's formula (c·e_j + β·w_j in the logits' dtype, fused multiply-adds
    allowed) on the same e_j. s's last bits may differ from the row kernel's, and so may the
    log's and exp's (within 1 ulp of libm's, which the row kernels call), and where LLVM puts a
    fused multiply-add: with weighted label smoothing c·e_j and β·w_j can nearly cancel, and then
    an entry may differ by many ulps of those terms (equally accurate).
    """
    n_rows, n_classes = logits.shape
    eps = label_smoothing
    capped = softcap > 0.0
    cap = like(softcap, logits)
    inv_cap = like(1.0 / softcap if capped else 1.0, logits)
    neg_inf = like(-np.inf, logits)
    smooth_weighted = has_weight and eps > 0.0
    tile_rows, n_tiles = _tiles(n_rows, n_classes)
    for tile in prange(n_tiles):
        first = tile * tile_rows
        rows = min(tile_rows, n_rows - first)
        maxima, e, d = _tile_exponentials(logits, first, rows, capped, cap, inv_cap)
        # each row's inputs of _finish_row (an ignored row's are harmless: its results are not kept)
        found = np.empty((2, rows), logits.dtype)  # m, x_y
        work = np.empty((_TILE_WORK, rows))
        for i in range(rows):
            r = first + i
            y = labels[r]
            ignored = y == ignore_index
            m = maxima[i]
            start = i * n_classes
            found[0, i] = m
            found[1, i] = logits[r, 0 if ignored else y]
            work[0, i] = _tile_sum(e, start, start + n_classes)
            ref = np.float64(m) if m > neg_inf else 0.0  # the row's first finite max
            work[2, i] = ref
            sum_z = 0.0
            if eps > 0.0:
                row = logits[r]
                if capped:
                    sum_z, _ = _block_sum_z_capped(row, 0, n_classes, weight, has_weight, ref, cap, inv_cap)
                else:
                    sum_z, _ = _block_sum_z(row, 0, n_classes, weight, has_weight, ref)
            work[1, i] = sum_z
            work[3, i] = weight[y] if has_weight and not ignored else 1.0
            work[4, i] = grad_scale[r] if want_grad else 0.0
            work[5, i] = z_grad_scale[r] if want_grad else 0.0
        _tile_finish(found, work, n_classes, weight_sum, eps, z_loss, softcap)
        # grad_out is the logits in place; rows are indexed in it, not viewed (see _tile_grad_plain)
        for i in range(rows):
            r = first + i
            y = labels[r]
            if y == ignore_index:
                _ignored_row(loss_rows, lse_rows, r, grad_out, want_grad)
                continue
            loss_rows[r] = work[6, i]
            lse_rows[r] = work[7, i]
            if want_grad:
                start = i * n_classes
                c_work = like(work[8, i], logits)
                beta_work = like(work[9, i], logits)
                if capped or smooth_weighted:
                    _tile_grad(e, d, start, grad_out, r, n_classes, c_work, beta_work, weight_work, smooth_weighted, capped)
                else:  # the common case: one loop, no branch (measured faster than in _tile_grad)
                    _tile_grad_plain(e, start, grad_out, r, n_classes, c_work, beta_work)
                grad_out[r, y] = like(work[10, i], logits)


# the tile kernel on the calling thread alone (see serial_build)
_cross_entropy_tile_serial = serial_build(_cross_entropy_tile_kernel, "_cross_entropy_tile_serial", **_KERNEL_JIT)


@njit(parallel=True, **_KERNEL_JIT)
def _cross_entropy_split_kernel(  # pragma: no cover - compiled
    logits,
    labels,
    weight,
    weight_work,
    has_weight,
    weight_sum,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    grad_scale,
    z_grad_scale,
    grad_out,
    want_grad,
    in_place,
    block,
    loss_rows,
    lse_rows,
    n_segments,
    segment_weight_sums,
):
    """Few long rows: each row cut into ``n_segments`` segments, ``prange`` over (row, segment).

    Pass 1 per segment k gives (m_k, e_k = s_k − 1, S_z,k, r_k); per row they merge into
        m = max_k m_k,   e = (K − 1) + Σ_{m_k = m} e_k + Σ_{m_k < m} (1 + e_k)·exp(m_k − m),
        S_z = Σ_k S_z,k + W_k·(r_k − m)  (r = m)
    with K the number of segments whose max is the row's (each s_k = 1 + e_k there: the 1s are
    counted apart, as within a segment)
    with W_k = Σ_{j in k} w_j (``segment_weight_sums``); then the loss and coefficients as in
    the row kernel, and pass 2 per segment. Pass 2 starts after every pass 1 has finished, so
    in place is safe. Each segment is read twice (from cache when it fits).
    """
    n_rows, n_classes = logits.shape
    eps = label_smoothing
    length = (n_classes + n_segments - 1) // n_segments
    n_tasks = n_rows * n_segments
    stats = np.empty((n_tasks, 4), dtype=np.float64)
    row_m = np.empty(n_rows, dtype=logits.dtype)
    row_coefficients = np.empty((n_rows, 3), dtype=np.float64)

    # ---- Pass 1 per segment ----
    for task in prange(n_tasks):
        i = task // n_segments
        start = min((task % n_segments) * length, n_classes)
        stop = min(start + length, n_classes)
        if labels[i] != ignore_index:
            m, excess, sum_z, ref = _pass1(
                logits[i], start, stop, weight, has_weight, eps, softcap, block
            )
            stats[task, 0] = np.float64(m)
            stats[task, 1] = excess
            stats[task, 2] = sum_z
            stats[task, 3] = ref

    # ---- Merge the segments; loss and pass-2 coefficients ----
    for i in prange(n_rows):
        y = labels[i]
        if y == ignore_index:
            loss_rows[i] = 0.0
            lse_rows[i] = 0.0
            continue
        first = i * n_segments
        m64 = -np.inf
        for k in range(n_segments):
            m64 = max(m64, stats[first + k, 0])
        tops = -1.0  # K − 1
        excess = 0.0
        sum_z = 0.0
        for k in range(n_segments):
            m_k = stats[first + k, 0]
            # equal maxima (also both −inf) scale by 1: exp(−inf − (−inf)) would be NaN
            if m_k == m64:
                tops += 1.0
                excess += stats[first + k, 1]
            else:
                excess += (1.0 + stats[first + k, 1]) * math.exp(m_k - m64)
            if eps > 0.0:
                sum_z += stats[first + k, 2]
                if segment_weight_sums[k] != 0.0:  # (nothing to move; 0·∞ would be NaN, as in _pass1)
                    sum_z += segment_weight_sums[k] * (stats[first + k, 3] - m64)
        m = like(m64, logits)
        g = grad_scale[i] if want_grad else 0.0
        g_z = z_grad_scale[i] if want_grad else 0.0
        w_y = weight[y] if has_weight else 1.0
        loss, lse, c, beta, grad_y = _finish_row(
            m, tops + excess, sum_z, m64, logits[i, y], w_y, n_classes, weight_sum, eps, z_loss, softcap, g, g_z
        )
        loss_rows[i] = loss
        lse_rows[i] = lse
        row_m[i] = m
        row_coefficients[i, 0] = c
        row_coefficients[i, 1] = beta
        row_coefficients[i, 2] = grad_y

    if not want_grad:
        return
    # ---- Pass 2 per segment ----
    for task in prange(n_tasks):
        i = task // n_segments
        start = min((task % n_segments) * length, n_classes)
        stop = min(start + length, n_classes)
        row = logits[i]
        dst = row if in_place else grad_out[i]
        if labels[i] == ignore_index:
            _zero_row(dst[start:stop])
        else:
            _pass2(
                row,
                dst,
                start,
                stop,
                row_m[i],
                row_coefficients[i, 0],
                row_coefficients[i, 1],
                weight_work,
                has_weight,
                eps,
                softcap,
                in_place,
            )
    # the target entries
    for i in range(n_rows):
        y = labels[i]
        if y != ignore_index:
            dst = logits[i] if in_place else grad_out[i]
            dst[y] = row_coefficients[i, 2]


# ---------------------------------------------------------------------------------------------
# Host function
# ---------------------------------------------------------------------------------------------

_ONE = np.ones(1, dtype=np.float64)
# the 1-element dummies of the weight arguments without class weights, one per logits dtype
# (never written: the kernels read them only when has_weight)
_DUMMY_WEIGHTS = {np.dtype(np.float32): np.ones(1, np.float32), np.dtype(np.float64): _ONE}


def cross_entropy_rows(
    logits: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad_scale: np.ndarray | None,
    z_grad_scale: np.ndarray | None,
    grad_out: np.ndarray | None,
    *,
    block: int = DEFAULT_BLOCK,
    parallel: bool | None = None,
    segments: int | None = None,
    batch_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row cross-entropy loss and log-sum-exp, and optionally the gradient (fused).

    Implements the kernel contract of ``docs/CONTRACTS.md``. ``logits`` is a C-contiguous
    ``[N, C]`` float32/float64 array, ``labels`` ``[N]`` int64 (each in ``[0, C)`` or equal to
    ``ignore_index``); nothing is validated. ``labels`` may instead be a C-contiguous ``[N, C]``
    array of class probabilities of the logits' dtype: ``xentkit.kernels.probabilities``
    computes that (``ignore_index`` and ``segments`` unused; formulas there).

    Returns ``(loss_rows, lse_rows)``, both ``[N]`` float64:
    ``loss_rows[i] = (1−ε)·w[y]·(lse − z[y]) + (ε/C)·Σ_c w[c]·(lse − z[c])`` (0 for ignored
    rows) and ``lse_rows[i] = log Σ_c exp(z_c)`` of the capped logits z (0 for ignored rows).
    When ``grad_out`` is given (it may be ``logits`` itself), it receives
    ``s'(x)·(grad_scale[i]·(p·((1−ε)·w[y] + ε·W/C) − (1−ε)·w[y]·onehot(y) − ε·w/C)
    + z_grad_scale[i]·2·z_loss·lse·p)`` row by row; ``grad_scale`` / ``z_grad_scale`` default
    to ones when ``grad_out`` is given without them. The z-loss term itself is not in
    ``loss_rows`` (the caller adds ``z_loss·lse²`` with its own denominator).

    Tuning (keyword-only): ``block`` is the number of classes per pass-1 block; ``parallel``
    forces Numba's threads (True) or the calling thread alone (False), by default threads are
    used above ``SERIAL_MAX_ELEMENTS`` logits; ``segments`` cuts each row into that many pieces
    processed in parallel (by default when there are fewer rows than threads and the rows are
    long, see ``_default_segments``). One thread and one segment run the kernel's serial build
    (the same arithmetic row by row, so the same bits; no thread pool involved), unless
    ``parallel=True`` asks for the threaded build (``_threading.runs_serial``). ``batch_rows``:
    where these rows are a chunk of a batch of that many (``linear_cross_entropy``'s), the
    default ``segments`` is the batch's, so that a chunk of fewer rows than threads is not cut
    where the whole batch would not be (its bits would then depend on the thread count).
    """
    if labels.ndim == 2:  # class probabilities, [N, C] of the logits' dtype: their own kernel
        from xentkit.kernels.probabilities import probability_rows

        return probability_rows(
            logits, labels, weight, label_smoothing, z_loss, softcap, grad_scale, z_grad_scale,
            grad_out, block=block, parallel=parallel,
        )
    n_rows, n_classes = logits.shape
    dtype = logits.dtype
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if weight is None:
        has_weight = False
        weight64 = _ONE
        weight_work = _DUMMY_WEIGHTS.get(dtype)
        if weight_work is None:
            weight_work = _ONE.astype(dtype)
        weight_sum = float(n_classes)
    else:
        has_weight = True
        weight64 = np.ascontiguousarray(weight, dtype=np.float64)
        weight_work = weight64.astype(dtype)
        with np.errstate(invalid="ignore"):  # +inf and −inf weights: NaN, as the reference
            weight_sum = float(weight64.sum())
    want_grad = grad_out is not None
    in_place = want_grad and _same_buffer(grad_out, logits)
    grad_scale, z_grad_scale = upstream_scales(grad_scale, z_grad_scale, n_rows, want_grad)
    loss_rows = np.empty(n_rows, dtype=np.float64)
    lse_rows = np.empty(n_rows, dtype=np.float64)
    if n_rows == 0:
        return loss_rows, lse_rows
    losses_by_terms = None
    if has_weight and label_smoothing > 0.0 and not math.isfinite(weight_sum):
        # An infinite (or NaN) class weight: the kernel's W·((m − r) + log s) − S_z is ∞ − ∞ or
        # ∞·0 where the direct Σ_c w_c·(lse − z_c) is ±∞ (or NaN as in torch). Such rows are
        # computed term by term, as the reference does, before the gradient may overwrite the
        # logits; the gradient's terms need no such care.
        losses_by_terms = _smoothed_losses_by_terms(
            logits, labels, weight64, ignore_index, label_smoothing, softcap
        )
    threads = threads_for(n_rows * n_classes, parallel, SERIAL_MAX_ELEMENTS)
    if segments is None:
        segments = _default_segments(max(n_rows, batch_rows or 0), n_classes, threads)
    segments = max(1, min(int(segments), n_classes))
    arguments = (
        logits,
        labels,
        weight64,
        weight_work,
        has_weight,
        weight_sum,
        int(ignore_index),
        float(label_smoothing),
        float(z_loss),
        0.0 if softcap is None else float(softcap),
        grad_scale,
        z_grad_scale,
        logits if (in_place or not want_grad) else grad_out,
        want_grad,
        in_place,
        max(int(block), 1),
        loss_rows,
        lse_rows,
    )
    # rows of few classes (at least one: the tile reads each row's label entry), in one block,
    # C-contiguous (the tile reads rows as one flat array)
    tile = segments == 1 and 0 < n_classes <= min(TILE_MAX_CLASSES, int(block)) and logits.flags.c_contiguous
    if runs_serial(threads, parallel) and segments == 1:  # the calling thread alone: no pool, no thread count
        (_cross_entropy_tile_serial if tile else _cross_entropy_rows_serial)(*arguments)
    elif tile:
        with running_on(threads):
            _cross_entropy_tile_kernel(*arguments)
    else:
        _run_parallel(arguments, threads, segments, n_classes, has_weight, weight64)
    if losses_by_terms is not None:
        loss_rows[:] = losses_by_terms
    return loss_rows, lse_rows


def _run_parallel(
    arguments: tuple, threads: int, segments: int, n_classes: int, has_weight: bool, weight64: np.ndarray
) -> None:
    """The row kernel on ``threads`` threads, or the split-row kernel for ``segments`` > 1."""
    with running_on(threads):
        if segments == 1:
            _cross_entropy_rows_kernel(*arguments)
        else:
            length = -(-n_classes // segments)
            starts = np.arange(0, n_classes, length)
            if has_weight:
                segment_weight_sums = np.add.reduceat(weight64, starts)
            else:
                segment_weight_sums = np.minimum(length, n_classes - starts).astype(np.float64)
            segment_weight_sums = np.resize(segment_weight_sums, segments)  # empty tails
            segment_weight_sums[len(starts) :] = 0.0
            _cross_entropy_split_kernel(*arguments, segments, segment_weight_sums)


def _smoothed_losses_by_terms(
    logits: np.ndarray, labels: np.ndarray, weight64: np.ndarray, ignore_index: int,
    label_smoothing: float, softcap: float | None,
) -> np.ndarray:
    """The rows' losses as ``loss_rows`` holds them, from the reference's term-by-term formula
    (for class weights whose sum is not finite), in float64 as the kernels' rows: in float32 a
    gap lse − z_c beyond its range overflowed, and ∞ − ∞ made the loss NaN where float64 gives
    −inf (a review)."""
    from xentkit.reference import cross_entropy_and_grad

    rows, _ = cross_entropy_and_grad(
        logits.astype(np.float64, copy=False), labels, weight=weight64, ignore_index=ignore_index, reduction="none",
        label_smoothing=label_smoothing, softcap=softcap, want_grad=False,
    )
    return rows.astype(np.float64)


def upstream_scales(
    grad_scale: np.ndarray | None, z_grad_scale: np.ndarray | None, n_rows: int, want_grad: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The row kernels' ``grad_scale`` and ``z_grad_scale`` arguments: contiguous float64
    ``[rows]`` (ones where not given) when a gradient is wanted, else 1-element dummies."""
    if not want_grad:
        return _ONE, _ONE
    ones = None if grad_scale is not None and z_grad_scale is not None else np.ones(n_rows)
    return (
        ones if grad_scale is None else np.ascontiguousarray(grad_scale, np.float64),
        ones if z_grad_scale is None else np.ascontiguousarray(z_grad_scale, np.float64),
    )


def _default_segments(n_rows: int, n_classes: int, threads: int) -> int:
    """Pieces per row: 1 (a thread per row) unless fewer rows than threads and long rows; then
    enough pieces of at least ``MIN_SEGMENT`` classes to give every thread work."""
    if threads <= 1 or n_rows >= threads or n_classes < 2 * MIN_SEGMENT:
        return 1
    return max(1, min(-(-threads // n_rows), n_classes // MIN_SEGMENT))


def _same_buffer(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` view the same memory with the same layout (in place)."""
    if a is b:
        return True
    if not np.may_share_memory(a, b):  # bounds only: cheap, and the usual answer
        return False
    same_start = a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    return same_start and a.shape == b.shape and a.strides == b.strides


def compile_all() -> list[str]:
    """Compile (or load from Numba's cache) every specialization of the cross-entropy kernels:
    the row kernel, the split-row kernel, the tile kernel and the serial builds of the row and
    tile kernels, for float32 and float64 logits. Run it once after installing (or after the
    kernels' source changed) so that no later first call waits for Numba's compiler; later
    processes then only load the cached machine code. Returns the names of the specializations,
    e.g. ``"rows float32"``."""
    done = []
    kinds = (
        ("rows", True, 1, TILE_MAX_CLASSES + 1), ("split rows", True, 2, TILE_MAX_CLASSES + 1),
        ("serial rows", False, 1, TILE_MAX_CLASSES + 1), ("tile", True, 1, 4), ("serial tile", False, 1, 4),
    )
    for dtype in (np.float32, np.float64):
        labels = np.zeros(1, dtype=np.int64)
        for name, parallel, segments, classes in kinds:
            logits = np.zeros((1, classes), dtype=dtype)
            cross_entropy_rows(
                logits, labels, None, -100, 0.0, 0.0, None, None, None, np.empty_like(logits),
                parallel=parallel, segments=segments,
            )
            done.append(f"{name} {np.dtype(dtype).name}")
    return done
