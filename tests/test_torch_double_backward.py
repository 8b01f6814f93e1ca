"""Double backward raises on every xentkit.torch loss, also through ``torch.autograd.grad`` with
``inputs=`` (which runs only the graph nodes on a path to its inputs): a gradient penalty built on
xentkit's gradient must never be silently dropped."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import xentkit.torch as xt  # noqa: E402
from xentkit.torch import distributed  # noqa: E402


def _losses():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    head = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 1, -100, 2, 2])
    safe = target.clamp(min=0)
    bits = torch.rand(6, 4, generator=generator, dtype=torch.float64)
    log_probs = torch.log_softmax(logits, 1).detach().requires_grad_()
    return {
        # (on xentkit's kernel, the kernel_path fixture: small problems run torch's own, which has
        # a second derivative)
        "cross_entropy": (logits, lambda: xt.cross_entropy(logits, target)),
        "nll_loss": (log_probs, lambda: xt.nll_loss(log_probs, safe)),
        "bce_with_logits": (logits, lambda: xt.binary_cross_entropy_with_logits(logits, bits)),
        "linear_cross_entropy": (hidden, lambda: xt.linear_cross_entropy(hidden, head, target)),
        "vocab_parallel": (logits, lambda: distributed.vocab_parallel_cross_entropy(logits, target)),
        "vocab_parallel_linear": (
            hidden, lambda: distributed.vocab_parallel_linear_cross_entropy(hidden, head, target)
        ),
        "log_probs": (logits, lambda: xt.log_probs(logits, safe, return_entropy=True)[1].sum()),
        "linear_log_probs": (hidden, lambda: xt.linear_log_probs(hidden, head, safe).sum()),
    }


@pytest.mark.parametrize("name", list(_losses()))
def test_gradient_penalty_through_autograd_grad_raises(name, kernel_path):
    leaf, loss_of = _losses()[name]
    (gradient,) = torch.autograd.grad(loss_of(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(gradient.square().sum() + leaf.sum(), leaf)
    with pytest.raises(RuntimeError, match="no second derivative"):
        gradient.square().sum().backward()


@pytest.mark.parametrize("name", list(_losses()))
def test_first_order_gradient_is_unchanged_by_the_guard(name, kernel_path):
    leaf, loss_of = _losses()[name]
    (plain,) = torch.autograd.grad(loss_of(), leaf)
    (graphed,) = torch.autograd.grad(loss_of(), leaf, create_graph=True)
    assert torch.isfinite(plain).all() and plain.abs().sum() > 0
    torch.testing.assert_close(graphed.detach(), plain, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(_losses()))
def test_a_second_derivative_through_the_upstream_gradient_raises(name, kernel_path):
    """A loss scale (or per-sample weights) that requires grad reaches the first gradient only
    through the upstream gradient: differentiating that gradient with respect to the scale must
    meet the error. The path was cut: d/da of v·∂(a·loss)/∂x + a² came back 2a alone (the
    v·∂loss/∂x term dropped, no error), a review's learning-to-reweight hypergradient."""
    leaf, loss_of = _losses()[name]
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(scale * loss_of(), leaf, create_graph=True)
    direction = torch.ones_like(gradient)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad((gradient * direction).sum() + scale.square(), scale)
