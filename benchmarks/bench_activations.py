#!/usr/bin/env python
"""Softmax, log-softmax and logsumexp on the CPU: torch against xentkit's fused kernel.

Providers, interleaved in rounds (one call of each per round, ``--repeats`` rounds, median):

    torch             torch.softmax / torch.log_softmax / torch.logsumexp (dim=-1)
    xentkit           xentkit.softmax / log_softmax / logsumexp (the fused Numba kernel,
                      ``xentkit.kernels.activations``)
    xentkit reference the same functions under ``xentkit.use_reference(True)``: the NumPy
                      formulas, what the api ran before the kernel

on float32 inputs of each shape (standard normal), torch with its default threads, forward only
(these functions return a new array; their backward passes are separate functions).

    python benchmarks/bench_activations.py
    python benchmarks/bench_activations.py --shapes 64x10,2048x32000 --repeats 9

Writes ``benchmarks/results/activations.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import timeit
from pathlib import Path

from _harness import run_record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="64x10,65536x10,16384x32,4096x128,4096x1000,2048x32000")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "activations.json")
    args = parser.parse_args()
    load_before = os.getloadavg()

    import numpy as np
    import torch

    import xentkit

    functions = {
        "softmax": (torch.softmax, xentkit.softmax),
        "log_softmax": (torch.log_softmax, xentkit.log_softmax),
        "logsumexp": (torch.logsumexp, xentkit.logsumexp),
    }
    rows = []
    print(f"{'function':>12s} {'shape':>12s} {'torch':>9s} {'xentkit':>9s} {'reference':>10s} "
          f"{'torch/xentkit':>14s}  (ms)")  # fmt: skip
    for text in args.shapes.split(","):
        n, c = (int(part) for part in text.lower().split("x"))
        t = torch.randn(n, c, generator=torch.Generator().manual_seed(0))
        x = t.numpy()
        for name, (torch_function, xentkit_function) in functions.items():

            def reference(x=x, function=xentkit_function) -> None:
                with xentkit.use_reference(True):
                    function(x)

            steps = {
                "torch": lambda t=t, function=torch_function: function(t, -1),
                "xentkit": lambda x=x, function=xentkit_function: function(x),
                "xentkit reference": reference,
            }
            expected = torch_function(t.double(), -1).numpy()
            errors = {
                "xentkit": float(np.max(np.abs(steps["xentkit"]() - expected))),
                "torch": float(np.max(np.abs(steps["torch"]().numpy() - expected))),
            }
            for step in steps.values():
                step()
            number = max(1, int(4e6 // (n * c)))  # ~4M elements per timing
            rounds: dict[str, list[float]] = {provider: [] for provider in steps}
            for _ in range(args.repeats):
                for provider, step in steps.items():
                    rounds[provider].append(timeit.timeit(step, number=number) / number * 1e3)
            row = {"function": name, "shape": [n, c], **{p: statistics.median(v) for p, v in rounds.items()}}
            row["fastest"] = {p: min(v) for p, v in rounds.items()}
            row["torch / xentkit"] = row["torch"] / row["xentkit"]
            row["max abs error vs float64"] = errors
            rows.append(row)
            print(f"{name:>12s} {n:>6d}×{c:<5d} {row['torch']:9.3f} {row['xentkit']:9.3f} "
                  f"{row['xentkit reference']:10.3f} {row['torch / xentkit']:14.2f}")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        **run_record(load_before),
        "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv), "per_call_ms": rows,
    }, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
