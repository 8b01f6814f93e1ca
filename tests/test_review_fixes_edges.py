"""Where the reviews of 2026-12-06 (a differential sweep of ``xentkit.torch`` against torch, one of
the NumPy api against the reference, the vocabulary-parallel forms, the Triton path under the
interpreter, and a read of the day's change) found xentkit apart from torch, from its reference or
from its own documentation: each test fails on the commit before its fix."""

from __future__ import annotations

import math

import numpy as np
import pytest

import xentkit

torch = pytest.importorskip("torch")

# isort: split
import torch.nn.functional as F  # noqa: E402

import xentkit.torch as xt  # noqa: E402

# ---- probability targets: the class weights' dtype joins the loss's, as torch's ---------------


@pytest.mark.parametrize(
    ("logits", "weight", "rows"),
    [
        (torch.bfloat16, torch.float32, 8),  # the torch-ops path
        (torch.float32, torch.float64, 8),  # small (torch's kernel refuses: the kernels)
        (torch.float32, torch.float64, 20000),  # the kernels
        (torch.float16, torch.float32, 20000),
        (torch.float32, torch.float16, 8),  # a narrower weight: the logits' dtype
    ],
)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_probability_targets_promote_with_the_class_weights_dtype(logits, weight, rows, backend):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 5, generator=generator).to(logits)
    q = torch.softmax(torch.randn(rows, 5, generator=generator), 1).to(logits)
    w = torch.rand(5, generator=generator).to(weight)
    loss = xt.cross_entropy(x, q, w, backend=backend)
    want = F.cross_entropy(x, q, w)
    assert loss.dtype == want.dtype == torch.promote_types(logits, weight)
    torch.testing.assert_close(loss, want, rtol=2e-3 if logits == torch.bfloat16 else 1e-5, atol=0)


def test_a_half_sum_of_probabilities_does_not_overflow_with_float32_weights():
    """A float16 "sum" of 40000 rows is beyond float16 (65504): torch returns it in float32
    (the weights' dtype), as xentkit now does (it returned float16 inf)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40000, 5, generator=generator).half()
    q = torch.softmax(torch.randn(40000, 5, generator=generator), 1).half()
    loss = xt.cross_entropy(x, q, torch.ones(5), reduction="sum")
    want = F.cross_entropy(x, q, torch.ones(5), reduction="sum")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)


def test_the_module_and_the_compiled_call_promote_too():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(300, 300, generator=generator)
    q = torch.softmax(torch.randn(300, 300, generator=generator), 1)
    w = torch.rand(300, generator=generator, dtype=torch.float64)
    assert xt.CrossEntropyLoss(weight=w)(x, q).dtype == torch.float64
    assert torch.compile(xt.cross_entropy, backend="aot_eager")(x, q, w).dtype == torch.float64


# ---- an upstream gradient beyond the logits' dtype: the kernels round it as the reference -----


def _both(function, *args, **kwargs):
    results = []
    for reference in (False, True):
        with xentkit.use_reference(reference):
            results.append(function(*args, **kwargs))
    return results


def test_an_upstream_beyond_float32_is_inf_on_the_kernels_as_in_the_reference():
    """1e39 is inf in float32: the reference (and torch) take it so, g·(p − 1) = NaN at the
    target; the kernels had taken it in float64 (−inf there, finite values with probabilities)."""
    x = np.array([[0.5, -1.0, 2.0]], np.float32)
    q = np.array([[0.2, 0.3, 0.5]], np.float32)
    for target in ([0], q):
        (_, kernel), (_, reference) = _both(
            xentkit.cross_entropy_and_grad, x, target, reduction="none", grad_output=[1e39]
        )
        np.testing.assert_array_equal(kernel, reference)
        wide = torch.tensor(x, requires_grad=True)
        F.cross_entropy(wide, torch.tensor(target), reduction="none").backward(torch.tensor([np.inf], dtype=torch.float32))
        np.testing.assert_array_equal(kernel, wide.grad.numpy())
    kernel, reference = _both(xentkit.log_probs_backward, x, [0], [1e39])
    np.testing.assert_array_equal(kernel, reference)
    assert np.isnan(kernel[0, 0]) and (kernel[0, 1:] == -np.inf).all()


# ---- arrays that hold no numbers: a TypeError naming what came ---------------------------------


@pytest.mark.parametrize("value", [None, "01", {"a": 1}, np.array(["a", "b"]), np.array([None, None])])
@pytest.mark.parametrize("function", [xentkit.cross_entropy, xentkit.nll_loss])
def test_a_target_that_holds_no_numbers_is_a_type_error_naming_it(function, value):
    """It was a ValueError about the shape of class indices (cross_entropy) or a TypeError about
    their dtype, "got dtype object", never saying what came."""
    with pytest.raises(TypeError, match=r"^target must be a numeric array, got (NoneType None|str '01'|dict|an array of dtype)"):
        function(np.zeros((2, 3)), value)


@pytest.mark.parametrize("value", [None, "abc", {"a": 1}, np.array(["x"])])
def test_logits_that_hold_no_numbers_are_a_type_error_naming_them(value):
    for function in (xentkit.softmax, xentkit.logsumexp):
        with pytest.raises(TypeError, match=r"^x must be a numeric array, got "):
            function(value)
    with pytest.raises(TypeError, match=r"^logits must be a numeric array, got "):
        xentkit.cross_entropy(value, [0])


# ---- one sample's [C] logits on torch's kernel: a second derivative, as torch's ---------------


def _second(function, x, *args, **kwargs):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(function(x, *args, **kwargs), x, create_graph=True)
    return torch.autograd.grad(g.pow(2).sum(), x)[0]


@pytest.mark.parametrize("case", ["label", "weighted smoothing", "probabilities", "weighted probabilities", "none"])
def test_one_samples_logits_have_a_second_derivative(case):
    """Per-sample losses of ``[C]`` logits (MAML-style meta-learning) raised "no second derivative"
    (the kernels), where torch computes it: they run torch's kernel now, as ``[1, C]`` did."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, generator=generator, dtype=torch.float64)
    w = torch.rand(5, generator=generator, dtype=torch.float64)
    q = torch.softmax(torch.randn(5, generator=generator, dtype=torch.float64), 0)
    args, kwargs = {
        "label": ((torch.tensor(2),), {}),
        "weighted smoothing": ((torch.tensor(2), w), {"label_smoothing": 0.1}),
        "probabilities": ((q,), {}),
        "weighted probabilities": ((q, w), {}),
        "none": ((torch.tensor(2),), {"reduction": "none"}),
    }[case]
    torch.testing.assert_close(_second(xt.cross_entropy, x, *args, **kwargs), _second(F.cross_entropy, x, *args, **kwargs))
    torch.testing.assert_close(xt.cross_entropy(x, *args, **kwargs), F.cross_entropy(x, *args, **kwargs))


