"""xentkit.torch.linear_cross_entropy against the unfused computation F.linear → cross-entropy."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import xentkit  # noqa: E402
import xentkit.torch as xt  # noqa: E402
from xentkit.torch import _chunks  # noqa: E402

# (atol, rtol) per dtype, one table.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (5e-2, 5e-2),
}
REDUCTIONS = ("none", "mean", "sum")

OPTION_SETS = {
    "plain": {},
    "weight+ignore": {"use_weight": True, "ignored": 0.3},
    "smoothing+ignore": {"label_smoothing": 0.15, "ignored": 0.25},
    "z_loss+weight": {"z_loss": 1e-2, "use_weight": True, "ignored": 0.2},
    "softcap+all": {"softcap": 3.0, "z_loss": 5e-3, "label_smoothing": 0.1, "use_weight": True, "ignored": 0.2},
    "ignore_index=1": {"ignore_index": 1, "ignored": 0.3},
    "probabilities": {"probabilities": True, "label_smoothing": 0.1},
    "probabilities+extras": {"probabilities": True, "use_weight": True, "z_loss": 1e-2, "softcap": 4.0},
}


def assert_close(actual, expected, dtype=None):
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, check_dtype=False)


def make_problem(rows, features, classes, *, dtype=torch.float64, bias=False, seed=0, options=None):
    """Inputs requiring grad, a target, and the keyword options for both computations."""
    options = dict(options or {})
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(True)
    w = (torch.randn(classes, features, generator=generator, dtype=torch.float64) / features**0.5).to(dtype)
    w.requires_grad_(True)
    b = (0.3 * torch.randn(classes, generator=generator, dtype=torch.float64)).to(dtype).requires_grad_(True) if bias else None
    ignore_index = options.pop("ignore_index", -100)
    ignored = options.pop("ignored", 0.0)
    if options.pop("probabilities", False):
        target = torch.randn(rows, classes, generator=generator, dtype=torch.float64).softmax(1).to(dtype)
        kwargs = {}  # torch's linear_cross_entropy refuses ignore_index with probabilities
    else:
        target = torch.randint(0, classes, (rows,), generator=generator)
        mask = torch.rand(rows, generator=generator) < ignored
        target = target.masked_fill(mask, ignore_index)
        kwargs = {"ignore_index": ignore_index}
    if options.pop("use_weight", False):
        kwargs["weight"] = (torch.rand(classes, generator=generator, dtype=torch.float64) + 0.5).to(dtype)
    kwargs.update(options)
    return x, w, b, target, kwargs


def unfused(x, w, target, *, linear_bias=None, **kwargs):
    """The reference: materialized logits, then xentkit's (torch-checked) cross_entropy."""
    return xt.cross_entropy(F.linear(x, w, linear_bias), target, **kwargs)


