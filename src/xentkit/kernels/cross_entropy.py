"""Fused cross-entropy kernel: per-row loss and gradient in one read of the logits.

For each row i (``prange`` over rows; a row of C classes, label y, logits x):

    Pass 1 (one read of the row, online softmax; Milakov & Gimelshein, arXiv 1805.02867):
        z_j = softcap·tanh(x_j/softcap)   (z_j = x_j without a softcap)
        processed in blocks of ``block`` classes that stay in L1 between two short loops:
            b   = max_{j in block} z_j                          (vector maxnum)
            if b > m:  s ← s·exp(m − b);  m ← b                 (rescale the running sum)
            s  += Σ_{j in block} exp(z_j − m)                   (float32 lanes, float64 total)
            S_z += Σ_{j in block} w_j·z_j                        (only with label smoothing)
        lse = m + log(s)

    Loss (float64):
        loss_i = (1−ε)·w_y·(lse − z_y) + (ε/C)·(W·lse − S_z),      W = Σ_c w_c

    Pass 2 (one write of the row; exp recomputed, no probabilities stored):
        A   = (1−ε)·w_y + ε·W/C
        c   = (g_i·A + g^z_i·2·λ_z·lse) / s          so that c·exp(z_j − m) = coefficient·p_j
        β_j = −ε·g_i·w_j/C
        grad_ij = s'(x_ij)·(c·exp(z_j − m) + β_j),   s'(x) = 1 − tanh²(x/softcap)  (1 without cap)
    then the target entry is rewritten in float64 (it needs the −(1−ε)·w_y·g_i term):
        grad_iy = s'(x_iy)·(g_i·(p_y·A − (1−ε)·w_y − ε·w_y/C) + g^z_i·2·λ_z·lse·p_y)

Pass 2 reads x_ij and then writes grad_ij of the same element, and x_iy is saved before pass 2,
so ``grad_out`` may be the logits array itself (in place). In place, the pass-2 loops take the
single array as both source and destination, so LLVM sees one pointer and vectorizes them
without an aliasing check.

Special values: a −inf logit contributes exp(−inf) = 0 and gradient 0 (blocks of −inf before
the first finite block are summed with shift 0, never as exp(−inf − (−inf))); a NaN anywhere in
a row makes that row's loss and gradient NaN; finite logits of any size (±1e30 in float32,
±1e300 in float64) stay finite because every exponent is z_j − max ≤ 0. Ignored rows get loss
0, lse 0 and a zero gradient row.

No validation here: the api checks shapes, dtypes and labels before calling.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from xentkit.kernels._exp import fast_exp, fast_tanh, like, maxnum

# Flags of the loops: reassoc lets LLVM split the sums over vector lanes; contract gives FMAs.
# No nnan/ninf: NaN and ±inf logits are part of the contract.
LOOP_FLAGS = {"contract", "reassoc", "nsz"}
_JIT = {"cache": True, "fastmath": LOOP_FLAGS, "error_model": "numpy", "nogil": True}

# Classes per pass-1 block: 2048 float64 = 16 KiB, so a block stays in L1 between its loops.
DEFAULT_BLOCK = 2048


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
def _block_sum_exp(row, start, stop, shift):  # pragma: no cover - compiled
    """Σ_j exp(row[j] − shift) over [start, stop), accumulated in the array's dtype."""
    seg = row[start:stop]
    acc = like(0.0, row)
    for j in range(seg.shape[0]):
        acc += fast_exp(seg[j] - shift)
    return np.float64(acc)


@njit(**_JIT)
def _block_sum_exp_capped(row, start, stop, shift, cap, inv_cap):  # pragma: no cover
    """Σ_j exp(cap·tanh(row[j]/cap) − shift) over [start, stop)."""
    seg = row[start:stop]
    acc = like(0.0, row)
    for j in range(seg.shape[0]):
        t, _ = fast_tanh(seg[j] * inv_cap)
        acc += fast_exp(cap * t - shift)
    return np.float64(acc)


@njit(**_JIT)
def _block_sum_z(row, start, stop, weight, has_weight):  # pragma: no cover - compiled
    """Σ_j w_j·row[j] over [start, stop) in float64 (w_j = 1 without weights)."""
    seg = row[start:stop]
    acc = 0.0
    if has_weight:
        wseg = weight[start:stop]
        for j in range(seg.shape[0]):
            acc += wseg[j] * np.float64(seg[j])
    else:
        for j in range(seg.shape[0]):
            acc += np.float64(seg[j])
    return acc


@njit(**_JIT)
def _block_sum_z_capped(row, start, stop, weight, has_weight, cap, inv_cap):  # pragma: no cover
    """Σ_j w_j·cap·tanh(row[j]/cap) over [start, stop) in float64."""
    seg = row[start:stop]
    acc = 0.0
    if has_weight:
        wseg = weight[start:stop]
        for j in range(seg.shape[0]):
            t, _ = fast_tanh(seg[j] * inv_cap)
            acc += wseg[j] * np.float64(cap * t)
    else:
        for j in range(seg.shape[0]):
            t, _ = fast_tanh(seg[j] * inv_cap)
            acc += np.float64(cap * t)
    return acc


