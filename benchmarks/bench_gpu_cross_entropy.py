#!/usr/bin/env python
"""Cross-entropy forward + backward on a CUDA GPU: xentkit's Triton path against its peers.

Providers, each timed on the same logits in one process, interleaved round by round:

    copy          dst.copy_(logits): one read and one write of the logits, the floor of any
                  forward + backward that returns a gradient of the logits' size
    torch         torch.nn.functional.cross_entropy(x, y) on the logits as they are
    torch_f32     the same on x.float() (what many training loops do)
    compile       torch.compile of cross_entropy(x.float(), y)
    liger         liger_kernel's LigerCrossEntropyLoss (gradient written over the logits), when
                  the package is importable
    xentkit       xentkit.torch.cross_entropy(x, y): the Triton kernel, a new gradient buffer
    xentkit_nocheck  xentkit with check_labels=False (no label check, which waits for the device
                  once)
    xentkit_inplace  xentkit with inplace_backward=True (the gradient written over the logits:
                  the issue's "in place" goal, beside liger, which does the same)
    xentkit_kernel  xentkit.triton.cross_entropy_rows alone (its three launches) into a
                  preallocated gradient: the kernel without the binding's work
    xentkit_opts  the same with label_smoothing=0.1, z_loss=1e-4, softcap=30 (beside torch_opts:
                  xentkit's torch-ops backend with the same options)

Time: CUDA events around forward + backward, median [min] over the rounds after warm-up. Peak
memory: torch.cuda.max_memory_allocated during one call minus the memory held before it (the
inputs), in MiB. The loss of every provider is compared with float64 (x.double()).

    python benchmarks/bench_gpu_cross_entropy.py                       # default shapes
    python benchmarks/bench_gpu_cross_entropy.py --shapes 4096x32000:float32 --rounds 10
    python benchmarks/bench_gpu_cross_entropy.py --blocks 1024,2048,4096,8192   # tune BLOCK
    python benchmarks/bench_gpu_cross_entropy.py --huge       # + 65536x262144 bfloat16 in place

``--huge [NxV]`` (default 65536x262144, 2^34 bfloat16 logits, 32 GiB: row offsets past 2^31
elements) adds one in-place shape after the others, xentkit only (torch's bfloat16 cross-entropy
would need about twice the logits again): ``xentkit_inplace`` (``inplace_backward=True``, the
gradient written over the logits) and ``xentkit_kernel_inplace`` (``cross_entropy_rows`` with
``grad_out`` the logits), each checked against float64 on the loss and on the gradient of the
first and last rows (the last ones lie past 2^31 elements). It needs the logits twice (a source
and the working copy) plus 1 GiB; with less free GPU memory it is skipped with a note.

Writes JSON (``benchmarks/results/gpu_cross_entropy.json`` by default, ``--output``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import xentkit.torch as xt

DEFAULT_SHAPES = "8192x128256:bfloat16,4096x32000:float32,8192x32000:bfloat16"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


class _LayerOutput(torch.autograd.Function):
    """The refilled logits buffer (a leaf) seen as a layer's output: a non-leaf sharing its memory,
    whose gradient flows back to the buffer. ``inplace_backward=True`` refuses a leaf that requires
    grad (a parameter's values are not the loss's to overwrite); in a model the logits are a
    matmul's output, and this stands in for it at no cost."""

    @staticmethod
    def forward(ctx, logits):
        return logits.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


# peers whose import failed other than by ImportError (installed, but broken here): recorded in the
# results' "failed", where a peer that is not installed is simply absent
IMPORT_FAILURES: dict[str, str] = {}


