"""Terminal output of the lab with rich: progress bars and the closing tables.

rich is imported inside the functions, never when xentkit (or the lab) is imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from xentkit._extras import require
from xentkit.lab.neuron import NeuronRun

__all__ = ["Output", "mnist_table", "neuron_table"]



class Output:
    """Where the lab prints: plain lines to ``stream``, rich tables and progress bars."""

    def __init__(self, stream: IO[str] | None = None, *, progress: bool = True) -> None:
        Console = require("rich.console", "lab", "xentkit lab").Console

        class _Console(Console):
            def on_broken_pipe(self) -> None:
                """The reader went away (``xentkit lab | head``): the run goes on silently and
                writes its files (rich's own exits with 1, the folder unwritten)."""
                _drop_output(self)

        self.stream = stream if stream is not None else sys.stdout
        self.console = _Console(file=self.stream, highlight=False)
        if not self.console.is_terminal:  # files and pipes: wide enough for the tables
            self.console.width = max(self.console.width, 120)
        self.show_progress = progress

    def line(self, text: str = "") -> None:
        """Print one plain line (kept exactly: note 003's ``Iter 0,Testing Accuracy ...``).

        As a ``Text``, not a string printed with ``markup=False``: that option would also reach
        a live progress bar redrawn with the line, which then shows its own markup as text."""
        from rich.text import Text

        self._print(Text(text), highlight=False, soft_wrap=True)

    def table(self, table: Any) -> None:
        """Print a rich renderable."""
        self._print(table)

    def _print(self, *args: Any, **options: Any) -> None:
        """``console.print``, a failed write (a full disk behind ``> file``) named as this output's,
        not taken for one of the files the lab writes."""
        try:
            self.console.print(*args, **options)
        except OSError as error:
            where = "standard output" if self.stream is sys.stdout else getattr(self.stream, "name", "the output stream")
            detail = error.strerror or str(error) or type(error).__name__
            message = f"writing the lab's printed output to {where}: {detail}"
            raise (OSError(error.errno, message) if error.errno is not None else OSError(message)) from error

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        """A progress bar for ``total`` steps; yields the function that advances it by one.

        The bar is transient and only drawn on a terminal; elsewhere advancing does nothing.
        """
        if not (self.show_progress and self.console.is_terminal):
            yield lambda: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda: bar.advance(task)


def _drop_output(console: Any) -> None:
    """Print nothing more on ``console``; its stream, where it is a file descriptor, now writes to
    the null device (so that Python's flush at exit finds no broken pipe either)."""
    console.quiet = True
    try:
        descriptor = console.file.fileno()
    except (AttributeError, OSError, ValueError):  # (a stream without one: quiet is enough)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, descriptor)
    finally:
        os.close(null)


def neuron_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> Any:
    """The neuron's closing table."""
    return _table("Single neuron after 300 iterations (lr 0.15, x = 1, y = 0)", header, rows)


def mnist_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Any:
    """The side-by-side accuracy table (with a caption when it has note 003's columns)."""
    table = _table(title, header, rows)
    if any(name.startswith("note 003") for name in header):
        table.caption = "note 003 columns: the note's runs on the full MNIST (55,000 / 10,000)"
    return table


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Any:
    from rich.table import Table
    from rich.text import Text

    # the title as Text: a folder name such as data[red]x is a name, not a colour tag
    table = Table(title=Text(title), show_edge=False)  # two columns more room on a narrow terminal
    for index, name in enumerate(header):
        # a narrow terminal folds a long header rather than cut it ("double-soft…")
        table.add_column(name, justify="left" if index == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def describe_neuron_run(run: NeuronRun) -> str:
    """One line per run: start, cost, first and final output."""
    w, b = run.start
    start = f"({w:g}, {b:g})"
    # the first output as the note gives it (0.82, 0.98), the last to the table's four digits
    # (two rounded cross-entropy's 0.0116 and 0.0120 both to 0.01)
    return (
        f"{start:<10} {run.cost:<13} first output {run.first_output:.2f} → "
        f"{run.final_output:.4f} after {len(run.outputs) - 1} iterations"
    )
