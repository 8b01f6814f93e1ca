"""The loss options, validated once: the one home of every rule about them.

Every entry point (the NumPy api, ``xentkit.torch``'s functions and modules,
``linear_cross_entropy``, the vocabulary-parallel functions) builds one :class:`LossOptions` at
its boundary and passes that object down; nothing below re-checks an option. Framework-free:
NumPy integers and floats are accepted wherever Python ones are, and no torch import happens here.

Each mistake has one exception type and one message, written here only:

- a value of the wrong type (a string for ``z_loss``, a float for ``ignore_index``, a bool for
  anything numeric): ``TypeError`` naming the argument, what was expected and what came;
- a value of the right type outside its range (``label_smoothing`` 1.5, ``z_loss`` NaN,
  ``softcap`` 0, ``ignore_index`` beyond int64, ``chunk_size`` 0, an unknown ``reduction``):
  ``ValueError``;
- the choices (``reduction``, ``backend``): ``ValueError`` for any value not among them, of
  whatever type (``reduction=None`` included), as torch's losses raise for ``reduction``.

Adding an option: a field below with its check in ``__post_init__``; if the formula uses it, mark
it ``formula=True`` so that :meth:`LossOptions.formula_arguments` hands it to the NumPy reference
and to each kernel's host function, which implement it; then the docs and the tests. Nothing in
between (api, torch binding, linear and distributed forms) names it.

:class:`LogProbOptions` is the same for the token log-probabilities and entropies
(``xentkit.log_probs``, ``xentkit.torch.log_probs`` and ``linear_log_probs``): a sampling
``temperature`` beside the ``ignore_index``, ``chunk_size`` and ``backend`` rules above, which it
shares.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import reprlib
import sys
import warnings
from pathlib import Path
from typing import Any, SupportsFloat, SupportsIndex, TypeAlias

import numpy as np

__all__ = [
    "BACKENDS", "CHOICES", "REDUCTIONS", "Integer", "LogProbOptions", "LossOptions", "Real", "describe", "loss_options",
]

REDUCTIONS = ("none", "mean", "sum")
BACKENDS = ("auto", "triton", "torch")
# The allowed values of each option that takes a string.
CHOICES = {"reduction": REDUCTIONS, "backend": BACKENDS}

# The types the public signatures give the numeric options (``label_smoothing``, ``z_loss``,
# ``softcap``, ``temperature``; ``ignore_index``), for type checkers: what the checks below take. A
# real number of any kind (Python's, NumPy's, a 0-d array or tensor; torch's own losses take a 0-d
# tensor) and an integer of any kind (NumPy's, a one-value integer tensor).
Real: TypeAlias = float | SupportsFloat
Integer: TypeAlias = int | SupportsIndex
_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


def _is_torch_tensor(value: object) -> bool:
    """Whether ``value`` is a torch tensor (or one of its subclasses), without importing torch."""
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype") and hasattr(value, "shape")


# the repr of a received value, cut short as it is made (a 2000 × 1000 ragged list's whole repr
# took 0.4 s, to keep its first 120 characters)
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = _SHORT_REPR.maxset = 12
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 120
_SHORT_REPR.maxlevel = 3


def dtype_name(dtype: object) -> str:
    """A NumPy or torch dtype's name for messages ("float32", not "torch.float32"); called only
    when a message is made (``str`` of a NumPy dtype costs microseconds a small call notices)."""
    return str(dtype).removeprefix("torch.")


def describe(value: object) -> str:
    """A short description of a received value for error messages."""
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    if _is_torch_tensor(value):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"a torch tensor of dtype {dtype} and shape {tuple(value.shape)}"  # (its repr: many lines)
    return f"{type(value).__name__} {_SHORT_REPR.repr(value)}"[:120]


def as_array(value: object, name: str) -> np.ndarray:
    """``np.asarray(value)`` (no copy when it is one), or a ``TypeError`` naming the argument when
    NumPy cannot make one array of it (a ragged list, say) or when it holds masked entries, whose
    mask ``np.asarray`` would drop (their hidden values used as if they were data); a masked array
    with nothing masked is its data. An array that holds no numbers (None, a string, a dict:
    object, string, structured or date dtypes) is that ``TypeError`` too, naming what came."""
    if type(value) is np.ndarray:
        if value.dtype.kind in _NOT_NUMBERS:
            raise TypeError(f"{name} must be a numeric array, got {describe(value)}")
        return value
    masked = _masked_parts(value)
    if masked:
        if not any(np.ma.is_masked(part) for part in masked):
            return as_array(np.asarray(value.data if isinstance(value, np.ma.MaskedArray) else value), name)
        raise TypeError(
            f"{name} must be a plain array, got a NumPy masked array, whose mask would be ignored: pass "
            f"its .filled(...) values (a loss skips samples through ignore_index or a weight of 0)"
        )
    try:
        array = np.asarray(value)
    except Exception as error:
        hint = f": {error}"
        if _is_torch_tensor(value):  # a tensor NumPy cannot take as it is
            hint = (
                " (the NumPy API takes NumPy arrays; for torch tensors, with autograd, on any device and "
                "in bfloat16, use xentkit.torch, or pass tensor.detach().cpu().numpy())"
            )
        raise TypeError(f"{name} must be a numeric array, got {describe(value)}{hint}") from None
    if array.dtype.kind in _NOT_NUMBERS:
        raise TypeError(f"{name} must be a numeric array, got {describe(value)}")
    return array


# The NumPy kinds the binary losses' elementwise factors take: a weight may be a bool mask (1 or
# 0, as torch), a pos_weight may not; complex is neither (torch refuses both)
FACTOR_KINDS = {"weight": "fiub", "pos_weight": "fiu"}


def check_factor_kind(name: str, kind: str, value: object) -> None:
    """A binary loss's ``weight`` or ``pos_weight`` of NumPy ``kind`` (a tensor's by
    ``_bridge.numpy_kind``), else a ``TypeError`` naming it and what came (``value``, described
    only then): the one rule of every path, the kernels' and torch's ops'."""
    if kind not in FACTOR_KINDS[name]:
        raise TypeError(f"{name} must be a numeric array, got {describe(value)}")


