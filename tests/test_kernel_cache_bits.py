"""A kernel gives the same bits in the process that compiles it and in every process that loads it
from Numba's cache (``xentkit.kernels._jit``: every helper a kernel calls is inlined).

Before the helpers were inlined, the log-prob kernels (float32 and float64) and the float64
probability-target cross-entropy gave results 1 ulp apart between the two: a called helper ran
its standalone build in the compiling process and the kernel's own copy once loaded from the
cache, and the two copies split a ``reassoc`` sum over vector lanes differently.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

from numba.core.caching import NullCache
from numba.core.registry import CPUDispatcher

from xentkit.kernels import (
    _exp,
    activations,
    binary,
    cross_entropy,
    labels,
    log_probs,
    probabilities,
    vocab_parallel,
)

# the cases that differed (the row counts make the kernels take their threaded builds, as in use),
# and every other kernel: hard labels on the row and tile kernels, probability targets, binary,
# softmax / log-softmax / logsumexp, the vocabulary-parallel shards; threaded and one-thread builds
_CHILD = textwrap.dedent(
    """
    import hashlib, json, sys
    import numpy as np
    import xentkit
    from xentkit.kernels import vocab_parallel

    def digest(*arrays):
        return hashlib.sha1(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()

    rng = np.random.default_rng(0)
    found = {}
    for dtype, rows, classes in ((np.float32, 40, 5000), (np.float64, 300, 500)):
        x = (rng.standard_normal((rows, classes)) * 3).astype(dtype)
        y = rng.integers(0, classes, rows)
        g = rng.standard_normal(rows).astype(dtype)
        key = f"{np.dtype(dtype).name} {rows}x{classes}"
        found["log_probs " + key] = digest(*xentkit.log_probs(x, y, temperature=0.7, return_entropy=True))
        found["log_probs_backward " + key] = digest(xentkit.log_probs_backward(x, y, g, g, temperature=0.7))
    x = rng.standard_normal((3000, 40)) * 3
    p = rng.random((3000, 40))
    p /= p.sum(axis=1, keepdims=True)
    found["cross_entropy probabilities float64 3000x40"] = digest(*xentkit.cross_entropy_and_grad(x, p, reduction="none"))
    for dtype in (np.float32, np.float64):
        for rows, classes in ((3000, 20), (3000, 40), (8, 700), (200, 3000)):  # tiles, one thread, rows
            x = (rng.standard_normal((rows, classes)) * 3).astype(dtype)
            y = rng.integers(0, classes, rows)
            p = rng.random((rows, classes)).astype(dtype)
            p /= p.sum(axis=1, keepdims=True)
            key = f"{np.dtype(dtype).name} {rows}x{classes}"
            found["cross_entropy " + key] = digest(*xentkit.cross_entropy_and_grad(
                x, y, label_smoothing=0.1, z_loss=1e-3, reduction="none"))
            found["cross_entropy softcap " + key] = digest(*xentkit.cross_entropy_and_grad(x, y, softcap=5.0))
            found["cross_entropy probabilities smoothed " + key] = digest(*xentkit.cross_entropy_and_grad(
                x, p, label_smoothing=0.1, reduction="none"))
            found["binary " + key] = digest(*xentkit.binary_cross_entropy_with_logits_and_grad(
                x, (p > 1.0 / classes).astype(dtype), reduction="none"))
            found["softmax " + key] = digest(xentkit.softmax(x), xentkit.log_softmax(x), xentkit.logsumexp(x, axis=-1))
            labels = np.where(y % 3 == 0, -1, y).astype(np.int64)
            found["shards " + key] = digest(*[a for a in vocab_parallel.shard_softmax_stats(x, labels, None, True) if a is not None])
    json.dump(found, sys.stdout)
    """
)


def _run_child(cache_dir: str) -> dict[str, str]:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_compiling_process_and_cache_loading_process_give_the_same_bits(tmp_path):
    cache_dir = str(tmp_path / "numba-cache")
    compiled = _run_child(cache_dir)  # compiles the kernels and writes them to the empty cache
    assert any(files for _, _, files in os.walk(cache_dir)), "the first process cached nothing"
    loaded = _run_child(cache_dir)  # loads them from there
    assert len(compiled) == 53 and loaded == compiled, sorted(key for key in compiled if loaded.get(key) != compiled[key])


_MODULES = (_exp, activations, binary, cross_entropy, labels, log_probs, probabilities, vocab_parallel)


def test_every_helper_a_kernel_calls_is_inlined():
    """The rule behind the test above, for every Numba function of ``xentkit.kernels``: a function
    that is not cached (so only other compiled code calls it) is compiled with ``forceinline``."""
    dispatchers = {
        f"{module.__name__}.{name}": value
        for module in _MODULES
        for name, value in inspect.getmembers(module)
        if isinstance(value, CPUDispatcher) and value.py_func.__module__ == module.__name__
    }
    assert len(dispatchers) > 40, sorted(dispatchers)  # the modules' functions were found
    called_only = {name for name, d in dispatchers.items() if isinstance(d._cache, NullCache)}
    assert called_only, "no helper found"
    assert sorted(name for name in called_only if not dispatchers[name].targetoptions.get("forceinline")) == []

