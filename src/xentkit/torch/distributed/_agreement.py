"""Validation, then agreement between ranks: the first collective of every call.

Each rank checks its own arguments and summarises them in one int64 record (:data:`_FIELDS`);
the records are all-gathered, and the checks that need every rank's record (the vocabulary size,
labels against it, equal targets, weights and options, shards that tile the vocabulary) run
identically on every rank. Bad input anywhere raises on every rank, naming the rank, instead of
leaving the others waiting in a later collective. Option values are checked by
:class:`xentkit._options.LossOptions` (:class:`~xentkit._options.LogProbOptions` for the
log-probabilities) and labels worded by :mod:`xentkit._labels`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import struct
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..._labels import LabelError, as_class_indices, label_error
from ..._options import CHOICES, LogProbOptions, LossOptions
from .._bridge import check_class_weight, check_dense, transforms_running
from .._linear_checks import SHARDS, check_linear
from ._communication import CommunicationStats, _Communicator

# Every field of every options class travels in the record (the union of their fields, each
# name once, in the classes' field order), so ranks that disagree on any option (a new one
# included) raise; _encode_option / _decode_option turn each value into one int64 and back. A
# field the call's options class lacks (temperature for a loss, reduction for log-probabilities)
# travels as _NONE.
_OPTION_CLASSES = (LossOptions, LogProbOptions)
_OPTION_TYPES = {
    field.name: str(field.type) for kind in reversed(_OPTION_CLASSES) for field in dataclasses.fields(kind)
}
_OPTION_NAMES = tuple(dict.fromkeys(field.name for kind in _OPTION_CLASSES for field in dataclasses.fields(kind)))
_NONE = -(2**63)  # an optional option left None, or absent (no option's value encodes to this)
Options = LossOptions | LogProbOptions

# One int64 record per rank, all-gathered before any other collective.
_FIELDS = (
    "failed",  # 1 when this rank's local checks raised (the message follows in a second gather)
    "function",  # which function this rank called, an index into _FUNCTIONS
    "rows",  # N, the number of samples
    "shape_digest",  # blake2b of the samples' shape (N = their product): ranks agree on the layout
    "width",  # V_r, this rank's number of classes
    "start",  # vocab_start, or -1 for None
    "min_label", "min_position",  # the smallest non-ignored label and its (flat) position, -1: none
    "max_label", "max_position",  # the largest
    "target_digest", "weight_digest",  # blake2b of the int64 labels / float64 class weights
    "weight_length",  # len(weight), or -1 for None
    *(f"option_{name}" for name in _OPTION_NAMES),  # the options (every class's fields), one int64 each
    "features",  # the linear form's D (0 for the logits form)
    "dtype",  # the logits' (or the linear form's input's) dtype, an index into _DTYPES (-1: other)
    "wants_input_grad",  # 1 when this rank needs ∂loss/∂input (the linear form's all-reduce)
    # whether this rank's result has an autograd graph (1) or not (0), where the input gradient
    # is all-reduced in backward (the linear forms' "none", the log-probabilities); -1 elsewhere
    "backward_graph",
    # blake2b of the package's chunk budget (CHUNK_FRACTION, CHUNK_BUDGET_BYTES, CHUNK_FLOOR_BYTES)
    # as this rank reads it: it sets the linear forms' number of chunks, and so of collectives
    "chunk_budget",
)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_FUNCTIONS = (
    "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "vocab_parallel_linear_log_probs",
)

# Longest error message exchanged between ranks (bytes of UTF-8).
_MESSAGE_BYTES = 1024


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _encode_option(name: str, value: object) -> int:
    if value is None:
        return _NONE
    if isinstance(value, str):
        return CHOICES[name].index(value)
    if isinstance(value, float):
        return _float_bits(value)  # the options classes store no -0.0, whose bits are _NONE's
    return int(value)  # type: ignore[call-overload]


def _decode_option(name: str, encoded: int) -> object:
    kind = _OPTION_TYPES[name]
    if encoded == _NONE and kind != "int":  # None, or absent (only a plain int may be -2**63)
        return None
    if kind.startswith("str"):
        return CHOICES[name][encoded]
    if kind.startswith("float"):
        return _bits_float(encoded)
    if kind == "bool":
        return bool(encoded)
    return encoded


def _digest(array: np.ndarray) -> int:
    """A 64-bit fingerprint of ``array``'s bytes: ranks compare these instead of the data."""
    return int.from_bytes(hashlib.blake2b(array.tobytes(), digest_size=8).digest(), "little", signed=True)


