"""The fused Numba kernels (``xentkit.kernels``) against the float64 NumPy reference.

``cross_entropy_rows`` returns per-row values, so the reference runs with ``reduction="none"``
on the logits cast to float64 and ``grad_output`` = the kernel's ``grad_scale``; the z-loss part
of the gradient (its own ``z_grad_scale``) is separated by linearity.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from xentkit import reference
from xentkit.kernels import _exp, cross_entropy_rows
from xentkit.kernels import cross_entropy as kernel_module

# Per-dtype tolerances of the kernel against the float64 reference. The loss is compared per
# row as |Δ| ≤ loss_rtol·|ref| + loss_atol (the atol covers losses near 0, where float32
# exponentials bound the absolute error to ~1e-7); the gradient as
# max|Δ| ≤ grad·max(max|ref|, max|grad_scale|).
KERNEL_TOLERANCES: dict[type, dict[str, float]] = {
    np.float32: {"loss_rtol": 1e-6, "loss_atol": 1e-6, "grad": 1e-5},
    np.float64: {"loss_rtol": 1e-12, "loss_atol": 1e-12, "grad": 1e-12},
}
DTYPES = [np.float32, np.float64]
# Small pass-1 blocks so that small test arrays still take the multi-block (rescaling) path.
SMALL_BLOCK = 16


def _tolerance(dtype: object) -> dict[str, float]:
    return KERNEL_TOLERANCES[np.dtype(dtype).type]


def _lse64(logits: np.ndarray, softcap: float | None) -> np.ndarray:
    x = logits.astype(np.float64)
    z = softcap * np.tanh(x / softcap) if softcap else x
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def _expected(
    logits: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad_scale: np.ndarray,
    z_grad_scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(loss_rows, lse_rows, grad) of the kernel contract, from ``xentkit.reference`` in float64."""
    x = logits.astype(np.float64)
    options = {
        "weight": weight,
        "ignore_index": ignore_index,
        "reduction": "none",
        "label_smoothing": label_smoothing,
        "softcap": softcap,
    }
    with np.errstate(all="ignore"):
        loss, grad = reference.cross_entropy_and_grad(
            x, labels, z_loss=0.0, grad_output=grad_scale, **options
        )
        if z_loss:
            _, with_z = reference.cross_entropy_and_grad(
                x, labels, z_loss=z_loss, grad_output=z_grad_scale, **options
            )
            _, without_z = reference.cross_entropy_and_grad(
                x, labels, z_loss=0.0, grad_output=z_grad_scale, **options
            )
            grad = grad + (with_z - without_z)
        lse = _lse64(logits, softcap)
    return loss, lse, grad


def _run(
    logits,
    labels,
    *,
    weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    grad_scale=None,
    z_grad_scale=None,
    grad=True,
    out=None,
    **tuning,
):
    """Call the kernel; ``out="inplace"`` writes the gradient over ``logits``."""
    if out == "inplace":
        grad_out = logits
    elif grad:
        grad_out = np.empty_like(logits) if out is None else out
    else:
        grad_out = None
    loss, lse = cross_entropy_rows(
        logits,
        labels,
        weight,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        grad_scale,
        z_grad_scale,
        grad_out,
        **tuning,
    )
    return loss, lse, grad_out


def _assert_rows_match(logits, labels, loss, lse, grad, *, expected=None, rows=None, **options):
    """Kernel outputs against the reference, on ``rows`` (default: every non-ignored row)."""
    dtype = logits.dtype
    tol = _tolerance(dtype)
    n = logits.shape[0]
    gs = options.pop("grad_scale", None)
    zgs = options.pop("z_grad_scale", None)
    gs = np.ones(n) if gs is None else gs
    zgs = np.ones(n) if zgs is None else zgs
    ignore_index = options.get("ignore_index", -100)
    if expected is None:
        expected = _expected(
            logits,
            labels,
            options.get("weight"),
            ignore_index,
            options.get("label_smoothing", 0.0),
            options.get("z_loss", 0.0),
            options.get("softcap"),
            gs,
            zgs,
        )
    ref_loss, ref_lse, ref_grad = expected
    if rows is None:
        rows = np.arange(n)
    valid = rows[labels[rows] != ignore_index]

    bad = ~(
        np.abs(loss[valid] - ref_loss[valid])
        <= tol["loss_rtol"] * np.abs(ref_loss[valid]) + tol["loss_atol"]
    )
    assert not bad.any(), (
        f"loss rows {valid[bad][:5]}: got {loss[valid][bad][:5]}, expected {ref_loss[valid][bad][:5]}"
    )
    bad = ~(
        np.abs(lse[valid] - ref_lse[valid])
        <= tol["loss_rtol"] * np.abs(ref_lse[valid]) + tol["loss_atol"]
    )
    assert not bad.any(), (
        f"lse rows {valid[bad][:5]}: got {lse[valid][bad][:5]}, expected {ref_lse[valid][bad][:5]}"
    )
    if grad is not None:
        g = grad[rows].astype(np.float64)
        r = ref_grad[rows]
        # the gradient's natural size is the row scale (exactly-zero gradients, e.g. C = 1, are
        # only zero up to rounding)
        scale = max(np.max(np.abs(r)), np.max(np.abs(gs[rows]))) if r.size else 0.0
        error = np.abs(g - r)
        limit = tol["grad"] * scale + 1e-30
        assert np.all(error <= limit), (
            f"gradient: max error {error.max():.3e} > {limit:.3e} at {np.unravel_index(np.argmax(error), error.shape)}"
        )


