"""The lab's outputs: PNG plots (matplotlib, Agg) and one self-contained ``report.html``.

The report holds the tables, the plots embedded as base64 ``data:`` URIs and two sentences per
experiment saying what they show, so it opens anywhere with no other file beside it.
matplotlib is imported inside the functions that draw.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xentkit._extras import require
from xentkit.lab.neuron import SEED_RESULTS, NeuronRun

__all__ = [
    "mnist_summary",
    "neuron_summary",
    "plot_mnist",
    "plot_neuron",
    "write_report",
]


def _pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend."""
    matplotlib = require("matplotlib", "lab", "the lab's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(run: NeuronRun) -> str:
    w, b = run.start
    return f"{run.cost}, (w, b) = ({w:g}, {b:g}), first output {run.first_output:.2f}"


def plot_neuron(runs: Sequence[NeuronRun], path: str | Path) -> Path:
    """Output and cost per iteration for every run, side by side; returns the PNG path."""
    plt = _pyplot()
    figure, (output_axes, cost_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {
        start: f"C{index}" for index, start in enumerate(dict.fromkeys(r.start for r in runs))
    }
    for run in runs:
        style = "-" if run.cost == "quadratic" else "--"
        for axes, values in ((output_axes, run.outputs), (cost_axes, run.costs)):
            axes.plot(values, style, color=colors[run.start], label=_label(run))
    output_axes.set(xlabel="iteration", ylabel="output a = σ(w·1 + b)", ylim=(0, 1),
                    title="Single neuron, target y = 0")  # fmt: skip
    cost_axes.set(xlabel="iteration", ylabel="cost (log scale)", yscale="log",
                  title="Cost per iteration")  # fmt: skip
    output_axes.legend(fontsize=8, loc="upper right")
    output_axes.grid(alpha=0.3)
    cost_axes.grid(alpha=0.3)
    return _save(plt, figure, path)


def plot_mnist(results: dict[str, Any], path: str | Path) -> Path:
    """Test accuracy per epoch for every loss (and the seed's two curves, dotted)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    colors = {
        loss: f"C{index}"
        for index, loss in enumerate(("quadratic", "double-softmax", "cross-entropy"))
    }
    for loss, run in results["runs"].items():
        accuracy = run["test_accuracy"]
        axes.plot(
            range(len(accuracy)), accuracy, "o-", markersize=3, color=colors.get(loss), label=loss
        )
    for loss, accuracy in results.get("seed_003_test_accuracy", {}).items():
        name = "quadratic" if loss == "quadratic" else "'cross-entropy' (double-softmax)"
        axes.plot(range(len(accuracy)), accuracy, ":", color=colors.get(loss), alpha=0.8,
                  label=f"seed 003 {name}, full MNIST")  # fmt: skip
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set(xlabel="epoch (the seed's Iter)", ylabel="test accuracy",
             title=f"Softmax regression on {results['dataset']} "
                   f"({results['train_size']} train / {results['test_size']} test)")  # fmt: skip
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    return _save(plt, figure, path)


def _save(plt: Any, figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def neuron_summary(runs: Sequence[NeuronRun]) -> str:
    """Two sentences: the quadratic cost's slowdown, and cross-entropy's lack of it."""
    quadratic = [run for run in runs if run.cost == "quadratic"]
    entropy = [run for run in runs if run.cost == "cross-entropy"]
    slowest = max((run.final_output for run in quadratic), default=0.0)
    moves = " but ".join(
        f"the neuron starting at {run.first_output:.2f} falls "
        f"{'only ' if run.final_output == slowest else ''}to {run.final_output:.2f}"
        for run in quadratic
    )
    steps = len(runs[0].outputs) - 1 if runs else 0
    first = (
        f"Under the quadratic cost {moves} after {steps} iterations: the worse start learns "
        "slower, because the gradient carries σ'(z), which vanishes when the neuron saturates."
    )
    finals = " and ".join(f"{run.final_output:.3f}" for run in entropy)
    second = (
        f"Cross-entropy drops σ'(z) from the gradient (it is a − y), so both starts fall fast, "
        f"to {finals}, the worse start learning fastest at first."
    )
    return f"{first} {second}"


def mnist_summary(results: dict[str, Any]) -> str:
    """Two sentences: the accuracies after the first and the last epoch, and why they differ."""
    runs = results["runs"]

    def ranking(epoch: int) -> str:
        order = sorted(runs, key=lambda loss: -runs[loss]["test_accuracy"][epoch])
        return ", ".join(f"{loss} {runs[loss]['test_accuracy'][epoch]:.4f}" for loss in order)

    epochs = len(next(iter(runs.values()))["test_accuracy"])
    first = (
        f"On {results['dataset']} ({results['train_size']} train / {results['test_size']} test) "
        f"the test accuracy after the first epoch is {ranking(0)}, and after {epochs} epochs "
        f"{ranking(-1)}."
    )
    second = (
        "Only the correct cross-entropy hands the full error softmax − onehot back to the logits; "
        "the quadratic cost multiplies it by the softmax Jacobian, and the seed's double softmax "
        "pushes probabilities in [0, 1] through a second softmax, whose output is nearly uniform "
        "and whose gradient is small, so both learn more slowly."
    )
    return f"{first} {second}"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def neuron_table_rows(runs: Sequence[NeuronRun]) -> list[list[str]]:
    """Rows: start, cost, first output, final output, the seed's final output."""
    rows = []
    for run in runs:
        seed = SEED_RESULTS.get(tuple(run.start))
        seed_final = f"{seed[1]:.2f}" if seed and run.cost == "quadratic" else "much lower"
        rows.append([
            f"({run.start[0]:g}, {run.start[1]:g})", run.cost, f"{run.first_output:.4f}",
            f"{run.final_output:.4f}", seed_final,
        ])  # fmt: skip
    return rows


NEURON_HEADER = ("start (w, b)", "cost", "first output", "output after 300", "seed 003")


def mnist_table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per epoch, one column per loss, then the seed's two columns."""
    runs = results["runs"]
    seed = results.get("seed_003_test_accuracy", {})
    header = ["Iter", *runs, *(f"seed 003 {loss}" for loss in seed)]
    epochs = len(next(iter(runs.values()))["test_accuracy"])
    rows = []
    for epoch in range(epochs):
        row = [str(epoch)]
        row += [f"{runs[loss]['test_accuracy'][epoch]:.4f}" for loss in runs]
        row += [f"{values[epoch]:.4f}" if epoch < len(values) else "" for values in seed.values()]
        rows.append(row)
    return header, rows


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.6rem; text-align: right; }
th { background: #f3f3f3; }
img { max-width: 100%; }
.note { color: #555; font-size: 0.9rem; }
"""


def write_report(
    out_dir: str | Path,
    *,
    neuron_runs: Sequence[NeuronRun] | None = None,
    neuron_plot: Path | None = None,
    mnist_results: dict[str, Any] | None = None,
    mnist_plot: Path | None = None,
) -> Path:
    """Write ``out_dir/report.html`` with whichever experiments are given; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    if neuron_runs is not None:
        parts = [
            "<h2>Single sigmoid neuron: quadratic cost vs cross-entropy</h2>",
            f"<p>{html.escape(neuron_summary(neuron_runs))}</p>",
            '<p class="note">x = 1.0, y = 0, learning rate 0.15, 300 iterations of gradient '
            "descent (seed 003, after Nielsen, chapter 3).</p>",
            _table(NEURON_HEADER, neuron_table_rows(neuron_runs)),
        ]
        if neuron_plot is not None:
            parts.append(f'<img alt="neuron output and cost" src="{_data_uri(neuron_plot)}">')
        sections.append("\n".join(parts))
    if mnist_results is not None:
        header, rows = mnist_table_rows(mnist_results)
        parts = [
            "<h2>Softmax regression on MNIST: three losses</h2>",
            f"<p>{html.escape(mnist_summary(mnist_results))}</p>",
            f'<p class="note">{html.escape(mnist_results.get("description", ""))}. 784 → 10, '
            "zero initialization, mini-batch gradient descent; test accuracy after each epoch. "
            "The seed's columns are its full-MNIST numbers; its 'cross-entropy' applied softmax "
            "twice (double-softmax).</p>",
            _table(header, rows),
        ]
        if mnist_plot is not None:
            parts.append(f'<img alt="test accuracy per epoch" src="{_data_uri(mnist_plot)}">')
        sections.append("\n".join(parts))
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>xentkit lab</title><style>{_STYLE}</style></head><body>"
        "<h1>xentkit lab</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    path = out_dir / "report.html"
    path.write_text(document, encoding="utf-8")
    return path
