"""Fused kernels of the token log-probabilities and entropies (formulas:
``xentkit.reference.log_probs``).

Per row i (``prange`` over rows; a row of C classes x, scale c = 1/T > 0, z_j = x_j·c):

    Pass 1, statistics (one read of the row, online in blocks of ``block`` classes), shifted
    before it is scaled, d_j = (x_j − m_x)·c with m_x the running max of x (in the logits'
    dtype; x_j − m_x is exact near the max, so d_j is off by a rounding relative to itself, not
    by an ulp of max|x|/T); the sum of exponentials s is kept in two parts, K the count of terms
    equal to the running max (each exactly 1, never summed) and r the sum of the others:
        b = max_{j in block} x_j
        if b > m_x:  u ← f·(u + s·δ),  r ← f·(K + r),  K ← 0,  f = exp(δ),  δ = (m_x − b)·c;  m_x ← b
        K += #{j in block: x_j = m_x},   r += Σ_{j in block, x_j < m_x} exp(d_j)
        u += Σ_{j in block} exp(d_j)·d_j
    gives m = m_x·c and z_y = x_y·c (both in float64, z_y when the row's target y is in [0, C)),
    the excess e = s − 1 = (K − 1) + r and u (float64 across blocks; each block summed in the
    dtype's vector lanes). A confident row's e keeps its digits, where s = 1 + e summed would
    lose those below 2⁻⁵³. The host (``reference.log_probs.row_statistics``) turns them into
    log p(y) = (z_y − m) − log1p(e) ≤ 0, H = log1p(e) − u/(1 + e) ≥ 0 and lse = m + log1p(e).

    Pass 2, gradient (one write of the row; exp recomputed), given per-row (m, e) and the
    coefficients (a, t, k) of ∂/∂z_j = a·[j = y] + p_j·(b + k·d_j), b = t − a, s = 1 + e; float32 rows take
    d_j = (x_j − m_x)·c with m_x = m/c (the float32 max comes back exactly), float64 rows
    d_j = x_j·c − m (a float64 max may come back an ulp off, which at ulp(m_x)/T > 709 would
    overflow exp(d)):
        dst_j = c·exp(d_j)/s·(b + k·d_j)                          (vector loop, the dtype's lanes)
        dst_y = c·(a·(1 − p_y) + p_y·(t + k·(z_y − m)))     (float64, x_y read before the loop)
    with 1 − p_y = e/s where y is at the max (d_y = 0; 1 − 1/s would cancel for a confident row).
    ``dst`` may be the logits themselves (in place: the one-array loop, which LLVM vectorizes
    without an aliasing check).

The loops have no ``contract`` flag (no fused multiply-adds to change d_j's rounding). Terms exp(d)·d use max(d, −1000) so that a
masked class (z = −inf, exp = 0) adds 0, not 0·(−inf). A row that is not ``valid`` (its target
is ignore_index) is skipped by pass 1 (m = 0, e = 0, u = 0: lse 0, H 0) and zeroed by pass 2.
Special values, as torch: a NaN makes the row's results NaN; a +inf logit makes log p(y), H and
the gradient NaN and lse +inf (pass 1 sums exp(z) unshifted once m is +inf); −inf logits are masked
classes, and a row of −inf only has s = 0, e = −1 (NaN downstream).

No validation: the callers check shapes, dtypes and labels first. A target outside [0, C) is not
read (the vocabulary-parallel shards pass the labels of other shards that way; z_y is then 0).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from xentkit.kernels._exp import fast_exp, fast_exp_nonpositive, like, maxnum
from xentkit.kernels._jit import helper_options
from xentkit.kernels._threading import running_on, runs_serial, serial_build, threads_for
from xentkit.kernels.cross_entropy import (
    _KERNEL_JIT,
    DEFAULT_BLOCK,
    SERIAL_MAX_ELEMENTS,
    _block_max,
    _same_buffer,
    _short_max,
    _zero_row,
)
from xentkit.reference.log_probs import EXPONENT_FLOOR

_LOOP_JIT = helper_options({"reassoc", "nsz"})
# the gradient loops are elementwise (no sum to reorder): without "reassoc", which would let LLVM
# factor exp(d)·B + (exp(d)·K)·d back into exp(d)·(B + K·d), NaN where K·d overflows
_GRAD_JIT = helper_options({"nsz"})


# ---------------------------------------------------------------------------------------------
# Pass 1 pieces: Σ exp(z − m) and Σ exp(z − m)·(z − m) over one block
# ---------------------------------------------------------------------------------------------


@njit(**_LOOP_JIT)
def _block_moments(row, start, stop, scale, shift):  # pragma: no cover - compiled
    """(Σ e_j, Σ e_j·d_j), d_j = (x_j − shift)·c, e_j = exp(d_j), summed in the dtype's lanes."""
    seg = row[start:stop]
    floor = like(EXPONENT_FLOOR, row)
    acc_s = like(0.0, row)
    acc_u = like(0.0, row)
    for j in range(seg.shape[0]):
        d = (seg[j] - shift) * scale
        e = fast_exp_nonpositive(d)
        acc_s += e
        acc_u += e * maxnum(d, floor)
    return np.float64(acc_s), np.float64(acc_u)