def loss_and_grads(function, x, w, b, target, reduction, kwargs, seed=1):
    leaves = [tensor for tensor in (x, w, b) if tensor is not None]
    loss = function(x, w, target, linear_bias=b, reduction=reduction, **kwargs)
    if reduction == "none":
        generator = torch.Generator().manual_seed(seed)
        upstream = (torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5).to(loss.dtype)
    else:
        upstream = torch.tensor(1.7, dtype=loss.dtype)  # not 1: backward must scale
    grads = torch.autograd.grad(loss, leaves, upstream)
    return loss.detach(), grads


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])  # 7 does not divide 23 rows
@pytest.mark.parametrize("option_name", list(OPTION_SETS))
def test_matches_unfused_float64(reduction, bias, chunk_size, option_name):
    x, w, b, target, kwargs = make_problem(23, 6, 11, bias=bias, options=OPTION_SETS[option_name])
    loss, grads = loss_and_grads(
        lambda *a, **k: xt.linear_cross_entropy(*a, chunk_size=chunk_size, **k),
        x, w, b, target, reduction, kwargs,
    )
    expected_loss, expected_grads = loss_and_grads(unfused, x, w, b, target, reduction, kwargs)
    assert_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert_close(grad, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option_name", ["plain", "softcap+all", "probabilities"])
def test_matches_unfused_float32_default_chunks(reduction, option_name):
    # 300 rows × 2000 classes: 2.4 MB of logits → several chunks of the default size.
    x, w, b, target, kwargs = make_problem(
        300, 64, 2000, dtype=torch.float32, bias=True, options=OPTION_SETS[option_name]
    )
    assert _chunks.chunk_rows(300, 2000, 4, None) < 300
    loss, grads = loss_and_grads(xt.linear_cross_entropy, x, w, b, target, reduction, kwargs)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    kwargs64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    target64 = target.double() if target.is_floating_point() else target
    expected_loss, expected_grads = loss_and_grads(unfused, x64, w64, b64, target64, reduction, kwargs64)
    assert loss.dtype == torch.float32
    assert_close(loss, expected_loss, torch.float32)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert grad.dtype == torch.float32
        assert_close(grad, expected, torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option_name", ["plain", "weight+ignore", "smoothing+ignore", "probabilities"])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.filterwarnings("ignore:linear_cross_entropy:UserWarning")  # torch: options ignored
def test_matches_torch_linear_cross_entropy(reduction, option_name, chunked):
    x, w, b, target, kwargs = make_problem(19, 5, 7, bias=True, options=OPTION_SETS[option_name])
    loss, grads = loss_and_grads(
        lambda *a, **k: xt.linear_cross_entropy(*a, chunk_size=4, **k), x, w, b, target, reduction, kwargs
    )
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4) if chunked else None
    expected_loss, expected_grads = loss_and_grads(
        lambda *a, **k: F.linear_cross_entropy(*a, options=options, **k), x, w, b, target, reduction, kwargs
    )
    assert_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert_close(grad, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option_name", ["plain", "weight+ignore", "softcap+all", "probabilities+extras"])
def test_gradcheck(reduction, option_name):
    x, w, b, target, kwargs = make_problem(5, 3, 4, bias=True, seed=2, options=OPTION_SETS[option_name])
    assert torch.autograd.gradcheck(
        lambda x, w, b: xt.linear_cross_entropy(
            x, w, target, linear_bias=b, reduction=reduction, chunk_size=2, **kwargs
        ),
        (x, w, b),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unbatched_input(reduction):
    x, w, b, target, kwargs = make_problem(1, 4, 6, bias=True)
    x1, target1 = x[0].detach().requires_grad_(True), target[0]
    loss, grads = loss_and_grads(xt.linear_cross_entropy, x1, w, b, target1, reduction, kwargs)
    expected_loss, expected_grads = loss_and_grads(
        lambda *a, **k: F.linear_cross_entropy(*a, **k), x1, w, b, target1, reduction, kwargs
    )
    assert loss.shape == expected_loss.shape == ()
    assert_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert_close(grad, expected)


@pytest.mark.parametrize(
    "requires", [(True, False, False), (False, True, False), (False, False, True), (True, True, False)]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_only_the_requested_gradients(requires, reduction):
    x, w, b, target, _kwargs = make_problem(9, 4, 5, bias=True)
    for tensor, flag in zip((x, w, b), requires, strict=True):
        tensor.requires_grad_(flag)
    loss = xt.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, chunk_size=4)
    loss.sum().backward()
    expected = unfused(x, w, target, linear_bias=b, reduction=reduction)
    wanted = [t for t in (x, w, b) if t.requires_grad]
    grads = [t.grad.clone() for t in wanted]
    for tensor in wanted:
        tensor.grad = None
    expected.sum().backward()
    for grad, tensor in zip(grads, wanted, strict=True):
        assert_close(grad, tensor.grad)
    for tensor, flag in zip((x, w, b), requires, strict=True):
        assert (tensor.grad is not None) == flag


def test_forward_only_does_no_gradient_work(monkeypatch):
    x, w, b, target, _kwargs = make_problem(9, 4, 5, bias=True)

    def fail(*args, **kwargs):
        raise AssertionError("gradient computed although nothing requires it")

    monkeypatch.setattr(xentkit, "cross_entropy_and_grad", fail)
    expected = unfused(x.detach(), w.detach(), target, linear_bias=b.detach())
    with torch.no_grad():
        assert_close(xt.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=4), expected)
    loss = xt.linear_cross_entropy(x.detach(), w.detach(), target, linear_bias=b.detach(), chunk_size=4)
    assert loss.grad_fn is None
    assert_close(loss, expected)


def test_mean_over_nothing_is_zero_not_nan():
    x, w, b, target, _kwargs = make_problem(6, 4, 5, bias=True, options={"z_loss": 0.1})
    ignored = torch.full_like(target, -100)
    loss = xt.linear_cross_entropy(x, w, ignored, linear_bias=b, z_loss=0.1)
    loss.backward()
    assert loss.item() == 0.0
    for tensor in (x, w, b):
        assert torch.count_nonzero(tensor.grad) == 0


def test_retain_graph_then_backward_again():
    x, w, b, target, _kwargs = make_problem(10, 4, 5, bias=True)
    for reduction in REDUCTIONS:
        results = []
        for function in (xt.linear_cross_entropy, unfused):
            x.grad = w.grad = b.grad = None
            loss = function(x, w, target, linear_bias=b, reduction=reduction).sum()
            loss.backward(retain_graph=True)
            (0.5 * loss).backward()
            results.append([t.grad.clone() for t in (x, w, b)])
        for grad, expected in zip(*results, strict=True):
            assert_close(grad, expected)


def test_second_backward_without_retain_graph_raises_clearly():
    x, w, _b, target, _kwargs = make_problem(10, 4, 5)
    loss = xt.linear_cross_entropy(x, w, target)
    loss.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_raises(reduction):
    x, w, _b, target, _kwargs = make_problem(10, 4, 5)
    loss = xt.linear_cross_entropy(x, w, target, reduction=reduction).sum()
    (grad,) = torch.autograd.grad(loss, w, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        (loss + grad.square().sum()).backward()


def test_weight_changed_after_forward_gives_the_forward_gradient():
    """"mean"/"sum" hold gradients computed at the forward values: correct for the loss returned."""
    x, w, _b, target, _kwargs = make_problem(10, 4, 5)
    expected_loss, expected_grads = loss_and_grads(unfused, x, w, None, target, "mean", {})
    loss = xt.linear_cross_entropy(x, w, target)
    with torch.no_grad():
        w.add_(1.0)  # e.g. an optimizer step before backward
        x.mul_(3.0)
    grads = torch.autograd.grad(1.7 * loss, (x, w))
    with torch.no_grad():
        w.sub_(1.0)
        x.div_(3.0)
    assert_close(loss.detach(), expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert_close(grad, expected)


def test_weight_changed_after_forward_with_reduction_none_raises_version_error():
    """"none" recomputes in backward from the saved inputs, which autograd version-checks."""
    x, w, _b, target, _kwargs = make_problem(10, 4, 5)
    loss = xt.linear_cross_entropy(x, w, target, reduction="none")
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


def test_inputs_are_not_written():
    x, w, b, target, _kwargs = make_problem(10, 4, 5, bias=True)
    before = [t.detach().clone() for t in (x, w, b)]
    versions = [t._version for t in (x, w, b)]
    xt.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=3).backward()
    for tensor, original, version in zip((x, w, b), before, versions, strict=True):
        assert torch.equal(tensor.detach(), original) and tensor._version == version


def test_non_contiguous_inputs():
    x, w, b, target, _kwargs = make_problem(12, 4, 6, bias=True)
    x_t = x.detach().t().contiguous().t().requires_grad_(True)  # column-major (12, 4)
    w_t = w.detach().t().contiguous().t().requires_grad_(True)
    assert not x_t.is_contiguous() and not w_t.is_contiguous()
    loss, grads = loss_and_grads(xt.linear_cross_entropy, x_t, w_t, b, target, "sum", {})
    expected_loss, expected_grads = loss_and_grads(unfused, x, w, b, target, "sum", {})
    assert_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert_close(grad, expected)


# ---------------------------------------------------------------------------------------------
# Fallbacks, chunk sizing, module, errors


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_half_precision_takes_the_chunks_widened(monkeypatch, dtype, reduction):
    """bfloat16 layers on the CPU run the chunks, each chunk's logits widened to float32 for the
    kernels and its gradient rounded back for the matmuls (they had gone to torch's ops, which
    held the whole logits and a float32 copy: 5 and 6 times the logits' bytes). The loss is
    float32, the float64 loss of the layer's own (bfloat16) logits within float32 rounding; the
    gradients are torch's within bfloat16 rounding."""
    from xentkit.torch import _linear_numba

    chunks = []
    real = _linear_numba.chunked_pass
    monkeypatch.setattr(_linear_numba, "chunked_pass", lambda *a, **k: chunks.append(a[5].chunk_size) or real(*a, **k))
    x, w, b, target, kwargs = make_problem(40, 8, 300, dtype=dtype, bias=True, options={"ignored": 0.2, "label_smoothing": 0.1})
    kwargs["chunk_size"] = 16  # (three chunks, the last ragged)
    loss, grads = loss_and_grads(xt.linear_cross_entropy, x, w, b, target, reduction, kwargs)
    assert chunks and set(chunks) == {16}
    assert loss.dtype == torch.float32 and all(grad.dtype == dtype for grad in grads)
    logits = F.linear(x, w, b).detach().double()  # the layer's own half-precision logits
    exact = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), exact, rtol=2e-6, atol=1e-6)
    reference = {name: value for name, value in kwargs.items() if name != "chunk_size"}
    wide = [tensor.detach().double().requires_grad_() for tensor in (x, w, b)]
    _, expected_grads = loss_and_grads(
        lambda *a, **k: F.linear_cross_entropy(*a, **k), *wide[:2], wide[2], target, reduction, reference
    )
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert_close(grad, expected.to(dtype), dtype=torch.bfloat16)


def test_float16_stays_on_torch_ops_so_a_loss_scaler_keeps_small_gradients(monkeypatch):
    """float16 layers on the CPU keep torch's ops: the chunks compute the gradients in forward and
    round them to the layer's dtype there, before a loss scaler's factor reaches them, and float16
    flushes what the factor would keep (a review: thousands of weight-gradient entries 0 under
    GradScaler's 65536, none on torch's ops)."""
    from xentkit.torch import _linear_numba

    monkeypatch.setattr(_linear_numba, "chunked_pass", lambda *a, **k: pytest.fail("float16 ran the chunks"))
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 16, generator=generator) * 0.1).half().requires_grad_(True)
    w = (torch.randn(4000, 16, generator=generator) * 0.1).half().requires_grad_(True)
    target = torch.randint(0, 4000, (256,), generator=generator)
    (xt.linear_cross_entropy(x, w, target) * 65536.0).backward()
    reference_x, reference_w = (t.detach().clone().requires_grad_(True) for t in (x, w))
    (F.cross_entropy(F.linear(reference_x, reference_w).float(), target) * 65536.0).backward()
    assert int((w.grad == 0).sum()) == int((reference_w.grad == 0).sum())
    assert_close(w.grad, reference_w.grad, dtype=torch.bfloat16)


