"""Non-finite inputs: the kernels and the NumPy reference give PyTorch's values, so that
``XENTKIT_REFERENCE=1`` (``xentkit.use_reference``) never changes a result.

+inf logits make their row NaN (∞ − ∞); −inf logits are masked classes; NaN spreads through its
row; an infinite or NaN upstream gradient ``grad_output`` gives torch's pattern (g·p_j, NaN where
p_j = 0 and at the target). Each case runs on both paths and against
``torch.nn.functional.cross_entropy`` where torch has the options, else kernel against reference.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import xentkit
from conftest import assert_close
from xentkit.kernels.cross_entropy import cross_entropy_rows

torch = pytest.importorskip("torch")

INF, NAN = np.inf, np.nan

# rows of 4 classes; the targets are LABELS below (row 3 is ignored)
LOGITS = {
    "+inf at the target": [[0.5, INF, -1.0, 2.0], [0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]],
    "+inf elsewhere": [[INF, 0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0], [1.0, 0.0, INF, INF], [INF, 0.0, 0.0, 0.0]],
    "-inf elsewhere": [[-INF, 0.0, 1.0, 2.0], [0.0, 1.0, -INF, 3.0], [1.0, -INF, -INF, -INF], [-INF, 0.0, 0.0, 0.0]],
    "-inf at the target": [[0.5, -INF, 1.0, 2.0], [0.0, 1.0, 2.0, -INF], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    "a row of -inf": [[-INF, -INF, -INF, -INF], [0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 0.0], [-INF, -INF, -INF, -INF]],
    "NaN": [[0.5, NAN, 1.0, 2.0], [NAN, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 0.0], [NAN, 0.0, 0.0, 0.0]],
    "finite": [[0.5, 0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
}
LABELS = np.array([1, 3, 0, -100])
UPSTREAM = {"1": None, "inf": INF, "-inf": -INF, "nan": NAN}
WEIGHT = np.array([1.0, 2.0, 0.5, 0.0])


def _api(logits, reference: bool, **options):
    with xentkit.use_reference(reference):
        return xentkit.cross_entropy_and_grad(logits, LABELS, check_probabilities=False, **options)


def _torch(logits, reduction, label_smoothing, weight, grad_output):
    if weight is not None:
        # a deliberate difference: a masked class of weight 0 adds nothing, as a target or to the
        # smoothing term (0·log 0 = 0; torch: NaN, tests/test_masked_class_smoothing.py). torch is
        # given −1e300 there instead, which has the same probability 0 (in a row with a larger logit)
        logits = np.where((weight == 0) & (logits == -INF) & (logits > -INF).any(axis=1, keepdims=True), -1e300, logits)
    leaf = torch.tensor(logits, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(
        leaf, torch.from_numpy(LABELS), None if weight is None else torch.tensor(weight, dtype=leaf.dtype),
        reduction=reduction, label_smoothing=label_smoothing,
    )
    upstream = torch.ones_like(loss) if grad_output is None else torch.full_like(loss, grad_output)
    loss.backward(upstream)
    return loss.detach().numpy(), leaf.grad.numpy()


def _same_non_finite(actual, expected, name):
    """NaN and ±inf in the same places, the finite values equal within the float64 tolerance."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{name}: NaN at {actual} vs {expected}"
    assert_close(actual, expected, np.float64, name)


@pytest.mark.parametrize(
    ("case", "reduction", "label_smoothing", "weighted", "upstream"),
    list(itertools.product(LOGITS, ("mean", "sum", "none"), (0.0, 0.1), (False, True), UPSTREAM)),
)
def test_kernel_and_reference_give_torchs_values(case, reduction, label_smoothing, weighted, upstream):
    logits = np.array(LOGITS[case])
    weight = WEIGHT if weighted else None
    grad_output = UPSTREAM[upstream]
    expected_loss, expected_grad = _torch(logits, reduction, label_smoothing, weight, grad_output)
    # one deliberate difference: an ignored row is never read, its gradient is 0 (torch's is NaN
    # when that row holds a NaN or +inf logit); see test_ignored_rows_are_zero_whatever_they_hold
    expected_grad[LABELS == -100] = 0.0
    for reference in (False, True):
        name = f"{'reference' if reference else 'kernel'} {case} {reduction} ε={label_smoothing} g={upstream}"
        loss, grad = _api(
            logits, reference, reduction=reduction, label_smoothing=label_smoothing, weight=weight,
            grad_output=grad_output,
        )
        _same_non_finite(loss, expected_loss, name + " loss")
        _same_non_finite(grad, expected_grad, name + " gradient")