@njit(**_LOOP_JIT)
def _block_moments_top(row, start, stop, scale, shift):  # pragma: no cover - compiled
    """As ``_block_moments``, for a block that holds the running max ``shift`` (finite, or a
    block of −inf and NaN only shifted by 0), in three parts ``(k, δ, u)`` (float64): k the
    number of terms equal to the max (each exactly 1, never summed), δ the sum of the others
    (each below 1, summed in the dtype's lanes: its rounding stays relative to δ) and u.
    Counts are exact in float32 up to 2^24 terms per block."""
    seg = row[start:stop]
    floor = like(EXPONENT_FLOOR, row)
    zero = like(0.0, row)
    one = like(1.0, row)
    ties = zero
    acc_s = zero
    acc_u = zero
    for j in range(seg.shape[0]):
        x = seg[j]
        top = x >= shift
        d = (x - shift) * scale
        e = fast_exp_nonpositive(d)
        acc_s += zero if top else e
        acc_u += e * maxnum(d, floor)  # (0 at the max: d = 0)
        ties += one if top else zero
    return np.float64(ties), np.float64(acc_s), np.float64(acc_u)


@njit(**_LOOP_JIT)
def _block_moments_unshifted(row, start, stop, scale):  # pragma: no cover - compiled
    """Σ exp(z_j) and Σ exp(z_j)·z_j in float64 with the full-range exp, for a row whose max is
    +inf (the sums come out +inf, or NaN with a NaN in the row)."""
    seg = row[start:stop]
    floor = like(EXPONENT_FLOOR, row)
    acc_s = 0.0
    acc_u = 0.0
    for j in range(seg.shape[0]):
        d = seg[j] * scale
        e = fast_exp(d)
        acc_s += np.float64(e)
        acc_u += np.float64(e * maxnum(d, floor))
    return acc_s, acc_u


# ---------------------------------------------------------------------------------------------
# Pass 2 pieces: dst_j = exp(d_j)·B + (exp(d_j)·K)·d_j, d_j = (x_j − a)·c − b, B = c·b/s, K = c·k/s
# (exp(d)·K first: at temperatures near the dtype's tiniest, K·d would overflow where exp(d) is 0 or
# d is 0, giving 0·∞ = NaN)
# ((a, b) = (m_x, 0) for float32 logits, (0, m) for float64: see _gradient_kernel)
# ---------------------------------------------------------------------------------------------


@njit(**_GRAD_JIT)
def _grad(x, g, scale, shift, after, coef_b, coef_k):  # pragma: no cover - compiled
    floor = like(EXPONENT_FLOOR, x)
    for j in range(x.shape[0]):
        d = (x[j] - shift) * scale - after
        e = fast_exp_nonpositive(d)
        g[j] = e * coef_b + (e * coef_k) * maxnum(d, floor)


@njit(**_GRAD_JIT)
def _grad_inplace(x, scale, shift, after, coef_b, coef_k):  # pragma: no cover - compiled
    floor = like(EXPONENT_FLOOR, x)
    for j in range(x.shape[0]):
        d = (x[j] - shift) * scale - after
        e = fast_exp_nonpositive(d)
        x[j] = e * coef_b + (e * coef_k) * maxnum(d, floor)


# ---------------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------------


