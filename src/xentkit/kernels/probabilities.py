"""Fused cross-entropy against class probabilities: per-row loss and gradient, the contract of
``cross_entropy_rows`` (``docs/CONTRACTS.md``) with an ``[N, C]`` target of probabilities.

For each row i (``prange`` over rows; logits x, target q, class weights w, smoothing ε, C
classes; z the optionally soft-capped logits):

    Pass 1 (the hard-label kernel's ``_pass1``, one read of the row): m = max z, s = Σ exp(z − m)
        as its excess e = s − 1 (log s = log1p(e): a confident row's loss keeps its relative
        accuracy) (m taken as 0 for a row of −inf, as the reference does)
    Pass 2 (one read of the row and of q), in float64:
        mass_j = w_j·q'_j,  q' = (1 − ε)·q + ε/C         (q itself without smoothing)
        A      = Σ_j mass_j
        loss_i = Σ_{mass_j ≠ 0} mass_j·(log s − (z_j − m))  = −Σ_c w_c·q'_c·log p_c
                 (a class of zero mass adds nothing, not 0·log 0 = NaN at a −inf logit: the
                 reference's ``xlogy``), computed as A·log s − Σ_{mass_j ≠ 0} mass_j·(z_j − m),
                 or term by term where A is not finite (an infinite class weight or target:
                 there A·log s − S would be inf·0 = NaN where the reference finds +inf)
    Pass 3 (one read of the row and of q, one write of the gradient):
        grad_ij = s'(x_ij)·(g_i·(p_j·A − mass_j) + g^z_i·2·λ_z·lse·p_j),  p_j = exp(z_j − m)·(1/s)
        for a finite upstream g_i (at a class of the max with p_j > 1/2 as A·(p_j − 1) + (A − mass_j),
        p_j − 1 = −e/s exact from pass 1's excess: a confident row's one-hot target keeps its
        −e/s); for an infinite or NaN one torch's order, (g_i·A)·p_j − g_i·mass_j
        (NaN across the row, as the reference and torch). s'(x) = 1 − tanh²(x/softcap), 1 without.

Pass 3 reads x_ij and q_ij and then writes grad_ij of the same element, so ``grad_out`` may be
the logits (in place); it must not overlap the target (the api refuses that). The per-element
arithmetic of passes 2 and 3 is float64 (the exponentials in the logits' dtype, as pass 1), so
float32 rows lose nothing to cancellation in p_j·A − mass_j.

Drivers: ``_probability_rows_kernel`` gives each thread whole rows; its serial build runs small
problems on the calling thread. Rows of at most ``TILE_MAX_CLASSES`` (48) classes take
``_probability_tile_kernel`` (and its serial build), as hard labels take the cross-entropy tile
kernel: the exponentials of a tile of rows in one vectorized loop, kept for pass 3. There is no
split-row driver: fewer rows than threads run on as many threads as there are rows.

No validation here: the api checks shapes and dtypes before calling.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from xentkit.kernels._exp import capped_product, fast_exp_nonpositive, fast_log1p, fast_tanh, like
from xentkit.kernels._jit import helper_options
from xentkit.kernels._threading import running_on, runs_serial, serial_build, threads_for
from xentkit.kernels.cross_entropy import (
    _JIT,
    _KERNEL_JIT,
    _ONE,
    DEFAULT_BLOCK,
    SERIAL_MAX_ELEMENTS,
    _pass1,
    _same_buffer,
    _tile_exponentials,
    _tile_sum,
    _tiles,
    log_of_excess,
    upstream_scales,
)

__all__ = ["probability_rows"]

# Rows of at most this many classes take the tile kernel (see cross_entropy.TILE_MAX_CLASSES; here
# pass 3 also saves its exponentials). Measured on 2 AVX2 cores (float32, 655360 logits, fastest of
# 41 calls, row kernel → tile kernel): 10 classes 3.86 → 2.41 ms, 16 2.30 → 1.73, 32 1.51 → 1.31,
# 40 2.16 → 1.34, 48 1.32 → 1.24, 64 1.13 → 1.10, 100 1.11 → 1.05.
TILE_MAX_CLASSES = 48

# Rows of at most this many classes of a tile (without a softcap) add s and pass 2's sums in one
# loop (``_tile_row_terms``); others add s alone, then the sums in vector lanes (``_loss_terms``;
# with a softcap the one loop made 65536 × 10 5.2 → 6.8 ms).
# Measured on 2 AVX2 cores (float32, fastest of 41 calls, one loop → two): 65536 × 10 1.87-2.02 →
# 2.09-2.16 ms, 65536 × 16 2.46-2.56 → 2.55-2.60, 32768 × 24 1.78 → 1.66, 16384 × 48 1.70 → 1.51.
_FUSED_MAX_CLASSES = 16


@njit(**helper_options({"contract"}))
def _mass(q, w, has_weight, keep, uniform):  # pragma: no cover - compiled
    """A class's target mass w·q' in float64, q' = (1 − ε)·q + ε/C (q itself without smoothing)."""
    target = np.float64(q)
    if uniform > 0.0:
        target = keep * target + uniform
    return target * w if has_weight else target


