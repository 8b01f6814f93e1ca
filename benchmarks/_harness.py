"""What the CPU benchmarks of the fused linear forms share: memory readings, one process per
provider, interleaved rounds, the summary table's numbers, the goals' lines and the JSON record.

Peak memory above the inputs = ``getrusage(RUSAGE_SELF).ru_maxrss`` − the resident set size
read after the inputs were allocated, in a process of its own per provider (so that the peak is
the OS's, untouched by the other providers).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path


def rss_bytes() -> int:
    """The current resident set size, from /proc (Linux) or, failing that, the peak so far."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def run_record(load_before: tuple[float, ...]) -> dict:
    """What a results file keeps of the run that wrote it: the UTC date, :func:`machine`, and the
    1-minute load average when the run began and ended (these machines are shared: a ratio
    taken under load is not one taken idle)."""
    from datetime import datetime, timezone

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **machine(),
        "load_before": round(load_before[0], 2), "load_after": round(os.getloadavg()[0], 2),
    }


def cpu_model() -> str:
    """The CPU's model name where the system says it (Linux's /proc/cpuinfo), else ""."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine() -> dict:
    import numba
    import numpy
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "numba": numba.__version__,
    }


def spawn(script: str, provider: str, arguments: list[str]) -> dict:
    """Run ``script --worker provider *arguments`` in a new process; its last stdout line is the
    worker's JSON result."""
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    completed = subprocess.run(
        [sys.executable, script, "--worker", provider, *arguments], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"provider {provider} failed:\n{completed.stderr}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["load_average_before"] = load_before
    return result


def interleaved(script: str, providers: list[str], arguments: list[str], rounds: int) -> dict[str, list[dict]]:
    """Every provider once per round, in turn (load from other users falls on all alike)."""
    runs: dict[str, list[dict]] = {provider: [] for provider in providers}
    for _ in range(rounds):
        for provider in providers:
            runs[provider].append(spawn(script, provider, arguments))
    return runs


def summarize(processes: list[dict], keep: tuple[str, ...]) -> dict:
    """One provider's processes as one result: every timed pass, median, min, peaks, and the
    first process's values of ``keep``."""
    times = [t for process in processes for t in process["times_s"]]
    return {
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_above_inputs_bytes": max(p["peak_above_inputs_bytes"] for p in processes),
        "first_pass_peak_bytes": max(p["peak_after_each_pass_bytes"][0] for p in processes),
        "peak_after_each_pass_bytes": [p["peak_after_each_pass_bytes"] for p in processes],
        **{key: processes[0][key] for key in keep},
        "load_average_before": [p["load_average_before"] for p in processes],
    }


def significant(value: object, digits: int = 4) -> object:
    """A float to ``digits`` significant digits for printing (a difference of 1.2e-7 stays
    1.2e-07; rounded to 4 decimals it printed as 0.0); anything else as it is."""
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def print_goals(goals: dict[str, dict]) -> None:
    """One line per goal: its verdicts ("met"/"MISSED") and its numbers."""
    for name, goal in goals.items():
        verdicts = {key: value for key, value in goal.items() if key.startswith("met")}
        summary = ", ".join(
            f"{key.replace('met_', 'by ').replace('met', '')}{' ' if key != 'met' else ''}"
            f"{'met' if value else 'MISSED'}".strip()
            for key, value in verdicts.items()
        )
        numbers = {key: significant(value) for key, value in goal.items() if not key.startswith("met")}
        print(f"goal {name:<26} {summary:<28} {numbers}")


def append_record(path: Path, record: dict, latest_key: str) -> None:
    """Add ``record`` to ``path``'s ``runs``; ``latest`` keeps the last run per ``latest_key``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    if path.exists():
        try:
            previous = json.loads(path.read_text())
            runs = previous.get("runs", []) if isinstance(previous, dict) else []
        except json.JSONDecodeError:
            runs = []
    runs.append(record)
    latest = {str(run["config"].get(latest_key, "")): run for run in runs}
    path.write_text(json.dumps({"latest": latest, "runs": runs}, indent=2) + "\n")
    print(f"wrote {path}")


def print_table(results: dict[str, dict], value_key: str, memory_budget: float) -> None:
    """The providers' table: median, min and max time, the ratio to ``matmuls`` (when it ran),
    peaks against ``memory_budget``, and each provider's ``value_key`` (its loss or objective)."""
    floor = results.get("matmuls")
    header = (
        f"{'provider':<14} {'median s':>9} {'min s':>7} {'max s':>7} {'× matmuls':>16} "
        f"{'peak MiB':>9} {'1st pass':>9} {'× budget':>9} {value_key:>14}"
    )
    print(header)
    print("-" * len(header))
    for provider, result in results.items():
        ratio = (
            f"{result['median_s'] / floor['median_s']:.3f} / {result['min_s'] / floor['min_s']:.3f}"
            if floor else "-"
        )
        peak = result["peak_above_inputs_bytes"]
        value = f"{result[value_key]:.6f}" if provider != "matmuls" else "-"
        print(
            f"{provider:<14} {result['median_s']:>9.3f} {result['min_s']:>7.3f} "
            f"{max(result['times_s']):>7.3f} {ratio:>16} {peak / 2**20:>9.0f} "
            f"{result['first_pass_peak_bytes'] / 2**20:>9.0f} {peak / memory_budget:>9.2f} {value:>14}"
        )
    print(
        "× matmuls: median / min. peak: above the inputs, gradients included, over all passes "
        "(1st pass: over the first pass of each process); × budget from the former."
    )
    print(f"memory budget (gradients + logits/8): {memory_budget / 2**20:.0f} MiB above the inputs")


def floor_goals(results: dict[str, dict], time_goal: float, memory_budget: float) -> dict[str, dict]:
    """xentkit's goals against the matmuls alone (time) and the memory budget (peak)."""
    ours, floor = results["xentkit"], results.get("matmuls")
    goals = {}
    if floor:
        by_median = ours["median_s"] / floor["median_s"]
        by_min = ours["min_s"] / floor["min_s"]
        goals["time_vs_matmuls"] = {
            "ratio_median": by_median, "ratio_min": by_min, "limit": time_goal,
            "met_median": by_median <= time_goal, "met_min": by_min <= time_goal,
        }
    goals["peak_memory"] = {
        "bytes": ours["peak_above_inputs_bytes"], "limit_bytes": memory_budget,
        "met": ours["peak_above_inputs_bytes"] <= memory_budget,
    }
    return goals


def timed_passes(
    provider: str, step, warm_inputs: tuple, inputs: tuple, repeats: int, value_key: str, settle: int = 0
) -> dict:
    """A worker's measurement: two warm-up steps on ``warm_inputs`` (JIT compilation, thread
    pools), ``settle`` untimed steps on ``inputs`` (a compiled provider whose warm-up graph's
    guards do not hold the measured shape compiles again there: 3.2 s of a 0.3 s pass, a
    review found), then ``repeats`` timed steps on ``inputs`` (``x, w, ...``: their gradients
    are reset before each), with the peak resident memory above the RSS read once the inputs
    exist. ``step(*inputs)`` returns the loss or objective, reported under ``value_key``."""
    import gc
    import time

    import torch

    for _ in range(2):
        step(*warm_inputs)
    del warm_inputs
    gc.collect()
    x, w = inputs[:2]
    baseline = rss_bytes()
    # (the peak is the process's highest RSS: a compile in these passes counts in every pass's
    # reading, as it did inside the first timed pass before them)
    for _ in range(settle):
        step(*inputs)
    times, peaks, value = [], [], None
    for _ in range(repeats):
        x.grad = w.grad = None
        gc.collect()
        start = time.perf_counter()
        value = step(*inputs)
        times.append(time.perf_counter() - start)
        peaks.append(peak_rss_bytes() - baseline)
    return {
        "provider": provider,
        "times_s": times,
        "median_s": statistics.median(times),
        "peak_above_inputs_bytes": peaks[-1],
        "peak_after_each_pass_bytes": peaks,
        value_key: value,
        "grad_x_norm": float(x.grad.norm()),
        "grad_w_norm": float(w.grad.norm()),
        "grad_x_projection": projection(x.grad),
        "grad_w_projection": projection(w.grad),
        "torch_threads": torch.get_num_threads(),
    }


def projection(tensor, block: int = 1 << 22) -> float:
    """⟨tensor, probe⟩ in float64, the probe sin(0.7071·k + 0.3) over the flat index k: with
    the norm, a fingerprint of a gradient that another process's can be compared with (two
    gradients that differ give different values but by coincidence), a block at a time (no
    tensor-sized temporary; after the timed passes, so the peaks above are not touched)."""
    import torch

    flat = tensor.detach().reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), block):
        values = flat[start:start + block].double()
        index = torch.arange(start, start + values.numel(), dtype=torch.float64)
        total += float((values * torch.sin(index * 0.7071 + 0.3)).sum())
    return total


