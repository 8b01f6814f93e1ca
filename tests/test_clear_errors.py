"""Bad input gets the same clear error on every path (issue: consistent errors)."""

from __future__ import annotations

import numpy as np
import pytest

import xentkit


@pytest.mark.parametrize(
    ("function", "name"),
    [
        (lambda: xentkit.softmax(np.zeros((3, 0))), "x"),
        (lambda: xentkit.log_softmax(np.zeros((3, 0))), "x"),
        (lambda: xentkit.logsumexp(np.zeros((3, 0))), "x"),
        (lambda: xentkit.nll_loss(np.zeros((3, 0)), [0, 0, 0]), "log_probs"),
        (lambda: xentkit.cross_entropy(np.zeros((3, 0)), [0, 0, 0]), "logits"),
        (lambda: xentkit.entropy(np.zeros((3, 0))), "p"),
    ],
)
def test_zero_classes_is_a_clear_error(function, name):
    with pytest.raises(ValueError, match=rf"^{name} must have at least one class along axis 1, got shape \(3, 0\)$"):
        function()


def test_one_pos_weight_applies_to_a_scalar_input():
    loss = xentkit.binary_cross_entropy_with_logits(1.0, 1.0, pos_weight=[2.0])
    np.testing.assert_allclose(loss, -2.0 * np.log(1.0 / (1.0 + np.exp(-1.0))), rtol=1e-12)


def test_out_may_not_overlap_weight_or_target():
    logits = np.random.default_rng(0).standard_normal((2, 4))
    buffer = np.ones((2, 4))
    with pytest.raises(ValueError, match="out must not overlap weight"):
        xentkit.cross_entropy_and_grad(logits, [0, 1], weight=buffer[0], out=buffer)
    probabilities = np.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="out must not overlap target"):
        xentkit.cross_entropy_and_grad(logits, probabilities, out=probabilities)


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_range_labels_give_one_error_on_every_path(backend, dtype):
    import xentkit.torch as xt

    logits = torch.randn(3, 4).to(dtype)
    message = r"target has label 9 at position \(1,\) but logits have 4 classes"
    with pytest.raises(ValueError, match=message):
        xt.cross_entropy(logits, torch.tensor([0, 9, 1]), backend=backend)
    with pytest.raises(ValueError, match=message):
        xt.nll_loss(torch.log_softmax(logits.float(), 1).to(dtype), torch.tensor([0, 9, 1]))


@pytest.mark.parametrize("path", ["api", "torch", "module"])
def test_the_probabilities_warning_points_at_the_users_call(path):
    import xentkit.torch as xt

    probabilities = np.full((2, 3), 1 / 3)
    calls = {
        "api": lambda: xentkit.cross_entropy(probabilities, [0, 1]),
        "torch": lambda: xt.cross_entropy(torch.from_numpy(probabilities), torch.tensor([0, 1])),
        "module": lambda: xt.CrossEntropyLoss()(torch.from_numpy(probabilities), torch.tensor([0, 1])),
    }
    with pytest.warns(xentkit.ProbabilitiesAsLogitsWarning) as caught:
        calls[path]()
    assert caught[0].filename == __file__
