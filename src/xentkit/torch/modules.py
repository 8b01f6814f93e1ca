"""``nn.Module`` losses: subclasses of torch's, so ``isinstance``, ``state_dict`` (the ``weight`` and
``pos_weight`` buffers) and the legacy ``size_average`` / ``reduce`` handling are torch's own;
only ``forward`` changes, to call :mod:`xentkit.torch.functional`.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from .._options import (
    FIELD_DEFAULTS,
    Integer,
    LossOptions,
    Real,
    check_factor_kind,
    describe,
    fields_with,
)
from . import _bridge, functional
from ._linear_checks import chunk_size_of
from .linear_cross_entropy import linear_cross_entropy

__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss", "LinearCrossEntropyLoss", "NLLLoss"]

# the fused linear form always turns its chunks' logits into their gradient in place
_NOT_LINEAR = ("inplace_backward",)
# and only the fused linear form has chunks and accumulates across them
_LINEAR_ONLY = ("chunk_size", "accumulate_in_float32")


# The loss options a module keeps as attributes of the same names (torch's own ones included),
# as (name, default) of every LossOptions field, in order: a new field reaches forward and repr
# here, and a module without a field (chunk_size on CrossEntropyLoss) passes the default
_FIELD_DEFAULTS = FIELD_DEFAULTS
_FIELD_NAMES, _FIELD_VALUES = (tuple(column) for column in zip(*_FIELD_DEFAULTS, strict=True))
_FIELD_NAME_SET = frozenset(_FIELD_NAMES)


class _NotScriptable:
    """``torch.jit.script`` of a model holding one of these modules says why it cannot be, and
    what works instead, rather than failing inside TorchScript's compiler on a helper (it calls
    each submodule's ``__prepare_scriptable__`` first)."""

    def __prepare_scriptable__(self) -> torch.nn.Module:
        raise RuntimeError(
            f"xentkit.torch.{type(self).__name__} cannot be scripted (torch.jit.script): its forward "
            "runs xentkit's kernels through Python; use torch.compile, torch.export or torch.jit.trace, "
            f"or torch.nn.{type(self).__name__} in a model that must be scripted"
        )


# The class attribute where a module class keeps the option fields it defines (not a dict keyed by
# class, which kept every class made on the fly alive, nor an lru_cache, at which torch.compile warns)
_CLASS_FIELDS = "_xentkit_option_fields"


def _fields_on_class(cls: type, compiling: bool) -> frozenset[str]:
    """The option fields a module class (or a base) defines itself, e.g. as a property; kept on
    the class, unless ``compiling`` (a traced graph would guard on it)."""
    fields = None if compiling else cls.__dict__.get(_CLASS_FIELDS)
    if fields is None:
        fields = frozenset(name for name, _ in _FIELD_DEFAULTS if any(name in vars(base) for base in cls.__mro__))
        if not compiling:
            type.__setattr__(cls, _CLASS_FIELDS, fields)
    return fields


def _loss_options_of(module: torch.nn.Module) -> LossOptions:
    """The module's options as one checked object (built once per distinct set of values), read
    on every step: from the instance's ``__dict__``, else from its class, else the default. (A
    field the module lacks, ``chunk_size`` on ``CrossEntropyLoss``, would otherwise go through
    ``nn.Module.__getattr__`` and its AttributeError: microseconds each.) Read on every call and
    handed to ``_options.loss_options``, whose caches serve a loop's unchanged values without
    checking them again (compared by identity and by type, and never kept for values that may
    change in place, a 0-d tensor say). A review had found options a module kept itself stale
    after a 0-d tensor option changed in place, a value written into ``__dict__``, or an
    assignment racing a call."""
    attributes = module.__dict__
    compiling = torch.compiler.is_compiling()
    on_class = _fields_on_class(type(module), compiling)
    if not on_class:  # the usual module: every value in its __dict__ or the default
        return functional.cached_options()(*map(attributes.get, _FIELD_NAMES, _FIELD_VALUES))
    return functional.cached_options()(*[
        attributes[name] if name in attributes else getattr(module, name) if name in on_class else default
        for name, default in _FIELD_DEFAULTS
    ])


def _options_of(module: torch.nn.Module, *, skip: tuple[str, ...] = ()) -> dict[str, object]:
    # defaults for fields a module saved by an older xentkit lacks (torch.save of the module)
    return {name: getattr(module, name, default) for name, default in _FIELD_DEFAULTS if name not in skip}


