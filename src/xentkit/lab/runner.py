"""Run the lab's experiments end to end: compute, print, and write plots, JSON and the report.

``--out DIR`` receives ``neuron.png`` / ``neuron.json``, ``mnist_accuracy.png`` / ``mnist.json``
and ``report.html``; ``--json PATH`` receives the results once more where the user wants them.
The report is rebuilt after every run from all the results in ``DIR``, so running ``neuron``
and ``mnist`` one after the other into one folder keeps both. Each results file records the
xentkit version, the date and the command that made it (``"provenance"``).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
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
from xentkit.lab.neuron import neuron_results_json, run_neuron_experiment
from xentkit.lab.report import (
    MNIST_JSON,
    MNIST_PLOT,
    NEURON_HEADER,
    NEURON_JSON,
    NEURON_PLOT,
    mnist_summary,
    mnist_table_rows,
    neuron_table_rows,
    plot_mnist,
    plot_neuron,
    provenance,
    require_plotting,
    shortest,
    write_report,
    write_text_file,
)

__all__ = ["run_all", "run_mnist", "run_neuron", "write_json"]


def _json_safe(value: Any) -> Any:
    """``value`` with every NaN or ±inf float (a diverged run's training loss) as None: strict
    JSON has no such numbers, and Python's bare ``NaN`` is not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``data`` as indented JSON, creating the parent folder; a NaN or infinite number is
    written as null."""
    return write_text_file(path, json.dumps(_json_safe(data), indent=1, allow_nan=False) + "\n")


def _command(command: str | None, function: str) -> str:
    """The command to record: the one given, else this Python call and its process."""
    return command or f"{function}() from Python ({shlex.join(sys.argv)})"


def _neuron(output: Output, out_dir: Path, command: str) -> tuple[dict[str, Any], Path]:
    runs = run_neuron_experiment()
    output.line("Single sigmoid neuron (note 003): x = 1.0, y = 0, learning rate 0.15")
    for run in runs:
        output.line(describe_neuron_run(run))
    output.table(neuron_table(NEURON_HEADER, neuron_table_rows(runs)))
    results = neuron_results_json(runs)
    results["provenance"] = provenance(command)
    plot_neuron(runs, out_dir / NEURON_PLOT)
    write_json(results, out_dir / NEURON_JSON)
    # the report follows each experiment, so one stopped later (Ctrl-C in the MNIST run of
    # ``run_all``) leaves a report of the results on disk, not of the run before
    return results, write_report(out_dir, command=command)


def _mnist(
    output: Output,
    out_dir: Path,
    dataset: Dataset,
    losses: Sequence[str],
    settings: MnistSettings,
    command: str,
) -> tuple[dict[str, Any], Path]:
    output.line(f"{dataset.description}.")
    output.line(
        f"Softmax regression 784 → 10, zero init, batch {settings.batch_size}, learning rate "
        f"{shortest(settings.learning_rate)}, {settings.epochs} epoch{'s' if settings.epochs != 1 else ''}, shuffle seed {settings.seed}"
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
    results["provenance"] = provenance(command)
    header, rows = mnist_table_rows(results)
    output.table(
        mnist_table(
            f"Test accuracy per epoch, {results['dataset_title']} ({dataset.train_size:,} train "
            f"/ {dataset.test_size:,} test)",
            header,
            rows,
        )
    )
    output.line(mnist_summary(results))
    plot_mnist(results, out_dir / MNIST_PLOT)
    write_json(results, out_dir / MNIST_JSON)
    return results, write_report(out_dir, command=command)


def run_neuron(
    out_dir: str | Path,
    *,
    json_path: str | Path | None = None,
    output: Output | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """The neuron experiment: prints, writes plot/JSON under ``out_dir`` and rebuilds the
    report there from every result in it; returns the JSON. ``command`` is recorded as the
    command that made the results (default: this Python call)."""
    require_plotting()  # before any work: a missing extra is not found after the run
    output = output or Output()
    out_dir = Path(out_dir)
    command = _command(command, "run_neuron")
    results, report = _neuron(output, out_dir, command)
    if json_path is not None:
        write_json(results, json_path)
    output.line(f"wrote {out_dir / NEURON_PLOT}, {out_dir / NEURON_JSON} and {report}")
    return results


def run_mnist(
    dataset: Dataset,
    out_dir: str | Path,
    *,
    losses: Sequence[str] = LOSSES,
    settings: MnistSettings = MnistSettings(),  # noqa: B008 - frozen dataclass, immutable
    json_path: str | Path | None = None,
    output: Output | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """The MNIST experiment: prints, writes plot/JSON under ``out_dir`` and rebuilds the report
    there from every result in it; returns the JSON. ``command`` as in :func:`run_neuron`."""
    settings.validate(dataset.train_size)  # before any work
    require_plotting()
    output = output or Output()
    out_dir = Path(out_dir)
    command = _command(command, "run_mnist")
    results, report = _mnist(output, out_dir, dataset, losses, settings, command)
    if json_path is not None:
        write_json(results, json_path)
    output.line(f"wrote {out_dir / MNIST_PLOT}, {out_dir / MNIST_JSON} and {report}")
    return results


def run_all(
    dataset: Dataset,
    out_dir: str | Path,
    *,
    losses: Sequence[str] = LOSSES,
    settings: MnistSettings = MnistSettings(),  # noqa: B008 - frozen dataclass, immutable
    json_path: str | Path | None = None,
    output: Output | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Both experiments and one report; returns ``{"neuron": ..., "mnist": ...}``."""
    settings.validate(dataset.train_size)  # before the neuron, not after it
    require_plotting()
    output = output or Output()
    out_dir = Path(out_dir)
    command = _command(command, "run_all")
    neuron_results, _ = _neuron(output, out_dir, command)
    output.line()
    mnist_results, report = _mnist(output, out_dir, dataset, losses, settings, command)
    results = {"neuron": neuron_results, "mnist": mnist_results}
    if json_path is not None:
        write_json(results, json_path)
    output.line(f"wrote the plots, neuron.json, mnist.json and {report}")
    return results
