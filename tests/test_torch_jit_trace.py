"""``torch.jit.trace`` of models that use xentkit.torch (docs/torch.md, "TorchScript"): the traced
graph gives eager's losses and gradients, on inputs of another batch size too, traced with grad
mode on or off; the default trace check passes, on torch's kernel and on xentkit's autograd
Functions."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

import xentkit.torch as xt  # noqa: E402


def _losses():
    """(name, loss of (x, t) with a linear layer's weight w, t's kind)."""
    return [
        ("cross_entropy", lambda x, w, t: xt.cross_entropy(x @ w.T, t, label_smoothing=0.1, z_loss=1e-3), "labels"),
        ("binary_cross_entropy_with_logits", lambda x, w, t: xt.binary_cross_entropy_with_logits(x @ w.T, t), "probs"),
        # (the linear form had failed while tracing: its chunk size came from a traced size, a tensor)
        ("linear_cross_entropy", lambda x, w, t: xt.linear_cross_entropy(x, w, t, chunk_size=None), "labels"),
        ("log_probs", lambda x, w, t: xt.log_probs(x @ w.T, t).sum(), "labels"),
    ]


def _inputs(rows, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 5, (rows,), generator=generator), torch.rand(rows, 5, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("traced_without_grad", [False, True], ids=["grad", "no_grad"])
@pytest.mark.parametrize(("name", "loss_of", "kind"), _losses(), ids=[entry[0] for entry in _losses()])
def test_a_traced_loss_gives_eagers_values_and_gradients(name, loss_of, kind, traced_without_grad, kernel_path):
    """Traced under ``torch.no_grad()`` too, as traces usually are: the Functions took grad mode
    as an argument, the trace froze it off, and backward failed (a review)."""
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    x, labels, probs = _inputs(8, 0)
    with warnings.catch_warnings(), torch.set_grad_enabled(not traced_without_grad):
        warnings.simplefilter("ignore")  # the tracer's warnings about the bridge to NumPy
        traced = torch.jit.trace(loss_of, (x, w, labels if kind == "labels" else probs), check_trace=False)
    for rows, seed in ((8, 1), (20, 2)):
        x, labels, probs = _inputs(rows, seed)
        target = labels if kind == "labels" else probs
        got, expected = traced(x, w, target), loss_of(x, w, target)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.autograd.grad(got, w)[0], torch.autograd.grad(expected, w)[0], rtol=1e-12, atol=0)


def test_the_default_trace_check_passes_on_torchs_kernel_and_on_xentkits_functions(kernel_path):
    """The check traces again, with grad mode off: the Functions had recorded it, and the check
    failed wherever one ran (documented then, with ``check_trace=False`` as the way around)."""
    logits = torch.randn(8, 5, requires_grad=True)
    labels = torch.randint(0, 5, (8,))
    from xentkit.torch import functional

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                torch.jit.trace(lambda z, t: xt.binary_cross_entropy_with_logits(z, t), (logits, torch.rand(8, 5)))
                torch.jit.trace(lambda z, t: xt.cross_entropy(z, t, label_smoothing=0.1), (logits, labels))
    # (the traced size is a 0-d tensor: it had become a key of this cache, one per trace)
    assert all(type(classes) is int for classes in functional._PROBABILITY_MEANS)


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss", "LinearCrossEntropyLoss"])
def test_scripting_a_model_that_holds_a_loss_module_says_why_it_cannot(name):
    """TorchScript's own errors named a helper of xentkit's (LossOptions' source, a keyword-only
    argument, a Callable annotation), not the module or what to use instead (a review)."""
    loss = getattr(xt, name)(4, 3) if name == "LinearCrossEntropyLoss" else getattr(xt, name)()

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loss = loss

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.loss(x, y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.jit.script's deprecation)
        with pytest.raises(RuntimeError, match=f"xentkit.torch.{name} cannot be scripted .torch.jit.script.: .* use torch.compile"):
            torch.jit.script(Model())
