"""The Triton epilogue (``xentkit.triton.reduction``) against the home of its rules,
``reference.reductions.ReductionPlan`` and ``reference.cross_entropy.z_term`` (float64, NumPy), on
its one-launch and two-launch forms; and the eager Triton path's host work: the torch ops a
forward + backward dispatches (each one a launch on CUDA), counted, not timed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from _triton_setup import DEVICE  # first: the skips and the interpreter

# isort: split
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import xentkit.torch as xt
from xentkit.reference.cross_entropy import z_term
from xentkit.reference.reductions import ReductionPlan
from xentkit.triton import cross_entropy as triton_cross_entropy
from xentkit.triton import reduction

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")

IGNORE = -100


def _rows(n_rows, n_cols, *, kind, seed, all_ignored=False, bad=()):
    """Per-row terms as the loss kernel leaves them: (loss_rows, lse, target, weight)."""
    rng = np.random.default_rng(seed)
    lse = rng.normal(3.0, 2.0, n_rows).astype(np.float32)
    loss_rows = rng.uniform(0.0, 5.0, n_rows).astype(np.float32)
    weight = rng.uniform(0.1, 2.0, n_cols).astype(np.float32) if kind == "weighted" else None
    if kind == "probabilities":
        target = rng.dirichlet(np.ones(n_cols), n_rows).astype(np.float32)
        return loss_rows, lse, target, weight
    target = rng.integers(0, n_cols, n_rows)
    target[rng.random(n_rows) < 0.2] = IGNORE
    if all_ignored:
        target[:] = IGNORE
    for position, label in bad:
        target[position] = label
    ignored = target == IGNORE
    loss_rows[ignored] = 0.0  # the kernel's ignored rows
    lse[ignored] = 0.0
    known = (target >= 0) & (target < n_cols)
    loss_rows[~ignored & ~known] = np.nan  # the kernel's rows of a bad label
    return loss_rows, lse, target, weight


def _expected(loss_rows, lse, target, weight, reduction_name, z_loss):
    """The loss and the (main, z) factors by the plan and z_term, in float64 NumPy."""
    main = loss_rows.astype(np.float64)
    if target.ndim == 2:
        valid = np.ones(len(main), dtype=bool)
        plan = ReductionPlan.of_rows(reduction_name, len(main))
    else:
        valid = target != IGNORE
        if weight is not None:
            valid &= (target >= 0) & (target < len(weight))
        _, plan = ReductionPlan.of_targets(
            reduction_name, np.where(valid, target, 0), IGNORE, None if weight is None else weight.astype(np.float64),
            valid=valid,
        )
    z = z_term(lse.astype(np.float64), valid, z_loss)
    return np.asarray(plan.reduce(main, z), dtype=np.float64), [float(f) for f in plan.scales(1.0)]


def _run(loss_rows, lse, target, weight, reduction_name, z_loss, dtype=torch.float32, n_cols=None):
    return _run_with(loss_rows, lse, target, weight, reduction_name, z_loss, IGNORE, dtype, n_cols)


def _run_with(loss_rows, lse, target, weight, reduction_name, z_loss, ignore_index, dtype=torch.float32, n_cols=None):
    tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE) for a in (loss_rows, lse, target)]
    if weight is not None:
        weight = torch.from_numpy(weight).to(DEVICE)
    n_cols = n_cols if n_cols is not None else (target.shape[1] if target.ndim == 2 else 11)
    loss, factors, bad = reduction.reduce_rows(
        *tensors, weight, n_cols, reduction=reduction_name, ignore_index=ignore_index, z_loss=z_loss, dtype=dtype,
    )
    return loss.cpu(), factors.cpu(), int(bad.cpu())


@pytest.fixture(params=["one launch", "two launches"])
def spans(request, monkeypatch):
    """The epilogue as it runs at these shapes (one program), and cut into spans of 16 rows, with
    16 partials per step of the final sum (so 300 rows take two steps)."""
    if request.param == "two launches":
        monkeypatch.setattr(reduction, "SPAN", 16)
        monkeypatch.setattr(reduction, "BLOCK", 16)
    return request.param


@pytest.mark.parametrize("reduction_name", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["labels", "weighted", "probabilities"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("n_rows", [0, 1, 37, 300])
def test_epilogue_follows_the_reduction_plan(spans, reduction_name, kind, z_loss, n_rows):
    loss_rows, lse, target, weight = _rows(n_rows, 11, kind=kind, seed=n_rows)
    loss, factors, bad = _run(loss_rows, lse, target, weight, reduction_name, z_loss)
    expected, scales = _expected(loss_rows, lse, target, weight, reduction_name, z_loss)
    assert loss.dtype == torch.float32 and loss.shape == ((n_rows,) if reduction_name == "none" else ())
    if reduction_name == "none":  # loss + z per row, in float32
        np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-6, atol=0)
        assert factors.tolist() == [1.0, 1.0]
    else:  # float64 sums, rounded once to float32
        assert loss.item() == pytest.approx(float(expected), rel=1e-6, abs=1e-30)
        assert factors.tolist() == pytest.approx(scales, rel=1e-6)
    assert bad == 0


@pytest.mark.parametrize("kind", ["labels", "weighted"])
def test_mean_of_nothing_is_zero_with_zero_factors(spans, kind):
    loss_rows, lse, target, weight = _rows(40, 11, kind=kind, seed=1, all_ignored=True)
    loss, factors, bad = _run(loss_rows, lse, target, weight, "mean", 1e-2)
    assert loss.item() == 0.0 and factors.tolist() == [0.0, 0.0] and bad == 0


def test_weights_summing_to_zero_drop_the_main_term_only(spans):
    loss_rows, lse, _, _ = _rows(40, 4, kind="labels", seed=2)
    target = np.array([0, 1, IGNORE, IGNORE] * 10)  # classes 0 and 1 as often, their weights cancel
    weight = np.array([1.0, -1.0, 3.0, 3.0], dtype=np.float32)
    loss_rows[target == IGNORE] = 0.0
    lse[target == IGNORE] = 0.0
    loss, factors, _ = _run(loss_rows, lse, target, weight, "mean", 1e-2, n_cols=4)
    expected, scales = _expected(loss_rows, lse, target, weight, "mean", 1e-2)
    count = int((target != IGNORE).sum())
    assert scales[0] == 0.0 and scales[1] == pytest.approx(1.0 / count)
    assert loss.item() == pytest.approx(float(expected), rel=1e-6)
    assert factors.tolist() == pytest.approx(scales, rel=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_bad_labels_are_counted_and_make_the_loss_nan(spans, weighted):
    bad_labels = ((3, 11), (17, -1), (30, 2**40))
    loss_rows, lse, target, weight = _rows(
        40, 11, kind="weighted" if weighted else "labels", seed=3, bad=bad_labels,
    )
    loss, _, bad = _run(loss_rows, lse, target, weight, "mean", 0.0)
    assert bad == len(bad_labels) and math.isnan(loss.item())


@pytest.mark.parametrize("ignore_index", [-100, 0, 7])
def test_the_bad_label_count_follows_the_label_rule(spans, ignore_index):
    """The epilogue counts exactly the labels ``xentkit._labels`` refuses (the home of the rule;
    the eager check reads the count and lets check_labels name the first one)."""
    from xentkit._labels import _bad_labels

    rng = np.random.default_rng(ignore_index + 200)
    edges = np.array([-1, 0, 10, 11, 12, -100, 7, 2**40, -(2**62), 2**63 - 1, -(2**63)])
    labels = np.concatenate([rng.integers(-3, 14, 200), edges])
    for weighted in (False, True):
        weight = rng.uniform(0.5, 1.5, 11).astype(np.float32) if weighted else None
        rows = np.zeros(len(labels), np.float32)
        _, _, bad = _run_with(rows, rows, labels, weight, "sum", 0.0, ignore_index)
        assert bad == int(_bad_labels(labels, 11, ignore_index).sum())


def test_a_bad_labels_position_is_the_targets_index():
    """For (N, C, d1, ..., dk) logits the error names the label's index in the target, as on the
    other backends (the kernels see the rows flattened)."""
    logits = torch.randn(2, 5, 3).to(DEVICE)
    target = torch.zeros(2, 3, dtype=torch.long)
    target[1, 2] = 7
    messages = []
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match=r"label 7 at position \(1, 2\)") as raised:
            xt.cross_entropy(logits, target.to(DEVICE), backend=backend)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("reduction_name", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_the_loss_is_rounded_once_into_its_dtype(spans, dtype, reduction_name):
    loss_rows, lse, target, weight = _rows(37, 11, kind="labels", seed=4)
    loss, _, _ = _run(loss_rows, lse, target, weight, reduction_name, 0.0, dtype=dtype)
    expected, _ = _expected(loss_rows, lse, target, weight, reduction_name, 0.0)
    assert loss.dtype == dtype
    if dtype == torch.float64:  # stored from the float64 sums of the float32 rows as they are
        np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12, atol=0)
    else:  # the float64 value rounded once to the half dtype (through a float32 rounded to odd)
        assert torch.equal(loss, _rounded_once(np.asarray(expected), dtype))


def _rounded_once(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``values`` rounded to nearest (ties to even) into the half ``dtype``, once: a float32
    rounded to odd first (an inexact one moved to its odd neighbour toward the value), then
    torch's conversion to nearest, which is exact for the half dtypes' fewer bits."""
    single = values.astype(np.float32)
    inexact = single.astype(np.float64) != values
    even = (single.view(np.uint32) & 1) == 0
    toward = np.nextafter(single, np.where(values > single, np.float32(np.inf), np.float32(-np.inf)))
    odd = np.where(inexact & even, toward, single).astype(np.float32)
    return torch.from_numpy(np.asarray(odd)).to(dtype)