def _left_out(failed: dict, providers: dict, name: str, error: Exception, device: torch.device) -> None:
    """A provider that failed (a peer, a path, an OOM): recorded in ``failed`` and dropped from
    ``providers``, so that the others still run (shared by the GPU benchmarks)."""
    failed[name] = f"{type(error).__name__}: {error}"
    print(f"{name} failed, left out: {failed[name]}", file=sys.stderr, flush=True)
    del providers[name]
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _providers(names: list[str], device: torch.device) -> dict[str, object]:
    # static shapes: a second shape recompiles as itself, not as a dynamic-shape graph
    compiled = torch.compile(lambda x, y: F.cross_entropy(x.float(), y), dynamic=False)
    # on CUDA the xentkit rows insist on the Triton kernels: a call they cannot take raises with
    # the reason instead of timing torch ops under xentkit's name
    backend = "triton" if device.type == "cuda" else "auto"
    table = {
        "copy": None,
        "xentkit_kernel": None,
        "torch": lambda x, y: F.cross_entropy(x, y),
        "torch_f32": lambda x, y: F.cross_entropy(x.float(), y),
        "compile": compiled,
        "xentkit": lambda x, y: xt.cross_entropy(x, y, backend=backend),
        "torch_opts": lambda x, y: xt.cross_entropy(x, y, backend="torch", **OPTIONS),
        "xentkit_opts": lambda x, y: xt.cross_entropy(x, y, backend=backend, **OPTIONS),
    }
    # without the label check's wait for the device (what it costs), and in place
    table["xentkit_nocheck"] = lambda x, y: xt.cross_entropy(x, y, check_labels=False, backend=backend)
    table["xentkit_inplace"] = lambda x, y: xt.cross_entropy(
        _LayerOutput.apply(x), y, inplace_backward=True, backend=backend
    )
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss()
        table["liger"] = lambda x, y: liger(x, y)
    except ImportError:
        pass
    except Exception as error:  # (a peer that fails to import: recorded, the others still run)
        IMPORT_FAILURES["liger"] = f"import failed: {type(error).__name__}: {error}"
        print(f"liger-kernel: {IMPORT_FAILURES['liger']}", file=sys.stderr, flush=True)
    return {name: table[name] for name in names if name in table}


def _refill(work, source):
    with torch.no_grad():
        work.copy_(source)


def _call(name, function, source, labels, work, plain):
    """One forward + backward (for "copy": the copy into a plain buffer)."""
    if name == "copy":
        plain.copy_(source)
        return
    if name == "xentkit_kernel":  # the three launches alone, into a preallocated gradient
        from xentkit.triton import cross_entropy_rows

        cross_entropy_rows(source, labels, None, -100, 0.0, 0.0, None, None, None, plain)
        return
    work.grad = None
    function(work, labels).backward()


