"""``inplace_backward=True``: the logits' gradient is written over the logits (no logits-sized
gradient buffer), with the values of ``inplace_backward=False``, on the CPU kernels (in forward)
and the Triton kernels (in backward, under Triton's interpreter here); a node that saved the
logits raises torch's in-place error instead of computing from the gradient."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import xentkit.torch as xt  # noqa: E402
from xentkit._options import LossOptions  # noqa: E402


def _gradient_pointer(tensor):
    """The data pointers of the gradients that reach ``tensor`` (a non-leaf) in backward."""
    pointers = []
    tensor.register_hook(lambda gradient: pointers.append(gradient.data_ptr()))
    return pointers


def _cases():
    torch.manual_seed(0)
    y = torch.tensor([0, 4, 2, -100, 1, 3])
    return [
        ("2-D", torch.randn(6, 5), y, {}),
        ("unbatched", torch.randn(5), torch.tensor(3), {}),
        ("per-pixel", torch.randn(3, 5, 2), torch.tensor([[0, 1], [4, -100], [2, 2]]), {}),
        ("options", torch.randn(6, 5), y, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0,
                                            "weight": torch.rand(5) + 0.5, "reduction": "sum"}),
        ("none", torch.randn(6, 5), y, {"reduction": "none"}),
        ("probabilities", torch.randn(6, 5), torch.softmax(torch.randn(6, 5), -1), {}),
    ]


def _run(logits, target, kwargs, inplace, backend="auto"):
    x = logits.detach().clone().requires_grad_(True)
    h = x * 1.0  # non-leaf logits, as a model's output layer gives them
    pointers = _gradient_pointer(h)
    loss = xt.cross_entropy(h, target, inplace_backward=inplace, backend=backend, **kwargs)
    upstream = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)
    loss.backward(upstream)
    return loss.detach(), x.grad, h, pointers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize(("name", "logits", "target", "kwargs"), _cases(), ids=[c[0] for c in _cases()])
def test_the_cpu_kernels_give_the_same_values_with_the_gradient_in_the_logits(dtype, name, logits, target, kwargs):
    logits = logits.to(dtype)
    loss, grad, _, _ = _run(logits, target, kwargs, inplace=False)
    loss_inplace, grad_inplace, h, pointers = _run(logits, target, kwargs, inplace=True)
    # without in-place, small plain problems run torch's own kernel: equal to rounding
    torch.testing.assert_close(loss_inplace, loss)
    torch.testing.assert_close(grad_inplace, grad)
    # the gradient that flowed to the layer before is the logits' own memory
    assert pointers == [h.data_ptr()]
    assert not torch.equal(h.detach(), logits)  # the logits' values are gone


def test_without_inplace_the_logits_are_untouched():
    logits, target, kwargs = _cases()[0][1:]
    _, _, h, pointers = _run(logits, target, kwargs, inplace=False)
    assert torch.equal(h.detach(), logits) and pointers != [h.data_ptr()]


def test_a_node_that_saved_the_logits_raises_torchs_version_error():
    x = torch.randn(4, 6, requires_grad=True)
    h = x.exp()  # exp keeps its output for its own backward
    loss = xt.cross_entropy(h, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_torch_ops_path_ignores_it_and_the_module_takes_it():
    logits = torch.randn(4, 6, dtype=torch.bfloat16)  # bfloat16 on the CPU: torch ops
    target = torch.tensor([0, 1, 2, 3])
    x = logits.clone().requires_grad_(True)
    h = x * 1.0
    xt.cross_entropy(h, target, inplace_backward=True).backward()
    assert torch.equal(h.detach(), logits)

    criterion = xt.CrossEntropyLoss(inplace_backward=True)
    assert "inplace_backward=True" in repr(criterion)
    logits = torch.randn(4, 6)
    a = logits.clone().requires_grad_(True)
    h = a * 1.0
    pointers = _gradient_pointer(h)
    criterion(h, target).backward()
    assert pointers == [h.data_ptr()]
    b = logits.clone().requires_grad_(True)
    xt.cross_entropy(b * 1.0, target).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_the_option_is_a_checked_bool():
    assert LossOptions(inplace_backward=True).inplace_backward is True
    with pytest.raises(TypeError, match="inplace_backward must be a bool, got str 'yes'"):
        xt.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), inplace_backward="yes")
    with pytest.raises(TypeError, match="inplace_backward must be a bool, got int 1"):
        xt.CrossEntropyLoss(inplace_backward=1)(torch.randn(2, 3), torch.tensor([0, 1]))
