"""cross_entropy and cross_entropy_and_grad against PyTorch, on kernels and reference."""

from __future__ import annotations

import importlib
import itertools
import warnings

import numpy as np
import pytest

import xentkit
from conftest import assert_close

torch = pytest.importorskip("torch")
F = torch.nn.functional

# (logits shape, class axis): plain rows, PyTorch's per-pixel layout, one unbatched sample,
# odd sizes, a single class.
LAYOUTS = [((7, 5), -1), ((3, 4, 2, 5), 1), ((6,), 0), ((13, 33), 1), ((4, 1), -1)]


def torch_cross_entropy(logits, target, *, axis, weight=None, ignore_index=-100, reduction="mean",
                        label_smoothing=0.0, z_loss=0.0, softcap=None, grad_output=None):
    """PyTorch's cross_entropy (class axis moved to 1), plus z-loss and softcap built from torch ops."""
    x = torch.tensor(logits, requires_grad=True)
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    z = torch.movedim(z, axis, 1) if z.ndim > 1 else z
    t = torch.tensor(target)
    probabilities = t.shape == x.shape
    if probabilities and x.ndim > 1:
        t = torch.movedim(t, axis, 1)
    w = None if weight is None else torch.tensor(weight)
    loss = F.cross_entropy(z, t, weight=w, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(z, dim=1 if z.ndim > 1 else 0)
        valid = torch.ones_like(lse, dtype=torch.bool) if probabilities else t != ignore_index
        z_term = torch.where(valid, z_loss * lse**2, 0)
        if reduction == "none":
            loss = loss + z_term
        elif reduction == "sum":
            loss = loss + z_term.sum()
        else:
            loss = loss + z_term.sum() / valid.sum()
    upstream = torch.ones_like(loss) if grad_output is None else torch.tensor(grad_output)
    (loss * upstream).sum().backward()
    return loss.detach().numpy(), x.grad.numpy()


def make_case(shape, axis, dtype, seed=0, ignore=False, probabilities=False):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=shape) * 3).astype(dtype)
    num_classes = shape[axis]
    sample_shape = shape[:axis % len(shape)] + shape[axis % len(shape) + 1:]
    if probabilities:
        target = rng.dirichlet(np.ones(num_classes), size=sample_shape).astype(dtype)
        target = np.moveaxis(target, -1, axis)
    else:
        target = rng.integers(0, num_classes, size=sample_shape)
        if ignore and target.size:
            target.reshape(-1)[:: 3] = -100
    weight = rng.uniform(0.2, 2.0, size=num_classes)
    return logits, target, weight


