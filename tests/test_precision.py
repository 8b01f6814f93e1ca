"""The precision contract (docs/precision.md): half-precision inputs are reduced in float32, the
fused linear forms return a float32 loss, cross_entropy returns the input's dtype rounded once;
checked against float64 on the same (rounded) inputs, at a 256k vocabulary and +1e4 offsets on
the Triton kernels (Triton's interpreter on CPU tensors, set in conftest)."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import xentkit.torch as xt  # noqa: E402

DEVICE = os.environ.get("XENTKIT_TEST_DEVICE", "cpu")


def _exact(logits: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    return F.cross_entropy(logits.double(), target, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_on_torch_ops_rounds_once(dtype):
    """torch's convention (the loss in the input's dtype), but the per-row losses and their mean
    in float32: the result is the float64 loss rounded once."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 1000, generator=generator) * 4).to(dtype)
    target = torch.randint(0, 1000, (64,), generator=generator)
    for reduction in ("mean", "sum"):
        loss = xt.cross_entropy(logits, target, reduction=reduction, backend="torch")
        assert loss.dtype == dtype
        assert loss == _exact(logits, target, reduction=reduction).to(dtype)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_the_torch_ops_z_loss_gradient_keeps_float32_accuracy_far_from_zero(offset):
    """The torch-ops path (backend="torch"; also small problems with a bfloat16 target, other
    devices, compiled calls) takes the z-loss's logsumexp shifted by the row's max: through
    torch.logsumexp's own backward, exp(x − lse) with lse rounded near 1e4 gave the gradient
    2.4e-4 off (a review); the kernels' answer is within float32's rounding of float64."""
    from xentkit import reference

    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(16, 40, generator=generator) * 3 + offset
    target = torch.randint(0, 40, (16,), generator=generator)
    probabilities = torch.softmax(torch.randn(16, 40, generator=generator), 1)
    for labels in (target, probabilities, probabilities.to(torch.bfloat16)):
        _, want = reference.cross_entropy_and_grad(
            logits.double().numpy(), labels.double().numpy() if labels.is_floating_point() else labels.numpy(),
            z_loss=0.01, label_smoothing=0.1, reduction="sum",
        )
        for backend in ("torch", "auto"):
            leaf = logits.clone().requires_grad_()
            xt.cross_entropy(leaf, labels, z_loss=0.01, label_smoothing=0.1, reduction="sum", backend=backend).backward()
            scale = abs(want).max()
            torch.testing.assert_close(leaf.grad.double(), torch.from_numpy(want), rtol=0, atol=4e-7 * scale)


def test_linear_cross_entropy_returns_float32_for_bfloat16_on_the_cpu():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(48, 32, generator=generator).to(torch.bfloat16)
    w = (torch.randn(1000, 32, generator=generator) / 4).to(torch.bfloat16)
    b = torch.randn(1000, generator=generator).to(torch.bfloat16)
    target = torch.randint(0, 1000, (48,), generator=generator)
    loss = xt.linear_cross_entropy(x, w, target, linear_bias=b)
    assert loss.dtype == torch.float32
    exact = _exact(F.linear(x, w, b), target)  # the same bfloat16 logits
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_triton_kernels_at_a_256k_vocabulary_and_large_offsets(offset):
    """bfloat16 logits of 262144 classes (32 chunks per row), shifted by +1e4 (bfloat16 holds
    multiples of 64 there): the loss within 1e-5 relative of float64 on the same logits; the linear
    form's loss in float32."""
    generator = torch.Generator().manual_seed(2)
    classes = 262144
    logits = (torch.randn(3, classes, generator=generator) * 2 + offset).to(torch.bfloat16).to(DEVICE)
    target = torch.tensor([0, classes - 1, 131071]).to(DEVICE)
    loss = xt.cross_entropy(logits, target, backend="triton", reduction="sum")
    exact = _exact(logits.cpu(), target.cpu(), reduction="sum")
    assert loss.dtype == torch.bfloat16  # torch's convention
    rows = xt.cross_entropy(logits, target, backend="triton", reduction="none")
    torch.testing.assert_close(rows.double().cpu(), _exact(logits.cpu(), target.cpu(), reduction="none"),
                               rtol=2 ** -8, atol=0)  # bfloat16's rounding of each row, nothing more
    assert abs(float(loss) - float(exact)) <= 2 ** -8 * abs(float(exact))
    # the fused linear form keeps the float32 loss: 1e-5 relative
    w = torch.eye(64, dtype=torch.bfloat16).repeat(classes // 64, 1).to(DEVICE)  # logits = x per block
    hidden = logits[:, :64].clone()
    linear_loss = xt.linear_cross_entropy(hidden, w, target, backend="triton", chunk_size=2, reduction="sum")
    assert linear_loss.dtype == torch.float32
    linear_exact = _exact(F.linear(hidden.cpu().double(), w.cpu().double()), target.cpu(), reduction="sum")
    torch.testing.assert_close(linear_loss.double().cpu(), linear_exact, rtol=1e-5, atol=0)


def test_results_are_bit_identical_run_to_run():
    """Deterministic by default: rows are each summed by one thread in a fixed order, segments and
    chunks merged in a fixed order, no atomics; the same inputs give the same bits."""
    import numpy as np

    import xentkit

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(512, 3000, generator=generator)
    target = torch.randint(0, 3000, (512,), generator=generator)
    runs = [xentkit.cross_entropy_and_grad(logits.numpy(), target.numpy(), label_smoothing=0.1) for _ in range(2)]
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])
    few = torch.randn(2, 300000, generator=generator)  # long rows: the split-row kernel
    runs = [xentkit.cross_entropy_and_grad(few.numpy(), np.array([5, 299999])) for _ in range(2)]
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])
    x = torch.randn(256, 64, generator=generator)
    w = torch.randn(3000, 64, generator=generator)
    outputs = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        log_p, entropy = xt.linear_log_probs(*leaves, target[:256], return_entropy=True, chunk_size=64)
        loss = xt.linear_cross_entropy(*leaves, target[:256], chunk_size=64)
        (log_p.sum() + entropy.sum() + loss).backward()
        outputs.append([log_p, entropy, loss, leaves[0].grad, leaves[1].grad])
    for first, second in zip(*outputs, strict=True):
        assert torch.equal(first, second)