@dataclasses.dataclass(frozen=True)
class _Agreement:
    """What every rank knows after the gather, identically."""

    world_size: int
    rank: int
    vocab_size: int
    starts: tuple[int, ...]
    widths: tuple[int, ...]
    wants_input_grad: bool  # any rank needs ∂loss/∂input (the linear form all-reduces it)

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def width(self) -> int:
        return self.widths[self.rank]


# ---------------------------------------------------------------------------------------------
# Local checks (this rank's arguments only)
# ---------------------------------------------------------------------------------------------


def _check_vocab_start(vocab_start: object) -> int:
    if vocab_start is None:
        return -1
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral):
        raise TypeError(f"vocab_start must be None or an int in [0, 2**63), got {type(vocab_start).__name__} {vocab_start!r}")
    if not 0 <= vocab_start < 2**63:  # (a class index is an int64)
        raise ValueError(f"vocab_start must be None or an int in [0, 2**63), got {vocab_start!r}")
    return int(vocab_start)


def _check_device(tensor: Tensor, name: str) -> None:
    """A tensor with data: the meta device has none, and would fail inside the first collective,
    after the other ranks entered it."""
    if tensor.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (it has no data); pass a CPU or GPU tensor")


def _check_linear_shards(
    input: object, linear_weight_shard: object, linear_bias_shard: object, *, saves_operands: bool
) -> tuple[int, int]:
    """The linear forms' tensors: ``input`` ``[..., D]``, this rank's ``[V_r, D]`` weight rows
    (``V_r`` may be 0) and ``[V_r]`` bias (or None), one dtype and device, by the fused linear
    forms' one rule (``xentkit.torch._linear_checks``); returns ``(D, V_r)``. ``saves_operands``:
    whether the call saves them for backward (the log-probabilities, and "none"; "mean" and "sum"
    compute every gradient in forward and save nothing), where an inference tensor is refused."""
    width, features = check_linear(input, linear_weight_shard, linear_bias_shard, SHARDS, no_rows=True)  # type: ignore[arg-type]
    _check_device(input, "input")  # type: ignore[arg-type]
    operands = {"input": input, "linear_weight_shard": linear_weight_shard, "linear_bias_shard": linear_bias_shard}
    present = {name: tensor for name, tensor in operands.items() if isinstance(tensor, Tensor)}
    if saves_operands and torch.is_grad_enabled() and any(tensor.requires_grad for tensor in present.values()):
        # autograd would refuse to save it in forward, after the collectives: the other ranks
        # would then wait in backward's all-reduce
        for name, tensor in present.items():
            if tensor.is_inference():
                raise ValueError(
                    f"{name} was made under torch.inference_mode (an inference tensor), which autograd "
                    "cannot save for backward; make it (or a clone of it) outside inference mode"
                )
    return features, width


def _check_weight(weight: object) -> np.ndarray | None:
    """The class weights as float64 on the CPU (for the digest and the length), or None."""
    if weight is None:
        return None
    check_class_weight(weight, None)  # (its length, V's, once the ranks have agreed on V)
    _check_device(weight, "weight")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "weight requires a gradient, but vocab-parallel cross-entropy treats class weights as "
            "constants; pass weight.detach()"
        )
    return weight.detach().to("cpu", torch.float64).contiguous().numpy()