def test_ignored_rows_are_zero_whatever_they_hold():
    logits = np.array([[np.inf, 0.0], [np.nan, 1.0], [0.0, 1.0]])
    labels = np.array([-100, -100, 1])
    for reference in (False, True):
        with xentkit.use_reference(reference):
            loss, grad = xentkit.cross_entropy_and_grad(logits, labels, reduction="none", grad_output=np.inf)
        np.testing.assert_array_equal(loss[:2], 0.0)
        np.testing.assert_array_equal(grad[:2], 0.0)
        assert np.isfinite(loss[2])


def test_plus_inf_logit_is_nan_on_both_paths():
    """The case of the issue: +inf used to give inf on the reference and NaN on the kernel."""
    logits = np.array([[np.inf, 0.0, 1.0]])
    for reference in (False, True):
        with xentkit.use_reference(reference):
            loss, grad = xentkit.cross_entropy_and_grad(logits, [1], reduction="sum")
        assert np.isnan(loss)
        assert np.isnan(grad).all()


def test_infinite_upstream_gradient_pattern():
    """g = ∞ on softmax − onehot: ∞·p_j off the target, NaN at the target (∞ − ∞) and where
    p_j = 0 (a −inf logit: 0·∞), as torch; the ignored row stays 0."""
    logits = np.array([[0.0, 1.0, -np.inf, 2.0], [0.0, 0.0, 0.0, 0.0]])
    labels = np.array([1, -100])
    for reference in (False, True):
        with xentkit.use_reference(reference):
            _, grad = xentkit.cross_entropy_and_grad(logits, labels, reduction="sum", grad_output=np.inf)
        assert grad[0, 0] == np.inf and grad[0, 3] == np.inf
        assert np.isnan(grad[0, 1]) and np.isnan(grad[0, 2])
        assert (grad[1] == 0).all()


@pytest.mark.parametrize(("z_loss", "softcap"), [(1e-3, None), (0.0, 5.0), (1e-3, 5.0)])
@pytest.mark.parametrize("upstream", list(UPSTREAM))
@pytest.mark.parametrize("case", list(LOGITS))
def test_options_torch_lacks_agree_between_kernel_and_reference(case, upstream, z_loss, softcap):
    logits = np.array(LOGITS[case])
    results = [
        _api(
            logits, reference, reduction="none", z_loss=z_loss, softcap=softcap,
            label_smoothing=0.1, grad_output=UPSTREAM[upstream],
        )
        for reference in (False, True)
    ]
    name = f"{case} z_loss={z_loss} softcap={softcap} g={upstream}"
    _same_non_finite(results[0][0], results[1][0], name + " loss")
    _same_non_finite(results[0][1], results[1][1], name + " gradient")


@pytest.mark.parametrize("upstream", list(UPSTREAM))
@pytest.mark.parametrize("case", list(LOGITS))
def test_split_rows_kernel_agrees_with_row_kernel(case, upstream):
    """The kernel that cuts rows into segments (few long rows) treats special values alike."""
    logits = np.repeat(np.array(LOGITS[case]), 3, axis=1)  # 12 classes, 3 segments of 4
    labels = np.array([1, 3, 0, -100])
    scale = np.full(4, 1.0 if UPSTREAM[upstream] is None else UPSTREAM[upstream])
    results = []
    for segments in (1, 3):
        grad = np.empty_like(logits)
        loss, lse = cross_entropy_rows(
            logits, labels, None, -100, 0.1, 1e-3, None, scale, scale, grad,
            parallel=True, segments=segments,
        )
        results.append((loss, lse, grad))
    for part, row_kernel, split_kernel in zip(("loss", "lse", "gradient"), *results, strict=True):
        _same_non_finite(split_kernel, row_kernel, f"{case} g={upstream} {part}")


