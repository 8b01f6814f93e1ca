"""``xentkit.torch.cross_entropy`` under ``torch.compile`` on the CPU runs the Numba kernels in two
custom ops (``xentkit::cross_entropy`` and its backward, ``xentkit.torch._numba_ops``): one node
each in the graph, the eager path's loss and gradient, and the labels checked. Before, the
compiler traced torch ops: a bad label gave a NaN row, and the call ran 4-5 times slower than
eager."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import xentkit  # noqa: E402
import xentkit.torch as xt  # noqa: E402
from xentkit._options import LossOptions  # noqa: E402
from xentkit.torch import _numba_ops  # noqa: E402


@pytest.fixture(autouse=True)
def _eager_on_the_kernels(monkeypatch):
    """Eager calls on the Numba kernels at these small shapes too (not torch's kernel, which small
    eager problems run), so that eager and compiled run the same kernels."""
    monkeypatch.setattr(xt.functional, "SMALL_MAX_LOGITS", 0)
    torch._dynamo.reset()  # (the parametrized cases' steps share code objects: no recompile limit)


def _graph_ops(fn, *args) -> list[str]:
    """The call targets of the graphs torch.compile makes of ``fn`` (a backend that records them),
    after calling it once."""
    seen: list[str] = []

    def backend(graph_module, _example_inputs):
        seen.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen


def _case(shape=(7, 5), dtype=torch.float32, seed=0, probabilities=False):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    classes = shape[1] if len(shape) > 1 else shape[0]
    if probabilities:
        target = torch.softmax(torch.randn(shape, generator=generator, dtype=torch.float64), 1 if len(shape) > 1 else 0)
        target = target.to(dtype)
    else:
        samples = (shape[0], *shape[2:]) if len(shape) > 1 else ()
        target = torch.randint(0, classes, samples, generator=generator)
        if target.dim():
            target.view(-1)[1] = -100
    return logits, target


def test_the_compiled_graph_holds_the_custom_op_not_torch_ops():
    logits, target = _case()
    logits.requires_grad_()
    ops = _graph_ops(lambda x, y: xt.cross_entropy(x, y, label_smoothing=0.1), logits, target)
    assert "xentkit.cross_entropy.default" in ops
    assert not any("log_softmax" in op or "cross_entropy_loss" in op for op in ops)


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.2},
    {"z_loss": 1e-3, "softcap": 4.0},
    {"ignore_index": 2, "reduction": "none", "label_smoothing": 0.1},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("layout", ["rows", "pixels", "one_sample", "probabilities"])
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_loss_and_gradient_are_eagers(options, dtype, layout, weighted):
    shape = {"rows": (9, 6), "pixels": (3, 6, 2, 2), "one_sample": (6,), "probabilities": (9, 6)}[layout]
    logits, target = _case(shape, dtype, probabilities=layout == "probabilities")
    if "ignore_index" in options and layout != "probabilities":
        target = torch.where(target == -100, options["ignore_index"], target)
    weight = torch.linspace(0.5, 2.0, 6, dtype=dtype) if weighted else None

    def run(fn):
        x = logits.clone().requires_grad_()
        loss = fn(x, target, weight)
        upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(loss.dtype) + 0.5
        (grad,) = torch.autograd.grad(loss, x, upstream)
        return loss.detach(), grad

    def step(x, y, w):
        return xt.cross_entropy(x, y, w, **options)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, grad = run(compiled)
    expected_loss, expected_grad = run(step)
    assert loss.dtype == expected_loss.dtype and grad.dtype == dtype
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)  # the same kernel's loss
    # eager scales the gradient it kept from forward; the compiled backward applies the upstream
    # gradient in the kernel: a rounding apart
    tolerance = {torch.float16: 2e-3, torch.float32: 2e-6, torch.float64: 1e-14}[dtype]
    torch.testing.assert_close(grad, expected_grad, rtol=tolerance, atol=tolerance)
    # and both are the float64 reference's
    double = logits.double().requires_grad_()
    reference = xt.cross_entropy(double, target if layout != "probabilities" else target.double(),
                                 None if weight is None else weight.double(), backend="torch", **options)
    assert torch.isfinite(reference).all()
    close = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=close, atol=close)


def test_at_an_upstream_gradient_of_one_the_gradient_is_eagers_bit_for_bit():
    logits, target = _case((33, 17), torch.float32)

    def grad_of(fn):
        x = logits.clone().requires_grad_()
        fn(x, target).backward()
        return x.grad

    step = lambda x, y: xt.cross_entropy(x, y, label_smoothing=0.05, z_loss=1e-4)  # noqa: E731
    assert torch.equal(grad_of(torch.compile(step, backend="aot_eager", fullgraph=True)), grad_of(step))


def test_a_bad_label_under_compile_is_the_eager_error_not_a_nan_row():
    logits, target = _case((6, 5))
    target[3] = 7
    compiled = torch.compile(lambda x, y: xt.cross_entropy(x, y), backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="7") as compiled_error:
        compiled(logits.clone().requires_grad_(), target)
    with pytest.raises(ValueError) as eager_error:
        xt.cross_entropy(logits.clone().requires_grad_(), target)
    assert str(compiled_error.value) == str(eager_error.value)


def test_the_inductor_compiled_step_trains_as_eager():
    """The default backend (inductor) with the ops inside a model's step: the same parameters
    after a few SGD steps."""
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(64, 12, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    labels[::7] = -100

    def train(compile_it: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
        loss_fn = xt.CrossEntropyLoss(label_smoothing=0.1)
        step = lambda x, y: loss_fn(model(x), y)  # noqa: E731
        if compile_it:
            step = torch.compile(step, fullgraph=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(4):
            optimizer.zero_grad()
            step(inputs, labels).backward()
            optimizer.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.testing.assert_close(train(True), train(False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("upstream", [float("inf"), float("nan")])
def test_a_non_finite_upstream_gradient_gives_eagers_values(upstream):
    logits, target = _case((6, 5), torch.float64)

    def grad_of(fn):
        x = logits.clone().requires_grad_()
        loss = fn(x, target)
        (grad,) = torch.autograd.grad(loss, x, torch.full_like(loss, 1.0).index_fill_(0, torch.tensor([0]), upstream)
                                      if loss.dim() else torch.tensor(upstream, dtype=loss.dtype))
        return grad

    for reduction in ("mean", "none"):
        step = lambda x, y, reduction=reduction: xt.cross_entropy(x, y, reduction=reduction)  # noqa: E731
        compiled = grad_of(torch.compile(step, backend="aot_eager", fullgraph=True))
        eager = grad_of(step)
        assert torch.equal(torch.isnan(compiled), torch.isnan(eager))  # the same NaN entries
        torch.testing.assert_close(compiled, eager, equal_nan=True, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(compiled, grad_of(lambda x, y, r=reduction: F.cross_entropy(x, y, reduction=r)),
                                   equal_nan=True)


def test_a_retained_graph_gives_the_same_gradient_twice():
    logits, target = _case((6, 5))
    x = logits.clone().requires_grad_()
    loss = torch.compile(lambda a, b: xt.cross_entropy(a, b), backend="aot_eager", fullgraph=True)(x, target)
    (first,) = torch.autograd.grad(loss, x, torch.tensor(0.5), retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, torch.tensor(0.5), retain_graph=True)
    assert torch.equal(first, second)
    (third,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(third, 2 * first)


def test_changing_the_logits_before_backward_is_autograds_error():
    """The compiled backward sweeps the logits again: they are kept, as torch keeps its
    log-softmax (eager xentkit keeps the gradient instead and gives the gradient at the values
    the loss saw)."""
    logits, target = _case((6, 5))
    leaf = logits.clone().requires_grad_()
    x = leaf * 1.0
    loss = torch.compile(lambda a, b: xt.cross_entropy(a, b), backend="aot_eager")(x, target)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_probabilities_as_logits_warning_is_given_under_compile():
    generator = torch.Generator().manual_seed(3)
    probabilities = torch.softmax(torch.randn(64, 10, generator=generator), 1)
    labels = torch.randint(0, 10, (64,), generator=generator)
    compiled = torch.compile(lambda a, b: xt.cross_entropy(a, b), backend="aot_eager", fullgraph=True)
    with pytest.warns(xentkit.ProbabilitiesAsLogitsWarning):
        compiled(probabilities, labels)
    quiet = torch.compile(lambda a, b: xt.cross_entropy(a, b, check_probabilities=False), backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", xentkit.ProbabilitiesAsLogitsWarning)
        quiet(probabilities, labels)


def test_dynamic_shapes_take_the_op_at_every_batch_size():
    compiled = torch.compile(lambda a, b: xt.cross_entropy(a, b, reduction="none"), backend="aot_eager", dynamic=True)
    for rows in (3, 8, 13):
        logits, target = _case((rows, 6), seed=rows)
        torch.testing.assert_close(compiled(logits, target), xt.cross_entropy(logits, target, reduction="none"),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_under_compile_keep_the_torch_ops(transform):
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 6, 5, generator=generator)  # a batch of 4 problems of 6 rows
    target = torch.randint(0, 5, (4, 6), generator=generator)
    if transform == "grad":
        fn = lambda a, b: torch.func.grad(xt.cross_entropy)(a[0], b[0])  # noqa: E731
        want = torch.func.grad(F.cross_entropy)(logits[0], target[0])
    else:
        fn = lambda a, b: torch.vmap(xt.cross_entropy)(a, b)  # noqa: E731
        want = torch.vmap(F.cross_entropy)(logits, target)
    torch.testing.assert_close(torch.compile(fn, backend="aot_eager", fullgraph=True)(logits, target), want)


def test_small_problems_keep_the_traced_torch_ops(monkeypatch):
    """Up to SMALL_MAX_LOGITS logits the compiled call keeps torch ops (faster there than the
    custom ops' dispatch), as small eager calls run torch's kernel; beyond, the custom op."""
    monkeypatch.setattr(xt.functional, "SMALL_MAX_LOGITS", 30)
    small, target = _case((6, 5))
    assert "xentkit.cross_entropy.default" not in _graph_ops(lambda x, y: xt.cross_entropy(x, y), small, target)
    torch._dynamo.reset()
    large, target = _case((7, 5))
    assert "xentkit.cross_entropy.default" in _graph_ops(lambda x, y: xt.cross_entropy(x, y), large, target)


def test_what_the_ops_do_not_take_keeps_the_torch_ops():
    logits, target = _case((6, 5))
    soft = torch.softmax(torch.randn(6, 5), 1).requires_grad_()  # a target that requires grad
    ops = _graph_ops(lambda x, y: xt.cross_entropy(x, y), logits.requires_grad_(), soft)
    assert "xentkit.cross_entropy.default" not in ops
    ops = _graph_ops(lambda x, y: xt.cross_entropy(x, y, backend="torch"), logits, target)
    assert "xentkit.cross_entropy.default" not in ops
    ops = _graph_ops(lambda x, y: xt.cross_entropy(x, y), logits.detach().bfloat16(), target)
    assert "xentkit.cross_entropy.default" not in ops


def test_the_ops_pass_torch_librarys_checks():
    logits, target = _case((6, 5))
    weight = torch.linspace(0.5, 2.0, 5)
    options = _numba_ops.FORWARD_OP_OPTIONS.values(LossOptions(label_smoothing=0.1))
    torch.library.opcheck(
        _numba_ops.numba_cross_entropy, (logits.requires_grad_(), target, weight, torch.float32, False, *options)
    )
    torch.library.opcheck(
        _numba_ops.numba_cross_entropy_backward, (logits.detach(), target, weight, torch.tensor(0.5), *options)
    )


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy: the chunked pass on the Numba kernels, as custom ops
# (xentkit.torch._linear_numba); before, a compiled CPU call traced F.linear and torch ops: the
# whole [N, V] logits and their gradient, and no label check


def _linear_case(rows=24, features=6, classes=40, dtype=torch.float32, probabilities=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=generator, dtype=torch.float64).to(dtype)
    w = torch.randn(classes, features, generator=generator, dtype=torch.float64).to(dtype)
    b = torch.randn(classes, generator=generator, dtype=torch.float64).to(dtype)
    if probabilities:
        target = torch.softmax(torch.randn(rows, classes, generator=generator, dtype=torch.float64), 1).to(dtype)
    else:
        target = torch.randint(0, classes, (rows,), generator=generator)
        target[2] = -100
    return x, w, b, target


LINEAR_OPTIONS = [{}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1, "z_loss": 1e-3},
                  {"chunk_size": 5, "reduction": "none", "softcap": 3.0}]


@pytest.mark.parametrize("options", LINEAR_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["bias", "no_bias", "probabilities", "class_weights", "frozen_weight", "one_sample"])
def test_compiled_linear_cross_entropy_is_eagers(options, dtype, variant):
    x, w, b, target = _linear_case(dtype=dtype, probabilities=variant == "probabilities")
    bias = None if variant == "no_bias" else b
    class_weight = torch.linspace(0.5, 2.0, w.shape[0], dtype=dtype) if variant == "class_weights" else None
    if variant == "one_sample":
        x, target = x[0], target[0]
    operands = [x.clone().requires_grad_(), w.clone().requires_grad_(variant != "frozen_weight")]
    if bias is not None:
        operands.append(bias.clone().requires_grad_())

    def step(x, w, b=None):
        return xt.linear_cross_entropy(x, w, target, linear_bias=b, weight=class_weight, **options)

    ops = _graph_ops(step, *operands)
    assert "xentkit.linear_cross_entropy.default" in ops and not any("aten.mm" in op for op in ops)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)

    def run(fn):
        leaves = [operand.detach().clone().requires_grad_(operand.requires_grad) for operand in operands]
        loss = fn(*leaves)
        upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=dtype) + 0.5
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        return loss.detach(), torch.autograd.grad(loss, wanted, upstream)

    loss, grads = run(compiled)
    expected_loss, expected_grads = run(step)
    assert loss.dtype == expected_loss.dtype and loss.shape == expected_loss.shape
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    for grad, expected in zip(grads, expected_grads, strict=True):
        # "mean"/"sum": the gradients for an upstream of 1, scaled by the traced product as eager
        # scales them; "none": the same chunked pass with the upstream gradient
        tolerance = {torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
        torch.testing.assert_close(grad, expected, rtol=tolerance, atol=tolerance)


def test_compiled_linear_cross_entropy_checks_labels():
    x, w, _, target = _linear_case()
    target[5] = 40
    compiled = torch.compile(lambda a, c: xt.linear_cross_entropy(a, c, target), backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="label 40 at position") as compiled_error:
        compiled(x.requires_grad_(), w)
    with pytest.raises(ValueError) as eager_error:
        xt.linear_cross_entropy(x, w, target)
    assert str(compiled_error.value) == str(eager_error.value)


def test_small_compiled_linear_problems_keep_the_torch_ops(monkeypatch):
    monkeypatch.setattr(xt.functional, "SMALL_MAX_LOGITS", 24 * 40)
    x, w, _, target = _linear_case()
    ops = _graph_ops(lambda a, c: xt.linear_cross_entropy(a, c, target), x, w)
    assert "xentkit.linear_cross_entropy.default" not in ops


def test_an_inductor_compiled_model_with_a_fused_head_trains_as_eager():
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(48, 10, generator=generator)
    labels = torch.randint(0, 30, (48,), generator=generator)

    def train(compile_it: bool) -> torch.Tensor:
        torch.manual_seed(0)
        body = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Tanh())
        head = torch.nn.Linear(12, 30)
        step = lambda a, y: xt.linear_cross_entropy(body(a), head.weight, y, linear_bias=head.bias)  # noqa: E731
        if compile_it:
            step = torch.compile(step, fullgraph=True)
        parameters = [*body.parameters(), *head.parameters()]
        optimizer = torch.optim.SGD(parameters, lr=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            step(inputs, labels).backward()
            optimizer.step()
        return torch.cat([p.detach().flatten() for p in parameters])

    torch.testing.assert_close(train(True), train(False), rtol=1e-5, atol=1e-6)


def test_the_linear_ops_pass_torch_librarys_checks():
    from xentkit.torch import _linear_numba
    from xentkit.torch._linear_ops import LINEAR_OP_OPTIONS

    x, w, b, target = _linear_case()
    for reduction in ("mean", "none"):
        options = LINEAR_OP_OPTIONS.values(LossOptions(reduction=reduction, chunk_size=7))
        torch.library.opcheck(
            _linear_numba.numba_linear_cross_entropy,
            (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), target, None, True, True, True, *options),
        )
    torch.library.opcheck(
        _linear_numba.numba_linear_cross_entropy_backward,
        (x.detach(), w.detach(), b.detach(), target, None, torch.rand(24), True, True, True, *options),
    )


# ---------------------------------------------------------------------------------------------
# torch.export, and edges a review found


def test_an_exported_loss_with_a_dynamic_batch_serves_every_batch_size(monkeypatch):
    """The small-problem threshold was a guard on the batch: a dynamic batch failed to export
    ("Expected op to be '=='"), or the program refused batches below it. Exported, the ops serve
    every size."""
    monkeypatch.setattr(xt.functional, "SMALL_MAX_LOGITS", 1 << 16)  # the default: 65.5 rows here
    generator = torch.Generator().manual_seed(8)
    head = torch.nn.Linear(16, 1000)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, x, t):
            return xt.cross_entropy(self.head(x), t) + xt.linear_cross_entropy(x, self.head.weight, t)

    batch = torch.export.Dim("batch")
    x = torch.randn(100, 16, generator=generator)
    t = torch.randint(0, 1000, (100,), generator=generator)
    program = torch.export.export(Model(), (x, t), dynamic_shapes=({0: batch}, {0: batch})).module()
    for rows in (2, 10, 100, 300):
        x = torch.randn(rows, 16, generator=generator)
        t = torch.randint(0, 1000, (rows,), generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(program(x, t), Model()(x, t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    "make",
    [
        lambda: (xt.CrossEntropyLoss(), torch.randn(8, 10), torch.randint(0, 10, (8,))),
        lambda: (xt.NLLLoss(), torch.randn(8, 10).log_softmax(1), torch.randint(0, 10, (8,))),
        lambda: (xt.BCEWithLogitsLoss(pos_weight=torch.full((10,), 2.0)), torch.randn(8, 10), torch.rand(8, 10)),
        lambda: (xt.BCEWithLogitsLoss(weight=torch.full((1, 10), 0.5)), torch.randn(8, 10), torch.rand(8, 10)),
    ],
    ids=["cross_entropy", "nll_loss", "bce-pos_weight", "bce-weight"],
)
def test_a_small_loss_exports_with_a_dynamic_batch_strict_or_not(make, strict):
    """A review (2026-12-07): strict export traced the small-problem size test as a guard
    ("Expected op to be '=='", or a program bounded to 6553 rows), and the binary loss's
    broadcast check of weight / pos_weight made the batch a constant (np.broadcast_shapes)."""
    module, x, t = make()
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (x, t), dynamic_shapes=({0: batch}, {0: batch}), strict=strict).module()
    for rows in (3, 7000):
        xs, ts = (torch.cat([v] * (rows // 8 + 1))[:rows] for v in (x, t))
        torch.testing.assert_close(program(xs, ts), module(xs, ts))


def test_an_exported_linear_loss_gives_the_gradient_of_an_operand_frozen_when_exported():
    """The ops' gradients wanted are fixed as the graph is traced; an exported program may run
    with an operand requiring grad that did not then (before: its gradient silently None)."""
    generator = torch.Generator().manual_seed(9)
    weight = torch.nn.Parameter(torch.randn(1000, 16, generator=generator))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = weight

        def forward(self, x, t):
            return xt.linear_cross_entropy(x, self.weight, t)

    x = torch.randn(100, 16, generator=generator)
    t = torch.randint(0, 1000, (100,), generator=generator)
    program = torch.export.export(Model(), (x, t)).module()  # x does not require grad here
    leaf = x.clone().requires_grad_()
    program(leaf, t).backward()
    expected = x.clone().requires_grad_()
    xt.linear_cross_entropy(expected, weight.detach(), t).backward()
    assert leaf.grad is not None
    torch.testing.assert_close(leaf.grad, expected.grad)


def test_no_input_features_compile_with_fullgraph():
    """The threshold divided by in_features (a ZeroDivisionError while tracing)."""
    x = torch.randn(100, 0, requires_grad=True)
    w = torch.randn(1000, 0, requires_grad=True)
    t = torch.randint(0, 1000, (100,))
    compiled = torch.compile(lambda a, b, c: xt.linear_cross_entropy(a, b, c), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, t), xt.linear_cross_entropy(x, w, t))


def test_a_target_of_the_wrong_shape_under_compile_is_eagers_error():
    logits, target = _case((9, 6))
    compiled = torch.compile(lambda a, b: xt.cross_entropy(a, b), backend="aot_eager")
    with pytest.raises(ValueError) as compiled_error:
        compiled(logits, target[:4])
    with pytest.raises(ValueError) as eager_error:
        xt.cross_entropy(logits, target[:4])
    assert str(compiled_error.value) == str(eager_error.value)


# ---------------------------------------------------------------------------------------------
# nll_loss: the api's NLL as custom ops (xentkit::nll_loss and its backward)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("layout", ["rows", "pixels", "one_sample"])
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_nll_loss_is_eagers(reduction, dtype, layout, weighted):
    shape = {"rows": (9, 6), "pixels": (3, 6, 2, 2), "one_sample": (6,)}[layout]
    logits, target = _case(shape, dtype)
    log_probs = torch.log_softmax(logits.double(), 1 if len(shape) > 1 else 0).to(dtype)
    weight = torch.linspace(0.5, 2.0, 6, dtype=dtype) if weighted else None

    def step(x, y, w):
        return xt.nll_loss(x, y, w, reduction=reduction)

    assert "xentkit.nll_loss.default" in _graph_ops(step, log_probs.clone().requires_grad_(), target, weight)
    torch._dynamo.reset()

    def run(fn):
        x = log_probs.clone().requires_grad_()
        loss = fn(x, target, weight)
        upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (grad,) = torch.autograd.grad(loss, x, (upstream + 0.5).to(loss.dtype))
        return loss.detach(), grad

    loss, grad = run(torch.compile(step, backend="aot_eager", fullgraph=True))
    expected_loss, expected_grad = run(step)
    assert loss.dtype == expected_loss.dtype and grad.dtype == dtype
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)  # (the same call, in backward)


def test_compiled_nll_loss_checks_labels():
    logits, target = _case((6, 5))
    target[4] = -3
    log_probs = torch.log_softmax(logits, 1)
    compiled = torch.compile(lambda a, b: xt.nll_loss(a, b), backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="-3") as compiled_error:
        compiled(log_probs.requires_grad_(), target)
    with pytest.raises(ValueError) as eager_error:
        xt.nll_loss(log_probs, target)
    assert str(compiled_error.value) == str(eager_error.value)


def test_the_nll_ops_pass_torch_librarys_checks():
    logits, target = _case((6, 5))
    log_probs = torch.log_softmax(logits, 1)
    weight = torch.linspace(0.5, 2.0, 5)
    for reduction in ("mean", "none"):
        options = _numba_ops.NLL_OP_OPTIONS.values(LossOptions(reduction=reduction))
        torch.library.opcheck(_numba_ops.numba_nll_loss, (log_probs.requires_grad_(), target, weight, torch.float32, *options))
        upstream = torch.tensor(0.5) if reduction == "mean" else torch.rand(6)
        torch.library.opcheck(_numba_ops.numba_nll_loss_backward, (log_probs.detach(), target, weight, upstream, *options))


# ---------------------------------------------------------------------------------------------
# log_probs of existing logits: custom ops around the row backends (xentkit::log_probs), as the
# linear form's; before, the traced torch ops ran 4-5 times slower than eager on the CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(20, 31), (2, 5, 31)])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compiled_log_probs_are_eagers(dtype, shape, backend):
    generator = torch.Generator().manual_seed(12)
    logits = (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    target.view(-1)[3] = -100

    def step(x, y):
        return xt.log_probs(x, y, temperature=0.7, return_entropy=True, return_lse=True, backend=backend)

    assert "xentkit.log_probs.default" in _graph_ops(step, logits.clone().requires_grad_(), target)
    torch._dynamo.reset()

    def run(fn):
        x = logits.clone().requires_grad_()
        outputs = fn(x, target)
        upstream = [torch.rand(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype) for i, o in enumerate(outputs)]
        (grad,) = torch.autograd.grad(outputs, x, upstream)
        return [o.detach() for o in outputs], grad

    outputs, grad = run(torch.compile(step, backend="aot_eager", fullgraph=True))
    expected, expected_grad = run(step)
    for value, want in zip(outputs, expected, strict=True):
        assert value.dtype == want.dtype and value.shape == want.shape
        torch.testing.assert_close(value, want, rtol=0, atol=0)  # the same row backend
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


def test_a_compiled_log_probs_bad_target_raises_and_unchecked_is_nan():
    """On the CPU the compiled call checks in its graph that no target is outside [0, V) (eager's
    ValueError, naming it); with ``check_labels=False`` nothing is checked and that
    target's log-probability is NaN, entropy and lse as they are."""
    generator = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 9, generator=generator)
    target = torch.randint(0, 9, (6,), generator=generator)
    target[2] = 40
    checked = torch.compile(lambda a, b: xt.log_probs(a, b, return_entropy=True), backend="aot_eager")
    with pytest.raises(ValueError, match=r"^target has label 40 at position \(2,\) but logits have 9 classes"):
        checked(logits, target)
    unchecked = torch.compile(
        lambda a, b: xt.log_probs(a, b, return_entropy=True, check_labels=False), backend="aot_eager"
    )
    log_p, entropy = unchecked(logits, target)
    assert torch.isnan(log_p[2]) and torch.isfinite(log_p[torch.arange(6) != 2]).all()
    torch.testing.assert_close(entropy, xt.log_probs(logits, target.clamp(max=8), return_entropy=True)[1])
    target[2] = 4
    torch.testing.assert_close(checked(logits, target)[0], xt.log_probs(logits, target))


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda x, y, **k: xt.cross_entropy(x, y, **k), id="cross_entropy"),
        pytest.param(lambda x, y, **k: xt.cross_entropy(x.to(torch.bfloat16), y, **k), id="bfloat16"),
        pytest.param(lambda x, y, **k: xt.cross_entropy(x, y, backend="torch", **k), id="backend-torch"),
        pytest.param(
            lambda x, y, **k: xt.cross_entropy(x, y, weight=torch.arange(1.0, 6.0), label_smoothing=0.1, **k),
            id="weighted-smoothed",
        ),
        pytest.param(lambda x, y, **k: xt.nll_loss(torch.log_softmax(x, 1), y, **k), id="nll_loss"),
        pytest.param(lambda x, y, **k: xt.CrossEntropyLoss(reduction="none", **k)(x, y), id="module-none"),
    ],
)
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_small_problems_check_their_labels_in_the_graph(monkeypatch, call, dynamic):
    """Problems that keep the traced torch ops under torch.compile (small ones, bfloat16,
    ``backend="torch"``) check their labels on the CPU with an op in the graph: a label outside
    [0, C) raises eager's ValueError naming it (where it made its row's loss NaN),
    ``check_labels=False`` keeps the NaN, and good labels give eager's loss."""
    monkeypatch.setattr(xt.functional, "SMALL_MAX_LOGITS", 1 << 16)
    logits, target = _case((6, 5))
    bad = target.clone()
    bad[4] = 5
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    with pytest.raises(ValueError, match=r"^target has label 5 at position \(4,\) but (logits|log_probs) have 5 classes"):
        compiled(logits, bad)
    torch.testing.assert_close(compiled(logits, target), call(logits, target))
    unchecked = torch.compile(
        lambda x, y: call(x, y, check_labels=False), backend="aot_eager", fullgraph=True, dynamic=dynamic
    )
    loss = unchecked(logits, bad)
    assert loss.isnan().any()
    bad[4] = -100  # ignore_index is no bad label
    torch.testing.assert_close(compiled(logits, bad), call(logits, bad))


