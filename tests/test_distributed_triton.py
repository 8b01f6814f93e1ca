"""The vocabulary-parallel cross-entropy on Triton: the shard kernels
(``xentkit.triton.vocab_parallel``) against the Numba shard kernels and float64, and
``vocab_parallel_cross_entropy`` / ``vocab_parallel_linear_cross_entropy`` with
``backend="triton"`` in a world of one and in a gloo group of 2 processes, against the
single-process answers.

On CPU tensors the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest before anything imports triton, and by ``_triton_setup``), so the shapes are small; blocks of 16 classes (4 in the
spawned group) make every shard several chunks, the last one ragged. With
``XENTKIT_TEST_DEVICE=cuda`` the in-process checks run on CUDA tensors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from _triton_setup import DEVICE  # first: the skips and the interpreter

# isort: split
import torch

dist = pytest.importorskip("torch.distributed")

import torch.nn.functional as F  # noqa: E402

import xentkit  # noqa: E402
from test_distributed import (  # noqa: E402
    _expect_error,
    assert_close,
    check_findings,
    recorded,
    run_scenarios,
    spawn_group,
    torch_cross_entropy,
)
from xentkit._options import LossOptions  # noqa: E402
from xentkit.kernels.vocab_parallel import shard_softmax_grad as numba_grad  # noqa: E402
from xentkit.kernels.vocab_parallel import shard_softmax_stats as numba_stats  # noqa: E402
from xentkit.torch import distributed as vp  # noqa: E402
from xentkit.torch.distributed._shards import NumbaShards, TorchShards, TritonShards, shard_backend  # noqa: E402
from xentkit.triton import vocab_parallel as kernels  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# The statistics are float32 arithmetic whatever the logits' dtype: s_r and S_z agree with float64
# to STATISTICS relative to the sum of their terms' magnitudes. The gradient is stored in the
# logits' dtype: it agrees to GRADIENT[dtype] relative to the row's largest entry.
STATISTICS = 2e-6
GRADIENT = {torch.float32: 2e-6, torch.bfloat16: 1e-2}
ROWS, WIDTH = 9, 37  # 37 columns: 3 blocks of 16, the last holding 5
SPAWN_DEADLINE_S = 240


@pytest.fixture(params=[16, None], ids=["blocks-of-16", "one-block"])
def chunked(request, monkeypatch):
    """Shard rows cut into blocks of 16 classes (several per row, the last ragged), or whole."""
    if request.param is not None:
        monkeypatch.setattr(kernels, "MAX_BLOCK", request.param)
    return request.param


def _shard_problem(dtype, seed=0):
    """A ``[ROWS, WIDTH]`` shard with the row kinds the kernels distinguish, its local labels (a
    column here, -1: another shard's, -2: ignored), float64 class weights."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(ROWS, WIDTH, generator=generator, dtype=torch.float64) * 3.0
    z[1, 16:32] = -math.inf  # a whole block of masked classes
    z[3, :] = -math.inf  # no finite logit in this shard (the row's mass lives elsewhere)
    z[4] += 1e4  # far from zero: S_z must not lose float32's precision to the offset
    z[5, 7] = -math.inf  # one masked class, not the target
    logits = z.to(dtype)
    labels = torch.tensor([3, 20, -1, -1, 36, 0, -2, 17, -1], dtype=torch.int64)
    weight = torch.rand(WIDTH, generator=generator, dtype=torch.float64) + 0.25
    return logits, labels, weight


def _expected_statistics(logits, labels, weight, smoothing):
    """(m_r, s_r, z_y, S'_r) in float64 from the shard's values, as the kernel contract says (S'_r
    = Σ w_j·(z_j − t_r), relative to the shard's shift t_r)."""
    z = logits.to(torch.float64)
    m = z.amax(dim=1)
    t = torch.where(m > -math.inf, m, 0.0)
    s = torch.exp(z - t[:, None]).sum(dim=1)
    here = labels >= 0
    z_y = torch.where(here, z.gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    w = torch.ones(WIDTH, dtype=torch.float64) if weight is None else weight
    sum_z = ((z - t[:, None]) * w).sum(dim=1) if smoothing else torch.zeros(ROWS, dtype=torch.float64)
    # the magnitude of S_z's float32 terms: its error bound's scale
    spread = torch.where(torch.isfinite(z), (z - t[:, None]).abs() * w, 0.0).sum(dim=1) + 1.0
    ignored = labels == -2
    return (
        m.masked_fill(ignored, -math.inf), s.masked_fill(ignored, 0.0), z_y.masked_fill(ignored, 0.0),
        sum_z.masked_fill(ignored, 0.0), spread,
    )


def _close_within(actual, expected, bound, what):
    """|actual − expected| ≤ bound per entry (same infinities, NaN where expected is NaN)."""
    actual, expected = actual.cpu().to(torch.float64), expected.to(torch.float64)
    same = (actual == expected) | (actual.isnan() & expected.isnan())
    ok = same | ((actual - expected).abs() <= bound)
    assert ok.all(), f"{what}: got {actual[~ok].tolist()}, expected {expected[~ok].tolist()} at {torch.nonzero(~ok)[:, 0].tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [False, True])
def test_shard_statistics_match_float64_and_the_numba_kernel(chunked, dtype, weighted, smoothing):
    logits, labels, weight = _shard_problem(dtype)
    weight = weight if weighted else None
    m, e, z_y, sum_z = kernels.shard_softmax_stats(
        logits.to(DEVICE), labels.to(DEVICE), None if weight is None else weight.to(DEVICE), smoothing
    )
    assert all(piece.dtype == torch.float64 and piece.shape == (ROWS,) for piece in (m, e, z_y, sum_z))
    s = 1.0 + e  # the kernels return the excess e = s − 1
    expected_m, expected_s, expected_z_y, expected_sum_z, spread = _expected_statistics(logits, labels, weight, smoothing)
    # the max and the target logit are values of the shard: exact
    torch.testing.assert_close(m.cpu(), expected_m, rtol=0, atol=0)
    torch.testing.assert_close(z_y.cpu(), expected_z_y, rtol=0, atol=0)
    _close_within(s, expected_s, STATISTICS * expected_s, "s_r vs float64")
    _close_within(sum_z, expected_sum_z, STATISTICS * spread, "S_z vs float64")
    # (0 where float64's is: without smoothing, and row 4 in bfloat16, whose values are all 9984)
    assert torch.equal(sum_z.cpu() != 0, expected_sum_z != 0)
    if smoothing and dtype == torch.float32:
        assert sum_z[4] != 0
    # the Numba kernel on the same values (float32 holds bfloat16 exactly)
    numba = numba_stats(logits.float().numpy(), labels.numpy(), None if weight is None else weight.numpy(),
                        smoothing, block=chunked or 2048)
    torch.testing.assert_close(m.cpu(), torch.from_numpy(numba[0]), rtol=0, atol=0)
    _close_within(s, 1.0 + torch.from_numpy(numba[1]), STATISTICS * expected_s, "s_r vs Numba")
    torch.testing.assert_close(z_y.cpu(), torch.from_numpy(numba[2]), rtol=0, atol=0)
    _close_within(sum_z, torch.from_numpy(numba[3]), STATISTICS * spread, "S_z vs Numba")


@pytest.mark.parametrize("weighted", [False, True])
def test_the_smoothing_sum_of_logits_spanning_float32s_range_stays_finite(chunked, weighted):
    """S'_r = Σ w_j·(z_j − t_r) of a shard whose logits span ±3e38 is about −1e40: beyond float32,
    whose sums overflowed to −inf (a loss of inf where the true one is finite; a review,
    2026-12-07). The chunks' terms are summed scaled by 2^-32 and the chunks in float64, as the
    Numba kernel sums in float64: they agree to float32's rounding of each term."""
    big = float(torch.finfo(torch.float32).max)
    logits = torch.full((3, WIDTH), -big)
    logits[0, 5], logits[1, 20], logits[2, :] = big, 1.0, -1.5e38  # (row 2: one value, no span)
    logits[1, 30] = big * 0.5
    labels = torch.tensor([5, -1, 3])
    weight = torch.linspace(0.5, 2.0, WIDTH, dtype=torch.float64) if weighted else None
    _, _, _, sum_z = kernels.shard_softmax_stats(
        logits.to(DEVICE), labels.to(DEVICE), None if weight is None else weight.to(DEVICE), True
    )
    numba = numba_stats(logits.numpy(), labels.numpy(), None if weight is None else weight.numpy(), True,
                        block=chunked or 2048)
    assert torch.isfinite(sum_z).all() and sum_z[0] < -1e40, sum_z
    torch.testing.assert_close(sum_z.cpu(), torch.from_numpy(numba[3]), rtol=1e-7, atol=0)
    assert sum_z[2] == 0


def test_shard_statistics_of_labels_outside_the_shard_and_empty_shards():
    """A label that is not a column here (-1, or past the shard) reads nothing: z_y = 0; an empty
    shard (V_r = 0) and an empty batch give the contract's values."""
    logits, _, weight = _shard_problem(torch.float32)
    labels = torch.tensor([WIDTH, WIDTH + 5, -1, -1, -1, -1, -2, -1, 10**12])
    _, _, z_y, _ = kernels.shard_softmax_stats(logits.to(DEVICE), labels.to(DEVICE), None, False)
    assert z_y.eq(0).all()
    empty = torch.zeros(4, 0, device=DEVICE)
    m, e, z_y, sum_z = kernels.shard_softmax_stats(empty, torch.tensor([-1, -2, -1, -1], device=DEVICE),
                                                   weight[:0].to(DEVICE), True)
    assert m.eq(-math.inf).all() and e.eq(-1).all() and z_y.eq(0).all() and sum_z.eq(0).all()  # s = 0
    pieces = kernels.shard_softmax_stats(torch.zeros(0, 5, device=DEVICE), torch.zeros(0, dtype=torch.int64,
                                         device=DEVICE), None, True)
    assert all(piece.shape == (0,) for piece in pieces)


def _gradient_problem(dtype, smoothing, seed=1):
    """A shard and pass 2's per-row float64 inputs: M ≥ the shard's max (the row's max over every
    rank), c, σ and the target entries."""
    logits, labels, weight = _shard_problem(dtype, seed)
    logits[3] = torch.randn(WIDTH).to(dtype)  # pass 2 never sees a row without a finite logit
    generator = torch.Generator().manual_seed(seed + 100)
    z = logits.to(torch.float64)
    shift = torch.maximum(z.amax(dim=1), z.amax(dim=1) + torch.tensor([0, 1, 0, 2, 0, 0, 0, 0.5, 0]))
    shift = shift.to(dtype).to(torch.float64)  # M is a logit of some shard: a value of the dtype
    coef = torch.rand(ROWS, generator=generator, dtype=torch.float64) + 0.1
    smooth = torch.rand(ROWS, generator=generator, dtype=torch.float64) * 0.05 if smoothing else None
    target_grad = -torch.rand(ROWS, generator=generator, dtype=torch.float64)
    return logits, labels, weight, shift, coef, smooth, target_grad


def _expected_gradient(logits, labels, weight, shift, coef, smooth, target_grad):
    z = logits.to(torch.float64)
    grad = coef[:, None] * torch.exp(z - shift[:, None])
    if smooth is not None:
        grad -= smooth[:, None] * (1.0 if weight is None else weight)
    rows = torch.nonzero(labels >= 0)[:, 0]
    grad[rows, labels[rows]] = target_grad[rows]
    grad[labels == -2] = 0.0
    return grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
def test_shard_gradient_matches_float64_and_the_numba_kernel(chunked, dtype, weighted, smoothing, in_place):
    logits, labels, weight, shift, coef, smooth, target_grad = _gradient_problem(dtype, smoothing)
    weight = weight if weighted else None
    expected = _expected_gradient(logits, labels, weight, shift, coef, smooth, target_grad)
    on = {"device": DEVICE}
    shard = logits.clone().to(**on)
    out = shard if in_place else torch.full_like(shard, 7.0)
    returned = kernels.shard_softmax_grad(
        shard, labels.to(**on), shift.to(**on), coef.to(**on), None if smooth is None else smooth.to(**on),
        target_grad.to(**on), None if weight is None else weight.to(**on), out,
    )
    assert returned is out and out.dtype == dtype
    scale = expected.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    _close_within(out, expected, GRADIENT[dtype] * scale, "gradient vs float64")
    assert out[6].eq(0).all()  # the ignored row
    if dtype == torch.float32:  # the Numba kernel on the same inputs
        numba_out = np.empty((ROWS, WIDTH), dtype=np.float32)
        numba_grad(logits.numpy(), labels.numpy(), shift.numpy(), coef.numpy(),
                   None if smooth is None else smooth.numpy(), target_grad.numpy(),
                   None if weight is None else weight.numpy(), numba_out)
        _close_within(out, torch.from_numpy(numba_out), GRADIENT[dtype] * scale, "gradient vs Numba")


# ---------------------------------------------------------------------------------------------
# A world of one (no process group): the public functions on the Triton backend
# ---------------------------------------------------------------------------------------------


def _full_problem(dtype, seed, rows=11, classes=WIDTH):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=generator, dtype=torch.float64) * 3.0).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=generator)
    target[[2, rows - 4]] = -100
    weight = torch.rand(classes, generator=generator, dtype=torch.float64) + 0.25
    upstream = torch.rand(rows, generator=generator, dtype=torch.float64) + 0.5
    return logits, target, weight, upstream


