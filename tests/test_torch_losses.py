"""xentkit.torch drop-in losses against torch.nn.functional: values, gradients, autograd contract."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import xentkit  # noqa: E402
import xentkit.torch as xt  # noqa: E402
from xentkit.torch import _bridge, functional  # noqa: E402

# One table of tolerances: (atol, rtol) per dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-6, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

SHAPES = {
    "N,C": (7, 5),
    "N,C,d1,d2": (3, 4, 2, 3),
    "C": (6,),
}
REDUCTIONS = ("none", "mean", "sum")


def assert_close(actual, expected, dtype=None):
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, check_dtype=False)


def _sample_shape(shape):
    return shape[:1] + shape[2:] if len(shape) >= 2 else ()


def _class_count(shape):
    return shape[1] if len(shape) >= 2 else shape[0]


def make_case(shape, kind, *, dtype=torch.float64, seed=0, ignore_index=None, fraction_ignored=0.3):
    """Logits (requires grad), a target and the sample shape, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    logits.requires_grad_(True)
    classes = _class_count(shape)
    sample_shape = _sample_shape(shape)
    if kind == "probabilities":
        class_dim = 1 if len(shape) >= 2 else 0
        target = torch.randn(shape, generator=generator, dtype=torch.float64).softmax(class_dim).to(dtype)
    else:
        target = torch.randint(0, classes, sample_shape, generator=generator)
        if ignore_index is not None and target.dim() > 0:
            mask = torch.rand(sample_shape, generator=generator) < fraction_ignored
            target = target.masked_fill(mask, ignore_index)
    return logits, target, sample_shape


def run_both(loss_xentkit, loss_torch, logits, sample_shape, reduction, seed=1):
    """Loss and input gradient of both, with a non-uniform upstream gradient for "none"."""
    results = []
    generator = torch.Generator().manual_seed(seed)
    upstream = (torch.rand(sample_shape, generator=generator, dtype=torch.float64) + 0.5).to(logits.dtype)
    for loss_function in (loss_xentkit, loss_torch):
        logits.grad = None
        loss = loss_function(logits)
        if reduction == "none":
            loss.backward(upstream)
        else:
            loss.backward()
        results.append((loss.detach(), logits.grad.clone()))
    return results


# ---------------------------------------------------------------------------------------------
# cross_entropy: parity with torch for every option torch has


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize(
    ("kind", "ignore_index", "use_weight", "label_smoothing"),
    [
        ("index", None, False, 0.0),
        ("index", None, True, 0.0),
        ("index", -100, False, 0.0),
        ("index", -100, True, 0.2),
        ("index", 1, True, 0.0),  # ignore_index may be a real class
        ("index", None, False, 0.3),
        ("probabilities", None, False, 0.0),
        ("probabilities", None, True, 0.0),
        ("probabilities", None, True, 0.25),
    ],
)
@pytest.mark.parametrize("path", ["small", "kernel"])
def test_cross_entropy_matches_torch(
    dtype, reduction, shape_name, kind, ignore_index, use_weight, label_smoothing, path, request
):
    """On xentkit's kernel ("kernel") and as a small problem (torch's own kernel inside
    xentkit's semantics, for the batched layouts)."""
    if path == "kernel":
        request.getfixturevalue("kernel_path")
    shape = SHAPES[shape_name]
    logits, target, sample_shape = make_case(shape, kind, dtype=dtype, ignore_index=ignore_index)
    weight = torch.rand(_class_count(shape), dtype=dtype) + 0.5 if use_weight else None
    options = {"weight": weight, "reduction": reduction, "label_smoothing": label_smoothing}
    if ignore_index is not None:
        options["ignore_index"] = ignore_index
    (loss, grad), (expected_loss, expected_grad) = run_both(
        lambda x: xt.cross_entropy(x, target, **options),
        lambda x: F.cross_entropy(x, target, **options),
        logits, sample_shape, reduction,
    )
    if reduction == "mean" and not torch.isfinite(expected_loss):
        pytest.skip("torch's mean of nothing is NaN; xentkit's is 0 (tested separately)")
    assert loss.dtype == expected_loss.dtype and loss.shape == expected_loss.shape
    assert_close(loss, expected_loss)
    assert_close(grad, expected_grad)


def torch_cross_entropy_with_extras(logits, target, *, reduction, z_loss, softcap, ignore_index=-100, **options):
    """The extras written out in torch ops, as the docstring states them."""
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    class_dim = 1 if logits.dim() >= 2 else 0
    per_sample = F.cross_entropy(logits, target, reduction="none", ignore_index=ignore_index, **options)
    z_term = z_loss * torch.logsumexp(logits, class_dim) ** 2
    if target.is_floating_point():
        valid = torch.ones_like(z_term, dtype=torch.bool)
    else:
        valid = target != ignore_index
        z_term = z_term * valid
    if reduction == "none":
        return per_sample + z_term
    if reduction == "sum":
        return per_sample.sum() + z_term.sum()
    main = F.cross_entropy(logits, target, reduction="mean", ignore_index=ignore_index, **options)
    return main + z_term.sum() / valid.sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape_name", ["N,C", "N,C,d1,d2"])
@pytest.mark.parametrize("kind", ["index", "probabilities"])
@pytest.mark.parametrize(("z_loss", "softcap"), [(1e-2, None), (0.0, 2.0), (0.05, 3.0)])
def test_cross_entropy_extras_match_their_formula(reduction, shape_name, kind, z_loss, softcap):
    shape = SHAPES[shape_name]
    logits, target, sample_shape = make_case(shape, kind, ignore_index=-100)
    weight = torch.rand(_class_count(shape), dtype=torch.float64) + 0.5
    options = {"weight": weight, "label_smoothing": 0.1, "reduction": reduction}
    (loss, grad), (expected_loss, expected_grad) = run_both(
        lambda x: xt.cross_entropy(x, target, z_loss=z_loss, softcap=softcap, **options),
        lambda x: torch_cross_entropy_with_extras(x, target, z_loss=z_loss, softcap=softcap, **options),
        logits, sample_shape, reduction,
    )
    assert_close(loss, expected_loss)
    assert_close(grad, expected_grad)