@njit(parallel=True, **_KERNEL_JIT)
def _statistics_kernel(
    logits, labels, valid, scale, block, m_rows, e_rows, u_rows, z_target
):  # pragma: no cover - compiled
    n_rows, n_classes = logits.shape
    c = like(scale, logits)
    neg_inf = like(-np.inf, logits)
    pos_inf = like(np.inf, logits)
    zero = like(0.0, logits)
    for i in prange(n_rows):
        if not valid[i]:
            m_rows[i] = 0.0
            e_rows[i] = 0.0
            u_rows[i] = 0.0
            z_target[i] = 0.0
            continue
        row = logits[i]
        # ---- Pass 1: m_x = max x, s = Σ exp(d) as ties + rest, u = Σ exp(d)·d,
        #      d = (x − m_x)·c, by blocks ----
        m = neg_inf
        ties = 0.0  # terms equal to the running max (exactly 1 each), counted apart
        rest = 0.0  # the other terms of s
        u = 0.0
        for block_start in range(0, n_classes, block):
            block_stop = min(block_start + block, n_classes)
            b = _short_max(row, block_start, block_stop) if n_classes < 32 else _block_max(row, block_start, block_stop)
            if b > m:
                s = ties + rest
                if s > 0.0:  # restate (s, u) at the new max; s = 0 while everything was −inf
                    # floored: exp(−1000) is 0 already, and s·δ stays finite (never 0·(−inf) =
                    # NaN when the earlier blocks sat ~1e306 or more below the new max)
                    delta = max((np.float64(m) - np.float64(b)) * scale, EXPONENT_FLOOR)
                    e = math.exp(delta)
                    u = e * (u + s * delta)
                    rest = e * s
                    ties = 0.0
                m = b
            # shift by 0 while m is −inf (only −inf or NaN so far: exp(−inf) = 0 and a NaN stays
            # NaN, never exp(−inf − (−inf))); m is NaN-free (maxnum skips NaN). A +inf logit, or a
            # max whose x·c overflows the logits' dtype (torch's x/T is +inf there), makes
            # s = +inf (lse = +inf, as torch's logsumexp), or NaN with a NaN in the row
            shift = m if m > neg_inf else zero
            if m * c == pos_inf:
                ds, du = _block_moments_unshifted(row, block_start, block_stop, c)
                rest += ds
            elif b == m:
                dk, ds, du = _block_moments_top(row, block_start, block_stop, c, shift)
                ties += dk
                rest += ds
            else:
                ds, du = _block_moments(row, block_start, block_stop, c, shift)
                rest += ds
            u += du
        y = labels[i]
        if m * c == pos_inf:  # z = x·c overflows the dtype (or a +inf logit): torch's values, NaN
            m_rows[i] = np.inf
            z_target[i] = np.float64(row[y] * c) if 0 <= y < n_classes else 0.0
        else:  # the max of z = x·c and z_y, in float64
            m_rows[i] = np.float64(m) * scale
            z_target[i] = np.float64(row[y]) * scale if 0 <= y < n_classes else 0.0
        e_rows[i] = (ties - 1.0) + rest  # the excess e = s − 1, exact in its ties
        u_rows[i] = u


@njit(parallel=True, **_KERNEL_JIT)
def _gradient_kernel(
    logits, labels, valid, scale, m_rows, e_rows, coef_a, coef_t, coef_k, grad_out, in_place
):  # pragma: no cover - compiled
    n_rows, n_classes = logits.shape
    c = like(scale, logits)
    zero = like(0.0, logits)
    # m = float64(m_x)·c from pass 1 (or a global max of such): for float32 logits m / c gives the
    # float32 max m_x back exactly, so d_j = (x_j − m_x)·c as pass 1; a float64 max may come back an
    # ulp off (10-15% of random maxima; with ulp(m_x)/T beyond 709 exp(d) overflows), so float64
    # rows take d_j = x_j·c − m, each z_j rounded (an ulp of max|x|/T)
    shift_first = logits.itemsize == 4  # float32
    for i in prange(n_rows):
        row = logits[i]
        dst = row if in_place else grad_out[i]
        if not valid[i]:
            _zero_row(dst)
            continue
        shift = like(m_rows[i] / scale, logits) if shift_first else zero
        after = zero if shift_first else like(m_rows[i], logits)
        excess = e_rows[i]
        s = 1.0 + excess
        y = labels[i]
        has_target = 0 <= y < n_classes
        # the target entry in float64, from x_y read before pass 2 may overwrite it:
        # a·(1 − p_y) + p_y·(t + k·d_y), its 1 − p_y = e/s at the max (never 1 − 1/s)
        grad_y = 0.0
        if has_target:
            d_y = np.float64(row[y]) * scale - m_rows[i]
            p_y = math.exp(d_y) / s
            rest_y = excess / s if d_y == 0.0 else 1.0 - p_y
            # max(d_y, −1000): a masked target (−inf) has p_y = 0 and adds a, not 0·(−inf)
            t_y = coef_t[i]
            if not math.isfinite(coef_a[i]):  # torch's chain: ∞ − ∞ = NaN at the target
                t_y = coef_a[i] + (t_y - coef_a[i])
            grad_y = scale * (coef_a[i] * rest_y + p_y * (t_y + coef_k[i] * max(d_y, EXPONENT_FLOOR)))
        # ---- Pass 2: dst_j = c·exp(z_j − m)/s·(b + k·(z_j − m)) ----
        coef_b_row = like(scale * (coef_t[i] - coef_a[i]) / s, logits)  # b = t − a off the target
        coef_k_row = like(scale * coef_k[i] / s, logits)
        if in_place:
            _grad_inplace(row, c, shift, after, coef_b_row, coef_k_row)
        else:
            _grad(row, dst, c, shift, after, coef_b_row, coef_k_row)
        if has_target:
            dst[y] = grad_y