# ---------------------------------------------------------------------------------------------
# Pass 2 pieces (one full row). Each comes twice: source → destination, and in place.
# ---------------------------------------------------------------------------------------------


@njit(**_JIT)
def _grad(x, g, m, c, beta):  # pragma: no cover - compiled
    """g[j] = c·exp(x[j] − m) + β  (one row)."""
    for j in range(x.shape[0]):
        g[j] = c * fast_exp(x[j] - m) + beta


@njit(**_JIT)
def _grad_inplace(x, m, c, beta):  # pragma: no cover - compiled
    for j in range(x.shape[0]):
        x[j] = c * fast_exp(x[j] - m) + beta


@njit(**_JIT)
def _grad_weighted(x, g, m, c, beta, w):  # pragma: no cover - compiled
    """g[j] = c·exp(x[j] − m) + β·w_j  (one row)."""
    for j in range(x.shape[0]):
        g[j] = c * fast_exp(x[j] - m) + beta * w[j]


@njit(**_JIT)
def _grad_weighted_inplace(x, m, c, beta, w):  # pragma: no cover - compiled
    for j in range(x.shape[0]):
        x[j] = c * fast_exp(x[j] - m) + beta * w[j]


@njit(**_JIT)
def _grad_capped(x, g, m, c, beta, w, has_weight, cap, inv_cap):  # pragma: no cover
    """g[j] = s'(x_j)·(c·exp(z_j − m) + β·w_j), z = cap·tanh(x/cap), s' = 1 − tanh² (one row)."""
    if has_weight:
        for j in range(x.shape[0]):
            t, d = fast_tanh(x[j] * inv_cap)
            g[j] = d * (c * fast_exp(cap * t - m) + beta * w[j])
    else:
        for j in range(x.shape[0]):
            t, d = fast_tanh(x[j] * inv_cap)
            g[j] = d * (c * fast_exp(cap * t - m) + beta)


@njit(**_JIT)
def _grad_capped_inplace(x, m, c, beta, w, has_weight, cap, inv_cap):  # pragma: no cover
    if has_weight:
        for j in range(x.shape[0]):
            t, d = fast_tanh(x[j] * inv_cap)
            x[j] = d * (c * fast_exp(cap * t - m) + beta * w[j])
    else:
        for j in range(x.shape[0]):
            t, d = fast_tanh(x[j] * inv_cap)
            x[j] = d * (c * fast_exp(cap * t - m) + beta)


@njit(**_JIT)
def _zero_row(g):  # pragma: no cover - compiled
    zero = like(0.0, g)
    for j in range(g.shape[0]):
        g[j] = zero


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
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
    """All rows; see the module docstring. ``softcap`` 0 means no cap; a weight-less call passes
    ``has_weight=False`` with 1-element dummies; ``grad_out`` is ignored unless ``want_grad``
    and not ``in_place``.
    """
    n_rows, n_classes = logits.shape
    eps = label_smoothing
    capped = softcap > 0.0
    cap = like(softcap, logits)
    inv_cap = like(1.0 / softcap if capped else 1.0, logits)
    neg_inf = like(-np.inf, logits)
    zero = like(0.0, logits)
    for i in prange(n_rows):
        row = logits[i]
        y = labels[i]
        if y == ignore_index:
            loss_rows[i] = 0.0
            lse_rows[i] = 0.0
            if want_grad:
                if in_place:
                    _zero_row(row)
                else:
                    _zero_row(grad_out[i])
        else:
            # ---- Pass 1: m = max_j z_j, s = Σ_j exp(z_j − m), S_z = Σ_j w_j·z_j (one read) ----
            m = neg_inf
            s = 0.0
            sum_z = 0.0
            for start in range(0, n_classes, block):
                stop = min(start + block, n_classes)
                b = _block_max(row, start, stop)
                if capped:
                    # tanh is increasing: max_j z_j = cap·tanh(max_j x_j / cap)
                    tb, _ = fast_tanh(b * inv_cap)
                    b = cap * tb
                if b > m:
                    # s·exp(m_old − m_new); m_old = −inf gives exp(−inf) = 0 and s is 0 (or NaN)
                    s *= math.exp(np.float64(m) - np.float64(b))
                    m = b
                # while every logit so far is −inf (or NaN), shift by 0: exp(−inf) = 0, NaN stays
                shift = m if m > neg_inf else zero
                if capped:
                    s += _block_sum_exp_capped(row, start, stop, shift, cap, inv_cap)
                else:
                    s += _block_sum_exp(row, start, stop, shift)
                if eps > 0.0:
                    if capped:
                        sum_z += _block_sum_z_capped(
                            row, start, stop, weight, has_weight, cap, inv_cap
                        )
                    else:
                        sum_z += _block_sum_z(row, start, stop, weight, has_weight)
            # lse = m + log s (float64)
            lse = np.float64(m) + math.log(s)

            # ---- Loss: (1−ε)·w_y·(lse − z_y) + (ε/C)·(W·lse − S_z) ----
            # z_y as pass 1 computed it (working dtype), s'(x_y) in float64; both saved before
            # pass 2 may overwrite x_y
            x_y = row[y]
            if capped:
                t_y, _ = fast_tanh(x_y * inv_cap)
                z_y = np.float64(cap * t_y)
                _, d_y = fast_tanh(np.float64(x_y) / softcap)
            else:
                z_y = np.float64(x_y)
                d_y = 1.0
            w_y = weight[y] if has_weight else 1.0
            loss = (1.0 - eps) * w_y * (lse - z_y)
            if eps > 0.0:
                loss += (eps / n_classes) * (weight_sum * lse - sum_z)
            loss_rows[i] = loss
            lse_rows[i] = lse

            if want_grad:
                # ---- Pass 2: grad_ij = s'(x_ij)·(c·exp(z_j − m) + β_j) (one write) ----
                g = grad_scale[i]
                g_z = z_grad_scale[i]
                a = (1.0 - eps) * w_y + eps * weight_sum / n_classes
                z_coef = 2.0 * z_loss * lse * g_z  # d(λ_z·lse²)/dlse, times its upstream
                c = like((g * a + z_coef) / s, logits)
                beta = like(-eps * g / n_classes, logits)
                dst = row if in_place else grad_out[i]
                if capped:
                    if in_place:
                        _grad_capped_inplace(row, m, c, beta, weight_work, has_weight, cap, inv_cap)
                    else:
                        _grad_capped(row, dst, m, c, beta, weight_work, has_weight, cap, inv_cap)
                elif has_weight and eps > 0.0:
                    if in_place:
                        _grad_weighted_inplace(row, m, c, beta, weight_work)
                    else:
                        _grad_weighted(row, dst, m, c, beta, weight_work)
                elif in_place:
                    _grad_inplace(row, m, c, beta)
                else:
                    _grad(row, dst, m, c, beta)
                # target entry: −(1−ε)·w_y·g on top of the smooth terms, in float64
                p_y = math.exp(z_y - lse)
                grad_y = d_y * (
                    g * (p_y * a - (1.0 - eps) * w_y - eps * w_y / n_classes) + z_coef * p_y
                )
                dst[y] = grad_y


