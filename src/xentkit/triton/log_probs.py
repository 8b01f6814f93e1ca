"""Token log-probabilities and entropies on the GPU: per-row statistics, then the gradient.

The Triton twin of :mod:`xentkit.kernels.log_probs`, with its contract (formulas:
:mod:`xentkit.reference.log_probs`). The ``[N, V]`` logits x (float32, float16 or bfloat16;
arithmetic in float32) are cut into chunks of ``BLOCK`` classes, one program per (row, chunk)
(the chunks, their partials and the merge of a row's chunks: :mod:`._chunks`). With c = 1/T and
z_j = x_j·c (one float32 rounding, the same in every pass):

    pass 1, ``_partials_kernel`` (one read of the logits), per chunk k of a row:
        m_k = max_j z_j  (NaN ignored: the sums below carry it),  t_k = m_k (0 if not finite)
        s_k = Σ_j exp(z_j − t_k),   u_k = Σ_j exp(z_j − t_k)·max(z_j − t_k, −1000)

    the row, ``_combine_kernel`` (one program per row, merging the row's few partials as
    ``reference.log_probs.merge_partials``; shifts finite, ``FINITE_SHIFT`` of :mod:`._chunks`):
        m = max_k m_k,  t = m (0 if not finite)
        s = Σ_k s_k·exp(t_k − t),   u = Σ_k exp(t_k − t)·(u_k + s_k·(t_k − t))
        z_y = x_y·c when the row's target y is in [0, V), else 0 (not read)
    gives each row's (m, s, u, z_y) in float32; ``reference.log_probs.row_statistics`` turns them
    into log p(y) = (z_y − m) − log s ≤ 0, H = log s − u/s ≥ 0 and lse = m + log s, in the
    caller or (``finished``) in this kernel, with the same operations in the same order.

    pass 2, ``_gradient_kernel`` (one read and one write of the logits), given per-row (m, s)
    and the coefficients (a, b, k) of ∂/∂z_j = a·[j = y] + p_j·(b + k·(z_j − m)):
        grad_j = exp(z_j − m)·(c·b/s + c·k/s·max(z_j − m, −1000)) + c·a·[j = y]

Exactness: the launches turn off floating-point contraction (``enable_fp_fusion=False``, as every
launch of this package: ``_chunks.EXACT``), so that
z_j − m is computed from the rounded z_j that the maximum saw: the max's own term is exp(0) = 1
exactly, hence s ≥ 1 (log s ≥ 0, log p(y) ≤ 0) and u ≤ 0 (H ≥ 0), also for bfloat16 logits. The
max(·, −1000) makes a masked class (z = −inf, exp = 0) add 0, not 0·(−inf).

Pass 2 reads each element before writing it, in the same program, so the gradient may be written
over the logits (in place). A row that is not ``valid`` (its target is ignore_index) is not read:
(m, s, u, z_y) = (0, 1, 0, 0) and a zero gradient row. Special values, as the Numba kernel and
torch: a NaN makes the row's s and u NaN (so log p, H, lse and the gradient); a +inf logit gives
m = +inf and s = +inf (sums unshifted: lse +inf, log p, H and the gradient NaN); −inf logits are
masked classes, and a row of −inf only has m = −inf, s = 0 (NaN downstream).

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
def _scaled(x_ptr, cols, inside, scale):
    """z = x·c in float32; lanes past the row are −inf."""
    x = tl.load(x_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    return tl.where(inside, x * scale, float("-inf"))


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
        return  # the combine writes the row's (0, 1, 0, 0) without reading the partials
    # ---- Pass 1: the chunk's m_k, and s_k, u_k at t_k ----
    z = _scaled(logits_ptr + row * logits_stride, cols, inside, scale)
    m = tl.max(tl.where(z == z, z, float("-inf")), 0)  # NaN ignored: s_k and u_k carry it
    # t_k = 0 when m_k = −inf (never exp(−inf − (−inf))) or +inf (s_k = +inf: lse +inf)
    d = z - _chunks.shift(m, True)
    e = tl.exp(d)
    slot, plane = _chunks.slot(part_ptr, part_plane, row, n_chunks)
    tl.store(slot, m)
    tl.store(slot + plane, tl.sum(e, 0))
    tl.store(slot + 2 * plane, tl.sum(e * tl.maximum(d, _FLOOR), 0))


@triton.jit
def _combine_kernel(
    logits_ptr,
    logits_stride,
    labels_ptr,
    valid_ptr,
    part_ptr,
    part_plane,
    m_ptr,
    s_ptr,
    u_ptr,
    z_target_ptr,
    log_p_ptr,
    entropy_ptr,
    lse_ptr,
    log_s_ptr,
    kept_ptr,
    n_cols,
    n_chunks,
    scale,
    CHUNKS: tl.constexpr,
    FINISH: tl.constexpr,
):
    """One program per row: the row's partials merged into (m, s, u), and z_y; with ``FINISH``
    also the row's log p(y), H, lse, log s and H again (kept for backward)
    (``reference.log_probs.row_statistics``; 0 on rows that are not valid)."""
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: see the module docstring
    slots, mine, plane = _chunks.row_slots(part_ptr, part_plane, row, n_chunks, CHUNKS)
    if tl.load(valid_ptr + row) == 0:
        tl.store(m_ptr + row, 0.0)
        tl.store(s_ptr + row, 1.0)
        tl.store(u_ptr + row, 0.0)
        tl.store(z_target_ptr + row, 0.0)
        if FINISH:
            tl.store(log_p_ptr + row, 0.0)
            tl.store(entropy_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            tl.store(log_s_ptr + row, 0.0)
            tl.store(kept_ptr + row, 0.0)
        return
    # ---- the row: m = max m_k; (s_k, u_k) restated at t and summed ----
    m, t, s, t_k, factor, s_k = _chunks.merge(slots, mine, plane, True)
    u_k = tl.load(slots + 2 * plane, mask=mine, other=0.0)
    # floored at −1000 (its factor is 0 already): s_k·δ stays finite, never 0·(−inf) = NaN for a
    # chunk far below the row's max (a vocabulary masked with float32's lowest, say)
    delta = tl.maximum(t_k - t, _FLOOR)
    # an empty chunk (s_k = 0: only −inf) adds nothing, whatever its factor
    restated = factor * (u_k + tl.where(delta == 0.0, 0.0, s_k * delta))
    u = tl.sum(tl.where(s_k == 0.0, 0.0, restated), 0)
    # z_y, read only for a label in [0, V)
    y = tl.load(labels_ptr + row)
    known = (y >= 0) & (y < n_cols)
    x_y = tl.load(logits_ptr + row * logits_stride + tl.where(known, y, 0)).to(tl.float32)
    z_y = tl.where(known, x_y * scale, 0.0)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(u_ptr + row, u)
    tl.store(z_target_ptr + row, z_y)
    if FINISH:  # row_statistics' algebra, in its order (u/s rounded as torch's: a GPU's "/" is not)
        log_s = tl.log(s)
        entropy = log_s - tl.div_rn(u, s)
        tl.store(log_p_ptr + row, ((z_y - m) - log_s) + (m - m))  # + (m − m): NaN for an infinite max
        tl.store(entropy_ptr + row, entropy)
        tl.store(lse_ptr + row, m + log_s)
        tl.store(log_s_ptr + row, log_s)
        tl.store(kept_ptr + row, entropy)


@triton.jit
def _gradient_kernel(
    logits_ptr,
    logits_stride,
    labels_ptr,
    valid_ptr,
    m_ptr,
    s_ptr,
    a_ptr,
    a_stride,
    b_ptr,
    b_stride,
    k_ptr,
    k_stride,
    grad_ptr,
    grad_stride,
    n_cols,
    scale,
    BLOCK: tl.constexpr,
):
    """One program per (row, chunk): the chunk's gradient from the row's (m, s) and (a, b, k)."""
    row, cols, inside = _chunks.columns(n_cols, BLOCK)
    grad_row = grad_ptr + row * grad_stride
    if tl.load(valid_ptr + row) == 0:
        tl.store(grad_row + cols, tl.zeros([BLOCK], tl.float32), mask=inside)
        return
    m = tl.load(m_ptr + row).to(tl.float32)
    s = tl.load(s_ptr + row).to(tl.float32)
    a = tl.load(a_ptr + row * a_stride).to(tl.float32)
    b = tl.load(b_ptr + row * b_stride).to(tl.float32)
    k = tl.load(k_ptr + row * k_stride).to(tl.float32)
    y = tl.load(labels_ptr + row)
    # ---- Pass 2: grad_j = exp(z_j − m)·(c·b/s + c·k/s·(z_j − m)) + c·a·[j = y] ----
    x = tl.load(logits_ptr + row * logits_stride + cols, mask=inside, other=0.0).to(tl.float32)
    d = x * scale - m
    coef_b = scale * b / s
    coef_k = scale * k / s
    grad = tl.exp(d) * (coef_b + coef_k * tl.maximum(d, _FLOOR))
    grad += tl.where(cols == y, scale * a, 0.0)  # y outside [0, V) matches no stored lane
    tl.store(grad_row + cols, grad, mask=inside)


def _valid_bytes(valid: Tensor) -> Tensor:
    return valid.contiguous().view(torch.uint8)


@_chunks.on_tensor_device
def log_prob_statistics(
    logits: Tensor, labels: Tensor, valid: Tensor, temperature: float = 1.0,
    finished: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pass 1 over a contiguous ``[N, V]`` float32/float16/bfloat16 tensor: ``(m, s, u, z_target)``,
    each ``[N]`` float32 on the logits' device (see the module docstring). ``labels`` ``[N]``
    int64, ``valid`` ``[N]`` bool; nothing is validated. ``finished``: five contiguous float32
    tensors of N elements each (any shape) that receive each row's log p(y), H, lse, log s and H
    again (``reference.log_probs.row_statistics``, 0 on rows that are not valid), or None.
    Two launches."""
    n_rows, n_cols = logits.shape
    device = logits.device
    m, s, u, z_target = (torch.empty(n_rows, dtype=torch.float32, device=device) for _ in range(4))
    if n_rows == 0:
        return m, s, u, z_target
    scale = 1.0 / float(temperature)
    valid_bytes = _valid_bytes(valid)
    layout = _chunks.Layout.of(n_rows, n_cols, MAX_BLOCK)
    part = layout.partials(3, device)
    _partials_kernel[layout.grid](
        logits, logits.stride(0), valid_bytes, part, layout.plane, n_cols, layout.chunks, scale,
        **layout.per_chunk,
    )
    _combine_kernel[(n_rows,)](
        logits, logits.stride(0), labels, valid_bytes, part, layout.plane, m, s, u, z_target,
        *((m,) * 5 if finished is None else finished), n_cols, layout.chunks, scale, **layout.per_row,
        FINISH=finished is not None,
    )
    return m, s, u, z_target


