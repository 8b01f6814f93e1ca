"""Unusual input types from a review of every argument slot (session 27): each came through
silently wrong, or failed from inside torch naming no argument."""

from __future__ import annotations

import numpy as np
import pytest

import xentkit

LOGITS = np.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]])


@pytest.mark.parametrize("order", [">", "<"])
@pytest.mark.parametrize("label", [2**64 - 100, 2**64 - 1])
@pytest.mark.parametrize(
    "call",
    [
        lambda t: xentkit.cross_entropy(LOGITS, t, reduction="none"),
        lambda t: xentkit.nll_loss(LOGITS, t),
        lambda t: xentkit.perplexity(LOGITS, t),
        lambda t: xentkit.log_probs(LOGITS, t),
    ],
    ids=["cross_entropy", "nll_loss", "perplexity", "log_probs"],
)
def test_uint64_labels_beyond_int64_are_refused_in_either_byte_order(order, label, call):
    """A big-endian uint64 label of 2**64 − 100 was cast to int64 −100 (ignore_index: the row
    silently skipped); the check compared the dtype with np.uint64, which '>u8' is not."""
    target = np.array([label, 0], dtype=f"{order}u8")
    with pytest.raises(ValueError, match=f"target has label {label} at position \\(0,\\), too large"):
        call(target)


@pytest.mark.parametrize("name", ["ignore_index", "axis", "label_smoothing"])
def test_a_masked_option_value_is_refused_not_read(name):
    """A fully masked 0-d array in an option slot was read as its hidden value (ignore_index 0)."""
    value = np.ma.array(1 if name != "label_smoothing" else 0.1, mask=True)
    with pytest.raises(TypeError, match=f"^{name} must be .*got a masked value"):
        xentkit.cross_entropy(LOGITS, [2, 0], **{name: value})
    unmasked = np.ma.array(0, mask=False)  # nothing masked: its data
    assert xentkit.cross_entropy(LOGITS, [2, 0], ignore_index=unmasked) == xentkit.cross_entropy(
        LOGITS, [2, 0], ignore_index=0
    )


torch = pytest.importorskip("torch")
import xentkit.torch as xt  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("name", "factor"), [("weight", torch.full((5,), 2j)), ("pos_weight", torch.ones(5, dtype=torch.bool))])
def test_binary_factors_of_the_wrong_kind_are_refused_on_every_path(dtype, name, factor):
    """A target that requires grad sends the call to torch's ops: a complex weight lost its
    imaginary part there (loss 0, a warning only) or failed in torch's cast naming no argument,
    and a bool pos_weight was taken, where the kernel path refuses both."""
    x = torch.randn(5).to(dtype)
    for target in (torch.rand(5).to(dtype), torch.rand(5).to(dtype).requires_grad_()):
        with pytest.raises(TypeError, match=f"^{name} must be a numeric array, got a torch tensor of dtype"):
            xt.binary_cross_entropy_with_logits(x, target, **{name: factor})
    mask = torch.tensor([True, False, True, True, False])  # a bool weight masks, as torch
    expected = torch.nn.functional.binary_cross_entropy_with_logits(x.double(), target.detach().double(), mask.double())
    got = xt.binary_cross_entropy_with_logits(x, target, weight=mask)
    torch.testing.assert_close(got.double(), expected, rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=0)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: xt.CrossEntropyLoss(weight=np.ones(5)), TypeError, r"^weight must be a torch.Tensor or None, got an array.*from_numpy"),
        (lambda: xt.NLLLoss(weight=[1.0, 2.0]), TypeError, r"^weight must be a torch.Tensor or None, got list"),
        (lambda: xt.BCEWithLogitsLoss(pos_weight=[2.0]), TypeError, r"^pos_weight must be a torch.Tensor or None, got list"),
        (lambda: xt.BCEWithLogitsLoss(weight=torch.tensor([1j])), TypeError, r"^weight must be a numeric array"),
        (lambda: xt.BCEWithLogitsLoss(pos_weight=torch.tensor([True])), TypeError, r"^pos_weight must be a numeric array"),
        (lambda: xt.CrossEntropyLoss(label_smoothing=2), ValueError, r"^label_smoothing must be in \[0, 1\], got 2"),
        (lambda: xt.LinearCrossEntropyLoss(3, 4, label_smoothing=2), ValueError, r"^label_smoothing must be in \[0, 1\]"),
        (lambda: xt.LinearCrossEntropyLoss(3, 4, dtype=torch.int64), TypeError, r"^dtype must be a floating-point torch.dtype or None"),
        (lambda: xt.LinearCrossEntropyLoss(3, 4, dtype="float32"), TypeError, r"^dtype must be a floating-point torch.dtype or None, got str"),
        (lambda: xt.LinearCrossEntropyLoss(3, 4, dtype=torch.complex64), TypeError, r"^dtype must be a floating-point"),
    ],
)
def test_module_constructors_name_the_argument(make, error, message):
    """Torch's constructors raised from inside (a buffer assignment, torch.empty, a Parameter),
    naming no argument, or took a complex layer that every forward then refused."""
    with pytest.raises(error, match=message):
        make()


