"""The chunk scaffolding shared by the Triton kernels (``xentkit.triton._chunks``): the block size
rule, the launch layout, and that each kernel module cuts its rows by its own ``MAX_BLOCK`` (the
knob the kernel tests and ``benchmarks/bench_gpu_cross_entropy.py --blocks`` lower per module).

The merge itself is tested through the kernels (``chunked`` fixtures of ``test_triton.py``,
``test_triton_log_probs.py``, ``test_distributed_triton.py``: rows of several chunks against the
float64 reference).
"""

from __future__ import annotations

import pytest

from _triton_setup import DEVICE  # first: the skips and the interpreter

# isort: split
import torch

from xentkit.triton import _chunks, cross_entropy, log_probs, vocab_parallel
from xentkit.triton._chunks import Layout, block_size

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize(
    ("n_cols", "max_block", "expected"),
    [
        (0, 8192, 16),  # an empty row still gets a program of 16 lanes
        (1, 8192, 16),
        (17, 8192, 32),
        (300, 8192, 512),
        (8192, 8192, 8192),
        (8193, 8192, 8192),
        (262144, 8192, 8192),
        (300, 128, 128),
        (37, 4, 4),  # a knob below 16 is taken as it is (the distributed tests use 4)
    ],
)
def test_block_size(n_cols, max_block, expected):
    assert block_size(n_cols, max_block) == expected


def test_layout_of_a_ragged_row():
    layout = Layout.of(5, 300, 128)
    assert (layout.block, layout.chunks) == (128, 3)
    assert layout.grid == (5, 3)
    assert layout.plane == 15
    # every launch turns contraction off (tests/_triton_machine_code.py checks the compiled code)
    assert layout.per_chunk == {"BLOCK": 128, "num_warps": 4, "enable_fp_fusion": False}
    assert layout.per_row == {"CHUNKS": 4, "num_warps": 1, "enable_fp_fusion": False}
    part = layout.partials(4, torch.device("cpu"))
    assert part.shape == (4, 5, 3)
    assert part.dtype == torch.float32
    # one chunk still gives the combine two lanes (tl.arange takes at least 2)
    assert Layout.of(2, 10, 8192).per_row["CHUNKS"] == 2
    assert Layout.of(3, 0, 8192).chunks == 1


def test_one_default_for_every_module():
    for module in (cross_entropy, log_probs, vocab_parallel):
        assert module.MAX_BLOCK == _chunks.MAX_BLOCK == 8192


def test_each_module_cuts_its_rows_by_its_own_max_block(monkeypatch):
    """Lowering one module's ``MAX_BLOCK`` changes that module's chunks and no other's."""
    seen = []
    layout_of = Layout.of.__func__

    def recording(cls, n_rows, n_cols, max_block):
        seen.append(max_block)
        return layout_of(cls, n_rows, n_cols, max_block)

    monkeypatch.setattr(Layout, "of", classmethod(recording))
    monkeypatch.setattr(cross_entropy, "MAX_BLOCK", 32)
    monkeypatch.setattr(log_probs, "MAX_BLOCK", 64)
    monkeypatch.setattr(vocab_parallel, "MAX_BLOCK", 16)
    logits = torch.randn(3, 40, device=DEVICE)
    labels = torch.tensor([1, 0, 39], device=DEVICE)
    cross_entropy.cross_entropy_rows(logits, labels, None, -100, 0.0, 0.0, None, None, None, logits.clone())
    assert seen == [32, 32]  # pass 1 and pass 2
    seen.clear()
    log_probs.log_prob_statistics(logits, labels, torch.ones(3, dtype=torch.bool, device=DEVICE))
    assert seen == [64]
    seen.clear()
    vocab_parallel.shard_softmax_stats(logits, labels, None, False)
    assert seen == [16]