# NumPy's kinds of arrays that hold no numbers: objects, bytes, strings, structured, dates and times
_NOT_NUMBERS = "OSUVMm"


def _masked_parts(value: object) -> list[np.ma.MaskedArray]:
    """The masked arrays ``value`` is or holds, at any depth of lists and tuples of arrays or
    lists (rows of them, wherever they are). A list of numbers is not looked through: an array
    among numbers is a ragged list, which ``np.asarray`` refuses anyway (but for a 0-d one,
    which it reads as a number: a masked one becomes NaN, with NumPy's warning)."""
    if isinstance(value, np.ma.MaskedArray):
        return [value]
    if not _holds_arrays_or_lists(value):
        return []
    found = []
    sequences = (list, tuple)
    for part in value:  # (a loop, inlined: rows are many)
        if type(part) in sequences:
            if part and isinstance(part[0], (list, tuple, np.ndarray)):
                found.extend(_masked_parts(part))
        elif isinstance(part, np.ma.MaskedArray):
            found.append(part)
    return found


def _holds_arrays_or_lists(value: object) -> bool:
    return type(value) in (list, tuple) and bool(value) and isinstance(value[0], (list, tuple, np.ndarray))


def refuse_valueless(value: object, name: str, expected: str) -> None:
    """A ``TypeError`` for a meta tensor, which has a shape and a dtype but no value to read, and
    for a NumPy masked array with masked entries, whose hidden values would be read as the value
    (as :func:`as_array` refuses them)."""
    if _is_torch_tensor(value) and getattr(getattr(value, "device", None), "type", None) == "meta":
        raise TypeError(f"{name} must be {expected}, got {describe(value)} on the meta device, which holds no value")
    if isinstance(value, np.ma.MaskedArray) and np.ma.is_masked(value):
        raise TypeError(f"{name} must be {expected}, got a masked value (a NumPy masked array), which holds none")