@pytest.mark.parametrize(
    ("dtype", "reduction", "weighted", "smoothing", "z_loss"),
    [
        (torch.float32, "mean", True, 0.1, 1e-2),
        (torch.float32, "none", False, 0.0, 1e-2),
        (torch.float32, "sum", True, 0.2, 0.0),
        (torch.bfloat16, "mean", True, 0.1, 1e-3),
        (torch.bfloat16, "none", False, 0.1, 0.0),
    ],
)
def test_logits_form_on_triton_is_the_single_process_cross_entropy(chunked, dtype, reduction, weighted, smoothing, z_loss):
    logits, target, weight, upstream = _full_problem(dtype, seed=5)
    weight = weight if weighted else None
    options = {"weight": None if weight is None else weight.to(DEVICE), "reduction": reduction,
               "label_smoothing": smoothing, "z_loss": z_loss}
    x = logits.clone().to(DEVICE).requires_grad_(True)
    loss = vp.vocab_parallel_cross_entropy(x, target.to(DEVICE), backend="triton", **options)
    grad_output = upstream if reduction == "none" else torch.tensor(1.3, dtype=torch.float64)
    (loss * grad_output.to(dtype).to(DEVICE)).sum().backward()
    expected_loss, expected_grad = xentkit.cross_entropy_and_grad(
        logits.to(torch.float64).numpy(), target.numpy(), weight=None if weight is None else weight.numpy(),
        reduction=reduction, label_smoothing=smoothing, z_loss=z_loss, grad_output=grad_output.numpy(),
    )
    assert loss.dtype == dtype and x.grad.dtype == dtype
    assert_close(loss.detach().cpu(), expected_loss, dtype, "loss vs xentkit float64")
    assert_close(x.grad.cpu(), expected_grad, dtype, "gradient vs xentkit float64")
    if dtype == torch.float32 and DEVICE == "cpu":  # the Numba shard kernels: the same numbers
        y = logits.clone().requires_grad_(True)
        numba_loss = vp.vocab_parallel_cross_entropy(y, target, backend="auto", **options)
        (numba_loss * grad_output.to(dtype)).sum().backward()
        assert_close(loss.detach(), numba_loss.detach(), dtype, "loss vs the Numba backend")
        assert_close(x.grad, y.grad, dtype, "gradient vs the Numba backend")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_form_on_triton_is_the_single_process_cross_entropy(reduction):
    generator = torch.Generator().manual_seed(9)
    rows, features = 10, 4
    x_full = torch.randn(rows, features, generator=generator, dtype=torch.float64)
    w_full = torch.randn(WIDTH, features, generator=generator, dtype=torch.float64)
    b_full = torch.randn(WIDTH, generator=generator, dtype=torch.float64)
    _, target, class_weight, upstream = _full_problem(torch.float64, seed=9, rows=rows)
    x, w, b = (t.float().to(DEVICE).requires_grad_(True) for t in (x_full, w_full, b_full))
    loss = vp.vocab_parallel_linear_cross_entropy(
        x, w, target.to(DEVICE), linear_bias_shard=b, weight=class_weight.to(DEVICE), reduction=reduction,
        label_smoothing=0.1, z_loss=1e-2, chunk_size=4, backend="triton",
    )
    grad_output = upstream if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    (loss * grad_output.float().to(DEVICE)).sum().backward()
    references = [t.clone().requires_grad_(True) for t in (x_full, w_full, b_full)]
    expected = torch_cross_entropy(F.linear(*references), target, class_weight, -100, reduction, 0.1, 1e-2)
    (expected * grad_output).sum().backward()
    assert_close(loss.detach().cpu(), expected.detach(), torch.float32, "loss")
    for name, mine, reference in zip(("input", "weight", "bias"), (x, w, b), references, strict=True):
        assert_close(mine.grad.cpu(), reference.grad, torch.float32, f"{name} gradient")