GRADCHECK_OPTIONS = [
    {},
    {"use_weight": True, "ignore_index": -100, "label_smoothing": 0.1},
    {"ignore_index": 2, "z_loss": 0.05},
    {"use_weight": True, "softcap": 2.5, "z_loss": 0.01, "label_smoothing": 0.2},
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("kind", ["index", "probabilities"])
@pytest.mark.parametrize("option_set", range(len(GRADCHECK_OPTIONS)))
def test_cross_entropy_gradcheck(reduction, shape_name, kind, option_set, kernel_path):
    options = dict(GRADCHECK_OPTIONS[option_set])
    shape = SHAPES[shape_name]
    ignore_index = options.pop("ignore_index", None)
    logits, target, _ = make_case(shape, kind, ignore_index=ignore_index, fraction_ignored=0.2)
    if options.pop("use_weight", False):
        options["weight"] = torch.rand(_class_count(shape), dtype=torch.float64) + 0.5
    if ignore_index is not None:
        options["ignore_index"] = ignore_index
    assert torch.autograd.gradcheck(
        lambda x: xt.cross_entropy(x, target, reduction=reduction, **options), (logits,)
    )


def test_cross_entropy_float16_is_computed_in_float32():
    logits, target, _ = make_case((16, 10), "index", dtype=torch.float16, ignore_index=-100)
    loss = xt.cross_entropy(logits, target, label_smoothing=0.1)
    loss.backward()
    assert loss.dtype == torch.float16 and logits.grad.dtype == torch.float16
    reference = logits.detach().float().requires_grad_(True)
    expected = F.cross_entropy(reference, target, label_smoothing=0.1)
    expected.backward()
    assert_close(loss, expected.half())
    assert_close(logits.grad, reference.grad.half())


def test_cross_entropy_accepts_non_contiguous_input():
    base = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (9,))
    logits = base.t()  # (9, 5), not contiguous
    assert not logits.is_contiguous()
    loss = xt.cross_entropy(logits, target, reduction="sum")
    (grad,) = torch.autograd.grad(loss, base)
    expected = F.cross_entropy(logits, target, reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, base)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)


def test_mean_over_nothing_is_zero_not_nan():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.full((4,), -100)
    loss = xt.cross_entropy(logits, target, z_loss=0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0
    assert torch.isnan(F.cross_entropy(logits, target))  # torch's behaviour, documented as different


def test_gradient_is_scaled_by_the_upstream_gradient():
    logits, target, _ = make_case((6, 4), "index")
    (3.5 * xt.cross_entropy(logits, target, label_smoothing=0.1)).backward()
    grad = logits.grad.clone()
    logits.grad = None
    (3.5 * F.cross_entropy(logits, target, label_smoothing=0.1)).backward()
    assert_close(grad, logits.grad)


# ---------------------------------------------------------------------------------------------
# nll_loss and binary_cross_entropy_with_logits


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize(("ignore_index", "use_weight"), [(None, False), (-100, True), (2, False)])
@pytest.mark.parametrize("path", ["small", "kernel"])
def test_nll_loss_matches_torch(reduction, shape_name, ignore_index, use_weight, path, request):
    """On xentkit's api ("kernel") and as a small problem (torch's own kernel inside xentkit's
    semantics, for the batched layouts)."""
    if path == "kernel":
        request.getfixturevalue("kernel_path")
    shape = SHAPES[shape_name]
    raw, target, sample_shape = make_case(shape, "index", ignore_index=ignore_index)
    log_probs = raw.detach().log_softmax(1 if len(shape) >= 2 else 0).requires_grad_(True)
    options = {"reduction": reduction}
    if use_weight:
        options["weight"] = torch.rand(_class_count(shape), dtype=torch.float64) + 0.5
    if ignore_index is not None:
        options["ignore_index"] = ignore_index
    (loss, grad), (expected_loss, expected_grad) = run_both(
        lambda x: xt.nll_loss(x, target, **options),
        lambda x: F.nll_loss(x, target, **options),
        log_probs, sample_shape, reduction,
    )
    if reduction == "mean" and not torch.isfinite(expected_loss):
        pytest.skip("torch's mean of nothing is NaN; xentkit's is 0")
    assert_close(loss, expected_loss)
    assert_close(grad, expected_grad)
    assert torch.autograd.gradcheck(lambda x: xt.nll_loss(x, target, **options), (log_probs,))


BCE_WEIGHTS = {
    "none": lambda shape: (None, None),
    "weight per class": lambda shape: (torch.rand(shape[-1], dtype=torch.float64) + 0.5, None),
    "weight per row": lambda shape: (torch.rand(shape[0], *[1] * (len(shape) - 1), dtype=torch.float64) + 0.5, None),
    "pos_weight": lambda shape: (None, torch.rand(shape[-1], dtype=torch.float64) * 3),
    "both": lambda shape: (torch.rand(shape, dtype=torch.float64), torch.rand(shape[-1], dtype=torch.float64) * 3),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 5)])
@pytest.mark.parametrize("weights", list(BCE_WEIGHTS))
def test_binary_cross_entropy_with_logits_matches_torch(reduction, shape, weights):
    generator = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(shape, generator=generator, dtype=torch.float64)).requires_grad_(True)
    target = torch.rand(shape, generator=generator, dtype=torch.float64).round()
    weight, pos_weight = BCE_WEIGHTS[weights](shape)
    options = {"weight": weight, "pos_weight": pos_weight, "reduction": reduction}
    (loss, grad), (expected_loss, expected_grad) = run_both(
        lambda x: xt.binary_cross_entropy_with_logits(x, target, **options),
        lambda x: F.binary_cross_entropy_with_logits(x, target, **options),
        logits, shape, reduction,
    )
    assert_close(loss, expected_loss)
    assert_close(grad, expected_grad)
    assert torch.autograd.gradcheck(
        lambda x: xt.binary_cross_entropy_with_logits(x, target, **options), (logits,)
    )


def test_bce_pos_weight_of_torch_only_shape_goes_to_torch():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.rand(4, 3, dtype=torch.float64)
    pos_weight = torch.rand(4, 3, dtype=torch.float64)  # any broadcastable shape, torch only
    loss = xt.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    assert_close(loss, F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight))


# ---------------------------------------------------------------------------------------------
# The autograd contract: forward-only work, version counters, retain_graph, double backward