def _real(value: object, name: str, expected: str) -> float:
    if type(value) is float:  # the common case, without the numbers.Real ABC check
        return value + 0.0  # -0.0 becomes 0.0: one value, one encoding
    refuse_valueless(value, name, expected)
    # (a 0-d tensor of a real number is taken; on a device it is read below: one wait)
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)) and not _one_real_number(value):
        if getattr(value, "requires_grad", False) and getattr(value, "shape", None) == ():
            raise TypeError(
                f"{name} must be {expected}, got a 0-d tensor that requires grad: {name} is an option and "
                "gets no gradient here (detach it, or pass a float)"
            )
        raise TypeError(f"{name} must be {expected}, got {describe(value)}")
    try:
        return float(value) + 0.0
    except OverflowError:  # (an int beyond float64)
        raise ValueError(f"{name} must be {expected}, got an integer beyond float64's range") from None


def _one_real_number(value: object) -> bool:
    """Whether ``value`` is a 0-d array or tensor of real numbers (``torch.tensor(0.1)``, as torch's
    own losses take for a float option), not of bools or complex numbers."""
    if getattr(value, "shape", None) != () or not hasattr(value, "__float__") or getattr(value, "requires_grad", False):
        return False  # (one that requires grad: torch refuses it too, an option has no gradient)
    dtype = str(getattr(value, "dtype", "")).removeprefix("torch.")
    return dtype.startswith(("float", "int", "uint", "bfloat"))


def _finite(value: float) -> bool:
    """Whether ``value`` is finite, by comparisons only: also for the symbolic floats that
    ``torch.compile(dynamic=True)`` passes (``math.isfinite`` refuses them)."""
    return -math.inf < value < math.inf


