"""The memory tests' one measure: the peak of NumPy's allocations during a call, by
``tracemalloc`` (NumPy reports its allocations to it; deterministic, not a timing)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable


def peak_above(call: Callable[[], object], nbytes: int, *, warm: bool = False) -> float:
    """The peak of NumPy's allocations during ``call()``, in units of ``nbytes``; ``warm``: call
    it once first (the kernels compiled or loaded: a cold cache's compiler allocates too)."""
    if warm:
        call()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result
    return (peak - before) / nbytes