def test_a_launch_the_grid_cannot_hold_is_a_value_error(monkeypatch):
    """No kernel checks a bound: more classes than 8192 chunks (the combine kernels hold a row's
    chunks in registers) or int32 column offsets reach, or more rows than the grid's first axis,
    is refused before a launch, here with the grid's limits made small."""
    assert Layout.of(3, 8192 * 8192, 8192).chunks == 8192
    with pytest.raises(ValueError, match=r"^the Triton kernels take at most 67108864 classes and 2147483647 rows, "
                       r"got 67108865 classes and 3 rows; backend='torch' runs torch ops$"):  # fmt: skip
        Layout.of(3, 8192 * 8192 + 1, 8192)
    with pytest.raises(ValueError, match=r"got 100 classes and 2147483648 rows"):
        Layout.of(2**31, 100, 8192)
    assert Layout.of(1, 2**31 - 2**18, 2**18).chunks == 2**13 - 1  # (int32 offsets: a larger block)
    with pytest.raises(ValueError, match=r"at most 2147221504 classes"):
        Layout.of(1, 2**31 - 2**18 + 1, 2**18)
    assert Layout(1, 8192, 8192).per_row["num_warps"] == 8 and Layout(1, 8192, 100).per_row["num_warps"] == 1
    monkeypatch.setattr(_chunks, "_GRID_Y", 2)
    monkeypatch.setattr(cross_entropy, "MAX_BLOCK", 16)
    import xentkit.torch as xt

    logits, target = torch.randn(2, 33, device=DEVICE), torch.tensor([0, 32], device=DEVICE)
    with pytest.raises(ValueError, match=r"at most 32 classes .* got 33 classes and 2 rows"):
        xt.cross_entropy(logits, target, backend="triton")
    assert xt.cross_entropy(logits[:, :32], target.clamp(max=31), backend="triton").isfinite()


def test_backend_auto_runs_torch_ops_for_a_launch_the_grid_cannot_hold(monkeypatch):
    """The grid's limit is one of the reasons ``backend=`` weighs (``_chunks.grid_reason``):
    "triton" says so before any work, "auto" runs torch ops instead of raising from the launch
    (here with the grid's first axis made 3 rows, and "auto" told the CPU tensors are CUDA's)."""
    import xentkit.torch as xt
    from xentkit.torch import _triton_path

    monkeypatch.setattr(_chunks, "_GRID_X", 3)
    logits = torch.randn(2, 5, 2, device=DEVICE, dtype=torch.float32)  # (N, C, d): 4 rows
    target = torch.tensor([[0, 4], [1, -100]], device=DEVICE)
    message = r"^backend='triton' cannot run this call: the Triton kernels take at most \d+ classes and 3 rows, got 5 classes and 4 rows$"
    with pytest.raises(ValueError, match=message):
        xt.cross_entropy(logits, target, backend="triton")
    with pytest.raises(ValueError, match=message):  # (log_probs: classes last, 4 rows of 5)
        xt.log_probs(logits.movedim(1, -1), target.clamp(min=0), backend="triton")
    monkeypatch.setattr(_triton_path, "_is_cuda", lambda tensor: True)
    for reduction in ("mean", "none"):
        expected = xt.cross_entropy(logits, target, reduction=reduction, backend="torch")
        torch.testing.assert_close(xt.cross_entropy(logits, target, reduction=reduction), expected)
    assert xt.cross_entropy(logits[:1], target[:1], backend="triton").isfinite()  # 2 rows: it fits


def test_float_arguments_reach_the_kernels_as_the_gpu_takes_them(monkeypatch):
    """Triton passes a Python float to a GPU kernel as float32, its interpreter as the double (a
    review: ``1 − ε`` 2 ulps apart at ε = 0.8132…): label_smoothing, z_loss and softcap are
    rounded to float32 on the host, so that both compute with one value."""
    import numpy as np

    import xentkit.torch as xt

    seen = []
    real = _chunks.float32_argument
    monkeypatch.setattr(_chunks, "float32_argument", lambda value: seen.append(value) or real(value))
    logits = torch.randn(3, 40, device=DEVICE, requires_grad=True)
    target = torch.tensor([0, 5, 39], device=DEVICE)
    loss = xt.cross_entropy(logits, target, label_smoothing=0.8132, z_loss=1e-4, softcap=30.0, backend="triton")
    loss.backward()
    assert {0.8132, 1e-4, 30.0} <= set(seen)
    assert real(0.8132) == float(np.float32(0.8132)) != 0.8132
