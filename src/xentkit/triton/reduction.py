"""The cross-entropy's epilogue on the GPU: the reduction of the per-row terms, the upstream
gradient's factors and the count of bad labels, in one launch (two for many rows).

The Triton twin of :class:`xentkit.reference.reductions.ReductionPlan` (the one home of the rules,
which the tests compare this with) and of :func:`xentkit.reference.cross_entropy.z_term`, for the
rows of :func:`xentkit.triton.cross_entropy.row_statistics`. Built from torch ops the same epilogue
took about forty small operations (masks, sums, divisions guarded against 0, the factors' stack,
the label check's mask), each a kernel launch and a trip through torch's dispatcher on CUDA; here
they are one program per span of rows:

    per row i:  main_i (the kernel's loss row, 0 on ignored rows, NaN for a bad label)
                z_i = λ_z·lse_i² on counted rows (with ``HAS_Z``)
                hard labels: counted = (y ≠ ignore_index), and with class weights also y ∈ [0, V)
                             w_i = w_y on counted rows (1 without class weights), else 0
                             bad = (y ≠ ignore_index) and y ∉ [0, V)
                probabilities: every row counted, w_i = 1
    "none":     out_i = main_i + z_i (float32, then the loss's dtype)
    "sum":      loss = Σ main_i + Σ z_i,                       factors (1, 1)
    "mean":     loss = Σ main_i / Σ w_i + Σ z_i / #counted,    factors (1/Σ w_i, 1/#counted)
                with 0 for a quotient whose denominator is 0 (and for its factor): "mean of nothing
                is 0, with gradient 0"

The sums run in float64 in a fixed order (each program's lanes, then the programs in order):
deterministic, and no atomics. The loss is rounded once from the float64 sums to its dtype
(:func:`_store_loss`; a float64 loss, for float64 probability targets, is stored unrounded); the factors are float32, as
:func:`~xentkit.triton.cross_entropy.row_gradient` reads them. Rows beyond ``SPAN`` take one
program per span, then :func:`_finish_kernel` adds the spans' partials in order.

No validation (the caller's rules: :mod:`xentkit.torch._triton_path`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._chunks import EXACT, ceil_div, float32_argument, on_tensor_device

__all__ = ["REDUCTIONS", "reduce_rows"]

REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
# Rows per program of the epilogue, and per step of its loop (read on every call: tests lower
# SPAN to reach the two-launch form at small shapes).
SPAN = 16384
BLOCK = 1024
_PLANES = 5  # the partials of a span: Σ main, Σ z, Σ w, #counted, #bad


@triton.jit
def _store_loss(ptr, value, mask, WIDE: tl.constexpr, BF16: tl.constexpr, F16: tl.constexpr):
    """A loss value stored in the output's dtype, rounded once from the float64 ``value``: float64
    as it is (``WIDE``); float32 to nearest; bfloat16 (``BF16``) and float16 (``F16``) through a
    float32 rounded to odd (an inexact result takes the odd one of its two neighbours), then to
    nearest: with float32's 13+ more bits that is the float64 value rounded to nearest once
    (float64 → float32 → half to nearest rounds twice: 1 + 2⁻⁸ + 2⁻³⁰ gave bfloat16's 1, not
    1 + 2⁻⁷). bfloat16 is rounded to nearest (ties to even) here, on the float32 bits, so that
    Triton's interpreter, whose conversion truncates, stores what a GPU stores (for normal
    float32 values: Triton 3.8's interpreter converts float32 subnormals to bfloat16 wrongly, 5e-39
    to 8.17e-39, a review found; a GPU is not affected)."""
    if WIDE:
        tl.store(ptr, value.to(tl.float64), mask=mask)
    elif BF16 or F16:
        if value.dtype == tl.float32:  # ("none": the rows' float32 values, one rounding left)
            odd = value
        else:
            single = value.to(tl.float32)
            bits = single.to(tl.uint32, bitcast=True)
            inexact = single.to(tl.float64) != value
            # one ulp toward the value: the magnitude up where the value is larger, else down (±0
            # and inf are even: the smallest subnormal, or the largest float, beside them)
            toward = tl.where(tl.abs(value) > tl.abs(single.to(tl.float64)), bits + 1, bits - 1)
            bits = tl.where(inexact & ((bits & 1) == 0), toward, bits)
            odd = tl.where(single != single, single, bits.to(tl.float32, bitcast=True))
        if BF16:
            bits = odd.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # finite values, ±inf stay
            nearest = tl.where(odd != odd, odd, bits.to(tl.float32, bitcast=True))
            tl.store(ptr, nearest.to(tl.bfloat16), mask=mask)
        else:
            tl.store(ptr, odd.to(tl.float16), mask=mask)
    else:
        tl.store(ptr, value.to(tl.float32), mask=mask)


@triton.jit
def _finish(main, z, den, count, bad, out_ptr, factors_ptr, bad_ptr, REDUCTION: tl.constexpr,
            HAS_Z: tl.constexpr, WIDE: tl.constexpr, BF16: tl.constexpr, F16: tl.constexpr):
    """The loss (for "sum" and "mean"; :func:`_store_loss`), the two factors and the bad-label
    count, from the sums."""
    if REDUCTION == 2:
        some = den != 0.0
        loss = tl.where(some, main / tl.where(some, den, 1.0), 0.0)
        counted = count != 0.0
        if HAS_Z:
            loss += tl.where(counted, z / tl.where(counted, count, 1.0), 0.0)
        tl.store(factors_ptr, tl.where(some, 1.0 / tl.where(some, den, 1.0), 0.0).to(tl.float32))
        tl.store(factors_ptr + 1, tl.where(counted, 1.0 / tl.where(counted, count, 1.0), 0.0).to(tl.float32))
    else:
        loss = main
        if HAS_Z:
            loss += z
        tl.store(factors_ptr, 1.0)
        tl.store(factors_ptr + 1, 1.0)
    if REDUCTION != 0:
        _store_loss(out_ptr, loss, True, WIDE, BF16, F16)
    tl.store(bad_ptr, bad.to(tl.int64))


@triton.jit
def _epilogue_kernel(
    loss_rows_ptr,
    lse_ptr,
    target_ptr,
    weight_ptr,
    out_ptr,
    part_ptr,
    factors_ptr,
    bad_ptr,
    n_rows,
    n_cols,
    n_parts,
    ignore_index,
    z_loss,
    span,
    REDUCTION: tl.constexpr,
    PROBABILITIES: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_Z: tl.constexpr,
    WIDE: tl.constexpr,
    BF16: tl.constexpr,
    F16: tl.constexpr,
    FINAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per span of rows: its sums (or, with ``FINAL``, one program for every row: the
    results), and the "none" rows."""
    part = tl.program_id(0)
    start = part.to(tl.int64) * span
    stop = tl.minimum(start + span, n_rows)
    main = tl.zeros([BLOCK], tl.float64)
    z = tl.zeros([BLOCK], tl.float64)
    den = tl.zeros([BLOCK], tl.float64)
    count = tl.zeros([BLOCK], tl.float64)
    bad = tl.zeros([BLOCK], tl.float64)
    for first in range(start, stop, BLOCK):
        rows = first + tl.arange(0, BLOCK)
        inside = rows < stop
        loss = tl.load(loss_rows_ptr + rows, mask=inside, other=0.0)
        if PROBABILITIES:
            counted = inside
            w = tl.where(inside, 1.0, 0.0)
        else:
            y = tl.load(target_ptr + rows, mask=inside, other=ignore_index)
            counted = inside & (y != ignore_index)
            known = (y >= 0) & (y < n_cols)
            bad += tl.where(counted & ~known, 1.0, 0.0)
            if HAS_WEIGHT:  # a bad label looks up no weight (nothing read out of bounds)
                counted = counted & known
                w = tl.load(weight_ptr + tl.where(counted, y, 0), mask=counted, other=0.0)
            else:
                w = tl.where(counted, 1.0, 0.0)
        if HAS_Z:
            lse = tl.load(lse_ptr + rows, mask=inside, other=0.0)
            z_row = tl.where(counted, z_loss * lse * lse, 0.0)
        else:
            z_row = tl.zeros([BLOCK], tl.float32)
        if REDUCTION == 0:
            if HAS_Z:
                _store_loss(out_ptr + rows, loss + z_row, inside, WIDE, BF16, F16)
            else:
                _store_loss(out_ptr + rows, loss, inside, WIDE, BF16, F16)
        else:
            main += loss.to(tl.float64)
            z += z_row.to(tl.float64)
            den += w.to(tl.float64)
            count += tl.where(counted, 1.0, 0.0)
    main_sum = tl.sum(main, 0)
    z_sum = tl.sum(z, 0)
    den_sum = tl.sum(den, 0)
    count_sum = tl.sum(count, 0)
    bad_sum = tl.sum(bad, 0)
    if FINAL:
        _finish(main_sum, z_sum, den_sum, count_sum, bad_sum, out_ptr, factors_ptr, bad_ptr, REDUCTION, HAS_Z, WIDE, BF16,
                F16)
    else:
        tl.store(part_ptr + part, main_sum)
        tl.store(part_ptr + n_parts + part, z_sum)
        tl.store(part_ptr + 2 * n_parts + part, den_sum)
        tl.store(part_ptr + 3 * n_parts + part, count_sum)
        tl.store(part_ptr + 4 * n_parts + part, bad_sum)


