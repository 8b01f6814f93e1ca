"""The Triton path of ``xentkit.torch``: which backend a call takes, and the autograd Function that
runs :mod:`xentkit.triton`'s kernel.

Backends (``LossOptions.backend``): "torch" always runs plain torch ops; "auto" takes the Triton
kernels for CUDA tensors they handle, the Numba kernels for CPU tensors they handle, torch ops for
the rest; "triton" insists on the Triton kernels and says why when it cannot have them.

The work on contiguous ``[rows, C]`` tensors (:func:`forward_rows`, :func:`gradient_rows`, which
take the :class:`LossOptions` object and hand the kernels ``options.formula_arguments()`` by
keyword) is shared by the eager autograd Function below and by the torch custom ops of
:mod:`xentkit.torch._ops`, which ``cross_entropy`` calls under ``torch.compile``, with the same
prologue and epilogue (:func:`rows_inputs`, :func:`loss_in_layout`). A custom op takes no dataclass:
:class:`OpOptions` turns the options into its plain arguments and back, its schema written from
``LossOptions``' fields, so that a new formula option reaches the ops without an edit here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .._labels import check_labels
from .._options import LossOptions
from ..reference.reductions import ReductionPlan
from . import _bridge

if TYPE_CHECKING:  # the Triton module is imported only where the kernels run
    from ..triton.cross_entropy import ClassWeights

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# probability targets are read in their own dtype (float32 arithmetic)
PROBABILITY_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _interpreted() -> bool:
    """Whether Triton's interpreter runs the kernels: ``TRITON_INTERPRET`` as Triton reads it (1,
    true, yes, on or y, in any case; a review: "false" had been taken for on, and a CPU call then
    failed inside Triton for want of a GPU driver). Triton reads it when the kernels are defined,
    on their first use: set it before that."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE_WORDS


_TRUE_WORDS = frozenset({"1", "true", "yes", "on", "y"})


def _triton_importable() -> bool:
    from .. import triton as xentkit_triton

    return xentkit_triton.available()


# Under torch.compile the import attempt cannot be traced (Dynamo refuses importlib), so a
# compiled call asks whether the package is there, looked up once without importing it.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _is_cuda(input: Tensor) -> bool:
    """Whether "auto" sends ``input`` to the Triton kernels (a CUDA tensor)."""
    return input.device.type == "cuda"


def tensor_reason(
    input: Tensor, *others: Tensor | None, compiled: bool = False, name: str = "logits",
    grid: tuple[int, int] | None = None,
) -> str | None:
    """Why no Triton kernel can run on ``input`` (its dtype, its device, torch.compile, a
    torch.func transform or forward-mode AD, a missing triton package), or None when one can.
    Shared by every Triton path of ``xentkit.torch``; ``others``: the call's other tensors (a
    forward-mode tangent on any of them counts); ``compiled``: whether the caller has a path for
    torch.compile (custom ops); ``name``: what ``input`` is called in the message (the linear
    forms' hidden states are "input"); ``grid``: the launches' ``(rows, classes)``, which CUDA's
    grid must hold (``xentkit.triton._chunks.grid_reason``; in eager calls)."""
    if input.dtype not in TRITON_DTYPES:
        return f"it takes float32, float16 and bfloat16 {name}, got {input.dtype}"
    if input.device.type != "cuda" and not (input.device.type == "cpu" and _interpreted()):
        return (
            f"it runs CUDA tensors (and CPU tensors only under Triton's interpreter, "
            f"TRITON_INTERPRET=1), got a tensor on {input.device}"
        )
    if torch.compiler.is_compiling():
        if not compiled:
            return "it does not run under torch.compile"
        if not _TRITON_FOUND:
            return "the triton package is not installed (pip install 'xentkit[triton]')"
    elif _bridge.transforms_running(input, *others):  # (its autograd Functions have no vmap or jvp)
        return "it does not run under torch.func transforms (vmap, grad, jacrev) or forward-mode AD"
    elif not _triton_importable():
        return "the triton package is not installed (pip install 'xentkit[triton]')"
    if grid is not None and not torch.compiler.is_compiling():
        # (not while torch.compile traces: the rule would pin a dynamic class count to its
        # value; there a launch beyond the grid is the launch's ValueError)
        from ..triton._chunks import grid_reason

        return grid_reason(*grid)
    return None


