"""xentkit.torch against torch where a review found them apart: class weights of the wrong shape
on every path (the Triton kernels would read past them), zero classes on the Triton path,
bfloat16 targets and weights beside float32 logits, ``torch.vmap``, and ``inplace_backward`` on
a parameter. Triton runs under its interpreter here."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from _triton_setup import DEVICE  # first: the skips and the interpreter

# isort: split
import torch
import torch.nn.functional as F

import xentkit.torch as xt

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")


def _case(rows=4, classes=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=generator).to(DEVICE)
    labels = torch.randint(0, classes, (rows,), generator=generator).to(DEVICE)
    probabilities = torch.softmax(torch.randn(rows, classes, generator=generator), 1).to(DEVICE)
    return logits, labels, probabilities


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
@pytest.mark.parametrize("shape", [(10,), (4,), (5, 1), ()])
@pytest.mark.parametrize("targets", ["labels", "probabilities"])
def test_a_weight_that_is_not_one_per_class_is_refused_on_every_path(backend, shape, targets):
    logits, labels, probabilities = _case()
    target = labels if targets == "labels" else probabilities
    weight = torch.rand(shape).to(DEVICE)
    expected = f"weight must have shape (5,), one value per class, got shape {tuple(shape)}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        xt.cross_entropy(logits, target, weight, backend=backend)


def test_the_weight_rule_is_the_same_for_nll_loss_and_the_linear_forms():
    logits, labels, _ = _case()
    message = r"weight must have shape \(5,\), one value per class, got shape \(4,\)"
    with pytest.raises(ValueError, match=message):
        xt.nll_loss(logits.log_softmax(1).bfloat16(), labels, torch.rand(4).to(DEVICE))  # torch ops
    hidden, lm_head = torch.randn(4, 3).to(DEVICE), torch.randn(5, 3).to(DEVICE)
    for backend in ("auto", "triton", "torch"):
        with pytest.raises(ValueError, match=message):
            xt.linear_cross_entropy(hidden, lm_head, labels, weight=torch.rand(4).to(DEVICE), backend=backend)
    with pytest.raises(ValueError, match=message):
        xt.LinearCrossEntropyLoss(3, 5, weight=torch.rand(4))
    with pytest.raises(TypeError, match=r"weight must be a numeric array, got dtype bool$"):
        xt.cross_entropy(logits, labels, torch.ones(5, dtype=torch.bool).to(DEVICE), backend="triton")


def test_the_triton_path_says_what_is_wrong_with_the_logits_layout():
    labels = torch.zeros(3, dtype=torch.long).to(DEVICE)
    with pytest.raises(ValueError, match=r"^logits must have at least one class along axis 1, got shape \(3, 0\)$"):
        xt.cross_entropy(torch.randn(3, 0).to(DEVICE), labels, backend="triton")
    with pytest.raises(ValueError, match=r"^logits must have at least one dimension \(the classes\), got a scalar$"):
        xt.cross_entropy(torch.randn(()).to(DEVICE), torch.tensor(0).to(DEVICE), backend="triton")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_scalar_with_a_probability_target_is_named_on_every_path(backend):
    """The small-problem path took a 0-d probability target beside 0-d logits and failed with an
    IndexError (a review, 2026-12-07)."""
    with pytest.raises(ValueError, match=r"^logits must have at least one dimension \(the classes\), got a scalar$"):
        xt.cross_entropy(torch.tensor(1.0), torch.tensor(1.0), backend=backend)


def test_bfloat16_targets_and_weights_beside_float32_logits_are_torchs_results():
    """NumPy has no bfloat16: such calls take torch ops (before: a TypeError inside .numpy()), or
    for binary cross-entropy the kernel on operands widened to float32. The results are torch's
    dtypes and the float64 values of the operands as given (torch itself smooths a bfloat16
    target in bfloat16, and its float32 binary kernel cancels: a review)."""
    logits, labels, probabilities = _case(classes=6)
    leaf, exact_leaf = logits.clone().cpu().requires_grad_(), logits.clone().cpu().double().requires_grad_()
    soft = probabilities.cpu().bfloat16()
    xt.cross_entropy(leaf, soft, label_smoothing=0.1).backward()
    F.cross_entropy(exact_leaf, soft.double(), label_smoothing=0.1).backward()
    torch.testing.assert_close(leaf.grad.double(), exact_leaf.grad, rtol=1e-6, atol=1e-7)
    binary = (torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.5).bfloat16()
    for extra in ({}, {"weight": torch.rand(6).bfloat16()}, {"pos_weight": torch.rand(6).bfloat16()}):
        ours = xt.binary_cross_entropy_with_logits(leaf.detach(), binary, **extra)
        theirs = F.binary_cross_entropy_with_logits(leaf.detach(), binary, **extra)
        exact = F.binary_cross_entropy_with_logits(
            leaf.detach().double(), binary.double(), **{k: v.double() for k, v in extra.items()}
        )
        assert ours.dtype == theirs.dtype == torch.bfloat16
        torch.testing.assert_close(ours.double(), exact, rtol=2.0**-8, atol=0)  # rounded once
    hidden, lm_head = torch.randn(4, 3), torch.randn(6, 3)
    torch.testing.assert_close(xt.linear_cross_entropy(hidden, lm_head, soft), F.cross_entropy(hidden @ lm_head.T, soft))
    # any numeric class weight, as on the kernels (torch itself refuses a bfloat16 weight here)
    weight = torch.rand(6).bfloat16()
    torch.testing.assert_close(
        xt.cross_entropy(leaf.detach(), labels.cpu(), weight),
        F.cross_entropy(leaf.detach(), labels.cpu(), weight.float()),
    )


@pytest.mark.parametrize("function", ["cross_entropy", "nll_loss"])
def test_vmap_and_per_sample_gradients_are_torchs(function):
    logits, labels, _ = _case(rows=8, classes=5)
    logits, labels = logits.cpu(), labels.cpu()
    if function == "nll_loss":
        logits = logits.log_softmax(1)
    ours, theirs = getattr(xt, function), getattr(F, function)
    torch.testing.assert_close(torch.vmap(ours)(logits, labels), torch.vmap(theirs)(logits, labels))
    torch.testing.assert_close(
        torch.vmap(torch.func.grad(ours))(logits, labels), torch.vmap(torch.func.grad(theirs))(logits, labels)
    )


def test_vmap_over_batches_of_small_problems_is_torchs():
    """Inside vmap each call sees a small plain [N, C] problem, the kind that runs torch's kernel
    with a look at its mean: a running transform sends it to torch ops instead (its values
    cannot be read), with torch's results and gradients."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 6, (3, 4), generator=generator)
    labels[1] = -100  # one batch with nothing to average: 0 for xentkit, NaN for torch
    ours = torch.vmap(xt.cross_entropy)(logits, labels)
    theirs = torch.vmap(F.cross_entropy)(logits, labels)
    torch.testing.assert_close(ours[[0, 2]], theirs[[0, 2]])
    assert ours[1].item() == 0.0 and torch.isnan(theirs[1])
    grads = torch.vmap(torch.func.grad(xt.cross_entropy))(logits, labels)
    want = torch.vmap(torch.func.grad(F.cross_entropy))(logits, labels)
    torch.testing.assert_close(grads[[0, 2]], want[[0, 2]])
    assert (grads[1] == 0).all()


