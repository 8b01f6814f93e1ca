"""Token log-probabilities, entropies and lse: the NumPy api (kernel and reference), and
``xentkit.torch.log_probs`` / ``linear_log_probs``, against float64 torch on materialized logits
and against finite differences."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

import xentkit

torch = pytest.importorskip("torch")
import xentkit.torch as xt  # noqa: E402

# (absolute tolerance of values, of gradients) per logits dtype, against float64
TOLERANCE = {np.float64: (1e-12, 1e-12), np.float32: (5e-6, 2e-6), np.float16: (5e-3, 5e-3)}
TORCH_TOLERANCE = {torch.float64: (1e-12, 1e-12), torch.float32: (5e-6, 2e-6), torch.bfloat16: (1e-5, 1e-5)}


def _oracle(logits: torch.Tensor, target: torch.Tensor, temperature: float, ignore_index: int = -100):
    """(log p(y), H, lse) in float64 torch from the materialized logits, 0 on ignored rows."""
    z = logits.double() / temperature
    log_p = torch.log_softmax(z, dim=-1)
    valid = target != ignore_index
    safe = torch.where(valid, target, 0).long()
    p = log_p.exp()
    entropy = -(p * log_p.masked_fill(p == 0, 0.0)).sum(-1)
    lse = torch.logsumexp(z, dim=-1)
    zero = torch.zeros((), dtype=torch.float64)
    picked = log_p.gather(-1, safe[..., None])[..., 0]
    return tuple(torch.where(valid, value, zero) for value in (picked, entropy, lse))


def _oracle_grad(logits, target, temperature, g, h, k, ignore_index=-100):
    leaf = torch.tensor(np.asarray(logits, dtype=np.float64), requires_grad=True)
    log_p, entropy, lse = _oracle(leaf, torch.as_tensor(np.asarray(target)), temperature, ignore_index)
    total = (log_p * torch.as_tensor(g)).sum() + (entropy * torch.as_tensor(h)).sum() + (lse * torch.as_tensor(k)).sum()
    total.backward()
    return leaf.grad.numpy()


def _problem(rng, rows, classes, dtype, *, scale=4.0, masked=True, ignored=True):
    logits = (rng.standard_normal((rows, classes)) * scale).astype(dtype)
    target = rng.integers(0, classes, rows)
    if ignored and rows > 3:
        target[3] = -100
    if masked and classes > 2 and rows > 5:
        logits[5, (target[5] + 1) % classes] = -np.inf  # a masked class, not the target
    return logits, target


@pytest.fixture(params=[False, True], ids=["kernel", "reference"])
def path(request):
    with xentkit.use_reference(request.param):
        yield request.param


# ---------------------------------------------------------------------------------------------
# NumPy api
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("classes", [1, 7, 1025, 5003])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_values_and_gradient_match_float64_torch(path, dtype, classes, temperature):
    rng = np.random.default_rng(classes)
    logits, target = _problem(rng, 37, classes, dtype)
    log_p, entropy, lse = xentkit.log_probs(
        logits, target, temperature=temperature, return_entropy=True, return_lse=True
    )
    expected = _oracle(torch.tensor(logits.astype(np.float64)), torch.tensor(target), temperature)
    value_tol, grad_tol = TOLERANCE[dtype]
    for got, want in zip((log_p, entropy, lse), expected, strict=False):
        assert got.dtype == dtype and got.shape == (37,)
        np.testing.assert_allclose(got, want.numpy(), rtol=value_tol, atol=value_tol * max(1, classes / 1000))
    assert np.all(log_p <= 0) and np.all(entropy >= 0)
    assert log_p[3] == entropy[3] == lse[3] == 0  # the ignored row

    g, h, k = (rng.standard_normal(37) for _ in range(3))
    grad = xentkit.log_probs_backward(logits, target, g, h, grad_lse=k, temperature=temperature)
    assert grad.dtype == dtype and grad.shape == logits.shape
    want = _oracle_grad(logits, target, temperature, g, h, k)
    np.testing.assert_allclose(grad, want, rtol=0, atol=grad_tol * 4)
    assert np.all(grad[3] == 0)


def test_a_vocabulary_of_151937_classes(path):
    """No multiple of any block size: RL frameworks have shipped wrong log-probs for this one."""
    rng = np.random.default_rng(151937)
    logits, target = _problem(rng, 4, 151937, np.float32, masked=False, ignored=False)
    target[0] = 151936  # the last class, in the last partial block
    log_p, entropy = xentkit.log_probs(logits, target, temperature=0.7, return_entropy=True)
    want = _oracle(torch.tensor(logits.astype(np.float64)), torch.tensor(target), 0.7)
    np.testing.assert_allclose(log_p, want[0].numpy(), rtol=2e-6, atol=2e-5)
    np.testing.assert_allclose(entropy, want[1].numpy(), rtol=2e-6, atol=2e-5)
    grad = xentkit.log_probs_backward(logits, target, np.ones(4), np.ones(4), temperature=0.7)
    np.testing.assert_allclose(grad, _oracle_grad(logits, target, 0.7, np.ones(4), np.ones(4), np.zeros(4)), atol=1e-6)


def test_kernel_and_reference_agree_to_float64_rounding():
    rng = np.random.default_rng(1)
    logits, target = _problem(rng, 50, 333, np.float64)
    with xentkit.use_reference():
        want = xentkit.log_probs(logits, target, temperature=1.3, return_entropy=True, return_lse=True)
        want_grad = xentkit.log_probs_backward(logits, target, np.arange(50.0), np.ones(50), temperature=1.3)
    got = xentkit.log_probs(logits, target, temperature=1.3, return_entropy=True, return_lse=True)
    got_grad = xentkit.log_probs_backward(logits, target, np.arange(50.0), np.ones(50), temperature=1.3)
    for a, b in zip(got, want, strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(got_grad, want_grad, rtol=0, atol=1e-12)


def test_gradient_matches_finite_differences(path):
    rng = np.random.default_rng(2)
    logits, target = _problem(rng, 6, 5, np.float64, masked=False)
    g, h, k = rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal(6)

    def objective(values):
        log_p, entropy, lse = xentkit.log_probs(values, target, temperature=0.8, return_entropy=True, return_lse=True)
        return float(g @ log_p + h @ entropy + k @ lse)

    numeric = np.zeros_like(logits)
    step = 1e-6
    for index in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[index] += step
        down[index] -= step
        numeric[index] = (objective(up) - objective(down)) / (2 * step)
    grad = xentkit.log_probs_backward(logits, target, g, h, grad_lse=k, temperature=0.8)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_axis_and_leading_dimensions(path):
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 9, 4, 3))  # classes on axis 1
    target = rng.integers(0, 9, (2, 4, 3))
    moved = np.moveaxis(logits, 1, -1)
    got = xentkit.log_probs(logits, target, axis=1, return_entropy=True)
    want = xentkit.log_probs(moved, target, return_entropy=True)
    for a, b in zip(got, want, strict=False):
        assert a.shape == (2, 4, 3)
        np.testing.assert_allclose(a, b, rtol=1e-14)
    grad = xentkit.log_probs_backward(logits, target, np.ones((4, 3)), axis=1)  # broadcast upstream
    np.testing.assert_allclose(
        grad, np.moveaxis(xentkit.log_probs_backward(moved, target, np.ones((2, 4, 3))), -1, 1), rtol=1e-14
    )


def test_float16_is_computed_in_float32(path):
    rng = np.random.default_rng(4)
    logits, target = _problem(rng, 8, 50, np.float16, masked=False)
    log_p = xentkit.log_probs(logits, target)
    assert log_p.dtype == np.float32
    want = _oracle(torch.tensor(logits.astype(np.float64)), torch.tensor(target), 1.0)[0].numpy()
    np.testing.assert_allclose(log_p, want, atol=1e-5)
    assert xentkit.log_probs_backward(logits, target, np.ones(8)).dtype == np.float16


def test_extreme_and_special_values_agree_between_kernel_and_reference():
    logits = np.array(
        [
            [1e30, 0.0, -1e30],  # huge but finite: exact
            [2.0, -np.inf, 1.0],  # a masked class
            [np.inf, 0.0, 1.0],  # +inf: NaN, as torch's log_softmax
            [np.nan, 0.0, 1.0],  # NaN stays in its row
            [-np.inf, -np.inf, -np.inf],  # nothing left: NaN, as torch
        ],
        dtype=np.float32,
    )
    target = np.array([1, 0, 1, 2, 0])
    got = xentkit.log_probs(logits, target, return_entropy=True, return_lse=True)
    with xentkit.use_reference():
        want = xentkit.log_probs(logits, target, return_entropy=True, return_lse=True)
    for a, b in zip(got, want, strict=False):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a[:2], b[:2], rtol=1e-6)
    assert got[0][0] == np.float32(-1e30) and got[1][0] == 0
    assert np.isnan(got[0][2:]).all()
    torch_lp = _oracle(torch.tensor(logits.astype(np.float64)), torch.tensor(target), 1.0)[0].numpy()
    np.testing.assert_array_equal(np.isnan(got[0]), np.isnan(torch_lp))
    grad = xentkit.log_probs_backward(logits[:2], target[:2], np.ones(2), np.ones(2))
    with xentkit.use_reference():
        grad_reference = xentkit.log_probs_backward(logits[:2], target[:2], np.ones(2), np.ones(2))
    np.testing.assert_allclose(grad, grad_reference, rtol=1e-6, atol=1e-7)
    assert grad[1, 1] == 0 and np.isfinite(grad).all()


def test_confident_rows_keep_their_relative_accuracy():
    """log p(y) = −log1p(δ) ≈ −δ tiny, δ = Σ_{j≠y} exp(z_j − z_y): the sum holding the max is kept
    in float64, so log p(y) is within ~2e-16 (float64's rounding of 1 + δ) absolute where
    lse − z_y would be 0 in float32 — and never 0 or positive."""
    logits = np.array([[23.0, 0.0, 0.0], [0.0, 30.0, -5.0], [12.0, 0.0, 1.0]], dtype=np.float32)
    target = np.array([0, 1, 0])
    log_p, entropy = xentkit.log_probs(logits, target, return_entropy=True)
    z = logits.astype(np.float64)
    others = np.exp(z - z[np.arange(3), target][:, None])
    others[np.arange(3), target] = 0
    delta = others.sum(axis=1)
    gaps = z - z[np.arange(3), target][:, None]  # z_j − z_y, 0 for the target
    exact_entropy = np.log1p(delta) - np.sum(others / (1 + delta)[:, None] * gaps, axis=1)
    # 1 + δ is rounded to float64: an absolute error of ~2e-16 on top of float32's relative one
    np.testing.assert_allclose(log_p, -np.log1p(delta), rtol=1e-6, atol=3e-16)
    np.testing.assert_allclose(entropy, exact_entropy, rtol=1e-5, atol=3e-16)
    assert np.all(log_p < 0) and np.all(entropy > 0)


def test_no_rows_and_one_class(path):
    assert xentkit.log_probs(np.zeros((0, 4)), np.zeros(0, dtype=np.int64)).shape == (0,)
    assert xentkit.log_probs_backward(np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0)).shape == (0, 4)
    log_p, entropy = xentkit.log_probs(np.array([[3.0], [-2.0]]), [0, 0], return_entropy=True)
    assert np.all(log_p == 0) and np.all(entropy == 0)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: xentkit.log_probs([[1.0, 2.0]], [0], temperature=0.0), ValueError, "temperature must be a finite float > 0, got 0.0"),
        (lambda: xentkit.log_probs([[1.0, 2.0]], [0], temperature=float("nan")), ValueError, "temperature must be a finite float > 0"),
        (lambda: xentkit.log_probs([[1.0, 2.0]], [0], temperature=float("inf")), ValueError, "temperature must be a finite float > 0"),
        (lambda: xentkit.log_probs([[1.0, 2.0]], [0], temperature="hot"), TypeError, "temperature must be a positive float, got str 'hot'"),
        (lambda: xentkit.log_probs([[1.0, 2.0]], [2]), ValueError, "target has label 2 at position (0,) but logits have 2 classes"),
        (lambda: xentkit.log_probs([[1.0, 2.0]], [0, 1]), ValueError, "target must have shape (1,)"),
        (lambda: xentkit.log_probs([[1.0, 2.0]], [0.5]), TypeError, "target of class indices must have an integer dtype, got dtype float64"),
        (lambda: xentkit.log_probs([[1, 2]], [0]), TypeError, "logits must be a floating-point array"),
        (lambda: xentkit.log_probs(np.zeros((2, 0)), [0, 0]), ValueError, "logits must have at least one class"),
        (lambda: xentkit.log_probs_backward([[1.0, 2.0]], [0], [1.0, 2.0, 3.0]), ValueError, "grad_log_probs must broadcast to the rows' shape (1,)"),
        (lambda: xentkit.log_probs_backward([[1.0, 2.0]], [0], [1.0], ["a"]), TypeError, "grad_entropy must be a numeric array"),
    ],
)
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error) as caught:
        call()
    assert message in str(caught.value)


# ---------------------------------------------------------------------------------------------
# xentkit.torch.log_probs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_log_probs_matches_the_oracle_with_any_upstream(backend, dtype):
    rng = np.random.default_rng(5)
    logits_np, target_np = _problem(rng, 24, 301, np.float64)
    logits = torch.tensor(logits_np, dtype=dtype).reshape(4, 6, 301).requires_grad_(True)
    target = torch.tensor(target_np).reshape(4, 6)
    log_p, entropy, lse = xt.log_probs(logits, target, temperature=1.5, return_entropy=True, return_lse=True, backend=backend)
    want = _oracle(logits.detach(), target, 1.5)
    value_tol, grad_tol = TORCH_TOLERANCE[dtype]
    for got, expected in zip((log_p, entropy, lse), want, strict=False):
        assert got.shape == (4, 6) and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double(), expected, rtol=value_tol, atol=value_tol)
    g, h = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    ((log_p * g).sum() + (entropy * h).sum()).backward()  # lse unused
    expected_grad = _oracle_grad(logits_np, target_np, 1.5, g.reshape(-1).numpy(), h.reshape(-1).numpy(), np.zeros(24))
    torch.testing.assert_close(logits.grad.double().reshape(24, 301), torch.tensor(expected_grad), rtol=0, atol=grad_tol * 4)


def test_torch_log_probs_entropy_alone_and_bfloat16():
    rng = np.random.default_rng(6)
    logits_np, target_np = _problem(rng, 16, 97, np.float32, masked=False)
    logits = torch.tensor(logits_np, dtype=torch.bfloat16, requires_grad=True)
    log_p, entropy = xt.log_probs(logits, torch.tensor(target_np), return_entropy=True)
    assert log_p.dtype == torch.float32 and (log_p <= 0).all() and (entropy >= 0).all()
    want = _oracle(logits.detach(), torch.tensor(target_np), 1.0)  # the same bfloat16 values
    torch.testing.assert_close(log_p.double(), want[0], rtol=1e-5, atol=1e-5)
    entropy.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    expected = _oracle_grad(logits.detach().float().numpy(), target_np, 1.0, np.zeros(16), np.ones(16), np.zeros(16))
    torch.testing.assert_close(logits.grad.double(), torch.tensor(expected), rtol=2e-2, atol=2e-3)


def test_torch_log_probs_double_backward_raises():
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    log_p = xt.log_probs(logits, torch.tensor([0, 1, 2]))
    (grad,) = torch.autograd.grad(log_p.sum(), logits, create_graph=True)
    # the hint names what does have one (there is no torch.nn.functional loss of log-probs)
    with pytest.raises(RuntimeError, match=r"no second derivative .*use torch\.log_softmax\(logits / T, dim=-1\) gathered"):
        torch.autograd.grad(grad.pow(2).sum(), logits)


# ---------------------------------------------------------------------------------------------
# xentkit.torch.linear_log_probs
# ---------------------------------------------------------------------------------------------


def _linear_problem(rng, rows, features, classes, dtype, *, bias=True):
    x = torch.tensor(rng.standard_normal((rows, features)), dtype=dtype, requires_grad=True)
    w = torch.tensor(rng.standard_normal((classes, features)) / np.sqrt(features) * 3, dtype=dtype, requires_grad=True)
    b = torch.tensor(rng.standard_normal(classes), dtype=dtype, requires_grad=True) if bias else None
    target = torch.tensor(rng.integers(0, classes, rows))
    if rows > 4:
        target[1] = -100
        target[4] = -100
    return x, w, b, target


def _linear_oracle(x, w, b, target, temperature, g, h, k):
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    logits = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2])
    outputs = _oracle(logits, target, temperature)
    total = sum((out * weight).sum() for out, weight in zip(outputs, (g, h, k), strict=False))
    total.backward()
    return outputs, [leaf.grad if leaf is not None else None for leaf in leaves]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("chunk_size", "bias", "temperature"), [(None, True, 1.0), (3, False, 0.5), (1, True, 2.0)])
def test_linear_log_probs_matches_the_materialized_logits(backend, dtype, chunk_size, bias, temperature):
    rng = np.random.default_rng(7)
    x, w, b, target = _linear_problem(rng, 11, 16, 1001, dtype, bias=bias)
    log_p, entropy, lse = xt.linear_log_probs(
        x, w, target, linear_bias=b, temperature=temperature, return_entropy=True, return_lse=True,
        chunk_size=chunk_size, backend=backend,
    )
    g, h, k = (torch.randn(11, dtype=torch.float64) for _ in range(3))
    ((log_p * g).sum() + (entropy * h).sum() + (lse * k).sum()).backward()
    want, grads = _linear_oracle(x, w, b, target, temperature, g, h, k)
    value_tol, grad_tol = TORCH_TOLERANCE[dtype]
    for got, expected in zip((log_p, entropy, lse), want, strict=False):
        torch.testing.assert_close(got.double(), expected, rtol=value_tol, atol=value_tol * 4)
    assert log_p[1] == entropy[1] == lse[1] == 0
    for leaf, expected in zip((x, w, b), grads, strict=False):
        if leaf is not None:
            torch.testing.assert_close(leaf.grad.double(), expected, rtol=grad_tol * 10, atol=grad_tol * 10)
    assert (x.grad[1] == 0).all() and (x.grad[4] == 0).all()


def test_linear_log_probs_151937_classes_and_leading_dimensions():
    rng = np.random.default_rng(8)
    x, w, _, target = _linear_problem(rng, 6, 4, 151937, torch.float32, bias=False)
    target[0] = 151936
    x3 = x.detach().reshape(2, 3, 4).requires_grad_(True)
    log_p, entropy = xt.linear_log_probs(x3, w, target.reshape(2, 3), temperature=0.9, return_entropy=True)
    assert log_p.shape == (2, 3)
    (log_p.sum() - 0.1 * entropy.sum()).backward()
    g = torch.ones(6, dtype=torch.float64)
    want, grads = _linear_oracle(x, w, None, target, 0.9, g, -0.1 * g, 0 * g)
    torch.testing.assert_close(log_p.reshape(-1).double(), want[0], rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(entropy.reshape(-1).double(), want[1], rtol=2e-6, atol=2e-5)
    # the input gradient is a float32 matmul dℓ·W summing 151937 products per entry: its rounding
    # depends on the BLAS's summation order (up to 6e-4 on gradients of ~5 on one machine), so the
    # bound is torch's own float32 error on the same problem (materialized float32 logits)
    torch_leaf = x.detach().clone().requires_grad_(True)
    torch_log_p, torch_entropy, _ = _oracle(torch.nn.functional.linear(torch_leaf, w.detach()), target, 0.9)
    (torch_log_p.sum() - 0.1 * torch_entropy.sum()).backward()
    torch_error = (torch_leaf.grad.double() - grads[0]).abs().max().item()
    error = (x3.grad.reshape(6, 4).double() - grads[0]).abs().max().item()
    assert error <= 2 * torch_error + 1e-5, (error, torch_error)
    torch.testing.assert_close(w.grad.double(), grads[1], rtol=1e-4, atol=1e-6)


def test_linear_log_probs_only_the_used_output_and_padded_chunks():
    rng = np.random.default_rng(9)
    x, w, b, target = _linear_problem(rng, 12, 8, 50, torch.float64)
    target[:8] = -100  # chunks of 4 rows: the first two have nothing to differentiate
    entropy = xt.linear_log_probs(x, w, target, linear_bias=b, return_entropy=True, chunk_size=4)[1]
    entropy.sum().backward()
    one, zero = torch.ones(12, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    _, grads = _linear_oracle(x, w, b, target, 1.0, zero, one, zero)
    for leaf, expected in zip((x, w, b), grads, strict=False):
        torch.testing.assert_close(leaf.grad, expected, rtol=1e-10, atol=1e-12)
    assert (x.grad[:8] == 0).all()


def test_linear_log_probs_edges():
    w = torch.randn(1, 3, requires_grad=True)
    log_p, entropy = xt.linear_log_probs(torch.randn(4, 3), w, torch.zeros(4, dtype=torch.long), return_entropy=True)
    assert (log_p == 0).all() and (entropy == 0).all()  # one class: certain
    empty = torch.zeros(0, 3, requires_grad=True)
    out = xt.linear_log_probs(empty, w, torch.zeros(0, dtype=torch.long))
    out.sum().backward()
    assert out.shape == (0,) and empty.grad.shape == (0, 3) and (w.grad == 0).all()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_linear_log_probs_of_no_features_are_the_bias_log_softmax(backend):
    """in_features 0: the logits are the bias (a review: the flattening reshape(-1, 0) raised
    torch's "ambiguous" error, where linear_cross_entropy gives the bias's loss)."""
    bias = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[2, 0], [1, 3]])
    log_p, entropy = xt.linear_log_probs(
        torch.zeros(2, 2, 0, dtype=torch.float64), torch.zeros(4, 0, dtype=torch.float64), target,
        linear_bias=bias, temperature=0.5, return_entropy=True, backend=backend,
    )
    want = torch.log_softmax(bias.detach() / 0.5, 0)
    torch.testing.assert_close(log_p, want[target], rtol=1e-12, atol=0)
    torch.testing.assert_close(entropy, torch.full((2, 2), -(want.exp() * want).sum().item(), dtype=torch.float64))
    log_p.sum().backward()
    bias_want = torch.zeros(4, dtype=torch.float64)
    for y in target.reshape(-1):  # d log p_y / d b = (onehot(y) − p)/T
        bias_want += (torch.nn.functional.one_hot(y, 4) - want.exp()) / 0.5
    torch.testing.assert_close(bias.grad, bias_want, rtol=1e-12, atol=1e-15)


def test_linear_log_probs_bfloat16_stays_in_range():
    rng = np.random.default_rng(10)
    x, w, b, target = _linear_problem(rng, 9, 32, 777, torch.bfloat16)
    log_p, entropy = xt.linear_log_probs(x, w, target, linear_bias=b, return_entropy=True, temperature=0.6)
    assert log_p.dtype == torch.float32 and (log_p <= 0).all() and (entropy >= 0).all()
    want, _ = _linear_oracle(x, w, b, target, 0.6, *(torch.zeros(9, dtype=torch.float64),) * 3)
    # the bfloat16 logits are rounded before the softmax: compare at bfloat16's resolution
    torch.testing.assert_close(log_p.double(), want[0], rtol=3e-2, atol=5e-2)
    (log_p.sum() + entropy.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"target": torch.tensor([0, 1])}, ValueError, "target must have shape (3,)"),
        ({"target": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "target of class indices must have an integer dtype"),
        ({"target": torch.tensor([0, 1, 9])}, ValueError, "target has label 9 at position (2,) but linear_weight has 5 rows (classes)"),
        ({"temperature": -1.0}, ValueError, "temperature must be a finite float > 0, got -1.0"),
        ({"temperature": float("inf")}, ValueError, "temperature must be a finite float > 0"),
        ({"linear_weight": torch.randn(5, 4, dtype=torch.float64)}, TypeError, "must share one dtype, got input float32, linear_weight float64"),
        ({"linear_weight": torch.randn(5, 3)}, ValueError, "input must have linear_weight's in_features=3"),
        ({"linear_bias": torch.randn(4)}, ValueError, "linear_bias must have shape (5,)"),
        ({"return_entropy": 1}, TypeError, "return_entropy must be a bool"),
        (
            {"input": torch.randn(3, 4, dtype=torch.float64), "linear_weight": torch.randn(5, 4, dtype=torch.float64), "backend": "triton"},
            ValueError, "backend='triton' cannot run this call: it takes float32, float16 and bfloat16 input, got torch.float64",
        ),
        ({"backend": "cuda"}, ValueError, "backend must be one of 'auto', 'triton', 'torch'"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be None or a positive int"),
        ({"linear_weight": torch.randn(5, 4, device="meta")}, ValueError, "must be on one device"),
    ],
)
def test_linear_log_probs_bad_input_names_the_argument(kwargs, error, message):
    arguments = {"input": torch.randn(3, 4), "linear_weight": torch.randn(5, 4), "target": torch.tensor([0, 1, 2])}
    arguments |= kwargs
    with pytest.raises(error) as caught:
        xt.linear_log_probs(
            arguments.pop("input"), arguments.pop("linear_weight"), arguments.pop("target"), **arguments
        )
    assert message in str(caught.value)


def test_torch_docstring_examples_print_what_they_claim():
    result = doctest.testmod(importlib.import_module("xentkit.torch.log_probs"), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_masked_target_and_nan_in_a_leading_masked_block():
    """A masked (−inf) target has log p = −inf and gradient g/T there (not 0·inf); a NaN in a
    first block of only NaN and −inf still makes its row NaN, as does a row of NaN only."""
    logits = np.zeros((3, 2100), dtype=np.float32)
    logits[0, 5] = -np.inf  # the target of row 0
    logits[1, :1500] = -np.inf  # the first 1024-class block holds nothing but −inf and one NaN
    logits[1, 7] = np.nan
    logits[2] = np.nan
    target = np.array([5, 2000, 0])
    got = xentkit.log_probs(logits, target, return_entropy=True, return_lse=True)
    with xentkit.use_reference():
        want = xentkit.log_probs(logits, target, return_entropy=True, return_lse=True)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)  # −inf and NaN where the reference has them
    assert got[0][0] == -np.inf and np.isnan(got[0][1:]).all() and np.isnan(got[2][1:]).all()
    grad = xentkit.log_probs_backward(logits[:1], target[:1], [2.0], [1.0], temperature=0.5)
    with xentkit.use_reference():
        want_grad = xentkit.log_probs_backward(logits[:1], target[:1], [2.0], [1.0], temperature=0.5)
    assert grad[0, 5] == np.float32(4.0)  # g/T at the masked target
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-9)


def test_merging_pieces_of_a_row_gives_the_whole_rows_statistics():
    """The vocabulary-parallel merge (reference.log_probs.merge_partials) on pieces cut from
    rows: equal to one pass over the whole row, with an empty piece, a masked piece and a +inf."""
    from xentkit.kernels.log_probs import log_prob_statistics
    from xentkit.reference.log_probs import merge_partials, row_statistics

    rng = np.random.default_rng(11)
    logits = rng.standard_normal((6, 30)) * 5
    logits[1, 10:20] = -np.inf  # the middle piece of row 1 is all masked
    logits[2, 25] = np.inf
    logits[4] = -45.0  # confident rows: one class 40 (row 4) or 45 (row 5, a tie in two pieces)
    logits[4, 12] = -5.0
    logits[5] = -50.0
    logits[5, [3, 17]] = -5.0
    target = np.array([3, 15, 7, 29, 12, 17])
    valid = np.ones(6, dtype=bool)
    whole = row_statistics(*log_prob_statistics(logits, target, valid, 0.8), valid)
    pieces = [(0, 10), (10, 20), (20, 30), (30, 30)]  # the last one is empty
    parts = [log_prob_statistics(logits[:, a:b].copy(), target - a, valid, 0.8) for a, b in pieces]
    m_total = np.max([part[0] for part in parts], axis=0)
    merged = [merge_partials(m, e, u, m_total) for m, e, u, _ in parts]
    e_total = (np.sum([piece[0] for piece in merged], axis=0) - 1) + np.sum([piece[1] for piece in merged], axis=0)
    u_total = np.sum([piece[2] for piece in merged], axis=0)
    z_target = np.sum([part[3] for part in parts], axis=0)
    got = row_statistics(m_total, e_total, u_total, z_target, valid)
    for a, b in zip(got, whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)  # NaN and ±inf where the whole row has them
    assert got[2][2] == np.inf and np.isnan(got[0][2])  # +inf: lse +inf, log p NaN, as torch
    # the confident rows' log p keep their digits (float64: 1 + e would round them away)
    with xentkit.use_reference():
        want = xentkit.log_probs(logits[4:], target[4:], temperature=0.8)
    assert -1e-20 < want[0] < 0 and want[1] == -np.log(2)  # (a tie of two: its excess is 1)
    np.testing.assert_allclose(got[0][4:], want, rtol=1e-14)


def test_blocks_far_below_a_later_max_add_nothing_not_nan():
    """A row whose first block sits ~1e308 below a later max (a float64 vocabulary masked with
    its lowest finite value, not −inf): restating the earlier sums at the new max multiplied
    exp(δ) = 0 by s·δ = −inf, and the entropy and its gradient came out NaN. Now H = 0, as the
    reference over the whole row and torch give; the same for the vocabulary-parallel merge."""
    from xentkit.kernels.log_probs import log_prob_statistics
    from xentkit.reference.log_probs import merge_partials, row_statistics

    lowest = np.finfo(np.float64).min
    for far, top in ((lowest, 0.0), (0.0, 1e308), (-1e306, 0.0)):
        x = np.full((1, 1025), far)
        x[0, -1] = top
        log_p, entropy = xentkit.log_probs(x, [1024], return_entropy=True)
        assert log_p[0] == 0.0 and entropy[0] == 0.0, far
        grad = xentkit.log_probs_backward(x, [1024], [1.0], grad_entropy=[1.0], grad_lse=[0.5])
        assert np.isfinite(grad).all() and grad[0, -1] == 0.5 and not grad[0, :-1].any()
        with xentkit.use_reference():
            assert xentkit.log_probs(x, [1024], return_entropy=True)[1][0] == 0.0
        t = torch.tensor(x, requires_grad=True)
        log_p_t, entropy_t = xt.log_probs(t, torch.tensor([1024]), return_entropy=True)
        (log_p_t + entropy_t).sum().backward()
        assert entropy_t.item() == 0.0 and torch.isfinite(t.grad).all()
        # two pieces of the row (the vocabulary-parallel merge), the first far below the second
        valid = np.ones(1, dtype=bool)
        parts = [log_prob_statistics(x[:, :1024].copy(), np.array([-1]), valid, 1.0),
                 log_prob_statistics(x[:, 1024:].copy(), np.array([0]), valid, 1.0)]
        m_total = np.maximum(parts[0][0], parts[1][0])
        merged = [merge_partials(m, e, u, m_total) for m, e, u, _ in parts]
        for pieces in (merged, [merge_partials(*(torch.tensor(v) for v in (m, e, u, m_total)))
                                for m, e, u, _ in parts]):
            e_total = (sum(piece[0] for piece in pieces) - 1) + sum(piece[1] for piece in pieces)
            u_total = sum(piece[2] for piece in pieces)
            stats = row_statistics(m_total, np.asarray(e_total), np.asarray(u_total), parts[1][3], valid)
            assert stats[0][0] == 0.0 and stats[1][0] == 0.0


def test_linear_log_probs_backward_twice_with_a_retained_graph():
    rng = np.random.default_rng(12)
    x, w, b, target = _linear_problem(rng, 9, 8, 40, torch.float64)
    log_p, entropy = xt.linear_log_probs(x, w, target, linear_bias=b, return_entropy=True, chunk_size=4)
    objective = log_p.sum() + 0.5 * entropy.sum()
    first = torch.autograd.grad(objective, (x, w, b), retain_graph=True)
    second = torch.autograd.grad(objective, (x, w, b))
    for a, c in zip(first, second, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_narrow_integer_targets_are_class_indices(dtype):
    """Compared with a uint8 target, ignore_index=-100 would be 156 and the class count 256
    would be 0: the targets are taken as int64 on every path."""
    torch.manual_seed(0)
    classes = 40000 if dtype == torch.int16 else 200
    logits = torch.randn(2, classes)
    target = torch.tensor([156, 3], dtype=dtype)
    expected = torch.log_softmax(logits.double(), -1)[[0, 1], target.long()]
    for backend in ("auto", "torch"):
        got = xt.log_probs(logits, target, backend=backend)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    x, w = torch.randn(2, 8), torch.randn(classes, 8)
    torch.testing.assert_close(
        xt.linear_log_probs(x, w, target).double(),
        torch.log_softmax((x @ w.T).double(), -1)[[0, 1], target.long()], rtol=1e-5, atol=1e-5,
    )
    ignored = xt.log_probs(logits, torch.tensor([0, 3], dtype=torch.int32), ignore_index=2**32)
    assert ignored[0] != 0  # 2**32 is not 0


@pytest.mark.parametrize(("dtype", "backend"), [(torch.float64, "auto"), (torch.float32, "torch"), (torch.float32, "auto")])
def test_outputs_are_tensors_of_their_own(dtype, backend):
    """Changing an output in place, or a detached copy of it, never changes the gradient, and is
    allowed while autograd records (as on torch's own results)."""
    gradients = []
    for touch in (False, True):
        torch.manual_seed(1)
        logits = torch.randn(3, 5, dtype=dtype, requires_grad=True)
        log_p, entropy = xt.log_probs(logits, torch.tensor([0, 1, 2]), return_entropy=True, backend=backend)
        loss = log_p.sum() + 0.5 * entropy.sum()
        if touch:
            entropy.detach().zero_()
        loss.backward()
        gradients.append(logits.grad)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=0, atol=0)
    logits = torch.randn(4, 6, requires_grad=True)
    target = torch.tensor([1, 2, 3, -100])
    log_p = xt.log_probs(logits, target)
    log_p.masked_fill_(target == 1, 0.0)
    log_p.sum().backward()
    assert logits.grad[0].abs().max() == 0 and logits.grad[3].abs().max() == 0  # masked, ignored
    expected = torch.softmax(logits.detach(), -1)[2].neg().index_add(0, torch.tensor([3]), torch.ones(1))
    torch.testing.assert_close(logits.grad[2], expected)
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(6, 3)
    out = xt.linear_log_probs(x, w, target)
    out.mul_(2.0)  # in place on a result of the chunked Function
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bad_arguments_are_named():
    x, y = torch.randn(2, 5), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="linear_weight must be a floating-point tensor, got NoneType"):
        xt.linear_log_probs(x, None, y)
    with pytest.raises(TypeError, match=r"logits must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        xt.log_probs(x.to_sparse(), y)
    with pytest.raises(TypeError, match=r"input must be a dense \(strided\) tensor"):
        xt.linear_log_probs(x.to_sparse(), torch.randn(3, 5), y)
    with pytest.raises(TypeError, match=r"target must be a dense \(strided\) tensor"):
        xt.log_probs(x, y.to_sparse())
    with pytest.raises(TypeError, match="return_entropy must be a bool, got str 'no'"):
        xentkit.log_probs(x.numpy(), y.numpy(), return_entropy="no")


_UINT64 = getattr(torch, "uint64", None)


@pytest.mark.skipif(_UINT64 is None, reason="this torch has no uint64")
@pytest.mark.parametrize("form", ["log_probs", "linear_log_probs", "numpy"])
def test_uint64_targets_beyond_int64_are_refused_not_wrapped(form):
    """2**64 − 100 would wrap to −100 (the default ignore_index): a silent 0 with no gradient."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, generator=generator)
    hidden, head = torch.randn(3, 4, generator=generator), torch.randn(5, 4, generator=generator)
    calls = {
        "log_probs": lambda y: xt.log_probs(logits, y),
        "linear_log_probs": lambda y: xt.linear_log_probs(hidden, head, y),
        "numpy": lambda y: xentkit.log_probs(logits.numpy(), y.numpy()),
    }
    for label in (2**64 - 100, 2**64 - 1):
        with pytest.raises(ValueError, match=rf"target has label {label} at position \(1,\), too large"):
            calls[form](torch.tensor([0, label, 2], dtype=_UINT64))
    holder = "linear_weight has 5 rows" if form == "linear_log_probs" else "logits have 5 classes"
    with pytest.raises(ValueError, match=rf"target has label 7 at position \(1,\) but {holder}"):
        calls[form](torch.tensor([0, 7, 2**64 - 1], dtype=_UINT64))
    small = torch.tensor([0, 4, 2], dtype=_UINT64)
    torch.testing.assert_close(torch.as_tensor(calls[form](small)), torch.as_tensor(calls[form](small.long())))


def test_nested_logits_and_huge_temperatures_are_clear_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (torch: nested tensors are a prototype)
        nested = torch.nested.nested_tensor([torch.zeros(2, 5), torch.zeros(3, 5)])
    with pytest.raises(TypeError, match=r"logits must be a dense .* got a nested tensor"):
        xt.log_probs(nested, torch.tensor([0, 1]))
    for call in (
        lambda: xentkit.log_probs([[1.0, 2.0]], [0], temperature=10**400),
        lambda: xt.log_probs(torch.randn(2, 3), torch.tensor([0, 1]), temperature=10**400),
    ):
        with pytest.raises(ValueError, match="temperature must be a positive float, got an integer beyond float64's range"):
            call()


@pytest.mark.skipif(_UINT64 is None, reason="this torch has no uint64")
def test_uint64_labels_beyond_int64_are_refused_under_vmap_too():
    """A plain (unbatched) target is readable inside torch.func transforms: still refused."""
    logits = torch.randn(2, 3, 5)
    y = torch.tensor([0, 2**64 - 100, 2], dtype=_UINT64)
    for call in (
        lambda: torch.vmap(lambda a: xt.cross_entropy(a, y, reduction="none"))(logits),
        lambda: torch.vmap(lambda a: xt.nll_loss(a.log_softmax(-1), y, reduction="none"))(logits),
        lambda: torch.vmap(lambda a: xt.log_probs(a, y))(logits),
    ):
        with pytest.raises(ValueError, match="too large for a class index"):
            call()


@pytest.mark.parametrize("offset", [0.0, 30.0, 1e4])
def test_float32_kernels_shift_before_they_scale(offset):
    """log p, the entropy and the gradient of float32 logits far from 0 at T ≠ 1 keep float32's
    relative accuracy: the kernels take (x − max x)/T, not x/T rounded first (at 1e4 that was
    4.8e-5 off in log p and 3.1e-4 in the entropy)."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((16, 3000)) * 3 + offset).astype(np.float32)
    y = rng.integers(0, 3000, 16)
    g = rng.standard_normal(16)
    got_lp, got_h = xentkit.log_probs(x, y, temperature=0.7, return_entropy=True)
    got_grad = xentkit.log_probs_backward(x, y, g, g, temperature=0.7)
    with xentkit.use_reference(True):
        lp, h = xentkit.log_probs(x.astype(np.float64), y, temperature=0.7, return_entropy=True)
        grad = xentkit.log_probs_backward(x.astype(np.float64), y, g, g, temperature=0.7)
    np.testing.assert_allclose(got_lp, lp, rtol=3e-7)
    np.testing.assert_allclose(got_h, h, rtol=1e-6)
    np.testing.assert_allclose(got_grad, grad, rtol=0, atol=3e-7 * np.max(np.abs(grad)))


@pytest.mark.parametrize(
    ("row", "dtype", "temperature"),
    [
        ([np.finfo(np.float64).max, 0.0, -np.finfo(np.float64).max], np.float64, 1e3),  # x/T finite
        ([np.finfo(np.float64).max, 0.0, -np.finfo(np.float64).max], np.float64, 0.7),  # x/T overflows
        ([np.finfo(np.float32).max, 0.0, 1.0], np.float32, 0.5),
        ([1e300, 0.0, 1.0], np.float64, 1e-10),
        ([3e38, 0.0, 1.0], np.float32, 0.1),
    ],
)
def test_kernels_keep_torchs_values_at_the_edges_of_the_range(row, dtype, temperature):
    """Where x/T overflows the logits' dtype, torch's (and the reference's) log p, entropy and
    gradient are NaN; where it does not, finite. A float64 max that m/c brought back an ulp off
    gave -inf in the gradient ([big, 0, -big] at T = 1e3), and an overflowing x/T a finite
    gradient where torch's is NaN."""
    torch = pytest.importorskip("torch")
    x = np.array([row], dtype=dtype)
    y, g = np.array([1]), np.ones(1)
    log_p, entropy = xentkit.log_probs(x, y, temperature=temperature, return_entropy=True)
    grad = xentkit.log_probs_backward(x, y, g, g, temperature=temperature)
    t = torch.from_numpy(x).requires_grad_()
    expected = torch.log_softmax(t / temperature, -1)
    expected_entropy = -(expected.exp() * expected).sum(-1)
    (expected[0, 1] + expected_entropy[0]).backward()
    rtol = 4 * np.finfo(dtype).eps
    np.testing.assert_allclose(log_p, expected[:, 1].detach().numpy(), rtol=rtol)
    np.testing.assert_allclose(entropy, np.abs(expected_entropy.detach().numpy()), rtol=rtol, atol=0)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=rtol, atol=0)