@_chunks.on_tensor_device
def log_prob_gradient(
    logits: Tensor,
    labels: Tensor,
    valid: Tensor,
    temperature: float,
    m: Tensor,
    s: Tensor,
    coefficients: tuple[Tensor, Tensor, Tensor],
    grad_out: Tensor,
) -> Tensor:
    """Pass 2: writes ∂/∂logits into ``grad_out`` (a contiguous ``[N, V]`` tensor of the logits'
    dtype; it may be ``logits`` itself) from the rows' (m, s) of :func:`log_prob_statistics` and
    the coefficients (a, b, k) of ``reference.log_probs.gradient_coefficients``, each ``[N]`` or
    a single value (0-dim), any float dtype, on the logits' device. One launch. Returns
    ``grad_out``."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return grad_out
    # one value for every row: a stride of 0; float64 rows are read as they are
    a, b, k = (c.reshape(-1).expand(n_rows) for c in coefficients)
    layout = _chunks.Layout.of(n_rows, n_cols, MAX_BLOCK)
    _gradient_kernel[layout.grid](
        logits, logits.stride(0), labels, _valid_bytes(valid), m.contiguous(), s.contiguous(),
        a, a.stride(0), b, b.stride(0), k, k.stride(0), grad_out, grad_out.stride(0), n_cols,
        1.0 / float(temperature), **layout.per_chunk,
    )
    return grad_out