def test_an_inductor_compiled_small_step_raises_on_a_bad_label_and_an_exported_one_too(monkeypatch):
    """The check survives inductor's generated code; an exported program runs the custom ops
    at every size, which check as eager does."""
    monkeypatch.setattr(xt.functional, "SMALL_MAX_LOGITS", 1 << 16)
    logits, target = _case((6, 5))
    bad = target.clone()
    bad[0] = -3
    loss_of = torch.compile(lambda x, y: xt.cross_entropy(x, y))
    with pytest.raises(ValueError, match=r"^target has label -3 at position \(0,\)"):
        loss_of(logits, bad)
    torch.testing.assert_close(loss_of(logits, target), xt.cross_entropy(logits, target))

    class Loss(torch.nn.Module):
        def forward(self, x, y):
            return xt.cross_entropy(x, y)

    exported = torch.export.export(Loss(), (logits.detach(), target)).module()
    with pytest.raises(ValueError, match=r"label -3 at position \(0,\)"):  # (the ops, at any size)
        exported(logits.detach(), bad)
    torch.testing.assert_close(exported(logits.detach(), target), xt.cross_entropy(logits.detach(), target))


def test_inductor_code_that_runs_on_threads_raises_on_a_bad_label_and_the_process_lives():
    """A problem big enough that inductor runs its fused C++ loop on OpenMP threads: the label
    check had been an assertion fused into that loop, and its exception leaving the parallel
    region aborted the process (SIGABRT, no traceback; pytorch/pytorch#195402). The check is an
    op of its own now: eager's ValueError. In a child process, so that an abort fails this test
    rather than the run."""
    script = textwrap.dedent("""
        import torch
        import xentkit.torch as xt

        torch.set_num_threads(2)
        logits = torch.randn(16, 100, requires_grad=True)
        target = torch.randint(0, 100, (16,))
        target[3] = 100
        x, w = torch.randn(16, 32, requires_grad=True), torch.randn(100, 32, requires_grad=True)
        calls = {
            "cross_entropy": lambda: torch.compile(lambda z, t: xt.cross_entropy(z, t))(logits, target),
            "log_probs": lambda: torch.compile(lambda z, t: xt.log_probs(z, t))(logits, target),
            "linear_cross_entropy": lambda: torch.compile(
                lambda a, b, t: xt.linear_cross_entropy(a, b, t))(x, w, target),
        }
        for name, call in calls.items():
            try:
                call()
            except ValueError as error:
                print(name, "label 100 at position (3,)" in str(error))
            else:
                print(name, "no error")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:3] == ["cross_entropy True", "log_probs True", "linear_cross_entropy True"], done.stdout


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("output", ["entropy", "lse", "linear-entropy"])
def test_a_compiled_graph_that_returns_no_log_probability_still_checks_the_targets(backend, output):
    """The check's op had returned the bad-row mask, which only the log-probabilities read: a
    graph that returned the entropy alone dropped the op, and a bad target passed unchecked (a
    review, 2026-12-07). Every mask is computed from the labels it returns now."""
    generator = torch.Generator().manual_seed(5)
    logits, target = torch.randn(6, 9, generator=generator), torch.randint(0, 9, (6,), generator=generator)
    x, w = torch.randn(6, 4, generator=generator), torch.randn(9, 4, generator=generator)
    target[2] = 40
    call = {
        "entropy": lambda a, b: xt.log_probs(a, b, return_entropy=True)[1],
        "lse": lambda a, b: xt.log_probs(a, b, return_lse=True)[1],
        "linear-entropy": lambda a, b: xt.linear_log_probs(x, w, b, return_entropy=True)[1],
    }[output]
    with pytest.raises(ValueError, match=r"label 40 at position \(2,\)"):
        torch.compile(call, backend=backend)(logits, target)
    target[2] = 3
    torch.testing.assert_close(torch.compile(call, backend=backend)(logits, target), call(logits, target))


@pytest.mark.parametrize("check_labels", [True, False])
def test_a_compiled_uint64_label_beyond_int64_is_refused_as_in_eager(check_labels):
    """uint64 labels beyond int64 are refused before the cast to int64 would wrap them (2**64 −
    100 onto −100, the default ignore_index): eager refused it, compiled the row was silently
    ignored (a review, 2026-12-07); whatever check_labels says, as eager."""
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(64, 1000, generator=generator, requires_grad=True)
    target = torch.randint(0, 1000, (64,), generator=generator).to(torch.uint64)
    target[5] = torch.tensor(2**64 - 100, dtype=torch.uint64)
    for call in (lambda a, b: xt.cross_entropy(a, b, check_labels=check_labels),
                 lambda a, b: xt.log_probs(a, b, check_labels=check_labels)):  # fmt: skip
        with pytest.raises(ValueError, match=r"label 18446744073709551516 at position \(5,\), too large"):
            call(logits, target)
        with pytest.raises(ValueError, match=r"label 18446744073709551516 at position \(5,\), too large"):
            torch.compile(call, fullgraph=True)(logits, target)
    target[5] = 7
    torch.testing.assert_close(
        torch.compile(lambda a, b: xt.cross_entropy(a, b), fullgraph=True)(logits, target),
        xt.cross_entropy(logits, target.long()),
    )


def test_compiled_linear_log_probs_names_a_bad_target_where_eager_does():
    """The compiled branch had checked the flattened targets: position (13,) for eager's (1, 5)."""
    generator = torch.Generator().manual_seed(9)
    h, w = torch.randn(2, 8, 16, generator=generator), torch.randn(100, 16, generator=generator)
    target = torch.randint(0, 100, (2, 8), generator=generator)
    target[1, 5] = 100
    for call in (xt.linear_log_probs, torch.compile(lambda a, b, c: xt.linear_log_probs(a, b, c), fullgraph=True)):
        with pytest.raises(ValueError, match=r"^target has label 100 at position \(1, 5\) but linear_weight has 100"):
            call(h, w, target)


def test_a_uint64_label_beyond_int64_under_vmap_makes_its_row_nan_not_ignored():
    """Where nothing may look at the labels (torch.func; CUDA compiled), the cast had wrapped
    2**64 − 100 onto −100 and the row was silently ignored; it is a bad label now: NaN, as
    torch.func gives for any bad label (a review, 2026-12-07)."""
    generator = torch.Generator().manual_seed(10)
    logits = torch.randn(3, 16, 100, generator=generator)
    target = torch.randint(0, 100, (3, 16), generator=generator).to(torch.uint64)
    target[1, 5] = torch.tensor(2**64 - 100, dtype=torch.uint64)
    losses = torch.vmap(lambda a, b: xt.cross_entropy(a, b))(logits, target)
    assert losses[1].isnan() and losses[[0, 2]].isfinite().all()
    log_p = torch.vmap(lambda a, b: xt.log_probs(a, b))(logits, target)
    assert log_p[1, 5].isnan() and log_p.isnan().sum() == 1
