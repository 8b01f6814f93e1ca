"""The NumPy api on non-finite values and odd inputs (a differential fuzz campaign's findings):
the values torch gives, on the kernel and the reference path alike, with no NumPy warning
reaching the user, writeable results, and errors that name the argument."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import xentkit as xk

torch = pytest.importorskip("torch")

inf, nan = np.inf, np.nan


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize(
    "row", [[inf, 0.0], [nan, 1000.0], [-inf, -inf], [inf, inf], [-inf, 0.0], [inf, -inf], [nan, nan], [3.0, -1.0]]
)
def test_activations_of_non_finite_rows_are_torchs(row):
    t = torch.tensor(row, dtype=torch.float64)
    pairs = [
        (xk.softmax(row), torch.softmax(t, 0)),
        (xk.log_softmax(row), torch.log_softmax(t, 0)),
        (xk.logsumexp(row), torch.logsumexp(t, 0)),
    ]
    # a finite row to a few ulps: log1p of the sum's part beyond 1 is nearer the exact value than
    # torch's log of the sum ([3, −1]: −0.018149927917809738 against torch's …78, exact …74)
    rtol = 1e-15 if not np.isfinite(row).all() else 1e-14
    for got, expected in pairs:
        np.testing.assert_allclose(got, expected.numpy(), rtol=rtol, atol=0)


def test_backward_passes_with_infinite_upstream_gradients_are_torchs():
    p = np.array([0.25, 0.75])
    for g in ([inf, 0.0], [inf, -inf], [nan, 1.0]):
        x = torch.tensor(np.log(p), requires_grad=True)
        torch.softmax(x, 0).backward(torch.tensor(g))
        np.testing.assert_array_equal(xk.softmax_backward(p, g), x.grad.numpy())
        x = torch.tensor(np.log(p), requires_grad=True)
        torch.log_softmax(x, 0).backward(torch.tensor(g))
        np.testing.assert_array_equal(xk.log_softmax_backward(np.log(p), g), x.grad.numpy())


def test_nll_gradient_stays_zero_off_target_whatever_the_upstream():
    log_p = np.log([[0.2, 0.8], [0.5, 0.5]])
    target = np.array([0, -100])
    _, grad = xk.nll_loss_and_grad(log_p, target, reduction="sum", grad_output=inf)
    x = torch.tensor(log_p, requires_grad=True)
    torch.nn.functional.nll_loss(x, torch.tensor(target), reduction="sum").backward(torch.tensor(inf, dtype=torch.float64))
    np.testing.assert_array_equal(grad, x.grad.numpy())  # [[-inf, 0], [0, 0]]
    assert xk.nll_loss(np.array([[-inf, 0.0], [-1.0, -0.5]]), np.array([-100, 1])) == 0.5


@pytest.mark.parametrize("upstream", [dict(grad_log_probs=[inf]), dict(grad_log_probs=[1.0], grad_entropy=[inf])])
def test_log_probs_backward_is_the_same_on_both_paths(upstream):
    logits = np.array([[0.0, 1.0, 2.0]])
    kernel = xk.log_probs_backward(logits, [1], **upstream)
    with xk.use_reference(True):
        reference = xk.log_probs_backward(logits, [1], **upstream)
    np.testing.assert_array_equal(kernel, reference)
    x = torch.tensor(logits, requires_grad=True)
    log_p = torch.log_softmax(x, -1)
    total = log_p[0, 1] * torch.tensor(upstream["grad_log_probs"][0], dtype=torch.float64)
    if "grad_entropy" in upstream:
        total = total + -(log_p.exp() * log_p).sum() * torch.tensor(upstream["grad_entropy"][0], dtype=torch.float64)
    total.backward()
    np.testing.assert_array_equal(kernel, x.grad.numpy())


def test_kl_divergence_computes_both_arguments_in_one_dtype():
    for p in (np.array([100.0]), np.array([0.25, 0.75])):
        value = xk.kl_divergence(p, p.astype(np.float32))
        assert value == 0 and value.dtype == np.float64
    with pytest.raises(ValueError, match=r"^q must have the shape of p \(2, 2, 3\), got \(2, 3\)"):
        xk.kl_divergence(np.full((2, 2, 3), 1 / 3), np.full((2, 3), 1 / 3))
    assert xk.kl_divergence(np.float32([0.5, 0.5]), np.float32([1e-45, 1.0])) > 0  # no overflow warning
    assert np.isnan(xk.entropy([nan, nan]))  # no all-NaN warning


def test_results_are_writeable_and_overflow_quietly_to_inf():
    loss = xk.binary_cross_entropy_with_logits(np.array([1.0, -2.0]), np.array([1.0, 0.0]), reduction="none")
    loss *= 2  # not a read-only broadcast view
    loss, _ = xk.binary_cross_entropy_with_logits_and_grad(
        np.array([[1.0, -2.0]]), np.array([[1.0, 0.0]]), weight=np.array([2.0]), reduction="none"
    )
    loss += 1
    assert np.isnan(xk.binary_cross_entropy_with_logits([-inf], [0.0]))  # torch's NaN, no warning
    assert xk.quadratic_cost(np.array([300.0], np.float16), np.array([0.0], np.float16), reduction="sum") == inf
    assert xk.quadratic_cost(np.array([1e20], np.float32), np.array([0.0], np.float32)) == inf
    assert xk.perplexity(np.array([[0.0, 20.0]], np.float16), [0]) == inf
    assert xk.log_softmax(np.array([60000, -60000], np.float16))[1] == -inf


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: xk.nll_loss(np.zeros((2, 3)), [0, 1], weight=[[1.0, 2.0], [3.0]]), "weight"),
        (lambda: xk.cross_entropy(np.zeros((2, 3)), [[0], [1, 2]]), "target"),
        (lambda: xk.binary_cross_entropy_with_logits([1.0, 2.0], [[1.0], [2, 3]]), "target"),
        (lambda: xk.binary_cross_entropy_with_logits([1.0, 2.0], [1.0, 0.0], pos_weight=[[1.0], [2, 3]]), "pos_weight"),
        (lambda: xk.cross_entropy_and_grad(np.zeros((2, 3)), [0, 1], reduction="none", grad_output=[[1.0], [2, 3]]), "grad_output"),
        (lambda: xk.log_probs(np.zeros((2, 3)), [[0], [1, 2]]), "target"),
    ],
)
def test_ragged_lists_name_their_argument(call, name):
    with pytest.raises(TypeError, match=rf"^{name} must be a numeric array, got list"):
        call()


def test_flags_are_checked():
    with pytest.raises(TypeError, match="keepdims must be a bool, got str 'no'"):
        xk.logsumexp([1.0, 2.0], keepdims="no")
    assert xk.logsumexp([[1.0, 2.0]], keepdims=True).shape == (1, 1)


def test_reference_entropy_gradient_keeps_its_accuracy_on_confident_rows():
    """Finite upstream gradients take the form without cancellation on both paths: a confident
    row's gradient sums to 0 and matches the kernel (the chain form lost it to rounding)."""
    for dtype in (np.float32, np.float64):
        logits = np.array([[30.0, 0.0, 0.0]], dtype)
        kernel = xk.log_probs_backward(logits, [0], None, [1.0])
        with xk.use_reference(True):
            reference = xk.log_probs_backward(logits, [0], None, [1.0])
        np.testing.assert_allclose(reference, kernel, rtol=1e-5, atol=0)
        assert reference[0, 0] < 0 and abs(float(reference.sum())) < 1e-6 * abs(float(reference[0, 0]))