def test_one_samples_nll_loss_and_its_errors():
    x = torch.log_softmax(torch.randn(5, dtype=torch.float64), 0)
    torch.testing.assert_close(_second(xt.nll_loss, x, torch.tensor(2)), _second(F.nll_loss, x, torch.tensor(2)))
    torch.testing.assert_close(xt.nll_loss(x, torch.tensor(2)), F.nll_loss(x, torch.tensor(2)))
    with pytest.raises(ValueError, match=r"^target has label 7 at position \(\) but log_probs have 5 classes"):
        xt.nll_loss(x, torch.tensor(7))
    with pytest.raises(ValueError, match=r"^target has label 7 at position \(\) but logits have 5 classes"):
        xt.cross_entropy(torch.randn(5), torch.tensor(7))
    # an ignored sample: xentkit's "mean" of nothing, 0 (torch: NaN)
    assert xt.cross_entropy(torch.randn(5), torch.tensor(-100)).item() == 0.0


# ---- a class weight that requires grad, with class indices: its gradient -----------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_a_class_weight_is_differentiated_with_class_indices(reduction, label_smoothing):
    """torch's cross_entropy and nll_loss raise ("not differentiable w.r.t. weight"); xentkit's
    torch ops differentiate the loss's own formula, the "mean"'s denominator Σ w_y included
    (docs/torch.md). Against the formula written out in float64."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    y = torch.tensor([1, 2, -100, 4, 0, 1])
    weight = (torch.rand(5, generator=generator, dtype=torch.float64) + 0.5).requires_grad_()
    loss = xt.cross_entropy(x, y, weight, reduction=reduction, label_smoothing=label_smoothing)
    (got,) = torch.autograd.grad(loss.sum(), weight)
    wide = weight.detach().clone().requires_grad_()
    log_p = torch.log_softmax(x, 1)
    valid = y != -100
    safe = y.clamp(min=0)
    rows = (1 - label_smoothing) * -wide[safe] * log_p[torch.arange(6), safe]
    rows = rows + label_smoothing / 5 * -(wide * log_p).sum(1)
    rows = torch.where(valid, rows, 0.0)
    want = rows.sum() / wide[safe][valid].sum() if reduction == "mean" else rows.sum()
    (expected,) = torch.autograd.grad(want, wide)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    if label_smoothing == 0.0:  # nll_loss of the log-probabilities: the same loss and gradient
        nll = xt.nll_loss(log_p, y, weight, reduction=reduction)
        torch.testing.assert_close(torch.autograd.grad(nll.sum(), weight)[0], expected, rtol=1e-12, atol=1e-14)


# ---- vocabulary-parallel smoothing over rows of huge logits -----------------------------------


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("fill", [-3e38, -1e15])
def test_vocabulary_parallel_smoothing_keeps_rows_of_huge_logits(backend, fill):
    """A row filled with a huge finite value and left valid (a mask by finfo.min): the smoothing
    term was W·lse − Σ w_c·z_c, two numbers of V·|lse| that cancelled (−4.3e21 for log 7 at
    −3e38); each shard now sums w_c·(z_c − its max), restated at the row's max. In a world of
    one here (tests/test_distributed.py: over ranks); Triton under the interpreter."""
    from xentkit.torch.distributed import vocab_parallel_cross_entropy

    dtype = torch.float32 if backend == "triton" else torch.float64
    z = torch.full((2, 7), fill, dtype=dtype)
    z[1, 2] = fill + abs(fill) * 1e-7  # a spread the dtype holds
    target = torch.tensor([3, 2])
    weight = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
    for w in (None, weight):
        loss = vocab_parallel_cross_entropy(
            z, target, weight=None if w is None else w.to(dtype), label_smoothing=0.1, reduction="none",
            backend=backend,
        )
        want = F.cross_entropy(z.double(), target, w, label_smoothing=0.1, reduction="none")
        torch.testing.assert_close(loss.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


# ---- a review of the Triton path (under the interpreter) ---------------------------------------


def test_compiled_triton_log_probs_take_the_custom_ops_at_every_size():
    """Up to SMALL_MAX_LOGITS logits the compiled call traced torch ops, which backend="triton"
    refuses ("cannot run under torch.compile"): a compiled loop failed on its last, smaller
    batch. It takes the Triton custom ops at every size now, as cross_entropy does."""
    compiled = torch.compile(lambda a, t: xt.log_probs(a, t, backend="triton"), fullgraph=True, backend="aot_eager")
    generator = torch.Generator().manual_seed(5)
    for rows in (8, 3):  # 72000 logits, then 27000
        x = torch.randn(rows, 9000, generator=generator, requires_grad=True)
        y = torch.randint(0, 9000, (rows,), generator=generator)
        out = compiled(x, y)
        out.sum().backward()
        wide = x.detach().double().requires_grad_()
        want = torch.log_softmax(wide, 1).gather(1, y[:, None])[:, 0]
        want.sum().backward()
        torch.testing.assert_close(out.detach().double(), want.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), wide.grad, rtol=1e-4, atol=1e-6)


def test_a_complex_class_weight_with_probabilities_is_a_type_error_on_every_backend():
    """backend="auto" raised a KeyError (the loss's dtype promoted to complex before the weight
    was looked at); the others, and class indices, raised the TypeError."""
    x, q = torch.randn(4, 6), torch.softmax(torch.randn(4, 6), 1)
    for backend in ("auto", "torch"):
        with pytest.raises(TypeError, match=r"weight must be a numeric array, got dtype complex64"):
            xt.cross_entropy(x, q, torch.ones(6, dtype=torch.complex64), backend=backend)


def test_a_small_weighted_call_redirected_for_a_masked_target_keeps_a_second_derivative():
    """A small call with class weights whose NaN (a masked target of weight 0) leaves torch's
    kernel runs torch ops, not the kernels: a second derivative, torch's on the other rows
    (it had gone to the kernels, which have none: a review)."""
    x = torch.tensor([[1.0, 2.0, -math.inf], [0.0, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    target = torch.tensor([2, 1])
    for reduction in ("mean", "sum", "none"):
        loss = xt.cross_entropy(x, target, weight, reduction=reduction)
        (g,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.pow(2).sum(), x)
        row = x.detach()[1:].clone().requires_grad_()
        want = F.cross_entropy(row, target[1:], weight, reduction=reduction)  # (Σ w_y is row 1's alone)
        (g_row,) = torch.autograd.grad(want.sum(), row, create_graph=True)
        (h_row,) = torch.autograd.grad(g_row.pow(2).sum(), row)
        torch.testing.assert_close(loss.detach().sum(), want.detach().sum())
        assert torch.equal(h[0], torch.zeros(3, dtype=torch.float64))
        torch.testing.assert_close(h[1:], h_row)
        if reduction == "none":
            assert loss[0].item() == 0.0 and math.copysign(1.0, loss[0].item()) == 1.0  # +0, as the kernels


def test_one_weight_value_for_all_only_on_a_scalar_input():
    """A [[2.0]] weight beside a [3] input is refused, as torch refuses it (the scalar input's
    one-value rule had reached every input)."""
    for name in ("weight", "pos_weight"):
        with pytest.raises(ValueError, match=rf"^{name} must broadcast to the input's shape \(3,\), got shape \(1, 1\)"):
            xentkit.binary_cross_entropy_with_logits(np.zeros(3), np.ones(3), **{name: [[2.0]]})


# ---- nll_loss on half-precision log-probabilities: one rounding, at the end -------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_half_nll_loss_with_class_weights_rounds_once(dtype, reduction):
    """The torch-ops nll_loss (half-precision log-probabilities) reduces float32 per-row losses and
    rounds once: it had reduced the rows' weighted losses already rounded to bfloat16, so a "sum"
    over mixed-sign weights came out −58.5 where the exact −58.2421875 rounds to −58.25 (a review).
    Over random batches the result is the float64 loss rounded once: within half an ulp of it."""
    log_p = torch.tensor([[-4.4375, -1.5703125], [-4.8125, -2.515625], [-3.875, -2.984375]], dtype=dtype)
    weight = torch.tensor([-4.4375, 2.546875], dtype=dtype)
    labels = torch.tensor([0, 0, 0])
    exact = F.nll_loss(log_p.double(), labels, weight.double(), reduction=reduction)
    assert xt.nll_loss(log_p, labels, weight, reduction=reduction) == exact.to(dtype)
    generator = torch.Generator().manual_seed(4)
    for _ in range(50):
        log_p = torch.log_softmax(torch.randn(64, 7, generator=generator) * 3, 1).to(dtype)
        weight = (torch.randn(7, generator=generator) * 3).to(dtype)
        labels = torch.randint(0, 7, (64,), generator=generator)
        got = xt.nll_loss(log_p, labels, weight, reduction=reduction)
        exact = F.nll_loss(log_p.double(), labels, weight.double(), reduction=reduction)
        assert got.dtype == dtype
        assert got == exact.to(dtype), (got, exact)


# ---- the NumPy api: a result beyond the dtype is inf without NumPy's overflow warning ----------


@pytest.mark.filterwarnings("error")
def test_losses_beyond_the_dtype_are_inf_without_a_warning():
    """As elsewhere in the api (and as torch), a loss or gradient that overflows its dtype is inf
    quietly: the reference's sums and its binary cross-entropy on probabilities had let NumPy's
    "overflow encountered" RuntimeWarning out (a review)."""
    loss, grad = xentkit.binary_cross_entropy_and_grad(
        np.float32([0.0]), np.float32([1.0]), weight=np.float32([1e27]), reduction="none"
    )
    assert loss[0] == np.float32(1e29) and grad[0] == -np.inf
    assert xentkit.nll_loss(np.array([[-1e308], [-1e308]]), [0, 0], reduction="sum") == np.inf
    with xentkit.use_reference():
        assert xentkit.binary_cross_entropy_with_logits(np.array([-1e308, -1e308]), np.array([1.0, 1.0]),
                                                        reduction="sum") == np.inf
        assert xentkit.binary_cross_entropy(np.array([0.5]), np.array([1.0]), weight=np.array([1e308]),
                                            reduction="sum") == pytest.approx(1e308 * math.log(2))
        # class weights: w·q·log p beyond float32 (a second review)
        loss = xentkit.cross_entropy(np.float32([[0, -100]]), [1], weight=np.float32([1, 1e37]), reduction="none")
        assert loss[0] == np.inf


# ---- half-precision targets and operands: the arithmetic of the logits or better ---------------


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("target_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_half_probability_target_is_smoothed_in_the_logits_arithmetic(logits_dtype, target_dtype, backend):
    """A bfloat16 (or float16) probability target beside float32/float64 logits: the smoothed mass
    (1 − ε)·q + ε/C in the logits' arithmetic, as the kernels; the torch-ops path had rounded it in
    the target's half dtype (a float64 loss 0.2% off, its gradient 1%: a review)."""
    x = torch.tensor([[2.0, -1.0, 0.5], [0.25, 3.0, -2.0]], dtype=logits_dtype, requires_grad=True)
    target = torch.tensor([[0.7, 0.2, 0.1], [0.15, 0.8, 0.05]], dtype=target_dtype)
    loss = xt.cross_entropy(x, target, label_smoothing=0.1, reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_()
    exact = F.cross_entropy(x64, target.double(), label_smoothing=0.1, reduction="sum")
    (exact_grad,) = torch.autograd.grad(exact, x64)
    tolerance = 1e-12 if logits_dtype == torch.float64 else 1e-6
    assert loss.item() == pytest.approx(exact.item(), rel=tolerance)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=tolerance, atol=tolerance)


