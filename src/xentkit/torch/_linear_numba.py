"""The CPU linear cross-entropy: the chunked pass of ``linear_cross_entropy`` on the Numba
kernels (the algorithm: ``xentkit.torch.linear_cross_entropy``'s docstring), and the same as two
torch custom ops, so that ``torch.compile`` keeps the chunks (no ``[N, V]`` logits) and the label
check on the CPU:

    xentkit::linear_cross_entropy(input, linear_weight, linear_bias, target, weight,
                                  want_input, want_weight, want_bias, <options>)
        -> (loss, grad_input, grad_weight, grad_bias)
        "mean"/"sum": the loss and, for an upstream gradient of 1, the gradients wanted, as the
        eager Function computes them; backward multiplies them by the upstream gradient (torch
        ops the compiler traces). "none": the loss per row; the gradients are empty tensors.
    xentkit::linear_cross_entropy_backward(input, linear_weight, linear_bias, target, weight,
                                           grad_output, want_input, want_weight, want_bias,
                                           <options>) -> (grad_input, grad_weight, grad_bias)
        "none"'s backward: the chunks again with the per-row upstream gradient.

with <options> ``_linear_ops.LINEAR_OP_OPTIONS`` (as the Triton ops on CUDA, whose structure these
follow). The ops run on the real tensors: a bad label is the eager ``ValueError``. Before, a
compiled CPU call traced ``F.linear`` and torch ops: the whole logits and their gradient, and no
label check.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._labels import check_labels
from .._options import LossOptions
from ..api.cross_entropy import _cross_entropy
from ..reference.reductions import ReductionPlan
from . import _bridge
from ._chunks import (
    add_chunk_gradients,
    detached,
    finish_gradients,
    gradient_buffers,
    logit_chunks,
)
from ._linear_ops import (
    LINEAR_OP_OPTIONS,
    OPERANDS,
    REDUCTION,
    WANT,
    empty_or,
    fake_gradients,
    resolved,
)
from ._numba_ops import runs_compiled as runs_compiled_ops

__all__ = ["PassResult", "chunked_pass", "linear_cross_entropy", "reduction_plan", "runs_compiled"]


@dataclasses.dataclass
class PassResult:
    loss: float | np.ndarray  # the chunk losses' sum ("sum"), or one per row ("none")
    grad_input: Tensor | None
    grad_weight: Tensor | None
    grad_bias: Tensor | None


def chunked_pass(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    target: np.ndarray,
    class_weight: np.ndarray | None,
    options: LossOptions,
    plan: ReductionPlan,
    *,
    grad_output: float | np.ndarray | None,
    want: tuple[bool, bool, bool],
) -> PassResult:
    """One sweep over the row chunks (``options.chunk_size`` rows each, already resolved);
    gradients only when ``grad_output`` is given.

    ``plan`` is the whole batch's reduction plan; ``grad_output`` the upstream gradient: a
    scalar for "mean"/"sum", one value per row for "none". ``want`` says which of (input,
    weight, bias) gradients to compute.
    """
    rows = x.shape[0]
    classes = w.shape[0]
    chunk_rows = options.chunk_size
    want_grad = grad_output is not None and any(want)
    buffer = torch.empty((min(chunk_rows, rows), classes), dtype=x.dtype, device=x.device)
    work = work_buffer(x, chunk_rows, classes)
    # grad_x's rows are written chunk by chunk; grad_W and grad_b start at zero and add up
    grads = gradient_buffers(
        x, w, b, want if want_grad else (False, False, False), widen=options.accumulate_in_float32
    )
    loss_rows = np.empty(rows, dtype=np.float64) if options.reduction == "none" else None
    total = 0.0
    # 1. logits = x W^T (+ b), chunk by chunk into the reused buffer.
    for start, stop, x_chunk, logits in logit_chunks(x, w, b, buffer, chunk_rows):
        upstream = None
        if want_grad:
            upstream = grad_output if options.reduction != "none" else grad_output[start:stop]
        # 2. loss (and dlogits in the same fused sweep, overwriting the logits).
        with widened_chunk(logits, work, back=want_grad) as chunk:
            logits_array = chunk.numpy()
            loss, _ = _cross_entropy(
                logits_array, target[start:stop], axis=-1, weight=class_weight, options=options,
                check_probabilities=False,  # logits can look like probabilities; torch never checks
                want_grad=want_grad, grad_output=upstream, out=logits_array if want_grad else None,
                plan=plan, batch_rows=rows,  # (rows split over threads as the batch's: the same bits at any thread count)
            )
        if want_grad:
            # 3.-4. grad_x rows = dlogits W; grad_W += dlogitsᵀ x_chunk, grad_b += Σ_rows dlogits
            add_chunk_gradients(logits, x_chunk, w, grads, start, stop)
        if loss_rows is not None:
            loss_rows[start:stop] = loss
        else:
            total += float(loss)
    return PassResult(loss_rows if loss_rows is not None else total, *finish_gradients(grads, w, b))


def work_buffer(x: Tensor, chunk_rows: int, classes: int) -> Tensor | None:
    """The float32 buffer half-precision chunks are widened into (:func:`widened_chunk`), or None
    for float32/float64 ``x``, whose chunks the kernels take as they are."""
    if x.dtype not in _bridge.HALF_DTYPES:
        return None
    return torch.empty((min(chunk_rows, x.shape[0]), classes), dtype=torch.float32, device=x.device)


@contextlib.contextmanager
def widened_chunk(logits: Tensor, work: Tensor | None, *, back: bool = True) -> Iterator[Tensor]:
    """A chunk's logits as the kernels take them: themselves (float32, float64), or, with a
    ``work`` buffer (:func:`work_buffer`), widened into its first rows exactly; on leaving, what
    the kernels wrote there (the chunk's gradient) is rounded back into ``logits`` once, for the
    chunk's matmuls in the layer's dtype (``back``: only when there is a gradient). Without it a
    bfloat16 or float16 layer's whole logits went to torch's ops, which took a float32 copy:
    5 and 6 times the logits' bytes in forward and backward (a review)."""
    if work is None:
        yield logits
        return
    chunk = work[: logits.shape[0]]
    chunk.copy_(logits)
    yield chunk
    if back:
        logits.copy_(chunk)


def reduction_plan(
    target: np.ndarray, class_weight: np.ndarray | None, classes: int, options: LossOptions
) -> ReductionPlan:
    """The whole batch's plan; a label outside [0, classes) is a ValueError."""
    if target.dtype.kind == "f":
        return ReductionPlan.of_rows(options.reduction, target.shape[0])
    check_labels(target, classes, options.ignore_index, classes=f"linear_weight has {classes} rows (classes)")
    return ReductionPlan.of_targets(options.reduction, target, options.ignore_index, class_weight)[1]


def _operands(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    options: tuple[Any, ...],
) -> tuple[Tensor, Tensor, Tensor | None, np.ndarray, np.ndarray | None, LossOptions]:
    """The detached operands (``_chunks.detached``), the target and class weights as arrays, and the options
    with this call's chunk size (resolved inside the op, from the real shapes: resolved while
    tracing it would pin the number of rows, one recompilation each)."""
    x, w, b = detached(input, linear_weight, linear_bias)
    loss_options = resolved(LINEAR_OP_OPTIONS.options(options), x, w)
    return x, w, b, _bridge.as_numpy(target), _bridge.optional_numpy(weight), loss_options


@torch.library.custom_op(
    "xentkit::linear_cross_entropy", mutates_args=(),
    schema=f"({OPERANDS}, {WANT}, {LINEAR_OP_OPTIONS.schema}) -> (Tensor, Tensor, Tensor, Tensor)",
)
def numba_linear_cross_entropy(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    want_input: bool, want_weight: bool, want_bias: bool, *options: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_input, grad_weight, grad_bias)``; see the module docstring."""
    x, w, b, target_array, class_weight, loss_options = _operands(
        input, linear_weight, linear_bias, target, weight, options
    )
    plan = reduction_plan(target_array, class_weight, w.shape[0], loss_options)
    want = (want_input, want_weight, want_bias and b is not None)
    now = loss_options.reduction != "none" and any(want)
    result = chunked_pass(
        x, w, b, target_array, class_weight, loss_options, plan, grad_output=1.0 if now else None,
        want=want if now else (False, False, False),
    )
    loss = _bridge.as_tensor(np.asarray(result.loss), x.dtype).contiguous()
    return loss, empty_or(result.grad_input, x), empty_or(result.grad_weight, x), empty_or(result.grad_bias, x)


@numba_linear_cross_entropy.register_fake
def _(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    want_input: bool, want_weight: bool, want_bias: bool, *options: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    (reduction,) = REDUCTION.taken_from(LINEAR_OP_OPTIONS, options)
    loss = input.new_empty((input.shape[0],) if reduction == "none" else ())
    now = reduction != "none"
    want = (now and want_input, now and want_weight, now and want_bias)
    return (loss, *fake_gradients(want, input, linear_weight, linear_bias))


@torch.library.custom_op(
    "xentkit::linear_cross_entropy_backward", mutates_args=(),
    schema=f"({OPERANDS}, Tensor grad_output, {WANT}, {LINEAR_OP_OPTIONS.schema}) -> (Tensor, Tensor, Tensor)",
)
def numba_linear_cross_entropy_backward(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    grad_output: Tensor, want_input: bool, want_weight: bool, want_bias: bool, *options: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_input, grad_weight, grad_bias)`` for ``grad_output``: per row for a "none" loss, one
    number for "mean"/"sum" (whose gradients the first op computes when they are wanted as it
    is traced; this op when backward needs one that was not, as an exported program may)."""
    x, w, b, target_array, class_weight, loss_options = _operands(
        input, linear_weight, linear_bias, target, weight, options
    )
    plan = reduction_plan(target_array, class_weight, w.shape[0], loss_options)
    upstream = np.ascontiguousarray(_bridge.as_numpy(grad_output), dtype=np.float64).reshape(-1)
    if loss_options.reduction != "none":
        upstream = float(upstream[0])
    result = chunked_pass(
        x, w, b, target_array, class_weight, loss_options, plan, grad_output=upstream,
        want=(want_input, want_weight, want_bias and b is not None),
    )
    return empty_or(result.grad_input, x), empty_or(result.grad_weight, x), empty_or(result.grad_bias, x)


@numba_linear_cross_entropy_backward.register_fake
def _(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    grad_output: Tensor, want_input: bool, want_weight: bool, want_bias: bool, *options: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    return fake_gradients((want_input, want_weight, want_bias), input, linear_weight, linear_bias)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    input, linear_weight, linear_bias, target, weight, want_input, want_weight, want_bias, *options = inputs
    _loss, grad_x, grad_w, grad_b = output
    ctx.mark_non_differentiable(grad_x, grad_w, grad_b)
    ctx.options = tuple(options)
    ctx.want = (want_input, want_weight, want_bias)
    (ctx.reduction,) = REDUCTION.taken_from(LINEAR_OP_OPTIONS, options)
    # the operands (references: no copy) for "none", and for an operand whose gradient backward
    # needs though the graph was traced without it (an exported program, whose operands may
    # require grad when it runs and not when it was exported)
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, grad_x, grad_w, grad_b)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, *_unused: Tensor | None) -> tuple:
    input, linear_weight, linear_bias, target, weight, *kept = ctx.saved_tensors
    needed = tuple(ctx.needs_input_grad[:3])
    if ctx.reduction == "none" or any(need and not want for need, want in zip(needed, ctx.want, strict=True)):
        gradients = numba_linear_cross_entropy_backward(
            input, linear_weight, linear_bias, target, weight, grad_loss, *needed, *ctx.options
        )
        wanted = needed
    else:  # the gradients for an upstream of 1, scaled
        gradients = tuple(gradient * grad_loss if gradient.numel() else gradient for gradient in kept)
        wanted = ctx.want
    grads = tuple(
        gradient if want and need else None
        for gradient, want, need in zip(gradients, wanted, needed, strict=True)
    )
    return (*grads, None, None, None, None, None, *(None for _ in ctx.options))


numba_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def runs_compiled(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    options: LossOptions,
) -> bool:
    """Whether a call that torch.compile traces runs on these ops: ``_numba_ops.runs_compiled``'s
    rule for every operand, with float32/float64 operands and a 2-D ``linear_weight``."""
    return (
        input.dtype in _bridge.NUMBA_DTYPES and linear_weight.dim() == 2
        and runs_compiled_ops(input, target, weight, options, linear_weight, linear_bias)
    )


def linear_cross_entropy(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    options: LossOptions,
) -> Tensor:
    """``xentkit.torch.linear_cross_entropy`` on the Numba kernels under torch.compile (2-D
    ``input``; the caller adds the batch of an unbatched one): the eager Function's loss,
    gradients and label check, in two custom ops the compiler keeps. ``options``' chunk size is
    the user's (the ops resolve it)."""
    grad = torch.is_grad_enabled()
    want = (
        grad and input.requires_grad, grad and linear_weight.requires_grad,
        grad and linear_bias is not None and linear_bias.requires_grad,
    )
    loss, *_ = numba_linear_cross_entropy(
        input, linear_weight, linear_bias, target.detach(), None if weight is None else weight.detach(), *want,
        *LINEAR_OP_OPTIONS.values(options),
    )
    return loss
