"""xentkit.torch where a review found it short of a drop-in for torch: forward-mode AD, bool
element weights for binary cross-entropy, 0-d tensors for float options, and a temperature whose
reciprocal overflows (the log-probabilities' kernels scale by 1/T)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.autograd.forward_ad as fwAD  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import xentkit.torch as xt  # noqa: E402

# 4 × 20000 logits: beyond SMALL_MAX_LOGITS, on xentkit's kernels (and autograd Functions)
N, C = 4, 20000


def _forward_ad_cases():
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, C, (N,), generator=generator)
    q = torch.softmax(torch.randn(N, C, generator=generator, dtype=torch.float64), -1)
    w = torch.rand(C, generator=generator, dtype=torch.float64) + 0.5
    return [
        ("labels", lambda z: xt.cross_entropy(z, y, w, label_smoothing=0.1),
         lambda z: F.cross_entropy(z, y, w, label_smoothing=0.1)),
        ("probabilities", lambda z: xt.cross_entropy(z, q), lambda z: F.cross_entropy(z, q)),
        ("nll_loss", lambda z: xt.nll_loss(z.log_softmax(1), y), lambda z: F.nll_loss(z.log_softmax(1), y)),
        ("bce", lambda z: xt.binary_cross_entropy_with_logits(z, q), lambda z: F.binary_cross_entropy_with_logits(z, q)),
        ("bce small", lambda z: xt.binary_cross_entropy_with_logits(z[:, :5], q[:, :5]),
         lambda z: F.binary_cross_entropy_with_logits(z[:, :5], q[:, :5])),
        ("log_probs", lambda z: xt.log_probs(z, y, temperature=0.7).sum(),
         lambda z: (z / 0.7).log_softmax(1).gather(1, y[:, None]).sum()),
    ]


@pytest.mark.parametrize(("name", "ours", "theirs"), _forward_ad_cases(), ids=[c[0] for c in _forward_ad_cases()])
def test_forward_mode_ad_gives_torchs_tangent(name, ours, theirs):
    """The autograd Functions have no jvp: inside a dual level the losses run torch ops (they
    raised "You must implement the jvp function")."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, generator=generator, dtype=torch.float64)
    v = torch.randn(N, C, generator=generator, dtype=torch.float64)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(ours(fwAD.make_dual(x, v)))
        expected = fwAD.unpack_dual(theirs(fwAD.make_dual(x, v)))
    torch.testing.assert_close(got.primal, expected.primal)
    torch.testing.assert_close(got.tangent, expected.tangent)
    assert got.tangent.abs() > 0
    # outside the dual level the kernels' Functions run again
    assert xt.cross_entropy(x.requires_grad_(), torch.zeros(N, dtype=torch.long)).grad_fn.name().startswith("_CrossEntropy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"weight": "w"}], ids=["plain", "smoothing", "weight"])
@pytest.mark.parametrize("form", ["cross_entropy", "linear_cross_entropy"])
def test_torch_func_tangents_keep_the_dtype(form, options, dtype):
    """``torch.func.jvp`` / ``jacfwd`` of a probability-target "mean": torch.func turns a 0-d
    tensor ÷ Python float into a float64 tangent, and the mean's rows count was a Python float
    (a review found float32 losses with float64 Jacobians, 2026-12-07). The tangent and the
    Jacobian have the loss's dtype and torch's values."""
    from torch.func import jacfwd, jvp

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, generator=generator).to(dtype)
    q = torch.softmax(torch.randn(4, 6, generator=generator), 1).to(dtype)
    layer = torch.randn(6, 6, generator=generator).to(dtype)
    if options.get("weight") == "w":
        options = {"weight": (torch.rand(6, generator=generator) + 0.5).to(dtype)}
    if form == "cross_entropy":
        ours, theirs = (lambda z: xt.cross_entropy(z, q, **options)), (lambda z: F.cross_entropy(z, q, **options))
    else:
        ours = lambda z: xt.linear_cross_entropy(z, layer, q, **options)  # noqa: E731
        theirs = lambda z: F.cross_entropy(z @ layer.T, q, **options)  # noqa: E731
    primal, tangent = jvp(ours, (x,), (torch.ones_like(x),))
    expected_primal, expected_tangent = jvp(theirs, (x,), (torch.ones_like(x),))
    jacobian = jacfwd(ours)(x)
    # (xentkit's linear form returns a float32 loss for half-precision inputs, by contract)
    assert tangent.dtype == primal.dtype and jacobian.dtype == primal.dtype
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(primal.float(), expected_primal.float(), **tolerance)
    torch.testing.assert_close(tangent.float(), expected_tangent.float(), **tolerance)
    torch.testing.assert_close(jacobian.float(), jacfwd(theirs)(x).float(), **tolerance)


