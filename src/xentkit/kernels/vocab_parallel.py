"""Shard-level softmax kernels for a vocabulary split across ranks (tensor parallelism).

Rank r holds the columns ``[start_r, start_r + V_r)`` of the logits z (rows × V classes). The
full-row quantities of cross-entropy combine over ranks from per-shard statistics (the caller
does the combining with two all-reduces of O(rows) floats; nothing here communicates):

    m_r = max_{j in shard} z_j                              (NaN ignored, −inf for no finite value)
    t_r = m_r if m_r > −inf else 0                          (the shard's shift)
    s_r = Σ_{j in shard} exp(z_j − t_r)                      (float64 across blocks; a block
                                                             holding the running max counts
                                                             its terms, exactly 1, apart)
    e_r = s_r − 1                                           (returned: the excess, the max's
                                                             terms never summed into it)
    M   = max_r m_r                                         (all-reduce MAX)
    E   = (K − 1) + Σ_{m_r = M} e_r + Σ_{m_r < M} s_r·exp(t_r − M),  K = #{r: m_r = M}
                                                            (all-reduce SUM of K's ones too)
    lse = M + log1p(E)

and, for the loss, the target logit and the class-weighted logit sum (all-reduce SUM)::

    z_y = Σ_r [y in shard r]·z_y,      S_z = Σ_r (S'_r + W_r·(t_r − M)),
    S'_r = Σ_{j in shard r} w_j·(z_j − t_r),  t_r = m_r (0 without a finite logit),  W_r = Σ w_j

so that the loss's smoothing term Σ_c w_c·(lse − z_c) = W·log S − S_z (W = Σ_r W_r) is a sum of
small terms where the logits are huge (a row filled with −3e38: W·lse − Σ w_j·z_j cancelled to
garbage there); a class of weight 0 adds 0 to S'_r, even masked.

Two kernels, each one sweep over the shard rows (``prange`` over rows):

- :func:`shard_softmax_stats` (pass 1, one read): online softmax over blocks of the row
  (Milakov & Gimelshein, arXiv 1805.02867), returning ``m_r``, ``e_r``, the local target logit
  and the local ``S'_r = Σ w_j·(z_j − t_r)``.
- :func:`shard_softmax_grad` (pass 2, one write): with per-row coefficients computed by the
  caller from the global statistics,
  ``grad_ij = c_i·exp(z_ij − M_i) − σ_i·w_j``, then the target entry (when the row's label is in
  this shard) is overwritten by ``target_grad_i``, computed by the caller in float64.

Rows are labelled by their column in this shard: ``local_labels[i] ≥ 0`` is the target's column
here, ``-1`` means the target lives on another rank, ``-2`` means an ignored row (pass 1 skips it:
statistics ``−inf, −1, 0, 0``, an empty sum; pass 2 writes a zero row). No validation here.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from xentkit.kernels._exp import fast_exp, like
from xentkit.kernels._jit import KERNEL_OPTIONS, LOOP_FLAGS, helper_options
from xentkit.kernels.cross_entropy import (  # shared pass-1 pieces
    _block_max,
    _block_sum_exp_top,
    _block_sum_z,
)

# The single-process kernel's loop flags (see ``kernels._jit``); these kernels keep them on their
# own code too, and their helpers are inlined.
_JIT = helper_options(LOOP_FLAGS)
_KERNEL_JIT = {**KERNEL_OPTIONS, "fastmath": LOOP_FLAGS}

# Classes per pass-1 block: 2048 float64 = 16 KiB, so a block stays in L1 between its loops.
DEFAULT_BLOCK = 2048

# Labels of rows in ``local_labels`` (see the module docstring).
ELSEWHERE = -1
IGNORED = -2


@njit(**_JIT)
def _block_sum_exp(row, start, stop, shift):  # pragma: no cover - compiled
    """Σ_j exp(row[j] − shift) over [start, stop), vector lanes in the row's dtype."""
    seg = row[start:stop]
    acc = like(0.0, row)
    for j in range(seg.shape[0]):
        acc += fast_exp(seg[j] - shift)
    return np.float64(acc)


