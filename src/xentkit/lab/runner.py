"""Run the lab's experiments end to end: compute, print, and write plots, JSON and the report.

``--out DIR`` receives ``neuron.png`` / ``neuron.json``, ``mnist_accuracy.png`` / ``mnist.json``
and ``report.html``; ``--json PATH`` receives the results once more where the user wants them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xentkit.lab.console import Output, describe_neuron_run, mnist_table, neuron_table
from xentkit.lab.datasets import Dataset
from xentkit.lab.mnist import (
    LOSSES,
    MnistSettings,
    mnist_results_json,
    train_softmax_regression,
)
from xentkit.lab.neuron import NeuronRun, neuron_results_json, run_neuron_experiment
from xentkit.lab.report import (
    NEURON_HEADER,
    mnist_table_rows,
    neuron_table_rows,
    plot_mnist,
    plot_neuron,
    write_report,
)

__all__ = ["run_all", "run_mnist", "run_neuron", "write_json"]


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``data`` as indented JSON, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def _neuron(output: Output, out_dir: Path) -> tuple[list[NeuronRun], dict[str, Any], Path]:
    runs = run_neuron_experiment()
    output.line("Single sigmoid neuron (seed 003): x = 1.0, y = 0, learning rate 0.15")
    for run in runs:
        output.line(describe_neuron_run(run))
    output.table(neuron_table(NEURON_HEADER, neuron_table_rows(runs)))
    results = neuron_results_json(runs)
    write_json(results, out_dir / "neuron.json")
    plot = plot_neuron(runs, out_dir / "neuron.png")
    return runs, results, plot


def _mnist(
    output: Output,
    out_dir: Path,
    dataset: Dataset,
    losses: Sequence[str],
    settings: MnistSettings,
) -> tuple[dict[str, Any], Path]:
    settings.validate(dataset.train_size)
    output.line(f"{dataset.description}.")
    output.line(
        f"Softmax regression 784 → 10, zero init, batch {settings.batch_size}, learning rate "
        f"{settings.learning_rate:g}, {settings.epochs} epochs, shuffle seed {settings.seed}"
    )
    runs = []
    batches = settings.epochs * (dataset.train_size // settings.batch_size)
    for loss in losses:
        output.line(f"loss: {loss}")
        with output.progress(loss, batches) as advance:
            run = train_softmax_regression(
                dataset,
                loss,
                settings,
                on_batch=advance,
                on_epoch=lambda epoch, acc: output.line(
                    f"Iter {epoch},Testing Accuracy {round(acc, 4)}"
                ),
            )
        runs.append(run)
    results = mnist_results_json(dataset, settings, runs)
    header, rows = mnist_table_rows(results)
    output.table(
        mnist_table(
            f"Test accuracy per epoch, {dataset.name} ({dataset.train_size} train / "
            f"{dataset.test_size} test); seed columns: full MNIST",
            header,
            rows,
        )
    )
    write_json(results, out_dir / "mnist.json")
    plot = plot_mnist(results, out_dir / "mnist_accuracy.png")
    return results, plot


def run_neuron(
    out_dir: str | Path, *, json_path: str | Path | None = None, output: Output | None = None
) -> dict[str, Any]:
    """The neuron experiment: prints, writes plot/JSON/report under ``out_dir``; returns JSON."""
    output = output or Output()
    out_dir = Path(out_dir)
    runs, results, plot = _neuron(output, out_dir)
    report = write_report(out_dir, neuron_runs=runs, neuron_plot=plot)
    if json_path is not None:
        write_json(results, json_path)
    output.line(f"wrote {plot}, {out_dir / 'neuron.json'} and {report}")
    return results


def run_mnist(
    dataset: Dataset,
    out_dir: str | Path,
    *,
    losses: Sequence[str] = LOSSES,
    settings: MnistSettings = MnistSettings(),  # noqa: B008 - frozen dataclass, immutable
    json_path: str | Path | None = None,
    output: Output | None = None,
) -> dict[str, Any]:
    """The MNIST experiment: prints, writes plot/JSON/report under ``out_dir``; returns JSON."""
    output = output or Output()
    out_dir = Path(out_dir)
    results, plot = _mnist(output, out_dir, dataset, losses, settings)
    report = write_report(out_dir, mnist_results=results, mnist_plot=plot)
    if json_path is not None:
        write_json(results, json_path)
    output.line(f"wrote {plot}, {out_dir / 'mnist.json'} and {report}")
    return results


def run_all(
    dataset: Dataset,
    out_dir: str | Path,
    *,
    losses: Sequence[str] = LOSSES,
    settings: MnistSettings = MnistSettings(),  # noqa: B008 - frozen dataclass, immutable
    json_path: str | Path | None = None,
    output: Output | None = None,
) -> dict[str, Any]:
    """Both experiments and one report; returns ``{"neuron": ..., "mnist": ...}``."""
    output = output or Output()
    out_dir = Path(out_dir)
    runs, neuron_results, neuron_plot = _neuron(output, out_dir)
    output.line()
    mnist_results, mnist_plot = _mnist(output, out_dir, dataset, losses, settings)
    report = write_report(
        out_dir,
        neuron_runs=runs,
        neuron_plot=neuron_plot,
        mnist_results=mnist_results,
        mnist_plot=mnist_plot,
    )
    results = {"neuron": neuron_results, "mnist": mnist_results}
    if json_path is not None:
        write_json(results, json_path)
    output.line(f"wrote the plots, neuron.json, mnist.json and {report}")
    return results