def _tangent_elsewhere_cases():
    generator = torch.Generator().manual_seed(3)
    y = torch.randint(0, C, (N,), generator=generator)
    q = torch.softmax(torch.randn(N, C, generator=generator, dtype=torch.float64), -1)
    w = torch.rand(C, generator=generator, dtype=torch.float64) + 0.5
    hidden = torch.randn(N, 8, generator=generator, dtype=torch.float64)
    layer = torch.randn(C, 8, generator=generator, dtype=torch.float64) / 3
    # (name, the dual tensor's primal, the call on it, or with torch's ops: the same formula)
    return [
        ("probability target", q, lambda x, d: xt.cross_entropy(x, d), lambda x, d: F.cross_entropy(x, d)),
        ("class weight", w, lambda x, d: xt.cross_entropy(x, y, d),
         lambda x, d: -(d[y] * x.log_softmax(1).gather(1, y[:, None])[:, 0]).sum() / d[y].sum()),
        ("class weight, small", w[:5], lambda x, d: xt.cross_entropy(x[:, :5], y % 5, d),
         lambda x, d: -(d[y % 5] * x[:, :5].log_softmax(1).gather(1, (y % 5)[:, None])[:, 0]).sum() / d[y % 5].sum()),
        ("bce target", q, lambda x, d: xt.binary_cross_entropy_with_logits(x, d),
         lambda x, d: F.binary_cross_entropy_with_logits(x, d)),
        ("linear weight", layer, lambda x, d: xt.linear_cross_entropy(hidden, d, y),
         lambda x, d: F.cross_entropy(hidden @ d.T, y)),
    ]


@pytest.mark.parametrize(("name", "primal", "ours", "theirs"), _tangent_elsewhere_cases(),
                         ids=[c[0] for c in _tangent_elsewhere_cases()])
