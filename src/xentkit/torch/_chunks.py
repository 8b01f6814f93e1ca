"""The row-chunk walk of the fused linear forms: each chunk's logits ``x_chunk Wᵀ (+ b)`` computed
into one reused buffer, never the full ``[N, V]`` logits. Used by ``linear_cross_entropy``,
``linear_log_probs`` and ``vocab_parallel_linear_cross_entropy`` (and meant for every later fused
linear form)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from . import _bridge


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


def add_chunk_gradients(
    dz: Tensor, x_chunk: Tensor, w: Tensor, grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    start: int, stop: int,
) -> None:
    """The last step of every fused linear form, for one chunk whose logits' gradient is ``dz``:
    ``grad_x[start:stop] = dz W`` (written), ``grad_W += dzᵀ x_chunk``, ``grad_b += Σ_rows dz``
    (the column sums in float32 or better). ``grads`` = (grad_x, grad_W, grad_b), each None when
    not wanted; grad_W and grad_b start at zero."""
    grad_x, grad_w, grad_b = grads
    if grad_x is not None:
        torch.mm(dz, w, out=grad_x[start:stop])
    if grad_w is not None:
        grad_w.addmm_(dz.t(), x_chunk)
    if grad_b is not None:
        grad_b.add_(dz.sum(dim=0, dtype=_bridge.at_least_float32(dz.dtype)).to(grad_b.dtype))


def idle_chunks(valid: Tensor | np.ndarray, chunk_rows: int) -> tuple[bool, ...]:
    """Per chunk of ``chunk_rows`` rows, whether none of its rows is ``valid`` (all ignored, so
    the chunk has nothing to differentiate): the ``skip`` of :func:`logit_chunks`. A tensor on a
    device is read once (one wait)."""
    n = valid.shape[0]
    if isinstance(valid, Tensor):
        padded = torch.zeros(-(-n // chunk_rows) * chunk_rows, dtype=torch.bool, device=valid.device)
        padded[:n] = valid
        return tuple(not flag for flag in padded.reshape(-1, chunk_rows).any(dim=1).tolist())
    return tuple(not valid[start : start + chunk_rows].any() for start in range(0, n, chunk_rows))
