"""``xentkit.torch.linear_cross_entropy`` under ``torch.compile(fullgraph=True)`` keeps the chunked
Triton path (the custom ops of ``xentkit.torch._linear_ops``): the ops are in the graph, the
kernels run chunk by chunk, the whole ``[N, V]`` logits are never formed (the torch-ops fallback
does not run), and loss and gradients equal the eager Triton path, which ``tests/test_triton.py``
checks against torch. On CPU tensors under Triton's interpreter; few cases, since each
compilation takes seconds."""

from __future__ import annotations

import pytest

from _triton_setup import DEVICE  # first: the skips and the interpreter

# isort: split
import torch

import xentkit.torch as xt
from xentkit._options import LossOptions
from xentkit.torch import _linear_ops, _ops, _torch_ops
from xentkit.triton import cross_entropy as kernels

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")

ROWS, FEATURES, CLASSES, CHUNK = 10, 8, 13, 4  # 10 rows in chunks of 4: the last one ragged


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _counted(monkeypatch, module, name: str) -> dict[str, int]:
    """Counts the calls of ``module.name`` (a kernel's host function) into the returned dict."""
    counts = {name: 0}
    original = getattr(module, name)

    def counted(*args, **kwargs):
        counts[name] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return counts


@pytest.fixture
def launches(monkeypatch):
    """Counts pass 1's launches (one per chunk); the torch-ops fallback (whole logits) raises."""
    monkeypatch.setattr(_torch_ops, "cross_entropy", lambda *a, **k: pytest.fail("the torch-ops fallback ran"))
    return _counted(monkeypatch, kernels, "row_statistics")


def _problem(bias, probabilities, weighted, frozen_weight=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, FEATURES, generator=generator).to(DEVICE).requires_grad_()
    w = torch.randn(CLASSES, FEATURES, generator=generator).to(DEVICE).requires_grad_(not frozen_weight)
    b = torch.randn(CLASSES, generator=generator).to(DEVICE).requires_grad_() if bias else None
    if probabilities:
        target = torch.softmax(torch.randn(ROWS, CLASSES, generator=generator), 1).to(DEVICE)
    else:
        target = torch.randint(0, CLASSES, (ROWS,), generator=generator).to(DEVICE)
        target[2] = -100
    weight = (torch.rand(CLASSES, generator=generator) + 0.25).to(DEVICE) if weighted else None
    upstream = (torch.rand(ROWS, generator=generator) + 0.5).to(DEVICE)
    return x, w, b, target, weight, upstream


def _loss_and_gradients(loss_of, x, w, b, target, weight, upstream, reduction):
    loss = loss_of(x, w, b, target, weight)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    total = (loss * upstream).sum() if reduction == "none" else 1.5 * loss
    return loss.detach(), torch.autograd.grad(total, leaves)


CASES = [
    # (reduction, bias, probabilities, weighted, frozen weight, options)
    ("mean", False, False, False, False, {}),
    ("mean", True, False, True, False, {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.5}),
    ("sum", True, True, True, False, {"label_smoothing": 0.1}),
    ("none", True, False, True, False, {"z_loss": 1e-2}),
    ("none", False, True, False, False, {}),
    ("mean", True, False, False, True, {}),  # a frozen output layer: no weight gradient
]


@pytest.mark.parametrize(("reduction", "bias", "probabilities", "weighted", "frozen", "options"), CASES)
def test_compiled_linear_cross_entropy_keeps_the_chunked_kernels_and_equals_eager(
    launches, reduction, bias, probabilities, weighted, frozen, options
):
    from torch._dynamo.testing import CompileCounterWithBackend

    x, w, b, target, weight, upstream = _problem(bias, probabilities, weighted, frozen)

    def loss_of(x, w, b, target, weight):
        return xt.linear_cross_entropy(
            x, w, target, linear_bias=b, weight=weight, reduction=reduction, chunk_size=CHUNK,
            backend="triton", **options,
        )

    expected_loss, expected_gradients = _loss_and_gradients(loss_of, x, w, b, target, weight, upstream, reduction)
    eager_launches = launches["row_statistics"]
    assert eager_launches == 3  # three chunks

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(loss_of, fullgraph=True, backend=counter)
    loss, gradients = _loss_and_gradients(compiled, x, w, b, target, weight, upstream, reduction)

    assert counter.frame_count == 1  # one graph, no break
    targets = {str(node.target) for graph in counter.graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert "xentkit.triton_linear_cross_entropy.default" in targets
    assert launches["row_statistics"] > eager_launches  # the compiled step ran the kernels
    assert loss.shape == expected_loss.shape and loss.dtype == expected_loss.dtype
    assert len(gradients) == len(expected_gradients) == (1 + (not frozen) + bias)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gradients, expected_gradients, rtol=1e-5, atol=1e-6)


