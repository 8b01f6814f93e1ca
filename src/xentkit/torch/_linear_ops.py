"""The Triton linear cross-entropy as torch custom ops, so that ``torch.compile`` keeps the chunked
path (chunked matmuls around the fused kernels, no ``[N, V]`` logits) instead of tracing the whole
logits as torch ops.

Under ``torch.compile`` ``xentkit.torch.linear_cross_entropy`` on the Triton path calls
:func:`linear_cross_entropy` below instead of the eager autograd Function. Two ops, each run as
the compiler's one node, the code of the eager path (``_linear_triton.forward_chunks`` and
``backward_chunks``):

    xentkit::triton_linear_cross_entropy(input, linear_weight, linear_bias, target, weight,
                                         want_input, want_weight, want_bias, stats_rows,
                                         <options>)
        -> (loss, stats, grad_input, grad_weight, grad_bias)
        "mean"/"sum": the loss and, for an upstream gradient of 1, the gradients wanted (as the
        eager path, three matmuls per chunk in all); backward multiplies them by the upstream
        gradient (torch ops the compiler traces). "none": the loss per row and the rows'
        statistics; the gradients are empty tensors.
    xentkit::triton_linear_cross_entropy_backward(input, linear_weight, linear_bias, target,
                                                  weight, stats, grad_output, want_input,
                                                  want_weight, want_bias, <options>)
        -> (grad_input, grad_weight, grad_bias)
        "none"'s backward: each chunk's logits again, pass 2 with the per-row upstream gradient.

with <options> ``LINEAR_OP_OPTIONS``' fields of :class:`xentkit._options.LossOptions` (the
reduction, the formula's options, the chunk size and ``accumulate_in_float32``). The ``want_*``
flags come from the operands' ``requires_grad`` (known while tracing): a frozen output layer costs
no weight-gradient matmul. A gradient not wanted is an empty tensor (a custom op returns no None).
Neither op waits for the device: the labels are not checked (a label outside ``[0, V)`` that is
not ``ignore_index`` reads nothing out of bounds and makes its row NaN), and the "mean"/"sum"
gradients are scaled by the upstream gradient without looking at it. Double backward raises
nothing here but differentiates the saved gradients as constants (as torch.compile's own
``autograd.Function`` support would); use torch's loss for second derivatives.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._options import LossOptions
from . import _bridge
from ._chunks import chunk_rows, detached
from ._linear_triton import backward_chunks, forward_chunks, rows_target
from ._ops import check_stats_layout, stats_layout
from ._triton_path import FORMULA_NAMES, OpOptions

__all__ = [
    "LINEAR_OP_OPTIONS", "OPERANDS", "REDUCTION", "WANT", "empty_or", "fake_gradient", "fake_gradients",
    "linear_cross_entropy", "resolved",
]

LINEAR_OP_OPTIONS = OpOptions(("reduction", *FORMULA_NAMES, "chunk_size", "accumulate_in_float32"))
# the linear cross-entropy ops' schema pieces (these Triton ops', and _linear_numba's on the CPU)
REDUCTION = OpOptions(("reduction",))
OPERANDS = "Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor? weight"
WANT = "bool want_input, bool want_weight, bool want_bias"


def empty_or(gradient: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty((0,)) if gradient is None else gradient


def fake_gradient(wanted: bool, like: Tensor | None, placeholder: Tensor) -> Tensor:
    """A fake op's gradient of ``like``: contiguous, as the real ops return them whatever the
    operand's layout (a transposed weight's gradient is not transposed), or the empty
    placeholder when not wanted."""
    if wanted and like is not None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return placeholder.new_empty((0,))


def fake_gradients(
    want: tuple[bool, bool, bool], input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The fake ops' ``(grad_input, grad_weight, grad_bias)`` (:func:`fake_gradient` of each)."""
    return (
        fake_gradient(want[0], input, input), fake_gradient(want[1], linear_weight, input),
        fake_gradient(want[2], linear_bias, input),
    )


def resolved(options: LossOptions, x: Tensor, w: Tensor) -> LossOptions:
    """``options`` with the chunk size for these operands (resolved inside the op, from the real
    shapes: resolved while tracing it would pin the number of rows, one recompilation each)."""
    return options.replace(
        chunk_size=chunk_rows(x.shape[0], w.shape[0], x.element_size(), options.chunk_size, device_type=x.device.type)
    )


