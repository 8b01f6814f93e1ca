"""The Numba cross-entropy (and NLL, at the end) as torch custom ops, so that ``torch.compile`` on
the CPU keeps the fused kernels and their label check.

Under ``torch.compile`` ``xentkit.torch.cross_entropy`` on CPU tensors of a kernel dtype, beyond
``functional.SMALL_MAX_LOGITS`` logits, calls :func:`cross_entropy` below instead of the eager
autograd Function. (Smaller problems keep the torch ops the compiler traces, as small eager ones
run torch's kernel: the two custom ops cost ~0.1 ms a call each in dispatch, and a compiled
64 × 100 step took 0.42 ms through them against 0.13 ms for ``torch.compile`` of
``F.cross_entropy``. Their labels are checked by an op in the graph,
``_bridge.labels_checked_in_graph``: eager's ValueError too.) The compiler keeps the two ops
as they are (one node each in the graph) and runs the eager path's code inside them, on the real
tensors:

    xentkit::cross_entropy(input, target, weight, loss_dtype, check_probabilities, reduction,
                           <formula options>) -> loss
        the api's forward-only call (``xentkit.api.cross_entropy._cross_entropy``, one read of
        the logits): the loss in ``loss_dtype``
    xentkit::cross_entropy_backward(input, target, weight, grad_output, reduction,
                                    <formula options>) -> grad
        the first op's autograd formula: the same call with the upstream gradient applied in the
        kernel (one more read of the logits, one write of the gradient, into a new buffer of the
        logits' dtype), as eager computes in-place float16 gradients

Because the ops run on real tensors, the labels are checked as in eager (a label outside
``[0, C)`` that is not ``ignore_index`` is a ``ValueError`` naming it) and the
probabilities-as-logits warning is given. The loss is eager's, bit for bit; the gradient too at an
upstream gradient of 1, and within a rounding of it otherwise (eager scales a gradient kept from
forward, here the kernel applies the upstream gradient). Eager keeps that gradient, one
logits-sized buffer, between forward and backward and writes it once; here the logits are kept
(so changing them in place before backward raises autograd's version error) and the gradient is
written in backward: torch's own pattern, the buffer a compiled graph could not take over
without a copy. (Before, compiled CPU calls ran torch ops: no label check, a NaN row instead,
and 4-5 times slower than eager.)

Options travel as plain values, as for the Triton ops (``_triton_path.FORWARD_OP_OPTIONS``).
``inplace_backward`` has no effect under compile (the gradient gets its own buffer, as with the
Triton ops); double backward raises, as eager. Gradients with respect to the target or the class
weight, bfloat16 and ``backend="torch"`` keep the torch ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._options import LossOptions
from ..api.cross_entropy import _cross_entropy
from ..api.losses import _nll
from . import _bridge
from ._triton_path import FORWARD_OP_OPTIONS, OpOptions

__all__ = ["compiled_beyond_small", "cross_entropy", "nll_loss", "runs_compiled", "transforms_active"]


def runs_compiled(
    input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions, *others: Tensor | None
) -> bool:
    """Whether a call that torch.compile traces runs on these ops: CPU tensors of the kernels'
    dtypes (from metadata: the values are not there to read), no gradient for the target or the
    weight, no torch.func transform (the custom ops have no rule for ``grad``; the compiler traces
    this question, where it cannot trace ``_bridge.transforms_running``'s), not
    ``backend="torch"``. ``others``: more operands that must be strided CPU tensors (the linear
    form's weight and bias)."""
    if options.backend == "torch" or transforms_active():
        return False
    for tensor in (input, target, weight, *others):
        if tensor is not None and (tensor.device.type != "cpu" or tensor.layout is not torch.strided):
            return False
    for tensor in (input, target if target.is_floating_point() else None, weight):
        if tensor is not None and tensor.dtype not in _bridge.KERNEL_DTYPES:
            return False
    return not (torch.is_grad_enabled() and (target.requires_grad or (weight is not None and weight.requires_grad)))


transforms_active = _bridge.transforms_active
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def compiled_beyond_small(logits: int, small_max: int) -> bool:
    """Whether a compiled call of ``logits`` logits takes the custom ops (more than ``small_max``,
    ``functional.SMALL_MAX_LOGITS``; smaller ones keep the traced torch ops, faster there than the
    ops' dispatch). Under ``torch.export`` always: a size test is a guard on the batch, which an
    exported program cannot keep (a dynamic batch failed to export, or the program refused
    batches on the other side of the threshold); the ops serve every size."""
    return _exporting() or logits > small_max


_SCHEMA_OPTIONS = FORWARD_OP_OPTIONS.schema


def _fake_loss(
    input: Tensor, target: Tensor, loss_dtype: torch.dtype, reduction: str, **layout: Any
) -> Tensor:
    """The fake ops' loss: per sample for "none" (``_bridge.sample_layout``'s shape, which checks
    it), else a scalar, in ``loss_dtype``."""
    _, sample_shape, _ = _bridge.sample_layout(input, target, **layout)
    return input.new_empty(sample_shape if reduction == "none" else (), dtype=loss_dtype)



@torch.library.custom_op(
    "xentkit::cross_entropy", mutates_args=(),
    schema=(
        "(Tensor input, Tensor target, Tensor? weight, ScalarType loss_dtype, bool check_probabilities, "
        f"{_SCHEMA_OPTIONS}) -> Tensor"
    ),
)
def numba_cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None, loss_dtype: torch.dtype, check_probabilities: bool,
    *options: Any,
) -> Tensor:
    """The loss in ``loss_dtype``; ``options``: ``FORWARD_OP_OPTIONS.values(loss_options)``."""
    loss, _ = _cross_entropy(
        _bridge.as_numpy(input), _bridge.as_numpy(target), axis=_bridge.class_dim(input),
        weight=_bridge.optional_numpy(weight), options=FORWARD_OP_OPTIONS.options(options),
        check_probabilities=check_probabilities, want_grad=False, loss_dtype=_bridge.numpy_dtype(loss_dtype),
    )
    return _bridge.as_tensor(loss, loss_dtype).contiguous()  # (its own memory: the api's new array)


@numba_cross_entropy.register_fake
def _(
    input: Tensor, target: Tensor, weight: Tensor | None, loss_dtype: torch.dtype, check_probabilities: bool,
    *options: Any,
) -> Tensor:
    (reduction,) = OpOptions(("reduction",)).taken_from(FORWARD_OP_OPTIONS, options)
    return _fake_loss(input, target, loss_dtype, reduction)


@torch.library.custom_op(
    "xentkit::cross_entropy_backward", mutates_args=(),
    schema=f"(Tensor input, Tensor target, Tensor? weight, Tensor grad_output, {_SCHEMA_OPTIONS}) -> Tensor",
)
def numba_cross_entropy_backward(
    input: Tensor, target: Tensor, weight: Tensor | None, grad_output: Tensor, *options: Any
) -> Tensor:
    """The gradient with respect to ``input`` for ``grad_output``, contiguous, in the input's dtype
    (rounded once)."""
    _, gradient = _cross_entropy(
        _bridge.as_numpy(input), _bridge.as_numpy(target), axis=_bridge.class_dim(input),
        weight=_bridge.optional_numpy(weight), options=FORWARD_OP_OPTIONS.options(options),
        check_probabilities=False, want_grad=True, grad_output=_bridge.as_numpy(grad_output.detach()),
    )
    return _bridge.as_tensor(gradient, input.dtype).contiguous()


@numba_cross_entropy_backward.register_fake
def _(input: Tensor, target: Tensor, weight: Tensor | None, grad_output: Tensor, *options: Any) -> Tensor:
    return input.new_empty(input.shape)


def _recomputed_in_backward(op: Any, backward_op: Any, plain: int, options: OpOptions) -> None:
    """Register ``op``'s autograd formula: forward keeps (input, target, weight), the operands its
    ``plain`` values (dtypes, flags) follow and then ``options``' values; backward calls
    ``backward_op(input, target, weight, grad_loss, *options)``, as the eager Functions recompute
    their gradient from the saved input."""

    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
        input, target, weight, *rest = inputs
        ctx.save_for_backward(input, target, weight)
        ctx.options = tuple(rest[plain:])

    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        input, target, weight = ctx.saved_tensors
        gradient = backward_op(input, target, weight, grad_loss, *ctx.options) if ctx.needs_input_grad[0] else None
        return gradient, *(None for _ in range(2 + plain + len(options.names)))

    op.register_autograd(backward, setup_context=setup_context)


_recomputed_in_backward(numba_cross_entropy, numba_cross_entropy_backward, 2, FORWARD_OP_OPTIONS)


def cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions, check_probabilities: bool
) -> Tensor:
    """``xentkit.torch.cross_entropy`` on the Numba kernels under torch.compile: the eager
    Function's loss, gradient, label check and warning, in two custom ops the compiler keeps."""
    _bridge.sample_layout(input, target)  # (the shapes' errors as eager's, raised while tracing)
    return numba_cross_entropy(
        input, target.detach(), None if weight is None else weight.detach(),
        _bridge.loss_dtype(input, target, weight), check_probabilities, *FORWARD_OP_OPTIONS.values(options),
    )


