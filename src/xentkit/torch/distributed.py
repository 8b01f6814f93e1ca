"""Cross-entropy over a vocabulary split across tensor-parallel ranks, without gathering logits.

When the output layer is split by vocabulary (Megatron-LM's column-parallel output layer and its
``vocab_parallel_cross_entropy``), rank r holds the columns ``[start_r, start_r + V_r)`` of the
logits z (N × V). Softmax cross-entropy needs only four numbers per row from the whole row, and
each is a max or a sum of per-shard pieces (see :mod:`xentkit.kernels.vocab_parallel`)::

    M   = max_r m_r                          m_r = max over shard r          all-reduce MAX  (N)
    S   = Σ_r s_r·exp(t_r − M)               s_r = Σ_shard exp(z_j − t_r)     ┐
    z_y = Σ_r [y in shard r]·z_y                                              ├ all-reduce SUM
    S_z = Σ_r Σ_shard w_j·z_j                (label smoothing only)           ┘ (2N or 3N)
    lse = M + log S

so a step communicates O(N) float64s (24·N or 32·N bytes per rank), never O(N·V). Then, on every
rank, with class weights w (ones by default), W = Σ_c w_c, smoothing ε, z-loss λ:

    loss_i = (1 − ε)·w_y·(lse − z_y) + (ε/V)·(W·lse − S_z) + λ·lse²          (0 for ignored rows)

and rank r computes its own columns of the gradient locally, p_j = exp(z_j − lse):

    ∂loss_i/∂z_j = g_i·(p_j·((1 − ε)·w_y + ε·W/V) − (1 − ε)·w_y·[j = y] − ε·w_j/V) + g^z_i·2·λ·lse·p_j

with g_i, g^z_i the reduction's coefficients ("mean": 1/Σ w_y over non-ignored rows and 1/(number
of non-ignored rows); "sum" and "none": 1). The loss equals, on every rank, the single-process
``xentkit.torch.cross_entropy`` / ``torch.nn.functional.cross_entropy`` (plus xentkit's z-loss) of
the full logits, and each rank's gradient is its slice of the full gradient.

Before any other collective every call validates its input locally and all-gathers one small
int64 record per rank (error flag, row count, shard width and start, label range, digests of
target and class weights, the options): bad input on any rank raises a ``ValueError`` on every
rank naming the rank and the problem, instead of leaving the others waiting in a collective. The
same record gives the shard offsets when ``vocab_start`` is None (rank order).

The fused form :func:`vocab_parallel_linear_cross_entropy` computes the logits chunk by chunk
from the rank's rows of the output weight and all-reduces each chunk's statistics; its input is
replicated, so its gradient ``∂loss/∂x = Σ_r dz_r·W_r`` is all-reduced (SUM, N·D floats), the
standard tensor-parallel cost of a column-parallel layer's backward.

Both functions are the same on any ``torch.distributed`` group (gloo on CPU, NCCL on GPU) and
with no process group at all (a single process holding the whole vocabulary).
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
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = [
    "CommunicationStats",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_shard_range",
]

REDUCTIONS = ("none", "mean", "sum")
_KERNEL_DTYPES = (torch.float32, torch.float64)

# Set to False to run the shard passes on torch ops even where the Numba kernels apply (tests
# use it to check the torch-ops path, which CUDA tensors and float16/bfloat16 always take).
USE_KERNELS = True

# Temporaries of the torch-ops path: a chunk of rows takes at most this many bytes per buffer.
TORCH_CHUNK_BYTES = 8 * 2**20

# Chunk sizing of the linear form, as xentkit.torch.linear_cross_entropy: a chunk's logits take at
# most 1/16 of the shard's logits and at most the budget, but at least the floor.
CHUNK_FRACTION = 16
CHUNK_BUDGET_BYTES = 16 * 2**20
CHUNK_FLOOR_BYTES = 2 * 2**20

# Longest error message exchanged between ranks (bytes of UTF-8).
_MESSAGE_BYTES = 1024


# ---------------------------------------------------------------------------------------------
# Communication
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CommunicationStats:
    """Counts one rank's collectives, for checking that communication is O(N), not O(N·V).

    Pass the same object to several calls to accumulate. Bytes are those of the tensor this rank
    hands to the collective: an all-reduce counts its tensor, an all-gather its gathered output
    (world size × the rank's piece). A world of one process makes no collective and counts 0.
    """

    all_reduce_calls: int = 0
    all_reduce_bytes: int = 0
    all_gather_calls: int = 0
    all_gather_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.all_reduce_bytes + self.all_gather_bytes

    def reset(self) -> None:
        self.all_reduce_calls = self.all_reduce_bytes = 0
        self.all_gather_calls = self.all_gather_bytes = 0


class _Communicator:
    """The collectives of one call on ``group``, counted into ``stats``; none in a world of one.

    Collectives run on the device the backend wants: CPU for gloo (and MPI), the current CUDA
    device for NCCL, the tensors' own device otherwise.
    """

    def __init__(self, group: object, device: torch.device, stats: CommunicationStats | None) -> None:
        self.group = group
        self.stats = stats
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise ValueError(
                    "group was given but torch.distributed has no process group initialized; call "
                    "torch.distributed.init_process_group first (or pass group=None in a single process)"
                )
            self.world_size, self.rank, self.device = 1, 0, device
            return
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of group; every rank of the group must call")
        backend = str(dist.get_backend(group)).lower()
        if backend in ("gloo", "mpi"):
            self.device = torch.device("cpu")
        elif backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:  # mixed ("cpu:gloo,cuda:nccl") or another backend: the tensors' device
            self.device = device

    def all_reduce(self, tensor: Tensor, op: dist.ReduceOp) -> Tensor:
        """``tensor`` reduced over the group (in place when it already lives on the device)."""
        if self.world_size == 1:
            return tensor
        if self.stats is not None:
            self.stats.all_reduce_calls += 1
            self.stats.all_reduce_bytes += tensor.numel() * tensor.element_size()
        moved = tensor.to(self.device).contiguous()
        dist.all_reduce(moved, op=op, group=self.group)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (one shape on all ranks), in rank order, on the CPU."""
        if self.world_size == 1:
            return [tensor.cpu()]
        moved = tensor.to(self.device).contiguous()
        pieces = [torch.empty_like(moved) for _ in range(self.world_size)]
        if self.stats is not None:
            self.stats.all_gather_calls += 1
            self.stats.all_gather_bytes += self.world_size * moved.numel() * moved.element_size()
        dist.all_gather(pieces, moved, group=self.group)
        return [piece.cpu() for piece in pieces]


def vocab_shard_range(vocab_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """Columns ``[start, stop)`` of rank ``rank``'s shard when ``vocab_size`` classes are split
    as evenly as possible in rank order: the first ``V mod P`` ranks get one class more
    (``numpy.array_split``'s convention; Megatron requires V divisible by P).

    >>> [vocab_shard_range(11, 4, r) for r in range(4)]
    [(0, 3), (3, 6), (6, 9), (9, 11)]
    """
    if world_size < 1 or not 0 <= rank < world_size or vocab_size < 0:
        raise ValueError(
            f"vocab_shard_range needs vocab_size >= 0 and 0 <= rank < world_size, got "
            f"vocab_size={vocab_size}, world_size={world_size}, rank={rank}"
        )
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# ---------------------------------------------------------------------------------------------
# Validation, then agreement between ranks
# ---------------------------------------------------------------------------------------------

# One int64 record per rank, all-gathered before any other collective.
_FIELDS = (
    "failed",  # 1 when this rank's local checks raised (the message follows in a second gather)
    "rows",  # N, the number of samples
    "width",  # V_r, this rank's number of classes
    "start",  # vocab_start, or -1 for None
    "min_label", "min_position",  # the smallest non-ignored label and its (flat) position, -1: none
    "max_label", "max_position",  # the largest
    "target_digest", "weight_digest",  # blake2b of the int64 labels / float64 class weights
    "weight_length",  # len(weight), or -1 for None
    "reduction", "ignore_index", "label_smoothing_bits", "z_loss_bits",  # the options
    "chunk_size",  # the linear form's chunk_size, -1 for None (0 for the logits form)
    "features",  # the linear form's D (0 for the logits form)
    "wants_input_grad",  # 1 when this rank needs ∂loss/∂input (the linear form's all-reduce)
)


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _digest(array: np.ndarray) -> int:
    """A 64-bit fingerprint of ``array``'s bytes: ranks compare these instead of the data."""
    return int.from_bytes(hashlib.blake2b(array.tobytes(), digest_size=8).digest(), "little", signed=True)


@dataclasses.dataclass(frozen=True)
class _Options:
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float


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


def _check_real(value: object, name: str, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    return float(value)


def _check_options(
    ignore_index: object, reduction: object, label_smoothing: object, z_loss: object
) -> _Options:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    if not -(2**63) <= int(ignore_index) < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    smoothing = _check_real(label_smoothing, "label_smoothing", "a float in [0, 1]")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {smoothing}")
    z = _check_real(z_loss, "z_loss", "a non-negative float")
    if not (z >= 0.0 and math.isfinite(z)):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z}")
    return _Options(int(ignore_index), str(reduction), smoothing, z)


def _check_vocab_start(vocab_start: object) -> int:
    if vocab_start is None:
        return -1
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral) or vocab_start < 0:
        raise ValueError(f"vocab_start must be None or an int >= 0, got {vocab_start!r}")
    return int(vocab_start)


def _check_weight(weight: object) -> np.ndarray | None:
    """The class weights as float64 on the CPU (for the digest and the length), or None."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 1:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be None or a 1-D floating tensor of V class weights, got {shape}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "weight requires a gradient, but vocab-parallel cross-entropy treats class weights as "
            "constants; pass weight.detach()"
        )
    return weight.detach().to("cpu", torch.float64).contiguous().numpy()


def _check_target(target: object, sample_shape: tuple[int, ...], shape_of: str) -> np.ndarray:
    """The labels as a flat int64 CPU array (every rank holds all N of them)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor of class indices, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(
            f"target must hold integer class indices (int64), got dtype {target.dtype}; "
            "probability targets are not supported in the vocab-parallel form"
        )
    if tuple(target.shape) != sample_shape:
        raise ValueError(f"target must have shape {sample_shape} ({shape_of}), got {tuple(target.shape)}")
    return target.detach().to("cpu", torch.int64).contiguous().numpy().reshape(-1)


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
    rows: int,
    width: int,
    vocab_start: object,
    labels: np.ndarray,
    weight: np.ndarray | None,
    options: _Options,
    chunk_size: int = 0,
    features: int = 0,
    wants_input_grad: bool = False,
) -> dict[str, int]:
    low, low_at, high, high_at = _label_extremes(labels, options.ignore_index)
    return {
        "failed": 0,
        "rows": rows,
        "width": width,
        "start": _check_vocab_start(vocab_start),
        "min_label": low,
        "min_position": low_at,
        "max_label": high,
        "max_position": high_at,
        "target_digest": _digest(labels),
        "weight_digest": 0 if weight is None else _digest(weight),
        "weight_length": -1 if weight is None else int(weight.shape[0]),
        "reduction": REDUCTIONS.index(options.reduction),
        "ignore_index": options.ignore_index,
        "label_smoothing_bits": _float_bits(options.label_smoothing),
        "z_loss_bits": _float_bits(options.z_loss),
        "chunk_size": chunk_size,
        "features": features,
        "wants_input_grad": int(wants_input_grad),
    }


