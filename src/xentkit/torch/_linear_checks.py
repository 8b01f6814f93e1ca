"""The linear layer's tensors of the fused linear forms, checked by one rule with one set of
messages: ``linear_cross_entropy``, ``linear_log_probs`` and the vocabulary-parallel linear forms
(whose weight and bias are this rank's shards, and are named so in the messages).

Each mistake has one exception type: a tensor that is not a floating-point tensor, or tensors of
different dtypes, ``TypeError``; a shape, or tensors on different devices, ``ValueError``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .._options import describe
from ._bridge import check_dense

__all__ = ["LINEAR", "SHARDS", "LinearNames", "check_linear", "chunk_size_of"]


@dataclasses.dataclass(frozen=True)
class LinearNames:
    """What the messages call the weight, the bias and the weight's rows."""

    weight: str
    bias: str
    rows: str


LINEAR = LinearNames("linear_weight", "linear_bias", "num_classes")
# the vocabulary-parallel forms: this rank's rows of the output layer
SHARDS = LinearNames("linear_weight_shard", "linear_bias_shard", "V_r")


def check_linear(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, names: LinearNames = LINEAR, *,
    no_rows: bool = False, class_dims: bool = False,
) -> tuple[int, int]:
    """``(classes, features)`` of a linear layer ``input @ linear_weight.T + linear_bias``, or the
    error naming the argument: each a floating-point tensor (the bias may be None),
    ``linear_weight`` ``[classes, D]`` with at least one row (none allowed with ``no_rows``: an
    empty shard), ``input`` ``[..., D]``, ``linear_bias`` ``[classes]``, one dtype, one device.
    ``class_dims``: ``linear_weight`` may be ``[classes, d1, ..., dk, D]`` (the bias is then not
    checked here; torch's broadcasting rules it)."""
    named = {"input": input, names.weight: linear_weight, names.bias: linear_bias}
    for name, tensor in named.items():
        if tensor is None and name == names.bias:
            continue
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {describe(tensor)}")
        check_dense(tensor, name)
    shape = tuple(linear_weight.shape)
    if len(shape) < 2 or (len(shape) > 2 and not class_dims):
        raise ValueError(f"{names.weight} must have shape ({names.rows}, in_features), got {shape}")
    classes, features = shape[0], shape[-1]
    if classes == 0 and not no_rows:
        raise ValueError(f"{names.weight} must have at least one row (class), got shape {shape}")
    if input.dim() == 0 or input.shape[-1] != features:
        raise ValueError(
            f"input must have {names.weight}'s in_features={features} as its last dimension, got input "
            f"of shape {tuple(input.shape)} and {names.weight} of shape {shape}"
        )
    if linear_bias is not None and len(shape) == 2 and tuple(linear_bias.shape) != (classes,):
        raise ValueError(f"{names.bias} must have shape ({classes},), got {tuple(linear_bias.shape)}")
    present = {name: tensor for name, tensor in named.items() if tensor is not None}
    together = f"input, {names.weight} and {names.bias}"
    if len({tensor.dtype for tensor in present.values()}) > 1:
        raise TypeError(
            f"{together} must share one dtype, got "
            + ", ".join(f"{name} {str(tensor.dtype).removeprefix('torch.')}" for name, tensor in present.items())
        )
    if len({tensor.device for tensor in present.values()}) > 1:  # a meta weight would give garbage
        raise ValueError(
            f"{together} must be on one device, got "
            + ", ".join(f"{name} on {tensor.device}" for name, tensor in present.items())
        )
    return classes, features


def chunk_size_of(options: object, chunk_size: object) -> object:
    """The chunk size of a fused linear form given torch's ``options=`` (``F.linear_cross_entropy``
    and ``nn.LinearCrossEntropyLoss`` take a ``torch.nn.LinearCrossEntropyOptions`` or None there),
    taken so that torch code runs unchanged: its ``batch_chunk_size`` is ``chunk_size`` (both
    given must agree). Its other fields choose among torch's own strategies and are not used:
    xentkit always runs chunks, a second backward works with ``retain_graph=True``, and the weight
    gradient accumulates as ``accumulate_in_float32`` says."""
    if options is None:
        return chunk_size
    torch_options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if torch_options is None or not isinstance(options, torch_options):
        raise TypeError(
            "options must be None or a torch.nn.LinearCrossEntropyOptions (torch's chunking options, "
            f"taken for its batch_chunk_size; xentkit's own are chunk_size and accumulate_in_float32), got {describe(options)}"
        )
    size = options.batch_chunk_size
    if size is None:
        return chunk_size
    if chunk_size is not None and chunk_size != size:
        raise ValueError(f"chunk_size={chunk_size!r} and options.batch_chunk_size={size!r} disagree; give one of them")
    return size
