"""float16 NumPy inputs: the conversions of ``xentkit.kernels.half`` (the same bits as NumPy's
casts, ~70 times faster where a result is a float16 subnormal: a float16 gradient had taken 1.1 s
for 8192 × 2000, its computation ~35 ms) and the block-by-block widening of large inputs
(``_rows.widened_blocks``: the same bits as one whole float32 copy, without it)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import xentkit
from _memory import peak_above
from xentkit.api import _half, _rows
from xentkit.kernels import half


def _same_halves(got: np.ndarray, want: np.ndarray) -> None:
    """The same float16 bits, NaNs compared as NaNs of the same sign (payloads aside)."""
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(np.signbit(got), np.signbit(want))
    assert np.array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


def _narrow(values: np.ndarray) -> np.ndarray:
    out = np.empty(values.shape, dtype=np.float16)
    half.narrow_to_half(values, out)
    return out


def test_narrowing_float32_gives_numpys_bits():
    """Every float32 whose float16 is a subnormal or near the top of the range, every 65th pattern
    elsewhere (all exponents, every sign), and the ties: NumPy's cast, bit for bit."""
    low = np.arange(0x33000000 - 4, 0x38800000 + 0x2000 * 8, dtype=np.int64)  # zero → subnormal → normal
    top = np.arange(0x477FC000, 0x47800000 + 64, dtype=np.int64)  # 65504 → inf
    spread = np.arange(0, 1 << 31, 65, dtype=np.int64)
    ties = (np.arange(0x38800000 >> 13, 0x47800000 >> 13, dtype=np.int64) << 13) | 0x1000
    magnitudes = np.concatenate([low, top, spread, ties, [0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF]])
    bits = np.concatenate([magnitudes, magnitudes | (1 << 31)]).astype(np.uint32)
    values = bits.view(np.float32)
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    _same_halves(_narrow(values), want)


def test_narrowing_float64_rounds_once():
    """float64 straight to float16: NumPy's one rounding, not a float32 one first (a value just
    above a float16 tie rounds up; through float32 it would become the tie, then round to even)."""
    rng = np.random.default_rng(0)
    exponents = rng.integers(990, 1040, 400_000).astype(np.int64)
    bits = (exponents << 52) | rng.integers(0, 1 << 52, exponents.size)
    bits[::3] &= ~np.int64((1 << 41) - 1)  # ties and exact values
    bits[1::3] = (bits[1::3] & ~np.int64((1 << 41) - 1)) | (1 << 41) | 1  # just above a tie
    bits[::2] |= np.int64(-(1 << 63))
    values = np.concatenate([bits.view(np.float64), [65504.0, 65519.99, 65520.0, np.inf, -np.inf, np.nan, 5.96e-8]])
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    _same_halves(_narrow(values), want)
    above_tie = np.float64(1 + 2.0**-11 + 2.0**-40)  # float32 would round it to the tie 1 + 2**-11
    assert _narrow(np.array([above_tie]))[0] == np.float16(1 + 2.0**-10)


def test_widening_every_float16_is_exact():
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    out = np.empty(halves.shape, dtype=np.float32)
    half.widen_half(halves, out)
    want = halves.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


