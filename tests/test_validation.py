"""Bad input gets a clear error naming the argument, the expected and the received."""

from __future__ import annotations

import numpy as np
import pytest

import xentkit

LOGITS = np.random.default_rng(0).normal(size=(4, 3))
LABELS = np.array([0, 2, 1, 0])


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(target=np.array([0, 1, 2])), ValueError, r"target must have shape \(4,\).*got shape \(3,\)"),
        (dict(target=np.array([0, 1, 3, 0])), ValueError, r"label 3 at position \(2,\) but logits have 3 classes"),
        (dict(target=np.array([0, -1, 1, 0])), ValueError, r"label -1 at position \(1,\)"),
        (dict(target=np.array([0.0, 1.0, 1.0, 0.0])), TypeError, r"target of class indices must have an integer dtype"),
        (dict(target=np.zeros((4, 3), dtype=int)), TypeError, r"class probabilities and must be floating-point"),
        (dict(weight=[1.0, 2.0]), ValueError, r"weight must have shape \(3,\).*got shape \(2,\)"),
        (dict(weight=["a", "b", "c"]), TypeError, r"weight must be a numeric array"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
        (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\], got -0.1"),
        (dict(axis=2), ValueError, r"axis must be in \[-2, 2\).*got 2"),
        (dict(axis=1.0), TypeError, r"axis must be an int"),
        (dict(axis=np.array([1])), TypeError, r"axis must be an int, got an array of dtype int64 and shape \(1,\)"),
        (dict(axis=np.array(True)), TypeError, r"axis must be an int, got an array of dtype bool"),
        (dict(axis=np.array(2)), ValueError, r"axis must be in \[-2, 2\).*got 2"),
        (dict(z_loss=-1.0), ValueError, r"z_loss must be a finite float >= 0, got -1.0"),
        (dict(softcap=0.0), ValueError, r"softcap must be None or a finite float > 0, got 0.0"),
        (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int"),
        (dict(logits=np.array([[1, 2, 3]]), target=np.array([0])), TypeError, r"logits must be a floating-point array.*int64"),
        (dict(logits="abc"), TypeError, r"logits must be a numeric array, got str 'abc'"),
        (dict(logits=[[1.0, 2.0], [3.0]]), TypeError, r"logits must be a numeric array"),
        (dict(logits=np.float64(1.0), target=np.array(0)), ValueError, r"logits must have at least one dimension"),
        (dict(logits=np.zeros((4, 0)), target=np.zeros(4, dtype=int)), ValueError, r"at least one class"),
    ],
)
@pytest.mark.parametrize("function", [xentkit.cross_entropy, xentkit.cross_entropy_and_grad, xentkit.perplexity])
def test_cross_entropy_bad_input(function, kwargs, error, pattern):
    arguments = dict(logits=LOGITS, target=LABELS) | kwargs
    if function is xentkit.perplexity and "reduction" in arguments:
        error, pattern = TypeError, "perplexity always averages"
    with pytest.raises(error, match=pattern):
        function(arguments.pop("logits"), arguments.pop("target"), **arguments)


def test_an_axis_may_be_any_integer_that_says_so_as_numpy_takes_it():
    """A 0-d integer array (as NumPy takes for an axis) had been refused, while ignore_index took
    one (a review, 2026-12-07)."""
    expected = xentkit.cross_entropy(LOGITS, LABELS, axis=1)
    for axis in (np.array(1), np.int8(-1), np.array(-1, dtype=np.int16)):
        assert xentkit.cross_entropy(LOGITS, LABELS, axis=axis) == expected
    np.testing.assert_array_equal(xentkit.softmax(LOGITS, axis=np.array(0)), xentkit.softmax(LOGITS, axis=0))


def test_label_positions_are_reported_in_per_pixel_layouts():
    target = np.zeros((2, 3, 3), dtype=int)
    target[1, 2, 0] = 7
    with pytest.raises(ValueError, match=r"label 7 at position \(1, 2, 0\) but logits have 4 classes"):
        xentkit.cross_entropy(np.zeros((2, 4, 3, 3)), target, axis=1)


def test_grad_output_and_out_are_checked():
    with pytest.raises(ValueError, match=r"grad_output must be a scalar for reduction='mean'"):
        xentkit.cross_entropy_and_grad(LOGITS, LABELS, grad_output=np.ones(4))
    with pytest.raises(ValueError, match=r"grad_output must broadcast to the per-sample loss shape \(4,\)"):
        xentkit.cross_entropy_and_grad(LOGITS, LABELS, reduction="none", grad_output=np.ones(3))
    with pytest.raises(ValueError, match=r"out must have shape \(4, 3\) and dtype float64"):
        xentkit.cross_entropy_and_grad(LOGITS, LABELS, out=np.empty((4, 3), dtype=np.float32))
    with pytest.raises(TypeError, match=r"out must be a numpy array"):
        xentkit.cross_entropy_and_grad(LOGITS, LABELS, out=[0.0] * 12)
    buffer = np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"out must be logits itself"):
        xentkit.cross_entropy_and_grad(buffer[:4], LABELS, out=buffer[1:])
    read_only = np.empty((4, 3))
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        xentkit.cross_entropy_and_grad(LOGITS, LABELS, out=read_only)


