"""Two things users hit in training loops: a gradient changed in place after a backward with
``retain_graph=True`` must not corrupt the next backward, and the losses compile with
``torch.compile(fullgraph=True)`` (no graph break at the option checks)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import xentkit.torch as xt  # noqa: E402
from xentkit.torch import distributed  # noqa: E402


def _cases():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    head = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 1, 2, 2])
    bits = torch.rand(5, 4, generator=generator, dtype=torch.float64)
    return {
        "cross_entropy": (logits, lambda: xt.cross_entropy(logits, target)),
        "bce_with_logits": (logits, lambda: xt.binary_cross_entropy_with_logits(logits, bits)),
        "linear_cross_entropy_input": (hidden, lambda: xt.linear_cross_entropy(hidden, head, target)),
        "linear_cross_entropy_weight": (head, lambda: xt.linear_cross_entropy(hidden, head, target)),
        "vocab_parallel": (logits, lambda: distributed.vocab_parallel_cross_entropy(logits, target)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_changing_a_retained_gradient_in_place_leaves_the_next_backward_intact(name):
    leaf, loss_of = _cases()[name]
    loss = loss_of()
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    expected = first.clone()
    first.mul_(0)
    (second,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    assert expected.abs().sum() > 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_losses_compile_with_fullgraph(reduction):
    def step(x, w, y):
        logits = x @ w.t()
        loss = xt.cross_entropy(logits, y, reduction=reduction, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
        loss = loss + xt.linear_cross_entropy(x, w, y, reduction=reduction)
        return loss.sum()

    compiled = torch.compile(step, fullgraph=True)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, generator=generator, requires_grad=True)
    w = torch.randn(5, 3, generator=generator, requires_grad=True)
    y = torch.tensor([0, 4, -100, 2, 1, 3])
    loss = compiled(x, w, y)
    loss.backward()
    grads = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    expected = step(x, w, y)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads, (x.grad, w.grad))


def test_linear_module_is_a_drop_in_for_torchs_including_out_features():
    if not hasattr(torch.nn, "LinearCrossEntropyLoss"):
        pytest.skip("this torch has no nn.LinearCrossEntropyLoss")
    generator = torch.Generator().manual_seed(8)
    inputs = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 5, (4, 3), generator=generator)
    results = []
    for module_class in (xt.LinearCrossEntropyLoss, torch.nn.LinearCrossEntropyLoss):
        torch.manual_seed(0)
        head = module_class(6, 5, out_features=(3,), bias=True, dtype=torch.float64, label_smoothing=0.1)
        loss = head(inputs, target)
        loss.backward()
        results.append((head, loss.detach(), head.linear.weight.grad))
    (ours, loss, grad), (theirs, expected, expected_grad) = results
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_options_compile_when_dynamo_passes_them_as_symbolic_floats():
    """torch.compile(dynamic=True) turns float arguments into symbolic floats; the option checks
    use comparisons only, so they trace (math.isfinite refused them) and a new value recompiles
    nothing, yet gives the new loss."""

    def step(x, y, strength):
        return xt.cross_entropy(x, y, z_loss=strength, label_smoothing=strength, softcap=30.0 + strength)

    compiled = torch.compile(step, dynamic=True, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(5), requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    for strength in (0.1, 0.2):
        torch.testing.assert_close(compiled(x, y, strength), step(x, y, strength))


def test_a_compiled_loss_is_not_recompiled_by_other_calls_options():
    """The options cache of eager calls is not part of a compiled graph's guards: eager calls
    with new options elsewhere in the process recompile nothing (before, each did, and
    fullgraph=True failed at the eighth)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(6), requires_grad=True)
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(7))
    step = torch.compile(lambda x, y: xt.cross_entropy(x, y), fullgraph=True, backend="eager")
    module = torch.compile(xt.CrossEntropyLoss(z_loss=1e-4), fullgraph=True, backend="eager")
    for epoch in range(10):
        step(x, y).backward()
        module(x, y).backward()
        xt.cross_entropy(x.detach(), y, label_smoothing=0.01 * epoch)  # eager, new options each time
        xt.CrossEntropyLoss(label_smoothing=0.01 * epoch)(x.detach(), y)
    assert counters["stats"]["unique_graphs"] == 2


def test_one_sample_with_class_weights_compiles():
    """A ``(C,)`` input with class weights: the weight of its 0-d target is picked without
    reading the target's value (no data-dependent branch in the graph)."""
    x = torch.randn(5, generator=torch.Generator().manual_seed(9), dtype=torch.float64, requires_grad=True)
    target, weight = torch.tensor(1), torch.rand(5, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    expected = torch.nn.functional.cross_entropy(x, target, weight)
    for loss in (
        torch.compile(xt.cross_entropy, fullgraph=True, backend="aot_eager")(x, target, weight),
        torch.compile(xt.CrossEntropyLoss(weight=weight), fullgraph=True)(x, target),
        torch.compile(xt.nll_loss, fullgraph=True, backend="aot_eager")(torch.log_softmax(x, 0), target, weight),
    ):
        torch.testing.assert_close(loss, expected)


def test_binary_cross_entropy_takes_floating_targets_only():
    """As torch (whose error depends on the path); xentkit's says which argument and why."""
    with pytest.raises(TypeError, match=r"^target must be a floating-point tensor .* got dtype int64"):
        xt.binary_cross_entropy_with_logits(torch.randn(4, 5), torch.ones(4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="got dtype bool"):
        xt.BCEWithLogitsLoss()(torch.randn(4, 5), torch.ones(4, 5, dtype=torch.bool))
