"""The Triton kernels (``xentkit.triton``) and ``xentkit.torch``'s Triton path, run on CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1``, set by ``_triton_setup`` before the kernels are
defined), at small shapes, against the float64 NumPy reference and the torch-ops path.

On a machine with a GPU the same checks run on CUDA tensors with ``XENTKIT_TEST_DEVICE=cuda``
(then the kernels are compiled, not interpreted).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from _triton_setup import DEVICE  # first: the skips and the interpreter

# isort: split
import torch

import xentkit.torch as xt
from xentkit import reference
from xentkit.triton import cross_entropy_rows

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
    """Per-row loss (without z term), lse and gradient in float64 from the inputs as stored;
    ``labels`` class indices or (floating, the logits' shape) class probabilities."""
    x = logits.double().cpu().numpy()
    y = labels.double().cpu().numpy() if labels.is_floating_point() else labels.cpu().numpy()
    w = None if weight is None else weight.double().cpu().numpy()
    formula = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None} | options
    loss, grad = reference.cross_entropy_and_grad(
        x, y, weight=w, reduction="none", grad_output=scale, **formula
    )
    z = x if formula["softcap"] is None else formula["softcap"] * np.tanh(x / formula["softcap"])
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    if not labels.is_floating_point():
        lse = np.where(y != -100, lse, 0.0)
    return loss - formula["z_loss"] * lse**2, lse, grad


