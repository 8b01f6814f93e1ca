"""The worked numbers of the seed notes, as tests."""

from __future__ import annotations

import numpy as np
import pytest

import xentkit


def test_seed_004_three_class_example(implementation):
    """Logits (3, 1, −3), true class 0: softmax ≈ (0.88, 0.12, 0.00), loss −log 0.879 ≈ 0.129."""
    logits = np.array([[3.0, 1.0, -3.0]])
    np.testing.assert_allclose(xentkit.softmax(logits)[0], [0.88, 0.12, 0.00], atol=0.005)
    loss = xentkit.cross_entropy(logits, [0])
    assert round(float(loss), 3) == 0.129
    np.testing.assert_allclose(loss, -np.log(xentkit.softmax(logits)[0, 0]), rtol=1e-14)
    assert abs(float(loss) + np.log(0.879)) < 1e-3
    # the hand formula: −z_y + log Σ_i exp z_i
    np.testing.assert_allclose(loss, -3.0 + np.log(np.exp([3.0, 1.0, -3.0]).sum()), rtol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_seed_004_cross_entropy_is_nll_of_log_softmax(implementation, reduction):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4, 3)) * 3
    target = rng.integers(0, 4, size=(6, 3))
    weight = rng.uniform(0.5, 2, size=4)
    expected = xentkit.nll_loss(xentkit.log_softmax(logits, axis=1), target, axis=1, weight=weight, reduction=reduction)
    np.testing.assert_allclose(
        xentkit.cross_entropy(logits, target, axis=1, weight=weight, reduction=reduction), expected, rtol=1e-12
    )


def test_seed_002_gradient_is_softmax_minus_onehot(implementation):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, 5))
    target = rng.integers(0, 5, size=8)
    _, grad = xentkit.cross_entropy_and_grad(logits, target, reduction="sum")
    np.testing.assert_allclose(grad, xentkit.softmax(logits) - np.eye(5)[target], atol=1e-15)
    _, grad = xentkit.cross_entropy_and_grad(logits, target)  # Caffe averages over the batch
    np.testing.assert_allclose(grad, (xentkit.softmax(logits) - np.eye(5)[target]) / 8, atol=1e-15)


def test_seed_000_losses_order():
    """5 classes, true class 4 (index 3): −log 0.6 < −log 0.3 < −log 0.1."""
    losses = []
    for p_true in (0.6, 0.3, 0.1):
        probs = np.array([[0.2, 0.3, 0.4, p_true, 0.5]])
        loss = xentkit.nll_loss(np.log(probs), [3])
        np.testing.assert_allclose(loss, -np.log(p_true), rtol=1e-14)
        losses.append(float(loss))
    assert losses[0] < losses[1] < losses[2]


def test_seed_000_entropy_and_cross_entropy_between_distributions():
    p = np.array([0.5, 0.25, 0.25])
    q = np.array([0.25, 0.25, 0.5])
    cross = -np.sum(p * np.log(q))
    np.testing.assert_allclose(xentkit.entropy(p), 1.5 * np.log(2))
    np.testing.assert_allclose(xentkit.entropy(p) + xentkit.kl_divergence(p, q), cross)
    np.testing.assert_allclose(xentkit.cross_entropy(np.log(q)[None], p[None], check_probabilities=False), cross)


def test_seed_003_sigmoid_neuron_gradients():
    """Quadratic cost carries σ'(z) (the slowdown), cross-entropy does not: at z = 4, σ' ≈ 0.018."""
    z = np.array([4.0])
    a = xentkit.sigmoid(z)
    _, grad_a = xentkit.quadratic_cost_and_grad(a, [0.0], reduction="sum")
    quadratic_grad = grad_a * a * (1 - a)
    _, ce_grad = xentkit.binary_cross_entropy_with_logits_and_grad(z, [0.0], reduction="sum")
    np.testing.assert_allclose(ce_grad, a)
    assert quadratic_grad[0] < 0.05 * ce_grad[0]