def test_under_vmap_a_bad_label_is_a_nan_sample_as_under_compile():
    logits, labels, _ = _case(rows=6, classes=5)
    labels = labels.cpu().clone()
    labels[2] = 9
    losses = torch.vmap(lambda z, y: xt.cross_entropy(z, y, label_smoothing=0.1))(logits.cpu(), labels)
    assert torch.isnan(losses[2]) and torch.isfinite(losses[torch.arange(6) != 2]).all()


@pytest.mark.parametrize("function", ["cross_entropy", "nll_loss"])
def test_under_torch_func_grad_a_bad_label_from_outside_is_eagers_error(function):
    """Labels made outside torch.func.grad are plain tensors whose values the check reads; the
    error named the label after NumPy looked at them, which the transform refuses ("Cannot access
    data pointer of Tensor that doesn't have storage")."""
    logits = torch.randn(4, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 7, 2])
    loss = getattr(xt, function)
    inputs = logits.log_softmax(1) if function == "nll_loss" else logits
    with pytest.raises(ValueError, match=r"label 7 at position \(2,\) but (logits|log_probs) have 5 classes"):
        torch.func.grad(lambda z: loss(z, labels))(inputs)


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_inplace_backward_refuses_to_overwrite_a_parameter(backend):
    generator = torch.Generator().manual_seed(3)
    parameter = torch.nn.Parameter(torch.randn(40, 30, generator=generator).to(DEVICE))
    labels = torch.randint(0, 30, (40,), generator=generator).to(DEVICE)
    before = parameter.detach().clone()
    for logits in (parameter, parameter[:, :], parameter.view(40, 30)):
        with pytest.raises(ValueError, match="leaf tensor requiring grad"):
            xt.cross_entropy(logits, labels, inplace_backward=True, backend=backend)
    assert torch.equal(parameter.detach(), before)
    with torch.no_grad():  # no gradient, nothing written: allowed
        xt.cross_entropy(parameter, labels, inplace_backward=True, backend=backend)
    logits = parameter * 2.0  # a layer's output: written over, and the parameter gets its gradient
    xt.cross_entropy(logits, labels, inplace_backward=True, backend=backend).backward()
    expected = torch.func.grad(lambda p: F.cross_entropy(p * 2.0, labels))(before)
    torch.testing.assert_close(parameter.grad, expected, rtol=2e-6, atol=2e-7)
    assert torch.equal(parameter.detach(), before)


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    ("logits_dtype", "target_dtype"),
    [
        (torch.float32, torch.float64),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float64, torch.float32),
    ],
)
def test_the_loss_dtype_is_torchs_for_mixed_probability_targets(logits_dtype, target_dtype, reduction, backend):
    """torch promotes the loss with a floating target's dtype; the gradient keeps the logits'."""
    if backend == "triton" and logits_dtype == torch.float64:
        pytest.skip("the Triton kernels take float32, float16 and bfloat16 logits")
    logits, _, probabilities = _case()
    logits = logits.to(logits_dtype).requires_grad_()
    target = probabilities.to(target_dtype)
    expected = F.cross_entropy(logits.detach().cpu(), target.cpu(), reduction=reduction)
    loss = xt.cross_entropy(logits, target, reduction=reduction, backend=backend)
    assert loss.dtype == expected.dtype
    torch.testing.assert_close(loss.detach().cpu().double(), expected.double(), rtol=1e-2, atol=1e-2)
    loss.sum().backward()
    assert logits.grad.dtype == logits_dtype


