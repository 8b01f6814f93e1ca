"""The numerical contract: extremes, masked classes, NaN rows, dtypes."""

from __future__ import annotations

import numpy as np
import pytest

import xentkit


@pytest.mark.parametrize(("dtype", "big"), [(np.float32, 1e30), (np.float64, 1e300)])
@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1), dict(softcap=30.0), dict(weight=[1.0, 2.0, 0.5, 1.0])])
def test_extreme_finite_logits_give_finite_results(implementation, dtype, big, options):
    logits = np.array([[big, -big, 0.0, 1.0], [-big, big, big, -big], [0.0, 0.0, 0.0, big]], dtype=dtype)
    target = np.array([0, 3, 2])
    loss, grad = xentkit.cross_entropy_and_grad(logits, target, reduction="none", **options)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    assert loss.dtype == dtype
    if not options:
        assert loss[0] == 0  # the target holds all the mass
        np.testing.assert_allclose(loss[1], 2 * big, rtol=1e-6)
        np.testing.assert_allclose(grad[1], [0, 0.5, 0.5, -1], atol=1e-7)


def test_masked_classes_get_zero_probability_and_gradient(implementation):
    logits = np.array([[2.0, -np.inf, 0.5, -np.inf], [-np.inf, 1.0, -np.inf, -np.inf]])
    target = np.array([0, 1])
    loss, grad = xentkit.cross_entropy_and_grad(logits, target, reduction="none", z_loss=0.01)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    assert grad[0, 1] == 0 and grad[0, 3] == 0 and grad[1, 0] == 0
    assert loss[1] == pytest.approx(0.01 * 1.0)  # a single live class: only the z term remains
    unmasked = xentkit.cross_entropy(logits[:1, [0, 2]], [0], reduction="none")
    np.testing.assert_allclose(xentkit.cross_entropy(logits[:1], [0], reduction="none"), unmasked, rtol=1e-14)
    # Probability targets with no mass on the masked classes: 0·log 0 = 0, no NaN.
    probs = np.array([[0.7, 0.0, 0.3, 0.0]])
    loss, grad = xentkit.cross_entropy_and_grad(logits[:1], probs)
    assert np.isfinite(loss) and np.isfinite(grad).all() and grad[0, 1] == 0


def test_nan_in_a_row_stays_in_that_row(implementation):
    logits = np.random.default_rng(0).normal(size=(3, 5))
    logits[1, 2] = np.nan
    loss, grad = xentkit.cross_entropy_and_grad(logits, np.array([0, 1, 2]), reduction="none")
    assert np.isnan(loss[1]) and np.isnan(grad[1]).all()
    assert np.isfinite(loss[[0, 2]]).all() and np.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)])
def test_float16_computes_in_float32(implementation, options):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(20, 7)) * 3).astype(np.float16)
    target = rng.integers(0, 7, size=20)
    loss, grad = xentkit.cross_entropy_and_grad(logits, target, **options)
    assert loss.dtype == np.float16 and grad.dtype == np.float16
    loss32, grad32 = xentkit.cross_entropy_and_grad(logits.astype(np.float32), target, **options)
    assert loss == loss32.astype(np.float16)
    np.testing.assert_array_equal(grad, grad32.astype(np.float16))


def test_float32_stays_float32_and_is_accurate(implementation):
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(64, 1000)) * 5).astype(np.float32)
    target = rng.integers(0, 1000, size=64)
    loss, grad = xentkit.cross_entropy_and_grad(logits, target)
    exact_loss, exact_grad = xentkit.cross_entropy_and_grad(logits.astype(np.float64), target)
    assert loss.dtype == np.float32 and grad.dtype == np.float32
    assert abs(float(loss) - float(exact_loss)) <= 1e-6 * abs(float(exact_loss))
    assert np.abs(grad - exact_grad).max() <= 1e-5 * np.abs(exact_grad).max()


def test_integer_logits_are_a_type_error():
    with pytest.raises(TypeError, match="logits must be a floating-point array"):
        xentkit.cross_entropy(np.array([[1, 2]]), [0])
