"""The fused softmax / log-softmax / logsumexp kernel (``xentkit.kernels.activations``) against
the float64 reference and torch: every dtype, block boundaries, special values, any axis, one
thread or many (the same bits), and the api's reference switch."""

from __future__ import annotations

import numpy as np
import pytest

import xentkit
from xentkit import reference
from xentkit.kernels.activations import LOG_SOFTMAX, LOGSUMEXP, SOFTMAX, softmax_rows

inf, nan = np.inf, np.nan
# float32 arithmetic (exp within a few ulps), against float64: relative to the row's scale
TOLERANCE = {np.float32: 4e-7, np.float64: 4e-15}
FUNCTIONS = {SOFTMAX: reference.softmax, LOG_SOFTMAX: reference.log_softmax, LOGSUMEXP: reference.logsumexp}


def _assert_close(got, expected, dtype):
    expected = np.asarray(expected, np.float64)
    scale = np.max(np.where(np.isfinite(expected), np.abs(expected), 0), axis=-1, keepdims=True) if expected.ndim else 1.0
    error = np.where(np.isnan(expected) | np.isinf(expected), 0, np.abs(got - expected))
    assert np.array_equal(np.isnan(got), np.isnan(expected)), (got, expected)
    assert np.array_equal(np.where(np.isinf(expected), expected, 0), np.where(np.isinf(got), got, 0))
    assert np.all(error <= TOLERANCE[dtype] * np.maximum(scale, 1e-300) + 1e-300), np.max(error / scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("classes", [1, 7, 1023, 1024, 1025, 3000])
@pytest.mark.parametrize("what", [SOFTMAX, LOG_SOFTMAX, LOGSUMEXP])
def test_the_kernel_matches_the_float64_reference(dtype, classes, what):
    rng = np.random.default_rng(classes)
    x = (rng.standard_normal((9, classes)) * 4).astype(dtype)
    if classes > 1024:
        x[1, -1] = 40.0  # the max in a later block: the running sums restated
        x[2, :] = -1e4  # every block's max far below 0
        x[2, 1500 % classes] = -1e4 + 3
    got = softmax_rows(x, what)
    assert got.dtype == (np.float64 if what == LOGSUMEXP else dtype)
    _assert_close(got, FUNCTIONS[what](x.astype(np.float64)), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", [1024, 2, 1], ids=["one block a row", "blocks of 2", "blocks of 1"])
def test_special_values_are_torchs(dtype, block):
    torch = pytest.importorskip("torch")
    big = np.finfo(dtype).max
    rows = [[inf, 0.0, 1.0], [nan, 1.0, 2.0], [-inf, -inf, -inf], [-inf, 0.0, 1.0], [inf, nan, 0.0],
            [big, -big, 0.0], [1e30, 1e30, 0.0], [3.0, 3.0, 3.0], [inf, inf, 0.0],
            [0.0, 1.0, inf], [0.0, nan, nan], [nan, nan, nan], [-inf, -inf, 2.0], [1.0, -inf, nan]]
    x = np.array(rows, dtype=dtype)
    t = torch.from_numpy(x)
    for what, expected in (
        (SOFTMAX, torch.softmax(t, -1)), (LOG_SOFTMAX, torch.log_softmax(t, -1)), (LOGSUMEXP, torch.logsumexp(t, -1))
    ):
        got = softmax_rows(x, what, block=block)
        np.testing.assert_allclose(got, expected.double().numpy(), rtol=4 * np.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_thread_or_many_give_the_same_bits(dtype):
    x = np.random.default_rng(1).standard_normal((300, 500)).astype(dtype)
    for what in (SOFTMAX, LOG_SOFTMAX, LOGSUMEXP):
        assert np.array_equal(softmax_rows(x, what, parallel=True), softmax_rows(x, what, parallel=False))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_api_runs_the_kernel_on_any_axis_as_the_reference_does(dtype):
    x = (np.random.default_rng(2).standard_normal((3, 5, 4)) * 3).astype(dtype)
    x = x.transpose(1, 0, 2)  # not contiguous
    for axis in (0, 1, -1):
        for function in (xentkit.softmax, xentkit.log_softmax, xentkit.logsumexp):
            got = function(x, axis=axis)
            with xentkit.use_reference(True):
                expected = function(x, axis=axis)
            assert got.dtype == expected.dtype == dtype and got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=4 * np.finfo(dtype).eps, atol=4 * np.finfo(dtype).eps)
    keep = xentkit.logsumexp(x, axis=1, keepdims=True)
    assert keep.shape == (5, 1, 4)
    assert type(xentkit.logsumexp(np.array([1.0, 2.0]))) is np.ndarray


def test_empty_inputs():
    assert xentkit.softmax(np.zeros((0, 3))).shape == (0, 3)
    assert xentkit.logsumexp(np.zeros((0, 3))).shape == (0,)
    assert softmax_rows(np.zeros((0, 3)), LOGSUMEXP).shape == (0,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("classes", [1, 2, 10, 24, 32])
@pytest.mark.parametrize("what", [LOG_SOFTMAX, LOGSUMEXP])
def test_the_tile_kernels_agree_with_the_row_kernels(dtype, classes, what, monkeypatch):
    """Rows of at most TILE_MAX_CLASSES classes take the tile kernels for log-softmax and
    logsumexp: their values match the row kernels' (e summed in float64 there, in the dtype's
    lanes in pass 1: within the dtype's rounding), their special values exactly (NaN, ±inf rows,
    masked classes, a dominant logit), the threaded and one-thread builds bit for bit, and the
    float64 reference within the tolerance above."""
    from xentkit.kernels import activations

    assert classes <= activations.TILE_MAX_CLASSES
    rng = np.random.default_rng(classes)
    x = (rng.standard_normal((2000, classes)) * 4).astype(dtype)  # several tiles, the last partial
    x[3, :] = -inf
    x[4, 0] = nan
    x[5, -1] = inf
    x[6, :] = nan
    x[7, 0] = 80.0  # a dominant logit: a confident row
    if classes > 2:
        x[8, 1:] = -inf  # masked classes
        x[9, :2] = inf
    tile = softmax_rows(x, what)
    assert np.array_equal(tile, softmax_rows(x, what, parallel=False), equal_nan=True)
    monkeypatch.setattr(activations, "TILE_MAX_CLASSES", 0)
    rows = softmax_rows(x, what)
    assert np.array_equal(np.isnan(tile), np.isnan(rows))
    special = ~np.isfinite(rows)
    assert np.array_equal(tile[special & ~np.isnan(rows)], rows[special & ~np.isnan(rows)])
    finite = np.isfinite(rows)
    np.testing.assert_allclose(tile[finite], rows[finite], rtol=8 * np.finfo(dtype).eps, atol=8 * np.finfo(dtype).eps)
    with np.errstate(all="ignore"):
        _assert_close(tile, FUNCTIONS[what](x.astype(np.float64)), dtype)
