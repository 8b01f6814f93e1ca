"""TBB's runtime loaded at ``import xentkit``, so that Numba's threading layer is TBB (fork-safe)
also where user code starts Numba's threads before xentkit's first kernel (not where it started
them before ``import xentkit``: Numba chose its layer then).

``xentkit.kernels._threading.prefer_tbb`` chooses TBB when the kernels are first imported, but
user code may start Numba's thread pool before that (``numba.set_num_threads``, which
``docs/precision.md`` suggests, or a ``parallel=True`` function of its own): Numba then chooses
its own layer, which finds no TBB (the ``tbb`` wheel puts ``libtbb`` beside the interpreter,
outside the loader's path) and takes GNU OpenMP, which kills children forked after a parallel
kernel. With the library loaded first, Numba's own choice is TBB too (a review, 2026-12-07).

A few stats and one ``dlopen`` (about 3 ms; no Numba import, no thread started): the library is
looked for where the wheel installs it, the environment's, the user's and the base interpreter's
``lib`` folders (elsewhere, ``pip install --target`` say, ``prefer_tbb`` finds it by the package's
metadata when the kernels are imported, as before).
"""

from __future__ import annotations

import ctypes
import os
import site
import sys
from pathlib import Path

# the user's choices (NUMBA_THREADING_LAYER) that TBB may serve; "default" is ours to make
MAY_USE_TBB = ("default", "tbb", "safe", "threadsafe", "forksafe")

# the library names of TBB's runtime that Numba's tbbpool links against (Linux, macOS)
NAMES = ("libtbb.so.12", "libtbb.12.dylib")


def preload() -> Path | None:
    """Load the tbb wheel's ``libtbb`` into the process (``RTLD_GLOBAL``, where Numba's
    ``tbbpool`` finds it) unless the user chose a layer TBB does not serve; returns its path, or
    None when it was not found or not loaded (then nothing changes)."""
    if os.environ.get("NUMBA_THREADING_LAYER", "default").lower() not in MAY_USE_TBB:
        return None
    folders = [sys.prefix, getattr(site, "USER_BASE", None) or "", sys.base_prefix]
    for folder in filter(None, folders):
        for name in NAMES:
            path = Path(folder, "lib", name)
            if path.is_file():
                try:
                    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    return None
                return path
    return None
