"""A confident row's tiny loss on the CPU kernels, to float64's last bits: each row keeps its
excess e = s − 1 apart from the max's own term and takes log s = log1p(e), and the target's
gradient at the max is −e/s. Before, log of the float64 sum 1 + e left ~1e-16 absolute: a
float64 loss of 3.9e-14 was 2e-4 off, log-softmax of [0, −40] gave 0 for −4.2e-18, and the target
gradient kept the same error."""

from __future__ import annotations

import numpy as np
import pytest

import xentkit
from xentkit.kernels.activations import LOG_SOFTMAX, LOGSUMEXP, softmax_rows
from xentkit.kernels.cross_entropy import cross_entropy_rows


def _confident(rows: int, classes: int, margin: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 logits with each row's label ``margin`` above the rest, labels, and the exact
    excess e = Σ_{j ≠ y} exp(x_j − x_y) (terms all below 1: no rounding of 1 + e)."""
    rng = np.random.default_rng(seed)
    logits = rng.uniform(-1.0, 1.0, (rows, classes))
    labels = rng.integers(0, classes, rows)
    logits[np.arange(rows), labels] = margin
    others = np.exp(logits - margin)
    others[np.arange(rows), labels] = 0.0
    return logits, labels, others.sum(axis=1)


@pytest.mark.parametrize(
    ("classes", "options"),
    [
        (10, {}),  # the tile kernel
        (100, {}),  # the row kernel, one block
        (100, {"block": 16}),  # several blocks, the max in one of them (rescaled rest)
        (5000, {"segments": 3}),  # the split kernel: segments merged
        (5000, {"segments": 3, "block": 700}),
    ],
)
@pytest.mark.parametrize("parallel", [False, True])
def test_a_confident_rows_loss_and_target_gradient_keep_float64s_digits(classes, options, parallel):
    logits, labels, excess = _confident(8, classes, 38.0, classes)
    exact_loss = np.log1p(excess)  # ~1e-14 to 1e-12
    exact_grad = -excess / (1.0 + excess)  # p_y − 1
    grad = np.empty_like(logits)
    loss, lse = cross_entropy_rows(
        logits, labels, None, -100, 0.0, 0.0, None, None, None, grad, parallel=parallel, **options
    )
    np.testing.assert_allclose(loss, exact_loss, rtol=4e-15, atol=0)
    np.testing.assert_allclose(grad[np.arange(8), labels], exact_grad, rtol=4e-15, atol=0)
    np.testing.assert_allclose(lse, 38.0 + exact_loss, rtol=1e-15)
    # the other entries p_j = exp(x_j − x_y)/s, already exact before
    others = np.exp(logits - 38.0) / (1.0 + excess)[:, None]
    others[np.arange(8), labels] = exact_grad
    np.testing.assert_allclose(grad, others, rtol=4e-15, atol=0)


@pytest.mark.parametrize("classes", [10, 100])  # the tile kernel, then the row kernel
def test_probability_targets_and_label_smoothing_keep_the_small_loss(classes):
    """One-hot probability targets: the loss and the target's gradient −e/s (p·A − mass rounded
    it at ulp(A) before: 0 for −4.2e-18); label smoothing and z-loss as the oracle."""
    logits, labels, excess = _confident(8, classes, 38.0, 7)
    onehot = np.eye(classes)[labels]
    loss = xentkit.cross_entropy(logits, onehot, reduction="none")
    np.testing.assert_allclose(loss, np.log1p(excess), rtol=4e-15, atol=0)
    for reference in (False, True):  # the target entry at the max, −e/s, on the kernel and the oracle
        with xentkit.use_reference(reference):
            _, grad = xentkit.cross_entropy_and_grad(logits, onehot, reduction="sum")
        np.testing.assert_allclose(grad[np.arange(8), labels], -excess / (1.0 + excess), rtol=4e-15, atol=0)
        in_place = logits.copy()  # (the kernel's in-place pass 3 too)
        xentkit.cross_entropy_and_grad(in_place, onehot, reduction="sum", out=in_place)
        np.testing.assert_allclose(in_place, grad, rtol=4e-15, atol=1e-300)
    smoothed = xentkit.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    with xentkit.use_reference(True):  # the oracle takes log1p of the rest too
        want = xentkit.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
        _, want_grad = xentkit.cross_entropy_and_grad(logits, labels, label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_allclose(smoothed, want, rtol=1e-14)
    _, grad = xentkit.cross_entropy_and_grad(logits, labels, label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-13, atol=1e-30)


def test_a_soft_capped_confident_row():
    """With a softcap the block holding the max counts its capped max terms apart too."""
    logits, labels, _ = _confident(8, 100, 12.0, 3)
    cap = 30.0
    z = cap * np.tanh(logits / cap)
    top = z[np.arange(8), labels]
    rest = np.exp(z - top[:, None])
    rest[np.arange(8), labels] = 0.0
    loss = xentkit.cross_entropy(logits, labels, softcap=cap, reduction="none")
    # the kernel's capped logits carry its own tanh's rounding (a few ulps of z): relative to the
    # gaps of ~12, not to the loss's size
    np.testing.assert_allclose(loss, np.log1p(rest.sum(axis=1)), rtol=1e-13)


@pytest.mark.parametrize("classes", [2, 100, 3000])
def test_log_softmax_and_logsumexp_of_a_confident_row(classes):
    logits, labels, excess = _confident(4, classes, 40.0, classes)
    log_p = softmax_rows(np.ascontiguousarray(logits), LOG_SOFTMAX)
    np.testing.assert_allclose(log_p[np.arange(4), labels], -np.log1p(excess), rtol=4e-15, atol=0)
    lse = softmax_rows(np.ascontiguousarray(logits), LOGSUMEXP)
    np.testing.assert_allclose(lse, 40.0 + np.log1p(excess), rtol=2e-16, atol=0)
    top = xentkit.log_softmax(np.array([0.0, -40.0]))[0]
    np.testing.assert_allclose(top, -np.log1p(np.exp(-40.0)), rtol=4e-15, atol=0)  # (was 0)


def _exact_token_statistics(logits: np.ndarray, labels: np.ndarray, temperature: float) -> tuple[np.ndarray, ...]:
    """log p(y), H and ∂log p(y)/∂x_y of rows whose label holds the max, from the exact excess
    e = Σ_{j ≠ y} exp(z_j − z_y) (terms below 1, no rounding of 1 + e): log p = −log1p(e),
    H = log1p(e) − Σ_j p_j·(z_j − z_y), and the target's gradient (1 − p_y)/T = e/(1 + e)/T."""
    rows = np.arange(logits.shape[0])
    z = logits / temperature
    d = z - z[rows, labels][:, None]
    terms = np.exp(d)
    terms[rows, labels] = 0.0
    excess = terms.sum(axis=1)
    log_s = np.log1p(excess)
    entropy = log_s - (terms * d).sum(axis=1) / (1.0 + excess)
    return -log_s, entropy, excess / (1.0 + excess) / temperature