class _Clock:
    """CUDA events on a GPU, perf_counter elsewhere (a smoke test of this script on the CPU)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, action):
        self.sync()
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            action()
            stop.record()
            self.sync()
            return start.elapsed_time(stop)
        begin = time.perf_counter()
        action()
        return (time.perf_counter() - begin) * 1e3

    def peak_mib(self, action):
        if not self.cuda:
            action()
            return float("nan")
        self.sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        action()
        self.sync()
        return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_shape(spec: str, names: list[str], rounds: int, device: torch.device) -> dict:
    size, _, dtype_name = spec.partition(":")
    rows, classes = (int(v) for v in size.split("x"))
    dtype = DTYPES[dtype_name or "float32"]
    generator = torch.Generator(device=device).manual_seed(0)
    source = (torch.randn(rows, classes, device=device, generator=generator) * 2).to(dtype)
    labels = torch.randint(0, classes, (rows,), device=device, generator=generator)
    labels[::17] = -100
    reference = F.cross_entropy(source.double(), labels).item()
    reference_opts = xt.cross_entropy(source.double(), labels, backend="torch", **OPTIONS).item()
    checked_rows = _checked_rows(labels)
    reference_grad = _rows_gradient(source, labels, checked_rows)
    providers = _providers(names, device)
    clock = _Clock(device)
    result = {"shape": [rows, classes], "dtype": dtype_name, "logits_mib": source.numel() * source.element_size() / 2**20,
              "providers": {}, "failed": {name: why for name, why in IMPORT_FAILURES.items() if name in names}}
    work = torch.empty_like(source).requires_grad_()
    plain = torch.empty_like(source)
    for name, function in list(providers.items()):
        try:
            for _ in range(3):  # warm-up: compilation, autotuning, allocator
                _refill(work, source)
                _call(name, function, source, labels, work, plain)
            loss = gradient_error = None
            if name == "xentkit_kernel":  # its float32 per-row losses, averaged in float64
                from xentkit.triton import cross_entropy_rows

                loss_rows, _ = cross_entropy_rows(source, labels, None, -100, 0.0, 0.0, None, None, None, None)
                loss = float(loss_rows.double().sum()) / int((labels != -100).sum())
            elif name != "copy":
                _refill(work, source)
                work.grad = None
                output = function(work, labels)
                loss = float(output.item())
                if name in ("xentkit", "xentkit_inplace") and work.grad is None:
                    output.backward()  # the gradient in the logits' dtype against float64
                    gradient_error = _gradient_error(work.grad, checked_rows, reference_grad)
                work.grad = None
            _refill(work, source)
            peak = clock.peak_mib(lambda name=name, function=function: _call(name, function, source, labels, work, plain))
        except Exception as error:  # a peer (or a path) that fails: recorded, the others still run
            work.grad = None
            _left_out(result["failed"], providers, name, error, device)
            continue
        expected = reference_opts if name.endswith("_opts") else reference
        result["providers"][name] = {
            "times_ms": [],
            "peak_mib": peak,
            "loss": loss,
            "loss_relative_error": None if loss is None else abs(loss - expected) / abs(expected),
            "gradient_relative_error": gradient_error,
        }
    for _ in range(rounds):  # interleaved: one call of each provider per round
        for name, function in providers.items():
            _refill(work, source)  # fresh values (liger writes its gradient over them)
            elapsed = clock.measure(lambda name=name, function=function: _call(name, function, source, labels, work, plain))
            result["providers"][name]["times_ms"].append(elapsed)
    floor = statistics.median(result["providers"]["copy"]["times_ms"]) if "copy" in providers else None
    for entry in result["providers"].values():
        entry["median_ms"] = statistics.median(entry["times_ms"])
        entry["min_ms"] = min(entry["times_ms"])
        entry["vs_copy"] = None if floor is None else entry["median_ms"] / floor
    return result


HUGE_SHAPE = "65536x262144"


def _huge_reference(source, labels, checked_rows):
    """The float64 "mean" loss (row chunks of the logits) and the gradient of ``checked_rows``."""
    valid = int((labels != -100).sum())
    total = 0.0
    for start in range(0, source.shape[0], 1024):
        chunk = source[start : start + 1024].double()
        total += float(F.cross_entropy(chunk, labels[start : start + 1024], reduction="sum"))
    return total / valid, _rows_gradient(source, labels, checked_rows)


def _checked_rows(labels):
    """The first and last three rows that are not ignored (on the huge shape, past 2^31 elements)."""
    rows = labels.shape[0]
    checked = torch.tensor(sorted(r for r in {0, 1, 2, rows - 3, rows - 2, rows - 1} if 0 <= r < rows), device=labels.device)
    return checked[labels[checked] != -100]


def _rows_gradient(source, labels, checked_rows):
    """The float64 gradient of the "mean" loss with respect to ``checked_rows`` of the logits."""
    valid = int((labels != -100).sum())
    rows = source[checked_rows].double().requires_grad_()
    (F.cross_entropy(rows, labels[checked_rows], reduction="sum") / valid).backward()
    return rows.grad


def _gradient_error(gradient, checked_rows, reference):
    """max |gradient − reference| ÷ max |reference| over the checked rows (one bfloat16 rounding of
    the gradient is at most 2^-9 of it)."""
    got = gradient[checked_rows].double()
    return float((got - reference).abs().max() / reference.abs().max())


def run_huge(spec: str, rounds: int, device: torch.device) -> dict:
    """xentkit in place on ``spec`` bfloat16 logits (see the module docstring)."""
    rows, classes = (int(v) for v in spec.split("x"))
    logits_bytes = rows * classes * 2
    result = {"shape": [rows, classes], "dtype": "bfloat16", "logits_mib": logits_bytes / 2**20, "providers": {}}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the earlier shapes left cached is free for this one
        free = torch.cuda.mem_get_info()[0]
        needed = 2 * logits_bytes + 4 * 2**30  # the logits twice, and the float64 references
        if free < needed:
            result["skipped"] = (
                f"needs {needed / 2**30:.0f} GiB of GPU memory (the logits twice and 4 GiB), "
                f"{free / 2**30:.0f} GiB free"
            )
            return result
    generator = torch.Generator(device=device).manual_seed(0)
    source = torch.empty(rows, classes, dtype=torch.bfloat16, device=device)
    for start in range(0, rows, 1024):  # no float32 copy of the whole logits
        block = torch.randn(min(1024, rows - start), classes, device=device, generator=generator)
        source[start : start + block.shape[0]] = (block * 2).to(torch.bfloat16)
    labels = torch.randint(0, classes, (rows,), device=device, generator=generator)
    labels[::17] = -100
    checked_rows = _checked_rows(labels)
    reference, reference_grad = _huge_reference(source, labels, checked_rows)
    work = torch.empty_like(source)
    clock = _Clock(device)

    def xentkit_inplace():
        leaf = work.requires_grad_()
        leaf.grad = None
        loss = xt.cross_entropy(_LayerOutput.apply(leaf), labels, inplace_backward=True, backend="triton")
        loss.backward()
        return float(loss), leaf.grad

    def xentkit_kernel_inplace():
        from xentkit.triton import cross_entropy_rows

        grad_scale = torch.full((rows,), 1.0 / int((labels != -100).sum()), device=device)
        loss_rows, _ = cross_entropy_rows(work.detach(), labels, None, -100, 0.0, 0.0, None, grad_scale, None, work.detach())
        return float(loss_rows.sum(dtype=torch.float64)) * float(grad_scale[0]), work.detach()

    for name, function in (("xentkit_inplace", xentkit_inplace), ("xentkit_kernel_inplace", xentkit_kernel_inplace)):
        _refill(work, source)
        loss, gradient = function()
        entry = {
            "loss": loss,
            "loss_relative_error": abs(loss - reference) / abs(reference),
            # the gradient of the first and last rows (past 2^31 elements) against float64
            "checked_rows": checked_rows.tolist(),
            "gradient_relative_error": _gradient_error(gradient, checked_rows, reference_grad),
            "times_ms": [],
        }
        _refill(work, source)
        entry["peak_mib"] = clock.peak_mib(function)
        for _ in range(rounds):
            _refill(work, source)
            entry["times_ms"].append(clock.measure(function))
        entry["median_ms"] = statistics.median(entry["times_ms"])
        entry["min_ms"] = min(entry["times_ms"])
        entry["vs_copy"] = None
        result["providers"][name] = entry
        work.grad = None
    return result


def tune_blocks(spec: str, blocks: list[int], rounds: int, device: torch.device) -> dict:
    from xentkit.triton import cross_entropy as kernel_module

    out = {}
    saved = kernel_module.MAX_BLOCK
    try:
        for block in blocks:
            kernel_module.MAX_BLOCK = block
            entry = run_shape(spec, ["copy", "xentkit_kernel"], rounds, device)["providers"]["xentkit_kernel"]
            out[block] = {"median_ms": entry["median_ms"], "min_ms": entry["min_ms"]}
            print(f"  BLOCK {block:6d}: {entry['median_ms']:.3f} ms (min {entry['min_ms']:.3f})", flush=True)
    finally:
        kernel_module.MAX_BLOCK = saved
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxV:dtype")
    parser.add_argument("--providers", default="copy,torch,torch_f32,compile,liger,xentkit,xentkit_inplace,xentkit_nocheck,xentkit_kernel,torch_opts,xentkit_opts")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--blocks", default="", help="comma-separated BLOCK sizes to tune on the first shape")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of this script")
    parser.add_argument("--huge", nargs="?", const=HUGE_SHAPE, default=None, metavar="NxV",
                        help=f"add the in-place bfloat16 case (default {HUGE_SHAPE}; see above)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "gpu_cross_entropy.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (--device cpu for a smoke test)", file=sys.stderr)
        return 2
    names = args.providers.split(",")
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "shapes": [],
    }
    if args.blocks:
        report["block_tuning"] = tune_blocks(
            args.shapes.split(",")[0], [int(b) for b in args.blocks.split(",")], args.rounds, device
        )
    runs = [lambda spec=spec: run_shape(spec, names, args.rounds, device) for spec in args.shapes.split(",") if spec]
    if args.huge:
        runs.append(lambda: run_huge(args.huge, args.rounds, device))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for run in runs:
        try:
            result = run()
        except Exception as error:  # e.g. out of memory in --huge: the shapes before it are kept
            report.setdefault("errors", []).append(f"{type(error).__name__}: {error}")
            print(f"failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            continue
        report["shapes"].append(result)
        args.output.write_text(json.dumps(report, indent=1))  # after every shape
        spec = "x".join(map(str, result["shape"])) + ":" + result["dtype"]
        print(f"\n{spec} ({result['logits_mib']:.0f} MiB of logits)")
        if "skipped" in result:
            print(f"skipped: {result['skipped']}")
            continue
        print(f"{'provider':14s} {'median ms':>10s} {'min ms':>8s} {'x copy':>7s} {'peak MiB':>9s} {'loss rel err':>13s}")
        for name, entry in result["providers"].items():
            error = "" if entry["loss_relative_error"] is None else f"{entry['loss_relative_error']:.1e}"
            vs = "" if entry["vs_copy"] is None else f"{entry['vs_copy']:.2f}"
            print(f"{name:14s} {entry['median_ms']:10.3f} {entry['min_ms']:8.3f} {vs:>7s} {entry['peak_mib']:9.1f} {error:>13s}")
            if entry.get("gradient_relative_error") is not None:
                rows = entry.get("checked_rows", "first and last")
                print(f"{'':14s} gradient of rows {rows}: relative error {entry['gradient_relative_error']:.1e}")
    args.output.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
