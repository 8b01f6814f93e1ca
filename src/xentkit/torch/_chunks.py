"""The row-chunk walk of the fused linear forms: how many rows a chunk takes (:func:`chunk_rows`),
each chunk's logits ``x_chunk Wᵀ (+ b)`` computed into one reused buffer, never the full ``[N, V]``
logits, and the gradients the chunks add up.
Used by ``linear_cross_entropy`` (CPU and Triton), ``linear_log_probs`` and the
vocabulary-parallel linear forms (and meant for every later fused linear form).

Precision of the weight and bias gradients (docs/precision.md): they are sums over every chunk,
accumulated in float32 or better (:func:`gradient_buffers`) and rounded to the weight's dtype once,
at the end (:func:`finish_gradients`). For float16/bfloat16 weights that costs a float32 ``[V, D]``
buffer while the chunks run (twice a bfloat16 weight gradient, three times at the final cast), in
exchange for one rounding instead of one per chunk. Each chunk's ``dzᵀ x_chunk`` is added into the
float32 buffer by one cuBLAS call on CUDA (``addmm``'s ``out_dtype``, torch ≥ 2.8); elsewhere (the
CPU has no such kernel, and older torch) the chunk's operands are converted to float32 first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from . import _bridge


@dataclasses.dataclass(frozen=True)
class ChunkBudget:
    """How large a chunk's logits may be off CUDA: at most 1/``fraction`` of the full logits and
    at most ``budget_bytes``, whichever is smaller, but at least ``floor_bytes`` (tiny problems are
    not cut into slivers)."""

    fraction: int = 16
    budget_bytes: int = 32 * 2**20
    floor_bytes: int = 2 * 2**20


# Measured on 2 cores (N=4096, D=1024, V=32000, float32): the three chunked matmuls take the time
# of the unchunked ones from 256 rows (32 MiB of logits) up, and ~5% more at 128 rows.
CPU_CHUNKS = ChunkBudget()
# On CUDA a chunk's logits take at most this many bytes (a power of two of rows): measured on an
# H100, 2048-row chunks of a 128256-class bfloat16 vocabulary (512 MiB) keep the matmuls near their
# unchunked speed.
GPU_CHUNK_BYTES = 512 * 2**20


def chunk_rows(
    rows: int, classes: int, itemsize: int, chunk_size: int | None, *, device_type: str = "cpu",
    budget: ChunkBudget = CPU_CHUNKS,
) -> int:
    """Rows per chunk of a fused linear form, the one rule for all of them: ``chunk_size`` (already
    checked by the options) when given, at most ``rows``. Otherwise, a chunk's logits being
    ``chunk × classes × itemsize`` bytes: on CUDA the largest power of two of rows within
    ``GPU_CHUNK_BYTES``; elsewhere within ``budget`` (:class:`ChunkBudget`), rounded down to a
    multiple of 8 rows (matmul-friendly) from 16 rows up.

    >>> from xentkit.torch._chunks import chunk_rows
    >>> chunk_rows(4096, 32000, 4, None)   # min(4096/16, 32 MiB / (32000·4 B) = 262) = 256 rows
    256
    >>> chunk_rows(8192, 128256, 2, None, device_type="cuda")   # 512 MiB / 250.5 KiB = 2093 → 2048
    2048
    """
    if isinstance(rows, torch.Tensor):  # torch.jit.trace records sizes as 0-d tensors
        rows = int(rows)
    if isinstance(classes, torch.Tensor):
        classes = int(classes)
    if chunk_size is not None:
        return max(1, min(chunk_size, rows))
    row_bytes = max(1, classes * itemsize)
    if device_type == "cuda":
        fit = max(1, GPU_CHUNK_BYTES // row_bytes)
        return max(1, min(rows, 1 << (fit.bit_length() - 1)))
    chunk = min(math.ceil(rows / budget.fraction), budget.budget_bytes // row_bytes)
    if chunk >= 16:
        chunk -= chunk % 8
    return max(1, min(rows, max(chunk, budget.floor_bytes // row_bytes)))


def detached(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The three operands, detached, as the chunks' matmuls take them: the input and bias
    contiguous; the weight as it is when it or its transpose is (BLAS reads either: a tied
    embedding or a head stored ``[D, V]`` is not copied, where ``.contiguous()`` copied the whole
    weight every call), else a contiguous copy (other strides would be copied by every chunk's
    matmul)."""
    w = linear_weight.detach()
    if not (w.is_contiguous() or (w.dim() == 2 and w.t().is_contiguous())):
        w = w.contiguous()
    bias = None if linear_bias is None else linear_bias.detach().contiguous()
    return input.detach().contiguous(), w, bias


