"""``xentkit.torch.log_probs`` / ``linear_log_probs`` where no autograd Function around the kernels
can run: under ``torch.compile(fullgraph=True)`` (no graph break) and under torch.func (vmap,
per-sample gradients); and ``check_labels=False``, which makes a bad target's log-probability
NaN instead of raising where the check would wait for the device."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import xentkit.torch as xt  # noqa: E402


def _oracle(logits: torch.Tensor, target: torch.Tensor, temperature: float, ignore_index: int = -100):
    """(log p(y), H, lse) from float64 torch ops on the materialized logits, 0 on ignored rows."""
    z = logits.double() / temperature
    log_p = torch.log_softmax(z, dim=-1)
    valid = target != ignore_index
    p = log_p.exp()
    entropy = -(p * log_p.masked_fill(p == 0, 0.0)).sum(-1)
    picked = log_p.gather(-1, torch.where(valid, target, 0)[..., None])[..., 0]
    zero = torch.zeros((), dtype=torch.float64)
    return tuple(torch.where(valid, value, zero) for value in (picked, entropy, torch.logsumexp(z, -1)))


def _problem(dtype, rows=6, classes=11, seed=3):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=generator, dtype=torch.float64) * 3).to(dtype)
    logits[2, 4] = -torch.inf  # a masked class (not the target)
    target = torch.randint(0, classes, (rows,), generator=generator)
    target[2] = 7
    target[1] = -100
    return logits.requires_grad_(), target


def _step(logits, target):
    log_p, entropy, lse = xt.log_probs(logits, target, temperature=0.8, return_entropy=True, return_lse=True)
    return (log_p * 1.5).sum() - 0.3 * entropy.sum() + 0.2 * lse.sum(), (log_p, entropy, lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_probs_compile_with_fullgraph_and_match_eager_and_float64(dtype):
    logits, target = _problem(dtype)
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    total, outputs = compiled(logits, target)
    (grad,) = torch.autograd.grad(total, logits)
    eager_total, eager_outputs = _step(logits, target)
    (eager_grad,) = torch.autograd.grad(eager_total, logits)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for got, eager, want in zip(outputs, eager_outputs, _oracle(logits.detach(), target, 0.8), strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, eager, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad, eager_grad, rtol=tolerance, atol=tolerance)
    assert grad[1].abs().sum() == 0  # the ignored row
    assert grad[2, 4] == 0 and torch.isfinite(grad).all()  # the masked class


def test_linear_log_probs_compile_with_fullgraph_and_match_eager():
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(7, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 12, -100, 5, 5, 1, 3])

    def step(x, w, b, target):
        log_p, entropy = xt.linear_log_probs(
            x, w, target, linear_bias=b, temperature=1.3, chunk_size=3, return_entropy=True
        )
        return (log_p - 0.1 * entropy).sum(), log_p

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    total, log_p = compiled(x, w, b, target)
    grads = torch.autograd.grad(total, (x, w, b))
    eager_total, eager_log_p = step(x, w, b, target)
    eager_grads = torch.autograd.grad(eager_total, (x, w, b))
    torch.testing.assert_close(log_p, eager_log_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads, eager_grads, rtol=1e-10, atol=1e-12)


def test_log_probs_under_vmap_and_per_sample_gradients():
    logits, target = _problem(torch.float64, rows=12)
    batched = logits.detach().reshape(3, 4, 11)
    target = target.reshape(3, 4)
    got = torch.vmap(lambda z, y: xt.log_probs(z, y, temperature=0.8, return_entropy=True))(batched, target)
    want = xt.log_probs(batched, target, temperature=0.8, return_entropy=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    def loss(z, y):
        return xt.log_probs(z, y, temperature=0.8).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss))(batched, target)
    leaf = batched.clone().requires_grad_()
    loss(leaf, target).backward()
    torch.testing.assert_close(per_sample, leaf.grad, rtol=1e-12, atol=1e-12)


def test_traced_log_probs_have_a_second_derivative():
    """Under torch.func the outputs are plain torch ops: the gradient of a gradient penalty
    matches float64 torch's (the eager kernels' path raises there instead)."""
    logits, target = _problem(torch.float64)
    target[2] = 3
    leaf = logits.detach().clone()
    leaf[2, 4] = 0.5  # finite logits: the oracle's second derivative is NaN at −inf

    def penalty(log_probs):
        return torch.func.grad(lambda z: log_probs(z).sum())

    got = torch.func.grad(lambda z: penalty(lambda z: xt.log_probs(z, target, temperature=0.8))(z).pow(2).sum())(leaf)
    want = torch.func.grad(lambda z: penalty(lambda z: _oracle(z, target, 0.8)[0])(z).pow(2).sum())(leaf)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "compiled"])
def test_unchecked_bad_target_makes_its_log_probability_nan(traced):
    logits, target = _problem(torch.float32)
    target[4] = 11  # == classes: out of range
    target[5] = -3

    def step(z, y):
        log_p, entropy = xt.log_probs(z, y, return_entropy=True, backend="torch", check_labels=False)
        return (log_p.sum() + entropy.sum()), log_p, entropy

    run = torch.compile(step, fullgraph=True, backend="aot_eager") if traced else step
    total, log_p, entropy = run(logits, target)
    (grad,) = torch.autograd.grad(total, logits)
    assert torch.isnan(log_p[4:]).all() and torch.isfinite(log_p[:4]).all() and torch.isnan(total)
    good = target.clone()
    good[4:] = 0
    want_log_p, want_entropy, _ = _oracle(logits.detach(), good, 1.0)
    torch.testing.assert_close(entropy.double(), want_entropy, rtol=1e-5, atol=1e-5)  # label-free
    torch.testing.assert_close(log_p[:4].double(), want_log_p[:4], rtol=1e-5, atol=1e-5)
    assert torch.isnan(grad[4:]).all() and torch.isfinite(grad[:4]).all()


def test_check_labels_false_still_checks_cpu_kernels_and_flag_type():
    logits, target = _problem(torch.float32)
    target[0] = 11
    # the Numba kernels' CPU tensors are always checked (it costs no wait there)
    with pytest.raises(ValueError, match=r"label 11 at position \(0,\)"):
        xt.log_probs(logits, target, check_labels=False)
    hidden, head = torch.randn(6, 4), torch.randn(11, 4)
    with pytest.raises(ValueError, match=r"label 11 at position \(0,\)"):
        xt.linear_log_probs(hidden, head, target, check_labels=False)
    with pytest.raises(ValueError, match=r"label 11 at position \(0,\)"):
        xt.log_probs(logits, target, backend="torch")  # checked by default on every path
    with pytest.raises(TypeError, match="check_labels must be a bool"):
        xt.log_probs(logits, target, check_labels=1)
    out = xt.linear_log_probs(hidden, head, target, backend="torch", check_labels=False)
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_an_ignored_rows_nan_or_inf_logits_give_it_no_gradient_when_traced(poison):
    """As on the kernels: padded positions (a fully masked attention row gives NaN logits) get
    gradient 0, not 0·∞ = NaN."""
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logits[1] = poison
    target = torch.tensor([0, -100, 3])

    def total(z):
        log_p, entropy = xt.log_probs(z, target, return_entropy=True)
        return log_p.sum() + entropy.sum()

    eager_leaf = logits.clone().requires_grad_()
    total(eager_leaf).backward()
    traced = torch.func.grad(total)(logits)
    compiled_leaf = logits.clone().requires_grad_()
    torch.compile(total, fullgraph=True, backend="aot_eager")(compiled_leaf).backward()
    for grad in (traced, compiled_leaf.grad):
        assert (grad[1] == 0).all()
        torch.testing.assert_close(grad, eager_leaf.grad, rtol=1e-12, atol=1e-12)


def test_backend_triton_says_it_cannot_run_traced():
    logits, target = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call.*torch\.func"):
        torch.func.grad(lambda z: xt.log_probs(z, target, backend="triton").sum())(logits)
    # (outside torch.compile the message names torch.func alone: compiled, the Triton path runs)
    with pytest.raises(ValueError, match=r"kernels do not run under torch\.func transforms \(vmap, grad\); "):
        torch.vmap(lambda z, y: xt.log_probs(z, y, backend="triton"))(logits[None], target[None])


def _linear_case(dtype=torch.float64, seed=11):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 6, generator=generator, dtype=dtype, requires_grad=True)
    w = torch.randn(17, 6, generator=generator, dtype=dtype, requires_grad=True)
    b = torch.randn(17, generator=generator, dtype=dtype, requires_grad=True)
    target = torch.randint(0, 17, (10,), generator=generator)
    target[4] = -100
    return x, w, b, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_linear_log_probs_keep_the_chunks(dtype):
    """Under torch.compile linear_log_probs is one custom op (the chunks, never the [N, V]
    logits), equal to eager for every output and gradient."""
    from torch._dynamo.testing import CompileCounterWithBackend

    x, w, b, target = _linear_case(dtype)
    g, h = torch.randn(10, dtype=dtype), torch.randn(10, dtype=dtype)

    def step(x, w, b, target):
        log_p, entropy, lse = xt.linear_log_probs(
            x, w, target, linear_bias=b, temperature=0.7, chunk_size=4, return_entropy=True, return_lse=True
        )
        return (log_p * g).sum() + (entropy * h).sum() + 0.3 * lse.sum(), log_p

    counter = CompileCounterWithBackend("inductor")
    total, log_p = torch.compile(step, fullgraph=True, backend=counter)(x, w, b, target)
    grads = torch.autograd.grad(total, (x, w, b))
    eager_total, eager_log_p = step(x, w, b, target)
    eager_grads = torch.autograd.grad(eager_total, (x, w, b))
    targets = {str(node.target) for graph in counter.graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert counter.frame_count == 1 and "xentkit.linear_log_probs.default" in targets
    assert not any("linear" in name and "xentkit" not in name for name in targets)  # no whole logits
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(log_p, eager_log_p, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grads, eager_grads, rtol=tolerance, atol=tolerance)


def test_compiled_linear_log_probs_raise_on_a_bad_target_and_unchecked_make_it_nan():
    x, w, b, target = _linear_case()
    target[0] = 17
    with pytest.raises(ValueError, match="label 17 at position"):
        xt.linear_log_probs(x, w, target, linear_bias=b)
    checked = torch.compile(lambda *a: xt.linear_log_probs(a[0], a[1], a[3], linear_bias=a[2]), fullgraph=True)
    with pytest.raises(ValueError, match=r"label 17 at position \(0,\) but linear_weight has"):
        checked(x, w, b, target)  # (on the CPU: checked by an op in the compiled graph, as eager)
    log_p = torch.compile(
        lambda *a: xt.linear_log_probs(a[0], a[1], a[3], linear_bias=a[2], check_labels=False), fullgraph=True
    )(x, w, b, target)
    assert log_p[0].isnan() and torch.isfinite(log_p[1:]).all()


def test_the_linear_log_prob_ops_pass_torchs_opcheck():
    from xentkit.torch import _log_prob_ops

    x, w, b, target = _linear_case()
    valid = target != -100
    arguments = (x, w, b, target, valid, 0.7, 4, "auto")
    torch.library.opcheck(_log_prob_ops.linear_log_probs_op, arguments)
    _, _, _, m, s, _, _ = _log_prob_ops.linear_log_probs_op(x.detach(), w.detach(), b.detach(), target, valid, 0.7, 4, "auto")
    coefficients = tuple(torch.randn(10, dtype=torch.float64) for _ in range(3))
    torch.library.opcheck(
        _log_prob_ops.linear_log_probs_backward,
        (x.detach(), w.detach(), b.detach(), target, valid, m, s, *coefficients, 0.7, 4, "auto", True, True, True),
    )


@pytest.mark.parametrize("path", ["torch ops", "torch.func", "bfloat16 on the CPU"])
def test_the_torch_ops_path_shifts_before_it_scales(path):
    """Logits near +1e4 at T = 0.7 on the torch-ops path (``backend="torch"``, what torch.func
    traces, and CPU bfloat16, which the Numba kernels do not take): d = (x − max x)·c, with m and
    z_y kept in float64, as the kernels. Scaling first (z = x·c in float32) left half an ulp of
    1.4e4 in every exponent: log p 3.5e-4, the gradient 2.6e-4 off (ad hoc, before)."""
    generator = torch.Generator().manual_seed(5)
    dtype = torch.bfloat16 if path == "bfloat16 on the CPU" else torch.float32
    offset = 300.0 if dtype == torch.bfloat16 else 1e4  # (bfloat16 holds 300 ± a few units to 2)
    logits = (torch.randn(4, 300, generator=generator) * 2 + offset).to(dtype)
    target = torch.randint(0, 300, (4,), generator=generator)
    backend = "torch" if path == "torch ops" else "auto"

    def loss(x):
        log_p, entropy, lse = xt.log_probs(x, target, temperature=0.7, return_entropy=True, return_lse=True,
                                           backend=backend)
        return (1.5 * log_p - 0.3 * entropy + 0.2 * (lse - offset / 0.7)).sum(), (log_p, entropy)

    x = logits.detach()
    if path == "torch.func":
        grad, (log_p, entropy) = torch.func.grad(loss, has_aux=True)(x)
    else:
        x = x.clone().requires_grad_()
        total, (log_p, entropy) = loss(x)
        total.backward()
        grad = x.grad
    wide = logits.double().requires_grad_()
    want_log_p, want_entropy, want_lse = _oracle(wide, target, 0.7)
    (1.5 * want_log_p - 0.3 * want_entropy + 0.2 * (want_lse - offset / 0.7)).sum().backward()
    torch.testing.assert_close(log_p.double(), want_log_p.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy.double(), want_entropy.detach(), rtol=1e-6, atol=1e-6)
    scale = wide.grad.abs().max().item()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # (bfloat16: the gradient's own rounding)
    torch.testing.assert_close(grad.double(), wide.grad, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_traced_log_probs_keep_a_confident_tokens_digits(dtype):
    """The traced torch ops count the max's own terms apart, as the kernels do (expm1 at the max:
    0 in the sum, exp's derivative): a confident token's log p and entropy keep their digits where
    e = s − 1 of the plain sum gave 0 (float64 at a gap of 40; float32 at a gap of 20, below its
    6e-8), a tie at the max too. The gradient stays the formula's."""
    gap = 40.0 if dtype == torch.float64 else 20.0
    logits = torch.full((3, 5), -gap, dtype=dtype)
    logits[0, 1] = 0.0
    logits[1, 2] = logits[1, 4] = 0.0  # a tie: log p = −log 2 − (a tiny excess)
    logits[2] = torch.tensor([0.0, -3.0, -1.0, -gap, 2.0], dtype=dtype)
    target = torch.tensor([1, 2, 4])

    def step(z):
        return xt.log_probs(z, target, temperature=0.9, return_entropy=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaf = logits.clone().requires_grad_()
    log_p, entropy = compiled(leaf)
    (log_p.sum() + entropy.sum()).backward()
    # row 0 exactly: e = 4·exp(d), d = −gap/T, log p = −log1p(e), H = log1p(e) − 4·exp(d)·d/(1 + e)
    d = torch.tensor(-gap / 0.9, dtype=torch.float64)
    excess = 4 * torch.exp(d)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-13  # (float32: the rounding of d)
    torch.testing.assert_close(log_p.double()[0], -torch.log1p(excess), rtol=tolerance, atol=0)  # (was 0)
    torch.testing.assert_close(entropy.double()[0], torch.log1p(excess) - excess * d / (1 + excess), rtol=tolerance, atol=0)
    torch.testing.assert_close(log_p.double()[2], _oracle(logits.double(), target, 0.9)[0][2], rtol=tolerance, atol=0)
    eager = logits.clone().requires_grad_()
    eager_log_p, eager_entropy = step(eager)
    (eager_log_p.sum() + eager_entropy.sum()).backward()
    # (autograd's target entry is c − c/s, rounded in the logits' dtype: float32's ulp of 1)
    atol = 3e-7 if dtype == torch.float32 else 1e-15
    torch.testing.assert_close(leaf.grad, eager.grad, rtol=tolerance, atol=atol)