def test_module_constructors_still_take_what_torch_takes():
    assert xt.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0]))(torch.tensor([0.5]), torch.tensor([1.0])).item() == pytest.approx(0.9482, abs=1e-4)
    assert xt.LinearCrossEntropyLoss(3, 4, dtype=torch.float64).linear.weight.dtype == torch.float64
    assert torch.equal(xt.NLLLoss(weight=torch.ones(3)).weight, torch.ones(3))
    assert xt.CrossEntropyLoss(weight=torch.ones(3), label_smoothing=0.5).label_smoothing == 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shared", ["target", "weight"])
def test_inplace_backward_refuses_a_target_or_weight_in_the_logits_memory(dtype, shared):
    """The gradient would overwrite them while backward reads them: the error named ``out``, an
    argument xentkit.torch does not have (float16: at backward)."""
    logits = (torch.randn(300, 257) * 1).to(dtype).requires_grad_()
    z = logits * 1
    target = z.detach().float().softmax(1).to(dtype) if shared == "weight" else z.detach()
    kwargs = {"weight": z.detach()[0]} if shared == "weight" else {}
    if shared == "weight":
        target = torch.randint(0, 257, (300,))
    with pytest.raises(ValueError, match=f"^inplace_backward=True would write the gradient over logits that share memory with {shared}"):
        xt.cross_entropy(z, target, inplace_backward=True, **kwargs)
    other = z.detach().clone() if shared == "target" else target  # its own memory: taken
    kwargs = {"weight": z.detach()[0].clone().abs()} if shared == "weight" else {}
    loss = xt.cross_entropy(z, other, inplace_backward=True, **kwargs)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_bfloat16_cross_entropy_on_the_cpu_runs_the_kernels_on_a_widened_copy():
    """bfloat16 CPU logits are widened to float32 for the Numba kernels, which write the gradient
    over that copy (a memory review: torch's float32 ops held 4 and 6 times the logits' bytes):
    the loss is float64's rounded once to bfloat16, a confident row keeps its digits (torch's ops
    gave 0 for 6.17e-9), the user's logits are never written, and double backward raises."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(6)
    classes = 1100  # (64 rows: beyond SMALL_MAX_LOGITS; smaller calls stay on torch's ops)
    logits = (torch.randn(64, classes, generator=generator) * 3).bfloat16()
    logits[0] = float("-inf")  # a confident row among masked classes
    logits[0, :4] = torch.tensor([0.0, -20.0, -20.0, -20.0])
    target = torch.randint(0, classes, (64,), generator=generator)
    target[0], target[5] = 0, -100
    for kwargs in ({}, {"reduction": "none"}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"weight": torch.rand(classes, generator=generator).bfloat16()}):
        x = logits.clone().requires_grad_()
        z = x * 1  # (inplace_backward=True refuses a leaf)
        loss = xt.cross_entropy(z, target, inplace_backward=True, **kwargs)
        assert loss.dtype == torch.bfloat16
        assert type(loss.grad_fn.next_functions[0][0]).__name__ == "_CrossEntropyFunctionBackward"
        loss.sum().backward()
        assert torch.equal(z.detach(), logits)  # (in place over the float32 copy only)
        wide = logits.double().requires_grad_()
        wide_kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        expected = xt.cross_entropy(wide, target, **wide_kwargs)
        expected.sum().backward()
        torch.testing.assert_close(loss.double(), expected.detach().bfloat16().double(), rtol=0, atol=0)
        # (within one bfloat16 rounding of float64's gradient: float32's, rounded once)
        torch.testing.assert_close(x.grad.double(), wide.grad, rtol=2**-8, atol=1e-7 * wide.grad.abs().max().item())
    exact = torch.log1p(3 * torch.exp(torch.tensor(-20.0, dtype=torch.float64)))  # 6.1835e-9
    assert xt.cross_entropy(logits, target, reduction="none")[0].item() == exact.bfloat16().item()
    assert F.cross_entropy(logits.float(), target, reduction="none")[0].item() == 0.0  # (torch's float32 ops)
    assert logits.numel() > xt.functional.SMALL_MAX_LOGITS
    x = logits.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(xt.cross_entropy(x, target), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        gradient.square().sum().backward()
    # a probability target that requires grad: torch's ops, which differentiate it
    soft = torch.softmax(logits[1:].float(), 1).bfloat16().requires_grad_()
    xt.cross_entropy(logits[1:], soft).backward()
    assert soft.grad is not None and soft.grad.dtype == torch.bfloat16


def test_the_overlap_refusal_only_where_the_gradient_is_written_over_the_logits():
    """A target that requires grad (torch's ops run, writing nothing) or non-contiguous logits
    (the gradient gets a buffer of its own) share memory harmlessly: taken, as before the check
    (a review of the change found both refused)."""
    h = torch.rand(300, 514, requires_grad=True)
    z = h * 1
    loss = xt.cross_entropy(z[:, :257], z[:, 257:], inplace_backward=True)  # (the target's own memory)
    loss.backward()
    assert torch.isfinite(h.grad).all()
    y = torch.rand(300, 514, requires_grad=True)
    w = y * 1
    loss = xt.cross_entropy(w[:, :257], w[:, 257:].detach(), inplace_backward=True)
    loss.backward()
    expected = torch.nn.functional.cross_entropy(y.detach()[:, :257].double(), y.detach()[:, 257:].double())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)


def test_bfloat16_cpu_calls_name_their_own_dtypes_and_small_ones_stay_on_torchs_ops():
    """The widened path checks the layout of the operands as given (a bfloat16 target of a wrong
    shape was reported as float32); calls up to SMALL_MAX_LOGITS keep torch's ops (a kernel
    call's fixed cost)."""
    big = torch.randn(64, 1100).bfloat16()
    with pytest.raises(ValueError, match=r"got shape \(3, 5\) of dtype bfloat16$"):
        xt.cross_entropy(big, torch.rand(3, 5).bfloat16())
    with pytest.raises(ValueError, match=r"got shape \(3, 5\) of dtype bfloat16$"):
        xt.cross_entropy(big.float(), torch.rand(3, 5).bfloat16())
    small = torch.randn(64, 10).bfloat16().requires_grad_()
    loss = xt.cross_entropy(small, torch.zeros(64, dtype=torch.long))
    assert "_CrossEntropyFunction" not in type(loss.grad_fn).__name__
    assert all("_CrossEntropyFunction" not in type(f).__name__ for f, _ in loss.grad_fn.next_functions if f is not None)
