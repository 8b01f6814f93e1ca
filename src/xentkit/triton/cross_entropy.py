"""Fused cross-entropy on the GPU: per-row loss, log-sum-exp and gradient in one kernel launch.

The Triton twin of :mod:`xentkit.kernels.cross_entropy`, with the same formulas (reference:
:mod:`xentkit.reference.cross_entropy`). One program per row of ``[N, V]`` logits (float32,
float16 or bfloat16; arithmetic in float32):

    pass 1 (one read of the row, in blocks of ``BLOCK`` classes; online softmax):
        z_j = s·tanh(x_j/s)                   (z_j = x_j without a softcap)
        m   = running max,  d = Σ exp(z_j − m)  (rescaled by exp(m_old − m_new) as m grows)
        S_r = Σ_j w_j·(z_j − r)                (label smoothing only; r = the first block's max)
        lse = m + log d
        loss = (1−ε)·w_y·((m − z_y) + log d) + (ε/V)·(W·(lse − r) − S_r),   W = Σ_j w_j

    pass 2 (one more read and one write of the row; exp recomputed, nothing stored):
        p_j     = exp(z_j − m)/d
        grad_ij = s'(x_ij)·(g_i·(p_j·A − (1−ε)·w_y·[j = y] − ε·w_j/V) + g^z_i·2·λ·lse·p_j)
        A       = (1−ε)·w_y + ε·W/V,  s'(x) = 1 − tanh²(x/s)  (1 without a softcap)

Pass 2 reads each element before writing it, in the same program, so the gradient may be
written over the logits (in place). Ignored rows get loss 0, lse 0 and a zero gradient row.
A −inf logit is a masked class (probability 0); a NaN in a row makes that row NaN.

``tanh`` is computed here (Cephes' single-precision scheme: an odd polynomial below 0.625, the
exponential form above, both within a few float32 ulps) so that the interpreter and the GPU run
the same arithmetic.

No validation: the caller passes contiguous rows, labels in ``[0, V)`` or ``ignore_index``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["cross_entropy_rows"]

# Classes per block: a block of float32 lives in registers across the program's warps.
MAX_BLOCK = 4096


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
def _cross_entropy_kernel(
    logits_ptr,
    logits_stride,
    labels_ptr,
    weight_ptr,
    grad_ptr,
    grad_stride,
    grad_scale_ptr,
    grad_scale_stride,
    z_grad_scale_ptr,
    z_grad_scale_stride,
    loss_ptr,
    lse_ptr,
    n_cols,
    ignore_index,
    weight_sum_ptr,
    eps,
    z_loss,
    softcap,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    grad_row = grad_ptr + row * grad_stride
    offs = tl.arange(0, BLOCK)
    y = tl.load(labels_ptr + row)
    if HAS_WEIGHT:
        weight_sum = tl.load(weight_sum_ptr)  # W, summed once by the host function on the device
    else:
        weight_sum = n_cols * 1.0
    if y == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WANT_GRAD:
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                tl.store(grad_row + cols, tl.zeros([BLOCK], tl.float32), mask=cols < n_cols)
        return

    # the smoothing sum's reference r: the first block's (capped) max, or 0 if it has none
    r = 0.0
    if HAS_SMOOTHING:
        first = tl.load(row_ptr + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            first = tl.where(offs < n_cols, softcap * _tanh(first / softcap), float("-inf"))
        r = tl.max(first, 0)
        r = tl.where((r == float("-inf")) | (r != r), 0.0, r)

    # pass 1: online max and sum of exponentials
    m = float("-inf")
    d = 0.0
    s_r = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        inside = cols < n_cols
        z = tl.load(row_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:  # (lanes past the row stay −inf: tanh would make them −s)
            z = tl.where(inside, softcap * _tanh(z / softcap), float("-inf"))
        new_m = tl.maximum(m, tl.max(z, 0))
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)  # never exp(−inf − (−inf))
        d = d * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), 0)
        m = new_m
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=inside, other=0.0)
            else:
                w = tl.where(inside, 1.0, 0.0)
            s_r += tl.sum(tl.where(w == 0.0, 0.0, w * (z - r)), 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    log_d = tl.log(d)
    lse = m + log_d

    z_y = tl.load(row_ptr + y).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(z_y / softcap)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y)
    else:
        w_y = 1.0
    loss = (1.0 - eps) * w_y * ((m - z_y) + log_d)
    if HAS_SMOOTHING:
        loss += eps / n_cols * (weight_sum * (lse - r) - s_r)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)

    # pass 2: the gradient, written over the row's own elements
    if WANT_GRAD:
        g = tl.load(grad_scale_ptr + row * grad_scale_stride)
        coef = g * ((1.0 - eps) * w_y + eps * weight_sum / n_cols)
        if HAS_Z:
            g_z = tl.load(z_grad_scale_ptr + row * z_grad_scale_stride)
            coef += g_z * 2.0 * z_loss * lse
        coef = coef / d
        target_term = g * (1.0 - eps) * w_y
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            inside = cols < n_cols
            x = tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                z = softcap * t
            else:
                z = x
            grad = coef * tl.exp(z - m) - tl.where(cols == y, target_term, 0.0)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + cols, mask=inside, other=0.0)
                    grad -= g * eps / n_cols * w
                else:
                    grad -= g * eps / n_cols
            if HAS_SOFTCAP:
                grad = grad * (1.0 - t * t)
            tl.store(grad_row + cols, grad, mask=inside)


def _block(n_cols: int) -> int:
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(max(n_cols, 1))))


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 2048 else 16 if block <= 8192 else 32


def cross_entropy_rows(
    logits: Tensor,
    labels: Tensor,
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
    contiguous ``[N, V]`` float32/float16/bfloat16 tensor, ``labels`` ``[N]`` int64 (each in
    ``[0, V)`` or ``ignore_index``), ``weight`` ``[V]`` or None, ``grad_scale`` /
    ``z_grad_scale`` ``[N]`` float32 (a stride of 0 broadcasts one value; None means ones),
    ``grad_out`` a contiguous ``[N, V]`` tensor (it may be ``logits`` itself) or None for the
    loss alone. The z-loss term is not in the returned loss (the caller adds ``z_loss·lse²``).
    """
    n_rows, n_cols = logits.shape
    device = logits.device
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=device)
    if n_rows == 0:
        return loss, lse
    want_grad = grad_out is not None
    one = torch.ones((), dtype=torch.float32, device=device).expand(n_rows)
    grad_scale = one if grad_scale is None else grad_scale.to(torch.float32)
    z_grad_scale = one if z_grad_scale is None else z_grad_scale.to(torch.float32)
    weight32 = None if weight is None else weight.to(device=device, dtype=torch.float32).contiguous()
    # W stays on the device (no synchronization); float64 sum, then float32
    weight_sum = loss if weight32 is None else weight32.sum(dtype=torch.float64).to(torch.float32).reshape(1)
    block = _block(n_cols)
    _cross_entropy_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        labels,
        loss if weight32 is None else weight32,  # any pointer when unused
        grad_out if want_grad else logits,
        grad_out.stride(0) if want_grad else 0,
        grad_scale,
        grad_scale.stride(0),
        z_grad_scale,
        z_grad_scale.stride(0),
        loss,
        lse,
        n_cols,
        int(ignore_index),
        weight_sum,  # any pointer when unused
        float(label_smoothing),
        float(z_loss),
        1.0 if softcap is None else float(softcap),
        HAS_WEIGHT=weight32 is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_Z=z_loss > 0.0,
        HAS_SOFTCAP=softcap is not None,
        WANT_GRAD=want_grad,
        BLOCK=block,
        num_warps=_warps(block),
    )
    return loss, lse
