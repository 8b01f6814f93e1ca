"""The label scan of the api's kernel paths: the first class index outside ``[0, C)`` that is not
``ignore_index``, in one compiled pass over the labels.

Not a kernel of the contract (``docs/CONTRACTS.md``): it reads nothing but the labels, and its
caller (``xentkit._labels.check_labels``, the one home of the label rules and messages) runs it
*before* any kernel, which then never meets an out-of-range label. NumPy needs two reductions
for the same answer (``labels.min()``, ``labels.max()``), ~3 µs of fixed cost a 64 × 10 call
notices; this is one call of ~0.5 µs, and no temporaries on large arrays.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from xentkit.kernels._jit import KERNEL_OPTIONS


@njit(**KERNEL_OPTIONS)
def _first_bad_label(labels, num_classes, ignore_index):  # pragma: no cover - compiled
    for i in range(labels.shape[0]):
        y = labels[i]
        if y != ignore_index and (y < 0 or y >= num_classes):
            return i
    return -1


def first_bad_label(labels: np.ndarray, num_classes: int, ignore_index: int) -> int:
    """The flat (C-order) index of the first label of ``labels`` (int64, any shape) outside
    ``[0, num_classes)`` that is not ``ignore_index``, or -1 when there is none."""
    flat = labels.reshape(-1)  # a view of contiguous labels
    if not (flat.flags.c_contiguous and flat.flags.writeable):  # (read-only: its own specialization)
        flat = flat.copy()
    return int(_first_bad_label(flat, int(num_classes), int(ignore_index)))


def compile_all() -> list[str]:
    """Compile (or load from Numba's cache) the label scan; returns its name."""
    first_bad_label(np.zeros(1, dtype=np.int64), 1, -100)
    return ["label scan int64"]
