"""Optional dependencies: imported on demand, and a missing one is one line that names the extra.

>>> from xentkit._extras import require
>>> require("numpy", "test", "this example").__name__
'numpy'
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra provides it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or a :class:`MissingExtraError` saying ``pip install 'xentkit[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if error.name is not None and error.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but broken: its own error says more
        raise MissingExtraError(
            f"{purpose} needs the package {module.split('.')[0]!r}, which is not installed: "
            f"pip install 'xentkit[{extra}]'"
        ) from None