# how far a provider's gradient fingerprints may be from xentkit's, relative to the gradient's
# norm (a few roundings of the dtype over the sums, not a different answer)
GRADIENT_AGREEMENT = {"float16": 1e-2, "float32": 1e-4, "float64": 1e-10}


def same_gradients(results: dict[str, dict], ours: str, dtype: str, skip: tuple[str, ...] = ("matmuls",)) -> dict:
    """The goal that every provider's gradients (of x and of W) match ``ours``': norms and
    :func:`projection` within ``GRADIENT_AGREEMENT[dtype]`` of our norm."""
    differences = {}
    for provider, result in results.items():
        if provider in skip or provider == ours:
            continue
        worst = 0.0
        for name in ("x", "w"):
            scale = results[ours][f"grad_{name}_norm"] or 1.0
            for key in (f"grad_{name}_norm", f"grad_{name}_projection"):
                worst = max(worst, abs(result[key] - results[ours][key]) / scale)
        differences[provider] = worst
    return {
        "max_relative_difference": max(differences.values(), default=0.0),
        "by_provider": {provider: significant(value) for provider, value in differences.items()},
        "met": all(value <= GRADIENT_AGREEMENT[dtype] for value in differences.values()),
    }


def relative_difference(got, want, rows: int = 256) -> float:
    """max |got − want| / max |want| of two arrays (NumPy, or CPU tensors) of one shape, NaN where
    either holds a NaN; a block of rows at a time: no logits-sized temporaries."""
    import numpy as np

    worst = largest = 0.0
    for start in range(0, want.shape[0], rows):
        expected = np.asarray(want[start:start + rows], dtype=np.float64)
        difference = np.abs(np.asarray(got[start:start + rows], dtype=np.float64) - expected)
        worst = max(worst, float(difference.max(initial=0.0)) if not np.isnan(difference).any() else np.nan)
        largest = max(largest, float(np.abs(expected).max(initial=0.0)))
    return worst / largest if largest else worst


def agreement(name: str, got, first: str, want, dtype: str, what: str) -> float:
    """``name``'s gradient against ``first``'s, by :func:`relative_difference`; the run stops
    (SystemExit naming the provider) beyond ``GRADIENT_AGREEMENT[dtype]``: the timings of a wrong
    answer mean nothing."""
    difference = relative_difference(got, want)
    if not difference <= GRADIENT_AGREEMENT[dtype]:
        raise SystemExit(
            f"{name}'s gradient on {what} differs from {first}'s by {difference:.3g} of its largest "
            f"entry (at most {GRADIENT_AGREEMENT[dtype]:g} allowed): not timed"
        )
    return difference


def agreeing_gradients(gradients: dict, dtype: str, what: str) -> dict[str, float]:
    """Each provider's gradient (name → array) against the first one's, by :func:`agreement`."""
    (first, want), *others = gradients.items()
    return {name: agreement(name, got, first, want, dtype, what) for name, got in others}