def test_other_losses_bad_input():
    with pytest.raises(ValueError, match=r"target has label 5 at position \(0,\)"):
        xentkit.nll_loss(LOGITS, [5, 0, 0, 0])
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        xentkit.nll_loss(LOGITS, LABELS, reduction="max")
    with pytest.raises(ValueError, match=r"target must have the shape of logits \(4, 3\), got \(4,\)"):
        xentkit.binary_cross_entropy_with_logits(LOGITS, LABELS)
    with pytest.raises(ValueError, match=r"pos_weight must broadcast to the input's shape \(4, 3\), got shape \(2,\)"):
        xentkit.binary_cross_entropy_with_logits(LOGITS, np.zeros((4, 3)), pos_weight=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"weight must broadcast to the input's shape \(4, 3\), got shape \(2,\)"):
        xentkit.binary_cross_entropy_with_logits(LOGITS, np.zeros((4, 3)), weight=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"probs must lie in \[0, 1\]"):
        xentkit.binary_cross_entropy(LOGITS, np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"target must have the shape of prediction \(4, 3\)"):
        xentkit.quadratic_cost(LOGITS, np.zeros(3))
    with pytest.raises(TypeError, match=r"prediction must be a floating-point array"):
        xentkit.quadratic_cost(np.ones(3, dtype=int), np.zeros(3))
    with pytest.raises(ValueError, match=r"p must hold probabilities \(values >= 0\)"):
        xentkit.entropy([-0.5, 1.5])
    with pytest.raises(ValueError, match=r"q must have the shape of p \(2,\), got \(3,\)"):
        xentkit.kl_divergence([0.5, 0.5], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"grad_probs must have the shape of probs"):
        xentkit.softmax_backward(np.ones(3) / 3, np.ones(4))
    with pytest.raises(TypeError, match=r"x must be a floating-point array.*bool"):
        xentkit.softmax(np.array([True, False]))
    with pytest.raises(ValueError, match=r"axis must be in \[-1, 1\)"):
        xentkit.logsumexp(np.ones(3), axis=1)


def test_errors_survive_python_optimize_mode():
    """Checks are raises, not asserts: they hold under ``python -O``."""
    import subprocess
    import sys

    code = "import xentkit, numpy as np\ntry:\n    xentkit.cross_entropy(np.zeros((2, 3)), [0, 9])\nexcept ValueError as e:\n    print('ok', e)"
    result = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("ok target has label 9 at position (1,)")


def test_non_native_byte_order_is_converted(implementation):
    logits = np.random.default_rng(1).normal(size=(4, 5))
    expected = xentkit.cross_entropy_and_grad(logits, [0, 1, 2, 3])
    for dtype in (">f8", ">f4", ">f2"):
        loss, grad = xentkit.cross_entropy_and_grad(logits.astype(dtype), [0, 1, 2, 3])
        assert grad.dtype == np.dtype(dtype).newbyteorder("=")
        np.testing.assert_allclose(loss, expected[0], rtol=1e-2 if dtype == ">f2" else 1e-6)
        np.testing.assert_allclose(grad, expected[1], atol=1e-3 if dtype == ">f2" else 1e-7)


def test_huge_unsigned_labels_and_ignore_index_are_reported_not_wrapped():
    labels = np.array([0, 2**64 - 100, 1, 0], dtype=np.uint64)  # would wrap to −100 in int64
    with pytest.raises(ValueError, match=r"label 18446744073709551516 at position \(1,\), too large"):
        xentkit.cross_entropy(LOGITS, labels)
    with pytest.raises(ValueError, match=r"ignore_index must fit in int64, got 9223372036854775808"):
        xentkit.cross_entropy(LOGITS, LABELS, ignore_index=2**63)
    np.testing.assert_allclose(  # small unsigned labels work as any integers
        xentkit.cross_entropy(LOGITS, LABELS.astype(np.uint8)), xentkit.cross_entropy(LOGITS, LABELS)
    )


def test_binary_weight_with_more_dimensions_than_the_input_is_rejected_clearly():
    with pytest.raises(ValueError, match=r"weight must broadcast to the input's shape \(4, 3\), got shape \(2, 4, 3\)"):
        xentkit.binary_cross_entropy_with_logits(LOGITS, np.zeros((4, 3)), weight=np.ones((2, 4, 3)))


def test_a_loss_narrowed_past_its_dtype_is_inf_without_a_warning():
    import warnings

    from xentkit.api._validation import rounded

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's "overflow encountered in cast" would raise here
        assert rounded(np.float64(1e300), np.float32) == np.inf
        assert rounded(np.float64(-7e4), np.float16) == -np.inf
        np.testing.assert_array_equal(rounded(np.array([1e300, 1.5]), np.float32), [np.inf, 1.5])
        assert rounded(np.float64(2.5), np.float32).dtype == np.float32
    same = np.array([1.0, 2.0])
    assert rounded(same, np.float64) is same  # no copy when nothing changes


def test_a_torch_tensor_the_numpy_api_cannot_take_points_to_xentkit_torch():
    """A tensor that requires grad (or one in bfloat16) cannot become a NumPy array: the message
    names the argument, says what came in one line (not the tensor's repr) and where to go."""
    torch = pytest.importorskip("torch")
    for tensor in (torch.randn(3, 4, requires_grad=True), torch.randn(3, 4).bfloat16()):
        dtype = str(tensor.dtype).removeprefix("torch.")
        with pytest.raises(
            TypeError,
            match=rf"^logits must be a numeric array, got a torch tensor of dtype {dtype} and shape \(3, 4\) "
            r"\(the NumPy API takes NumPy arrays; .*use xentkit\.torch",
        ):
            xentkit.cross_entropy(tensor, [0, 1, 2])
    np.testing.assert_allclose(  # a plain CPU tensor converts, as any array-like
        xentkit.cross_entropy(torch.ones(2, 3), [0, 1]), np.log(3.0), rtol=1e-6
    )
