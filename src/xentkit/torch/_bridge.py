"""Plumbing between torch tensors and xentkit's NumPy api, shared by the autograd Functions.

- ``runs_on_xentkit``: whether a call can take the NumPy path (plain CPU tensors of a dtype the
  kernels handle) or must fall back to plain torch ops.
- ``as_numpy`` / ``as_tensor``: zero-copy views both ways (a copy only to make a tensor contiguous).
- ``keep_for_backward`` / ``take_saved_gradient`` / ``scale_gradient``: keep a gradient computed
  in the forward pass as a saved tensor and hand it over to autograd in backward, scaled by the
  upstream gradient, without a stale or shared buffer.
- ``first_order_only``: the guard every xentkit.torch backward wears (double backward raises).
- ``batched_backward`` / ``batched_product``: a backward on a batch of upstream gradients at once
  (``is_grads_batched=True``, ``jacobian``/``hessian(vectorize=True)``,
  ``gradcheck(check_batched_grad=True)``), computed out of place from what forward kept.

Options are checked by ``xentkit._options.LossOptions``, built once at each public function.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NoReturn, ParamSpec, TypeVar, cast

import numpy as np
import torch
from torch import Tensor

from .._labels import as_class_indices, check_index_layout, check_labels, holds_probabilities
from .._options import describe
from ..api._validation import check_weight_layout, class_axis_of_shape

# The dtypes the NumPy api computes in (float16 is computed in float32 and returned as float16).
# bfloat16 has no NumPy dtype; it goes to torch ops, like every non-CPU device.
KERNEL_DTYPES = (torch.float16, torch.float32, torch.float64)
# The dtypes the Numba kernels compute in directly (the fused linear forms, the log-probability and
# vocabulary-parallel rows take these; other dtypes go to torch ops).
NUMBA_DTYPES = (torch.float32, torch.float64)
# The half-precision dtypes (the CPU's fused linear chunks widen bfloat16 ones to float32)
HALF_DTYPES = (torch.float16, torch.bfloat16)


_Parameters = ParamSpec("_Parameters")
_Result = TypeVar("_Result")


def eager_only(function: Callable[_Parameters, _Result]) -> Callable[_Parameters, _Result]:
    """``function`` as a graph break under torch.compile (it runs eagerly; under a non-strict
    torch.export, which cannot break a graph, a RuntimeError saying so; a strict one stops at the
    skipped function with torch's own error, which names it), as
    ``torch.compiler.disable`` makes it, but without importing ``torch._dynamo`` when the module
    is imported (1.0 s of ``import xentkit.torch``'s 1.1 s, measured on this 2-core machine):
    torch's own lazy form, which imports it at the first call, where the installed torch has it."""
    @functools.wraps(function)
    def refusing_export(*args: _Parameters.args, **kwargs: _Parameters.kwargs) -> _Result:
        # torch.export cannot break a graph: it traced into the values' checks and failed with
        # its own data-dependent guard error, which named neither the function nor why (a review)
        if _EXPORTING():
            raise RuntimeError(
                f"xentkit.torch.{function.__name__} cannot be exported (torch.export): its label checks and "
                "collectives read the tensors' values; export the model without the loss, or use "
                "torch.compile (where each call is a graph break)"
            )
        return function(*args, **kwargs)

    # (the check inside the disabled function: torch.compile does not trace a wrapper of xentkit's
    # own, which all three forms would share, with its guards and its recompile limit)
    # (the signature kept for type checkers: a user's checker saw (...) -> Any, a review)
    lazy = getattr(torch, "_disable_dynamo", None)
    disabled = lazy(refusing_export) if lazy is not None else torch.compiler.disable(refusing_export)
    return cast("Callable[_Parameters, _Result]", disabled)


_EXPORTING = getattr(torch.compiler, "is_exporting", lambda: False)  # (torch 2.4+)


def check_tensors(input: object, target: object, weight: object = None, pos_weight: object = None) -> None:
    """``input`` and ``target`` tensors and ``weight`` (and ``pos_weight``) one or None, else a
    TypeError naming the argument, as torch's own losses raise (an array or a list reached
    attribute lookups deep in the paths: an AttributeError that named neither); each on the
    input's device (a 0-d CPU weight or pos_weight too, a scalar as torch takes it), else a
    ValueError naming it and both devices (torch's message, from deep in its ops, named neither
    the argument nor the loss). Each a dense (strided) tensor, else a TypeError naming it (a
    sparse target reached the label checks' ops: torch's NotImplementedError named neither)."""
    if (
        isinstance(input, Tensor) and isinstance(target, Tensor) and target.device == input.device
        and (weight is None or (isinstance(weight, Tensor) and weight.device == input.device))
        and pos_weight is None
        and input.layout == target.layout == torch.strided and not (input.is_nested or target.is_nested)
        and (weight is None or (weight.layout == torch.strided and not weight.is_nested))
    ):
        return
    arguments = (("input", input), ("target", target), ("weight", weight), ("pos_weight", pos_weight))
    for name, value in arguments:
        check_tensor(value, name, optional=name in ("weight", "pos_weight"))
        if value is not None:
            check_dense(value, name)
    for name, value in arguments[1:]:
        if value is None or value.device == input.device:
            continue
        # a 0-d CPU weight or pos_weight is a scalar to torch's elementwise binary loss, on any
        # device; as a target it would be read by a kernel on the input's device: refused
        if name != "target" and value.dim() == 0 and value.device.type == "cpu":
            continue
        raise ValueError(f"{name} must be on the input's device {input.device}, got {value.device}")


def check_tensor(value: object, name: str, *, optional: bool = False) -> None:
    """A TypeError naming ``name`` unless ``value`` is a tensor (or, ``optional``, None), with
    the way from a NumPy array (torch raised from deep inside, naming no argument)."""
    if isinstance(value, Tensor) or (optional and value is None):
        return
    kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
    hint = "; torch.from_numpy(...) makes one" if isinstance(value, np.ndarray) else ""
    raise TypeError(f"{name} must be {kind}, got {describe(value)}{hint}")


def check_class_weight(weight: Tensor | None, classes: int | None) -> None:
    """The class weights' dtype and shape rules (``api._validation.check_weight_layout``) on a
    tensor's metadata: no wait for its device. For the paths whose kernels would otherwise read
    past a short weight (Triton) or index it with the labels (the reduction plan). ``classes``
    None: a 1-D weight whose length the caller checks later (the vocabulary-parallel forms)."""
    if weight is not None:
        check_tensor(weight, "weight", optional=True)  # (a module's constructor takes it before any call)
        numeric = numpy_kind(weight.dtype) in "fiu"
        check_weight_layout(numeric, tuple(weight.shape), classes, weight.dtype)


def check_floating_input(input: Tensor, name: str = "logits") -> None:
    """A non-floating ``input`` is a TypeError naming it (torch's own kernels raise a
    NotImplementedError from inside, or truncate)."""
    if not input.is_floating_point():
        raise TypeError(
            f"input must be a floating-point tensor ({name}), got dtype "
            f"{str(input.dtype).removeprefix('torch.')}; pass input.float()"
        )


def gradients_wanted() -> bool:
    """What an autograd Function's ``grad_enabled`` argument says (its forward runs with grad mode
    off, and ``ctx.needs_input_grad`` does not see ``torch.no_grad``): grad mode on, or a
    ``torch.jit.trace`` in progress, whose graph freezes the argument: a trace made under
    ``no_grad``, as traces usually are, then kept no gradient and its backward failed (a review)."""
    return torch.is_grad_enabled() or torch.jit.is_tracing()


def class_dim(input: Tensor) -> int:
    """torch's class dimension: 1 for batched inputs (N, C, d1, ..., dk), 0 for one sample (C,)."""
    return 1 if input.dim() >= 2 else 0


def sample_layout(
    input: Tensor, target: Tensor, name: str = "logits", probabilities_allowed: bool = True
) -> tuple[int, tuple[int, ...], bool]:
    """``(class_axis, sample_shape, probabilities)`` of a call on torch's layout (classes on axis
    1, or 0 for an unbatched ``(C,)`` input), checked from metadata alone (no wait for the
    device): a scalar ``input`` or zero classes is the api's ValueError, and ``target`` holds
    class probabilities (floating, the input's shape; when allowed) or else class indices, which
    must be integers (a TypeError: torch would truncate floats and take bools) of the samples'
    shape. The one rule of the Triton and torch-ops paths. A non-floating ``input`` is a
    TypeError naming it (torch's own kernels raise a NotImplementedError from inside)."""
    check_floating_input(input, name)
    class_axis = class_axis_of_shape(tuple(input.shape), class_dim(input), name)
    sample_shape = tuple(input.shape[:class_axis] + input.shape[class_axis + 1 :])
    probabilities = target_layout(target, tuple(input.shape), sample_shape, probabilities_allowed)
    return class_axis, sample_shape, probabilities


def target_layout(
    target: Tensor, logits_shape: tuple[int, ...], sample_shape: tuple[int, ...], probabilities_allowed: bool = True
) -> bool:
    """Whether ``target`` holds class probabilities (the logits' shape, floating: when allowed)
    rather than class indices (integers of the samples' shape), by ``xentkit._labels``' rules,
    from metadata alone; a target of neither layout raises their errors."""
    probabilities = probabilities_allowed and holds_probabilities(
        tuple(target.shape), logits_shape, floating=target.is_floating_point(), dtype_name=target.dtype
    )
    if not probabilities:
        check_index_layout(
            not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool),
            tuple(target.shape), sample_shape, dtype_name=target.dtype,
            **({"logits_shape": logits_shape} if probabilities_allowed else {"expected_shape": "(class indices)"}),
        )
    return probabilities


def _allowing_mutation_on_saved_tensors() -> bool:
    """Whether this thread runs inside ``torch.autograd.graph.allow_mutation_on_saved_tensors()``:
    torch's flag for it is process-wide, the context's dispatch mode (what it does) is this
    thread's (where torch has no such mode to look for, the flag alone)."""
    graph = torch.autograd.graph
    if not getattr(graph, "_allow_mutation_on_saved_tensors_enabled", False):
        return False
    mode = getattr(graph, "_CloneArgBeforeMutateMode", None)
    if mode is None:  # pragma: no cover - another torch version's internals
        return True
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(each, mode) for each in _get_current_dispatch_mode_stack())


