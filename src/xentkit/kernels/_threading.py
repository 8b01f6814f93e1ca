"""Numba's threading layer for xentkit's parallel kernels: TBB, which is fork-safe and thread-safe.

Numba's default on Linux is GNU OpenMP, which is not fork-safe: after one parallel kernel has
run, a process forked from it (a ``multiprocessing`` worker, a PyTorch DataLoader worker, a
pre-forking server) is killed the moment it runs one ("Terminating: fork() called from a process
already using GNU OpenMP"). TBB has neither problem and the same speed here
(``benchmarks/bench_cross_entropy.py``); Numba's other fork-safe layer, ``workqueue``, aborts when
two threads call a kernel at once.

:func:`prefer_tbb` runs when the kernels are first imported, before any of them launches
threads. It chooses TBB unless the choice is not ours to make: the user set
``NUMBA_THREADING_LAYER`` (or ``numba.config.THREADING_LAYER``; TBB's library is still loaded
when that choice may use it), or Numba already started its threads. The ``tbb`` wheel (a
dependency of xentkit where it is published) puts ``libtbb`` beside the interpreter, outside the
loader's path; it is loaded here by its full path. Without it Numba's default stays.
(``import xentkit`` loads it already where the wheel puts it, ``xentkit._tbb``, so that Numba's
own choice is TBB too when user code starts Numba's threads before the kernels are imported.)
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba

from .._tbb import MAY_USE_TBB as _MAY_USE_TBB
from .._tbb import NAMES as _NAMES


def _tbb_library() -> Path | None:
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name in _NAMES:
            path = Path(entry.locate())
            if path.exists():
                return path
    return None


def prefer_tbb() -> str:
    """Choose TBB when it is ours to choose and it loads; returns the layer Numba will use
    ("default" when left to Numba)."""
    from numba.np.ufunc import parallel

    chosen = (os.environ.get("NUMBA_THREADING_LAYER") or numba.config.THREADING_LAYER).lower()  # (as Numba reads it)
    if getattr(parallel, "_is_initialized", False) or chosen not in _MAY_USE_TBB:
        return chosen
    library = _tbb_library()
    if library is None:
        return chosen
    try:  # loaded also when the user asked for TBB, which Numba would not find on its own
        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        importlib.import_module("numba.np.ufunc.tbbpool")  # fails when this TBB does not fit Numba
    except (OSError, ImportError):
        return chosen
    if chosen != "default":
        return chosen
    numba.config.THREADING_LAYER = "tbb"
    return "tbb"


def serial_build(kernel: Any, name: str, **jit_options: Any) -> Any:
    """``kernel``'s Python function compiled again without ``parallel`` (``jit_options`` as the
    kernel's, less ``parallel``): its ``prange`` loops run as plain loops on the calling thread.
    Numba's parallel build launches its scheduler for every ``prange`` even on one thread
    (~10 µs a call inside a training step at 64 × 10, benchmarks/bench_small.py), and the caller
    sets no thread count. The same arithmetic row by row, so the same bits. A function of its
    own name, so that Numba's cache (keyed on the name) keeps the two builds apart."""
    source = kernel.py_func
    copy = types.FunctionType(source.__code__, source.__globals__, name, source.__defaults__)
    copy.__qualname__ = name
    copy.__doc__ = f"{source.__name__} on the calling thread alone (no ``parallel``)."
    return numba.njit(**jit_options)(copy)


def threads_for(elements: int, parallel: bool | None, serial_max: int) -> int:
    """How many of Numba's threads a kernel call over ``elements`` values runs on: all of them,
    or 1 (the calling thread alone) when ``parallel`` is False or, by default, for problems up to
    ``serial_max`` values, where waking the pool costs more than it saves."""
    if parallel is None:
        parallel = elements > serial_max
    return numba.get_num_threads() if parallel else 1


def runs_serial(threads: int, parallel: bool | None) -> bool:
    """Whether a call on ``threads`` (:func:`threads_for`) runs the kernel's serial build: on one
    thread, unless the caller forced the threaded build (``parallel=True``), which then runs on
    Numba's one thread: ``compile_all`` builds every kernel under ``NUMBA_NUM_THREADS=1`` too."""
    return threads == 1 and parallel is not True


def _pool_counters() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """The running threading layer's own getter and setter of the calling thread's thread count,
    once Numba's pool is up: ``numba.get_num_threads`` / ``set_num_threads`` wrap them with a
    start-up check that takes two locks on every call (~1 µs each here against ~0.2 µs; a small
    problem changes the count twice per call). None before the pool starts, or when this Numba
    keeps them elsewhere: then Numba's public functions serve."""
    if _COUNTERS:
        return _COUNTERS[0]
    from numba.np.ufunc import parallel

    if not getattr(parallel, "_is_initialized", False):
        return None
    get, put = getattr(parallel, "_get_num_threads", None), getattr(parallel, "_set_num_threads", None)
    counters = (get, put) if callable(get) and callable(put) else None
    _COUNTERS.append(counters)
    return counters


_COUNTERS: list[tuple[Callable[[], int], Callable[[int], None]] | None] = []  # found once


class running_on:  # lower case: used as a function, ``with running_on(threads):``
    """Run the block's kernels on ``threads`` of Numba's threads, then restore the count. (One
    thread: the calling one runs the loops and the pool stays asleep; the row and log-probability
    kernels have serial builds for that (:func:`serial_build`), which need none of this. Setting
    the count inside a
    kernel would keep Numba from caching it.) A class, not a generator: small problems notice the
    microseconds of ``contextlib.contextmanager``. ``threads`` is 1 or at most Numba's current
    count (:func:`threads_for`), which the setter takes without a check."""

    __slots__ = ("put", "saved", "threads")

    def __init__(self, threads: int) -> None:
        self.threads = threads
        counters = _pool_counters()
        if counters is None:  # the first call starts the pool here
            self.saved = numba.get_num_threads()
            self.put = numba.set_num_threads
        else:
            self.saved = counters[0]()
            self.put = counters[1]

    def __enter__(self) -> None:
        if self.threads != self.saved:
            self.put(self.threads)

    def __exit__(self, *exc_info: object) -> None:
        if self.threads != self.saved:
            self.put(self.saved)
