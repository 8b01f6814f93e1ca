"""The Triton log-probability kernels (``xentkit.triton.log_probs``) and ``xentkit.torch``'s
``backend="triton"`` for ``log_probs`` / ``linear_log_probs``, run on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``, set by ``_triton_setup`` before the kernels are defined), at
small shapes, against the float64 reference (``xentkit.reference.log_probs``) and the Numba
kernels.

On a machine with a GPU the same checks run on CUDA tensors with ``XENTKIT_TEST_DEVICE=cuda``.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from _triton_setup import DEVICE  # first: the skips and the interpreter

# isort: split
import torch

import xentkit.torch as xt
from xentkit._options import LogProbOptions
from xentkit.reference.log_probs import (
    gradient_coefficients,
    log_probs_and_entropy,
    log_probs_backward,
    row_statistics,
)
from xentkit.torch._log_prob_rows import NumbaRows, TritonRows
from xentkit.triton import log_prob_gradient, log_prob_statistics

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# The statistics are float32 arithmetic whatever the logits' dtype: log p, H and lse agree with
# float64 to STATISTICS (relative to 1 + |value|). The gradient then is stored in the logits'
# dtype: it agrees to GRADIENT[dtype] relative to the row's largest entry.
STATISTICS = 2e-6
GRADIENT = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(params=[128, None], ids=["chunks-of-128", "one-chunk"])
def chunked(request, monkeypatch):
    """Rows cut into chunks of 128 classes (several per row, the last one ragged), or whole."""
    from xentkit.triton import log_probs as kernel_module

    if request.param is not None:
        monkeypatch.setattr(kernel_module, "MAX_BLOCK", request.param)


def _problem(rows, classes, dtype, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=generator) * scale).to(dtype)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    upstream = tuple(torch.rand(rows, generator=generator, dtype=torch.float64) * 2 - 0.5 for _ in range(3))
    return logits, labels, upstream


def _run(logits, labels, valid, temperature, upstream, in_place=False):
    """The two kernels as the torch binding chains them: pass 1, the per-row outputs and
    coefficients in float64, pass 2. Returns ((log p, H, lse) as float64 NumPy, gradient)."""
    logits, labels, valid = logits.to(DEVICE), labels.to(DEVICE), valid.to(DEVICE)
    m, e, u, z_target = log_prob_statistics(logits, labels, valid, temperature)
    assert all(t.dtype == torch.float64 and t.shape == labels.shape for t in (m, e, u, z_target))
    log_p, entropy, lse, log_s = row_statistics(m.double(), e.double(), u.double(), z_target.double(), valid)
    coefficients = gradient_coefficients(log_s, entropy, *(t.to(DEVICE) for t in upstream))
    stored = logits.clone()
    out = stored if in_place else torch.empty_like(stored)
    result = log_prob_gradient(stored, labels, valid, temperature, m, e, coefficients, out)
    assert result is out and out.dtype == logits.dtype
    outputs = tuple(t.cpu().numpy() for t in (log_p, entropy, lse))
    return outputs, out.double().cpu(), (m.cpu(), e.cpu(), u.cpu(), z_target.cpu())


def _expected(logits, labels, temperature, upstream, ignore_index=-100):
    """Reference outputs and gradient in float64 from the logits as stored."""
    x = logits.double().cpu().numpy()
    y = labels.cpu().numpy()
    outputs = log_probs_and_entropy(x, y, temperature=temperature, ignore_index=ignore_index)
    grad = log_probs_backward(
        x, y, *(t.numpy() for t in upstream), temperature=temperature, ignore_index=ignore_index
    )
    return outputs, grad


def _assert_outputs(outputs, expected, tolerance=STATISTICS):
    for got, want in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * (1 + np.abs(want).max()))


def _assert_gradient(grad, expected, dtype):
    tolerance = GRADIENT[dtype]
    np.testing.assert_allclose(grad.numpy(), expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.usefixtures("chunked")
def test_kernels_match_the_float64_reference(dtype, temperature, in_place):
    logits, labels, upstream = _problem(5, 300, dtype, seed=int(temperature * 4))
    labels[1] = -100
    valid = labels != -100
    outputs, grad, statistics = _run(logits, labels, valid, temperature, upstream, in_place)
    expected, expected_grad = _expected(logits, labels, temperature, upstream)
    _assert_outputs(outputs, expected)
    _assert_gradient(grad, expected_grad, dtype)
    log_p, entropy, _ = outputs
    assert (log_p <= 0).all() and (entropy >= 0).all()
    # the ignored row: (m, e, u, z_y) = (0, 0, 0, 0), and a zero gradient row
    assert [float(t[1]) for t in statistics] == [0.0, 0.0, 0.0, 0.0]
    assert not grad[1].any() and grad[0].any()


@pytest.mark.parametrize(
    ("rows", "classes", "dtype"),
    [(3, 1, torch.float32), (4, 3, torch.float16), (3, 129, torch.float32), (2, 151937, torch.bfloat16)],
)
def test_vocabularies_that_are_no_multiple_of_any_block(rows, classes, dtype):
    """V = 1 (log p = 0, H = 0), tiny V, one past a block, and 151937: 18 full chunks of 8192 and
    a ragged one (lanes past the row must neither count nor be written)."""
    logits, labels, upstream = _problem(rows, classes, dtype, seed=classes)
    labels[-1] = classes - 1  # the very last class
    valid = torch.ones(rows, dtype=torch.bool)
    outputs, grad, _ = _run(logits, labels, valid, 0.5, upstream)
    expected, expected_grad = _expected(logits, labels, 0.5, upstream)
    _assert_outputs(outputs, expected, tolerance=STATISTICS if classes < 1000 else 1e-5)
    _assert_gradient(grad, expected_grad, dtype)
    if classes == 1:  # p = 1: only the lse's upstream gradient k is left, k/T
        assert (outputs[0] == 0).all() and (outputs[1] == 0).all()
        torch.testing.assert_close(grad[:, 0], upstream[2] / 0.5, rtol=1e-6, atol=0.0)


@pytest.mark.usefixtures("chunked")
def test_masked_classes_and_rows_far_from_zero():
    """A whole chunk of −inf (masked classes), a masked target, rows far below and above 0."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3)).double()
    logits[0, :200] = float("-inf")
    logits[1] -= 1000.0
    logits[2] += 1e4
    logits[3, 7] = float("-inf")
    logits = logits.float()
    labels = torch.tensor([250, 3, 299, 7])  # row 3: its target is masked (log p = −inf)
    valid = torch.ones(4, dtype=torch.bool)
    upstream = (torch.full((4,), 1.5, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64),
                torch.full((4,), -0.25, dtype=torch.float64))
    outputs, grad, _ = _run(logits, labels, valid, 2.0, upstream, in_place=True)
    expected, expected_grad = _expected(logits, labels, 2.0, upstream)
    _assert_outputs(outputs, expected, tolerance=1e-6)  # rows 1 and 2: relative to their lse
    assert outputs[0][3] == -np.inf
    _assert_gradient(grad, expected_grad, torch.float32)
    assert not grad[0, :200].any() and grad[3, 7] == 1.5 / 2.0  # only g/T at a masked target


