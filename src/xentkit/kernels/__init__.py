"""Fused Numba kernels on contiguous 2-D arrays (rows × classes).

Importing this package is cheap: Numba and the compiled kernels load on the first access to a
kernel (``cache=True``: compiled once per machine, then loaded from ``__pycache__``).
Contract: ``docs/CONTRACTS.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xentkit.kernels.cross_entropy import cross_entropy_rows

__all__ = ["cross_entropy_rows"]

# Each public kernel and the module that defines it, imported on first access (PEP 562).
_HOMES = {"cross_entropy_rows": "xentkit.kernels.cross_entropy"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value  # later accesses skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