@triton.jit
def _finish_kernel(part_ptr, n_parts, out_ptr, factors_ptr, bad_ptr, REDUCTION: tl.constexpr,
                   HAS_Z: tl.constexpr, WIDE: tl.constexpr, BF16: tl.constexpr, F16: tl.constexpr,
                   BLOCK: tl.constexpr):
    """One program: the spans' partials added in order, then the results."""
    main = tl.zeros([BLOCK], tl.float64)
    z = tl.zeros([BLOCK], tl.float64)
    den = tl.zeros([BLOCK], tl.float64)
    count = tl.zeros([BLOCK], tl.float64)
    bad = tl.zeros([BLOCK], tl.float64)
    for first in range(0, n_parts, BLOCK):
        k = first + tl.arange(0, BLOCK)
        mine = k < n_parts
        main += tl.load(part_ptr + k, mask=mine, other=0.0)
        z += tl.load(part_ptr + n_parts + k, mask=mine, other=0.0)
        den += tl.load(part_ptr + 2 * n_parts + k, mask=mine, other=0.0)
        count += tl.load(part_ptr + 3 * n_parts + k, mask=mine, other=0.0)
        bad += tl.load(part_ptr + 4 * n_parts + k, mask=mine, other=0.0)
    _finish(tl.sum(main, 0), tl.sum(z, 0), tl.sum(den, 0), tl.sum(count, 0), tl.sum(bad, 0), out_ptr,
            factors_ptr, bad_ptr, REDUCTION, HAS_Z, WIDE, BF16, F16)