def _check_target(target: object, sample_shape: tuple[int, ...], shape_of: str, *inputs: object) -> np.ndarray:
    """The labels as a flat int64 CPU array (every rank holds all N of them). ``inputs``: the
    call's other tensors, refused with the target under a torch.func transform or while they
    carry forward-mode tangents (the Functions have no jvp).

    A floating target with a class axis after the sample shape (the shard's or the full
    vocabulary's) is a probability target, which this form does not support: ``ValueError``.
    Any other target goes through :func:`xentkit._labels.as_class_indices` (a non-integer dtype
    is a ``TypeError``, a wrong shape a ``ValueError``).
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor of class indices, got {type(target).__name__}")
    if transforms_running(target, *inputs):  # (every form checks its target here, before any collective)
        raise ValueError(
            "the vocabulary-parallel functions do not run under torch.func transforms (vmap, grad, "
            "jvp) or on tensors with forward-mode tangents: their label checks and collectives need "
            "the tensors' values, and their autograd Functions have no jvp"
        )
    check_dense(target, "target")
    _check_device(target, "target")
    rank = len(sample_shape)
    dtype_name = str(target.dtype).removeprefix("torch.")
    if target.is_floating_point() and target.dim() == rank + 1 and tuple(target.shape[:rank]) == sample_shape:
        raise ValueError(
            f"target must hold integer class indices (int64), got dtype {dtype_name}; "
            "probability targets are not supported in the vocab-parallel form"
        )
    labels = target.detach().cpu().resolve_conj().resolve_neg()
    if labels.is_floating_point() or labels.is_complex():
        # bfloat16 and complex32 have no NumPy dtype; a non-integer target is an error, and only
        # the kind of its dtype (named by dtype_name) matters for the message
        labels = labels.to(torch.complex64 if labels.is_complex() else torch.float32)
    labels_array = as_class_indices(
        labels.numpy(), sample_shape, expected_shape=f"({shape_of})", dtype_name=dtype_name
    )
    return labels_array.reshape(-1)


def _has_graph(grad_enabled: bool, *tensors: object) -> bool:
    """Whether a result computed from ``tensors`` gets an autograd graph (so that its rank can
    call backward)."""
    return grad_enabled and any(isinstance(tensor, Tensor) and tensor.requires_grad for tensor in tensors)


def _label_extremes(labels: np.ndarray, ignore_index: int) -> tuple[int, int, int, int]:
    valid = labels != ignore_index
    if not valid.any():
        return 0, -1, -1, -1
    info = np.iinfo(np.int64)
    low = int(np.argmin(np.where(valid, labels, info.max)))
    high = int(np.argmax(np.where(valid, labels, info.min)))
    return int(labels[low]), low, int(labels[high]), high


def _local_record(
    *,
    sample_shape: tuple[int, ...],
    width: int,
    vocab_start: object,
    labels: np.ndarray,
    weight: np.ndarray | None,
    options: Options,
    dtype: torch.dtype,
    features: int = 0,
    wants_input_grad: bool = False,
    backward_graph: bool | None = None,
) -> dict[str, int]:
    """This rank's record (:data:`_FIELDS`) from its checked arguments (``labels`` flat, of the
    samples' shape ``sample_shape``); ``backward_graph``:
    whether this rank's result has a graph, for the forms that all-reduce in backward (None
    for the others)."""
    low, low_at, high, high_at = _label_extremes(labels, options.ignore_index)
    return {
        "sample_shape": sample_shape,  # (kept on this rank, not gathered: to name a label's position)
        "failed": 0,
        "rows": labels.shape[0],
        "shape_digest": _digest(np.asarray(sample_shape, dtype=np.int64)),
        "width": width,
        "start": _check_vocab_start(vocab_start),
        "min_label": low,
        "min_position": low_at,
        "max_label": high,
        "max_position": high_at,
        "target_digest": _digest(labels),
        "weight_digest": 0 if weight is None else _digest(weight + 0.0),  # (+ 0.0: −0.0 is 0.0)
        "weight_length": -1 if weight is None else int(weight.shape[0]),
        **{f"option_{name}": _encode_option(name, getattr(options, name, None)) for name in _OPTION_NAMES},
        "features": features,
        "dtype": _DTYPES.index(dtype) if dtype in _DTYPES else -1,
        "wants_input_grad": int(wants_input_grad),
        "backward_graph": -1 if backward_graph is None else int(backward_graph),
        "chunk_budget": _digest(np.asarray(chunk_budget(), dtype=np.int64)),
    }


def chunk_budget() -> tuple[int, int, int]:
    """The package's chunk budget as this rank reads it now, at call time: ``(CHUNK_FRACTION,
    CHUNK_BUDGET_BYTES, CHUNK_FLOOR_BYTES)`` (the linear forms' ``_rows._chunk_rows`` and the
    validation record)."""
    from . import CHUNK_BUDGET_BYTES, CHUNK_FLOOR_BYTES, CHUNK_FRACTION

    return int(CHUNK_FRACTION), int(CHUNK_BUDGET_BYTES), int(CHUNK_FLOOR_BYTES)


# ---------------------------------------------------------------------------------------------
# The gather and the global checks (every rank's record)
# ---------------------------------------------------------------------------------------------


def _encode(message: str) -> Tensor:
    data = message.encode("utf-8")[:_MESSAGE_BYTES]
    # (on the CPU whatever the default device: the communicator moves it)
    buffer = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8, device="cpu")
    buffer[: len(data)] = torch.tensor(list(data), dtype=torch.uint8, device="cpu")
    return buffer


def _decode(buffer: Tensor) -> str:
    return bytes(buffer.tolist()).rstrip(b"\0").decode("utf-8", errors="replace")


def _differing(records: Sequence[dict[str, int]], field: str) -> list[int]:
    """The ranks whose ``field`` differs from rank 0's."""
    return [rank for rank, record in enumerate(records) if record[field] != records[0][field]]


