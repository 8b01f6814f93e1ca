"""The GPU benchmark scripts run end to end (``--device cpu``, tiny shapes): a GPU session then
finds them working. Times on the CPU mean nothing; only that every provider runs, each loss is
near float64 and the JSON is written. (The Triton kernels run under Triton's interpreter.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

SCRIPTS = {
    "bench_gpu_cross_entropy.py": ["--shapes", "48x300:float32,24x200:bfloat16", "--rounds", "1",
                                   "--providers", "copy,torch,xentkit,xentkit_inplace,xentkit_nocheck,xentkit_kernel,xentkit_opts"],
    "bench_gpu_linear_cross_entropy.py": ["--rows", "48", "--features", "16", "--classes", "300",
                                          "--dtype", "float32", "--rounds", "1", "--providers", "matmuls,torch,xentkit,xentkit_lowmem"],
    "bench_gpu_log_probs.py": ["--rows", "48", "--features", "16", "--classes", "300", "--dtype", "float32",
                               "--rounds", "1", "--providers", "matmuls,torch,xentkit"],
}


def test_the_goals_driver_runs_on_the_cpu(tmp_path):
    """bench_gpu.py (the issue's table and goals in one command) with --smoke: every goal gets a
    verdict, the unmeasurable ones (no peer installed, no GPU memory) say so."""
    environment = dict(os.environ, TRITON_INTERPRET="1", TMPDIR=str(tmp_path))
    committed = {path.name: path.read_bytes() for path in (BENCHMARKS / "results").glob("*.json")}
    # as its docstring gives it, without --out: a smoke run writes to a temporary folder (it had
    # replaced the committed GPU results in benchmarks/results)
    completed = subprocess.run(
        [sys.executable, "bench_gpu.py", "--device", "cpu", "--smoke"],
        cwd=BENCHMARKS, env=environment, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert {path.name: path.read_bytes() for path in (BENCHMARKS / "results").glob("*.json")} == committed
    (folder,) = tmp_path.glob("bench_gpu_smoke_*")
    goals = json.loads((folder / "gpu_goals.json").read_text())["goals"]
    assert len(goals) == 14
    assert {goal["verdict"] for goal in goals} <= {"met", "MISSED", "not measured"}
    peaks = [goal for goal in goals if "peak" in goal["goal"]]
    assert peaks and all(goal["verdict"] == "not measured" for goal in peaks)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_gpu_benchmark_runs_on_the_cpu(script, tmp_path):
    output = tmp_path / "result.json"
    environment = dict(os.environ, TRITON_INTERPRET="1")
    completed = subprocess.run(
        [sys.executable, script, "--device", "cpu", *SCRIPTS[script], "--output", str(output)],
        cwd=BENCHMARKS, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(output.read_text())
    errors = [
        entry.get("loss_relative_error", entry.get("relative_error"))
        for section in ([report] if "providers" in report else report.get("shapes", []))
        for entry in section["providers"].values()
    ]
    errors = [error for error in errors if error is not None]
    assert errors and max(errors) < 1e-2  # bfloat16 logits' own rounding is ~4e-3


def test_a_failing_step_is_recorded_and_the_goals_still_written(tmp_path, monkeypatch):
    """A step that fails (here: a script that does not exist) gives an "error" entry, not an
    exception, so the steps after it still run on a GPU lent for a few minutes; the goals it
    decides say "not measured"."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_gpu

    report = bench_gpu._run("no_such_script.py", [], tmp_path / "missing.json", "cpu")
    assert report["error"].startswith("no_such_script.py exited with")
    goals: list = []
    bench_gpu.cross_entropy_goals(report, goals)
    bench_gpu.linear_goals(report, goals)
    assert len(goals) == 14 and {goal["verdict"] for goal in goals} == {"not measured"}


def test_a_provider_that_fails_is_left_out_and_named(tmp_path):
    """A provider that raises during warm-up (a peer whose call fails, say) is recorded under
    "failed"; the others are timed and the JSON is written."""
    script = (
        "import sys, bench_gpu_cross_entropy as b\n"
        "original = b._providers\n"
        "def providers(names, device):\n"
        "    table = original(names, device)\n"
        "    def boom(x, y):\n"
        "        raise RuntimeError('this peer fails')\n"
        "    table['boom'] = boom\n"
        "    return table\n"
        "b._providers = providers\n"
        "sys.argv = ['x', '--device', 'cpu', '--shapes', '24x50:float32', '--rounds', '1',\n"
        "            '--providers', 'copy,xentkit', '--output', sys.argv[1]]\n"
        "sys.exit(b.main())\n"
    )
    output = tmp_path / "ce.json"
    completed = subprocess.run(
        [sys.executable, "-c", script, str(output)], cwd=BENCHMARKS, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    shape = json.loads(output.read_text())["shapes"][0]
    assert set(shape["providers"]) == {"copy", "xentkit"}
    assert shape["failed"] == {"boom": "RuntimeError: this peer fails"}


def test_the_gpu_session_script_parses_and_names_files_that_exist():
    """benchmarks/gpu_session.sh is what a session with a lent GPU runs, in minutes it cannot
    spend on a typo: the shell parses it, and every test file and script it names exists."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_session.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    named = set(re.findall(r"\b(tests/test_\w+\.py|benchmarks/\w+\.py)\b", text))
    assert len(named) >= 10, named
    root = script.parents[1]
    assert [path for path in sorted(named) if not (root / path).exists()] == []
    done = subprocess.run(["bash", str(script), "nothing"], capture_output=True, text=True,
                          env={**os.environ, "OUT": ""}, cwd=root)
    assert done.returncode == 2 and "unknown step: nothing" in done.stderr
