"""The Numba kernel for probability targets (``xentkit.kernels.probabilities``, reached through
``cross_entropy_rows`` with an ``[N, C]`` target and through the api): the reference's values
for every option, layout and dtype, in place or not, special values included; its serial build
gives the parallel build's bits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import xentkit
from conftest import assert_close
from xentkit import kernels

OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"weight": "random"},
    {"weight": "random", "label_smoothing": 0.2, "z_loss": 1e-2},
    {"softcap": 3.0},
    {"weight": "random", "softcap": 5.0, "z_loss": 1e-3, "label_smoothing": 0.05},
]


def _case(shape, axis, dtype, seed):
    rng = np.random.default_rng(seed)
    logits = (3 * rng.standard_normal(shape)).astype(dtype)
    target = rng.dirichlet(np.ones(shape[axis]), size=int(np.prod(shape)) // shape[axis])
    target = np.moveaxis(target.reshape(*np.delete(shape, axis), shape[axis]), -1, axis).astype(dtype)
    target.flat[:: 7] = 0.0  # classes of no mass
    return rng, logits, target


def _both(logits, target, **options):
    """(kernel, reference) results of ``cross_entropy_and_grad``."""
    kernel = xentkit.cross_entropy_and_grad(logits, target, check_probabilities=False, **options)
    with xentkit.use_reference(True):
        reference = xentkit.cross_entropy_and_grad(logits, target, check_probabilities=False, **options)
    return kernel, reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("shape", "axis"), [((9, 7), -1), ((3, 5, 4), 1), ((40, 3000), -1)])
@pytest.mark.parametrize("option_set", range(len(OPTIONS)))
def test_the_kernel_gives_the_references_values(dtype, reduction, shape, axis, option_set):
    rng, logits, target = _case(shape, axis, dtype, seed=option_set)
    options = dict(OPTIONS[option_set])
    if options.get("weight") == "random":
        options["weight"] = rng.uniform(0.2, 2.0, shape[axis])
    sample_shape = tuple(np.delete(shape, axis))
    grad_output = rng.uniform(0.5, 2.0, sample_shape) if reduction == "none" else 1.5
    (loss, grad), (want_loss, want_grad) = _both(
        logits, target, axis=axis, reduction=reduction, grad_output=grad_output, **options
    )
    assert loss.dtype == want_loss.dtype and grad.dtype == want_grad.dtype == logits.dtype
    assert_close(loss, want_loss, dtype, "loss")
    # float32 gradient entries near 0 carry the float32 rounding of p·A and of w·q' apart
    assert_close(grad, want_grad, dtype, "gradient")
    # in place: the logits become the gradient, with the same values
    work = logits.copy()
    in_place_loss, in_place = xentkit.cross_entropy_and_grad(
        work, target, axis=axis, reduction=reduction, grad_output=grad_output, out=work,
        check_probabilities=False, **options,
    )
    assert in_place is work
    np.testing.assert_array_equal(in_place_loss, loss)
    np.testing.assert_array_equal(in_place, grad)


def test_the_parallel_kernel_gives_the_references_values_on_a_large_problem():
    """Above the serial threshold (65536 logits) the rows spread over Numba's threads."""
    rng, logits, target = _case((300, 500), -1, np.float64, seed=3)
    weight = rng.uniform(0.5, 1.5, 500)
    (loss, grad), (want_loss, want_grad) = _both(logits, target, weight=weight, z_loss=1e-3, reduction="none")
    assert_close(loss, want_loss, np.float64, "loss")
    assert_close(grad, want_grad, np.float64, "gradient")


INF, NAN = np.inf, np.nan
SPECIAL_LOGITS = {
    "-inf on a class of no mass": [[0.5, -INF, 1.0, 2.0]],
    "-inf on a class of mass": [[0.5, 1.0, -INF, 2.0]],
    "a row of -inf": [[-INF, -INF, -INF, -INF]],
    "+inf": [[INF, 0.0, 1.0, 2.0]],
    "NaN": [[0.5, NAN, 1.0, 2.0]],
    "large offsets": [[1e4, 1e4 + 1.0, 1e4 - 2.0, 1e4 + 0.5]],
}
SPECIAL_TARGETS = {
    "with zeros": [[0.5, 0.0, 0.25, 0.25]],
    "all zero": [[0.0, 0.0, 0.0, 0.0]],
    "NaN": [[0.5, NAN, 0.25, 0.25]],
}