def logit_chunks(
    x: Tensor, w: Tensor, b: Tensor | None, buffer: Tensor, chunk_rows: int,
    skip: Sequence[bool] | None = None,
) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """For each chunk of ``chunk_rows`` rows of ``x``: ``(start, stop, x_chunk, logits)`` with
    ``logits = x_chunk wᵀ + b`` written into the first ``stop − start`` rows of ``buffer`` (one
    matmul, ``out=``). The caller may overwrite ``logits`` (with their gradient, say) before the
    next chunk reuses the buffer. Chunk k is left out (no matmul) when ``skip[k]`` is true."""
    w_t = w.t()
    for index, start in enumerate(range(0, x.shape[0], chunk_rows)):
        if skip is not None and skip[index]:
            continue
        stop = min(start + chunk_rows, x.shape[0])
        x_chunk = x[start:stop]
        logits = buffer[: stop - start]
        if b is None:
            torch.mm(x_chunk, w_t, out=logits)
        else:
            torch.addmm(b, x_chunk, w_t, out=logits)
        yield start, stop, x_chunk, logits


Gradients = tuple[Tensor | None, Tensor | None, Tensor | None]


def _torch_buffer(shape: tuple[int, ...], like: Tensor, *, zero: bool = False) -> Tensor:
    make = torch.zeros if zero else torch.empty
    return make(shape, dtype=like.dtype, device=like.device)


def gradient_buffers(
    x: Tensor, w: Tensor, b: Tensor | None, want: Sequence[bool], *, zero_input: bool = False,
    new_buffer: Callable[..., Tensor] = _torch_buffer, widen: bool = True,
) -> Gradients:
    """``(grad_x, grad_W, grad_b)`` for :func:`add_chunk_gradients`, each None unless ``want``
    says so (``want[2]`` asks for nothing without a bias). ``grad_x`` has ``x``'s dtype, its rows
    written chunk by chunk (zeroed first when ``zero_input``: skipped chunks, a sum over ranks);
    ``grad_W`` and ``grad_b`` are zeroed accumulators in float32 or better (float16/bfloat16 widen
    to float32, see the module docstring), for :func:`finish_gradients` to round once; with
    ``widen=False`` (``LossOptions.accumulate_in_float32=False``) in the weight's own dtype.
    ``new_buffer(shape, like, zero=)`` allocates a buffer of ``like``'s dtype and device (torch's
    allocator by default)."""
    grad_x = new_buffer(tuple(x.shape), x, zero=zero_input) if want[0] else None
    grad_w = _accumulator(w, new_buffer, widen) if want[1] else None
    grad_b = _accumulator(b, new_buffer, widen) if want[2] and b is not None else None
    return grad_x, grad_w, grad_b


def _accumulator(tensor: Tensor, new_buffer: Callable[..., Tensor], widen: bool) -> Tensor:
    dtype = _bridge.at_least_float32(tensor.dtype) if widen else tensor.dtype
    if dtype == tensor.dtype:
        return new_buffer(tuple(tensor.shape), tensor, zero=True)
    return torch.zeros(tensor.shape, dtype=dtype, device=tensor.device)


def add_chunk_gradients(dz: Tensor, x_chunk: Tensor, w: Tensor, grads: Gradients, start: int, stop: int) -> None:
    """The last step of every fused linear form, for one chunk whose logits' gradient is ``dz``:
    ``grad_x[start:stop] = dz W`` (written), ``grad_W += dzᵀ x_chunk``, ``grad_b += Σ_rows dz``
    (added in the accumulators' dtype, float32 or better). ``grads``: :func:`gradient_buffers`'."""
    grad_x, grad_w, grad_b = grads
    if grad_x is not None:
        torch.mm(dz, w, out=grad_x[start:stop])
    if grad_w is not None:
        _add_product(grad_w, dz.t(), x_chunk)
    if grad_b is not None:
        grad_b.add_(dz.sum(dim=0, dtype=grad_b.dtype))


def finish_gradients(grads: Gradients, w: Tensor, b: Tensor | None) -> Gradients:
    """The gradients of :func:`gradient_buffers` after the last chunk: ``grad_W`` and ``grad_b``
    rounded to the weight's and the bias' dtype (once; nothing to do for float32/float64)."""
    grad_x, grad_w, grad_b = grads
    if grad_w is not None:
        grad_w = grad_w.to(w.dtype)
    if grad_b is not None and b is not None:
        grad_b = grad_b.to(b.dtype)
    return grad_x, grad_w, grad_b


def _add_product(accumulator: Tensor, a: Tensor, b: Tensor) -> None:
    """``accumulator += a @ b`` in the accumulator's dtype, without rounding the product to the
    operands' (half) dtype first."""
    if accumulator.dtype == a.dtype:  # (addmm with out=, not addmm_: torch's FlopCounterMode counts it)
        torch.addmm(accumulator, a, b, out=accumulator)
    elif accumulator.device.type == "cuda" and mixed_addmm(accumulator.device, a.dtype):
        torch.addmm(accumulator, a, b, out_dtype=accumulator.dtype, out=accumulator)
    else:
        torch.addmm(accumulator, a.to(accumulator.dtype), b.to(accumulator.dtype), out=accumulator)


