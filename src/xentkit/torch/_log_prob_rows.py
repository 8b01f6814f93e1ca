"""The two passes of the token log-probabilities over a ``[rows, V]`` block of logits, per backend.

The backends keep one contract (that of :mod:`xentkit.kernels.log_probs`, whose docstring has
the formulas): ``statistics`` gives each row's (m, s, u, z_y), ``finished`` those and the rows'
log p(y), H and lse (``reference.log_probs.row_statistics``, in torch ops or, for Triton, in its
kernel), ``gradient`` writes
∂/∂logits = (a·[j = y] + p_j·(b + k·(z_j − m)))/T from the rows' (m, s) and coefficients
(a, b, k) into ``out`` (which may be the logits: in place). Rows that are not ``valid`` get
(m, s, u, z_y) = (0, 1, 0, 0) and a zero gradient; a label outside [0, V) is not read (z_y 0, no
target entry).

- :class:`NumbaRows`: the fused Numba kernels, for plain CPU float32/float64 tensors (float64
  statistics).
- :class:`TorchRows`: the same formulas in torch ops, for any device and dtype (statistics in
  float32, float64 for float64 logits); a chunk's temporaries are a few chunk-sized float32
  tensors.
- :class:`TritonRows`: the fused Triton kernels (``xentkit.triton.log_probs``), for CUDA
  float32/float16/bfloat16 tensors (CPU tensors only under Triton's interpreter); float64
  statistics (each row merged in float64 by the kernel; the elements in float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.log_probs import EXPONENT_FLOOR, row_statistics
from . import _bridge

__all__ = ["NumbaRows", "TorchRows", "TritonRows"]


def finish_rows(
    statistics: tuple[Tensor, ...], valid: Tensor, dtype: torch.dtype, shape: torch.Size
) -> tuple[Tensor, ...]:
    """``(log_p, entropy, lse, log_s, kept_entropy)`` from the rows' (m, s, u, z_y) by
    ``reference.log_probs.row_statistics``: the first three outputs of their own in ``shape`` and
    float32 (float64 for ``dtype`` float64), never views and never what backward keeps; the last
    two ``[N]`` for backward."""
    log_p, entropy, lse, log_s = row_statistics(*statistics, valid)
    outputs = _bridge.own_outputs((log_p, entropy, lse), _bridge.at_least_float32(dtype), shape)
    return (*outputs, log_s, entropy)


class _Rows:
    """What the row backends share: :meth:`finished`, from their ``statistics``."""

    @staticmethod
    def statistics(logits: Tensor, labels: Tensor, valid: Tensor, temperature: float) -> tuple[Tensor, ...]:
        raise NotImplementedError  # each backend's own pass 1

    @classmethod
    def finished(
        cls, logits: Tensor, labels: Tensor, valid: Tensor, temperature: float, shape: torch.Size
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``statistics`` and what :func:`finish_rows` makes of them: the rows' (m, s, u, z_y), and
        ``(log_p, entropy, lse, log_s, kept_entropy)``."""
        statistics = cls.statistics(logits, labels, valid, temperature)
        return statistics, finish_rows(statistics, valid, logits.dtype, shape)


class NumbaRows(_Rows):
    """The CPU kernels (``xentkit.kernels.log_probs``) on NumPy views of the tensors."""

    name = "numba"

    @staticmethod
    def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
        """The dtype of ``statistics``' results for logits of ``dtype``."""
        return torch.float64

    @staticmethod
    def statistics(logits: Tensor, labels: Tensor, valid: Tensor, temperature: float) -> tuple[Tensor, ...]:
        from ..kernels.log_probs import log_prob_statistics

        results = log_prob_statistics(
            _bridge.as_numpy(logits), _bridge.as_numpy(labels), _bridge.as_numpy(valid), temperature
        )
        return tuple(torch.from_numpy(result) for result in results)

    @staticmethod
    def gradient(
        logits: Tensor, labels: Tensor, valid: Tensor, temperature: float, m: Tensor, s: Tensor,
        coefficients: tuple[Tensor, Tensor, Tensor], out: Tensor,
    ) -> Tensor:
        from ..kernels.log_probs import log_prob_gradient

        logits_array = logits.detach().numpy()  # contiguous by contract: a view, never a copy
        out_array = logits_array if out.data_ptr() == logits.data_ptr() else out.detach().numpy()
        log_prob_gradient(
            logits_array, _bridge.as_numpy(labels), _bridge.as_numpy(valid), temperature,
            m.numpy(), s.numpy(), tuple(_bridge.as_numpy(c.to(torch.float64)) for c in coefficients),
            out_array,
        )
        return out