def _odd_ones(records: Sequence[dict[str, int]], field: str) -> str:
    """Which ranks to blame for a ``field`` the ranks disagree on: those outside the largest group
    of equal values (rank 0's group on a tie), e.g. "rank(s) [0] differ from rank(s) [1, 2]" when
    rank 0 alone passed another target."""
    groups: dict[int, list[int]] = {}
    for rank, record in enumerate(records):
        groups.setdefault(record[field], []).append(rank)
    largest = max(groups.values(), key=len)
    if len(largest) == len(groups[records[0][field]]):  # a tie: rank 0's group
        largest = groups[records[0][field]]
    odd = [rank for rank in range(len(records)) if rank not in largest]
    return f"rank(s) {odd} differ from rank(s) {largest}"


def _function_mismatch(records: Sequence[dict[str, int]]) -> str | None:
    """The problem of ranks that called different vocabulary-parallel functions, or None."""
    if not _differing(records, "function"):
        return None
    names = [_FUNCTIONS[record["function"]] for record in records]
    return f"every rank must call the same function, got {names} on ranks 0..{len(records) - 1}"


def _global_problems(
    records: Sequence[dict[str, int]], sample_shape: tuple[int, ...] | None = None
) -> tuple[list[str], bool]:
    """Checks that need every rank's record; every rank finds the same problems. Also whether one
    of them is a bad label (raised as a LabelError, an IndexError as torch's too)."""
    problems: list[str] = []
    bad_label = False
    world = len(records)
    mismatch = _function_mismatch(records)
    if mismatch is not None:  # (then nothing else compares: each form has its own record)
        return [mismatch], False
    rows = [record["rows"] for record in records]
    if len(set(rows)) > 1:
        problems.append(f"every rank must hold the same N samples, got N = {rows} on ranks 0..{world - 1}")
    elif _differing(records, "shape_digest"):
        problems.append(
            "every rank must hold its samples in the same shape (the input's shape without its last "
            f"axis), but in the arrangement of the N = {rows[0]} samples {_odd_ones(records, 'shape_digest')}"
        )
    widths = [record["width"] for record in records]
    vocab_size = sum(widths)
    if vocab_size == 0:
        problems.append(f"the vocabulary must have at least one class, got shard widths {widths} on ranks 0..{world - 1}")
    classes = f"the vocabulary has V = {vocab_size} classes (the ranks' shard widths {widths} added up)"
    # identical targets (equal digests) are reported once, differing ones rank by rank
    targets_agree = not _differing(records, "target_digest")
    sources = [("", records[0])] if targets_agree else [(f"rank {r}: ", rec) for r, rec in enumerate(records)]
    for prefix, record in sources:
        for label, position, bad in (
            ("min_label", "min_position", record["min_label"] < 0),
            ("max_label", "max_position", record["max_label"] >= vocab_size),
        ):
            if record[position] >= 0 and bad:
                error = label_error(
                    record[label], _position(record[position], sample_shape, records), vocab_size,
                    record["option_ignore_index"],
                    classes=classes, name=f"{prefix}target",
                )
                problems.append(str(error))
                bad_label = True
    if _differing(records, "chunk_budget"):
        problems.append(
            "xentkit.torch.distributed's CHUNK_FRACTION, CHUNK_BUDGET_BYTES and CHUNK_FLOOR_BYTES must be "
            f"the same on every rank (they set the number of chunks, and so of collectives), but in their "
            f"values {_odd_ones(records, 'chunk_budget')}"
        )
    for name in _OPTION_NAMES:
        if _differing(records, f"option_{name}"):
            values = [_decode_option(name, record[f"option_{name}"]) for record in records]
            problems.append(f"{name} must be the same on every rank, got {values} on ranks 0..{world - 1}")
    if not problems and _differing(records, "target_digest"):  # (a bad label explains it already)
        problems.append(
            f"target must be the same on every rank (the labels of all N samples, replicated), "
            f"but in the labels {_odd_ones(records, 'target_digest')}"
        )
    lengths = [record["weight_length"] for record in records]
    if any(length not in (-1, vocab_size) for length in lengths) or len(set(lengths)) > 1:
        problems.append(
            f"weight must be None on every rank or the full ({vocab_size},) class-weight vector on "
            f"every rank, got lengths {['None' if n < 0 else n for n in lengths]} on ranks 0..{world - 1}"
        )
    elif _differing(records, "weight_digest"):
        problems.append(
            f"weight must be the same on every rank, but in the class weights {_odd_ones(records, 'weight_digest')}"
        )
    if _differing(records, "dtype"):
        names = [str(_DTYPES[r["dtype"]]).removeprefix("torch.") if r["dtype"] >= 0 else "other" for r in records]
        problems.append(
            f"the logits (or the input) must have one dtype on every rank, got {names} on ranks 0..{world - 1}"
        )
    graphs = [record["backward_graph"] for record in records]
    if any(record["wants_input_grad"] for record in records) and {0, 1} <= set(graphs):
        problems.append(
            "the input's gradient is all-reduced in backward, so every rank must call backward: "
            f"rank(s) {[r for r, g in enumerate(graphs) if g == 0]} get a result without a graph "
            "(torch.no_grad, or no tensor that requires grad) while the others do"
        )
    features = [record["features"] for record in records]
    if len(set(features)) > 1:
        problems.append(f"input must have the same in_features on every rank, got {features}")
    starts = [record["start"] for record in records]
    given = [start >= 0 for start in starts]
    if any(given) and not all(given):
        problems.append(
            f"vocab_start must be given on every rank or on none, got {['None' if s < 0 else s for s in starts]}"
        )
    elif all(given):
        spans = sorted(zip(starts, widths, range(world), strict=True))
        expected = 0
        for start, width, rank in spans:
            if width == 0:
                continue
            if start != expected:
                problems.append(
                    f"the shards must tile the vocabulary [0, {vocab_size}) without gaps or overlaps, "
                    f"got (vocab_start, width) = {list(zip(starts, widths, strict=True))} on ranks 0..{world - 1} "
                    f"(rank {rank} starts at {start}, expected {expected})"
                )
                break
            expected = start + width
    return problems, bad_label