@njit(parallel=True, **_KERNEL_JIT)
def _stats_kernel(  # pragma: no cover - compiled
    logits, local_labels, weight, has_weight, want_sum_z, block, row_max, row_excess, target, sum_z
):
    n_rows, n_cols = logits.shape
    neg_inf = like(-np.inf, logits)
    pos_inf = like(np.inf, logits)
    zero = like(0.0, logits)
    for i in prange(n_rows):
        y = local_labels[i]
        if y == IGNORED:
            row_max[i] = -np.inf
            row_excess[i] = -1.0  # s = 0
            target[i] = 0.0
            sum_z[i] = 0.0
            continue
        row = logits[i]
        # 1. Online softmax over blocks: m = running max, s = Σ exp(z − shift) = ties + rest with
        #    shift = m (or 0 while every value so far is −inf/NaN, so exp(−inf) = 0, never
        #    exp(−inf − (−inf))), ties the count of terms equal to m (each exactly 1) kept apart
        #    from the rest, so that e = s − 1 = (ties − 1) + rest keeps a confident row's digits.
        #    A larger block max b rescales s by exp(m − b) into the rest.
        m = neg_inf
        ties = 0.0
        rest = 0.0
        acc_z = 0.0  # S' = Σ w_j·(z_j − ref) so far, ref the running shift (float64)
        weight_seen = 0.0
        ref = 0.0
        for start in range(0, n_cols, block):
            stop = min(start + block, n_cols)
            b = _block_max(row, start, stop)
            if b > m:
                rest = (ties + rest) * math.exp(np.float64(m) - np.float64(b))
                ties = 0.0
                m = b
            shift = m if m > neg_inf else zero
            if want_sum_z and np.float64(shift) != ref:  # S' follows the shift as s does
                acc_z -= weight_seen * (np.float64(shift) - ref)
                ref = np.float64(shift)
            if b == m and neg_inf < m < pos_inf:
                # the block holds the running max: its terms exactly 1 counted apart from the
                # rest (a confident row's e keeps its digits, which the dtype's lanes would lose)
                block_ties, below = _block_sum_exp_top(row, start, stop, m)
                ties += block_ties
                rest += below
            else:
                rest += _block_sum_exp(row, start, stop, shift)
            # 2. S'_r (label smoothing only): Σ_j w_j·(z_j − t_r) over the shard, float64.
            if want_sum_z:
                block_z, block_w = _block_sum_z(row, start, stop, weight, has_weight, ref)
                acc_z += block_z
                weight_seen += block_w
        row_max[i] = m
        row_excess[i] = (ties - 1.0) + rest
        # 3. The target logit when the label is one of this shard's columns, else 0.
        target[i] = np.float64(row[y]) if y >= 0 else 0.0
        sum_z[i] = acc_z


@njit(parallel=True, **_KERNEL_JIT)
def _grad_kernel(  # pragma: no cover - compiled
    logits, local_labels, shift, coef, smooth, target_grad, weight, has_weight, want_smooth, out
):
    n_rows, n_cols = logits.shape
    zero = like(0.0, logits)
    for i in prange(n_rows):
        y = local_labels[i]
        dst = out[i]
        if y == IGNORED:
            for j in range(n_cols):
                dst[j] = zero
            continue
        row = logits[i]
        m = like(shift[i], logits)
        c = like(coef[i], logits)
        # grad_ij = c_i·exp(z_ij − M_i) − σ_i·w_j   (reads z_ij, then writes grad_ij: in place OK)
        if want_smooth:
            beta = like(-smooth[i], logits)
            if has_weight:
                for j in range(n_cols):
                    dst[j] = c * fast_exp(row[j] - m) + beta * weight[j]
            else:
                for j in range(n_cols):
                    dst[j] = c * fast_exp(row[j] - m) + beta
        else:
            for j in range(n_cols):
                dst[j] = c * fast_exp(row[j] - m)
        # target entry, computed by the caller in float64 (it carries −(1−ε)·w_y·g)
        if y >= 0:
            dst[y] = target_grad[i]


