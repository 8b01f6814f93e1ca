"""Batched backward on xentkit's own kernels: ``torch.autograd.grad(..., is_grads_batched=True)``
and the tools built on it (``jacobian(vectorize=True)``, ``gradcheck(check_batched_grad=True)``)
give torch's gradients and xentkit's own non-batched ones, for every loss and reduction (a review
found them crashing: an in-place product, ``item`` and NumPy views of the batched upstream
gradient). The ``kernel_path`` fixture keeps small problems on xentkit's kernels. Also the
decision of ``_bridge.is_one`` not to read a value while a CUDA graph is being captured."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import xentkit.torch as xt  # noqa: E402
from xentkit.torch import _bridge  # noqa: E402
from xentkit.torch import distributed as vp  # noqa: E402

REDUCTIONS = ["none", "mean", "sum"]
BATCH = 3
F64 = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batched_vjp(output: torch.Tensor, inputs: tuple[torch.Tensor, ...], upstream: torch.Tensor) -> tuple:
    return torch.autograd.grad(output, inputs, upstream, is_grads_batched=True, retain_graph=True)


def _looped_vjp(output: torch.Tensor, inputs: tuple[torch.Tensor, ...], upstream: torch.Tensor) -> tuple:
    """The batched answer one upstream gradient at a time (xentkit's eager backward)."""
    rows = [torch.autograd.grad(output, inputs, g, retain_graph=True) for g in upstream]
    return tuple(torch.stack(parts) for parts in zip(*rows, strict=True))


def _assert_all_close(actual: tuple, expected: tuple, **tolerance: float) -> None:
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, msg=lambda m, i=index: f"input {i}: {m}", **tolerance)


def _check(ours, theirs, inputs: tuple[torch.Tensor, ...], function_name: str, seed: int = 0) -> None:
    """``ours`` against ``theirs`` (torch) on ``inputs`` (float64): the batched gradients equal the
    loop's and torch's; jacobian(vectorize=True) equals torch's; gradcheck with batched grads
    passes."""
    output = ours(*inputs)
    assert function_name in type(output.grad_fn).__name__, type(output.grad_fn).__name__  # (xentkit's path)
    upstream = torch.randn((BATCH, *output.shape), generator=_generator(seed), dtype=F64)
    batched = _batched_vjp(output, inputs, upstream)
    _assert_all_close(batched, _looped_vjp(output, inputs, upstream))
    _assert_all_close(batched, _batched_vjp(theirs(*inputs), inputs, upstream))
    jacobians = torch.autograd.functional.jacobian(ours, inputs, vectorize=True)
    expected = torch.autograd.functional.jacobian(theirs, inputs, vectorize=True)
    _assert_all_close(jacobians, expected)
    assert torch.autograd.gradcheck(ours, inputs, check_batched_grad=True)


