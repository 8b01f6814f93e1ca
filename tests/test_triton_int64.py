"""Every Triton kernel addresses rows past 2^31 elements: its row offsets are int64.

Logits with more than 2^31 elements (65536 × 262144 is a real shape) need row_index × stride in
int64; an int32 product wraps and reads (or writes) far outside the tensor. Without allocating
them: each kernel runs on 3-row views of one bfloat16 storage whose row stride is 2^30 + 2^10, so
row 2 starts at element 2^31 + 2^11. On the CPU the storage is 4 GiB of address space of which the
kernels touch a few pages (the allocation is lazy; the interpreter copies nothing); on a GPU
(``XENTKIT_TEST_DEVICE=cuda``) it is 4 GiB of device memory. Each result must equal the same
kernel's on a contiguous copy of the rows.

The kernels run in a child process: an int32 offset is a segmentation fault, reported here as a
failure instead of ending the test session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _triton_setup import DEVICE  # first: the skips

# isort: split
import xentkit

# Runs in the child: argv[1] is the device.
CHECKS = r'''
import sys

import torch

from xentkit.triton.cross_entropy import row_gradient, row_statistics
from xentkit.triton.log_probs import log_prob_gradient, log_prob_statistics
from xentkit.triton.vocab_parallel import shard_softmax_grad, shard_softmax_stats

device = sys.argv[1]
ROWS, V = 3, 300
STRIDE = 2**30 + 2**10  # row 2 starts at 2^31 + 2^11 elements: past int32
storage = torch.empty(STRIDE * (ROWS - 1) + 2 * V, dtype=torch.bfloat16, device=device)
generator = torch.Generator().manual_seed(0)


def huge(offset, values):
    """Rows at offset, offset + STRIDE, offset + 2·STRIDE of the storage, set to ``values``."""
    view = storage.as_strided((ROWS, V), (STRIDE, 1), offset)
    view.copy_(values)
    return view


def same(name, got, expected):
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a is not None and not torch.equal(a.cpu(), b.cpu()):
            raise AssertionError(f"{name}: result {index} differs on rows past 2^31:\n{a}\n{b}")


def random(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=generator).to(dtype).to(device)


logits = (random(ROWS, V) * 3).to(torch.bfloat16)
labels = torch.tensor([5, 17, V - 1], device=device)
weight = (torch.rand(V, generator=generator) + 0.25).to(device)
formula = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.5}
scale = torch.linspace(0.5, 1.5, ROWS, device=device)

# cross-entropy, class indices then probabilities (their rows strided too): pass 1, then pass 2
# written over the logits
probabilities = torch.softmax(random(ROWS, V), 1).to(torch.bfloat16)
for target in (labels, probabilities):
    view = huge(0, logits)
    big_target = target if target is labels else huge(V, target)
    got = row_statistics(view, big_target, weight, **formula)
    expected = row_statistics(logits.clone(), target, weight, **formula)
    same("cross_entropy.row_statistics", got, expected)
    row_gradient(view, big_target, weight, got[2], scale, scale, view, **formula)
    compact = logits.clone()
    row_gradient(compact, target, weight, expected[2], scale, scale, compact, **formula)
    same("cross_entropy.row_gradient", (view,), (compact,))

# log-probabilities
valid = torch.ones(ROWS, dtype=torch.bool, device=device)
view = huge(0, logits)
got = log_prob_statistics(view, labels, valid, 0.8)
expected = log_prob_statistics(logits.clone(), labels, valid, 0.8)
same("log_probs.log_prob_statistics", got, expected)
coefficients = (random(ROWS), random(ROWS), random(ROWS))
log_prob_gradient(view, labels, valid, 0.8, got[0], got[1], coefficients, view)
compact = logits.clone()
log_prob_gradient(compact, labels, valid, 0.8, expected[0], expected[1], coefficients, compact)
same("log_probs.log_prob_gradient", (view,), (compact,))

# a vocabulary-parallel shard
local_labels = torch.tensor([5, -1, V - 1], device=device)
weight64 = weight.double()
view = huge(0, logits)
got = shard_softmax_stats(view, local_labels, weight64, True)
expected = shard_softmax_stats(logits.clone(), local_labels, weight64, True)
same("vocab_parallel.shard_softmax_stats", got, expected)
coef, smooth, target_grad = (random(ROWS, dtype=torch.float64) for _ in range(3))
shard_softmax_grad(view, local_labels, got[0], coef, smooth, target_grad, weight64, view)
compact = logits.clone()
shard_softmax_grad(compact, local_labels, expected[0], coef, smooth, target_grad, weight64, compact)
same("vocab_parallel.shard_softmax_grad", (view,), (compact,))
print("every kernel addressed rows past 2^31")
'''


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_every_kernel_reads_and_writes_rows_past_two_to_the_31_elements():
    environment = dict(os.environ)
    if DEVICE == "cpu":
        environment["TRITON_INTERPRET"] = "1"
    source = str(Path(xentkit.__file__).parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [source, environment.get("PYTHONPATH")]))
    child = subprocess.run(
        [sys.executable, "-c", CHECKS, DEVICE], capture_output=True, text=True, env=environment, timeout=600,
    )
    if child.returncode < 0:
        pytest.fail(
            f"a kernel crashed (signal {-child.returncode}) on rows past 2^31 elements: an int32 "
            f"offset?\n{child.stdout}{child.stderr[-3000:]}"
        )
    assert child.returncode == 0, child.stdout + child.stderr[-3000:]
    assert "every kernel addressed rows past 2^31" in child.stdout