_ONE = np.ones(1, dtype=np.float64)


def shard_softmax_stats(
    logits: np.ndarray,
    local_labels: np.ndarray,
    weight: np.ndarray | None,
    want_sum_z: bool,
    *,
    block: int = DEFAULT_BLOCK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pass 1 over a C-contiguous ``[rows, V_r]`` float32/float64 shard (one read).

    ``local_labels`` ``[rows]`` int64 (column here, ``-1`` elsewhere, ``-2`` ignored); ``weight``
    this shard's ``[V_r]`` class weights (float64) or None; ``want_sum_z`` computes ``S'_r`` (only
    label smoothing needs it). Returns four ``[rows]`` float64 arrays
    ``(m_r, e_r = s_r − 1, z_y or 0, S'_r = Σ_j w_j·(z_j − t_r) or 0)`` as in the module docstring
    (t_r = m_r, or 0 without a finite logit); ignored rows give ``(−inf, −1, 0, 0)``.
    """
    rows = logits.shape[0]
    out = [np.empty(rows, dtype=np.float64) for _ in range(4)]
    if rows == 0:
        return out[0], out[1], out[2], out[3]
    has_weight = weight is not None
    weight64 = _ONE if weight is None else np.ascontiguousarray(weight, dtype=np.float64)
    _stats_kernel(
        logits, np.ascontiguousarray(local_labels, dtype=np.int64), weight64, has_weight,
        bool(want_sum_z), max(int(block), 1), out[0], out[1], out[2], out[3],
    )
    return out[0], out[1], out[2], out[3]


def shard_softmax_grad(
    logits: np.ndarray,
    local_labels: np.ndarray,
    shift: np.ndarray,
    coef: np.ndarray,
    smooth: np.ndarray | None,
    target_grad: np.ndarray,
    weight: np.ndarray | None,
    out: np.ndarray,
) -> np.ndarray:
    """Pass 2 (one write): ``out[i, j] = coef_i·exp(z_ij − shift_i) − smooth_i·w_j``, then
    ``out[i, y_i] = target_grad_i`` for rows whose label is in this shard; ignored rows get 0.

    ``logits`` and ``out`` are C-contiguous ``[rows, V_r]`` of one float dtype; ``out`` may be
    ``logits`` itself (in place). ``shift``, ``coef``, ``target_grad`` and ``smooth`` (None: no
    smoothing term) are ``[rows]`` float64, ``weight`` ``[V_r]`` or None (all ones). Returns ``out``.
    """
    if logits.shape[0] == 0:
        return out
    want_smooth = smooth is not None
    has_weight = weight is not None
    weight_work = _ONE.astype(logits.dtype) if weight is None else np.ascontiguousarray(weight, dtype=logits.dtype)
    _grad_kernel(
        logits,
        np.ascontiguousarray(local_labels, dtype=np.int64),
        np.ascontiguousarray(shift, dtype=np.float64),
        np.ascontiguousarray(coef, dtype=np.float64),
        _ONE if smooth is None else np.ascontiguousarray(smooth, dtype=np.float64),
        np.ascontiguousarray(target_grad, dtype=np.float64),
        weight_work,
        has_weight,
        want_smooth,
        out,
    )
    return out


def compile_all() -> list[str]:
    """Compile (or load from Numba's cache) the shard kernels for float32 and float64 logits, with
    and without weights and label smoothing's sum; returns the specializations' names."""
    done = []
    for dtype in (np.float32, np.float64):
        logits = np.zeros((1, 4), dtype=dtype)
        labels = np.zeros(1, dtype=np.int64)
        for weight in (None, np.ones(4)):
            shard_softmax_stats(logits, labels, weight, want_sum_z=weight is not None)
            ones = np.ones(1)
            shard_softmax_grad(logits, labels, ones, ones, ones if weight is not None else None, ones, weight,
                               np.empty_like(logits))
        done += [f"shard statistics {np.dtype(dtype).name}", f"shard gradient {np.dtype(dtype).name}"]
    return done