def _byte_span(tensor: Tensor) -> tuple[int, int]:
    """The bytes ``[start, stop)`` a strided tensor's elements lie in (torch strides are >= 0)."""
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return start, start + (last + 1) * tensor.element_size()


def check_overwritable(input: Tensor, **others: Tensor | None) -> None:
    """Refuse ``inplace_backward=True`` where the gradient would be written over a leaf that
    requires grad (a parameter, or a view of one): its values are the model's, and torch refuses
    in-place changes to such a leaf too; inside ``allow_mutation_on_saved_tensors()``, whose
    version check is off while xentkit's write is not one of the ops it watches; and where one of
    ``others`` (the target, the class weights) shares the logits' memory, which the gradient would
    overwrite while it is read (the api's ``out`` rule, named here by the option)."""
    if _allowing_mutation_on_saved_tensors():
        raise ValueError(
            "inplace_backward=True cannot run inside torch.autograd.graph.allow_mutation_on_saved_tensors(): "
            "that context keeps saved tensors safe from torch's own in-place ops only, and it turns off "
            "the version check that makes another node's use of the overwritten logits an error, so "
            "that node would silently compute from the gradient; pass inplace_backward=False there"
        )
    base = input if input._base is None else input._base
    if base.is_leaf and base.requires_grad:
        raise ValueError(
            "inplace_backward=True would write the gradient over logits that are a leaf tensor "
            "requiring grad (a parameter), or a view of one; pass inplace_backward=False, or logits "
            "computed from the parameters"
        )
    if type(input) not in PLAIN_TENSOR_TYPES or input.device.type == "meta":  # (no data pointers)
        return
    # only where the gradient is written over the logits: contiguous ones (else into a buffer of
    # its own), and no other operand that requires grad (that call runs torch's ops, which write
    # nothing); a contiguous input's bytes are all its own elements
    if not input.is_contiguous() or any(
        other is not None and other.requires_grad for other in others.values()
    ):
        return
    start, stop = _byte_span(input)
    for name, other in others.items():
        if other is None or type(other) not in PLAIN_TENSOR_TYPES or other.device != input.device:
            continue
        other_start, other_stop = _byte_span(other)
        if other_start < stop and start < other_stop:
            raise ValueError(
                f"inplace_backward=True would write the gradient over logits that share memory with "
                f"{name}, which backward still reads; pass inplace_backward=False, or {name}.clone()"
            )


