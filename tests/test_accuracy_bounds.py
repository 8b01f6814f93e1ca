"""The float32 accuracy the kernel's docstring states, measured against the float64 reference:
confident rows included, with and without a softcap."""

from __future__ import annotations

import numpy as np
import pytest

import xentkit
from xentkit import reference


@pytest.mark.parametrize("softcap", [None, 30.0, 50.0])
@pytest.mark.parametrize("scale", [1.0, 5.0, 20.0])
def test_float32_loss_error_bound(softcap, scale):
    rng = np.random.default_rng(int(scale))
    x = (rng.standard_normal((2048, 1000)) * scale).astype(np.float32)
    y = x.argmax(1)  # confident, correct rows: losses down to ~1e-15
    y[::3] = rng.integers(0, 1000, len(y[::3]))  # and ordinary ones
    loss = xentkit.cross_entropy(x, y, reduction="none", softcap=softcap).astype(np.float64)
    expected, _ = reference.cross_entropy_and_grad(
        x.astype(np.float64), y, reduction="none", softcap=softcap, want_grad=False
    )
    bound = 4e-7 * np.maximum(1.0, expected)
    if softcap is not None:
        bound = bound + 4 * float(np.spacing(np.float32(softcap)))
    error = np.abs(loss - expected)
    assert (error <= bound).all(), f"worst {error.max():.3g} against a bound of {bound[error.argmax()]:.3g}"


@pytest.mark.parametrize("reference_path", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bce_gradient_of_confident_logits_keeps_its_digits(reference_path, dtype):
    """∂/∂x = (1 − y)·σ(x) − pw·y·σ(−x): torch's σ(x)·(pw·y + 1 − y) − pw·y cancels (0 at y = 1,
    x = 40, for −4.2e-18; twice the value with pos_weight 1e-30 at x = 0)."""
    x = np.array([0.0, 5.0, 40.0, -40.0, 3.0], dtype=dtype)
    y = np.array([1.0, 1.0, 1.0, 0.0, 0.25], dtype=dtype)
    pos_weight = np.array([1e-30, 1e-30, 1.0, 1.0, 2.0], dtype=dtype)
    with xentkit.use_reference(reference_path):
        _, grad = xentkit.binary_cross_entropy_with_logits_and_grad(x, y, pos_weight=pos_weight, reduction="none")
    x64, y64, pw64 = (a.astype(np.float64) for a in (x, y, pos_weight))
    sigma = 1.0 / (1.0 + np.exp(-x64))
    sigma_neg = 1.0 / (1.0 + np.exp(x64))
    exact = (1.0 - y64) * sigma - pw64 * y64 * sigma_neg
    np.testing.assert_allclose(grad.astype(np.float64), exact, rtol=3e-7 if dtype == np.float32 else 1e-14)


def test_kl_divergence_of_close_float32_distributions_is_computed_in_float64():
    """log p − log q of two close distributions cancels; in float32 the logs' rounding was most of
    the difference (a KL of 2.9e-9 came out 9.1e-10)."""
    rng = np.random.default_rng(0)
    p = rng.random(1000)
    p /= p.sum()
    q = p * (1.0 + 1e-6 * rng.standard_normal(1000))
    p32, q32 = p.astype(np.float32), q.astype(np.float32)
    kl = xentkit.kl_divergence(p32, q32)
    assert kl.dtype == np.float32
    p64, q64 = p32.astype(np.float64), q32.astype(np.float64)
    exact = np.sum(p64 * (np.log(p64) - np.log(q64)))  # of the float32 values, in float64
    assert abs(float(kl) - exact) <= 1e-6 * abs(exact)
