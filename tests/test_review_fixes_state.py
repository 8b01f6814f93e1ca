"""From a review of the state xentkit keeps between calls (2026-12-07): an index tensor cached as an
inference tensor, a lock a signal handler could wait on forever, ``TRITON_INTERPRET`` read
otherwise than Triton reads it, a per-class cache that kept every class alive, and a weight
check's cache that missed ``weight.data = ...``. (The transformers patch's per-thread forwards:
``test_transformers.py``; the loss modules' options: ``test_review_fixes_lifecycle.py``.)"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch

import xentkit
import xentkit.torch as xt
from xentkit.api import _config
from xentkit.torch import _bridge, functional, modules


def test_importing_under_inference_mode_leaves_training_calls_working():
    """The import made an index tensor inside ``torch.inference_mode`` (a lazy import in an eval
    helper), which the kernels' Functions then could not save for backward: every later training
    call raised."""
    script = textwrap.dedent("""
        import torch
        with torch.inference_mode():
            import xentkit.torch as xt
        x = torch.randn(64, 2000, requires_grad=True)  # beyond the small problems: a Function
        loss = xt.cross_entropy(x, torch.randint(0, 2000, (64,)))
        loss.backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_devices_first_anchor_under_inference_mode_is_not_kept_as_an_inference_tensor(monkeypatch):
    monkeypatch.setattr(_bridge, "_NO_INDEX", {})
    parameter = torch.empty(8, 4, device="meta", requires_grad=True)  # (stands for a CUDA one)
    context = type("Context", (), {})
    with torch.inference_mode():
        _bridge.first_order_anchors(context(), parameter)
    assert not any(index.is_inference() for index in _bridge._NO_INDEX.values())
    _bridge.first_order_anchors(context(), parameter)  # a training step after it


def test_use_reference_can_switch_while_its_own_thread_holds_the_lock():
    """A signal handler (or a __del__) that switches while its thread is inside a switch: with a
    plain lock it waited for itself forever."""

    def switch_inside_a_switch():
        with _config._LOCK:
            xentkit.use_reference(xentkit.api._config.reference_enabled())

    thread = threading.Thread(target=switch_inside_a_switch, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()


@pytest.mark.parametrize("value", ["false", "0", "", "off"])
def test_triton_interpret_values_triton_takes_for_off_are_off(monkeypatch, value):
    """``TRITON_INTERPRET=false`` had been taken for on: a CPU call with ``backend="triton"`` then
    failed inside Triton for want of a GPU driver, not with xentkit's ValueError."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    with pytest.raises(ValueError, match=r"CPU tensors only under Triton's interpreter, TRITON_INTERPRET=1"):
        xt.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), backend="triton")


def test_the_per_class_fields_cache_keeps_no_class_alive():
    """The option fields a module class defines are kept on the class itself: a dict keyed by
    class had kept every class made on the fly alive."""
    import weakref

    def make():
        cls = type("Subclass", (xt.CrossEntropyLoss,), {})
        cls()(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
        assert vars(cls)[modules._CLASS_FIELDS] == frozenset()
        return weakref.ref(cls)

    made = [make() for _ in range(5)]
    gc.collect()
    assert all(ref() is None for ref in made)


def test_the_weight_sign_cache_sees_new_memory_given_through_data():
    """``weight.data = ...`` bumps no version: the cached "every weight ≥ 0" had stayed, and the
    probabilities warning was skipped on every later call."""
    probabilities = torch.full((64, 10), 0.1)
    target = torch.tensor([0, 1] * 32)
    weight = torch.ones(10)

    def warns(logits):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            xt.cross_entropy(logits, target, weight=weight)
        return any(issubclass(w.category, xentkit.ProbabilitiesAsLogitsWarning) for w in seen)

    torch.manual_seed(0)
    assert not warns(torch.randn(64, 10) * 20)  # real logits: the cache holds "≥ 0" for weight
    weight.data = torch.tensor([1.0, -0.9] + [1.0] * 8)
    assert functional._nonnegative(weight) is False
    assert warns(probabilities)