def loss_dtype(input: Tensor, target: Tensor, weight: Tensor | None = None) -> torch.dtype:
    """The dtype torch returns a loss in: the logits', promoted with a floating target's (class
    probabilities, binary targets: float32 logits and float64 probabilities give float64) and
    then with the class weights' (probabilities only: torch refuses weights of another dtype with
    class indices, which xentkit takes and keeps the logits' dtype); under autocast float32
    instead of a half dtype (torch's autocast runs its losses in float32, which xentkit's kernels
    do anyway: the half logits are read as they are, never copied). The gradient keeps the
    logits' dtype."""
    dtype = input.dtype
    if target.is_floating_point():
        dtype = torch.promote_types(dtype, target.dtype)
        if weight is not None and weight.is_floating_point():  # (a complex one: refused later)
            dtype = torch.promote_types(dtype, weight.dtype)
    return autocast_dtype(dtype, input)


def autocast_dtype(dtype: torch.dtype, tensor: Tensor) -> torch.dtype:
    """``dtype``, or float32 for a half one while autocast is on for ``tensor``'s device type."""
    return torch.float32 if dtype in HALF_DTYPES and autocasting(tensor) else dtype


def autocasting(tensor: Tensor) -> bool:
    """Whether autocast is on for ``tensor``'s device type (a loss's result is float32 then)."""
    try:
        return torch.is_autocast_enabled(tensor.device.type)
    except (RuntimeError, TypeError):  # (a device type autocast does not know; an older torch)
        return False


