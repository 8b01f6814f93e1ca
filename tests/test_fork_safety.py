"""The parallel kernels survive fork: a process forked after a parallel call computes the same
result (Numba's TBB layer; GNU OpenMP killed such children), and threads calling at once agree."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp
    import threading

    import numba
    import numpy as np

    import xentkit
    from xentkit.kernels import cross_entropy as kernels

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 8000)).astype(np.float32)  # above the serial threshold
    y = rng.integers(0, 8000, 4096)
    loss, grad = xentkit.cross_entropy_and_grad(x, y)
    print("layer", numba.threading_layer(), kernels.THREADING_LAYER)

    def child(queue):
        l, g = xentkit.cross_entropy_and_grad(x, y)
        queue.put((float(l), float(np.abs(g - grad).max())))

    context = mp.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=child, args=(queue,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    print("exit", [worker.exitcode for worker in workers])
    for _ in workers:
        child_loss, difference = queue.get(timeout=10)
        print("child", child_loss == float(loss), difference)

    results = [None] * 4
    def call(i):
        results[i] = float(xentkit.cross_entropy_and_grad(x, y)[0])
    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("threads", all(r == float(loss) for r in results))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="fork is the Linux default start method")
def test_forked_children_and_threads_compute_the_parents_result():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Terminating" not in output, output
    assert "exit [0, 0]" in output, output
    assert output.count("child True 0.0") == 2, output
    assert "threads True" in output, output
    layer = output.split("layer ", 1)[1].split()[0]
    assert layer == "tbb", output  # the tbb wheel is installed with xentkit on x86-64


USERS_POOL_FIRST = textwrap.dedent(
    """
    import os

    import numba
    import numpy as np

    import xentkit

    @numba.njit(parallel=True)
    def users_own(a):  # the user's own parallel function, run before any xentkit kernel
        total = 0.0
        for i in numba.prange(a.size):
            total += a[i]
        return total

    numba.set_num_threads(2)
    users_own(np.ones(100000))
    print("layer", numba.threading_layer())
    x = np.random.default_rng(0).standard_normal((512, 8000)).astype(np.float32)
    y = np.zeros(512, dtype=np.int64)
    loss = xentkit.cross_entropy(x, y)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if xentkit.cross_entropy(x, y) == loss and users_own(np.ones(10)) == 10 else 3)
    print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="fork is the Linux default start method")
def test_numbas_threads_started_by_the_user_first_are_tbbs_too():
    """``import xentkit`` loads TBB's runtime (``xentkit._tbb``): user code that starts Numba's
    thread pool before xentkit's first kernel (``numba.set_num_threads`` and a parallel function
    of its own) had Numba choose GNU OpenMP, and a child forked after a kernel was killed
    ("Terminating: fork() called from a process already using GNU OpenMP"; a review, 2026-12-07)."""
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_THREADING_LAYER"}
    done = subprocess.run([sys.executable, "-c", USERS_POOL_FIRST], capture_output=True, text=True, timeout=300, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Terminating" not in output, output
    assert "layer tbb" in output and "child 0" in output, output


HALF_FIRST = textwrap.dedent(
    """
    import os
    import sys
    import types

    # an install where import xentkit did not preload TBB (xentkit._tbb's values, its preload idle)
    fake = types.ModuleType("xentkit._tbb")
    fake.MAY_USE_TBB = ("default", "tbb", "safe", "threadsafe", "forksafe")
    fake.NAMES = ("libtbb.so.12", "libtbb.12.dylib")
    fake.preload = lambda: None
    sys.modules["xentkit._tbb"] = fake

    import numba
    import numpy as np

    import xentkit

    p = np.random.default_rng(0).random((1000, 1000)).astype(np.float16)
    xentkit.entropy(p)  # the float16 conversions: the process's first parallel kernel
    x = np.random.default_rng(1).standard_normal((2000, 1000)).astype(np.float32)
    loss = xentkit.cross_entropy(x, np.zeros(2000, dtype=np.int64))
    print("layer", numba.threading_layer())
    pid = os.fork()
    if pid == 0:
        os._exit(0 if xentkit.cross_entropy(x, np.zeros(2000, dtype=np.int64)) == loss else 3)
    print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="fork is the Linux default start method")
def test_the_float16_conversions_as_first_kernels_choose_tbb_too():
    """The float16 conversions (``xentkit.kernels.half``) may run before any other kernel: they
    choose TBB as the others do (a review: where ``import xentkit`` had not preloaded it, Numba took
    GNU OpenMP there, and a forked child was killed)."""
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_THREADING_LAYER"}
    done = subprocess.run([sys.executable, "-c", HALF_FIRST], capture_output=True, text=True, timeout=300, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Terminating" not in output, output
    assert "layer tbb" in output and "child 0" in output, output
