"""Packaging promises: light import, docstrings with working examples, the public names."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import xentkit


def test_import_does_not_load_torch_matplotlib_or_numba():
    code = "import sys, xentkit; print(sorted(m for m in ('torch', 'matplotlib', 'numba', 'rich', 'pooch') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_import_of_xentkit_torch_loads_neither_the_compiler_nor_triton():
    """``import xentkit.torch`` imports torch, not torch._dynamo (with sympy) or triton: the
    vocabulary-parallel functions' graph break is torch's lazy form of torch.compiler.disable (a
    review: the eager decorator cost 1.0 s of the import's 1.1 s, beside torch's own 0.9 s)."""
    pytest.importorskip("torch")
    code = (
        "import sys, xentkit.torch; "
        "print(sorted(m for m in ('torch._dynamo', 'triton', 'sympy', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["xentkit.api.activations", "xentkit.api.cross_entropy", "xentkit.api.losses",
                                    "xentkit.api._config", "xentkit.api.log_probs"])
def test_docstring_examples_print_what_they_claim(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def _modules_with_examples() -> list[str]:
    """Every xentkit module whose docstrings hold a ``>>>`` example."""
    root = Path(xentkit.__file__).parent
    return sorted(
        ".".join(("xentkit", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for path in root.rglob("*.py")
        if ">>>" in path.read_text(encoding="utf-8")
    )


@pytest.mark.parametrize("module", _modules_with_examples())
def test_every_example_runs_as_written_in_a_fresh_namespace(module):
    """Each docstring example, as the API page shows it, with nothing but what it imports (not
    the module's own names): a reader can paste it."""
    if module.startswith(("xentkit.torch", "xentkit.integrations")):
        pytest.importorskip("torch")
    if module.startswith("xentkit.integrations.transformers"):
        pytest.importorskip("transformers")
    imported = importlib.import_module(module)
    result = doctest.testmod(imported, globs={}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


@pytest.mark.parametrize("name", xentkit.__all__)
def test_every_public_function_has_a_docstring_with_an_example(name):
    obj = getattr(xentkit, name)
    if name == "__version__":
        return
    assert obj.__doc__, f"{name} has no docstring"
    if callable(obj) and not isinstance(obj, type) and name not in ("reference_enabled",):
        assert ">>>" in obj.__doc__, f"{name}'s docstring has no example"


def test_scalar_results_are_0d_arrays_as_the_contract_says():
    """docs/CONTRACTS.md: a reduced result is a 0-d np.ndarray (assignable, .shape == ()), not a
    NumPy scalar; perplexity and log_sigmoid of a scalar gave np.float64."""
    import numpy as np

    logits = np.array([[3.0, 1.0, -3.0], [0.0, 0.0, 0.0]], np.float32)
    for result in (xentkit.perplexity(logits, [0, 2]), xentkit.log_sigmoid(np.float32(0.5)), xentkit.sigmoid(0.5)):
        assert type(result) is np.ndarray and result.shape == (), type(result)
    assert xentkit.perplexity(logits, [0, 2]).dtype == np.float32
    with pytest.raises(TypeError, match=r"perplexity always averages \(reduction='mean'\); got reduction='sum'"):
        xentkit.perplexity(logits, [0, 2], reduction="sum")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ignore_idx"):  # a misspelt option is no silent no-op
        xentkit.perplexity(logits, [0, 2], ignore_idx=1)  # type: ignore[call-arg]


def test_the_modules_repr_shows_every_setting():
    torch = pytest.importorskip("torch")
    import xentkit.torch as xt

    assert "check_probabilities=False" in repr(xt.CrossEntropyLoss(check_probabilities=False))
    assert repr(xt.NLLLoss(ignore_index=-1, reduction="sum")) == (
        "NLLLoss(reduction='sum', ignore_index=-1, check_labels=True)"
    )
    assert isinstance(xt.NLLLoss(), torch.nn.NLLLoss)
