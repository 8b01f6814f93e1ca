"""Under autocast torch runs its losses in float32 and returns float32 (its fp32 op list);
xentkit.torch's losses do the same on every path, reading the half logits as they are. A loss
scaler's float32 upstream (65536, inf in float16) reaches the half gradient without overflow."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import xentkit.torch as xt  # noqa: E402

_TRITON = pytest.param(
    "triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
)
N_SMALL, N_LARGE, C = 20, 300, 300  # 6000 logits: small; 90000: beyond SMALL_MAX_LOGITS


def _losses(backend: str):
    """(name, xentkit's call, torch's call) on logits z and labels y."""
    return [
        ("cross_entropy", lambda z, y: xt.cross_entropy(z, y, backend=backend), F.cross_entropy),
        ("smoothing module", lambda z, y: xt.CrossEntropyLoss(label_smoothing=0.1, backend=backend)(z, y),
         lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1)),
        ("probabilities", lambda z, y: xt.cross_entropy(z, F.one_hot(y, C).to(z.dtype) * 0.9 + 0.1 / C, backend=backend),
         lambda z, y: F.cross_entropy(z, F.one_hot(y, C).to(z.dtype) * 0.9 + 0.1 / C)),
        ("nll_loss", lambda z, y: xt.nll_loss(z.log_softmax(1), y), lambda z, y: F.nll_loss(z.log_softmax(1), y)),
        ("bce", lambda z, y: xt.binary_cross_entropy_with_logits(z, (z > 0).to(z.dtype)),
         lambda z, y: F.binary_cross_entropy_with_logits(z, (z > 0).to(z.dtype))),
    ]  # fmt: skip


@pytest.mark.parametrize("rows", [N_SMALL, N_LARGE])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["auto", "torch", _TRITON])
def test_losses_under_autocast_are_float32_as_torchs(rows, dtype, backend):
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(16, C)
    x = torch.randn(rows, 16, generator=generator)
    y = torch.randint(0, C, (rows,), generator=generator)
    for name, ours, theirs in _losses(backend):
        if backend == "triton" and name in ("nll_loss", "bce"):
            continue  # (no backend= there)
        results = []
        for loss_function in (theirs, ours):
            layer.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                z = layer(x)
                z.retain_grad()
                loss = loss_function(z, y)
            loss.backward()
            results.append((loss, z.grad))
        (want, want_grad), (got, got_grad) = results
        assert want.dtype == got.dtype == torch.float32, name
        assert got_grad.dtype == want_grad.dtype == dtype, name
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4, msg=name)
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=2e-2, atol=2e-4, msg=name)


@pytest.mark.parametrize("rows", [N_SMALL, N_LARGE])
@pytest.mark.parametrize("criterion", ["cross_entropy", "linear"])
def test_a_float16_loss_scalers_first_step_is_not_skipped(rows, criterion):
    """GradScaler's first scale, 65536, is inf in float16: cast to a half gradient's dtype before
    the multiplication, every gradient was inf and the step was skipped."""
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(16, 10 if criterion == "cross_entropy" else 8)
    head = torch.nn.Linear(8, C, bias=False)
    optimizer = torch.optim.SGD([*layer.parameters(), *head.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(rows, 16, generator=generator)
    y = torch.randint(0, 10, (rows,), generator=generator)
    with torch.autocast("cpu", dtype=torch.float16):
        if criterion == "cross_entropy":
            loss = xt.CrossEntropyLoss()(layer(x), y)
        else:
            loss = xt.linear_cross_entropy(layer(x), head.weight, y)  # float32 weight: autocast casts it
    scaler.scale(loss).backward()
    assert loss.dtype == torch.float32
    assert all(bool(p.grad.isfinite().all()) for p in layer.parameters())
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 65536.0


def test_the_vocabulary_parallel_loss_is_float32_under_autocast():
    from xentkit.torch import distributed

    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(16, C)
    x = torch.randn(N_SMALL, 16, generator=generator)
    y = torch.randint(0, C, (N_SMALL,), generator=generator)
    with torch.autocast("cpu", dtype=torch.float16):
        z = layer(x)
        loss = distributed.vocab_parallel_cross_entropy(z, y)  # a world of one
        want = F.cross_entropy(z, y)
    assert loss.dtype == want.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=2e-3, atol=1e-4)


def test_a_scaled_float16_gradient_keeps_its_small_entries_as_torchs():
    """The kernel path keeps a float16 input's gradient in float32 until backward has scaled it:
    rounded to float16 for an upstream of 1 first, 18.8% of a 1024 × 8192 gradient's entries were
    0 before the loss scaler's 65536 reached them (torch: 0.4%, float16's own subnormal limit)."""
    generator = torch.Generator().manual_seed(0)
    rows, classes = 256, 8192  # beyond SMALL_MAX_LOGITS: the Numba kernel
    x = (torch.randn(rows, classes, generator=generator) * 3).half()
    y = torch.randint(0, classes, (rows,), generator=generator)
    exact = torch.softmax(x.double(), 1)
    exact[torch.arange(rows), y] -= 1
    exact *= 65536 / rows
    off_target = torch.ones_like(exact, dtype=torch.bool)
    off_target[torch.arange(rows), y] = False
    errors = []
    for loss_function in (F.cross_entropy, xt.cross_entropy):
        z = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_function(z, y)
        (loss * 65536).backward()
        assert z.grad.dtype == torch.float16
        difference = (z.grad.double() - exact).abs()[off_target].sum() / exact.abs()[off_target].sum()
        flushed = ((z.grad == 0) & (exact != 0))[off_target].double().mean()
        errors.append((difference.item(), flushed.item()))
    (torch_error, torch_flushed), (error, flushed) = errors
    assert error <= 1.5 * torch_error + 1e-6 and flushed <= torch_flushed + 1e-3, errors


def test_float16_bce_gradient_keeps_its_small_entries_under_a_loss_scale():
    """The kernel's gradient for an upstream of 1 was rounded to float16 in forward: entries near
    1/numel underflowed (a tenth of them 0) before a loss scaler's factor reached them. It now
    stays float32 until backward has scaled it, rounded once, as cross_entropy's."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(256, 1000, generator=generator).half().requires_grad_()
    t = torch.rand(256, 1000, generator=generator).half()
    (xt.binary_cross_entropy_with_logits(z, t).float() * 1024).backward()
    z64 = z.detach().double().requires_grad_()
    (F.binary_cross_entropy_with_logits(z64, t.double()) * 1024).backward()
    expected = z64.grad.half()  # the float64 gradient rounded once
    assert (z.grad == 0).sum() <= (expected == 0).sum() + 10
    assert ((z.grad.double() - expected.double()).abs() <= 2.0**-11 * expected.double().abs() + 2.0**-24).all()


