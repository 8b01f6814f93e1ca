#!/usr/bin/env python
"""Small problems and the first call: where xentkit's fixed costs show (issue "Polish").

Three parts, each side by side with torch in one run:

1. Per-call time of forward + backward on small logits (64×10, 256×100, 1024×1000, float32):
   ``torch.nn.functional.cross_entropy(x, y).backward()``, ``xentkit.torch.cross_entropy`` the
   same way, and the NumPy api ``xentkit.cross_entropy_and_grad``; median (and best) of
   ``--repeats`` interleaved timeit runs of ``--number`` calls, and each median over torch's,
   torch on one thread (as xentkit below 65536 logits).
   Then the same 64 × 10 problem (640 logits) with torch's other options, torch against
   ``xentkit.torch``: class weights, label smoothing, probability targets, an (N, C, H, W)
   layout, the "none" and "sum" reductions, and ``nll_loss`` and
   ``binary_cross_entropy_with_logits`` on 64 × 10.
2. Seconds per training epoch of a small MLP (batch 64, 10 classes: the issue's MNIST case)
   with torch's loss and with xentkit.torch's, interleaved.
3. The first call in a new process, in a subprocess each, for xentkit's NumPy api,
   ``xentkit.torch`` and torch: the imports, then the first 64×10 forward + backward, timed
   apart, with the kernel cache warm (this checkout's ``__pycache__``) and, with ``--cold``,
   after emptying it (Numba compiles again). Beside them the floor that Numba sets: ``import
   numba`` and its one-time start-up (the typing and target registries it loads before it can
   load any cached kernel), measured alone.

    python benchmarks/bench_small.py
    python benchmarks/bench_small.py --cold        # also the cold-cache first call (slow)

Writes ``benchmarks/results/small.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

import numpy as np
from _harness import agreeing_gradients, run_record

SHAPES = ((64, 10), (256, 100), (1024, 1000))
# (imports, first call) per entry; each subprocess prints the two times
FIRST_CALL = {
    "xentkit": (
        "import numpy as np, xentkit",
        "xentkit.cross_entropy_and_grad(np.zeros((64, 10), np.float32), np.zeros(64, int))",
    ),
    "xentkit.torch": (
        "import torch, xentkit.torch as xt",
        "x = torch.zeros(64, 10, requires_grad=True); xt.cross_entropy(x, torch.zeros(64, dtype=torch.long)).backward()",
    ),
    "torch": (
        "import torch, torch.nn.functional as F",
        "x = torch.zeros(64, 10, requires_grad=True); F.cross_entropy(x, torch.zeros(64, dtype=torch.long)).backward()",
    ),
    # the floor under any Numba kernel: importing Numba, then its one-time start-up
    "numba alone": (
        "import numpy as np, numba",
        "from numba.core.registry import cpu_target; cpu_target.typing_context.refresh(); cpu_target.target_context.refresh()",
    ),
}
_TIMED = """
import time
started = time.perf_counter()
{imports}
imported = time.perf_counter()
{call}
done = time.perf_counter()
print(imported - started, done - imported)
"""


def per_call(number: int, repeats: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    class _Precomputed(torch.autograd.Function):
        """The floor of any loss written as an autograd.Function (as xentkit.torch's are): forward
        returns a loss and backward a gradient, both computed beforehand (no work at all)."""

        @staticmethod
        def forward(ctx, input, loss, grad):
            ctx.grad = grad
            return loss.clone()

        @staticmethod
        def backward(ctx, grad_output):
            return ctx.grad * grad_output, None, None

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

        loss, grad = (torch.from_numpy(np.asarray(a)) for a in xentkit.cross_entropy_and_grad(x, y))

        def floor_step(leaf=leaf, loss=loss, grad=grad) -> None:
            leaf.grad = None
            _Precomputed.apply(leaf, loss, grad).backward()

        steps = {
            "torch": torch_step, "xentkit.torch": xentkit_torch_step, "xentkit api": api_step,
            "autograd.Function floor": floor_step,
        }
        gradients = {}
        for name, step in steps.items():
            step()
            if name in ("torch", "xentkit.torch"):
                gradients[name] = leaf.grad.clone()
        gradients["xentkit api"] = grad
        agreement = agreeing_gradients(gradients, "float32", f"{n}×{c}")
        rounds: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(repeats):  # interleaved rounds: a busy moment hits every provider
            for name, step in steps.items():
                rounds[name].append(timeit.timeit(step, number=number) / number * 1e6)
        row = {"shape": [n, c], "gradient_difference": agreement}
        for name, times in rounds.items():
            row[name] = statistics.median(times)
            row[f"{name} best"] = min(times)
        row["xentkit.torch / torch"] = row["xentkit.torch"] / row["torch"]
        row["xentkit api / torch"] = row["xentkit api"] / row["torch"]
        rows.append(row)
    return rows


def per_call_options(number: int, repeats: int) -> list[dict]:
    """Forward + backward with each of torch's options on 640 logits, and the two other losses,
    torch against xentkit.torch."""
    import torch
    import torch.nn.functional as F

    import xentkit.torch as xt

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=generator).requires_grad_()
    target = torch.randint(0, 10, (64,), generator=generator)
    spatial = torch.randn(8, 10, 4, 2, generator=generator).requires_grad_()
    log_probs = torch.log_softmax(torch.randn(64, 10, generator=generator), 1).requires_grad_()
    ce = (F.cross_entropy, xt.cross_entropy)
    cases = {  # name: (torch's loss, xentkit's, input, target, options)
        "class weights": (*ce, logits, target, {"weight": torch.rand(10, generator=generator) + 0.5}),
        "label smoothing 0.1": (*ce, logits, target, {"label_smoothing": 0.1}),
        "probability targets": (*ce, logits, torch.softmax(torch.randn(64, 10, generator=generator), 1), {}),
        "(N, C, H, W) 8×10×4×2": (*ce, spatial, torch.randint(0, 10, (8, 4, 2), generator=generator), {}),
        'reduction="none"': (*ce, logits, target, {"reduction": "none"}),
        'reduction="sum"': (*ce, logits, target, {"reduction": "sum"}),
        "nll_loss": (F.nll_loss, xt.nll_loss, log_probs, target, {}),
        "bce_with_logits": (
            F.binary_cross_entropy_with_logits, xt.binary_cross_entropy_with_logits, logits,
            torch.rand(64, 10, generator=generator), {},
        ),
    }
    rows = []
    for name, (torch_loss, xentkit_loss, leaf, labels, options) in cases.items():
        def torch_step(leaf=leaf, labels=labels, options=options, loss=torch_loss) -> None:
            leaf.grad = None
            loss(leaf, labels, **options).sum().backward()

        def xentkit_torch_step(leaf=leaf, labels=labels, options=options, loss=xentkit_loss) -> None:
            leaf.grad = None
            loss(leaf, labels, **options).sum().backward()

        steps = {"torch": torch_step, "xentkit.torch": xentkit_torch_step}
        gradients = {}
        for provider, step in steps.items():
            step()
            gradients[provider] = leaf.grad.clone()
        agreement = agreeing_gradients(gradients, "float32", name)
        rounds: dict[str, list[float]] = {provider: [] for provider in steps}
        for _ in range(repeats):
            for provider, step in steps.items():
                rounds[provider].append(timeit.timeit(step, number=number) / number * 1e6)
        row = {"case": name, **{provider: statistics.median(times) for provider, times in rounds.items()}}
        row["gradient_difference"] = agreement
        row["xentkit.torch / torch"] = row["xentkit.torch"] / row["torch"]
        rows.append(row)
    return rows


def epochs(count: int, threads: int) -> dict:
    """Seconds per training epoch of the issue's small MLP (784-100-10, sigmoid, batch 64, SGD) on
    MNIST-shaped data (60000 random images, labelled by a fixed random linear map, so that the
    model learns and its loss falls as on MNIST), with
    torch's ``nn.CrossEntropyLoss`` and with ``xentkit.torch.CrossEntropyLoss``, epochs
    interleaved, torch on ``threads`` (its default, read before :func:`per_call` set one thread:
    a first version set torch's current count, one by then), as a user runs it."""
    import torch

    import xentkit.torch as xt

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(60000, 784, generator=generator)
    # labels a fixed linear map of the images decides: learnable, so the loss falls as on MNIST
    labels = (images @ torch.randn(784, 10, generator=generator)).argmax(dim=1)
    template = torch.nn.Sequential(torch.nn.Linear(784, 100), torch.nn.Sigmoid(), torch.nn.Linear(100, 10))
    losses = {"torch": torch.nn.CrossEntropyLoss(), "xentkit.torch": xt.CrossEntropyLoss()}
    models = {name: copy.deepcopy(template) for name in losses}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.1) for name, model in models.items()}

    def epoch(name: str) -> float:
        model, loss_fn, optimizer = models[name], losses[name], optimizers[name]
        started = time.perf_counter()
        for start in range(0, images.shape[0], 64):
            optimizer.zero_grad()
            loss_fn(model(images[start : start + 64]), labels[start : start + 64]).backward()
            optimizer.step()
        return time.perf_counter() - started

    times: dict[str, list[float]] = {name: [] for name in losses}
    for name in losses:
        epoch(name)  # the first epoch: imports, first calls
    for _ in range(count):
        for name in losses:
            times[name].append(epoch(name))
    out = {name: {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
           for name, values in times.items()}
    out["xentkit.torch / torch"] = out["xentkit.torch"]["median_s"] / out["torch"]["median_s"]
    return out


def _run_timed(imports: str, call: str) -> tuple[float, float, float]:
    """(imports, first call, whole process) in seconds, in a new interpreter."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _TIMED.format(imports=imports, call=call)],
        check=True, capture_output=True, text=True,
    )
    total = time.perf_counter() - started
    imported, called = (float(value) for value in result.stdout.split()[-2:])
    return imported, called, total


def first_call(cold: bool, repeats: int) -> dict:
    cache = Path(__file__).resolve().parents[1] / "src" / "xentkit" / "kernels" / "__pycache__"
    out = {}
    for state in ("warm", "cold") if cold else ("warm",):
        for name, (imports, call) in FIRST_CALL.items():
            uses_kernels = name.startswith("xentkit")
            if state == "cold" and not uses_kernels:
                continue  # nothing of theirs is cached by xentkit
            _run_timed(imports, call)  # fills the kernel cache and the OS file cache
            runs = []
            for _ in range(1 if state == "cold" else repeats):
                if state == "cold" and cache.exists():
                    shutil.rmtree(cache)
                runs.append(_run_timed(imports, call))
            imported, called, total = (statistics.median(values) for values in zip(*runs, strict=True))
            out[f"{name} ({state} cache)"] = {"import_s": imported, "first_call_s": called, "process_s": total}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--cold", action="store_true", help="also time a cold kernel cache")
    parser.add_argument("--epochs", type=int, default=5, help="MLP epochs per loss")
    parser.add_argument("--starts", type=int, default=5, help="new processes per first-call median")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "small.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    import torch

    default_threads = torch.get_num_threads()  # (per_call sets torch to one thread; epochs restores this)
    rows = per_call(args.number, args.repeats)
    print("forward + backward, µs per call (median of the rounds; ratio: xentkit's / torch's, below 1: xentkit faster)")
    print(
        f"{'shape':>12s} {'torch':>9s} {'xentkit.torch':>14s} {'ratio':>6s} {'xentkit api':>12s} "
        f"{'ratio':>6s} {'Function floor':>15s}"
    )
    for row in rows:
        n, c = row["shape"]
        print(
            f"{n:>6d}×{c:<5d} {row['torch']:9.1f} {row['xentkit.torch']:14.1f} "
            f"{row['xentkit.torch / torch']:6.2f} {row['xentkit api']:12.1f} "
            f"{row['xentkit api / torch']:6.2f} {row['autograd.Function floor']:15.1f}"
        )
    options = per_call_options(args.number, args.repeats)
    print("\nthe same with torch's options (640 logits), µs per call")
    print(f"{'case':>24s} {'torch':>9s} {'xentkit.torch':>14s} {'ratio':>6s}")
    for row in options:
        print(f"{row['case']:>24s} {row['torch']:9.1f} {row['xentkit.torch']:14.1f} {row['xentkit.torch / torch']:6.2f}")
    trained = epochs(args.epochs, default_threads)
    print(f"\nMLP epoch (60000 × 784 → 100 → 10, batch 64, SGD), seconds, {args.epochs} interleaved epochs")
    for name in ("torch", "xentkit.torch"):
        times = trained[name]
        print(f"  {name:14s} median {times['median_s']:.3f}  range {times['min_s']:.3f}-{times['max_s']:.3f}")
    print(f"  xentkit.torch / torch: {trained['xentkit.torch / torch']:.3f}")
    starts = first_call(args.cold, args.starts)
    print("\nfirst call in a new process (median of --starts processes), seconds")
    print(f"  {'':28s} {'imports':>8s} {'1st call':>9s} {'process':>8s}")
    for name, times in starts.items():
        print(f"  {name:28s} {times['import_s']:8.3f} {times['first_call_s']:9.3f} {times['process_s']:8.3f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        **run_record(load_before),
        "command": " ".join(sys.argv), "per_call_us": rows, "per_call_options_us": options, "mlp_epoch": trained, "first_call": starts,
    }, indent=1))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