OPTION_GRID = list(itertools.product([False, True], [False, True], [0.0, 0.1], ["mean", "sum", "none"]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize(("use_weight", "ignore", "smoothing", "reduction"), OPTION_GRID)
def test_hard_labels_match_torch(implementation, dtype, shape, axis, use_weight, ignore, smoothing, reduction):
    logits, target, weight = make_case(shape, axis, dtype, ignore=ignore)
    weight = weight.astype(dtype) if use_weight else None
    rng = np.random.default_rng(1)
    sample_shape = target.shape
    grad_output = rng.uniform(-2, 2, size=sample_shape).astype(dtype) if reduction == "none" else None
    kwargs = dict(axis=axis, weight=weight, reduction=reduction, label_smoothing=smoothing)
    expected_loss, expected_grad = torch_cross_entropy(logits, target, grad_output=grad_output, **kwargs)
    loss, grad = xentkit.cross_entropy_and_grad(logits, target, grad_output=grad_output, **kwargs)
    if np.isnan(expected_loss).any():  # torch's 0/0 for nothing to average: xentkit gives 0
        assert reduction == "mean"
        assert loss == 0 and not grad.any()
        return
    assert loss.dtype == dtype and grad.dtype == dtype and grad.shape == logits.shape
    assert_close(loss, expected_loss, dtype, "loss")
    assert_close(grad, expected_grad, dtype, "grad")
    assert_close(xentkit.cross_entropy(logits, target, **kwargs), expected_loss, dtype, "loss only")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize(("use_weight", "smoothing", "reduction"),
                         list(itertools.product([False, True], [0.0, 0.25], ["mean", "sum", "none"])))
def test_probability_targets_match_torch(implementation, dtype, shape, axis, use_weight, smoothing, reduction):
    logits, target, weight = make_case(shape, axis, dtype, probabilities=True)
    weight = weight.astype(dtype) if use_weight else None
    kwargs = dict(axis=axis, weight=weight, reduction=reduction, label_smoothing=smoothing)
    expected_loss, expected_grad = torch_cross_entropy(logits, target, **kwargs)
    loss, grad = xentkit.cross_entropy_and_grad(logits, target, **kwargs)
    assert_close(loss, expected_loss, dtype, "loss")
    assert_close(grad, expected_grad, dtype, "grad")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("shape", "axis"), [((9, 6), -1), ((2, 5, 3, 2), 1)])
@pytest.mark.parametrize(("z_loss", "softcap"), [(1e-3, None), (0.0, 2.0), (0.05, 1.5)])
@pytest.mark.parametrize(("use_weight", "ignore", "smoothing", "reduction"), OPTION_GRID)
def test_z_loss_and_softcap_match_torch_composition(implementation, dtype, shape, axis, z_loss, softcap,
                                                     use_weight, ignore, smoothing, reduction):
    logits, target, weight = make_case(shape, axis, dtype, seed=3, ignore=ignore)
    weight = weight.astype(dtype) if use_weight else None
    grad_output = np.random.default_rng(2).uniform(0, 3, size=target.shape) if reduction == "none" else None
    kwargs = dict(axis=axis, weight=weight, reduction=reduction, label_smoothing=smoothing,
                  z_loss=z_loss, softcap=softcap)
    expected_loss, expected_grad = torch_cross_entropy(logits, target, grad_output=grad_output, **kwargs)
    loss, grad = xentkit.cross_entropy_and_grad(logits, target, grad_output=grad_output, **kwargs)
    assert_close(loss, expected_loss, dtype, "loss")
    assert_close(grad, expected_grad, dtype, "grad")


def test_probability_targets_with_z_loss_and_softcap(implementation):
    logits, target, _ = make_case((5, 4), -1, np.float64, probabilities=True)
    kwargs = dict(axis=-1, z_loss=0.01, softcap=3.0, label_smoothing=0.1)
    expected_loss, expected_grad = torch_cross_entropy(logits, target, **kwargs)
    loss, grad = xentkit.cross_entropy_and_grad(logits, target, **kwargs)
    assert_close(loss, expected_loss, np.float64, "loss")
    assert_close(grad, expected_grad, np.float64, "grad")


def test_axis_equals_moving_the_axis(implementation):
    logits, target, weight = make_case((3, 4, 5, 2), 1, np.float64, ignore=True)
    loss, grad = xentkit.cross_entropy_and_grad(logits, target, axis=1, weight=weight, reduction="none")
    moved_loss, moved_grad = xentkit.cross_entropy_and_grad(
        np.moveaxis(logits, 1, -1), target, axis=-1, weight=weight, reduction="none"
    )
    np.testing.assert_allclose(loss, moved_loss, rtol=1e-13)
    np.testing.assert_allclose(grad, np.moveaxis(moved_grad, -1, 1), rtol=1e-13)


def test_one_hot_probabilities_equal_class_indices(implementation):
    logits, labels, weight = make_case((10, 6), -1, np.float64)
    onehot = np.eye(6)[labels]
    for smoothing in (0.0, 0.2):
        by_index = xentkit.cross_entropy_and_grad(logits, labels, weight=weight, label_smoothing=smoothing, reduction="sum")
        by_probs = xentkit.cross_entropy_and_grad(logits, onehot, weight=weight, label_smoothing=smoothing, reduction="sum")
        np.testing.assert_allclose(by_index[0], by_probs[0], rtol=1e-12)
        np.testing.assert_allclose(by_index[1], by_probs[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("axis", [-1, 1])
def test_out_in_place_equals_out_of_place(implementation, dtype, axis):
    shape = (6, 7) if axis == -1 else (3, 7, 4)
    logits, target, weight = make_case(shape, axis, dtype, ignore=True)
    kwargs = dict(axis=axis, weight=weight, label_smoothing=0.1, z_loss=1e-3)
    loss, grad = xentkit.cross_entropy_and_grad(logits, target, **kwargs)
    buffer = logits.copy()
    loss_in_place, returned = xentkit.cross_entropy_and_grad(buffer, target, out=buffer, **kwargs)
    assert returned is buffer
    np.testing.assert_array_equal(loss_in_place, loss)
    np.testing.assert_array_equal(buffer, grad)
    separate = np.empty_like(logits)
    _, returned = xentkit.cross_entropy_and_grad(logits, target, out=separate, **kwargs)
    assert returned is separate
    np.testing.assert_array_equal(separate, grad)


def test_kernel_and_reference_agree_on_large_rows():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(16, 3000)).astype(np.float32) * 4
    target = rng.integers(0, 3000, size=16)
    kwargs = dict(weight=rng.uniform(0.5, 1.5, 3000), label_smoothing=0.05, z_loss=1e-4, softcap=20.0)
    fused = xentkit.cross_entropy_and_grad(logits, target, **kwargs)
    with xentkit.use_reference():
        slow = xentkit.cross_entropy_and_grad(logits.astype(np.float64), target, **kwargs)
    np.testing.assert_allclose(fused[0], slow[0], rtol=1e-6)
    assert np.abs(fused[1] - slow[1]).max() <= 1e-5 * np.abs(slow[1]).max()


def test_nothing_to_average_gives_zero_not_nan(implementation):
    logits = np.random.default_rng(0).normal(size=(4, 3))
    loss, grad = xentkit.cross_entropy_and_grad(logits, np.full(4, -100))
    assert loss == 0 and not grad.any()
    loss, grad = xentkit.cross_entropy_and_grad(np.zeros((0, 3)), np.zeros(0, dtype=int), z_loss=0.1)
    assert loss == 0 and grad.shape == (0, 3)
    loss, grad = xentkit.cross_entropy_and_grad(np.zeros((0, 3)), np.zeros((0, 3)))
    assert loss == 0 and grad.shape == (0, 3)
    assert xentkit.cross_entropy(np.zeros((0, 3)), np.zeros(0, dtype=int), reduction="none").shape == (0,)
    # Zero class weights on every present target: the same 0/0, the same answer.
    loss, grad = xentkit.cross_entropy_and_grad(logits, np.zeros(4, dtype=int), weight=[0.0, 1.0, 1.0])
    assert loss == 0 and not grad.any()


def test_perplexity_is_exp_of_mean_cross_entropy(implementation):
    logits, target, _ = make_case((20, 8), -1, np.float64, ignore=True)
    expected = np.exp(xentkit.cross_entropy(logits, target))
    assert_close(xentkit.perplexity(logits, target), expected)
    assert_close(xentkit.perplexity(np.zeros((5, 17)), np.arange(5)), 17.0)
    with pytest.raises(TypeError, match="reduction"):
        xentkit.perplexity(logits, target, reduction="sum")


def test_perplexity_with_nothing_to_average_is_nan_as_torchs(implementation):
    """The training loss's mean of nothing is 0; its exp, 1, read as a perfect score on an
    all-padding batch (a review, 2026-12-07). torch's exp(F.cross_entropy) is NaN there."""
    for dtype in (np.float64, np.float32):
        cases = [
            (np.zeros((2, 5), dtype), np.array([-100, -100])),
            (np.zeros((0, 5), dtype), np.zeros(0, dtype=int)),
            (np.zeros((0, 5), dtype), np.zeros((0, 5), dtype)),
            (np.zeros((3, 2, 5), dtype), np.full((3, 5), 7)),  # (ignore_index 7 below, classes on axis 1)
        ]
        for index, (logits, target) in enumerate(cases):
            options = {"axis": 1, "ignore_index": 7} if index == 3 else {}
            value = xentkit.perplexity(logits, target, **options)
            assert value.dtype == dtype and np.isnan(value)
        value = xentkit.perplexity(np.zeros((2, 5), dtype), [0, 1], weight=[0.0, 0.0, 1.0, 1.0, 1.0])
        assert np.isnan(value)
        # with a z-loss too (its mean over the rows alone had given exp(z term), about 1.03)
        for weight, target in (([0.0, 0.0, 1.0, 1.0, 1.0], [0, 1]), (None, [-100, -100])):
            logits = np.random.default_rng(0).standard_normal((2, 5)).astype(dtype)
            assert np.isnan(xentkit.perplexity(logits, target, weight=weight, z_loss=1e-2))
        # a mean of 0 that averages something is a perplexity of 1
        assert xentkit.perplexity(np.array([[1e4, 0.0], [0.0, 1e4]], dtype), [0, 1]) == 1.0
        assert xentkit.perplexity(np.zeros((2, 5), dtype), [-100, 1]) == pytest.approx(5.0)


def test_probabilities_as_logits_warns_and_can_be_silenced():
    probs = xentkit.softmax(np.random.default_rng(0).normal(size=(8, 4)))
    with pytest.warns(xentkit.ProbabilitiesAsLogitsWarning, match="softmax twice"):
        xentkit.cross_entropy(probs, np.zeros(8, dtype=int))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xentkit.cross_entropy(probs, np.zeros(8, dtype=int), check_probabilities=False)
        xentkit.cross_entropy_and_grad(probs * 3, np.zeros(8, dtype=int))  # real logits: no warning
        xentkit.cross_entropy(np.array([[0.2, 0.3], [0.1, 0.1]]), np.zeros(2, dtype=int))  # sums != 1


def test_the_reference_switch_is_read_once_per_call(monkeypatch):
    """Another thread may flip ``use_reference`` mid-call: the call reads the switch once and takes
    one path (a review: read three times, a flip between two reads sent it to the kernel without
    its reduction plan, an AttributeError 19 times in 222k calls)."""
    module = importlib.import_module("xentkit.api.cross_entropy")  # (the package attribute is the function)

    answers = iter([False, True, False, True])
    monkeypatch.setattr(module, "reference_enabled", lambda: next(answers))
    logits = np.random.default_rng(0).standard_normal((3, 5))
    loss = xentkit.cross_entropy(logits, [0, 1, 2])
    want = -np.mean(logits[np.arange(3), [0, 1, 2]] - np.log(np.exp(logits).sum(axis=1)))
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    assert next(answers) is True  # one read only
