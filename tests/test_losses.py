"""nll_loss, binary cross-entropy, quadratic cost, entropy and KL against PyTorch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import xentkit
from conftest import assert_close

torch = pytest.importorskip("torch")
F = torch.nn.functional


def run_torch(function, x, *args, grad_output=None, **kwargs):
    t = torch.tensor(x, requires_grad=True)
    loss = function(t, *args, **kwargs)
    upstream = torch.ones_like(loss) if grad_output is None else torch.tensor(grad_output)
    (loss * upstream).sum().backward()
    return loss.detach().numpy(), t.grad.numpy()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("shape", "axis"), [((7, 5), -1), ((3, 4, 2, 5), 1), ((5,), 0)])
@pytest.mark.parametrize(("use_weight", "ignore", "reduction"),
                         list(itertools.product([False, True], [False, True], ["mean", "sum", "none"])))
def test_nll_loss_matches_torch(dtype, shape, axis, use_weight, ignore, reduction):
    rng = np.random.default_rng(0)
    log_probs = xentkit.log_softmax(rng.normal(size=shape).astype(dtype), axis=axis)
    sample_shape = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    target = rng.integers(0, shape[axis], size=sample_shape)
    if ignore and target.ndim:
        target.reshape(-1)[::2] = 7
    weight = rng.uniform(0.5, 2, size=shape[axis]).astype(dtype) if use_weight else None
    grad_output = rng.normal(size=sample_shape).astype(dtype) if reduction == "none" else None
    x = torch.tensor(log_probs)
    moved = torch.movedim(x, axis, 1) if x.ndim > 1 else x
    expected = run_torch(lambda t: F.nll_loss(torch.movedim(t, axis, 1) if t.ndim > 1 else t, torch.tensor(target),
                                              weight=None if weight is None else torch.tensor(weight),
                                              ignore_index=7, reduction=reduction),
                         log_probs, grad_output=grad_output)
    del moved
    loss, grad = xentkit.nll_loss_and_grad(log_probs, target, axis=axis, weight=weight, ignore_index=7,
                                           reduction=reduction, grad_output=grad_output)
    if np.isnan(expected[0]).any():
        assert loss == 0 and not grad.any()
        return
    assert_close(loss, expected[0], dtype, "loss")
    assert_close(grad, expected[1], dtype, "grad")
    assert_close(xentkit.nll_loss(log_probs, target, axis=axis, weight=weight, ignore_index=7,
                                  reduction=reduction), expected[0], dtype, "loss only")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("use_weight", "use_pos_weight", "reduction"),
                         list(itertools.product([False, True], [False, True], ["mean", "sum", "none"])))
def test_binary_cross_entropy_with_logits_matches_torch(dtype, use_weight, use_pos_weight, reduction):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(6, 4)) * 4).astype(dtype)
    logits[0] = [-200, 200, -30, 30]
    target = rng.uniform(size=(6, 4)).astype(dtype)
    weight = rng.uniform(0.5, 2, size=(6, 1)).astype(dtype) if use_weight else None
    pos_weight = rng.uniform(0.5, 3, size=4).astype(dtype) if use_pos_weight else None
    grad_output = rng.normal(size=(6, 4)).astype(dtype) if reduction == "none" else None
    kwargs = dict(weight=weight, pos_weight=pos_weight, reduction=reduction)
    torch_kwargs = {k: (torch.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    expected = run_torch(F.binary_cross_entropy_with_logits, logits, torch.tensor(target),
                         grad_output=grad_output, **torch_kwargs)
    loss, grad = xentkit.binary_cross_entropy_with_logits_and_grad(logits, target, grad_output=grad_output, **kwargs)
    assert_close(loss, expected[0], dtype, "loss")
    assert_close(grad, expected[1], dtype, "grad")
    assert_close(xentkit.binary_cross_entropy_with_logits(logits, target, **kwargs), expected[0], dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("use_weight", "reduction"), list(itertools.product([False, True], ["mean", "sum", "none"])))
def test_binary_cross_entropy_matches_torch(dtype, use_weight, reduction):
    rng = np.random.default_rng(2)
    probs = rng.uniform(0.01, 0.99, size=(5, 3)).astype(dtype)
    probs[0] = [0.0, 1.0, 0.5]  # torch clamps the logs at −100
    target = rng.integers(0, 2, size=(5, 3)).astype(dtype)
    target[0] = [0.0, 1.0, 1.0]
    weight = rng.uniform(0.5, 2, size=3).astype(dtype) if use_weight else None
    kwargs = dict(weight=weight, reduction=reduction)
    torch_kwargs = dict(weight=None if weight is None else torch.tensor(weight), reduction=reduction)
    expected = run_torch(F.binary_cross_entropy, probs, torch.tensor(target), **torch_kwargs)
    loss, grad = xentkit.binary_cross_entropy_and_grad(probs, target, **kwargs)
    assert_close(loss, expected[0], dtype, "loss")
    assert_close(grad, expected[1], dtype, "grad")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_quadratic_cost_matches_mse_loss(dtype, reduction):
    rng = np.random.default_rng(3)
    prediction, target = rng.normal(size=(2, 8, 3)).astype(dtype)
    expected = run_torch(F.mse_loss, prediction, torch.tensor(target), reduction=reduction)
    loss, grad = xentkit.quadratic_cost_and_grad(prediction, target, reduction=reduction)
    assert_close(loss, expected[0], dtype, "loss")
    assert_close(grad, expected[1], dtype, "grad")
    # the seed's tf.reduce_mean(tf.square(y - prediction))
    if reduction == "mean":
        assert_close(xentkit.quadratic_cost(prediction, target), np.mean(np.square(target - prediction)), dtype)


def test_entropy_and_kl_match_torch_distributions():
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.ones(6), size=5)
    q = rng.dirichlet(np.ones(6), size=5)
    dist_p = torch.distributions.Categorical(probs=torch.tensor(p))
    dist_q = torch.distributions.Categorical(probs=torch.tensor(q))
    assert_close(xentkit.entropy(p), dist_p.entropy().numpy())
    assert_close(xentkit.kl_divergence(p, q), torch.distributions.kl_divergence(dist_p, dist_q).numpy())
    # H(p, q) = H(p) + KL(p‖q): cross-entropy between distributions (seed 000)
    cross = -np.sum(p * np.log(q), axis=-1)
    assert_close(xentkit.entropy(p) + xentkit.kl_divergence(p, q), cross)
    assert_close(xentkit.entropy(p.T, axis=0), xentkit.entropy(p))


def test_entropy_and_kl_edge_cases():
    assert xentkit.entropy([1.0, 0.0, 0.0]) == 0
    assert_close(xentkit.entropy(np.full(8, 1 / 8)), np.log(8))
    assert xentkit.kl_divergence([0.5, 0.5, 0.0], [0.5, 0.5, 0.0]) == 0
    assert xentkit.kl_divergence([0.5, 0.5], [1.0, 0.0]) == np.inf


def test_a_wider_float_target_is_not_rounded_to_the_predictions_dtype():
    """float32 predictions with a float64 target are computed in float64, as torch promotes, and
    the result rounded once to the prediction's dtype (rounding the target to float32 first lost
    it: 1 + 1e-12 became 1, so the quadratic cost was 0 and the BCE lost its (1 − y)·x term)."""
    one = np.float32([1.0])
    near = np.float64([1 + 1e-12])
    expected = float(F.mse_loss(torch.tensor(one, dtype=torch.float64), torch.tensor(near)))  # 1.0002e-24
    loss, grad = xentkit.quadratic_cost_and_grad(one, near)
    assert loss.dtype == np.float32 and grad.dtype == np.float32
    assert loss == np.float32(expected) and expected > 0
    assert grad[0] == np.float32(2 * (1.0 - (1 + 1e-12)))
    x, y = np.float32([20.0]), np.float64([1 - 1e-12])
    exact = float(F.binary_cross_entropy_with_logits(torch.tensor(x, dtype=torch.float64), torch.tensor(y)))
    assert xentkit.binary_cross_entropy_with_logits(x, y) == np.float32(exact)  # 2.0812e-9 (was 2.0612e-9)
    _, grad = xentkit.binary_cross_entropy_with_logits_and_grad(x, y)
    assert grad.dtype == np.float32
    np.testing.assert_allclose(grad, 1 / (1 + np.exp(-20.0)) - y, rtol=1e-6)  # σ(x) − y = −2.0601e-9
    p, y = np.float32([0.5]), np.float64([1e-12])
    exact = float(F.binary_cross_entropy(torch.tensor(p, dtype=torch.float64), torch.tensor(y)))
    assert xentkit.binary_cross_entropy(p, y) == np.float32(exact)
    # an integer target does not widen float32 predictions; a long double one widens to float64
    assert xentkit.quadratic_cost(np.float32([0.5, 1.5]), np.array([0, 2])).dtype == np.float32
    long_target = np.array([1.0, 0.0], dtype=np.longdouble)
    want = float(F.binary_cross_entropy_with_logits(torch.tensor([0.5, 0.25], dtype=torch.float64), torch.tensor([1.0, 0.0])))
    got = xentkit.binary_cross_entropy_with_logits(np.float32([0.5, 0.25]), long_target)
    assert got.dtype == np.float32 and got == np.float32(want)


def test_backward_of_softmax_takes_an_integer_upstream_gradient():
    """A one-hot upstream gradient may be an integer array, as every other upstream gradient
    (it was a TypeError here while ``log_probs_backward`` took one); bool is still refused."""
    x = np.float32([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    onehot = np.array([[0, 1, 0], [1, 0, 0]])
    for forward, backward in ((xentkit.softmax, xentkit.softmax_backward), (xentkit.log_softmax, xentkit.log_softmax_backward)):
        out = forward(x)
        got = backward(out, onehot)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, backward(out, onehot.astype(np.float32)))
        t = torch.tensor(x, requires_grad=True)
        (torch.softmax if forward is xentkit.softmax else torch.log_softmax)(t, -1).backward(torch.tensor(onehot, dtype=torch.float32))
        assert_close(got, t.grad.numpy(), np.float32)
        with pytest.raises(TypeError, match=r"must be a floating-point or integer array, got dtype bool"):
            backward(out, onehot.astype(bool))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_binary_cross_entropy_gradient_at_the_clamp_is_torchs(dtype):
    """p = 0 with y = 1 (and p = 1 with y = 0): the denominator p·(1 − p) is clamped at torch's
    1e-12, a float32 constant, so torch's float64 gradient is −1/9.99999996e-13, not −1e12."""
    p, y = np.array([0.0, 1.0], dtype=dtype), np.array([1.0, 0.0], dtype=dtype)
    _, grad = xentkit.binary_cross_entropy_and_grad(p, y, reduction="sum")
    leaf = torch.tensor(p, requires_grad=True)
    F.binary_cross_entropy(leaf, torch.tensor(y), reduction="sum").backward()
    np.testing.assert_array_equal(grad, leaf.grad.numpy())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reference_path", [False, True])