_NUMPY_DTYPES = {torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """NumPy's dtype of a kernel float dtype (float16, float32, float64)."""
    return _NUMPY_DTYPES[dtype]


def numpy_kind(dtype: torch.dtype) -> str:
    """NumPy's kind character of a torch dtype ("b", "c", "f", "i" or "u"), for the rules written
    on NumPy kinds (``_options.FACTOR_KINDS``, the class weights')."""
    if dtype == torch.bool:
        return "b"
    if dtype.is_complex:
        return "c"
    if dtype.is_floating_point:
        return "f"
    return "i" if dtype.is_signed else "u"


def bfloat16_on_the_cpu(*operands: Tensor | None) -> bool:
    """Whether an eager CPU call has a bfloat16 operand, which NumPy cannot view: the kernel
    paths widen such operands (:func:`widened`)."""
    return (
        operands[0].is_cpu and not torch.compiler.is_compiling()
        and any(t is not None and t.dtype == torch.bfloat16 for t in operands)
    )


def widened(*operands: Tensor | None) -> tuple[Tensor | None, ...]:
    """The operands with each bfloat16 one converted (exactly) to float32, for the kernels."""
    return tuple(t.float() if t is not None and t.dtype == torch.bfloat16 else t for t in operands)


def binary_loss_dtype(input: Tensor, target: Tensor) -> torch.dtype:
    """The dtype torch returns ``binary_cross_entropy_with_logits`` in: the target's (float64
    logits with a float32 target give float32), whatever the logits'; float32 for a half one
    under autocast, as :func:`loss_dtype`."""
    return autocast_dtype(target.dtype if target.is_floating_point() else input.dtype, input)


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and per-row results are computed and returned in: float32 or better
    (float64 stays, float16 and bfloat16 widen to float32)."""
    return torch.promote_types(dtype, torch.float32)


def autocast_operands(*tensors: Any) -> tuple[Any, ...]:
    """A fused linear form's operands (input, weight, bias) as ``torch.autocast`` gives them to
    ``F.linear``: while autocast is on for the input's device, each floating-point tensor other
    than float64 cast to autocast's dtype (half activations beside float32 master weights become
    one dtype, and the matmuls run in it, as torch's); otherwise, and for anything that is not a
    tensor (the checks after this name it), as they are. The casts are differentiable: a float32
    weight gets its gradient in float32 through them."""
    first = tensors[0]
    if not isinstance(first, Tensor) or first.device.type not in _AUTOCAST_DEVICES:
        return tensors
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        tensor.to(dtype)
        if isinstance(tensor, Tensor) and tensor.is_floating_point() and tensor.dtype not in (torch.float64, dtype)
        else tensor
        for tensor in tensors
    )


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def kept_gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient computed in forward for an upstream gradient of 1 is kept in until
    backward has scaled it: float32 for float16 (rounded to float16 first, its small entries would
    be 0 before a loss scaler's factor reached them; torch's autocast differentiates with the
    factor applied), else ``dtype`` itself. Backward rounds once, into ``dtype``."""
    return torch.float32 if dtype == torch.float16 else dtype


def check_temperature_fits(options: Any, dtype: torch.dtype) -> None:
    """``LogProbOptions.check_fits`` for logits of ``dtype``, scaled in :func:`at_least_float32`."""
    scaled = at_least_float32(dtype)
    options.check_fits(scaled, torch.finfo(scaled).tiny)


_UINT64 = getattr(torch, "uint64", None)

try:  # FakeTensorMode's tensors (and functional wrappers of them): shapes without values
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # pragma: no cover - a torch without it
    def _is_fake(tensor: Tensor) -> bool:
        return False


def values_readable(tensor: Tensor) -> bool:
    """Whether ``tensor``'s values may be looked at here (a label check, which waits for its
    device): not while torch.compile traces, not on meta or fake tensors (``FakeTensorMode``, as
    memory and FLOP estimators run a step), not on a tensor a torch.func transform wraps."""
    return not (
        torch.compiler.is_compiling() or tensor.device.type == "meta" or _is_fake(tensor)
        or is_functorch_wrapped(tensor)
    )


# whether a torch.func transform (vmap, grad, ...) runs: a question torch.compile traces
transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def labels_checked_in_graph(
    labels: Tensor, num_classes: int, ignore_index: int, classes: str | None = None, *, check: bool = True
) -> Tensor:
    """``labels``, for a path that does not look at them (traced, meta, unchecked on a device),
    whose caller then makes the rows of bad labels (``_labels._bad_labels``) NaN: with ``check``,
    under torch.compile on CPU tensors, passed through the custom op ``xentkit::checked_labels``,
    which runs on the real labels when the graph runs and raises eager's ValueError naming the
    first bad label and its position (a CPU tensor is there to read without waiting for a
    device). The caller computes every mask (ignored rows, bad rows) from the labels it returns,
    so each output depends on the op and the compiler keeps it (a mask that fed the
    log-probabilities alone was dropped from a graph that returned the entropy alone). (An
    assertion in the graph, ``torch._assert_async``, was fused by inductor into a parallel C++
    loop, and its exception leaving the OpenMP region aborted the process:
    pytorch/pytorch#195402.) Not on a GPU, where a check would wait for the device (NaN there,
    documented), nor inside a torch.func transform (the op has no batching rule)."""
    if check and _checked_in_graph(labels):
        return checked_labels(labels, num_classes, ignore_index, classes or "", True)
    return labels


def _checked_in_graph(labels: Tensor) -> bool:
    """Whether ``labels`` are checked by ``xentkit::checked_labels`` in a compiled graph: CPU
    tensors under torch.compile, outside torch.func transforms."""
    return torch.compiler.is_compiling() and labels.device.type == "cpu" and not transforms_active()


@torch.library.custom_op("xentkit::checked_labels", mutates_args=())
def checked_labels(labels: Tensor, num_classes: int, ignore_index: int, classes: str, in_range: bool) -> Tensor:
    """Eager's checks of ``labels`` (``classes``: what holds the classes, "" for the default) as
    an op a compiled graph runs as it is: uint64 labels beyond int64 refused (the cast would wrap
    2**64 − 100 onto −100), and with ``in_range`` :func:`check_labels`; the ValueError naming a
    bad label, else a copy of ``labels``. (Int64 labels are scanned by the compiled loop the
    kernels' checks use.)"""
    values = labels.numpy()
    if values.dtype == np.uint64:
        values = as_class_indices(
            values, values.shape, num_classes=num_classes, ignore_index=ignore_index, classes=classes or None
        )
    if in_range:
        check_labels(values, num_classes, ignore_index, classes=classes or None, compiled=values.dtype == np.int64)
    return labels.clone()


@checked_labels.register_fake
def _(labels: Tensor, num_classes: int, ignore_index: int, classes: str, in_range: bool) -> Tensor:
    return torch.empty_like(labels)


def int64_labels(target: Tensor, num_classes: int, ignore_index: int, classes: str | None = None) -> Tensor:
    """``target.long()``, after refusing (where a look may wait for the tensor: eager, not meta,
    not a tensor a torch.func transform wraps) uint64 labels beyond int64, which the cast would wrap
    (2**64 − 100 onto −100, the default ``ignore_index``): the api's ValueError naming the first
    bad label (``classes`` says what holds the classes, as in ``check_labels``)."""
    if target.dtype == _UINT64 and values_readable(target):  # (a plain target under vmap/grad is)
        as_class_indices(
            target.cpu().numpy(), tuple(target.shape), num_classes=num_classes, ignore_index=ignore_index,
            classes=classes,
        )
    elif target.dtype == _UINT64:
        if _checked_in_graph(target):  # compiled on the CPU: the same refusal, in the graph
            target = checked_labels(target, num_classes, ignore_index, classes or "", False)
        # where nothing may look (CUDA compiled, torch.func): a label the cast wraps (negative
        # after it, beyond int64 before) becomes a bad one, its row NaN, not ignore_index
        beyond = num_classes if ignore_index != num_classes else num_classes + 1
        labels = target.long()
        return torch.where(labels < 0, beyond, labels)
    return target.long()


def check_dense(tensor: Tensor, name: str) -> None:
    """A strided tensor, or a ``TypeError`` naming it: sparse and other layouts, and nested
    tensors (whose layout may say strided), have no rows to run the kernels over."""
    if tensor.layout != torch.strided or tensor.is_nested:
        got = "a nested tensor" if tensor.is_nested else f"layout {tensor.layout}"
        hint = "" if tensor.is_nested else "; .to_dense() makes one"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {got}{hint}")


def own_outputs(values: tuple[Tensor, ...], dtype: torch.dtype, shape: torch.Size) -> tuple[Tensor, ...]:
    """A multi-output autograd Function's results in ``dtype`` and ``shape``, each a tensor of its
    own: never a view (a caller may change an output in place, as it may torch's own results;
    autograd refuses that on a view returned by a Function with several outputs) and never the
    tensor the Function keeps for backward (a change to the output would change the gradient)."""
    return tuple(value.reshape(shape).to(dtype, copy=True) for value in values)


PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)
_IS_FUNCTORCH_WRAPPED = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


