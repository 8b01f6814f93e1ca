"""The Triton paths wait for the device only where their docs say (issue "GPU": no host
synchronization inside the op, so that CUDA graphs can capture it, and one wait for the label
check in eager mode).

A wait for the device is a device value read by the host: ``.item()``, ``bool(tensor)``,
``nonzero`` and what is built on them (boolean indexing, ``masked_select``), or host data copied to
the device (``torch.tensor(...)``). On the CPU (Triton's interpreter) the test records those ops as
they are dispatched; a device-to-host copy (``.cpu()``) is a no-op there and is not seen. On a GPU
(``XENTKIT_TEST_DEVICE=cuda``) CUDA's own sync debug mode also turns every real synchronization
into an error.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest

from _triton_setup import DEVICE  # first: the skips and the interpreter

# isort: split
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import xentkit.torch as xt
from xentkit._options import LossOptions
from xentkit.torch import _ops

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")

aten = torch.ops.aten
_WAITS = {
    aten._local_scalar_dense.default,  # .item(), float(t), bool(t), if t: ...
    aten.is_nonzero.default,
    aten.nonzero.default,  # boolean indexing, torch.where(mask) with one argument
    aten.masked_select.default,
    aten.lift_fresh.default,  # torch.tensor(host data)
}


class _HostReads(TorchDispatchMode):
    """Records the ops that would make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WAITS or _to_host(func, args, kwargs):
            self.ops.append(str(func))
        return func(*args, **kwargs)


def _to_host(func, args, kwargs) -> bool:
    """A copy of a device tensor's values to host memory (``.cpu()``, ``.tolist()``): a wait."""
    if func is not aten._to_copy.default or not args or args[0].device.type == "cpu":
        return False
    device = kwargs.get("device")
    return device is not None and torch.device(device).type == "cpu"


@contextlib.contextmanager
def _waits():
    """Yields the list of waits recorded in the block. On CUDA, torch's sync debug mode also
    counts the real synchronizations: each must be one the list holds (a ``.cpu()`` or a copy
    from host memory would be one more)."""
    recorder = _HostReads()
    if DEVICE != "cuda":
        with recorder:
            yield recorder.ops
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, recorder:
            warnings.simplefilter("always")
            yield recorder.ops
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    syncs = [str(warning.message) for warning in caught if "synchroniz" in str(warning.message)]
    assert len(syncs) == len(recorder.ops), (syncs, recorder.ops)


def _logits(shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 2).to(device=DEVICE, dtype=dtype).requires_grad_()


def _labels(shape, classes, seed=1):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, shape, generator=generator)
    labels.view(-1)[0] = -100
    return labels.to(DEVICE)


CASES = [
    pytest.param((6, 33), {}, id="plain"),
    pytest.param((6, 33), {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}, id="options"),
    pytest.param((6, 33), {"weight": True, "reduction": "sum"}, id="weighted-sum"),
    pytest.param((6, 33), {"reduction": "none", "inplace_backward": True}, id="none-inplace"),
    pytest.param((3, 17, 4), {"weight": True}, id="per-pixel"),
    pytest.param((17,), {"label_smoothing": 0.2}, id="unbatched"),
]