# bfloat16 keeps 8 significant bits: rounding r changes it by at most 2^-8·|r|
BFLOAT16_ROUNDING = 2.0**-8


def _per_chunk_rounding(patch: pytest.MonkeyPatch) -> None:
    """The fused linear forms as they were: grad_W and grad_b accumulated in the weight's dtype,
    one rounding per chunk (the comparison for the tests below)."""
    import importlib

    from xentkit.torch import _chunks, _linear_triton

    log_probs = importlib.import_module("xentkit.torch.log_probs")  # the module, not the function

    def add_in_weight_dtype(dz, x_chunk, w, grads, start, stop):
        grad_x, grad_w, grad_b = grads
        if grad_x is not None:
            torch.mm(dz, w, out=grad_x[start:stop])
        if grad_w is not None:
            grad_w.addmm_(dz.t(), x_chunk)  # float32 inside the matmul, then rounded to bfloat16
        if grad_b is not None:
            grad_b.add_(dz.sum(dim=0, dtype=torch.float32).to(grad_b.dtype))

    patch.setattr(
        _chunks, "_accumulator", lambda tensor, new_buffer, widen: new_buffer(tuple(tensor.shape), tensor, zero=True)
    )
    for module in (_linear_triton, log_probs):
        patch.setattr(module, "add_chunk_gradients", add_in_weight_dtype)


def _linear_problem(rows=512, features=16, classes=32):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(rows, features, generator=generator).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(classes, features, generator=generator) / 2).to(torch.bfloat16).to(DEVICE)
    b = (torch.randn(classes, generator=generator) / 8).to(torch.bfloat16).to(DEVICE)
    target = torch.randint(0, classes, (rows,), generator=generator).to(DEVICE)
    return x, w, b, target


def _parameter_gradients(loss_of, w, b):
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss_of(w, b).backward()
    return w.grad, b.grad


def _check_rounded_once(got, exact, per_chunk):
    """``got`` is ``exact`` (float64) rounded once to bfloat16, up to float32 accumulation far below
    that rounding; ``per_chunk`` (None: the path has no chunks), the same sum rounded after every
    chunk, is measurably further off."""
    error = (got.double().cpu() - exact).abs()
    bound = BFLOAT16_ROUNDING * exact.abs() + 2.0**-20 * exact.abs().max()
    assert (error <= bound).all(), f"{int((error > bound).sum())} entries beyond one rounding, worst {float(error.max())}"
    if per_chunk is not None:
        per_chunk_error = (per_chunk.double().cpu() - exact).abs().max()
        assert per_chunk_error > 4 * error.max(), (float(per_chunk_error), float(error.max()))