def test_meta_device_goes_to_torch_ops():
    x = torch.empty(8, 4, device="meta", requires_grad=True)
    w = torch.empty(10, 4, device="meta", requires_grad=True)
    target = torch.empty(8, dtype=torch.long, device="meta")
    assert xt.linear_cross_entropy(x, w, target, reduction="none", z_loss=0.1).shape == (8,)
    assert xt.linear_cross_entropy(x, w, target).device.type == "meta"


def test_multidimensional_linear_weight_goes_to_torch_ops():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (5, 3), generator=generator)
    loss = xt.linear_cross_entropy(x, w, target)
    assert_close(loss, F.linear_cross_entropy(x, w, target))


def test_chunk_rows_stay_within_the_budget():
    """The one chunk-sizing rule (``_chunks.chunk_rows``): off CUDA within the budget's fraction
    and bytes, or at the floor; on CUDA the largest power of two of rows within GPU_CHUNK_BYTES."""
    budget = _chunks.CPU_CHUNKS
    for rows, classes, itemsize in [(4096, 32000, 4), (100_000, 128_000, 4), (4096, 32000, 8), (64, 1000, 4), (10**6, 50, 4)]:
        chunk = _chunks.chunk_rows(rows, classes, itemsize, None)
        chunk_bytes = chunk * classes * itemsize
        assert 1 <= chunk <= rows
        within_fraction = chunk <= -(-rows // budget.fraction)
        within_budget = chunk_bytes <= budget.budget_bytes
        floor = chunk_bytes <= budget.floor_bytes + classes * itemsize
        assert (within_fraction and within_budget) or floor
        on_gpu = _chunks.chunk_rows(rows, classes, itemsize, None, device_type="cuda")
        assert on_gpu == rows or (
            on_gpu & (on_gpu - 1) == 0 and on_gpu * classes * itemsize <= _chunks.GPU_CHUNK_BYTES < 2 * on_gpu * classes * itemsize
        )
    assert _chunks.chunk_rows(100, 10, 4, 7) == 7
    assert _chunks.chunk_rows(5, 10, 4, 64) == 5
    assert _chunks.chunk_rows(5, 10, 4, 64, device_type="cuda") == 5


def test_module_matches_torch_module_and_trains_the_same():
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 9, (40,), generator=generator)
    target[::7] = -100
    parameters = []
    for module_class in (xt.LinearCrossEntropyLoss, torch.nn.LinearCrossEntropyLoss):
        torch.manual_seed(0)
        options = {"chunk_size": 16} if module_class is xt.LinearCrossEntropyLoss else {}
        head = module_class(6, 9, bias=True, dtype=torch.float64, label_smoothing=0.1, **options)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.3, momentum=0.9)
        for _ in range(6):
            optimizer.zero_grad()
            head(inputs, target).backward()
            optimizer.step()
        parameters.append(head.state_dict())
    assert parameters[0].keys() == parameters[1].keys()
    for key in parameters[0]:
        assert_close(parameters[0][key], parameters[1][key])
    assert "chunk_size=16" in repr(xt.LinearCrossEntropyLoss(6, 9, chunk_size=16))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"target": torch.tensor([0, 9, 1])}, ValueError, "label 9 at position"),
        ({"target": torch.tensor([0, 1])}, ValueError, r"target must have shape \(3,\) \(class indices\) or the logits. shape"),
        ({"linear_bias": torch.zeros(4, dtype=torch.float64)}, ValueError, "linear_bias must have shape"),
        ({"weight": torch.ones(3, dtype=torch.float64)}, ValueError, "weight must have shape"),
        ({"input": torch.zeros(3, 7, dtype=torch.float64)}, ValueError, "in_features=2"),
        ({"input": torch.zeros(2, 3, 2, dtype=torch.float64)}, ValueError, "flatten leading dimensions"),
        (  # (a review: the classes were read as a batch of 5 rows of 3 classes)
            {"input": torch.zeros(2, dtype=torch.float64), "linear_weight": torch.zeros(5, 3, 2, dtype=torch.float64),
             "target": torch.tensor([0, 1, 2, 0, 1])},
            ValueError, r"^input must have shape \(N, in_features\) with a K-dimensional linear_weight \(5, 3, 2\)",
        ),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"chunk_size": -1}, ValueError, "chunk_size must be"),
    ],
)
def test_errors_name_the_argument(change, error, message):
    arguments = {
        "input": torch.zeros(3, 2, dtype=torch.float64),
        "linear_weight": torch.zeros(5, 2, dtype=torch.float64),
        "target": torch.tensor([0, 1, 2]),
    }
    arguments.update(change)
    with pytest.raises(error, match=message):
        xt.linear_cross_entropy(**arguments)