@pytest.mark.parametrize(("dtype", "tie"), [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_a_half_loss_just_above_a_tie_rounds_up(spans, dtype, tie):
    """1 + tie is half-way between the half dtype's 1 and its next value; the float64 sum
    1 + tie + 2⁻³⁰ lies above it, so it rounds up. Rounded to float32 first it became the tie
    itself (2⁻³⁰ is below float32's half ulp), which then went to the even 1."""
    rows = np.array([1.0 + tie, 2.0**-30], dtype=np.float32)
    target = np.array([0, 1])
    loss, _, _ = _run(rows, np.zeros(2, np.float32), target, None, "sum", 0.0, dtype=dtype)
    assert float(loss) == 1.0 + 2 * tie
    below = np.array([1.0 + tie, -(2.0**-30)], dtype=np.float32)  # just below the tie: down to 1
    loss, _, _ = _run(below, np.zeros(2, np.float32), target, None, "sum", 0.0, dtype=dtype)
    assert float(loss) == 1.0


def test_the_epilogue_is_deterministic(spans):
    loss_rows, lse, target, weight = _rows(300, 11, kind="weighted", seed=5)
    first = _run(loss_rows, lse, target, weight, "mean", 1e-2)
    second = _run(loss_rows, lse, target, weight, "mean", 1e-2)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


class _Dispatched(TorchDispatchMode):
    """The torch ops dispatched outside the kernels' launches (Triton's interpreter runs the
    kernels with torch ops of its own, which a GPU does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.launching = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.launching:
            self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


class _Launcher:
    """A kernel whose launches ``dispatched`` does not look into."""

    def __init__(self, kernel, dispatched: _Dispatched) -> None:
        self.kernel, self.dispatched = kernel, dispatched

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.dispatched.launching = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.dispatched.launching = False

        return launch


# what a forward + backward on the Triton path may dispatch besides its kernels: allocations, views,
# autograd's seed of the upstream gradient, the anchor of double backward's error (an empty
# index_select), and the label check's one read of the epilogue's count
_HOST_WORK = {
    "empty", "empty_like", "detach", "view", "permute", "expand", "alias", "ones_like", "index_select",
    "_local_scalar_dense",
}


@pytest.mark.parametrize(
    "options", [{}, {"weight": True, "z_loss": 1e-3}, {"label_smoothing": 0.1, "z_loss": 1e-3}],
)
@pytest.mark.parametrize("reduction_name", ["mean", "sum", "none"])
def test_the_triton_path_dispatches_no_small_torch_ops(monkeypatch, options, reduction_name):
    """Forty small torch ops per call (masks, sums, guarded divisions, the factors' stack, the
    label check's mask) were each a launch on CUDA, and cost more than the kernels at 32000
    classes; the epilogue kernel took their place. Counted on the dispatcher, not timed. (Class
    weights with label smoothing add two: their total W, summed once in forward for pass 2.)"""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 50, generator=generator).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 50, (24,), generator=generator).to(DEVICE)
    labels[::5] = IGNORE
    weight = torch.rand(50, generator=generator).to(DEVICE) if options.get("weight") else None
    kwargs = {key: value for key, value in options.items() if key != "weight"}
    # the first call compiles (or, interpreted, sets up) the kernels
    xt.cross_entropy(logits, labels, weight, reduction=reduction_name, backend="triton", **kwargs).sum().backward()
    logits.grad = None
    loss = xt.cross_entropy(logits, labels, weight, reduction=reduction_name, backend="triton", **kwargs)
    upstream = torch.ones_like(loss)
    dispatched = _Dispatched()
    for module in (triton_cross_entropy, reduction):
        for name in [name for name in vars(module) if name.endswith("_kernel")]:
            monkeypatch.setattr(module, name, _Launcher(getattr(module, name), dispatched))
    with dispatched:
        loss = xt.cross_entropy(logits, labels, weight, reduction=reduction_name, backend="triton", **kwargs)
        loss.backward(upstream)
    extra = sorted(set(dispatched.ops) - _HOST_WORK)
    assert extra == [], f"the Triton path dispatched torch ops besides its kernels: {extra}"
    assert dispatched.ops.count("_local_scalar_dense") == 1  # the label check's one wait
    reference = xt.cross_entropy(
        logits.detach().double(), labels, None if weight is None else weight.double(), reduction=reduction_name,
        backend="torch", **kwargs,
    )
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
