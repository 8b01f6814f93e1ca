"""Bad input found by a review of every public function (2026-12-07): each now a clear error
naming the argument, or a right answer where an error was wrong."""

from __future__ import annotations

import numpy as np
import pytest

import xentkit

torch = pytest.importorskip("torch")
import xentkit.torch as xt  # noqa: E402


def _meta(value):
    return torch.tensor(value, device="meta")


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("label_smoothing", lambda z, y: xt.cross_entropy(z, y, label_smoothing=_meta(0.1))),
        ("z_loss", lambda z, y: xt.cross_entropy(z, y, z_loss=_meta(0.1))),
        ("softcap", lambda z, y: xt.cross_entropy(z, y, softcap=_meta(3.0))),
        ("ignore_index", lambda z, y: xt.cross_entropy(z, y, ignore_index=_meta(1))),
        ("temperature", lambda z, y: xt.log_probs(z, y, temperature=_meta(0.5))),
        ("label_smoothing", lambda z, y: xentkit.cross_entropy(z.numpy(), y.numpy(), label_smoothing=_meta(0.1))),
    ],
)
def test_an_option_given_as_a_meta_tensor_is_named(name, call):
    """A 0-d meta tensor has no value: torch's 'Tensor.item() cannot be called on meta tensors',
    from deep inside it, named no argument."""
    z, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError, match=rf"^{name} must be .*, got a torch tensor of dtype \w+ and shape \(\) on the "
                       r"meta device, which holds no value$"):  # fmt: skip
        call(z, y)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ((4, 5), {"weight": np.ones(5)}, None),
        ((4, 5), {"out_features": 2}, r"^out_features must be a tuple of ints >= 1 .*, got int 2$"),
        ((-1, 5), {}, r"^in_features must be an int >= 0, got -1$"),
        ((4, 0), {}, r"^num_classes must be an int >= 1, got 0$"),
        ((4, 5.5), {}, r"^num_classes must be an int >= 1, got float 5.5$"),
        (("4", 5), {}, r"^in_features must be an int >= 0, got str '4'$"),
        ((8, torch.tensor(True)), {}, r"^num_classes must be an int >= 1, got a torch tensor of dtype bool"),
    ],
)
def test_the_fused_linear_module_refuses_bad_arguments_when_built(arguments, error, message):
    """Its constructor had raised from inside torch (AttributeError 'is_complex' for an array
    weight, 'int' object is not iterable, negative dimension)."""
    if message is None:
        message = r"^weight must be a torch.Tensor or None, got an array of dtype float64 and shape \(5,\); torch.from_numpy"
    kind = ValueError if any(part in message for part in ("got -1$", "got 0$")) else TypeError
    with pytest.raises(kind, match=message):
        xt.LinearCrossEntropyLoss(*arguments, **error)


def test_the_loss_modules_check_their_options_at_forward_as_subclasses_may_set_them_later():
    """As torch's modules: a subclass may pass the base a value of its own and override forward,
    or define an option as a property that reads state set after the base's constructor (a
    review found both broken by a check in the constructor, 2026-12-07)."""

    class BatchMean(xt.CrossEntropyLoss):
        def __init__(self):
            super().__init__(reduction="batchmean")

        def forward(self, x, y):
            return xt.cross_entropy(x, y, reduction="sum") / x.shape[0]

    class Annealed(xt.CrossEntropyLoss):
        def __init__(self):
            super().__init__()
            self.step = 0

        @property
        def label_smoothing(self):
            return min(0.1, 0.01 * self.step)

        @label_smoothing.setter
        def label_smoothing(self, value):
            pass

    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(BatchMean()(x, y), xt.cross_entropy(x, y))
    annealed = Annealed()
    annealed.step = 5
    torch.testing.assert_close(annealed(x, y), xt.cross_entropy(x, y, label_smoothing=0.05))
    with pytest.raises(ValueError, match=r"^z_loss must be a finite float >= 0, got -1.0$"):
        xt.CrossEntropyLoss(z_loss=-1)(x, y)
    head = xt.LinearCrossEntropyLoss(torch.tensor(4), 5)  # (a one-value integer tensor, as torch takes)
    assert head.linear.in_features == 4
    with pytest.raises(ValueError, match=r"^reduction must be one of 'none', 'mean', 'sum', got 'bad'$"):
        xt.LinearCrossEntropyLoss(4, 5, reduction="bad")(torch.randn(2, 4), torch.tensor([0, 1]))
    assert xt.LinearCrossEntropyLoss(0, 5, out_features=[3, 2], bias=True).out_features == (3, 2)


def test_an_out_interleaved_with_the_logits_is_taken():
    """``x[:, ::2]`` and ``x[:, 1::2]`` share bounds but no element: the bounds check alone had
    refused ``out`` with 'an array that does not overlap logits'."""
    generator = np.random.default_rng(0)
    both = generator.standard_normal((4, 10))
    logits = both[:, ::2]
    expected_loss, expected_grad = xentkit.cross_entropy_and_grad(logits.copy(), [0, 1, 2, 3])
    loss, grad = xentkit.cross_entropy_and_grad(logits, [0, 1, 2, 3], out=both[:, 1::2])
    assert loss == expected_loss and np.array_equal(grad, expected_grad)
    assert np.array_equal(both[:, 1::2], expected_grad)
    with pytest.raises(ValueError, match=r"out must be logits itself .* or an array that does not overlap logits"):
        xentkit.cross_entropy_and_grad(both[:, :5], [0, 1, 2, 3], out=both[:, 1:6])


def _view_of_zeros(shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """A float64 view of ``strides`` (bytes) over zeros just large enough to hold it: NumPy's
    ``as_strided`` checks nothing, and a base of 45 float64 for the (24, 80) view below, whose
    last element ends at byte 400, had the kernel write 40 bytes past it (a heap corruption
    that crashed the test process later, in another test's garbage collection)."""
    last = sum((size - 1) * stride for size, stride in zip(shape, strides, strict=True))
    return np.lib.stride_tricks.as_strided(np.zeros(last // 8 + 1), shape, strides)


def test_an_out_whose_elements_share_memory_is_refused():
    """A writeable 0-stride or overlapping ``out`` had taken every row's gradient over the one
    before: every row held the last row's, silently (a review, 2026-12-07). A view whose
    elements interleave without sharing memory is still taken."""
    generator = np.random.default_rng(0)
    logits, target = generator.standard_normal((4, 5)), [0, 1, 2, 3]
    _, expected = xentkit.cross_entropy_and_grad(logits, target)
    message = r"^out must not hold one memory location at two positions .* got an array of shape \(4, 5\) with strides"
    for shared in (_view_of_zeros((4, 5), (0, 8)), _view_of_zeros((4, 5), (16, 8))):
        with pytest.raises(ValueError, match=message):
            xentkit.cross_entropy_and_grad(logits, target, out=shared)
    # offsets 0, 24, 48, 72 + 0, 80, 160, 240, 320: rows interleave with no element shared
    interleaved = _view_of_zeros((4, 5), (24, 80))
    _, grad = xentkit.cross_entropy_and_grad(logits, target, out=interleaved)
    assert grad is interleaved and np.array_equal(grad, expected)
