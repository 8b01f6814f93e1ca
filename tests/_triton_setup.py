"""The preamble of the test modules that run Triton kernels: import it first, before anything
that defines kernels (``xentkit.triton`` and what imports it)::

    from _triton_setup import DEVICE

    # isort: split
    import torch

``DEVICE`` is ``XENTKIT_TEST_DEVICE`` ("cpu" by default; "cuda" on a machine with a GPU, where
the kernels are compiled). On "cpu" the kernels run under Triton's interpreter: this sets
``TRITON_INTERPRET=1`` (tests/conftest.py sets it too, earlier and only where it is unset, for
modules that import triton some other way). Without torch or triton the importing module is
skipped (``pytest.importorskip`` here skips the module that imports this one).
"""

from __future__ import annotations

import os

import pytest

DEVICE = os.environ.get("XENTKIT_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before xentkit.triton's kernels are defined

pytest.importorskip("torch")
pytest.importorskip("triton")