def test_float64_gradient_far_from_zero_keeps_its_accuracy():
    """Float64 logits near 1e8 at T = 0.7: the gradient within 1e-8 of its largest entry (a max
    recovered an ulp off made whole rows' exponentials off by ulp(1e8)/T, 3e-8 median error)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((64, 2000)) * 3 + 1e8
    y = rng.integers(0, 2000, 64)
    g = rng.standard_normal(64)
    got = xentkit.log_probs_backward(x, y, g, g, temperature=0.7)
    with xentkit.use_reference(True):
        expected = xentkit.log_probs_backward(x, y, g, g, temperature=0.7)
    assert np.max(np.abs(got - expected)) <= 1e-8 * np.max(np.abs(expected))


@pytest.mark.parametrize(("dtype", "temperature"), [(np.float32, 1e-36), (np.float64, 1e-306)])
@pytest.mark.parametrize("backend", ["numpy", "auto", "torch"])
def test_the_tiniest_temperatures_give_the_one_hot_gradient_not_nan(dtype, temperature, backend):
    """At T near the dtype's tiniest normal numbers each row is one-hot at its max: the gradient of
    log p(y) + H is c·([j = y] − [j = argmax]) (H's is 0). The pass-2 coefficient of d_j, c·k/s,
    times the exponent's floor (−1000) overflowed, and 0·∞ made the row NaN (a review)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 37)).astype(dtype)
    y = np.array([0, 3, int(np.argmax(x[2]))])
    expected = np.zeros((3, 37))
    expected[np.arange(3), y] += 1 / temperature
    expected[np.arange(3), np.argmax(x, axis=1)] -= 1 / temperature
    if backend == "numpy":
        grad = xentkit.log_probs_backward(x, y, np.ones(3), np.ones(3), temperature=temperature)
    else:
        torch = pytest.importorskip("torch")
        import xentkit.torch as xt

        t = torch.from_numpy(x).requires_grad_()
        log_p, entropy = xt.log_probs(t, torch.from_numpy(y), temperature=temperature, return_entropy=True, backend=backend)
        (log_p + entropy).sum().backward()
        grad = t.grad.numpy()
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_rows_by_chunks_are_the_whole_rows(monkeypatch, dtype):
    """Half-precision logits run the torch-ops rows, by chunks of rows (a review measured 10 and 14
    times the logits' bytes, forward and backward, when they took the whole matrix): chunks of 3
    rows (a ragged last one) give the whole computation's bits."""
    torch = pytest.importorskip("torch")
    import xentkit.torch as xt
    from xentkit.torch import _log_prob_rows

    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(11, 50, generator=generator) * 3).to(getattr(torch, dtype))
    target = torch.randint(0, 50, (11,), generator=generator)
    target[4] = -100

    def run():
        x = logits.clone().requires_grad_()
        outputs = xt.log_probs(x, target, temperature=0.7, return_entropy=True, return_lse=True)
        (outputs[0].sum() + 0.5 * outputs[1].sum() - 0.25 * outputs[2].sum()).backward()
        return (*outputs, x.grad)

    whole = run()
    monkeypatch.setattr(_log_prob_rows, "_row_chunks", lambda logits: 3)
    chunked = run()
    for got, want in zip(chunked, whole, strict=True):
        assert torch.equal(got, want)
    assert torch.isfinite(whole[3]).all() and whole[3].abs().sum() > 0


