"""``linear_log_probs`` as torch custom ops, so that ``torch.compile`` keeps its chunks (the
``[N, V]`` logits never held) instead of tracing the whole logits as torch ops.

Two ops, each the compiler's one node, running the eager path's code
(``log_probs.linear_statistics`` and ``linear_gradients``) on the row backend eager would take
(the Numba kernels for CPU float32/float64, the Triton kernels on CUDA, torch ops otherwise):

    xentkit::linear_log_probs(input, linear_weight, linear_bias, target, valid, temperature,
                              chunk_size, backend) -> (log_probs, entropy, lse, m, e, log_s, H)
        forward: the chunks' pass 1 and ``reference.log_probs.row_statistics``; m, e, log s and
        the entropy H (float64, as eager keeps them) are what backward needs; the chunk size is
        resolved inside from the real shapes (resolved while tracing it would pin N)
    xentkit::linear_log_probs_backward(input, linear_weight, linear_bias, target, valid, m, e,
                                       a, b, k, temperature, chunk_size, backend, want_input,
                                       want_weight, want_bias) -> (grad_input, grad_weight, grad_bias)
        backward: each chunk's logits again, pass 2 with the rows' coefficients (a, t, k) (from
        the upstream gradients of the three outputs, traced torch ops), the matmuls

A gradient not wanted is an empty tensor. Neither op waits for the device: the targets are not
checked (the caller makes a bad one's log-probability NaN) and, unlike eager, chunks of ignored
rows are not skipped in backward (knowing which would read the device).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._options import LogProbOptions
from ..reference.log_probs import gradient_coefficients, row_statistics
from . import _bridge
from ._chunks import detached
from ._linear_ops import fake_gradients

__all__ = ["linear_log_probs", "log_probs"]

_OPERANDS = "Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor valid"
_OPTIONS = "float temperature, int? chunk_size, str backend"


def _rows(x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, options: LogProbOptions) -> type:
    from .log_probs import _rows_backend

    return _rows_backend(x, options, w, b, target, name="input")


def _options(x: Tensor, w: Tensor, temperature: float, chunk_size: int | None, backend: str) -> LogProbOptions:
    """The options, with the chunk size for these operands resolved inside the op from the real
    shapes (resolved while tracing, it would pin the number of rows: a recompilation each)."""
    from .log_probs import chunk_for

    return LogProbOptions(temperature, -100, chunk_for(x, w.shape[0], chunk_size), backend)


@torch.library.custom_op(
    "xentkit::linear_log_probs", mutates_args=(),
    schema=f"({_OPERANDS}, {_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def linear_log_probs_op(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, valid: Tensor,
    temperature: float, chunk_size: int | None, backend: str,
) -> tuple[Tensor, ...]:
    """``(log_probs, entropy, lse, m, e, log_s, H)`` per row, the last four in float64 for
    backward (H the entropy unrounded, as eager keeps it); see the module docstring."""
    from .log_probs import linear_statistics

    x, w, b = detached(input, linear_weight, linear_bias)
    options = _options(x, w, temperature, chunk_size, backend)
    rows = _rows(x, w, b, target, options)
    m, e, u, z_target = linear_statistics(x, w, b, target, valid, options, rows)
    log_p, entropy, lse, log_s = row_statistics(m, e, u, z_target, valid)
    out = _bridge.at_least_float32(x.dtype)
    return (
        log_p.to(out), entropy.to(out), lse.to(out),
        m.to(torch.float64), e.to(torch.float64), log_s.to(torch.float64),
        entropy.to(torch.float64, copy=True),  # (never the entropy output itself: no aliasing)
    )


@linear_log_probs_op.register_fake
def _(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, valid: Tensor,
    temperature: float, chunk_size: int | None, backend: str,
) -> tuple[Tensor, ...]:
    rows = input.shape[0]
    out = _bridge.at_least_float32(input.dtype)
    return (
        *(input.new_empty((rows,), dtype=out) for _ in range(3)),
        *(input.new_empty((rows,), dtype=torch.float64) for _ in range(4)),
    )


@torch.library.custom_op(
    "xentkit::linear_log_probs_backward", mutates_args=(),
    schema=(
        f"({_OPERANDS}, Tensor m, Tensor e, Tensor a, Tensor b, Tensor k, {_OPTIONS}, "
        "bool want_input, bool want_weight, bool want_bias) -> (Tensor, Tensor, Tensor)"
    ),
)
def linear_log_probs_backward(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, valid: Tensor,
    m: Tensor, e: Tensor, a: Tensor, b: Tensor, k: Tensor, temperature: float, chunk_size: int | None, backend: str,
    want_input: bool, want_weight: bool, want_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The input, weight and bias gradients for the rows' coefficients (a, t, k)."""
    from .log_probs import linear_gradients

    x, w, bias = detached(input, linear_weight, linear_bias)
    options = _options(x, w, temperature, chunk_size, backend)
    rows = _rows(x, w, bias, target, options)
    dtype = rows.statistics_dtype(x.dtype, x.device)
    want = (want_input, want_weight, want_bias and bias is not None)
    gradients = linear_gradients(
        x, w, bias, target, valid, options, rows, m.to(dtype), e.to(dtype), (a, b, k), want
    )
    return tuple(x.new_empty((0,)) if gradient is None else gradient for gradient in gradients)  # type: ignore[return-value]


