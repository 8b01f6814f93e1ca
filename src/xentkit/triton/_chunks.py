"""The chunk scaffolding of the Triton kernels (:mod:`.cross_entropy`, :mod:`.log_probs`,
:mod:`.vocab_parallel`): how a launch cuts contiguous ``[N, V]`` rows into chunks, where the
chunks' partials live and how a row's chunks are merged. Each module keeps its own formulas.

Every module makes the same three launches over its rows:

    pass 1, one program per (row, chunk) of ``BLOCK`` classes (:func:`columns`), writes the
    chunk's partials into float32 planes ``part[k, row, chunk]`` (:meth:`Layout.partials`,
    :func:`slot`): plane 0 the chunk's maximum m_c, planes 1 and 2 its sum of exponentials at
    its shift t_c = shift(m_c) split at the max (:func:`split_sum`): r_c = Σ exp(z_j − t_c) over
    the entries below m_c and K_c, the count of its max's terms (each exactly 1); planes 3 and up
    the module's own sums

    the combine, one program per row, merges the row's few partials (:func:`row_slots`,
    :func:`merge_counted`; online softmax, Milakov & Gimelshein, arXiv 1805.02867):
        M = max_c m_c,  t = shift(M),  d = Σ_c (K_c + r_c)·exp(t_c − t)   (a chunk whose sum
        is 0 adds 0), kept as e = d − 1 (in float64, and with exponents scaled by 1/T, for
        :mod:`.log_probs`)

    pass 2, one program per (row, chunk) again, from the row's statistics

with shift(m) = m, or 0 where m = −inf (never exp(−inf − (−inf))); ``FINITE_SHIFT`` also takes
0 for m = +inf or NaN (:func:`shift`; the log-probabilities' rule, so that a +inf logit gives
s = +inf).

Offsets (audited for logits of more than 2^31 elements; 65536 × 262144 is a real shape): the row
index is ``program_id(0)`` cast to int64 (:func:`columns`; the combine kernels cast it
themselves), so that every offset that grows with the rows (row × a row stride, row × chunks) is
int64, and so are the planes' offsets (k × rows × chunks, from the int64 plane size
:func:`slot` and :func:`row_slots` return); offsets within a row are int32 (V up to 2^31 less one block: a column index is the block's start plus its lane).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

# Classes per block: a block of float32 lives in registers across the program's warps. Each kernel
# module binds this name and reads its own binding on every call, so that tests and benchmarks can
# lower (or tune) it for one module alone.
MAX_BLOCK = 8192


_Host = TypeVar("_Host", bound=Callable[..., Any])


def on_tensor_device(host: _Host) -> _Host:
    """Run the host function ``host`` (one that launches kernels) with the CUDA device of its
    first argument current. Triton launches on the current device and its current stream, not on
    the tensors' device: logits on cuda:1 while cuda:0 is current (a model spread over GPUs,
    ``device_map="auto"``) would run on GPU 0 with GPU 1's pointers, an illegal address, or with
    peer access a silent race (GPU 0's stream is not ordered after the work that wrote them).
    Autograd's backward threads and Inductor's generated code set the device themselves; eager
    forwards and direct calls do not. Costs one ``current_device`` call where nothing changes."""

    @functools.wraps(host)
    def on_its_device(first: Tensor, *args: Any, **kwargs: Any) -> Any:
        device = first.device
        if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return host(first, *args, **kwargs)
        return host(first, *args, **kwargs)

    on_its_device.on_tensor_device = True  # type: ignore[attr-defined]
    return on_its_device  # type: ignore[return-value]


def float32_argument(value: float) -> float:
    """A float kernel argument as the GPU takes it: Triton passes a Python float as float32, where
    its interpreter keeps the double (a review: ``1 − ε`` for ε = 0.8132… came out 2 ulps apart,
    1.3% at ε = 0.999999), so it is rounded here and both compute with the same value."""
    return float(np.float32(value))


def ceil_div(a: int, b: int) -> int:
    """⌈a / b⌉ for the host's launch sizes (plain integers: ``triton.cdiv`` is a constexpr
    function, about 100× slower to call from Python, and a launch makes several)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 ≥ n (1 for n ≤ 1), in plain integers (see :func:`ceil_div`)."""
    return 1 << max(n - 1, 0).bit_length()


def block_size(n_cols: int, max_block: int) -> int:
    """Classes per program: the row's width rounded up to a power of 2, at least 16, but at most
    ``max_block`` (a power of 2; tests lower it, below 16 too, to cut small rows into chunks)."""
    return min(max_block, max(16, next_power_of_2(n_cols)))


def warps(block: int) -> int:
    """Warps for a program of ``block`` classes."""
    return 4 if block <= 1024 else 8 if block <= 2048 else 16 if block <= 8192 else 32


# Every launch turns off floating-point contraction: without it the compiler fuses a·b − c into one
# FMA (80 of them in the softcapped pass 1), so that z − m for the row's max is fma(s, t, −m) ≠ 0
# and its exp not exactly 1 (the sums' "≥ 1" and the log-probabilities' log p ≤ 0 rest on it), and
# the GPU rounds otherwise than the interpreter, which never fuses. (tl.exp still differs: ex2.approx
# on the GPU, NumPy's exp on the interpreter, within float32 rounding; so do float32 division,
# div.full.f32 on the GPU within 2 ulps, and float32 stored into bfloat16: see cross_entropy.py.)
EXACT = {"enable_fp_fusion": False}


_GRID_X, _GRID_Y = 2**31 - 1, 65535  # CUDA's grid: programs along its first and second axes
# Chunks per row at most: a combine program holds a row's chunks in registers (``per_row``), and
# compiled for more it spills (a review, sm_90: 8192 chunks on one warp took a 7 KB stack; 65536
# did not finish compiling in 7.5 minutes). 8192 chunks of MAX_BLOCK classes: 67,108,864 classes.
_MAX_CHUNKS = 8192


def grid_reason(n_rows: int, n_cols: int, max_block: int | None = None) -> str | None:
    """Why a launch over ``n_rows`` rows of ``n_cols`` classes does not fit CUDA's grid (the
    kernels check no bound), or None: more than 2^31 − 1 rows (the grid's first axis), or more
    classes per row than 8192 chunks (``_MAX_CHUNKS``, within the grid's second axis) or int32
    column offsets reach (2^31 less one block). :meth:`Layout.of` raises it; ``backend="auto"`` runs torch ops for it
    (``xentkit.torch._triton_path.tensor_reason``). ``max_block``: :data:`MAX_BLOCK` as it is
    when called, by default."""
    block = block_size(n_cols, MAX_BLOCK if max_block is None else max_block)
    largest = min(min(_GRID_Y, _MAX_CHUNKS) * block, 2**31 - block)
    if n_cols > largest or n_rows > _GRID_X:
        return (
            f"the Triton kernels take at most {largest} classes and {_GRID_X} rows, got {n_cols} classes "
            f"and {n_rows} rows"
        )
    return None


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a launch over ``rows`` rows of ``V`` classes is cut: ``block`` classes per program,
    ``chunks`` programs per row (the last one ragged)."""

    rows: int
    block: int
    chunks: int

    @classmethod
    def of(cls, n_rows: int, n_cols: int, max_block: int) -> Layout:
        """The layout, or a ValueError for a launch the grid cannot hold (the kernels check no
        bound): more than 2^31 − 1 rows (the grid's first axis), or more classes per row than
        8192 chunks or int32 column offsets reach (2^31 less one block): :func:`grid_reason`."""
        why = grid_reason(n_rows, n_cols, max_block)
        if why is not None:
            raise ValueError(f"{why}; backend='torch' runs torch ops")
        block = block_size(n_cols, max_block)
        return cls(n_rows, block, ceil_div(max(n_cols, 1), block))

    @property
    def grid(self) -> tuple[int, int]:
        """The (row, chunk) grid of pass 1 and pass 2."""
        return (self.rows, self.chunks)

    @property
    def per_chunk(self) -> dict[str, int | bool]:
        """The launch options of a (row, chunk) kernel: ``BLOCK`` and its warps, no contraction
        (:data:`EXACT`)."""
        return {"BLOCK": self.block, "num_warps": warps(self.block), **EXACT}

    @property
    def per_row(self) -> dict[str, int | bool]:
        """The launch options of a combine kernel (grid ``(rows,)``): ``CHUNKS``, the row's chunks
        rounded up to a power of 2 (at least 2), one warp per 128 of them (1 to 8: each thread
        holds a few chunks' partials, which one warp for thousands would spill), no contraction
        (:data:`EXACT`)."""
        chunks = max(2, next_power_of_2(self.chunks))
        return {"CHUNKS": chunks, "num_warps": min(8, max(1, chunks // 128)), **EXACT}

    @property
    def plane(self) -> int:
        """Elements in one plane of the partials (``rows × chunks``; int64 in the kernels)."""
        return self.rows * self.chunks

    def partials(self, planes: int, device: torch.device) -> Tensor:
        """The float32 ``[planes, rows, chunks]`` buffer of pass 1's partials."""
        return torch.empty((planes, self.rows, self.chunks), dtype=torch.float32, device=device)


@triton.jit
def columns(n_cols, BLOCK: tl.constexpr):
    """A (row, chunk) program's row (int64), its chunk's columns and which of them are inside
    the row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return row, cols, cols < n_cols


@triton.jit
def slot(part_ptr, part_plane, row, n_chunks):
    """Where a pass-1 program writes: its slot in plane 0 of the partials, and the plane's size
    in int64 (plane k is at ``slot + k·plane``)."""
    return part_ptr + row * n_chunks + tl.program_id(1), tl.cast(part_plane, tl.int64)


@triton.jit
def row_slots(part_ptr, part_plane, row, n_chunks, CHUNKS: tl.constexpr):
    """A combine program's slots of its row's chunks in plane 0, which of the ``CHUNKS`` lanes
    are chunks of the row, and the plane's size in int64."""
    k = tl.arange(0, CHUNKS)
    return part_ptr + row * n_chunks + k, k < n_chunks, tl.cast(part_plane, tl.int64)


@triton.jit
def shift(m, FINITE_SHIFT: tl.constexpr):
    """The shift t = shift(m) of a maximum m: m, or 0 where m = −inf; with ``FINITE_SHIFT``, 0
    wherever m is not finite."""
    if FINITE_SHIFT:
        t = tl.where(tl.abs(m) < float("inf"), m, 0.0)
    else:
        t = tl.where(m == float("-inf"), 0.0, m)
    return t


# ---- the max's terms counted apart -----------------------------------------------------------
# A row's sum d = Σ_j exp(z_j − M) holds the max's own terms, each exactly 1. Summed in float32
# with them inside, d = 1 + δ keeps δ only to float32's half ulp of 1 (6e-8): a confident row's
# loss log d = log(1 + δ) below that came out 0, and its target entry's p − 1 cancelled. Pass 1
# therefore counts the chunk's max terms apart (:func:`split_sum`), the merge keeps the row's
# excess e = d − 1 = (K − 1) + Σ(the other terms), K the count of the row's max terms, and the
# formulas take log d = log1p(e) and p − 1 = −e/d at the max, as the CPU kernels do in float64.


@triton.jit
def split_sum(z, m, exponentials):
    """A chunk's ``exponentials`` of its values ``z`` summed apart at its max m: ``(rest, count)``,
    rest = Σ exponentials_j over the entries below m (and NaNs), count = #{j: z_j = m} for a
    finite m (0 for m = ±inf: a chunk of −inf adds nothing, one of +inf keeps its NaN or inf in
    the rest, as the plain sum did). The max's own terms, exactly 1, are not summed."""
    top = z == tl.where(tl.abs(m) < float("inf"), m, float("nan"))  # (NaN equals nothing)
    rest = tl.sum(tl.where(top, 0.0, exponentials), 0)
    return rest, tl.sum(top.to(tl.int32), 0).to(tl.float32)


@triton.jit
def log1p(e):
    """log(1 + e) for e ≥ −1 without losing a small e (Triton has no log1p that the
    interpreter runs too): log(w)·e/(w − 1), w = 1 + e rounded, whose rounding error cancels in
    the ratio (Goldberg 1991, "What every computer scientist should know about floating-point
    arithmetic", theorem 4), and e itself where w rounds to 1. −inf at e = −1, +inf at +inf, NaN
    stays NaN. In the dtype of e (float64 for the log-probabilities' rows)."""
    w = 1.0 + e
    return tl.where(w == 1.0, e, tl.where(w < float("inf"), tl.log(w) * (e / (w - 1.0)), w))


@triton.jit
def merge_counted(slots, mine, plane, scale, FINITE_SHIFT: tl.constexpr, WIDE: tl.constexpr):
    """Planes 0, 1 and 2 of a row's partials (each chunk's max m_c, :func:`split_sum`'s rest and
    count) merged: ``(M, t, e, shifts, factors, sums)``, the row's max M, its shift t, its excess
    e = d − 1 with d = Σ_c (count_c + rest_c)·exp((t_c − t)·scale), the chunks holding the row's
    max adding their counts and rests unscaled (their factor is exactly 1), and per chunk t_c,
    exp((t_c − t)·scale) and count_c + rest_c (a chunk whose sum is 0, only −inf, adds exactly 0
    whatever its factor). A row of −inf only has e = −1 (d = 0). ``scale``: 1, or the
    log-probabilities' 1/T (their exponents are (x − t)/T); ``WIDE``: e, the factors and the sums
    in float64 (``scale`` a float64 then), else float32."""
    maxima = tl.load(slots, mask=mine, other=float("-inf"))
    rests = tl.load(slots + plane, mask=mine, other=0.0)
    counts = tl.load(slots + 2 * plane, mask=mine, other=0.0)
    m = tl.max(maxima, 0)
    t = shift(m, FINITE_SHIFT)
    shifts = shift(maxima, FINITE_SHIFT)
    if WIDE:  # (the difference of two float32 is exact in float64)
        rests = rests.to(tl.float64)
        counts = counts.to(tl.float64)
        factors = tl.exp((shifts.to(tl.float64) - t.to(tl.float64)) * scale)
    else:
        factors = tl.exp((shifts - t) * scale)
    sums = counts + rests
    top = (maxima == m) & (counts > 0.0)
    below = tl.where(top, rests, tl.where(sums == 0.0, 0.0, sums * factors))
    e = (tl.sum(tl.where(top, counts, 0.0), 0) - 1.0) + tl.sum(below, 0)
    return m, t, e, shifts, factors, sums