@on_tensor_device
def reduce_rows(
    loss_rows: Tensor,
    lse: Tensor,
    target: Tensor,
    weight: Tensor | None,
    n_cols: int,
    *,
    reduction: str,
    ignore_index: int,
    z_loss: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, factors, bad)`` from :func:`~xentkit.triton.cross_entropy.row_statistics`' float32
    ``loss_rows`` and ``lse`` (``[N]``) for ``target`` (``[N]`` int64 labels or ``[N, V]``
    probabilities) and ``weight`` (the ``[V]`` float32 class weights as the kernels read them, or
    None): the loss in ``dtype`` (0-d, or ``[N]`` for "none"), the upstream gradient's float32
    ``[2]`` factors (main, z) for :func:`~xentkit.triton.cross_entropy.row_gradient`, and the
    number of bad labels (int64 ``[1]``; 0 for probabilities), all left on the device (nothing
    waits). One launch for up to ``SPAN`` rows, two beyond."""
    n_rows = loss_rows.shape[0]
    device = loss_rows.device
    out = torch.empty((n_rows,) if reduction == "none" else (), dtype=dtype, device=device)
    factors = torch.empty(2, dtype=torch.float32, device=device)
    bad = torch.empty(1, dtype=torch.int64, device=device)
    n_parts = max(1, ceil_div(n_rows, SPAN))
    flags = {
        "REDUCTION": REDUCTIONS[reduction], "PROBABILITIES": target.is_floating_point(),
        "HAS_WEIGHT": weight is not None, "HAS_Z": z_loss > 0.0,
    }
    rounding = {"WIDE": dtype == torch.float64, "BF16": dtype == torch.bfloat16, "F16": dtype == torch.float16}
    part = factors if n_parts == 1 else torch.empty((_PLANES, n_parts), dtype=torch.float64, device=device)
    any_weight = loss_rows if weight is None else weight  # any pointer when unused
    _epilogue_kernel[(n_parts,)](
        loss_rows, lse, target, any_weight, out, part, factors, bad, n_rows, n_cols, n_parts,
        int(ignore_index), float32_argument(z_loss), SPAN, FINAL=n_parts == 1, BLOCK=BLOCK, **rounding, **flags, **EXACT,
    )
    if n_parts > 1:
        _finish_kernel[(1,)](
            part, n_parts, out, factors, bad, REDUCTION=flags["REDUCTION"], HAS_Z=flags["HAS_Z"], BLOCK=BLOCK,
            **rounding, **EXACT,
        )
    return out, factors, bad