LOSSES = {
    "cross_entropy": (lambda x, t, **kw: xt.cross_entropy(x, t, **kw), F.cross_entropy, "index"),
    "nll_loss": (lambda x, t, **kw: xt.nll_loss(x, t, **kw), F.nll_loss, "index"),
    "bce_with_logits": (
        lambda x, t, **kw: xt.binary_cross_entropy_with_logits(x, t, **kw),
        F.binary_cross_entropy_with_logits,
        "probabilities",
    ),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_double_backward_raises(name, kernel_path):
    loss_function, _, kind = LOSSES[name]
    logits, target, _ = make_case((5, 4), kind)
    # on xentkit's kernel (kernel_path: a small problem runs torch's own, which has a second
    # derivative: test_small_problems_keep_xentkits_semantics)
    loss = loss_function(logits, target, reduction="sum")
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad.sum().backward()
    # A gradient penalty must not be silently dropped (once_differentiable would drop it here,
    # since the upstream gradient of a create_graph=True call does not require grad).
    loss = loss_function(logits, target, reduction="sum")
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        (loss + grad.square().sum()).backward()


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_retain_graph_backward_twice_accumulates_like_torch(name, reduction):
    loss_function, torch_function, kind = LOSSES[name]
    logits, target, _ = make_case((5, 4), kind)
    results = []
    for function in (loss_function, torch_function):
        logits.grad = None
        loss = function(logits, target, reduction=reduction).sum()
        loss.backward(retain_graph=True)
        (2.0 * loss).backward()
        results.append(logits.grad.clone())
    assert_close(*results)


def test_second_backward_without_retain_graph_raises_clearly():
    logits, target, _ = make_case((5, 4), "index")
    loss = xt.cross_entropy(logits, target)
    loss.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()


@pytest.mark.parametrize("name", list(LOSSES))
def test_forward_does_not_touch_the_input(name):
    loss_function, _, kind = LOSSES[name]
    logits, target, _ = make_case((5, 4), kind)
    before, version = logits.detach().clone(), logits._version
    loss_function(logits, target).backward()
    assert torch.equal(logits.detach(), before) and logits._version == version


def test_other_users_of_the_logits_see_their_original_values():
    """The Liger-Kernel failure: a gradient written over the logits behind autograd's back."""
    leaf = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (6,))
    grads = []
    for loss_function in (xt.cross_entropy, F.cross_entropy):
        leaf.grad = None
        logits = leaf.exp()  # exp saves its output for backward
        loss = loss_function(logits, target) + (logits * torch.arange(5.0, dtype=torch.float64)).sum()
        loss.backward()
        grads.append(leaf.grad.clone())
    assert_close(*grads)


def test_input_changed_after_forward_gives_the_forward_gradient_like_torch():
    leaf = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (6,))
    grads = []
    for loss_function in (xt.cross_entropy, F.cross_entropy):
        leaf.grad = None
        logits = leaf * 1.0
        loss = loss_function(logits, target)
        logits.add_(10.0)  # after forward: the loss was computed from the old values
        loss.backward()
        grads.append(leaf.grad.clone())
    assert_close(*grads)
    leaf.grad = None
    F.cross_entropy(leaf, target).backward()
    assert_close(grads[0], leaf.grad)  # the gradient at the values the loss saw


@pytest.mark.parametrize(
    ("loss_function", "transform"),
    [(xt.cross_entropy, torch.exp), (xt.nll_loss, lambda x: x.log_softmax(1))],
)
def test_input_saved_for_backward_and_changed_raises_version_error(loss_function, transform):
    leaf = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (6,))
    logits = transform(leaf)  # both exp and log_softmax save their output
    loss = loss_function(logits, target)
    logits.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("name", list(LOSSES))
def test_no_gradient_work_without_requires_grad(name, monkeypatch):
    loss_function, torch_function, kind = LOSSES[name]
    logits, target, _ = make_case((5, 4), kind)
    logits = logits.detach()

    def fail(*args, **kwargs):
        raise AssertionError("gradient computed although nothing requires it")

    for api_name in ("cross_entropy_and_grad", "nll_loss_and_grad", "binary_cross_entropy_with_logits_and_grad"):
        monkeypatch.setattr(xentkit, api_name, fail)
    loss = loss_function(logits, target)
    assert loss.grad_fn is None
    assert_close(loss, torch_function(logits, target))
    with torch.no_grad():
        assert_close(loss_function(logits.requires_grad_(True), target), torch_function(logits, target))


# ---------------------------------------------------------------------------------------------
# Fallbacks to torch ops


def _forbid_xentkit(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("xentkit's NumPy api called on a tensor it cannot view")

    for api_name in ("cross_entropy", "cross_entropy_and_grad", "nll_loss", "nll_loss_and_grad"):
        monkeypatch.setattr(xentkit, api_name, fail)


def test_bfloat16_goes_to_torch_ops(monkeypatch):
    _forbid_xentkit(monkeypatch)
    logits, target, _ = make_case((8, 6), "index", dtype=torch.bfloat16, ignore_index=-100)
    loss = xt.cross_entropy(logits, target, label_smoothing=0.1)
    loss.backward()
    grad = logits.grad.clone()
    logits.grad = None
    expected = F.cross_entropy(logits, target, label_smoothing=0.1)
    expected.backward()
    assert loss.dtype == torch.bfloat16
    assert_close(loss, expected)
    assert_close(grad, logits.grad)


def test_meta_device_goes_to_torch_ops(monkeypatch):
    _forbid_xentkit(monkeypatch)
    logits = torch.empty(8, 6, 2, device="meta", requires_grad=True)
    target = torch.empty(8, 2, dtype=torch.long, device="meta")
    for reduction, shape in (("none", (8, 2)), ("mean", ()), ("sum", ())):
        loss = xt.cross_entropy(logits, target, reduction=reduction, z_loss=0.1, softcap=5.0)
        assert loss.device.type == "meta" and loss.shape == shape
    assert xt.nll_loss(logits, target).device.type == "meta"


def test_gradient_for_probability_target_goes_to_torch_ops():
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for loss_function in (xt.cross_entropy, F.cross_entropy):
        logits.grad = teacher.grad = None
        loss_function(logits, teacher.softmax(1), label_smoothing=0.1).backward()
        grads.append((logits.grad.clone(), teacher.grad.clone()))
    assert_close(grads[0][0], grads[1][0])
    assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "probabilities"])
