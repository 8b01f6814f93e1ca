"""Drop-in replacements for ``torch.nn.functional.cross_entropy``, ``nll_loss`` and
``binary_cross_entropy_with_logits`` that run xentkit's fused NumPy api on CPU tensors.

How it works: an ``autograd.Function`` views the (contiguous, detached) CPU tensors as NumPy arrays
without copying and calls ``xentkit.cross_entropy_and_grad`` (and siblings), which computes the
loss and ∂loss/∂logits in one fused pass. The gradient is kept for backward, which only scales it
by the upstream gradient. The input's memory is not written to (unless ``inplace_backward=True``
asks for the gradient over the logits, a write autograd's version counter records), so autograd's
version counters stay truthful (unlike an in-place gradient that autograd cannot see, a known bug
of fused kernels elsewhere). CUDA tensors run xentkit's Triton kernels (``xentkit.triton``).
Everything else the NumPy api does not cover runs on plain torch ops instead: other devices,
bfloat16 ``nll_loss`` on the CPU (bfloat16 ``cross_entropy`` operands beyond ``SMALL_MAX_LOGITS``
logits and ``binary_cross_entropy_with_logits`` ones are widened to float32 for the kernels), functorch transforms and ``torch.compile`` on the
CPU, and gradients with respect to a
probability target or a class weight (with class indices too, where torch's ``cross_entropy`` and
``nll_loss`` cannot differentiate the weight and raise). Small CPU problems of
``cross_entropy`` and ``nll_loss`` (up to ``SMALL_MAX_LOGITS`` logits) run torch's own kernel
with xentkit's semantics around it (``_small_and_plain``): there the Function's fixed cost would
be most of the time.

Two deliberate differences from torch:

- A "mean" with nothing to average (every target equal to ``ignore_index``, or class weights that
  sum to 0 over the targets) is 0 with gradient 0 here; torch returns NaN.
- Second-order gradients (``create_graph=True`` then differentiating again) raise a RuntimeError:
  the gradient is computed outside autograd, and differentiating it raises.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .._labels import check_labels
from .._options import (
    Integer,
    LossOptions,
    Real,
    check_factor_kind,
    check_flag,
    fields_with,
    loss_options,
)
from ..api._validation import check_broadcasts_to
from ..api.cross_entropy import _cross_entropy, warn_if_probabilities
from ..api.losses import _bce_with_logits, _nll
from ..reference.reductions import ReductionPlan
from . import _bridge, _numba_ops, _ops, _torch_ops, _triton_path

__all__ = ["binary_cross_entropy_with_logits", "cross_entropy", "nll_loss"]


def _upstream_for(grad_output: Tensor, reduction: str, class_axis: int, input_dim: int) -> Tensor:
    """The upstream gradient shaped to broadcast against the logits' gradient."""
    if reduction == "none" and input_dim >= 2:
        return grad_output.unsqueeze(class_axis)
    return grad_output


