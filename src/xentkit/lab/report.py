"""The lab's outputs: PNG plots (matplotlib's Agg canvas) and one self-contained ``report.html``.

Each experiment leaves its results in the output folder (``neuron.json`` + ``neuron.png``,
``mnist.json`` + ``mnist_accuracy.png``); :func:`write_report` builds ``report.html`` from every
result it finds there, so ``xentkit lab neuron`` then ``xentkit lab mnist`` into one folder gives
one report with both. The report holds the tables, the plots embedded as base64 ``data:`` URIs
and, per experiment, sentences written from its numbers (which loss leads, which oscillates),
plus who made it: xentkit's version, the date and the command. It opens anywhere with no other
file beside it. matplotlib is imported inside the functions that draw.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
import secrets
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from xentkit import __version__
from xentkit._extras import require
from xentkit.lab.mnist import SEED_ACCURACY, MnistSettings, dataset_title, is_mnist
from xentkit.lab.neuron import SEED_RESULTS, NeuronRun

__all__ = [
    "EXPERIMENT_FILES",
    "MNIST_JSON",
    "MNIST_PLOT",
    "NEURON_JSON",
    "NEURON_PLOT",
    "REPORT_HTML",
    "AccuracyDrop",
    "MnistFindings",
    "leaders",
    "mnist_figure",
    "mnist_findings",
    "mnist_summary",
    "neuron_figure",
    "neuron_summary",
    "plot_mnist",
    "plot_neuron",
    "provenance",
    "require_plotting",
    "shortest",
    "write_report",
    "write_text_file",
]

#: The files each experiment leaves in the output folder, which the report is built from.
NEURON_JSON, NEURON_PLOT = "neuron.json", "neuron.png"
MNIST_JSON, MNIST_PLOT = "mnist.json", "mnist_accuracy.png"
REPORT_HTML = "report.html"
#: Each experiment's (results, plot) files, by experiment name; every run writes REPORT_HTML too.
EXPERIMENT_FILES = {"neuron": (NEURON_JSON, NEURON_PLOT), "mnist": (MNIST_JSON, MNIST_PLOT)}

#: Resolution of the PNGs. The report shows each at its natural size (CSS pixels are 1/96 in),
#: so a 9-point legend reads as 12 CSS pixels; it shrinks only on screens narrower than that.
PLOT_DPI = 150
CSS_PX_PER_INCH = 96
REPORT_WIDTH_PX = 1024  # the report's text column (64rem); every figure fits in it
LEGEND_FONT_SIZE = 9

#: A fall of the test accuracy between two successive epochs larger than this (and than two
#: test images) is a drop; a loss with at least OSCILLATION_MIN_DROPS drops oscillates.
DROP_THRESHOLD = 0.01
OSCILLATION_MIN_DROPS = 2

_LOSS_COLORS = {"quadratic": "C0", "double-softmax": "C1", "cross-entropy": "C2"}


def require_plotting() -> None:
    """Raise the lab's one-line missing-extra error now when matplotlib, or rich (its terminal
    output), is not installed (the command line calls this before any work or folder)."""
    require("matplotlib", "lab", _PLOTS)
    require("rich.console", "lab", "xentkit lab")


_PLOTS = "xentkit lab (its plots)"


def _new_figure(**options: Any) -> Any:
    """A matplotlib Figure on its own Agg canvas (``options``: the Figure's, e.g. ``figsize``).

    Not through pyplot, whose backend is global: the lab draws without a display and leaves the
    caller's backend (a notebook's inline plots, say) as it was; nor is the figure registered
    with pyplot, so nothing needs closing."""
    require("matplotlib", "lab", _PLOTS)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**options)
    FigureCanvasAgg(figure)
    return figure


def provenance(command: str) -> dict[str, str]:
    """Who made a result: ``{"xentkit": version, "date": local time, "command": command}``.

    An argument that was not UTF-8 reaches Python as lone surrogates, which no UTF-8 file can
    hold: the command is recorded with each such byte as U+FFFD."""
    now = datetime.datetime.now().astimezone()
    return {
        "xentkit": __version__,
        "date": now.isoformat(sep=" ", timespec="seconds"),
        "command": command.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
    }


def shortest(value: float) -> str:
    """``value`` in the fewest digits that give it back (0.2, 0.2000001, 3e+38; an int as it
    is): a setting quoted in a sentence is the setting, not a rounding of it."""
    return str(value) if isinstance(value, int) else repr(float(value))


def write_text_file(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` as UTF-8, whole or not at all (as :func:`_write_file` says).

    (A file name in ``text`` that is not UTF-8 keeps its own bytes: surrogateescape, as the OS
    gave it.)"""
    return _write_file(path, lambda file: file.write(text.encode("utf-8", "surrogateescape")))