def _compiling() -> bool:
    """Whether torch.compile traces this call (False where torch was never imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def callers_level() -> int:
    """The ``stacklevel`` that points a warning raised by the caller of this function at the
    first frame outside xentkit and torch: the user's call, whichever path led here (the api,
    ``xentkit.torch``'s functions or modules, their autograd Functions, the options' dataclass
    ``__init__``, which Python writes as ``<string>``)."""
    internal = [str(Path(__file__).parent)]
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "__file__", None):
        internal.append(str(Path(torch.__file__).parent))
    prefixes = tuple(internal)

    def inside(code: Any) -> bool:
        return code.co_filename.startswith(prefixes) or (code.co_filename == "<string>" and code.co_name == "__init__")

    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and inside(frame.f_code):
        frame, level = frame.f_back, level + 1
    return level


def check_reduction(value: object) -> str:
    if isinstance(value, str) and value == "elementwise_mean":  # torch's deprecated alias, which it still takes
        if _compiling():  # (torch.compile traces no warning: the eager call gives it)
            return "mean"
        warnings.warn(
            "reduction='elementwise_mean' is deprecated, please use reduction='mean' instead", UserWarning,
            stacklevel=callers_level(),
        )
        return "mean"
    if not isinstance(value, str) or value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {value!r}")
    return str(value)


def check_backend(value: object) -> str:
    if not isinstance(value, str) or value not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', 'triton', 'torch', got {value!r}")
    return str(value)


def check_ignore_index(value: object) -> int:
    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:  # the common case, fast
        return value
    if isinstance(value, bool | np.bool_) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        raise TypeError(f"ignore_index must be an int, got {describe(value)}")
    refuse_valueless(value, "ignore_index", "an int")
    if not isinstance(value, numbers.Integral):
        try:  # an integer of another kind that says so: a one-value integer tensor, as torch takes
            value = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"ignore_index must be an int, got {describe(value)}") from None
    if not _INT64_MIN <= int(value) <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64, got {int(value)}")
    return int(value)


def _check_label_smoothing(value: object) -> float:
    value = _real(value, "label_smoothing", "a float in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {value}")
    return value


def _check_z_loss(value: object) -> float:
    value = _real(value, "z_loss", "a non-negative float")
    if not (value >= 0.0 and _finite(value)):
        raise ValueError(f"z_loss must be a finite float >= 0, got {value}")
    return value


def _check_softcap(value: object) -> float | None:
    if value is None:
        return None
    value = _real(value, "softcap", "None or a positive float")
    if not (value > 0.0 and _finite(value)):
        raise ValueError(f"softcap must be None or a finite float > 0, got {value}")
    return value


def check_temperature(value: object) -> float:
    value = _real(value, "temperature", "a positive float")
    if not (value > 0.0 and _finite(value)):
        raise ValueError(f"temperature must be a finite float > 0, got {value}")
    return value


def check_flag(value: object, name: str) -> bool:
    """A yes/no argument (``inplace_backward``, ``return_entropy``...): a bool (NumPy's too)."""
    if value is True or value is False:  # the common case, without the isinstance check
        return value
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return bool(value)


def select_outputs(results: tuple[Any, Any, Any], return_entropy: bool, return_lse: bool) -> Any:
    """``log_probs``' result from its ``(log_p, entropy, lse)``: ``log_p`` alone, or a tuple of
    those asked for (in that order); the flags are checked booleans (:func:`check_flag`)."""
    log_p, entropy, lse = results
    chosen = (log_p, *((entropy,) if return_entropy else ()), *((lse,) if return_lse else ()))
    return chosen[0] if len(chosen) == 1 else chosen


def _check_inplace_backward(value: object) -> bool:
    return check_flag(value, "inplace_backward")


def _check_check_labels(value: object) -> bool:
    return check_flag(value, "check_labels")


def _check_accumulate_in_float32(value: object) -> bool:
    return check_flag(value, "accumulate_in_float32")


def check_chunk_size(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"chunk_size must be None or a positive int, got {describe(value)}")
    if int(value) < 1:
        raise ValueError(f"chunk_size must be None or a positive int, got {int(value)}")
    return int(value)  # NumPy integers welcome


# Each field's check, in field order (the order of the public signatures).
_CHECKS = {
    "reduction": check_reduction,
    "ignore_index": check_ignore_index,
    "label_smoothing": _check_label_smoothing,
    "z_loss": _check_z_loss,
    "softcap": _check_softcap,
    "chunk_size": check_chunk_size,
    "backend": check_backend,
    "inplace_backward": _check_inplace_backward,
    "check_labels": _check_check_labels,
    "accumulate_in_float32": _check_accumulate_in_float32,
}


def _formula(default: Any) -> Any:
    return dataclasses.field(default=default, metadata={"formula": True})


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The options of a softmax cross-entropy loss, checked and normalised on construction.

    ``LossOptions(z_loss=1e-4)`` raises on a bad value (see the module docstring) and stores
    plain Python values (``int``, ``float``, ``None``, ``str``), so instances compare and hash by
    value and can cross process boundaries.

    Attributes:
        reduction: "none", "mean" or "sum" (see :mod:`xentkit.reference.reductions`).
        ignore_index: the label that marks a sample to skip; any int64.
        label_smoothing: ε in [0, 1].
        z_loss: λ ≥ 0, finite: adds λ·logsumexp² per non-ignored sample.
        softcap: None or s > 0, finite: the logits become s·tanh(logits/s) first.
        chunk_size: rows per chunk of the fused linear forms, or None for their default.
        backend: which implementation ``xentkit.torch`` runs: "auto" (CUDA tensors → the Triton
            kernels, CPU tensors → the Numba kernels, what neither handles → torch ops),
            "triton", or "torch" (plain torch ops).
        inplace_backward: write the logits' gradient over the logits (no logits-sized gradient
            buffer; the logits' values are gone once the loss is computed), where the path can.
        check_labels: refuse a label outside ``[0, C)`` that is not ``ignore_index`` with a
            ValueError (True), or leave it unchecked where checking costs a wait for the device
            (False: the Triton and torch-ops paths then make that row's loss and gradient NaN,
            reading nothing out of bounds; the CPU kernels always check, at no such cost). Under
            torch.compile nothing may wait, so those paths never check there, whatever it says.
        accumulate_in_float32: the fused linear forms add each chunk's weight and bias gradients
            into float32 buffers for float16/bfloat16 weights and round once at the end (True),
            or add them in the weight's dtype, one rounding per chunk (False: no float32 copy of
            the weight gradient, 2 bytes per weight less); float32/float64 weights lose nothing
            either way.
    """

    reduction: str = "mean"
    ignore_index: int = _formula(-100)
    label_smoothing: float = _formula(0.0)
    z_loss: float = _formula(0.0)
    softcap: float | None = _formula(None)
    chunk_size: int | None = None
    backend: str = "auto"
    inplace_backward: bool = False
    check_labels: bool = True
    accumulate_in_float32: bool = True

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():  # in field order: the first bad argument is named
            object.__setattr__(self, name, check(getattr(self, name)))

    def check_fits(self, dtype: object, largest: float, smallest: float) -> None:
        """Refuse a softcap outside [``smallest``, ``largest``], the smallest normal and the largest
        finite value of ``dtype`` (NumPy's or torch's ``finfo``: ``tiny`` and ``max``), the dtype
        the loss is computed in: ``softcap=1e39`` in float32 would turn every capped logit into
        NaN, and so would a subnormal one (its reciprocal overflows) or one that rounds to 0."""
        if self.softcap is not None and not smallest <= self.softcap <= largest:
            dtype_name = str(dtype).removeprefix("torch.")
            raise ValueError(
                f"softcap must be between the smallest normal {dtype_name} value ({smallest:.6g}) and "
                f"the largest ({largest:.6g}) for a loss computed in {dtype_name}, got {self.softcap}"
            )

    def formula_arguments(self) -> dict[str, Any]:
        """The options the formula itself takes, as keyword arguments of the NumPy reference
        (``xentkit.reference.cross_entropy_and_grad``) and of each kernel's host function."""
        return {name: getattr(self, name) for name in _FORMULA_FIELDS}

    def replace(self, **changes: Any) -> LossOptions:
        """A copy with ``changes`` applied; only they are checked again."""
        unknown = sorted(set(changes) - set(_CHECKS))
        if unknown:
            raise TypeError(f"LossOptions has no option {unknown[0]!r}")
        copy = object.__new__(LossOptions)
        for name, check in _CHECKS.items():
            object.__setattr__(copy, name, check(changes[name]) if name in changes else getattr(self, name))
        return copy