# ---------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------


# each kernel on the calling thread alone, for problems that take one thread (see serial_build)
_statistics_serial = serial_build(_statistics_kernel, "_statistics_serial", **_KERNEL_JIT)
_gradient_serial = serial_build(_gradient_kernel, "_gradient_serial", **_KERNEL_JIT)


def _run(kernel, serial, arguments: tuple, elements: int, parallel: bool | None) -> None:
    """``kernel(*arguments)`` on as many threads as the cross-entropy kernels would take; on one
    thread its ``serial`` build, with no thread pool (unless ``parallel=True``: see
    ``_threading.runs_serial``)."""
    threads = threads_for(elements, parallel, SERIAL_MAX_ELEMENTS)
    if runs_serial(threads, parallel):
        serial(*arguments)
        return
    with running_on(threads):
        kernel(*arguments)


def log_prob_statistics(
    logits: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    temperature: float = 1.0,
    *,
    block: int = DEFAULT_BLOCK,
    parallel: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pass 1 over a C-contiguous float32/float64 ``[N, C]`` array: ``(m, e, u, z_target)``,
    each ``[N]`` float64 (see the module docstring). ``labels`` ``[N]`` int64, ``valid`` ``[N]``
    bool; nothing is validated."""
    n_rows = logits.shape[0]
    m, e, u, z_target = (np.empty(n_rows, dtype=np.float64) for _ in range(4))
    if n_rows:
        arguments = (
            logits, np.ascontiguousarray(labels, dtype=np.int64), np.ascontiguousarray(valid, dtype=np.bool_),
            1.0 / float(temperature), max(int(block), 1), m, e, u, z_target,
        )
        _run(_statistics_kernel, _statistics_serial, arguments, logits.size, parallel)
    return m, e, u, z_target


def log_prob_gradient(
    logits: np.ndarray,
    labels: np.ndarray,
    valid: np.ndarray,
    temperature: float,
    m: np.ndarray,
    e: np.ndarray,
    coefficients: tuple[np.ndarray, np.ndarray, np.ndarray],
    grad_out: np.ndarray,
    *,
    parallel: bool | None = None,
) -> np.ndarray:
    """Pass 2: writes ∂/∂logits into ``grad_out`` (``[N, C]``, the logits' dtype; may be
    ``logits`` itself) from the rows' (m, e) and the coefficients (a, t, k) of
    ``reference.log_probs.gradient_coefficients``, each ``[N]`` float64. Returns ``grad_out``."""
    n_rows = logits.shape[0]
    if n_rows:
        in_place = _same_buffer(grad_out, logits)
        coef_a, coef_t, coef_k = (
            np.ascontiguousarray(np.broadcast_to(np.asarray(c, dtype=np.float64), (n_rows,)))
            for c in coefficients
        )
        arguments = (
            logits, np.ascontiguousarray(labels, dtype=np.int64), np.ascontiguousarray(valid, dtype=np.bool_),
            1.0 / float(temperature), np.ascontiguousarray(m, dtype=np.float64),
            np.ascontiguousarray(e, dtype=np.float64), coef_a, coef_t, coef_k,
            logits if in_place else grad_out, in_place,
        )
        _run(_gradient_kernel, _gradient_serial, arguments, logits.size, parallel)
    return grad_out


def compile_all() -> list[str]:
    """Compile (or load from Numba's cache) the log-probability kernels and their serial builds
    for float32 and float64 logits; returns the names of the specializations, e.g.
    ``"log-prob statistics float32"``."""
    done = []
    for dtype in (np.float32, np.float64):
        logits = np.zeros((1, 4), dtype=dtype)
        labels = np.zeros(1, dtype=np.int64)
        valid = np.ones(1, dtype=np.bool_)
        name = np.dtype(dtype).name
        for parallel, kind in ((True, ""), (False, "serial ")):
            m, e, _, _ = log_prob_statistics(logits, labels, valid, parallel=parallel)
            ones = np.ones(1)
            log_prob_gradient(
                logits, labels, valid, 1.0, m, e, (ones, ones, ones), np.empty_like(logits), parallel=parallel
            )
            done += [f"log-prob {kind}statistics {name}", f"log-prob {kind}gradient {name}"]
    return done