_PEEK_INTERPRETER_STACK = getattr(torch._C._functorch, "peek_interpreter_stack", None)
_forward_ad = torch.autograd.forward_ad  # its _current_level: ≥ 0 while a dual level is open


def transforms_running(*tensors: Tensor) -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, functionalize) is running: one look at
    functorch's interpreter stack (else, on a torch without it, whether one of ``tensors`` is
    wrapped). Inside one, xentkit's autograd Functions and NumPy views are not for it, even on
    tensors it does not wrap (``detach`` there hands out a wrapper without storage): torch ops
    are. So also for a tensor that carries a forward-mode tangent (``torch.autograd.forward_ad``):
    the Functions have no jvp, and torch's ops carry the tangents (looked for only while a dual
    level is open)."""
    if _forward_ad._current_level >= 0 and any(
        isinstance(tensor, Tensor) and _forward_ad.unpack_dual(tensor).tangent is not None for tensor in tensors
    ):
        return True
    if _PEEK_INTERPRETER_STACK is not None:
        return _PEEK_INTERPRETER_STACK() is not None
    return any(is_functorch_wrapped(tensor) for tensor in tensors if tensor is not None)


def is_functorch_wrapped(tensor: Tensor) -> bool:
    """Whether ``tensor`` is wrapped by a torch.func transform (vmap's batched tensors, grad's
    tracking tensors): its values cannot be read to branch on."""
    return _IS_FUNCTORCH_WRAPPED is not None and _IS_FUNCTORCH_WRAPPED(tensor)


def _is_plain_cpu_tensor(tensor: Tensor) -> bool:
    """A strided CPU tensor whose memory NumPy can view (no subclass, fake or functorch wrapper)."""
    if type(tensor) not in PLAIN_TENSOR_TYPES:
        return False
    if not tensor.is_cpu or tensor.layout != torch.strided or tensor.is_quantized:
        return False
    return not is_functorch_wrapped(tensor)


def runs_on_xentkit(
    input: Tensor, *others: Tensor | None, grad_free: tuple[Tensor | None, ...] = (),
    input_dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES, layer: tuple[Tensor | None, ...] = (),
) -> bool:
    """True when the call can run xentkit's NumPy api.

    ``input`` must be a plain CPU tensor of a kernel dtype (of ``input_dtypes``: a caller that
    widens half-precision inputs itself takes more), ``others`` (targets, weights) plain CPU
    tensors that NumPy can view (floating ones of a kernel dtype: not bfloat16), ``layer`` (a
    linear layer's weight and bias, of the input's dtype, which torch's matmuls read) plain CPU
    tensors, and the tensors in ``grad_free`` must not require a gradient when gradients are
    being recorded (the api differentiates with respect to the logits only; torch ops handle the
    rest).
    """
    if torch.compiler.is_compiling():  # first: nothing below is for the compiler to trace
        return False
    if input.dtype not in input_dtypes or not _is_plain_cpu_tensor(input) or transforms_running(input, *others, *layer):
        return False
    for tensor in layer:
        if tensor is not None and not _is_plain_cpu_tensor(tensor):
            return False
    for other in others:  # loops, not all(generator): this runs on every small call
        if other is not None and (
            not _is_plain_cpu_tensor(other)
            or (other.is_floating_point() and other.dtype not in KERNEL_DTYPES)  # bfloat16: no NumPy view
        ):
            return False
    if gradients_wanted():  # (a trace made under no_grad too: it freezes this choice)
        for tensor in grad_free:
            if tensor is not None and tensor.requires_grad:
                return False
    return True


def as_numpy(tensor: Tensor) -> np.ndarray:
    """A NumPy view of ``tensor``'s memory (detached); copied only when it is not contiguous."""
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    return tensor.numpy()


def as_numpy_by_classes(tensor: Tensor, class_dim: int) -> np.ndarray:
    """:func:`as_numpy` of logits whose classes lie innermost in memory while not last in shape
    (a ``torch.channels_last`` ``(N, C, H, W)`` tensor, or a ``[..., C]`` one moved to torch's
    class axis 1): viewed as they lie, with no copy, since the kernels read them class-last (the
    copy to torch's order had been undone by a second one, class-last again: channels_last
    cross-entropy took 2-3 times torch's time, a review)."""
    if class_dim != tensor.dim() - 1 and not tensor.is_contiguous() and not tensor.is_neg():
        class_last = tensor.detach().movedim(class_dim, -1)
        if class_last.is_contiguous():
            return np.moveaxis(class_last.numpy(), -1, class_dim)
    return as_numpy(tensor)


def optional_numpy(tensor: Tensor | None) -> np.ndarray | None:
    return None if tensor is None else as_numpy(tensor)


def as_tensor(array: np.ndarray | np.generic, dtype: torch.dtype | None = None) -> Tensor:
    """A tensor sharing ``array``'s memory (0-d arrays and NumPy scalars included)."""
    array = np.asarray(array)
    if not array.flags.writeable or (array.ndim and min(array.strides) < 0):
        array = array.copy()  # torch.from_numpy takes neither negative strides nor read-only memory
    tensor = torch.from_numpy(array)
    return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


def _graph_is_kept() -> bool:
    """True when the running backward keeps the graph (``retain_graph=True`` or ``create_graph``)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


def keep_for_backward(ctx: Any, gradients: dict[str, Tensor | None], *others: Tensor | None) -> None:
    """Keep what forward computed for backward: the ``gradients`` (by name) and ``others`` (what
    backward reads besides), in one ``ctx.save_for_backward``. As saved tensors they are what
    torch's saved-tensor hooks act on, as torch's own losses' saved log-softmax: a non-reentrant
    ``torch.utils.checkpoint`` drops them after forward and recomputes them in backward, and
    ``torch.autograd.graph.save_on_cpu`` offloads them. Backward reads them with
    :func:`kept_for_backward`, once."""
    ctx.kept_gradient_names = tuple(gradients)
    ctx.kept_others = len(others)
    ctx.save_for_backward(*others, *gradients.values())


def kept_for_backward(ctx: Any) -> tuple[tuple[Tensor | None, ...], dict[str, Tensor | None]]:
    """``(others, gradients)`` as :func:`keep_for_backward` kept them, unpacked once: backward may
    change a gradient in place (:func:`take_saved_gradient`), after which unpacking again would
    fail autograd's version check. A second backward without ``retain_graph=True`` raises
    torch's own error here (the saved tensors are freed), which says to retain the graph."""
    saved = ctx.saved_tensors
    count = ctx.kept_others
    return saved[:count], dict(zip(ctx.kept_gradient_names, saved[count:], strict=True))


def take_saved_gradient(gradients: dict[str, Tensor | None], name: str) -> tuple[Tensor, bool]:
    """The gradient forward kept under ``name`` (``gradients`` from :func:`kept_for_backward`),
    and whether backward now owns it.

    When the graph is not retained, autograd frees the saved tensors once this backward has run:
    backward may scale the gradient in place, and autograd can adopt it as ``.grad`` without a
    copy. When the graph is retained (``retain_graph=True``) it must stay untouched for the next
    backward.
    """
    gradient = gradients[name]
    assert gradient is not None  # (backward asks only for the gradients forward computed)
    return gradient, not _graph_is_kept()


_IS_LEGACY_BATCHED = getattr(torch._C._functorch, "is_legacy_batchedtensor", None) or (lambda tensor: False)


def batched_backward(*grad_outputs: Tensor | None) -> bool:
    """Whether a backward runs on a batch of upstream gradients at once: one of ``grad_outputs``
    is a batched tensor of torch's vmap over the backward, as ``torch.autograd.grad(...,
    is_grads_batched=True)`` makes it (and so ``jacobian``/``hessian(vectorize=True)`` and
    ``gradcheck(check_batched_grad=True)``: torch's legacy vmap), or ``torch.func.vmap`` around a
    ``torch.autograd.grad`` of a graph built outside it. Forward ran on plain tensors, so what
    it kept is plain; only the upstream gradient is batched: its values cannot be read (no
    ``item``, no NumPy view) nor written into a plain tensor (no in-place product). The backwards
    then take the gradient out of place with torch ops (:func:`batched_product`). One look per
    gradient (two C calls: ~0.3 µs in all, measured), once per backward; None (an unused output) is not
    batched."""
    for grad_output in grad_outputs:
        if grad_output is not None and (_IS_LEGACY_BATCHED(grad_output) or is_functorch_wrapped(grad_output)):
            return True
    return False


def batched_product(unit: Tensor, upstream: Tensor) -> Tensor:
    """``unit · upstream`` out of place (broadcast as the eager product), in ``unit``'s dtype: a
    batched backward's gradient (:func:`batched_backward`) from the gradient for an upstream of 1
    (ones per sample for "none"), which the gradient is linear in. A non-finite upstream gives
    the products entry by entry: NaN wherever the unit gradient is 0 (an ignored row, a class of
    probability 0), ±inf where torch's order of operations gives NaN (a target entry); torch's
    special values are kept in eager backward only."""
    return (unit * upstream).to(unit.dtype)


BATCHED_BACKWARD_CALLS = (
    "torch.autograd.grad(..., is_grads_batched=True), jacobian/hessian(vectorize=True), "
    "gradcheck(check_batched_grad=True)"
)


def refuse_batched_backward(loss: str, why: str, instead: str) -> NoReturn:
    """Raise the RuntimeError of a backward that cannot take a batched upstream gradient
    (:func:`batched_backward`): it names the ``loss`` (its full name), says ``why`` and what to
    do ``instead``, where torch's own message (a missing batching rule deep in the backward)
    named neither."""
    raise RuntimeError(
        f"{loss} has no batched backward ({BATCHED_BACKWARD_CALLS}): {why}; {instead}"
    )


def is_one(grad_output: Tensor, *, read_on_device: bool = False) -> bool:
    """Whether ``grad_output`` is a single 1 (``loss.backward()``'s), so that scaling by it is no
    work. Read on the CPU for free; on a GPU reading it waits for the device, which
    ``read_on_device`` accepts (worth it when the gradients are large next to that wait, as a
    linear layer's weight gradient) and which is otherwise avoided (False: the product is taken),
    as it is while a CUDA graph is being captured (a read breaks the capture:
    :func:`value_readable_now`). A batched upstream gradient (:func:`batched_backward`) has no
    value to read: False."""
    if grad_output.numel() != 1 or batched_backward(grad_output):
        return False
    return value_readable_now(grad_output.device, read_on_device) and grad_output.item() == 1.0


def all_finite(values: Tensor) -> bool:
    """Whether every entry of a CPU tensor is finite: one value read as a float, more by NumPy's
    one single-threaded sweep (torch's isfinite is 4 elementwise ops and a reduction, each waking
    its thread pool: on a loaded 2-core machine a review saw each take ~12 ms for the 65536
    upstream gradients of a "none" loss)."""
    if values.numel() == 1:
        return math.isfinite(values.item())
    if values.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(as_numpy(values)).all())
    return bool(torch.isfinite(values).all())


