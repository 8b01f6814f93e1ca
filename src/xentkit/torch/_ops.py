"""The Triton cross-entropy as torch custom ops, so that ``torch.compile`` keeps the fused kernels.

Under ``torch.compile`` ``xentkit.torch.cross_entropy`` calls :func:`cross_entropy` below instead
of the eager autograd Function: the layout changes (``(N, C, d1, ..., dk)`` → ``[rows, C]``), the
"none" reshape and the dtype cast are plain torch ops that the compiler traces, and the kernels
run inside two custom ops, which it keeps as they are (one node each in the graph):

    xentkit::triton_cross_entropy(rows, target, weight, reduction, ignore_index,
                                  label_smoothing, z_loss, softcap) -> (loss, stats, factors)
        pass 1 and the reduction (:func:`xentkit.torch._triton_path.forward_rows`)
    xentkit::triton_cross_entropy_backward(rows, target, weight, stats, factors, grad_output,
                                           ignore_index, label_smoothing, z_loss, softcap) -> grad
        pass 2 (:func:`xentkit.torch._triton_path.gradient_rows`), the first op's autograd formula

The options travel as plain values (a custom op takes no dataclass), unpacked from
:class:`xentkit._options.LossOptions` by ``_triton_path.loss_arguments`` only. Each op has a fake
implementation (shapes and dtypes, for tracing) and neither waits for the device, so the graph has
no break and no host synchronization (as CUDA graphs require; capture not yet tried on a GPU).
The labels are therefore not checked: a label outside ``[0, C)`` that is not ``ignore_index``
reads nothing out of bounds and makes its row's loss and gradient NaN.

Why ``torch.library.custom_op`` and not ``triton_op`` / ``wrap_triton`` (which let inductor see
the kernels): the host functions choose block sizes and kernel variants from the shapes and
options in Python, and compose several launches with torch ops; as opaque ops they run exactly
the code of the eager path, on CUDA and under Triton's interpreter alike (``wrap_triton`` does
not trace interpreted kernels, so the CPU tests could not cover it). Inductor has nothing to fuse
into these kernels anyway: their inputs are the logits as they are.

Not supported under compile: ``inplace_backward`` (the gradient gets its own buffer) and double
backward (raises, as eager).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._options import LossOptions
from . import _triton_path

__all__ = ["cross_entropy", "triton_cross_entropy", "triton_cross_entropy_backward"]

_ARGUMENTS = "int ignore_index, float label_smoothing, float z_loss, float? softcap"


@torch.library.custom_op(
    "xentkit::triton_cross_entropy", mutates_args=(),
    schema=f"(Tensor rows, Tensor target, Tensor? weight, str reduction, {_ARGUMENTS}) -> (Tensor, Tensor, Tensor)",
)
def triton_cross_entropy(
    rows: Tensor, target: Tensor, weight: Tensor | None, reduction: str, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, stats, factors)`` of :func:`xentkit.torch._triton_path.forward_rows` for
    contiguous ``[rows, C]`` logits and ``[rows]`` int64 labels or ``[rows, C]`` probabilities."""
    loss, stats, factors = _triton_path.forward_rows(
        rows, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap
    )
    return loss, stats, factors


@triton_cross_entropy.register_fake
def _(
    rows: Tensor, target: Tensor, weight: Tensor | None, reduction: str, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    n_rows = rows.shape[0]
    loss = rows.new_empty((n_rows,) if reduction == "none" else (), dtype=torch.float32)
    # the rows' max and sum, and Σ w·q' for probability targets
    stats = rows.new_empty((3 if target.is_floating_point() else 2, n_rows), dtype=torch.float32)
    return loss, stats, rows.new_empty((2,), dtype=torch.float32)


@torch.library.custom_op(
    "xentkit::triton_cross_entropy_backward", mutates_args=(),
    schema=(
        "(Tensor rows, Tensor target, Tensor? weight, Tensor stats, Tensor factors, "
        f"Tensor grad_output, {_ARGUMENTS}) -> Tensor"
    ),
)
def triton_cross_entropy_backward(
    rows: Tensor, target: Tensor, weight: Tensor | None, stats: Tensor, factors: Tensor,
    grad_output: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float | None,
) -> Tensor:
    """The gradient with respect to ``rows`` (:func:`xentkit.torch._triton_path.gradient_rows`),
    in a new buffer of the rows' dtype."""
    return _triton_path.gradient_rows(
        rows, target, weight, stats, factors, grad_output, ignore_index, label_smoothing, z_loss,
        softcap, torch.empty_like(rows),
    )


@triton_cross_entropy_backward.register_fake
def _(
    rows: Tensor, target: Tensor, weight: Tensor | None, stats: Tensor, factors: Tensor,
    grad_output: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float | None,
) -> Tensor:
    return torch.empty_like(rows)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    rows, target, weight, _reduction, *arguments = inputs
    _loss, stats, factors = output
    ctx.mark_non_differentiable(stats, factors)
    ctx.save_for_backward(rows, target, weight, stats, factors)
    ctx.arguments = tuple(arguments)  # ignore_index, label_smoothing, z_loss, softcap


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, _grad_stats: Tensor | None,
    _grad_factors: Tensor | None,
) -> tuple[Tensor | None, ...]:
    rows, target, weight, stats, factors = ctx.saved_tensors
    gradient = None
    if ctx.needs_input_grad[0]:
        gradient = triton_cross_entropy_backward(rows, target, weight, stats, factors, grad_loss, *ctx.arguments)
    return gradient, None, None, None, None, None, None, None


triton_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def _as_rows(tensor: Tensor) -> Tensor:
    """``tensor`` as contiguous ``[rows, C]`` (class axis 1, or 0 unbatched, moved last), with
    its autograd history (the compiler traces and differentiates the layout change)."""
    if tensor.dim() == 1:
        return tensor.reshape(1, -1).contiguous()
    return tensor.movedim(1, -1).reshape(-1, tensor.shape[1]).contiguous()


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions) -> Tensor:
    """``xentkit.torch.cross_entropy`` on the Triton kernels under torch.compile: the same loss,
    gradient and layouts as the eager Function, without the label check (no wait for the
    device)."""
    options.check_fits(torch.float32, torch.finfo(torch.float32).max)  # the kernels' arithmetic
    sample_shape, probabilities = _triton_path.sample_layout(input, target)
    target = target.detach()
    rows_target = _as_rows(target) if probabilities else target.reshape(-1).long().contiguous()
    loss, _stats, _factors = triton_cross_entropy(
        _as_rows(input), rows_target, None if weight is None else weight.detach(),
        *_triton_path.loss_arguments(options),
    )
    if options.reduction == "none":
        loss = loss.reshape(sample_shape)
    return loss.to(input.dtype)
