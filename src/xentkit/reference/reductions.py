"""Reductions shared by every loss: "none", "sum", and a "mean" that is 0 when nothing is averaged."""

from __future__ import annotations

import numpy as np


def reduce(values: np.ndarray, reduction: str, denominator: float) -> np.ndarray:
    """``values`` as is ("none"), their float64 sum ("sum"), or the sum over ``denominator``
    ("mean"; 0 when the denominator is 0, where PyTorch gives NaN)."""
    if reduction == "none":
        return values
    total = np.sum(values, dtype=np.float64)
    if reduction == "sum":
        return np.asarray(total)
    return np.asarray(total / denominator if denominator != 0 else 0.0)


def gradient_scale(reduction: str, upstream: np.ndarray, denominator: float) -> np.ndarray:
    """The coefficient of each sample's gradient: the upstream gradient over the "mean" denominator."""
    if reduction == "mean":
        return upstream / denominator if denominator != 0 else np.zeros_like(upstream)
    return upstream