@pytest.mark.usefixtures("chunked")
def test_chunks_far_below_the_rows_max_add_nothing_not_nan():
    """Chunks of a row sitting ~1e38 below the row's max (a vocabulary masked with float32's
    lowest finite value, not −inf): restating their sums multiplied exp(δ) = 0 by s·δ = −inf, a
    NaN entropy; now H = 0 and log p = 0, as the reference, and the gradient finite."""
    lowest = torch.finfo(torch.float32).min
    logits = torch.full((2, 300), lowest)
    logits[0, 299] = 0.0
    logits[1, 299] = 1e38
    labels = torch.tensor([299, 299])
    valid = torch.ones(2, dtype=torch.bool)
    upstream = tuple(torch.full((2,), v, dtype=torch.float64) for v in (1.0, 0.5, -0.25))
    outputs, grad, _ = _run(logits, labels, valid, 1.0, upstream)
    for got in outputs[:2]:
        np.testing.assert_array_equal(got, [0.0, 0.0])
    assert torch.isfinite(grad).all() and not grad[:, :299].any()


def test_special_values_as_the_numba_kernel():
    """+inf, NaN, a row of −inf only: the Numba kernel's (m, e, u) semantics, hence its (and
    torch's) log p, H, lse and gradient: NaN, NaN, +inf and NaN for a +inf logit; NaN for a NaN;
    lse −inf and NaN otherwise for −inf only. The last row stays finite."""
    inf, nan = float("inf"), float("nan")
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(5))
    logits[0, 5] = inf
    logits[1, 20] = nan
    logits[2] = -inf
    logits[3, 10], logits[3, 30] = nan, inf
    logits[4, :3] = -inf
    logits[5, 0] = inf
    logits[5, 1:] = -inf
    labels = torch.tensor([3, 4, 5, 7, 9, 0])
    valid = torch.ones(6, dtype=torch.bool)
    results = []
    for rows in (TritonRows, NumbaRows):
        device = DEVICE if rows is TritonRows else "cpu"
        statistics = tuple(t.double().cpu() for t in rows.statistics(logits.to(device), labels.to(device), valid.to(device), 1.0))
        log_p, entropy, lse, log_s = row_statistics(*statistics, valid)
        ones = torch.ones(6, dtype=torch.float64)
        coefficients = tuple(t.to(device) for t in gradient_coefficients(log_s, entropy, ones, ones, ones))
        m, s = (t.to(device=device, dtype=torch.float32 if rows is TritonRows else torch.float64) for t in statistics[:2])
        grad = rows.gradient(logits.to(device), labels.to(device), valid.to(device), 1.0, m, s, coefficients,
                             torch.empty_like(logits).to(device))
        results.append((statistics[0], log_p, entropy, lse, grad.cpu()))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got.double(), want.double(), equal_nan=True, rtol=1e-6, atol=1e-6)
    m, log_p, entropy, lse, grad = results[0]
    assert m[0] == inf and lse[0] == inf and log_p[:4].isnan().all() and entropy[:4].isnan().all()
    assert lse[1].isnan() and lse[2] == -inf and lse[3].isnan() and lse[5] == inf
    assert grad[:4].isnan().all() and grad[5].isnan().all() and grad[4].isfinite().all()


