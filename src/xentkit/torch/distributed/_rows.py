"""The row plan: what every rank derives identically from the (replicated) targets and options.

Built once per call after the agreement: which rows count, each row's target column in this
rank's shard, the class weights of the shard, the reduction (:class:`ReductionPlan`, the one
home of "mean" and its denominators), the shard backend and, for the linear form, the rows per
chunk.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from ..._options import LossOptions
from ...reference.reductions import ReductionPlan
from .._chunks import ChunkBudget, chunk_rows
from ._agreement import _Agreement, chunk_budget
from ._communication import _Communicator


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
    options: LossOptions
    rows: _Rows
    weight_local: Tensor | None  # (V_r,) float64 on the compute device
    weight_local_array: np.ndarray | None  # the same on the CPU, for the kernels
    weight_sum: float  # W = Σ_c w_c over all V classes
    reduction_plan: ReductionPlan  # "mean": main term over Σ w_y, z term over the valid rows
    chunk_rows: int  # the linear form's rows per chunk
    shards: type  # the shard backend (``_shards.shard_backend``): NumbaShards, TritonShards or TorchShards

    @property
    def smoothing(self) -> bool:
        return self.options.label_smoothing > 0.0


def _plan(
    communicator: _Communicator,
    agreement: _Agreement,
    options: LossOptions,
    labels: np.ndarray,
    weight: np.ndarray | None,
    device: torch.device,
    shards: type,
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
        # from the NumPy rows: Python-float denominators, the same on every rank
        reduction_plan=ReductionPlan.of_labels(options.reduction, valid, target_weight),
        chunk_rows=chunk_rows,
        shards=shards,
    )


def _chunk_rows(rows: int, max_width: int, chunk_size: int | None, item_bytes: int) -> int:
    """Rows per chunk of the linear forms, the same on every rank: ``_chunks.chunk_rows`` from N,
    the widest shard and the bytes of an item of the chunk's buffer (the input's dtype, agreed
    on every rank), within the package's budget (``CHUNK_FRACTION``, ``CHUNK_BUDGET_BYTES``,
    ``CHUNK_FLOOR_BYTES``, read at call time), on every device."""
    return chunk_rows(rows, max_width, item_bytes, chunk_size, budget=ChunkBudget(*chunk_budget()))
