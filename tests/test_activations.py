"""softmax, log_softmax, logsumexp, sigmoid and the backward passes against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

import xentkit
from conftest import assert_close

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("shape", "axis"), [((5, 7), -1), ((3, 4, 2), 1), ((4, 3), 0), ((9,), 0)])
def test_softmax_family_matches_torch(dtype, shape, axis):
    x = (np.random.default_rng(0).normal(size=shape) * 5).astype(dtype)
    t = torch.tensor(x)
    assert_close(xentkit.softmax(x, axis=axis), torch.softmax(t, axis).numpy(), dtype, "softmax")
    assert_close(xentkit.log_softmax(x, axis=axis), torch.log_softmax(t, axis).numpy(), dtype, "log_softmax")
    assert_close(xentkit.logsumexp(x, axis=axis), torch.logsumexp(t, axis).numpy(), dtype, "logsumexp")
    kept = xentkit.logsumexp(x, axis=axis, keepdims=True)
    assert kept.shape == torch.logsumexp(t, axis, keepdim=True).shape
    assert xentkit.softmax(x, axis=axis).dtype == dtype


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_and_log_sigmoid_match_torch(dtype):
    x = np.array([-1e4, -800.0, -30.0, -1.0, 0.0, 0.5, 30.0, 800.0, 1e4], dtype=dtype)
    t = torch.tensor(x)
    assert_close(xentkit.sigmoid(x), torch.sigmoid(t).numpy(), dtype, "sigmoid")
    assert_close(xentkit.log_sigmoid(x), torch.nn.functional.logsigmoid(t).numpy(), dtype, "log_sigmoid")


@pytest.mark.parametrize(("shape", "axis"), [((5, 7), -1), ((3, 4, 2), 1)])
def test_backward_passes_match_torch_autograd(shape, axis):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape)
    upstream = rng.normal(size=shape)
    t = torch.tensor(x, requires_grad=True)
    torch.softmax(t, axis).backward(torch.tensor(upstream))
    assert_close(xentkit.softmax_backward(xentkit.softmax(x, axis), upstream, axis), t.grad.numpy())
    t.grad = None
    torch.log_softmax(t, axis).backward(torch.tensor(upstream))
    assert_close(xentkit.log_softmax_backward(xentkit.log_softmax(x, axis), upstream, axis), t.grad.numpy())


def test_extreme_values_stay_finite():
    for dtype, big in ((np.float32, 1e30), (np.float64, 1e300)):
        x = np.array([[big, 0.0, -big], [-big, -big, -big]], dtype=dtype)
        for value in (xentkit.softmax(x), xentkit.log_softmax(x), xentkit.logsumexp(x)):
            assert np.isfinite(value).all()
        np.testing.assert_allclose(xentkit.softmax(x)[0], [1, 0, 0])


def test_masked_classes_and_nan_rows():
    x = np.array([[1.0, -np.inf, 2.0], [np.nan, 0.0, 1.0], [-np.inf, -np.inf, -np.inf]])
    p = xentkit.softmax(x)
    assert p[0, 1] == 0 and np.isfinite(p[0]).all()
    assert np.isnan(p[1]).all()
    assert xentkit.logsumexp(x)[2] == -np.inf


def test_float16_is_computed_in_float32_and_returned_as_float16():
    x = np.array([[3.0, 1.0, -3.0]], dtype=np.float16)
    for function in (xentkit.softmax, xentkit.log_softmax, xentkit.logsumexp, xentkit.sigmoid, xentkit.log_sigmoid):
        out = function(x)
        assert out.dtype == np.float16
        np.testing.assert_allclose(out.astype(np.float64), function(x.astype(np.float32)), rtol=1e-3, atol=1e-3)