def test_torch_ops_path_has_xentkit_semantics(reduction, kind, monkeypatch):
    """The fallback keeps z-loss, softcap and "mean of nothing is 0", so devices agree."""
    logits, target, sample_shape = make_case((6, 5, 2), kind, ignore_index=-100)
    options = {
        "weight": torch.rand(5, dtype=torch.float64) + 0.5, "label_smoothing": 0.1,
        "z_loss": 0.02, "softcap": 4.0, "reduction": reduction,
    }
    fused = run_both(
        lambda x: xt.cross_entropy(x, target, **options), lambda x: xt.cross_entropy(x, target, **options),
        logits, sample_shape, reduction,
    )[0]
    monkeypatch.setattr(functional._bridge, "runs_on_xentkit", lambda *args, **kwargs: False)
    fallback = run_both(
        lambda x: xt.cross_entropy(x, target, **options), lambda x: xt.cross_entropy(x, target, **options),
        logits, sample_shape, reduction,
    )[0]
    assert_close(fused[0], fallback[0])
    assert_close(fused[1], fallback[1])
    if kind == "index":
        ignored = torch.full_like(target, -100)
        loss = xt.cross_entropy(logits, ignored, **options)
        if reduction != "none":
            assert loss.item() == 0.0


def test_runs_on_xentkit_rules():
    x = torch.randn(3, 4)
    target = torch.tensor([0, 1, 2])
    assert _bridge.runs_on_xentkit(x, target)
    assert not _bridge.runs_on_xentkit(x.bfloat16(), target)
    assert not _bridge.runs_on_xentkit(torch.empty(3, 4, device="meta"), target)
    soft = torch.rand(3, 4, requires_grad=True)
    assert not _bridge.runs_on_xentkit(x, soft, grad_free=(soft,))
    with torch.no_grad():
        assert _bridge.runs_on_xentkit(x, soft, grad_free=(soft,))


# ---------------------------------------------------------------------------------------------
# Modules


def test_modules_are_torch_modules_with_torch_state():
    weight = torch.rand(4)
    pairs = [
        (xt.CrossEntropyLoss(weight, label_smoothing=0.1), torch.nn.CrossEntropyLoss),
        (xt.NLLLoss(weight), torch.nn.NLLLoss),
        (xt.BCEWithLogitsLoss(weight, pos_weight=torch.rand(4)), torch.nn.BCEWithLogitsLoss),
    ]
    for module, torch_class in pairs:
        assert isinstance(module, torch_class)
        reference = torch_class()
        for key, value in module.state_dict().items():
            assert key in ("weight", "pos_weight") and torch.equal(value, getattr(module, key))
        del reference
    assert "z_loss=0.0" in repr(xt.CrossEntropyLoss())


@pytest.mark.parametrize(
    ("size_average", "reduce", "reduction"), [(False, None, "sum"), (None, False, "none"), (True, True, "mean")]
)
def test_legacy_size_average_and_reduce_map_like_torch(size_average, reduce, reduction):
    logits, target, _ = make_case((5, 4), "index")
    with pytest.warns(UserWarning, match="deprecated"):
        module = xt.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    assert module.reduction == reduction
    with pytest.warns(UserWarning, match="deprecated"):
        loss = xt.cross_entropy(logits, target, None, size_average, -100, reduce)
    assert_close(loss, F.cross_entropy(logits, target, reduction=reduction))


