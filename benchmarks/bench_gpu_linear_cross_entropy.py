#!/usr/bin/env python
"""Linear + cross-entropy forward + backward on a CUDA GPU: xentkit against its peers.

Providers, timed on the same inputs in one process, interleaved round by round:

    matmuls   the three matmuls alone (x Wᵀ, dz W, dzᵀ x) on materialized logits: the floor
    torch     F.cross_entropy(F.linear(x, W), y): the logits materialized
    compile   torch.compile of the same with the logits in float32
    liger     liger_kernel's LigerFusedLinearCrossEntropyLoss, when importable
    cce       Cut Cross-Entropy's cut_cross_entropy.linear_cross_entropy, when importable
    xentkit   xentkit.torch.linear_cross_entropy(x, W, y): cuBLAS chunks around the Triton
              kernels, the gradient written over each chunk's logits, the weight gradient
              accumulated in float32 for half weights (the precision contract)
    xentkit_lowmem  the same with accumulate_in_float32=False: the chunks added in the weight's
              dtype, no float32 copy of the weight gradient (the issue's memory goal)

Time: CUDA events, median [min] over the rounds after warm-up; peak: memory allocated during one
call above what was held before it, in MiB; the loss against float64 on the same inputs.

    python benchmarks/bench_gpu_linear_cross_entropy.py                  # 8192 × 4096 → 128256 bf16
    python benchmarks/bench_gpu_linear_cross_entropy.py --rows 4096 --classes 32000 --dtype float32
    python benchmarks/bench_gpu_linear_cross_entropy.py --device cpu --rows 64 --features 8 --classes 300
        (a smoke test of this script, with TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_gpu_cross_entropy import DTYPES, _Clock, _left_out, _version

import xentkit.torch as xt

# peers whose import failed other than by ImportError (installed, but broken here): recorded in the
# results' "failed", where a peer that is not installed is simply absent
IMPORT_FAILURES: dict[str, str] = {}


def _providers(names: list[str], chunk_size: int | None, device: torch.device) -> dict:
    def matmuls(x, w, y):
        # the three GEMMs on real values (an uninitialized dz is zeros from a fresh allocation,
        # which tensor cores multiply faster: the floor would be too low)
        logits = x @ w.t()
        return (logits @ w, logits.t() @ x)

    # on CUDA the xentkit rows insist on the Triton path: a call it cannot take raises with the
    # reason instead of timing torch ops under xentkit's name
    backend = "triton" if device.type == "cuda" else "auto"

    table = {
        "matmuls": matmuls,
        "torch": lambda x, w, y: F.cross_entropy(F.linear(x, w), y),
        "compile": torch.compile(lambda x, w, y: F.cross_entropy(F.linear(x, w).float(), y)),
        "xentkit": lambda x, w, y: xt.linear_cross_entropy(x, w, y, chunk_size=chunk_size, backend=backend),
        "xentkit_lowmem": lambda x, w, y: xt.linear_cross_entropy(
            x, w, y, chunk_size=chunk_size, accumulate_in_float32=False, backend=backend
        ),
    }
    try:
        from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

        table["cce"] = lambda x, w, y: cce_linear_cross_entropy(x, w, y)
    except ImportError:
        pass
    except Exception as error:  # (a peer that fails to import: recorded, the others still run)
        IMPORT_FAILURES["cce"] = f"import failed: {type(error).__name__}: {error}"
        print(f"cut-cross-entropy: {IMPORT_FAILURES['cce']}", file=sys.stderr, flush=True)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        table["liger"] = lambda x, w, y: liger(w, x, y)
    except ImportError:
        pass
    except Exception as error:  # (a peer that fails to import: recorded, the others still run)
        IMPORT_FAILURES["liger"] = f"import failed: {type(error).__name__}: {error}"
        print(f"liger-kernel: {IMPORT_FAILURES['liger']}", file=sys.stderr, flush=True)
    return {name: table[name] for name in names if name in table}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--providers", default="matmuls,torch,compile,liger,cce,xentkit,xentkit_lowmem")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "gpu_linear_cross_entropy.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (--device cpu for a smoke test)", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    generator = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(args.rows, args.features, device=device, generator=generator).to(dtype)
    w0 = (torch.randn(args.classes, args.features, device=device, generator=generator) / args.features**0.5).to(dtype)
    y = torch.randint(0, args.classes, (args.rows,), device=device, generator=generator)
    y[::17] = -100
    expected = F.cross_entropy(x0.double() @ w0.double().t(), y).item()
    clock = _Clock(device)
    x = x0.clone().requires_grad_()
    w = w0.clone().requires_grad_()

    def call(name, function):
        x.grad = w.grad = None
        out = function(x, w, y)
        if name != "matmuls":
            out.backward()

    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "triton": _version("triton"), "command": " ".join(sys.argv),
              "shape": {"rows": args.rows, "features": args.features, "classes": args.classes, "dtype": args.dtype},
              "providers": {}, "failed": {}}
    providers = _providers(args.providers.split(","), args.chunk_size, device)
    report["failed"].update(IMPORT_FAILURES)
    for name, function in list(providers.items()):
        try:
            for _ in range(2):
                call(name, function)
            x.grad = w.grad = None
            loss = None if name == "matmuls" else float(function(x, w, y).item())
            peak = clock.peak_mib(lambda name=name, function=function: call(name, function))
        except Exception as error:  # a peer that fails: recorded, the others still run
            x.grad = w.grad = None
            _left_out(report["failed"], providers, name, error, device)
            continue
        report["providers"][name] = {"times_ms": [], "peak_mib": peak, "loss": loss,
                                     "loss_relative_error": None if loss is None else abs(loss - expected) / abs(expected)}
    for _ in range(args.rounds):
        for name, function in providers.items():
            report["providers"][name]["times_ms"].append(
                clock.measure(lambda name=name, function=function: call(name, function))
            )
    floor = statistics.median(report["providers"]["matmuls"]["times_ms"]) if "matmuls" in providers else None
    print(f"{args.rows} x {args.features} -> {args.classes} {args.dtype}")
    print(f"{'provider':10s} {'median ms':>10s} {'min ms':>8s} {'x matmuls':>9s} {'peak MiB':>9s} {'loss rel err':>13s}")
    for name, entry in report["providers"].items():
        entry["median_ms"] = statistics.median(entry["times_ms"])
        entry["vs_matmuls"] = None if floor is None else entry["median_ms"] / floor
        error = "" if entry["loss_relative_error"] is None else f"{entry['loss_relative_error']:.1e}"
        vs = "" if floor is None else f"{entry['vs_matmuls']:.3f}"
        print(f"{name:10s} {entry['median_ms']:10.2f} {min(entry['times_ms']):8.2f} {vs:>9s} {entry['peak_mib']:9.1f} {error:>13s}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
