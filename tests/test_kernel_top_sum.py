"""The sum of exponentials of a block holding the row's max, in the dtype's own lanes: the terms
equal to the max (exactly 1) are counted apart from the others (each below 1), so that a
confident row's loss log(1 + δ) keeps its relative accuracy without float64 lanes."""

from __future__ import annotations

import math

import numpy as np
import pytest

import xentkit
from xentkit.kernels.cross_entropy import _block_sum_exp_top, _block_sum_exp_wide


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [1, 7, 10, 33, 100, 1024])
def test_the_top_sum_is_the_float64_sum(dtype, length):
    rng = np.random.default_rng(length)
    row = (rng.standard_normal(length) * 3).astype(dtype)
    row[rng.integers(0, length, 3)] = row.max()  # ties at the max count once each
    if length > 5:
        row[:2] = -np.inf  # masked classes add 0
    shift = row.max()
    expected = float(np.exp(row.astype(np.float64) - np.float64(shift)).sum())
    ties, below = _block_sum_exp_top(row, 0, length, shift)
    assert ties == int((row == shift).sum())  # the max's terms, counted apart from the rest
    tolerance = 4e-7 if dtype == np.float32 else 1e-14
    assert math.isclose(below, expected - ties, rel_tol=tolerance, abs_tol=1e-300)
    assert math.isclose(ties + below, _block_sum_exp_wide(row, 0, length, shift), rel_tol=4e-7)
    row[length // 2] = np.nan
    assert math.isnan(_block_sum_exp_top(row, 0, length, shift)[1])


@pytest.mark.parametrize("classes", [10, 100, 1000, 5000])
@pytest.mark.parametrize("margin", [8.0, 20.0, 30.0])
def test_confident_rows_keep_their_relative_accuracy(classes, margin):
    """Loss log(1 + δ) with δ down to ~1e-12: relative to the float64 loss of the same float32
    logits, the float32 kernel stays within a few float32 roundings of δ, and within a few float64
    roundings of 1 absolute (s = 1 + δ is a float64 before its log)."""
    rng = np.random.default_rng(classes)
    logits = rng.uniform(-1.0, 1.0, (16, classes)).astype(np.float32)
    labels = rng.integers(0, classes, 16)
    logits[np.arange(16), labels] = margin
    loss = xentkit.cross_entropy(logits, labels, reduction="none", check_probabilities=False)
    with xentkit.use_reference(True):  # the float64 oracle on the same values
        expected = xentkit.cross_entropy(logits.astype(np.float64), labels, reduction="none")
    assert np.all(expected > 0)
    np.testing.assert_allclose(loss, expected, rtol=2e-6, atol=1e-15)