@pytest.mark.parametrize(
    ("xentkit_loss", "torch_loss", "kind"),
    [
        (xt.CrossEntropyLoss(label_smoothing=0.1), torch.nn.CrossEntropyLoss(label_smoothing=0.1), "index"),
        (xt.NLLLoss(), torch.nn.NLLLoss(), "index"),
        (xt.BCEWithLogitsLoss(), torch.nn.BCEWithLogitsLoss(), "probabilities"),
    ],
)
def test_tiny_model_trains_to_the_same_parameters(xentkit_loss, torch_loss, kind):
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(32, 6, generator=generator, dtype=torch.float64)
    if kind == "index":
        target = torch.randint(0, 4, (32,), generator=generator)
    else:
        target = torch.rand(32, 4, generator=generator, dtype=torch.float64).round()
    parameters = []
    for criterion in (xentkit_loss, torch_loss):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4, dtype=torch.float64)
        if isinstance(criterion, torch.nn.NLLLoss):
            model = torch.nn.Sequential(model, torch.nn.LogSoftmax(dim=1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        for _ in range(8):
            optimizer.zero_grad()
            criterion(model(inputs), target).backward()
            optimizer.step()
        parameters.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert_close(*parameters)


# ---------------------------------------------------------------------------------------------
# Errors and packaging


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
        ({"z_loss": -1.0}, ValueError, "z_loss must be"),
        ({"softcap": 0.0}, ValueError, "softcap must be"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_options_name_the_argument(options, error, message):
    logits, target, _ = make_case((3, 4), "index")
    with pytest.raises(error, match=message):
        xt.cross_entropy(logits, target, **options)


def test_label_out_of_range_is_a_value_error():
    logits = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="label 7"):
        xt.cross_entropy(logits, torch.tensor([0, 7, 1]))


def test_import_xentkit_does_not_import_torch():
    code = "import sys, xentkit; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_all_exports_exist():
    for name in xt.__all__:
        assert callable(getattr(xt, name))


def test_probabilities_passed_as_logits_warn_once_and_can_be_silenced():
    import warnings

    import xentkit
    import xentkit.torch as xt

    probs = torch.softmax(torch.randn(6, 5, dtype=torch.float64), dim=1)
    target = torch.zeros(6, dtype=torch.long)
    with pytest.warns(xentkit.ProbabilitiesAsLogitsWarning, match="softmax twice"):
        xt.cross_entropy(probs, target)
    with pytest.warns(xentkit.ProbabilitiesAsLogitsWarning):
        xt.CrossEntropyLoss()(probs.requires_grad_(), target).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xt.cross_entropy(probs, target, check_probabilities=False)
        xt.CrossEntropyLoss(check_probabilities=False)(probs, target)
        xt.cross_entropy(probs * 4, target)


@pytest.mark.parametrize("classes", [2, 3, 10, 1000])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_small_means_skip_the_probability_look_only_where_probabilities_cannot_be(classes, label_smoothing):
    """The small path looks at the logits for probabilities only when the "mean" loss lies where
    probabilities can put it: every probability input (uniform to one-hot, any labels) still
    warns, and a confident model's logits are not looked at."""
    import warnings

    import xentkit
    import xentkit.torch as xt
    from xentkit.torch.functional import _mean_of_probabilities_possible

    generator = torch.Generator().manual_seed(classes)
    for power in (0, 1, 4, 16):
        probs = torch.rand(32, classes, generator=generator, dtype=torch.float64) ** power
        probs = probs / probs.sum(dim=1, keepdim=True)
        for target in (torch.randint(0, classes, (32,), generator=generator), probs.argmax(dim=1)):
            with pytest.warns(xentkit.ProbabilitiesAsLogitsWarning):
                xt.cross_entropy(probs, target, label_smoothing=label_smoothing)
    confident = torch.eye(classes, dtype=torch.float64)[:32] * 20  # loss ~ e^-20: no look
    assert not _mean_of_probabilities_possible(
        float(torch.nn.functional.cross_entropy(confident, torch.arange(min(32, classes)))), classes
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xt.cross_entropy(confident, torch.arange(min(32, classes)), label_smoothing=label_smoothing)


def test_small_mean_of_nothing_still_warns_and_is_zero_whatever_the_logits(monkeypatch):
    import xentkit
    import xentkit.torch as xt

    probs = torch.softmax(torch.randn(4, 5), 1)
    with pytest.warns(xentkit.ProbabilitiesAsLogitsWarning):
        assert xt.cross_entropy(probs, torch.full((4,), -100)) == 0
    logits = torch.tensor([[1.0, float("inf"), 0.0], [float("nan"), 0.0, 1.0]], requires_grad=True)
    loss = xt.cross_entropy(logits, torch.full((2,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    # as on the kernel path and with class weights
    assert xt.cross_entropy(logits, torch.full((2,), -100), torch.ones(3)).item() == 0.0
    with monkeypatch.context() as patch:
        patch.setattr(functional, "SMALL_MAX_LOGITS", 0)
        assert xt.cross_entropy(logits, torch.full((2,), -100)).item() == 0.0


def test_uint8_targets_on_the_torch_ops_path_are_not_mistaken_for_ignore_index():
    import xentkit.torch as xt

    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([156, 3, 156, 7], dtype=torch.uint8)  # −100 wraps to 156 in uint8
    expected = F.cross_entropy(x.double(), target.long())
    torch.testing.assert_close(xt.cross_entropy(x.bfloat16(), target).double(), expected, rtol=2e-2, atol=2e-2)
    expected_z = xt.cross_entropy(x, target.long(), z_loss=1.0, reduction="sum")
    torch.testing.assert_close(
        xt.cross_entropy(x.bfloat16(), target, z_loss=1.0, reduction="sum").float(), expected_z, rtol=2e-2, atol=1.0
    )


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_ignore_index_is_unused_with_probability_targets_on_every_path(backend):
    """One behaviour: ignore_index concerns class indices; probabilities ignore it on every path
    (torch's own F.cross_entropy raises for a value other than -100)."""
    logits = torch.randn(3, 4, dtype=torch.float64)
    target = torch.softmax(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    want = torch.nn.functional.cross_entropy(logits, target)
    got = xt.cross_entropy(logits, target, ignore_index=1, backend=backend)
    torch.testing.assert_close(got, want)


def test_small_problems_without_torchs_binding_call_its_python_function(monkeypatch):
    """A torch without ``torch._C._nn.cross_entropy_loss`` gets ``F.cross_entropy`` on the small
    path: the same values and gradients for every reduction, smoothing and ignored label."""
    from xentkit.torch import functional

    logits = torch.randn(16, 7, dtype=torch.float64)
    target = torch.randint(0, 7, (16,))
    target[2] = -100
    results = {}
    for binding in (functional._TORCH_CROSS_ENTROPY, None):
        monkeypatch.setattr(functional, "_TORCH_CROSS_ENTROPY", binding)
        for reduction in REDUCTIONS:
            for smoothing in (0.0, 0.2):
                leaf = logits.clone().requires_grad_()
                loss = xt.cross_entropy(leaf, target, reduction=reduction, label_smoothing=smoothing)
                loss.sum().backward()
                want = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=smoothing)
                torch.testing.assert_close(loss.detach(), want, rtol=1e-14, atol=1e-14)
                results.setdefault((reduction, smoothing), []).append((loss.detach(), leaf.grad))
    for (first_loss, first_grad), (second_loss, second_grad) in results.values():
        assert torch.equal(first_loss, second_loss) and torch.equal(first_grad, second_grad)


def test_default_options_are_the_checked_defaults_and_equal_values_of_other_types_are_checked():
    """Every option at its default gives the default options' result; an equal value of another
    type (True for an int, 0 for a float) still goes through the checks."""
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(
        xt.cross_entropy(logits, target),
        xt.cross_entropy(logits, target, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0),
    )
    with pytest.raises(TypeError, match="ignore_index"):
        xt.cross_entropy(logits, target, ignore_index=-100.0)
    with pytest.raises(TypeError, match="check_labels"):
        xt.cross_entropy(logits, target, check_labels=1)


def _on_the_kernel(monkeypatch, call):
    """``call()`` with small problems on xentkit's kernel (as the ``kernel_path`` fixture)."""
    with monkeypatch.context() as patch:
        patch.setattr(functional, "SMALL_MAX_LOGITS", 0)
        return call()


def _recording_torchs_kernel(monkeypatch):
    """Every call of torch's cross-entropy binding from the small path, recorded (the logits'
    shapes)."""
    calls = []
    torch_cross_entropy = functional._TORCH_CROSS_ENTROPY
    assert torch_cross_entropy is not None  # torch's binding, which F.cross_entropy calls

    def recorded(*args):
        calls.append(tuple(args[0].shape))
        return torch_cross_entropy(*args)

    monkeypatch.setattr(functional, "_TORCH_CROSS_ENTROPY", recorded)
    return calls


def _loss_and_grad(logits, target, **options):
    leaf = logits.detach().clone().requires_grad_()
    loss = xt.cross_entropy(leaf, target, **options)
    upstream = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    loss.backward(upstream)
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("layout", ["N,C", "N,C,d1,d2"])
@pytest.mark.parametrize("kind", ["index", "probabilities"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_problems_run_torchs_own_kernel_with_the_kernels_values(monkeypatch, layout, kind, weighted, dtype):
    """Up to SMALL_MAX_LOGITS logits of torch's batched layouts, class indices (int64) or
    probabilities, with or without class weights (the logits' dtype), run torch's own
    cross-entropy: the values of xentkit's kernel, for every reduction and label smoothing,
    ignored targets included."""
    calls = _recording_torchs_kernel(monkeypatch)
    shape = SHAPES[layout]
    logits, target, _ = make_case(shape, kind, dtype=dtype, ignore_index=-100, fraction_ignored=0.3)
    weight = torch.rand(shape[1], dtype=dtype, generator=torch.Generator().manual_seed(3)) + 0.5 if weighted else None
    for reduction in REDUCTIONS:
        for smoothing in (0.0, 0.2):
            options = {"weight": weight, "reduction": reduction, "label_smoothing": smoothing}
            calls.clear()
            small = _loss_and_grad(logits, target, **options)
            assert calls == [shape], "torch's kernel ran"
            kernel = _on_the_kernel(monkeypatch, lambda options=options: _loss_and_grad(logits, target, **options))
            assert calls == [shape], "the kernel_path ran xentkit's kernel"
            tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
            assert small[0].dtype == kernel[0].dtype and small[0].shape == kernel[0].shape
            torch.testing.assert_close(small[0], kernel[0], **tolerance)
            torch.testing.assert_close(small[1], kernel[1], **tolerance)


def test_what_small_problems_keep_for_xentkits_own_path(monkeypatch):
    """Larger problems, xentkit's extras, in place, int32 labels, and a weight or probabilities of
    another dtype or requiring grad are not torch's kernel's; an unbatched (C,) input is (since
    2026-12-06: its second derivative, as torch's)."""
    calls = _recording_torchs_kernel(monkeypatch)
    logits = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    probabilities = torch.softmax(torch.randn(8, 5, dtype=torch.float64), 1)
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    xt.cross_entropy(logits, target, weight)
    xt.cross_entropy(logits, probabilities, weight)
    xt.cross_entropy(logits[0], target[0], weight)
    xt.cross_entropy(logits[0], probabilities[0])
    assert len(calls) == 4
    calls.clear()
    xt.cross_entropy(torch.randn(300, 300), torch.randint(0, 300, (300,)))  # 90000 logits
    xt.cross_entropy(logits, target, z_loss=1e-3)
    xt.cross_entropy(logits, target, softcap=5.0)
    xt.cross_entropy(logits * 1.0, target, inplace_backward=True)
    xt.cross_entropy(logits, target.int())
    xt.cross_entropy(logits, target, weight.float())  # float32 weights for float64 logits
    xt.cross_entropy(logits, probabilities, weight.clone().requires_grad_(), reduction="sum").backward()
    xt.cross_entropy(logits, probabilities.float())
    xt.cross_entropy(logits, probabilities.clone().requires_grad_())
    xt.cross_entropy(logits[0], target[0].int())
    xt.cross_entropy(logits, target, backend="torch")
    assert calls == []


def test_small_problems_keep_xentkits_semantics(monkeypatch):
    """Around torch's kernel: a "mean" of nothing is 0 with gradient 0 (every target ignored,
    class weights 0 on the targets, or weights that cancel, where torch gives NaN or ±inf); a
    probability target of 0 at a −inf logit adds 0 (torch: NaN); a bad label is xentkit's
    ValueError naming its place in every layout; a second derivative equal to torch's."""
    calls = _recording_torchs_kernel(monkeypatch)
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for target, weight in [
        (torch.full((4,), -100), None),
        (torch.full((4,), -100), torch.ones(3, dtype=torch.float64)),
        (torch.tensor([0, 0, 2, -100]), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)),
        (torch.tensor([0, 1, 1, 0]), torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)),  # Σ w_y = 0
    ]:
        assert not torch.isfinite(F.cross_entropy(logits, target, weight)), "torch's x/0"
        logits.grad = None
        loss = xt.cross_entropy(logits, target, weight)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    assert len(calls) == 4
    # 0·log 0 = 0: torch's kernel gives NaN, xentkit's path gives the kernel's finite values
    masked = torch.tensor([[0.0, float("-inf"), 1.0], [2.0, 0.5, float("-inf")]], dtype=torch.float64)
    mass = torch.tensor([[0.3, 0.0, 0.7], [0.5, 0.5, 0.0]], dtype=torch.float64)
    for reduction in REDUCTIONS:
        assert F.cross_entropy(masked, mass, reduction=reduction).isnan().any()
        small = _loss_and_grad(masked, mass, reduction=reduction)
        kernel = _on_the_kernel(monkeypatch, lambda reduction=reduction: _loss_and_grad(masked, mass, reduction=reduction))
        assert torch.isfinite(small[0]).all() and torch.isfinite(small[1]).all()
        torch.testing.assert_close(small, kernel, rtol=1e-14, atol=1e-14)
    # a bad label, in every layout
    with pytest.raises(ValueError, match=r"target has label 10 at position \(1,\) but logits have 10 classes"):
        xt.cross_entropy(torch.randn(32, 10), torch.tensor([0, 10]).repeat(16), torch.ones(10))
    spatial_target = torch.zeros(2, 3, 4, dtype=torch.long)
    spatial_target[1, 2, 0] = -7
    with pytest.raises(ValueError, match=r"target has label -7 at position \(1, 2, 0\)"):
        xt.cross_entropy(torch.randn(2, 5, 3, 4), spatial_target)
    # a second derivative, equal to torch's, for weights and probabilities too
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    for target in (torch.tensor([0, 2, 1, -100]), torch.softmax(torch.randn(4, 3, dtype=torch.float64), 1)):
        (grad,) = torch.autograd.grad(xt.cross_entropy(logits, target, weight), logits, create_graph=True)
        (want,) = torch.autograd.grad(F.cross_entropy(logits, target, weight), logits, create_graph=True)
        torch.testing.assert_close(
            torch.autograd.grad(grad.square().sum(), logits)[0], torch.autograd.grad(want.square().sum(), logits)[0]
        )


def test_small_problems_warn_of_probabilities_as_the_kernel_does(monkeypatch):
    """Logits that are probabilities warn on torch's kernel too, with class weights and label
    smoothing, and after a weight changes in place (the remembered sign of the weights is
    dropped): weights [1, −0.5] put such a "mean" outside the range a mean of probabilities has
    with weights ≥ 0."""
    calls = _recording_torchs_kernel(monkeypatch)
    one_hot = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([0, 1])
    weight = torch.ones(5)
    for options in ({}, {"weight": weight}, {"weight": weight, "label_smoothing": 0.1}, {"reduction": "sum"}):
        with pytest.warns(xentkit.ProbabilitiesAsLogitsWarning):
            xt.cross_entropy(one_hot, target, **options)
    with pytest.warns(xentkit.ProbabilitiesAsLogitsWarning):
        xt.cross_entropy(one_hot, torch.softmax(torch.randn(2, 5), 1))
    xt.cross_entropy(10 * one_hot, target, weight)  # a mean outside that range: weight ≥ 0 remembered
    weight[1] = -0.5
    with pytest.warns(xentkit.ProbabilitiesAsLogitsWarning):
        assert xt.cross_entropy(one_hot, target, weight).item() < 0  # outside that range
    # an infinite class weight (1/count for a class no sample has) makes the mean NaN: it tells
    # nothing, so the logits are looked at
    with pytest.warns(xentkit.ProbabilitiesAsLogitsWarning):
        nan = xt.cross_entropy(one_hot, torch.tensor([0, 2]), torch.tensor([1.0, 1.0, float("inf"), 1.0, 1.0]))
    assert nan.isnan()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xt.cross_entropy(one_hot, target, weight, check_probabilities=False)
        xt.cross_entropy(torch.randn(64, 10) * 3, torch.randint(0, 10, (64,)), torch.rand(10))
    assert len(calls) == 10


def test_small_problems_through_the_module_and_function_modes(monkeypatch):
    """CrossEntropyLoss with a weight buffer and (N, C, d) logits takes torch's kernel; a
    TorchFunctionMode sees F.cross_entropy with the weight."""
    from torch.overrides import TorchFunctionMode

    calls = _recording_torchs_kernel(monkeypatch)
    logits, target = torch.randn(4, 3, 5, dtype=torch.float64), torch.randint(0, 3, (4, 5))
    weight = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    module = xt.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    torch.testing.assert_close(module(logits, target), F.cross_entropy(logits, target, weight, label_smoothing=0.1))
    assert calls == [(4, 3, 5)]
    seen = []

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.cross_entropy:
                seen.append((kwargs or {}).get("weight", args[2] if len(args) > 2 else None))
            return func(*args, **(kwargs or {}))

    with Calls():
        module(logits, target)
    assert len(seen) == 1 and seen[0] is weight


def test_small_nll_loss_runs_torchs_own_kernel_with_xentkits_semantics(monkeypatch):
    """nll_loss on small problems (int64 labels, a weight of the input's dtype; batched, or one
    sample's [C] since 2026-12-06) runs torch's own kernel: the api's values, its label error, 0
    for a "mean" of nothing; other calls keep the api."""
    calls = []
    torch_nll = functional._TORCH_NLL_LOSS
    assert torch_nll is not None

    def recorded(*args):
        calls.append(tuple(args[0].shape))
        return torch_nll(*args)

    monkeypatch.setattr(functional, "_TORCH_NLL_LOSS", recorded)
    for shape in ((7, 5), (3, 5, 2, 2)):
        logits, target, _ = make_case(shape, "index", ignore_index=-100)
        log_probs = logits.detach().log_softmax(1)
        weight = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)
        for reduction in REDUCTIONS:
            for options in ({}, {"weight": weight}, {"weight": weight, "ignore_index": 1}):
                labels = target.masked_fill(target == -100, 1) if "ignore_index" in options else target

                def run(options=options, reduction=reduction, labels=labels, log_probs=log_probs):
                    leaf = log_probs.clone().requires_grad_()
                    loss = xt.nll_loss(leaf, labels, reduction=reduction, **options)
                    loss.sum().backward()
                    return loss.detach(), leaf.grad

                calls.clear()
                small = run()
                assert calls == [shape]
                kernel = _on_the_kernel(monkeypatch, run)
                assert calls == [shape]
                torch.testing.assert_close(small, kernel, rtol=1e-12, atol=1e-12)
    log_probs = torch.log_softmax(torch.randn(4, 3, dtype=torch.float64), 1).requires_grad_()
    for target, weight in [(torch.full((4,), -100), None), (torch.tensor([0, 0, 2, 2]), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))]:
        loss = xt.nll_loss(log_probs, target, weight)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(log_probs.grad, torch.zeros_like(log_probs))
    with pytest.raises(ValueError, match=r"target has label 3 at position \(2,\)") as refused:
        xt.nll_loss(log_probs, torch.tensor([0, 1, 3, 0]))
    assert refused.value.__suppress_context__  # (torch's IndexError is not shown with it)
    calls.clear()
    xt.nll_loss(log_probs.float().half(), torch.tensor([0, 1, 2, 0]))  # float16: the api
    xt.nll_loss(log_probs, torch.tensor([0, 1, 2, 0], dtype=torch.int32))
    xt.nll_loss(log_probs, torch.tensor([0, 1, 2, 0]), torch.ones(3))  # float32 weights
    assert calls == []
    xt.nll_loss(log_probs[0], torch.tensor(1))
    assert calls == [(3,)]


def test_binary_cross_entropy_with_logits_keeps_log_sigmoid_accurate():
    """xentkit's formula, not torch's kernel, which rounds a confident logit's loss away in
    float32 (x = −17, target 0: torch gives 0; x = −10: 0.8% high)."""
    logits = torch.tensor([-17.0, -10.0, 12.0], requires_grad=True)
    target = torch.tensor([0.0, 0.0, 1.0])
    loss = xt.binary_cross_entropy_with_logits(logits, target, reduction="none")
    exact = torch.log1p(torch.exp(torch.tensor([-17.0, -10.0, -12.0], dtype=torch.float64)))
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=0)
    assert F.binary_cross_entropy_with_logits(logits, target, reduction="none")[0] == 0  # torch's


def test_cross_entropy_module_keeps_its_options_until_one_is_set_and_never_saves_them():
    """CrossEntropyLoss builds its options once and reuses them, but an option set (or deleted)
    as an attribute takes effect on the next call, a bad one is refused there, a subclass whose
    option is a property is read on every call, and neither a deep copy nor a saved module
    carries the built options."""
    import copy
    import io

    logits, target = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, -100, 1])
    loss = xt.CrossEntropyLoss()
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target))
    loss.label_smoothing = 0.25
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target, label_smoothing=0.25))
    loss.reduction = "sum"
    torch.testing.assert_close(
        loss(logits, target), F.cross_entropy(logits, target, label_smoothing=0.25, reduction="sum")
    )
    for kept in (copy.deepcopy(loss), torch.load(_saved(loss, io.BytesIO()), weights_only=False)):
        assert "_xentkit_options" not in vars(kept)
        torch.testing.assert_close(kept(logits, target), loss(logits, target))
        kept.label_smoothing = 0.0
        torch.testing.assert_close(kept(logits, target), F.cross_entropy(logits, target, reduction="sum"))
    loss.z_loss = 1e-2
    with_z = loss(logits, target)
    del loss.z_loss  # back to the default, 0
    assert loss(logits, target) < with_z
    loss.ignore_index = True
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        loss(logits, target)

    class Scheduled(xt.CrossEntropyLoss):
        steps = 0

        @property
        def label_smoothing(self):
            return 0.1 * self.steps

        @label_smoothing.setter
        def label_smoothing(self, value):
            pass

    scheduled = Scheduled()
    for steps in (0, 1, 2):
        scheduled.steps = steps
        torch.testing.assert_close(
            scheduled(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1 * steps)
        )