def _problem(rows: int, classes: int, dtype, seed: int = 0, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((rows, classes))).astype(dtype)
    labels = rng.integers(0, classes, rows).astype(np.int64)
    return logits, labels, rng


# ---------------------------------------------------------------------------------------------
# Every option combination
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3], ids=["noz", "zloss"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["nosmooth", "smooth"])
@pytest.mark.parametrize("ignore", [False, True], ids=["all", "ignore"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_matches_reference_every_option(dtype, weighted, ignore, label_smoothing, z_loss, softcap):
    logits, labels, rng = _problem(11, 67, dtype, seed=1)
    weight = rng.uniform(0.2, 2.0, 67) if weighted else None
    ignore_index = 5
    if ignore:
        labels[[0, 4, 7]] = ignore_index
    else:
        labels[labels == ignore_index] = 6
    gs = rng.uniform(0.5, 1.5, 11)
    zgs = rng.uniform(0.5, 1.5, 11)
    options = {
        "weight": weight,
        "ignore_index": ignore_index,
        "label_smoothing": label_smoothing,
        "z_loss": z_loss,
        "softcap": softcap,
        "grad_scale": gs,
        "z_grad_scale": zgs,
    }
    # row kernel on threads and on one thread, and rows cut into 3 segments
    for tuning in (
        {"block": SMALL_BLOCK, "parallel": True},
        {"block": 2048, "parallel": False},
        {"block": SMALL_BLOCK, "segments": 3},
    ):
        loss, lse, grad = _run(logits, labels, **tuning, **options)
        _assert_rows_match(logits, labels, loss, lse, grad, **dict(options))
    if ignore:
        assert np.all(loss[[0, 4, 7]] == 0)
        assert np.all(lse[[0, 4, 7]] == 0)
        assert np.all(grad[[0, 4, 7]] == 0)


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(1, 1), (7, 1), (1, 3), (5, 17), (3, 1023), (4, 2049), (1, 300_000)],
    ids=lambda s: f"{s[0]}x{s[1]}",
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_odd_shapes(shape, dtype):
    logits, labels, rng = _problem(*shape, dtype, seed=2)
    for options in (
        {},
        {"label_smoothing": 0.2, "weight": rng.uniform(0.5, 1.5, shape[1]), "softcap": 6.0},
    ):
        loss, lse, grad = _run(logits, labels, **options)
        _assert_rows_match(logits, labels, loss, lse, grad, **dict(options))


def test_no_rows():
    logits = np.zeros((0, 5), dtype=np.float32)
    loss, lse, grad = _run(logits, np.zeros(0, dtype=np.int64))
    assert loss.shape == lse.shape == (0,)
    assert grad.shape == (0, 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_float32_accuracy_on_long_rows(dtype):
    # 128k classes: the sums must not lose the 1e-6 relative accuracy (float32 lanes per block,
    # float64 across blocks)
    logits, labels, _ = _problem(3, 131_072, dtype, seed=3, scale=4.0)
    loss, lse, grad = _run(logits, labels)
    _assert_rows_match(logits, labels, loss, lse, grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_long_rows_cut_into_segments(dtype):
    # fewer rows than threads: by default the rows are split when they are long enough
    assert kernel_module._default_segments(1, 300_000, 2) == 2
    assert kernel_module._default_segments(3, 300_000, 8) == 3
    assert kernel_module._default_segments(1, 1000, 8) == 1
    assert kernel_module._default_segments(64, 300_000, 8) == 1
    logits, labels, rng = _problem(2, 70_001, dtype, seed=14)
    options = {"weight": rng.uniform(0.5, 2, 70_001), "label_smoothing": 0.1, "z_loss": 1e-3}
    for segments in (1, 2, 5, 9):
        loss, lse, grad = _run(logits, labels, segments=segments, **options)
        _assert_rows_match(logits, labels, loss, lse, grad, **dict(options))


def test_confident_rows_keep_relative_accuracy():
    # float32 logits, loss = log(1 + δ) with δ from ~1e-1 down to ~1e-7: a float32 sum of 1 + δ
    # would leave ~6e-8/δ relative error (1e-6 is reached at δ ≈ 0.06)
    logits, labels, _ = _problem(40, 3000, np.float32, seed=15, scale=1.0)
    margins = np.linspace(10, 25, 40)
    logits[np.arange(40), labels] = margins.astype(np.float32)
    loss, lse, grad = _run(logits, labels, block=256)
    _assert_rows_match(logits, labels, loss, lse, grad)
    expected = _expected(logits, labels, None, -100, 0.0, 0.0, None, np.ones(40), np.ones(40))[0]
    assert expected.min() < 1e-6
    relative = np.abs(loss - expected) / expected
    assert relative.max() <= KERNEL_TOLERANCES[np.float32]["loss_rtol"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_block_size_does_not_matter(dtype):
    # ascending logits raise the running max in every block: the online rescaling at work
    logits = np.sort(_problem(6, 500, dtype, seed=4)[0], axis=1)
    labels = np.array([0, 499, 250, 3, 17, 400])
    results = [_run(logits, labels, block=block, label_smoothing=0.1) for block in (1, 3, 64, 4096)]
    for loss, lse, grad in results:
        _assert_rows_match(logits, labels, loss, lse, grad, label_smoothing=0.1)


# ---------------------------------------------------------------------------------------------
# Special values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "big"), [(np.float32, 1e30), (np.float64, 1e300)], ids=["f32", "f64"]
)
def test_extreme_finite_logits(dtype, big):
    logits, labels, _ = _problem(6, 40, dtype, seed=5)
    logits[0, 3] = big
    logits[1, :] = -big
    logits[1, 7] = big
    logits[2, 5] = -big
    labels[2] = 5  # the target is the hugely negative logit: loss ≈ 2e30 / 2e300
    logits[3, :] = big  # every logit equal and huge
    logits[4, ::2] = -big
    logits[4, 1::2] = big
    for options in ({}, {"label_smoothing": 0.1}, {"z_loss": 1e-4, "softcap": 50.0}):
        for segments in (1, 3):
            loss, lse, grad = _run(logits, labels, block=SMALL_BLOCK, segments=segments, **options)
            assert np.all(np.isfinite(loss)) and np.all(np.isfinite(lse))
            assert np.all(np.isfinite(grad))
            _assert_rows_match(logits, labels, loss, lse, grad, **dict(options))


@pytest.mark.parametrize("classes", [2, 7, 40, 300])
def test_label_smoothing_near_the_float64_limit(classes):
    """The smoothing term's Σ_j (x_j − m) is −1.2e308 here: it fits in float64, and so does the
    loss. The sum used to be regrouped by the compiler (Σ x_j − k·m in some order) and overflowed
    to an infinite loss, from every kernel (tile, row, split row) and the vocabulary-parallel
    statistics."""
    logits = np.full((3, classes), 6e307)
    logits[:, 0] = -6e307  # the lowest first: a running sum of x − m reaches −1.2e308 at once
    logits[1, classes // 2] = -6e307 if classes > 2 else 6e307
    logits[1, 0] = 6e307 if classes > 2 else -6e307
    labels = np.array([1, 0, classes - 1])
    import xentkit

    want, _ = reference.cross_entropy_and_grad(logits, labels, label_smoothing=0.1, reduction="none")
    assert np.all(np.isfinite(want))
    loss = xentkit.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    for segments in (1, 3):
        loss, lse, grad = _run(logits, labels, block=SMALL_BLOCK, segments=segments, label_smoothing=0.1)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
        _assert_rows_match(logits, labels, loss, lse, grad, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_negative_infinite_logits(dtype):
    logits, labels, _ = _problem(5, 60, dtype, seed=6)
    logits[0, :10] = -np.inf
    labels[0] = 20
    logits[1, :] = -np.inf  # whole blocks of −inf before the first finite one
    logits[1, 45:] = np.arange(15)
    labels[1] = 50
    logits[2, 1::2] = -np.inf
    labels[2] = 0
    for options in ({}, {"weight": np.linspace(0.5, 2, 60)}, {"z_loss": 1e-3}, {"softcap": 5.0}):
        for segments in (1, 4):  # 4 segments of 15: row 1's first three are all −inf
            loss, lse, grad = _run(logits, labels, block=SMALL_BLOCK, segments=segments, **options)
            assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
            assert np.all(grad[logits == -np.inf] == 0)
            _assert_rows_match(logits, labels, loss, lse, grad, **dict(options))
    # label smoothing puts ε/C on every class: a −inf logit makes the loss +inf, the gradient
    # stays finite (as in the reference)
    for segments in (1, 4):
        loss, lse, grad = _run(
            logits, labels, block=SMALL_BLOCK, segments=segments, label_smoothing=0.1
        )
        assert np.all(np.isposinf(loss[:3])) and np.all(np.isfinite(grad))
        _assert_rows_match(
            logits, labels, loss, lse, grad, rows=np.array([3, 4]), label_smoothing=0.1
        )


@pytest.mark.parametrize("segments", [1, 3], ids=["rows", "segments"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "inplace"])
def test_nan_poisons_only_its_row(dtype, in_place, segments):
    logits, labels, _ = _problem(6, 50, dtype, seed=7)
    logits[1, 33] = np.nan
    logits[3, :20] = -np.inf  # NaN inside the −inf prefix: must not be skipped
    logits[3, 2] = np.nan
    logits[4, 0] = np.nan  # NaN in the first block, before any finite block
    expected = _expected(logits, labels, None, -100, 0.0, 0.0, None, np.ones(6), np.ones(6))
    work = logits.copy()
    loss, lse, grad = _run(
        work, labels, block=SMALL_BLOCK, segments=segments, out="inplace" if in_place else None
    )
    bad = [1, 3, 4]
    assert np.all(np.isnan(loss[bad])) and np.all(np.isnan(lse[bad]))
    assert np.all(np.isnan(grad[bad]))
    _assert_rows_match(logits, labels, loss, lse, grad, expected=expected, rows=np.array([0, 2, 5]))


# ---------------------------------------------------------------------------------------------
# Modes: in place, forward only, defaults, ignored rows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1},
        {"label_smoothing": 0.1, "weight": "w"},
        {"softcap": 3.0},
        {"softcap": 3.0, "weight": "w", "label_smoothing": 0.05, "z_loss": 1e-3},
        {"ignore_index": 2},
    ],
    ids=["plain", "smooth", "smooth-weighted", "softcap", "everything", "ignore"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_in_place_equals_out_of_place(dtype, options):
    logits, labels, rng = _problem(9, 301, dtype, seed=8)
    options = dict(options)
    if options.get("weight") == "w":
        options["weight"] = rng.uniform(0.5, 2.0, 301)
    labels[3] = 2
    gs = rng.uniform(0.5, 1.5, 9)
    loss, lse, grad = _run(logits, labels, grad_scale=gs, z_grad_scale=gs, **options)
    np.testing.assert_array_equal(
        _run(logits, labels, grad_scale=gs, z_grad_scale=gs, parallel=True, **options)[2], grad
    )
    for segments in (1, 4):
        loss, lse, grad = _run(
            logits, labels, grad_scale=gs, z_grad_scale=gs, segments=segments, **options
        )
        work = logits.copy()
        loss_ip, lse_ip, grad_ip = _run(
            work,
            labels,
            grad_scale=gs,
            z_grad_scale=gs,
            segments=segments,
            out="inplace",
            **options,
        )
        assert grad_ip is work
        np.testing.assert_array_equal(grad_ip, grad)
        np.testing.assert_array_equal(loss_ip, loss)
        np.testing.assert_array_equal(lse_ip, lse)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_forward_only_equals_forward_backward(dtype):
    logits, labels, rng = _problem(8, 130, dtype, seed=9)
    labels[2] = -100
    options = {
        "weight": rng.uniform(0.5, 2, 130),
        "label_smoothing": 0.1,
        "softcap": 8.0,
        "z_loss": 1e-3,
    }
    loss, lse, _ = _run(logits, labels, **options)
    loss_f, lse_f, none = _run(logits, labels, grad=False, **options)
    assert none is None
    np.testing.assert_array_equal(loss_f, loss)
    np.testing.assert_array_equal(lse_f, lse)


def test_default_scales_are_ones():
    logits, labels, _ = _problem(5, 20, np.float64, seed=10)
    _, _, grad = _run(logits, labels, z_loss=1e-2)
    _, _, grad_ones = _run(
        logits, labels, z_loss=1e-2, grad_scale=np.ones(5), z_grad_scale=np.ones(5)
    )
    np.testing.assert_array_equal(grad, grad_ones)


@pytest.mark.parametrize("in_place", [False, True], ids=["out", "inplace"])
def test_every_row_ignored(in_place):
    logits, _, _ = _problem(4, 9, np.float32, seed=11)
    labels = np.full(4, -100, dtype=np.int64)
    loss, lse, grad = _run(logits, labels, out="inplace" if in_place else None, z_loss=1e-3)
    assert np.all(loss == 0) and np.all(lse == 0) and np.all(grad == 0)


def test_int32_labels_are_accepted():
    logits, labels, _ = _problem(4, 9, np.float32, seed=12)
    loss32, _, grad32 = _run(logits, labels.astype(np.int32))
    loss64, _, grad64 = _run(logits, labels)
    np.testing.assert_array_equal(loss32, loss64)
    np.testing.assert_array_equal(grad32, grad64)


# ---------------------------------------------------------------------------------------------
# exp and tanh
# ---------------------------------------------------------------------------------------------


def _ulp_error(actual: np.ndarray, exact: np.ndarray, dtype) -> np.ndarray:
    """|actual − exact| in units of the last place of the exact value rounded to ``dtype``."""
    spacing = np.spacing(np.abs(exact).astype(dtype)).astype(np.longdouble)
    return np.abs(actual.astype(np.longdouble) - exact) / spacing


@pytest.mark.parametrize(
    ("dtype", "lo", "hi"), [(np.float32, -110, 95), (np.float64, -760, 720)], ids=["f32", "f64"]
)
def test_exp_against_numpy(dtype, lo, hi):
    rng = np.random.default_rng(13)
    x = np.concatenate([np.linspace(lo, hi, 1_000_001), rng.uniform(-1, 1, 200_000)]).astype(dtype)
    with np.errstate(over="ignore"):
        exact = np.exp(x.astype(np.longdouble))
        got = _exp.exp(x)
    info = np.finfo(dtype)
    normal = (exact >= info.tiny) & (exact <= info.max)
    assert _ulp_error(got[normal], exact[normal], dtype).max() <= 1.0
    subnormal = exact < info.tiny
    assert np.max(np.abs(got[subnormal] - exact[subnormal])) <= info.smallest_subnormal
    assert np.all(np.isposinf(got[exact > info.max]))
    special = _exp.exp(np.array([-np.inf, np.inf, np.nan, 0.0, -0.0], dtype=dtype))
    np.testing.assert_array_equal(special, np.array([0, np.inf, np.nan, 1, 1], dtype=dtype))


@pytest.mark.parametrize(
    ("dtype", "flush"), [(np.float32, -87.0), (np.float64, -708.0)], ids=["f32", "f64"]
)
def test_exp_nonpositive_against_numpy(dtype, flush):
    x = np.linspace(flush * 1.3, 0, 1_000_001).astype(dtype)
    exact = np.exp(x.astype(np.longdouble))
    got = _exp.exp_nonpositive(x)
    kept = x >= flush
    assert _ulp_error(got[kept], exact[kept], dtype).max() <= 1.0
    assert np.all(got[~kept] == 0)
    special = _exp.exp_nonpositive(np.array([-np.inf, np.nan, 0.0, -0.0], dtype=dtype))
    np.testing.assert_array_equal(special, np.array([0, np.nan, 1, 1], dtype=dtype))


def test_log_against_numpy():
    """The finishing step's log (float64, vectorizable): within 1 ulp of the exact log over the
    normal and subnormal range, and log's special values."""
    rng = np.random.default_rng(17)
    x = np.concatenate([
        np.geomspace(5e-324, 1.7e308, 1_000_001), rng.uniform(0.5, 2.0, 200_000), rng.uniform(1.0, 50.0, 200_000),
        np.nextafter(1.0, [0.0, 2.0]), [np.sqrt(0.5), np.sqrt(2.0), np.finfo(np.float64).tiny],
    ])
    exact = np.log(x.astype(np.longdouble))
    got = _exp.log(x)
    nonzero = exact != 0
    assert _ulp_error(got[nonzero], exact[nonzero], np.float64).max() <= 1.0
    assert np.all(got[~nonzero] == 0)
    special = _exp.log(np.array([0.0, -0.0, -1.0, -np.inf, np.inf, np.nan, 1.0]))
    np.testing.assert_array_equal(special, np.array([-np.inf, -np.inf, np.nan, np.nan, np.inf, np.nan, 0.0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_tanh_and_derivative_against_numpy(dtype):
    u = np.concatenate([np.linspace(-25, 25, 1_000_001), np.geomspace(1e-30, 2, 50_000)]).astype(
        dtype
    )
    t, d = _exp.tanh_and_derivative(u)
    wide = u.astype(np.longdouble)
    exact_t = np.tanh(wide)
    e = np.exp(-2 * np.abs(wide))
    exact_d = 4 * e / (1 + e) ** 2  # 1 − tanh², without the cancellation
    assert _ulp_error(t, exact_t, dtype).max() <= 2.0
    normal = exact_d >= np.finfo(dtype).tiny
    assert _ulp_error(d[normal], exact_d[normal], dtype).max() <= 5.0
    assert np.all(d[~normal] <= np.finfo(dtype).tiny)
    t, d = _exp.tanh_and_derivative(
        np.array([-np.inf, np.inf, np.nan, 0.0, 1e30, -1e30], dtype=dtype)
    )
    np.testing.assert_array_equal(t, np.array([-1, 1, np.nan, 0, 1, -1], dtype=dtype))
    np.testing.assert_array_equal(d, np.array([0, 0, np.nan, 1, 0, 0], dtype=dtype))


def test_exp_loops_vectorize():
    # A loop over the kernels' exp must compile to SIMD code: a libm call per element would be
    # ~4× slower and keep the loop scalar. (Compiled here without cache: cached code cannot be
    # inspected.)
    from numba import njit

    @njit(fastmath={"contract", "reassoc"}, error_model="numpy")
    def sum_exp(x):
        acc = x[0] * 0
        for j in range(x.shape[0]):
            acc += _exp.fast_exp_nonpositive(x[j]) + _exp.fast_exp(x[j])
        return acc

    @njit(fastmath={"contract", "reassoc"}, error_model="numpy")
    def sum_log(x):
        acc = 0.0
        for j in range(x.shape[0]):
            acc += _exp.fast_log(x[j])
        return acc

    for dtype in (np.float32, np.float64):
        sum_exp(np.zeros(64, dtype=dtype))
    sum_log(np.ones(64))
    for llvm_ir in [*sum_exp.inspect_llvm().values(), *sum_log.inspect_llvm().values()]:
        widths = [int(w) for w in re.findall(r"<(\d+) x (?:float|double)>", llvm_ir)]
        assert widths and max(widths) >= 2, "the loop did not vectorize"
        assert not re.search(r"call [^\n]*@(?:llvm\.)?(?:exp|log)", llvm_ir), "a scalar exp or log call is left"


def test_rows_of_no_class_take_the_row_kernel(monkeypatch):
    """Zero classes with every row ignored (the kernel contract allows it; the api refuses it):
    the tile kernel would read each row's label entry, so such rows take the row kernel."""
    monkeypatch.setattr(kernel_module, "_cross_entropy_tile_serial", lambda *args: pytest.fail("tile kernel"))
    monkeypatch.setattr(kernel_module, "_cross_entropy_tile_kernel", lambda *args: pytest.fail("tile kernel"))
    logits = np.zeros((5, 0), np.float32)
    loss, lse = cross_entropy_rows(logits, np.full(5, -100), None, -100, 0.0, 0.0, None, None, None, np.empty_like(logits))
    assert loss.tolist() == [0.0] * 5 and lse.tolist() == [0.0] * 5


def test_the_tile_kernels_finishing_loop_vectorizes():
    """The tile kernel finishes a tile's rows in one loop (``_tile_finish``): its log, exp and
    divisions must run in vector lanes, with no libm call left (a call per row was half the
    kernel's time at 10 classes). Compiled here without cache: cached code cannot be inspected."""
    from numba import njit

    finish = njit(fastmath=False, error_model="numpy", nogil=True)(kernel_module._tile_finish.py_func)
    finish(np.zeros((2, 8), np.float32), np.ones((kernel_module._TILE_WORK, 8)), 10, 10.0, 0.0, 0.0, 0.0)
    for llvm_ir in finish.inspect_llvm().values():
        assert max((int(w) for w in re.findall(r"<(\d+) x double>", llvm_ir)), default=0) >= 2, "not vectorized"
        assert not re.search(r"call [^\n]*@(?:llvm\.)?(?:exp|log)\b", llvm_ir), "a scalar exp or log call is left"


def test_running_on_sets_and_restores_the_callers_thread_count() -> None:
    """Small problems run on one thread and large ones on the caller's count, which every call
    restores, whether it goes through Numba's public functions (before the pool is up) or through
    the threading layer's own counters (after)."""
    import numba

    import xentkit
    from xentkit.kernels import _threading

    numba.get_num_threads()  # starts the pool (small calls run the serial build and never do)
    assert _threading._pool_counters() is not None
    threads = numba.config.NUMBA_NUM_THREADS
    seen = []
    for wanted in sorted({1, threads}):
        numba.set_num_threads(wanted)
        try:
            for count in (1, wanted):
                with _threading.running_on(count):
                    seen.append(numba.get_num_threads())
                assert numba.get_num_threads() == wanted
            xentkit.cross_entropy_and_grad(np.zeros((64, 10), np.float32), np.zeros(64, np.int64))
            xentkit.cross_entropy_and_grad(np.zeros((512, 300), np.float32), np.zeros(512, np.int64))
            assert numba.get_num_threads() == wanted
        finally:
            numba.set_num_threads(threads)
    assert seen == [count for wanted in sorted({1, threads}) for count in (1, wanted)]


@pytest.mark.parametrize("block", [1024, 16])  # 20 classes: the tile kernel; 2 blocks: the row kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_serial_build_gives_the_parallel_kernels_bits(dtype, block) -> None:
    """Small problems run the kernels' serial builds (no thread pool): loss, log-sum-exp and
    gradient are bit for bit those of the parallel build, for every option, ignored rows,
    non-finite logits, upstream scales and in place; for the tile kernel (rows of few classes)
    and the row kernel."""
    from xentkit.kernels import cross_entropy as kernels

    rng, logits, labels = _serial_case(7, 37, 20, dtype)
    rows, classes = logits.shape
    assert classes <= kernels.TILE_MAX_CLASSES
    labels[[1, 8]] = -100
    weight = rng.uniform(0.1, 2.0, classes)
    scale, z_scale = rng.uniform(-1, 1, rows), rng.uniform(0, 1, rows)
    cases = [
        dict(weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None),
        dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=None),
        dict(weight=weight, label_smoothing=0.0, z_loss=0.0, softcap=5.0),
        dict(weight=None, label_smoothing=0.3, z_loss=1e-2, softcap=2.0),
    ]
    for case in cases:
        for in_place in (False, True):
            results = []
            for parallel in (False, True):
                work = logits.copy()
                grad = work if in_place else np.empty_like(work)
                loss, lse = kernels.cross_entropy_rows(
                    work, labels, case["weight"], -100, case["label_smoothing"], case["z_loss"],
                    case["softcap"], scale, z_scale, grad, parallel=parallel, segments=1, block=block,
                )
                results.append((loss, lse, grad))
            for serial, threaded in zip(*results, strict=True):
                np.testing.assert_array_equal(serial, threaded)
    serial_build = kernels._cross_entropy_tile_serial if block > classes else kernels._cross_entropy_rows_serial
    assert {str(signature[0].dtype) for signature in serial_build.signatures} >= {np.dtype(dtype).name}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_prob_kernels_serial_builds_give_the_parallel_builds_bits(dtype) -> None:
    """The log-probability kernels' serial builds (one thread, no pool): statistics and gradient
    bit for bit those of the parallel builds, with ignored rows, masked and NaN logits, a
    temperature, and in place."""
    from xentkit.kernels import log_probs as kernels

    rng, logits, labels = _serial_case(11, 41, 23, dtype)
    rows = logits.shape[0]
    valid = np.ones(rows, dtype=np.bool_)
    valid[[0, 9]] = False
    coefficients = tuple(rng.uniform(-1, 1, rows) for _ in range(3))
    for temperature in (1.0, 0.7):
        for in_place in (False, True):
            results = []
            for parallel in (False, True):
                work = logits.copy()
                statistics = kernels.log_prob_statistics(work, labels, valid, temperature, parallel=parallel)
                grad = work if in_place else np.empty_like(work)
                kernels.log_prob_gradient(
                    work, labels, valid, temperature, statistics[0], statistics[1], coefficients, grad,
                    parallel=parallel,
                )
                results.append((*statistics, grad))
            for serial, threaded in zip(*results, strict=True):
                np.testing.assert_array_equal(serial, threaded)


def _serial_case(seed: int, rows: int, classes: int, dtype) -> tuple:
    """(rng, logits, labels) for the serial-versus-parallel tests: scaled normal logits with a
    masked (−inf) entry and a NaN row, labels in range."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, classes)) * 4).astype(dtype)
    logits[3, 5] = -np.inf
    logits[4] = np.nan
    return rng, logits, rng.integers(0, classes, rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("classes", [1, 2, 10, 24, 25, 31, 32])
def test_tile_kernel_agrees_with_the_row_kernel(dtype, classes, monkeypatch) -> None:
    """Rows of at most TILE_MAX_CLASSES classes take the tile kernel: its loss, log-sum-exp and
    gradient match the row kernel's (one block, the tile kernel turned off) for every option,
    ignored rows, masked, NaN and dominant logits, upstream scales, in place; the NaN pattern
    exactly; and its two builds agree bit for bit."""
    from xentkit.kernels import cross_entropy as kernels

    assert classes <= kernels.TILE_MAX_CLASSES
    rng = np.random.default_rng(classes)
    rows = 1000  # several tiles of whole rows from 10 classes up (4096 // C rows a tile), the last partial
    logits = (rng.standard_normal((rows, classes)) * 4).astype(dtype)
    logits[3] = -np.inf
    logits[5, 0] = -np.inf
    logits[7, classes // 2] = np.nan
    logits[9, 0] = 80.0
    labels = rng.integers(0, classes, rows)
    labels[::11] = -100
    scale, z_scale = rng.uniform(-1, 1, rows), rng.uniform(0, 1, rows)
    weight = rng.uniform(0.1, 2.0, classes)
    cases = [
        dict(weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None),
        dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=None),
        dict(weight=weight, label_smoothing=0.0, z_loss=0.0, softcap=5.0),
        dict(weight=weight, label_smoothing=0.2, z_loss=0.0, softcap=3.0),
        dict(weight=None, label_smoothing=0.3, z_loss=1e-2, softcap=2.0),
    ]
    tolerance = 1e-6 if dtype == np.float32 else 1e-14
    for case in cases:
        for in_place in (False, True):
            results = []
            # the tile kernel's serial and parallel builds, then the row kernel
            for tile_max, parallel in ((kernels.TILE_MAX_CLASSES, False), (kernels.TILE_MAX_CLASSES, True), (0, False)):
                monkeypatch.setattr(kernels, "TILE_MAX_CLASSES", tile_max)
                work = logits.copy()
                grad = work if in_place else np.empty_like(work)
                loss, lse = kernels.cross_entropy_rows(
                    work, labels, case["weight"], -100, case["label_smoothing"], case["z_loss"],
                    case["softcap"], scale, z_scale, grad, parallel=parallel,
                )
                results.append((loss, lse, grad))
            monkeypatch.undo()
            serial, threaded, by_rows = results
            for tile, same, row in zip(serial, threaded, by_rows, strict=True):
                np.testing.assert_array_equal(tile, same)  # both builds, bit for bit
                np.testing.assert_array_equal(np.isnan(tile), np.isnan(row))
                np.testing.assert_allclose(tile, row, rtol=tolerance, atol=tolerance, err_msg=str(case))
    for build in (kernels._cross_entropy_tile_kernel, kernels._cross_entropy_tile_serial):
        assert {str(s[0].dtype) for s in build.signatures} >= {np.dtype(dtype).name}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("classes", [2, 10, 24])
def test_tile_kernel_keeps_confident_rows_accurate(dtype, classes, monkeypatch) -> None:
    """A confident row's loss log(1 + δ), δ ≈ 1e-12, keeps the row kernel's relative accuracy in
    the tile kernel (the max's terms are counted apart from the others, whose sum is δ); summed
    into 1 term by term it would be rounded at ulp(1) and several times less accurate."""
    from xentkit.kernels import cross_entropy as kernels

    rng = np.random.default_rng(classes)
    rows = 4000
    logits = rng.standard_normal((rows, classes))
    labels = rng.integers(0, classes, rows)
    logits[np.arange(rows), labels] = logits.max(axis=1) + 28.0
    logits = logits.astype(dtype)
    wide = logits.astype(np.float64)
    others = np.exp(wide - wide[np.arange(rows), labels][:, None])
    others[np.arange(rows), labels] = 0.0
    exact = np.log1p(others.sum(axis=1))
    tile_loss, _ = kernels.cross_entropy_rows(logits, labels, None, -100, 0.0, 0.0, None, None, None, None)
    monkeypatch.setattr(kernels, "TILE_MAX_CLASSES", 0)
    row_loss, _ = kernels.cross_entropy_rows(logits, labels, None, -100, 0.0, 0.0, None, None, None, None)
    tile_error = np.abs(tile_loss - exact) / exact
    row_error = np.abs(row_loss - exact) / exact
    # (both keep δ to float64's last bits now, the row kernel with libm's log1p, the tile kernel
    # with fast_log1p: within a few ulps of each other)
    assert np.median(tile_error) <= max(1.05 * np.median(row_error), 4 * np.finfo(np.float64).eps)
    assert tile_error.max() <= 1.05 * row_error.max() + 1e-6


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("segments", [1, 2])
@pytest.mark.parametrize("weighted", [True, False])
def test_label_smoothing_after_a_first_block_of_very_negative_logits(dtype, segments, weighted):
    """Classes masked with very negative finite logits (−1e300, or the dtype's min, given weight 0)
    filling a first block, of the row or of a segment: the smoothing term Σ w_j·(lse − z_j) was
    formed around that block's max, far below the row's, and cancelled to garbage (6.688 came out
    5.2e283 at −1e300, NaN at float64's min). The loss must match the reference, the gradient
    too (it was right: an exact check that it stays so)."""
    rng = np.random.default_rng(3)
    classes = 4 * SMALL_BLOCK
    logits = rng.standard_normal((3, classes)).astype(dtype)
    # the first block of the row and of its second half (the second segment's first block)
    masked = np.r_[0:SMALL_BLOCK, classes // 2 : classes // 2 + SMALL_BLOCK]
    weight = np.ones(classes, dtype=dtype)
    for mask in (-1e9 if dtype == np.float32 else -1e300, np.finfo(dtype).min):
        if not weighted and mask == np.finfo(dtype).min:
            continue  # (weight 1 there: Σ w_j·z_j itself leaves the dtype's range)
        x = logits.copy()
        x[:, masked] = mask
        if weighted:
            weight[masked] = 0.0
        labels = np.array([classes - 1, classes // 2 + SMALL_BLOCK + 3, 20])
        options = dict(weight=weight if weighted else None, label_smoothing=0.1)
        loss, _, grad = _run(x, labels, block=SMALL_BLOCK, segments=segments, **options)
        want, want_grad = reference.cross_entropy_and_grad(
            x.astype(np.float64), labels, reduction="none", **{**options, "weight": None if not weighted else weight.astype(np.float64)}
        )
        # (weight 1 on the masked classes: a smoothing term of about |mask|·ε·(masked share))
        np.testing.assert_allclose(loss, want, rtol=1e-12 if dtype == np.float64 else 1e-5)
        if weighted:
            np.testing.assert_allclose(grad, want_grad, rtol=1e-9 if dtype == np.float64 else 1e-4, atol=1e-7)


@pytest.mark.parametrize("classes", [1, 10, 300])  # one class; the tile kernel; the row kernel
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_soft_capped_confident_row_keeps_its_small_loss(classes, probabilities, dtype):
    """With a softcap the row's max term is exp(z − m) with z = cap·t rounded as m is: exactly 1.
    LLVM had fused z − m into fma(cap, t, −m) (the rounding error of cap·t, not 0): a confident
    row's loss of ~1e-9 came out 1e-6 off in float32 (1100 times it), a one-class row's ±1e-7
    instead of 0 with a gradient of 1e-7 instead of 0."""
    import xentkit

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((64, classes)) * 3).astype(dtype)
    x[:, 0] += 25  # class 0 dominates: losses of 1e-9 to 1e-4
    labels = np.zeros(64, dtype=np.int64)
    target = np.eye(classes, dtype=dtype)[labels] if probabilities else labels
    loss, grad = xentkit.cross_entropy_and_grad(x, target, softcap=30.0, reduction="none")
    want, _ = reference.cross_entropy_and_grad(
        x.astype(np.float64), target.astype(np.float64) if probabilities else labels, softcap=30.0, reduction="none"
    )
    if classes == 1:
        assert (loss == 0).all() and (grad == 0).all()
        return
    # relative to each row's own loss: z's one rounding in the dtype (float32: 6e-8 of z ≈ 25),
    # and log s of s = 1 + δ, which is a few ulps of 1 absolute (float64: 2e-7 of a 1e-9 loss)
    error = np.abs(loss - want)
    bound = 1e-4 * want + 1e-15 if dtype == np.float32 else 1e-12 * want + 1e-15
    assert (error <= bound).all(), (error / want).max()