def test_torch_rows_take_the_fused_forms_chunk_rule(monkeypatch):
    """Pass 1 and pass 2 of the torch-ops rows see chunks of ``_chunks.chunk_rows`` rows (float32
    temporaries of a chunk), not the whole matrix."""
    torch = pytest.importorskip("torch")
    import xentkit.torch as xt
    from xentkit.torch import _log_prob_rows
    from xentkit.torch._chunks import chunk_rows

    seen = {"statistics": [], "gradient": []}
    rows = _log_prob_rows.TorchRows
    statistics, gradient = rows._statistics, rows._gradient
    monkeypatch.setattr(rows, "_statistics", staticmethod(lambda x, *a: seen["statistics"].append(x.shape[0]) or statistics(x, *a)))
    monkeypatch.setattr(rows, "_gradient", staticmethod(lambda x, *a: seen["gradient"].append(x.shape[0]) or gradient(x, *a)))
    x = torch.randn(64, 70000).bfloat16().requires_grad_()
    log_p, entropy = xt.log_probs(x, torch.zeros(64, dtype=torch.long), return_entropy=True)
    (log_p.sum() + entropy.sum()).backward()
    step = chunk_rows(64, 70000, 4, None)
    assert 1 < step < 64
    expected = [step] * (64 // step) + ([64 % step] if 64 % step else [])
    assert seen == {"statistics": expected, "gradient": expected}