class TorchRows(_Rows):
    """The same two passes in torch ops (any device, any floating dtype)."""

    name = "torch"
    statistics_dtype = staticmethod(_bridge.at_least_float32)

    @staticmethod
    def _shifted(logits: Tensor, temperature: float, m: Tensor | None) -> tuple[Tensor, Tensor]:
        """(z, m) with z = logits/T in the statistics dtype and m its row max (given or found;
        found, it is detached: a shift, which autograd must hold constant where it
        differentiates these ops, see ``traced``)."""
        z = logits.to(_bridge.at_least_float32(logits.dtype)) * (1.0 / temperature)
        if m is None:
            m = z.detach().amax(dim=-1) if z.shape[-1] else z.new_zeros(z.shape[0])
        return z, m

    @staticmethod
    def statistics(logits: Tensor, labels: Tensor, valid: Tensor, temperature: float) -> tuple[Tensor, ...]:
        z, m = TorchRows._shifted(logits, temperature, None)
        shift = torch.where(m.isinf(), 0.0, m)  # as the kernel: a +inf logit gives s = +inf
        d = z - shift[:, None]
        e = d.exp()
        s = e.sum(dim=-1)
        u = (e * d.clamp_min(EXPONENT_FLOOR)).sum(dim=-1)
        here = valid & (labels >= 0) & (labels < logits.shape[-1])
        picked = z.gather(1, torch.where(here, labels, 0).long()[:, None])[:, 0]
        z_target = torch.where(here, picked, 0.0)
        one = torch.ones_like(s)
        return (
            torch.where(valid, m, 0.0), torch.where(valid, s, one), torch.where(valid, u, 0.0), z_target,
        )

    @staticmethod
    def traced(logits: Tensor, labels: Tensor, valid: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(log_probs, entropy, lse)`` per row by pass 1 and ``row_statistics``, left to
        autograd to differentiate (torch.compile traces them, torch.func transforms them, and
        they have a second derivative): the path where an autograd Function around the kernels
        cannot run. The gradient autograd finds is the formula's (m held constant)."""
        # ignored rows' logits set to 0 first: their NaN or ±inf would make 0·∞ = NaN in the
        # gradient autograd finds (the kernels never read them)
        logits = torch.where(valid[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        m, s, u, z_target = TorchRows.statistics(logits, labels, valid, temperature)
        log_p, entropy, lse, _ = row_statistics(m, s, u, z_target, valid)
        return log_p, entropy, lse

    @staticmethod
    def gradient(
        logits: Tensor, labels: Tensor, valid: Tensor, temperature: float, m: Tensor, s: Tensor,
        coefficients: tuple[Tensor, Tensor, Tensor], out: Tensor,
    ) -> Tensor:
        a, b, k = (c.to(m.dtype) for c in coefficients)
        z, _ = TorchRows._shifted(logits, temperature, m)
        d = z - m[:, None]
        scale = 1.0 / temperature
        grad = d.exp() * ((scale * b / s)[:, None] + (scale * k / s)[:, None] * d.clamp_min(EXPONENT_FLOOR))
        here = valid & (labels >= 0) & (labels < logits.shape[-1])
        index = torch.where(here, labels, 0).long()[:, None]
        grad.scatter_add_(1, index, torch.where(here, scale * a, 0.0)[:, None])
        grad = torch.where(valid[:, None], grad, 0.0)
        out.copy_(grad)
        return out


class TritonRows(_Rows):
    """The Triton kernels (``xentkit.triton.log_probs``) on the tensors as they are: float64
    statistics, the gradient written into ``out`` (in place when ``out`` is the logits)."""

    name = "triton"

    @staticmethod
    def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
        """The dtype of ``statistics``' results: float64, whatever the logits' (the kernels keep
        m = max x·c and z_y = x_y·c to float64, which log p = (z_y − m) − log s needs, and s apart
        from the max's own terms)."""
        return torch.float64

    @staticmethod
    def statistics(logits: Tensor, labels: Tensor, valid: Tensor, temperature: float) -> tuple[Tensor, ...]:
        from ..triton.log_probs import log_prob_statistics

        return log_prob_statistics(logits, labels.to(torch.int64).contiguous(), valid, temperature)

    @classmethod
    def finished(
        cls, logits: Tensor, labels: Tensor, valid: Tensor, temperature: float, shape: torch.Size
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """As the other backends', with ``row_statistics``' algebra in the kernel that merges each
        row (no torch op: on CUDA each would be a launch), written straight into the outputs."""
        from ..triton.log_probs import log_prob_statistics

        outputs = tuple(torch.empty(shape, dtype=torch.float32, device=logits.device) for _ in range(3))
        # log s and H kept for backward in float64, as the statistics (the coefficients' H − log s)
        kept = tuple(torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device) for _ in range(2))
        statistics = log_prob_statistics(
            logits, labels.to(torch.int64).contiguous(), valid, temperature, finished=(*outputs, *kept),
        )
        return statistics, (*outputs, *kept)

    @staticmethod
    def gradient(
        logits: Tensor, labels: Tensor, valid: Tensor, temperature: float, m: Tensor, s: Tensor,
        coefficients: tuple[Tensor, Tensor, Tensor], out: Tensor,
    ) -> Tensor:
        from ..triton.log_probs import log_prob_gradient

        return log_prob_gradient(
            logits, labels.to(torch.int64).contiguous(), valid, temperature, m, s, coefficients, out
        )