def _saved(module, buffer):
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


def test_compiled_cross_entropy_module_copies_and_saves_with_its_own_options():
    """A module compiled with ``.compile()`` deep-copies into a module of its own (options
    included) and saves (torch drops the compiled call from the state; so does xentkit); a
    state set with ``__setstate__`` replaces the options built before."""
    import copy
    import io

    logits, target = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, 1])
    loss = xt.CrossEntropyLoss()
    loss.compile(backend="eager")
    loss(logits, target)
    twin = copy.deepcopy(loss)
    twin.label_smoothing = 0.5
    torch.testing.assert_close(twin(logits, target), F.cross_entropy(logits, target, label_smoothing=0.5))
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target))
    restored = torch.load(_saved(loss, io.BytesIO()), weights_only=False)
    torch.testing.assert_close(restored(logits, target), F.cross_entropy(logits, target))
    loss.__setstate__(twin.__getstate__())
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target, label_smoothing=0.5))


def test_small_calls_inside_transforms_and_function_modes_are_torchs():
    """Inside a torch.func transform, a small call on tensors the transform does not wrap runs as
    outside; a TorchFunctionMode sees ``F.cross_entropy`` itself, as with torch's loss."""
    from torch.overrides import TorchFunctionMode

    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    scaled = torch.vmap(lambda s: s * xt.cross_entropy(logits, target))(torch.arange(1.0, 4.0))
    torch.testing.assert_close(scaled, torch.arange(1.0, 4.0) * F.cross_entropy(logits, target))
    for reduction in ("mean", "sum"):  # (grad: a detach there hands out a wrapper without storage)
        for loss in (xt.cross_entropy, xt.nll_loss, xt.binary_cross_entropy_with_logits):
            inputs = (logits, target) if loss is not xt.binary_cross_entropy_with_logits else (
                logits, torch.rand(8, 5)
            )
            torch_loss = getattr(F, loss.__name__)
            twice = torch.func.grad(
                lambda s, loss=loss, inputs=inputs, reduction=reduction: s * loss(*inputs, reduction=reduction)
            )(torch.tensor(2.0))
            torch.testing.assert_close(twice, torch_loss(*inputs, reduction=reduction))

    seen = []

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            if func is F.cross_entropy:
                return torch.tensor(42.0)
            return func(*args, **(kwargs or {}))

    with Calls():
        assert xt.cross_entropy(logits, target).item() == 42.0
    assert F.cross_entropy in seen


