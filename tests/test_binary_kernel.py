"""The fused binary cross-entropy kernel (``xentkit.kernels.binary``, under the api's
``binary_cross_entropy_with_logits``): the reference's values for every weight and pos_weight
shape, reduction, dtype and upstream gradient, special values included; log σ accurate for
confident logits; its serial build gives the parallel build's bits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import xentkit
from conftest import assert_close

SHAPES = [(7,), (5, 4), (3, 2, 6), (300, 300)]
WEIGHTS = ["none", "per class", "per row", "per element", "one value"]
POS_WEIGHTS = ["none", "per class", "one value"]


def _weights(kind, pos_kind, shape, rng):
    classes = shape[-1]
    weight = {
        "none": None,
        "per class": rng.uniform(0.5, 1.5, classes),
        "per row": rng.uniform(0.5, 1.5, (*shape[:-1], 1)) if len(shape) > 1 else rng.uniform(0.5, 1.5, 1),
        "per element": rng.uniform(0.0, 2.0, shape),
        "one value": np.array(2.0),
    }[kind]
    pos_weight = {"none": None, "per class": rng.uniform(0.0, 3.0, classes), "one value": np.array([1.5])}[pos_kind]
    return weight, pos_weight


def _both(logits, target, **options):
    kernel = xentkit.binary_cross_entropy_with_logits_and_grad(logits, target, **options)
    with xentkit.use_reference(True):
        reference = xentkit.binary_cross_entropy_with_logits_and_grad(logits, target, **options)
    return kernel, reference


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("weight_kind", "pos_kind"), list(itertools.product(WEIGHTS, POS_WEIGHTS)))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_kernel_gives_the_references_values(dtype, shape, weight_kind, pos_kind, reduction):
    rng = np.random.default_rng(len(shape) * 7 + WEIGHTS.index(weight_kind))
    logits = (4 * rng.standard_normal(shape)).astype(dtype)
    target = rng.random(shape).astype(dtype)
    weight, pos_weight = _weights(weight_kind, pos_kind, shape, rng)
    grad_output = rng.uniform(0.5, 2.0, shape) if reduction == "none" else 0.7
    (loss, grad), (want_loss, want_grad) = _both(
        logits, target, weight=weight, pos_weight=pos_weight, reduction=reduction, grad_output=grad_output
    )
    assert loss.dtype == want_loss.dtype and loss.shape == want_loss.shape
    assert grad.dtype == want_grad.dtype == logits.dtype and grad.shape == shape
    assert_close(loss, want_loss, dtype, "loss")
    assert_close(grad, want_grad, dtype, "gradient")


def test_special_values_as_the_reference():
    """±inf, NaN, huge and tiny logits against targets 0, 1 and ½, and an infinite upstream: NaN
    in the same places (0·inf terms, as torch), the rest equal."""
    logits = np.array([np.inf, -np.inf, np.nan, 0.0, -17.0, 30.0, -800.0, 1e-300])
    upstream = np.array([1, 1, 1, 1, 1, 1, 1, np.inf])
    for value in (0.0, 1.0, 0.5):
        target = np.full_like(logits, value)
        with np.errstate(invalid="ignore", over="ignore"):
            results = _both(logits, target, reduction="none", grad_output=upstream)
        for got, want in zip(*results, strict=True):
            assert np.array_equal(np.isnan(got), np.isnan(want)), (value, got, want)
            np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


def test_found_by_review_subnormal_exponentials_and_an_upstream_beyond_float32():
    """exp(−|x|) keeps its subnormal values (float64 |x| in (708, 745)), and log1p of a subnormal
    keeps its last bit; an upstream gradient is taken in the compute dtype, as the reference
    (1e39 is inf in float32, so 0·inf gives NaN there too)."""
    for logits, target, options in [
        ([-720.0], [0.0], {}),
        ([-720.0], [0.0], {"weight": np.array([1e300])}),
        ([720.0], [1.0], {"pos_weight": np.array([np.inf])}),
        ([-744.0, -740.0], [0.0, 0.0], {}),
    ]:
        with np.errstate(invalid="ignore", over="ignore"):
            (loss, grad), (want_loss, want_grad) = _both(
                np.array(logits), np.array(target), reduction="none", **options
            )
        np.testing.assert_array_equal(loss, want_loss)
        np.testing.assert_array_equal(grad, want_grad)
    assert xentkit.binary_cross_entropy_with_logits(np.array([-720.0]), np.array([0.0]), reduction="none")[0] > 0
    for reduction, grad_output in (("none", np.array([1e39, 1e39])), ("sum", 1e39)):
        with np.errstate(invalid="ignore", over="ignore"):
            (_, grad), (_, want_grad) = _both(
                np.float32([0.0, 1.0]), np.float32([0.5, 0.0]), reduction=reduction, grad_output=grad_output
            )
        assert np.array_equal(np.isnan(grad), np.isnan(want_grad)) and np.isnan(grad[0])
        np.testing.assert_array_equal(grad[1:], want_grad[1:])


def test_log_sigmoid_stays_accurate_for_confident_logits():
    """log1p(exp(−|x|)) to float64's accuracy, also for float32 logits (torch's float32 kernel
    gives 0 at x = −17 and is 0.8% high at −10)."""
    x = np.array([-30.0, -17.0, -10.0, -1.0, 0.0, 3.0, 40.0])
    for dtype in (np.float32, np.float64):
        loss = xentkit.binary_cross_entropy_with_logits(x.astype(dtype), np.zeros(7, dtype), reduction="none")
        exact = np.log1p(np.exp(x))  # −log σ(−x) for target 0
        np.testing.assert_allclose(loss, exact, rtol=2e-7 if dtype == np.float32 else 4e-16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_serial_build_gives_the_parallel_builds_bits(dtype):
    from xentkit.kernels.binary import _binary_rows_serial, binary_rows

    rng = np.random.default_rng(4)
    logits = (4 * rng.standard_normal((37, 29))).astype(dtype)
    logits[3, 5], logits[4, 1] = -np.inf, np.nan
    target = rng.random((37, 29)).astype(dtype)
    pos_weight = rng.uniform(0, 2, 29)
    for weight in (None, rng.uniform(0.5, 1.5, 29), rng.uniform(0.5, 1.5, (37, 29))):
        for per_element_loss in (False, True):
            results = [
                binary_rows(logits, target, weight, pos_weight, per_element_loss=per_element_loss,
                            scale=0.25, parallel=parallel)
                for parallel in (False, True)
            ]
            for serial, threaded in zip(*results, strict=True):
                np.testing.assert_array_equal(serial, threaded)
    assert {str(signature[0].dtype) for signature in _binary_rows_serial.signatures} >= {np.dtype(dtype).name}


@pytest.mark.parametrize("pos_weight_shape", [(400,), (300, 1), (300, 400)])
def test_the_torch_binding_runs_the_kernel_with_torchs_values(pos_weight_shape):
    """One pos_weight per class, per row, per element (the last two ran torch's own ops before:
    the kernel took one value per class)."""
    torch = pytest.importorskip("torch")
    import xentkit.torch as xt

    generator = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(300, 400, generator=generator)).requires_grad_()
    target = torch.rand(300, 400, generator=generator)
    pos_weight = torch.rand(pos_weight_shape, generator=generator) * 3
    loss = xt.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    assert type(loss.grad_fn).__name__ == "_BinaryCrossEntropyWithLogitsFunctionBackward"
    loss.backward()
    grad, logits.grad = logits.grad, None
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), target.double(), pos_weight=pos_weight.double())
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), logits.grad.double(), rtol=1e-5, atol=1e-12)
