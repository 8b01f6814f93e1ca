#!/usr/bin/env python
"""Write ``docs/api.md``, the API reference, from the public names' signatures and docstrings.

    python docs/make_api.py            # rewrite docs/api.md
    python docs/make_api.py --check    # exit 1 when docs/api.md is not what this would write

The public names are each module's ``__all__`` (``xentkit``, ``xentkit.torch``, then
``xentkit.integrations.transformers``), in that
order; a function or class appears with its signature and its docstring, doctests fenced as
``pycon``. ``tests/test_api_page.py`` checks that the committed page is up to date.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

PAGE = Path(__file__).with_name("api.md")
MODULES = (
    ("xentkit", "The NumPy functions: arrays in, arrays out (class axis `axis`, last by default)."),
    ("xentkit.torch", "The PyTorch losses: `torch.nn.functional` / `torch.nn` signatures, plus keyword-only extras."),
    (
        "xentkit.integrations.transformers",
        "Hugging Face Transformers: a causal language model's training loss without its logits, and "
        "token log-probabilities for RL (docs/transformers.md).",
    ),
)
WIDTH = 100


def _annotation(annotation: object) -> str:
    # postponed annotations (``from __future__ import annotations``) are strings already
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _parameter(parameter: inspect.Parameter) -> str:
    text = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
    text += parameter.name
    annotated = parameter.annotation is not inspect.Parameter.empty
    if annotated:
        text += f": {_annotation(parameter.annotation)}"
    if parameter.default is not inspect.Parameter.empty:
        text += f"{' = ' if annotated else '='}{parameter.default!r}"
    return text


def _signature(qualified: str, obj: object) -> str:
    """``name(parameters) -> return``, one parameter per line when one line is too long."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return qualified
    parameters: list[str] = []
    previous = None
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and previous not in (
            inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_POSITIONAL
        ):
            parameters.append("*")
        if parameter.kind is not inspect.Parameter.POSITIONAL_ONLY and previous is inspect.Parameter.POSITIONAL_ONLY:
            parameters.append("/")
        parameters.append(_parameter(parameter))
        previous = parameter.kind
    returns = ""
    if signature.return_annotation is not inspect.Signature.empty and not inspect.isclass(obj):
        returns = f" -> {_annotation(signature.return_annotation)}"
    line = f"{qualified}({', '.join(parameters)}){returns}"
    if len(line) <= WIDTH:
        return line
    body = "".join(f"    {parameter},\n" for parameter in parameters)
    return f"{qualified}(\n{body}){returns}"


def _markdown(docstring: str) -> str:
    """The docstring as Markdown: prose as written (its indented ``::`` blocks are code blocks
    already), each run of doctest lines fenced as ``pycon``."""
    out: list[str] = []
    lines = docstring.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith(">>>"):
            indent = len(lines[i]) - len(lines[i].lstrip())
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].strip())
                i += 1
            if out and out[-1].strip():
                out.append("")
            out.extend(["```pycon", *block, "```"])
            if i >= len(lines):
                out.append("")
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out).rstrip() + "\n"


def render() -> str:
    parts = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/make_api.py`; do not edit by hand (the test "
        "`tests/test_api_page.py` fails when this page and the code disagree). Formulas, shapes and "
        "examples are the docstrings' own.",
        "",
        "Two names in the signatures: `Real` is a real number of any kind (a Python `float` or `int`, a "
        "NumPy scalar, or a 0-d array or tensor: `float | SupportsFloat`), `Integer` an integer of any "
        "kind (`int | SupportsIndex`: a NumPy integer or a one-value integer tensor too). Both are in "
        "`xentkit._options`, with the checks that take them.",
        "",
    ]
    for module_name, summary in MODULES:
        module = importlib.import_module(module_name)
        names = list(module.__all__)
        parts += [f"## `{module_name}`", "", summary, ""]
        parts += [f"- [`{module_name}.{name}`](#{(module_name + name).replace('.', '').replace('_', '').lower()})" for name in names]
        parts.append("")
        for name in names:
            obj = getattr(module, name)
            qualified = f"{module_name}.{name}"
            parts.append(f'<a id="{(module_name + name).replace(".", "").replace("_", "").lower()}"></a>')
            parts.append("")
            kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "value"
            parts.append(f"### `{qualified}` ({kind})")
            parts.append("")
            if callable(obj):
                parts += ["```python", _signature(qualified, obj), "```", ""]
            else:
                parts += ["```python", f"{qualified} = {obj!r}", "```", ""]
                parts.append("")
                continue
            docstring = inspect.getdoc(obj)
            parts.append(_markdown(docstring) if docstring else "(no docstring)\n")
    return "\n".join(parts).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    page = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text(encoding="utf-8") != page:
            print(f"{PAGE.name} is out of date: run python docs/make_api.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote docs/{PAGE.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
