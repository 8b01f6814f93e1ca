"""Where two reviews of the NumPy api and of ``xentkit.torch`` as a drop-in found xentkit apart from
torch or from its own documentation: each test fails on the commit before its fix."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

# isort: split
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import xentkit  # noqa: E402
import xentkit.torch as xt  # noqa: E402


def test_inplace_backward_is_refused_inside_allow_mutation_on_saved_tensors():
    """That context turns off autograd's version check and clones saved tensors only before
    torch's own in-place ops: xentkit's gradient written over the logits went unseen, and a node
    that had saved them (sin here) computed from the gradient (the weight's gradient 31 off)."""
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(16, 400)
    hidden = torch.randn(300, 16, generator=generator)
    labels = torch.randint(0, 400, (300,), generator=generator)
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        logits = layer(hidden)
        with pytest.raises(ValueError, match=r"allow_mutation_on_saved_tensors\(\).*inplace_backward=False"):
            xt.cross_entropy(logits, labels, inplace_backward=True)
        loss = xt.cross_entropy(logits, labels) + logits.sin().sum()  # out of place: right
        loss.backward()
    got = layer.weight.grad.clone()
    layer.zero_grad()
    logits = layer(hidden)
    (F.cross_entropy(logits, labels) + logits.sin().sum()).backward()
    torch.testing.assert_close(got, layer.weight.grad)
    layer.zero_grad()  # outside the context in place still works, and still guards saved logits
    logits = layer(hidden)
    xt.cross_entropy(logits, labels, inplace_backward=True).backward()
    torch.testing.assert_close(layer.weight.grad, _weight_grad(layer, hidden, labels))
    logits = layer(hidden)
    saved = logits.sin()  # saves the logits, which the loss then overwrites: torch's version error
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (xt.cross_entropy(logits, labels, inplace_backward=True) + saved.sum()).backward()


def test_allow_mutation_on_saved_tensors_in_another_thread_refuses_nothing_here():
    """torch's flag for the context is process-wide, the context itself its thread's: a call in
    another thread keeps in-place backward (and autograd's version check guards it there)."""
    import threading

    inside, leave = threading.Event(), threading.Event()

    def other():
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            inside.set()
            leave.wait(20)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert inside.wait(20)
        logits = torch.randn(6, 5, requires_grad=True) * 2
        labels = torch.tensor([0, 1, 2, 3, 4, 0])
        xt.cross_entropy(logits, labels, inplace_backward=True).backward()
    finally:
        leave.set()
        thread.join(20)


def _weight_grad(layer, hidden, labels):
    weight = layer.weight.detach().requires_grad_()
    F.cross_entropy(F.linear(hidden, weight, layer.bias.detach()), labels).backward()
    return weight.grad


@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_shows_all_its_matmuls_to_the_flop_counter(accumulate, dtype):
    """The chunks' weight gradient was added with ``addmm_``, which torch's FlopCounterMode does
    not count: a third of the FLOPs went missing from MFU estimates (bfloat16 with float32
    accumulation takes the other branch: operands cast to the accumulator's dtype)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(300, 40, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(50, 40, generator=generator).to(dtype).requires_grad_()
    target = torch.randint(0, 50, (300,), generator=generator)

    def flops(loss_of):
        with FlopCounterMode(display=False) as counter:
            loss_of().backward()
        return counter.get_total_flops()

    expected = flops(lambda: F.cross_entropy(F.linear(x, weight), target))
    got = flops(
        lambda: xt.linear_cross_entropy(x, weight, target, chunk_size=64, accumulate_in_float32=accumulate)
    )
    assert got == expected == 3 * 2 * 300 * 40 * 50


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y, r: xt.cross_entropy(x, y, reduction=r),
        lambda x, y, r: xt.CrossEntropyLoss(reduction=r)(x, y),
        lambda x, y, r: xt.nll_loss(torch.log_softmax(x, 1), y, reduction=r),
        lambda x, y, r: xt.binary_cross_entropy_with_logits(x, torch.sigmoid(x.flip(0)), reduction=r),
        lambda x, y, r: torch.as_tensor(xentkit.cross_entropy(x.numpy(), y.numpy(), reduction=r)),
    ],
    ids=["cross_entropy", "CrossEntropyLoss", "nll_loss", "bce_with_logits", "api"],
)
def test_elementwise_mean_is_torchs_deprecated_name_of_mean(call):
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 10, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    with pytest.warns(UserWarning, match="'elementwise_mean' is deprecated, please use reduction='mean'") as caught:
        got = call(x, y, "elementwise_mean")
    assert all(record.filename == __file__ for record in caught if "elementwise_mean" in str(record.message))
    torch.testing.assert_close(got, call(x, y, "mean"))


def test_elementwise_mean_compiles_with_fullgraph():
    """The warning's frame walk cannot be traced: under torch.compile the alias is taken silently
    (the eager call warns), as a function and through a module built outside the graph."""
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(8, 10, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    expected = xt.cross_entropy(x, y)
    compiled = torch.compile(
        lambda a, b: xt.cross_entropy(a, b, reduction="elementwise_mean"), backend="aot_eager", fullgraph=True
    )
    torch.testing.assert_close(compiled(x, y), expected)
    module = xt.CrossEntropyLoss(reduction="elementwise_mean")
    with pytest.warns(UserWarning, match="elementwise_mean"):
        module(x, y)
    torch.testing.assert_close(torch.compile(module, backend="aot_eager", fullgraph=True)(x, y), expected)


@pytest.mark.parametrize(
    ("logits_shape", "target_shape"), [((4, 10), (3, 10)), ((4, 10), (1, 10)), ((10,), (1, 10)), ((2, 3, 5), (2, 3, 4))]
)
def test_a_floating_target_of_neither_layout_is_a_shape_error(logits_shape, target_shape):
    """Class probabilities of another batch were a TypeError about class indices' dtype; torch
    raises a ValueError about the batch sizes."""
    logits, target = torch.randn(logits_shape), torch.rand(target_shape)
    expected = rf"target must have shape .* got shape {tuple(target_shape)} of dtype float32".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=expected):
        xt.cross_entropy(logits, target)
    with pytest.raises(ValueError, match=expected):
        xentkit.cross_entropy(logits.numpy(), target.numpy(), axis=0 if len(logits_shape) == 1 else 1)
    with pytest.raises(TypeError, match="integer dtype"):  # floats of the samples' shape: indices' dtype
        xt.cross_entropy(torch.randn(4, 10), torch.rand(4))


def test_perplexity_refuses_an_array_reduction_with_its_type_error():
    with pytest.raises(TypeError, match="perplexity always averages"):
        xentkit.perplexity(np.zeros((2, 3)), [0, 1], reduction=np.array(["mean", "sum"]))


def test_entropy_beyond_the_dtype_is_minus_inf_without_a_numpy_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xentkit.entropy([1e308, 1.0]) == -np.inf


def test_a_long_bad_list_is_described_briefly():
    """The message's description was the whole list's repr, cut after it was made."""
    ragged = [[1.0] * 1000] * 1999 + [[1.0] * 999]
    with pytest.raises(TypeError, match=r"got list \[\[1\.0, 1\.0, .*\.\.\.\]") as caught:
        xentkit.cross_entropy(ragged, [0] * 2000)
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("check_labels", [True, False])
def test_linear_log_probs_names_a_bad_label_at_its_position_in_the_callers_target(dtype, check_labels):
    """It named the position in the flattened target ((5,) for [1, 2] of a [2, 3] target), where
    ``log_probs`` and the vocabulary-parallel forms name the caller's; the CPU always checks."""
    target = torch.zeros(2, 3, dtype=torch.long)
    target[1, 2] = 10
    x, weight = torch.randn(2, 3, 4, dtype=dtype), torch.randn(10, 4, dtype=dtype)
    message = r"target has label 10 at position \(1, 2\) but linear_weight has 10 rows"
    if dtype == torch.bfloat16 and not check_labels:  # (torch ops: unchecked, that row's log p NaN)
        log_p = xt.linear_log_probs(x, weight, target, check_labels=False)
        assert log_p.shape == (2, 3) and log_p[1, 2].isnan() and log_p.isnan().sum() == 1
        return
    with pytest.raises(ValueError, match=message):
        xt.linear_log_probs(x, weight, target, check_labels=check_labels)
    with pytest.raises(ValueError, match=message.replace("linear_weight has 10 rows", "logits have 10 classes")):
        xt.log_probs(torch.randn(2, 3, 10, dtype=dtype), target, check_labels=check_labels)


def test_a_transposed_linear_weight_is_not_copied_and_its_gradients_are_right():
    """A tied embedding or a head stored ``[D, V]`` reaches the linear forms as a transposed view:
    it was copied whole on every call (and again in backward; 250 MiB more peak for a 32000 × 2048
    float32 head, a review). BLAS takes it as it is; other strides are still made contiguous once."""
    from xentkit.torch._chunks import detached

    generator = torch.Generator().manual_seed(3)
    store = torch.randn(8, 30, generator=generator, requires_grad=True)  # [D, V]
    x = torch.randn(12, 8, generator=generator, requires_grad=True)
    target = torch.randint(0, 30, (12,), generator=generator)
    _, weight, _ = detached(x, store.T, None)
    assert weight.data_ptr() == store.data_ptr() and weight.shape == (30, 8)
    strided = torch.randn(30, 16)[:, ::2]
    assert detached(x, strided, None)[1].is_contiguous()
    for call in (
        lambda w: xt.linear_cross_entropy(x, w, target, chunk_size=5),
        lambda w: xt.linear_cross_entropy(x, w, target, chunk_size=5, reduction="none").sum(),
        lambda w: xt.linear_log_probs(x, w, target, chunk_size=5).sum(),
    ):
        got = torch.autograd.grad(call(store.T), (x, store))
        plain = store.detach().T.contiguous().requires_grad_()
        expected = torch.autograd.grad(call(plain), (x, plain))
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1].T)