def _linear_forms():
    from xentkit.torch import distributed

    def plain_log_probs(x, w, b, y):
        return F.linear(x, w, b).float().log_softmax(-1).gather(-1, y[:, None])[:, 0]

    return [
        ("linear_cross_entropy", lambda x, w, b, y: xt.linear_cross_entropy(x, w, y, linear_bias=b),
         lambda x, w, b, y: F.cross_entropy(F.linear(x, w, b), y)),
        ("linear_log_probs", lambda x, w, b, y: xt.linear_log_probs(x, w, y, linear_bias=b), plain_log_probs),
        ("vocab_parallel_linear_cross_entropy",
         lambda x, w, b, y: distributed.vocab_parallel_linear_cross_entropy(x, w, y, linear_bias_shard=b),
         lambda x, w, b, y: F.cross_entropy(F.linear(x, w, b), y)),
        ("vocab_parallel_linear_log_probs",
         lambda x, w, b, y: distributed.vocab_parallel_linear_log_probs(x, w, y, linear_bias_shard=b), plain_log_probs),
    ]


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("name", "ours", "theirs"), _linear_forms(), ids=[case[0] for case in _linear_forms()])
def test_the_fused_linear_forms_follow_autocast_as_f_linear_does(half, name, ours, theirs):
    """Half activations beside float32 master weights (mixed precision): autocast casts
    ``F.linear``'s operands to its dtype; the fused forms refused the mix (one dtype) and ran
    float32 operands in float32. Now: torch's values and gradients, the float32 weights' in
    float32."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(N_LARGE, 16, generator=generator).to(half).requires_grad_()
    w = torch.randn(C, 16, generator=generator).requires_grad_()
    b = torch.randn(C, generator=generator).requires_grad_()
    y = torch.randint(0, C, (N_LARGE,), generator=generator)
    results = []
    for function in (ours, theirs):
        with torch.autocast("cpu", dtype=half):
            loss = function(x, w, b, y)
        results.append((loss, torch.autograd.grad(loss.sum(), (x, w, b))))
    (loss, grads), (expected, expected_grads) = results
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected.float(), rtol=2e-3, atol=1e-3, msg=name)
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-3, msg=name)
