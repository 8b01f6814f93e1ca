"""The same bad input gets the same error on every path: rules that had a second home (a review
of the code against docs/CONTRACTS.md)."""

from __future__ import annotations

import pytest

import xentkit

torch = pytest.importorskip("torch")
import xentkit.torch as xt  # noqa: E402

_INTEGER_PROBABILITIES = r"target with the logits' shape \(4, 5\) holds class probabilities and must be floating-point, got dtype int64"


@pytest.mark.parametrize(
    "path", ["api", "numba", "bfloat16 torch ops", "backend=torch", "linear", "linear backend=torch", "compiled"]
)
def test_an_integer_target_of_the_logits_shape_is_one_type_error_on_every_path(path: str) -> None:
    """torch's rule: a target of the logits' shape holds class probabilities, which must be
    floating-point. The api said so; the torch paths said the indices' shape was wrong (a
    ValueError), and the compiled CPU path differed from eager."""
    logits = torch.randn(4, 5)
    target = torch.zeros(4, 5, dtype=torch.long)
    calls = {
        "api": lambda: xentkit.cross_entropy(logits.numpy(), target.numpy()),
        "numba": lambda: xt.cross_entropy(logits, target, backend="auto"),
        "bfloat16 torch ops": lambda: xt.cross_entropy(logits.bfloat16(), target),
        "backend=torch": lambda: xt.cross_entropy(logits, target, backend="torch"),
        "linear": lambda: xt.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), target),
        "linear backend=torch": lambda: xt.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), target, backend="torch"),
        # (the compiled Numba path: beyond its small-problem threshold)
        "compiled": lambda: torch.compile(lambda x, t: xt.cross_entropy(x, t), backend="eager")(
            torch.randn(4, 20000), torch.zeros(4, 20000, dtype=torch.long)
        ),
    }
    expected = _INTEGER_PROBABILITIES.replace("5", "20000") if path == "compiled" else _INTEGER_PROBABILITIES
    with pytest.raises(TypeError, match=expected):
        calls[path]()


def test_the_linear_forms_word_their_target_errors_as_the_others() -> None:
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    for target, message in (
        (torch.zeros(3, dtype=torch.long), r"target must have shape \(4,\) \(class indices\) or the logits' shape \(4, 5\) \(class probabilities\), got shape \(3,\)$"),
        (torch.rand(4, 6), r"got shape \(4, 6\) of dtype float32$"),
    ):
        with pytest.raises(ValueError, match=message):
            xt.linear_cross_entropy(hidden, weight, target)
        with pytest.raises(ValueError, match=message):
            xt.cross_entropy(torch.randn(4, 5), target)
    with pytest.raises(TypeError, match="target of class indices must have an integer dtype, got dtype bool"):
        xt.linear_cross_entropy(hidden, weight, torch.zeros(4, dtype=torch.bool))


@pytest.mark.parametrize(
    ("weight", "error", "message"),
    [
        (torch.ones(5, dtype=torch.bool), TypeError, "weight must be a numeric array, got dtype bool"),
        (torch.ones(5, dtype=torch.complex64), TypeError, "weight must be a numeric array, got dtype complex64"),
        ([1.0] * 5, TypeError, "weight must be a torch.Tensor or None, got list"),
        (torch.ones(1, 5), ValueError, r"weight must be 1-D, one value per class, got shape \(1, 5\)"),
    ],
    ids=["bool", "complex", "list", "2-D"],
)
def test_the_vocabulary_parallel_class_weights_take_the_one_rule(weight: object, error: type, message: str) -> None:
    """They had their own check: a ValueError for a bool or complex weight and for a list, with
    a message that named neither the dtype nor the type."""
    from xentkit.torch.distributed import vocab_parallel_cross_entropy

    with pytest.raises(error, match=message):
        vocab_parallel_cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), weight=weight)
    with pytest.raises(error, match=message):  # (the modules' constructors, before C is known)
        xt.CrossEntropyLoss(weight=weight)
    if error is TypeError:  # (the single-process form's words; its shape names C, not V)
        with pytest.raises(error, match=message):
            xt.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), weight=weight)