def _write_file(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` with ``write`` (given the open binary file), whole or not at all: into a new
    temporary file beside it (a random name, created exclusively, so nothing planted there is
    followed), then renamed over it, so a full disk or an interrupted run leaves the old file as
    it was; the old file's permissions are kept (a new file gets the usual ones, by the umask). A
    link to a regular file is written through (its target replaced); a path that is there but is
    no regular file (a device, a pipe, /dev/stdout) is written as it is, never renamed over.
    Creates the parent folder; an OSError names the file."""
    path = Path(path)
    try:
        target = _regular_target(path)
        if target is None:
            with open(path, "wb") as file:
                write(file)
            return path
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else None
        temporary = _temporary_beside(target)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # (umask applies)
        try:
            with os.fdopen(descriptor, "wb") as file:
                write(file)
            if mode is not None:
                os.chmod(temporary, mode)
            os.replace(temporary, target)
        finally:  # (nothing left behind, whatever stopped it)
            temporary.unlink(missing_ok=True)
    except OSError as error:  # (a full disk fails without naming the file)
        raise OSError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def _regular_target(path: Path) -> Path | None:
    """The regular file :func:`_write_file` replaces for ``path`` (a link's target, written
    through), or None for a path that is there but is no regular file (a device, a pipe,
    /dev/stdout), which is written as it is. (exists and is_file follow links.)"""
    if path.exists() and not path.is_file():
        return None
    return path.resolve() if path.is_symlink() else path


def _temporary_beside(target: Path) -> Path:
    """A new, random name for :func:`_write_file`'s temporary file beside ``target``."""
    return target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")


def check_writable_file(path: str | Path) -> None:
    """Whether :func:`_write_file` could write ``path`` (its folder there), asked before the work
    that makes its contents, so that it fails first: the temporary file that write makes is made
    and removed (folder permissions do not say: root passes ``os.access`` where /proc or a
    read-only mount refuses). A path that is there but is no regular file (a device, a pipe) is
    not opened: a pipe's open waits for its reader, whom an early open would end. An OSError
    names the file, as the write's does."""
    path = Path(path)
    if path.is_dir():  # (a folder where the file goes: the write would fail at the end)
        raise OSError(f"cannot write {path}: a folder is there")
    target = _regular_target(path)
    if target is None or not target.parent.is_dir():  # (a folder the write will make: nothing to try yet)
        return
    temporary = _temporary_beside(target)
    try:
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        temporary.unlink()
    except OSError as error:  # (the temporary file's error: say that it was one beside the file)
        raise OSError(f"cannot write {path}: a new file in its folder: {error.strerror or error}") from None


# ---------------------------------------------------------------------------------------------
# Plots


def _label(run: NeuronRun) -> str:
    w, b = run.start
    return f"{run.cost}, (w, b) = ({w:g}, {b:g}), first output {run.first_output:.2f}"


def neuron_figure(runs: Sequence[NeuronRun]) -> Any:
    """The figure of :func:`plot_neuron`: output and cost per iteration, side by side.

    Each panel has its legend below it, outside the axes, so no legend covers a curve (the
    quadratic cost's plateau from (2, 2) runs along the top of the output panel).
    """
    figure = _new_figure(figsize=(9.6, 5.4))
    output_axes, cost_axes = figure.subplots(1, 2)
    colors = {
        start: f"C{index}" for index, start in enumerate(dict.fromkeys(r.start for r in runs))
    }
    for run in runs:
        style = "-" if run.cost == "quadratic" else "--"
        for axes, values in ((output_axes, run.outputs), (cost_axes, run.costs)):
            axes.plot(values, style, color=colors[run.start], label=_label(run))
    output_axes.set(xlabel="iteration", ylabel="output a = σ(w·1 + b)", ylim=(0, 1),
                    title="Single neuron, target y = 0")  # fmt: skip
    # two different costs: each run's own, not to be compared in size across the two
    cost_axes.set(xlabel="iteration", ylabel="the run's own cost (log scale)", yscale="log",
                  title="Cost per iteration: (y − a)²/2 or −log(1 − a)")  # fmt: skip
    for axes in (output_axes, cost_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=LEGEND_FONT_SIZE, loc="upper center",
                    bbox_to_anchor=(0.5, -0.14), frameon=False)  # fmt: skip
    figure.tight_layout()
    return figure


def plot_neuron(runs: Sequence[NeuronRun], path: str | Path) -> Path:
    """Output and cost per iteration for every run, side by side; returns the PNG path."""
    return _save(neuron_figure(runs), path)


def mnist_figure(results: dict[str, Any]) -> Any:
    """The figure of :func:`plot_mnist`: test accuracy per epoch, the legend below the axes.

    Note 003's two full-MNIST curves are drawn (dotted) only when ``results`` has them, that is
    when the dataset is MNIST.
    """
    figure = _new_figure(figsize=(9.6, 6.0))
    axes = figure.subplots()
    for loss, run in results["runs"].items():
        accuracy = run["test_accuracy"]
        axes.plot(range(len(accuracy)), accuracy, "o-", markersize=3,
                  color=_LOSS_COLORS.get(loss), label=loss)  # fmt: skip
    for loss, accuracy in results.get("note_003_test_accuracy", {}).items():
        name = "quadratic" if loss == "quadratic" else "'cross-entropy' (double-softmax)"
        axes.plot(range(len(accuracy)), accuracy, ":", color=_LOSS_COLORS.get(loss), alpha=0.8,
                  label=f"note 003 {name}, full MNIST")  # fmt: skip
    axes.xaxis.get_major_locator().set_params(integer=True)
    if max(len(run["test_accuracy"]) for run in results["runs"].values()) == 1:
        axes.set_xlim(-0.5, 0.5)  # one epoch: one tick at 0 (the locator would add fractions)
        axes.set_xticks([0])
    axes.set(xlabel="epoch (the note's Iter)", ylabel="test accuracy",
             title=f"Softmax regression on {_plain_text(_title(results))} "
                   f"({results['train_size']:,} train / {results['test_size']:,} test)")  # fmt: skip
    axes.grid(alpha=0.3)
    axes.legend(fontsize=LEGEND_FONT_SIZE, loc="upper center", bbox_to_anchor=(0.5, -0.11),
                ncol=2, frameon=False)  # fmt: skip
    figure.tight_layout()
    return figure


def plot_mnist(results: dict[str, Any], path: str | Path) -> Path:
    """Test accuracy per epoch for every loss (and note 003's two MNIST curves, dotted)."""
    return _save(mnist_figure(results), path)


def _save(figure: Any, path: str | Path) -> Path:
    """Write ``figure`` to ``path``, whole or not at all (:func:`_write_file`): an interrupted save
    leaves no truncated plot for the report to show. The format is the file name's (PNG for the
    lab's files; a caller's ``.svg`` or ``.pdf`` as matplotlib's ``savefig`` would choose it)."""
    extension = Path(path).suffix.lstrip(".").lower() or "png"
    return _write_file(path, lambda file: figure.savefig(file, format=extension, dpi=PLOT_DPI))


# ---------------------------------------------------------------------------------------------
# What the numbers say


def _plain_text(text: str) -> str:
    """``text`` drawn as written by matplotlib: a ``$`` in a file name is not math markup, and a
    byte of a file name that is not UTF-8 (a lone surrogate, which the font cannot take) is
    drawn as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("$", r"\$")


def _title(results: dict[str, Any]) -> str:
    return str(results.get("dataset_title") or dataset_title(str(results["dataset"])))


def _first_below(run: NeuronRun, fall: float) -> int | None:
    """The first iteration at which the output is ``fall`` below the first output."""
    return next((k for k, a in enumerate(run.outputs) if a < run.first_output - fall), None)


def neuron_summary(runs: Sequence[NeuronRun]) -> str:
    """Sentences from the runs: how far each start falls under each cost, and how soon."""
    if not runs:
        return "No run."
    steps = len(runs[0].outputs) - 1
    sentences = []
    quadratic = sorted((r for r in runs if r.cost == "quadratic"), key=lambda r: r.first_output)
    entropy = sorted((r for r in runs if r.cost == "cross-entropy"), key=lambda r: r.first_output)
    if quadratic:
        slowest = max(run.final_output for run in quadratic)
        moves = " but ".join(
            f"the neuron starting at {run.first_output:.2f} falls "
            f"{'only ' if len(quadratic) > 1 and run.final_output == slowest else ''}"
            f"to {run.final_output:.2f}"
            for run in quadratic
        )
        text = f"Under the quadratic cost {moves} after {steps} iterations"
        worst = quadratic[-1]
        if len(quadratic) > 1 and worst.final_output == slowest:
            text += (
                ": the worse start learns slower, because the gradient carries σ'(z), which "
                "vanishes when the neuron saturates"
            )
        plateau = _first_below(worst, 0.1)
        text += (
            f" (from {worst.first_output:.2f} it needs {plateau} iterations to fall by 0.1)."
            if plateau is not None
            else f" (from {worst.first_output:.2f} it never falls by 0.1)."
        )
        sentences.append(text)
    if entropy:
        falls = " and ".join(
            f"from {run.first_output:.2f} to {run.final_output:.3f}" for run in entropy
        )
        worst = entropy[-1]
        soon = _first_below(worst, 0.1)
        text = (
            f"Cross-entropy drops σ'(z) from the gradient (it is a − y): in {steps} iterations "
            f"the output falls {falls}"
        )
        if soon is not None:
            text += f", and from {worst.first_output:.2f} it falls by 0.1 in {soon} iterations"
        sentences.append(text + ".")
    return " ".join(sentences)


@dataclass(frozen=True)
class AccuracyDrop:
    """A fall of the test accuracy from after epoch ``epoch - 1`` to after ``epoch``."""

    epoch: int
    before: float
    after: float


@dataclass(frozen=True)
class MnistFindings:
    """What the MNIST results show, computed from them (the report's text says these).

    Attributes:
        epochs: the number of epochs.
        first, final, mean: per loss, the test accuracy after the first and the last epoch and
            its mean over all epochs (the table's last row).
        drop_threshold: a fall between two epochs counted as a drop is larger than this
            (0.01, or two test images where those are more).
        drop_text: that threshold as the report says it.
        drops: per loss, every such drop.
        learning_rate: the learning rate of the runs.
        test_accuracy: per loss, the test accuracy after each epoch.
        diverged: per loss whose training diverged, the first epoch (Iter) whose mean training
            loss is not a finite number (null in the JSON).
    """

    epochs: int
    first: dict[str, float]
    final: dict[str, float]
    mean: dict[str, float]
    drop_threshold: float
    drop_text: str
    drops: dict[str, tuple[AccuracyDrop, ...]]
    learning_rate: float
    test_accuracy: dict[str, tuple[float, ...]]
    diverged: dict[str, int]

    def oscillates(self, loss: str) -> bool:
        """At least :data:`OSCILLATION_MIN_DROPS` drops."""
        return len(self.drops[loss]) >= OSCILLATION_MIN_DROPS


def leaders(values: dict[str, float]) -> list[str]:
    """The losses with the highest value at the four decimals the tables print."""
    best = max(round(value, 4) for value in values.values())
    return [loss for loss, value in values.items() if round(value, 4) == best]


def mnist_findings(results: dict[str, Any]) -> MnistFindings:
    """Leaders and drops of the test accuracy, from a ``mnist.json`` object."""
    runs = {loss: [float(a) for a in run["test_accuracy"]] for loss, run in results["runs"].items()}
    epochs = len(next(iter(runs.values())))
    test_size = int(results["test_size"])
    # counted in whole test images (accuracies are multiples of 1/test_size): a fall of two
    # images is never "more than 2/test_size", however either is rounded
    least = max(2.0, round(DROP_THRESHOLD * test_size, 9))  # a drop is more images than this
    by_images = least == 2.0 and 2 / test_size > DROP_THRESHOLD
    threshold = 2 / test_size if by_images else DROP_THRESHOLD
    drop_text = f"two of the {test_size:,} test images ({threshold:.4g})" if by_images else f"{threshold:g}"
    if by_images and test_size <= 2:  # (no fall can be larger than every test image)
        drop_text = f"two test images, more than the {test_size} there {'is' if test_size == 1 else 'are'}"
    drops = {
        loss: tuple(
            AccuracyDrop(epoch, accuracy[epoch - 1], accuracy[epoch])
            for epoch in range(1, len(accuracy))
            if round((accuracy[epoch - 1] - accuracy[epoch]) * test_size) > least
        )
        for loss, accuracy in runs.items()
    }
    return MnistFindings(
        epochs=epochs,
        first={loss: accuracy[0] for loss, accuracy in runs.items()},
        final={loss: accuracy[-1] for loss, accuracy in runs.items()},
        mean={loss: sum(accuracy) / len(accuracy) for loss, accuracy in runs.items()},
        drop_threshold=threshold,
        drop_text=drop_text,
        drops=drops,
        learning_rate=float(results.get("settings", {}).get("learning_rate", float("nan"))),
        test_accuracy={loss: tuple(accuracy) for loss, accuracy in runs.items()},
        diverged=_diverged(results["runs"]),
    )


def _diverged(runs: dict[str, Any]) -> dict[str, int]:
    """Per run whose mean training loss stopped being a finite number, the first such epoch."""
    found = {}
    for loss, run in runs.items():
        losses = run.get("train_loss") or [] if isinstance(run, dict) else []
        first = next((k for k, value in enumerate(losses) if value is None or not math.isfinite(value)), None)
        if first is not None:
            found[loss] = first
    return found


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _ranking(values: dict[str, float]) -> str:
    order = sorted(values, key=lambda loss: -values[loss])
    return ", ".join(f"{loss} {values[loss]:.4f}" for loss in order)


def _leads(values: dict[str, float], *, past: bool = False) -> str:
    first = leaders(values)
    if len(first) == 1:
        return f"{first[0]} {'led' if past else 'leads'}"
    return f"{_join(first)} {'tied' if past else 'tie'} for the lead"


def mnist_summary(results: dict[str, Any]) -> str:
    """Sentences from the numbers: which loss leads at the end, on average and after the first
    epoch; which losses' test accuracy drops or oscillates; why, when the data agrees."""
    return _mnist_sentences(results, mnist_findings(results))


def _mnist_sentences(results: dict[str, Any], found: MnistFindings) -> str:
    """:func:`mnist_summary` from findings already computed from ``results``."""
    title = _title(results)
    where = f"On {title} ({results['train_size']:,} train / {results['test_size']:,} test)"
    epochs = f"{found.epochs} epoch{'s' if found.epochs != 1 else ''}"
    losses = list(found.final)
    if len(losses) == 1:
        (loss,) = losses
        sentences = [
            f"{where} the test accuracy of {loss} is {found.final[loss]:.4f} after {epochs} "
            f"(mean over the epochs {found.mean[loss]:.4f})."
        ]
    else:
        sentences = [f"{where}, after {epochs} {_leads(found.final)}: {_ranking(found.final)}."]
        if found.epochs > 1:
            sentences.append(
                f"Averaged over the {found.epochs} epochs {_leads(found.mean)}: "
                f"{_ranking(found.mean)}; after the first epoch {_leads(found.first, past=True)}: "
                f"{_ranking(found.first)}."
            )
    if found.epochs > 1:
        sentences += _drop_sentences(found)
    sentences += [
        f"Under {loss} the training diverged at learning rate {shortest(found.learning_rate)}: its "
        f"mean training loss is not a finite number from Iter {epoch} on, so its accuracy from "
        "there measures overflowed weights (a smaller --lr avoids it)."
        for loss, epoch in found.diverged.items()
    ]
    if "cross-entropy" in losses and len(losses) > 1 and leaders(found.first) == ["cross-entropy"]:
        others = []
        if "quadratic" in losses:
            others.append("the quadratic cost multiplies that error by the softmax Jacobian")
        if "double-softmax" in losses:
            others.append(
                "the double softmax of note 003's code pushes probabilities in [0, 1] through a "
                "second softmax, whose gradient is small"
            )
        sentences.append(
            "Cross-entropy's head start comes from its gradient: it hands the full error "
            f"softmax − onehot to the logits, while {_join(others)}."
        )
    if "note_003_test_accuracy" in results:
        reference = results["note_003_test_accuracy"]
        ends = _join([f"{loss} {values[-1]:.4f}" for loss, values in reference.items()])
        epochs, note_epochs = len(next(iter(reference.values()))), len(SEED_ACCURACY["quadratic"])
        when = "end at" if epochs >= note_epochs else f"reach, after the same {epochs} of their {note_epochs} epochs,"
        settings, note = results["settings"], MnistSettings()  # the defaults are the note's
        differ = [
            f"{name} {shortest(settings[key])} (the note's {shortest(getattr(note, key))})"
            for key, name in (("learning_rate", "learning rate"), ("batch_size", "batch size"))
            if settings[key] != getattr(note, key)
        ]
        other = f" Note that this run's {_join(differ)} differ{'s' if len(differ) == 1 else ''}." if differ else ""
        sentences.append(
            f"Note 003's runs on the full MNIST (dotted in the plot, last columns of the table) "
            f"{when} {ends}.{other}"
        )
    else:
        known = dataset_title(results["dataset"]) != results["dataset"]  # a --dataset name
        hint = "" if known else " (for MNIST digits loaded with --data, add --dataset mnist)"
        sentences.append(
            f"Note 003's reference curves are full-MNIST numbers, so they are not shown for "
            f"{title}{hint}."
        )
    return " ".join(sentences)


def _drop_sentences(found: MnistFindings) -> list[str]:
    threshold = found.drop_text
    sentences = []
    steady = []
    for loss, drops in found.drops.items():
        if found.oscillates(loss):
            start = drops[0].epoch - 1
            swing = found.test_accuracy[loss][start:]
            sentences.append(
                f"Under {loss} the test accuracy oscillates at learning rate {shortest(found.learning_rate)}: "
                f"it falls by more than {threshold} from one epoch to the next {len(drops)} "
                f"times, swinging between {min(swing):.4f} and {max(swing):.4f} from Iter "
                f"{start} on."
            )
        elif drops:
            (drop,) = drops
            sentences.append(
                f"Under {loss} the test accuracy falls once by more than {threshold} (Iter "
                f"{drop.epoch - 1} → {drop.epoch}: {drop.before:.4f} → {drop.after:.4f}), "
                "too few drops to call it oscillating."
            )
        else:
            steady.append(loss)
    if steady and len(steady) == len(found.drops):
        sentences.append(
            f"No loss's test accuracy falls by more than {threshold} from one epoch to the next: "
            f"none oscillates at learning rate {shortest(found.learning_rate)}."
        )
    elif steady:
        sentences.append(
            f"Under {_join(steady)} it never falls by more than {threshold} from one epoch to the next."
        )
    return sentences


# ---------------------------------------------------------------------------------------------
# Tables


def neuron_table_rows(runs: Sequence[NeuronRun]) -> list[list[str]]:
    """Rows: start, cost, first output, final output, note 003's final output."""
    rows = []
    for run in runs:
        note = SEED_RESULTS.get(tuple(run.start))
        # the note gives numbers for the quadratic cost only; of cross-entropy it says that its
        # gradient grows with the error, so it learns fastest where it is most wrong
        note_final = f"{note[1]:.2f}" if note and run.cost == "quadratic" else "no number given"
        rows.append([
            f"({run.start[0]:g}, {run.start[1]:g})", run.cost, f"{run.first_output:.4f}",
            f"{run.final_output:.4f}", note_final,
        ])  # fmt: skip
    return rows


NEURON_HEADER = ("start (w, b)", "cost", "first output", "output after 300", "note 003")


def mnist_table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per epoch and a last row ``mean`` (over the epochs), one column
    per loss, then note 003's two full-MNIST columns when the dataset is MNIST."""
    runs = results["runs"]
    reference = results.get("note_003_test_accuracy", {})
    # (the note's columns are its full-MNIST runs: said beside each table, kept short here so
    # that the console table fits 80 columns)
    header = ["Iter", *runs, *(f"note 003 {loss}" for loss in reference)]
    epochs = len(next(iter(runs.values()))["test_accuracy"])
    rows = []
    for epoch in range(epochs):
        row = [str(epoch)]
        row += [f"{runs[loss]['test_accuracy'][epoch]:.4f}" for loss in runs]
        row += [
            f"{values[epoch]:.4f}" if epoch < len(values) else "" for values in reference.values()
        ]
        rows.append(row)
    mean = ["mean"]
    mean += [f"{sum(runs[loss]['test_accuracy']) / epochs:.4f}" for loss in runs]
    mean += [  # over the same epochs as ours, or nothing
        f"{sum(values[:epochs]) / epochs:.4f}" if epochs <= len(values) else ""
        for values in reference.values()
    ]
    rows.append(mean)
    return header, rows


# ---------------------------------------------------------------------------------------------
# The report


_PNG_START = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"  # the signature, then the IHDR chunk
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk, empty, with its CRC


def _png_size(data: bytes) -> tuple[float, float]:
    """The PNG's natural size in CSS pixels: its pixels at its own resolution (pHYs), else at
    :data:`PLOT_DPI`; a ValueError when ``data`` is no whole PNG (an interrupted save)."""
    if not (data.startswith(_PNG_START) and data.endswith(_PNG_END) and len(data) >= 24):
        raise ValueError(
            f"expected a whole PNG image, received {len(data)} bytes"
            + ("" if data.startswith(_PNG_START) else " without the PNG signature")
        )
    width, height = struct.unpack(">II", data[16:24])
    dpi = float(PLOT_DPI)
    at = data.find(b"pHYs", 0, 4096)
    if 0 < at <= len(data) - 13:
        per_meter, _, unit = struct.unpack(">IIB", data[at + 4 : at + 13])
        if unit == 1 and per_meter:
            dpi = per_meter * 0.0254
    scale = CSS_PX_PER_INCH / dpi
    return width * scale, height * scale


def _figure(path: Path, alt: str) -> str:
    """The plot as an ``<img>`` holding its data; a file that cannot be read or is no whole PNG
    gives a note naming it instead (the section keeps its text and table)."""
    try:
        data = path.read_bytes()
        width, height = _png_size(data)
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        problem = f"{path.name} cannot be shown ({reason}); the plot is left out."
        return f'<p class="note">{html.escape(problem)}</p>'
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (
        f'<img class="plot" alt="{html.escape(alt)}" width="{round(width)}" '
        f'height="{round(height)}" src="{uri}">'
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _made_by(results: dict[str, Any]) -> str:
    made = results.get("provenance")
    if not isinstance(made, dict):
        return '<p class="made">Made by: not recorded (results from an older xentkit).</p>'
    return (
        f'<p class="made">Made on {html.escape(str(made.get("date", "?")))} by xentkit '
        f"{html.escape(str(made.get('xentkit', '?')))} with "
        f"<code>{html.escape(str(made.get('command', '?')))}</code>.</p>"
    )


def _neuron_section(results: dict[str, Any], plot: Path | None) -> str:
    runs = [NeuronRun.from_json(run) for run in results["runs"]]
    if not runs:
        raise ValueError("no run")
    rates = " / ".join(f"{rate:g}" for rate in dict.fromkeys(run.learning_rate for run in runs))
    parts = [
        "<h2>Single sigmoid neuron: quadratic cost vs cross-entropy</h2>",
        _made_by(results),
        f"<p>{html.escape(neuron_summary(runs))}</p>",
        f'<p class="note">x = {results.get("input", 1.0):g}, y = {results.get("target", 0.0):g}, '
        f"learning rate {rates}, {len(runs[0].outputs) - 1} iterations of gradient descent "
        "(note 003, after Nielsen, chapter 3). The last column is what note 003 reports: outputs "
        "for the quadratic cost only; of cross-entropy it says that the gradient grows with the "
        "error, so that the neuron learns fastest where it is most wrong.</p>",
        _table(NEURON_HEADER, neuron_table_rows(runs)),
    ]
    if plot is not None:
        parts.append(_figure(plot, "neuron output and cost per iteration"))
    return "\n".join(parts)


def _updates_per_epoch(results: dict[str, Any], settings: dict[str, Any]) -> str:
    """The sentence that says an epoch here is not the note's (550 updates of 100 images), or ''."""
    train, batch = results.get("train_size"), settings.get("batch_size")
    if not isinstance(train, int) or not isinstance(batch, int) or batch <= 0 or train // batch == 550:
        return ""
    return (
        f" Its epochs are 550 updates each, these {train // batch:,}: compare the curves at equal "
        "updates, not at equal epochs."
    )


def _mnist_section(results: dict[str, Any], plot: Path | None) -> str:
    runs = results["runs"]
    lengths = {len(run["test_accuracy"]) for run in runs.values()}
    if not runs or len(lengths) != 1 or 0 in lengths:
        raise ValueError("expected runs with test accuracies of one common, non-zero length")
    found = mnist_findings(results)  # once: the text and the note below both say them
    header, rows = mnist_table_rows(results)
    count = {1: "one loss", 2: "two losses", 3: "three losses"}.get(
        len(runs), f"{len(runs)} losses"
    )
    settings = results.get("settings", {})
    reference = (
        " The note 003 columns are its full-MNIST numbers (55,000 train / 10,000 test); its "
        "'cross-entropy' applied softmax twice (double-softmax)." + _updates_per_epoch(results, settings)
        if "note_003_test_accuracy" in results
        else ""
    )
    parts = [
        f"<h2>Softmax regression on {html.escape(_title(results))}: {count}</h2>",
        _made_by(results),
        f"<p>{html.escape(_mnist_sentences(results, found))}</p>",
        f'<p class="note">{html.escape(str(results.get("description", "")))}. 784 → 10, zero '
        f"initialization, mini-batch {html.escape(str(settings.get('batch_size', '?')))}, gradient "
        f"descent at learning rate {html.escape(str(settings.get('learning_rate', '?')))}, shuffling "
        f"seed {html.escape(str(settings.get('seed', '?')))}; test accuracy after each epoch, and its mean over the "
        f"epochs in the last row. A drop is a fall of more than "
        f"{found.drop_text} between two successive epochs; "
        f"{OSCILLATION_MIN_DROPS} or more drops make an oscillation.{html.escape(reference)}</p>",
        _table(header, rows),
    ]
    if plot is not None:
        parts.append(_figure(plot, "test accuracy per epoch"))
    return "\n".join(parts)


_STYLE = f"""
body {{ font-family: system-ui, sans-serif; max-width: {REPORT_WIDTH_PX / 16:g}rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-variant-numeric: tabular-nums; }}
th, td {{ border: 1px solid #ccc; padding: 0.2rem 0.6rem; text-align: right; }}
th {{ background: #f3f3f3; }}
img.plot {{ display: block; max-width: 100%; height: auto; }}
.note, .made {{ color: #555; font-size: 0.9rem; }}
.made code {{ font-size: 0.85rem; }}
"""


def _load(path: Path, experiment: str) -> dict[str, Any]:
    results = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(results, dict) or results.get("experiment") != experiment:
        raise ValueError(f'expected an object with "experiment": "{experiment}"')
    # Older results name note 003's curves seed_003_test_accuracy and hold them for any data.
    legacy = results.pop("seed_003_test_accuracy", None)
    if legacy is not None and is_mnist(str(results.get("dataset"))):
        results.setdefault("note_003_test_accuracy", legacy)
    return results


def write_report(out_dir: str | Path, *, command: str | None = None) -> Path:
    """Write ``out_dir/report.html`` from every experiment's results in ``out_dir``.

    Args:
        out_dir: the lab's output folder; ``neuron.json`` and ``mnist.json`` there (with their
            plots, when present) each give one section, whichever command wrote them.
        command: the command writing the report, recorded in its header.

    Returns:
        The report's path. A results file that cannot be read is named in the report, and left
        out.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections, found, problems = [], [], []
    for experiment, section in (("neuron", _neuron_section), ("mnist", _mnist_section)):
        name, plot_name = EXPERIMENT_FILES[experiment]
        path = out_dir / name
        if not path.is_file():
            continue
        plot = out_dir / plot_name
        try:
            sections.append(section(_load(path, experiment), plot if plot.is_file() else None))
            found.append(name)
        except (
            ValueError, KeyError, TypeError, IndexError, AttributeError, ArithmeticError, struct.error
        ) as error:  # fmt: skip
            problems.append(
                f"{name} is not results of xentkit lab {experiment} ({type(error).__name__}: "
                f"{error}); left out."
            )
    made = provenance(command or "write_report() from Python")
    header = (
        f'<p class="made">Written on {html.escape(made["date"])} by xentkit '
        f"{html.escape(made['xentkit'])} with <code>{html.escape(made['command'])}</code>, from "
        f"the results in its folder: {html.escape(', '.join(found) or 'none')}.</p>"
    )
    notes = "".join(f'<p class="note">{html.escape(problem)}</p>' for problem in problems)
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>xentkit lab</title><style>{_STYLE}</style></head><body>"
        f"<h1>xentkit lab</h1>\n{header}\n{notes}" + "\n".join(sections) + "\n</body></html>\n"
    )
    return write_text_file(out_dir / REPORT_HTML, document)
