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



def _float16_step(inplace, reduction="mean", retain=False):
    """A float16 layer's logits and a loss scaler's factor (65536), as ``torch.autocast``'s
    training step gives them: the loss, the layer's weight gradient, and the logits' gradient
    (cloned as it reaches them) with its data pointer."""
    torch.manual_seed(1)
    h = torch.randn(128, 16)
    w = (torch.randn(16, 1024) * 0.5).requires_grad_(True)
    target = torch.randint(0, 1024, (128,))
    target[3] = -100
    with torch.autocast("cpu", dtype=torch.float16):
        logits = h @ w
        assert logits.dtype == torch.float16
        seen = []
        logits.register_hook(lambda gradient: seen.append((gradient.clone(), gradient.data_ptr())))
        loss = xt.cross_entropy(logits, target, inplace_backward=inplace, reduction=reduction)
    assert loss.dtype == torch.float32  # (autocast's rule for cross-entropy)
    # the factor over the rows for "none" (a per-row 65536 would overflow the float16 matmul)
    (loss * (65536.0 if reduction == "mean" else 512.0)).sum().backward(retain_graph=retain)
    return loss.detach(), w.grad, seen, logits


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float16_in_place_gradients_keep_their_small_entries_under_a_loss_scale(reduction):
    """Rounded to float16 at an upstream of 1 and scaled afterwards, about half of a 1024-class
    gradient's entries were 0 before the scaler's factor reached them; in place, float16 logits
    now get their gradient in backward with the factor applied, rounded once: the values of
    ``inplace_backward=False`` bit for bit, in the logits' own memory."""
    loss, grad, [(logits_grad, _)], _ = _float16_step(False, reduction)
    loss_inplace, grad_inplace, [(logits_grad_inplace, pointer)], logits = _float16_step(True, reduction)
    assert torch.equal(loss_inplace, loss)
    assert torch.equal(logits_grad_inplace, logits_grad)
    assert torch.equal(grad_inplace, grad)
    assert pointer == logits.data_ptr()
    assert (logits_grad_inplace == 0).sum() < 0.01 * logits_grad.numel()


def test_float16_in_place_with_a_retained_graph_keeps_the_logits_for_the_next_backward():
    _, _, [(expected, _)], _ = _float16_step(False)
    _, _, seen, logits = _float16_step(True, retain=True)
    assert seen[0][1] != logits.data_ptr()  # a gradient of its own: the logits stay
    assert torch.equal(seen[0][0], expected)