class _CrossEntropyFunction(torch.autograd.Function):
    """Softmax cross-entropy with its gradient computed in the forward pass.

    forward: one fused call ``xentkit.cross_entropy_and_grad`` gives the loss and the gradient of
    the loss with upstream gradient 1 ("mean"/"sum") or ones ("none": row i's gradient is that of
    its own loss, since rows do not interact). backward: gradient · grad_output, with grad_output
    broadcast over the class axis for "none". Storing the unscaled per-row gradient costs one
    logits-sized buffer, what torch's own cross_entropy keeps (its log-softmax output), and avoids
    recomputing the softmax. (``inplace_backward=True`` on float16 logits: forward gives the loss
    alone and backward the gradient with grad_output applied, written over the logits; see
    :func:`_deferred_gradient`.)
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        target: Tensor,
        weight: Tensor | None,
        options: LossOptions,
        check_probabilities: bool,
        grad_enabled: bool,
    ) -> Tensor:
        _bridge.first_order_anchors(ctx, input)
        ctx.reduction = options.reduction
        ctx.class_axis = _bridge.class_dim(input)
        ctx.input_dim = input.dim()
        want_grad = grad_enabled and ctx.needs_input_grad[0]
        logits = _bridge.as_numpy_by_classes(input, ctx.class_axis)
        # in place: the gradient is written over the logits' own memory (a contiguous input)
        in_place = want_grad and options.inplace_backward and input.is_contiguous() and not input.is_neg()
        result_dtype = _bridge.loss_dtype(input, target, weight)
        # a float16 input's gradient is kept in float32 until backward has scaled it
        # (_bridge.kept_gradient_dtype). In place, where no float32 gradient may wait for backward,
        # backward computes it with the upstream gradient applied (a second pass over the logits),
        # rounded once into them.
        kept = _bridge.kept_gradient_dtype(input.dtype)
        ctx.deferred = in_place and kept != input.dtype
        ctx.input_dtype = input.dtype
        loss, gradient = _cross_entropy(
            logits, _bridge.as_numpy(target), axis=ctx.class_axis,
            weight=_bridge.optional_numpy(weight), options=options,
            # warn when the logits look like probabilities (softmax applied twice)
            check_probabilities=check_probabilities, want_grad=want_grad and not ctx.deferred,
            out=logits if in_place and not ctx.deferred else None, loss_dtype=_bridge.numpy_dtype(result_dtype),
            grad_dtype=None if in_place else _bridge.numpy_dtype(kept),
        )
        if in_place:
            # the logits changed (or will, in backward): a node that saved them now raises torch's
            # version error
            torch.autograd.graph.increment_version(input)
            kept_gradient = input.detach()
        else:
            kept_gradient = None if gradient is None else _bridge.as_tensor(gradient, kept)
        ctx.options = options
        # the target and the class weights are read only for a non-finite upstream gradient
        # (references, not copies), and by the deferred gradient
        _bridge.keep_for_backward(
            ctx, {"gradient": kept_gradient}, target if want_grad else None, weight if want_grad else None
        )
        return _bridge.as_tensor(loss, result_dtype)

    @staticmethod
    @_bridge.first_order_only("cross_entropy")
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (target, weight), kept = _bridge.kept_for_backward(ctx)
        gradient, owned = _bridge.take_saved_gradient(kept, "gradient")
        upstream = _upstream_for(grad_output, ctx.reduction, ctx.class_axis, ctx.input_dim)
        if _bridge.batched_backward(grad_output):  # (is_grads_batched: the product, out of place)
            if ctx.deferred:  # the gradient at upstream ones, into a new tensor (the logits stay)
                ones = torch.ones(tuple(grad_output.shape), dtype=grad_output.dtype, device="cpu")
                gradient = _deferred_gradient(ctx, gradient, False, ones, target, weight)
            return _bridge.batched_product(gradient, upstream).to(ctx.input_dtype), None, None, None, None, None
        if ctx.deferred:
            return _deferred_gradient(ctx, gradient, owned, grad_output, target, weight), None, None, None, None, None
        gradient = _bridge.scale_gradient(gradient, upstream, owned)
        if not _bridge.all_finite(grad_output):
            _in_torchs_order(gradient, grad_output, target, weight, ctx.options, ctx.class_axis)
        return gradient.to(ctx.input_dtype), None, None, None, None, None  # (rounded once, scaled)


def _deferred_gradient(
    ctx: FunctionCtx, logits: Tensor, owned: bool, grad_output: Tensor, target: Tensor, weight: Tensor | None
) -> Tensor:
    """The gradient of in-place float16 logits, computed in backward with ``grad_output`` applied
    in float32 and rounded once into the logits (or, when the graph is kept, into a new tensor):
    the values of ``inplace_backward=False``, bit for bit at an upstream gradient of 1; at other
    upstream gradients an entry may differ by one float16 rounding (applied here inside the
    kernel, there to the float32 gradient afterwards)."""
    array = _bridge.as_numpy(logits)
    _, gradient = _cross_entropy(
        array, _bridge.as_numpy(target), axis=ctx.class_axis, weight=_bridge.optional_numpy(weight),
        options=ctx.options, check_probabilities=False, want_grad=True,
        grad_output=_bridge.as_numpy(grad_output.detach()), out=array if owned else None,
    )
    return logits if owned else _bridge.as_tensor(gradient, logits.dtype)


def _in_torchs_order(
    gradient: Tensor, grad_output: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions,
    class_axis: int,
) -> None:
    """Turn ``stored gradient · g`` into the kernel's (and torch's) values where the upstream
    gradient g is ±inf or NaN (in place). Torch multiplies each term by g before adding them:
    an ignored row stays 0 (not 0·∞); with class indices the target entry is g·p_y·A − g·w_y =
    ∞ − ∞ = NaN, and with label smoothing so is every entry of the row; with probabilities torch
    first forms g·w_j·q'_j (NaN where q'_j = 0) and then subtracts p_j times their sum (±∞), so
    the whole row is NaN. A "mean" of nothing (its class weights summing to 0 over the targets)
    has gradient 0 at any g, as on the kernels (where g/0 is taken as 0), but for a z-loss's own
    term. (With a z-loss the z term's
    sign may differ from torch-order arithmetic; torch has no z-loss to match.)"""
    if options.reduction == "mean" and not target.is_floating_point():
        labels = target.long()
        _, plan = ReductionPlan.of_targets("mean", labels, options.ignore_index, weight, dtype=torch.float64)
        if float(plan.denominator) == 0.0:  # (the main term's scale is 0: no NaN of ∞ − ∞)
            if not options.z_loss:
                gradient.zero_()
                return
            gradient.movedim(class_axis, -1)[labels == options.ignore_index] = 0.0
            return
    rows = gradient.movedim(class_axis, -1)  # a view: the samples' shape, then the classes
    if rows.dim() == 1:
        rows = rows.unsqueeze(0)  # one sample, (C,)
    samples = rows.shape[:-1]
    upstream_bad = ~torch.isfinite(grad_output)
    if options.reduction == "none":
        upstream_bad = upstream_bad.reshape(samples)
    else:
        upstream_bad = upstream_bad.reshape(()).expand(samples)
    if target.is_floating_point():  # g·w_j·q'_j then the softmax's Σ: NaN across the row
        rows[upstream_bad] = torch.nan
        return
    labels = target.long().reshape(samples)
    ignored = labels == options.ignore_index
    live = upstream_bad & ~ignored
    rows[ignored] = 0.0
    if options.label_smoothing > 0:
        rows[live] = torch.nan
    else:
        where = live.nonzero(as_tuple=True)
        rows[(*where, labels[where])] = torch.nan


class _NllLossFunction(torch.autograd.Function):
    """Negative log-likelihood of log-probabilities.

    The gradient −w_y·onehot(y)·grad_output does not depend on the input's values and is as large
    as the input, so it is not stored: backward calls ``xentkit.nll_loss_and_grad`` with the
    upstream gradient. The input is saved for that call (as torch's nll_loss saves it), so an
    in-place change of the input after forward makes backward raise torch's version error.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions
    ) -> Tensor:
        _bridge.first_order_anchors(ctx, input)
        ctx.options = options
        ctx.save_for_backward(input, target, weight)
        result_dtype = _bridge.loss_dtype(input, target)
        loss, _ = _nll(
            _bridge.as_numpy(input), _bridge.as_numpy(target), _bridge.class_dim(input),
            _bridge.optional_numpy(weight), options, want_grad=False,
            loss_dtype=_bridge.numpy_dtype(result_dtype),
        )
        return _bridge.as_tensor(loss, result_dtype)

    @staticmethod
    @_bridge.first_order_only("nll_loss")
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, target, weight = ctx.saved_tensors
        # a batched upstream (is_grads_batched): the gradient at upstream ones (it is linear in
        # the upstream gradient), times the batch out of place
        batched = _bridge.batched_backward(grad_output)
        _, gradient = _nll(
            _bridge.as_numpy(input), _bridge.as_numpy(target), _bridge.class_dim(input),
            _bridge.optional_numpy(weight), ctx.options, want_grad=True,
            grad_output=np.ones(tuple(grad_output.shape)) if batched else _bridge.as_numpy(grad_output),
        )
        gradient = _bridge.as_tensor(gradient, input.dtype)
        if batched:
            upstream = _upstream_for(grad_output, ctx.options.reduction, _bridge.class_dim(input), input.dim())
            gradient = _bridge.batched_product(gradient, upstream)
        return gradient, None, None, None


