"""Read-only arrays (a frozen array, a ``np.broadcast_to`` view) reach the kernels as writeable
copies: the same results, never an error from inside Numba's typing."""

from __future__ import annotations

import numpy as np

import xentkit


def _frozen(array):
    array = np.array(array)
    array.flags.writeable = False
    return array


def test_read_only_logits_labels_and_weights_give_the_same_results():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 5)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, -100])
    weight = np.linspace(0.5, 2.0, 5)
    loss, grad = xentkit.cross_entropy_and_grad(logits, labels, weight=weight)
    for args in ((_frozen(logits), labels, weight), (logits, _frozen(labels), weight), (logits, labels, _frozen(weight))):
        got_loss, got_grad = xentkit.cross_entropy_and_grad(args[0], args[1], weight=args[2])
        np.testing.assert_array_equal(got_loss, loss)
        np.testing.assert_array_equal(got_grad, grad)
    row = np.broadcast_to(logits[0], (6, 5))
    assert np.allclose(xentkit.cross_entropy(row, labels), xentkit.cross_entropy(np.array(row), labels))
    frozen = _frozen(logits)
    for got, want in zip(xentkit.log_probs(frozen, labels, return_entropy=True),
                         xentkit.log_probs(logits, labels, return_entropy=True), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(xentkit.log_probs_backward(frozen, labels, grad_log_probs=np.ones(6)),
                                  xentkit.log_probs_backward(logits, labels, grad_log_probs=np.ones(6)))