def test_log_probs_and_in_place_requests_inside_transforms_on_tensors_they_do_not_wrap():
    """Inside vmap or functionalize, log_probs and linear_log_probs over closure tensors run torch
    ops (xentkit's autograd Functions are not for transforms), with torch's values; and
    ``inplace_backward=True`` under torch.func.grad, where torch ops write no logits, refuses
    nothing."""
    generator = torch.Generator().manual_seed(6)
    logits, target = torch.randn(8, 5, generator=generator), torch.randint(0, 5, (8,), generator=generator)
    hidden, weight = torch.randn(8, 3, generator=generator), torch.randn(5, 3, generator=generator)
    want = torch.log_softmax(logits, 1).gather(1, target[:, None]).sum()
    want_linear = torch.log_softmax(hidden @ weight.T, 1).gather(1, target[:, None]).sum()
    scales = torch.arange(1.0, 4.0)
    torch.testing.assert_close(
        torch.vmap(lambda s: s * xt.log_probs(logits, target).sum())(scales), scales * want
    )
    torch.testing.assert_close(
        torch.vmap(lambda s: s * xt.linear_log_probs(hidden, weight, target).sum())(scales), scales * want_linear
    )
    doubled = torch.func.functionalize(lambda s: s * xt.log_probs(logits, target).sum())(torch.tensor(2.0))
    torch.testing.assert_close(doubled, 2 * want)
    grad = torch.func.grad(lambda z: xt.cross_entropy(z, target, inplace_backward=True))(logits)
    torch.testing.assert_close(grad, torch.func.grad(lambda z: F.cross_entropy(z, target))(logits))


def test_uint64_labels_beyond_int64_on_the_linear_torch_ops_path_name_the_linear_weight():
    import numpy as np

    hidden, weight = torch.randn(6, 3), torch.randn(5, 3)
    target = torch.from_numpy(np.array([9, 2**63, 0, 1, 1, 1], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"label 9 at position \(0,\) but linear_weight has 5 rows"):
        xt.linear_cross_entropy(hidden, weight, target, backend="torch")
