"""The Triton kernels (``xentkit.triton``) and ``xentkit.torch``'s Triton path, run on CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1``, set here before the kernels are defined), at
small shapes, against the float64 NumPy reference and the torch-ops path.

On a machine with a GPU the same checks run on CUDA tensors with ``XENTKIT_TEST_DEVICE=cuda``
(then the kernels are compiled, not interpreted).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

DEVICE = os.environ.get("XENTKIT_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before xentkit.triton's kernels are defined

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import xentkit.torch as xt  # noqa: E402
from xentkit import reference  # noqa: E402
from xentkit.triton import cross_entropy_rows  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")

OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"softcap": 2.5},
    {"label_smoothing": 0.2, "z_loss": 0.05, "softcap": 1.5},
]
# float32 arithmetic: the loss and gradient agree with float64 to this relative error (of the
# row's scale), before the gradient is stored in the logits' dtype
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _problem(rows, classes, dtype, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=generator) * scale).to(dtype).to(DEVICE)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    labels[1] = -100
    weight = torch.rand(classes, generator=generator) + 0.25
    return logits, labels.to(DEVICE), weight.to(DEVICE)


def _reference(logits, labels, weight, scale, **options):
    """Per-row loss (without z term), lse and gradient in float64 from the inputs as stored."""
    x = logits.double().cpu().numpy()
    y = labels.cpu().numpy()
    w = None if weight is None else weight.double().cpu().numpy()
    formula = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None} | options
    loss, grad = reference.cross_entropy_and_grad(
        x, y, weight=w, reduction="none", grad_output=scale, **formula
    )
    z = x if formula["softcap"] is None else formula["softcap"] * np.tanh(x / formula["softcap"])
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    lse = np.where(y != -100, lse, 0.0)
    return loss - formula["z_loss"] * lse**2, lse, grad


@pytest.fixture(params=[128, None], ids=["3-chunks", "1-chunk"])
def chunked(request, monkeypatch):
    """Rows cut into chunks of 128 classes (several per row, the last one ragged), or whole."""
    from xentkit.triton import cross_entropy as kernel_module

    if request.param is not None:
        monkeypatch.setattr(kernel_module, "MAX_BLOCK", request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.usefixtures("chunked")
def test_kernel_matches_the_float64_reference(dtype, options, weighted, in_place):
    rows, classes = 5, 300
    logits, labels, weight = _problem(rows, classes, dtype, seed=len(options))
    weight = weight if weighted else None
    scale = torch.linspace(0.5, 1.5, rows, dtype=torch.float64)
    expected_loss, expected_lse, expected_grad = _reference(logits, labels, weight, scale.numpy(), **options)
    stored = logits.clone()
    grad_out = stored if in_place else torch.empty_like(stored)
    formula = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None} | options
    loss, lse = cross_entropy_rows(
        stored, labels, weight, **formula, grad_scale=scale.float().to(DEVICE),
        z_grad_scale=scale.float().to(DEVICE), grad_out=grad_out,
    )
    assert loss.dtype == lse.dtype == torch.float32
    tolerance = TOLERANCE[torch.float32]
    row_scale = np.abs(expected_loss).max() + 1
    np.testing.assert_allclose(loss.double().cpu().numpy(), expected_loss, rtol=tolerance, atol=tolerance * row_scale)
    np.testing.assert_allclose(lse.double().cpu().numpy(), expected_lse, rtol=tolerance, atol=tolerance)
    assert grad_out.dtype == dtype
    np.testing.assert_allclose(
        grad_out.double().cpu().numpy(), expected_grad, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * 1e-2
    )
    assert not grad_out[1].any()  # the ignored row


@pytest.mark.usefixtures("chunked")
def test_kernel_special_values():
    logits = torch.tensor(
        [[0.0, float("-inf"), 2.0, 1.0], [1e30, 0.0, -1e30, 5.0], [float("nan"), 0.0, 1.0, 2.0]]
    ).to(DEVICE)
    labels = torch.tensor([2, 0, 1]).to(DEVICE)
    grad = torch.empty_like(logits)
    loss, _ = cross_entropy_rows(logits, labels, None, -100, 0.0, 0.0, None, None, None, grad)
    expected, _, expected_grad = _reference(logits[:2], labels[:2], None, 1.0)
    np.testing.assert_allclose(loss[:2].cpu().numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(grad[:2].cpu().numpy(), expected_grad, atol=1e-7)
    assert grad[0, 1] == 0  # a masked class
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()


@pytest.mark.parametrize(
    ("reduction", "shape", "dtype"),
    list(itertools.product(["mean", "sum", "none"], [(7,), (6, 7), (3, 7, 2, 3)], [torch.float32, torch.bfloat16])),
)
@pytest.mark.usefixtures("chunked")
def test_triton_path_equals_the_torch_ops_path(reduction, shape, dtype):
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)
    sample_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    target = torch.randint(0, 7, sample_shape, generator=generator)
    if target.dim():
        target.view(-1)[0] = -100
    target = target.to(DEVICE)
    weight = (torch.rand(7, generator=generator) + 0.5).to(dtype).to(DEVICE)  # torch ops: same dtype
    options = {"weight": weight, "reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}
    results = []
    for backend in ("triton", "torch"):
        x = logits.clone().requires_grad_()
        loss = xt.cross_entropy(x, target, backend=backend, **options)
        upstream = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape).to(DEVICE)
        loss.backward(upstream)
        results.append((loss.detach(), x.grad))
    (loss, grad), (expected_loss, expected_grad) = results
    assert loss.dtype == expected_loss.dtype == dtype and loss.shape == expected_loss.shape
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.float(), expected_loss.float(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=tolerance, atol=tolerance)


def test_mean_of_nothing_is_zero_and_backward_twice_needs_retain_graph():
    x = torch.randn(4, 5).to(DEVICE).requires_grad_()
    loss = xt.cross_entropy(x, torch.full((4,), -100).to(DEVICE), backend="triton", z_loss=0.1)
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()
    loss = xt.cross_entropy(x, torch.tensor([0, 1, 2, 3]).to(DEVICE), backend="triton")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    assert first.abs().sum() > 0
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()


def test_module_takes_the_backend():
    x = torch.randn(6, 9).to(DEVICE)
    y = torch.randint(0, 9, (6,)).to(DEVICE)
    criterion = xt.CrossEntropyLoss(backend="triton", label_smoothing=0.05)
    assert "backend='triton'" in repr(criterion)
    torch.testing.assert_close(criterion(x, y), xt.CrossEntropyLoss(backend="torch", label_smoothing=0.05)(x, y))


def test_double_backward_raises_on_the_triton_path():
    x = torch.randn(3, 4).to(DEVICE).requires_grad_()
    (gradient,) = torch.autograd.grad(xt.cross_entropy(x, torch.tensor([0, 1, 3]).to(DEVICE), backend="triton"), x,
                                      create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(gradient.square().sum() + x.sum(), x)


def test_bad_input_is_refused_before_the_kernel():
    x = torch.randn(3, 4).to(DEVICE)
    with pytest.raises(ValueError, match=r"label 4 at position \(2,\) but logits have 4 classes"):
        xt.cross_entropy(x, torch.tensor([0, 1, 4]).to(DEVICE), backend="triton")
    with pytest.raises(ValueError, match="target must have shape"):
        xt.cross_entropy(x, torch.tensor([0, 1]).to(DEVICE), backend="triton")
    with pytest.raises(TypeError, match=r"integer dtype, got dtype torch\.bool"):
        xt.cross_entropy(x, torch.tensor([True, False, True]).to(DEVICE), backend="triton")


def test_backend_triton_says_why_it_cannot_run(monkeypatch):
    x = torch.randn(3, 4).to(DEVICE)
    with pytest.raises(ValueError, match="probability targets are not on the Triton path yet"):
        xt.cross_entropy(x, torch.softmax(x, 1), backend="triton")
    with pytest.raises(ValueError, match=r"float32, float16 and bfloat16 logits, got torch\.float64"):
        xt.cross_entropy(x.double(), torch.tensor([0, 1, 2]).to(DEVICE), backend="triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match=r"runs CUDA tensors .*TRITON_INTERPRET=1"):
            xt.cross_entropy(x, torch.tensor([0, 1, 2]), backend="triton")
        # "auto" on CPU tensors never takes Triton
        torch.testing.assert_close(xt.cross_entropy(x, torch.tensor([0, 1, 2])),
                                   xt.cross_entropy(x, torch.tensor([0, 1, 2]), backend="torch"))


@pytest.mark.usefixtures("chunked")
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}])
def test_kernel_masked_chunks_and_far_from_zero_rows(options):
    """A whole chunk of −inf (masked classes), and rows far below 0 (every chunk's max negative)."""
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(3)).double()
    logits[0, :200] = float("-inf")
    logits[1] -= 1000.0
    logits[2] += 1e4
    logits = logits.float().to(DEVICE)
    labels = torch.tensor([250, 3, 299]).to(DEVICE)
    grad = torch.empty_like(logits)
    formula = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None} | options
    loss, lse = cross_entropy_rows(logits, labels, None, **formula, grad_scale=None, z_grad_scale=None, grad_out=grad)
    expected_loss, expected_lse, expected_grad = _reference(logits, labels, None, np.ones(3), **options)
    if options:  # a masked class under label smoothing: +inf, as torch
        assert loss[0] == float("inf")
        np.testing.assert_allclose(loss[1:].cpu().numpy(), expected_loss[1:], rtol=2e-6)
    else:
        np.testing.assert_allclose(loss.cpu().numpy(), expected_loss, rtol=2e-6)
    np.testing.assert_allclose(lse.double().cpu().numpy(), expected_lse, rtol=1e-7)
    np.testing.assert_allclose(grad.cpu().numpy(), expected_grad, atol=1e-7)
    if not options:
        assert not grad[0, :200].any()