def triton_reason(
    input: Tensor, target: Tensor, weight: Tensor | None, *others: Tensor | None, compiled: bool = False,
    name: str = "logits", grid: tuple[int, int] | None = None,
) -> str | None:
    """Why the Triton cross-entropy (``cross_entropy`` or the linear form) cannot run this call,
    or None when it can; ``others`` (the linear form's weight and bias) and ``compiled``: as for
    :func:`tensor_reason`."""
    if torch.is_floating_point(target) and target.dtype not in PROBABILITY_DTYPES:
        return f"it reads float16, bfloat16, float32 and float64 probability targets, got {target.dtype}"
    # (a target or weight on another device than the logits, whose memory a kernel would read,
    # never comes here: _bridge.check_tensors refused it for every path)
    if torch.is_grad_enabled() and (target.requires_grad or (weight is not None and weight.requires_grad)):
        return "it differentiates with respect to the logits only (target or weight requires grad)"
    return tensor_reason(input, target, weight, *others, compiled=compiled, name=name, grid=grid)


def takes_triton(backend: str, on_cuda: bool, reason: Callable[[], str | None]) -> bool:
    """The one rule of ``backend=`` for every Triton path of ``xentkit.torch``: "torch" never,
    "auto" for CUDA tensors the kernels take, "triton" always, or a ValueError saying why it
    cannot (``reason()``: None when the kernels can run the call)."""
    if backend == "torch" or (backend == "auto" and not on_cuda):
        return False
    why = reason()
    if why is not None and backend == "triton":
        raise ValueError(f"backend='triton' cannot run this call: {why}")
    return why is None


def use_triton(options: LossOptions, input: Tensor, target: Tensor, weight: Tensor | None) -> bool:
    """Whether ``cross_entropy`` takes the Triton path (eager, or its custom ops under
    torch.compile); ``backend="triton"`` raises if it cannot."""
    return takes_triton(
        options.backend, _is_cuda(input),
        lambda: triton_reason(input, target, weight, compiled=True, grid=rows_and_classes(input)),
    )


