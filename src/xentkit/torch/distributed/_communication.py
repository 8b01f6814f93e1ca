"""The collectives of one call, counted, and the even split of a vocabulary into shards."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..._options import describe


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

    Collectives run on the device the backend wants: CPU for gloo (and MPI); for NCCL the tensors'
    GPU (the current CUDA device for CPU tensors; before, always the current one, which for
    tensors on another GPU than the current meant copies between GPUs); the tensors' own device
    otherwise.
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
        if isinstance(group, int) and not isinstance(group, bool) and group == dist.GroupMember.NON_GROUP_MEMBER:
            # what dist.new_group returns on a rank outside it (an int, -100)
            raise ValueError(
                "this process is not a member of group (torch.distributed.new_group gave it "
                "GroupMember.NON_GROUP_MEMBER); call only on the group's ranks"
            )
        if group is not None and not isinstance(group, dist.ProcessGroup):
            # (before any collective; the other ranks wait in their first one for this rank)
            raise TypeError(f"group must be a torch.distributed process group or None, got {type(group).__name__} {group!r}")
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of group; every rank of the group must call")
        backend = str(dist.get_backend(group)).lower()
        if backend in ("gloo", "mpi"):
            self.device = torch.device("cpu")
        elif backend == "nccl":  # the tensors' GPU where they are on one (as torch's users all-reduce
            # them where they live), else the current one
            self.device = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        else:  # mixed ("cpu:gloo,cuda:nccl") or another backend: the tensors' device
            self.device = device

    def all_reduce(self, tensor: Tensor, op: dist.ReduceOp) -> Tensor:
        """``tensor`` reduced over the group (in place when it already lives on the device)."""
        if self.world_size == 1:
            return tensor
        moved = tensor.to(self.device).contiguous()
        dist.all_reduce(moved, op=op, group=self.group)
        if isinstance(self.stats, CommunicationStats):  # counted once done (a bad stats: the checks raise)
            self.stats.all_reduce_calls += 1
            self.stats.all_reduce_bytes += tensor.numel() * tensor.element_size()
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (one shape on all ranks), in rank order, on the CPU."""
        if self.world_size == 1:
            return [tensor.cpu()]
        moved = tensor.to(self.device).contiguous()
        pieces = [torch.empty_like(moved) for _ in range(self.world_size)]
        dist.all_gather(pieces, moved, group=self.group)
        if isinstance(self.stats, CommunicationStats):  # counted once done (a bad stats: the checks raise)
            self.stats.all_gather_calls += 1
            self.stats.all_gather_bytes += self.world_size * moved.numel() * moved.element_size()
        return [piece.cpu() for piece in pieces]


def vocab_shard_range(vocab_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """Columns ``[start, stop)`` of rank ``rank``'s shard when ``vocab_size`` classes are split
    as evenly as possible in rank order: the first ``V mod P`` ranks get one class more
    (``numpy.array_split``'s convention; Megatron requires V divisible by P).

    >>> from xentkit.torch.distributed import vocab_shard_range
    >>> [vocab_shard_range(11, 4, r) for r in range(4)]
    [(0, 3), (3, 6), (6, 9), (9, 11)]
    """
    for name, value in (("vocab_size", vocab_size), ("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"vocab_shard_range: {name} must be an int, got {describe(value)}")
    if world_size < 1 or not 0 <= rank < world_size or vocab_size < 0:
        raise ValueError(
            f"vocab_shard_range needs vocab_size >= 0 and 0 <= rank < world_size, got "
            f"vocab_size={vocab_size}, world_size={world_size}, rank={rank}"
        )
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