def test_the_binary_loss_dtype_is_torchs():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    target = (torch.rand(4, 6, generator=torch.Generator().manual_seed(6)) > 0.5).double()
    expected = F.binary_cross_entropy_with_logits(logits, target)
    loss = xt.binary_cross_entropy_with_logits(logits, target)
    assert loss.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_under_compile_inplace_backward_on_a_leaf_is_not_refused_the_custom_ops_write_no_logits():
    logits, labels, _ = _case()
    leaf = logits.cpu().clone().requires_grad_()
    compiled = torch.compile(lambda z, y: xt.cross_entropy(z, y, inplace_backward=True), fullgraph=True)
    compiled(leaf, labels.cpu()).backward()
    expected = torch.func.grad(lambda z: F.cross_entropy(z, labels.cpu()))(logits.cpu())
    torch.testing.assert_close(leaf.grad, expected)
    torch.testing.assert_close(leaf.detach(), logits.cpu())  # the logits kept their values


def test_a_modules_options_come_from_its_attributes_its_class_or_the_defaults():
    """CrossEntropyLoss reads its options on every call (from the instance, no AttributeError for
    the linear-only fields): a changed attribute takes effect, and a subclass may define one as a
    property."""
    from xentkit.torch.modules import _loss_options_of

    logits, labels, _ = _case()
    logits, labels = logits.cpu(), labels.cpu()
    criterion = xt.CrossEntropyLoss(label_smoothing=0.1)
    options = _loss_options_of(criterion)
    assert options.label_smoothing == 0.1 and options.chunk_size is None and options.accumulate_in_float32
    criterion.label_smoothing = 0.3
    torch.testing.assert_close(criterion(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.3))

    class Scheduled(xt.CrossEntropyLoss):
        @property
        def z_loss(self):
            return 1e-2

        @z_loss.setter
        def z_loss(self, value):
            pass

    scheduled = Scheduled()
    assert _loss_options_of(scheduled).z_loss == 1e-2
    expected = xt.cross_entropy(logits, labels, z_loss=1e-2)
    torch.testing.assert_close(scheduled(logits, labels), expected)


