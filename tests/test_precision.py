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