def value_readable_now(device: torch.device, read_on_device: bool) -> bool:
    """Whether a tensor's value on ``device`` may be read now: on the CPU always (free); on another
    device only when ``read_on_device`` accepts the wait for it, and never while the current CUDA
    stream is capturing a CUDA graph ("operation not permitted when stream is capturing"). The
    capture is asked about only for a CUDA tensor (CUDA is initialized then): a CPU-only call
    never touches ``torch.cuda``."""
    if device.type == "cpu":
        return True
    if not read_on_device:
        return False
    return not (device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def scale_gradient(
    gradient: Tensor, grad_output: Tensor, owned: bool, *, one: bool | None = None
) -> Tensor:
    """``gradient · grad_output`` (broadcast), in place when ``owned``; no work when it is 1
    (``one``: :func:`is_one` already asked, else asked here without waiting for a device). A
    gradient that is not owned (the graph is retained, so the next backward needs it intact) is
    never handed out itself: the caller may change what it receives in place. A batched
    ``grad_output`` (:func:`batched_backward`) gives :func:`batched_product`, out of place.
    """
    if batched_backward(grad_output):
        return batched_product(gradient, grad_output)
    if is_one(grad_output) if one is None else one:
        return gradient if owned else gradient.clone()
    # grad_output as it comes (not first cast to the gradient's dtype: a loss scaler's float32
    # 65536 on a float32 loss of float16 logits is inf in float16); torch multiplies in the wider
    # dtype and rounds once into the gradient's
    if owned:
        return gradient.mul_(grad_output)
    return (gradient * grad_output).to(gradient.dtype)


# where the fused linear forms' forward keeps the gradients of (input, linear_weight, linear_bias)
LINEAR_GRADIENT_NAMES = ("grad_input", "grad_weight", "grad_bias")


def hand_over_gradients(
    ctx: Any, names: tuple[str, ...], grad_output: Tensor, *, read_one_on_device: bool = False
) -> list[Tensor | None]:
    """The gradients forward kept under ``names`` (one per input, in order, by
    :func:`keep_for_backward`), each taken (:func:`take_saved_gradient`) and scaled
    (:func:`scale_gradient`); None for the
    inputs that need none. Whether ``grad_output`` is 1 is read once (:func:`is_one`, with
    ``read_one_on_device``)."""
    one = is_one(grad_output, read_on_device=read_one_on_device)
    _, kept = kept_for_backward(ctx)
    gradients: list[Tensor | None] = []
    for index, name in enumerate(names):
        if not ctx.needs_input_grad[index]:
            gradients.append(None)
            continue
        gradient, owned = take_saved_gradient(kept, name)
        gradients.append(scale_gradient(gradient, grad_output, owned, one=one))
    return gradients


# what has a second derivative in place of the log-prob forms (there is no torch.nn.functional loss)
LOG_PROBS_DOUBLE_BACKWARD = "torch.log_softmax(logits / T, dim=-1) gathered at the targets"


def first_order_only(
    function_name: str, instead: str = "the torch.nn.functional loss"
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a ``backward`` as not differentiable: differentiating its result raises (its message
    names ``instead``, the torch computation that has a second derivative).

    Like ``torch.autograd.function.once_differentiable``, but the guard is set whenever the
    backward runs with ``create_graph=True``, also when the upstream gradient does not itself
    require a gradient: once_differentiable then returns a gradient that silently has no
    history, so a gradient penalty built on it would be silently dropped.
    """
    message = (
        f"xentkit.torch.{function_name} has no second derivative (its gradient is computed by "
        f"xentkit's kernels outside autograd); use {instead} for double backward / create_graph=True"
    ).encode()

    def decorate(backward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grad_outputs: Tensor) -> Any:
            if not torch.is_grad_enabled():  # the usual backward (no create_graph): nothing to guard
                return backward(ctx, *grad_outputs)
            with torch.no_grad():
                outputs = backward(ctx, *grad_outputs)
            # the error node must lead to the Function's inputs: torch.autograd.grad(..., inputs)
            # runs only the nodes on a path to its inputs; and to the upstream gradients that have
            # a history (per-sample loss weights differentiated through the first gradient: that
            # path was cut, and the second derivative came back without its term, a review)
            with torch.enable_grad():
                upstream = tuple(
                    _anchor(g) for g in grad_outputs if isinstance(g, torch.Tensor) and g.requires_grad
                )
            anchors = tuple(getattr(ctx, "first_order_anchors", ())) + upstream
            raise_later = torch._C._functions.DelayedError(message, len(outputs) + len(anchors))

            def fake_requires_grad(gradient: Tensor | None) -> Tensor | None:
                if gradient is None:
                    return None
                gradient = gradient.detach()
                gradient.requires_grad_(True)
                return gradient

            guarded = raise_later(*[fake_requires_grad(gradient) for gradient in outputs], *anchors)
            return guarded[: len(outputs)] if anchors else guarded

        return wrapper

    return decorate


def first_order_anchors(ctx: Any, *tensors: Tensor | None) -> None:
    """Store on ``ctx`` empty tensors whose autograd history leads to ``tensors`` (those that
    require a gradient). Every forward whose backward wears :func:`first_order_only` calls this:
    the anchors connect that error to the Function's inputs, so that
    ``torch.autograd.grad(penalty, inputs)`` (which runs only the nodes on a path to its
    inputs) meets it. They copy no data, keep no input memory alive and check no versions.
    """
    with torch.enable_grad():
        ctx.first_order_anchors = tuple(
            _anchor(tensor) for tensor in tensors if tensor is not None and tensor.requires_grad
        )


# by device: no copy per call. Made on first use, never as an inference tensor (a review: one made
# under torch.inference_mode, the module imported there or a device's first call made there, could
# not be saved for backward, and every later training call raised)
_NO_INDEX: dict[torch.device, Tensor] = {}


def _anchor(tensor: Tensor) -> Tensor:
    """An empty tensor with its own (empty) storage whose history leads to ``tensor``: one
    ``index_select`` of no rows (which saves only the empty index and the shape), or for a 0-d
    tensor an empty strided view cloned."""
    if tensor.dim() == 0:
        return tensor.as_strided((0,), (1,)).clone()
    index = _NO_INDEX.get(tensor.device) if type(tensor) in PLAIN_TENSOR_TYPES else None  # (not a fake's)
    if index is None:
        with torch.inference_mode(False):
            index = torch.empty(0, dtype=torch.long, device=tensor.device)
        if type(index) is torch.Tensor:  # a real tensor (under a fake mode, not kept for later)
            _NO_INDEX[tensor.device] = index
    return torch.index_select(tensor, 0, index)


def legacy_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """Map torch's deprecated ``size_average`` / ``reduce`` to a reduction string, like torch."""
    if size_average is None and reduce is None:
        return reduction
    return torch.nn._reduction.legacy_get_string(size_average, reduce)
