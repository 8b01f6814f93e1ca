"""Benchmark: fused linear + cross-entropy, forward and backward, time and peak memory.

Providers, each run in its own Python process (so that peak memory is the OS's, untouched by
the others):

- ``matmuls``        the three matmuls alone (x Wᵀ, dz W, dzᵀ x) on materialized logits: the floor
- ``torch``          ``F.cross_entropy(F.linear(x, W), y)``: materialized logits
- ``torch-chunked``  ``F.linear_cross_entropy(x, W, y, options=LinearCrossEntropyOptions())``
- ``xentkit``        ``xentkit.torch.linear_cross_entropy(x, W, y)``
- ``torch-compile``, ``xentkit-compile``: ``torch`` and ``xentkit`` under
  ``torch.compile(dynamic=True)`` (inductor), with one untimed pass on the measured shapes
  after the warm-up (the warm-up graph's guards need not hold them: torch's recompiled there,
  3.2 s inside what had been the first timed pass). Asked for by name, not by default.

Each worker warms up on a small problem (JIT compilation, thread pools), allocates the inputs,
reads its resident set size (RSS), then times ``repeats`` forward+backward passes. Peak memory
above the inputs = ``getrusage(RUSAGE_SELF).ru_maxrss`` − RSS after the inputs were allocated;
it includes the gradients (x.grad, W.grad), which every provider must produce. The providers
run in ``rounds`` interleaved rounds (matmuls, torch, ..., matmuls, torch, ...), so that load
from other users of a shared machine falls on all of them alike; the table gives the median and
the minimum over every timed pass (the minimum is the least disturbed by such load).

Goals for xentkit: time ≤ 1.15 × the matmuls alone; peak above inputs ≤ gradients + 1/8 of the
logits' bytes; faster than torch-chunked; the same loss as the others.

    python benchmarks/bench_linear_cross_entropy.py                      # 4096 × 1024 → 32000
    python benchmarks/bench_linear_cross_entropy.py --rows 1024 --repeats 2 --rounds 1
    python benchmarks/bench_linear_cross_entropy.py --providers xentkit --chunk-size 64

Prints a table and appends the run to ``benchmarks/results/linear_cross_entropy.json`` (``runs``:
every run; ``latest``: the last run per reduction).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _harness import (
    append_record,
    floor_goals,
    interleaved,
    machine,
    print_goals,
    print_table,
    same_gradients,
    summarize,
    timed_passes,
)

DEFAULT_PROVIDERS = ("matmuls", "torch", "torch-chunked", "xentkit")
PROVIDERS = (*DEFAULT_PROVIDERS, "torch-compile", "xentkit-compile")
_COMPILED: dict[str, object] = {}
RESULTS = Path(__file__).resolve().parent / "results" / "linear_cross_entropy.json"
TIME_GOAL = 1.15  # × the matmuls alone
MEMORY_LOGITS_FRACTION = 1 / 8  # peak above inputs ≤ gradients + this × logits bytes


def _step(provider: str, x, w, target, chunk_size: int | None, reduction: str = "mean"):
    """One forward + backward (of the sum, for reduction="none"); returns the loss as a float."""
    import torch
    import torch.nn.functional as F

    if provider == "matmuls":
        with torch.no_grad():
            logits = x @ w.t()
            x.grad = logits @ w  # the logits stand in for their gradient
            w.grad = logits.t() @ x
            return 0.0
    if provider == "torch":
        loss = F.cross_entropy(F.linear(x, w), target, reduction=reduction)
    elif provider == "torch-chunked":
        loss = F.linear_cross_entropy(
            x, w, target, reduction=reduction, options=torch.nn.LinearCrossEntropyOptions()
        )
    elif provider == "xentkit":
        import xentkit.torch as xt

        loss = xt.linear_cross_entropy(x, w, target, reduction=reduction, chunk_size=chunk_size)
    elif provider in ("torch-compile", "xentkit-compile"):
        if provider not in _COMPILED:
            import xentkit.torch as xt

            def loss_of(x, w, target):
                if provider == "torch-compile":
                    return F.cross_entropy(F.linear(x, w), target, reduction=reduction)
                return xt.linear_cross_entropy(x, w, target, reduction=reduction, chunk_size=chunk_size)

            _COMPILED[provider] = torch.compile(loss_of, dynamic=True)
        loss = _COMPILED[provider](x, w, target)
    else:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    loss = loss.sum()
    loss.backward()
    return float(loss)


def _inputs(rows: int, features: int, classes: int, dtype_name: str, seed: int):
    import torch

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=generator, dtype=dtype).requires_grad_(True)
    # Scaled in place: a temporary here would raise the peak before the baseline is read.
    w = torch.randn(classes, features, generator=generator, dtype=dtype).div_(features**0.5)
    w.requires_grad_(True)
    target = torch.randint(0, classes, (rows,), generator=generator)
    return x, w, target


def run_worker(args: argparse.Namespace) -> dict:
    """Runs in the child process: warm up, allocate, time, measure."""
    provider = args.worker

    def step(*inputs):
        return _step(provider, *inputs, args.chunk_size, args.reduction)

    warm = _inputs(256, 64, 1024, args.dtype, seed=1)
    inputs = _inputs(args.rows, args.features, args.classes, args.dtype, seed=0)
    # (compiled: the warm-up graph's guards need not hold 32000 classes; one untimed pass there)
    settle = 1 if provider.endswith("-compile") else 0
    return timed_passes(provider, step, warm, inputs, args.repeats, "loss", settle=settle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096, help="N, rows of the input")
    parser.add_argument("--features", type=int, default=1024, help="D, in_features")
    parser.add_argument("--classes", type=int, default=32000, help="V, classes (vocabulary)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per provider process")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved processes per provider")
    parser.add_argument("--providers", nargs="+", default=list(DEFAULT_PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--chunk-size", type=int, default=None, help="xentkit's chunk_size")
    parser.add_argument(
        "--reduction", default="mean", choices=["mean", "sum", "none"],
        help='the loss reduction ("none": backward of the sum, recomputed in backward by xentkit)',
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0

    itemsize = 4 if args.dtype == "float32" else 8
    logits_bytes = args.rows * args.classes * itemsize
    gradient_bytes = (args.rows + args.classes) * args.features * itemsize
    memory_budget = gradient_bytes + MEMORY_LOGITS_FRACTION * logits_bytes
    print(
        f"linear_cross_entropy forward+backward: N={args.rows} D={args.features} V={args.classes} "
        f"{args.dtype}, reduction={args.reduction}, {args.repeats} repeats × {args.rounds} rounds, logits {logits_bytes / 2**20:.0f} MiB, "
        f"gradients {gradient_bytes / 2**20:.0f} MiB"
    )
    arguments = [
        "--rows", str(args.rows), "--features", str(args.features), "--classes", str(args.classes),
        "--dtype", args.dtype, "--repeats", str(args.repeats), "--reduction", args.reduction,
        *(["--chunk-size", str(args.chunk_size)] if args.chunk_size is not None else []),
    ]
    runs = interleaved(__file__, args.providers, arguments, args.rounds)
    results = {
        provider: summarize(processes, ("loss", "grad_x_norm", "grad_w_norm", "grad_x_projection", "grad_w_projection", "torch_threads"))
        for provider, processes in runs.items()
    }

    print_table(results, "loss", memory_budget)

    goals = {}
    if "xentkit" in results:
        ours = results["xentkit"]
        goals = floor_goals(results, TIME_GOAL, memory_budget)
        if "torch-chunked" in results:
            chunked = results["torch-chunked"]
            goals["faster_than_torch_chunked"] = {
                "ratio_median": ours["median_s"] / chunked["median_s"],
                "ratio_min": ours["min_s"] / chunked["min_s"],
                "met_median": ours["median_s"] < chunked["median_s"],
                "met_min": ours["min_s"] < chunked["min_s"],
            }
        losses = [r["loss"] for p, r in results.items() if p != "matmuls"]
        goals["same_loss"] = {
            "max_relative_difference": max(abs(value - ours["loss"]) for value in losses) / abs(ours["loss"]),
            "met": all(abs(value - ours["loss"]) <= 1e-5 * abs(ours["loss"]) for value in losses),
        }
        goals["same_gradients"] = same_gradients(results, "xentkit", args.dtype)
        print_goals(goals)

    record = {
        "benchmark": "linear_cross_entropy forward+backward",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "config": {
            "rows": args.rows, "features": args.features, "classes": args.classes,
            "dtype": args.dtype, "reduction": args.reduction, "repeats": args.repeats,
            "rounds": args.rounds,
            "chunk_size": args.chunk_size,
            "logits_bytes": logits_bytes, "gradient_bytes": gradient_bytes,
            "memory_budget_bytes": memory_budget,
        },
        "results": results,
        "goals": goals,
    }
    append_record(args.output, record, "reduction")
    return 0


if __name__ == "__main__":
    sys.exit(main())