class _BinaryCrossEntropyWithLogitsFunction(torch.autograd.Function):
    """Sigmoid binary cross-entropy with its gradient computed in the forward pass.

    The loss is elementwise, so for "none" the gradient with upstream ones is exact per element
    and backward multiplies it by grad_output elementwise; for "mean"/"sum" by the scalar.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        target: Tensor,
        weight: Tensor | None,
        reduction: str,
        pos_weight: Tensor | None,
        grad_enabled: bool,
    ) -> Tensor:
        _bridge.first_order_anchors(ctx, input)
        result_dtype = _bridge.binary_loss_dtype(input, target)
        want_grad = grad_enabled and ctx.needs_input_grad[0]
        kept = _bridge.kept_gradient_dtype(input.dtype)  # (float32 for float16, until scaled)
        ctx.input_dtype = input.dtype
        loss, gradient = _bce_with_logits(
            _bridge.as_numpy(input), _bridge.as_numpy(target), _bridge.optional_numpy(weight),
            _bridge.optional_numpy(pos_weight), reduction, want_grad,
            loss_dtype=_bridge.numpy_dtype(result_dtype), grad_dtype=_bridge.numpy_dtype(kept),
        )
        _bridge.keep_for_backward(ctx, {"gradient": _bridge.as_tensor(gradient, kept) if want_grad else None})
        loss = _bridge.as_tensor(loss, result_dtype)
        if reduction == "none" and not target.is_contiguous() and target.shape == loss.shape:
            # torch's result has the target's layout (channels_last, a transpose; its formula's
            # first operand), whatever the logits'; the kernel's is row-major
            shaped = torch.empty_like(target, dtype=loss.dtype)
            if shaped.stride() != loss.stride():
                loss = shaped.copy_(loss)
        return loss

    @staticmethod
    @_bridge.first_order_only("binary_cross_entropy_with_logits")
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        _, kept = _bridge.kept_for_backward(ctx)
        gradient, owned = _bridge.take_saved_gradient(kept, "gradient")
        # (rounded once, scaled)
        return (_bridge.scale_gradient(gradient, grad_output, owned).to(ctx.input_dtype), *[None] * 5)


# Up to this many logits, problems on plain CPU tensors without xentkit's extras run torch's own
# kernel: there the fixed cost of an autograd.Function and of the bridge to NumPy (~100 µs) would
# be most of the time (benchmarks/bench_small.py), and the fused kernel has nothing to win.
SMALL_MAX_LOGITS = 1 << 16
_SMALL_DTYPES = (torch.float32, torch.float64)


_PLAIN_TENSOR_TYPES = _bridge.PLAIN_TENSOR_TYPES
_INT64, _STRIDED = torch.int64, torch.strided
# torch's cross-entropy itself, as ``F.cross_entropy`` calls it (its Python wrapper maps the
# reduction to this enum and hands the call to __torch_function__ overrides): ~1 µs less per
# small call. Not while a TorchFunctionMode runs: a mode expects to see F.cross_entropy itself.
# The enum is torch's ``_Reduction.get_enum``.
_TORCH_CROSS_ENTROPY = getattr(torch._C._nn, "cross_entropy_loss", None)
_MODE_ENABLED = getattr(torch._C, "_is_torch_function_mode_enabled", None)
if _MODE_ENABLED is None:  # (a torch without either: always the Python function)
    _TORCH_CROSS_ENTROPY = None
_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}


def _small_and_plain(
    input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions, probabilities: bool = True
) -> bool:
    """Whether torch's own cross-entropy computes this call (after the label check, and but for
    the non-finite cases :func:`_small_cross_entropy` looks at again): a small float32/float64
    plain CPU tensor (no subclass, eager, no torch.func transform running) of torch's layouts
    (``[N, C]`` or ``[N, C, d1, ..., dk]``), int64 class indices or probabilities of the logits'
    shape and dtype, class weights (if any) of the logits' dtype and shape ``[C]``, neither
    requiring grad, and none of xentkit's extras (``probabilities=False``: class indices only,
    for ``nll_loss``). The cheapest tests first and as few of the
    tensors' properties as can tell: inside a training step each costs a few times its isolated
    ~0.1 µs (benchmarks/bench_small.py)."""
    if not (
        options.backend == "auto" and not options.z_loss and options.softcap is None
        and not options.inplace_backward
        and type(input) in _PLAIN_TENSOR_TYPES and type(target) in _PLAIN_TENSOR_TYPES
        # (before the size: a size test traced by torch.compile or export would be a guard, and a
        # dynamic batch would be bounded by it)
        and not torch.compiler.is_compiling()
        and (0 < input.numel() <= SMALL_MAX_LOGITS or _empty_batch(input)) and input.dtype in _SMALL_DTYPES
        and input.is_cpu and target.is_cpu and input.layout is _STRIDED and target.layout is _STRIDED
    ):
        return False
    dims = input.ndim
    if target.dtype is _INT64:  # class indices: [N] or [N, d1, ..., dk], or one sample's 0-d label
        if not (
            dims >= 2 and target.ndim == dims - 1 and target.shape[0] == input.shape[0]
            and (dims == 2 or target.shape[1:] == input.shape[2:])  # (else the api's error)
        ) and not (dims == 1 and target.ndim == 0):
            return False
    elif not (  # probabilities: the logits' shape and dtype, not differentiated (not a scalar:
        # the api's error names it)
        probabilities and dims >= 1 and target.dtype is input.dtype and target.shape == input.shape
        and not target.requires_grad
    ):
        return False
    if weight is not None and not (
        type(weight) in _PLAIN_TENSOR_TYPES and weight.dtype is input.dtype and weight.ndim == 1
        and weight.shape[0] == input.shape[dims > 1] and weight.is_cpu and weight.layout is _STRIDED
        and not weight.requires_grad
    ):
        return False
    return not _bridge.transforms_running(input, target, weight)


def _empty_batch(input: Tensor) -> bool:
    """No sample (N = 0, or a spatial size 0) but classes: torch's kernel, with its second
    derivative (the kernels have none; a review). No class at all is the api's error."""
    return input.numel() == 0 and input.ndim >= 2 and input.shape[1] > 0


