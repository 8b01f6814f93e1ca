"""The api's row layout (``xentkit.api._rows``): the kernels' ``[rows, classes]`` matrix and
``[rows]`` coefficients, the gradient's buffer, the way back to the caller's layout; and that the
functions built on it (cross-entropy, log-probabilities) write no array of the caller's but
``out``."""

from __future__ import annotations

import numpy as np
import pytest

import xentkit
from xentkit.api._rows import RowLayout


def _logits(shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize(("shape", "axis"), [((5, 7), 1), ((3, 4, 6), 1), ((3, 4, 6), 2), ((2, 5, 3, 4), 1), ((7,), 0)])
def test_matrix_is_the_moved_logits_as_contiguous_rows_and_back(shape, axis):
    logits = _logits(shape)
    layout = RowLayout(logits, axis, private=False)
    moved = np.moveaxis(logits, axis, -1)
    assert layout.sample_shape == moved.shape[:-1]
    assert (layout.rows, layout.classes) == (int(np.prod(moved.shape[:-1])), shape[axis])
    assert layout.matrix.flags.c_contiguous and layout.matrix.shape == (layout.rows, layout.classes)
    np.testing.assert_array_equal(layout.matrix, moved.reshape(layout.rows, layout.classes))
    np.testing.assert_array_equal(layout.in_layout(layout.matrix.copy()), logits)
    labels = np.zeros(layout.sample_shape, np.int32)
    rows = layout.labels(labels)
    assert rows.dtype == np.int64 and rows.shape == (layout.rows,) and rows.flags.c_contiguous


def test_labels_of_a_strided_view_come_out_contiguous():
    layout = RowLayout(_logits((4, 3)), 1, private=False)
    labels = np.arange(8)[::2] % 3
    rows = layout.labels(labels)
    assert rows.flags.c_contiguous
    np.testing.assert_array_equal(rows, labels)


@pytest.mark.parametrize(
    "value",
    [0.5, np.float64(0.5), np.array(0.5), np.array([0.5]), 1, np.float32(0.5)],
    ids=["float", "numpy-scalar", "0-d", "one-value", "int", "float32"],
)
def test_per_row_spreads_a_scalar_over_the_rows(value):
    layout = RowLayout(_logits((2, 3, 4)), 2, private=False)
    rows = layout.per_row(value)
    assert rows.dtype == np.float64 and rows.shape == (6,) and rows.flags.c_contiguous
    np.testing.assert_array_equal(rows, np.full(6, np.asarray(value, np.float64).item()))


def test_per_row_flattens_one_value_per_sample_broadcast_views_included():
    layout = RowLayout(_logits((2, 3, 4)), 2, private=False)
    per_sample = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(layout.per_row(per_sample), np.arange(6.0))
    np.testing.assert_array_equal(layout.per_row(per_sample.T.T[:, ::-1]), per_sample[:, ::-1].reshape(6))
    broadcast = np.broadcast_to(np.array([1.0, 2.0, 3.0], np.float32), (2, 3))
    rows = layout.per_row(broadcast)
    assert rows.dtype == np.float64 and rows.flags.c_contiguous
    np.testing.assert_array_equal(rows, [1, 2, 3, 1, 2, 3])


def test_gradient_buffer_is_out_when_laid_out_as_the_matrix():
    logits = _logits((4, 5))
    layout = RowLayout(logits, 1, private=False)
    out = np.empty_like(logits)
    buffer = layout.gradient_buffer(out)
    assert np.shares_memory(buffer, out) and buffer.shape == (4, 5)
    assert layout.in_layout(buffer) is out
    in_place = RowLayout(logits, 1, private=False)
    assert np.shares_memory(in_place.gradient_buffer(logits), logits)


@pytest.mark.parametrize(
    "unfit",
    [np.empty((4, 5), np.float32), np.empty((5, 4)).T],
    ids=["other-dtype", "not-contiguous"],
)
def test_gradient_buffer_is_never_an_unfit_out_nor_the_callers_logits(unfit):
    logits = _logits((4, 5))
    layout = RowLayout(logits, 1, private=False)
    buffer = layout.gradient_buffer(unfit)
    assert not np.shares_memory(buffer, unfit) and not np.shares_memory(buffer, logits)
    assert layout.in_layout(buffer) is not unfit


def test_gradient_buffer_reuses_a_private_matrix():
    converted = RowLayout(_logits((4, 5)), 1, private=True)  # e.g. float16 computed in float32
    assert converted.gradient_buffer() is converted.matrix
    moved = RowLayout(_logits((4, 5, 3)), 1, private=False)  # the class axis moved: a copy here
    assert moved.gradient_buffer() is moved.matrix
    own = RowLayout(_logits((4, 5)), 1, private=False)  # the caller's contiguous logits
    buffer = own.gradient_buffer()
    assert buffer is not own.matrix and not np.shares_memory(buffer, own.matrix)


class _Subclass(np.ndarray):
    pass


def _callers_logits():
    """Logits that ``np.asarray`` views rather than returns: an ndarray subclass, a masked
    array, an object with ``__array__``."""
    plain = _logits((4, 5), np.float32)

    class ArrayLike:
        def __init__(self, array):
            self.array = array

        def __array__(self, dtype=None, copy=None):
            return self.array

    return {
        "subclass": (plain.copy().view(_Subclass), lambda value: np.asarray(value)),
        "masked": (np.ma.masked_array(plain.copy()), lambda value: value.data),
        "__array__": (ArrayLike(plain.copy()), lambda value: value.array),
    }


@pytest.mark.parametrize("kind", ["subclass", "masked", "__array__"])
def test_log_probs_backward_leaves_the_callers_logits_alone(kind):
    logits, data = _callers_logits()[kind]
    before = data(logits).copy()
    target = np.array([0, 1, 2, 3])
    grad = xentkit.log_probs_backward(logits, target, np.ones(4), np.ones(4))
    np.testing.assert_array_equal(data(logits), before)
    expected = xentkit.log_probs_backward(before, target, np.ones(4), np.ones(4))
    np.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize("kind", ["subclass", "masked", "__array__"])
def test_cross_entropy_and_grad_leaves_the_callers_logits_alone(kind):
    logits, data = _callers_logits()[kind]
    before = data(logits).copy()
    target = np.array([0, 1, 2, 3])
    _, grad = xentkit.cross_entropy_and_grad(logits, target, check_probabilities=False)
    np.testing.assert_array_equal(data(logits), before)
    np.testing.assert_array_equal(grad, xentkit.cross_entropy_and_grad(before, target)[1])