@pytest.mark.usefixtures("chunked")
def test_the_kernel_finishes_rows_as_row_statistics():
    """``TritonRows.finished``: the merging kernel writes each row's log p(y), H, lse and log s
    by ``reference.log_probs.row_statistics``' algebra (no torch op), on special rows, ignored rows
    and a label outside the row too; the outputs are tensors of their own, not what backward keeps."""
    inf, nan = float("inf"), float("nan")
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(15)) * 3
    logits[0, 5] = inf
    logits[1, 20] = nan
    logits[2] = -inf
    logits[4, :200] = -inf
    logits[6, 100] = 80.0
    logits[5, 9] = -inf  # a masked target: log p = −inf
    labels = torch.tensor([3, 4, 5, 7, 250, 9, 100, 1000])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    shape = torch.Size((2, 4))
    statistics, (log_p, entropy, lse, log_s, kept) = TritonRows.finished(
        logits.to(DEVICE), labels.to(DEVICE), valid.to(DEVICE), 0.7, shape
    )
    expected = row_statistics(*(t.cpu() for t in statistics), valid)  # float64 statistics
    for got, want in zip((log_p, entropy, lse), expected[:3], strict=True):
        # the kernel's float64 algebra, rounded once to float32
        torch.testing.assert_close(got.cpu().reshape(-1), want.float(), equal_nan=True, rtol=2e-7, atol=0)
    # log s and H kept for backward in float64
    torch.testing.assert_close(log_s.cpu(), expected[3], equal_nan=True, rtol=1e-15, atol=0)
    assert log_p.shape == entropy.shape == lse.shape == shape
    torch.testing.assert_close(kept.cpu(), expected[1], equal_nan=True, rtol=1e-15, atol=0)
    assert len({t.data_ptr() for t in (log_p, entropy, lse, log_s, kept)}) == 5
    assert log_p[0, 3] == 0 and entropy[0, 3] == 0 and lse[0, 3] == 0  # the ignored row
    assert log_p[1, 1] == -inf and log_p[0, 1].isnan() and lse[0, 2] == -inf and lse[0, 0] == inf and statistics[3][7] == 0  # label 1000: not read


