"""A masked class (−inf logit) of class weight 0 adds nothing, 0·log 0 = 0, on every path: to
the smoothing term under label smoothing, and as a sample's target (a padding class given weight
0 and masked). torch's ``cross_entropy`` gives NaN for both, its gradient finite. The loss of
class indices is then the finite loss of the same (smoothed) targets given as probabilities,
which already took 0·log 0 = 0; a masked class of non-zero weight keeps its +inf, as in torch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from _triton_setup import DEVICE  # first: the skips and the interpreter

# isort: split
import torch

import xentkit
import xentkit.torch as xt
from xentkit import reference
from xentkit.kernels import cross_entropy as ce_kernels
from xentkit.torch import distributed as vp

EPS = 0.1
EPSILONS = [0.0, EPS]


def _problem(classes: int, rows: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits with two masked classes (1 and classes − 2) of weight 0, labels elsewhere but for
    row 4, whose label is masked class 1 (row 3 is ignored), and class weights around 1."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, classes)) * 2
    logits[:, 1] = -np.inf
    logits[:, classes - 2] = -np.inf
    labels = rng.choice([c for c in range(classes) if c not in (1, classes - 2)], size=rows)
    labels[3] = -100
    labels[4] = 1
    weight = rng.uniform(0.5, 2.0, size=classes)
    weight[[1, classes - 2]] = 0.0
    return logits, labels, weight


def _want(logits, labels, weight, reduction="none", eps=EPS):
    return reference.cross_entropy_and_grad(
        logits, labels, weight=weight, label_smoothing=eps, reduction=reduction
    )


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("classes", [5, 40])
def test_the_reference_equals_its_probability_form(classes, eps):
    logits, labels, weight = _problem(classes)
    loss, grad = _want(logits, labels, weight, eps=eps)
    valid = labels != -100
    q = np.eye(classes)[np.where(valid, labels, 0)]
    by_probabilities, by_probabilities_grad = reference.cross_entropy_and_grad(
        logits[valid], q[valid], weight=weight, label_smoothing=eps, reduction="none"
    )
    # row 4's target is a masked class of weight 0: its loss is the smoothing term alone
    gaps = reference.logsumexp(logits[4]) - logits[4]
    np.testing.assert_allclose(loss[4], eps / classes * np.sum(weight * gaps, where=weight > 0), rtol=1e-13)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    np.testing.assert_allclose(loss[valid], by_probabilities, rtol=1e-13)
    np.testing.assert_allclose(grad[valid], by_probabilities_grad, rtol=1e-12, atol=1e-15)
    assert loss[~valid] == 0 and (grad[~valid] == 0).all() and (grad[:, [1, classes - 2]] == 0).all()


def test_a_masked_class_of_nonzero_weight_is_still_infinite():
    logits, labels, weight = _problem(5)
    labels[4] = 0
    weight[1] = 0.5
    loss, _ = _want(logits, labels, weight)
    assert (loss[labels != -100] == math.inf).all()
    assert (xentkit.cross_entropy(logits, labels, weight=weight, label_smoothing=EPS, reduction="none")
            [labels != -100] == math.inf).all()


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("classes", [5, 40, 300])  # the tile kernel, the row kernel, several blocks
@pytest.mark.parametrize("segments", [1, 3])  # 3: the split-row kernel
def test_the_numba_kernels(dtype, classes, segments, eps):
    logits, labels, weight = _problem(classes)
    want, want_grad = _want(logits, labels, weight, eps=eps)
    x = logits.astype(dtype)
    grad = np.empty_like(x)
    loss_rows, _ = ce_kernels.cross_entropy_rows(
        x, labels.astype(np.int64), weight, -100, eps, 0.0, None, None, None, grad, segments=segments, block=64,
    )
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(loss_rows, want, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=1e-7 if dtype == np.float32 else 1e-15)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_the_numpy_api(reduction):
    logits, labels, weight = _problem(12)
    want, want_grad = _want(logits, labels, weight, reduction)
    loss, grad = xentkit.cross_entropy_and_grad(
        logits.astype(np.float32), labels, weight=weight, label_smoothing=EPS, reduction=reduction
    )
    assert np.isfinite(loss).all()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


PATHS = {  # (classes, dtype, backend): the torch binding's paths
    "small": (12, torch.float32, "auto"),
    "kernels": (12000, torch.float32, "auto"),  # past SMALL_MAX_LOGITS
    "torch-ops bf16": (12, torch.bfloat16, "auto"),
    "torch-ops": (12, torch.float32, "torch"),
    "triton": (12, torch.float32, "triton"),
}


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_torch_path(path, reduction, eps):
    classes, dtype, backend = PATHS[path]
    device = DEVICE if backend == "triton" else "cpu"
    logits, labels, weight = _problem(classes)
    if dtype == torch.bfloat16:  # values bfloat16 holds, so that the float64 answer is theirs
        logits = torch.tensor(logits).bfloat16().double().numpy()
    want, want_grad = _want(logits, labels, weight, reduction, eps)
    x = torch.tensor(logits, dtype=dtype, device=device, requires_grad=True)
    loss = xt.cross_entropy(
        x, torch.tensor(labels, device=device), torch.tensor(weight, dtype=torch.float32, device=device),
        label_smoothing=eps, reduction=reduction, backend=backend,
    )
    (loss.sum() if reduction == "none" else loss).backward()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.isfinite(loss).all(), loss
    np.testing.assert_allclose(loss.detach().double().cpu().numpy(), want, rtol=tolerance)
    np.testing.assert_allclose(x.grad.double().cpu().numpy(), want_grad, rtol=tolerance, atol=tolerance * 1e-2)


def test_the_torch_ops_path_is_torchs_loss_where_nothing_is_masked():
    """The composition that replaced torch's smoothed cross-entropy with class weights gives
    torch's values and gradients on finite logits, ignored rows included."""
    logits, labels, weight = _problem(7)
    logits = np.where(np.isinf(logits), -3.0, logits)
    weight[1] = 0.7
    for reduction in ("none", "mean", "sum"):
        x, wide = (torch.tensor(logits, requires_grad=True) for _ in range(2))
        args = (torch.tensor(labels), torch.tensor(weight))
        loss = xt.cross_entropy(x, *args, label_smoothing=EPS, reduction=reduction, backend="torch")
        want = torch.nn.functional.cross_entropy(wide, *args, label_smoothing=EPS, reduction=reduction)
        (loss.sum()).backward()
        want.sum().backward()
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(x.grad, wide.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_the_vocabulary_parallel_form_in_a_world_of_one(backend, eps):
    device = DEVICE if backend == "triton" else "cpu"
    logits, labels, weight = _problem(40)
    want, want_grad = _want(logits, labels, weight, eps=eps)
    dtype = torch.float32 if backend == "triton" else torch.float64
    x = torch.tensor(logits, dtype=dtype, device=device, requires_grad=True)
    loss = vp.vocab_parallel_cross_entropy(
        x, torch.tensor(labels, device=device), weight=torch.tensor(weight, dtype=dtype, device=device),
        label_smoothing=eps, reduction="none", backend=backend,
    )
    loss.sum().backward()
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.isfinite(loss).all(), loss
    np.testing.assert_allclose(loss.detach().double().cpu().numpy(), want, rtol=rtol)
    np.testing.assert_allclose(x.grad.double().cpu().numpy(), want_grad, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("rows", [6, 24000])  # torch's kernel (small), the api beyond it
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])  # bfloat16: torch ops
def test_nll_loss_takes_the_same_rule(rows, dtype):
    """nll_loss of log-probabilities whose target (a class of weight 0) is −inf: 0·log 0 = 0, as
    cross_entropy of the logits (torch: NaN); the NumPy api and the reference alike."""
    logits, labels, weight = _problem(12, rows=rows)
    log_p = logits - reference.logsumexp(logits, axis=1, keepdims=True)
    want, want_grad = reference.nll_loss_and_grad(log_p, labels, weight, -100)[::2]
    assert np.isfinite(want).all() and want[4] == 0
    for use_reference in (False, True):
        with xentkit.use_reference(use_reference):
            np.testing.assert_allclose(xentkit.nll_loss(log_p, labels, weight=weight, reduction="none"), want)
    x = torch.tensor(log_p).to(dtype).requires_grad_()
    loss = xt.nll_loss(x, torch.tensor(labels), torch.tensor(weight).to(dtype), reduction="sum")
    loss.backward()
    assert torch.isfinite(loss)
    np.testing.assert_allclose(loss.double().item(), want.sum(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-12)
    np.testing.assert_allclose(x.grad.double().numpy(), want_grad, rtol=1e-2)