def _call(shape, options):
    options = dict(options)
    logits = _logits(shape, torch.bfloat16 if len(shape) == 2 else torch.float32)
    classes = shape[1] if len(shape) > 1 else shape[0]
    sample_shape = (shape[0], *shape[2:]) if len(shape) > 1 else ()
    labels = _labels(sample_shape, classes) if sample_shape else torch.tensor(3, device=DEVICE)
    if options.pop("weight", False):
        options["weight"] = torch.rand(classes, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    leaf = logits.detach().clone().requires_grad_()
    # in place, the logits are a layer's output (a leaf that requires grad is refused)
    inputs = leaf * 1.0 if options.get("inplace_backward") else leaf
    return leaf, inputs, labels, options


@pytest.mark.parametrize(("shape", "options"), CASES)
def test_unchecked_cross_entropy_never_waits(shape, options):
    leaf, inputs, labels, options = _call(shape, options)
    with _waits() as waits:
        loss = xt.cross_entropy(inputs, labels, backend="triton", check_labels=False, **options)
        loss.sum().backward()
    assert waits == []
    assert torch.isfinite(leaf.grad).all()  # the call did run (one ignored label, no bad one)


@pytest.mark.parametrize(("shape", "options"), CASES)
def test_checked_cross_entropy_waits_once_in_forward_and_never_in_backward(shape, options):
    _, inputs, labels, options = _call(shape, options)
    with _waits() as forward_waits:
        loss = xt.cross_entropy(inputs, labels, backend="triton", **options)
    with _waits() as backward_waits:
        loss.sum().backward()
    assert len(forward_waits) == 1, forward_waits  # the label check: one device reduction, read once
    assert backward_waits == []


def test_probability_targets_have_no_labels_to_wait_for():
    leaf = _logits((5, 12))
    target = torch.softmax(torch.randn(5, 12, generator=torch.Generator().manual_seed(3)), 1).to(DEVICE)
    with _waits() as waits:
        xt.cross_entropy(leaf, target, backend="triton", label_smoothing=0.1).backward()
    assert waits == []


def test_the_compiled_path_ops_never_wait():
    """What ``cross_entropy`` calls under torch.compile (its custom ops), run eagerly."""
    leaf = _logits((6, 40), torch.bfloat16)
    labels = _labels((6,), 40)
    options = LossOptions(label_smoothing=0.1, z_loss=1e-3, backend="triton")  # check_labels=True
    with _waits() as waits:
        _ops.cross_entropy(leaf, labels, None, options).backward()
    assert waits == []


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("check_labels", [False, True])
def test_linear_cross_entropy_waits_for_its_label_check_and_the_upstream_one(check_labels, reduction):
    """Forward: the label check alone. Backward of "mean"/"sum" (the gradients were computed in
    forward): one read of the upstream gradient, to skip scaling them when it is 1 (a wait that
    saves a pass over the weight gradient); "none" reads the per-row upstream on the device."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(10, 8, generator=generator).to(DEVICE).requires_grad_()
    w = torch.randn(24, 8, generator=generator).to(DEVICE).requires_grad_()
    labels = _labels((10,), 24)
    with _waits() as forward_waits:
        loss = xt.linear_cross_entropy(
            x, w, labels, backend="triton", chunk_size=4, label_smoothing=0.1, check_labels=check_labels,
            reduction=reduction,
        )
    with _waits() as backward_waits:
        loss.sum().backward()
    assert len(forward_waits) == (1 if check_labels else 0), forward_waits
    assert len(backward_waits) == (1 if reduction == "mean" else 0), backward_waits


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_log_probs_wait_once_for_the_label_check_and_never_in_backward(check):
    leaf = _logits((7, 30))
    labels = _labels((7,), 30)
    with _waits() as forward_waits:
        log_p, entropy = xt.log_probs(
            leaf, labels, backend="triton", return_entropy=True, temperature=0.7, check_labels=check
        )
    with _waits() as backward_waits:
        (log_p.sum() + entropy.sum()).backward()
    assert len(forward_waits) == (1 if check else 0), forward_waits
    assert backward_waits == []
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_linear_log_probs_wait_once_for_the_label_check_and_never_in_backward(check):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(9, 8, generator=generator).to(DEVICE).requires_grad_()
    w = torch.randn(20, 8, generator=generator).to(DEVICE).requires_grad_()
    labels = _labels((9,), 20)
    with _waits() as forward_waits:
        log_p, entropy = xt.linear_log_probs(
            x, w, labels, backend="triton", chunk_size=4, return_entropy=True, check_labels=check
        )
    with _waits() as backward_waits:
        (log_p.sum() - 0.1 * entropy.sum()).backward()
    assert len(forward_waits) == (1 if check else 0), forward_waits
    assert backward_waits == []
    assert torch.isfinite(w.grad).all()


def test_linear_log_probs_on_a_device_finds_its_idle_chunks_in_the_label_checks_one_wait(monkeypatch):
    """On a device the chunks backward skips (no valid row) come back with the label check's one
    read (it was a second wait, in backward, which CUDA graphs cannot capture). The device's
    path is taken here on the tensors the tests run on, as a device's would be."""
    import importlib

    from xentkit._labels import LabelError

    lp = importlib.import_module("xentkit.torch.log_probs")  # (the package's attribute is the function)

    monkeypatch.setattr(lp, "_reading_waits", lambda tensor: True)
    seen = []
    real = lp.logit_chunks
    monkeypatch.setattr(lp, "logit_chunks", lambda *a, skip=None, **k: seen.append(skip) or real(*a, skip=skip, **k))
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(10, 8, generator=generator).to(DEVICE).requires_grad_()
    w = torch.randn(20, 8, generator=generator).to(DEVICE).requires_grad_()
    labels = _labels((10,), 20)
    labels[4:8] = -100  # chunk 1 of 4 rows: nothing to differentiate
    log_p = xt.linear_log_probs(x, w, labels, backend="triton", chunk_size=4)
    reads = []  # the chunk flags' own read (a wait on a device) must not run in backward
    monkeypatch.setattr(lp, "idle_chunks", lambda *a, **k: reads.append(a) or (False,) * 3)
    with _waits() as backward_waits:
        log_p.sum().backward()
    assert backward_waits == [] and reads == []
    assert seen[-1] == (False, True, False)  # backward skipped the idle chunk, as forward found
    leaf_x, leaf_w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    logits = leaf_x @ leaf_w.T
    keep = labels != -100
    want = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0] * keep
    want.sum().backward()
    torch.testing.assert_close(log_p.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), leaf_x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), leaf_w.grad, rtol=1e-4, atol=1e-5)
    labels[9] = 20  # a bad label: the same error as the check of the other paths
    with pytest.raises(LabelError, match=r"^target has label 20 at position \(9,\) but linear_weight has 20 rows"):
        xt.linear_log_probs(x, w, labels, backend="triton", chunk_size=4)
    labels[9] = 3
    unchecked = xt.linear_log_probs(x, w, labels, backend="triton", chunk_size=4, check_labels=False)
    unchecked.sum().backward()
    assert seen[-1] is None  # unchecked on a device: no wait, so no chunk is known idle