def rows_and_classes(input: Tensor, class_dim: int = 1) -> tuple[int, int]:
    """The ``[rows, C]`` of ``input`` (classes along ``class_dim``, or along its only dimension),
    as the kernels see it; ``(0, 0)`` for a scalar (refused later, by the layout's own check)."""
    if input.dim() == 0:
        return 0, 0
    classes = input.shape[class_dim] if input.dim() > 1 else input.shape[0]
    return (input.numel() // classes if classes else 0), classes


def unit_factors(plan: ReductionPlan, device: torch.device) -> Tensor:
    """The plan's (main, z) gradient factors for an upstream gradient of 1 (the "mean"
    denominators' inverses, or 0) as a float32 ``[2]`` device tensor for ``row_gradient``.
    A Python number is written by a fill on the device, not copied from the host (a blocking copy
    would wait for the device, and CUDA graphs cannot capture it)."""
    return torch.stack([
        factor.to(device=device, dtype=torch.float32) if isinstance(factor, Tensor)
        else torch.full((), factor, dtype=torch.float32, device=device)
        for factor in plan.scales(1.0)
    ])


def as_rows(tensor: Tensor) -> Tensor:
    """``tensor`` as contiguous ``[rows, C]`` with the class axis (1, or 0 unbatched) last, with its
    autograd history (under torch.compile the compiler traces and differentiates the layout
    change; the eager Function passes detached tensors)."""
    if tensor.dim() == 1:
        return tensor.reshape(1, -1).contiguous()
    return tensor.movedim(1, -1).reshape(-1, tensor.shape[1]).contiguous()


# The schema type of each annotation a LossOptions field may have, for the custom ops.
_SCHEMA_TYPES = {
    "int": "int", "int | None": "int?", "float": "float", "float | None": "float?", "bool": "bool", "str": "str",
}
_FIELD_TYPES = {field.name: field.type for field in dataclasses.fields(LossOptions)}


@dataclasses.dataclass(frozen=True)
class OpOptions:
    """Some loss options as trailing plain arguments of a torch custom op (which takes no
    dataclass): the schema (each field's type from its ``LossOptions`` annotation), the values of
    an options object in that order, and the object rebuilt from them inside the op. The one place
    that unpacks :class:`LossOptions` for the ops of :mod:`xentkit.torch._ops`."""

    names: tuple[str, ...]

    @property
    def schema(self) -> str:
        """``"str reduction, int ignore_index, ..."`` for the ops' schema strings."""
        parts = []
        for name in self.names:
            annotation = str(_FIELD_TYPES[name])
            if annotation not in _SCHEMA_TYPES:
                raise TypeError(f"LossOptions.{name} has a type no custom-op schema takes: {annotation}")
            parts.append(f"{_SCHEMA_TYPES[annotation]} {name}")
        return ", ".join(parts)

    def values(self, options: LossOptions) -> tuple[Any, ...]:
        return tuple(getattr(options, name) for name in self.names)

    def options(self, values: Sequence[Any]) -> LossOptions:
        """The options back from :meth:`values` (checked already: nothing raises); the fields not
        carried keep their defaults, which the ops do not read."""
        return LossOptions(**dict(zip(self.names, values, strict=True)))

    def taken_from(self, other: OpOptions, values: Sequence[Any]) -> tuple[Any, ...]:
        """This op's values picked by name from ``other``'s ``values`` (no object rebuilt: also
        while torch.compile traces, when a value may be symbolic)."""
        named = dict(zip(other.names, values, strict=True))
        return tuple(named[name] for name in self.names)


# The formula's options (LossOptions.formula_arguments()), in field order.
FORMULA_NAMES = tuple(LossOptions().formula_arguments())
# pass 1 and the reduction take the reduction and the formula's options; pass 2 the formula's
# (the reduction reaches it as the factors of the upstream gradient)
FORWARD_OP_OPTIONS = OpOptions(("reduction", *FORMULA_NAMES))
BACKWARD_OP_OPTIONS = OpOptions(FORMULA_NAMES)


def rows_inputs(
    input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions
) -> tuple[Tensor, tuple[int, ...], bool]:
    """The prologue of every Triton cross-entropy call (the eager Function and, under
    torch.compile, ``_ops.cross_entropy``): ``(rows_target, sample_shape, probabilities)``, the
    kernels' target (``[rows, C]`` probabilities in their dtype, or ``[rows]`` int64 labels) and
    :func:`_bridge.sample_layout`'s results. Refuses a softcap that float32, the kernels' arithmetic,
    cannot hold, and class weights that are not one number per class (the kernels would read
    past them)."""
    options.check_fits(torch.float32, torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny)
    _, sample_shape, probabilities = _bridge.sample_layout(input, target)
    classes = input.shape[_bridge.class_dim(input)]
    _bridge.check_class_weight(weight, classes)
    target = target.detach()
    if probabilities:
        return as_rows(target), sample_shape, probabilities
    # (int64 as every path casts: uint64 labels beyond int64, which the cast would wrap onto
    # ignore_index, refused, or where nothing may look made bad)
    labels = _bridge.int64_labels(target, classes, options.ignore_index)
    return labels.reshape(-1).contiguous(), sample_shape, probabilities


def loss_in_layout(loss: Tensor, sample_shape: tuple[int, ...], options: LossOptions, dtype: torch.dtype) -> Tensor:
    """The epilogue of every Triton cross-entropy call: a "none" loss in the samples' shape, the
    loss in ``dtype`` (torch's: ``_bridge.loss_dtype``)."""
    if options.reduction == "none":
        loss = loss.reshape(sample_shape)
    return loss.to(dtype)


def forward_rows(
    rows: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions, *, dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pass 1 and the reduction on contiguous ``[rows, C]`` logits: ``(loss, stats, factors, bad)``,
    the loss in ``dtype`` (a scalar, or ``[rows]`` for "none"), the rows' statistics for
    :func:`gradient_rows`, the upstream gradient's float32 (main, z) factors (the "mean"
    denominators' inverses, or 0) and the number of bad labels (an int64 ``[1]``). ``target``:
    ``[rows]`` int64 labels or ``[rows, C]`` probabilities. Three launches (four beyond
    ``xentkit.triton.reduction.SPAN`` rows): pass 1, the rows' losses, the epilogue (the rules of
    ``ReductionPlan`` and ``z_term`` on the device). No label is checked and nothing waits for the
    device: a label outside ``[0, C)`` (not ``ignore_index``) reads nothing out of bounds, and its
    row's loss and gradient are NaN (so a reduced loss is NaN); ``bad`` counts them."""
    from ..triton.cross_entropy import ClassWeights, row_statistics
    from ..triton.reduction import reduce_rows

    weights = ClassWeights.of(weight, rows.device, with_total=False) if len(rows) else None
    loss_rows, lse, stats = row_statistics(rows, target, weights, **options.formula_arguments())
    loss, factors, bad = reduce_rows(
        loss_rows, lse, target, None if weights is None else weights.values, rows.shape[1],
        reduction=options.reduction, ignore_index=options.ignore_index, z_loss=options.z_loss, dtype=dtype,
    )
    return loss, stats, factors, bad


def prepared_weights(
    weight: Tensor | None, target: Tensor, options: LossOptions, device: torch.device, *, for_gradient: bool
) -> ClassWeights | None:
    """The class weights as the kernels read them, prepared once for pass 1, the epilogue and
    (``for_gradient``) pass 2, with the total W where pass 2 reads it."""
    from ..triton.cross_entropy import ClassWeights

    wanted = for_gradient and ClassWeights.total_wanted(target, options.label_smoothing)
    return ClassWeights.of(weight, device, with_total=wanted)


def refuse_bad_labels(bad: Tensor, labels: Tensor, classes: int, ignore_index: int) -> None:
    """The eager label check of the Triton paths, after the kernels: one wait for the device, to
    read the epilogue's count ``bad``; where it is not 0, :func:`xentkit._labels.check_labels` (the
    home of the rule and its message) finds the first bad label of ``labels`` (in the target's
    shape, so that its position is the target's index) and raises."""
    count = int(bad.item())
    if count:
        check_labels(labels, classes, ignore_index)
        raise RuntimeError(  # the epilogue's rule and check_labels' disagree: a bug, never a pass
            f"xentkit: the Triton epilogue counted {count} bad labels that check_labels accepts"
        )


def row_plan(
    target: Tensor, weight: Tensor | None, options: LossOptions, classes: int
) -> tuple[Tensor, ReductionPlan]:
    """``(valid, plan)`` of the Triton linear form (one plan for the whole batch; ``cross_entropy``
    takes its epilogue kernel instead: :func:`forward_rows`), on the device and without a wait:
    probabilities count every row; labels count the non-ignored ones, and the class-weight lookup
    reads no label outside ``[0, classes)`` (the caller refuses those after the kernels, which
    read none)."""
    if target.is_floating_point():
        valid = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
        return valid, ReductionPlan.of_rows(options.reduction, target.shape[0])
    valid = target != options.ignore_index
    if weight is not None:
        valid = valid & (target >= 0) & (target < classes)
    return ReductionPlan.of_targets(
        options.reduction, target, options.ignore_index, weight, dtype=torch.float32, valid=valid
    )


def gradient_rows(
    rows: Tensor, target: Tensor, weight: Tensor | ClassWeights | None, stats: Tensor, factors: Tensor,
    grad_output: Tensor, options: LossOptions, out: Tensor,
) -> Tensor:
    """Pass 2: the gradient of :func:`forward_rows`' loss with respect to ``rows``, for the
    upstream gradient ``grad_output`` (one value, or one per row for "none"), written into
    ``out`` (which may be ``rows``). One launch; the upstream gradient and the factors are read
    on the device (no synchronization)."""
    from ..triton.cross_entropy import row_gradient

    upstream = grad_output.detach().reshape(-1)
    if upstream.numel() == 1:
        upstream = upstream.expand(rows.shape[0])
    return row_gradient(
        rows, target, weight, stats, upstream, upstream, out, factors, **options.formula_arguments()
    )


class TritonCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy on :mod:`xentkit.triton`'s kernels. forward: pass 1, the rows' losses and the
    epilogue (three launches, one read of the logits; :func:`forward_rows`), then the labels are
    checked (one wait for the device, to read the epilogue's count of bad labels); the logits,
    each row's max and sum and the class weights as the kernels read them are kept. backward:
    pass 2 with the upstream gradient read on the device (one launch: one read and one write), no
    synchronization, and no logits-sized buffer held between forward and backward. The "mean"
    denominators reach the kernel as device factors of the upstream gradient: backward launches
    nothing else.

    Probability targets (floating, of the input's shape) take the same two passes, which read
    them as ``[rows, C]`` in their dtype (a copy only for ``(N, C, d1, ..., dk)`` layouts); as on
    the CPU no row is ignored, "mean" divides by the number of rows, and there are no labels to
    check (no wait for the device).

    Eager only: under torch.compile ``cross_entropy`` calls the custom ops of
    :mod:`xentkit.torch._ops` instead, on the same :func:`forward_rows` and :func:`gradient_rows`."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, input: Tensor, target: Tensor, weight: Tensor | None, options: LossOptions,
        grad_enabled: bool,
    ) -> Tensor:
        _bridge.first_order_anchors(ctx, input)
        rows_target, sample_shape, probabilities = rows_inputs(input, target, weight, options)
        rows = as_rows(input.detach())
        want_grad = grad_enabled and ctx.needs_input_grad[0]
        loss_dtype = _bridge.loss_dtype(input, target, weight)
        weights = prepared_weights(weight, rows_target, options, rows.device, for_gradient=want_grad)
        loss, stats, factors, bad = forward_rows(rows, rows_target, weights, options, dtype=loss_dtype)
        if want_grad:
            # the "mean" denominators as factors of the upstream gradient, read by the kernel, and
            # the class weights as the kernels read them (their total too, if pass 2 reads it)
            values, total = (None, None) if weights is None else (weights.values, weights.total)
            ctx.save_for_backward(input, rows_target, stats, values, total, factors)
            ctx.options = options
        if not probabilities and options.check_labels:
            # the one wait, last
            refuse_bad_labels(bad, rows_target.reshape(sample_shape), rows.shape[1], options.ignore_index)
        return loss_in_layout(loss, sample_shape, options, loss_dtype)

    @staticmethod
    @_bridge.first_order_only("cross_entropy")
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, rows_target, stats, values, total, factors = ctx.saved_tensors
        options: LossOptions = ctx.options
        from ..triton.cross_entropy import ClassWeights

        weight = None if values is None else ClassWeights(values, total)
        rows = as_rows(input.detach())
        if _bridge.batched_backward(grad_output):  # (is_grads_batched: out of place, by linearity)
            ones = torch.ones(tuple(grad_output.shape), dtype=grad_output.dtype, device=rows.device)
            unit = gradient_rows(rows, rows_target, weight, stats, factors, ones, options, torch.empty_like(rows))
            upstream = grad_output.unsqueeze(1) if options.reduction == "none" and input.dim() >= 2 else grad_output
            return _bridge.batched_product(from_rows(unit, input.shape), upstream), None, None, None, None
        # pass 2 writes over the rows when they are a private copy (a layout with the classes not
        # last) or, with inplace_backward, the logits themselves unless the graph is kept for
        # another backward (retain_graph: that one reads them again); else into a new buffer
        private = rows.data_ptr() != input.data_ptr() or rows.numel() == 0
        over_input = options.inplace_backward and not private and not _bridge._graph_is_kept()
        gradient = gradient_rows(
            rows, rows_target, weight, stats, factors, grad_output, options,
            rows if private or over_input else torch.empty_like(rows),
        )
        if over_input:  # a node that saved the logits now raises torch's version error
            torch.autograd.graph.increment_version(input)
        return from_rows(gradient, input.shape), None, None, None, None


def from_rows(gradient: Tensor, shape: torch.Size) -> Tensor:
    """A ``[rows, C]`` gradient back in the logits' layout ``(C,)`` or ``(N, C, d1, ..., dk)``."""
    if len(shape) <= 1:
        return gradient.reshape(shape)
    return gradient.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
