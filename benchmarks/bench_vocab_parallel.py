"""Vocabulary-parallel cross-entropy: time per step and bytes communicated, 1, 2 and 4 processes.

Each world size is one gloo process group on 127.0.0.1 (``torch.multiprocessing.spawn``). Every
rank holds its shard of the logits (``[N, V/P]``, uneven when P does not divide V) and runs
forward + backward of ``xentkit.torch.distributed.vocab_parallel_cross_entropy``; the time of a
step is the slowest rank's (all-reduce MAX), the median over ``--repeats`` steps with min and max.
A ``CommunicationStats`` object counts the bytes each rank hands to all-reduce and all-gather:
O(N) floats per step, against the N·V of the logits that a gather would move. The fused linear
form (``--features`` > 0) adds the all-reduce of the input gradient (N·D floats).

Usage:
    python benchmarks/bench_vocab_parallel.py                      # N=2048, V=32000, float32
    python benchmarks/bench_vocab_parallel.py --worlds 1 2 --repeats 3 --features 0

Prints a table and writes ``benchmarks/results/vocab_parallel.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

# torch and Numba each run an OpenMP thread pool; with the default (active) wait policy the idle
# pool spins and starves the other: measured here, a 0.25 ms kernel took 8 ms with both pools at 2
# threads. Passive waiting must be set before the OpenMP runtime loads (with torch), and spawned
# ranks inherit it. An explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results" / "vocab_parallel.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _step_times(step, repeats: int) -> list[float]:
    """Wall time of ``step`` on the slowest rank, ``repeats`` times (after one warm-up step)."""
    step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    return times


def _summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def _worker(rank: int, world: int, port: int, config: dict, out: str) -> None:
    import numba

    from xentkit.torch.distributed import (
        CommunicationStats,
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
        vocab_shard_range,
    )

    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        rows, vocab, dtype = config["rows"], config["vocab"], DTYPES[config["dtype"]]
        start, stop = vocab_shard_range(vocab, world, rank)
        generator = torch.Generator().manual_seed(1234 + rank)
        target = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(99))
        shard = (torch.randn(rows, stop - start, generator=generator) * 2).to(dtype).requires_grad_(True)
        stats = CommunicationStats()

        def logits_step() -> None:
            shard.grad = None
            vocab_parallel_cross_entropy(shard, target, stats=stats).backward()

        result = {"world_size": world, "threads_per_rank": threads}
        result["logits"] = _summary(_step_times(logits_step, config["repeats"]))
        stats.reset()
        logits_step()
        result["logits"].update(
            all_reduce_bytes=stats.all_reduce_bytes, all_reduce_calls=stats.all_reduce_calls,
            all_gather_bytes=stats.all_gather_bytes, all_gather_calls=stats.all_gather_calls,
        )

        features = config["features"]
        if features:
            linear_rows = config["linear_rows"]
            x = torch.randn(linear_rows, features, generator=torch.Generator().manual_seed(7), dtype=dtype)
            x.requires_grad_(True)
            w_shard = (torch.randn(stop - start, features, generator=generator, dtype=dtype) / features**0.5)
            w_shard.requires_grad_(True)
            linear_target = target[:linear_rows] if linear_rows <= rows else torch.randint(0, vocab, (linear_rows,))

            def linear_step() -> None:
                x.grad = w_shard.grad = None
                vocab_parallel_linear_cross_entropy(x, w_shard, linear_target, stats=stats).backward()

            result["linear"] = _summary(_step_times(linear_step, config["repeats"]))
            stats.reset()
            linear_step()
            result["linear"].update(
                all_reduce_bytes=stats.all_reduce_bytes, all_reduce_calls=stats.all_reduce_calls,
                all_gather_bytes=stats.all_gather_bytes, all_gather_calls=stats.all_gather_calls,
            )
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _single_process_baselines(config: dict) -> dict[str, dict[str, float]]:
    """Forward + backward over the full logits in this process: torch and xentkit.torch."""
    import torch.nn.functional as F

    import xentkit

    torch.set_num_threads(os.cpu_count() or 1)
    rows, vocab, dtype = config["rows"], config["vocab"], DTYPES[config["dtype"]]
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(5)) * 2).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(99))
    results = {}
    leaf = logits.detach().requires_grad_(True)  # torch's input, a leaf made once (no copy timed)
    for name, run in (
        ("torch.nn.functional.cross_entropy", lambda z: F.cross_entropy(z, target)),
        ("xentkit.cross_entropy_and_grad (NumPy api)", None),
    ):
        times = []
        for repeat in range(config["repeats"] + 1):
            begin = time.perf_counter()
            if run is None:
                xentkit.cross_entropy_and_grad(logits.numpy(), target.numpy())
            else:
                leaf.grad = None
                run(leaf).backward()
            if repeat:  # the first is a warm-up
                times.append(time.perf_counter() - begin)
        results[name] = _summary(times)
    return results


def _format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048, help="N, rows (tokens) of the logits")
    parser.add_argument("--vocab", type=int, default=32000, help="V, classes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="process counts")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per world size")
    parser.add_argument("--features", type=int, default=128,
                        help="D of the fused linear form (0: skip it)")
    parser.add_argument("--linear-rows", type=int, default=1024, help="N of the fused linear form")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    config = {
        "rows": args.rows, "vocab": args.vocab, "dtype": args.dtype, "repeats": args.repeats,
        "features": args.features, "linear_rows": args.linear_rows,
    }
    cores = os.cpu_count() or 1
    itemsize = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    logits_bytes = args.rows * args.vocab * itemsize
    print(f"vocab-parallel cross-entropy, N={args.rows}, V={args.vocab}, {args.dtype}, gloo on "
          f"127.0.0.1, forward + backward, median of {args.repeats} steps (min-max)")
    oversubscribed = [world for world in args.worlds if world > cores]
    note = (f"this machine has {cores} cores: {', '.join(map(str, oversubscribed))} processes "
            "oversubscribe it, so their times measure contention, not scaling"
            if oversubscribed else f"this machine has {cores} cores")
    print(f"note: {note}; ranks get cores // world threads (torch and Numba), "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}\n")

    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for world in args.worlds:
            out = Path(scratch, f"world{world}.json")
            mp.spawn(_worker, args=(world, _free_port(), config, str(out)), nprocs=world, join=True)
            runs.append(json.loads(out.read_text()))
    baselines = _single_process_baselines(config)

    header = (f"{'form':<8} {'world':>5} {'time/step (ms)':>22} {'all-reduced/rank':>17} "
              f"{'all-gathered/rank':>18} {'full logits':>12} {'sent/full':>9}")
    print(header)
    print("-" * len(header))
    for form, full_bytes in (("logits", logits_bytes), ("linear", args.linear_rows * args.vocab * itemsize)):
        for run in runs:
            if form not in run:
                continue
            entry = run[form]
            timing = f"{entry['median_s'] * 1e3:8.1f} ({entry['min_s'] * 1e3:.0f}-{entry['max_s'] * 1e3:.0f})"
            ratio = (entry["all_reduce_bytes"] + entry["all_gather_bytes"]) / full_bytes  # both collectives
            print(f"{form:<8} {run['world_size']:>5} {timing:>22} {_format_bytes(entry['all_reduce_bytes']):>17} "
                  f"{_format_bytes(entry['all_gather_bytes']):>18} {_format_bytes(full_bytes):>12} {ratio:>9.2e}")
    print()
    for name, entry in baselines.items():
        print(f"single process, full logits, {name}: {entry['median_s'] * 1e3:.1f} ms "
              f"({entry['min_s'] * 1e3:.0f}-{entry['max_s'] * 1e3:.0f})")
    if args.features:
        print(f"\nlinear: N={args.linear_rows}, D={args.features}; its all-reduced bytes include the "
              f"input gradient, N·D·{itemsize} = {_format_bytes(args.linear_rows * args.features * itemsize)} "
              "(replicated input), beside O(N) statistics per chunk")

    import numba
    import numpy

    report = {
        "benchmark": "vocab_parallel_cross_entropy",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(), "processor": platform.processor(), "cpu_count": cores,
            "python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
            "numba": numba.__version__,
        },
        "note": note,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "config": config | {"full_logits_bytes": logits_bytes, "backend": "gloo", "address": "127.0.0.1"},
        "runs": runs,
        "single_process_full_logits": baselines,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