def _check_rows_against_the_reference(logits, target, weight, options, in_place):
    """``cross_entropy_rows`` on a copy of ``logits`` (its gradient written over the copy when
    ``in_place``, else into a new tensor) with a gradient scale per row from 0.5 to 1.5: the loss
    and lse (float32) and the gradient (the logits' dtype) against ``_reference``, in float64.
    ``target`` class indices or class probabilities. Returns the gradient."""
    dtype = logits.dtype
    scale = torch.linspace(0.5, 1.5, logits.shape[0], dtype=torch.float64)
    expected_loss, expected_lse, expected_grad = _reference(logits, target, weight, scale.numpy(), **options)
    stored = logits.clone()
    grad_out = stored if in_place else torch.empty_like(stored)
    formula = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None} | options
    loss, lse = cross_entropy_rows(
        stored, target, weight, **formula, grad_scale=scale.float().to(DEVICE),
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
    return grad_out


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
    logits, labels, weight = _problem(5, 300, dtype, seed=len(options))
    grad_out = _check_rows_against_the_reference(logits, labels, weight if weighted else None, options, in_place)
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
    with pytest.raises(TypeError, match=r"integer dtype, got dtype bool "):
        xt.cross_entropy(x, torch.tensor([True, False, True]).to(DEVICE), backend="triton")


def test_backend_triton_says_why_it_cannot_run(monkeypatch):
    x = torch.randn(3, 4).to(DEVICE)
    with pytest.raises(ValueError, match=r"logits only \(target or weight requires grad\)"):
        xt.cross_entropy(x, torch.softmax(x, 1).requires_grad_(), backend="triton")
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
    # the precision contract: a float32 loss for bfloat16 inputs, on both paths
    assert loss.dtype == expected_loss.dtype == torch.float32 and loss.shape == expected_loss.shape
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
    with pytest.raises(ValueError, match=r"label 7 at position \(1,\) but linear_weight has 7 rows"):
        # with class weights too: the weight lookup reads no label outside [0, V)
        xt.linear_cross_entropy(x, w, torch.tensor([0, 7, 1, 2, 3]).to(DEVICE), weight=torch.ones(7).to(DEVICE),
                                backend="triton")
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


# ---- probability targets -------------------------------------------------------------------


def _probabilities(rows, classes, dtype, seed=0):
    """Class probabilities in ``dtype``, with exact zeros: row 0 puts no mass on every third class,
    row 2 none on its first 150 classes (the first chunks, when rows are cut in 128s)."""
    generator = torch.Generator().manual_seed(100 + seed)
    q = torch.softmax(torch.randn(rows, classes, generator=generator) * 2, 1)
    q[0, ::3] = 0.0
    q[2, :150] = 0.0
    return (q / q.sum(1, keepdim=True)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize(("weighted", "in_place"), [(False, False), (True, True)])
@pytest.mark.usefixtures("chunked")
def test_kernel_with_probabilities_matches_the_float64_reference(dtype, options, weighted, in_place):
    logits, _, weight = _problem(5, 300, dtype, seed=len(options))
    target = _probabilities(5, 300, dtype, seed=len(options))  # read in the logits' dtype
    _check_rows_against_the_reference(logits, target, weight if weighted else None, options, in_place)


@pytest.mark.parametrize("target_dtype", [torch.float64, torch.bfloat16])
def test_kernel_reads_probabilities_in_their_own_dtype(target_dtype):
    """float32 logits with a float64 or bfloat16 target: each read as stored, no cast first."""
    logits, _, weight = _problem(4, 50, torch.float32, seed=9)
    target = _probabilities(4, 50, target_dtype, seed=9)
    grad = torch.empty_like(logits)
    loss, _ = cross_entropy_rows(logits, target, weight, -100, 0.1, 0.0, None, None, None, grad)
    expected_loss, _, expected_grad = _reference(logits, target, weight, 1.0, label_smoothing=0.1)
    np.testing.assert_allclose(loss.double().cpu().numpy(), expected_loss, rtol=2e-6)
    np.testing.assert_allclose(grad.double().cpu().numpy(), expected_grad, rtol=2e-6, atol=1e-8)


@pytest.mark.usefixtures("chunked")
def test_kernel_probabilities_masked_classes_and_far_from_zero_rows():
    """−inf logits where q is 0 add nothing (a finite loss, gradient 0 there); a whole masked chunk;
    a row of q all 0 (loss 0, gradient 0); rows far from 0; a masked class with q > 0 is +inf."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(5, 300, generator=generator).double()
    target = torch.softmax(torch.randn(5, 300, generator=generator), 1).double()
    logits[0, :200] = float("-inf")
    target[0, :200] = 0.0
    logits[1, 7::10] = float("-inf")
    target[1, 7::10] = 0.0
    target[2] = 0.0
    logits[3] -= 1000.0
    logits[4] += 1e4
    logits[4, 5] = float("-inf")  # target[4, 5] > 0
    logits, target = logits.float().to(DEVICE), target.float().to(DEVICE)
    grad = torch.empty_like(logits)
    loss, lse = cross_entropy_rows(logits, target, None, -100, 0.0, 0.0, None, None, None, grad)
    expected_loss, expected_lse, expected_grad = _reference(logits[:4], target[:4], None, np.ones(4))
    np.testing.assert_allclose(loss[:4].cpu().numpy(), expected_loss, rtol=2e-6)
    np.testing.assert_allclose(lse[:4].double().cpu().numpy(), expected_lse, rtol=1e-7)
    np.testing.assert_allclose(grad[:4].cpu().numpy(), expected_grad, atol=1e-7)
    assert not grad[0, :200].any() and not grad[1, 7::10].any()
    assert loss[2] == 0 and not grad[2].any()
    assert np.isfinite(loss[:4].cpu().numpy()).all()
    assert loss[4] == float("inf")  # as torch: q > 0 on a class of probability 0
    assert torch.isfinite(grad[4]).all() and grad[4, 5] == -target[4, 5]


@pytest.mark.parametrize(
    ("reduction", "shape", "dtype"),
    list(itertools.product(["mean", "sum", "none"], [(7,), (6, 7), (3, 7, 2, 3)], [torch.float32, torch.bfloat16])),
)
@pytest.mark.usefixtures("chunked")
def test_triton_path_with_probabilities_equals_the_torch_ops_path(reduction, shape, dtype):
    generator = torch.Generator().manual_seed(12)
    logits = torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)
    class_axis = 1 if len(shape) > 1 else 0
    target = torch.softmax(torch.randn(*shape, generator=generator), class_axis).to(dtype).to(DEVICE)
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


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(4, 300), (2, 300, 3)])
@pytest.mark.usefixtures("chunked")
def test_probabilities_on_triton_equal_torch_cross_entropy(reduction, shape):
    """Against ``torch.nn.functional.cross_entropy`` itself, class weights and label smoothing on:
    "mean" divides by the number of rows (N·d1 for (N, C, d1)), not by a sum of weights."""
    generator = torch.Generator().manual_seed(13)
    logits = (torch.randn(*shape, generator=generator) * 3).to(DEVICE)
    target = torch.softmax(torch.randn(*shape, generator=generator), 1).to(DEVICE)
    weight = (torch.rand(shape[1], generator=generator) + 0.5).to(DEVICE)
    x, expected_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = xt.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.2, backend="triton")
    expected = torch.nn.functional.cross_entropy(
        expected_x, target, weight, reduction=reduction, label_smoothing=0.2
    )
    upstream = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape).to(DEVICE)
    loss.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, expected_x.grad, rtol=1e-5, atol=1e-7)


def test_probabilities_on_triton_edge_cases(monkeypatch):
    x = torch.randn(3, 5).to(DEVICE)
    q = torch.softmax(torch.randn(3, 5), 1).to(DEVICE)
    # ignore_index is not read for probability targets: every row counts, as on the CPU path
    expected = xt.cross_entropy(x.cpu(), q.cpu(), z_loss=0.1)
    for ignore_index in (-100, 0, 2):
        loss = xt.cross_entropy(x, q, ignore_index=ignore_index, z_loss=0.1, backend="triton")
        torch.testing.assert_close(loss.cpu(), expected, rtol=1e-6, atol=1e-6)
    # no rows: "mean" is 0 with a zero gradient
    empty = torch.zeros(0, 5).to(DEVICE).requires_grad_()
    loss = xt.cross_entropy(empty, torch.zeros(0, 5).to(DEVICE), z_loss=0.1, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 5)
    # a target that requires grad: "auto" falls back to torch ops and differentiates it
    target = q.clone().requires_grad_()
    xt.cross_entropy(x, target).backward()
    torch.testing.assert_close(target.grad, -torch.log_softmax(x, 1) / 3)
    with pytest.raises(ValueError, match=r"or the logits' shape \(\d+, 5\) \(class probabilities\), got shape \(\d+, 4\)"):
        xt.cross_entropy(x, q[:, :4], backend="triton")  # (neither layout: a shape error, as torch's)
    with pytest.raises(ValueError, match=r"float64 probability targets, got torch\.float8_e4m3fn"):
        xt.cross_entropy(x, q.to(torch.float8_e4m3fn), backend="triton")
    with pytest.raises(ValueError, match=r"^target must be on the input's device \S+, got meta$"):
        xt.cross_entropy(x, q.to("meta"), backend="triton")
    # class indices and class weights elsewhere than the logits are refused too: never read
    labels = torch.zeros(x.shape[0], dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"^target must be on the input's device \S+, got meta$"):
        xt.cross_entropy(x, labels, backend="triton")
    with pytest.raises(ValueError, match=r"^weight must be on the input's device \S+, got meta$"):
        xt.cross_entropy(x, torch.zeros_like(labels, device=x.device), weight=torch.ones(x.shape[1], device="meta"), backend="triton")
    if DEVICE == "cpu":  # "auto" on CPU tensors runs the Numba kernels, never Triton
        from xentkit.triton import cross_entropy as kernel_module

        def refuse(*args, **kwargs):
            raise AssertionError("the Triton kernels ran")

        monkeypatch.setattr(kernel_module, "row_statistics", refuse)
        loss = xt.cross_entropy(x, q)
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, q))
        with pytest.raises(AssertionError, match="the Triton kernels ran"):
            xt.cross_entropy(x, q, backend="triton")


@pytest.mark.parametrize("shape", [(6, 300), (300,), (3, 300, 2)])
def test_inplace_backward_on_triton_writes_over_the_logits(shape):
    """inplace_backward=True: pass 2 writes over the logits (2-D and unbatched) or over the
    path's own rows copy (other layouts), with the values of a separate buffer; the logits' version
    is raised so that a node that saved them raises torch's error."""
    torch.manual_seed(3)
    logits = (torch.randn(shape) * 3).to(DEVICE)
    classes = 300
    target = torch.randint(0, classes, shape[:1] + shape[2:] if len(shape) > 1 else ()).to(DEVICE)
    results = {}
    for inplace in (False, True):
        x = logits.clone().requires_grad_(True)
        h = x * 1.0
        pointers = []
        h.register_hook(lambda gradient, pointers=pointers: pointers.append(gradient.data_ptr()))
        loss = xt.cross_entropy(h, target, label_smoothing=0.1, inplace_backward=inplace, backend="triton")
        loss.backward()
        results[inplace] = (loss.detach(), x.grad, pointers == [h.data_ptr()], torch.equal(h.detach(), logits))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=0)
    assert results[False][2:] == (False, True)  # a buffer of its own; the logits untouched
    assert results[True][2:] == ((True, False) if len(shape) <= 2 else (False, True))
    if len(shape) <= 2:
        x = logits.clone().requires_grad_(True)
        loss = xt.cross_entropy(x.exp(), target, inplace_backward=True, backend="triton")  # exp saves its output
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("shape", [(6, 37), (37,)])
def test_inplace_backward_with_a_kept_graph_leaves_the_logits_for_the_next_backward(shape):
    """retain_graph=True: pass 2 writes into a buffer of its own, so a second backward reads the
    logits intact and doubles the gradient, as on the Numba path (a review: the first backward
    wrote over them and the second raised torch's version error); without it, in place."""
    torch.manual_seed(4)
    logits = torch.randn(shape).to(DEVICE)
    target = torch.randint(0, 37, shape[:-1]).to(DEVICE)
    x = logits.clone().requires_grad_(True)
    h = x * 1.0
    loss = xt.cross_entropy(h, target, inplace_backward=True, backend="triton")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    assert torch.equal(h.detach(), logits)
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first, rtol=0, atol=0)
    want = torch.func.grad(lambda z: torch.nn.functional.cross_entropy(z, target))(logits.double())
    torch.testing.assert_close(first.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.usefixtures("chunked")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_with_probabilities_on_triton_equals_torch_ops(reduction, dtype):
    """Soft labels through the fused linear form on the Triton kernels: chunks of 4 rows, weights,
    smoothing, z-loss and softcap, against the torch-ops path on the same inputs."""
    generator = torch.Generator().manual_seed(23)
    n, d, v = 10, 6, 300
    x0 = torch.randn(n, d, generator=generator).to(dtype).to(DEVICE)
    w0 = (torch.randn(v, d, generator=generator) / 2).to(dtype).to(DEVICE)
    b0 = torch.randn(v, generator=generator).to(dtype).to(DEVICE)
    q = torch.softmax(torch.randn(n, v, generator=generator) * 3, 1)
    q[1] = 0.0
    q[1, 7] = 1.0  # a one-hot row among soft ones
    q = q.to(dtype).to(DEVICE)
    weight = (torch.rand(v, generator=generator) + 0.5).to(dtype).to(DEVICE)
    options = {"weight": weight, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 8.0}
    results = []
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x0, w0, b0)]
        loss = xt.linear_cross_entropy(leaves[0], leaves[1], q, linear_bias=leaves[2], reduction=reduction,
                                       chunk_size=4, backend=backend, **options)
        upstream = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape).to(DEVICE)
        loss.backward(upstream)
        results.append((loss.detach(), [leaf.grad for leaf in leaves]))
    (loss, grads), (expected_loss, expected_grads) = results
    assert loss.dtype == expected_loss.dtype == torch.float32 and loss.shape == expected_loss.shape
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(loss, expected_loss, rtol=tolerance, atol=tolerance)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.float(), expected.float(), rtol=tolerance, atol=tolerance)