def test_z_loss_survives_when_every_target_weight_is_zero():
    """The main term averages nothing (0), the z term still averages over non-ignored rows."""
    import xentkit.torch as xt

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    target = torch.tensor([0, 1, 0, 1])
    class_weight = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    loss = xt.linear_cross_entropy(x, w, target, weight=class_weight, z_loss=0.1, label_smoothing=0.2)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    expected = xt.cross_entropy(x2 @ w2.T, target, weight=class_weight, z_loss=0.1, label_smoothing=0.2)
    expected.backward()
    assert expected.item() > 0
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"input": torch.zeros(3, 4, dtype=torch.int64)}, TypeError, r"input must be a floating-point tensor, got a torch tensor of dtype int64 and shape \(3, 4\)"),
        ({"bias": torch.zeros(4)}, ValueError, r"linear_bias(_shard)? must have shape \(5,\), got \(4,\)"),
        ({"weight": torch.zeros(5, 3)}, ValueError, r"input must have linear_weight(_shard)?'s in_features=3"),
        ({"weight": torch.zeros(5, 4, dtype=torch.float64)}, TypeError,
         r"input, linear_weight(_shard)? and linear_bias(_shard)? must share one dtype, got input float32, linear_weight(_shard)? float64"),
        ({"weight": torch.zeros(5, 4, device="meta")}, ValueError,
         r"must be on one device, got input on cpu, linear_weight(_shard)? on meta"),
    ],
)
@pytest.mark.parametrize("form", ["linear_cross_entropy", "linear_log_probs", "vocab_parallel_linear_cross_entropy",
                                  "vocab_parallel_linear_log_probs"])