# not "-inf elsewhere": with probabilities xentkit takes 0·log 0 = 0 for a masked class of zero
# target mass (documented), where torch's product gives NaN
@pytest.mark.parametrize("case", ["+inf elsewhere", "+inf at the target", "NaN", "finite"])
@pytest.mark.parametrize("upstream", list(UPSTREAM))
def test_probability_targets_give_torchs_values(case, upstream):
    logits = np.array(LOGITS[case])
    target = np.array([[0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0]])
    grad_output = UPSTREAM[upstream]
    leaf = torch.tensor(logits, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(leaf, torch.tensor(target), reduction="sum")
    expected.backward(torch.tensor(1.0 if grad_output is None else grad_output, dtype=leaf.dtype))
    for reference in (False, True):
        with xentkit.use_reference(reference):
            loss, grad = xentkit.cross_entropy_and_grad(
                logits, target, reduction="sum", grad_output=grad_output, check_probabilities=False
            )
        name = f"{'reference' if reference else 'kernel'} {case} g={upstream}"
        _same_non_finite(loss, expected.detach().numpy(), name + " loss")
        _same_non_finite(grad, leaf.grad.numpy(), name + " gradient")


#: per-row upstream gradients for reduction="none" mixing finite, infinite and NaN rows
MIXED_UPSTREAM = {"finite, ∞, finite, NaN": [2.0, INF, -0.5, NAN], "-∞, finite, ∞, finite": [-INF, 1.5, INF, 3.0]}
PROBABILITIES = np.array([[0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("case", "probabilities", "label_smoothing", "weighted", "upstream"),
    list(itertools.product(LOGITS, (False, True), (0.0, 0.1), (False, True), MIXED_UPSTREAM)),
)
def test_rows_with_finite_and_non_finite_upstream_in_one_call(
    case, probabilities, label_smoothing, weighted, upstream
):
    """reduction="none", some rows' g infinite or NaN: every row as torch gives it, and on the
    reference a row with a finite g exactly as that row alone (its order is not its neighbours')."""
    if probabilities and case == "-inf elsewhere":
        pytest.skip("0·log 0 = 0 for a masked class of zero target mass, where torch gives NaN")
    logits = np.array(LOGITS[case])
    target = PROBABILITIES if probabilities else LABELS
    weight = WEIGHT if weighted else None
    grad_output = np.array(MIXED_UPSTREAM[upstream])
    leaf = torch.tensor(logits, requires_grad=True)
    torch.nn.functional.cross_entropy(
        leaf, torch.from_numpy(target), None if weight is None else torch.tensor(weight),
        reduction="none", label_smoothing=label_smoothing,
    ).backward(torch.from_numpy(grad_output))  # fmt: skip
    expected = leaf.grad.numpy()
    if not probabilities:
        expected[LABELS == -100] = 0.0  # an ignored row's gradient is 0 (see above)
    options = dict(reduction="none", label_smoothing=label_smoothing, weight=weight)
    for reference in (False, True):
        with xentkit.use_reference(reference):
            _, grad = xentkit.cross_entropy_and_grad(
                logits, target, grad_output=grad_output, check_probabilities=False, **options
            )
        _same_non_finite(grad, expected, f"{'reference' if reference else 'kernel'} {case} g={upstream}")
    for row in np.flatnonzero(np.isfinite(grad_output)):
        with xentkit.use_reference(True):
            _, alone = xentkit.cross_entropy_and_grad(
                logits[row : row + 1], target[row : row + 1], grad_output=grad_output[row : row + 1],
                check_probabilities=False, **options,
            )  # fmt: skip
        np.testing.assert_array_equal(grad[row], alone[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_and_float64_alike(dtype):
    logits = np.array(LOGITS["+inf elsewhere"], dtype=dtype)
    for upstream in UPSTREAM.values():
        kernel = _api(logits, False, reduction="none", grad_output=upstream)
        reference = _api(logits, True, reduction="none", grad_output=upstream)
        assert kernel[1].dtype == reference[1].dtype == dtype
        for got, expected in zip(kernel, reference, strict=True):
            assert np.array_equal(np.isnan(got), np.isnan(expected))
            assert np.array_equal(np.isinf(got), np.isinf(expected))


@pytest.mark.parametrize(
    ("case", "reduction", "label_smoothing", "upstream"),
    list(itertools.product(LOGITS, ("mean", "sum", "none"), (0.0, 0.1), ("inf", "-inf", "nan"))),
)
def test_the_torch_binding_gives_torchs_gradient_for_a_non_finite_upstream(
    case, reduction, label_smoothing, upstream, kernel_path
):
    """xentkit.torch's kernel path stores the gradient for an upstream gradient of 1 and scales it
    in backward; an infinite or NaN upstream then gives torch's values too (an ignored row 0, NaN
    at the target and, with smoothing, across the row), not the product's."""
    import xentkit.torch as xt

    logits = np.array(LOGITS[case])
    grad_output = UPSTREAM[upstream]
    weight = np.ones(4)
    _, expected_grad = _torch(logits, reduction, label_smoothing, weight, grad_output)
    expected_grad[LABELS == -100] = 0.0  # as above: an ignored row is never read
    leaf = torch.tensor(logits, requires_grad=True)
    loss = xt.cross_entropy(
        leaf, torch.from_numpy(LABELS), torch.from_numpy(weight), reduction=reduction,
        label_smoothing=label_smoothing, check_probabilities=False,
    )
    loss.backward(torch.full_like(loss, grad_output))
    _same_non_finite(leaf.grad.numpy(), expected_grad, f"xentkit.torch {case} {reduction} ε={label_smoothing} g={upstream}")


@pytest.mark.parametrize("shape", [(5,), (4, 5), (2, 5, 2, 3)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("upstream", ["inf", "-inf", "nan"])
def test_the_torch_binding_takes_a_non_finite_upstream_in_every_layout(
    shape, reduction, probabilities, upstream, kernel_path
):
    """(C,), (N, C) and (N, C, d1, d2), class indices (one ignored) or probabilities (one zero):
    the same gradient as torch (probabilities: NaN across the row), ignored rows 0."""
    import xentkit.torch as xt

    generator = torch.Generator().manual_seed(len(shape))
    logits = torch.randn(shape, generator=generator, dtype=torch.float64)
    classes, class_axis = 5, 1 if len(shape) > 1 else 0
    sample_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if probabilities:
        target = torch.softmax(torch.randn(shape, generator=generator, dtype=torch.float64), class_axis)
        target[(0,) * target.dim()] = 0.0
    else:
        target = torch.randint(0, classes, sample_shape, generator=generator)
        if sample_shape:
            target.view(-1)[0] = -100
    weight = torch.linspace(0.5, 2.0, classes, dtype=torch.float64)
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = xt.cross_entropy(ours, target, weight, reduction=reduction, check_probabilities=False)
    expected = torch.nn.functional.cross_entropy(theirs, target, weight, reduction=reduction)
    loss.backward(torch.full_like(loss, UPSTREAM[upstream]))
    expected.backward(torch.full_like(expected, UPSTREAM[upstream]))
    wanted = theirs.grad.clone()
    if not probabilities and sample_shape:
        wanted.movedim(1, -1)[target == -100] = 0.0  # an ignored row is never read
    _same_non_finite(ours.grad.numpy(), wanted.numpy(), f"{shape} {reduction} probabilities={probabilities}")


@pytest.mark.parametrize("pos_weight", [None, 2.0, 0.0])
@pytest.mark.parametrize("weight", [None, 0.0, 2.0])
@pytest.mark.parametrize("path", ["kernel", "reference", "xentkit.torch"])
def test_binary_cross_entropy_with_infinite_logits_gives_torchs_values(pos_weight, weight, path):
    """x = −inf: torch's (1 − y)·x − (1 + (pw − 1)·y)·log σ(x) is ∞ − ∞ = NaN (−inf for a
    negative pos_weight, which xentkit leaves NaN), where −w·(pw·y·log σ(x) + (1 − y)·log σ(−x))
    is +inf; x = +inf and NaN as torch too, loss and gradient."""
    inf, nan = np.inf, np.nan
    logits = np.array([[-inf, inf, -inf, inf, -inf, inf, nan, -inf, 3.0]])
    target = np.array([[0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.5]])
    x = torch.tensor(logits, requires_grad=True)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        x, torch.tensor(target), None if weight is None else torch.tensor(weight, dtype=torch.float64),
        reduction="none", pos_weight=None if pos_weight is None else torch.tensor([pos_weight], dtype=torch.float64),
    )
    want.sum().backward()
    if path == "xentkit.torch":
        import xentkit.torch as xt

        tensor = torch.tensor(logits, requires_grad=True)
        got = xt.binary_cross_entropy_with_logits(
            tensor, torch.tensor(target), None if weight is None else torch.tensor(weight, dtype=torch.float64),
            reduction="none", pos_weight=None if pos_weight is None else torch.tensor([pos_weight], dtype=torch.float64),
        )
        got.sum().backward()
        loss, grad = got.detach().numpy(), tensor.grad.numpy()
    else:
        with xentkit.use_reference(path == "reference"):
            loss, grad = xentkit.binary_cross_entropy_with_logits_and_grad(
                logits, target, weight=weight, pos_weight=None if pos_weight is None else [pos_weight],
                reduction="none",
            )
    np.testing.assert_allclose(loss, want.detach().numpy(), rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-12, equal_nan=True)


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_a_mean_of_nothing_has_gradient_0_under_an_infinite_upstream_gradient(kernel_path, backend, z_loss):
    """Class weights summing to 0 over the targets: loss 0 and gradient 0 (a z-loss's own term
    apart), whatever the upstream gradient. The Numba path scaled its stored zeros by ∞ and the
    Triton kernel its factor 0, both NaN everywhere (a review); the api's values."""
    import xentkit.torch as xt

    if backend == "triton":
        pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(40, 30, generator=generator, dtype=torch.float32) - 4.0  # (lse < 0 for the z term)
    labels = torch.randint(0, 30, (40,), generator=generator)
    labels[:5] = -100
    weight = torch.rand(30, generator=generator)
    weight[labels[5:]] = 0.0
    x = logits.clone().requires_grad_(True)
    loss = xt.cross_entropy(x, labels, weight, z_loss=z_loss, backend=backend)
    loss.backward(torch.tensor(INF))
    expected_loss, expected = xentkit.cross_entropy_and_grad(
        logits.numpy(), labels.numpy(), weight=weight.numpy(), z_loss=z_loss, grad_output=INF
    )
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6, abs=0)
    if not z_loss:
        assert float(loss) == 0.0 and not expected.any()
    torch.testing.assert_close(x.grad, torch.from_numpy(expected), equal_nan=True, rtol=1e-6, atol=0)