def test_label_smoothing_with_a_zero_weight_on_a_masked_class_is_finite_as_the_reference():
    """ε·Σ_c w_c·log p_c with w_c = 0 and p_c = 0 (a −inf logit) adds 0 (0·log 0 = 0) in the
    float64 reference, the Numba kernel and the Triton kernel (torch: NaN);
    tests/test_masked_class_smoothing.py has the other paths."""
    logits = torch.tensor([[1.0, float("-inf"), 0.5, 2.0], [0.3, 0.1, -0.2, 0.4]]).to(DEVICE)
    target = torch.tensor([0, 2]).to(DEVICE)
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0]).to(DEVICE)
    loss = xt.cross_entropy(logits, target, weight=weight, label_smoothing=0.1, reduction="none", backend="triton")
    want, _ = reference.cross_entropy_and_grad(
        logits.cpu().double().numpy(), target.cpu().numpy(), weight=weight.cpu().double().numpy(),
        label_smoothing=0.1, reduction="none", want_grad=False,
    )
    assert np.isfinite(want).all()
    torch.testing.assert_close(loss.cpu().double(), torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_the_kernel_hosts_take_every_formula_option_by_name():
    """``LossOptions.formula_arguments()`` is passed by keyword to the Triton hosts, as to the
    Numba kernel and the reference: each must take every formula option (a new option added only
    to LossOptions fails here)."""
    import inspect

    from xentkit._options import LossOptions
    from xentkit.triton import cross_entropy as kernel_module

    names = set(LossOptions().formula_arguments())
    for function in (kernel_module.cross_entropy_rows, kernel_module.row_statistics, kernel_module.row_gradient):
        assert names <= set(inspect.signature(function).parameters), function.__qualname__


# ---- class weights prepared once for many calls --------------------------------------------


def test_class_weights_prepared_once():
    """``ClassWeights.of``: float32 contiguous values and their float64 sum rounded to float32,
    prepared weights handed back as they are (their total added only when asked for)."""
    from xentkit.triton.cross_entropy import ClassWeights

    weight = torch.tensor([1.0, 2.0, 0.5, 0.25], dtype=torch.bfloat16, device=DEVICE)[::2]
    prepared = ClassWeights.of(weight, weight.device, with_total=True)
    assert prepared.values.dtype == torch.float32 and prepared.values.is_contiguous()
    assert prepared.values.tolist() == [1.0, 0.5] and prepared.total.tolist() == [1.5]
    assert ClassWeights.of(prepared, weight.device, with_total=True) is prepared
    assert ClassWeights.of(None, weight.device, with_total=True) is None
    bare = ClassWeights.of(weight, weight.device, with_total=False)
    assert bare.total is None
    assert ClassWeights.of(bare, weight.device, with_total=False) is bare
    assert ClassWeights.of(bare, weight.device, with_total=True).total.tolist() == [1.5]


@pytest.mark.parametrize("probabilities", [False, True], ids=["labels", "probabilities"])
def test_prepared_class_weights_give_the_same_bits(probabilities):
    """Both passes read prepared weights (the linear form's chunks) as they read a plain weight:
    the same loss, lse, statistics and gradient to the bit."""
    from xentkit.triton.cross_entropy import ClassWeights, row_gradient, row_statistics

    logits, labels, weight = _problem(6, 300, torch.float32)
    weight = weight.to(torch.bfloat16)  # cast to float32 by the preparation
    target = torch.softmax(logits, 1) if probabilities else labels
    formula = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": None}
    scale = torch.linspace(0.5, 2.0, 6, device=DEVICE)
    prepared = ClassWeights.of(weight, logits.device, with_total=not probabilities)
    results = []
    for given in (weight, prepared):
        loss, lse, stats = row_statistics(logits, target, given, **formula)
        gradient = row_gradient(logits, target, given, stats, scale, scale, torch.empty_like(logits), **formula)
        results.append((loss, lse, stats, gradient))
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_prepares_the_class_weights_once(monkeypatch, reduction, smoothing):
    """Every chunk's passes read the weights cast (and summed, where pass 2 reads their total:
    with label smoothing) once for the call: "mean" once in forward (gradients computed there),
    "none" once in forward (no sum) and once in backward."""
    from xentkit.triton import cross_entropy as kernel_module

    preparations = []
    prepare = kernel_module.ClassWeights.of.__func__

    def counting(cls, weight, device, *, with_total):
        prepared = prepare(cls, weight, device, with_total=with_total)
        if prepared is not weight:
            preparations.append(with_total)
        return prepared

    monkeypatch.setattr(kernel_module.ClassWeights, "of", classmethod(counting))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(10, 6, generator=generator).to(DEVICE).requires_grad_()
    w = torch.randn(40, 6, generator=generator).to(DEVICE).requires_grad_()
    target = torch.randint(0, 40, (10,), generator=generator).to(DEVICE)
    weight = (torch.rand(40, generator=generator) + 0.5).to(DEVICE)
    loss = xt.linear_cross_entropy(
        x, w, target, weight=weight, reduction=reduction, chunk_size=4, backend="triton", label_smoothing=smoothing,
    )
    loss.backward(torch.ones_like(loss))  # 3 chunks
    summed = smoothing > 0
    assert preparations == ([summed] if reduction == "mean" else [False, summed])


def test_label_smoothing_with_signed_weights_summing_to_zero_in_a_block(monkeypatch):
    """A block of classes whose weights sum to 0 still adds its weighted logits to the smoothing
    term (the block's W term alone is dropped): the loss agrees with torch and with backward."""
    from xentkit.triton import cross_entropy as kernel_module

    monkeypatch.setattr(kernel_module, "MAX_BLOCK", 2)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    target = torch.tensor([0, 3, 5])
    weight = torch.tensor([1.0, -1.0, 2.0, 0.5, 1.0, 1.0], dtype=torch.float64)  # block 0: 1 − 1 = 0
    want = torch.nn.functional.cross_entropy(logits, target, weight=weight, label_smoothing=0.3, reduction="none")
    got = xt.cross_entropy(
        logits.float().to(DEVICE), target.to(DEVICE), weight=weight.float().to(DEVICE), label_smoothing=0.3,
        reduction="none", backend="triton",
    )
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


def test_an_empty_batch_of_probabilities_keeps_its_graph_on_torch_ops():
    """The "mean" of no sample is 0 with a gradient (of nothing), as on the kernels and in torch."""
    logits = torch.randn(0, 5, requires_grad=True)
    loss = xt.cross_entropy(logits, torch.rand(0, 5), backend="torch")
    assert loss.requires_grad and loss.item() == 0.0
    loss.backward()
    assert logits.grad.shape == (0, 5)


@pytest.mark.parametrize("ratio", [1.0, 4.0, 6.0, 8.0, 10.0, 12.0])
def test_the_softcap_slope_keeps_its_digits_where_tanh_is_near_one(ratio):
    """s'(x) = 1 − tanh²(x/s) lost its digits as tanh neared ±1 (6% at x/s = 8, 0 from 10 on, for
    1.6e-9 at 10); the kernel takes 4e/(1 + e)², e = exp(−2|x/s|), there. Against the exact
    gradient p·s'(x) of a row of zeros and one capped logit (computed in float64 from the
    closed forms, which hold to 1e-15 here)."""
    cap = 30.0
    x = torch.zeros(2, 8)
    x[:, 3] = ratio * cap
    x[1, 3] = -ratio * cap
    x = x.to(DEVICE).requires_grad_()
    loss = xt.cross_entropy(x, torch.tensor([0, 0], device=DEVICE), softcap=cap, reduction="sum", backend="triton")
    (grad,) = torch.autograd.grad(loss, x)
    for row, sign in ((0, 1.0), (1, -1.0)):
        z = cap * np.tanh(sign * ratio)
        p = np.exp(z) / (7.0 + np.exp(z))
        e = np.exp(-2.0 * ratio)
        slope = 4.0 * e / (1.0 + e) ** 2
        assert abs(float(grad[row, 3]) - p * slope) <= 4e-6 * p * slope


def test_a_row_without_target_mass_is_nan_where_its_softmax_is():
    """As the kernels and the reference (``test_probability_kernel.py``): targets of no mass give
    loss 0, or NaN with a NaN or +inf logit or a row of −inf only, as the gradient there."""
    logits = torch.zeros(4, 3)
    logits[0, 0] = float("nan")
    logits[1, 0] = float("inf")
    logits[2] = float("-inf")
    logits[3, 0] = float("-inf")
    logits = logits.to(DEVICE).requires_grad_()
    loss = xt.cross_entropy(logits, torch.zeros(4, 3).to(DEVICE), reduction="none", backend="triton")
    loss.sum().backward()
    np.testing.assert_array_equal(loss.detach().cpu().numpy(), [np.nan, np.nan, np.nan, 0.0])
    assert logits.grad[:3].isnan().all() and not logits.grad[3].any()


@pytest.mark.usefixtures("chunked")
def test_probabilities_and_smoothing_keep_float32_accuracy_far_from_zero():
    """Logits near +1e4 in float32: the mass terms take lse − t_c as (M − t_c) + log d, not from
    the float32 lse (which has lost half an ulp of 1e4, 5e-4: a review measured 4.7e-5 relative
    error on the loss with probability targets, 1000× torch's float32 error); now as torch's."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1000, generator=generator) * 2 + 1e4
    q = torch.softmax(torch.randn(4, 1000, generator=generator), 1)
    labels = torch.randint(0, 1000, (4,), generator=generator)
    for target, options in ((q, {}), (labels, {"label_smoothing": 0.1}), (labels, {"label_smoothing": 1.0})):
        want = torch.nn.functional.cross_entropy(
            logits.double(), target.double() if target.is_floating_point() else target, reduction="none", **options
        )
        got = xt.cross_entropy(logits.to(DEVICE), target.to(DEVICE), reduction="none", backend="triton", **options)
        np.testing.assert_allclose(got.double().cpu().numpy(), want.numpy(), rtol=4e-7, err_msg=str(options))


def test_torch_func_and_forward_ad_take_torch_ops_not_the_kernels(monkeypatch):
    """The Triton path's autograd Functions have no vmap or jvp: under torch.func transforms and
    forward-mode AD "auto" runs torch ops (as on the CPU), "triton" says it cannot (before, both
    raised torch's functorch error on CUDA tensors)."""
    from xentkit.torch import _triton_path, functional

    monkeypatch.setattr(functional, "SMALL_MAX_LOGITS", 0)
    if DEVICE == "cpu":  # what "auto" sees for a CUDA tensor
        monkeypatch.setattr(_triton_path, "_is_cuda", lambda tensor: True)
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    y = torch.tensor([0, 1, 2, 3]).to(DEVICE)
    w, h = torch.randn(30, 8).to(DEVICE), torch.randn(4, 8).to(DEVICE)
    F = torch.nn.functional
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call: it does not run under torch\.func"):
        torch.func.grad(lambda x: xt.cross_entropy(x, y, backend="triton"))(x)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call: it does not run under torch\.func"):
        torch.func.grad(lambda h: xt.linear_cross_entropy(h, w, y, backend="triton"))(h)
    torch.testing.assert_close(
        torch.func.grad(lambda x: xt.cross_entropy(x, y, label_smoothing=0.1))(x),
        torch.func.grad(lambda x: F.cross_entropy(x, y, label_smoothing=0.1))(x),
    )
    torch.testing.assert_close(
        torch.vmap(xt.cross_entropy)(x.reshape(2, 2, 30), y.reshape(2, 2)),
        torch.vmap(F.cross_entropy)(x.reshape(2, 2, 30), y.reshape(2, 2)),
    )
    torch.testing.assert_close(
        torch.func.grad(lambda h: xt.linear_cross_entropy(h, w, y))(h),
        torch.func.grad(lambda h: F.cross_entropy(h @ w.T, y))(h),
    )
    import torch.autograd.forward_ad as forward_ad

    tangent = torch.randn(4, 30, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with forward_ad.dual_level():
        got = forward_ad.unpack_dual(xt.cross_entropy(forward_ad.make_dual(x, tangent), y)).tangent
        expected = forward_ad.unpack_dual(F.cross_entropy(forward_ad.make_dual(x, tangent), y)).tangent
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_path_is_bit_identical_run_to_run(dtype):
    """Same inputs, same bits: loss and gradients of cross_entropy and linear_cross_entropy on the
    Triton path (no atomics; on a GPU this is the check that matters)."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(37, 300, generator=generator).to(dtype).to(DEVICE)
    labels = torch.randint(0, 300, (37,), generator=generator).to(DEVICE)
    weight = (torch.rand(300, generator=generator) + 0.5).to(DEVICE)
    hidden = torch.randn(37, 16, generator=generator).to(dtype).to(DEVICE)
    head = (torch.randn(300, 16, generator=generator) * 0.3).to(dtype).to(DEVICE)

    def run():
        x, h, w = (t.clone().requires_grad_() for t in (logits, hidden, head))
        loss = xt.cross_entropy(x, labels, weight, label_smoothing=0.1, z_loss=1e-3, backend="triton")
        fused = xt.linear_cross_entropy(h, w, labels, weight=weight, chunk_size=16, backend="triton")
        (loss + fused).backward()
        return loss, fused, x.grad, h.grad, w.grad

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


# Runs in a child (a read out of bounds may crash the process rather than fail a test).
FAR_LABELS = r'''
import sys
import torch
import xentkit.torch as xt
device = sys.argv[1]
logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()
for label in (2**40, -2**40, 7):
    labels = torch.tensor([0, label, 2], device=device)
    for weight in (None, torch.rand(7).to(device)):
        loss = xt.cross_entropy(logits, labels, weight, backend="triton", check_labels=False, reduction="none")
        loss.sum().backward()
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all(), loss
        logits.grad = None
print("ok")
'''


def test_an_unchecked_far_label_reads_nothing_out_of_bounds():
    """With check_labels=False a bad label makes its row's loss NaN, and the kernels read nothing
    outside the logits or the class weights, however far the label is (a review found the
    label-guard could be removed with every other test passing: labels C and -3 read adjacent
    memory without a crash)."""
    import os
    import subprocess
    import sys

    env = os.environ | {"TRITON_INTERPRET": "1"} if DEVICE == "cpu" else dict(os.environ)
    done = subprocess.run([sys.executable, "-c", FAR_LABELS, DEVICE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.returncode, done.stderr[-3000:])


@pytest.mark.parametrize("max_block", [4, None], ids=["chunks-of-4", "1-chunk"])
@pytest.mark.parametrize("options", [{}, {"z_loss": 1e-2}, {"label_smoothing": 0.1}, {"softcap": 30.0}])
@pytest.mark.parametrize("target_kind", ["labels", "probabilities"])
def test_a_confident_row_keeps_its_small_loss_and_gradient(monkeypatch, max_block, options, target_kind):
    """A confident row's loss log(1 + δ) with δ far below float32's half ulp of 1 (6e-8): the
    max's terms are counted apart, so the loss is δ to float32's relative accuracy (it was 0)
    and the target entry's gradient −g·e/d keeps its digits (it was 0, or an ulp of g with
    z-loss or smoothing). Ties at the max (two rows) and the max in a later chunk too."""
    from xentkit.triton import cross_entropy as kernel_module

    if max_block is not None:
        monkeypatch.setattr(kernel_module, "MAX_BLOCK", max_block)
    classes, target_at = 10, 6
    rows = []
    for gap, ties in ((20.0, 1), (25.0, 1), (17.0, 1), (20.0, 2)):
        row = np.full(classes, -gap)
        row[target_at] = 0.0
        row[target_at - 3 : target_at - 3 + ties - 1] = 0.0  # a second max in an earlier chunk
        rows.append(row)
    logits = torch.tensor(np.array(rows), dtype=torch.float32)
    labels = torch.full((len(rows),), target_at)
    target = labels if target_kind == "labels" else torch.nn.functional.one_hot(labels, classes).float()
    stored = logits.clone().to(DEVICE)
    formula = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None} | options
    grad = torch.empty_like(stored)
    loss, _lse = cross_entropy_rows(stored, target.to(DEVICE), None, **formula, grad_scale=None,
                                    z_grad_scale=None, grad_out=grad)
    expected_loss, _lse64, expected_grad = _reference(logits, target, None, 1.0, **options)
    assert (loss.cpu().double().numpy() > 0).all()
    # (1e-5: on a GPU tl.exp is ex2.approx of x·log2(e), whose rounding at x = −25 moves a term by
    # about 1.5e-6; the interpreter's is NumPy's exp)
    np.testing.assert_allclose(loss.cpu().double().numpy(), expected_loss, rtol=1e-5)
    # every entry to float32's relative accuracy of itself (the target's is about −δ, or ε-sized)
    np.testing.assert_allclose(grad.cpu().double().numpy(), expected_grad, rtol=1e-5, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "options", [{}, {"weight": [1.0, 2.0, 3.0]}, {"label_smoothing": 0.1}, {"z_loss": 1e-3}],
)
@pytest.mark.parametrize("upstream", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_upstream_gradient_gives_torchs_values(reduction, options, upstream):
    """g·p_y·A − g·w_y, torch's order, is NaN (∞ − ∞) at the target for an infinite upstream g;
    the regrouped form that keeps a confident row's digits (g·(main − main·e)/d) gave −∞ there (a
    review). The Triton path now takes it only for a finite g, as the Numba kernels do."""
    options = dict(options)
    if "weight" in options:
        options["weight"] = torch.tensor(options["weight"], device=DEVICE)
    grads = []
    for backend in ("triton", "torch"):
        x = torch.tensor([[2.0, 0.0, -1.0], [0.0, 5.0, 1.0]], device=DEVICE, requires_grad=True)
        loss = xt.cross_entropy(x, torch.tensor([0, 1], device=DEVICE), reduction=reduction, backend=backend, **options)
        loss.backward(torch.full_like(loss, upstream))
        grads.append(x.grad.cpu())
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True)
    assert grads[0][0, 0].isnan()


@pytest.mark.parametrize("max_block", [1024, None], ids=["chunks-of-1024", "1-chunk"])
@pytest.mark.parametrize("case", ["flat-teacher", "one-hot-elsewhere", "one-hot-elsewhere-smoothed"])
def test_probability_targets_keep_the_max_entry_of_a_flat_row(monkeypatch, max_block, case):
    """The regrouped entry at the max, (A − r_max) − A·e/d, is for confident rows: in a flat row
    (p_max small, e large) its two parts nearly cancel, and the entry kept only float32's
    absolute accuracy of A (a review: 3e-4 relative at 32000 classes with a flat teacher, 6e-5
    with a one-hot target elsewhere). Rows with p_max ≤ 1/2 take the plain form, as the Numba
    kernels do."""
    from xentkit.triton import cross_entropy as kernel_module

    if max_block is not None:
        monkeypatch.setattr(kernel_module, "MAX_BLOCK", max_block)
    classes = 8192
    generator = torch.Generator().manual_seed(0)
    logits = 0.5 * torch.randn(2, classes, generator=generator)
    top = logits.argmax(1)
    options = {"label_smoothing": 0.1} if case.endswith("smoothed") else {}
    if case == "flat-teacher":
        target = torch.softmax(torch.randn(2, classes, generator=generator), 1)
    else:
        target = torch.zeros(2, classes)
        target[:, 3] = 1.0
    formula = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None} | options
    grad = torch.empty_like(logits, device=DEVICE)
    cross_entropy_rows(logits.to(DEVICE), target.to(DEVICE), None, **formula, grad_scale=None,
                       z_grad_scale=None, grad_out=grad)  # fmt: skip
    _loss, _lse, expected = _reference(logits, target, None, 1.0, **options)
    got = grad.cpu().double().numpy()
    rows = np.arange(2)
    np.testing.assert_allclose(got[rows, top.numpy()], expected[rows, top.numpy()], rtol=5e-6, atol=0)
    # the others: p_j·A − r_j cancels where p_j ≈ r_j, in any float32 arithmetic (torch's too)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-7 * np.abs(expected).max())


@pytest.mark.parametrize("max_block", [64, None], ids=["chunks-of-64", "1-chunk"])
@pytest.mark.parametrize("case", ["one-hot-smoothed", "sharp-teacher", "tied-maxima"])
def test_probability_targets_keep_the_max_entrys_own_accuracy(monkeypatch, max_block, case):
    """With probability targets the gradient entry at a confident row's max is g·(A·p_max − r_max),
    A = Σ_j r_j: with A summed in float32 whole, A − r_max kept only about 1e-7 of A absolute (a
    review under the interpreter: C = 1000, a gap of 30, a one-hot target with smoothing 1e-3
    gave 2.1e-4 relative; a sharp teacher's entries near 1e-5 were 8.6e-3 off). The max's target
    mass is now summed apart, so the entry keeps float32's relative accuracy of itself, as the
    same targets given as a label do."""
    from xentkit.triton import cross_entropy as kernel_module

    if max_block is not None:
        monkeypatch.setattr(kernel_module, "MAX_BLOCK", max_block)
    classes, top = 1000, 617
    generator = torch.Generator().manual_seed(3)
    logits = -30.0 - torch.rand(3, classes, generator=generator, dtype=torch.float64)
    logits[:, top] = 0.0
    options = {"label_smoothing": 1e-3} if case == "one-hot-smoothed" else {}
    target = torch.zeros(3, classes, dtype=torch.float64)
    if case == "one-hot-smoothed":
        target[:, top] = 1.0
    else:
        target += 1e-5 * torch.rand(3, classes, generator=generator, dtype=torch.float64)
        target[:, top] = 1.0 - (target.sum(1) - target[:, top])
    if case == "tied-maxima":  # a second max, in another chunk, with its own target mass
        logits[:, 5] = 0.0
        target[:, 5], target[:, top] = 0.25, target[:, top] - 0.25
    logits, target = logits.float(), target.float()
    formula = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None} | options
    grad = torch.empty_like(logits, device=DEVICE)
    cross_entropy_rows(logits.to(DEVICE), target.to(DEVICE), None, **formula, grad_scale=None,
                       z_grad_scale=None, grad_out=grad)
    _loss, _lse, expected = _reference(logits, target, None, 1.0, **options)
    got = grad.cpu().double().numpy()
    # every entry to float32's relative accuracy of itself (the max's is −Σ_{j≠max} r_j-sized)
    np.testing.assert_allclose(got[:, top], expected[:, top], rtol=2e-6, atol=0)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-12)


@pytest.mark.parametrize("check_labels", [True, False])
def test_a_uint64_label_beyond_int64_is_refused_as_on_every_other_path(check_labels):
    """The Triton prologues cast labels with ``.long()``, which wraps 2**64 − 100 onto −100, the
    default ignore_index: the row was silently ignored (loss 0), where every other path refuses
    the label (a review, 2026-12-07). They cast as the others do now (``_bridge.int64_labels``)."""
    import xentkit.torch as xt

    logits = torch.randn(3, 20, device=DEVICE)
    target = torch.tensor([1, 2**64 - 100, 2], dtype=torch.uint64, device=DEVICE)
    hidden, weight = torch.randn(3, 4, device=DEVICE), torch.randn(20, 4, device=DEVICE)
    message = r"target has label 18446744073709551516 at position \(1,\), too large for a class index"
    with pytest.raises(ValueError, match=message):
        xt.cross_entropy(logits, target, reduction="none", backend="triton", check_labels=check_labels)
    with pytest.raises(ValueError, match=message):
        xt.linear_cross_entropy(hidden, weight, target, reduction="none", backend="triton", check_labels=check_labels)
    good = target.clone()
    good[1] = 7
    expected = xt.cross_entropy(logits, good.long(), reduction="none", backend="torch")
    torch.testing.assert_close(xt.cross_entropy(logits, good, reduction="none", backend="triton"), expected)