@torch.library.custom_op(
    "xentkit::triton_linear_cross_entropy", mutates_args=(),
    schema=(
        f"({OPERANDS}, {WANT}, int stats_rows, {LINEAR_OP_OPTIONS.schema}) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
)
def triton_linear_cross_entropy(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    want_input: bool, want_weight: bool, want_bias: bool, stats_rows: int, *options: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, stats, grad_input, grad_weight, grad_bias)``; see the module docstring. ``stats_rows``:
    the rows of ``stats``, written into the traced graph (``_ops.stats_layout`` says why)."""
    x, w, b = detached(input, linear_weight, linear_bias)
    loss_options = resolved(LINEAR_OP_OPTIONS.options(options), x, w)
    want = (want_input, want_weight, want_bias and b is not None)
    loss, _valid, stats, gradients = forward_chunks(x, w, b, target, weight, loss_options, want)
    check_stats_layout(stats, stats_rows)
    grad_x, grad_w, grad_b = gradients
    return (
        loss.to(_bridge.at_least_float32(x.dtype)), stats,
        empty_or(grad_x, x), empty_or(grad_w, x), empty_or(grad_b, x),
    )


@triton_linear_cross_entropy.register_fake
def _(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    want_input: bool, want_weight: bool, want_bias: bool, stats_rows: int, *options: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    (reduction,) = REDUCTION.taken_from(LINEAR_OP_OPTIONS, options)
    rows = input.shape[0]
    loss = input.new_empty((rows,) if reduction == "none" else (), dtype=_bridge.at_least_float32(input.dtype))
    stats = input.new_empty((stats_rows, rows), dtype=torch.float32)
    now = reduction != "none"
    want = (now and want_input, now and want_weight, now and want_bias)
    return (loss, stats, *fake_gradients(want, input, linear_weight, linear_bias))


@torch.library.custom_op(
    "xentkit::triton_linear_cross_entropy_backward", mutates_args=(),
    schema=(
        f"({OPERANDS}, Tensor stats, Tensor grad_output, {WANT}, {LINEAR_OP_OPTIONS.schema}) "
        "-> (Tensor, Tensor, Tensor)"
    ),
)
def triton_linear_cross_entropy_backward(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    stats: Tensor, grad_output: Tensor, want_input: bool, want_weight: bool, want_bias: bool, *options: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_input, grad_weight, grad_bias)`` of a "none" loss for the per-row ``grad_output``."""
    x, w, b = detached(input, linear_weight, linear_bias)
    want = (want_input, want_weight, want_bias and b is not None)
    grad_x, grad_w, grad_b = backward_chunks(
        x, w, b, target, weight, stats, grad_output, resolved(LINEAR_OP_OPTIONS.options(options), x, w), want
    )
    return empty_or(grad_x, x), empty_or(grad_w, x), empty_or(grad_b, x)


@triton_linear_cross_entropy_backward.register_fake
def _(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    stats: Tensor, grad_output: Tensor, want_input: bool, want_weight: bool, want_bias: bool, *options: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    return fake_gradients((want_input, want_weight, want_bias), input, linear_weight, linear_bias)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    input, linear_weight, linear_bias, target, weight, want_input, want_weight, want_bias, _stats_rows, *options = inputs
    _loss, stats, grad_x, grad_w, grad_b = output
    ctx.mark_non_differentiable(stats, grad_x, grad_w, grad_b)
    ctx.options = tuple(options)
    ctx.want = (want_input, want_weight, want_bias)
    (ctx.reduction,) = REDUCTION.taken_from(LINEAR_OP_OPTIONS, options)
    if ctx.reduction == "none":
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, stats)
    else:
        ctx.save_for_backward(grad_x, grad_w, grad_b)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, *_unused: Tensor | None) -> tuple:
    if ctx.reduction == "none":
        input, linear_weight, linear_bias, target, weight, stats = ctx.saved_tensors
        gradients = triton_linear_cross_entropy_backward(
            input, linear_weight, linear_bias, target, weight, stats, grad_loss, *ctx.want, *ctx.options
        )
    else:  # the gradients for an upstream of 1, scaled (on the device, no wait)
        gradients = tuple(
            # (the float32 upstream as it is: cast to a half gradient's dtype, 65536 would be inf)
            gradient * grad_loss if gradient.numel() else gradient
            for gradient in ctx.saved_tensors
        )
    missing = [
        name for name, wanted, needed in zip(_bridge.LINEAR_GRADIENT_NAMES, ctx.want, ctx.needs_input_grad[:3], strict=True)
        if needed and not wanted
    ]
    if missing:  # (an exported program run with an operand that did not require grad when exported)
        raise RuntimeError(
            f"linear_cross_entropy was traced without {', '.join(missing)} (its operand did not require grad "
            "then, as in a torch.export of it), and backward needs it now: export or compile it with the "
            "operands requiring grad as they will"
        )
    grads = tuple(
        gradient if wanted and needed else None
        for gradient, wanted, needed in zip(gradients, ctx.want, ctx.needs_input_grad[:3], strict=True)
    )
    return (*grads, None, None, None, None, None, None, *(None for _ in ctx.options))  # (… want_bias, stats_rows)


triton_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    options: LossOptions,
) -> Tensor:
    """``xentkit.torch.linear_cross_entropy`` on the Triton kernels under torch.compile: the same
    loss and gradients as the eager Function, without the label check (no wait for the device).
    ``options``' chunk size is the user's (the ops resolve it)."""
    grad = torch.is_grad_enabled()
    want = (
        grad and input.requires_grad, grad and linear_weight.requires_grad,
        grad and linear_bias is not None and linear_bias.requires_grad,
    )
    labels = rows_target(target, input.shape[0], linear_weight.shape[0], options.ignore_index)
    loss, *_ = triton_linear_cross_entropy(
        input, linear_weight, linear_bias, labels, None if weight is None else weight.detach(), *want,
        stats_layout(labels), *LINEAR_OP_OPTIONS.values(options),
    )
    return loss
