"""Every host function that launches Triton kernels makes its tensors' CUDA device current first.

Triton launches on the current device (and its stream), not on the tensors': logits on cuda:1
while cuda:0 is current (a model spread over GPUs by ``device_map="auto"``) would run on GPU 0 with
GPU 1's pointers. One GPU cannot show it, so this checks the guard itself, with the CUDA calls
stood in for, and that no launching function goes without it.
"""

from __future__ import annotations

from _triton_setup import DEVICE  # first: the skips and the interpreter

# isort: split
import contextlib
import importlib
import inspect
import types

import pytest
import torch

from xentkit.triton import _chunks

MODULES = ["cross_entropy", "log_probs", "reduction", "vocab_parallel"]


def _launchers(module: types.ModuleType) -> list[tuple[str, object]]:
    """The module's own Python functions whose body launches a kernel (``name[grid](...)``)."""
    found = []
    for name, value in vars(module).items():
        function = getattr(value, "__wrapped__", value)
        own = inspect.isfunction(function) and function.__module__ == module.__name__
        if own and "_kernel[" in inspect.getsource(function):
            found.append((name, value))
    return found


@pytest.mark.parametrize("name", MODULES)
def test_every_launching_function_runs_on_its_tensors_device(name: str) -> None:
    module = importlib.import_module(f"xentkit.triton.{name}")
    launchers = _launchers(module)
    assert launchers, f"no launching function found in xentkit.triton.{name}"
    unguarded = [fname for fname, value in launchers if not getattr(value, "on_tensor_device", False)]
    assert unguarded == [], f"xentkit.triton.{name}: launches without the device guard: {unguarded}"


def test_the_guard_makes_the_first_tensors_device_current(monkeypatch: pytest.MonkeyPatch) -> None:
    entered: list[torch.device] = []
    current = {"index": 0}

    @contextlib.contextmanager
    def device(target):
        entered.append(torch.device(target))
        before, current["index"] = current["index"], torch.device(target).index
        try:
            yield
        finally:
            current["index"] = before

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])

    @_chunks.on_tensor_device
    def host(logits, *args, scale=1.0):
        return current["index"], args, scale

    class OnDevice:  # a tensor on a given device, as far as the guard looks
        def __init__(self, device: str) -> None:
            self.device = torch.device(device)

    assert host(OnDevice("cuda:1"), 2, scale=3.0) == (1, (2,), 3.0)  # run with cuda:1 current
    assert entered == [torch.device("cuda:1")] and current["index"] == 0  # and cuda:0 back after
    assert host(OnDevice("cuda:0")) == (0, (), 1.0)  # already current: no switch
    assert host(OnDevice("cpu")) == (0, (), 1.0)  # the interpreter's CPU tensors: nothing to do
    assert entered == [torch.device("cuda:1")]


def test_the_guarded_functions_still_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the guard (on the device the tests run on): the same loss as torch's."""
    import xentkit.torch as xt

    logits = torch.randn(6, 40, device=DEVICE)
    target = torch.randint(0, 40, (6,), device=DEVICE)
    got = xt.cross_entropy(logits, target, backend="triton")
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits, target))
