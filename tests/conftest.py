"""Shared test helpers: the per-dtype tolerance table, implementations, a verbose allclose."""

from __future__ import annotations

import os

# Triton's interpreter for the Triton kernels' tests on CPU tensors, set before anything imports
# triton: a test module that imports triton.language first (transformers does) would otherwise
# define tl.max & co. as compiled functions, which interpreted kernels cannot call.
if os.environ.get("XENTKIT_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    # every interpreted load and store checked against the launch's tensors (an access beyond
    # them is raw memory under the interpreter: a wrong value, or a crash later elsewhere)
    import _triton_bounds

    _triton_bounds.install()

# torch.compile's on-disk caches in a folder of this test session's own (unless one is chosen):
# torch 2.13's compiled-graph cache keys on the graph, not on a custom op's fake output shapes
# (pytorch/pytorch#160472), so code compiled by an earlier checkout, whose ops returned other
# shapes, would be reloaded here and fail its own shape asserts. (Subprocesses inherit it.)
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="xentkit-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import numpy as np
import pytest

import xentkit

# One table for every comparison of results in a dtype against an exact (float64) answer or
# against PyTorch computing in the same dtype.
TOLERANCES: dict[type, dict[str, float]] = {
    np.float64: {"rtol": 1e-9, "atol": 1e-11},
    np.float32: {"rtol": 2e-5, "atol": 2e-6},
    np.float16: {"rtol": 2e-3, "atol": 2e-3},
}


def tolerance(dtype: object) -> dict[str, float]:
    return TOLERANCES[np.dtype(dtype).type]


def assert_close(actual: object, expected: object, dtype: object = np.float64, name: str = "") -> None:
    """allclose with the dtype's tolerance that prints the first mismatches when it fails."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    tol = tolerance(dtype)
    close = np.isclose(actual, expected, equal_nan=True, **tol)
    if not close.all():
        where = np.argwhere(~close)[:5]
        rows = [f"  at {tuple(int(i) for i in w)}: got {actual[tuple(w)]!r}, expected {expected[tuple(w)]!r}" for w in where]
        raise AssertionError(
            f"{name}: {int((~close).sum())} of {close.size} values differ beyond {tol}\n" + "\n".join(rows)
        )


@pytest.fixture(params=["kernel", "reference"])
def implementation(request: pytest.FixtureRequest):
    """Run the test once on the fused kernels and once on the NumPy reference."""
    with xentkit.use_reference(request.param == "reference"):
        yield request.param


@pytest.fixture
def kernel_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``xentkit.torch``'s ``cross_entropy`` and ``nll_loss`` on xentkit's own paths even for
    small problems (which otherwise run torch's own kernels, with xentkit's semantics around
    them): for the tests of xentkit's own computation through the torch binding."""
    pytest.importorskip("torch")
    from xentkit.torch import functional

    monkeypatch.setattr(functional, "SMALL_MAX_LOGITS", 0)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lab's training fails the test (``pytest.fail``, a BaseException no handler of the
    command line catches): for the tests of what ``xentkit lab`` checks before it trains."""
    from xentkit.lab import mnist, neuron, runner

    def refused(*args: object, **kwargs: object) -> None:
        pytest.fail("the lab trained before it checked its arguments")

    monkeypatch.setattr(neuron, "train_neuron", refused)
    monkeypatch.setattr(mnist, "train_softmax_regression", refused)
    monkeypatch.setattr(runner, "train_softmax_regression", refused)