@pytest.mark.usefixtures("chunked")
def test_a_chunk_of_nan_only_makes_the_row_nan():
    """As torch: a NaN anywhere makes the row NaN, also when its chunk has nothing else (the
    chunk's max is then −inf, but its sums are NaN and the merge keeps them)."""
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(6))
    logits[0, :128] = float("nan")
    logits[1] = float("nan")
    valid = torch.ones(2, dtype=torch.bool)
    _, s, u, _ = log_prob_statistics(logits.to(DEVICE), torch.tensor([200, 0]).to(DEVICE), valid.to(DEVICE))
    assert s.isnan().all() and u.isnan().all()


def test_labels_outside_the_row_are_not_read():
    """A label outside [0, V) (another vocabulary shard's) gives z_y 0 and no target entry: the
    gradient is then p_j·(b + k·(z_j − m))/T alone, as the Numba kernel writes it."""
    logits, _, upstream = _problem(3, 50, torch.float32, seed=8)
    labels = torch.tensor([-5, 50, 10**12])
    valid = torch.ones(3, dtype=torch.bool)
    _, grad, statistics = _run(logits, labels, valid, 0.5, upstream)
    assert not statistics[3].any()
    numba = NumbaRows.statistics(logits, labels, valid, 0.5)
    torch.testing.assert_close(tuple(t.double() for t in statistics), numba, rtol=2e-6, atol=0.0)
    _, entropy, _, log_s = row_statistics(*numba, valid)
    expected = torch.empty_like(logits)
    NumbaRows.gradient(logits, labels, valid, 0.5, numba[0], numba[1],
                       gradient_coefficients(log_s, entropy, *upstream), expected)
    torch.testing.assert_close(grad, expected.double(), rtol=1e-5, atol=1e-7)


def test_no_rows():
    empty = torch.empty(0, 7).to(DEVICE)
    labels = torch.empty(0, dtype=torch.int64).to(DEVICE)
    valid = torch.empty(0, dtype=torch.bool).to(DEVICE)
    statistics = log_prob_statistics(empty, labels, valid, 1.0)
    assert all(t.shape == (0,) for t in statistics)
    zero = torch.zeros(()).to(DEVICE)
    assert log_prob_gradient(empty, labels, valid, 1.0, *statistics[:2], (zero, zero, zero), empty) is empty


# ---------------------------------------------------------------------------------------------
# xentkit.torch with backend="triton", end to end, against the Numba kernels
# ---------------------------------------------------------------------------------------------


def _backward_all(outputs, seed):
    generator = torch.Generator().manual_seed(seed)
    total = sum((out * (torch.rand(out.shape, generator=generator) - 0.3).to(out.device)).sum() for out in outputs)
    total.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("chunked")
def test_log_probs_on_triton_equals_the_numba_kernels(dtype):
    """Triton on the logits as stored vs the Numba kernels on the same values in float32
    (bfloat16 → float32 is exact): the outputs to float32 accuracy, the gradient up to its
    rounding to the logits' dtype."""
    generator = torch.Generator().manual_seed(12)
    logits = (torch.randn(2, 3, 300, generator=generator) * 2).to(dtype)
    target = torch.randint(0, 300, (2, 3), generator=generator)
    target[0, 1] = -1
    results = []
    for backend, x0 in (("triton", logits.to(DEVICE)), ("auto", logits.float())):
        x = x0.clone().requires_grad_()
        outputs = xt.log_probs(x, target.to(x.device), temperature=0.5, ignore_index=-1, return_entropy=True,
                               return_lse=True, backend=backend)
        _backward_all(outputs, seed=3)
        results.append((tuple(out.detach().cpu() for out in outputs), x.grad.cpu()))
    (outputs, grad), (expected, expected_grad) = results
    assert all(out.dtype == torch.float32 and out.shape == (2, 3) for out in outputs)
    torch.testing.assert_close(outputs, expected, rtol=STATISTICS, atol=STATISTICS * 10)
    assert grad.dtype == dtype and not grad[0, 1].any()
    tolerance = GRADIENT[dtype]
    torch.testing.assert_close(grad.float(), expected_grad, rtol=tolerance, atol=tolerance * expected_grad.abs().max().item())