def test_bfloat16_binary_cross_entropy_on_the_cpu_runs_the_kernel():
    """bfloat16 operands on the CPU are widened to float32 for the kernel (float64 arithmetic, the
    stable forms); torch's float32 kernel, which they had taken, cancels: a loss 4.9% off at
    x = −20, y = 1e-6, and the gradient at x = 16.5 with pos_weight 4 75% off (a review). The loss
    and gradient come in torch's dtypes, each within its rounding of the float64 values."""
    x = torch.tensor([-12.0, -20.0, 12.0, 16.5, 20.0], dtype=torch.bfloat16, requires_grad=True)
    for target, pos_weight in (
        (torch.tensor([3e-5, 1e-6, 1.0, 1.0, 1.0]), None),
        (torch.ones(5, dtype=torch.bfloat16), torch.tensor([4.0], dtype=torch.bfloat16)),
    ):
        loss = xt.binary_cross_entropy_with_logits(x, target, pos_weight=pos_weight, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x)
        x64 = x.detach().double().requires_grad_()
        exact = F.binary_cross_entropy_with_logits(
            x64, target.double(), pos_weight=None if pos_weight is None else pos_weight.double(), reduction="none"
        )
        (exact_grad,) = torch.autograd.grad(exact.sum(), x64)
        assert loss.dtype == target.dtype and grad.dtype == torch.bfloat16
        ulp = 2.0 ** -7 if loss.dtype == torch.bfloat16 else 2.0 ** -23
        torch.testing.assert_close(loss.double(), exact, rtol=ulp, atol=0)
        torch.testing.assert_close(grad.double(), exact_grad, rtol=2.0 ** -7, atol=0)