def test_the_backend_is_chosen_by_device_and_dtype(monkeypatch):
    cpu32 = torch.zeros(2, 3)
    options = {name: LossOptions(backend=name) for name in ("auto", "triton", "torch")}
    assert shard_backend(cpu32, options["auto"]) is NumbaShards  # the CPU path is unchanged
    assert shard_backend(cpu32, options["torch"]) is TorchShards
    assert shard_backend(cpu32.bfloat16(), options["auto"]) is TorchShards
    assert shard_backend(cpu32, options["triton"]) is TritonShards  # under the interpreter
    assert shard_backend(cpu32.bfloat16(), options["triton"]) is TritonShards
    monkeypatch.setattr(vp, "USE_KERNELS", False)
    assert shard_backend(cpu32, options["auto"]) is TorchShards
    assert shard_backend(cpu32, options["triton"]) is TorchShards


def test_backend_triton_says_why_it_cannot_run(monkeypatch):
    logits, target, _, _ = _full_problem(torch.float32, seed=3, rows=6, classes=5)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call: .*float64"):
        vp.vocab_parallel_cross_entropy(logits.double(), target, backend="triton")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call: .*float64"):
        vp.vocab_parallel_linear_cross_entropy(torch.zeros(6, 2, dtype=torch.float64),
                                               torch.zeros(5, 2, dtype=torch.float64), target, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        vp.vocab_parallel_cross_entropy(logits, target, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call: .*TRITON_INTERPRET=1"):
        vp.vocab_parallel_cross_entropy(logits, target, backend="triton")
    # "auto" on CPU tensors never needs Triton
    assert vp.vocab_parallel_cross_entropy(logits, target).isfinite()


# ---------------------------------------------------------------------------------------------
# A gloo group of 2 processes: backend="triton" on CPU tensors (the interpreter)
# ---------------------------------------------------------------------------------------------

N, V = 13, 11  # 11 classes over 2 ranks: 6 + 5, blocks of 4 (2 per shard, the last ragged)
EXPLICIT_SHARDS = [(5, 11), (0, 5)]  # out of rank order


def _rank_shard(world, rank, explicit):
    if explicit:
        start, stop = EXPLICIT_SHARDS[rank]
        return start, stop, start
    start, stop = vp.vocab_shard_range(V, world, rank)
    return start, stop, None


# Calls of the Triton shard kernels in this process (the spawned ranks count them).
TRITON_CALLS = {"statistics": 0, "gradient": 0}


def _count_triton_calls() -> None:
    """Wrap the Triton host functions so that a scenario can see that backend="triton" ran them."""
    for name, key in (("shard_softmax_stats", "statistics"), ("shard_softmax_grad", "gradient")):
        original = getattr(kernels, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            TRITON_CALLS[_key] += 1
            return _original(*args, **kwargs)

        setattr(kernels, name, counted)


def scenario_logits(world, rank):
    """The logits form on Triton: float32 against float64 and the Numba backend, bfloat16 against
    float64 of its values; every option, labels in the other rank's shard, ignored rows."""
    cases = [
        (torch.float32, "mean", True, 0.1, 1e-2, False),
        (torch.float32, "none", False, 0.0, 1e-2, True),
        (torch.float32, "sum", True, 0.1, 0.0, True),
        (torch.bfloat16, "mean", True, 0.1, 1e-3, False),
    ]
    for dtype, reduction, weighted, smoothing, z_loss, explicit in cases:
        what = (f"logits dtype={dtype} reduction={reduction} weighted={weighted} smoothing={smoothing} "
                f"z_loss={z_loss} explicit={explicit} rank={rank}")
        with recorded(what):
            full, target, weight, upstream = _full_problem(dtype, seed=21, rows=N, classes=V)
            weight = weight if weighted else None
            start, stop, vocab_start = _rank_shard(world, rank, explicit)
            options = {"vocab_start": vocab_start, "weight": weight, "reduction": reduction,
                       "label_smoothing": smoothing, "z_loss": z_loss}
            grad_output = upstream if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
            results = {}
            for backend in ("triton", "auto"):
                before = dict(TRITON_CALLS)
                shard = full[:, start:stop].clone().requires_grad_(True)
                loss = vp.vocab_parallel_cross_entropy(shard, target, backend=backend, **options)
                (loss * grad_output.to(dtype)).sum().backward()
                results[backend] = (loss.detach(), shard.grad)
                launched = [TRITON_CALLS[key] - before[key] for key in TRITON_CALLS]
                assert launched == ([1, 1] if backend == "triton" else [0, 0]), (backend, launched)
            expected_loss, expected_grad = xentkit.cross_entropy_and_grad(
                full.to(torch.float64).numpy(), target.numpy(), weight=None if weight is None else weight.numpy(),
                reduction=reduction, label_smoothing=smoothing, z_loss=z_loss, grad_output=grad_output.numpy(),
            )
            loss, grad = results["triton"]
            assert loss.dtype == dtype and grad.shape == (N, stop - start)
            assert_close(loss, expected_loss, dtype, "loss vs xentkit float64")
            assert_close(grad, expected_grad[:, start:stop], dtype, "gradient vs xentkit float64")
            assert_close(loss, results["auto"][0], dtype, "loss vs backend='auto'")
            assert_close(grad, results["auto"][1], dtype, "gradient vs backend='auto'")


def scenario_linear(world, rank):
    """The fused linear form on Triton: loss and the gradients of input, weight and bias shards."""
    features = 5
    generator = torch.Generator().manual_seed(23)
    x_full = torch.randn(N, features, generator=generator, dtype=torch.float64)
    w_full = torch.randn(V, features, generator=generator, dtype=torch.float64)
    b_full = torch.randn(V, generator=generator, dtype=torch.float64)
    _, target, class_weight, upstream = _full_problem(torch.float64, seed=23, rows=N, classes=V)
    for reduction, bias, smoothing, z_loss, chunk_size, explicit in [
        ("mean", True, 0.1, 1e-2, 4, False),
        ("none", False, 0.0, 1e-2, None, True),
    ]:
        what = (f"linear reduction={reduction} bias={bias} smoothing={smoothing} z_loss={z_loss} "
                f"chunk_size={chunk_size} explicit={explicit} rank={rank}")
        with recorded(what):
            start, stop, vocab_start = _rank_shard(world, rank, explicit)
            x = x_full.float().requires_grad_(True)
            w_shard = w_full[start:stop].float().requires_grad_(True)
            b_shard = b_full[start:stop].float().requires_grad_(True) if bias else None
            loss = vp.vocab_parallel_linear_cross_entropy(
                x, w_shard, target, vocab_start=vocab_start, linear_bias_shard=b_shard, weight=class_weight,
                reduction=reduction, label_smoothing=smoothing, z_loss=z_loss, chunk_size=chunk_size,
                backend="triton",
            )
            grad_output = upstream if reduction == "none" else torch.tensor(0.6, dtype=torch.float64)
            (loss * grad_output.float()).sum().backward()
            assert TRITON_CALLS["statistics"] > 0 and TRITON_CALLS["gradient"] > 0
            x_ref = x_full.clone().requires_grad_(True)
            w_ref = w_full.clone().requires_grad_(True)
            b_ref = b_full.clone().requires_grad_(True) if bias else None
            expected = torch_cross_entropy(F.linear(x_ref, w_ref, b_ref), target, class_weight, -100,
                                           reduction, smoothing, z_loss)
            (expected * grad_output).sum().backward()
            assert_close(loss.detach(), expected.detach(), torch.float32, "loss")
            assert_close(x.grad, x_ref.grad, torch.float32, "input gradient")
            assert_close(w_shard.grad, w_ref.grad[start:stop], torch.float32, "weight shard gradient")
            if bias:
                assert_close(b_shard.grad, b_ref.grad[start:stop], torch.float32, "bias shard gradient")


def scenario_errors(world, rank):
    """backend="triton" where it cannot run, or on one rank only, raises on every rank."""
    full, target, _, _ = _full_problem(torch.float64, seed=31, rows=N, classes=V)
    start, stop, _ = _rank_shard(world, rank, False)
    shard = full[:, start:stop]
    _expect_error(lambda: vp.vocab_parallel_cross_entropy(shard, target, backend="triton"),
                  "rank(s) [0, 1]", "backend='triton' cannot run this call", "float64")
    _expect_error(lambda: vp.vocab_parallel_cross_entropy(
        shard.float(), target, backend="triton" if rank == 1 else "auto"), "backend must be the same")


SCENARIOS = {"logits": scenario_logits, "linear": scenario_linear, "errors": scenario_errors}


def _worker(rank: int, world: int, port: int, results: str) -> None:
    import _triton_bounds

    _triton_bounds.install()  # (the interpreter's accesses checked here too, as in the test process)
    kernels.MAX_BLOCK = 4  # every shard row in several blocks
    _count_triton_calls()
    run_scenarios(rank, world, port, results, SCENARIOS)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> dict[str, dict[int, str | None]]:
    """Spawn one gloo group of 2 ranks that runs every scenario; its findings by scenario."""
    if DEVICE != "cpu":
        pytest.skip("the spawned group runs CPU tensors under Triton's interpreter")
    return spawn_group(_worker, 2, tmp_path_factory.mktemp("triton_world2"), SCENARIOS)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_rank_matches_the_single_process_answer(spawned, scenario):
    check_findings(spawned, scenario, 2)


@pytest.mark.parametrize("backend", ["triton", "auto", "torch"])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_a_confident_rows_small_loss_survives_the_shards(chunked, backend, offset):
    """A confident row's loss (V − 1)·exp(−25) ≈ 4e-10 through the vocabulary-parallel form: each
    shard counts its max's terms apart (Triton: ``_chunks.merge_counted``, s_r returned as 1 + e
    in float64; Numba: ``_block_sum_exp_top``), and the loss takes (M − z_y) + log S, not
    lse − z_y, whose M + log S rounds log S to an ulp of M. It was 0 on every backend but the
    torch ops (s_r summed in float32 with the max's term inside)."""
    if backend != "triton" and DEVICE != "cpu":
        pytest.skip("the CPU backends on CPU tensors")
    rows = torch.arange(3)
    target = torch.tensor([2, 20, 36])
    logits = torch.full((3, WIDTH), offset - 25.0)
    logits[rows, target] = offset
    logits[1, 5] = offset  # a tie at the max, in another block
    x = logits.clone().to(DEVICE).requires_grad_(True)
    loss = vp.vocab_parallel_cross_entropy(x, target.to(DEVICE), reduction="none", backend=backend)
    loss.sum().backward()
    wide = logits.double().requires_grad_(True)
    want = F.cross_entropy(wide, target, reduction="none")
    want.sum().backward()
    assert (loss.detach().cpu() > 0).all()
    # (1e-5: on a GPU tl.exp is ex2.approx of x·log2(e), about 1.5e-6 off at x = −25)
    torch.testing.assert_close(loss.detach().cpu().double(), want.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.cpu().double(), wide.grad, rtol=1e-5, atol=1e-15)
