"""``xentkit.torch.cross_entropy`` under ``torch.compile(fullgraph=True)`` keeps the Triton kernels
(the custom ops of ``xentkit.torch._ops``): the ops are in the graph, the kernels run (and the
torch-ops fallback does not), and loss and gradient equal the eager Triton path, which
``tests/test_triton.py`` checks against the float64 reference. Run on CPU tensors under Triton's
interpreter, compiled by inductor (C++ on the CPU); few shapes, since each compilation takes
seconds.
"""

from __future__ import annotations

import pytest

from _triton_setup import DEVICE  # first: the skips and the interpreter

# isort: split
import torch

import xentkit.torch as xt
from xentkit._options import LossOptions
from xentkit.torch import _ops, _torch_ops, _triton_path
from xentkit.triton import cross_entropy as kernels

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")

CLASSES = 7
OPTIONS = {
    "plain": {},
    "every option": {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.5},
}


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles its own graphs (parametrized cases share one code object, and would
    otherwise meet Dynamo's recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def launches(monkeypatch):
    """Counts the kernels' host calls (pass 1 and pass 2); the torch-ops fallback raises."""
    counts = {"row_statistics": 0, "row_gradient": 0}
    for name in counts:
        original = getattr(kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the torch-ops fallback ran")

    monkeypatch.setattr(_torch_ops, "cross_entropy", no_fallback)
    return counts


def _problem(shape, probabilities, weighted, dtype=torch.float32, seed=0):
    """Logits of ``shape`` (N, C) or (N, C, d); class indices (one ignored) or probabilities."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=generator) * 3).to(dtype).to(DEVICE)
    sample_shape = (shape[0], *shape[2:])
    if probabilities:
        target = torch.softmax(torch.randn(shape, generator=generator), 1)
    else:
        target = torch.randint(0, shape[1], sample_shape, generator=generator)
        target.view(-1)[1] = -100
    weight = torch.rand(shape[1], generator=generator) + 0.25 if weighted else None
    upstream = torch.rand(sample_shape, generator=generator) + 0.5
    return (
        logits.requires_grad_(True), target.to(DEVICE), None if weight is None else weight.to(DEVICE),
        upstream.to(DEVICE),
    )


def _loss_and_gradient(loss_of, logits, target, weight, upstream, reduction):
    """The loss and ∂(Σ upstream·loss)/∂logits ("none"), or ∂(1.5·loss)/∂logits."""
    loss = loss_of(logits, target, weight)
    (gradient,) = torch.autograd.grad((loss * upstream).sum() if reduction == "none" else 1.5 * loss, logits)
    return loss.detach(), gradient


def _graph_targets(counter):
    return {str(node.target) for graph in counter.graphs for node in graph.graph.nodes if node.op == "call_function"}


CASES = [
    # (shape, probabilities, weighted, reduction, options)
    ((5, CLASSES), False, False, "mean", "plain"),
    ((5, CLASSES), False, True, "mean", "every option"),
    ((5, CLASSES), False, True, "sum", "every option"),
    ((3, CLASSES, 2), False, True, "none", "every option"),
    ((5, CLASSES), True, False, "mean", "plain"),
    ((5, CLASSES), True, True, "sum", "every option"),
    ((3, CLASSES, 2), True, True, "none", "every option"),
]


@pytest.mark.parametrize(
    ("shape", "probabilities", "weighted", "reduction", "options"), CASES,
    ids=["-".join(map(str, case)).replace(" ", "_") for case in CASES],
)
def test_compiled_cross_entropy_keeps_the_kernels_and_equals_eager(
    launches, shape, probabilities, weighted, reduction, options
):
    from torch._dynamo.testing import CompileCounterWithBackend

    logits, target, weight, upstream = _problem(shape, probabilities, weighted)

    def loss_of(logits, target, weight):
        return xt.cross_entropy(logits, target, weight, reduction=reduction, backend="triton", **OPTIONS[options])

    expected_loss, expected_gradient = _loss_and_gradient(loss_of, logits, target, weight, upstream, reduction)
    assert launches == {"row_statistics": 1, "row_gradient": 1}  # eager: the Function's two passes

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(loss_of, fullgraph=True, backend=counter)
    loss, gradient = _loss_and_gradient(compiled, logits, target, weight, upstream, reduction)

    assert counter.frame_count == 1  # one graph, no break
    assert "xentkit.triton_cross_entropy.default" in _graph_targets(counter)
    assert launches == {"row_statistics": 2, "row_gradient": 2}  # the compiled step ran the kernels
    assert loss.shape == expected_loss.shape and loss.dtype == expected_loss.dtype
    assert torch.isfinite(loss).all() and gradient.abs().sum() > 0
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_float64_loss_is_the_same_compiled_and_eager(reduction):
    """float64 probability targets make a float64 loss, stored from the epilogue's float64 sums
    unrounded: the custom op takes the loss's dtype, so the compiled loss is the eager one, bit for
    bit (it went through float32 once)."""
    logits, target, weight, _ = _problem((5, CLASSES), True, True, seed=4)
    target = target.double()

    def loss_of(logits, target, weight):
        return xt.cross_entropy(logits, target, weight, reduction=reduction, label_smoothing=0.1, backend="triton")

    eager = loss_of(logits, target, weight)
    compiled = torch.compile(loss_of, fullgraph=True)(logits, target, weight)
    assert eager.dtype == compiled.dtype == torch.float64
    assert torch.equal(compiled, eager)
    reference = xt.cross_entropy(
        logits.detach().double(), target, weight.double(), reduction=reduction, label_smoothing=0.1, backend="torch"
    )
    torch.testing.assert_close(eager, reference, rtol=1e-6, atol=0)


def test_compiled_cross_entropy_agrees_with_torch_in_float16(launches):
    """float16 logits: the loss comes back in float16 and the gradient in float16, close to
    torch's own cross-entropy computed in float32 (an oracle independent of xentkit)."""
    logits, target, weight, upstream = _problem((6, CLASSES), False, True, dtype=torch.float16, seed=3)

    def loss_of(logits, target, weight):
        return xt.cross_entropy(logits, target, weight, label_smoothing=0.05, backend="triton")

    compiled = torch.compile(loss_of, fullgraph=True)
    loss, gradient = _loss_and_gradient(compiled, logits, target, weight, upstream, "mean")
    assert launches == {"row_statistics": 1, "row_gradient": 1}
    assert loss.dtype == gradient.dtype == torch.float16

    expected_loss, expected_gradient = _loss_and_gradient(
        lambda x, y, w: torch.nn.functional.cross_entropy(x.float(), y, w, label_smoothing=0.05),
        logits, target, weight, upstream, "mean",
    )
    torch.testing.assert_close(loss.float(), expected_loss, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gradient.float(), expected_gradient.float(), rtol=2e-3, atol=2e-3)


def test_a_bad_label_under_compile_makes_its_row_nan_without_reading_out_of_bounds(launches):
    """No label check under compile (it would wait for the device): labels 7 (= C) and -3 make
    their rows' loss and gradient NaN, the class-weight lookup included; the other rows are
    exact. Eager raises a ValueError for the same call."""
    logits, target, weight, upstream = _problem((5, CLASSES), False, True, seed=5)
    target[0], target[3] = CLASSES, -3

    def loss_of(logits, target, weight):
        return xt.cross_entropy(logits, target, weight, reduction="none", z_loss=1e-2, backend="triton")

    with pytest.raises(ValueError, match=f"target has label {CLASSES} at position"):
        loss_of(logits, target, weight)
    loss, gradient = _loss_and_gradient(
        torch.compile(loss_of, fullgraph=True), logits, target, weight, upstream, "none"
    )
    bad = torch.tensor([True, False, False, True, False])
    assert loss[bad].isnan().all() and gradient[bad].isnan().all()
    good_target = torch.where(bad, -100, target)  # the other rows, with the bad ones ignored
    expected_loss, expected_gradient = _loss_and_gradient(loss_of, logits, good_target, weight, upstream, "none")
    torch.testing.assert_close(loss[~bad], expected_loss[~bad], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gradient[~bad], expected_gradient[~bad], rtol=1e-6, atol=1e-7)

    def mean_loss(logits, target, weight):  # a reduced loss over a bad row is NaN, not an error
        return xt.cross_entropy(logits, target, weight, backend="triton")

    assert torch.compile(mean_loss, fullgraph=True)(logits, target, weight).isnan()


def test_auto_takes_the_custom_ops_for_cuda_tensors_under_compile(launches, monkeypatch):
    """backend="auto" under compile: the Triton ops for what it takes as CUDA tensors (the device
    check is patched, the tensors are interpreted CPU tensors), torch ops otherwise."""
    logits, target, weight, upstream = _problem((4, CLASSES), False, False, seed=7)

    def loss_of(logits, target, weight):
        return xt.cross_entropy(logits, target, weight, label_smoothing=0.1)

    monkeypatch.setattr(_triton_path, "_is_cuda", lambda tensor: True)
    loss, gradient = _loss_and_gradient(torch.compile(loss_of, fullgraph=True), logits, target, weight, upstream, "mean")
    assert launches == {"row_statistics": 1, "row_gradient": 1}

    monkeypatch.undo()  # a CPU tensor: "auto" compiles torch ops (the kernels are not called)
    torch._dynamo.reset()
    for name in ("row_statistics", "row_gradient"):
        monkeypatch.setattr(kernels, name, lambda *args, **kwargs: pytest.fail("a Triton kernel ran"))
    expected_loss, expected_gradient = _loss_and_gradient(
        torch.compile(loss_of, fullgraph=True), logits, target, weight, upstream, "mean"
    )
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-6, atol=1e-7)


def test_eager_calls_keep_the_autograd_function_not_the_custom_ops(monkeypatch):
    """Outside torch.compile nothing changes: the eager Function (one label check), no op."""
    monkeypatch.setattr(_ops, "cross_entropy", lambda *args: pytest.fail("the custom ops ran eagerly"))
    logits, target, weight, _ = _problem((4, CLASSES), False, True, seed=9)
    loss = xt.cross_entropy(logits, target, weight, backend="triton")
    assert type(loss.grad_fn).__name__ == "TritonCrossEntropyFunctionBackward"


@pytest.mark.parametrize("probabilities", [False, True], ids=["labels", "probabilities"])
def test_the_custom_ops_pass_torchs_opcheck(probabilities):
    """Schema, fake implementations (shapes, dtypes), autograd registration and AOT dispatch of
    both ops, by ``torch.library.opcheck``."""
    logits, target, weight, _ = _problem((4, CLASSES), probabilities, True, seed=11)
    rows = logits.detach().requires_grad_(True)
    options = LossOptions("mean", -100, 0.1, 1e-2, 2.5)
    arguments = _triton_path.FORWARD_OP_OPTIONS.values(options)
    assert arguments == ("mean", -100, 0.1, 1e-2, 2.5)
    layout = _ops.stats_layout(target)  # M and e, and A in two parts for probabilities
    assert layout == (4 if probabilities else 2)
    for loss_dtype in (torch.float32, torch.float64):
        torch.library.opcheck(_ops.triton_cross_entropy, (rows, target, weight, loss_dtype, layout, *arguments))
    _, stats, factors = _ops.triton_cross_entropy(rows.detach(), target, weight, torch.float32, layout, *arguments)
    assert stats.shape == (layout, 4)
    torch.library.opcheck(
        _ops.triton_cross_entropy_backward,
        (rows.detach(), target, weight, stats, factors, torch.tensor(1.5),
         *_triton_path.BACKWARD_OP_OPTIONS.values(options)),
    )


def test_the_custom_ops_take_every_formula_option_by_name():
    """The ops' schemas are written from ``LossOptions``: every formula option is an argument of
    both (a new one needs no edit in ``_ops``), and the values round-trip to the same object."""
    formula = tuple(LossOptions().formula_arguments())
    forward = [argument.name for argument in _ops.triton_cross_entropy._opoverload._schema.arguments]
    backward = [argument.name for argument in _ops.triton_cross_entropy_backward._opoverload._schema.arguments]
    assert forward == ["rows", "target", "weight", "loss_dtype", "stats_rows", "reduction", *formula]
    assert backward == ["rows", "target", "weight", "stats", "factors", "grad_output", *formula]
    options = LossOptions("sum", 3, 0.25, 1e-3, None)
    forward_op = _triton_path.FORWARD_OP_OPTIONS
    assert forward_op.options(forward_op.values(options)) == options
    assert _triton_path.BACKWARD_OP_OPTIONS.taken_from(forward_op, forward_op.values(options)) == (3, 0.25, 1e-3, None)


@pytest.mark.parametrize("function", ["cross_entropy", "linear_cross_entropy"])
def test_a_dynamic_class_count_stays_dynamic(function):
    """The grid's limit (``_chunks.grid_reason``) is asked in eager calls only: asked while
    torch.compile traced, its power of 2 pinned the class count, so a dimension marked dynamic
    raised a ConstraintViolationError and dynamic=True compiled a graph per class count (a
    review, 2026-12-07)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    features = 5

    def loss_of(z, t):
        if function == "cross_entropy":
            return xt.cross_entropy(z, t, backend="triton")
        return xt.linear_cross_entropy(torch.ones(3, features, device=DEVICE), z, t, backend="triton")

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_of, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for classes in (6, 9, 40, 300):
        z = torch.randn(3, classes, device=DEVICE) if function == "cross_entropy" else torch.randn(
            classes, features, device=DEVICE
        )
        t = torch.randint(0, classes, (3,), device=DEVICE)
        torch.testing.assert_close(compiled(z, t), loss_of(z, t))
        frames.append(counter.frame_count)
    assert frames == frames[:1] * 4, frames  # no new graph for a new class count
    torch._dynamo.reset()
    z = torch.randn(3, 40, device=DEVICE)
    torch._dynamo.mark_dynamic(z, 1)
    if function == "cross_entropy":
        torch.compile(loss_of, backend="aot_eager")(z, torch.randint(0, 40, (3,), device=DEVICE))