# nll_loss: the same pair of ops around the api's NLL (forward the loss; backward the gradient
# for the upstream gradient, from the saved log-probabilities, as the eager Function computes it)

NLL_OP_OPTIONS = OpOptions(("reduction", "ignore_index"))


@torch.library.custom_op(
    "xentkit::nll_loss", mutates_args=(),
    schema=f"(Tensor input, Tensor target, Tensor? weight, ScalarType loss_dtype, {NLL_OP_OPTIONS.schema}) -> Tensor",
)
def numba_nll_loss(
    input: Tensor, target: Tensor, weight: Tensor | None, loss_dtype: torch.dtype, *options: Any
) -> Tensor:
    """The loss in ``loss_dtype``; ``options``: ``NLL_OP_OPTIONS.values(loss_options)``."""
    loss, _ = _nll(
        _bridge.as_numpy(input), _bridge.as_numpy(target), _bridge.class_dim(input), _bridge.optional_numpy(weight),
        NLL_OP_OPTIONS.options(options), want_grad=False, loss_dtype=_bridge.numpy_dtype(loss_dtype),
    )
    return _bridge.as_tensor(loss, loss_dtype).contiguous()


@numba_nll_loss.register_fake
def _(input: Tensor, target: Tensor, weight: Tensor | None, loss_dtype: torch.dtype, *options: Any) -> Tensor:
    (reduction,) = OpOptions(("reduction",)).taken_from(NLL_OP_OPTIONS, options)
    return _fake_loss(input, target, loss_dtype, reduction, name="log_probs", probabilities_allowed=False)


