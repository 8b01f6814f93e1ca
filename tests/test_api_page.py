"""docs/api.md, the API reference, is generated from the docstrings (``docs/make_api.py``) and
the committed page is the one the code generates today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import xentkit

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _make_api():
    spec = importlib.util.spec_from_file_location("make_api", DOCS / "make_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_page_is_up_to_date() -> None:
    pytest.importorskip("torch")  # the page documents xentkit.torch too
    page = (DOCS / "api.md").read_text(encoding="utf-8")
    assert page == _make_api().render(), "docs/api.md is out of date: run python docs/make_api.py"


def test_every_public_name_has_a_section() -> None:
    page = (DOCS / "api.md").read_text(encoding="utf-8")
    for name in xentkit.__all__:
        assert f"### `xentkit.{name}` (" in page, name
    for name in ("patch", "unpatch", "is_patched", "token_log_probs", "SUPPORTED_MODELS"):
        assert f"### `xentkit.integrations.transformers.{name}` (" in page, name
    assert "xentkit.cross_entropy_and_grad(\n    logits: ArrayLike," in page


def test_doctests_are_fenced_and_prose_kept() -> None:
    make_api = _make_api()
    docstring = "Loss.\n\nExample:\n    >>> 1 + 1\n    2\n\nAfter."  # a doctest ends at a blank line
    assert make_api._markdown(docstring) == "Loss.\n\nExample:\n\n```pycon\n>>> 1 + 1\n2\n```\n\nAfter.\n"


def test_long_signatures_take_one_parameter_a_line() -> None:
    make_api = _make_api()

    def short(a: int, *, b: str = "x") -> None: ...

    assert make_api._signature("m.short", short) == "m.short(a: int, *, b: str = 'x') -> None"
    long = make_api._signature("xentkit.cross_entropy", xentkit.cross_entropy)
    assert long.startswith("xentkit.cross_entropy(\n    logits: ArrayLike,\n    target: ArrayLike,\n    *,\n")
    assert long.endswith("    check_probabilities: bool = True,\n) -> np.ndarray")
