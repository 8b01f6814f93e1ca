"""Class weights ``1 / count`` give ``inf`` to a class no sample has. Without label smoothing
that weight is never read: every path gives torch's finite loss and gradient (the smoothing
terms, absent, must not make 0·inf = NaN)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import xentkit

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import xentkit.torch as xt  # noqa: E402
from xentkit.torch import distributed  # noqa: E402

LOGITS = np.array([[1.0, 2.0, 3.0, 0.5], [0.5, 0.1, -1.0, 2.0], [0.0, 0.3, 0.2, -0.4]])
TARGET = np.array([0, 1, 3])
WEIGHT = np.array([1.0, 2.0, np.inf, 0.5])  # class 2: no sample


def _torch_expected(reduction: str, softcap: float | None = None):
    logits = torch.tensor(LOGITS, requires_grad=True)
    capped = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(capped, torch.tensor(TARGET), torch.tensor(WEIGHT), reduction=reduction)
    loss.sum().backward()
    return loss.detach().numpy(), logits.grad.numpy()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("reference", [False, True], ids=["kernel", "reference"])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("in_place", [False, True])
def test_numpy_api(reduction, reference, softcap, in_place):
    want_loss, want_grad = _torch_expected(reduction, softcap)
    logits = LOGITS.copy()
    with xentkit.use_reference(reference):
        loss, grad = xentkit.cross_entropy_and_grad(
            logits, TARGET, weight=WEIGHT, reduction=reduction, softcap=softcap, out=logits if in_place else None
        )
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15)


_TRITON = pytest.param(
    "triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("path", ["auto", "kernel", "torch", _TRITON, "linear", "vocab_parallel"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_torch_paths(path, reduction, softcap, request):
    """"auto" is a small problem (torch's own kernel without a softcap), "kernel" xentkit's."""
    if softcap is not None and path == "vocab_parallel":
        pytest.skip("the vocabulary-parallel functions take no softcap")
    want_loss, want_grad = _torch_expected(reduction, softcap)
    cap = {} if softcap is None else {"softcap": softcap}
    dtype = torch.float32 if path == "triton" else torch.float64
    logits = torch.tensor(LOGITS, dtype=dtype, requires_grad=True)
    target, weight = torch.tensor(TARGET), torch.tensor(WEIGHT, dtype=dtype)
    if path == "linear":  # logits = x·Wᵀ with x the identity: W's gradient is the logits' (transposed)
        head = logits.detach().t().contiguous().requires_grad_()
        loss = xt.linear_cross_entropy(
            torch.eye(3, dtype=dtype), head, target, weight=weight, reduction=reduction, **cap
        )
        loss.sum().backward()
        grad = head.grad.t()
    elif path == "vocab_parallel":
        loss = distributed.vocab_parallel_cross_entropy(logits, target, weight=weight, reduction=reduction)
        loss.sum().backward()
        grad = logits.grad
    else:
        if path == "kernel":
            request.getfixturevalue("kernel_path")
        backend = "auto" if path == "kernel" else path
        loss = xt.cross_entropy(logits, target, weight, reduction=reduction, backend=backend, **cap)
        loss.sum().backward()
        grad = logits.grad
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.isfinite(grad).all()
    np.testing.assert_allclose(loss.detach().double().numpy(), want_loss, rtol=tolerance)
    np.testing.assert_allclose(grad.double().numpy(), want_grad, rtol=tolerance, atol=tolerance)


# Infinite or NaN class weights that *are* read: on a target's class, or on any class under label
# smoothing (which reads them all). Every path gives torch's ±inf and NaN, entry for entry (the
# kernel's smoothing sum, W·((m − r) + log s) − S_z, was ∞ − ∞ = NaN where torch has +inf; the
# reference's target term was w_y·0 = NaN off the target).
_READ_CASES = {
    "inf on a target": (np.array([np.inf, 1.0, 1.0, 2.0]), 0.0),
    "inf, smoothing": (np.array([np.inf, 1.0, 1.0, 2.0]), 0.1),
    "inf on no target, smoothing": (WEIGHT, 0.1),
    "-inf, smoothing": (np.array([1.0, -np.inf, 1.0, 2.0]), 0.2),
    "nan, smoothing": (np.array([1.0, 1.0, np.nan, 2.0]), 0.1),
}


@pytest.mark.parametrize("case", list(_READ_CASES))
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize(
    "path", ["kernel", "reference", "kernel in place", "xentkit.torch", "torch ops", _TRITON, "vocab_parallel", "linear"]
)
def test_weights_that_are_read_give_torchs_infinities_and_nans(case, reduction, path, request):
    weight, smoothing = _READ_CASES[case]
    logits = torch.tensor(LOGITS, requires_grad=True)
    want = F.cross_entropy(
        logits, torch.tensor(TARGET), torch.tensor(weight), reduction=reduction, label_smoothing=smoothing
    )
    want.sum().backward()
    want_loss, want_grad = want.detach().numpy(), logits.grad.numpy()
    if path in ("kernel", "reference", "kernel in place"):
        array = LOGITS.copy()
        with xentkit.use_reference(path == "reference"):
            loss, grad = xentkit.cross_entropy_and_grad(
                array, TARGET, weight=weight, reduction=reduction, label_smoothing=smoothing,
                out=array if path == "kernel in place" else None,
            )
    else:
        if path == "xentkit.torch":
            request.getfixturevalue("kernel_path")
        dtype = torch.float32 if path == "triton" else torch.float64
        tensor = torch.tensor(LOGITS, dtype=dtype, requires_grad=True)
        options = {"weight": torch.tensor(weight, dtype=dtype), "reduction": reduction, "label_smoothing": smoothing}
        if path == "vocab_parallel":  # a world of one: the whole vocabulary is this shard
            result = distributed.vocab_parallel_cross_entropy(tensor, torch.tensor(TARGET), **options)
        elif path == "linear":  # logits = x·Wᵀ with x the identity: W's gradient is the logits'
            head = tensor.detach().t().contiguous().requires_grad_()
            result = xt.linear_cross_entropy(torch.eye(3, dtype=dtype), head, torch.tensor(TARGET), **options)
        else:
            backend = {"xentkit.torch": "auto", "torch ops": "torch"}.get(path, path)
            result = xt.cross_entropy(tensor, torch.tensor(TARGET), backend=backend, **options)
        result.sum().backward()
        if path == "linear":  # (x·Wᵀ's gradient for W is gradᵀ·x, in which 0·inf is NaN, as in torch)
            want_grad = torch.tensor(want_grad).t().matmul(torch.eye(3, dtype=torch.float64)).t().numpy()
        loss = result.detach().double().numpy()
        grad = (head.grad.t() if path == "linear" else tensor.grad).double().numpy()
    tolerance = 1e-6 if path == "triton" else 1e-12
    if path == "vocab_parallel" and smoothing:
        # documented: the shards' W·lse − S_z (no class's own term is ever formed) is NaN where
        # torch's Σ_c w_c·(lse − z_c) is ±inf; the gradient is torch's
        assert np.all(np.isnan(loss) | (loss == want_loss)) and not np.isfinite(want_loss).any()
    else:
        np.testing.assert_allclose(loss, want_loss, rtol=tolerance, equal_nan=True)
    np.testing.assert_allclose(grad, want_grad, rtol=tolerance, atol=tolerance, equal_nan=True)


# One dominant logit: the float32 lse equals the row's maximum, so the Triton loss's chunk term
# W_c·(lse − t_c) was inf·0 = NaN where torch's Σ_c w_c·(lse − z_c) is ±inf.
_DOMINANT = np.array([[30.0, 0.0, 1.0, -1.0], [0.5, 2.0, 0.1, 0.0]])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("weight", [[1.0, np.inf, 1.0, 1.0], [1.0, 2.0, 1.0, -np.inf], [1.0, np.nan, 1.0, 1.0]])
@pytest.mark.parametrize("probabilities", [False, True], ids=["labels, smoothing", "probabilities"])
def test_triton_infinite_weight_beside_a_dominant_logit_gives_torchs_value(weight, probabilities):
    weight = torch.tensor(weight)
    if probabilities:
        target = torch.softmax(torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), 1)
        options = {}
    else:
        target, options = torch.tensor([0, 1]), {"label_smoothing": 0.1}
    logits = torch.tensor(_DOMINANT, dtype=torch.float32, requires_grad=True)
    got = xt.cross_entropy(logits, target, weight, reduction="none", backend="triton", **options)
    got.sum().backward()
    wide = logits.detach().double().requires_grad_()
    want = F.cross_entropy(
        wide, target.double() if probabilities else target, weight.double(), reduction="none", **options
    )
    want.sum().backward()
    np.testing.assert_array_equal(got.detach().double().numpy(), want.detach().numpy())  # ±inf or NaN, entry for entry
    np.testing.assert_array_equal(logits.grad.double().numpy(), wide.grad.numpy())


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_infinite_weight_on_the_dominant_class_is_the_exact_infinity():
    """The infinite weight on the dominant class itself: its true gap lse − z is positive (4.7e-17
    here), so the term is +inf. torch rounds that gap to 0 even in float64 and gives NaN (inf·0);
    xentkit's Triton loss gives the exact +inf (documented in docs/precision.md)."""
    logits = torch.tensor([[0.0, 40.0, 1.0, 2.0]])
    weight = torch.tensor([1.0, np.inf, 1.0, 1.0])
    got = xt.cross_entropy(logits, torch.tensor([2]), weight, label_smoothing=0.1, reduction="none", backend="triton")
    assert got.item() == np.inf
    assert F.cross_entropy(logits.double(), torch.tensor([2]), weight.double(), label_smoothing=0.1).isnan()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("chunked", [False, True], ids=["one chunk", "chunks of 16"])
def test_triton_infinite_weight_in_a_row_of_one_finite_logit_is_nan(chunked, monkeypatch):
    """One finite logit (one class, or every other one masked): lse equals it exactly, the gap is
    exactly 0 and the term inf·0 = NaN, as torch gives (not the dominant-logit case's ±inf)."""
    if chunked:
        from xentkit.triton import cross_entropy as kernels

        monkeypatch.setattr(kernels, "MAX_BLOCK", 16)
    inf = np.inf
    logits = torch.full((2, 40), -inf)
    logits[0, 3], logits[1, 30] = 3.0, -2.0
    weight = torch.ones(40)
    weight[3], weight[30] = inf, -inf
    cases = [
        (torch.tensor([3, 30]), {"label_smoothing": 0.1}),
        (torch.softmax(torch.randn(2, 40, generator=torch.Generator().manual_seed(2)), 1), {}),
    ]
    for target, options in cases:
        got = xt.cross_entropy(logits, target, weight, reduction="none", backend="triton", **options)
        want = F.cross_entropy(
            logits.double(), target.double() if target.is_floating_point() else target, weight.double(),
            reduction="none", **options,
        )
        np.testing.assert_array_equal(got.double().numpy(), want.numpy())
        assert np.isnan(got.numpy()).all()
    single = xt.cross_entropy(torch.tensor([[3.0]]), torch.tensor([[1.0]]), torch.tensor([inf]), reduction="none",
                              backend="triton")
    assert np.isnan(single.item())


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("max_block", [None, 4, 2], ids=["one chunk", "chunks of 4", "chunks of 2"])
def test_triton_infinite_weight_on_a_masked_class_is_the_references(max_block, monkeypatch):
    """Rows of one or two finite logits whose masked (−inf) classes carry target mass, one of them
    an infinite class weight (±inf): the Triton loss is the reference's (+inf, −inf, or NaN where
    terms of both signs meet), on one chunk and on several. The probability path had made the
    chunk's whole mass·0 = NaN in a row of one finite logit, and a chunk of only −inf gave
    inf·(lse − 0) − S_c = NaN where lse ≤ 0 (reviews). Class indices with label smoothing: the
    same where the masked class lies in a chunk of only −inf (in the finite logit's own chunk they
    give NaN, documented)."""
    from xentkit.triton import cross_entropy as kernels

    if max_block is not None:
        monkeypatch.setattr(kernels, "MAX_BLOCK", max_block)
    inf = np.inf
    rows = [[0.0, -inf, -inf, -inf, -inf, -inf], [-1.0, -2.0, -inf, -inf, -inf, -inf],
            [-3.0, -inf, -inf, -inf, -inf, -inf], [5.0, -inf, 1.0, -inf, -inf, -inf]]
    logits = torch.tensor(rows)
    cases = [(torch.full((4, 6), 1 / 6), {}), (torch.tensor([[0.5, 0, 0, 0, 0, 0.5]] * 4), {}),
             (torch.tensor([0, 0, 0, 0]), {"label_smoothing": 0.1})]
    # (the reference: +inf for a +inf weight where every masked class has mass, NaN where terms of
    # both signs meet or the infinite weight meets a target of 0, inf·0)
    with xentkit.use_reference():
        assert xentkit.cross_entropy(np.array(rows), np.full((4, 6), 1 / 6), weight=np.array([1, inf, 1, 1, 1, 1.0]),
                                     reduction="none").tolist() == [inf] * 4
    block = 6 if max_block is None else max_block
    for target, options in cases:
        for infinite in (inf, -inf):
            for at in (1, 3, 5):
                weight = torch.ones(6)
                weight[at] = infinite
                got = xt.cross_entropy(logits, target, weight, reduction="none", backend="triton", **options)
                with xentkit.use_reference():
                    want = xentkit.cross_entropy(
                        logits.double().numpy(), target.double().numpy() if target.is_floating_point() else target.numpy(),
                        weight=weight.double().numpy(), reduction="none", **options,
                    )
                kernels_ = xt.cross_entropy(logits, target, weight, reduction="none", backend="auto", **options)
                np.testing.assert_array_equal(kernels_.double().numpy(), want)
                if options:  # (labels: the rows whose finite logits share no chunk with the class)
                    apart = [i for i, row in enumerate(rows) if all(
                        v == -inf for j, v in enumerate(row) if j // block == at // block)]
                    np.testing.assert_array_equal(got.double().numpy()[apart], want[apart])
                else:
                    np.testing.assert_array_equal(got.double().numpy(), want)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_vocab_parallel_infinite_weight_on_the_dominant_class_is_the_exact_infinity(backend):
    """docs/precision.md: the shards keep the gap lse − z (3e-22 at a margin of 50) where torch's
    rounds it to 0 and gives inf·0 = NaN; the docs had listed these forms with torch's NaN."""
    logits = torch.zeros(4, 64, dtype=torch.float64)
    logits[:, 0] = 50.0
    weight = torch.ones(64, dtype=torch.float64)
    weight[0] = np.inf
    target = torch.zeros(4, dtype=torch.long)
    assert torch.isnan(F.cross_entropy(logits, target, weight=weight, reduction="none")).all()
    loss = distributed.vocab_parallel_cross_entropy(logits, target, weight=weight, reduction="none", backend=backend)
    assert torch.equal(loss, torch.full((4,), np.inf, dtype=torch.float64))


def test_an_infinite_weight_with_smoothing_beside_float32s_extremes_is_float64s_loss():
    """The rows of a non-finite weight sum take the reference's term-by-term formula, which ran
    in the logits' float32: lse − z_c beyond float32's range overflowed and ∞ − ∞ gave NaN where
    the same values in float64, and torch, give −inf (a review)."""
    logits = np.array([3e38, -3e38, 0.0, 1.0] + [0.0] * 46, dtype=np.float32)
    weight = np.ones(50)
    weight[3] = -np.inf
    expected = F.cross_entropy(
        torch.tensor(logits, dtype=torch.float64)[None], torch.tensor([0]), weight=torch.tensor(weight), label_smoothing=0.1
    )
    assert float(expected) == -np.inf
    for values in (logits, logits.astype(np.float64)):
        assert float(xentkit.cross_entropy(values, np.array(0), weight=weight, label_smoothing=0.1)) == -np.inf