def test_a_bad_label_under_compile_makes_the_loss_nan_and_eager_raises(launches):
    x, w, b, target, weight, _ = _problem(True, False, True, seed=3)
    target[0] = CLASSES

    def loss_of(x, w, b, target, weight):
        return xt.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight, reduction="none",
                                       chunk_size=CHUNK, backend="triton")  # fmt: skip

    with pytest.raises(ValueError, match=f"target has label {CLASSES} at position"):
        loss_of(x, w, b, target, weight)
    loss = torch.compile(loss_of, fullgraph=True)(x, w, b, target, weight)
    assert loss[0].isnan() and torch.isfinite(loss[1:]).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_linear_custom_ops_pass_torchs_opcheck(reduction):
    x, w, b, target, weight, upstream = _problem(True, False, True, seed=5)
    options = LossOptions(reduction, -100, 0.1, 1e-2, None, CHUNK)
    values = _linear_ops.LINEAR_OP_OPTIONS.values(options)
    arguments = (x, w, b, target, weight, True, True, True, _ops.stats_layout(target), *values)
    torch.library.opcheck(_linear_ops.triton_linear_cross_entropy, arguments)
    if reduction == "none":
        _, stats, *_ = _linear_ops.triton_linear_cross_entropy(
            x.detach(), w.detach(), b.detach(), target, weight, True, True, True, _ops.stats_layout(target), *values
        )
        torch.library.opcheck(
            _linear_ops.triton_linear_cross_entropy_backward,
            (x.detach(), w.detach(), b.detach(), target, weight, stats, upstream, True, True, True, *values),
        )


def test_compiled_linear_log_probs_run_the_triton_kernels_in_chunks(monkeypatch):
    """linear_log_probs under compile: its custom ops run the Triton row backend, chunk by chunk,
    and equal the eager Triton path."""
    from xentkit.triton import log_probs as log_prob_kernels

    calls = _counted(monkeypatch, log_prob_kernels, "log_prob_statistics")
    x, w, b, target, _, upstream = _problem(True, False, False, seed=9)

    def step(x, w, b, target):
        log_p, entropy = xt.linear_log_probs(
            x, w, target, linear_bias=b, chunk_size=CHUNK, return_entropy=True, backend="triton"
        )
        return (log_p * upstream).sum() - 0.1 * entropy.sum()

    expected = step(x, w, b, target)
    expected_grads = torch.autograd.grad(expected, (x, w, b))
    assert calls["log_prob_statistics"] == 3  # eager: three chunks
    total = torch.compile(step, fullgraph=True)(x, w, b, target)
    grads = torch.autograd.grad(total, (x, w, b))
    assert calls["log_prob_statistics"] == 6  # compiled: the same three chunks on the kernels
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("function", ["linear_cross_entropy", "linear_log_probs"])
def test_compiled_with_transposed_operands_under_inductor(function):
    """The ops return contiguous gradients whatever the operands' layout, and their fake
    implementations say so (inductor asserts the sizes and strides it was told)."""
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(FEATURES, ROWS, generator=generator).t().to(DEVICE).requires_grad_()  # [ROWS, FEATURES]
    w = torch.randn(FEATURES, CLASSES, generator=generator).t().to(DEVICE).requires_grad_()
    target = torch.randint(0, CLASSES, (ROWS,), generator=generator).to(DEVICE)

    def loss_of(x, w, target):
        if function == "linear_cross_entropy":
            return xt.linear_cross_entropy(x, w, target, reduction="none", chunk_size=CHUNK, backend="triton").sum()
        return xt.linear_log_probs(x, w, target, chunk_size=CHUNK, backend="triton").sum()

    expected = loss_of(x, w, target)
    expected_grads = torch.autograd.grad(expected, (x, w))
    total = torch.compile(loss_of, fullgraph=True, backend="inductor")(x, w, target)
    grads = torch.autograd.grad(total, (x, w))
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("function", ["linear_cross_entropy", "linear_log_probs"])
def test_dynamic_shapes_do_not_recompile_for_every_number_of_rows(function):
    """The chunk size is resolved inside the ops from the real shapes: a new N is no new graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    w = torch.randn(CLASSES, FEATURES).to(DEVICE).requires_grad_()

    def loss_of(x, w, target):
        if function == "linear_cross_entropy":
            return xt.linear_cross_entropy(x, w, target, backend="triton")
        return xt.linear_log_probs(x, w, target, backend="triton").sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_of, fullgraph=True, dynamic=True, backend=counter)
    for rows in range(24, 96, 8):  # nine sizes, each its own default chunk
        x = torch.randn(rows, FEATURES).to(DEVICE).requires_grad_()
        target = torch.randint(0, CLASSES, (rows,)).to(DEVICE)
        compiled(x, w, target).backward()
    assert counter.frame_count <= 2


def test_an_exported_program_needing_a_gradient_it_was_traced_without_says_so():
    """The ops compute the gradients wanted as the graph is traced; an exported program run with
    an operand that did not require grad then would have given None silently (a review)."""
    generator = torch.Generator().manual_seed(11)
    weight = torch.nn.Parameter(torch.randn(CLASSES, FEATURES, generator=generator).to(DEVICE))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = weight

        def forward(self, x, t):
            return xt.linear_cross_entropy(x, self.weight, t, backend="triton", chunk_size=CHUNK)

    x = torch.randn(ROWS, FEATURES, generator=generator).to(DEVICE)
    t = torch.randint(0, CLASSES, (ROWS,), generator=generator).to(DEVICE)
    program = torch.export.export(Model(), (x, t)).module()
    with pytest.raises(RuntimeError, match="traced without grad_input"):
        program(x.clone().requires_grad_(), t).backward()
