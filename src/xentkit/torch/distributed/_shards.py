"""The two passes over one rank's shard, on three backends: the Numba kernels (CPU
float32/float64), the Triton kernels (CUDA float32/float16/bfloat16; CPU tensors only under
Triton's interpreter) and torch ops (anything else, or ``backend="torch"``).

Pass 1 gives each row's shard statistics (max, the excess e_r = s_r − 1 of its sum of
exponentials, target logit, weighted logit sum); pass 2 writes the shard's gradient from the combined rows' coefficients.
Each backend keeps the contract of :mod:`xentkit.kernels.vocab_parallel` (whose docstring has the
formulas): ``statistics`` returns four float64 ``[n]`` tensors on the logits' device, ``gradient``
writes into ``out`` (which may be the logits: in place). :func:`shard_backend` picks one per call,
from the tensor and ``LossOptions.backend``. The kernels (:mod:`xentkit.kernels.vocab_parallel`,
:mod:`xentkit.triton.vocab_parallel`) are imported on first use, so that importing
``xentkit.torch`` loads neither Numba nor Triton.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..._options import LossOptions
from ...api._config import reference_enabled
from .. import _bridge
from .._triton_path import takes_triton, tensor_reason
from ._rows import _Plan, _Rows


def shard_backend(tensor: Tensor, options: LossOptions) -> type:
    """The shard backend of a call on ``tensor`` (the logits shard, or the linear form's input):
    "torch" → :class:`TorchShards`; "auto" → :class:`TritonShards` for CUDA tensors Triton takes,
    :class:`NumbaShards` for CPU float32/float64, :class:`TorchShards` otherwise; "triton" →
    :class:`TritonShards`, or a ValueError saying why it cannot run (every rank raises it through
    the agreement). ``USE_KERNELS = False`` (the package's switch, read at call time) turns "auto"
    and "triton" into torch ops, as tests use it; so does ``xentkit.use_reference()`` for "auto" on
    the CPU (no Numba kernel: it works under ``NUMBA_DISABLE_JIT=1``).
    """
    from . import USE_KERNELS

    if takes_triton(options.backend, tensor.device.type == "cuda", lambda: tensor_reason(tensor)):
        return TritonShards if USE_KERNELS else TorchShards
    if (
        options.backend == "auto" and USE_KERNELS and tensor.device.type == "cpu"
        and tensor.dtype in _bridge.NUMBA_DTYPES and not reference_enabled()
    ):
        return NumbaShards
    return TorchShards  # (also under xentkit.use_reference(): the formulas in torch ops, no kernel)


def _chunk_step(width: int) -> int:
    """Rows per chunk of the torch-ops path: a float64 chunk takes at most TORCH_CHUNK_BYTES."""
    from . import TORCH_CHUNK_BYTES

    return max(1, TORCH_CHUNK_BYTES // max(1, 8 * width))


def _new_buffer(shape: tuple[int, ...], like: Tensor, *, zero: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized (or zeroed) tensor of ``like``'s device and dtype (or ``dtype``).

    Large CPU buffers are allocated by NumPy, which asks Linux for transparent huge pages
    (``madvise(MADV_HUGEPAGE)``); torch's allocator does not. Measured on a 2048 × 32000 float32
    gradient: writing a fresh torch buffer took 115 ms, a fresh NumPy buffer 30 ms (page faults).
    """
    dtype = like.dtype if dtype is None else dtype
    if like.device.type == "cpu" and dtype in _bridge.NUMBA_DTYPES:
        array_dtype = np.float32 if dtype == torch.float32 else np.float64
        return torch.from_numpy(np.zeros(shape, dtype=array_dtype) if zero else np.empty(shape, dtype=array_dtype))
    make = torch.zeros if zero else torch.empty
    return make(shape, dtype=dtype, device=like.device)


class NumbaShards:
    """The Numba kernels (:mod:`xentkit.kernels.vocab_parallel`) on NumPy views of CPU
    float32/float64 tensors (no copy)."""

    name = "numba"

    @staticmethod
    def statistics(logits: Tensor, rows: _Rows, plan: _Plan) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from xentkit.kernels.vocab_parallel import shard_softmax_stats

        pieces = shard_softmax_stats(
            _bridge.as_numpy(logits), rows.local_labels_array, plan.weight_local_array, plan.smoothing
        )
        return tuple(torch.from_numpy(piece) for piece in pieces)  # type: ignore[return-value]

    @staticmethod
    def gradient(
        logits: Tensor, rows: _Rows, plan: _Plan, shift: Tensor,
        coefficients: tuple[Tensor, Tensor | None, Tensor], out: Tensor,
    ) -> None:
        if out.dtype != logits.dtype:
            TorchShards.gradient(logits, rows, plan, shift, coefficients, out)
            return
        from xentkit.kernels.vocab_parallel import shard_softmax_grad

        coef, smooth, target_grad = coefficients
        shard_softmax_grad(
            _bridge.as_numpy(logits), rows.local_labels_array, shift.numpy(), coef.numpy(),
            None if smooth is None else smooth.numpy(), target_grad.numpy(),
            plan.weight_local_array, _bridge.as_numpy(out),
        )


class TritonShards:
    """The Triton kernels (:mod:`xentkit.triton.vocab_parallel`) on the tensors as they are: the
    shard's float32/float16/bfloat16 logits read in float32, the plan's float64 rows and class
    weights read on the device (no copy), the gradient written into ``out``."""

    name = "triton"

    @staticmethod
    def statistics(logits: Tensor, rows: _Rows, plan: _Plan) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from xentkit.triton.vocab_parallel import shard_softmax_stats

        return shard_softmax_stats(logits, rows.local_labels, plan.weight_local, plan.smoothing)

    @staticmethod
    def gradient(
        logits: Tensor, rows: _Rows, plan: _Plan, shift: Tensor,
        coefficients: tuple[Tensor, Tensor | None, Tensor], out: Tensor,
    ) -> None:
        from xentkit.triton.vocab_parallel import shard_softmax_grad

        coef, smooth, target_grad = coefficients
        shard_softmax_grad(logits, rows.local_labels, shift, coef, smooth, target_grad, plan.weight_local, out)


class TorchShards:
    """The same two passes in torch ops, chunks of rows at a time (any device, any float dtype;
    float32 arithmetic for float16/bfloat16)."""

    name = "torch"

    @staticmethod
    def statistics(logits: Tensor, rows: _Rows, plan: _Plan) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, width = logits.shape
        compute = _bridge.at_least_float32(logits.dtype)
        device = logits.device
        row_max = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        excess = torch.full((n,), -1.0, dtype=torch.float64, device=device)  # e = s − 1 (s = 0: −1)
        sum_z = torch.zeros(n, dtype=torch.float64, device=device)
        target = torch.zeros(n, dtype=torch.float64, device=device)
        if width == 0 or n == 0:
            return row_max, excess, target, sum_z
        step = _chunk_step(width)
        for start in range(0, n, step):
            stop = min(start + step, n)
            z = logits[start:stop].to(compute)
            # m_r = max_j z_j; shift t_r = m_r (0 when the shard row is all −inf); e_r = s_r − 1 with
            # the max's terms (exactly 1 each) counted apart, as the kernels' shards: a confident
            # row's e_r keeps its digits (s_r summed whole rounded 1 + 4e-18 to 1, its loss to 0: a
            # review). exp − [z = m] is exactly 0 at the max, NaN where z = m = +inf (the row's
            # NaN, as before); a row of −inf counts C ties less C ones: e = −1
            m = z.amax(dim=1)
            shift = torch.where(m > -math.inf, m, torch.zeros_like(m))
            row_max[start:stop] = m
            exps = torch.exp(z - shift[:, None])
            at_max = (z == m[:, None]).to(exps.dtype)
            excess[start:stop] = (at_max.sum(dim=1, dtype=torch.float64) - 1.0) + (exps - at_max).sum(
                dim=1, dtype=torch.float64
            )
            if plan.smoothing:  # S'_r = Σ w_j·(z_j − t_r), relative to the shift, as the kernels
                z64 = z.to(torch.float64) - shift.to(torch.float64)[:, None]
                if plan.weight_local is None:
                    sum_z[start:stop] = z64.sum(dim=1)
                else:  # a class of weight 0 adds 0, even masked (−inf: 0·log 0 = 0, as the reference)
                    sum_z[start:stop] = z64.masked_fill(plan.weight_local == 0, 0.0) @ plan.weight_local
        here = rows.local_labels >= 0
        picked = logits.gather(1, rows.local_labels.clamp(min=0)[:, None])[:, 0].to(torch.float64)
        target = torch.where(here, picked, target)
        ignored = rows.local_labels == -2
        row_max = row_max.masked_fill(ignored, -math.inf)
        excess = excess.masked_fill(ignored, -1.0)
        sum_z = sum_z.masked_fill(ignored, 0.0)
        return row_max, excess, target, sum_z

    @staticmethod
    def gradient(
        logits: Tensor, rows: _Rows, plan: _Plan, shift: Tensor,
        coefficients: tuple[Tensor, Tensor | None, Tensor], out: Tensor,
    ) -> None:
        coef, smooth, target_grad = coefficients
        n, width = logits.shape
        if width == 0 or n == 0:
            return
        compute = _bridge.at_least_float32(logits.dtype)
        weight = None if plan.weight_local is None else plan.weight_local.to(compute)
        step = _chunk_step(width)
        for start in range(0, n, step):
            stop = min(start + step, n)
            z = logits[start:stop].to(compute)
            grad = torch.exp(z - shift[start:stop, None].to(compute)).mul_(coef[start:stop, None].to(compute))
            if smooth is not None:
                sigma = smooth[start:stop, None].to(compute)
                grad.sub_(sigma if weight is None else sigma * weight)
            out[start:stop] = grad
        here = rows.local_labels >= 0
        index = torch.nonzero(here)[:, 0]
        out[index, rows.local_labels[index]] = target_grad[index].to(out.dtype)
        out[rows.local_labels == -2] = 0


def _shard_statistics(
    logits: Tensor, rows: _Rows, plan: _Plan
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pass 1 over a contiguous ``[n, V_r]`` shard: ``(m_r, e_r, local z_y, local Σ w_j·z_j)``,
    float64 ``[n]`` tensors on the logits' device (see :mod:`xentkit.kernels.vocab_parallel`), on
    the plan's backend.
    """
    return plan.shards.statistics(logits, rows, plan)


def _shard_gradient(
    logits: Tensor,
    rows: _Rows,
    plan: _Plan,
    shift: Tensor,
    coefficients: tuple[Tensor, Tensor | None, Tensor],
    out: Tensor,
) -> None:
    """Pass 2: ``out[i, j] = c_i·exp(z_ij − M_i) − σ_i·w_j`` and the target entries; ignored rows
    0. ``out`` may be ``logits`` itself (in place). On the plan's backend.
    """
    plan.shards.gradient(logits, rows, plan, shift, coefficients, out)
