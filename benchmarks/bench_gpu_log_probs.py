#!/usr/bin/env python
"""Token log-probabilities and entropies from hidden states, forward + backward, on a CUDA GPU.

The objective of a PPO / GRPO step, L = Σ_t a_t·log p(y_t) + Σ_t b_t·H_t with z = x Wᵀ / T,
differentiated with respect to x and W. Providers, timed on the same inputs in one process,
interleaved round by round:

    matmuls   the three matmuls alone (x Wᵀ, dz W, dzᵀ x) on materialized logits: the floor
    torch     float32 logits materialized, then log_softmax, gather and Σ p·log p (eager)
    compile   torch.compile of the same
    xentkit   xentkit.torch.linear_log_probs(x, W, y, return_entropy=True): cuBLAS chunks
              around the Triton passes, never the logits

Time: CUDA events, median [min] over the rounds after warm-up; peak: memory allocated during one
call above what was held before it, in MiB; L against float64 on the same inputs (on a sample of
rows: the float64 logits of every row would not fit).

    python benchmarks/bench_gpu_log_probs.py                      # 8192 × 4096 → 151936 bf16
    python benchmarks/bench_gpu_log_probs.py --rows 4096 --classes 32000 --dtype float32
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

IGNORE = -100


def _torch_objective(x, w, y, a, b, temperature):
    """L with the float32 logits materialized (what RL trainers do today)."""
    logits = F.linear(x, w).float() / temperature
    log_p_all = torch.log_softmax(logits, dim=-1)
    valid = y != IGNORE
    log_p = log_p_all.gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
    entropy = -(log_p_all.exp() * log_p_all).sum(dim=-1)
    return (torch.where(valid, a * log_p, 0.0) + torch.where(valid, b * entropy, 0.0)).sum()


def _providers(names: list[str], temperature: float, chunk_size: int | None, device: torch.device) -> dict:
    backend = "triton" if device.type == "cuda" else "auto"  # on CUDA: the Triton path, or an error

    def matmuls(x, w, y, a, b):
        logits = x @ w.t()  # the GEMMs on real values (a fresh empty dz is zeros: too fast)
        return (logits @ w, logits.t() @ x)

    def xentkit(x, w, y, a, b):
        log_p, entropy = xt.linear_log_probs(
            x, w, y, temperature=temperature, ignore_index=IGNORE, return_entropy=True, chunk_size=chunk_size,
            backend=backend,
        )
        return (a * log_p).sum() + (b * entropy).sum()

    compiled = torch.compile(_torch_objective)
    table = {
        "matmuls": matmuls,
        "torch": lambda x, w, y, a, b: _torch_objective(x, w, y, a, b, temperature),
        "compile": lambda x, w, y, a, b: compiled(x, w, y, a, b, temperature),
        "xentkit": xentkit,
    }
    return {name: table[name] for name in names if name in table}


def _float64_objective(x, w, y, a, b, temperature, sample):
    """L in float64 on every ``sample``-th row (scaled up by the sample rate)."""
    rows = torch.arange(0, x.shape[0], sample, device=x.device)
    total = _torch_objective(x[rows].double(), w.double(), y[rows], a[rows].double(), b[rows].double(), temperature)
    return total.item() * sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=151936)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--providers", default="matmuls,torch,compile,xentkit")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of this script")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "gpu_log_probs.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    generator = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(args.rows, args.features, device=device, generator=generator).to(dtype)
    w0 = (torch.randn(args.classes, args.features, device=device, generator=generator) / args.features**0.5).to(dtype)
    y = torch.randint(0, args.classes, (args.rows,), device=device, generator=generator)
    y[::17] = IGNORE  # padding
    a = torch.randn(args.rows, device=device, generator=generator)  # advantages
    b = torch.full((args.rows,), 0.01, device=device)  # entropy bonus
    # x and W whole (as the providers), a sample of rows for the float64 logits
    sample = max(1, args.rows // 256)
    clock = _Clock(device)
    x = x0.clone().requires_grad_()
    w = w0.clone().requires_grad_()

    def call(name, function):
        x.grad = w.grad = None
        out = function(x, w, y, a, b)
        if name != "matmuls":
            out.backward()

    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else str(device), "torch": torch.__version__, "triton": _version("triton"),
              "command": " ".join(sys.argv),
              "shape": {"rows": args.rows, "features": args.features, "classes": args.classes, "dtype": args.dtype,
                        "temperature": args.temperature},
              "providers": {}, "failed": {}}
    providers = _providers(args.providers.split(","), args.temperature, args.chunk_size, device)

    def write() -> None:  # after each stage: a provider or a round that fails keeps what came before
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1))

    for name, function in list(providers.items()):
        try:
            for _ in range(2):
                call(name, function)
            x.grad = w.grad = None
            value = None
            # (the float64 check on a sample of rows; not for the compiled provider, which a new row
            # count would compile again)
            if name not in ("matmuls", "compile"):
                rows = torch.arange(0, args.rows, sample, device=device)
                with torch.no_grad():
                    value = float(function(x[rows], w, y[rows], a[rows], b[rows]).item()) * sample
            peak = clock.peak_mib(lambda name=name, function=function: call(name, function))
        except Exception as error:  # (a peer's or an OOM: recorded, the others still run)
            x.grad = w.grad = None
            _left_out(report["failed"], providers, name, error, device)
            continue
        report["providers"][name] = {"times_ms": [], "peak_mib": peak, "objective_on_sample": value}
        write()
    expected = _float64_objective(x0, w0, y, a, b, args.temperature, sample)
    for entry in report["providers"].values():
        value = entry["objective_on_sample"]
        entry["relative_error"] = None if value is None else abs(value - expected) / abs(expected)
    write()
    for _ in range(args.rounds):
        for name, function in providers.items():
            report["providers"][name]["times_ms"].append(
                clock.measure(lambda name=name, function=function: call(name, function))
            )
    floor = statistics.median(report["providers"]["matmuls"]["times_ms"]) if "matmuls" in providers else None
    print(f"{args.rows} x {args.features} -> {args.classes} {args.dtype}, T = {args.temperature}")
    print(f"{'provider':10s} {'median ms':>10s} {'min ms':>8s} {'x matmuls':>9s} {'peak MiB':>9s} {'rel err':>9s}")
    for name, entry in report["providers"].items():
        entry["median_ms"] = statistics.median(entry["times_ms"])
        entry["vs_matmuls"] = None if floor is None else entry["median_ms"] / floor
        error = "" if entry["relative_error"] is None else f"{entry['relative_error']:.1e}"
        vs = "" if floor is None else f"{entry['vs_matmuls']:.3f}"
        print(f"{name:10s} {entry['median_ms']:10.2f} {min(entry['times_ms']):8.2f} {vs:>9s} {entry['peak_mib']:9.1f} {error:>9s}")
    for name, why in report["failed"].items():
        print(f"{name:10s} failed: {why}")
    write()
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