@njit(**helper_options({"contract"}))
def _z(x, cap, inv_cap):  # pragma: no cover - compiled
    """The (soft-capped, ``cap`` 0: not) logit in float64, computed as pass 1 computes it."""
    if cap > 0.0:
        t, _ = fast_tanh(x * inv_cap)
        return np.float64(capped_product(cap, t))
    return np.float64(x)


@njit(**_JIT)
def _loss_terms(row, q, weight, has_weight, keep, uniform, shift, cap, inv_cap):  # pragma: no cover
    """Pass 2 of one row, in float64: ``(S, A, nonzero)``, S = Σ_{mass_j ≠ 0} mass_j·(z_j − m),
    A = Σ_j mass_j and the number of classes of nonzero mass; the loss is A·log s − S (when
    nonzero > 0; else 0). The sums as the hard-label kernel's Σ w_j·(z_j − r): reassociated over
    vector lanes, each term's difference taken before its product."""
    weighted = 0.0
    total = 0.0
    nonzero = 0.0
    for j in range(row.shape[0]):
        mass = _mass(q[j], weight[j] if has_weight else 1.0, has_weight, keep, uniform)
        total += mass
        # a class of zero mass adds nothing (not 0·(−inf) = NaN); a NaN mass spreads
        live = mass != 0.0
        weighted += mass * (_z(row[j], cap, inv_cap) - shift) if live else 0.0
        nonzero += 1.0 if live else 0.0
    return weighted, total, nonzero


@njit(**helper_options({"contract"}))
def _loss_by_terms(row, q, weight, has_weight, keep, uniform, shift, log_s, cap, inv_cap):  # pragma: no cover
    """The loss of one row term by term, Σ_{mass_j ≠ 0} mass_j·(log s − (z_j − m)), as the
    reference adds it: for rows whose total mass is not finite (an infinite class weight or
    target), where A·log s − S would make inf·0 = NaN of terms the reference finds infinite."""
    loss = 0.0
    for j in range(row.shape[0]):
        mass = _mass(q[j], weight[j] if has_weight else 1.0, has_weight, keep, uniform)
        if mass != 0.0:
            loss += mass * (log_s - (_z(row[j], cap, inv_cap) - shift))
    return loss


# Pass 3's helpers: no reductions here, so no reassociation either (torch's order for a
# non-finite upstream stays as written); fused multiply-adds only (a soft-capped z = cap·t is
# rounded on its own, _exp.capped_product, so z − m is not fused).
_GRAD_JIT = helper_options({"contract"})