@pytest.mark.parametrize(
    ("logits_name", "target_name", "smoothing", "upstream"),
    list(itertools.product(SPECIAL_LOGITS, SPECIAL_TARGETS, (0.0, 0.1), (1.0, INF, -INF, NAN))),
)
def test_special_values_as_the_reference(logits_name, target_name, smoothing, upstream):
    """NaN, ±inf and large offsets in the logits, zero and NaN target mass, and a non-finite
    upstream gradient give the reference's values: NaN in the same places, the rest equal."""
    logits = np.array(SPECIAL_LOGITS[logits_name] * 2)
    target = np.array(SPECIAL_TARGETS[target_name] + [[0.1, 0.2, 0.3, 0.4]])
    for reduction in ("none", "sum"):
        grad_output = np.array([upstream, 1.0]) if reduction == "none" else upstream
        (loss, grad), (want_loss, want_grad) = _both(
            logits, target, reduction=reduction, label_smoothing=smoothing, grad_output=grad_output,
            z_loss=1e-3,
        )
        for got, want, name in ((loss, want_loss, "loss"), (grad, want_grad, "gradient")):
            got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
            assert np.array_equal(np.isnan(got), np.isnan(want)), f"{name}: {got} vs {want}"
            assert_close(got, want, np.float64, name)


@pytest.mark.parametrize(
    ("logits", "target", "weight"),
    [
        ([[2.0, 1.0, 0.0]], [[0.7, 0.3, 0.0]], [np.inf, 1.0, 1.0]),  # infinite weight on the max class
        ([[1.0, 0.0]], [[np.inf, 0.0]], None),  # an infinite target
        ([[0.0, -1000.0]], [[0.0, np.inf]], None),  # log s = 0 and an infinite mass elsewhere
    ],
)
def test_an_infinite_mass_gives_the_references_infinite_loss(logits, target, weight):
    """A·log s − Σ mass·(z − m) would be inf·0 = NaN there; the reference's sum of terms is +inf."""
    logits, target = np.array(logits), np.array(target)
    weight = None if weight is None else np.array(weight)
    with np.errstate(invalid="ignore"):
        (loss, grad), (want_loss, want_grad) = _both(logits, target, weight=weight, reduction="none")
    assert np.isposinf(want_loss).all()
    np.testing.assert_array_equal(loss, want_loss)
    assert np.array_equal(np.isnan(grad), np.isnan(want_grad))


def test_a_masked_class_of_no_mass_costs_nothing():
    """0·log 0 = 0: a −inf logit where the target has no mass leaves the loss finite and its
    gradient entry 0 (torch's own kernel gives NaN)."""
    loss, grad = xentkit.cross_entropy_and_grad(
        np.array([[0.0, -np.inf, 1.0]]), np.array([[0.3, 0.0, 0.7]]), reduction="sum"
    )
    p = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    np.testing.assert_allclose(loss, -(0.3 * np.log(p[0]) + 0.7 * np.log(p[1])), rtol=1e-14)
    np.testing.assert_allclose(grad, [[p[0] - 0.3, 0.0, p[1] - 0.7]], rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("classes", [2, 60])  # the tile kernel, the row kernel
def test_a_row_without_target_mass_is_nan_where_its_softmax_is(classes):
    """Targets of no (weighted) mass: the loss is 0, or NaN where the row's softmax is NaN (a NaN
    or +inf logit, or only −inf), as its gradient there, on the kernels, the reference and
    xentkit.torch's torch ops alike (the loss was 0 beside a NaN gradient). A −inf logit alone
    is a masked class: 0."""
    torch = pytest.importorskip("torch")
    import xentkit.torch as xt

    logits = np.zeros((5, classes))
    logits[0, 0] = np.nan
    logits[1, 0] = np.inf
    logits[2] = -np.inf
    logits[3, 0] = -np.inf
    target = np.zeros_like(logits)
    target[4, 0] = 1.0  # mass only on a class whose weight is 0
    weight = np.ones(classes)
    weight[0] = 0.0
    expected = [np.nan, np.nan, np.nan, 0.0, 0.0]
    for path in ("kernel", "reference"):
        with xentkit.use_reference(path == "reference"):
            loss, grad = xentkit.cross_entropy_and_grad(logits, target, weight=weight, reduction="none")
        np.testing.assert_array_equal(loss, expected, err_msg=path)
        assert np.isnan(grad[:3]).all() and not grad[3:].any(), path
    for backend in ("auto", "torch"):
        t = torch.tensor(logits)
        loss = xt.cross_entropy(t, torch.tensor(target), weight=torch.tensor(weight), reduction="none", backend=backend)
        np.testing.assert_array_equal(loss.numpy(), expected, err_msg=backend)


@pytest.mark.parametrize("block", [1024, 16])  # 29 classes: the tile kernel; 2 blocks: the row kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_serial_build_gives_the_parallel_builds_bits(dtype, block):
    from xentkit.kernels import probabilities

    rng, logits, target = _case((37, 29), -1, dtype, seed=5)
    logits[3, 5] = -np.inf
    logits[4] = np.nan
    rows, classes = logits.shape
    weight = rng.uniform(0.1, 2.0, classes)
    scale, z_scale = rng.uniform(-1, 1, rows), rng.uniform(0, 1, rows)
    for options in (
        dict(weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None),
        dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=None),
        dict(weight=weight, label_smoothing=0.0, z_loss=0.0, softcap=5.0),
    ):
        for in_place in (False, True):
            results = []
            for parallel in (False, True):
                work = logits.copy()
                grad = work if in_place else np.empty_like(work)
                loss, lse = kernels.cross_entropy_rows(
                    work, target, options["weight"], -100, options["label_smoothing"], options["z_loss"],
                    options["softcap"], scale, z_scale, grad, parallel=parallel, block=block,
                )
                results.append((loss, lse, grad))
            for serial, threaded in zip(*results, strict=True):
                np.testing.assert_array_equal(serial, threaded)
    build = probabilities._probability_tile_serial if block > classes else probabilities._probability_rows_serial
    assert {str(signature[0].dtype) for signature in build.signatures} >= {np.dtype(dtype).name}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("classes", [2, 10, 48])
