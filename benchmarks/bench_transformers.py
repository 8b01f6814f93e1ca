"""Benchmark: one training step of a Hugging Face Llama, unpatched vs patched by
``xentkit.integrations.transformers.patch``: time and peak memory.

The model is Llama-shaped and small (2 layers, hidden 256, 32000-token vocabulary, random
weights from a config, nothing downloaded), the sequences long (2 × 2048 tokens by default), so
that the ``[batch, sequence, vocabulary]`` logits dominate the step's memory, as they do when a
real model is fine-tuned with long sequences. A step is ``zero_grad``, ``model(input_ids,
labels=labels)`` and ``loss.backward()``; labels are -100 on a prompt (the first eighth of each
row), as in supervised fine-tuning.

Providers, each run in its own Python process:

- ``unpatched``  the model as transformers builds it: logits, then ``ForCausalLMLoss``
- ``xentkit``    the same model after ``patch(model)``: ``linear_cross_entropy`` on the hidden
                 states and ``lm_head.weight``, logits never built

Each worker builds the model, warms up with one step on 128-token rows (imports, Numba's
compilation, thread pools), allocates the inputs, reads its resident set size (RSS), then times
``repeats`` steps. Peak memory above that baseline = Linux's VmHWM (reset through
``/proc/self/clear_refs`` right after the baseline is read; ``resource.getrusage(...).ru_maxrss``
elsewhere) − the baseline, over all the process's steps; it includes the parameters' gradients
and the activations, which both providers hold. The providers run in ``rounds`` interleaved
rounds, so that load from other users of a shared machine falls on both alike.

Goals for xentkit: peak memory reduced by at least the logits' bytes (one float32
``[batch, sequence, vocabulary]`` tensor; the unpatched step holds about three: the logits, their
log-softmax, their gradient); time no worse than unpatched; the same loss.

    python benchmarks/bench_transformers.py                       # 2 × 2048 tokens, 32000 vocabulary
    python benchmarks/bench_transformers.py --length 512 --repeats 2 --rounds 1
    python benchmarks/bench_transformers.py --precision bfloat16  # a bfloat16 model
    python benchmarks/bench_transformers.py --precision autocast  # float32 under the CPU's bfloat16 autocast

``--precision``: float32 (the default), bfloat16 (the model converted) or autocast (a float32
model stepped under ``torch.autocast("cpu", dtype=torch.bfloat16)``, what ``Trainer(bf16=True)``
runs on the CPU).

Prints a table and appends the run to ``benchmarks/results/transformers.json`` (``runs``: every
run; ``latest``: the last run per batch × length).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _harness import significant

PROVIDERS = ("unpatched", "xentkit")
RESULTS = Path(__file__).resolve().parent / "results" / "transformers.json"
WARM_UP_LENGTH = 128


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Linux: VmHWM (the peak RSS in /proc/self/status) back to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _peak_bytes(reset_works: bool) -> int:
    if reset_works:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocabulary, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.length, WARM_UP_LENGTH), attn_implementation="sdpa",
    )


def _inputs(rows: int, length: int, vocabulary: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocabulary, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[:, : length // 8] = -100  # a prompt without loss
    return input_ids, labels


def _step(model, input_ids, labels, precision: str = "float32") -> float:
    import torch

    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    return float(loss)


def run_worker(args: argparse.Namespace) -> dict:
    """Runs in the child process: build, warm up, allocate, time, measure."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config(args)).train()
    if args.precision == "bfloat16":
        model = model.to(torch.bfloat16)
    if args.worker == "xentkit":
        from xentkit.integrations.transformers import patch

        patch(model)
    _step(model, *_inputs(args.batch, WARM_UP_LENGTH, args.vocabulary, seed=1), args.precision)
    model.zero_grad(set_to_none=True)
    input_ids, labels = _inputs(args.batch, args.length, args.vocabulary, seed=0)
    gc.collect()
    baseline = _rss_bytes()
    reset_works = _reset_peak()
    times, peaks, loss = [], [], None
    for _ in range(args.repeats):
        gc.collect()
        start = time.perf_counter()
        loss = _step(model, input_ids, labels, args.precision)
        times.append(time.perf_counter() - start)
        peaks.append(_peak_bytes(reset_works) - baseline)
    return {
        "provider": args.worker,
        "times_s": times,
        "peak_after_each_step_bytes": peaks,
        "peak_method": "VmHWM reset" if reset_works else "ru_maxrss",
        "loss": loss,
        "lm_head_grad_norm": float(model.lm_head.weight.grad.norm()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
    }


def _spawn(provider: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", provider]
    for name in ("batch", "length", "vocabulary", "hidden", "intermediate", "layers", "heads", "repeats", "precision"):
        command += [f"--{name}", str(getattr(args, name))]
    load_before = os.getloadavg()[0]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"provider {provider} failed:\n{completed.stderr}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["load_average_before"] = load_before
    return result


def _machine() -> dict:
    import numpy
    import torch
    import transformers

    import xentkit

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "xentkit": xentkit.__version__,
    }


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048, help="tokens per row")
    parser.add_argument("--vocabulary", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per provider, interleaved")
    parser.add_argument("--precision", choices=("float32", "bfloat16", "autocast"), default="float32")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0

    logits_bytes = args.batch * args.length * args.vocabulary * 4
    print(
        f"one training step (forward + backward), Llama {args.layers} layers, hidden {args.hidden}, "
        f"vocabulary {args.vocabulary}, batch {args.batch} × {args.length} tokens, {args.precision}; "
        f"{args.repeats} steps × {args.rounds} rounds; logits {logits_bytes / 2**20:.0f} MiB"
    )
    runs: dict[str, list[dict]] = {provider: [] for provider in PROVIDERS}
    for _ in range(args.rounds):
        for provider in PROVIDERS:
            runs[provider].append(_spawn(provider, args))
    results = {}
    for provider, processes in runs.items():
        times = [t for process in processes for t in process["times_s"]]
        results[provider] = {
            "times_s": times,
            "median_s": statistics.median(times),
            "min_s": min(times),
            "peak_above_baseline_bytes": max(max(p["peak_after_each_step_bytes"]) for p in processes),
            "processes": processes,
        }

    header = f"{'provider':<10} {'median s':>9} {'min s':>7} {'max s':>7} {'peak MiB':>9} {'loss':>10}"
    print(header)
    print("-" * len(header))
    for provider, result in results.items():
        print(
            f"{provider:<10} {result['median_s']:>9.3f} {result['min_s']:>7.3f} {max(result['times_s']):>7.3f} "
            f"{result['peak_above_baseline_bytes'] / 2**20:>9.0f} {result['processes'][0]['loss']:>10.6f}"
        )
    unpatched, ours = results["unpatched"], results["xentkit"]
    saved = unpatched["peak_above_baseline_bytes"] - ours["peak_above_baseline_bytes"]
    goals = {
        "peak_memory_saved": {
            "saved_bytes": saved, "logits_bytes": logits_bytes, "saved_over_logits": saved / logits_bytes,
            "logits_share_of_unpatched_peak": logits_bytes / unpatched["peak_above_baseline_bytes"],
            "met": saved >= logits_bytes,
        },
        "time_no_worse": {
            "ratio_median": ours["median_s"] / unpatched["median_s"],
            "ratio_min": ours["min_s"] / unpatched["min_s"],
            "met_median": ours["median_s"] <= unpatched["median_s"],
            "met_min": ours["min_s"] <= unpatched["min_s"],
        },
        "same_loss": {
            "relative_difference": abs(ours["processes"][0]["loss"] - unpatched["processes"][0]["loss"])
            / abs(unpatched["processes"][0]["loss"]),
        },
    }
    goals["same_loss"]["met"] = goals["same_loss"]["relative_difference"] <= 1e-5
    for name, goal in goals.items():
        verdicts = " ".join(
            f"{key.replace('met_', 'by ').replace('met', '')} {'met' if value else 'MISSED'}".strip()
            for key, value in goal.items() if key.startswith("met")
        )
        numbers = {k: significant(v) for k, v in goal.items() if not k.startswith("met")}
        print(f"goal {name:<18} {verdicts:<22} {numbers}")
    print("peak: above the RSS with model and inputs allocated, over every step of every process")

    record = {
        "benchmark": "transformers training step, unpatched vs xentkit patch",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["python", "benchmarks/bench_transformers.py", *sys.argv[1:]]),
        "machine": _machine(),
        "load_average_after": os.getloadavg()[0],
        "config": {
            key: getattr(args, key)
            for key in ("batch", "length", "vocabulary", "hidden", "intermediate", "layers", "heads", "repeats", "rounds", "precision")
        } | {"logits_bytes": logits_bytes},
        "results": results,
        "goals": goals,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.output.read_text()) if args.output.exists() else {}
    every = [*previous.get("runs", []), record]
    latest = {
        f"{run['config']['batch']}x{run['config']['length']}"
        + ("" if run["config"].get("precision", "float32") == "float32" else f":{run['config']['precision']}"): run
        for run in every
    }
    args.output.write_text(json.dumps({"latest": latest, "runs": every}, indent=2) + "\n")
    print(f"wrote {args.output.relative_to(Path.cwd()) if args.output.is_relative_to(Path.cwd()) else args.output.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