def test_a_promoted_loss_is_rounded_once_not_through_the_logits_dtype():
    """float16 logits with float32 targets give a float32 loss: computed in float32 and rounded
    once, never first to float16 (which overflows past 65504 and loses digits)."""
    logits = torch.zeros(4, 3, dtype=torch.float16)
    logits[:, 0] = -30000.0
    probabilities = torch.zeros(4, 3)
    probabilities[:, 0] = 1.0
    exact = 4 * (30000.0 + np.log(2.0 + np.exp(-30000.0)))  # Σ (lse − z_0), here 4·(30000 + log 2)
    loss = xt.cross_entropy(logits, probabilities, reduction="sum")
    assert loss.dtype == torch.float32
    np.testing.assert_allclose(loss.item(), exact, rtol=1e-6)
    big = torch.full((3000, 30), 20.0, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NumPy overflow warning leaks out either
        binary = xt.binary_cross_entropy_with_logits(big, torch.zeros(3000, 30), reduction="sum")
    assert binary.dtype == torch.float32
    np.testing.assert_allclose(binary.item(), 3000 * 30 * (20.0 + np.log1p(np.exp(-20.0))), rtol=1e-6)


@pytest.mark.parametrize("logits_dtype", [torch.float16, torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("target_dtype", [torch.float16, torch.float32, torch.float64, torch.bfloat16])
def test_the_binary_loss_has_the_targets_dtype_as_torchs(logits_dtype, target_dtype):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, generator=generator).to(logits_dtype)
    target = torch.rand(4, 6, generator=generator).to(target_dtype)
    expected = F.binary_cross_entropy_with_logits(logits, target)
    loss = xt.binary_cross_entropy_with_logits(logits, target)
    assert loss.dtype == expected.dtype == target_dtype
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target_requires_grad", [False, True], ids=["kernel", "torch ops"])
def test_the_binary_mean_of_no_element_is_zero_on_every_path(dtype, target_requires_grad):
    """(a target that requires grad takes the torch ops, whose empty mean had come back float32
    for half dtypes: a review)"""
    logits = torch.randn(0, 4).to(dtype).requires_grad_()
    target = torch.rand(0, 4).to(dtype).requires_grad_(target_requires_grad)
    loss = xt.binary_cross_entropy_with_logits(logits, target)
    assert loss.item() == 0.0 and loss.dtype == dtype
    loss.backward()
    assert logits.grad.shape == (0, 4)


def _fake_steps():
    """One training step of each loss, its operands made inside the caller's FakeTensorMode."""
    def logits():
        return torch.empty(300, 400, requires_grad=True)

    def labels():
        return torch.empty(300, dtype=torch.long)

    def linear():
        return torch.empty(300, 16, requires_grad=True), torch.empty(400, 16, requires_grad=True)

    def step(loss, *operands):
        loss.sum().backward()
        return [operand.grad.shape for operand in operands]

    def cross_entropy():
        x = logits()
        return step(xt.cross_entropy(x, labels(), label_smoothing=0.1), x)

    def module():
        x = logits()
        return step(xt.CrossEntropyLoss(weight=torch.ones(400))(x, labels()), x)

    def nll():
        x = logits()
        return step(xt.nll_loss(x, labels()), x)

    def binary():
        x = logits()
        return step(xt.binary_cross_entropy_with_logits(x, torch.empty(300, 400)), x)

    def log_probs():
        x = logits()
        log_p, entropy = xt.log_probs(x, labels(), return_entropy=True)
        return step(log_p + entropy, x)

    def linear_ce():
        h, w = linear()
        return step(xt.linear_cross_entropy(h, w, labels()), h, w)

    def linear_log_probs():
        h, w = linear()
        return step(xt.linear_log_probs(h, w, labels(), chunk_size=64), h, w)

    return [cross_entropy, module, nll, binary, log_probs, linear_ce, linear_log_probs]


@pytest.mark.parametrize("step", _fake_steps(), ids=lambda step: step.__name__)
def test_a_training_step_runs_on_fake_tensors(step):
    """Memory and FLOP estimators run a step under FakeTensorMode: shapes without values. The
    label checks (which read the labels) and the chunks' skip of ignored rows are left out there,
    as on meta tensors; before, a DataDependentOutputException or a real cached tensor beside
    fake ones stopped every loss. The gradients get their operands' shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        shapes = step()
    assert shapes and all(len(shape) == 2 for shape in shapes)


def test_linear_log_probs_backward_on_meta_tensors():
    """The chunks' skip of all-ignored chunks reads the mask: not on meta tensors (before,
    'Cannot copy out of meta tensor')."""
    h = torch.randn(300, 16, device="meta", requires_grad=True)
    w = torch.randn(400, 16, device="meta", requires_grad=True)
    y = torch.randint(0, 400, (300,), device="meta")
    xt.linear_log_probs(h, w, y, chunk_size=64).sum().backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape and w.grad.device.type == "meta"


def _forms_keeping_gradients():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(300, 400, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 400, (300,), generator=generator)
    hidden = torch.randn(300, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(400, 16, generator=generator, dtype=torch.float64)
    binary_target = torch.rand(300, 400, generator=generator, dtype=torch.float64)
    return [
        ("cross_entropy", logits, lambda z: xt.cross_entropy(z, labels), (300, 400)),
        ("binary", logits, lambda z: xt.binary_cross_entropy_with_logits(z, binary_target), (300, 400)),
        ("linear", hidden, lambda h: xt.linear_cross_entropy(h, weight.requires_grad_(), labels), (400, 16)),
        ("vocab_parallel", logits, lambda z: xt.vocab_parallel_cross_entropy(z, labels), (300, 400)),
    ]


@pytest.mark.parametrize(
    ("name", "operand", "loss", "shape"), _forms_keeping_gradients(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_gradients_kept_from_forward_are_saved_tensors(name, operand, loss, shape):
    """The gradients forward computes are kept as saved tensors (``_bridge.keep_for_backward``),
    so torch's saved-tensor hooks reach them: a non-reentrant checkpoint drops them after forward
    and recomputes them (before, they stayed on the autograd context from forward to backward, a
    logits-sized buffer that torch's loss does not hold there), and save_on_cpu offloads them.
    Values and gradients are unchanged, under the hooks and under the checkpoint."""
    from torch.utils.checkpoint import checkpoint

    def run(wrapper):
        x = operand.clone().requires_grad_()
        value = wrapper(lambda: loss(x))
        value.backward()
        return value.detach(), x.grad

    want = run(lambda call: call())
    packed = []

    def through_hooks(call):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(tuple(t.shape)) or t, lambda t: t):
            return call()

    got = run(through_hooks)
    assert any(shape_ == shape for shape_ in packed), packed
    checkpointed = run(lambda call: checkpoint(call, use_reentrant=False))
    for result in (got, checkpointed):
        torch.testing.assert_close(result[0], want[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(result[1], want[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda xt: xt.cross_entropy(np.zeros((3, 4), np.float32), torch.zeros(3, dtype=torch.long)),
         r"^input must be a torch.Tensor, got an array of dtype float32 and shape \(3, 4\); torch.from_numpy"),
        (lambda xt: xt.cross_entropy(torch.zeros(3, 4), [0, 1, 2]), r"^target must be a torch.Tensor, got list"),
        (lambda xt: xt.cross_entropy(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), weight=[1.0] * 4),
         r"^weight must be a torch.Tensor or None, got list"),
        (lambda xt: xt.CrossEntropyLoss()(np.zeros((3, 4), np.float32), torch.zeros(3, dtype=torch.long)),
         r"^input must be a torch.Tensor"),
        (lambda xt: xt.nll_loss(np.zeros((3, 4), np.float32), torch.zeros(3, dtype=torch.long)),
         r"^input must be a torch.Tensor"),
        (lambda xt: xt.nll_loss(torch.zeros(3, 4), [0, 1, 2]), r"^target must be a torch.Tensor"),
        (lambda xt: xt.binary_cross_entropy_with_logits(np.zeros(3, np.float32), torch.zeros(3)),
         r"^input must be a torch.Tensor"),
        (lambda xt: xt.binary_cross_entropy_with_logits(torch.zeros(3), np.zeros(3, np.float32)),
         r"^target must be a torch.Tensor"),
        (lambda xt: xt.binary_cross_entropy_with_logits(torch.zeros(3), torch.zeros(3), pos_weight=[1.0]),
         r"^pos_weight must be a torch.Tensor or None, got list"),
        (lambda xt: xt.linear_cross_entropy(torch.zeros(3, 5), torch.zeros(4, 5), [0, 1, 2]),
         r"^target must be a torch.Tensor, got list"),
    ],
)
def test_an_argument_that_is_not_a_tensor_is_a_type_error_naming_it(call, message):
    """As torch's own losses raise; an array or a list reached attribute lookups deep in the paths
    (AttributeError: 'str' object has no attribute 'type')."""
    with pytest.raises(TypeError, match=message):
        call(xt)


def test_a_bad_label_is_an_index_error_as_torchs_on_every_path():
    for logits in (torch.randn(8, 10), torch.randn(800, 1000)):  # torch's small kernel, xentkit's
        for call in (xt.cross_entropy, xt.nll_loss):
            with pytest.raises(IndexError, match=r"^target has label (1000|10) at position \(0,\)") as caught:
                call(logits, torch.full((logits.shape[0],), logits.shape[1]))
            assert isinstance(caught.value, ValueError)


def test_a_tensor_on_another_device_is_a_value_error_naming_it():
    """Each tensor argument on the input's device, else a ValueError naming it and both devices
    (torch's RuntimeError came from inside its ops, naming neither); the meta device stands in for
    a second device here."""
    logits, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    meta = torch.device("meta")
    cases = [
        (lambda: xt.cross_entropy(logits.to(meta), labels), "target must be on the input's device meta, got cpu"),
        (lambda: xt.cross_entropy(logits, labels.to(meta)), "target must be on the input's device cpu, got meta"),
        (lambda: xt.cross_entropy(logits, labels, weight=torch.ones(4, device=meta)), "weight must be on the input's device cpu, got meta"),
        (lambda: xt.nll_loss(logits, labels.to(meta)), "target must be on the input's device cpu, got meta"),
        (lambda: xt.CrossEntropyLoss()(logits, labels.to(meta)), "target must be on the input's device cpu, got meta"),
        (lambda: xt.binary_cross_entropy_with_logits(logits, torch.rand(5, 4), pos_weight=torch.ones(4, device=meta)),
         "pos_weight must be on the input's device cpu, got meta"),
        (lambda: xt.linear_cross_entropy(logits, torch.randn(3, 4), labels.to(meta)), "target must be on the input's device cpu, got meta"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            call()
    with pytest.raises(TypeError, match=r"^pos_weight must be a torch.Tensor or None, got list"):
        xt.binary_cross_entropy_with_logits(logits, torch.rand(5, 4), pos_weight=[1.0])
    # a 0-d CPU weight or pos_weight is a scalar beside tensors on any device, as torch takes it
    on_meta, target = logits.to(meta), torch.rand(5, 4, device=meta)
    for options in ({"pos_weight": torch.tensor(2.0)}, {"weight": torch.tensor(0.5)}):
        got = xt.binary_cross_entropy_with_logits(on_meta, target, **options)
        assert got.device == meta and got.shape == F.binary_cross_entropy_with_logits(on_meta, target, **options).shape