def _mean_of_probabilities_possible(mean: float, classes: int) -> bool:
    """Whether a "mean" cross-entropy of class indices could come from logits that are
    probabilities. For a row p on the simplex (C classes) log Σ_j exp(p_j) lies
    in [log C + 1/C, log(C − 1 + e)] (Jensen; exp is convex, so its sum peaks at a vertex), and
    the row's loss is that minus a weighted mean of p in [0, 1], with or without label smoothing:
    so does a mean of such rows, and a weighted one for class weights ≥ 0 without label smoothing
    (not so with negative weights or, with label smoothing, weights on every class, nor with
    probability targets, which need not sum to 1). Outside
    (a model that has learned something, or far from uniform) the logits cannot be probabilities
    and need no look. A margin covers the probability check's own tolerance."""
    bounds = _PROBABILITY_MEANS.get(classes)
    if bounds is None:  # once per class count: two logarithms cost microseconds small calls notice
        margin = 0.05
        bounds = (math.log(classes) + 1.0 / classes - 1.0 - margin, math.log(classes - 1 + math.e) + margin)
        if len(_PROBABILITY_MEANS) < 4096:
            _PROBABILITY_MEANS[classes] = bounds
    return bounds[0] <= mean <= bounds[1]


_PROBABILITY_MEANS: dict[int, tuple[float, float]] = {}  # classes -> (low, high) of that range


def _small_cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions, check_probabilities: bool
) -> Tensor:
    """A small problem on torch's own kernel, with xentkit's semantics around it: the same label
    error, the same probabilities warning, a "mean" of nothing (every target ignored, or class
    weights summing to 0 over the targets) that is 0 with gradient 0, and 0·log 0 = 0 for a
    probability target of 0 on a class whose logit is −inf (torch: NaN; a NaN loss of
    probabilities runs again on xentkit's own path, which decides). As on the torch-ops path, an
    ignored sample's gradient is torch's (NaN for a NaN, +inf or all −inf row; xentkit's kernels
    give 0): a look at every logit would cost more than the rest of this path.

    Nothing is looked at twice on the way: torch's kernel refuses a bad label itself (an
    IndexError, turned into xentkit's ValueError naming the label and its place), only a
    non-finite "mean" of class indices and a NaN loss of probabilities are looked at again, and
    for "mean" of class indices without weights the logits are looked at for probabilities only
    when the loss says they could be (in a training loop every Python step between torch's ops
    costs several times its isolated time)."""
    probabilities = target.dtype is not _INT64
    axis = _bridge.class_dim(input)
    ignore_index = -100 if probabilities else options.ignore_index  # (torch refuses another one)
    try:
        if _TORCH_CROSS_ENTROPY is not None and not _MODE_ENABLED():
            loss = _TORCH_CROSS_ENTROPY(
                input, target, weight, _REDUCTION_ENUM[options.reduction], ignore_index,
                options.label_smoothing,
            )
        else:  # (a TorchFunctionMode running, or a torch without the binding)
            loss = F.cross_entropy(
                input, target, weight, ignore_index=ignore_index, reduction=options.reduction,
                label_smoothing=options.label_smoothing,
            )
    except IndexError:  # (a bad label, refused before any warning, as on the kernel path)
        _label_error_instead(target, input.shape[axis], options.ignore_index)
        raise
    if options.reduction == "mean" and input.numel() == 0:  # torch's NaN: a mean of nothing is 0
        return _zero_with_zero_gradient(input)
    # a NaN maybe 0·log 0 at a −inf logit (a probability target of 0, or a class of weight 0):
    # xentkit's path decides; class weights with class indices on torch ops, which keep torch's
    # second derivative (the kernels have none)
    if (probabilities or weight is not None) and _holds_nan(loss, options.reduction):
        if probabilities:
            return _cross_entropy_beyond_small(input, target, weight, options, check_probabilities)
        if check_probabilities:
            warn_if_probabilities(_bridge.as_numpy(input), axis)
        return _torch_ops.cross_entropy(input, target, weight, options)
    if probabilities:
        if check_probabilities:
            warn_if_probabilities(_bridge.as_numpy(input), axis)
        return loss
    if options.reduction != "mean":
        if check_probabilities:
            warn_if_probabilities(_bridge.as_numpy(input), axis)
        return loss
    value = loss.item()
    if _nothing_to_average(value, target, weight, options.ignore_index):
        if check_probabilities:
            warn_if_probabilities(_bridge.as_numpy(input), axis)
        return _zero_with_zero_gradient(input)
    if check_probabilities and (
        not -math.inf < value < math.inf  # (an infinite class weight, a NaN logit: it tells nothing)
        or _mean_of_probabilities_possible(value, int(input.shape[axis]))  # (traced: a 0-d tensor)
        or not (weight is None or (not options.label_smoothing and _nonnegative(weight)))
    ):
        warn_if_probabilities(_bridge.as_numpy(input), axis)
    return loss