# The names of the formula's options, in field order (looked up once, not per call).
_FORMULA_FIELDS = tuple(f.name for f in dataclasses.fields(LossOptions) if f.metadata.get("formula"))

# Every field of LossOptions with its default, in field order: the positional calls of
# ``loss_options`` are built from it, so no caller spells the defaults again.
FIELD_DEFAULTS: tuple[tuple[str, Any], ...] = tuple((f.name, f.default) for f in dataclasses.fields(LossOptions))
_DEFAULT_VALUES = tuple(default for _, default in FIELD_DEFAULTS)
_FIELD_INDEX = {name: index for index, (name, _) in enumerate(FIELD_DEFAULTS)}


def fields_with(**given: Any) -> list[Any]:
    """The positional fields of ``LossOptions`` / ``loss_options``: the defaults, with ``given``
    in their places (the default objects themselves, so ``loss_options``' identity check of the
    last call still applies)."""
    values = list(_DEFAULT_VALUES)
    for name, value in given.items():
        values[_FIELD_INDEX[name]] = value
    return values

# Options already built from plain Python values: a training loop passes the same ones every step,
# and checking them again costs microseconds that small problems notice (benchmarks/bench_small.py).
_BUILT: dict[tuple[Any, ...], LossOptions] = {}
_BUILT_MAX = 256
_PLAIN_TYPES = frozenset((str, int, float, bool, type(None)))