def test_the_tile_kernel_agrees_with_the_row_kernel(dtype, classes):
    """Rows of at most TILE_MAX_CLASSES classes take the tile kernel: its values match the row
    kernel's (forced by a smaller ``block``) for every option, masked classes, NaN, classes of no
    mass, an infinite target mass, upstream scales and in place; both of its builds bit for bit."""
    from xentkit.kernels import probabilities

    assert classes <= probabilities.TILE_MAX_CLASSES
    rng, logits, target = _case((1000, classes), -1, dtype, seed=classes)  # partial tiles from 10 classes up
    logits[3] = -np.inf
    logits[5, 0] = -np.inf
    logits[7, classes // 2] = np.nan
    logits[9, 0] = 80.0
    target[11, 0] = np.inf
    rows = logits.shape[0]
    weight = rng.uniform(0.1, 2.0, classes)
    scale, z_scale = rng.uniform(-1, 1, rows), rng.uniform(0, 1, rows)
    tolerance = 1e-6 if dtype == np.float32 else 1e-13
    for options in (
        dict(weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None),
        dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=None),
        dict(weight=weight, label_smoothing=0.2, z_loss=1e-2, softcap=3.0),
    ):
        for in_place in (False, True):
            results = []
            for block, parallel in ((1024, False), (1024, True), (max(1, classes // 2), False)):
                work = logits.copy()
                grad = work if in_place else np.empty_like(work)
                loss, lse = kernels.cross_entropy_rows(
                    work, target, options["weight"], -100, options["label_smoothing"], options["z_loss"],
                    options["softcap"], scale, z_scale, grad, parallel=parallel, block=block,
                )
                results.append((loss, lse, grad))
            serial, threaded, by_rows = results
            for tile, same, row in zip(serial, threaded, by_rows, strict=True):
                np.testing.assert_array_equal(tile, same)
                np.testing.assert_array_equal(np.isnan(tile), np.isnan(row))
                np.testing.assert_allclose(tile, row, rtol=tolerance, atol=tolerance, err_msg=str(options))
    for build in (probabilities._probability_tile_kernel, probabilities._probability_tile_serial):
        assert {str(signature[0].dtype) for signature in build.signatures} >= {np.dtype(dtype).name}


def test_forward_only_and_the_contracts_defaults():
    """Without ``grad_out`` nothing is written; ``grad_scale`` and ``z_grad_scale`` default to
    ones; the loss rows are −Σ w·q'·log p and the lse rows log Σ exp z."""
    _, logits, target = _case((6, 5), -1, np.float64, seed=9)
    before = logits.copy()
    loss, lse = kernels.cross_entropy_rows(logits, target, None, -100, 0.0, 0.0, None, None, None, None)
    np.testing.assert_array_equal(logits, before)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(loss, -(target * log_p).sum(1), rtol=1e-13)
    np.testing.assert_allclose(lse, np.log(np.exp(logits).sum(1)), rtol=1e-14)
    grad = np.empty_like(logits)
    kernels.cross_entropy_rows(logits, target, None, -100, 0.0, 0.0, None, None, None, grad)
    np.testing.assert_allclose(grad, np.exp(log_p) * target.sum(1, keepdims=True) - target, atol=1e-15)