@pytest.mark.parametrize("layout", ["C", "F", "moved", "strided"])
def test_api_conversions_keep_numpys_layout(layout):
    values = np.random.default_rng(1).standard_normal((64, 40, 9)) * 1e-6
    values = {
        "C": values, "F": np.asfortranarray(values), "moved": np.moveaxis(values, 1, -1), "strided": values[:, ::2],
    }[layout]
    assert values.size >= _half.KERNEL_MIN_VALUES or layout == "strided"
    got = xentkit.api._validation.rounded(values, np.float16)
    want = values.astype(np.float16)
    assert got.strides == want.strides
    _same_halves(got, want)
    wide = _half.widened(want, np.dtype(np.float32))
    assert wide.strides == want.astype(np.float32).strides
    assert np.array_equal(wide, want.astype(np.float32))


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few hundred bytes, so that small inputs take the blocked path, on 2 of Numba's
    threads (the blocks apply from as many rows as threads: on a machine of many cores the small
    inputs would otherwise compare the whole computation with itself)."""
    import numba

    monkeypatch.setattr(_rows, "WIDEN_BLOCK_BYTES", 4 * 37 * 3)
    threads = numba.get_num_threads()
    numba.set_num_threads(min(2, threads))
    yield
    numba.set_num_threads(threads)


def _whole(monkeypatch, call):
    with monkeypatch.context() as patch:
        patch.setattr(_rows, "WIDEN_BLOCK_BYTES", 1 << 60)
        return call()


CASES = [
    dict(),
    dict(weight=True, label_smoothing=0.1, z_loss=1e-3),
    dict(reduction="none", grad_output=True),
    dict(reduction="sum", softcap=4.0, ignore_index=3),
    dict(probabilities=True, label_smoothing=0.2),
]


SHAPES = {"rows": ((23, 37), -1), "per-pixel": ((7, 37, 3, 2), 1), "one sequence": ((1, 23, 37), -1)}


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("layout", SHAPES)
@pytest.mark.parametrize("in_place", [False, True])
def test_blocked_cross_entropy_is_the_whole_computation(small_blocks, monkeypatch, case, layout, in_place):
    api = importlib.import_module("xentkit.api.cross_entropy")  # (the module: the package exports the function)

    options = dict(CASES[case])
    rng = np.random.default_rng(case)
    shape, axis = SHAPES[layout]
    logits = (rng.standard_normal(shape) * 4).astype(np.float16)
    logits[0, 0] = -np.inf  # a masked class
    sample_shape = shape[:1] + shape[2:] if axis == 1 else shape[:-1]
    if options.pop("probabilities", False):
        target = rng.random(shape).astype(np.float16)
        target /= target.sum(axis, keepdims=True)
    else:
        target = rng.integers(0, 37, sample_shape)
        target.reshape(-1)[::5] = options.get("ignore_index", -100)
    if options.pop("weight", False):
        options["weight"] = rng.random(37) + 0.5
    if options.pop("grad_output", False):
        options["grad_output"] = rng.standard_normal(sample_shape)
    assert _rows.widening_step(logits, axis % logits.ndim, np.dtype(np.float32)) > 0

    def call():
        x = logits.copy()
        out = dict(out=x) if in_place else {}
        loss, grad = xentkit.cross_entropy_and_grad(x, target, axis=axis, **options, **out)
        assert (grad is x) == in_place
        forward = xentkit.cross_entropy(x if not in_place else logits, target, axis=axis, **{
            k: v for k, v in options.items() if k != "grad_output"
        })
        return loss, grad, forward

    blocked = []
    real = api._fused_by_blocks
    monkeypatch.setattr(api, "_fused_by_blocks", lambda *a, **k: blocked.append(1) or real(*a, **k))
    loss, grad, forward = call()
    assert blocked
    want_loss, want_grad, want_forward = _whole(monkeypatch, call)
    assert grad.dtype == np.float16 and loss.dtype == np.float16
    np.testing.assert_array_equal(loss, want_loss)
    np.testing.assert_array_equal(grad, want_grad)
    assert grad.strides == want_grad.strides  # (the whole computation's layout)
    np.testing.assert_array_equal(forward, want_forward)
    with xentkit.use_reference(True):  # and the float64 reference, rounded
        reference_loss, reference_grad = xentkit.cross_entropy_and_grad(logits, target, axis=axis, **options)
    np.testing.assert_allclose(loss.astype(np.float64), reference_loss.astype(np.float64), rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(grad.astype(np.float64), reference_grad.astype(np.float64), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("function", [xentkit.softmax, xentkit.log_softmax, xentkit.logsumexp])
@pytest.mark.parametrize(("shape", "axis"), [((19, 37, 2), -1), ((19, 37, 2), 1), ((1, 19, 37), -1)])
def test_blocked_activations_are_the_whole_computation(small_blocks, monkeypatch, function, shape, axis):
    x = (np.random.default_rng(3).standard_normal(shape) * 6).astype(np.float16)
    x[0, 2] = -np.inf
    got = function(x, axis=axis)
    want = _whole(monkeypatch, lambda: function(x, axis=axis))
    assert got.dtype == np.float16 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_narrowing_into_another_shape_broadcasts_as_numpy():
    """``copy_rounded`` into an array of another shape is NumPy's broadcasting copy (the kernel
    takes equal shapes only: it would have filled half of the output, or written past it)."""
    values = np.arange(4096, dtype=np.float32).reshape(4096, 1) * 1e-6
    out = np.zeros((4096, 2), dtype=np.float16)
    xentkit.api._validation.copy_rounded(out, values)
    np.testing.assert_array_equal(out, np.broadcast_to(values.astype(np.float16), out.shape))


@pytest.mark.parametrize("shape", [(4096, 1024), (1, 4096, 1024)])
def test_large_float16_calls_hold_no_float32_copy(shape):
    """8 MiB of float16 logits (blocks of 4 MiB of float32): the forward holds block-sized arrays,
    the gradient its own float16 bytes (in place: nothing), where a whole float32 copy and the
    float32 gradient had taken 2 and 3 times the logits' bytes, and softmax 5."""
    rng = np.random.default_rng(4)
    logits = rng.standard_normal(shape).astype(np.float16)  # (a sequence of 4096: cut by rows too)
    target = rng.integers(0, 1024, shape[:-1])
    nbytes = logits.nbytes
    assert peak_above(lambda: xentkit.cross_entropy(logits, target), nbytes, warm=True) < 0.6
    assert peak_above(lambda: xentkit.cross_entropy_and_grad(logits, target), nbytes, warm=True) < 1.6
    work = logits.copy()
    assert peak_above(lambda: xentkit.cross_entropy_and_grad(work, target, out=work), nbytes, warm=True) < 0.6
    # softmax: its float16 output, a block and the block's float32 result (half the input each)
    assert peak_above(lambda: xentkit.softmax(logits), nbytes, warm=True) < 2.1


def test_a_sequence_batch_with_another_layouts_out_or_target_still_runs_in_blocks():
    """[batch, sequence, vocabulary] float16 logits are cut by rows when their out= and probability
    target are views of the same rows, else by the first axis: a review found a Fortran-ordered
    out= given one block of everything (3 times the logits' bytes) and a Fortran-ordered
    target copied whole (2.5 times)."""
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((16, 64, 4096)).astype(np.float16)
    labels = rng.integers(0, 4096, (16, 64))
    out = np.asfortranarray(np.empty_like(logits))
    assert peak_above(lambda: xentkit.cross_entropy_and_grad(logits, labels, out=out), logits.nbytes, warm=True) < 1.0
    target = np.asfortranarray(rng.random(logits.shape).astype(np.float32))
    target /= target.sum(-1, keepdims=True)
    assert peak_above(lambda: xentkit.cross_entropy(logits, target), logits.nbytes, warm=True) < 1.5