@pytest.mark.parametrize(
    ("bias", "dtype", "baseline"),
    [(True, torch.float32, "auto"), (False, torch.float32, "auto"), (True, torch.bfloat16, "torch")],
)
def test_linear_log_probs_on_triton_equals_the_other_backends(bias, dtype, baseline):
    """Chunks of 4 rows, the gradient written over each chunk's logits. float32: against the
    Numba kernels; bfloat16: against the torch ops on the same bfloat16 logits."""
    generator = torch.Generator().manual_seed(21)
    n, d, v = 10, 6, 300
    x0 = torch.randn(n, d, generator=generator).to(dtype)
    w0 = (torch.randn(v, d, generator=generator) / 2).to(dtype)
    b0 = torch.randn(v, generator=generator).to(dtype) if bias else None
    target = torch.randint(0, v, (n,), generator=generator)
    target[2] = -100
    results = []
    for backend in ("triton", baseline):
        device = DEVICE if backend == "triton" else "cpu"
        leaves = [t.clone().to(device).requires_grad_() for t in (x0, w0) + ((b0,) if bias else ())]
        outputs = xt.linear_log_probs(
            leaves[0], leaves[1], target.to(device), linear_bias=leaves[2] if bias else None, temperature=2.0,
            return_entropy=True, chunk_size=4, backend=backend,
        )
        _backward_all(outputs, seed=4)
        results.append((tuple(out.detach().cpu() for out in outputs), [leaf.grad.cpu() for leaf in leaves]))
    (outputs, grads), (expected, expected_grads) = results
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outputs, expected, rtol=tolerance, atol=tolerance)
    assert outputs[0][2] == 0 and outputs[1][2] == 0 and (outputs[0] <= 0).all() and (outputs[1] >= 0).all()
    for grad, want in zip(grads, expected_grads, strict=True):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), want.float(), rtol=tolerance, atol=tolerance)


def test_backend_choice_and_why_triton_cannot_run(monkeypatch):
    x = torch.randn(3, 4).to(DEVICE)
    choose = importlib.import_module("xentkit.torch.log_probs")._rows_backend
    assert choose(x, LogProbOptions(backend="triton")) is TritonRows
    assert choose(x, LogProbOptions(backend="torch")).name == "torch"
    with pytest.raises(ValueError, match=r"cannot run this call: it takes float32, float16 and bfloat16 logits, got torch\.float64"):
        xt.log_probs(x.double(), torch.tensor([0, 1, 2]).to(DEVICE), backend="triton")
    if DEVICE == "cuda":
        assert choose(x, LogProbOptions()) is TritonRows  # "auto" on CUDA
        assert choose(x.double(), LogProbOptions()).name == "torch"
    else:
        assert choose(x, LogProbOptions()) is NumbaRows  # "auto" on the CPU never takes Triton
        assert choose(x.bfloat16(), LogProbOptions()).name == "torch"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match=r"runs CUDA tensors .*TRITON_INTERPRET=1\), got a tensor on cpu"):
            xt.linear_log_probs(x, torch.randn(5, 4), torch.tensor([0, 1, 2]), backend="triton")


def test_the_chunk_buffer_is_held_until_backward_on_the_cpu_only():
    """On the CPU backward reuses forward's chunk buffer (RSS); on a device nothing of [chunk, V]
    is held between the two (a review: up to 512 MiB per call on CUDA, several graphs before one
    backward)."""
    x = torch.randn(6, 4, device=DEVICE, requires_grad=True)
    log_p = xt.linear_log_probs(x, torch.randn(9, 4, device=DEVICE), torch.tensor([0, 1, 2, 3, 4, 5], device=DEVICE))
    assert (log_p.grad_fn.buffer is None) == (DEVICE != "cpu")
    log_p.sum().backward()
    assert log_p.grad_fn.buffer is None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
