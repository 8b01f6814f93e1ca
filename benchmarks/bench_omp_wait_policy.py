#!/usr/bin/env python
"""OMP_WAIT_POLICY: when PASSIVE helps and when it hurts (issue "Polish").

GNU OpenMP's idle workers spin for a while before they sleep (ACTIVE, its default) or sleep at
once (PASSIVE). torch's CPU ops run on GNU OpenMP; xentkit's kernels on Numba's TBB layer (or
OpenMP where TBB is missing). The policy is read when the OpenMP runtime loads, so each setting
runs in its own process (this script with ``--child``), the settings alternating over
``--rounds`` rounds; the table gives each workload's median time per setting and its ratio to
the default (unset).

Workloads, each after ``import torch`` with torch's default thread count:

- ``mlp step torch`` / ``mlp step xentkit``: one training step of a small MLP
  (784 → 128 → 10, batch 64, SGD) with ``torch.nn.CrossEntropyLoss`` or
  ``xentkit.torch.CrossEntropyLoss`` (the issue's MNIST-sized loop), per step;
- ``matmul then large CE``: a 512×1024 @ 1024×1024 torch matmul (its OpenMP pool wakes), then
  ``xentkit.cross_entropy_and_grad`` on 4096×8000 float32 logits (Numba's parallel kernel),
  per pair;
- ``matmul then small parallel CE``: the same matmul, then the kernel on 16384×10 (parallel,
  0.2 ms of work: where a spinning pool hurt most in earlier measurements), per pair.

    python benchmarks/bench_omp_wait_policy.py
    python benchmarks/bench_omp_wait_policy.py --rounds 5 --policies unset,PASSIVE,ACTIVE

Writes ``benchmarks/results/omp_wait_policy.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _child(steps: int) -> dict[str, float]:
    import numpy as np
    import torch

    import xentkit
    import xentkit.torch as xt

    rng = np.random.default_rng(0)
    out: dict[str, float] = {}

    images = torch.from_numpy(rng.standard_normal((steps, 64, 784)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 10, (steps, 64)))
    for name, criterion in (("mlp step torch", torch.nn.CrossEntropyLoss()), ("mlp step xentkit", xt.CrossEntropyLoss())):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(i: int, model=model, optimizer=optimizer, criterion=criterion) -> None:
            optimizer.zero_grad()
            criterion(model(images[i]), labels[i]).backward()
            optimizer.step()

        for i in range(min(steps, 20)):  # warm-up: kernels loaded, pools started
            step(i)
        started = time.perf_counter()
        for i in range(steps):
            step(i)
        out[name] = (time.perf_counter() - started) / steps

    a = torch.randn(512, 1024)
    b = torch.randn(1024, 1024)
    for name, (n, c), repeats in (
        ("matmul then large CE", (4096, 8000), 8),
        ("matmul then small parallel CE", (16384, 10), 200),
    ):
        logits = rng.standard_normal((n, c)).astype(np.float32)
        target = rng.integers(0, c, n)
        grad = np.empty_like(logits)

        def pair(logits=logits, target=target, grad=grad) -> None:
            torch.mm(a, b)
            xentkit.cross_entropy_and_grad(logits, target, out=grad, check_probabilities=False)

        for _ in range(3):
            pair()
        started = time.perf_counter()
        for _ in range(repeats):
            pair()
        out[name] = (time.perf_counter() - started) / repeats
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="processes per setting, alternating")
    parser.add_argument("--steps", type=int, default=300, help="MLP steps per process")
    parser.add_argument("--policies", default="unset,PASSIVE", help="comma-separated; 'unset' = the default")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "omp_wait_policy.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.steps)))
        return 0

    policies = args.policies.split(",")
    runs: dict[str, list[dict[str, float]]] = {policy: [] for policy in policies}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for policy in policies:
            env = dict(os.environ)
            env.pop("OMP_WAIT_POLICY", None)
            if policy != "unset":
                env["OMP_WAIT_POLICY"] = policy
            result = subprocess.run(
                [sys.executable, __file__, "--child", "--steps", str(args.steps)],
                env=env, check=True, capture_output=True, text=True,
            )
            runs[policy].append(json.loads(result.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()[0]

    workloads = list(runs[policies[0]][0])
    medians = {
        policy: {name: statistics.median(run[name] for run in runs[policy]) for name in workloads}
        for policy in policies
    }
    print(f"median time per step/pair over {args.rounds} processes per setting (ratio to {policies[0]})")
    print(f"{'workload':32s}" + "".join(f"{policy:>22s}" for policy in policies))
    for name in workloads:
        base = medians[policies[0]][name]
        cells = "".join(f"{medians[p][name] * 1e3:12.3f} ms {medians[p][name] / base:5.2f}x" for p in policies)
        print(f"{name:32s}{cells}")
    print(f"load average before {load_before:.2f}, after {load_after:.2f} (other processes inflate timings)")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "benchmark": "OMP_WAIT_POLICY", "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "command": " ".join(sys.argv),
        "load_average": [load_before, load_after], "median_s": medians, "runs_s": runs,
    }, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