_MIXED_ADDMM: dict[tuple[torch.device, torch.dtype], bool] = {}


def mixed_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(c, a, b, out_dtype=float32, out=c)`` adds ``a @ b`` of ``dtype``
    operands into a float32 ``c`` on ``device`` (torch ≥ 2.8 on CUDA): tried once per device and
    dtype on a small problem with an exact answer, so a torch without it, or one that gets it
    wrong, falls back to converting the operands. The try copies to the device and waits for it,
    so it is not made while a CUDA graph is being captured (that would break the capture, and its
    error would have been cached as "no"): until a call outside a capture has tried, the
    operands are converted."""
    key = (device, dtype)
    known = _MIXED_ADDMM.get(key)
    if known is not None:
        return known
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    try:
        a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype, device=device)
        c = torch.full((2, 2), 0.5, dtype=torch.float32, device=device)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        works = c.tolist() == [[7.5, 10.5], [15.5, 22.5]]
    except (TypeError, RuntimeError, NotImplementedError):
        works = False
    _MIXED_ADDMM[key] = works
    return works


def batched_chunk_gradients(
    x: Tensor, w: Tensor, b: Tensor | None, chunk_rows: int, want: Sequence[bool],
    chunk_gradient: Callable[[Tensor, int, int], Tensor], *, widen: bool = True,
) -> Gradients:
    """The gradients ``want``ed of (x, w, b) (else None) in a batched backward
    (``_bridge.batched_backward``: the upstream gradient is a batch, which no plain buffer can
    take in place): per chunk, the logits into one reused buffer, ``chunk_gradient(logits,
    start, stop)`` their (batched) gradient, made from the rows' gradient at upstream ones (the
    fused kernels', which may overwrite ``logits``) times the batch's upstream out of place, and
    then out of place ``dz W`` (the chunks' rows concatenated), ``Σ dzᵀ x_chunk`` and
    ``Σ_rows dz`` (summed in float32 or better, as :func:`gradient_buffers`, unless ``widen`` is
    False; rounded once). Every chunk is walked (none skipped: a skipped chunk's rows would be
    missing from the concatenation)."""
    n = x.shape[0]
    buffer = torch.empty((min(chunk_rows, n), w.shape[0]), dtype=x.dtype, device=x.device)
    total = _bridge.at_least_float32(w.dtype) if widen else w.dtype
    parts: list[Tensor] = []
    grad_w: Tensor | None = None
    grad_b: Tensor | None = None
    for start, stop, x_chunk, logits in logit_chunks(x, w, b, buffer, chunk_rows):
        dz = chunk_gradient(logits, start, stop)
        if want[0]:
            parts.append(dz @ w)
        if want[1]:
            term = dz.t().to(total) @ x_chunk.to(total)
            grad_w = term if grad_w is None else grad_w + term
        if want[2] and b is not None:
            term = dz.sum(dim=0, dtype=total)
            grad_b = term if grad_b is None else grad_b + term
    # (no rows: no chunk, plain zeros)
    grad_x = (torch.cat(parts) if parts else torch.zeros_like(x)) if want[0] else None
    if want[1]:
        grad_w = torch.zeros_like(w) if grad_w is None else grad_w.to(w.dtype)
    if want[2] and b is not None:
        grad_b = torch.zeros_like(b) if grad_b is None else grad_b.to(b.dtype)
    return grad_x, grad_w, grad_b


def idle_flags(valid: Tensor, chunk_rows: int) -> Tensor:
    """Per chunk of ``chunk_rows`` rows, on ``valid``'s device (no wait): True where none of its
    rows is valid."""
    n = valid.shape[0]
    padded = torch.zeros(-(-n // chunk_rows) * chunk_rows, dtype=torch.bool, device=valid.device)
    padded[:n] = valid
    return ~padded.reshape(-1, chunk_rows).any(dim=1)


def idle_chunks(valid: Tensor | np.ndarray, chunk_rows: int) -> tuple[bool, ...]:
    """Per chunk of ``chunk_rows`` rows, whether none of its rows is ``valid`` (all ignored, so
    the chunk has nothing to differentiate): the ``skip`` of :func:`logit_chunks`. A tensor on a
    device is read once (one wait: callers on a device read it with the label check instead,
    ``log_probs._check_labels_reading``); a meta or fake one cannot be: no chunk is skipped."""
    n = valid.shape[0]
    if isinstance(valid, Tensor):
        if not _bridge.values_readable(valid):
            return (False,) * -(-n // chunk_rows)
        return tuple(idle_flags(valid, chunk_rows).tolist())
    return tuple(not valid[start : start + chunk_rows].any() for start in range(0, n, chunk_rows))