def _check_layer_sizes(in_features: object, num_classes: object, out_features: object) -> tuple[int, ...]:
    """The fused linear module's layer sizes, or a TypeError/ValueError naming the argument
    (torch's constructor raised from inside ``torch.empty``, naming none): ``in_features`` an int
    >= 0, ``num_classes`` an int >= 1 (or what says it is one, as torch takes: a one-value
    integer tensor), ``out_features`` a tuple of ints >= 1 (the target's extra dimensions);
    returns ``out_features`` as a tuple. (The loss options are checked where every call checks
    them, at ``forward``: a subclass may set them after this constructor, as torch's allows.)"""
    for name, value, smallest in (("in_features", in_features, 0), ("num_classes", num_classes, 1)):
        try:
            if isinstance(value, bool) or str(getattr(value, "dtype", "")) == "torch.bool":
                raise TypeError
            value = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{name} must be an int >= {smallest}, got {describe(value)}") from None
        if value < smallest:
            raise ValueError(f"{name} must be an int >= {smallest}, got {value}")
    if not isinstance(out_features, tuple | list) or not all(
        isinstance(size, numbers.Integral) and not isinstance(size, bool) and size >= 1 for size in out_features
    ):
        raise TypeError(
            f"out_features must be a tuple of ints >= 1 (the target's dimensions after the batch), got "
            f"{describe(out_features)}"
        )
    return tuple(int(size) for size in out_features)


def _options_repr(options: dict[str, object]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in options.items())


class CrossEntropyLoss(_NotScriptable, torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` on xentkit's fused kernels, plus ``z_loss`` and ``softcap``.

    Arguments and shapes as torch's; the formula, the extras and the differences from torch (a
    "mean" of nothing is 0, double backward raises) are in :func:`xentkit.torch.cross_entropy`.

    Example:
        >>> import torch
        >>> import xentkit.torch as xt
        >>> criterion = xt.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
        >>> criterion(torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([0]))
        tensor(0.3918)
    """

    # (what the attributes hold once checked, for type checkers: arithmetic on them, an annealed
    # z_loss say, type-checks as torch's own label_smoothing: float does)
    z_loss: float
    softcap: float | None

    def __init__(
        self,
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
    ) -> None:
        _bridge.check_class_weight(weight, None)  # (torch's buffer assignment: a TypeError naming neither)
        functional.cached_options()(*fields_with(label_smoothing=label_smoothing))  # (torch's: a RuntimeError)
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = cast(float, z_loss)
        self.softcap = cast("float | None", softcap)
        self.check_probabilities = check_probabilities
        self.backend = backend
        self.inplace_backward = inplace_backward
        self.check_labels = check_labels

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional._cross_entropy_with_options(
            input, target, self.weight, _loss_options_of(self), self.check_probabilities
        )

    def extra_repr(self) -> str:
        check = getattr(self, "check_probabilities", True)  # (a module saved before the field)
        return _options_repr(_options_of(self, skip=_LINEAR_ONLY) | {"check_probabilities": check})


class NLLLoss(_NotScriptable, torch.nn.NLLLoss):
    """``torch.nn.NLLLoss`` on xentkit's api; see :func:`xentkit.torch.nll_loss`.

    Example:
        >>> import torch
        >>> import xentkit.torch as xt
        >>> xt.NLLLoss()(torch.tensor([[-0.2, -1.7]]), torch.tensor([1]))
        tensor(1.7000)
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: Integer = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        *,
        check_labels: bool = True,
    ) -> None:
        _bridge.check_class_weight(weight, None)  # (torch's buffer assignment: a TypeError naming neither)
        super().__init__(weight, size_average, ignore_index, reduce, reduction)
        self.check_labels = check_labels

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.nll_loss(
            input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            check_labels=getattr(self, "check_labels", True),  # a module saved before the field
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index!r}, "
            f"check_labels={getattr(self, 'check_labels', True)!r}"
        )


class BCEWithLogitsLoss(_NotScriptable, torch.nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` on xentkit's api; see
    :func:`xentkit.torch.binary_cross_entropy_with_logits`.

    Example:
        >>> import torch
        >>> import xentkit.torch as xt
        >>> xt.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0]))(torch.tensor([0.5]), torch.tensor([1.0]))
        tensor(0.9482)
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        pos_weight: Tensor | None = None,
    ) -> None:
        for name, factor in (("weight", weight), ("pos_weight", pos_weight)):
            # (torch's buffer assignment: a TypeError naming neither; a complex factor's imaginary
            # part dropped at forward)
            _bridge.check_tensor(factor, name, optional=True)
            if factor is not None:
                check_factor_kind(name, _bridge.numpy_kind(factor.dtype), factor)
        super().__init__(weight, size_average, reduce, reduction, pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )


# torch.nn.LinearCrossEntropyLoss exists in recent torch releases; subclass it where it does, else
# nn.Module. Type checkers, which cannot follow the choice, see torch's class: with a torch older
# than 2.10 installed they cannot resolve it, and the module's base is unknown to them there.
if TYPE_CHECKING:
    from torch.nn import LinearCrossEntropyLoss as _TorchLinearCrossEntropyLoss
else:
    _TorchLinearCrossEntropyLoss = getattr(torch.nn, "LinearCrossEntropyLoss", torch.nn.Module)


class LinearCrossEntropyLoss(_NotScriptable, _TorchLinearCrossEntropyLoss):
    """A linear layer and cross-entropy fused: ``CrossEntropyLoss()(self.linear(input), target)``
    without the full logits; see :func:`xentkit.torch.linear_cross_entropy`.

    A subclass of ``torch.nn.LinearCrossEntropyLoss`` where torch has it (``isinstance`` holds,
    the same arguments including ``out_features``, the same ``self.linear`` and buffers, so state
    dicts load both ways), with ``z_loss``, ``softcap``, ``chunk_size``, ``backend``,
    ``check_labels`` and ``accumulate_in_float32``; of torch's ``options`` only
    ``batch_chunk_size`` is used (as :func:`xentkit.torch.linear_cross_entropy`). Shapes: input
    ``[N, in_features]`` or ``[in_features]``; target ``[N]`` (class indices;
    ``[N, *out_features]`` with ``out_features``) or ``[N, num_classes]`` (probabilities).

    Example:
        >>> import torch
        >>> import xentkit.torch as xt
        >>> _ = torch.manual_seed(0)
        >>> head = xt.LinearCrossEntropyLoss(4, 10)
        >>> loss = head(torch.randn(8, 4), torch.randint(0, 10, (8,)))
        >>> loss.shape
        torch.Size([])
        >>> isinstance(head, torch.nn.LinearCrossEntropyLoss)
        True
    """

    z_loss: float  # (as CrossEntropyLoss's)
    softcap: float | None

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: Integer | None = None,
        label_smoothing: Real = 0.0,
        options: object = None,
        z_loss: Real = 0.0,
        softcap: Real | None = None,
        chunk_size: int | None = None,
        backend: str = "auto",
        check_labels: bool = True,
        accumulate_in_float32: bool = True,
    ) -> None:
        out_features = _check_layer_sizes(in_features, num_classes, out_features)
        chunk_size_of(options, chunk_size)  # (torch's options: checked here, read at each call)
        _bridge.check_class_weight(weight, num_classes)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            # (torch's Linear: an error from inside torch.empty or Parameter, or a complex layer
            # every forward then refused)
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {describe(dtype)}")
        # the one check of label_smoothing (torch's constructor raised its own RuntimeError first)
        functional.cached_options()(*fields_with(label_smoothing=label_smoothing))
        if _TorchLinearCrossEntropyLoss is not torch.nn.Module:
            super().__init__(
                in_features, num_classes, out_features=tuple(out_features), bias=bias, device=device,
                dtype=dtype, reduction=reduction, weight=weight, ignore_index=ignore_index,
                label_smoothing=label_smoothing, options=options,
            )
        else:  # an older torch: the same attributes, built here
            super().__init__()
            self.register_buffer("weight", weight)
            self.num_classes = num_classes
            self.out_features = tuple(out_features)
            self.reduction = reduction
            self.ignore_index = ignore_index
            self.label_smoothing = label_smoothing
            self.options = options
            self.linear = torch.nn.Linear(
                in_features, math.prod(out_features, start=num_classes), bias=bias, device=device,
                dtype=dtype,
            )
        self.z_loss = cast(float, z_loss)
        self.softcap = cast("float | None", softcap)
        self.chunk_size = chunk_size
        self.backend = backend
        self.check_labels = check_labels
        self.accumulate_in_float32 = accumulate_in_float32

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        shape = (self.num_classes, *self.out_features)
        linear_weight = self.linear.weight
        linear_bias = self.linear.bias
        if self.out_features:  # classes on axis 1, then out_features (torch's K-dimensional loss)
            linear_weight = linear_weight.reshape(*shape, self.linear.in_features)
            linear_bias = None if linear_bias is None else linear_bias.reshape(shape)
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            options=getattr(self, "options", None),  # (a module saved by an older xentkit lacks it)
            **_options_of(self, skip=_NOT_LINEAR),
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
            + _options_repr(_options_of(self, skip=_NOT_LINEAR))
            + ("" if getattr(self, "options", None) is None else f", options={self.options!r}")
        )
