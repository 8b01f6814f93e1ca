"""Fused kernels of softmax, log-softmax and logsumexp (formulas:
``xentkit.reference.activations``).

Per row (``prange`` over rows; a row of C classes x):

    Pass 1, statistics (one read of the row, online in blocks: the cross-entropy kernel's own,
    ``cross_entropy._pass1``):
        m = max_j x_j,  s = Σ_j exp(x_j − m)   (float64 across blocks; the terms at the max,
                                                exactly 1, counted apart from the rest)
        logsumexp:  lse = m + log s
    Pass 2, output (one more read, one write; the row is still in cache for rows up to the L2):
        log-softmax:  out_j = (x_j − m) − log s
        softmax:      out_j = exp(x_j − m)·(1/s)
    (Each exponential once, written and summed, then scaled in cache, was 1.5× faster at
    4096 × 1000, but its bits depended on the process that compiled each build: a reduction
    vectorized one way in the threaded build and another in the serial one. The two passes above
    give the same bits from either build, fresh or cached.)

Special values, as torch (and the reference): a NaN makes its row NaN (lse NaN); a +inf logit
makes the softmax and log-softmax rows NaN and lse +inf (NaN beside a NaN); a row of −inf only is
NaN (0/0) with lse −inf. −inf logits are masked classes (probability 0, log-probability −inf).

No validation: the caller (``xentkit.api.activations``) checks the array and moves the class axis
last first; ``x`` is C-contiguous ``[N, C]`` float32/float64, ``out`` the same shape and dtype.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from xentkit.kernels._exp import fast_exp_nonpositive, like
from xentkit.kernels._jit import helper_options
from xentkit.kernels._threading import running_on, serial_build, threads_for
from xentkit.kernels.cross_entropy import (
    _KERNEL_JIT,
    DEFAULT_BLOCK,
    SERIAL_MAX_ELEMENTS,
    _pass1,
)

__all__ = ["compile_all", "softmax_rows"]

# what the kernel computes per row
SOFTMAX, LOG_SOFTMAX, LOGSUMEXP = 0, 1, 2
# The writing loops have no fastmath flags: with ``reassoc`` LLVM may turn (x − m) − log s into
# x − (m + log s), which rounds m + log s to the logits' ulp (5e-4 at 1e4 in float32) where
# x − m is exact. They have no reduction to vectorize, so they lose nothing.
_WRITE_JIT = helper_options(False)
_NO_WEIGHT = {np.dtype(np.float32): np.ones(1, np.float32), np.dtype(np.float64): np.ones(1, np.float64)}


@njit(**_WRITE_JIT)
def _write_softmax(x, out, shift, inv_s):  # pragma: no cover - compiled
    for j in range(x.shape[0]):
        out[j] = fast_exp_nonpositive(x[j] - shift) * inv_s


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


@njit(parallel=True, **_KERNEL_JIT)
def _softmax_kernel(x, out, lse_rows, what, no_weight, block):  # pragma: no cover - compiled
    """Every row: pass 1 (m, s), then ``what``: SOFTMAX or LOG_SOFTMAX into ``out[i]``, or
    LOGSUMEXP into ``lse_rows[i]`` (``out`` unused)."""
    n_rows, n_classes = x.shape
    neg_inf = like(-np.inf, x)
    pos_inf = like(np.inf, x)
    zero = like(0.0, x)
    for i in prange(n_rows):
        row = x[i]
        # ---- Pass 1: m = max_j x_j, s = Σ_j exp(x_j − m) (one read of the row) ----
        m, s, _, _ = _pass1(row, 0, n_classes, no_weight, False, 0.0, 0.0, block)
        if what == LOGSUMEXP:
            if m == pos_inf:  # exp(+inf − +inf) made s NaN: the sum is +inf, or NaN beside a NaN
                lse_rows[i] = np.nan if _has_nan(row) else np.inf
            else:  # (an all −inf row: s = 0, log s = −inf; a NaN: NaN)
                lse_rows[i] = np.float64(m) + (math.log(s) if s > 0.0 else (-np.inf if s == 0.0 else s))
            continue
        # ---- Pass 2: the output row (one write) ----
        shift = m if m > neg_inf else zero  # an all −inf row: shift 0, then 0/0 = NaN as torch
        if what == SOFTMAX:
            _write_softmax(row, out[i], shift, like(1.0 / s if s != 0.0 else np.inf, x))
        else:
            _write_log_softmax(row, out[i], shift, like(math.log(s) if s > 0.0 else (-np.inf if s == 0.0 else s), x))


# the kernel on the calling thread alone, for problems that take one thread (see serial_build)
_softmax_serial = serial_build(_softmax_kernel, "_softmax_serial", **_KERNEL_JIT)


def softmax_rows(
    x: np.ndarray, what: int, *, block: int = DEFAULT_BLOCK, parallel: bool | None = None
) -> np.ndarray:
    """Softmax (``what`` = SOFTMAX) or log-softmax (LOG_SOFTMAX) of each row of the C-contiguous
    ``[N, C]`` float32/float64 ``x`` as a new array of its shape and dtype, or its logsumexp
    (LOGSUMEXP) as ``[N]`` float64. Nothing is validated. ``block`` and ``parallel`` as for
    :func:`xentkit.kernels.cross_entropy.cross_entropy_rows`."""
    n_rows, n_classes = x.shape
    out = np.empty((n_rows, n_classes) if what != LOGSUMEXP else (0, 0), dtype=x.dtype)
    lse_rows = np.empty(n_rows if what == LOGSUMEXP else 0, dtype=np.float64)
    if n_rows == 0 or n_classes == 0:
        return lse_rows if what == LOGSUMEXP else out
    arguments = (x, out, lse_rows, what, _NO_WEIGHT[x.dtype], block)
    threads = threads_for(x.size, parallel, SERIAL_MAX_ELEMENTS)
    if threads == 1:
        _softmax_serial(*arguments)
    else:
        with running_on(threads):
            _softmax_kernel(*arguments)
    return lse_rows if what == LOGSUMEXP else out


def compile_all() -> list[str]:
    """Compile (or load from Numba's cache) the kernel and its serial build for float32 and float64
    (see ``xentkit.kernels.compile_all``)."""
    done = []
    for dtype in (np.float32, np.float64):
        x = np.zeros((1, 4), dtype=dtype)
        for parallel, name in ((True, "rows"), (False, "serial")):
            softmax_rows(x, SOFTMAX, parallel=parallel)
            done.append(f"softmax {name} {np.dtype(dtype).name}")
    return done
