"""The one home of each rule: loss options (``xentkit._options``), class-index labels
(``xentkit._labels``) and reductions (``xentkit.reference.reductions``), and that every entry point
applies them the same way."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import numpy as np
import pytest

import xentkit
from xentkit import reference
from xentkit._labels import as_class_indices, check_labels
from xentkit._options import LossOptions, loss_options
from xentkit.reference.reductions import ReductionPlan

SOURCE = Path(xentkit.__file__).parent

# (keyword, bad value, exception, message fragment)
BAD_OPTIONS = [
    ("reduction", "avg", ValueError, "reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
    ("ignore_index", 1.5, TypeError, "ignore_index must be an int, got float 1.5"),
    ("ignore_index", True, TypeError, "ignore_index must be an int, got bool True"),
    ("ignore_index", 2**63, ValueError, "ignore_index must fit in int64"),
    ("label_smoothing", "x", TypeError, "label_smoothing must be a float in [0, 1], got str 'x'"),
    ("label_smoothing", 1.5, ValueError, "label_smoothing must be in [0, 1], got 1.5"),
    ("z_loss", -1.0, ValueError, "z_loss must be a finite float >= 0, got -1.0"),
    ("z_loss", float("nan"), ValueError, "z_loss must be a finite float >= 0, got nan"),
    ("z_loss", None, TypeError, "z_loss must be a non-negative float, got NoneType None"),
    ("softcap", 0.0, ValueError, "softcap must be None or a finite float > 0, got 0.0"),
    ("softcap", float("inf"), ValueError, "softcap must be None or a finite float > 0, got inf"),
    ("backend", "cuda", ValueError, "backend must be one of 'auto', 'triton', 'torch', got 'cuda'"),
    ("inplace_backward", "yes", TypeError, "inplace_backward must be a bool, got str 'yes'"),
]


def test_options_are_normalised_to_plain_python_values():
    options = LossOptions(
        reduction="sum", ignore_index=np.int16(-1), label_smoothing=np.float32(0.25),
        z_loss=np.int64(0), softcap=np.float64(30.0), chunk_size=np.uint8(7),
    )
    assert options == LossOptions("sum", -1, 0.25, 0.0, 30.0, 7)
    assert [type(getattr(options, f.name)) for f in dataclasses.fields(options)] == [
        str, int, float, float, float, int, str, bool, bool, bool,
    ]
    assert hash(options) == hash(LossOptions("sum", -1, 0.25, 0.0, 30.0, 7))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.z_loss = 1.0  # type: ignore[misc]
    # replace checks again
    assert options.replace(z_loss=0.5).z_loss == 0.5
    with pytest.raises(ValueError, match="z_loss must be a finite float >= 0"):
        options.replace(z_loss=-0.5)


@pytest.mark.parametrize(("name", "value", "kind", "message"), BAD_OPTIONS)
def test_options_reject_bad_values_with_one_type_and_message(name, value, kind, message):
    with pytest.raises(kind) as caught:
        LossOptions(**{name: value})
    assert message in str(caught.value)


def test_options_built_from_plain_values_are_built_once_and_checked_alike():
    first = loss_options("mean", -100, 0.1, 0.0, None, None, "auto", False)
    assert first == LossOptions("mean", -100, 0.1, 0.0, None, None, "auto", False)
    assert loss_options("mean", -100, 0.1, 0.0, None, None, "auto", False) is first
    # the same values of other types are other calls: True is refused where 1 and 1.0 are taken
    assert loss_options("mean", -100, 1, 0.0).label_smoothing == 1.0
    with pytest.raises(TypeError, match="label_smoothing must be a float"):
        loss_options("mean", -100, True, 0.0)
    # a refused value is refused every time, and NumPy numbers are checked as before
    for _ in range(2):
        with pytest.raises(ValueError, match="z_loss must be a finite float"):
            loss_options("mean", -100, 0.0, float("nan"))
    assert loss_options("sum", np.int64(3), np.float32(0.5)).ignore_index == 3


@pytest.mark.parametrize(
    ("value", "kind"), [(0, ValueError), (-3, ValueError), (2.0, TypeError), ("4", TypeError), (True, TypeError)]
)
def test_chunk_size_must_be_a_positive_integer(value, kind):
    with pytest.raises(kind, match="chunk_size must be None or a positive int"):
        LossOptions(chunk_size=value)


def test_formula_options_reach_the_reference_and_the_kernel_by_name():
    """A formula option is passed by keyword to the NumPy oracle and to the kernel host: both
    must take every one of them (a new option added only to LossOptions fails here)."""
    from xentkit.kernels.cross_entropy import cross_entropy_rows

    names = set(LossOptions().formula_arguments())
    assert names == {"ignore_index", "label_smoothing", "z_loss", "softcap"}
    for function in (reference.cross_entropy_and_grad, cross_entropy_rows):
        assert names <= set(inspect.signature(function).parameters), function.__qualname__


@pytest.mark.parametrize(
    "fragment",
    [
        "must be one of 'none', 'mean', 'sum'",
        "ignore_index must be an int",
        "must fit in int64",
        '"a float in [0, 1]"',
        "must be in [0, 1], got",
        "must be a finite float >= 0",
        '"a non-negative float"',
        '"None or a positive float"',
        "must be None or a finite float > 0",
        "must be None or a positive int",
        "must be one of 'auto', 'triton', 'torch'",
        "has label {",
        "must have an integer dtype",
        "too large for a class index",
    ],
)
def test_each_rule_message_is_written_in_one_source_file(fragment):
    homes = sorted(
        str(path.relative_to(SOURCE)) for path in SOURCE.rglob("*.py") if fragment in path.read_text()
    )
    assert len(homes) == 1, f"{fragment!r} written in {homes}"


torch = pytest.importorskip("torch")


def _entry_points():
    import xentkit.torch as xt
    from xentkit.torch import distributed

    x = torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 2])
    w = torch.randn(3, 5)
    return {
        "api": lambda **kw: xentkit.cross_entropy(x.numpy(), y.numpy(), **kw),
        "torch": lambda **kw: xt.cross_entropy(x, y, **kw),
        "torch_ops": lambda **kw: xt.cross_entropy(x.to(torch.bfloat16), y, **kw),
        "module": lambda **kw: xt.CrossEntropyLoss(**kw)(x, y),
        "linear": lambda **kw: xt.linear_cross_entropy(torch.randn(4, 5), w, y, **kw),
        "vocab_parallel": lambda **kw: distributed.vocab_parallel_cross_entropy(x, y, **kw),
    }


@pytest.mark.parametrize(("name", "value", "kind", "message"), BAD_OPTIONS)
@pytest.mark.parametrize("path", ["api", "torch", "torch_ops", "module", "linear", "vocab_parallel"])
def test_every_entry_point_rejects_a_bad_option_alike(path, name, value, kind, message):
    if path == "vocab_parallel" and name == "softcap":
        pytest.skip(f"the vocabulary-parallel functions take no {name}")
    if path == "api" and name == "backend":
        pytest.skip("the NumPy api has one backend")
    if path in ("api", "linear", "vocab_parallel") and name == "inplace_backward":
        pytest.skip(f"{path} takes no inplace_backward (the api has out=, the fused forms work in place)")
    with pytest.raises(kind) as caught:
        _entry_points()[path](**{name: value})
    assert message in str(caught.value)


def test_labels_are_checked_by_one_rule_naming_what_holds_the_classes():
    labels = np.array([0, 3, -100, 7])
    with pytest.raises(ValueError) as caught:
        check_labels(labels, 5, -100)
    assert str(caught.value) == (
        "target has label 7 at position (3,) but logits have 5 classes "
        "(labels must be in [0, 5) or equal ignore_index=-100)"
    )
    with pytest.raises(ValueError, match=r"label -1 at position \(0, 1\) but linear_weight has 4 rows"):
        check_labels(np.array([[0, -1]]), 4, -100, classes="linear_weight has 4 rows (classes)")
    assert check_labels(labels, 8, -100).tolist() == [True, True, False, True]
    with pytest.raises(TypeError, match="integer dtype, got dtype bfloat16"):
        as_class_indices(np.zeros(2), (2,), dtype_name="bfloat16")
    with pytest.raises(ValueError, match="too large for a class index"):
        as_class_indices(np.array([1, 2**64 - 1], dtype=np.uint64), (2,))


@pytest.mark.parametrize(
    ("labels", "ignore_index", "message"),
    [
        ([5, 2**64 - 1], -100, r"label 5 at position \(0,\) but (logits|log_probs) have 3 classes"),
        ([1, 2**64 - 1, 7], -100, r"label 18446744073709551615 at position \(1,\), too large"),
        ([7, 2**63], 7, r"label 9223372036854775808 at position \(1,\), too large"),
        ([2, 3, 2**63], 3, r"label 9223372036854775808 at position \(2,\), too large"),
    ],
)
def test_uint64_labels_beyond_int64_name_the_first_bad_label_of_any_kind(labels, ignore_index, message):
    """A uint64 label beyond int64 is refused before the cast; the error still names the first
    bad label in C order, as for any other labels (an earlier one outside [0, C) first; a label
    equal to ignore_index is not bad), on every api path that takes class indices."""
    import xentkit

    target = np.array(labels, dtype=np.uint64)
    logits = np.zeros((len(labels), 3))
    for call in (xentkit.cross_entropy, xentkit.nll_loss, xentkit.log_probs):
        with pytest.raises(ValueError, match=message):
            call(logits, target, ignore_index=ignore_index)


def test_each_path_names_its_classes_in_the_label_message():
    import xentkit.torch as xt
    from xentkit.torch import distributed

    y = torch.tensor([0, 9])
    with pytest.raises(ValueError, match=r"label 9 at position .* but logits have 3 classes"):
        xt.cross_entropy(torch.randn(2, 3), y)
    with pytest.raises(ValueError, match=r"label 9 at position .* but linear_weight has 3 rows \(classes\)"):
        xt.linear_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), y)
    with pytest.raises(ValueError, match=r"label 9 at position .* but the vocabulary has V = 3 classes"):
        distributed.vocab_parallel_cross_entropy(torch.randn(2, 3), y)
    for log_probs in (torch.randn(2, 3), torch.randn(2, 3, dtype=torch.bfloat16), torch.randn(2, 3, 40000)):
        with pytest.raises(ValueError, match=r"label 9 at position .* but log_probs have 3 classes"):
            xt.nll_loss(log_probs, y if log_probs.ndim == 2 else y[:, None].expand(2, 40000))
    with pytest.raises(ValueError, match=r"label 9 at position .* but log_probs have 3 classes"):
        xentkit.nll_loss(np.zeros((2, 3)), [0, 9])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_reduction_plan_means_over_its_own_denominators(backend):
    main = np.array([1.0, 2.0, 0.0, 4.0])
    z = np.array([0.5, 0.5, 0.0, 1.0])
    valid = np.array([True, True, False, True])
    target_weight = np.array([2.0, 1.0, 0.0, 1.0])
    if backend == "torch":
        main, z, valid, target_weight = (torch.from_numpy(a) for a in (main, z, valid, target_weight))
    plan = ReductionPlan.of_labels("mean", valid, target_weight, dtype=torch.float64)
    assert float(plan.reduce(main, z)) == pytest.approx(7.0 / 4.0 + 2.0 / 3.0, rel=1e-15)
    g, g_z = plan.scales(2.0)
    assert (float(g), float(g_z)) == (0.5, pytest.approx(2.0 / 3.0))
    assert float(ReductionPlan.of_labels("sum", valid, target_weight).reduce(main, z)) == 9.0
    per_row = ReductionPlan.of_labels("none", valid).reduce(main, z)
    assert [float(v) for v in per_row] == [1.5, 2.5, 0.0, 5.0]


def test_reduction_plan_mean_of_nothing_is_zero_with_zero_gradient():
    # NumPy: every target ignored
    plan = ReductionPlan.of_labels("mean", np.zeros(3, dtype=bool))
    assert plan.reduce(np.full(3, np.nan), np.zeros(3)) == 0.0
    assert plan.scales(1.0) == (0.0, 0.0)
    # torch: class weights summing to 0 leave the z term over the non-ignored rows
    main = torch.tensor([3.0, 1.0], requires_grad=True)
    z = torch.tensor([0.25, 0.75], requires_grad=True)
    plan = ReductionPlan.of_labels("mean", torch.tensor([True, True]), torch.zeros(2), dtype=torch.float32)
    loss = plan.reduce(main, z)
    loss.backward()
    assert loss.item() == 0.5
    assert main.grad.tolist() == [0.0, 0.0]
    assert z.grad.tolist() == [0.5, 0.5]
    # bfloat16 rows are summed in float32
    rows = torch.full((4096,), 1.0 + 2**-7, dtype=torch.bfloat16)
    total = ReductionPlan.of_rows("sum", 4096).reduce(rows)
    assert total.dtype == torch.float32 and total.item() == 4096 * (1.0 + 2**-7)


def test_no_entry_point_rewrites_the_mean_of_nothing_rule():
    """"mean of nothing is 0" is decided in reference/reductions.py only."""
    pattern = re.compile(r"denominator\s*!=\s*0|_divide_or_zero")
    homes = sorted(
        str(path.relative_to(SOURCE)) for path in SOURCE.rglob("*.py") if pattern.search(path.read_text())
    )
    assert homes == ["reference/reductions.py"]
    # nor by turning a "mean" of no element into a "sum" (the torch-ops BCE did, a review)
    turned = re.compile(r"^\s*reduction\s*=\s*[\"']sum[\"']\s*(#.*)?$", re.MULTILINE)
    assert [str(path.relative_to(SOURCE)) for path in SOURCE.rglob("*.py") if turned.search(path.read_text())] == []


@pytest.mark.parametrize("path", ["api", "torch", "torch_ops", "module", "linear"])
def test_a_softcap_the_dtype_cannot_hold_is_refused(path):
    """softcap=1e39 in float32 used to give a NaN loss and gradient."""
    import xentkit.torch as xt

    calls = _entry_points() | {
        "torch_ops": lambda **kw: xt.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), backend="torch", **kw)
    }
    with pytest.raises(ValueError, match=r"softcap must be between .* and the largest \(3\.40282e\+38\) .* float32, got 1e\+39"):
        calls[path](softcap=1e39)
    # a subnormal one (its reciprocal overflows: NaN where the logit is 0), or one that rounds to 0
    for tiny in (1e-40, 1e-300):
        with pytest.raises(ValueError, match=r"softcap must be between the smallest normal float32 value \(1\.17549e-38\)"):
            calls[path](softcap=tiny)
    # float64 holds it: the loss is (numerically) uncapped
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    torch.testing.assert_close(xt.cross_entropy(x, y, softcap=1e39), xt.cross_entropy(x, y))


def test_linear_cross_entropy_refuses_inputs_on_different_devices():
    import xentkit.torch as xt

    with pytest.raises(ValueError, match="input on cpu, linear_weight on meta"):
        xt.linear_cross_entropy(torch.randn(3, 4), torch.empty(5, 4, device="meta"), torch.tensor([0, 1, 2]))


def test_ignore_index_takes_a_one_value_integer_tensor_or_array_as_torch_does():
    """torch's cross-entropy takes ``ignore_index=torch.tensor(-100)``; so does every xentkit
    form (the value is stored as a plain int). Bool and floating ones are refused."""
    import torch

    import xentkit
    import xentkit.torch as xt

    logits, target = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, -100, 2])
    want = torch.nn.functional.cross_entropy(logits, target, ignore_index=torch.tensor(-100))
    for ignore_index in (torch.tensor(-100), torch.tensor([-100], dtype=torch.int32), np.array(-100), np.int16(-100)):
        torch.testing.assert_close(xt.cross_entropy(logits, target, ignore_index=ignore_index), want)
        module = xt.CrossEntropyLoss(ignore_index=ignore_index)
        torch.testing.assert_close(module(logits, target), want)
        np.testing.assert_allclose(
            xentkit.cross_entropy(logits.numpy(), target.numpy(), ignore_index=ignore_index), want.item()
        )
        assert type(LossOptions(ignore_index=ignore_index).ignore_index) is int
    for bad in (torch.tensor(True), np.array(True), torch.tensor(-100.0), np.array(-100.0), torch.tensor([1, 2])):
        with pytest.raises(TypeError, match="ignore_index must be an int, got"):
            LossOptions(ignore_index=bad)


def test_loss_options_reuse_the_last_calls_options_only_for_the_very_same_objects():
    """The last call's options serve a call with the very same objects; an equal value of another
    type is checked (and refused) as ever."""
    fields = ("sum", 1, 0.25, 0.0, None)
    first = loss_options(*fields)
    assert loss_options(*fields) is first and first.ignore_index == 1
    with pytest.raises(TypeError, match="ignore_index must be an int, got bool True"):
        loss_options("sum", True, 0.25, 0.0, None)
    assert loss_options("sum", 1, 0.5, 0.0, None).label_smoothing == 0.5