def _encode(message: str) -> Tensor:
    data = message.encode("utf-8")[:_MESSAGE_BYTES]
    buffer = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    buffer[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return buffer


def _decode(buffer: Tensor) -> str:
    return bytes(buffer.tolist()).rstrip(b"\0").decode("utf-8", errors="replace")


def _differing(records: Sequence[dict[str, int]], field: str) -> list[int]:
    """The ranks whose ``field`` differs from rank 0's."""
    return [rank for rank, record in enumerate(records) if record[field] != records[0][field]]


def _global_problems(records: Sequence[dict[str, int]]) -> list[str]:
    """Checks that need every rank's record; every rank finds the same problems."""
    problems = []
    world = len(records)
    rows = [record["rows"] for record in records]
    if len(set(rows)) > 1:
        problems.append(f"every rank must hold the same N samples, got N = {rows} on ranks 0..{world - 1}")
    widths = [record["width"] for record in records]
    vocab_size = sum(widths)
    # identical targets (equal digests) are reported once, differing ones rank by rank
    targets_agree = not _differing(records, "target_digest")
    sources = [("", records[0])] if targets_agree else [(f"rank {r}: ", rec) for r, rec in enumerate(records)]
    for prefix, record in sources:
        if record["min_position"] >= 0 and record["min_label"] < 0:
            problems.append(
                f"{prefix}target has label {record['min_label']} at (flattened) position "
                f"{record['min_position']}; labels must be in [0, {vocab_size}) or equal "
                f"ignore_index={record['ignore_index']}"
            )
        if record["max_position"] >= 0 and record["max_label"] >= vocab_size:
            problems.append(
                f"{prefix}target has label {record['max_label']} at (flattened) position "
                f"{record['max_position']} but the vocabulary has V = {vocab_size} classes "
                f"(the ranks' shard widths {widths} added up)"
            )
    for field, name in (
        ("reduction", "reduction"),
        ("ignore_index", "ignore_index"),
        ("label_smoothing_bits", "label_smoothing"),
        ("z_loss_bits", "z_loss"),
        ("chunk_size", "chunk_size"),
    ):
        ranks = _differing(records, field)
        if ranks:
            values = [record[field] for record in records]
            if field == "reduction":
                values = [REDUCTIONS[value] for value in values]
            elif field.endswith("_bits"):
                values = [_bits_float(value) for value in values]
            problems.append(f"{name} must be the same on every rank, got {values} on ranks 0..{world - 1}")
    if not problems:  # a bad label already explains a differing target
        ranks = _differing(records, "target_digest")
        if ranks:
            problems.append(
                f"target must be the same on every rank (the labels of all N samples, replicated), "
                f"but rank(s) {ranks} hold different labels than rank 0"
            )
    lengths = [record["weight_length"] for record in records]
    if any(length not in (-1, vocab_size) for length in lengths) or len(set(lengths)) > 1:
        problems.append(
            f"weight must be None on every rank or the full ({vocab_size},) class-weight vector on "
            f"every rank, got lengths {['None' if n < 0 else n for n in lengths]} on ranks 0..{world - 1}"
        )
    elif _differing(records, "weight_digest"):
        problems.append(
            f"weight must be the same on every rank, but rank(s) {_differing(records, 'weight_digest')} "
            "hold different class weights than rank 0"
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
    return problems


def _agree(
    communicator: _Communicator, function: str, local_checks: Callable[[], dict[str, int]]
) -> _Agreement:
    """Run this rank's checks, all-gather every rank's record and raise on every rank if any
    rank's input is bad. The gather is the first collective of the call.
    """
    error: Exception | None = None
    try:
        record = local_checks()
        local = torch.tensor([record[field] for field in _FIELDS], dtype=torch.int64)
    except Exception as exc:  # any local failure must still reach the gather, or the others hang
        error = exc
        local = torch.zeros(len(_FIELDS), dtype=torch.int64)
        local[_FIELDS.index("failed")] = 1
    gathered = communicator.all_gather(local)
    records = [dict(zip(_FIELDS, piece.tolist(), strict=True)) for piece in gathered]
    world = communicator.world_size
    failed = [rank for rank, entry in enumerate(records) if entry["failed"]]
    if failed:
        messages = communicator.all_gather(_encode(str(error) if error is not None else ""))
        details = "; ".join(f"rank {rank}: {_decode(messages[rank])}" for rank in failed)
        text = f"xentkit.torch.{function}: invalid input on rank(s) {failed} of {world} — {details}"
        if isinstance(error, TypeError):
            raise TypeError(text) from error
        raise ValueError(text) from error
    problems = _global_problems(records)
    if problems:
        raise ValueError(f"xentkit.torch.{function}: invalid input (checked across {world} ranks) — " + "; ".join(problems))
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


# ---------------------------------------------------------------------------------------------
# Per-row bookkeeping from the (replicated) targets
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Rows:
    """Per-row quantities every rank computes identically from the target and class weights."""

    valid: Tensor  # (N,) bool: not ignored
    target_weight: Tensor  # (N,) float64: w_y, 0 for ignored rows
    local_labels: Tensor  # (N,) int64: column in this shard, -1 elsewhere, -2 ignored
    local_labels_array: np.ndarray  # the same on the CPU, for the kernels

    def slice(self, start: int, stop: int) -> _Rows:
        return _Rows(
            self.valid[start:stop],
            self.target_weight[start:stop],
            self.local_labels[start:stop],
            self.local_labels_array[start:stop],
        )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything a pass needs besides the tensors."""

    communicator: _Communicator
    agreement: _Agreement
    options: _Options
    rows: _Rows
    weight_local: Tensor | None  # (V_r,) float64 on the compute device
    weight_local_array: np.ndarray | None  # the same on the CPU, for the kernels
    weight_sum: float  # W = Σ_c w_c over all V classes
    main_denominator: float  # Σ w_y over non-ignored rows ("mean")
    z_denominator: float  # number of non-ignored rows ("mean" of the z term)
    chunk_rows: int  # the linear form's rows per chunk

    @property
    def smoothing(self) -> bool:
        return self.options.label_smoothing > 0.0


def _plan(
    communicator: _Communicator,
    agreement: _Agreement,
    options: _Options,
    labels: np.ndarray,
    weight: np.ndarray | None,
    device: torch.device,
    chunk_rows: int = 0,
) -> _Plan:
    start, stop = agreement.start, agreement.start + agreement.width
    valid = labels != options.ignore_index
    safe = np.where(valid, labels, 0)
    target_weight = valid.astype(np.float64) if weight is None else np.where(valid, weight[safe], 0.0)
    in_shard = valid & (labels >= start) & (labels < stop)
    local = np.where(in_shard, labels - start, np.where(valid, -1, -2)).astype(np.int64)
    weight_local = None if weight is None else np.ascontiguousarray(weight[start:stop])
    rows = _Rows(
        valid=torch.from_numpy(valid).to(device),
        target_weight=torch.from_numpy(target_weight).to(device),
        local_labels=torch.from_numpy(local).to(device),
        local_labels_array=local,
    )
    return _Plan(
        communicator=communicator,
        agreement=agreement,
        options=options,
        rows=rows,
        weight_local=None if weight_local is None else torch.from_numpy(weight_local).to(device),
        weight_local_array=weight_local,
        weight_sum=float(agreement.vocab_size) if weight is None else float(np.sum(weight)),
        main_denominator=float(np.sum(target_weight)),
        z_denominator=float(np.count_nonzero(valid)),
        chunk_rows=chunk_rows,
    )


# ---------------------------------------------------------------------------------------------
# The two shard passes: Numba kernels on CPU float32/float64, torch ops elsewhere
# ---------------------------------------------------------------------------------------------


def _kernel_applies(tensor: Tensor) -> bool:
    return USE_KERNELS and tensor.device.type == "cpu" and tensor.dtype in _KERNEL_DTYPES


def _numpy_view(tensor: Tensor) -> np.ndarray:
    """A NumPy view of a contiguous CPU tensor's memory (no copy)."""
    return tensor.detach().resolve_neg().numpy()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_step(width: int) -> int:
    """Rows per chunk of the torch-ops path: a float64 chunk takes at most TORCH_CHUNK_BYTES."""
    return max(1, TORCH_CHUNK_BYTES // max(1, 8 * width))


def _new_buffer(shape: tuple[int, ...], like: Tensor, *, zero: bool = False) -> Tensor:
    """An uninitialized (or zeroed) tensor of ``like``'s dtype and device.

    Large CPU buffers are allocated by NumPy, which asks Linux for transparent huge pages
    (``madvise(MADV_HUGEPAGE)``); torch's allocator does not. Measured on a 2048 × 32000 float32
    gradient: writing a fresh torch buffer took 115 ms, a fresh NumPy buffer 30 ms (page faults).
    """
    if like.device.type == "cpu" and like.dtype in _KERNEL_DTYPES:
        dtype = np.float32 if like.dtype == torch.float32 else np.float64
        return torch.from_numpy(np.zeros(shape, dtype=dtype) if zero else np.empty(shape, dtype=dtype))
    make = torch.zeros if zero else torch.empty
    return make(shape, dtype=like.dtype, device=like.device)


def _graph_is_kept() -> bool:
    """True when the running backward keeps the graph (``retain_graph=True`` / ``create_graph``)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


def _scaled(gradient: Tensor, factor: Tensor, owned: bool) -> Tensor:
    """``gradient · factor``: no work when the factor is a CPU 1, in place when backward owns the
    gradient (the graph is not kept), so that autograd adopts it as ``.grad`` without a copy.
    """
    if factor.numel() == 1 and factor.device.type == "cpu" and float(factor) == 1.0:
        return gradient
    factor = factor.to(gradient.dtype)
    return gradient.mul_(factor) if owned else gradient * factor


def _shard_statistics(
    logits: Tensor, rows: _Rows, plan: _Plan
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pass 1 over a contiguous ``[n, V_r]`` shard: ``(m_r, s_r, local z_y, local Σ w_j·z_j)``,
    float64 ``[n]`` tensors on the logits' device (see :mod:`xentkit.kernels.vocab_parallel`).
    """
    if _kernel_applies(logits):
        from xentkit.kernels.vocab_parallel import shard_softmax_stats

        pieces = shard_softmax_stats(
            _numpy_view(logits), rows.local_labels_array, plan.weight_local_array, plan.smoothing
        )
        return tuple(torch.from_numpy(piece) for piece in pieces)  # type: ignore[return-value]

    n, width = logits.shape
    compute = _compute_dtype(logits.dtype)
    device = logits.device
    row_max = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
    row_sum = torch.zeros(n, dtype=torch.float64, device=device)
    sum_z = torch.zeros(n, dtype=torch.float64, device=device)
    target = torch.zeros(n, dtype=torch.float64, device=device)
    if width == 0 or n == 0:
        return row_max, row_sum, target, sum_z
    step = _chunk_step(width)
    for start in range(0, n, step):
        stop = min(start + step, n)
        z = logits[start:stop].to(compute)
        # m_r = max_j z_j; shift t_r = m_r (0 when the shard row is all −inf); s_r = Σ exp(z − t_r)
        m = z.amax(dim=1)
        shift = torch.where(m > -math.inf, m, torch.zeros_like(m))
        row_max[start:stop] = m
        row_sum[start:stop] = torch.exp(z - shift[:, None]).sum(dim=1, dtype=torch.float64)
        if plan.smoothing:
            z64 = z.to(torch.float64)
            sum_z[start:stop] = z64.sum(dim=1) if plan.weight_local is None else z64 @ plan.weight_local
    here = rows.local_labels >= 0
    picked = logits.gather(1, rows.local_labels.clamp(min=0)[:, None])[:, 0].to(torch.float64)
    target = torch.where(here, picked, target)
    ignored = rows.local_labels == -2
    row_max = row_max.masked_fill(ignored, -math.inf)
    row_sum = row_sum.masked_fill(ignored, 0.0)
    sum_z = sum_z.masked_fill(ignored, 0.0)
    return row_max, row_sum, target, sum_z


def _shard_gradient(
    logits: Tensor,
    rows: _Rows,
    plan: _Plan,
    shift: Tensor,
    coefficients: tuple[Tensor, Tensor | None, Tensor],
    out: Tensor,
) -> None:
    """Pass 2: ``out[i, j] = c_i·exp(z_ij − M_i) − σ_i·w_j`` and the target entries; ignored rows
    0. ``out`` may be ``logits`` itself (in place).
    """
    coef, smooth, target_grad = coefficients
    if _kernel_applies(logits) and out.dtype == logits.dtype:
        from xentkit.kernels.vocab_parallel import shard_softmax_grad

        shard_softmax_grad(
            _numpy_view(logits), rows.local_labels_array, shift.numpy(), coef.numpy(),
            None if smooth is None else smooth.numpy(), target_grad.numpy(),
            plan.weight_local_array, _numpy_view(out),
        )
        return

    n, width = logits.shape
    if width == 0 or n == 0:
        return
    compute = _compute_dtype(logits.dtype)
    weight = None if plan.weight_local is None else plan.weight_local.to(compute)
    step = _chunk_step(width)
    for start in range(0, n, step):
        stop = min(start + step, n)
        z = logits[start:stop].to(compute)
        grad = torch.exp(z - shift[start:stop, None].to(compute)).mul_(coef[start:stop, None].to(compute))
        if smooth is not None:
            sigma = smooth[start:stop, None].to(compute)
            grad.sub_(sigma if weight is None else sigma * weight)
        out[start:stop] = grad
    here = rows.local_labels >= 0
    index = torch.nonzero(here)[:, 0]
    out[index, rows.local_labels[index]] = target_grad[index].to(out.dtype)
    out[rows.local_labels == -2] = 0


# ---------------------------------------------------------------------------------------------
# Combining the shards, loss and gradient coefficients (O(N), float64, on every rank)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RowStatistics:
    """The full rows' statistics (float64 ``[n]``), identical on every rank."""

    shift: Tensor  # M (0 where the whole row is −inf)
    total: Tensor  # S = Σ_j exp(z_j − M) over all V classes
    target_logit: Tensor  # z_y
    sum_z: Tensor | None  # S_z = Σ_j w_j·z_j (label smoothing only)

    @property
    def lse(self) -> Tensor:
        return self.shift + torch.log(self.total)

    def slice(self, start: int, stop: int) -> _RowStatistics:
        return _RowStatistics(
            self.shift[start:stop], self.total[start:stop], self.target_logit[start:stop],
            None if self.sum_z is None else self.sum_z[start:stop],
        )


def _combine(local: tuple[Tensor, Tensor, Tensor, Tensor], plan: _Plan) -> _RowStatistics:
    """Two all-reduces: MAX of the shard maxima (n floats), then SUM of the rescaled sums, the
    target logit and (label smoothing) the weighted logit sum (2n or 3n floats).
    """
    row_max, row_sum, target, sum_z = local
    device = row_max.device
    communicator = plan.communicator
    global_max = communicator.all_reduce(row_max.clone(), dist.ReduceOp.MAX)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    shift = torch.where(torch.isfinite(global_max), global_max, zero)
    local_shift = torch.where(row_max > -math.inf, row_max, zero)
    # s_r·exp(t_r − M); a shard with no finite logit (s_r = 0) adds exactly 0, never 0·inf
    scaled = torch.where(row_sum == 0, zero, row_sum * torch.exp(local_shift - shift))
    packed = torch.stack([scaled, target, sum_z] if plan.smoothing else [scaled, target])
    communicator.all_reduce(packed, dist.ReduceOp.SUM)
    return _RowStatistics(shift, packed[0], packed[1], packed[2] if plan.smoothing else None)


def _row_losses(stats: _RowStatistics, rows: _Rows, plan: _Plan) -> tuple[Tensor, Tensor | None]:
    """Per row: the main term (1 − ε)·w_y·(lse − z_y) + (ε/V)·(W·lse − S_z) and the z term λ·lse²
    (None without z-loss), both 0 for ignored rows.
    """
    eps = plan.options.label_smoothing
    lse = stats.lse
    zero = torch.zeros((), dtype=torch.float64, device=lse.device)
    main = (1.0 - eps) * rows.target_weight * (lse - stats.target_logit)
    if eps > 0.0:
        main = main + (eps / plan.agreement.vocab_size) * (plan.weight_sum * lse - stats.sum_z)
    main = torch.where(rows.valid, main, zero)
    if plan.options.z_loss == 0.0:
        return main, None
    return main, torch.where(rows.valid, plan.options.z_loss * lse * lse, zero)


def _unit_scales(plan: _Plan) -> tuple[float, float]:
    """(g, g^z) for an upstream gradient of 1: "mean" divides by its denominators (0 when there is
    nothing to average), "sum" and "none" (each row its own loss) take 1.
    """
    if plan.options.reduction != "mean":
        return 1.0, 1.0
    main = 1.0 / plan.main_denominator if plan.main_denominator != 0.0 else 0.0
    z = 1.0 / plan.z_denominator if plan.z_denominator != 0.0 else 0.0
    return main, z


def _reduce(main: Tensor, z_term: Tensor | None, plan: _Plan) -> Tensor:
    reduction = plan.options.reduction
    if reduction == "none":
        return main if z_term is None else main + z_term
    if reduction == "sum":
        return main.sum() if z_term is None else main.sum() + z_term.sum()
    scale_main, scale_z = _unit_scales(plan)
    loss = main.sum() * scale_main
    return loss if z_term is None else loss + z_term.sum() * scale_z


def _coefficients(
    stats: _RowStatistics, rows: _Rows, plan: _Plan, g: Tensor | float, g_z: Tensor | float
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-row coefficients of pass 2 (float64), so that c·exp(z_j − M) = coefficient·p_j:

        A   = (1 − ε)·w_y + ε·W/V
        c   = (g·A + g^z·2·λ·lse) / S
        σ   = ε·g/V                                      (None without label smoothing)
        target entry = c·exp(z_y − M) − (1 − ε)·w_y·g − σ·w_y

    all 0 for ignored rows.
    """
    eps = plan.options.label_smoothing
    vocab = plan.agreement.vocab_size
    lse = stats.lse
    zero = torch.zeros((), dtype=torch.float64, device=lse.device)
    w_y = rows.target_weight
    a = (1.0 - eps) * w_y + eps * plan.weight_sum / vocab
    numerator = g * a
    if plan.options.z_loss != 0.0:
        numerator = numerator + g_z * 2.0 * plan.options.z_loss * lse
    coef = torch.where(rows.valid, numerator / stats.total, zero)
    smooth = None
    target_grad = coef * torch.exp(stats.target_logit - stats.shift) - (1.0 - eps) * w_y * g
    if eps > 0.0:
        smooth = torch.where(rows.valid, eps * g / vocab * torch.ones_like(lse), zero)
        target_grad = target_grad - smooth * w_y
    target_grad = torch.where(rows.valid, target_grad, zero)
    return coef, smooth, target_grad


# ---------------------------------------------------------------------------------------------
# Logits form
# ---------------------------------------------------------------------------------------------


class _VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """forward: pass 1, two all-reduces of O(N), loss, and (when a gradient is wanted) pass 2
    writing the shard's gradient for an upstream gradient of 1. backward: that gradient times the
    upstream gradient (per row for "none"); no communication.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, logits_shard: Tensor, plan: _Plan, want_grad: bool) -> Tensor:
        rows = plan.rows.valid.shape[0]  # not reshape(-1, V_r): an empty shard has V_r = 0
        z = logits_shard.detach().reshape(rows, logits_shard.shape[-1]).contiguous()
        local = _shard_statistics(z, plan.rows, plan)
        stats = _combine(local, plan)
        main, z_term = _row_losses(stats, plan.rows, plan)
        loss = _reduce(main, z_term, plan)
        ctx.reduction = plan.options.reduction
        ctx.gradient = None
        if want_grad:
            g, g_z = _unit_scales(plan)
            gradient = _new_buffer(tuple(z.shape), z)
            _shard_gradient(z, plan.rows, plan, stats.shift, _coefficients(stats, plan.rows, plan, g, g_z), gradient)
            ctx.gradient = gradient.view(logits_shard.shape)
        if ctx.reduction == "none":
            return loss.to(logits_shard.dtype).reshape(logits_shard.shape[:-1])
        return loss.to(logits_shard.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, None, None]:
        gradient = ctx.gradient
        if gradient is None:
            raise RuntimeError(
                "xentkit.torch.vocab_parallel_cross_entropy: the gradient computed in the forward "
                "pass is gone: forward ran with gradients disabled, or an earlier backward took it "
                "(pass retain_graph=True to backward through the same graph twice)"
            )
        owned = not _graph_is_kept()
        if owned:
            ctx.gradient = None  # hand it over: autograd can make it .grad without a copy
        factor = grad_output.unsqueeze(-1) if ctx.reduction == "none" else grad_output
        return _scaled(gradient, factor, owned), None, None


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    *,
    group: object = None,
    vocab_start: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    stats: CommunicationStats | None = None,
) -> Tensor:
    r"""Softmax cross-entropy of logits split by vocabulary across the ranks of ``group``.

    Every rank calls it with its own slice of the logits and the same ``target``; every rank gets
    the same loss, the single-process ``xentkit.torch.cross_entropy(full_logits, target, ...)``
    (= ``torch.nn.functional.cross_entropy`` plus xentkit's z-loss), and its slice of the full
    gradient. With lse = M + log S combined over ranks (module docstring) and V = Σ_r V_r:

        loss_i = (1 − ε)·w_y·(lse − z_y) + (ε/V)·Σ_c w_c·(lse − z_c) + λ·lse²

    Communication: one all-gather of a small int64 record per rank (validation, shard offsets),
    then an all-reduce MAX of N float64 and an all-reduce SUM of 2N (3N with label smoothing)
    float64: 24·N (32·N) bytes, independent of V. Backward communicates nothing: the forward pass
    stores the shard's gradient (N × V_r, what torch keeps for its softmax) and backward scales it.

    Args:
        logits_shard: ``[N, V_r]`` (or ``[..., V_r]``: class axis last, Megatron's ``[s, b, V/p]``)
            float tensor, the columns ``vocab_start .. vocab_start + V_r`` of the full logits.
            CPU float32/float64 run xentkit's Numba kernels; other dtypes and devices torch ops
            (float16/bfloat16 computed in float32). Any rank's V_r may differ (uneven shards),
            even be 0.
        target: ``[N]`` (the logits' leading shape) integer class indices in ``[0, V)`` of the
            full vocabulary, or ``ignore_index``; the same on every rank (checked by a digest).
        group: the ``torch.distributed`` process group (default: the world). Without an
            initialized process group the call runs as a world of one.
        vocab_start: the first class of this rank's shard; None (on every rank) puts the shards in
            rank order, ``Σ_{q<r} V_q``, from the gathered widths. Given on every rank, the shards
            must tile ``[0, V)``.
        weight: None or the full ``[V]`` class-weight vector, the same on every rank (each rank
            uses its slice for the smoothing term and ``w_y`` of every target). Constant: no
            gradient flows to it.
        ignore_index, reduction, label_smoothing: as ``torch.nn.functional.cross_entropy``;
            "mean" divides by Σ w_y over non-ignored rows and gives 0 (not NaN) when that is 0.
        z_loss: λ ≥ 0, adds λ·lse² per non-ignored row ("mean": over their count).
        stats: optional :class:`CommunicationStats` that counts this call's collectives.

    Returns:
        The loss in the logits' dtype: a scalar, or the target's shape for ``reduction="none"``
        (backward takes a per-row upstream gradient, which must be the same on every rank).

    Raises:
        ValueError: on every rank when any rank's input is invalid or the ranks disagree (shapes,
            labels outside ``[0, V)``, differing target/weight/options, shards that do not tile
            the vocabulary); the message names the rank(s). A rank whose own check raised a
            TypeError raises that type; the other ranks raise ValueError.

    Example (without a process group: a world of one, plain cross-entropy):
        >>> import torch
        >>> from xentkit.torch.distributed import vocab_parallel_cross_entropy
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], requires_grad=True)
        >>> loss = vocab_parallel_cross_entropy(logits, torch.tensor([0, 2]))
        >>> loss
        tensor(0.2056, grad_fn=<_VocabParallelCrossEntropyFunctionBackward>)

        On P ranks each passes its columns, e.g. ``logits[:, start:stop]`` with
        ``start, stop = vocab_shard_range(V, P, rank)``, and gets the same loss; ``loss.backward()``
        gives each rank ``logits.grad[:, start:stop]``.

    See also: :func:`vocab_parallel_linear_cross_entropy` (the logits never materialized),
    :func:`vocab_shard_range`.
    """
    device = logits_shard.device if isinstance(logits_shard, Tensor) else torch.device("cpu")
    communicator = _Communicator(group, device, stats)
    state: dict[str, object] = {}

    def local_checks() -> dict[str, int]:
        if not isinstance(logits_shard, Tensor):
            raise TypeError(f"logits_shard must be a tensor, got {type(logits_shard).__name__}")
        if not logits_shard.is_floating_point() or logits_shard.dim() == 0:
            raise ValueError(
                "logits_shard must be a floating tensor of shape (N, V_r) (class axis last), "
                f"got dtype {logits_shard.dtype} and shape {tuple(logits_shard.shape)}"
            )
        options = _check_options(ignore_index, reduction, label_smoothing, z_loss)
        sample_shape = tuple(logits_shard.shape[:-1])
        labels = _check_target(target, sample_shape, "the logits' shape without the class axis")
        class_weight = _check_weight(weight)
        state.update(options=options, labels=labels, weight=class_weight)
        return _local_record(
            rows=labels.shape[0], width=logits_shard.shape[-1], vocab_start=vocab_start,
            labels=labels, weight=class_weight, options=options,
        )

    agreement = _agree(communicator, "vocab_parallel_cross_entropy", local_checks)
    plan = _plan(
        communicator, agreement, state["options"], state["labels"], state["weight"], device  # type: ignore[arg-type]
    )
    want_grad = torch.is_grad_enabled() and logits_shard.requires_grad
    return _VocabParallelCrossEntropyFunction.apply(logits_shard, plan, want_grad)


# ---------------------------------------------------------------------------------------------
# Fused linear form
# ---------------------------------------------------------------------------------------------


def _chunk_rows(rows: int, max_width: int, chunk_size: int | None) -> int:
    """Rows per chunk, the same on every rank (from N, the widest shard and float32 bytes)."""
    if chunk_size is not None:
        return max(1, min(chunk_size, rows))
    row_bytes = max(1, max_width * 4)
    by_fraction = math.ceil(rows / CHUNK_FRACTION)
    by_budget = CHUNK_BUDGET_BYTES // row_bytes
    floor = CHUNK_FLOOR_BYTES // row_bytes
    return max(1, min(rows, max(min(by_fraction, by_budget), floor)))


@dataclasses.dataclass
class _LinearPass:
    main: Tensor | None  # per-row main term (forward only)
    z_term: Tensor | None
    stats: _RowStatistics | None  # the rows' statistics (forward only)
    grad_input: Tensor | None
    grad_weight: Tensor | None
    grad_bias: Tensor | None


def _linear_pass(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    plan: _Plan,
    *,
    known: _RowStatistics | None,
    g: Tensor | float,
    g_z: Tensor | float,
    want: tuple[bool, bool, bool],
) -> _LinearPass:
    """One sweep over the row chunks. Per chunk of r rows (one reused ``[r, V_r]`` buffer):

    1. ``logits = x_chunk W_rᵀ (+ b_r)``
    2. forward (``known`` None): pass 1 and the chunk's two all-reduces (O(r) floats), the losses;
       backward of "none": the statistics stored by forward, no communication
    3. gradient (when ``want``): pass 2 overwrites the logits with ``dz``, then
       ``grad_x[chunk] = dz W_r``, ``grad_W_r += dzᵀ x_chunk``, ``grad_b_r += Σ_rows dz``

    and after the chunks ``grad_x`` is all-reduced (SUM over ranks: x is replicated).
    ``want[0]`` must be the same on every rank (it decides a collective).
    """
    n, width = x.shape[0], w.shape[0]
    device = x.device
    buffer = _new_buffer((min(plan.chunk_rows, n), width), x)
    grad_input = _new_buffer(tuple(x.shape), x, zero=True) if want[0] else None
    grad_weight = _new_buffer(tuple(w.shape), w, zero=True) if want[1] else None
    grad_bias = torch.zeros_like(b) if want[2] and b is not None else None
    forward = known is None
    main = torch.zeros(n, dtype=torch.float64, device=device) if forward else None
    z_term = torch.zeros(n, dtype=torch.float64, device=device) if forward and plan.options.z_loss else None
    pieces: list[_RowStatistics] = []
    w_t = w.t()
    for start in range(0, n, plan.chunk_rows):
        stop = min(start + plan.chunk_rows, n)
        x_chunk = x[start:stop]
        logits = buffer[: stop - start]
        # 1. logits = x W^T (+ b)
        if b is None:
            torch.mm(x_chunk, w_t, out=logits)
        else:
            torch.addmm(b, x_chunk, w_t, out=logits)
        rows = plan.rows.slice(start, stop)
        # 2. the rows' statistics over all ranks, and the losses
        if forward:
            stats = _combine(_shard_statistics(logits, rows, plan), plan)
            pieces.append(stats)
            chunk_main, chunk_z = _row_losses(stats, rows, plan)
            main[start:stop] = chunk_main
            if z_term is not None:
                z_term[start:stop] = chunk_z
        else:
            stats = known.slice(start, stop)
        if not any(want):
            continue
        # 3. dz over the logits (in place), then the three gradients
        g_chunk = g[start:stop] if isinstance(g, Tensor) else g
        g_z_chunk = g_z[start:stop] if isinstance(g_z, Tensor) else g_z
        _shard_gradient(logits, rows, plan, stats.shift, _coefficients(stats, rows, plan, g_chunk, g_z_chunk), logits)
        if grad_input is not None:
            torch.mm(logits, w, out=grad_input[start:stop])
        if grad_weight is not None:
            grad_weight.addmm_(logits.t(), x_chunk)
        if grad_bias is not None:
            grad_bias.add_(logits.sum(dim=0))
    if grad_input is not None:
        plan.communicator.all_reduce(grad_input, dist.ReduceOp.SUM)
    all_stats = None
    if forward:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        all_stats = _RowStatistics(
            torch.cat([p.shift for p in pieces]) if pieces else empty,
            torch.cat([p.total for p in pieces]) if pieces else empty,
            torch.cat([p.target_logit for p in pieces]) if pieces else empty,
            torch.cat([p.sum_z for p in pieces]) if pieces and plan.smoothing else None,
        )
    return _LinearPass(main, z_term, all_stats, grad_input, grad_weight, grad_bias)


class _VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """"mean"/"sum": every gradient is computed in forward (grad_input all-reduced there) and
    backward scales them. "none": forward computes the losses and keeps the rows' statistics
    (4·N floats); backward recomputes the logits chunk by chunk with the per-row upstream
    gradient (no statistics communicated) and all-reduces grad_input.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        linear_weight_shard: Tensor,
        linear_bias_shard: Tensor | None,
        plan: _Plan,
        want: tuple[bool, bool, bool],
    ) -> Tensor:
        x = input.detach().reshape(plan.rows.valid.shape[0], input.shape[-1]).contiguous()
        w = linear_weight_shard.detach().contiguous()
        b = None if linear_bias_shard is None else linear_bias_shard.detach().contiguous()
        ctx.plan = plan
        ctx.input_shape = input.shape
        ctx.want = want
        reduction = plan.options.reduction
        if reduction == "none":
            result = _linear_pass(x, w, b, plan, known=None, g=1.0, g_z=1.0, want=(False, False, False))
            ctx.save_for_backward(input, linear_weight_shard, linear_bias_shard)
            ctx.row_statistics = result.stats
            loss = _reduce(result.main, result.z_term, plan)
            return loss.to(input.dtype).reshape(input.shape[:-1])
        g, g_z = _unit_scales(plan)
        result = _linear_pass(x, w, b, plan, known=None, g=g, g_z=g_z, want=want)
        ctx.gradients = (
            None if result.grad_input is None else result.grad_input.view(input.shape),
            result.grad_weight,
            result.grad_bias,
        )
        return _reduce(result.main, result.z_term, plan).to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        plan: _Plan = ctx.plan
        needs = ctx.needs_input_grad[:3]
        if plan.options.reduction == "none":
            input, linear_weight_shard, linear_bias_shard = ctx.saved_tensors
            upstream = grad_output.detach().reshape(-1).to(torch.float64)
            result = _linear_pass(
                input.detach().reshape(plan.rows.valid.shape[0], input.shape[-1]).contiguous(),
                linear_weight_shard.detach().contiguous(),
                None if linear_bias_shard is None else linear_bias_shard.detach().contiguous(),
                plan,
                known=ctx.row_statistics,
                g=upstream,
                g_z=upstream,
                want=ctx.want,
            )
            gradients = (
                None if result.grad_input is None else result.grad_input.view(ctx.input_shape),
                result.grad_weight,
                result.grad_bias,
            )
        else:
            if ctx.gradients is None:
                raise RuntimeError(
                    "xentkit.torch.vocab_parallel_linear_cross_entropy: an earlier backward took "
                    "the gradients computed in the forward pass; pass retain_graph=True to it to "
                    "backward through the same graph twice"
                )
            owned = not _graph_is_kept()
            stored = ctx.gradients
            if owned:
                ctx.gradients = None
            gradients = tuple(
                None if gradient is None else _scaled(gradient, grad_output.detach(), owned)
                for gradient in stored
            )
        return (*(gradient if need else None for gradient, need in zip(gradients, needs, strict=True)), None, None)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    linear_weight_shard: Tensor,
    target: Tensor,
    *,
    group: object = None,
    vocab_start: int | None = None,
    linear_bias_shard: Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    stats: CommunicationStats | None = None,
) -> Tensor:
    r"""Cross-entropy of ``input @ W.T + b`` with W's rows (the vocabulary) split across ranks,
    never materializing the logits, not even this rank's ``[N, V_r]`` slice.

    Equals :func:`vocab_parallel_cross_entropy` of the shard logits ``input @ W_r.T + b_r`` (and
    the single-process ``cross_entropy(input @ W.T + b, target)``). Rows are processed
    ``chunk_size`` at a time (default: a chunk's logits at most 1/16 of the widest shard's logits
    and at most 16 MiB, at least 2 MiB); per chunk: local logits, pass 1, an all-reduce MAX of
    ``r`` and SUM of ``2r`` (``3r``) float64, then the shard's ``dz`` in place of the logits and
    ``∂loss/∂x += dz·W_r``, ``∂loss/∂W_r += dzᵀ·x``, ``∂loss/∂b_r += Σ_rows dz``.

    ``input`` is replicated, so its gradient ``Σ_r dz_r·W_r`` is all-reduced (SUM over ranks,
    N·D floats): the standard tensor-parallel cost of backward through a column-parallel layer
    (Megatron's ``copy_to_tensor_model_parallel_region``); the weight and bias gradients stay
    local. For "mean"/"sum" it happens in forward (with every gradient; backward only scales);
    for "none" in backward, which recomputes the logits chunk by chunk with the per-row upstream
    gradient and the row statistics kept by forward (one more matmul per chunk, no statistics
    communicated). Every rank must call backward, with the same upstream gradient.

    Args:
        input: ``[N, D]`` (or ``[..., D]``) float tensor, the same on every rank.
        linear_weight_shard: ``[V_r, D]``, this rank's rows of the output weight (classes
            ``vocab_start .. vocab_start + V_r``), the input's dtype and device.
        target: ``[N]`` (input's leading shape) int64 labels in ``[0, V)`` or ``ignore_index``,
            the same on every rank.
        linear_bias_shard: None or ``[V_r]``, this rank's slice of the output bias.
        chunk_size: rows per chunk (the same on every rank), or None for the default.
        group, vocab_start, weight, ignore_index, reduction, label_smoothing, z_loss, stats: as
            :func:`vocab_parallel_cross_entropy`.

    Returns:
        The loss in the input's dtype: a scalar, or ``input.shape[:-1]`` for ``reduction="none"``.

    Raises:
        ValueError: on every rank, as :func:`vocab_parallel_cross_entropy` (also for shapes of the
            weight/bias shards and a ``chunk_size`` that differs between ranks).
    """
    device = input.device if isinstance(input, Tensor) else torch.device("cpu")
    communicator = _Communicator(group, device, stats)
    state: dict[str, object] = {}
    grad_enabled = torch.is_grad_enabled()

    def local_checks() -> dict[str, int]:
        if not isinstance(input, Tensor) or not isinstance(linear_weight_shard, Tensor):
            raise TypeError("input and linear_weight_shard must be tensors")
        if not input.is_floating_point() or input.dim() == 0:
            raise ValueError(
                f"input must be a floating tensor of shape (N, D), got dtype {input.dtype} and "
                f"shape {tuple(input.shape)}"
            )
        features = input.shape[-1]
        if linear_weight_shard.dim() != 2 or linear_weight_shard.shape[1] != features:
            raise ValueError(
                f"linear_weight_shard must have shape (V_r, {features}) (this rank's rows of the "
                f"output weight, in_features = input.shape[-1]), got {tuple(linear_weight_shard.shape)}"
            )
        if linear_weight_shard.dtype != input.dtype or linear_weight_shard.device != input.device:
            raise ValueError(
                f"linear_weight_shard must have the input's dtype and device ({input.dtype}, "
                f"{input.device}), got {linear_weight_shard.dtype} on {linear_weight_shard.device}"
            )
        width = linear_weight_shard.shape[0]
        if linear_bias_shard is not None and (
            not isinstance(linear_bias_shard, Tensor)
            or tuple(linear_bias_shard.shape) != (width,)
            or linear_bias_shard.dtype != input.dtype
            or linear_bias_shard.device != input.device
        ):
            raise ValueError(
                f"linear_bias_shard must be None or a ({width},) tensor of the input's dtype and "
                f"device, got {getattr(linear_bias_shard, 'shape', type(linear_bias_shard).__name__)}"
            )
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
        options = _check_options(ignore_index, reduction, label_smoothing, z_loss)
        labels = _check_target(target, tuple(input.shape[:-1]), "the input's shape without in_features")
        class_weight = _check_weight(weight)
        state.update(options=options, labels=labels, weight=class_weight)
        return _local_record(
            rows=labels.shape[0], width=width, vocab_start=vocab_start, labels=labels,
            weight=class_weight, options=options, chunk_size=-1 if chunk_size is None else chunk_size,
            features=features, wants_input_grad=grad_enabled and input.requires_grad,
        )

    agreement = _agree(communicator, "vocab_parallel_linear_cross_entropy", local_checks)
    labels = state["labels"]
    chunk_rows = _chunk_rows(labels.shape[0], max(agreement.widths), chunk_size)  # type: ignore[union-attr]
    plan = _plan(
        communicator, agreement, state["options"], labels, state["weight"], device, chunk_rows  # type: ignore[arg-type]
    )
    want = (
        agreement.wants_input_grad,
        grad_enabled and linear_weight_shard.requires_grad,
        grad_enabled and linear_bias_shard is not None and linear_bias_shard.requires_grad,
    )
    return _VocabParallelLinearCrossEntropyFunction.apply(
        input, linear_weight_shard, linear_bias_shard, plan, want
    )