def test_more_values_beyond_the_dtype_are_quiet():
    assert xk.logsumexp([inf, 1000.0]) == inf and xk.logsumexp(np.float32([inf, 100.0])) == inf
    assert np.isnan(xk.log_probs_backward([[1000.0, 0.0, 0.0]], [0], None, [inf])).all()
    with xk.use_reference(True):
        assert xk.cross_entropy(np.float32([[1e38, 0.0]]), [0], z_loss=1e-4) == inf


def test_kl_gradients_have_their_arguments_dtypes():
    p, q = np.float32([0.25, 0.75]), np.float64([0.5, 0.5])
    value, grad_p, grad_q = xk.kl_divergence_and_grad(p, q)
    assert (value.dtype, grad_p.dtype, grad_q.dtype) == (np.float64, np.float32, np.float64)
    tp, tq = torch.tensor(p, requires_grad=True), torch.tensor(q, requires_grad=True)
    (tp * (tp.log() - tq.log())).sum().backward()
    np.testing.assert_allclose(grad_p, tp.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(grad_q, tq.grad.numpy(), rtol=1e-12)


def test_keepdims_takes_numpys_zero_and_one():
    assert xk.logsumexp([[1.0, 2.0]], keepdims=1).shape == (1, 1)
    assert xk.logsumexp([[1.0, 2.0]], keepdims=0).shape == (1,)
    with pytest.raises(TypeError, match="keepdims must be a bool"):
        xk.logsumexp([1.0, 2.0], keepdims=2)


def test_nll_gradient_matches_torch_with_weights_and_reductions():
    generator = np.random.default_rng(3)
    log_p = np.log(generator.dirichlet(np.ones(5), size=(4, 3)))  # (N, d, C), class axis last
    target = generator.integers(0, 5, size=(4, 3))
    target[0, 1] = -100
    weight = generator.random(5)
    for reduction in ("mean", "sum", "none"):
        upstream = generator.random((4, 3)) if reduction == "none" else None
        loss, grad = xk.nll_loss_and_grad(log_p, target, weight=weight, reduction=reduction, grad_output=upstream)
        x = torch.tensor(log_p, requires_grad=True)
        expected = torch.nn.functional.nll_loss(
            x.movedim(-1, 1), torch.tensor(target), weight=torch.tensor(weight), reduction=reduction
        )
        expected.backward(None if upstream is None else torch.tensor(upstream))
        np.testing.assert_allclose(loss, expected.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rows_spanning_more_than_the_dtypes_range_are_quiet(dtype):
    """x − max(x) of [max, −max] is −inf (rounded to the dtype): softmax, log_softmax and
    log_probs (the float32 log-probability rounded from float64) give the exact answer without
    an overflow warning, on both paths; class weights of +inf and −inf neither."""
    top = np.finfo(dtype).max
    x = np.array([top, -top], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for reference in (False, True):
            with xk.use_reference(reference):
                np.testing.assert_array_equal(xk.softmax(x), [1.0, 0.0])
                np.testing.assert_array_equal(xk.log_softmax(x), [0.0, -np.inf])
                log_p, entropy = xk.log_probs(x[None], [1], return_entropy=True)
                assert log_p[0] == -np.inf and entropy[0] == 0.0
                loss, grad = xk.cross_entropy_and_grad(
                    np.zeros((1, 2)), [0], weight=[np.inf, -np.inf], reduction="sum"
                )
                assert loss == np.inf and np.isnan(grad[0, 0]) and grad[0, 1] == np.inf


def test_class_weights_of_both_signs_selected_together_are_quiet():
    """Labels that select a +inf and a −inf class together make the "mean" and "sum" NaN (∞ − ∞),
    with and without smoothing, hard labels and probabilities: torch's values, no warning, on
    both paths (a review found the sums of w_y and of the rows warning)."""
    inf = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for reference in (False, True):
            with xk.use_reference(reference):
                for reduction in ("none", "mean", "sum"):
                    for smoothing in (0.0, 0.1):
                        for target in ([1, 0], np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])):
                            loss, _ = xk.cross_entropy_and_grad(
                                np.ones((2, 3)), target, weight=[inf, -inf, 1.0], reduction=reduction,
                                label_smoothing=smoothing,
                            )
                            if reduction != "none":
                                assert np.isnan(loss)


def test_an_infinite_upstream_gradient_of_the_binary_losses_warns_nothing():
    """0·inf is NaN (as torch) where the gradient is 0, silently, as in cross_entropy_and_grad:
    the binary losses' products had let NumPy's RuntimeWarning through (a review, 2026-12-07)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, grad = xk.binary_cross_entropy_and_grad(
            np.array([0.5, 0.3]), np.array([0.5, 0.0]), grad_output=np.inf, reduction="sum"
        )
        assert np.isnan(grad[0]) and grad[1] == np.inf
        _, grad = xk.binary_cross_entropy_and_grad(
            np.array([0.5, 0.3], np.float32), np.array([0.5, 0.0], np.float32), grad_output=1e300, reduction="sum"
        )
        assert np.isnan(grad[0]) and grad[1] == np.inf
        _, grad = xk.binary_cross_entropy_with_logits_and_grad(
            np.array([0.0, 1.0]), np.array([0.5, 0.2]), grad_output=np.array([np.inf, 1.0]), reduction="none"
        )
        assert np.isnan(grad[0]) and grad[1] == pytest.approx(1 / (1 + np.exp(-1.0)) - 0.2)
        # the reference formulas (a scalar's path, and every input's under use_reference) too
        for reference in (False, True):
            with xk.use_reference(reference):
                _, grad = xk.binary_cross_entropy_with_logits_and_grad(
                    np.float64(800.0), np.float64(1.0), grad_output=np.inf
                )
                assert np.isnan(grad)
                _, grad = xk.binary_cross_entropy_with_logits_and_grad(
                    np.array([800.0, -1.0]), np.array([1.0, 0.0]), grad_output=np.inf, reduction="sum"
                )
                assert np.isnan(grad[0]) and grad[1] == np.inf


def test_a_vanishing_binary_loss_is_positive_zero_as_torchs():
    """−w·(…) gave −0.0 per element where torch gives +0.0 (|x| above about 745: log σ is 0)."""
    for reference in (False, True):
        with xk.use_reference(reference):
            for shape in ((2,), (300, 300)):
                x = np.where(np.arange(np.prod(shape)).reshape(shape) % 2, 800.0, -800.0)
                loss = xk.binary_cross_entropy_with_logits(x, (x > 0).astype(float), reduction="none")
                assert np.all(loss == 0) and not np.signbit(loss).any()
