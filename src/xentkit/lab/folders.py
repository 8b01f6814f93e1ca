"""Folders a lab command makes, and their removal when it fails: a failed or interrupted command
leaves no empty folder of its own behind (the output folder, the download cache)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

__all__ = ["missing_folders", "remove_empty_folders"]


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its ancestors that do not exist yet: what ``mkdir(parents=True)``
    will make."""
    return [path for path in (folder, *folder.parents) if not path.exists()]


def remove_empty_folders(folders: Iterable[Path]) -> None:
    """Remove those of ``folders`` (made by this command) that are still empty, deepest first."""
    for folder in sorted(set(folders), key=lambda path: len(path.parts), reverse=True):
        with contextlib.suppress(OSError):  # a file was written there, or it is gone
            folder.rmdir()
