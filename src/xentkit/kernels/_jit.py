"""Numba options of the kernels and of the loop helpers they call, in one place.

A kernel is a ``cache=True`` function the host calls; a helper is a function only kernels call
(a block's sum, a row's gradient loop). Every helper is compiled with ``forceinline``, so that
each kernel holds the one copy of its helpers' code that it was optimized with.

Without it a helper is a call, and Numba resolves that call differently by how the kernel got
into the process: right after compiling it, to the helper's own standalone build; loaded from
Numba's cache, to the copy linked into the kernel's object. The two copies are optimized in
different modules, and a sum with ``reassoc`` may be split over vector lanes differently in each:
the same inputs gave results 1 ulp apart (the log-prob kernels' float32 and float64 sums, the
float64 probability-target cross-entropy), between the process that compiled the kernels and every
later one. With the helpers inlined, a kernel's bits do not depend on the cache
(``tests/test_kernel_cache_bits.py``).

Three cached functions stay out of line on purpose: the tile kernels' ``_tile_finish``,
``_tile_exponentials`` (``cross_entropy``) and ``_tile_terms`` (``probabilities``), kept as calls
for speed (benchmarks/README.md). The same test compares the tile kernels fresh and cached.
"""

from __future__ import annotations

from typing import Any

import numba

from xentkit.kernels._cache import stamp_kernel_sources

__all__ = ["KERNEL_OPTIONS", "LOOP_FLAGS", "helper_options"]

if numba.config.DISABLE_JIT:  # (every kernel module imports this one first)
    raise RuntimeError(
        "xentkit's kernels need Numba's compiler, which NUMBA_DISABLE_JIT=1 turns off; "
        "XENTKIT_REFERENCE=1 (or xentkit.use_reference(True)) runs the NumPy reference formulas instead"
    )

# the cached kernels tied to all their sources (an upgrade that changes a helper recompiles them)
stamp_kernel_sources()

# Flags of the per-block loops: reassoc lets LLVM split the sums over vector lanes; contract
# gives FMAs. No nnan/ninf: NaN and ±inf logits are part of the contract.
LOOP_FLAGS = {"contract", "reassoc", "nsz"}

# The kernels: cached, and no fast-math flags on their own scalar code (reassoc would turn
# (m − z_y) + log s back into (m + log s) − z_y, which loses log s when |m| is large; flags are per
# instruction, so the inlined loops keep theirs).
KERNEL_OPTIONS: dict[str, Any] = {"fastmath": False, "error_model": "numpy", "nogil": True, "cache": True}


def helper_options(fastmath: set[str] | bool) -> dict[str, Any]:
    """The options of a helper that kernels call: ``fastmath`` as given, always inlined."""
    return {"fastmath": fastmath, "error_model": "numpy", "nogil": True, "forceinline": True}