def test_every_fused_linear_form_checks_the_linear_layer_alike(form, change, error, message):
    """One rule, one set of messages (``xentkit.torch._linear_checks``) for the linear layer of
    every fused form; the vocabulary-parallel forms name their shards."""
    from xentkit.torch import distributed

    tensors = {"input": torch.zeros(3, 4), "weight": torch.zeros(5, 4), "bias": None} | change
    function = getattr(xt, form, None) or getattr(distributed, form)
    weight_name, bias_name = (
        ("linear_weight_shard", "linear_bias_shard") if form.startswith("vocab") else ("linear_weight", "linear_bias")
    )
    arguments = {"input": tensors["input"], weight_name: tensors["weight"], "target": torch.tensor([0, 1, 2])}
    if tensors["bias"] is not None:
        arguments[bias_name] = tensors["bias"]
    with pytest.raises(error, match=message):
        function(**arguments)


def test_the_linear_layer_messages_are_written_once():
    from pathlib import Path

    source = Path(xentkit.__file__).parent
    for fragment in ("must share one dtype", "must be on one device", "as its last dimension", "must have at least one row"):
        homes = sorted(str(path.relative_to(source)) for path in source.rglob("*.py") if fragment in path.read_text())
        assert homes == ["torch/_linear_checks.py"], (fragment, homes)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_inputs_under_another_default_device(reduction):
    """The fused form's buffers are made on its inputs' device, not the default one (a
    ``torch.set_default_device("cuda")`` program passing CPU tensors)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=generator, requires_grad=True)
    w = torch.randn(10, 8, generator=generator, requires_grad=True)
    y = torch.randint(0, 10, (4,), generator=generator)
    want = torch.nn.functional.cross_entropy(x @ w.t(), y, reduction=reduction)
    with torch.device("meta"):  # stands in for "cuda"
        got = xt.linear_cross_entropy(x, w, y, reduction=reduction)
        got.sum().backward()
    assert got.device.type == "cpu" and x.grad.device.type == "cpu"
    torch.testing.assert_close(got, want.detach())
