#!/usr/bin/env python
"""The GPU issue's table and goals in one command: runs the GPU benchmarks on the issue's shapes,
each in its own process, and prints every goal with the number that decides it.

    python benchmarks/bench_gpu.py                 # on a CUDA machine: ~5 minutes
    python benchmarks/bench_gpu.py --quick         # fewer rounds, no 2^34-element case
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --device cpu --smoke   # tiny shapes, CPU

On a GPU machine lent for a few minutes, with this checkout and no network: write the results
where they come back, and install the optional peers first from carried wheels (e.g.
``liger-kernel==0.8.5`` and ``cut-cross-entropy==25.1.1``, ``pip install --no-deps``), or their
goals say "not measured"::

    PYTHONUNBUFFERED=1 python benchmarks/bench_gpu.py --out "$OUT" 2>&1 | tee "$OUT/log"

The children import xentkit from this checkout's ``src`` (installed or not). A step that fails
is recorded (``"error"`` in its entry, a failed peer under ``"failed"``) and the others still
run; ``gpu_goals.json`` is rewritten after every step. Exit code 1 when a step failed. On CUDA
the xentkit rows take ``backend="triton"``: a call the kernels cannot take raises instead of
timing torch ops under xentkit's name.

Runs (JSON of each beside this one, in ``--out``):

- ``bench_gpu_cross_entropy.py``: bfloat16 8192 × 128256, float32 4096 × 32000 (copy, torch,
  torch.compile, Liger-Kernel when importable, xentkit new buffer / in place / without the label
  check), and with ``--huge`` the 65536 × 262144 bfloat16 in-place case (past 2^31 elements);
- ``bench_gpu_linear_cross_entropy.py``: bfloat16 N 8192, D 4096, V 128256 and float32 N 4096,
  D 4096, V 32000 (the three matmuls, torch, torch.compile, Liger-Kernel and Cut Cross-Entropy
  when importable, xentkit with float32 weight-gradient accumulation and without);
- ``bench_gpu_log_probs.py``: its default shape (the RL issue's).

Goals (the issue's, on its shapes): cross-entropy bf16 in place ≤ 1.6× the copy and ≥ 1.2×
faster than Liger, new buffer ≤ 2.2× the copy, in-place peak ≤ 1% of the logits; linear bf16
≤ 1.10× the three matmuls, ≥ 1.25× faster than Cut Cross-Entropy, peak ≤ the gradients + 1/8 of
the logits, loss within 1e-5 of float64; the cross-entropy kernel's float32 loss within 1e-5 of
float64 and its bfloat16 gradient within 2^-8 (one rounding) of float64. A peer that is not installed leaves its goal unmeasured
(said so). Writes ``gpu_goals.json`` with every number and verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(script: str, arguments: list[str], output: Path, device: str) -> dict:
    """One script in its own process; its JSON, or ``{"error": ...}`` when it failed (the steps
    after it still run, and what it wrote before failing is kept)."""
    command = [sys.executable, str(HERE / script), "--device", device, *arguments, "--output", str(output)]
    print("$", " ".join(command[1:]), flush=True)
    # the children import xentkit from this checkout even where it is not installed (an absolute
    # path: they run in this folder)
    environment = dict(os.environ)
    source = str(HERE.parent / "src")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [source, environment.get("PYTHONPATH")]))
    if output.exists():
        output.unlink()  # no stale results from an earlier run
    code = subprocess.run(command, cwd=HERE, env=environment).returncode
    report = json.loads(output.read_text()) if output.exists() else {}
    if code != 0:
        report["error"] = f"{script} exited with {code}"
        print(f"  {report['error']}", flush=True)
    return report


def _median(entry: dict | None) -> float | None:
    return None if entry is None else entry.get("median_ms")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _goal(goals: list, name: str, value: float | None, limit: float, *, at_least: bool = False, unit: str = "") -> None:
    if value is None or value != value:  # no peer, or no peak memory off a GPU (NaN)
        value, verdict = None, "not measured"
    else:
        verdict = "met" if (value >= limit if at_least else value <= limit) else "MISSED"
    goals.append({"goal": name, "value": value, "limit": limit, "at_least": at_least, "verdict": verdict})
    shown = "-" if value is None else f"{value:.4g}{unit}"
    print(f"  {name:58s} {shown:>12s}  {'>=' if at_least else '<='} {limit:g}{unit}  {verdict}")


def cross_entropy_goals(report: dict, goals: list) -> None:
    shapes = [shape for shape in report.get("shapes", []) if "providers" in shape]
    shape = shapes[0] if shapes else {"shape": ["?", "?"], "dtype": "(no result)", "providers": {}, "logits_mib": 1.0}
    providers = shape["providers"]  # bfloat16 8192 × 128256
    copy = _median(providers.get("copy"))
    inplace = providers.get("xentkit_inplace")
    print(f"cross-entropy {shape['shape'][0]} × {shape['shape'][1]} {shape['dtype']}")
    _goal(goals, "in place: × the copy", _ratio(_median(inplace), copy), 1.6)
    _goal(goals, "in place: Liger's time ÷ xentkit's", _ratio(_median(providers.get("liger")), _median(inplace)), 1.2,
          at_least=True)
    _goal(goals, "new gradient buffer: × the copy", _ratio(_median(providers.get("xentkit")), copy), 2.2)
    peak = None if inplace is None else inplace["peak_mib"] / shape["logits_mib"]
    _goal(goals, "in place: peak memory ÷ the logits", peak, 0.01)
    kernel = providers.get("xentkit_kernel")
    _goal(goals, "kernel's float32 loss: relative error vs float64",
          None if kernel is None else kernel.get("loss_relative_error"), 1e-5)
    # one bfloat16 rounding is at most 2^-9 of a value; 2^-8 leaves the float32 arithmetic room
    _goal(goals, "in place: gradient error ÷ max |gradient| vs float64",
          None if inplace is None else inplace.get("gradient_relative_error"), 2**-8)


def linear_goals(report: dict, goals: list) -> None:
    shape = report.get("shape", {"rows": 0, "features": 0, "classes": 0, "dtype": "(no result)"})
    providers = report.get("providers", {})
    rows, features, classes = shape["rows"], shape["features"], shape["classes"]
    item = 2 if shape["dtype"] in ("bfloat16", "float16") else 4
    budget = ((rows * features + classes * features) * item + rows * classes * item / 8) / 2**20
    print(f"linear + cross-entropy N {rows}, D {features}, V {classes} {shape['dtype']}")
    for name in ("xentkit", "xentkit_lowmem"):
        entry = providers.get(name)
        _goal(goals, f"{name}: × the three matmuls", None if entry is None else entry.get("vs_matmuls"), 1.10)
        _goal(goals, f"{name}: Cut Cross-Entropy's time ÷ xentkit's",
              _ratio(_median(providers.get("cce")), _median(entry)), 1.25, at_least=True)
        _goal(goals, f"{name}: peak ÷ (gradients + logits/8)",
              None if entry is None else entry["peak_mib"] / budget, 1.0)
        _goal(goals, f"{name}: loss relative error vs float64",
              None if entry is None else entry["loss_relative_error"], 1e-5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no 2^34-element case")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a test of this script)")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="folder of the JSON results (default: benchmarks/results; with --smoke a new temporary "
        "folder, so that a smoke run never replaces the committed GPU results)",
    )
    args = parser.parse_args()
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="bench_gpu_smoke_")) if args.smoke else HERE / "results"
    args.out = args.out.resolve()  # (the children run in this folder: a relative path would be theirs)
    args.out.mkdir(parents=True, exist_ok=True)
    rounds = ["--rounds", "1" if args.smoke else "5" if args.quick else "15"]
    if args.smoke:
        ce_shapes, linear_shapes = "48x300:bfloat16,32x200:float32", [("48", "16", "300", "bfloat16")]
        log_probs = ["--rows", "48", "--features", "16", "--classes", "300", "--dtype", "float32"]
    else:
        ce_shapes = "8192x128256:bfloat16,4096x32000:float32"
        linear_shapes = [("8192", "4096", "128256", "bfloat16"), ("4096", "4096", "32000", "float32")]
        log_probs = []
    huge = [] if args.quick or args.smoke else ["--huge"]
    linear_rounds = "1" if args.smoke else "5" if args.quick else "9"
    summary: dict = {"command": " ".join(sys.argv), "runs": {}, "goals": []}

    def write_goals() -> None:
        """The goals from what has run so far (a later failure loses nothing before it)."""
        goals: list = []
        print("\ngoals")
        cross_entropy_goals(summary["runs"].get("cross_entropy", {}), goals)
        linear_goals((summary["runs"].get("linear_cross_entropy") or [{}])[0], goals)
        summary["goals"] = goals
        (args.out / "gpu_goals.json").write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.out / 'gpu_goals.json'}\n", flush=True)

    # cross-entropy first (its JSON is written after each shape, --huge last), then the linear runs
    summary["runs"]["cross_entropy"] = _run(
        "bench_gpu_cross_entropy.py", ["--shapes", ce_shapes, *rounds, *huge], args.out / "gpu_cross_entropy.json",
        args.device,
    )
    write_goals()
    linear_reports = summary["runs"]["linear_cross_entropy"] = []
    for rows, features, classes, dtype in linear_shapes:
        linear_reports.append(_run(
            "bench_gpu_linear_cross_entropy.py",
            ["--rows", rows, "--features", features, "--classes", classes, "--dtype", dtype,
             "--rounds", linear_rounds],
            args.out / f"gpu_linear_cross_entropy_{dtype}.json", args.device,
        ))
        write_goals()
    summary["runs"]["log_probs"] = _run(
        "bench_gpu_log_probs.py", [*log_probs, "--rounds", "1" if args.smoke else "5"],
        args.out / "gpu_log_probs.json", args.device,
    )
    write_goals()
    failed = [name for name, run in summary["runs"].items() if isinstance(run, dict) and "error" in run]
    failed += [f"linear {i}" for i, run in enumerate(linear_reports) if "error" in run]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
