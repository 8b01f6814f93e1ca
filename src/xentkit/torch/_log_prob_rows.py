"""The two passes of the token log-probabilities over a ``[rows, V]`` block of logits, per backend.

The backends keep one contract (that of :mod:`xentkit.kernels.log_probs`, whose docstring has
the formulas): ``statistics`` gives each row's (m, e, u, z_y) (e = s − 1, the excess of the sum
of exponentials), ``finished`` those and the rows' log p(y), H and lse
(``reference.log_probs.row_statistics``, in torch ops or, for Triton, in its kernel), ``gradient``
writes ∂/∂logits = (a·[j = y] + p_j·(b + k·(z_j − m)))/T from the rows' (m, e) and coefficients
(a, t, k) into ``out`` (which may be the logits: in place; b = t − a). Rows that are not ``valid`` get
(m, e, u, z_y) = (0, 0, 0, 0) and a zero gradient; a label outside [0, V) is not read (z_y 0, no
target entry).

- :class:`NumbaRows`: the fused Numba kernels, for plain CPU float32/float64 tensors (float64
  statistics).
- :class:`TorchRows`: the same formulas in torch ops, for any device and dtype (float64
  statistics, float32 on a device without float64); a chunk's temporaries are a few chunk-sized
  float32 tensors.
- :class:`TritonRows`: the fused Triton kernels (``xentkit.triton.log_probs``), for CUDA
  float32/float16/bfloat16 tensors (CPU tensors only under Triton's interpreter); float64
  statistics (each row merged in float64 by the kernel; the elements in float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.log_probs import EXPONENT_FLOOR, row_statistics
from . import _bridge
from ._chunks import chunk_rows

__all__ = ["NumbaRows", "TorchRows", "TritonRows"]


def finish_rows(
    statistics: tuple[Tensor, ...], valid: Tensor, dtype: torch.dtype, shape: torch.Size
) -> tuple[Tensor, ...]:
    """``(log_p, entropy, lse, log_s, kept_entropy)`` from the rows' (m, e, u, z_y) by
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
        """``statistics`` and what :func:`finish_rows` makes of them: the rows' (m, e, u, z_y), and
        ``(log_p, entropy, lse, log_s, kept_entropy)``."""
        statistics = cls.statistics(logits, labels, valid, temperature)
        return statistics, finish_rows(statistics, valid, logits.dtype, shape)


class NumbaRows(_Rows):
    """The CPU kernels (``xentkit.kernels.log_probs``) on NumPy views of the tensors."""

    name = "numba"

    @staticmethod
    def statistics_dtype(dtype: torch.dtype, device: torch.device | None = None) -> torch.dtype:
        """The dtype of ``statistics``' results for logits of ``dtype`` (on ``device``)."""
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
        logits: Tensor, labels: Tensor, valid: Tensor, temperature: float, m: Tensor, e: Tensor,
        coefficients: tuple[Tensor, Tensor, Tensor], out: Tensor,
    ) -> Tensor:
        from ..kernels.log_probs import log_prob_gradient

        logits_array = logits.detach().numpy()  # contiguous by contract: a view, never a copy
        out_array = logits_array if out.data_ptr() == logits.data_ptr() else out.detach().numpy()
        log_prob_gradient(
            logits_array, _bridge.as_numpy(labels), _bridge.as_numpy(valid), temperature,
            m.numpy(), e.numpy(), tuple(_bridge.as_numpy(c.to(torch.float64)) for c in coefficients),
            out_array,
        )
        return out