def _holds_nan(loss: Tensor, reduction: str) -> bool:
    """Whether torch's small-problem loss holds a NaN (one look: per row for "none", the scalar's
    ``.item()`` otherwise)."""
    return bool(loss.isnan().any()) if reduction == "none" else math.isnan(loss.item())


def _label_error_instead(target: Tensor, classes: int, ignore_index: int, holder: str | None = None) -> None:
    """While torch's kernel's IndexError for a bad label is handled: xentkit's ValueError naming
    the first bad label and its place (``check_labels``; ``holder`` says what holds the classes),
    without torch's error as its context."""
    try:
        check_labels(target, classes, ignore_index, classes=holder)
    except ValueError as error:
        raise error from None


def _nothing_to_average(mean: float, target: Tensor, weight: Tensor | None, ignore_index: int) -> bool:
    """Whether torch's "mean" ``mean`` of class indices is its x/0 (NaN or ±inf: every target
    ignored, or class weights summing to 0 over the targets), which xentkit makes 0 (the reduction
    plan's denominator, looked at only for a non-finite mean)."""
    if -math.inf < mean < math.inf:
        return False
    _, plan = ReductionPlan.of_targets("mean", target, ignore_index, weight, dtype=torch.float64)
    return not bool(plan.denominator)


def _zero_with_zero_gradient(input: Tensor) -> Tensor:
    """0 with gradient 0 whatever ``input`` holds (``input·0`` would be NaN at ±inf), a gradient
    that is itself a function of ``input`` (0 again), as torch's, so that a penalty on it can be
    differentiated (``create_graph=True``; a masked fill had given a constant, which cannot)."""
    zero = torch.where(torch.zeros_like(input, dtype=torch.bool), input, 0.0)
    return (zero * zero).sum()


def _nonnegative(weight: Tensor) -> bool:
    """Whether every class weight is ≥ 0 (then a weighted "mean" without label smoothing is an
    average of the rows' losses, and :func:`_mean_of_probabilities_possible` holds for it),
    remembered for the last weight tensor seen until it changes (its version counter, or its
    memory: ``weight.data = ...`` gives it other memory without a version): a module's weight is
    the same tensor every step, and a look at it costs a training step ~10 µs. A write that
    neither sees (through a NumPy view of the weight, which autograd does not see either) is not
    seen here: weights made negative that way may then miss the probabilities warning until the
    weight changes otherwise; no value depends on this."""
    global _LAST_WEIGHT
    last = _LAST_WEIGHT  # (one tuple, replaced whole: another thread reads one weight's entry)
    inference = weight.is_inference()  # (inference tensors have no version counter)
    if (
        last is not None and last[0]() is weight and not inference and last[1] == weight._version
        and last[2] == weight.data_ptr()
    ):
        return last[3]
    result = bool((weight >= 0).all())
    if not inference:
        _LAST_WEIGHT = (weakref.ref(weight), weight._version, weight.data_ptr(), result)
    return result


# the last weight seen: (a weak reference to it, its version, its memory's address, whether every
# value is ≥ 0)
_LAST_WEIGHT: tuple[weakref.ref, int, int, bool] | None = None