# ---------------------------------------------------------------------------------------------
# CUDA graphs (a GPU only): what "no host synchronization inside the op" is for


def _graph_case():
    generator = torch.Generator(device="cuda").manual_seed(7)
    logits = torch.randn(64, 1000, device="cuda", generator=generator).bfloat16().requires_grad_()
    labels = torch.randint(0, 1000, (64,), device="cuda", generator=generator)
    labels[::9] = -100
    return logits, labels


def _expected(logits, labels):
    leaf = logits.detach().float().requires_grad_()
    loss = torch.nn.functional.cross_entropy(leaf, labels)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU (XENTKIT_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-4}])
def test_an_unchecked_call_is_captured_in_a_cuda_graph_and_replays_exactly(options):
    logits, labels = _graph_case()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (kernels compiled, allocator settled)
        for _ in range(3):
            logits.grad = None
            xt.cross_entropy(logits, labels, check_labels=False, **options).backward()
    torch.cuda.current_stream().wait_stream(side)
    eager = xt.cross_entropy(logits, labels, check_labels=False, **options)
    logits.grad = None
    eager.backward()
    eager_grad = logits.grad.clone()
    graph = torch.cuda.CUDAGraph()
    logits.grad = None
    with torch.cuda.graph(graph):
        loss = xt.cross_entropy(logits, labels, check_labels=False, **options)
        loss.backward()
    for _ in range(2):  # replays give the eager values, bit for bit
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(loss, eager.detach()) and torch.equal(logits.grad, eager_grad)
    if not options:
        want_loss, want_grad = _expected(logits, labels)
        torch.testing.assert_close(loss.float(), want_loss, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(logits.grad.float(), want_grad, rtol=2e-2, atol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU (XENTKIT_TEST_DEVICE=cuda)")
def test_compiled_with_cuda_graphs_keeps_the_kernels_and_their_values():
    """torch.compile(mode="reduce-overhead") captures the custom ops in CUDA graphs."""
    logits, labels = _graph_case()

    def step(z, y):
        return xt.cross_entropy(z, y, label_smoothing=0.1)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    eager_leaf = logits.detach().clone().requires_grad_()
    eager = step(eager_leaf, labels)
    eager.backward()
    for _ in range(3):  # the first calls record, the later ones replay
        leaf = logits.detach().clone().requires_grad_()
        loss = compiled(leaf, labels)
        loss.backward()
        # the same kernels; the compiler may order the reduction's float32 arithmetic otherwise,
        # which can move a bfloat16 result by one rounding
        torch.testing.assert_close(loss, eager.detach(), rtol=8e-3, atol=0)
        torch.testing.assert_close(leaf.grad, eager_leaf.grad, rtol=8e-3, atol=1e-6)