@pytest.mark.usefixtures("chunked")
@pytest.mark.parametrize(
    ("reduction", "bias", "dtype", "options"),
    [
        ("mean", False, torch.float32, {}),
        ("mean", True, torch.float32, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}),
        ("sum", True, torch.float32, {"label_smoothing": 0.2}),
        ("none", True, torch.float32, {"z_loss": 1e-2}),
        ("none", False, torch.bfloat16, {}),
        ("mean", True, torch.bfloat16, {"label_smoothing": 0.1}),
    ],
)
def test_linear_cross_entropy_on_triton_equals_torch_ops(reduction, bias, dtype, options):
    generator = torch.Generator().manual_seed(21)
    n, d, v = 10, 6, 300
    x0 = (torch.randn(n, d, generator=generator)).to(dtype).to(DEVICE)
    w0 = (torch.randn(v, d, generator=generator) / 2).to(dtype).to(DEVICE)
    b0 = (torch.randn(v, generator=generator)).to(dtype).to(DEVICE) if bias else None
    target = torch.randint(0, v, (n,), generator=generator)
    target[2] = -100
    target = target.to(DEVICE)
    weight = (torch.rand(v, generator=generator) + 0.5).to(dtype).to(DEVICE)
    results = []
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x0, w0) + ((b0,) if bias else ())]
        loss = xt.linear_cross_entropy(
            leaves[0], leaves[1], target, linear_bias=leaves[2] if bias else None, weight=weight,
            reduction=reduction, chunk_size=4, backend=backend, **options,
        )
        upstream = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape).to(DEVICE)
        loss.backward(upstream)
        results.append((loss.detach(), [leaf.grad for leaf in leaves]))
    (loss, grads), (expected_loss, expected_grads) = results
    assert loss.dtype == expected_loss.dtype == dtype and loss.shape == expected_loss.shape
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(loss.float(), expected_loss.float(), rtol=tolerance, atol=tolerance)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.float(), expected.float(), rtol=tolerance, atol=tolerance)