@pytest.mark.parametrize("classes", [10, 100, 3000])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_a_confident_tokens_log_probability_and_entropy_keep_float64s_digits(classes, temperature):
    """The token log-probabilities take log s = log1p(e) with the max's terms counted apart too
    (kernel, reference, merge): log p(y) of a token 38/T above the rest (~1e-14 to 1e-20) was
    log(1 + e) of the rounded sum, 0 below 1e-16; the entropy was a percent off at a gap of 40
    (a review); the target's gradient a·(1 − p_y) is a·e/s at the max."""
    logits, labels, _ = _confident(6, classes, 38.0, classes)
    log_p, entropy, target_grad = _exact_token_statistics(logits, labels, temperature)
    assert (log_p > -1e-12).all() and (log_p < 0).all()
    for reference in (False, True):
        with xentkit.use_reference(reference):
            got_log_p, got_entropy = xentkit.log_probs(logits, labels, temperature=temperature, return_entropy=True)
            grad = xentkit.log_probs_backward(logits, labels, np.ones(6), temperature=temperature)
        np.testing.assert_allclose(got_log_p, log_p, rtol=1e-14, atol=0)
        np.testing.assert_allclose(got_entropy, entropy, rtol=1e-13, atol=0)
        np.testing.assert_allclose(grad[np.arange(6), labels], target_grad, rtol=1e-14, atol=0)


def test_a_confident_tokens_log_probability_through_xentkit_torch():
    """The torch binding's Numba rows, whole logits and the fused linear form, keep it too."""
    torch = pytest.importorskip("torch")
    import xentkit.torch as xt

    logits, labels, _ = _confident(6, 200, 40.0, 3)
    log_p, entropy, target_grad = _exact_token_statistics(logits, labels, 1.0)
    x = torch.tensor(logits, requires_grad=True)
    got_log_p, got_entropy = xt.log_probs(x, torch.tensor(labels), return_entropy=True)
    got_log_p.sum().backward()
    np.testing.assert_allclose(got_log_p.detach().numpy(), log_p, rtol=1e-14, atol=0)
    np.testing.assert_allclose(got_entropy.detach().numpy(), entropy, rtol=1e-13, atol=0)
    np.testing.assert_allclose(x.grad.numpy()[np.arange(6), labels], target_grad, rtol=1e-14, atol=0)
    # the same logits as x Wᵀ with x the identity: linear_log_probs, in chunks of 4 rows
    eye = torch.eye(6, dtype=torch.float64)
    weight = torch.tensor(logits.T.copy(), requires_grad=True)
    linear = xt.linear_log_probs(eye, weight, torch.tensor(labels), chunk_size=4)
    np.testing.assert_allclose(linear.detach().numpy(), log_p, rtol=1e-14, atol=0)


def test_the_reference_takes_a_single_row_whose_target_is_its_max():
    """1-D logits (one sample, a 0-d target) at the row's max: the reference's regrouped target
    entry indexed rows by np.nonzero of a 0-d array and raised (a review); and a z-loss under an
    upstream gradient of 1e308 overflowed to inf on the reference only (its factor 2·g first)."""
    x = np.array([3.0, 1.0, -3.0])
    want = xentkit.cross_entropy_and_grad(x, 0)
    with xentkit.use_reference():
        got = xentkit.cross_entropy_and_grad(x, 0)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-15)
    rows = x[None]
    want = xentkit.cross_entropy_and_grad(rows, [0], z_loss=1e-3, grad_output=1e308)
    with xentkit.use_reference(), np.errstate(all="raise"):
        got = xentkit.cross_entropy_and_grad(rows, [0], z_loss=1e-3, grad_output=1e308)
    assert np.isfinite(got[1]).all()
    np.testing.assert_allclose(got[1], want[1], rtol=1e-14)
