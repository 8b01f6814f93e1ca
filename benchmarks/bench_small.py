#!/usr/bin/env python
"""Small problems and the first call: where xentkit's fixed costs show (issue "Polish").

Two parts, both side by side with torch in one run:

1. Per-call time of forward + backward on small logits (64×10, 256×100, 1024×1000, float32):
   ``torch.nn.functional.cross_entropy(x, y).backward()``, ``xentkit.torch.cross_entropy`` the
   same way, and the NumPy api ``xentkit.cross_entropy_and_grad``; best of ``--repeats`` timeit
   runs of ``--number`` calls, torch on one thread (as xentkit below 65536 logits).
2. The first call in a new process (``import`` + one call on 64×10), in a subprocess each, for
   xentkit's NumPy api and for torch: with the kernel cache warm (this checkout's
   ``__pycache__``), and, with ``--cold``, after emptying it (Numba compiles again).

    python benchmarks/bench_small.py
    python benchmarks/bench_small.py --cold        # also the cold-cache first call (slow)

Writes ``benchmarks/results/small.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
import timeit
from pathlib import Path

import numpy as np

SHAPES = ((64, 10), (256, 100), (1024, 1000))
FIRST_CALL = {
    "xentkit": "import numpy as np, xentkit; xentkit.cross_entropy_and_grad(np.zeros((64, 10), np.float32), np.zeros(64, int))",
    "xentkit.torch": "import torch, xentkit.torch as xt; x = torch.zeros(64, 10, requires_grad=True); xt.cross_entropy(x, torch.zeros(64, dtype=torch.long)).backward()",
    "torch": "import torch, torch.nn.functional as F; x = torch.zeros(64, 10, requires_grad=True); F.cross_entropy(x, torch.zeros(64, dtype=torch.long)).backward()",
}


def per_call(number: int, repeats: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    import xentkit
    import xentkit.torch as xt

    torch.set_num_threads(1)
    rows = []
    for n, c in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, c)).astype(np.float32)
        y = rng.integers(0, c, n)
        leaf = torch.from_numpy(x).requires_grad_()
        target = torch.from_numpy(y)

        def torch_step(leaf=leaf, target=target) -> None:
            leaf.grad = None
            F.cross_entropy(leaf, target).backward()

        def xentkit_torch_step(leaf=leaf, target=target) -> None:
            leaf.grad = None
            xt.cross_entropy(leaf, target).backward()

        def api_step(x=x, y=y) -> None:
            xentkit.cross_entropy_and_grad(x, y)

        steps = {"torch": torch_step, "xentkit.torch": xentkit_torch_step, "xentkit api": api_step}
        for step in steps.values():
            step()
        row = {"shape": [n, c]}
        for _ in range(repeats):  # interleaved rounds, best of each
            for name, step in steps.items():
                best = timeit.timeit(step, number=number) / number * 1e6
                row[name] = min(row.get(name, float("inf")), best)
        rows.append(row)
    return rows


def first_call(cold: bool) -> dict:
    cache = Path(__file__).resolve().parents[1] / "src" / "xentkit" / "kernels" / "__pycache__"
    out = {}
    for state in ("warm", "cold") if cold else ("warm",):
        for name, code in FIRST_CALL.items():
            if state == "cold" and name != "torch" and cache.exists():
                shutil.rmtree(cache)
            subprocess.run([sys.executable, "-c", code], check=True)  # warm the OS file cache too
            if state == "cold" and name != "torch" and cache.exists():
                shutil.rmtree(cache)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            out[f"{name} ({state} cache)"] = time.perf_counter() - started
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="also time a cold kernel cache")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "small.json")
    args = parser.parse_args()
    rows = per_call(args.number, args.repeats)
    print("forward + backward, µs per call (best of the rounds)")
    print(f"{'shape':>12s} {'torch':>9s} {'xentkit.torch':>14s} {'xentkit api':>12s}")
    for row in rows:
        n, c = row["shape"]
        print(f"{n:>6d}×{c:<5d} {row['torch']:9.1f} {row['xentkit.torch']:14.1f} {row['xentkit api']:12.1f}")
    starts = first_call(args.cold)
    print("\nfirst call in a new process (import + one 64×10 forward + backward), seconds")
    for name, seconds in starts.items():
        print(f"  {name:28s} {seconds:6.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "command": " ".join(sys.argv), "per_call_us": rows, "first_call_s": starts,
    }, indent=1))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
