"""The Triton cross-entropy as torch custom ops, so that ``torch.compile`` keeps the fused kernels.

Under ``torch.compile`` ``xentkit.torch.cross_entropy`` calls :func:`cross_entropy` below instead
of the eager autograd Function: the layout changes (``(N, C, d1, ..., dk)`` → ``[rows, C]``), the
"none" reshape and the dtype cast are plain torch ops that the compiler traces, and the kernels
run inside two custom ops, which it keeps as they are (one node each in the graph):

    xentkit::triton_cross_entropy(rows, target, weight, loss_dtype, stats_rows, reduction,
                                  <formula options>) -> (loss, stats, factors)
        pass 1, the rows' losses and the epilogue kernel (the reduction and the upstream
        gradient's factors: :func:`xentkit.torch._triton_path.forward_rows`); ``stats_rows`` the
        rows of ``stats``, passed in so that the traced graph holds it (:func:`stats_layout`)
    xentkit::triton_cross_entropy_backward(rows, target, weight, stats, factors, grad_output,
                                           <formula options>) -> grad
        pass 2 (:func:`xentkit.torch._triton_path.gradient_rows`), the first op's autograd formula

with <formula options> the fields of ``LossOptions.formula_arguments()`` (today ``ignore_index,
label_smoothing, z_loss, softcap``). The options travel as plain values (a custom op takes no
dataclass): ``_triton_path.FORWARD_OP_OPTIONS`` / ``BACKWARD_OP_OPTIONS`` write the schema from
:class:`xentkit._options.LossOptions`' fields, unpack an options object into the values and
rebuild it inside the op, so a new formula option needs no edit here. Each op has a fake
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

from typing import Any

import torch
from torch import Tensor

from .._options import LossOptions
from ..triton import stats_rows
from . import _bridge, _triton_path
from ._triton_path import BACKWARD_OP_OPTIONS, FORWARD_OP_OPTIONS, OpOptions

__all__ = ["cross_entropy", "triton_cross_entropy", "triton_cross_entropy_backward"]


def stats_layout(target: Tensor) -> int:
    """The rows of the kernels' per-row statistics for ``target`` (labels or probabilities), as a
    forward op's ``stats_rows`` argument. It is an argument, not computed inside the fake, so
    that it is written into the traced graph: torch 2.13's compiled-graph cache keys on the
    graph, not on a custom op's fake output shapes (pytorch/pytorch#160472), and would otherwise
    reload, after an upgrade of xentkit that changed the layout, code that asserts the old
    shape."""
    return stats_rows(target.is_floating_point())


def check_stats_layout(stats: Tensor, expected: int) -> None:
    """An op's statistics against the ``stats_rows`` its caller passed (a caller of another
    layout than the kernels', which no public path is)."""
    if stats.shape[0] != expected:
        raise RuntimeError(f"the Triton kernels return {stats.shape[0]} rows of statistics, the op was told {expected}")