@pytest.mark.usefixtures("chunked")
def test_logits_far_from_zero_are_shifted_before_they_are_scaled(temperature):
    """float32 logits near +1e4 at T ≠ 1: the kernels shift before they scale,
    d = (x − max x)·c, and keep m = max x·c and z_y = x_y·c in float64, so log p, H and lse are
    as accurate as near 0. Scaling first (z = x·c in float32, as these kernels did) left half an
    ulp of 1.4e4 in every exponent: log p 8e-4 off at T = 0.7 (a review)."""
    generator = torch.Generator().manual_seed(21)
    logits = torch.randn(4, 300, generator=generator) * 2 + 1e4
    labels = torch.randint(0, 300, (4,), generator=generator)
    upstream = tuple(torch.rand(4, generator=generator, dtype=torch.float64) * 2 - 0.5 for _ in range(3))
    valid = torch.ones(4, dtype=torch.bool)
    outputs, grad, _ = _run(logits, labels, valid, temperature, upstream)
    expected, expected_grad = _expected(logits, labels, temperature, upstream)
    # log p and H to float32's accuracy of themselves; lse (≈ 1e4/T) to its own
    for got, want in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-6)
    _assert_gradient(grad, expected_grad, torch.float32)


@pytest.mark.parametrize("temperature", [1.0, 0.9])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("gap", [25.0, 45.0])
@pytest.mark.usefixtures("chunked")
def test_a_confident_token_keeps_its_tiny_log_probability(temperature, in_place, gap):
    """A token whose log p = −log(1 + δ) has δ far below float32's 6e-8: the max's terms are
    counted apart and the row merged in float64, so log p is −δ to the accuracy of δ's own
    float32 terms (it was 0), and the target's gradient entry a·(1 − p_y) keeps its digits.
    Ties at the max (row 2) and the max in the last chunk (row 1) too. At a gap of 45, δ ~1e-17
    is below float64's half ulp of 1 as well: the rows' excess e = s − 1 is what the kernels
    keep and log1p(e) what they take (log(1 + e) gave 0)."""
    logits = torch.full((3, 300), -gap)
    logits[0, 7] = logits[2, 7] = logits[2, 200] = 0.0
    logits[1, 290] = 0.0
    labels = torch.tensor([7, 290, 200])
    upstream = (torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                torch.zeros(3, dtype=torch.float64))
    outputs, grad, _ = _run(logits, labels, torch.ones(3, dtype=torch.bool), temperature, upstream, in_place)
    expected, expected_grad = _expected(logits, labels, temperature, upstream)
    log_p, entropy, _lse = outputs
    assert (log_p < 0).all()
    # each term exp(d) carries d's float32 rounding, |d|·6e-8 relative (45/0.9 · 6e-8 = 3e-6)
    np.testing.assert_allclose(log_p, expected[0], rtol=1e-5, atol=0)
    np.testing.assert_allclose(entropy, expected[1], rtol=1e-5, atol=0)
    rows = np.arange(3)
    np.testing.assert_allclose(grad.numpy()[rows, labels], expected_grad[rows, labels], rtol=1e-5, atol=0)
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-5, atol=1e-12)


@pytest.mark.usefixtures("chunked")
def test_a_confident_tokens_gradient_with_the_entropys_gradient_too():
    """log p + H of a confident token through ``xentkit.torch.log_probs``: backward's coefficient
    b = −g − h·(H − log s) takes H − log s ≈ −δ from the float64 log s and H the kernel keeps
    (float32 copies lost it: the target's entry came out +1.5e-10 for −3.67e-9, a review)."""
    logits = torch.full((2, 300), -10.0)
    logits[0, 5] = 15.0
    logits[1, 250] = 12.0
    labels = torch.tensor([5, 250])
    x = logits.clone().to(DEVICE).requires_grad_()
    log_p, entropy = xt.log_probs(x, labels.to(DEVICE), backend="triton", return_entropy=True)
    (log_p + entropy).sum().backward()
    wide = logits.double().requires_grad_()
    table = torch.log_softmax(wide, -1)
    (table.gather(1, labels[:, None])[:, 0] - (table.exp() * table).sum(-1)).sum().backward()
    rows = torch.arange(2)
    torch.testing.assert_close(x.grad.cpu()[rows, labels].double(), wide.grad[rows, labels], rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.cpu().double(), wide.grad, rtol=1e-5, atol=1e-12)