def cached_options() -> Callable[..., LossOptions]:
    """How this call builds its options: through the cache of ``_options.loss_options`` in eager
    mode (a training loop passes the same ones every step), directly under torch.compile, which
    would otherwise guard the compiled graph on the cache's contents (every new set of options
    anywhere in the process would recompile it, and ``fullgraph=True`` would fail after 8)."""
    return LossOptions if torch.compiler.is_compiling() else loss_options


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: Integer = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: Real = 0.0,
    *,
    z_loss: Real = 0.0,
    softcap: Real | None = None,
    check_probabilities: bool = True,
    backend: str = "auto",
    inplace_backward: bool = False,
    check_labels: bool = True,
) -> Tensor:
    r"""Softmax cross-entropy of logits against class indices or class probabilities.

    The same arguments, positions and results as ``torch.nn.functional.cross_entropy``, plus the
    keyword-only ``z_loss`` (adds ``z_loss·logsumexp²`` per non-ignored sample, PaLM) and
    ``softcap`` (logits become ``s·tanh(logits/s)`` first, Gemma 2). The loss, its gradient and the
    reductions are those of :func:`xentkit.cross_entropy` (formulas there) on the class axis 1 (0
    for an unbatched ``(C,)`` input). "mean" divides class-index losses by Σ w_y over non-ignored
    samples and probability losses by the number of samples (as torch), the z term by the number
    of non-ignored samples; when there is nothing to average (every target ignored) the result is
    0 with gradient 0, where torch returns NaN.

    Shapes: input ``[C]``, ``[N, C]`` or ``[N, C, d1, ..., dk]``; target of class indices (int64)
    ``[]``, ``[N]`` or ``[N, d1, ..., dk]``, or of probabilities with the input's shape. The
    result is a scalar, or the target's sample shape for ``reduction="none"``.

    ``backend``: "auto" runs float16/32/64 CPU tensors on xentkit's Numba kernels (float16
    computed in float32; loss and gradient in one pass in forward, backward scales the stored
    gradient) and float32/float16/bfloat16 CUDA tensors, with class indices or probabilities, on
    its Triton kernels (arithmetic in float32; the loss in forward, the gradient in one pass in
    backward). Everything else (other devices and dtypes, gradients with respect to ``target`` or
    ``weight``) uses plain torch ops with the same semantics. ``ignore_index`` applies to class
    indices; with probability targets every path leaves it unused (torch raises for a value other
    than -100). "torch" always takes torch ops;
    "triton" takes the Triton kernels or raises a ValueError that says why it cannot (on CPU
    tensors they run only under Triton's interpreter, ``TRITON_INTERPRET=1``). On CUDA the labels
    are checked after the first kernel, which waits for the device once. Under ``torch.compile``
    the Triton path runs as torch custom ops (the kernels stay fused, no graph break) without that
    wait: a label outside ``[0, C)`` that is not ``ignore_index`` is not refused but makes its
    row's loss and gradient NaN (nothing is read out of bounds). Double backward raises on
    xentkit's kernels. Small CPU problems (up to ``SMALL_MAX_LOGITS`` float32/float64 logits
    ``[N, C]`` or ``[N, C, d1, ..., dk]``; int64 labels or probabilities of the logits' dtype; class
    weights, if any, of that dtype; nothing but the logits requiring grad; no z-loss, softcap or
    in-place) run torch's own cross-entropy, with xentkit's label check, warning, "mean of
    nothing is 0" and 0·log 0 = 0 around it (the fixed costs of the kernel path would be most of
    the time there), and have torch's second derivative.
    ``size_average`` and ``reduce`` are deprecated and mapped to ``reduction`` as torch does.

    ``check_labels=False`` drops the label check where it costs a wait for the device: on the
    Triton and torch-ops paths a label outside ``[0, C)`` that is not ``ignore_index`` then makes
    its row's loss and gradient NaN (so a "mean" or "sum" is NaN) instead of raising; nothing is
    read out of bounds and no device-side assert fires. It saves the one synchronization of an
    eager CUDA call. Under torch.compile nothing may wait, so on CUDA the compiled Triton custom
    ops and torch ops never check, whatever ``check_labels`` says: a bad label gives a NaN row
    there, never a device-side assert. Nor does ``torch.vmap`` with batched labels (they cannot
    be branched on; it runs torch ops); labels it does not batch are checked. CPU tensors on the Numba kernels, eager or compiled (the
    custom op ``xentkit::cross_entropy``), and on torch's own small-problem kernel (eager) are
    always checked: there it costs no wait. Compiled CPU calls that keep torch ops (small
    problems, bfloat16, ``backend="torch"``) check with an op in the graph: a bad label raises
    eager's ``ValueError``, naming it, unless ``check_labels=False``, which gives the NaN row.

    ``inplace_backward=True`` writes the logits' gradient over the logits, so no logits-sized
    gradient buffer exists (with a 128k vocabulary, gigabytes): on the CPU kernels in forward
    (float16 logits in backward, by a second pass, so that a loss scale reaches the gradient before
    it is rounded), on the Triton kernels in backward; ``input.grad`` (or what flows to the layer before) then shares
    the logits' memory. The logits' values must not be used after the loss: autograd's version
    counter is raised, so a node that saved them raises torch's in-place error rather than compute
    from the gradient. Memory is saved for contiguous logits with the classes last (``(N, C)``,
    ``(C,)``); other layouts get the same values without the saving; the torch-ops path ignores it.
    Logits that are a leaf requiring grad (a parameter), or a view of one, are refused (a
    ``ValueError``): their memory is not the loss's to overwrite.
    On the CPU (Numba) kernels, logits that look like probabilities (softmax applied twice) give
    a ``xentkit.ProbabilitiesAsLogitsWarning``; ``check_probabilities=False`` silences it. The
    Triton and torch-ops paths do not look (on a GPU it would cost a wait for the device).

    Example:
        >>> import torch
        >>> import xentkit.torch as xt
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
        >>> loss = xt.cross_entropy(logits, torch.tensor([0, 2]))
        >>> round(loss.item(), 4)
        0.8964
        >>> loss.backward()
        >>> logits.grad
        tensor([[-0.1072,  0.0876,  0.0196],
                [ 0.1060,  0.2881, -0.3940]])

    See also: :func:`nll_loss` (from log-probabilities), :func:`binary_cross_entropy_with_logits`
    (independent binary labels), ``xentkit.torch.linear_cross_entropy`` (fused with a linear layer).
    """
    if size_average is not None or reduce is not None:
        reduction = _bridge.legacy_reduction(size_average, reduce, reduction)
    options = cached_options()(
        reduction, ignore_index, label_smoothing, z_loss, softcap, None, backend, inplace_backward,
        check_labels,
    )
    return _cross_entropy_with_options(input, target, weight, options, check_probabilities)


def _cross_entropy_with_options(
    input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions, check_probabilities: bool
) -> Tensor:
    """:func:`cross_entropy` with its options already built (``CrossEntropyLoss`` calls this with
    its attributes' options: no keyword arguments to spread and gather on every step)."""
    _bridge.check_tensors(input, target, weight)
    check_probabilities = check_flag(check_probabilities, "check_probabilities")
    if (  # (torch.compile's custom ops and torch.func's torch ops write no logits: nothing to refuse)
        options.inplace_backward and input.requires_grad and torch.is_grad_enabled()
        and not torch.compiler.is_compiling() and not _bridge.transforms_running(input)
    ):
        _bridge.check_overwritable(input, target=target, weight=weight)
    if _small_and_plain(input, target, weight, options):  # first the common small case
        return _small_cross_entropy(input, target, weight, options, check_probabilities)
    return _cross_entropy_beyond_small(input, target, weight, options, check_probabilities)