def test_the_vocabulary_parallel_target_names_its_dtype_as_the_others() -> None:
    from xentkit.torch.distributed import vocab_parallel_cross_entropy

    with pytest.raises(ValueError, match=r"got dtype float32; probability targets are not supported"):
        vocab_parallel_cross_entropy(torch.randn(4, 5), torch.rand(4, 5))


def test_the_log_probabilities_word_their_errors_as_the_others() -> None:
    """The NumPy log_probs had its own TypeError for a non-integer target, the torch one its own
    message for a missing class axis."""
    message = "target of class indices must have an integer dtype, got dtype float32$"
    with pytest.raises(TypeError, match=message):
        xentkit.log_probs(torch.zeros(4, 5).numpy(), torch.zeros(4).numpy())
    with pytest.raises(TypeError, match=message):
        xt.log_probs(torch.zeros(4, 5), torch.zeros(4))
    with pytest.raises(ValueError, match=r"logits must have at least one class along axis 1, got shape \(4, 0\)"):
        xt.log_probs(torch.zeros(4, 0), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must have at least one dimension \(the classes\), got a scalar"):
        xt.log_probs(torch.tensor(1.0), torch.zeros((), dtype=torch.long))


def test_a_loss_of_cpu_tensors_stays_on_the_cpu_whatever_the_default_device() -> None:
    """The "mean"'s divisor was made on the default device: under ``with torch.device("meta")``
    a loss of CPU tensors came back as a meta tensor (a review); torch's stays on the CPU."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=generator, requires_grad=True)
    teacher = torch.rand(6, 5, generator=generator).softmax(1)
    hidden, weight = torch.randn(6, 8, generator=generator), torch.randn(5, 8, generator=generator)
    with torch.device("meta"):
        losses = {
            "target requiring grad": xt.cross_entropy(logits, teacher.clone().requires_grad_(True)),
            "bfloat16": xt.cross_entropy(logits.bfloat16(), teacher.bfloat16()),
            "backend=torch": xt.cross_entropy(logits, teacher, backend="torch"),
            "linear": xt.linear_cross_entropy(hidden, weight, teacher.clone().requires_grad_(True)),
        }
    for name, loss in losses.items():
        assert loss.device.type == "cpu", name
        loss.backward()
    assert logits.grad is not None and logits.grad.device.type == "cpu"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["weight", "pos_weight"])
def test_bce_refuses_a_weight_that_requires_grad_at_every_dtype(dtype, name):
    """torch's loss is not differentiable in its weights; xentkit's half-precision form (its own
    formula in float32) had silently given them a gradient (a review)."""
    logits = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    factor = torch.rand(4, dtype=dtype, requires_grad=True)
    with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument '{name}'"):
        xt.binary_cross_entropy_with_logits(logits, torch.rand(3, 4, dtype=dtype), **{name: factor})
    with torch.no_grad():  # (no graph: nothing to refuse, as torch)
        xt.binary_cross_entropy_with_logits(logits, torch.rand(3, 4, dtype=dtype), **{name: factor})


@pytest.mark.parametrize("strict", [False, True])
def test_an_exported_per_pixel_loss_takes_as_many_pixels_as_classes(strict: bool) -> None:
    """The probability-target rule compared an index target's sizes with the logits': export
    with dynamic sizes guarded on the pixel count differing from the classes, and the program
    refused a batch where they were equal (a review of the rule's first form)."""
    from torch.export import Dim

    class Loss(torch.nn.Module):
        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return xt.cross_entropy(logits, target)

    generator = torch.Generator().manual_seed(0)
    rows, classes, pixels = Dim("rows"), Dim("classes"), Dim("pixels")
    program = torch.export.export(
        Loss(), (torch.randn(4, 7, 5, generator=generator), torch.randint(0, 7, (4, 5), generator=generator)),
        dynamic_shapes=({0: rows, 1: classes, 2: pixels}, {0: rows, 1: pixels}), strict=strict,
    )
    logits, target = torch.randn(3, 6, 6, generator=generator), torch.randint(0, 6, (3, 6), generator=generator)
    torch.testing.assert_close(program.module()(logits, target), xt.cross_entropy(logits, target), rtol=1e-6, atol=0)
