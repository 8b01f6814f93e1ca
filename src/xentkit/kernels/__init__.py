"""Fused Numba kernels on contiguous 2-D arrays (rows × classes).

Importing this package is cheap: Numba and the compiled kernels load on the first access to a
kernel (``cache=True``: compiled once per install, then loaded from ``__pycache__``; per user
where the install is read-only, see :mod:`._cache`).
Contract: ``docs/CONTRACTS.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from xentkit.kernels._cache import ensure_cache_dir

# before any kernel module (each compiles with cache=True): a folder Numba can cache in
ensure_cache_dir()

if TYPE_CHECKING:
    from xentkit.kernels.cross_entropy import cross_entropy_rows
    from xentkit.kernels.log_probs import log_prob_gradient, log_prob_statistics

__all__ = ["compile_all", "cross_entropy_rows", "log_prob_gradient", "log_prob_statistics"]

# Each public kernel and the module that defines it, imported on first access (PEP 562).
_HOMES = {
    "cross_entropy_rows": "xentkit.kernels.cross_entropy",
    "log_prob_statistics": "xentkit.kernels.log_probs",
    "log_prob_gradient": "xentkit.kernels.log_probs",
}
# The modules whose compile_all() the package's compile_all() runs.
_MODULES = (
    "xentkit.kernels.cross_entropy", "xentkit.kernels.probabilities", "xentkit.kernels.binary",
    "xentkit.kernels.log_probs", "xentkit.kernels.vocab_parallel", "xentkit.kernels.labels",
    "xentkit.kernels.activations", "xentkit.kernels.half",
)


def compile_all() -> list[str]:
    """Compile (or load from Numba's cache, ``__pycache__`` beside the sources, or per user, see
    :mod:`._cache`) every kernel
    specialization xentkit runs, so that no later first call waits for Numba's compiler (seconds
    per kernel on a cold cache). ``xentkit warm`` runs it. Returns the specializations' names."""
    return [name for module in _MODULES for name in importlib.import_module(module).compile_all()]


if not TYPE_CHECKING:  # (type checkers see the names above, and a misspelt one as an error, not Any)

    def __getattr__(name: str) -> Any:
        if name in _HOMES:
            try:
                module = importlib.import_module(_HOMES[name])
            except AttributeError as error:  # (from here, ``from ... import`` would say only "cannot import name")
                raise ImportError(f"importing {_HOMES[name]} failed: {error}") from error
            value = getattr(module, name)
            globals()[name] = value  # later accesses skip this function
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