@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (4, 400, 12, 12)])
def test_nll_loss_of_channels_last_log_probabilities_works_at_every_size(shape):
    """Small problems ran torch's NLL kernel, whose backward refuses a channels_last input ("grad_input
    must be contiguous", torch's own bug) where larger ones, on xentkit's kernels, worked."""
    generator = torch.Generator().manual_seed(5)
    log_p = torch.randn(shape, generator=generator).log_softmax(1).contiguous(memory_format=torch.channels_last)
    log_p.requires_grad_()
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator)
    loss = xt.nll_loss(log_p, target)
    loss.backward()
    plain = log_p.detach().contiguous().requires_grad_()
    F.nll_loss(plain, target).backward()
    torch.testing.assert_close(loss, F.nll_loss(plain.detach(), target))
    torch.testing.assert_close(log_p.grad, plain.grad)


@pytest.mark.parametrize("target_dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_binary_cross_entropy_is_computed_in_float32_and_rounded_once(target_dtype):
    """The torch-ops path called torch's bfloat16 kernel, which computes in bfloat16: losses up to
    200% off (x = −8.25, t = 0.0025), a float32 loss of bfloat16 logits 56% off (a review)."""
    generator = torch.Generator().manual_seed(6)
    x = (4 * torch.randn(4000, generator=generator)).to(torch.bfloat16).requires_grad_()
    t = torch.rand(4000, generator=generator).to(target_dtype)
    weight = torch.rand(4000, generator=generator).to(torch.bfloat16)
    pos_weight = (2 * torch.rand(4000, generator=generator)).to(torch.bfloat16)
    for kwargs in ({}, {"weight": weight, "pos_weight": pos_weight}):
        loss = xt.binary_cross_entropy_with_logits(x, t, reduction="none", **kwargs)
        exact = F.binary_cross_entropy_with_logits(
            x.detach().double(), t.double(), reduction="none", **{k: v.double() for k, v in kwargs.items()}
        )
        assert loss.dtype == target_dtype
        # (a float32 loss carries torch's float32 kernel's rounding, ~1e-5 where its terms cancel)
        torch.testing.assert_close(loss.double(), exact, rtol=2.0**-8 if target_dtype == torch.bfloat16 else 1e-4, atol=0)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        double_x = x.detach().double().requires_grad_()
        F.binary_cross_entropy_with_logits(
            double_x, t.double(), reduction="none", **{k: v.double() for k, v in kwargs.items()}
        ).sum().backward()
        torch.testing.assert_close(grad.double(), double_x.grad, rtol=2.0**-8, atol=1e-30)
    mean = xt.binary_cross_entropy_with_logits(x, t)
    exact_mean = F.binary_cross_entropy_with_logits(x.detach().double(), t.double())
    torch.testing.assert_close(mean.double(), exact_mean, rtol=2.0**-8 if target_dtype == torch.bfloat16 else 1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_vocabulary_parallel_torch_shards_keep_a_confident_rows_loss(dtype):
    """The torch-ops shards summed the max's term inside s, so a confident row's loss came out 0
    (one process) or 33% off (two), where the kernel shards keep it; special rows as before."""
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor(
        [[0.0, -40, -40, -40], [1.0, 1.0, -3, 2], [-inf] * 4, [inf, 0, 1, 2], [nan, 0, 1, 2], [0, -inf, 1, 2]],
        dtype=dtype,
    )
    target = torch.tensor([0, 1, 2, 0, 1, 3])
    exact = 3 * math.exp(-40)  # log1p(3·e^-40)
    kernels = xt.vocab_parallel_cross_entropy(logits, target, reduction="none")
    shards = xt.vocab_parallel_cross_entropy(logits, target, reduction="none", backend="torch")
    assert shards[0].item() == pytest.approx(exact, rel=1e-6 if dtype == torch.float32 else 1e-14)
    torch.testing.assert_close(shards, kernels, equal_nan=True, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
