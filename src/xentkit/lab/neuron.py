"""Note 003's single sigmoid neuron: why the quadratic cost learns slowly when badly wrong.

Note 003 is one of the blog notes xentkit reproduces (see the README).

One input ``x = 1.0`` with target ``y = 0``, output ``a = σ(z)`` with ``z = w·x + b``, plain
gradient descent at learning rate 0.15 for 300 iterations, from two starts:

- ``(w, b) = (0.6, 0.9)``: first output σ(1.5) ≈ 0.82;
- ``(w, b) = (2.0, 2.0)``: first output σ(4.0) ≈ 0.98.

Two costs (Nielsen, *Neural Networks and Deep Learning*, chapter 3):

- quadratic ``C = (y − a)² / 2``, so ``∂C/∂z = (a − y)·σ'(z)``: σ'(z) = a(1 − a) is tiny when
  the neuron saturates, so the start at 0.98 barely moves at first (0.82 → 0.09 but
  0.98 → 0.20 after 300 iterations);
- binary cross-entropy on the logit, ``C = −[y log a + (1 − y) log(1 − a)]``, so
  ``∂C/∂z = a − y``: the gradient is large exactly when the output is wrong.

Convention: ``outputs[k]`` is the output after ``k`` updates, ``k = 0 … iterations``, so
``outputs[0]`` is the first output and ``outputs[-1]`` the one after all 300 updates. (Reading
the output before the 300th update instead, ``outputs[-2]``, rounds to the same two decimals.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

import xentkit

__all__ = [
    "COSTS",
    "ITERATIONS",
    "LEARNING_RATE",
    "SEED_RESULTS",
    "STARTS",
    "NeuronRun",
    "run_neuron_experiment",
    "train_neuron",
]

COSTS = ("quadratic", "cross-entropy")
STARTS: tuple[tuple[float, float], ...] = ((0.6, 0.9), (2.0, 2.0))
LEARNING_RATE = 0.15
ITERATIONS = 300
INPUT = 1.0
TARGET = 0.0

#: What note 003 reports: start → (first output, quadratic output after 300 iterations).
SEED_RESULTS = {(0.6, 0.9): (0.82, 0.09), (2.0, 2.0): (0.98, 0.20)}


@dataclass
class NeuronRun:
    """One training run of the single neuron.

    Attributes:
        start: the initial ``(w, b)``.
        cost: ``"quadratic"`` or ``"cross-entropy"``.
        learning_rate: the gradient-descent step.
        outputs: ``outputs[k]`` is σ(w·x + b) after ``k`` updates (length iterations + 1).
        costs: the cost at the same points.
    """

    start: tuple[float, float]
    cost: str
    learning_rate: float
    outputs: list[float] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)

    @property
    def first_output(self) -> float:
        """The output before any update."""
        return self.outputs[0]

    @property
    def final_output(self) -> float:
        """The output after the last update."""
        return self.outputs[-1]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NeuronRun:
        """The run back from :meth:`to_json`'s object (what ``neuron.json`` holds)."""
        w, b = (float(value) for value in data["start"])
        return cls(
            start=(w, b),
            cost=str(data["cost"]),
            learning_rate=float(data["learning_rate"]),
            outputs=[float(value) for value in data["outputs"]],
            costs=[float(value) for value in data["costs"]],
        )

    def to_json(self) -> dict[str, Any]:
        """The run as the JSON object the lab writes."""
        return {
            "start": list(self.start),
            "cost": self.cost,
            "learning_rate": self.learning_rate,
            "iterations": len(self.outputs) - 1,
            "first_output": self.first_output,
            "final_output": self.final_output,
            "outputs": self.outputs,
            "costs": self.costs,
        }


def _cost_and_dz(cost: str, z: float, a: float, y: float) -> tuple[float, float]:
    """The cost at output ``a`` and its derivative with respect to the logit ``z``."""
    if cost == "quadratic":
        # Nielsen's C = (y − a)²/2; dC/dz = (a − y)·σ'(z) with σ'(z) = a(1 − a).
        return 0.5 * (a - y) ** 2, (a - y) * a * (1.0 - a)
    # Binary cross-entropy on the logit: dC/dz = a − y, no σ'(z) factor.
    loss, dz = xentkit.binary_cross_entropy_with_logits_and_grad(
        np.array([z], dtype=np.float64), np.array([y], dtype=np.float64)
    )
    return float(loss), float(np.asarray(dz).reshape(-1)[0])


def train_neuron(
    start: tuple[float, float],
    cost: str,
    *,
    learning_rate: float = LEARNING_RATE,
    iterations: int = ITERATIONS,
    x: float = INPUT,
    y: float = TARGET,
) -> NeuronRun:
    """Train the neuron ``a = σ(w·x + b)`` on one example by plain gradient descent.

    Args:
        start: the initial ``(w, b)``.
        cost: ``"quadratic"`` (``(y − a)²/2``) or ``"cross-entropy"`` (binary, on the logit).
        learning_rate: the step; iterations: the number of updates.
        x, y: the single input and its target.

    Returns:
        The :class:`NeuronRun` with ``iterations + 1`` outputs and costs.
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {list(COSTS)}, got {cost!r}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    w, b = (float(value) for value in start)
    run = NeuronRun(start=(w, b), cost=cost, learning_rate=learning_rate)
    for step in range(iterations + 1):
        z = w * x + b
        a = float(xentkit.sigmoid(np.array(z, dtype=np.float64)))
        value, dz = _cost_and_dz(cost, z, a, y)
        run.outputs.append(a)
        run.costs.append(value)
        if step == iterations:
            break
        w -= learning_rate * dz * x  # ∂C/∂w = ∂C/∂z · x
        b -= learning_rate * dz  # ∂C/∂b = ∂C/∂z
    return run


def run_neuron_experiment(
    *,
    starts: tuple[tuple[float, float], ...] = STARTS,
    learning_rate: float = LEARNING_RATE,
    iterations: int = ITERATIONS,
) -> list[NeuronRun]:
    """All four runs: each start under the quadratic cost, then under cross-entropy."""
    return [
        train_neuron(start, cost, learning_rate=learning_rate, iterations=iterations)
        for start in starts
        for cost in COSTS
    ]


def neuron_results_json(runs: list[NeuronRun]) -> dict[str, Any]:
    """``{"runs": [...]}`` plus the settings and note 003's numbers."""
    return {
        "experiment": "neuron",
        "input": INPUT,
        "target": TARGET,
        "note_003": [
            {"start": list(start), "first_output": first, "quadratic_final_output": final}
            for start, (first, final) in SEED_RESULTS.items()
        ],
        "runs": [run.to_json() for run in runs],
    }