def test_forward_mode_ad_with_the_tangent_on_another_tensor(name, primal, ours, theirs):
    """A tangent on the target, the class weight or the linear layer, not on the logits, had
    taken the kernels' Functions ("You must implement the jvp function"), or on the small path
    torch's kernel, which drops a weight's tangent (a review, 2026-12-07)."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(N, C, generator=generator, dtype=torch.float64)
    v = torch.randn(primal.shape, generator=generator, dtype=torch.float64)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(ours(x, fwAD.make_dual(primal, v)))
        expected = fwAD.unpack_dual(theirs(x, fwAD.make_dual(primal, v)))
    torch.testing.assert_close(got.primal, expected.primal)
    assert expected.tangent is not None and expected.tangent.abs() > 0
    torch.testing.assert_close(got.tangent, expected.tangent)


@pytest.mark.parametrize("shape", [(5,), (300, 300)])
def test_a_bool_element_weight_is_a_mask_as_in_torch(shape):
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(shape, generator=generator, requires_grad=True)
    t = torch.rand(shape, generator=generator)
    mask = torch.rand(shape, generator=generator) > 0.5
    loss = xt.binary_cross_entropy_with_logits(z, t, weight=mask)
    expected = F.binary_cross_entropy_with_logits(z, t, weight=mask)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, z)[0], torch.autograd.grad(expected, z)[0])
    with pytest.raises(TypeError, match="weight must be a numeric array"):
        xt.binary_cross_entropy_with_logits(z, t, weight=torch.ones(shape, dtype=torch.complex64))


def test_float_options_take_a_0d_tensor_as_torch_does():
    z, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    torch.testing.assert_close(
        xt.cross_entropy(z, y, label_smoothing=torch.tensor(0.1)), F.cross_entropy(z, y, label_smoothing=0.1)
    )
    assert xt.cross_entropy(z, y, z_loss=torch.tensor(1e-3)) > xt.cross_entropy(z, y)
    for bad in (torch.tensor(True), torch.tensor([0.1]), torch.tensor(0.1 + 0j)):
        with pytest.raises(TypeError, match=r"^label_smoothing must be a float in \[0, 1\], got a torch tensor of dtype (bool|float32|complex64) and shape"):
            xt.cross_entropy(z, y, label_smoothing=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_temperature_whose_reciprocal_overflows_is_refused(dtype):
    logits, target = torch.tensor([[1e-5, -2e-5, 3e-6]], dtype=dtype), torch.tensor([0])
    message = r"^temperature must be at least the smallest normal float32 value .* got 1e-39$"
    with pytest.raises(ValueError, match=message):
        xt.log_probs(logits, target, temperature=1e-39)
    with pytest.raises(ValueError, match=message):
        xt.linear_log_probs(torch.randn(2, 3, dtype=dtype), torch.randn(4, 3, dtype=dtype), torch.tensor([0, 1]),
                            temperature=1e-39)
    with pytest.raises(ValueError, match=r"^temperature must be at most the reciprocal of the smallest normal float32 value .* got 1e\+39$"):
        xt.log_probs(logits, target, temperature=1e39)
    # float64 logits are scaled in float64: there 1e-39 is a normal temperature
    assert torch.isfinite(xt.log_probs(logits.double(), target, temperature=1e-39)).all()


def test_an_open_dual_level_leaves_plain_tensors_on_the_kernels():
    """Only tensors that carry tangents take torch ops: a dual level open (in this thread or
    another) must not move plain calls off the kernels (the vocabulary-parallel forms refused
    them, in-place lost its saving), while the vocabulary-parallel forms refuse dual tensors."""
    from xentkit.torch import distributed

    x = torch.randn(N, C, requires_grad=True)
    y = torch.randint(0, C, (N,))
    with fwAD.dual_level():
        loss = xt.cross_entropy(x, y)
        assert loss.grad_fn.name().startswith("_CrossEntropy")
        torch.testing.assert_close(distributed.vocab_parallel_cross_entropy(x, y), F.cross_entropy(x, y))
        with pytest.raises(ValueError, match="forward-mode tangents"):
            distributed.vocab_parallel_cross_entropy(fwAD.make_dual(x.detach(), torch.ones(N, C)), y)


def test_an_infinite_pos_weight_gives_torchs_nan_gradient():
    x = torch.tensor([0.0, 3.0, 0.0, 40.0], requires_grad=True)
    t = torch.tensor([1.0, 0.3, -0.5, 0.0])
    pos_weight = torch.full((4,), float("inf"))
    ours = torch.autograd.grad(xt.binary_cross_entropy_with_logits(x, t, pos_weight=pos_weight, reduction="sum"), x)[0]
    theirs = torch.autograd.grad(F.binary_cross_entropy_with_logits(x, t, pos_weight=pos_weight, reduction="sum"), x)[0]
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    assert ours.isnan().all()


def test_an_option_tensor_that_requires_grad_is_refused_as_torch_does():
    with pytest.raises(TypeError, match="label_smoothing must be a float"):
        xt.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), label_smoothing=torch.tensor(0.1, requires_grad=True))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "logits only", "target only"])
def test_bce_none_keeps_torchs_layout(layout):
    """``binary_cross_entropy_with_logits(..., reduction="none")`` with channels_last (or
    transposed) targets: torch's result has the target's layout, whatever the logits'; the
    kernel's was row-major (the same values, other strides)."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 120, 100, generator=generator)  # 72000 elements: the fused kernel
    t = torch.rand(2, 3, 120, 100, generator=generator)
    if layout == "transposed":
        x, t = x.reshape(-1, 360).T, t.reshape(-1, 360).T
    else:
        x = x.to(memory_format=torch.channels_last) if layout != "target only" else x
        t = t.to(memory_format=torch.channels_last) if layout != "logits only" else t
    x.requires_grad_()
    ours = xt.binary_cross_entropy_with_logits(x, t, reduction="none")
    theirs = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    assert ours.stride() == theirs.stride() and ours.grad_fn.name().startswith("_BinaryCrossEntropy")
    torch.testing.assert_close(ours, theirs)
    upstream = torch.rand(ours.shape, generator=generator)
    (ours_grad,) = torch.autograd.grad(ours, x, upstream)
    (theirs_grad,) = torch.autograd.grad(theirs, x, upstream)
    torch.testing.assert_close(ours_grad, theirs_grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_channels_last_logits_are_read_as_they_lie(reduction):
    """A channels_last (N, C, H, W) input holds its classes innermost: the kernels read it so,
    with no copy (a review: one copy to torch's order, then one back, class-last, took 2-3 times
    torch's time), for the same values and gradient as the contiguous input's, bit for bit, in
    channels_last memory as torch's own."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _memory import peak_above

    generator = torch.Generator().manual_seed(3)
    plain = torch.randn(2, 21, 40, 40, generator=generator)
    target = torch.randint(0, 21, (2, 40, 40), generator=generator)
    weight = torch.rand(21, generator=generator) + 0.5
    lying = plain.contiguous(memory_format=torch.channels_last)
    results = []
    for logits in (plain, lying):
        leaf = logits.clone(memory_format=torch.preserve_format).requires_grad_()
        loss = xt.cross_entropy(leaf, target, weight, label_smoothing=0.1, reduction=reduction)
        loss.backward(torch.ones_like(loss))
        results.append((loss, leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[1][1].is_contiguous(memory_format=torch.channels_last)
    expected = F.cross_entropy(plain, target, weight, label_smoothing=0.1, reduction=reduction)
    torch.testing.assert_close(results[1][0], expected)
    with torch.no_grad():  # forward alone: no copy of the logits, where torch's order takes one
        peaks = [
            peak_above(lambda x=x: xt.cross_entropy(x, target, weight, reduction=reduction), plain.nbytes, warm=True)
            for x in (plain, lying)
        ]
    assert peaks[1] < peaks[0] - 0.8, peaks  # (the contiguous input is copied class-last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_upstream_finiteness_check_is_torchs_isfinite(dtype):
    """``_bridge.all_finite`` (NumPy's single sweep, for the backward's look at the upstream
    gradients) answers as ``torch.isfinite(...).all()``, for one value and many, strided too."""
    from xentkit.torch import _bridge

    for value in (0.0, 1.0, float("inf"), -float("inf"), float("nan"), 6e4):
        for values in (torch.tensor(value), torch.full((7, 3), 0.5).index_fill_(0, torch.tensor([4]), value)[:, 1]):
            values = values.to(dtype)
            assert _bridge.all_finite(values) is bool(torch.isfinite(values).all()), (value, values.shape)