def test_linear_cross_entropy_on_triton_edge_cases():
    x = torch.randn(5, 4).to(DEVICE).requires_grad_()
    w = torch.randn(7, 4).to(DEVICE).requires_grad_()
    loss = xt.linear_cross_entropy(x, w, torch.full((5,), -100).to(DEVICE), backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any() and not w.grad.any()
    with pytest.raises(ValueError, match=r"label 7 at position \(1,\) but linear_weight has 7 rows"):
        xt.linear_cross_entropy(x, w, torch.tensor([0, 7, 1, 2, 3]).to(DEVICE), backend="triton")
    with pytest.raises(ValueError, match="probability targets are not on the Triton path yet"):
        xt.linear_cross_entropy(x, w, torch.softmax(torch.randn(5, 7), 1).to(DEVICE), backend="triton")
    with pytest.raises(ValueError, match="2-D input"):
        xt.linear_cross_entropy(x[0], w, torch.tensor(1).to(DEVICE), backend="triton")
    loss = xt.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3, 4]).to(DEVICE), backend="triton")
    loss.backward(retain_graph=True)
    loss.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()
    (gradient,) = torch.autograd.grad(
        xt.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3, 4]).to(DEVICE), backend="triton"), x,
        create_graph=True,
    )
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(gradient.square().sum() + x.sum(), x)