def loss_options(*fields: Any) -> LossOptions:
    """``LossOptions(*fields)`` (positional, in field order), built and checked once per distinct
    call of plain Python values and reused after that. Other values (NumPy numbers, tensors,
    symbolic floats under ``torch.compile``) are checked every time. Types are part of the key,
    so ``1``, ``1.0`` and ``True`` are three calls (the third one refused). The very objects of
    the last call skip even the key."""
    global _LAST
    last_fields, last_options = _LAST
    if len(fields) == len(last_fields) and all(map(operator.is_, fields, last_fields)):
        return last_options  # the very objects of the last call (a loop's defaults): ~0.3 µs
    types = tuple(map(type, fields))
    if not _PLAIN_TYPES.issuperset(types):
        return LossOptions(*fields)
    key = (fields, types)
    options = _BUILT.get(key)
    if options is None:
        options = LossOptions(*fields)  # raises on a bad value: nothing is kept
        if "elementwise_mean" in fields:  # torch's deprecated name: not kept, so that every call warns
            return options
        if len(_BUILT) >= _BUILT_MAX:
            _BUILT.clear()
        _BUILT[key] = options
    _LAST = (fields, options)  # (one assignment: another thread reads both or neither)
    return options


# the plain values of the last call and their options (objects compared by identity: the same
# objects are the same values of the same types)
_LAST: tuple[tuple[Any, ...], Any] = ((), None)


_LOG_PROB_CHECKS = {
    "temperature": check_temperature,
    "ignore_index": check_ignore_index,
    "chunk_size": check_chunk_size,
    "backend": check_backend,
    "check_labels": _check_check_labels,
}


@dataclasses.dataclass(frozen=True)
class LogProbOptions:
    """The options of the token log-probabilities and entropies, checked on construction (the
    messages of :class:`LossOptions` for the fields they share).

    Attributes:
        temperature: T > 0, finite: the distribution is softmax(logits / T).
        ignore_index: the target that marks a position to skip (log-prob 0, entropy 0, no
            gradient); any int64.
        chunk_size: rows per chunk of ``linear_log_probs``, or None for its default.
        backend: "auto", "triton" or "torch", as for :class:`LossOptions`.
        check_labels: refuse a target outside ``[0, V)`` that is not ``ignore_index``, as for
            :class:`LossOptions` (where the check would wait for the device, False skips it and
            such a position's log-probability is NaN).
    """

    temperature: float = 1.0
    ignore_index: int = -100
    chunk_size: int | None = None
    backend: str = "auto"
    check_labels: bool = True

    def __post_init__(self) -> None:
        for name, check in _LOG_PROB_CHECKS.items():
            object.__setattr__(self, name, check(getattr(self, name)))

    def check_fits(self, dtype: object, smallest: float) -> None:
        """Refuse a temperature outside [``smallest``, 1/``smallest``], ``smallest`` the smallest
        normal value of ``dtype`` (NumPy's or torch's ``finfo(...).tiny``), the dtype the logits are
        scaled in: every path multiplies them by 1/T, which loses digits for a subnormal T and
        overflows for the smallest ones (then every log-probability is NaN where logits/T is
        finite); above 1/``smallest``, 1/T is subnormal (digits lost) or 0 (a masked class's
        −inf·0 is NaN)."""
        if not smallest <= self.temperature <= 1.0 / smallest:
            dtype_name = str(dtype).removeprefix("torch.")
            if self.temperature < smallest:
                expected = f"at least the smallest normal {dtype_name} value ({smallest:.6g})"
                why = "a subnormal T has lost digits, and the smallest ones' reciprocal overflows"
            else:
                expected = f"at most the reciprocal of the smallest normal {dtype_name} value ({1.0 / smallest:.6g})"
                why = "a larger T's reciprocal is subnormal or 0"
            raise ValueError(
                f"temperature must be {expected} for logits scaled in {dtype_name} ({why}), got {self.temperature}"
            )

    def replace(self, **changes: Any) -> LogProbOptions:
        """A copy with ``changes`` applied (and checked)."""
        unknown = sorted(set(changes) - set(_LOG_PROB_CHECKS))
        if unknown:
            raise TypeError(f"LogProbOptions has no option {unknown[0]!r}")
        return dataclasses.replace(self, **changes)
