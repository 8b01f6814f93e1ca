"""``nll_loss(check_labels=False)``: the torch-ops path (CUDA and other devices, bfloat16) then
skips the label check, and a bad label makes its sample's loss NaN (and its gradient, where it
flows), as ``cross_entropy`` does; xentkit's api (float CPU tensors) keeps checking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xentkit.torch as xt


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    log_probs = torch.randn(7, 5, generator=generator).log_softmax(1)
    labels = torch.randint(0, 5, (7,), generator=generator)
    labels[1], labels[3], labels[4] = 9, -2, -100
    bad = torch.zeros(7, dtype=torch.bool)
    bad[[1, 3]] = True
    return log_probs, labels, bad


def test_the_api_path_checks_whatever_check_labels_says():
    log_probs, labels, _ = _case()
    for check in (True, False):
        with pytest.raises(ValueError, match=r"label 9 at position \(1,\)"):
            xt.nll_loss(log_probs, labels, check_labels=check)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_unchecked_torch_path_gives_nan_rows_and_exact_others(reduction, weighted):
    log_probs, labels, bad = _case()
    half = log_probs.bfloat16()  # bfloat16: the torch-ops path on the CPU
    weight = torch.rand(5, generator=torch.Generator().manual_seed(1)).bfloat16() if weighted else None
    with pytest.raises(ValueError, match="label 9"):  # checked by default on this path too
        xt.nll_loss(half, labels, weight)
    leaf = half.clone().requires_grad_()
    loss = xt.nll_loss(leaf, labels, weight, reduction="none", check_labels=False)
    loss.float().sum().backward()
    # the loss is NaN, and so is the gradient where it flows (NLL's gradient has one entry per row)
    assert torch.isnan(loss[bad]).all() and torch.isnan(leaf.grad[bad]).any(dim=1).all()
    good = ~bad
    expected_leaf = half.float().requires_grad_()
    expected = F.nll_loss(
        expected_leaf, torch.where(bad, 0, labels), None if weight is None else weight.float(), reduction="none"
    )
    expected.sum().backward()
    torch.testing.assert_close(loss[good].float(), expected[good].detach().bfloat16().float())
    torch.testing.assert_close(leaf.grad[good].float(), expected_leaf.grad[good].bfloat16().float())
    reduced = xt.nll_loss(half, labels, weight, reduction=reduction, check_labels=False)
    assert torch.isnan(reduced).any()


def test_unchecked_bfloat16_without_bad_labels_matches_torch():
    log_probs, labels, _ = _case()
    labels[1], labels[3] = 0, 4
    half = log_probs.bfloat16()
    loss = xt.nll_loss(half, labels, check_labels=False)
    torch.testing.assert_close(loss.float(), F.nll_loss(half.float(), labels), rtol=1e-2, atol=1e-2)


def test_module_keeps_the_flag_and_shows_it():
    module = xt.NLLLoss(check_labels=False)
    assert isinstance(module, torch.nn.NLLLoss) and module.check_labels is False
    assert "check_labels=False" in repr(module)
    log_probs, labels, bad = _case()
    module = xt.NLLLoss(reduction="none", check_labels=False)
    assert torch.isnan(module(log_probs.bfloat16(), labels)[bad]).all()
    with pytest.raises(ValueError, match="label 9"):
        xt.NLLLoss(reduction="none")(log_probs.bfloat16(), labels)
    with pytest.raises(TypeError, match="check_labels"):
        xt.NLLLoss(check_labels="no")(log_probs, labels)
