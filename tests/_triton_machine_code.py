"""Every Triton kernel xentkit launches, compiled to GPU machine code without a GPU.

Triton's interpreter (which runs the kernels on CPU tensors in CI) executes the kernels' Python
with NumPy: it never meets the compiler, so a kernel can pass every interpreter test and still
fail to compile for a GPU, or compile into code that spills registers to local memory. This
script closes that gap on a machine without a GPU, in two steps:

1. **record** (a child process, under the interpreter): run the library's Triton paths —
   ``xentkit.torch`` cross-entropy (labels with every option, probability targets, in place, the
   epilogue in one launch and in spans of rows),
   ``linear_cross_entropy``, ``log_probs`` / ``linear_log_probs`` and the vocabulary-parallel
   forms in a one-process group — on CPU tensors of the real shapes' widths (a 128256-class
   vocabulary, and narrow ones), in float32, float16 and bfloat16, and record every kernel launch:
   its arguments (tensors as dtype and 16-byte alignment, numbers as they are) and launch options;
2. **compile** (this process, no interpreter): rebuild each launch's arguments, let Triton's own
   binder specialize them as it would on a GPU (dtypes, alignment, integers equal to 1 or divisible
   by 16), and compile every distinct specialization for the target architectures with
   ``triton.compile`` (Triton's ahead-of-time path: PTX, then ``ptxas``, bundled with Triton),
   then read each cubin's resource usage with the bundled ``cuobjdump``.

What it compiles is what the scenarios launch: Triton specializes integers by value (1, or a
multiple of 16: chunk counts, strides, ``ignore_index``), so other widths and row counts can make
specializations it never saw; and for float32 logits the widest load may be another operand's
(half logits are checked by their own narrow loads).

For each compiled kernel it reports registers per thread, local memory (spills), shared memory,
the widest global load and store in the PTX (16 bytes: vectorized) and, for half-precision
operands, how many of their loads are narrower than that. ``check()`` lists what
breaks the rules the GPU path relies on: every launch compiles, nothing spills to local memory
(which would turn the one read of the logits into several), shared memory within the
architecture's limit, the logits read with 16-byte loads where their rows are aligned, and no
floating-point contraction (no fused multiply-add the interpreter would not make).

    python tests/_triton_machine_code.py [--arch 90] [--arch 80] [--json OUT]

``tests/test_triton_machine_code.py`` runs it. It needs torch, Triton with its NVIDIA backend
(``ptxas`` and ``cuobjdump`` ship with it) and no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Architectures: compute capability -> (name, shared memory per block at most, in bytes)
ARCHES = {90: ("H100 (sm_90)", 232448), 80: ("A100 (sm_80)", 166912)}
WIDTHS = (128256, 3000, 10)  # a Llama-3 vocabulary (16 chunks of 8192), one chunk of 4096, tiny
ROWS = 3


# ---------------------------------------------------------------------------------------------
# step 1: record the launches (run in a child process with TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------


def _describe(value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"a kernel argument of type {type(value).__name__} is not recorded")


def _scenarios(record) -> None:
    """The library's Triton paths, each run forward and backward on CPU tensors."""
    import torch
    import torch.distributed as dist

    import xentkit.torch as xt

    gen = torch.Generator().manual_seed(0)
    for width in WIDTHS:
        dtypes = (torch.float32, torch.float16, torch.bfloat16) if width == WIDTHS[0] else (torch.bfloat16,)
        for dtype in dtypes:
            x = torch.randn(ROWS, width, generator=gen).to(dtype)
            y = torch.randint(0, width, (ROWS,), generator=gen)
            y[1] = -100
            weight = torch.rand(width, generator=gen) + 0.5
            q = torch.softmax(torch.randn(ROWS, width, generator=gen), 1)
            record(f"cross_entropy {dtype} V={width}")
            for kwargs in ({}, {"weight": weight, "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}):
                for reduction in ("mean", "none"):
                    leaf = x.clone().requires_grad_()
                    loss = xt.cross_entropy(leaf, y, reduction=reduction, backend="triton", **kwargs)
                    loss.sum().backward()
                leaf = x.clone().requires_grad_()
                xt.cross_entropy(leaf * 1, y, backend="triton", inplace_backward=True, **kwargs).backward()
            for target in (q, q.to(dtype), q.double()):  # float32, the logits' dtype, float64
                leaf = x.clone().requires_grad_()
                xt.cross_entropy(leaf, target, backend="triton").backward()
                leaf = x.clone().requires_grad_()
                xt.cross_entropy(leaf, target, weight=weight, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                                 backend="triton").backward()
            if width == WIDTHS[0]:  # the epilogue in spans of rows: its two-launch form
                from xentkit.triton import reduction as epilogue

                record(f"cross_entropy epilogue in spans {dtype} V={width}")
                span, epilogue.SPAN = epilogue.SPAN, 2
                try:
                    for kwargs in ({}, {"weight": weight, "z_loss": 1e-4}):
                        for reduction in ("mean", "none"):
                            leaf = x.clone().requires_grad_()
                            xt.cross_entropy(leaf, y, reduction=reduction, backend="triton", **kwargs).sum().backward()
                finally:
                    epilogue.SPAN = span
            record(f"log_probs {dtype} V={width}")
            leaf = x.clone().requires_grad_()
            logp, entropy = xt.log_probs(leaf, y, temperature=0.7, return_entropy=True, backend="triton")
            (logp.sum() + entropy.sum()).backward()
            if width != WIDTHS[0]:
                continue
            hidden = torch.randn(ROWS, 32, generator=gen).to(dtype)
            head = (torch.randn(width, 32, generator=gen) / 8).to(dtype)
            record(f"linear_cross_entropy {dtype} V={width}")
            for kwargs in ({}, {"weight": weight, "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}):
                for reduction in ("mean", "none"):
                    h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
                    xt.linear_cross_entropy(h, w, y, reduction=reduction, backend="triton", **kwargs).sum().backward()
            record(f"linear_log_probs {dtype} V={width}")
            h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
            logp, entropy = xt.linear_log_probs(h, w, y, return_entropy=True, backend="triton")
            (logp.sum() + entropy.sum()).backward()
            record(f"vocab_parallel {dtype} V={width}")
            for kwargs in ({}, {"weight": weight, "label_smoothing": 0.1, "z_loss": 1e-4}):
                leaf = x.clone().requires_grad_()
                xt.vocab_parallel_cross_entropy(leaf, y, group=dist.group.WORLD, backend="triton", **kwargs).backward()
                h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
                xt.vocab_parallel_linear_cross_entropy(h, w, y, backend="triton", **kwargs).backward()
            h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
            logp, entropy = xt.vocab_parallel_linear_log_probs(h, w, y, return_entropy=True, backend="triton")
            (logp.sum() + entropy.sum()).backward()


def record_launches() -> list[dict]:
    """Step 1, in this process (``TRITON_INTERPRET=1`` must be set before xentkit's kernels are
    defined): every launch of the scenarios, with the scenario that made it."""
    import torch.distributed as dist
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []
    scenario = [""]
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__.startswith("xentkit."):
            launches.append({
                "scenario": scenario[0],
                "module": self.fn.__module__,
                "kernel": self.fn.__name__,
                "args": [_describe(a) for a in args],
                "kwargs": {k: _describe(v) for k, v in kwargs.items()},
            })
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    with tempfile.TemporaryDirectory() as folder:
        store = dist.FileStore(os.path.join(folder, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            _scenarios(lambda name: scenario.__setitem__(0, name))
        finally:
            dist.destroy_process_group()
    return launches


# ---------------------------------------------------------------------------------------------
# step 2: compile each distinct launch for the GPU architectures (no interpreter)
# ---------------------------------------------------------------------------------------------


def _rebuild(description):
    import torch

    if "tensor" in description:
        storage = torch.empty(64, dtype=getattr(torch, description["tensor"]))  # 64-byte aligned
        return storage if description["aligned"] else storage[1:]
    return description["value"]


def _widest(ptx: str, op: str) -> int:
    """The widest ``op`` (``ld.global`` or ``st.global``) in the PTX, in bytes (0 if none):
    ``.v4.b32`` is 16 bytes, whatever cache qualifiers come between."""
    widest = 0
    for instruction in re.findall(rf"\b{re.escape(op)}(?:\.\S+?)?(?=\s)", ptx):
        vector = re.search(r"\.v(\d)\b", instruction)
        bits = re.findall(r"\.[bfsu](\d+)\b", instruction)
        if bits:
            widest = max(widest, int(vector.group(1) if vector else 1) * int(bits[-1]) // 8)
    return widest


def _narrow_16bit_loads(ptx: str) -> int:
    """How many ``ld.global`` of 16-bit elements (bfloat16, float16) are narrower than 16 bytes.
    Half-precision logits streamed 16 bytes at a time come as ``.v4.b32``; a scalar such as the
    upstream gradient of a half loss is one ``.b16`` load; logits read narrower would be many."""
    narrow = 0
    for instruction in re.findall(r"\bld\.global(?:\.\S+?)?(?=\s)", ptx):
        vector = re.search(r"\.v(\d)\b", instruction)
        bits = re.findall(r"\.[bfsu](\d+)\b", instruction)
        if bits and int(bits[-1]) == 16 and int(vector.group(1) if vector else 1) * 2 < 16:
            narrow += 1
    return narrow


def _resources(cubin: bytes, tool: Path, folder: str) -> dict[str, int]:
    path = os.path.join(folder, "kernel.cubin")
    Path(path).write_bytes(cubin)
    text = subprocess.run([str(tool), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return dict(zip(("registers", "stack", "static_shared", "local"), map(int, found.groups()), strict=True))


def compile_launches(launches: list[dict], arches: list[int]) -> list[dict]:
    """Step 2: each distinct specialization of the recorded launches compiled for each
    architecture, with its resources (or the compiler's error)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        for arch in arches:
            target = GPUTarget("cuda", arch, 32)
            backend = make_backend(target)
            seen: dict[tuple, dict] = {}
            for launch in launches:
                kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
                args = [_rebuild(a) for a in launch["args"]]
                kwargs = {k: _rebuild(v) for k, v in launch["kwargs"].items()}
                kwargs["debug"] = False
                binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
                bound, specialization, options = binder(*args, **kwargs)
                key = (launch["module"], launch["kernel"], repr(specialization), repr(options))
                if key in seen:
                    seen[key]["scenarios"].add(launch["scenario"])
                    continue
                options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization,
                                                                          options)
                entry = {
                    "arch": arch,
                    "module": launch["module"].removeprefix("xentkit."),
                    "kernel": launch["kernel"],
                    "num_warps": options.num_warps,
                    "constexprs": {kernel.arg_names[path[0]]: value for path, value in constexprs.items()},
                    "signature": {k: v for k, v in signature.items() if v != "constexpr"},
                    "scenarios": {launch["scenario"]},
                }
                named = dict(zip(kernel.arg_names, launch["args"], strict=False))  # constexprs come as keywords
                logits = named.get("logits_ptr", {})
                stride = named.get("logits_stride", {}).get("value")
                # rows that start on 16 bytes, as Triton can tell (an aligned base, a stride of 16k)
                entry["rows_aligned"] = bool(logits.get("aligned")) and isinstance(stride, int) and stride % 16 == 0
                seen[key] = entry
                started = time.perf_counter()
                try:
                    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                              options=options.__dict__)
                except Exception as error:  # the compiler's message is the finding
                    entry["error"] = f"{type(error).__name__}: {error}"[:2000]
                    continue
                entry["seconds"] = round(time.perf_counter() - started, 2)
                entry["shared"] = compiled.metadata.shared
                entry.update(_resources(compiled.asm["cubin"], tool, folder))
                entry["widest_load"] = _widest(compiled.asm["ptx"], "ld.global")
                entry["widest_store"] = _widest(compiled.asm["ptx"], "st.global")
                entry["narrow_16bit_loads"] = _narrow_16bit_loads(compiled.asm["ptx"])
                entry["fma"] = len(re.findall(r"\bfma\.rn\.f32\b", compiled.asm["ptx"]))
                entry["fusion"] = options.enable_fp_fusion
            for entry in seen.values():
                entry["scenarios"] = sorted(entry["scenarios"])
                results.append(entry)
    return results


# Kernels that stream the logits (one program per (row, chunk)): their loads of an aligned row
# must be 16 bytes wide, or the one read of the logits runs at a fraction of the bandwidth.
STREAMING = {"_partials_kernel", "_grad_kernel", "_gradient_kernel"}


def check(results: list[dict]) -> list[str]:
    """What breaks the rules (module docstring), one line each; empty when all hold."""
    problems = []
    for r in results:
        name = f"{r['module']}.{r['kernel']} sm_{r['arch']} {r['constexprs']}"
        if "error" in r:
            problems.append(f"{name}: does not compile: {r['error']}")
            continue
        if r["local"] or r["stack"]:
            problems.append(f"{name}: spills ({r['local']} bytes local, {r['stack']} bytes stack)")
        if r["shared"] > ARCHES[r["arch"]][1]:
            problems.append(f"{name}: {r['shared']} bytes of shared memory, over {ARCHES[r['arch']][1]}")
        if r["registers"] * 32 * r["num_warps"] > 65536:
            problems.append(f"{name}: {r['registers']} registers × {32 * r['num_warps']} threads > 65536")
        wide = r["rows_aligned"] and r["constexprs"].get("BLOCK", 0) >= 64
        if r["kernel"] in STREAMING and wide and r["widest_load"] < 16:
            problems.append(f"{name}: logits read {r['widest_load']} bytes at a time, not 16")
        # the widest load may be another operand's: for half logits, also no run of narrow loads
        half = r["signature"].get("logits_ptr") in ("*bf16", "*fp16")
        if r["kernel"] in STREAMING and wide and half and r["narrow_16bit_loads"] > 2:
            problems.append(f"{name}: {r['narrow_16bit_loads']} loads of 16-bit values narrower than 16 bytes")
        # every launch turns contraction off (xentkit.triton._chunks.EXACT): the GPU then rounds as
        # the interpreter; the streaming kernels call no libdevice function (whose own code has
        # fma), so any fma there is a fused a·b + c
        if r["fusion"]:
            problems.append(f"{name}: launched with floating-point contraction on")
        if r["kernel"] in STREAMING and r["fma"]:
            problems.append(f"{name}: {r['fma']} fused multiply-adds")
    return problems


def table(results: list[dict]) -> str:
    lines = [f"{'arch':6} {'kernel':38} {'warps':>5} {'regs':>4} {'local':>5} {'shared':>6} {'ld':>3} {'st':>3}  "
             "specialization"]
    for r in sorted(results, key=lambda r: (r["arch"], r["module"], r["kernel"])):
        flags = " ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.isupper())
        dtype = r["signature"].get("logits_ptr", "")
        kernel = f"{r['module']}.{r['kernel']}"
        if "error" in r:
            lines.append(f"sm_{r['arch']:<3} {kernel:38} ERROR {r['error'][:80]}")
            continue
        lines.append(f"sm_{r['arch']:<3} {kernel:38} {r['num_warps']:5} {r['registers']:4} {r['local']:5} "
                     f"{r['shared']:6} {r['widest_load']:3} {r['widest_store']:3}  {dtype} {flags}")
    return "\n".join(lines)


# The exit status when this Triton lacks the internals the check relies on (its binder, its
# argument packing, the interpreter's launch signature, the bundled cuobjdump): pinned in
# constraints.txt (Triton 3.8), they may move in other versions.
UNSUPPORTED = 3


def _missing_triton_internals() -> str:
    import inspect

    import triton
    from triton.runtime import jit
    from triton.runtime.interpreter import InterpretedFunction

    missing = []
    if not hasattr(jit, "create_function_from_signature"):
        missing.append("triton.runtime.jit.create_function_from_signature")
    if not hasattr(jit.JITFunction, "_pack_args"):
        missing.append("JITFunction._pack_args")
    if "warmup" not in inspect.signature(InterpretedFunction.run).parameters:
        missing.append("InterpretedFunction.run(..., grid, warmup)")
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing += [str(tools / name) for name in ("ptxas", "cuobjdump") if not (tools / name).exists()]
    return ", ".join(missing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHES),
                        help="compute capability to compile for (repeatable; default 90)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--record-only", type=Path, help=argparse.SUPPRESS)  # the child's step 1
    options = parser.parse_args(argv)
    if options.record_only:
        options.record_only.write_text(json.dumps(record_launches()))
        return 0
    if os.environ.get("TRITON_INTERPRET"):
        parser.error("run without TRITON_INTERPRET: step 2 compiles the kernels")
    missing = _missing_triton_internals()
    if missing:  # the test skips on this exit status, saying why
        print(f"this Triton lacks what the check uses: {missing}")
        return UNSUPPORTED
    with tempfile.TemporaryDirectory() as folder:
        recorded = Path(folder, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
        subprocess.run([sys.executable, __file__, "--record-only", str(recorded)], env=env, check=True)
        launches = json.loads(recorded.read_text())
    results = compile_launches(launches, options.arch or [90])
    problems = check(results)
    print(table(results))
    print(f"{len(launches)} launches recorded, {len(results)} kernels compiled, {len(problems)} problems")
    for line in problems:
        print("PROBLEM", line)
    if options.json:
        options.json.write_text(json.dumps({"launches": len(launches), "results": results, "problems": problems},
                                           indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