def _cross_entropy_beyond_small(
    input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions, check_probabilities: bool
) -> Tensor:
    """:func:`cross_entropy` on xentkit's paths: the Triton kernels, the Numba kernels or torch
    ops (what is not small, and what torch's kernel computes otherwise than xentkit)."""
    grad_free = (target, weight)
    if _triton_path.use_triton(options, input, target, weight):
        if torch.compiler.is_compiling():  # custom ops the compiler keeps (no label check)
            return _ops.cross_entropy(input, target, weight, options)
        return _triton_path.TritonCrossEntropyFunction.apply(
            input, target, weight, options, _bridge.gradients_wanted()
        )
    if (
        torch.compiler.is_compiling() and _numba_ops.compiled_beyond_small(input.numel(), SMALL_MAX_LOGITS)
        and _numba_ops.runs_compiled(input, target, weight, options)
    ):  # custom ops the compiler keeps, around the eager path's code (labels checked); small
        # problems keep the traced torch ops, ~3x faster there (a custom op costs ~0.1 ms a call)
        return _numba_ops.cross_entropy(input, target, weight, options, bool(check_probabilities))
    if options.backend != "torch" and input.numel() > SMALL_MAX_LOGITS and _bridge.bfloat16_on_the_cpu(input, target, weight):
        # (small ones stay on torch's ops: a kernel call's fixed cost is what they would notice)
        return _widened_cross_entropy(input, target, weight, options, check_probabilities)
    if options.backend == "torch" or not _bridge.runs_on_xentkit(input, target, weight, grad_free=grad_free):
        return _torch_ops.cross_entropy(input, target, weight, options)
    return _CrossEntropyFunction.apply(
        input, target, weight, options, bool(check_probabilities), _bridge.gradients_wanted()
    )


def _widened_cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions, check_probabilities: bool
) -> Tensor:
    """Cross-entropy of bfloat16 CPU operands on the Numba kernels: each widened (exactly) to
    float32, the loss rounded once to torch's dtype and the gradient to bfloat16 by the widening's
    own backward. The float32 copy of the logits is this call's own, so the kernels write the
    gradient over it (in place): a bfloat16 call holds 2 times the logits' bytes until backward
    and 3 in it, where torch's float32 ops took 4 and 6 (a memory review), at the kernels' speed.
    What the kernels do not run (a target or weight that requires grad, torch.func) runs torch's
    ops on the bfloat16 operands, in float32 as well (``_torch_ops.cross_entropy``)."""
    _bridge.sample_layout(input, target)  # (its errors name the operands' own dtypes, not float32)
    widened = _bridge.widened(input, target, weight)
    if not _bridge.runs_on_xentkit(*widened, grad_free=widened[1:]):
        return _torch_ops.cross_entropy(input, target, weight, options)
    if widened[0] is not input and not options.inplace_backward:
        options = options.replace(inplace_backward=True)
    loss = _CrossEntropyFunction.apply(*widened, options, bool(check_probabilities), _bridge.gradients_wanted())
    return loss.to(_bridge.loss_dtype(input, target, weight))


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: Integer = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    *,
    check_labels: bool = True,
) -> Tensor:
    r"""Negative log-likelihood of log-probabilities, like ``torch.nn.functional.nll_loss``.

    Per sample with class index y and class weights w: loss = −w_y·input_y (0 when y equals
    ``ignore_index``), and ∂loss/∂input_j = −w_y·[j = y]. "mean" divides by Σ w_y over non-ignored
    samples; with nothing to average the result is 0 with gradient 0 (torch returns NaN).

    Shapes: input ``[C]``, ``[N, C]`` or ``[N, C, d1, ..., dk]`` (log-probabilities, class axis
    1); target (int64) ``[]``, ``[N]`` or ``[N, d1, ..., dk]``. Backward computes the gradient from
    the saved input (whose later in-place changes raise torch's version error, as with torch).

    Small problems as in :func:`cross_entropy` (up to ``SMALL_MAX_LOGITS`` float32/float64
    batched log-probabilities, int64 labels, class weights of that dtype, if any) run torch's own
    NLL kernel with xentkit's label error and "mean" of nothing around it, and have torch's
    second derivative (0); double backward raises on xentkit's api.

    ``check_labels`` as in :func:`cross_entropy`: CPU tensors of float16/32/64 run on xentkit's
    api (or torch's small-problem kernel) and are always checked; on the torch-ops path (CUDA and other devices, bfloat16)
    ``check_labels=False`` drops the check (on CUDA one wait for the device) and a label outside
    ``[0, C)`` that is not ``ignore_index`` makes its sample's loss NaN (and its gradient entry)
    instead of raising; under ``torch.compile`` that path checks CPU tensors with an op in the
    graph (eager's ``ValueError``, naming the label) and never CUDA ones. Compiled CPU calls of
    float16/32/64 above ``SMALL_MAX_LOGITS`` run the api in two custom ops (``xentkit::nll_loss``
    and its backward), labels checked as in eager.

    Example:
        >>> import torch
        >>> import xentkit.torch as xt
        >>> log_probs = torch.tensor([[-0.2, -1.7], [-1.2, -0.4]])
        >>> xt.nll_loss(log_probs, torch.tensor([0, 1]))
        tensor(0.3000)

    See also: :func:`cross_entropy`, which takes logits and is ``nll_loss(log_softmax(x), y)``.
    """
    if size_average is not None or reduce is not None:
        reduction = _bridge.legacy_reduction(size_average, reduce, reduction)
    options = cached_options()(
        *fields_with(reduction=reduction, ignore_index=ignore_index, check_labels=check_labels)
    )
    _bridge.check_tensors(input, target, weight)
    if _small_and_plain(input, target, weight, options, probabilities=False):
        return _small_nll_loss(input, target, weight, options)
    return _nll_loss_beyond_small(input, target, weight, options)


def _nll_loss_beyond_small(input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions) -> Tensor:
    """:func:`nll_loss` on xentkit's paths: the Numba kernels' api (custom ops under
    torch.compile) or torch ops."""
    if (
        torch.compiler.is_compiling() and _numba_ops.compiled_beyond_small(input.numel(), SMALL_MAX_LOGITS)
        and not target.is_floating_point() and _numba_ops.runs_compiled(input, target, weight, options)
    ):  # custom ops the compiler keeps, around the eager path's code (labels checked)
        return _numba_ops.nll_loss(input, target, weight, options)
    if not _bridge.runs_on_xentkit(input, target, weight, grad_free=(weight,)):
        return _torch_ops.nll_loss(input, target, weight, options)
    return _NllLossFunction.apply(input, target, weight, options)