def test_compiled_log_probs_run_the_triton_kernels_in_their_custom_ops(monkeypatch):
    """Under torch.compile ``log_probs`` on the Triton rows (CUDA, or backend="triton" under the
    interpreter) runs them inside ``xentkit::log_probs`` and its backward: eager's values."""
    monkeypatch.setattr(xt.functional, "SMALL_MAX_LOGITS", 0)
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(14)
    logits = torch.randn(12, 37, generator=generator).to(DEVICE)
    target = torch.randint(0, 37, (12,), generator=generator).to(DEVICE)
    target[4] = -100
    calls = {"statistics": 0}
    original = TritonRows.finished.__func__

    def counted(cls, *args, **kwargs):
        calls["statistics"] += 1
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(TritonRows, "finished", classmethod(counted))

    def step(x, y):
        return xt.log_probs(x, y, temperature=0.8, return_entropy=True, backend="triton")

    def run(fn):
        x = logits.clone().requires_grad_()
        log_p, entropy = fn(x, target)
        (grad,) = torch.autograd.grad((log_p.sum() + 0.3 * entropy.sum()), x)
        return log_p.detach(), entropy.detach(), grad

    compiled = run(torch.compile(step, backend="aot_eager", fullgraph=True))
    assert calls["statistics"] >= 1  # the Triton rows ran inside the op
    for value, want in zip(compiled, run(step), strict=True):
        torch.testing.assert_close(value, want, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("gap", [25.0, 30.0, 40.0, 50.0])
@pytest.mark.parametrize("backend", ["triton", "numba-float32", "numba-float64"])
def test_a_confident_targets_entry_keeps_the_entropy_term_beside_the_log_probs(gap, backend):
    """With upstream gradients on both log p (g) and the entropy (h), PPO's loss with an entropy
    bonus, the target's entry at a confident row's max is a·(1 − p_y) + p_y·t with
    t = k − h·(H − log s): the kernels had taken t = a + b with b = k − g − h·(H − log s), which
    rounds h·(H − log s) away below an ulp of g (a review, 2026-12-07: 13% off at a gap of 40,
    the wrong sign at 50). For [0, −G, −G, −G], δ = 3·exp(−G), s = 1 + δ, the entry of
    log p + H is (δ − G·δ/s)/s, computed here to a few ulps."""
    delta = 3.0 * np.exp(-gap)
    s = 1.0 + delta
    expected = (delta - gap * delta / s) / s
    dtype = torch.float64 if backend == "numba-float64" else torch.float32
    device = DEVICE if backend == "triton" else "cpu"
    x = torch.tensor([[0.0, -gap, -gap, -gap]], dtype=dtype, device=device, requires_grad=True)
    log_p, entropy = xt.log_probs(
        x, torch.tensor([0], device=device), return_entropy=True, backend="triton" if backend == "triton" else "auto"
    )
    (log_p.sum() + entropy.sum()).backward()
    got = x.grad[0, 0].item()
    # float64: a few ulps; float32: the terms' own rounding (exp of d in float32, about |d|·6e-8)
    assert got == pytest.approx(expected, rel=1e-14 if dtype == torch.float64 else 1e-6, abs=0), (got, expected)


def test_the_tiniest_temperature_gives_the_one_hot_gradient_not_nan():
    """T = 1e-36 (float32's tiniest normal numbers, c = 1e36): each row is one-hot at its max and
    the gradient of log p(y) + H is c·([j = y] − [j = argmax]). The coefficient c·k/s times the
    exponent's floor (−1000) overflowed to −inf, and 0·∞ made the row NaN."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 37, generator=generator)
    labels = torch.tensor([0, 3, int(logits[2].argmax())])
    x = logits.clone().to(DEVICE).requires_grad_()
    log_p, entropy = xt.log_probs(x, labels.to(DEVICE), temperature=1e-36, return_entropy=True, backend="triton")
    (log_p + entropy).sum().backward()
    expected = torch.zeros(3, 37, dtype=torch.float64)
    rows = torch.arange(3)
    expected[rows, labels] += 1e36
    expected[rows, logits.argmax(1)] -= 1e36
    torch.testing.assert_close(x.grad.cpu().double(), expected, rtol=1e-6, atol=0)