@njit(**_GRAD_JIT)
def _gradient_entry(x, q, w, has_weight, keep, uniform, shift, inv_s, top_gap, total, g, finite, z_coef, cap, inv_cap):  # pragma: no cover
    """One gradient entry from its logit ``x``, target ``q`` and class weight ``w`` (the module
    docstring's pass 3; ``cap`` 0 means no softcap)."""
    if cap > 0.0:
        t, d = fast_tanh(x * inv_cap)
        z = capped_product(cap, t)
    else:
        z = x
        d = like(1.0, x)
    return _entry_from_exp(fast_exp_nonpositive(z - shift), d, q, w, has_weight, keep, uniform, inv_s, top_gap,
                           total, g, finite, z_coef)


@njit(**_GRAD_JIT)
def _entry_from_exp(e, d, q, w, has_weight, keep, uniform, inv_s, top_gap, total, g, finite, z_coef):  # pragma: no cover
    """One gradient entry from its exponential e = exp(z − m) (the logits' dtype) and its softcap
    derivative ``d`` (1 without): the tile kernel keeps e from pass 1 instead of recomputing it.
    ``top_gap``: None, or for a row whose max has p > 1/2 (``_top_gap``) p − 1 = −e_row/s there,
    from the row's excess e_row = s − 1: None compiles the plain loop (Numba prunes the branch),
    so that only such rows pay for the select (10% of pass 3 at 1000 classes)."""
    e64 = np.float64(e)
    p = e64 * inv_s
    mass = _mass(q, w, has_weight, keep, uniform)
    if finite:
        value = g * (p * total - mass)
        if top_gap is not None:
            # at the max: A·(p − 1) + (A − mass), p − 1 exact (a one-hot target there keeps a
            # confident row's −e_row/s, which p·A − mass rounded at ulp(A))
            value = g * (total * top_gap + (total - mass)) if e64 == 1.0 else value
    else:  # torch's order: NaN where p = 0 (0·∞) and where the two terms cancel (∞ − ∞)
        value = (g * total) * p - g * mass
    if z_coef != 0.0:
        value += z_coef * p
    return np.float64(d) * value


@njit(**_GRAD_JIT)
def _gradient(row, q, dst, weight, has_weight, keep, uniform, shift, inv_s, top_gap, total, g, z_coef, cap, inv_cap):  # pragma: no cover
    """Pass 3: one row's gradient into ``dst``."""
    finite = math.isfinite(g)
    for j in range(row.shape[0]):
        w = weight[j] if has_weight else 1.0
        dst[j] = _gradient_entry(
            row[j], q[j], w, has_weight, keep, uniform, shift, inv_s, top_gap, total, g, finite, z_coef, cap, inv_cap
        )


@njit(**_GRAD_JIT)
def _gradient_inplace(row, q, weight, has_weight, keep, uniform, shift, inv_s, top_gap, total, g, z_coef, cap, inv_cap):  # pragma: no cover
    """Pass 3 over the logits' own memory (one array: no aliasing check, so LLVM vectorizes)."""
    finite = math.isfinite(g)
    for j in range(row.shape[0]):
        w = weight[j] if has_weight else 1.0
        row[j] = _gradient_entry(
            row[j], q[j], w, has_weight, keep, uniform, shift, inv_s, top_gap, total, g, finite, z_coef, cap, inv_cap
        )


@njit(forceinline=True, **_KERNEL_JIT)
def _top_gap(excess, inv_s, total):  # pragma: no cover - compiled
    """p − 1 = −e/s at a class of the row's max, from its excess e = s − 1, for a row whose max
    has p > 1/2 (then it is the row's only max) and a finite total mass A (else A − mass could be
    ∞ − ∞); NaN for every other row (the plain form everywhere)."""
    gap = -excess * inv_s
    return gap if gap > -0.5 and math.isfinite(total) else np.nan


