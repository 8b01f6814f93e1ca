"""The interpreter's bounds check (tests/_triton_bounds.py) catches what it is there for: a
masked-in store or load one element beyond a tensor fails the launch; the same kernel with its
mask is fine."""

from __future__ import annotations

from _triton_setup import DEVICE

# isort: split
import pytest
import torch
import triton
import triton.language as tl

import _triton_bounds

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the check is the interpreter's")


@triton.jit
def _copy(source, target, n, extra, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n + extra  # extra = 1: one element too many
    tl.store(target + offsets, tl.load(source + offsets, mask=offsets < n), mask=mask)


@triton.jit
def _read(source, target, n, extra, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    values = tl.load(source + offsets, mask=offsets < n + extra, other=0.0)
    tl.store(target + offsets, values, mask=offsets < n)


@pytest.mark.parametrize("kernel", [_copy, _read], ids=["store", "load"])
def test_an_access_one_beyond_the_tensor_fails_the_launch(kernel):
    assert _triton_bounds.install()
    source = torch.arange(10, dtype=torch.float32)
    target = torch.zeros(10)
    kernel[(1,)](source, target, 10, 0, BLOCK=16)
    assert torch.equal(target, source)
    storage = torch.zeros(24)
    source, target = storage[:10], storage[12:22]  # one storage: the gap between them is not theirs
    with pytest.raises(Exception, match="outside every tensor argument"):
        kernel[(1,)](source, target, 10, 1, BLOCK=16)
