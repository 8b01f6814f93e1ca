"""Memory of the NumPy API's forward-only calls, measured with ``tracemalloc`` (NumPy reports its
allocations to it; deterministic, not a timing): no gradient-sized array where no gradient is
asked for, and block-sized temporaries in the reference formulas' forward passes (a review:
``nll_loss`` made a zero gradient, ``entropy`` and ``kl_divergence`` peaked at 3 and 12 times the
input's bytes, ``softmax`` along another axis at 3)."""

from __future__ import annotations

import numpy as np
import pytest

import xentkit
from _memory import peak_above
from xentkit.api import losses


@pytest.fixture(scope="module")
def distributions():
    rng = np.random.default_rng(0)
    p = rng.random((2048, 4096), dtype=np.float32)
    p /= p.sum(1, keepdims=True)
    q = rng.random((2048, 4096), dtype=np.float32)
    q /= q.sum(1, keepdims=True)
    return p, q


def test_nll_loss_forward_makes_no_gradient():
    log_probs = np.log(np.full((2048, 4096), 1 / 4096, dtype=np.float32))
    target = np.arange(2048) % 4096
    xentkit.nll_loss(log_probs[:4], target[:4])
    assert peak_above(lambda: xentkit.nll_loss(log_probs, target), log_probs.nbytes) < 0.05


def test_entropy_and_kl_forward_run_in_blocks(distributions):
    p, q = distributions
    assert peak_above(lambda: xentkit.entropy(p), p.nbytes) < 0.2
    assert peak_above(lambda: xentkit.kl_divergence(p, q), p.nbytes) < 0.5


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocked_values_are_the_whole_computations(monkeypatch, axis, dtype):
    """The blocks' values are the _and_grad functions' (one formula, the same rows), also with
    blocks of a few rows, a ragged last one, and a class axis that is not last."""
    monkeypatch.setattr(losses, "_BLOCK_BYTES", 3 * 8 * 37)
    rng = np.random.default_rng(1)
    p = rng.random((10, 37, 3)).astype(dtype)
    q = rng.random((10, 37, 3)).astype(dtype)
    p[0, :, 0] = 0  # 0·log 0 = 0
    np.testing.assert_array_equal(xentkit.entropy(p, axis=axis), xentkit.entropy_and_grad(p, axis=axis)[0])
    np.testing.assert_array_equal(
        xentkit.kl_divergence(p, q, axis=axis), xentkit.kl_divergence_and_grad(p, q, axis=axis)[0]
    )
    assert xentkit.kl_divergence(p.astype(np.float32), q.astype(np.float64)).dtype == np.float64


def test_softmax_along_another_axis_keeps_two_arrays_alive():
    x = np.random.default_rng(2).standard_normal((2048, 4096), dtype=np.float32)
    for function in (xentkit.softmax, xentkit.log_softmax):
        function(x, axis=0)  # (the kernels compiled or loaded first: a cold cache's compiler allocates)
        assert peak_above(lambda f=function: f(x, axis=0), x.nbytes) < 2.1


def test_the_probability_check_without_a_mask_still_sees_a_negative_beside_nan():
    """The check takes a NaN-skipping minimum (``np.fmin``): a plain ``min`` is NaN with a NaN in
    the input, and would have let a negative value through."""
    for function in (xentkit.entropy, lambda p: xentkit.kl_divergence(p, np.abs(p))):
        with pytest.raises(ValueError, match=r"must hold probabilities .*got a minimum of -0\.1"):
            function(np.array([[0.5, -0.1, np.nan]]))


@pytest.mark.parametrize("shape", [(2048, 1024), (2 * 1024 * 1024,)])
def test_binary_cross_entropy_on_probabilities_forward_runs_in_blocks(shape):
    """binary_cross_entropy (probabilities: the reference formula) computed its gradient too, and
    every temporary at the input's size: 6 times its bytes; now the per-element losses (1) and
    1 MiB blocks, flat inputs included."""
    rng = np.random.default_rng(5)
    p = rng.random(shape, dtype=np.float32)
    target = (rng.random(shape) < 0.3).astype(np.float32)
    assert peak_above(lambda: xentkit.binary_cross_entropy(p, target), p.nbytes) < 1.5


@pytest.mark.parametrize("shape", [(10, 37, 3), (1111,)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_blocked_binary_cross_entropy_is_the_whole_computation(monkeypatch, shape, reduction, order):
    """The same values, in the same memory layout (an F-ordered input's losses F-ordered: summed
    in the same order, the same bits)."""
    monkeypatch.setattr(losses, "_BLOCK_BYTES", 3 * 8 * 37)
    rng = np.random.default_rng(6)
    p = np.asarray(rng.random(shape), order=order)
    p.reshape(-1, order="A")[:3] = [0.0, 1.0, 0.5]  # the −100 clamp on both sides
    target = np.asarray(rng.random(shape), order=order)
    weight = rng.random(shape[-1:])
    for w in (None, weight):
        got = xentkit.binary_cross_entropy(p, target, weight=w, reduction=reduction)
        want = xentkit.binary_cross_entropy_and_grad(p, target, weight=w, reduction=reduction)[0]
        np.testing.assert_array_equal(got, want)
        assert got.strides == want.strides