@torch.library.custom_op(
    "xentkit::nll_loss_backward", mutates_args=(),
    schema=f"(Tensor input, Tensor target, Tensor? weight, Tensor grad_output, {NLL_OP_OPTIONS.schema}) -> Tensor",
)
def numba_nll_loss_backward(
    input: Tensor, target: Tensor, weight: Tensor | None, grad_output: Tensor, *options: Any
) -> Tensor:
    """The gradient with respect to ``input`` for ``grad_output``, contiguous, in its dtype."""
    _, gradient = _nll(
        _bridge.as_numpy(input), _bridge.as_numpy(target), _bridge.class_dim(input), _bridge.optional_numpy(weight),
        NLL_OP_OPTIONS.options(options), want_grad=True, grad_output=_bridge.as_numpy(grad_output.detach()),
    )
    return _bridge.as_tensor(gradient, input.dtype).contiguous()


@numba_nll_loss_backward.register_fake
def _(input: Tensor, target: Tensor, weight: Tensor | None, grad_output: Tensor, *options: Any) -> Tensor:
    return input.new_empty(input.shape)


_recomputed_in_backward(numba_nll_loss, numba_nll_loss_backward, 1, NLL_OP_OPTIONS)


def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions) -> Tensor:
    """``xentkit.torch.nll_loss`` on the Numba kernels under torch.compile (labels checked)."""
    _bridge.sample_layout(input, target, "log_probs", probabilities_allowed=False)  # (eager's errors)
    return numba_nll_loss(
        input, target.detach(), None if weight is None else weight.detach(), _bridge.loss_dtype(input, target),
        *NLL_OP_OPTIONS.values(options),
    )
