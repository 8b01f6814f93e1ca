#!/usr/bin/env python
"""Binary cross-entropy on logits, forward + backward on the CPU: torch against xentkit.

Providers, interleaved in rounds (one call of each per round, ``--repeats`` rounds, median):

    torch           F.binary_cross_entropy_with_logits(x, y, pos_weight=pw).backward()
    xentkit.torch   xentkit.torch.binary_cross_entropy_with_logits, the same call
    xentkit api     xentkit.binary_cross_entropy_with_logits_and_grad(x, y, pos_weight=pw)

on float32 logits of each shape (targets uniform in [0, 1), a pos_weight per class), torch with
its default threads. Also the accuracy of one confident logit in float32 (x = −17, target 0,
exact loss log1p(e^−17) = 4.14e-8), which torch's kernel rounds to 0.

    python benchmarks/bench_binary.py
    python benchmarks/bench_binary.py --shapes 64x10,1024x1000 --repeats 9

Writes ``benchmarks/results/binary.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import timeit
from pathlib import Path

from _harness import agreeing_gradients, run_record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="64x10,1024x1000,4096x4000")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "binary.json")
    args = parser.parse_args()
    load_before = os.getloadavg()

    import torch
    import torch.nn.functional as F

    import xentkit
    import xentkit.torch as xt

    rows = []
    print("ratio: xentkit's time / torch's (below 1: xentkit faster)")
    print(f"{'shape':>12s} {'torch':>10s} {'xentkit.torch':>14s} {'ratio':>6s} {'api':>10s} {'ratio':>6s}  (ms)")
    for text in args.shapes.split(","):
        n, c = (int(part) for part in text.lower().split("x"))
        generator = torch.Generator().manual_seed(0)
        leaf = (2 * torch.randn(n, c, generator=generator)).requires_grad_()
        target = torch.rand(n, c, generator=generator)
        pos_weight = torch.rand(c, generator=generator) + 0.5
        logits, labels, pw = leaf.detach().numpy(), target.numpy(), pos_weight.numpy()

        def torch_step(leaf=leaf, target=target, pos_weight=pos_weight) -> None:
            leaf.grad = None
            F.binary_cross_entropy_with_logits(leaf, target, pos_weight=pos_weight).backward()

        def xentkit_torch_step(leaf=leaf, target=target, pos_weight=pos_weight) -> None:
            leaf.grad = None
            xt.binary_cross_entropy_with_logits(leaf, target, pos_weight=pos_weight).backward()

        def api_step(logits=logits, labels=labels, pw=pw) -> None:
            xentkit.binary_cross_entropy_with_logits_and_grad(logits, labels, pos_weight=pw)

        steps = {"torch": torch_step, "xentkit.torch": xentkit_torch_step, "xentkit api": api_step}
        gradients = {}
        for name, step in steps.items():
            step()
            if name != "xentkit api":
                gradients[name] = leaf.grad.clone()
        gradients["xentkit api"] = xentkit.binary_cross_entropy_with_logits_and_grad(logits, labels, pos_weight=pw)[1]
        agreement = agreeing_gradients(gradients, "float32", f"{n}×{c}")
        number = max(1, int(2e6 // (n * c)))  # ~2M elements per timing
        rounds: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                rounds[name].append(timeit.timeit(step, number=number) / number * 1e3)
        row = {"shape": [n, c], **{name: statistics.median(times) for name, times in rounds.items()}}
        row["gradient_difference"] = agreement
        row["xentkit.torch / torch"] = row["xentkit.torch"] / row["torch"]
        row["xentkit api / torch"] = row["xentkit api"] / row["torch"]
        rows.append(row)
        print(
            f"{n:>6d}×{c:<5d} {row['torch']:10.3f} {row['xentkit.torch']:14.3f} "
            f"{row['xentkit.torch / torch']:6.2f} {row['xentkit api']:10.3f} {row['xentkit api / torch']:6.2f}"
        )
    x, zero = torch.tensor([-17.0]), torch.tensor([0.0])
    accuracy = {
        "exact": math.log1p(math.exp(-17.0)),
        "torch float32": F.binary_cross_entropy_with_logits(x, zero).item(),
        "xentkit float32": xt.binary_cross_entropy_with_logits(x, zero).item(),
    }
    print("x = -17, target 0: " + ", ".join(f"{name} {value:.4g}" for name, value in accuracy.items()))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        **run_record(load_before),
        "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv),
        "per_call_ms": rows, "confident_logit": accuracy,
    }, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