@linear_log_probs_backward.register_fake
def _(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, valid: Tensor,
    m: Tensor, e: Tensor, a: Tensor, b: Tensor, k: Tensor, temperature: float, chunk_size: int | None, backend: str,
    want_input: bool, want_weight: bool, want_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return fake_gradients((want_input, want_weight, want_bias), input, linear_weight, linear_bias)


def _coefficients(log_s: Tensor, entropy: Tensor, grads: tuple[Tensor | None, ...]) -> tuple[Tensor, ...]:
    """The rows' (a, t, k) from the upstream gradients of (log p, H, lse) (None: unused), as
    traced torch ops; both ops' backward."""
    g, h, k = (torch.zeros_like(log_s) if grad is None else grad.to(log_s.dtype) for grad in grads)
    return gradient_coefficients(log_s, entropy, g, h, k)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    input, linear_weight, linear_bias, target, valid, *options = inputs
    _log_p, _entropy, _lse, m, e, log_s, entropy = output
    ctx.mark_non_differentiable(m, e, log_s, entropy)
    ctx.options = tuple(options)
    ctx.save_for_backward(input, linear_weight, linear_bias, target, valid, m, e, log_s, entropy)


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad_log_p: Tensor | None, grad_entropy: Tensor | None,
    grad_lse: Tensor | None, *_unused: Tensor | None,
) -> tuple:
    input, linear_weight, linear_bias, target, valid, m, e, log_s, entropy = ctx.saved_tensors
    a, b, k = _coefficients(log_s, entropy, (grad_log_p, grad_entropy, grad_lse))
    want = tuple(bool(need) for need in ctx.needs_input_grad[:3])
    gradients = linear_log_probs_backward(
        input, linear_weight, linear_bias, target, valid, m, e, a, b, k, *ctx.options, *want
    )
    grads = tuple(gradient if wanted else None for gradient, wanted in zip(gradients, want, strict=True))
    return (*grads, None, None, None, None, None)


linear_log_probs_op.register_autograd(_backward, setup_context=_setup_context)