def test_linear_cross_entropy_chunks_give_the_same_bits_at_any_thread_count():
    """The chunked CPU linear form at 140000 classes: its chunks of 4 rows (and a last one of 1)
    were cut over threads where a chunk had fewer rows than threads, though the batch of 49 had
    more, so the gradients changed with the thread count (a review: dW in 1.7M entries, by up to
    3e-11 relative, at 1 against 2 threads; and in the "none" backward of a batched upstream).
    Now a chunk is split only where the batch would be."""
    import numba

    generator = torch.Generator().manual_seed(8)
    x = torch.randn(49, 8, dtype=torch.float64, generator=generator)
    w = torch.randn(140000, 8, dtype=torch.float64, generator=generator)
    target = torch.randint(0, 140000, (49,), generator=generator)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
            loss = xt.linear_cross_entropy(*leaves, target, label_smoothing=0.1, chunk_size=4)
            loss.backward()
            # and the "none" backward of a batched upstream (vmap, jacrev): its own chunk loop
            rows = xt.linear_cross_entropy(*leaves, target, label_smoothing=0.1, chunk_size=4, reduction="none")
            upstream = torch.rand(3, 49, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
            batched = torch.autograd.grad(rows, leaves, upstream, is_grads_batched=True)
            results.append([loss, leaves[0].grad, leaves[1].grad, *batched])
    finally:
        numba.set_num_threads(before)
    if len(results) == 1:
        pytest.skip("one thread on this machine")
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_cross_entropy_rounds_the_bfloat16_weight_gradient_once(backend):
    """128 chunks of 4 rows (bfloat16): grad_W and grad_b are the float64 sums of the chunks'
    contributions dzᵀx and Σ dz (dz: the path's own bfloat16 gradient of the same bfloat16 logits)
    rounded once, as the precision contract says; adding each chunk in bfloat16 was about 10
    times further off (measured here, asserted above 4). "triton": the chunked Triton path (its float32 accumulators); "torch": torch
    ops, one matmul over every row. The Numba path takes float32/float64 weights only."""
    x, w, b, target = _linear_problem()

    def loss_of(w, b, accumulate_in_float32=True):
        return xt.linear_cross_entropy(
            x, w, target, linear_bias=b, reduction="sum", chunk_size=4, backend=backend,
            accumulate_in_float32=accumulate_in_float32,
        )

    got_w, got_b = _parameter_gradients(loss_of, w, b)
    per_chunk = (None, None)
    if backend == "triton":  # accumulate_in_float32=False: the weight's dtype, one rounding per chunk
        per_chunk = _parameter_gradients(lambda w, b: loss_of(w, b, accumulate_in_float32=False), w, b)
        assert per_chunk[0].dtype == torch.bfloat16
    logits = F.linear(x, w, b).requires_grad_()  # the chunks' logits, bit for bit
    xt.cross_entropy(logits, target, reduction="sum", backend=backend).backward()
    dz = logits.grad.double().cpu()
    _check_rounded_once(got_w, dz.T @ x.double().cpu(), per_chunk[0])
    _check_rounded_once(got_b, dz.sum(0), per_chunk[1])
    assert got_w.dtype == got_b.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_log_probs_rounds_the_bfloat16_weight_gradient_once(backend):
    """The same for linear_log_probs' chunked backward (Triton kernels, or torch ops per chunk)."""
    x, w, b, target = _linear_problem()

    def loss_of(w, b):
        return xt.linear_log_probs(x, w, target, linear_bias=b, chunk_size=4, backend=backend).sum()

    got_w, got_b = _parameter_gradients(loss_of, w, b)
    with pytest.MonkeyPatch.context() as patch:
        _per_chunk_rounding(patch)
        per_chunk = _parameter_gradients(loss_of, w, b)
    logits = F.linear(x, w, b).requires_grad_()
    xt.log_probs(logits, target, backend=backend).sum().backward()
    dz = logits.grad.double().cpu()
    _check_rounded_once(got_w, dz.T @ x.double().cpu(), per_chunk[0])
    _check_rounded_once(got_b, dz.sum(0), per_chunk[1])


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA only: the CPU converts a chunk's operands to float32")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_chunks_add_into_float32_in_one_cublas_call(dtype):
    """On CUDA each chunk's dzᵀx goes into the float32 accumulator through addmm's out_dtype
    (torch >= 2.8), without float32 copies of the operands."""
    from xentkit.torch import _chunks

    assert _chunks.mixed_addmm(torch.device(DEVICE), dtype)


def test_the_mixed_addmm_probe_waits_for_no_capture(monkeypatch):
    """The probe copies to the device and waits: never while a CUDA graph is being captured (it
    would break the capture, and its error was cached as "no" for good); the next call outside a
    capture tries it and keeps the answer."""
    from xentkit.torch import _chunks

    monkeypatch.setattr(_chunks, "_MIXED_ADDMM", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    tried = []
    real_full = torch.full
    monkeypatch.setattr(torch, "full", lambda *a, **k: tried.append(1) or real_full(*a, **k))
    device = torch.device("cpu")
    assert _chunks.mixed_addmm(device, torch.bfloat16) is False and tried == [] and _chunks._MIXED_ADDMM == {}
    capturing[0] = False
    answer = _chunks.mixed_addmm(device, torch.bfloat16)  # tried now (the CPU's answer, whichever)
    assert tried == [1] and {(device, torch.bfloat16): answer} == _chunks._MIXED_ADDMM
    capturing[0] = True
    assert _chunks.mixed_addmm(device, torch.bfloat16) is answer and tried == [1]  # known: no new try