def test_binary_cross_entropy_with_logits_at_minus_infinity_is_torchs(dtype, reference_path):
    """x = −inf: torch's value is its own form (1 − y)·x − (1 + (pw − 1)·y)·log σ(x), NaN for
    y in (0, 1] but ±inf where a target outside [0, 1] or a negative pos_weight tips it (those
    were NaN here), times the weight; on the kernel and on the reference alike."""
    import itertools

    cases = list(itertools.product([-1.0, 0.0, 0.3, 1.0, 2.0], [None, 3.0, -2.0, 0.0], [None, 2.0, 0.0]))
    for y, pos_weight, weight in cases:
        x, t = np.full((1, 2), -np.inf, dtype=dtype), np.full((1, 2), y, dtype=dtype)
        options = {}
        if pos_weight is not None:
            options["pos_weight"] = np.full(2, pos_weight, dtype=dtype)
        if weight is not None:
            options["weight"] = np.full(2, weight, dtype=dtype)
        with xentkit.use_reference(reference_path), np.errstate(invalid="ignore"):
            got = xentkit.binary_cross_entropy_with_logits(x, t, reduction="none", **options)
        want = F.binary_cross_entropy_with_logits(
            torch.tensor(x), torch.tensor(t), reduction="none", **{k: torch.tensor(v) for k, v in options.items()}
        ).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"y={y}, pos_weight={pos_weight}, weight={weight}")