def _position(flat: int, sample_shape: tuple[int, ...] | None, records: Sequence[dict[str, int]]) -> tuple[int, ...]:
    """A label's position in the target as the caller shaped it (``[s, b]`` say), from its flat
    index: with this rank's sample shape, which every rank shares when their digests agree."""
    if sample_shape is None or _differing(records, "shape_digest") or not 0 <= flat < math.prod(sample_shape):
        return (flat,)
    return tuple(int(index) for index in np.unravel_index(flat, sample_shape))


def _agree(
    communicator: _Communicator, function: str, local_checks: Callable[[], dict[str, int]]
) -> _Agreement:
    """Run this rank's checks, all-gather every rank's record and raise on every rank if any
    rank's input is bad. The gather is the first collective of the call.
    """
    error: Exception | None = None
    sample_shape = None
    try:
        stats = communicator.stats
        if stats is not None and not isinstance(stats, CommunicationStats):
            raise TypeError(
                f"stats must be None or a xentkit.torch.distributed.CommunicationStats, got {type(stats).__name__}"
            )
        record = local_checks() | {"function": _FUNCTIONS.index(function)}
        sample_shape = record.get("sample_shape")
        local = torch.tensor([record[field] for field in _FIELDS], dtype=torch.int64, device="cpu")
    except Exception as exc:  # any local failure must still reach the gather, or the others hang
        error = exc
        local = torch.zeros(len(_FIELDS), dtype=torch.int64, device="cpu")
        local[_FIELDS.index("failed")] = 1
        local[_FIELDS.index("function")] = _FUNCTIONS.index(function)
    gathered = communicator.all_gather(local)
    records = [dict(zip(_FIELDS, piece.tolist(), strict=True)) for piece in gathered]
    world = communicator.world_size
    failed = [rank for rank, entry in enumerate(records) if entry["failed"]]
    if failed:
        messages = communicator.all_gather(_encode(str(error) if error is not None else ""))
        details = "; ".join(f"rank {rank}: {_decode(messages[rank])}" for rank in failed)
        text = f"xentkit.torch.{function}: invalid input on rank(s) {failed} of {world} — {details}"
        mismatch = _function_mismatch(records)  # (the failure's record says which function it was in)
        if mismatch is not None:
            text += f"; and {mismatch}"
        if isinstance(error, TypeError):
            raise TypeError(text) from error
        raise ValueError(text) from error
    problems, bad_label = _global_problems(records, sample_shape)
    if problems:
        kind = LabelError if bad_label else ValueError
        ranks = f"{world} rank" if world == 1 else f"{world} ranks"
        raise kind(f"xentkit.torch.{function}: invalid input (checked across {ranks}) — " + "; ".join(problems))
    widths = tuple(entry["width"] for entry in records)
    if records[0]["start"] >= 0:
        starts = tuple(entry["start"] for entry in records)
    else:
        starts = tuple(int(s) for s in np.concatenate([[0], np.cumsum(widths)[:-1]]))
    return _Agreement(
        world_size=world,
        rank=communicator.rank,
        vocab_size=int(sum(widths)),
        starts=starts,
        widths=widths,
        wants_input_grad=any(entry["wants_input_grad"] for entry in records),
    )
