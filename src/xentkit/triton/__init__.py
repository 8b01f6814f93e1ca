"""Triton kernels for CUDA tensors, with the contract of :mod:`xentkit.kernels` (see
``docs/CONTRACTS.md``): no validation, contiguous ``[rows, V]`` inputs, per-row float32 loss and
log-sum-exp, the gradient in the same launch.

Importing this package is cheap: Triton and the kernels load on first access. On CPU tensors the
kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before the first access),
which the tests use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xentkit.triton.cross_entropy import cross_entropy_rows
    from xentkit.triton.log_probs import log_prob_gradient, log_prob_statistics
    from xentkit.triton.vocab_parallel import shard_softmax_grad, shard_softmax_stats

__all__ = [
    "available",
    "cross_entropy_rows",
    "log_prob_gradient",
    "log_prob_statistics",
    "shard_softmax_grad",
    "shard_softmax_stats",
    "stats_rows",
]

_HOMES = {
    "cross_entropy_rows": "xentkit.triton.cross_entropy",
    "log_prob_gradient": "xentkit.triton.log_probs",
    "log_prob_statistics": "xentkit.triton.log_probs",
    "shard_softmax_grad": "xentkit.triton.vocab_parallel",
    "shard_softmax_stats": "xentkit.triton.vocab_parallel",
}


def available() -> bool:
    """Whether Triton can be imported (it is an optional dependency; once imported, it stays)."""
    if _IMPORTED:
        return True
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    _IMPORTED.append(True)
    return True


_IMPORTED: list[bool] = []  # non-empty once triton was imported (every call asks: no import machinery)


def stats_rows(probabilities: bool) -> int:
    """Rows of the per-row statistics that ``cross_entropy.row_statistics`` returns and
    ``row_gradient`` reads (here, without Triton, for the custom ops' fake implementations): M and
    e; for probability targets also A = Σ_j r_j in two parts, the target mass off the row's max
    and at it (so that pass 2's A − r_max keeps its digits)."""
    return 4 if probabilities else 2


if not TYPE_CHECKING:  # (type checkers see the names above, and a misspelt one as an error, not Any)

    def __getattr__(name: str) -> Any:
        if name in _HOMES:
            from xentkit._extras import require

            require("triton", "triton", f"xentkit.triton.{name}")  # a missing Triton names the extra
            require("torch", "torch", f"xentkit.triton.{name}")
            value = getattr(importlib.import_module(_HOMES[name]), name)
            globals()[name] = value
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