# ---------------------------------------------------------------------------------------------
# Host function
# ---------------------------------------------------------------------------------------------

_ONE = np.ones(1, dtype=np.float64)


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
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row cross-entropy loss and log-sum-exp, and optionally the gradient (fused).

    Implements the kernel contract of ``docs/CONTRACTS.md``. ``logits`` is a C-contiguous
    ``[N, C]`` float32/float64 array, ``labels`` ``[N]`` int64 (each in ``[0, C)`` or equal to
    ``ignore_index``); nothing is validated.

    Returns ``(loss_rows, lse_rows)``, both ``[N]`` float64:
    ``loss_rows[i] = (1−ε)·w[y]·(lse − z[y]) + (ε/C)·Σ_c w[c]·(lse − z[c])`` (0 for ignored
    rows) and ``lse_rows[i] = log Σ_c exp(z_c)`` of the capped logits z (0 for ignored rows).
    When ``grad_out`` is given (it may be ``logits`` itself), it receives
    ``s'(x)·(grad_scale[i]·(p·((1−ε)·w[y] + ε·W/C) − (1−ε)·w[y]·onehot(y) − ε·w/C)
    + z_grad_scale[i]·2·z_loss·lse·p)`` row by row; ``grad_scale`` / ``z_grad_scale`` default
    to ones when ``grad_out`` is given without them. The z-loss term itself is not in
    ``loss_rows`` (the caller adds ``z_loss·lse²`` with its own denominator).

    ``block`` (keyword-only, for tuning) is the number of classes per pass-1 block.
    """
    n_rows, n_classes = logits.shape
    dtype = logits.dtype
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if weight is None:
        has_weight = False
        weight64 = _ONE
        weight_work = _ONE.astype(dtype)
        weight_sum = float(n_classes)
    else:
        has_weight = True
        weight64 = np.ascontiguousarray(weight, dtype=np.float64)
        weight_work = weight64.astype(dtype)
        weight_sum = float(weight64.sum())
    want_grad = grad_out is not None
    in_place = want_grad and _same_buffer(grad_out, logits)
    if want_grad:
        grad_scale = (
            np.ones(n_rows) if grad_scale is None else np.ascontiguousarray(grad_scale, np.float64)
        )
        z_grad_scale = (
            np.ones(n_rows)
            if z_grad_scale is None
            else np.ascontiguousarray(z_grad_scale, np.float64)
        )
    else:
        grad_scale = z_grad_scale = _ONE
    loss_rows = np.empty(n_rows, dtype=np.float64)
    lse_rows = np.empty(n_rows, dtype=np.float64)
    if n_rows == 0:
        return loss_rows, lse_rows
    _cross_entropy_rows_kernel(
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
    return loss_rows, lse_rows


def _same_buffer(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` view the same memory with the same layout (in place)."""
    return (
        a is b
        or a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
    )