class TorchRows(_Rows):
    """The same two passes in torch ops (any device, any floating dtype), shifted before they are
    scaled as the kernels: d_j = (x_j − max x)·c in the logits' working dtype (float32, float64
    for float64 logits), and the rows' m = max x·c and z_y = x_y·c in float64 (float32 on a
    device without float64, MPS), so that log p = (z_y − m) − log s keeps its digits at logits
    far from 0 (z = x·c rounded first left half an ulp of max|x|·c in every exponent). Unlike the
    kernels, s is a sum in the working dtype with the max's term inside and e = s − 1: a
    confident token's s = 1 + δ loses δ below 6e-8 in float32 (its log p comes out 0, never
    above; counting the max's terms apart cost 35-140% more time in torch ops on the CPU, ad
    hoc)."""

    name = "torch"

    @staticmethod
    def statistics_dtype(dtype: torch.dtype, device: torch.device | None = None) -> torch.dtype:
        """The dtype of ``statistics``' results: float64, or the working dtype on a device
        without float64 (MPS)."""
        return _bridge.at_least_float32(dtype) if device is not None and device.type == "mps" else torch.float64

    @staticmethod
    def statistics(
        logits: Tensor, labels: Tensor, valid: Tensor, temperature: float, *, apart: bool = False
    ) -> tuple[Tensor, ...]:
        """Pass 1 in torch ops. ``apart``: the max's own terms (exactly 1 each) counted apart from
        the sum, as the kernels count them, so that a confident row's e = s − 1 keeps its digits
        (one more comparison and select per element: what ``traced`` takes, where the compiler
        fuses them into the same loop); else e = s − 1 of the plain sum, by chunks of rows
        (:func:`_row_chunks`: a chunk's float32 temporaries, never the whole logits')."""
        if not apart:
            step = _row_chunks(logits)
            if step < logits.shape[0]:
                pieces = [
                    TorchRows._statistics(logits[i : i + step], labels[i : i + step], valid[i : i + step], temperature, False)
                    for i in range(0, logits.shape[0], step)
                ]
                return tuple(torch.cat(parts) for parts in zip(*pieces, strict=True))
        return TorchRows._statistics(logits, labels, valid, temperature, apart)

    @staticmethod
    def _statistics(logits: Tensor, labels: Tensor, valid: Tensor, temperature: float, apart: bool) -> tuple[Tensor, ...]:
        x = logits.to(_bridge.at_least_float32(logits.dtype))
        scale = 1.0 / temperature
        # the max is a shift, which autograd must hold constant (``traced``): detached
        top = x.detach().amax(dim=-1) if x.shape[-1] else x.new_zeros(x.shape[0])
        shift = torch.where(top.isinf(), 0.0, top)  # as the kernel: a +inf logit gives s = +inf
        d = (x - shift[:, None]) * scale
        exponentials = d.exp()
        wide = TorchRows.statistics_dtype(logits.dtype, logits.device)
        if apart:
            # at the max d = 0: expm1(d) adds 0 to the sum and still has exp's derivative, 1
            at_max = (x.detach() == top[:, None]) & top.isfinite()[:, None]
            rest = torch.where(at_max, d.expm1(), exponentials).sum(dim=-1)
            excess = rest.to(wide) + (at_max.sum(dim=-1).to(wide) - 1)
        else:
            excess = exponentials.sum(dim=-1).to(wide) - 1
        u = (exponentials * d.clamp_min(EXPONENT_FLOOR)).sum(dim=-1)
        here = valid & (labels >= 0) & (labels < logits.shape[-1])
        picked = x.gather(1, torch.where(here, labels, 0).long()[:, None])[:, 0]
        z_target = torch.where(here, picked.to(wide) * scale, 0.0)
        m = top.to(wide) * scale
        return (
            torch.where(valid, m, 0.0), torch.where(valid, excess, 0.0), torch.where(valid, u.to(wide), 0.0),
            z_target,
        )

    @staticmethod
    def traced(logits: Tensor, labels: Tensor, valid: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(log_probs, entropy, lse)`` per row by pass 1 and ``row_statistics``, left to
        autograd to differentiate (torch.compile traces them, torch.func transforms them, and
        they have a second derivative): the path where an autograd Function around the kernels
        cannot run. The gradient autograd finds is the formula's (m held constant). The max's
        terms are counted apart (``statistics(apart=True)``): a confident token's log p keeps its
        digits, as on the kernels."""
        # ignored rows' logits set to 0 first: their NaN or ±inf would make 0·∞ = NaN in the
        # gradient autograd finds (the kernels never read them)
        logits = torch.where(valid[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        m, e, u, z_target = TorchRows.statistics(logits, labels, valid, temperature, apart=True)
        log_p, entropy, lse, _ = row_statistics(m, e, u, z_target, valid)
        return log_p, entropy, lse

    @staticmethod
    def gradient(
        logits: Tensor, labels: Tensor, valid: Tensor, temperature: float, m: Tensor, e: Tensor,
        coefficients: tuple[Tensor, Tensor, Tensor], out: Tensor,
    ) -> Tensor:
        """Pass 2 in torch ops, by chunks of rows (:func:`_row_chunks`) written into ``out``."""
        a, t, k = (c.to(m.dtype).reshape(-1).expand(m.shape[0]) for c in coefficients)
        step = _row_chunks(logits)
        for i in range(0, logits.shape[0], step):
            rows = slice(i, i + step)
            TorchRows._gradient(
                logits[rows], labels[rows], valid[rows], temperature, m[rows], e[rows], (a[rows], t[rows], k[rows]),
                out[rows],
            )
        return out

    @staticmethod
    def _gradient(
        logits: Tensor, labels: Tensor, valid: Tensor, temperature: float, m: Tensor, e: Tensor,
        coefficients: tuple[Tensor, Tensor, Tensor], out: Tensor,
    ) -> None:
        x = logits.to(_bridge.at_least_float32(logits.dtype))
        scale = 1.0 / temperature
        a, t, k = coefficients
        b = t - a  # off the target
        if x.dtype == torch.float64:  # (max x from m·T may be an ulp off: x·c − m, as the kernels)
            d = x * scale - m[:, None]
        else:  # max x back exactly from the float64 m = max x·c (a float32)
            d = (x - (m / scale).to(x.dtype)[:, None]) * scale
        s = 1 + e
        coef_b = (scale * b / s).to(x.dtype)[:, None]
        coef_k = (scale * k / s).to(x.dtype)[:, None]
        exponentials = d.exp()  # (exp(d)·K before ·d: K·d overflows at the tiniest temperatures)
        grad = exponentials * coef_b + (exponentials * coef_k) * d.clamp_min(EXPONENT_FLOOR)
        # (the target's a + p_y·b cancels for a confident row whatever the dtype: this backend's s
        # has lost δ already, see the class docstring)
        here = valid & (labels >= 0) & (labels < logits.shape[-1])
        index = torch.where(here, labels, 0).long()[:, None]
        grad.scatter_add_(1, index, torch.where(here, scale * a, 0.0).to(x.dtype)[:, None])
        grad = torch.where(valid[:, None], grad, 0.0)
        out.copy_(grad)


def _row_chunks(logits: Tensor) -> int:
    """Rows per chunk of :class:`TorchRows`' eager passes: the fused linear forms' rule
    (``_chunks.chunk_rows``) for float32 temporaries, so that a few chunk-sized ones are alive, not
    logits-sized ones (a review measured 10 and 14 times bfloat16 logits' bytes for log p and H,
    forward and backward, where torch's float32 log_softmax takes 6 and 10)."""
    return max(1, chunk_rows(logits.shape[0], logits.shape[-1], 4, None, device_type=logits.device.type))


class TritonRows(_Rows):
    """The Triton kernels (``xentkit.triton.log_probs``) on the tensors as they are: float64
    statistics, the gradient written into ``out`` (in place when ``out`` is the logits)."""

    name = "triton"

    @staticmethod
    def statistics_dtype(dtype: torch.dtype, device: torch.device | None = None) -> torch.dtype:
        """The dtype of ``statistics``' results: float64, whatever the logits' (the kernels keep
        m = max x·c and z_y = x_y·c to float64, which log p = (z_y − m) − log s needs, and the
        excess e = s − 1 apart from the max's own terms)."""
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
        logits: Tensor, labels: Tensor, valid: Tensor, temperature: float, m: Tensor, e: Tensor,
        coefficients: tuple[Tensor, Tensor, Tensor], out: Tensor,
    ) -> Tensor:
        from ..triton.log_probs import log_prob_gradient

        return log_prob_gradient(
            logits, labels.to(torch.int64).contiguous(), valid, temperature, m, e, coefficients, out
        )