@njit(forceinline=True, **_KERNEL_JIT)
def _loss_from_sums(total, weighted, nonzero, log_s):  # pragma: no cover - compiled
    """A row's loss from pass 2's sums (both kernels), −Σ mass_j·log p_j = Σ mass_j·(log s −
    (z_j − m)) = A·log s − S for a finite total mass A (the caller adds term by term where it is
    not, ``_loss_by_terms``: there A·log s − S would be inf·0 = NaN); with no mass 0, or NaN where
    the row's softmax is (a NaN or +inf logit, only −inf), as its gradient."""
    return total * log_s - weighted if nonzero > 0.0 else 0.0 * log_s


@njit(forceinline=True, **_KERNEL_JIT)
def _row_loss(logits, targets, r, weight, has_weight, keep, uniform, m, excess, cap, inv_cap):  # pragma: no cover
    """Pass 2 of row ``r`` from pass 1's max ``m`` and excess e = s − 1: ``(loss, lse, shift,
    total)``, the loss (``_loss_from_sums``, or term by term), the log-sum-exp, the shift m (0
    for a row of −inf, as pass 1) and A, for pass 3."""
    shift = np.float64(m) if m > -np.inf else 0.0
    log_s = log_of_excess(excess)
    row, q = logits[r], targets[r]
    weighted, total, nonzero = _loss_terms(row, q, weight, has_weight, keep, uniform, shift, cap, inv_cap)
    if not math.isfinite(total):  # an infinite mass: term by term, as the reference
        loss = _loss_by_terms(row, q, weight, has_weight, keep, uniform, shift, log_s, cap, inv_cap)
    else:
        loss = _loss_from_sums(total, weighted, nonzero, log_s)
    return loss, shift + log_s, shift, total