@pytest.mark.parametrize(("dtype", "big"), [(np.float32, 3e38), (np.float64, 1e308)])
@pytest.mark.parametrize("grad_output", [None, 0.0])
def test_the_quadratic_mean_gradient_does_not_overflow_before_its_1_over_n(dtype, big, grad_output):
    """2·(ŷ − y) was formed first, then scaled: inf (NaN under grad_output=0) where the gradient
    2·(ŷ − y)/n is finite, as torch's mse_loss gives it (a review)."""
    prediction = np.array([big, 0.0, 0.0, 0.0], dtype=dtype)
    _, grad = xentkit.quadratic_cost_and_grad(prediction, np.zeros(4, dtype=dtype), grad_output=grad_output)
    expected = np.zeros(4, dtype=dtype)
    expected[0] = dtype(big / 2) if grad_output is None else 0.0
    assert grad.dtype == dtype
    np.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize("reduction", ["sum", "none", "mean"])
def test_a_large_upstream_gradient_of_the_quadratic_cost_does_not_overflow_before_the_difference(reduction):
    """(ŷ − y)·(2·upstream) overflowed at upstream 3e38: NaN where ŷ = y (0·∞), −∞ elsewhere;
    torch's mse_loss applies 2/n to the difference first (a review of the first fix)."""
    prediction = np.array([1.0, 0.5, 2.0][: 1 if reduction == "mean" else 3], dtype=np.float32)
    target = np.array([1.0, 1.0, 2.0][: prediction.size], dtype=np.float32)
    _, grad = xentkit.quadratic_cost_and_grad(prediction, target, reduction=reduction, grad_output=np.float32(3e38))
    x = torch.tensor(prediction, requires_grad=True)
    loss = torch.nn.functional.mse_loss(x, torch.tensor(target), reduction=reduction)
    loss.backward(torch.full(loss.shape, 3e38))
    np.testing.assert_array_equal(grad, x.grad.numpy())