def _classification_problem(seed: int = 1):
    generator = _generator(seed)
    logits = torch.randn(6, 5, generator=generator, dtype=F64, requires_grad=True)
    target = torch.tensor([0, 4, -100, 2, 1, 3])
    weight = torch.rand(5, generator=generator, dtype=F64) + 0.5
    probabilities = torch.softmax(torch.randn(6, 5, generator=generator, dtype=F64), dim=1)
    return logits, target, weight, probabilities


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("targets", ["labels", "probabilities"])
def test_cross_entropy(reduction, targets, kernel_path):
    logits, labels, weight, probabilities = _classification_problem()
    target = labels if targets == "labels" else probabilities
    _check(
        lambda z: xt.cross_entropy(z, target, weight, reduction=reduction, label_smoothing=0.1),
        lambda z: F.cross_entropy(z, target, weight, reduction=reduction, label_smoothing=0.1),
        (logits,), "_CrossEntropyFunction",
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_of_spatial_logits(reduction, kernel_path):
    """``(N, C, d)`` logits: "none"'s upstream is broadcast over the class axis 1."""
    generator = _generator(2)
    logits = torch.randn(3, 4, 2, generator=generator, dtype=F64, requires_grad=True)
    target = torch.tensor([[0, 3], [-100, 1], [2, 2]])
    _check(
        lambda z: xt.cross_entropy(z, target, reduction=reduction),
        lambda z: F.cross_entropy(z, target, reduction=reduction),
        (logits,), "_CrossEntropyFunction",
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss(reduction, kernel_path):
    logits, target, weight, _ = _classification_problem(3)
    log_probs = torch.log_softmax(logits, 1).detach().requires_grad_()
    _check(
        lambda z: xt.nll_loss(z, target, weight, reduction=reduction),
        lambda z: F.nll_loss(z, target, weight, reduction=reduction),
        (log_probs,), "_NllLossFunction",
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_with_logits(reduction):
    logits, _, weight, probabilities = _classification_problem(4)
    pos_weight = weight.flip(0)
    _check(
        lambda z: xt.binary_cross_entropy_with_logits(z, probabilities, weight, reduction=reduction, pos_weight=pos_weight),
        lambda z: F.binary_cross_entropy_with_logits(z, probabilities, weight, reduction=reduction, pos_weight=pos_weight),
        (logits,), "_BinaryCrossEntropyWithLogitsFunction",
    )


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_the_reviews_reproducer_above_small_max_logits(reduction):
    """300 × 300 float32 logits (above ``SMALL_MAX_LOGITS``, no monkeypatch): was a vmap error."""
    generator = _generator(5)
    logits = torch.randn(300, 300, generator=generator, requires_grad=True)
    target = torch.randint(0, 300, (300,), generator=generator)
    upstream = torch.eye(300)[:BATCH] if reduction == "none" else torch.ones(BATCH)
    loss = xt.cross_entropy(logits, target, reduction=reduction)
    assert type(loss.grad_fn).__name__.startswith("_CrossEntropyFunction")
    (ours,) = _batched_vjp(loss, (logits,), upstream)
    (theirs,) = _batched_vjp(F.cross_entropy(logits, target, reduction=reduction), (logits,), upstream)
    assert ours.shape == (BATCH, 300, 300)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inplace_backward(dtype, kernel_path):
    """The gradient kept over the logits (float32), or computed in backward (float16): the
    batched product is out of place, at upstream ones for float16 (one rounding more)."""
    logits, target, *_ = _classification_problem(6)
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}
    upstream = torch.randn(BATCH, 6, generator=_generator(7))
    results = []
    for inplace in (True, False):
        source = logits.detach().to(dtype).requires_grad_()
        z = source * 1  # (not a leaf: in place is refused on one)
        loss = xt.cross_entropy(z, target, reduction="none", inplace_backward=inplace)
        results.append(_batched_vjp(loss, (source,), upstream.to(loss.dtype))[0].float())
    torch.testing.assert_close(results[0], results[1], **tolerance)


def _linear_problem(seed: int = 8):
    generator = _generator(seed)
    hidden = torch.randn(9, 4, generator=generator, dtype=F64, requires_grad=True)
    head = torch.randn(7, 4, generator=generator, dtype=F64, requires_grad=True)
    bias = torch.randn(7, generator=generator, dtype=F64, requires_grad=True)
    target = torch.tensor([0, 6, -100, 2, 1, 3, 5, 4, 6])
    return hidden, head, bias, target


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy(reduction):
    hidden, head, bias, target = _linear_problem()
    _check(
        lambda x, w, b: xt.linear_cross_entropy(
            x, w, target, linear_bias=b, reduction=reduction, chunk_size=4, label_smoothing=0.1
        ),
        lambda x, w, b: F.cross_entropy(F.linear(x, w, b), target, reduction=reduction, label_smoothing=0.1),
        (hidden, head, bias), "_LinearCrossEntropyFunction",
    )


def _reference_log_probs(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> tuple:
    """log p(y), H, lse of softmax(logits / T) in torch ops (0 at ignored positions)."""
    scaled = logits / temperature
    log_p = torch.log_softmax(scaled, -1)
    valid = target != -100
    picked = log_p.gather(-1, torch.where(valid, target, 0)[..., None])[..., 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    lse = torch.logsumexp(scaled, -1)
    return tuple(torch.where(valid, value, 0.0) for value in (picked, entropy, lse))


# which outputs the tested function returns: log p alone, H alone, all three stacked
OUTPUTS = {
    "log_p": lambda outputs: outputs[0],
    "entropy": lambda outputs: outputs[1],
    "all": lambda outputs: torch.stack(outputs, -1),
}


@pytest.mark.parametrize("outputs", list(OUTPUTS))
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_log_probs(outputs, backend):
    pick = OUTPUTS[outputs]
    logits = torch.randn(3, 3, 7, generator=_generator(9), dtype=F64, requires_grad=True)
    target = torch.tensor([[0, 6, -100], [2, 1, 3], [5, 4, 6]])
    _check(
        lambda z: pick(xt.log_probs(z, target, temperature=0.7, return_entropy=True, return_lse=True, backend=backend)),
        lambda z: pick(_reference_log_probs(z, target, 0.7)),
        (logits,), "" if outputs == "all" else "_LogProbsFunction",
    )


@pytest.mark.parametrize("outputs", list(OUTPUTS))
def test_linear_log_probs(outputs):
    pick = OUTPUTS[outputs]
    hidden, head, bias, target = _linear_problem(10)
    _check(
        lambda x, w, b: pick(xt.linear_log_probs(
            x, w, target, linear_bias=b, temperature=0.7, return_entropy=True, return_lse=True, chunk_size=4,
        )),
        lambda x, w, b: pick(_reference_log_probs(F.linear(x, w, b), target, 0.7)),
        (hidden, head, bias), "" if outputs == "all" else "_LinearLogProbsFunction",
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_on_the_triton_kernels_under_the_interpreter(reduction):
    """``cross_entropy`` and ``linear_cross_entropy`` with ``backend="triton"`` (CPU tensors:
    Triton's interpreter, float32)."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")
    generator = _generator(11)
    logits = torch.randn(5, 6, generator=generator, requires_grad=True)
    target = torch.tensor([0, 1, -100, 3, 5])
    weight = torch.rand(6, generator=generator) + 0.5
    hidden = torch.randn(5, 3, generator=generator, requires_grad=True)
    head = torch.randn(6, 3, generator=generator, requires_grad=True)
    cases = [
        ((logits,), xt.cross_entropy(logits, target, weight, reduction=reduction, backend="triton", label_smoothing=0.1),
         F.cross_entropy(logits, target, weight, reduction=reduction, label_smoothing=0.1)),
        ((hidden, head), xt.linear_cross_entropy(hidden, head, target, reduction=reduction, backend="triton", chunk_size=2),
         F.cross_entropy(hidden @ head.T, target, reduction=reduction)),
    ]
    for inputs, ours, theirs in cases:
        assert "Triton" in type(ours.grad_fn).__name__
        upstream = torch.randn((BATCH, *ours.shape), generator=generator)
        batched = _batched_vjp(ours, inputs, upstream)
        _assert_all_close(batched, _batched_vjp(theirs, inputs, upstream), atol=1e-5, rtol=1e-4)
        _assert_all_close(batched, _looped_vjp(ours, inputs, upstream), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vocab_parallel_forms_in_a_world_of_one(reduction):
    """The logits form (and the linear one for "mean"/"sum") scale what forward kept; the linear
    form's "none" and the log-probabilities all-reduce a gradient computed in backward, which a
    batch cannot be: a RuntimeError naming the loss and what to do instead."""
    logits, target, *_ = _classification_problem(12)
    hidden, head, _, linear_target = _linear_problem(13)
    _check(
        lambda z: vp.vocab_parallel_cross_entropy(z, target, reduction=reduction),
        lambda z: F.cross_entropy(z, target, reduction=reduction),
        (logits,), "_VocabParallelCrossEntropyFunction",
    )

    def linear(x, w):
        return vp.vocab_parallel_linear_cross_entropy(x, w, linear_target, reduction=reduction)

    if reduction != "none":
        _check(linear, lambda x, w: F.cross_entropy(F.linear(x, w), linear_target, reduction=reduction),
               (hidden, head), "_VocabParallelLinearCrossEntropyFunction")
        return
    loss = linear(hidden, head)
    with pytest.raises(RuntimeError, match=r"vocab_parallel_linear_cross_entropy with reduction='none' has "
                                           r"no batched backward .*is_grads_batched.*loop"):
        _batched_vjp(loss, (hidden, head), torch.randn(BATCH, *loss.shape, dtype=F64))
    log_p = vp.vocab_parallel_linear_log_probs(hidden, head, linear_target)
    with pytest.raises(RuntimeError, match=r"vocab_parallel_linear_log_probs has no batched backward .*loop"):
        _batched_vjp(log_p, (hidden, head), torch.randn(BATCH, *log_p.shape, dtype=F64))


def test_torch_func_vmap_over_a_backward_of_a_graph_built_outside(kernel_path):
    """The other batched upstream: functorch's, from ``torch.func.vmap`` around autograd.grad."""
    logits, target, *_ = _classification_problem(14)
    for reduction in ("none", "mean"):
        loss = xt.cross_entropy(logits, target, reduction=reduction)
        exact = F.cross_entropy(logits, target, reduction=reduction)
        upstream = torch.randn((BATCH, *loss.shape), generator=_generator(15), dtype=F64)
        ours = torch.func.vmap(lambda g, out=loss: torch.autograd.grad(out, logits, g, retain_graph=True)[0])(upstream)
        theirs = torch.func.vmap(lambda g, out=exact: torch.autograd.grad(out, logits, g, retain_graph=True)[0])(upstream)
        torch.testing.assert_close(ours, theirs)


def test_vectorized_hessian_raises_the_second_derivative_error(kernel_path):
    """As ``hessian`` without vectorize: xentkit's kernels have no second derivative."""
    logits, target, *_ = _classification_problem(16)
    with pytest.raises(RuntimeError, match=r"xentkit\.torch\.cross_entropy has no second derivative"):
        torch.autograd.functional.hessian(lambda z: xt.cross_entropy(z, target), logits, vectorize=True)


def test_the_batched_look_is_one_flag_per_upstream_gradient():
    plain = torch.ones(())
    assert not _bridge.batched_backward(plain, None)
    seen = []

    def record(gradient):
        seen.append(_bridge.batched_backward(gradient))
        return gradient

    logits = torch.randn(3, requires_grad=True)
    logits.register_hook(record)
    torch.autograd.grad(logits * 2, logits, torch.eye(3), is_grads_batched=True)
    assert seen == [True]


# ---------------------------------------------------------------------------------------------
# Problem 2: no value read while a CUDA graph is being captured
# ---------------------------------------------------------------------------------------------


def test_a_cpu_value_is_read_without_asking_cuda(monkeypatch):
    def refuse():
        raise AssertionError("torch.cuda asked about a CPU tensor")

    monkeypatch.setattr(torch.cuda, "is_available", refuse)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", refuse)
    assert _bridge.value_readable_now(torch.device("cpu"), False)
    assert _bridge.is_one(torch.ones(()), read_on_device=True)
    assert not _bridge.is_one(torch.full((), 2.0), read_on_device=True)
    assert not _bridge.is_one(torch.ones(2), read_on_device=True)
    assert not _bridge.value_readable_now(torch.device("cuda"), False)  # (never asked: no read wanted)


@pytest.mark.parametrize("capturing", [True, False])
def test_a_cuda_value_is_not_read_while_the_stream_captures(monkeypatch, capturing):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    assert _bridge.value_readable_now(torch.device("cuda", 0), True) is not capturing
    assert _bridge.value_readable_now(torch.device("cpu"), True)  # (the CPU: always)


def test_no_cuda_means_no_capture(monkeypatch):
    def refuse():
        raise AssertionError("asked about a capture without CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", refuse)
    assert _bridge.value_readable_now(torch.device("cuda"), True)
