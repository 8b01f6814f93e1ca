"""Fused kernels of softmax, log-softmax and logsumexp (formulas:
``xentkit.reference.activations``).

One kernel per function, each with a one-thread build; per row (``prange`` over rows; a row of
C classes x):

    log-softmax and logsumexp, pass 1 (one read of the row, online in blocks: the cross-entropy
    kernel's own, ``cross_entropy._pass1``):
        m = max_j x_j,  e = Σ_j exp(x_j − m) − 1   (float64 across blocks; the terms at the max,
                                                    exactly 1, counted apart from the rest)
        logsumexp:    lse = m + log1p(e)
        log-softmax:  out_j = (x_j − m) − log1p(e)   (one more read, one write; the row is still
                                                     in cache for rows up to the L2; a confident
                                                     row's top entry, −log1p(e) ≈ −e, keeps its
                                                     relative accuracy)
    rows of at most ``TILE_MAX_CLASSES`` classes (log-softmax and logsumexp): the cross-entropy
    tile kernels' first step (``cross_entropy._tile_exponentials``: each row's max, then the
    exponentials of ~4096 logits of whole rows in one flat loop), e from the tile (``_tile_sum``,
    float64, the max's terms apart), log1p(e) of the tile's rows in vector lanes
    (``_exp.fast_log1p``); the same formulas as above, e summed in float64 where pass 1 sums a
    block in the dtype's lanes
    softmax, each exponential once:
        m = max_j x_j (one read; NaN skipped)
        out_j = exp(x_j − m), s = Σ_j out_j    (one read, one write; each block summed in the
                                                dtype's vector lanes, float64 across blocks:
                                                every term ≤ 1, so the rounding stays relative)
        out_j ·= 1/s                           (the row, in cache)
    (A first version of the softmax gave other bits in the process that compiled it than from
    Numba's cache; the cause was its helpers being calls, see ``kernels._jit``; inlined, it gives
    the same bits from either build, fresh or cached.)

Special values, as torch (and the reference): a NaN makes its row NaN (lse NaN); a +inf logit
makes the softmax and log-softmax rows NaN and lse +inf (NaN beside a NaN); a row of −inf only is
NaN (0/0) with lse −inf. −inf logits are masked classes (probability 0, log-probability −inf).

No validation: the caller (``xentkit.api.activations``) checks the array and moves the class axis
last first; ``x`` is C-contiguous ``[N, C]`` float32/float64, ``out`` the same shape and dtype.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from xentkit.kernels._exp import fast_exp_nonpositive, fast_log1p, like
from xentkit.kernels._jit import helper_options
from xentkit.kernels._threading import running_on, runs_serial, serial_build, threads_for
from xentkit.kernels.cross_entropy import (
    _JIT,
    _KERNEL_JIT,
    DEFAULT_BLOCK,
    SERIAL_MAX_ELEMENTS,
    _block_max,
    _pass1,
    _short_max,
    _tile_exponentials,
    _tile_sum,
    _tiles,
    log_of_excess,
)

__all__ = ["compile_all", "softmax_rows"]

# what the kernel computes per row
SOFTMAX, LOG_SOFTMAX, LOGSUMEXP = 0, 1, 2
# The writing loops have no fastmath flags: with ``reassoc`` LLVM may turn (x − m) − log s into
# x − (m + log s), which rounds m + log s to the logits' ulp (5e-4 at 1e4 in float32) where
# x − m is exact. They have no reduction to vectorize, so they lose nothing.
_WRITE_JIT = helper_options(False)
# Rows of at most this many classes (and no longer than ``block``) take the tile kernels for
# log-softmax and logsumexp: such a row is shorter than the row kernel's vector loop. One thread,
# 655360 float32 logits, best of 41, an AVX-512 machine, row kernel → tile kernel: log-softmax
# 10 / 16 / 24 / 32 classes 3.05 → 1.57, 1.93 → 1.34, 1.50 → 1.30, 1.38 → 1.26 ms; logsumexp
# 3.06 → 1.42, 1.95 → 1.27, 1.56 → 1.25, 1.27 → 1.21. Softmax keeps its row kernel (a tile was
# slower: 1.34 → 1.56 at 10 classes, 0.81 → 1.36 at 16).
TILE_MAX_CLASSES = 32
_NO_WEIGHT = {np.dtype(np.float32): np.ones(1, np.float32), np.dtype(np.float64): np.ones(1, np.float64)}


@njit(**_JIT)
def _block_exps(x, out, start, stop, shift):  # pragma: no cover - compiled
    """out_j = exp(x_j − shift) over [start, stop); returns their sum (the dtype's vector lanes)."""
    seg = x[start:stop]
    dst = out[start:stop]
    acc = like(0.0, x)
    for j in range(seg.shape[0]):
        e = fast_exp_nonpositive(seg[j] - shift)
        dst[j] = e
        acc += e
    return np.float64(acc)


@njit(**_WRITE_JIT)
def _scale(out, factor):  # pragma: no cover - compiled
    for j in range(out.shape[0]):
        out[j] *= factor


@njit(**_WRITE_JIT)
def _write_log_softmax(x, out, shift, log_s):  # pragma: no cover - compiled
    for j in range(x.shape[0]):
        out[j] = (x[j] - shift) - log_s


@njit(**_WRITE_JIT)
def _has_nan(x):  # pragma: no cover - compiled
    found = False
    for j in range(x.shape[0]):
        found |= x[j] != x[j]
    return found


@njit(**_WRITE_JIT)
def _log_of_sum(excess):  # pragma: no cover - compiled
    """log s = log1p(e) of a pass-1 excess e = s − 1: −inf for s = 0, NaN for NaN."""
    return log_of_excess(excess) if excess > -1.0 else (-np.inf if excess == -1.0 else excess)


# One kernel per function, each row's work written out in its loop: one kernel branching on the
# function per row, or a row's work in an inlined function of its own, made 10-class rows 1.5-2×
# slower (Numba's forceinline inlines a function optimized on its own). Each has a serial build.


@njit(parallel=True, **_KERNEL_JIT)
def _softmax_kernel(x, out, no_weight, block):  # pragma: no cover - compiled
    """out[i] = softmax(x[i]), each exponential once: m = max_j x_j (one read; NaN skipped),
    out_j = exp(x_j − m) with their sum s (one read, one write), then out_j ·= 1/s in cache.

    No branch for special rows (a test on m made 10-class rows 1.5× slower): a NaN makes s NaN;
    a +inf max gives ∞ − ∞ = NaN, and a row without a finite logit −inf − (−inf) = NaN, so s is
    NaN and the whole row NaN, as torch. (``no_weight``: the other kernels' signature.)"""
    n_rows, n_classes = x.shape
    for i in prange(n_rows):
        row = x[i]
        m = _short_max(row, 0, n_classes) if n_classes < 32 else _block_max(row, 0, n_classes)
        s = 0.0
        for block_start in range(0, n_classes, block):
            s += _block_exps(row, out[i], block_start, min(block_start + block, n_classes), m)
        _scale(out[i], like(1.0 / s, x))


@njit(parallel=True, **_KERNEL_JIT)
def _log_softmax_kernel(x, out, no_weight, block):  # pragma: no cover - compiled
    """out[i] = log_softmax(x[i]): pass 1 (m, e = s − 1), then (x_j − m) − log1p(e)."""
    n_rows, n_classes = x.shape
    neg_inf = like(-np.inf, x)
    zero = like(0.0, x)
    for i in prange(n_rows):
        row = x[i]
        m, excess, _, _ = _pass1(row, 0, n_classes, no_weight, False, 0.0, 0.0, block)
        shift = m if m > neg_inf else zero  # an all −inf row: shift 0, −inf − log 0 = NaN
        _write_log_softmax(row, out[i], shift, like(_log_of_sum(excess), x))


@njit(parallel=True, **_KERNEL_JIT)
def _logsumexp_kernel(x, lse_rows, no_weight, block):  # pragma: no cover - compiled
    """lse_rows[i] = logsumexp(x[i]) in float64: m + log1p(e) from pass 1."""
    n_rows, n_classes = x.shape
    pos_inf = like(np.inf, x)
    for i in prange(n_rows):
        row = x[i]
        m, excess, _, _ = _pass1(row, 0, n_classes, no_weight, False, 0.0, 0.0, block)
        if m == pos_inf:  # exp(+inf − +inf) made s NaN: the sum is +inf, or NaN beside a NaN
            lse_rows[i] = np.nan if _has_nan(row) else np.inf
        else:  # (an all −inf row: s = 0, log s = −inf; a NaN: NaN)
            lse_rows[i] = np.float64(m) + _log_of_sum(excess)


@njit(forceinline=True, **_KERNEL_JIT)
def _tile_log_sums(x, first, rows):  # pragma: no cover - compiled
    """``(maxima, log_s)`` of ``rows`` rows from row ``first``: each row's max (the logits'
    dtype) and log s = log1p(e) in float64 (−inf for a row of −inf, NaN for a NaN or a +inf max),
    from the tile's exponentials."""
    n_classes = x.shape[1]
    one = like(1.0, x)
    maxima, e, _ = _tile_exponentials(x, first, rows, False, one, one)
    log_s = np.empty(rows)
    for i in range(rows):
        log_s[i] = _tile_sum(e, i * n_classes, (i + 1) * n_classes)
    for i in range(rows):  # (vector lanes)
        log_s[i] = fast_log1p(log_s[i])
    return maxima, log_s


@njit(**_WRITE_JIT)
def _write_log_softmax_row(x, out, r, shift, log_s):  # pragma: no cover - compiled
    """out[r] = (x[r] − shift) − log s, indexing the 2-D arrays (no view of the row)."""
    for j in range(x.shape[1]):
        out[r, j] = (x[r, j] - shift) - log_s


@njit(parallel=True, **_KERNEL_JIT)
def _log_softmax_tile_kernel(x, out, no_weight, block):  # pragma: no cover - compiled
    """``_log_softmax_kernel``'s contract for rows of at most ``TILE_MAX_CLASSES`` classes,
    ``prange`` over tiles of whole rows (``block`` unused)."""
    n_rows, n_classes = x.shape
    neg_inf = like(-np.inf, x)
    zero = like(0.0, x)
    tile_rows, n_tiles = _tiles(n_rows, n_classes)
    for tile in prange(n_tiles):
        first = tile * tile_rows
        rows = min(tile_rows, n_rows - first)
        maxima, log_s = _tile_log_sums(x, first, rows)
        for i in range(rows):
            m = maxima[i]  # (an all −inf row: shift 0, −inf − log 0 = NaN, as the row kernel)
            _write_log_softmax_row(x, out, first + i, m if m > neg_inf else zero, like(log_s[i], x))


@njit(parallel=True, **_KERNEL_JIT)
def _logsumexp_tile_kernel(x, lse_rows, no_weight, block):  # pragma: no cover - compiled
    """``_logsumexp_kernel``'s contract for rows of at most ``TILE_MAX_CLASSES`` classes."""
    n_rows, n_classes = x.shape
    pos_inf = like(np.inf, x)
    tile_rows, n_tiles = _tiles(n_rows, n_classes)
    for tile in prange(n_tiles):
        first = tile * tile_rows
        rows = min(tile_rows, n_rows - first)
        maxima, log_s = _tile_log_sums(x, first, rows)
        for i in range(rows):
            r = first + i
            if maxima[i] == pos_inf:  # the sum is +inf, or NaN beside a NaN
                lse_rows[r] = np.nan if _has_nan(x[r]) else np.inf
            else:  # (an all −inf row: −inf + log 0 = −inf; a NaN: NaN)
                lse_rows[r] = np.float64(maxima[i]) + log_s[i]


_softmax_serial = serial_build(_softmax_kernel, "_softmax_serial", **_KERNEL_JIT)
_log_softmax_serial = serial_build(_log_softmax_kernel, "_log_softmax_serial", **_KERNEL_JIT)
_logsumexp_serial = serial_build(_logsumexp_kernel, "_logsumexp_serial", **_KERNEL_JIT)
_log_softmax_tile_serial = serial_build(_log_softmax_tile_kernel, "_log_softmax_tile_serial", **_KERNEL_JIT)
_logsumexp_tile_serial = serial_build(_logsumexp_tile_kernel, "_logsumexp_tile_serial", **_KERNEL_JIT)
# what → (threaded kernel, serial build)
_KERNELS = {
    SOFTMAX: (_softmax_kernel, _softmax_serial),
    LOG_SOFTMAX: (_log_softmax_kernel, _log_softmax_serial),
    LOGSUMEXP: (_logsumexp_kernel, _logsumexp_serial),
}
# the same for rows of at most TILE_MAX_CLASSES classes
_TILE_KERNELS = {
    SOFTMAX: _KERNELS[SOFTMAX],
    LOG_SOFTMAX: (_log_softmax_tile_kernel, _log_softmax_tile_serial),
    LOGSUMEXP: (_logsumexp_tile_kernel, _logsumexp_tile_serial),
}


def softmax_rows(
    x: np.ndarray, what: int, *, block: int = DEFAULT_BLOCK, parallel: bool | None = None
) -> np.ndarray:
    """Softmax (``what`` = SOFTMAX) or log-softmax (LOG_SOFTMAX) of each row of the C-contiguous
    ``[N, C]`` float32/float64 ``x`` as a new array of its shape and dtype, or its logsumexp
    (LOGSUMEXP) as ``[N]`` float64. Nothing is validated. ``block`` and ``parallel`` as for
    :func:`xentkit.kernels.cross_entropy.cross_entropy_rows`."""
    n_rows, n_classes = x.shape
    out = np.empty(n_rows, dtype=np.float64) if what == LOGSUMEXP else np.empty((n_rows, n_classes), dtype=x.dtype)
    if n_rows == 0 or n_classes == 0:
        return out
    arguments = (x, out, _NO_WEIGHT[x.dtype], block)
    kernel, serial = (_TILE_KERNELS if n_classes <= min(TILE_MAX_CLASSES, int(block)) else _KERNELS)[what]
    threads = threads_for(x.size, parallel, SERIAL_MAX_ELEMENTS)
    if runs_serial(threads, parallel):
        serial(*arguments)
    else:
        with running_on(threads):
            kernel(*arguments)
    return out


def compile_all() -> list[str]:
    """Compile (or load from Numba's cache) the kernel and its serial build for float32 and float64
    (see ``xentkit.kernels.compile_all``)."""
    done = []
    for dtype in (np.float32, np.float64):
        for classes, kind in ((TILE_MAX_CLASSES + 1, ""), (4, " tile")):
            x = np.zeros((1, classes), dtype=dtype)
            for what, label in ((SOFTMAX, "softmax"), (LOG_SOFTMAX, "log_softmax"), (LOGSUMEXP, "logsumexp")):
                if kind and what == SOFTMAX:
                    continue  # (softmax has no tile kernel)
                for parallel, name in ((True, "rows"), (False, "serial")):
                    softmax_rows(x, what, parallel=parallel)
                    done.append(f"{label}{kind} {name} {np.dtype(dtype).name}")
    return done