@pytest.mark.parametrize("how", ["target requires grad", "compiled"])
def test_half_binary_cross_entropy_on_torch_ops_takes_the_stable_form(how):
    """Half-precision operands on the torch-ops path (CUDA; on the CPU a target that requires grad,
    torch.compile) compute w·[(1 − y)·softplus(x) + pw·y·softplus(−x)] in float32: torch's float32
    formula, which they had run, cancels (the cases of the kernel test above: 4.9% and 75% off)."""
    x = torch.tensor([-12.0, -20.0, 12.0, 16.5, 20.0], dtype=torch.bfloat16, requires_grad=True)
    target = torch.ones(5, dtype=torch.bfloat16, requires_grad=how == "target requires grad")
    pos_weight = torch.tensor([4.0], dtype=torch.bfloat16)

    def loss_of(x, target):
        return xt.binary_cross_entropy_with_logits(x, target, pos_weight=pos_weight, reduction="none")

    if how == "compiled":
        loss_of = torch.compile(loss_of, backend="aot_eager", fullgraph=True)
    loss = loss_of(x, target)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    x64 = x.detach().double().requires_grad_()
    exact = F.binary_cross_entropy_with_logits(x64, target.detach().double(), pos_weight=pos_weight.double(),
                                               reduction="none")
    (exact_grad,) = torch.autograd.grad(exact.sum(), x64)
    assert loss.dtype == grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), exact, rtol=2.0**-8, atol=0)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=2.0**-7, atol=0)
    small = xt.binary_cross_entropy_with_logits(x[:2], torch.tensor([3e-5, 1e-6], requires_grad=True), reduction="none")
    exact_small = F.binary_cross_entropy_with_logits(x64[:2].detach(), torch.tensor([3e-5, 1e-6], dtype=torch.float64),
                                                     reduction="none")
    torch.testing.assert_close(small.double(), exact_small, rtol=1e-6, atol=0)  # a float32 loss
