"""From a review of the loss modules' lifecycle against torch's (2026-12-07): ``CrossEntropyLoss``
keeps the options it built, and had reused them after an option changed without an attribute
assignment (a 0-d tensor option changed in place, a value written into ``__dict__``, or an
assignment racing a call in another thread), where ``torch.nn.CrossEntropyLoss`` reads its
attributes on every call."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import xentkit.torch as xt
from xentkit.torch import functional


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 2])


def test_a_tensor_option_changed_in_place_is_read_again(batch):
    x, y = batch
    smoothing = torch.tensor(0.0)
    index = np.array(-100)
    loss = xt.CrossEntropyLoss(label_smoothing=smoothing, ignore_index=index)
    torch.testing.assert_close(loss(x, y), F.cross_entropy(x, y))
    smoothing.fill_(0.5)
    index[()] = 2
    torch.testing.assert_close(loss(x, y), F.cross_entropy(x, y, label_smoothing=0.5, ignore_index=2))


def test_options_written_into_the_modules_dict_are_seen(batch):
    x, y = batch
    loss = xt.CrossEntropyLoss()
    loss(x, y)
    vars(loss).update(ignore_index=2, label_smoothing=0.2)
    torch.testing.assert_close(loss(x, y), F.cross_entropy(x, y, ignore_index=2, label_smoothing=0.2))
    object.__setattr__(loss, "reduction", "sum")
    torch.testing.assert_close(loss(x, y), F.cross_entropy(x, y, ignore_index=2, label_smoothing=0.2, reduction="sum"))


def test_an_option_set_while_a_call_builds_its_options_is_not_lost(batch, monkeypatch):
    """A call in another thread builds options from the old value; the assignment lands before it
    keeps them; the next call must still see the new value."""
    x, y = batch
    loss = xt.CrossEntropyLoss()
    built, changed = threading.Event(), threading.Event()
    build = functional.cached_options

    def slow_build():
        real = build()

        def wrapped(*values):
            options = real(*values)
            if threading.current_thread().name == "racing call":
                built.set()
                changed.wait(10)
            return options

        return wrapped

    monkeypatch.setattr(functional, "cached_options", slow_build)
    thread = threading.Thread(target=lambda: loss(x, y), name="racing call")
    thread.start()
    assert built.wait(10)
    loss.ignore_index = 2
    changed.set()
    thread.join()
    monkeypatch.setattr(functional, "cached_options", build)
    torch.testing.assert_close(loss(x, y), F.cross_entropy(x, y, ignore_index=2))


def test_plain_options_are_still_kept_between_calls(batch, monkeypatch):
    """The cache stays (``_options.loss_options``'): a second call with the same plain values
    builds and checks nothing."""
    from xentkit import _options

    x, y = batch
    loss = xt.CrossEntropyLoss(label_smoothing=0.1)
    loss(x, y)
    built = []
    build = _options.LossOptions
    monkeypatch.setattr(_options, "LossOptions", lambda *fields: built.append(fields) or build(*fields))
    loss(x, y)
    assert built == []
    loss.label_smoothing = 0.123456  # (a value no other call has built)
    torch.testing.assert_close(loss(x, y), F.cross_entropy(x, y, label_smoothing=0.123456))
    assert len(built) == 1


# From a review of drop-in parity and edge shapes (2026-12-07): an empty batch had gone to the
# kernels, which have no second derivative, where torch's own kernel keeps it for small calls;
# and a "mean" of nothing (0, gradient 0) had a constant gradient that a penalty could not be
# differentiated through.


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(0, 5), (2, 5, 0)])
@pytest.mark.parametrize("case", ["cross_entropy", "nll_loss", "probabilities", "weight"])
def test_an_empty_batch_keeps_torchs_second_derivative(case, shape, reduction):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = torch.zeros((shape[0], *shape[2:]), dtype=torch.long)
    function, options = xt.nll_loss if case == "nll_loss" else xt.cross_entropy, {}
    if case == "probabilities":
        y = torch.rand(shape, dtype=torch.float64)
    elif case == "weight":
        options["weight"] = torch.rand(5, dtype=torch.float64)
    loss = function(x, y, reduction=reduction, **options)
    assert loss.shape == ((shape[0], *shape[2:]) if reduction == "none" else ())
    assert float(loss.detach().sum()) == 0.0
    (grad,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum() + loss.sum(), x, allow_unused=True, materialize_grads=True)
    assert second.shape == shape


def test_a_mean_of_nothing_has_a_gradient_that_can_be_differentiated():
    x = torch.tensor([[1.0, 2.0, float("inf")], [0.5, float("nan"), -1.0]], requires_grad=True)
    y = torch.tensor([-100, -100])
    loss = xt.cross_entropy(x, y)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    assert grad.requires_grad and torch.equal(grad, torch.zeros_like(x))
    (penalty_grad,) = torch.autograd.grad((grad**2).sum() + grad.sum(), x)
    assert torch.equal(penalty_grad, torch.zeros_like(x))


# torch's linear cross-entropy takes options= (a LinearCrossEntropyOptions or None) and defaults
# ignore_index to None; xentkit's had refused options= (a TypeError on the swap) and its function
# defaulted ignore_index to -100 (the same meaning, another signature).


def test_the_linear_forms_take_torchs_options(monkeypatch):
    import inspect

    from xentkit.torch import _linear_numba

    for ours, theirs in ((xt.linear_cross_entropy, F.linear_cross_entropy),
                         (xt.LinearCrossEntropyLoss.__init__, torch.nn.LinearCrossEntropyLoss.__init__)):
        mine, torchs = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
        for name in ("ignore_index", "options"):
            assert mine[name].default is torchs[name].default is None
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3)
    torch.manual_seed(0)
    ours = xt.LinearCrossEntropyLoss(4, 10, options=options)
    theirs = torch.nn.LinearCrossEntropyLoss(4, 10, options=options)
    theirs.load_state_dict(ours.state_dict())
    x, y = torch.randn(7, 4), torch.randint(0, 10, (7,))
    chunk_sizes = []
    real = _linear_numba.chunked_pass
    monkeypatch.setattr(
        _linear_numba, "chunked_pass", lambda *a, **k: chunk_sizes.append(a[5].chunk_size) or real(*a, **k)
    )
    torch.testing.assert_close(ours(x, y), theirs(x, y))
    assert chunk_sizes == [3]
    assert "batch_chunk_size=3" in repr(ours)
    with pytest.raises(TypeError, match=r"^options must be None or a torch.nn.LinearCrossEntropyOptions .*got int 3$"):
        xt.linear_cross_entropy(x, ours.linear.weight, y, options=3)
    with pytest.raises(ValueError, match=r"^chunk_size=5 and options.batch_chunk_size=3 disagree"):
        xt.LinearCrossEntropyLoss(4, 10, options=options, chunk_size=5)
