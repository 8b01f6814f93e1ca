"""Every Triton kernel the library launches compiles to GPU machine code (sm_90 and sm_80), with
no register spills, shared memory within the limit and 16-byte loads of aligned logits — checked
on a machine without a GPU (``tests/_triton_machine_code.py`` says how; the interpreter tests
never meet the compiler)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("_triton_machine_code.py")
UNSUPPORTED = 3  # the script's exit status when this Triton lacks the internals it uses
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
MODULES = ("cross_entropy", "log_probs", "vocab_parallel")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    if not (TOOLS / "ptxas").exists() or not (TOOLS / "cuobjdump").exists():
        pytest.skip("this Triton has no bundled ptxas / cuobjdump")
    out = tmp_path_factory.mktemp("machine_code") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", "--arch", "80", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    if done.returncode == UNSUPPORTED:
        pytest.skip(done.stdout.strip())
    assert out.exists(), f"the script failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    results = json.loads(out.read_text())
    results["returncode"] = done.returncode
    results["stdout"] = done.stdout
    return results


def _kernels(module: str) -> set[str]:
    """The launchable kernels a module of ``xentkit.triton`` defines (read from its source, since
    this process may define them under the interpreter)."""
    source = Path(__file__).parents[1].joinpath("src", "xentkit", "triton", f"{module}.py").read_text()
    names = set()
    lines = source.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.strip() == "@triton.jit" and lines[i + 1].startswith("def ") and "_kernel(" in lines[i + 1]:
            names.add(lines[i + 1][4:lines[i + 1].index("(")])
    return names


def test_every_launch_compiles_without_spills(compiled):
    assert compiled["problems"] == [], "\n".join(compiled["problems"])
    assert compiled["returncode"] == 0, compiled["stdout"][-4000:]
    for result in compiled["results"]:
        assert "error" not in result
        assert 0 < result["registers"] <= 255, result
        assert result["local"] == 0 and result["stack"] == 0, result


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("module", MODULES)
def test_every_kernel_is_covered_in_every_dtype(compiled, module, arch):
    """A kernel added to a module without a scenario that launches it fails here."""
    kernels = _kernels(module)
    assert len(kernels) >= 3, kernels  # pass 1, the per-row combine, pass 2 at least
    for kernel in kernels:
        dtypes = {r["signature"].get("logits_ptr") for r in compiled["results"]
                  if r["module"] == f"triton.{module}" and r["kernel"] == kernel and r["arch"] == arch}
        assert {"*fp32", "*fp16", "*bf16"} <= dtypes, (kernel, dtypes)


@pytest.mark.parametrize("arch", [90, 80])
def test_the_epilogue_is_covered_in_both_forms_and_every_loss_dtype(compiled, arch):
    """The epilogue (``triton.reduction``) in one launch and in spans of rows, storing float32,
    bfloat16 (rounded on its bits) and float64 losses."""
    assert _kernels("reduction") == {"_epilogue_kernel", "_finish_kernel"}
    epilogues = [r["constexprs"] for r in compiled["results"]
                 if r["module"] == "triton.reduction" and r["kernel"] == "_epilogue_kernel" and r["arch"] == arch]
    assert {c["FINAL"] for c in epilogues} == {True, False}
    assert {(c["BF16"], c["WIDE"]) for c in epilogues} == {(False, False), (True, False), (False, True)}
    assert {c["REDUCTION"] for c in epilogues} == {0, 2}
    assert any(r["kernel"] == "_finish_kernel" and r["arch"] == arch for r in compiled["results"])


def test_the_logits_stream_in_16_byte_loads_at_a_large_vocabulary(compiled):
    """At 128256 classes (rows of 16k elements, aligned) pass 1 and pass 2 read the logits 16
    bytes at a time and pass 2 writes the gradient so, in every dtype and on both architectures."""
    streaming = [r for r in compiled["results"] if r["kernel"] != "_loss_kernel" and "combine" not in r["kernel"]
                 and r["constexprs"].get("BLOCK") == 8192]
    assert len(streaming) >= 2 * 3 * 6, len(streaming)
    for result in streaming:
        assert result["rows_aligned"], result
        assert result["widest_load"] == 16, result
        if result["signature"]["logits_ptr"] in ("*bf16", "*fp16"):
            assert result["narrow_16bit_loads"] <= 2, result  # a scalar or two, never the logits
        if result["kernel"] != "_partials_kernel":
            assert result["widest_store"] == 16, result
