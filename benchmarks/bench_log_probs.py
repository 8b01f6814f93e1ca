"""Benchmark: token log-probabilities and entropies from hidden states, forward and backward.

The work of a PPO / GRPO step's policy term: with z = x Wᵀ / T, the objective
Σ_t a_t·log p(y_t) + Σ_t b_t·H_t (a, b fixed random per-token weights) and its gradients with
respect to x and W. Providers, each in its own Python process (``_harness``: peak memory is the
OS's):

- ``matmuls``   the three matmuls alone (x Wᵀ, dz W, dzᵀ x) on materialized logits: the floor
- ``torch``     float32 logits ``F.linear(x, W) / T``, ``log_softmax``, gather and
                ``−Σ p·log p``: what RL frameworks do today
- ``xentkit``   ``xentkit.torch.linear_log_probs(x, W, y, temperature=T, return_entropy=True)``

Goals for xentkit (issue "Token log-probabilities and entropy straight from hidden states"):
time ≤ 1.15 × the matmuls alone; peak above the inputs ≤ gradients + 1/8 of the logits' bytes;
the same objective as torch.

    python benchmarks/bench_log_probs.py                        # N 4096, D 1024, V 32000, float32
    python benchmarks/bench_log_probs.py --rows 1024 --repeats 2 --rounds 1

Prints a table and appends the run to ``benchmarks/results/log_probs.json`` (``runs``: every
run; ``latest``: the last run per dtype).
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

PROVIDERS = ("matmuls", "torch", "xentkit")
RESULTS = Path(__file__).resolve().parent / "results" / "log_probs.json"
TIME_GOAL = 1.15  # × the matmuls alone
MEMORY_LOGITS_FRACTION = 1 / 8  # peak above inputs ≤ gradients + this × logits bytes


def _step(provider: str, x, w, target, a, b, temperature: float, chunk_size: int | None) -> float:
    """One forward + backward of Σ a·log p(y) + Σ b·H; returns the objective."""
    import torch
    import torch.nn.functional as F

    if provider == "matmuls":
        with torch.no_grad():
            logits = x @ w.t()
            x.grad = logits @ w  # the logits stand in for their gradient
            w.grad = logits.t() @ x
            return 0.0
    if provider == "torch":
        # float32 or better, as xentkit computes (float64 inputs stay float64)
        logits = F.linear(x, w).to(torch.promote_types(x.dtype, torch.float32)) / temperature
        log_p = torch.log_softmax(logits, dim=-1)
        picked = log_p.gather(1, target[:, None])[:, 0]
        entropy = -(log_p.exp() * log_p).sum(dim=-1)
    elif provider == "xentkit":
        import xentkit.torch as xt

        picked, entropy = xt.linear_log_probs(
            x, w, target, temperature=temperature, return_entropy=True, chunk_size=chunk_size
        )
    else:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    objective = (picked * a).sum() + (entropy * b).sum()
    objective.backward()
    return float(objective)


def _inputs(rows: int, features: int, classes: int, dtype_name: str, seed: int):
    import torch

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=generator, dtype=dtype).requires_grad_(True)
    # Scaled in place: a temporary here would raise the peak before the baseline is read.
    w = torch.randn(classes, features, generator=generator, dtype=dtype).div_(features**0.5)
    w.requires_grad_(True)
    target = torch.randint(0, classes, (rows,), generator=generator)
    a = torch.randn(rows, generator=generator)
    b = torch.randn(rows, generator=generator).mul_(0.01)
    return x, w, target, a, b


def run_worker(args: argparse.Namespace) -> dict:
    """Runs in the child process: warm up, allocate, time, measure."""
    provider = args.worker

    def step(*inputs):
        return _step(provider, *inputs, args.temperature, args.chunk_size)

    warm = _inputs(256, 64, 1024, args.dtype, seed=1)
    inputs = _inputs(args.rows, args.features, args.classes, args.dtype, seed=0)
    return timed_passes(provider, step, warm, inputs, args.repeats, "objective")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096, help="N, tokens")
    parser.add_argument("--features", type=int, default=1024, help="D, hidden size")
    parser.add_argument("--classes", type=int, default=32000, help="V, vocabulary")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per provider process")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved processes per provider")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--chunk-size", type=int, default=None, help="xentkit's chunk_size")
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
        f"linear_log_probs forward+backward of Σ a·log p(y) + Σ b·H: N={args.rows} D={args.features} "
        f"V={args.classes} {args.dtype}, T={args.temperature}, {args.repeats} repeats × {args.rounds} rounds, "
        f"logits {logits_bytes / 2**20:.0f} MiB, gradients {gradient_bytes / 2**20:.0f} MiB"
    )
    arguments = [
        "--rows", str(args.rows), "--features", str(args.features), "--classes", str(args.classes),
        "--dtype", args.dtype, "--repeats", str(args.repeats), "--temperature", str(args.temperature),
        *(["--chunk-size", str(args.chunk_size)] if args.chunk_size is not None else []),
    ]
    runs = interleaved(__file__, args.providers, arguments, args.rounds)
    results = {
        provider: summarize(processes, ("objective", "grad_x_norm", "grad_w_norm", "grad_x_projection", "grad_w_projection", "torch_threads"))
        for provider, processes in runs.items()
    }

    print_table(results, "objective", memory_budget)

    goals = {}
    if "xentkit" in results:
        ours = results["xentkit"]
        goals = floor_goals(results, TIME_GOAL, memory_budget)
        if "torch" in results:
            theirs = results["torch"]
            goals["faster_than_torch"] = {
                "ratio_median": ours["median_s"] / theirs["median_s"],
                "met_median": ours["median_s"] < theirs["median_s"],
            }
            difference = abs(theirs["objective"] - ours["objective"])
            goals["same_objective"] = {
                "absolute_difference": difference,
                "met": difference <= 1e-5 * max(1.0, abs(ours["objective"])),
            }
        goals["same_gradients"] = same_gradients(results, "xentkit", args.dtype)
        print_goals(goals)

    record = {
        "benchmark": "linear_log_probs forward+backward",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "config": {
            "rows": args.rows, "features": args.features, "classes": args.classes,
            "dtype": args.dtype, "temperature": args.temperature, "repeats": args.repeats,
            "rounds": args.rounds, "chunk_size": args.chunk_size,
            "logits_bytes": logits_bytes, "gradient_bytes": gradient_bytes,
            "memory_budget_bytes": memory_budget,
        },
        "results": results,
        "goals": goals,
    }
    append_record(args.output, record, "dtype")
    return 0


if __name__ == "__main__":
    sys.exit(main())