@torch.library.custom_op(
    "xentkit::triton_cross_entropy", mutates_args=(),
    schema=(
        f"(Tensor rows, Tensor target, Tensor? weight, ScalarType loss_dtype, int stats_rows, "
        f"{FORWARD_OP_OPTIONS.schema}) "
        "-> (Tensor, Tensor, Tensor)"
    ),
)
def triton_cross_entropy(
    rows: Tensor, target: Tensor, weight: Tensor | None, loss_dtype: torch.dtype, stats_rows: int, *options: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, stats, factors)`` of :func:`xentkit.torch._triton_path.forward_rows` for
    contiguous ``[rows, C]`` logits and ``[rows]`` int64 labels or ``[rows, C]`` probabilities,
    the loss in ``loss_dtype`` (rounded there once, as in eager); ``stats_rows``: the rows of
    ``stats`` (:func:`xentkit.triton.stats_rows`, see :func:`stats_layout`); ``options``:
    ``FORWARD_OP_OPTIONS.values(loss_options)``."""
    loss, stats, factors, _bad = _triton_path.forward_rows(
        rows, target, weight, FORWARD_OP_OPTIONS.options(options), dtype=loss_dtype
    )
    check_stats_layout(stats, stats_rows)
    return loss, stats, factors


@triton_cross_entropy.register_fake
def _(
    rows: Tensor, target: Tensor, weight: Tensor | None, loss_dtype: torch.dtype, stats_rows: int, *options: Any
) -> tuple[Tensor, Tensor, Tensor]:
    n_rows = rows.shape[0]
    (reduction,) = OpOptions(("reduction",)).taken_from(FORWARD_OP_OPTIONS, options)
    loss = rows.new_empty((n_rows,) if reduction == "none" else (), dtype=loss_dtype)
    # the rows' max and excess, and Σ w·q' in two parts for probability targets
    stats = rows.new_empty((stats_rows, n_rows), dtype=torch.float32)
    return loss, stats, rows.new_empty((2,), dtype=torch.float32)


@torch.library.custom_op(
    "xentkit::triton_cross_entropy_backward", mutates_args=(),
    schema=(
        "(Tensor rows, Tensor target, Tensor? weight, Tensor stats, Tensor factors, "
        f"Tensor grad_output, {BACKWARD_OP_OPTIONS.schema}) -> Tensor"
    ),
)
def triton_cross_entropy_backward(
    rows: Tensor, target: Tensor, weight: Tensor | None, stats: Tensor, factors: Tensor,
    grad_output: Tensor, *options: Any,
) -> Tensor:
    """The gradient with respect to ``rows`` (:func:`xentkit.torch._triton_path.gradient_rows`),
    in a new buffer of the rows' dtype; ``options``: ``BACKWARD_OP_OPTIONS.values(loss_options)``."""
    return _triton_path.gradient_rows(
        rows, target, weight, stats, factors, grad_output, BACKWARD_OP_OPTIONS.options(options),
        torch.empty_like(rows),
    )


@triton_cross_entropy_backward.register_fake
def _(
    rows: Tensor, target: Tensor, weight: Tensor | None, stats: Tensor, factors: Tensor,
    grad_output: Tensor, *options: Any,
) -> Tensor:
    return torch.empty_like(rows)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    rows, target, weight, _loss_dtype, _stats_rows, *options = inputs
    _loss, stats, factors = output
    ctx.mark_non_differentiable(stats, factors)
    ctx.save_for_backward(rows, target, weight, stats, factors)
    ctx.options = BACKWARD_OP_OPTIONS.taken_from(FORWARD_OP_OPTIONS, options)


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, _grad_stats: Tensor | None,
    _grad_factors: Tensor | None,
) -> tuple[Tensor | None, ...]:
    rows, target, weight, stats, factors = ctx.saved_tensors
    gradient = None
    if ctx.needs_input_grad[0]:
        gradient = triton_cross_entropy_backward(rows, target, weight, stats, factors, grad_loss, *ctx.options)
    return gradient, None, None, None, None, *(None for _ in FORWARD_OP_OPTIONS.names)


triton_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions) -> Tensor:
    """``xentkit.torch.cross_entropy`` on the Triton kernels under torch.compile: the same loss,
    gradient and layouts as the eager Function (the same prologue and epilogue), without the label
    check (no wait for the device)."""
    rows_target, sample_shape, _probabilities = _triton_path.rows_inputs(input, target, weight, options)
    loss_dtype = _bridge.loss_dtype(input, target, weight)
    loss, _stats, _factors = triton_cross_entropy(
        _triton_path.as_rows(input), rows_target, None if weight is None else weight.detach(), loss_dtype,
        stats_layout(rows_target), *FORWARD_OP_OPTIONS.values(options),
    )
    return _triton_path.loss_in_layout(loss, sample_shape, options, loss_dtype)