@njit(parallel=True, **_KERNEL_JIT)
def _probability_rows_kernel(  # pragma: no cover - compiled
    logits,
    targets,
    weight,
    has_weight,
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
    """Every row, spread over Numba's threads: the three passes of the module docstring.
    ``weight`` is a 1-element dummy without weights (``has_weight`` False); ``grad_out``,
    ``grad_scale`` and ``z_grad_scale`` are dummies unless ``want_grad``."""
    n_rows, n_classes = logits.shape
    keep = 1.0 - label_smoothing
    uniform = label_smoothing / n_classes
    cap = like(softcap, logits)  # 0: no softcap
    inv_cap = like(1.0 / softcap if softcap > 0.0 else 1.0, logits)
    for i in prange(n_rows):
        row = logits[i]
        q = targets[i]
        m, excess, _, _ = _pass1(row, 0, n_classes, weight, False, 0.0, softcap, block)
        loss_rows[i], lse, shift, total = _row_loss(
            logits, targets, i, weight, has_weight, keep, uniform, m, excess, cap, inv_cap
        )
        lse_rows[i] = lse
        if want_grad:
            z_coef = 2.0 * z_loss * lse * z_grad_scale[i] if z_loss > 0.0 else 0.0
            shift_work = like(shift, row)  # the exponent as pass 1 takes it, in the row's dtype
            inv_s = 1.0 / (1.0 + excess)
            top_gap = _top_gap(excess, inv_s, total)
            confident = top_gap == top_gap  # (its own loop, with the select at the max)
            if in_place and confident:
                _gradient_inplace(
                    row, q, weight, has_weight, keep, uniform, shift_work, inv_s, top_gap, total, grad_scale[i],
                    z_coef, cap, inv_cap,
                )
            elif in_place:
                _gradient_inplace(
                    row, q, weight, has_weight, keep, uniform, shift_work, inv_s, None, total, grad_scale[i],
                    z_coef, cap, inv_cap,
                )
            elif confident:
                _gradient(
                    row, q, grad_out[i], weight, has_weight, keep, uniform, shift_work, inv_s, top_gap, total,
                    grad_scale[i], z_coef, cap, inv_cap,
                )
            else:
                _gradient(
                    row, q, grad_out[i], weight, has_weight, keep, uniform, shift_work, inv_s, None, total,
                    grad_scale[i], z_coef, cap, inv_cap,
                )


# the row kernel on the calling thread alone, for small problems (see serial_build)
_probability_rows_serial = serial_build(_probability_rows_kernel, "_probability_rows_serial", **_KERNEL_JIT)


@njit(forceinline=True, **_KERNEL_JIT)
def _tile_row_terms(e, x, q, start, n_classes, shift, weight, has_weight, keep, uniform):  # pragma: no cover
    """One row of a tile in one loop over its classes (``e``, ``x`` and ``q`` the tile's flat
    exponentials, logits and targets, the row from ``start``): ``(Σ e − 1, A, S, nonzero)``, the
    excess as ``_tile_sum`` gives it, and ``_loss_terms``'s A, S and count. One loop instead of two reads
    the row once; called with literal options for the plain case, so that no branch stays in the
    loop (``benchmarks/README.md``, "No view of each row")."""
    ties = 0.0
    below = 0.0
    weighted = 0.0
    total = 0.0
    nonzero = 0.0
    for j in range(n_classes):
        k = start + j
        v = np.float64(e[k])
        top = np.floor(v)  # as _tile_sum: the max's terms (exactly 1) apart from the others
        ties += top
        below += v - top
        mass = _mass(q[k], weight[j] if has_weight else 1.0, has_weight, keep, uniform)
        total += mass
        live = mass != 0.0
        weighted += mass * (np.float64(x[k]) - shift) if live else 0.0  # (no softcap here)
        nonzero += 1.0 if live else 0.0
    return (ties - 1.0) + below, total, weighted, nonzero


@njit(**_KERNEL_JIT)
def _tile_terms(e, x, q, maxima, work, weight, has_weight, keep, uniform, capped, cap, inv_cap):  # pragma: no cover
    """Pass 2's sums for each row of a tile (``maxima`` its rows' max, ``x``, ``q`` and ``e``
    flat): ``work[0:4, i]`` = (e = s − 1, A, S, nonzero) and ``work[4, i]`` = the shift; e as
    ``_tile_sum`` gives it, A, S and the count as ``_loss_terms`` (in one loop with s for short
    rows without a softcap, ``_FUSED_MAX_CLASSES``)."""
    n_classes = x.shape[0] // maxima.shape[0]
    plain = not (has_weight or uniform > 0.0 or capped)
    # short rows without a softcap in one loop (a softcap's tanh runs faster in vector lanes)
    fused = n_classes <= _FUSED_MAX_CLASSES and not capped
    for i in range(maxima.shape[0]):
        m = maxima[i]
        shift = np.float64(m) if m > -np.inf else 0.0  # as pass 1: 0 for a row of −inf
        start = i * n_classes
        if fused:  # one loop over the row
            if plain:  # literal options: the loop without a branch
                terms = _tile_row_terms(e, x, q, start, n_classes, shift, weight, False, 1.0, 0.0)
            else:
                terms = _tile_row_terms(e, x, q, start, n_classes, shift, weight, has_weight, keep, uniform)
            work[0, i], work[1, i], work[2, i], work[3, i] = terms
        else:  # s, then pass 2's sums in vector lanes (``_loss_terms``, its tanh too)
            stop = start + n_classes
            work[0, i] = _tile_sum(e, start, stop)
            if plain:
                terms = _loss_terms(x[start:stop], q[start:stop], weight, False, 1.0, 0.0, shift, cap, inv_cap)
            else:
                terms = _loss_terms(x[start:stop], q[start:stop], weight, has_weight, keep, uniform, shift, cap, inv_cap)
            work[2, i], work[1, i], work[3, i] = terms
        work[4, i] = shift


@njit(**_JIT)
def _tile_logs(excess, log_s):  # pragma: no cover - compiled
    """log_s_i = log1p(e_i) = log s_i over a tile's rows in one loop, in vector lanes
    (``fast_log1p``, within 1.5 ulps of the exact value)."""
    for i in range(excess.shape[0]):
        log_s[i] = fast_log1p(excess[i])


@njit(parallel=True, **_KERNEL_JIT)
def _probability_tile_kernel(  # pragma: no cover - compiled
    logits,
    targets,
    weight,
    has_weight,
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
    """The row kernel's arguments and results for rows of at most ``TILE_MAX_CLASSES`` classes
    (``block`` unused), ``prange`` over tiles of whole rows, as the hard-label tile kernel
    (``cross_entropy._cross_entropy_tile_kernel``):

        the tile:  each row's max, e = exp(z − m) of every logit in one flat loop (vectorized
                   across rows)
        per row:   s = Σ e (float64, as its excess s − 1) and pass 2's sums A, S (``_tile_terms``:
                   in one loop over a short row, ``_tile_row_terms``)
        the tile:  log s = log1p(s − 1) of every row in one loop, in vector lanes (``_tile_logs``)
        per row:   the loss A·log s − S (term by term where A is not finite, as the row kernel),
                   and pass 3 from the kept e (``_entry_from_exp``), no second exponential

    The row kernel's formulas; s is added as the hard-label tile kernel adds it and log s is
    within 1 ulp of libm's, so the last bits may differ from the row kernel's."""
    n_rows, n_classes = logits.shape
    keep = 1.0 - label_smoothing
    uniform = label_smoothing / n_classes
    capped = softcap > 0.0
    cap = like(softcap, logits)  # 0: no softcap
    inv_cap = like(1.0 / softcap if capped else 1.0, logits)
    tile_rows, n_tiles = _tiles(n_rows, n_classes)
    for tile in prange(n_tiles):
        first = tile * tile_rows
        rows = min(tile_rows, n_rows - first)
        maxima, e, d = _tile_exponentials(logits, first, rows, capped, cap, inv_cap)
        flat_x = logits[first : first + rows].reshape(rows * n_classes)
        flat_q = targets[first : first + rows].reshape(rows * n_classes)
        # per row: e = s − 1, A, S, nonzero, shift, log s
        work = np.empty((6, rows))
        _tile_terms(e, flat_x, flat_q, maxima, work, weight, has_weight, keep, uniform, capped, cap, inv_cap)
        _tile_logs(work[0], work[5])
        for i in range(rows):  # no view of a row here: each costs its reference count
            r = first + i
            excess, total, shift, log_s = work[0, i], work[1, i], work[4, i], work[5, i]
            if not math.isfinite(total):  # an infinite mass: term by term, as the reference
                loss_rows[r] = _loss_by_terms(
                    logits[r], targets[r], weight, has_weight, keep, uniform, shift, log_s, cap, inv_cap
                )
            else:
                loss_rows[r] = _loss_from_sums(total, work[2, i], work[3, i], log_s)
            lse = shift + log_s
            lse_rows[r] = lse
            if want_grad:
                z_coef = 2.0 * z_loss * lse * z_grad_scale[r] if z_loss > 0.0 else 0.0
                g = grad_scale[r]
                finite = math.isfinite(g)
                inv_s = 1.0 / (1.0 + excess)
                top_gap = _top_gap(excess, inv_s, total)
                one = like(1.0, logits)
                start = i * n_classes
                # grad_out is the logits in place: q and w are read before an entry is written
                if top_gap == top_gap:  # a confident row: the select at its max
                    for j in range(n_classes):
                        w = weight[j] if has_weight else 1.0
                        grad_out[r, j] = _entry_from_exp(
                            e[start + j], d[start + j] if capped else one, flat_q[start + j], w, has_weight, keep,
                            uniform, inv_s, top_gap, total, g, finite, z_coef,
                        )
                else:
                    for j in range(n_classes):
                        w = weight[j] if has_weight else 1.0
                        grad_out[r, j] = _entry_from_exp(
                            e[start + j], d[start + j] if capped else one, flat_q[start + j], w, has_weight, keep,
                            uniform, inv_s, None, total, g, finite, z_coef,
                        )


_probability_tile_serial = serial_build(_probability_tile_kernel, "_probability_tile_serial", **_KERNEL_JIT)


def probability_rows(
    logits: np.ndarray,
    targets: np.ndarray,
    weight: np.ndarray | None,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad_scale: np.ndarray | None,
    z_grad_scale: np.ndarray | None,
    grad_out: np.ndarray | None,
    *,
    block: int = DEFAULT_BLOCK,
    parallel: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row cross-entropy against class probabilities and log-sum-exp, and optionally the
    gradient (fused): ``cross_entropy_rows`` for an ``[N, C]`` target (which calls this).

    ``logits`` and ``targets`` are C-contiguous ``[N, C]`` arrays of one dtype, float32 or
    float64; nothing is validated. Returns ``(loss_rows, lse_rows)``, both ``[N]`` float64:
    ``loss_rows[i] = −Σ_c w[c]·q'[c]·log p_c`` (q' = (1−ε)·q + ε/C; a class with w·q' = 0 adds
    nothing) and ``lse_rows[i] = log Σ_c exp(z_c)``. When ``grad_out`` is given (it may be
    ``logits`` itself, never ``targets``), it receives
    ``s'(x)·(grad_scale[i]·(p·Σ_c w[c]·q'[c] − w·q') + z_grad_scale[i]·2·z_loss·lse·p)`` row by
    row (ones by default). The z-loss term itself is not in ``loss_rows``. ``block`` and
    ``parallel`` as in ``cross_entropy_rows``.
    """
    n_rows, n_classes = logits.shape
    if weight is None:
        has_weight, weight64 = False, _ONE
    else:
        has_weight, weight64 = True, np.ascontiguousarray(weight, dtype=np.float64)
    want_grad = grad_out is not None
    in_place = want_grad and _same_buffer(grad_out, logits)
    grad_scale, z_grad_scale = upstream_scales(grad_scale, z_grad_scale, n_rows, want_grad)
    loss_rows = np.empty(n_rows, dtype=np.float64)
    lse_rows = np.empty(n_rows, dtype=np.float64)
    if n_rows == 0:
        return loss_rows, lse_rows
    arguments = (
        logits,
        targets,
        weight64,
        has_weight,
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
    threads = threads_for(n_rows * n_classes, parallel, SERIAL_MAX_ELEMENTS)
    # rows of few classes, C-contiguous: tiles of rows
    tile = n_classes <= min(TILE_MAX_CLASSES, int(block)) and logits.flags.c_contiguous
    if runs_serial(threads, parallel):  # the calling thread alone: no pool, no thread count
        (_probability_tile_serial if tile else _probability_rows_serial)(*arguments)
        return loss_rows, lse_rows
    with running_on(min(threads, n_rows)):
        (_probability_tile_kernel if tile else _probability_rows_kernel)(*arguments)
    return loss_rows, lse_rows


def compile_all() -> list[str]:
    """Compile (or load from Numba's cache) the probability kernel and its serial build for
    float32 and float64 logits (see ``xentkit.kernels.compile_all``)."""
    done = []
    for dtype in (np.float32, np.float64):
        for classes, kinds in ((TILE_MAX_CLASSES + 1, ("rows", "serial")), (4, ("tile", "serial tile"))):
            logits = np.zeros((1, classes), dtype=dtype)
            targets = np.full((1, classes), 1.0 / classes, dtype=dtype)
            for parallel, name in zip((True, False), kinds, strict=True):
                probability_rows(logits, targets, None, 0.0, 0.0, None, None, None, logits.copy(), parallel=parallel)
                done.append(f"probabilities {name} {np.dtype(dtype).name}")
    return done