_TORCH_NLL_LOSS = getattr(torch._C._nn, "nll_loss_nd", None) if _TORCH_CROSS_ENTROPY is not None else None


def _small_nll_loss(input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions) -> Tensor:
    """A small problem on torch's own NLL kernel, with xentkit's label error and "mean" of
    nothing (0 with gradient 0) around it, as :func:`_small_cross_entropy`. A non-contiguous
    ``(N, C, d1, ...)`` input (channels_last) is made contiguous first: torch's kernel takes it in
    forward and refuses it in backward ("grad_input must be contiguous"), where larger problems,
    on xentkit's kernels, work."""
    if input.dim() > 2 and not input.is_contiguous():
        input = input.contiguous()
    try:
        if _TORCH_NLL_LOSS is not None and not _MODE_ENABLED():
            loss = _TORCH_NLL_LOSS(input, target, weight, _REDUCTION_ENUM[options.reduction], options.ignore_index)
        else:  # (a TorchFunctionMode running, or a torch without the binding)
            loss = F.nll_loss(input, target, weight, ignore_index=options.ignore_index, reduction=options.reduction)
    except IndexError:  # (a bad label: the api's ValueError naming it)
        classes = input.shape[_bridge.class_dim(input)]
        _label_error_instead(target, classes, options.ignore_index, f"log_probs have {classes} classes")
        raise
    # a NaN maybe 0·log 0 (a target of class weight 0 at a −inf log-probability): torch ops decide
    # (they keep torch's second derivative)
    if weight is not None and _holds_nan(loss, options.reduction):
        return _torch_ops.nll_loss(input, target, weight, options)
    if options.reduction == "mean" and _nothing_to_average(loss.item(), target, weight, options.ignore_index):
        return _zero_with_zero_gradient(input)
    return loss


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    r"""Sigmoid binary cross-entropy of logits, like ``torch.nn.functional.binary_cross_entropy_with_logits``.

    Elementwise, with x the logit, y ∈ [0, 1] the target, w the (broadcast) weight and pw the
    positive-class weight (broadcast, usually one per class along the last axis):

        loss = −w·[pw·y·log σ(x) + (1 − y)·log σ(−x)]      (log(1 − σ(x)) = log σ(−x), stabler)
        ∂loss/∂x = w·[σ(x)·(pw·y + 1 − y) − pw·y]

    "mean" averages over all elements; with no element it is 0 (torch: NaN). The loss has the
    target's dtype, as torch's (float64 logits with a float32 target give float32); an integer or
    bool input or target is a TypeError (torch refuses them too, with an error that depends on the
    path). Shapes: input
    and target of any one shape; ``weight`` and ``pos_weight`` broadcastable to it (as torch).

    On CPU tensors this runs xentkit's fused kernel (``xentkit.kernels.binary``: loss and
    gradient in forward, one read, float64 arithmetic; bfloat16 operands widened to float32 for
    it), which keeps log σ accurate where torch's kernel rounds it away (float32 x = −17, target
    0: torch 0, here 4.14e-8; x = −10: torch 0.8% high). Its second derivative is not computed: double backward raises there (torch's ops on
    other devices compute it). Targets are not checked to lie in [0, 1] (as torch).

    Example:
        >>> import torch
        >>> import xentkit.torch as xt
        >>> xt.binary_cross_entropy_with_logits(torch.tensor([1.5, -0.5]), torch.tensor([1.0, 0.0]))
        tensor(0.3377)

    See also: :func:`cross_entropy` for mutually exclusive classes.
    """
    if size_average is not None or reduce is not None:
        reduction = _bridge.legacy_reduction(size_average, reduce, reduction)
    reduction = cached_options()(reduction).reduction
    _bridge.check_tensors(input, target, weight, pos_weight)
    _bridge.check_floating_input(input)  # (torch: a NotImplementedError from inside its kernel)
    if not target.is_floating_point():  # (torch: a cast error, per path)
        raise TypeError(
            "target must be a floating-point tensor (probabilities in [0, 1]), got dtype "
            f"{str(target.dtype).removeprefix('torch.')}; pass target.float()"
        )
    for name, factor in (("weight", weight), ("pos_weight", pos_weight)):
        # the api's rules, before a path is chosen (torch: a RuntimeError naming "tensor a" and
        # "tensor b", or one about the output's shape for a factor that would widen the result,
        # from inside its ops; its ops dropped a complex factor's imaginary part)
        if factor is not None:
            check_factor_kind(name, _bridge.numpy_kind(factor.dtype), factor)
            check_broadcasts_to(name, tuple(factor.shape), tuple(input.shape))
    operands = (input, target, weight, pos_weight)
    result_dtype = None
    if _bridge.bfloat16_on_the_cpu(*operands):
        # bfloat16 on the CPU: widened (exactly) to float32 for the kernel, which NumPy cannot
        # view in bfloat16; torch's float32 kernel would cancel (1 − y)·x against log(1 + e^x)
        # (5% off at x = −20, y = 1e-6) and σ(x)·(pw·y + 1 − y) against pw·y (the gradient all
        # off at x = 20), where the kernel computes both in float64 from their stable forms (a
        # review). The loss rounds to torch's dtype and the gradient to bfloat16, each once
        # from float32.
        result_dtype = _bridge.binary_loss_dtype(input, target)
        operands = _bridge.widened(*operands)
    if not _bridge.runs_on_xentkit(*operands, grad_free=operands[1:]):
        return _torch_ops.binary_cross_entropy_with_logits(input, target, weight, reduction, pos_weight)
    loss = _BinaryCrossEntropyWithLogitsFunction.apply(
        *operands[:3], reduction, operands[3], _bridge.gradients_wanted()
    )
    return loss if result_dtype is None else loss.to(result_dtype)
