"""Every ``_and_grad`` against central finite differences in float64."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import xentkit


def finite_difference(scalar_function, x: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """Central differences (f(x + h e_i) − f(x − h e_i)) / 2h for every element of x."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        shifted = x.copy()
        shifted[index] += step
        upper = scalar_function(shifted)
        shifted[index] -= 2 * step
        lower = scalar_function(shifted)
        grad[index] = (upper - lower) / (2 * step)
    return grad


def check(function_and_grad, x, *args, reduction="mean", **kwargs):
    """Compare the analytic gradient with finite differences of Σ grad_output·loss."""
    rng = np.random.default_rng(7)
    grad_output = None
    if reduction == "none":
        loss, _ = function_and_grad(x, *args, reduction=reduction, **kwargs)
        grad_output = rng.uniform(-2, 2, size=np.shape(loss))
    _, analytic = function_and_grad(x, *args, reduction=reduction, grad_output=grad_output, **kwargs)

    def scalar(values):
        loss, _ = function_and_grad(values, *args, reduction=reduction, **kwargs)
        return float(np.sum(loss * (1 if grad_output is None else grad_output)))

    numeric = finite_difference(scalar, x)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


CE_OPTIONS = list(itertools.product([None, "weight"], [0.0, 0.2], [0.0, 0.01], [None, 2.5], ["mean", "sum", "none"]))


@pytest.mark.parametrize(("weight", "smoothing", "z_loss", "softcap", "reduction"), CE_OPTIONS)
def test_cross_entropy_hard_labels(implementation, weight, smoothing, z_loss, softcap, reduction):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 3)) * 2
    target = np.array([[0, 4, -100], [2, 2, 1]])
    weight = rng.uniform(0.5, 2, size=5) if weight else None
    check(xentkit.cross_entropy_and_grad, logits, target, axis=1, weight=weight, label_smoothing=smoothing,
          z_loss=z_loss, softcap=softcap, reduction=reduction)


@pytest.mark.parametrize(("weight", "smoothing", "z_loss", "softcap", "reduction"), CE_OPTIONS)
def test_cross_entropy_probabilities(weight, smoothing, z_loss, softcap, reduction):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 6))
    target = rng.dirichlet(np.ones(6), size=4)
    weight = rng.uniform(0.5, 2, size=6) if weight else None
    check(xentkit.cross_entropy_and_grad, logits, target, weight=weight, label_smoothing=smoothing,
          z_loss=z_loss, softcap=softcap, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss(reduction):
    rng = np.random.default_rng(2)
    log_probs = rng.normal(size=(5, 4))
    check(xentkit.nll_loss_and_grad, log_probs, np.array([0, 3, -100, 1, 1]), weight=rng.uniform(0.5, 2, 4),
          reduction=reduction)


@pytest.mark.parametrize(("weighted", "reduction"), list(itertools.product([False, True], ["mean", "sum", "none"])))
def test_binary_cross_entropy_with_logits(weighted, reduction):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 3)) * 3
    target = rng.uniform(size=(4, 3))
    extra = dict(weight=rng.uniform(0.5, 2, size=(4, 1)), pos_weight=rng.uniform(0.5, 3, size=3)) if weighted else {}
    check(xentkit.binary_cross_entropy_with_logits_and_grad, logits, target, reduction=reduction, **extra)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_cross_entropy(reduction):
    rng = np.random.default_rng(4)
    probs = rng.uniform(0.05, 0.95, size=(3, 4))
    check(xentkit.binary_cross_entropy_and_grad, probs, rng.uniform(size=(3, 4)), weight=rng.uniform(0.5, 2, 4),
          reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_quadratic_cost(reduction):
    rng = np.random.default_rng(5)
    check(xentkit.quadratic_cost_and_grad, rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), reduction=reduction)


def test_entropy_and_kl():
    rng = np.random.default_rng(6)
    p = rng.uniform(0.1, 1, size=(3, 4))
    q = rng.uniform(0.1, 1, size=(3, 4))
    weights = rng.normal(size=3)
    _, grad = xentkit.entropy_and_grad(p)
    np.testing.assert_allclose(grad * weights[:, None],
                               finite_difference(lambda v: float(weights @ xentkit.entropy(v)), p), rtol=1e-6)
    _, grad_p, grad_q = xentkit.kl_divergence_and_grad(p, q)
    np.testing.assert_allclose(grad_p, finite_difference(lambda v: float(xentkit.kl_divergence(v, q).sum()), p),
                               rtol=1e-6)
    np.testing.assert_allclose(grad_q, finite_difference(lambda v: float(xentkit.kl_divergence(p, v).sum()), q),
                               rtol=1e-6)


@pytest.mark.parametrize(("forward", "backward"), [(xentkit.softmax, xentkit.softmax_backward),
                                                   (xentkit.log_softmax, xentkit.log_softmax_backward)])
def test_softmax_backward_passes(forward, backward):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 4, 2))
    upstream = rng.normal(size=x.shape)
    analytic = backward(forward(x, axis=1), upstream, axis=1)
    numeric = finite_difference(lambda v: float(np.sum(forward(v, axis=1) * upstream)), x)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)