def linear_log_probs(
    x: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, valid: Tensor,
    options: LogProbOptions,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(log_probs, entropy, lse)`` per row of ``x`` ``[N, D]`` under torch.compile; ``options``'
    chunk size is the user's (the ops resolve it)."""
    log_p, entropy, lse, *_ = linear_log_probs_op(
        x, linear_weight, linear_bias, target, valid, options.temperature, options.chunk_size, options.backend
    )
    return log_p, entropy, lse


# ``log_probs`` of existing logits under torch.compile: the same pair of ops on ``[rows, V]``
# logits (no chunks), the eager Function's row backend inside (Numba for CPU float32/float64,
# Triton on CUDA, torch ops otherwise); the traced torch ops before ran 4-5 times slower than
# eager on the CPU.

_LOGITS_OPERANDS = "Tensor logits, Tensor target, Tensor valid"
_LOGITS_OPTIONS = "float temperature, str backend"


def _logits_rows(logits: Tensor, temperature: float, backend: str) -> tuple[type, LogProbOptions]:
    from .log_probs import _rows_backend

    options = LogProbOptions(temperature, -100, None, backend)
    return _rows_backend(logits, options), options


@torch.library.custom_op(
    "xentkit::log_probs", mutates_args=(),
    schema=f"({_LOGITS_OPERANDS}, {_LOGITS_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def log_probs_op(logits: Tensor, target: Tensor, valid: Tensor, temperature: float, backend: str) -> tuple[Tensor, ...]:
    """``(log_probs, entropy, lse, m, e, log_s, H)`` per row of contiguous ``[rows, V]`` logits, the
    last four in float64 for backward."""
    rows, _ = _logits_rows(logits, temperature, backend)
    (m, e, _, _), (log_p, entropy, lse, log_s, kept) = rows.finished(logits, target, valid, temperature, target.shape)
    out = _bridge.at_least_float32(logits.dtype)
    return (
        log_p.to(out), entropy.to(out), lse.to(out),
        m.to(torch.float64, copy=True), e.to(torch.float64, copy=True), log_s.to(torch.float64, copy=True),
        kept.to(torch.float64, copy=True),  # (copies: no output aliases another)
    )


@log_probs_op.register_fake
def _(logits: Tensor, target: Tensor, valid: Tensor, temperature: float, backend: str) -> tuple[Tensor, ...]:
    rows = logits.shape[0]
    out = _bridge.at_least_float32(logits.dtype)
    return (
        *(logits.new_empty((rows,), dtype=out) for _ in range(3)),
        *(logits.new_empty((rows,), dtype=torch.float64) for _ in range(4)),
    )


@torch.library.custom_op(
    "xentkit::log_probs_backward", mutates_args=(),
    schema=f"({_LOGITS_OPERANDS}, Tensor m, Tensor e, Tensor a, Tensor b, Tensor k, {_LOGITS_OPTIONS}) -> Tensor",
)
def log_probs_backward(
    logits: Tensor, target: Tensor, valid: Tensor, m: Tensor, e: Tensor, a: Tensor, b: Tensor, k: Tensor,
    temperature: float, backend: str,
) -> Tensor:
    """The logits' gradient for the rows' coefficients (a, t, k), a new buffer of their dtype."""
    rows, _ = _logits_rows(logits, temperature, backend)
    dtype = rows.statistics_dtype(logits.dtype, logits.device)
    gradient = torch.empty_like(logits)
    rows.gradient(logits, target, valid, temperature, m.to(dtype), e.to(dtype), (a, b, k), gradient)
    return gradient


@log_probs_backward.register_fake
def _(
    logits: Tensor, target: Tensor, valid: Tensor, m: Tensor, e: Tensor, a: Tensor, b: Tensor, k: Tensor,
    temperature: float, backend: str,
) -> Tensor:
    return torch.empty_like(logits)


def _logits_setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    logits, target, valid, *options = inputs
    _log_p, _entropy, _lse, m, e, log_s, entropy = output
    ctx.mark_non_differentiable(m, e, log_s, entropy)
    ctx.options = tuple(options)
    ctx.save_for_backward(logits, target, valid, m, e, log_s, entropy)


def _logits_backward(
    ctx: torch.autograd.function.FunctionCtx, grad_log_p: Tensor | None, grad_entropy: Tensor | None,
    grad_lse: Tensor | None, *_unused: Tensor | None,
) -> tuple:
    logits, target, valid, m, e, log_s, entropy = ctx.saved_tensors
    a, b, k = _coefficients(log_s, entropy, (grad_log_p, grad_entropy, grad_lse))
    gradient = log_probs_backward(logits, target, valid, m, e, a, b, k, *ctx.options) if ctx.needs_input_grad[0] else None
    return gradient, None, None, None, None


log_probs_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)


def log_probs(logits: Tensor, target: Tensor, valid: Tensor, options: LogProbOptions) -> tuple[Tensor, Tensor, Tensor]:
    """``(log_probs, entropy, lse)`` per row of ``logits`` ``[N, V]`` under torch.compile (targets
    not checked: the caller makes a bad one's log-probability NaN, as for the linear form)."""
    log_p, entropy, lse, *_ = log_probs_op(logits.contiguous(), target, valid, options.temperature, options.backend)
    return log_p, entropy, lse
