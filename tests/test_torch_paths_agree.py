"""The same call behaves the same on every CPU path of ``xentkit.torch``: the kernels (float32),
torch's own small-problem kernel, and torch ops (bfloat16, ``backend="torch"``). Bad input is one
error everywhere (never a silently truncated float label, never torch's IndexError), and any
numeric class weight is taken everywhere."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import xentkit.torch as xt  # noqa: E402

PATHS = {
    "kernels": {"dtype": torch.float32, "backend": "auto", "classes": 70000},  # past the small path
    "small": {"dtype": torch.float32, "backend": "auto", "classes": 3},
    "torch-ops bf16": {"dtype": torch.bfloat16, "backend": "auto", "classes": 3},
    "torch-ops": {"dtype": torch.float32, "backend": "torch", "classes": 3},
}


def _logits(path: str, rows: int = 2) -> torch.Tensor:
    spec = PATHS[path]
    return torch.randn(rows, spec["classes"], generator=torch.Generator().manual_seed(0)).to(spec["dtype"])


def _backend(function: str, path: str) -> dict[str, str]:
    """``backend=`` for cross_entropy; nll_loss (as torch's) takes none: its dtype picks the path."""
    return {"backend": PATHS[path]["backend"]} if function == "cross_entropy" else {}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("function", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize(
    ("make_target", "error", "message"),
    [
        (lambda: torch.tensor([0.9, 1.7]), TypeError, "integer dtype, got dtype float32"),
        (lambda: torch.tensor([True, False]), TypeError, "integer dtype, got dtype bool"),
        (lambda: torch.zeros(2, 2, dtype=torch.int64), ValueError, r"target must have shape \(2,\)"),
        (lambda: torch.zeros(3, dtype=torch.int64), ValueError, r"target must have shape \(2,\)"),
    ],
    ids=["float", "bool", "2-d", "too-long"],
)
def test_bad_class_index_targets_are_one_error(path, function, make_target, error, message):
    logits = _logits(path)
    if function == "nll_loss":
        logits = logits.float().log_softmax(1).to(logits.dtype)
    with pytest.raises(error, match=message):
        getattr(xt, function)(logits, make_target(), **_backend(function, path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_scalar_logits_and_zero_classes_are_the_apis_value_errors(dtype, backend):
    with pytest.raises(ValueError, match="logits must have at least one dimension"):
        xt.cross_entropy(torch.tensor(1.0, dtype=dtype), torch.tensor(0), backend=backend)
    with pytest.raises(ValueError, match="log_probs must have at least one dimension"):
        xt.nll_loss(torch.tensor(1.0, dtype=dtype), torch.tensor(0))
    with pytest.raises(ValueError, match="at least one class along axis 1"):
        xt.cross_entropy(torch.zeros(4, 0, dtype=dtype), torch.zeros(4, 0), backend=backend)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("weight_dtype", [torch.float64, torch.int64, torch.float16, torch.bfloat16])
def test_any_numeric_class_weight(path, weight_dtype):
    logits = _logits(path, rows=4)
    target = torch.tensor([0, 1, 2, 1])
    weight = torch.arange(1, logits.shape[1] + 1).to(weight_dtype)
    want = F.cross_entropy(logits.double(), target, weight.double())
    got = xt.cross_entropy(logits, target, weight, backend=PATHS[path]["backend"])
    tolerance = 2e-2 if logits.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)
    log_probs = logits.float().log_softmax(1).to(logits.dtype)
    got_nll = xt.nll_loss(log_probs, target, weight, **_backend("nll_loss", path))
    torch.testing.assert_close(got_nll.double(), want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_bool_class_weight_is_one_error(path):
    logits = _logits(path, rows=2)
    weight = torch.ones(logits.shape[1], dtype=torch.bool)
    with pytest.raises(TypeError, match=r"weight must be a numeric array, got dtype bool$"):
        xt.cross_entropy(logits, torch.tensor([0, 1]), weight, backend=PATHS[path]["backend"])


@pytest.mark.parametrize("path", ["kernels-small", "torch-ops bf16", "torch-ops"])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets_take_no_mass_on_a_masked_class_on_every_path(path, weighted):
    """Probability targets with no weighted mass on a −inf logit (its target probability 0, or
    its class weight 0): 0·log 0 = 0 on every path, as the kernels and the reference take it
    (torch's own product gives NaN), with the same gradient (0 on the masked class)."""
    import math

    import numpy as np

    import xentkit

    logits = torch.tensor([[0.5, -math.inf, 1.0, 0.2], [0.1, 0.2, -math.inf, 0.3]])
    target = torch.tensor([[0.3, 0.0, 0.5, 0.2], [0.5, 0.25, 0.25, 0.0]])
    weight = torch.tensor([1.0, 2.0, 1.0, 0.5])
    if weighted:  # the second row puts mass on its masked class, weighted 0
        weight = torch.tensor([1.0, 2.0, 0.0, 0.5])
    else:
        target[1] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    dtype, backend = {"kernels-small": (torch.float32, "auto"), "torch-ops bf16": (torch.bfloat16, "auto"),
                      "torch-ops": (torch.float32, "torch")}[path]
    leaf = logits.to(dtype, copy=True).requires_grad_()
    loss = xt.cross_entropy(leaf, target.to(dtype), weight if weighted else None, backend=backend)
    loss.backward()
    want, want_grad = xentkit.reference.cross_entropy_and_grad(
        logits.double().numpy(), target.double().numpy(), weight=weight.double().numpy() if weighted else None
    )
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-6
    assert math.isfinite(loss.item())
    np.testing.assert_allclose(loss.item(), want, rtol=tolerance)
    np.testing.assert_allclose(leaf.grad.float().numpy(), want_grad, atol=tolerance)
    assert leaf.grad[0, 1] == 0 and leaf.grad[1, 2] == 0


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_bad_label_is_refused_before_the_probabilities_warning(path, reduction):
    """Logits that look like probabilities with a bad label: the label error and no warning,
    whichever path the call takes."""
    import warnings

    spec = PATHS[path]
    logits = torch.softmax(torch.randn(6, spec["classes"], generator=torch.Generator().manual_seed(1)), 1)
    target = torch.tensor([0, 1, 2, spec["classes"] + 6, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=rf"label {spec['classes'] + 6} at position \(3,\)"):
            xt.cross_entropy(logits.to(spec["dtype"]), target, reduction=reduction, backend=spec["backend"])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets_that_require_grad_get_torchs_gradients_where_probabilities_are_0(
    label_smoothing, weighted
):
    """A probability target that requires grad runs torch ops: its gradient −w_c·log p_c
    (smoothed) is torch's, also on the classes where it is 0 (only a masked class of no mass
    adds nothing)."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 4, 2, dtype=torch.float64, generator=generator)
    target = torch.zeros(3, 4, 2, dtype=torch.float64)
    target[0, 1], target[1, 0], target[2, 2:] = 1.0, 1.0, 0.5
    weight = torch.rand(4, dtype=torch.float64, generator=generator) if weighted else None
    results = []
    for function in (xt.cross_entropy, F.cross_entropy):
        leaves = logits.clone().requires_grad_(), target.clone().requires_grad_()
        loss = function(*leaves, weight, label_smoothing=label_smoothing)
        results.append((loss, *torch.autograd.grad(loss, leaves)))
    for ours, torchs in zip(*results, strict=True):
        torch.testing.assert_close(ours, torchs, rtol=1e-12, atol=1e-12)
    assert (results[0][2] != 0).all()  # every class's target gradient, zeros included


def test_a_masked_class_of_no_mass_gives_finite_target_and_weight_gradients():
    """A −inf class with no target mass in one row: its term adds nothing to any gradient, so a
    learnable class weight and target stay finite (the other rows' terms are torch's)."""
    import math

    logits = torch.tensor([[0.5, -math.inf, 1.0], [0.1, 0.2, 0.3]], dtype=torch.float64)
    target = torch.tensor([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]], dtype=torch.float64)
    weight = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    leaves = [tensor.clone().requires_grad_() for tensor in (logits, target, weight)]
    xt.cross_entropy(*leaves).backward()
    logit_grad, target_grad, weight_grad = (leaf.grad for leaf in leaves)
    assert torch.isfinite(logit_grad).all() and torch.isfinite(target_grad).all()
    assert logit_grad[0, 1] == 0 and target_grad[0, 1] == 0
    log_p = torch.log_softmax(logits[1], 0)
    torch.testing.assert_close(weight_grad[1], -target[1, 1] * log_p[1] / 2)  # row 1's term alone
    # the rows without a masked class: torch's gradients
    finite = [tensor[1:].clone().requires_grad_() for tensor in (logits, target)]
    F.cross_entropy(finite[0], finite[1], weight, reduction="sum").backward()
    torch.testing.assert_close(target_grad[1:], finite[1].grad / 2)
    torch.testing.assert_close(logit_grad[1:], finite[0].grad / 2)


@pytest.mark.parametrize("path", ["torch-ops bf16", "torch-ops"])
@pytest.mark.parametrize("function", ["cross_entropy", "nll_loss"])
def test_uint64_labels_beyond_int64_are_refused_on_the_torch_ops_path(path, function):
    """A uint64 label beyond int64 would wrap onto ignore_index (2**64 − 100 is −100): refused
    before the cast, as on the kernel path."""
    import numpy as np

    if function == "nll_loss" and path == "torch-ops":
        pytest.skip("nll_loss takes no backend: float32 runs on the api (tested in test_rules.py)")
    target = torch.from_numpy(np.array([2**64 - 100, 1], dtype=np.uint64))
    logits = _logits(path)
    with pytest.raises(ValueError, match=r"label 18446744073709551516 at position \(0,\), too large"):
        getattr(xt, function)(logits, target, reduction="none", **_backend(function, path))
