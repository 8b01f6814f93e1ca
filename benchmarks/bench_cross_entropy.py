#!/usr/bin/env python
"""Cross-entropy forward + backward on the CPU: xentkit against PyTorch and a memory copy.

Providers, timed side by side and interleaved (one call of each per round, ``--repeats`` rounds,
median and spread reported):

    copy              np.copyto(dst, logits): one read + one write of the logits, the
                      bandwidth floor of any forward+backward that returns a gradient
    xentkit           xentkit.cross_entropy_and_grad(logits, labels): the public api, fused
                      kernel, a new gradient array per call (whose page faults it pays)
    xentkit_out       the same with out= a preallocated, already-touched gradient array
    xentkit_inplace   the same with out=logits (a fresh copy of the logits per round; only the
                      call is timed)
    xentkit_kernel    xentkit.kernels.cross_entropy_rows(...) into a preallocated gradient: the
                      kernel alone, without the api's checks and allocation
    reference         the api on the NumPy reference (XENTKIT_REFERENCE); skipped above
                      --reference-max-elements logits (it is slow and memory-hungry)
    torch             torch.nn.functional.cross_entropy(x, y).backward() on a leaf
                      torch.from_numpy(logits).requires_grad_()

and, asked for by name (``--providers``; not in the default set, each compiles on its warm-up
call, untimed):

    xentkit_torch          xentkit.torch.cross_entropy(x, y).backward(), eager
    torch_compile          torch.compile(F.cross_entropy)(x, y).backward() (inductor)
    xentkit_torch_compile  torch.compile(xentkit.torch.cross_entropy)(x, y).backward(): the
                           Numba kernels in their custom ops (xentkit.torch._numba_ops)

Peak memory is measured per provider in a separate process (this script with
``--memory-probe PROVIDER``): peak RSS minus the RSS after the inputs are allocated, reported in
bytes and as % of the logits' bytes. The peak is VmHWM reset just before the call (Linux), with
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` recorded beside it (a lifetime peak, void when the
warm-up peaked higher; the JSON says so per entry).

Loss options (``--softcap``, ``--label-smoothing``, ``--z-loss``, ``--class-weights``: random
per-class weights in [0.5, 2), seed 1) go to every provider that takes them, the api's and the
kernel's arguments, and ``xentkit.torch``'s; torch has no softcap or z-loss, so the torch
providers compute them with torch ops: ``S·tanh(x/S)`` before ``F.cross_entropy``, and
``Z·logsumexp(x)²`` over the class axis, averaged over the non-ignored samples (xentkit's "mean"
of the z term, not class-weighted), added to it. Per-pixel shapes ``NxCxd1x...xdk`` (classes on
axis 1, labels ``(N, d1, ..., dk)``, as torch's layout; the api is called with ``axis=1``)
time the same providers but the kernel (it takes ``[N, C]`` rows); ``:channels_last`` (4-D) keeps
the logits in ``(N, H, W, C)`` memory, a strided ``(N, C, H, W)`` view, for every provider (torch
gets a ``torch.channels_last`` tensor from it).

Each provider's gradient from its warm-up call must agree with the first provider's (within
``_harness.GRADIENT_AGREEMENT``: a rounding or two of the dtype) or the run stops before timing anything more.

Prints a table, writes JSON (``benchmarks/results/cross_entropy.json`` by default) with the
machine's description. Timings on a shared machine vary: the load average before and after the
run is recorded, and rerunning is the way to check stability.

    python benchmarks/bench_cross_entropy.py                      # default shapes
    python benchmarks/bench_cross_entropy.py --quick              # small shapes, few repeats
    python benchmarks/bench_cross_entropy.py --shapes 4096x32000,8192x1000:float64 --repeats 9
    python benchmarks/bench_cross_entropy.py --probabilities    # soft-label targets
    python benchmarks/bench_cross_entropy.py --shapes 2048x1000 --softcap 30 --z-loss 1e-4
    python benchmarks/bench_cross_entropy.py --shapes 8x21x128x128:channels_last --class-weights
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from _harness import GRADIENT_AGREEMENT, agreement, cpu_model

DEFAULT_SHAPES = "4096x32000,2048x128256,8192x1000,65536x10,4096x32000:float64"
QUICK_SHAPES = "512x32000,64x128256,2048x1000,16384x10,512x32000:float64"
DEFAULT_PROVIDERS = (
    "copy",
    "xentkit",
    "xentkit_out",
    "xentkit_inplace",
    "xentkit_kernel",
    "reference",
    "torch",
)
TORCH_PROVIDERS = ("xentkit_torch", "torch_compile", "xentkit_torch_compile")
PROVIDERS = DEFAULT_PROVIDERS + TORCH_PROVIDERS
MEMORY_PROVIDERS = ("torch", "xentkit", "xentkit_inplace")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "cross_entropy.json"
SHAPE_FLAGS = ("probabilities", "channels_last")
WEIGHT_SEED = 1  # --class-weights: uniform in [0.5, 2) per class, from this seed


@dataclass(frozen=True)
class Shape:
    rows: int  # N: rows of [N, C], or the batch of a per-pixel [N, C, d1, ..., dk]
    classes: int
    dtype: str = "float32"
    probabilities: bool = False  # class-probability targets of the logits' shape, not labels
    dims: tuple[int, ...] = ()  # d1, ..., dk of a per-pixel layout (classes on axis 1)
    channels_last: bool = False  # 4-D logits (and probabilities) in (N, H, W, C) memory

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``"4096x32000"``, ``"4096x32000:float64"``, ``"4096x32000:float32:probabilities"``, or
        per pixel ``"8x21x128x128"`` (N, C, d1, ..., dk), ``"8x21x128x128:float32:channels_last"``:
        after the size, a dtype and flags in any order."""
        size, *tags = text.strip().split(":")
        rows, classes, *dims = (int(part) for part in size.lower().split("x"))
        dtypes = [tag for tag in tags if tag and tag not in SHAPE_FLAGS]
        if len(dtypes) > 1:
            raise ValueError(f"shape {text!r}: one dtype, then any of {SHAPE_FLAGS}")
        shape = cls(rows, classes, dtypes[0] if dtypes else "float32", "probabilities" in tags,
                    tuple(dims), "channels_last" in tags)
        if shape.channels_last and len(dims) != 2:
            raise ValueError(f"shape {text!r}: channels_last is for 4-D shapes, NxCxHxW")
        return shape

    @property
    def label(self) -> str:
        size = "x".join(str(n) for n in self.logits_shape)
        flags = [flag for flag in SHAPE_FLAGS if getattr(self, flag)]
        return ":".join([size, self.dtype, *flags])

    @property
    def logits_shape(self) -> tuple[int, ...]:
        return (self.rows, self.classes, *self.dims)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.rows, *self.dims)

    @property
    def elements(self) -> int:
        return math.prod(self.logits_shape)

    @property
    def nbytes(self) -> int:
        return self.elements * np.dtype(self.dtype).itemsize

    def tiny(self) -> Shape:
        """A small problem of this layout, dtype and targets (a probe's warm-up)."""
        return replace(self, rows=8 if not self.dims else 2, classes=16, dims=(4,) * len(self.dims))

    def in_layout(self, array: np.ndarray) -> np.ndarray:
        """``array`` (C order, classes on axis 1) in this shape's memory layout: as it is, or for
        channels_last the same values in (N, H, W, C) memory, seen as (N, C, H, W)."""
        if not self.channels_last:
            return array
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(array, 1, -1)), -1, 1)


@dataclass(frozen=True)
class BenchSettings:
    """The loss options every provider that can take them is given (the defaults: none)."""

    softcap: float | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    class_weights: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchSettings:
        return cls(args.softcap, args.label_smoothing, args.z_loss, args.class_weights)

    def weight(self, classes: int, dtype: np.dtype) -> np.ndarray | None:
        """The class weights (seeded: the same in every process), or None."""
        if not self.class_weights:
            return None
        return np.random.default_rng(WEIGHT_SEED).uniform(0.5, 2.0, classes).astype(dtype)

    def keywords(self, weight: object = None) -> dict[str, object]:
        """The api's (and xentkit.torch's) keyword arguments for the options that are set."""
        values = {"weight": weight, "label_smoothing": self.label_smoothing or None,
                  "z_loss": self.z_loss or None, "softcap": self.softcap}
        return {key: value for key, value in values.items() if value is not None}

    def argv(self) -> list[str]:
        """These options as this script's flags (for a memory probe's process)."""
        flags = [f"--{key.replace('_', '-')}={value!r}" for key, value in self.keywords().items()]
        return flags + (["--class-weights"] if self.class_weights else [])

    def record(self) -> dict[str, object]:
        weights = {"seed": WEIGHT_SEED, "uniform": [0.5, 2.0]} if self.class_weights else None
        return {**asdict(self), "class_weights": weights}

    @property
    def label(self) -> str:
        """``"z_loss=0.0001, softcap=30.0, class weights (seed 1)"``; "" without options."""
        parts = [f"{key}={value!r}" for key, value in self.keywords().items()]
        return ", ".join(parts + ([f"class weights (seed {WEIGHT_SEED})"] if self.class_weights else []))


NO_OPTIONS = BenchSettings()


@dataclass
class Timing:
    shape: str
    provider: str
    times_ms: list[float] = field(default_factory=list)
    skipped: str | None = None
    # max |gradient − the first provider's| / max |the first provider's|, from the warm-up call
    gradient_difference: float | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None


def make_inputs(shape: Shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal logits (scaled ×2) and uniform labels (the sample shape), allocated once
    each; or, for a probabilities shape, targets of the logits' shape and dtype: the softmax of
    other standard-normal scores over the class axis (a teacher's soft labels). Both in the
    shape's memory layout (:meth:`Shape.in_layout`)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(shape.logits_shape, dtype=np.float32)
    logits *= 2.0
    if shape.dtype != "float32":
        logits = logits.astype(shape.dtype)
    if shape.probabilities:
        scores = rng.standard_normal(shape.logits_shape, dtype=np.float32)
        scores -= scores.max(axis=1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=1, keepdims=True)
        return shape.in_layout(logits), shape.in_layout(scores.astype(shape.dtype, copy=False))
    labels = rng.integers(0, shape.classes, shape.sample_shape, dtype=np.int64)
    return shape.in_layout(logits), labels


# ---------------------------------------------------------------------------------------------
# Providers: each returns (prepare, run, gradient); prepare() is untimed, run() is the timed
# call, gradient(what run returned) the gradient it computed (None for the copy)
# ---------------------------------------------------------------------------------------------

Call = Callable[[], object]
Gradient = Callable[[object], "np.ndarray | None"]


def _second(result: object) -> np.ndarray:
    return result[1]  # the api's (loss, gradient)


def _tensor_values(result: object) -> np.ndarray:
    return result.numpy()  # a torch provider's x.grad


def _nothing() -> None:
    return None


def _bound(function: Callable, keywords: dict[str, object]) -> Callable:
    """``function`` with ``keywords`` bound (itself when there are none)."""
    return functools.partial(function, **keywords) if keywords else function


def api_keywords(logits: np.ndarray, options: BenchSettings) -> dict[str, object]:
    """The api's keyword arguments: the options set, and ``axis=1`` for a per-pixel layout."""
    keywords = options.keywords(options.weight(logits.shape[1], logits.dtype))
    return {**keywords, "axis": 1} if logits.ndim > 2 else keywords


def kernel_scales(labels: np.ndarray, weight: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The api's "mean" as the kernel's per-row upstream gradients (main term, z term): 1/N for
    both, but 1/Σ w_y for the main term of class indices with class weights (no label is
    ignored here)."""
    rows = labels.shape[0]
    scale = np.full(rows, 1.0 / rows)
    if weight is None or labels.ndim == 2:
        return scale, scale
    return np.full(rows, 1.0 / float(weight[labels].sum(dtype=np.float64))), scale


def torch_cross_entropy(options: BenchSettings, weight: object) -> Callable:
    """``F.cross_entropy`` with the options: weight and label smoothing its own, the softcap
    ``S·tanh(x/S)`` of the logits before it, and the z-loss ``Z·logsumexp(x)²`` over the class
    axis, averaged over the non-ignored samples (xentkit's "mean" of the z term), added to it."""
    import torch
    import torch.nn.functional as F

    keywords = options.keywords(weight)
    softcap, z_loss = keywords.pop("softcap", None), keywords.pop("z_loss", None)
    cross_entropy = _bound(F.cross_entropy, keywords)
    if softcap is None and z_loss is None:
        return cross_entropy

    def loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if softcap is not None:
            x = softcap * torch.tanh(x / softcap)
        value = cross_entropy(x, target)
        if z_loss is None:
            return value
        squares = torch.logsumexp(x, dim=1).square()
        if target.is_floating_point():  # probabilities: every sample counts
            return value + z_loss * squares.mean()
        counted = target != -100
        return value + z_loss * torch.where(counted, squares, 0.0).sum() / counted.sum()

    return loss


def torch_loss_function(name: str, options: BenchSettings, classes: int, dtype: np.dtype) -> Callable:
    """A torch provider's ``loss(x, target)``: xentkit.torch's or torch's, compiled if asked."""
    import torch

    weight = options.weight(classes, dtype)
    weight = None if weight is None else torch.from_numpy(weight)
    if name.startswith("xentkit"):
        import xentkit.torch as xt

        loss_fn = _bound(xt.cross_entropy, options.keywords(weight))
    else:
        loss_fn = torch_cross_entropy(options, weight)
    return torch.compile(loss_fn, fullgraph=True) if name.endswith("_compile") else loss_fn


def provider_calls(
    name: str, logits: np.ndarray, labels: np.ndarray, options: BenchSettings = NO_OPTIONS
) -> tuple[Call, Call, Gradient]:
    import xentkit

    keywords = api_keywords(logits, options)
    if name == "copy":
        dst = np.empty_like(logits)
        dst.fill(0)  # touch the pages once, outside the timing
        return _nothing, lambda: np.copyto(dst, logits), lambda _: None
    if name == "xentkit":
        return _nothing, lambda: xentkit.cross_entropy_and_grad(logits, labels, **keywords), _second
    if name == "xentkit_out":
        out = np.empty_like(logits)
        out.fill(0)
        return _nothing, lambda: xentkit.cross_entropy_and_grad(logits, labels, out=out, **keywords), _second
    if name == "xentkit_inplace":
        work = np.empty_like(logits)

        def prepare() -> None:
            np.copyto(work, logits)

        return prepare, lambda: xentkit.cross_entropy_and_grad(work, labels, out=work, **keywords), _second
    if name == "xentkit_kernel":
        from xentkit.kernels import cross_entropy_rows

        grad = np.empty_like(logits)
        grad.fill(0)
        weight = keywords.get("weight")
        scale, z_scale = kernel_scales(labels, weight)
        return _nothing, lambda: cross_entropy_rows(
            logits, labels, weight, -100, options.label_smoothing, options.z_loss, options.softcap,
            scale, z_scale, grad,
        ), lambda _: grad
    if name == "reference":

        def run_reference() -> object:
            with xentkit.use_reference(True):
                return xentkit.cross_entropy_and_grad(logits, labels, **keywords)

        return _nothing, run_reference, _second
    if name == "torch" or name in TORCH_PROVIDERS:
        import torch

        loss_fn = torch_loss_function(name, options, logits.shape[1], logits.dtype)
        target = torch.from_numpy(labels)

        def run_torch_provider() -> object:
            # (a channels_last array's strides give a torch.channels_last tensor)
            x = torch.from_numpy(logits).requires_grad_(True)
            loss_fn(x, target).backward()
            return x.grad

        return _nothing, run_torch_provider, _tensor_values
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


def available_providers(requested: list[str]) -> list[str]:
    names = []
    for name in requested:
        if name == "torch" or name in TORCH_PROVIDERS:
            try:
                import torch  # noqa: F401
            except ImportError:
                print(f"torch is not installed: skipping the {name} provider", file=sys.stderr)
                continue
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def skip_reason(name: str, shape: Shape, reference_max_elements: int) -> str | None:
    """Why ``name`` is not timed on ``shape`` (None: it is)."""
    if name == "reference" and shape.elements > reference_max_elements:
        return f"more than {reference_max_elements:,} logits"
    if name == "xentkit_kernel" and shape.dtype not in ("float32", "float64"):
        return "the kernel takes float32 and float64 (the api widens float16)"
    if name == "xentkit_kernel" and shape.dims:
        return "the kernel takes [N, C] rows (the api moves a per-pixel layout's classes last)"
    return None


def comparable(gradient: np.ndarray) -> np.ndarray:
    """A gradient as rows of its last axis, in its logical (C) order: for the agreement check,
    a block of rows at a time (a view for [N, C]; a per-pixel one may be copied, untimed)."""
    return gradient.reshape(-1, gradient.shape[-1])


def time_shape(
    shape: Shape, providers: list[str], repeats: int, reference_max_elements: int,
    options: BenchSettings = NO_OPTIONS,
) -> list[Timing]:
    """Interleaved rounds: in each round every provider runs once (after one warm-up call). The
    warm-up's gradient of each provider is compared with the first provider's (within
    ``GRADIENT_AGREEMENT``, else the run stops: the timings of a wrong answer mean nothing)."""
    logits, labels = make_inputs(shape)
    timings = {name: Timing(shape.label, name) for name in providers}
    calls: dict[str, tuple[Call, Call]] = {}
    first: tuple[str, np.ndarray] | None = None
    for name in providers:
        timings[name].skipped = skip_reason(name, shape, reference_max_elements)
        if timings[name].skipped:
            continue
        prepare, run, gradient_of = provider_calls(name, logits, labels, options)
        prepare()
        gradient = gradient_of(run())  # warm-up: compilation or cache load, allocator, page faults
        if gradient is not None:
            gradient = comparable(gradient)
            if first is None:
                first = (name, gradient.copy())
            else:
                timings[name].gradient_difference = agreement(name, gradient, *first, shape.dtype, shape.label)
        del gradient
        calls[name] = (prepare, run)
    if first is not None:
        agreeing = [f"{name} {timing.gradient_difference:.1e}" for name, timing in timings.items()
                    if timing.gradient_difference is not None]
        print(f"  gradients within {GRADIENT_AGREEMENT[shape.dtype]:g} of {first[0]}'s: " + ", ".join(agreeing), file=sys.stderr)
    del first
    gc.collect()
    for _ in range(repeats):
        for name, (prepare, run) in calls.items():
            prepare()
            start = time.perf_counter()
            result = run()
            elapsed = time.perf_counter() - start
            del result
            timings[name].times_ms.append(elapsed * 1e3)
    return [timings[name] for name in providers]


# ---------------------------------------------------------------------------------------------
# Memory probe (runs in its own process)
# ---------------------------------------------------------------------------------------------


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _reset_high_water_mark() -> bool:
    """Linux: reset VmHWM (the peak RSS of /proc/self/status) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _high_water_mark_bytes() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_probe(provider: str, shape: Shape, options: BenchSettings = NO_OPTIONS) -> dict[str, float]:
    """One call of ``provider`` on ``shape``: peak RSS above the RSS with the inputs allocated.

    Peak RSS from ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` and, on Linux, from VmHWM reset
    right before the call (the reported one: ru_maxrss cannot be reset and the warm-up may have
    peaked higher). The in-place provider overwrites the logits (no fresh copy here).
    """
    # warm up on a tiny problem first (imports, compiled-kernel cache, torch's allocator), so
    # that their memory is in the baseline and their peak stays below the measured call's
    tiny_logits, tiny_labels = make_inputs(shape.tiny())
    prepare, run, _ = provider_calls(provider, tiny_logits, tiny_labels, options)
    prepare()
    run()
    del prepare, run, tiny_logits, tiny_labels
    if provider.startswith("xentkit"):
        # the tiny problem takes the tile kernel (and the one-thread build); the measured one may
        # take another: every kernel loaded (or, on a cold cache, compiled) now, not in the call
        import xentkit.kernels

        xentkit.kernels.compile_all()
    gc.collect()
    logits, labels = make_inputs(shape)
    if provider == "xentkit_inplace":
        import xentkit

        keywords = api_keywords(logits, options)

        def run() -> object:
            return xentkit.cross_entropy_and_grad(logits, labels, out=logits, **keywords)
    else:
        _, run, _ = provider_calls(provider, logits, labels, options)
    baseline = _current_rss_bytes()
    peak_before = _peak_rss_bytes()
    hwm_reset = _reset_high_water_mark()
    result = run()
    peak = _peak_rss_bytes()
    hwm = _high_water_mark_bytes() if hwm_reset else None
    del result
    extra_maxrss = peak - baseline
    # ru_maxrss is a lifetime peak: when imports or the warm-up peaked above the baseline it
    # cannot see the call's peak. The peak RSS reset right before the call (VmHWM after
    # /proc/self/clear_refs, Linux) can; it is the reported number when available.
    maxrss_valid = peak_before <= baseline
    extra, method = (
        (hwm - baseline, "VmHWM reset") if hwm is not None else (extra_maxrss, "ru_maxrss")
    )
    return {
        "provider": provider,
        "shape": shape.label,
        "logits_bytes": logits.nbytes,
        "baseline_rss_bytes": baseline,
        "extra_bytes": extra,
        "extra_percent_of_logits": 100.0 * extra / logits.nbytes,
        "method": method,
        "extra_bytes_ru_maxrss": extra_maxrss,
        "ru_maxrss_valid": maxrss_valid,
        "peak_rss_before_call_bytes": peak_before,
        "peak_rss_bytes": peak,
    }


def run_memory_probes(
    shapes: list[Shape], providers: list[str], options: BenchSettings = NO_OPTIONS
) -> list[dict[str, float]]:
    results = []
    for shape in shapes:
        for provider in providers:
            command = [
                sys.executable,
                __file__,
                "--memory-probe",
                provider,
                "--shapes",
                shape.label,
                *options.argv(),
            ]
            completed = subprocess.run(command, capture_output=True, text=True, check=False)
            if completed.returncode != 0 or not completed.stdout.strip():
                print(
                    f"memory probe {provider} {shape.label} failed:\n{completed.stderr}",
                    file=sys.stderr,
                )
                continue
            results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    return results


# ---------------------------------------------------------------------------------------------
# Machine description, table, JSON
# ---------------------------------------------------------------------------------------------


def _threading_layer() -> str | None:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel function has run yet
        return None


def machine_info() -> dict[str, object]:
    import numba

    import xentkit

    info: dict[str, object] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": _threading_layer(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "numba_svml": bool(getattr(numba.config, "USING_SVML", False)),
        "xentkit": xentkit.__version__,
    }
    if cpu := cpu_model():
        info["cpu_model"] = cpu
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "-"
    return f"{numerator / denominator:.2f}"


def print_table(
    timings: list[Timing], memory: list[dict[str, float]], options: BenchSettings = NO_OPTIONS
) -> None:
    by_shape: dict[str, dict[str, Timing]] = {}
    for timing in timings:
        by_shape.setdefault(timing.shape, {})[timing.provider] = timing
    width = max([22, *(len(shape) + 2 for shape in by_shape)])
    print(
        "\nforward+backward, milliseconds over the rounds; ratios of medians: "
        "this/copy (1 = bandwidth floor) and torch/this (speed-up over PyTorch)"
    )
    if options.label:
        print(f"loss options, every provider that takes them: {options.label}")
    print(
        f"{'shape':<{width}}{'provider':<17}{'median':>9}{'min':>9}{'max':>9}"
        f"{'this/copy':>11}{'torch/this':>12}"
    )
    for shape, row in by_shape.items():
        copy = row.get("copy")
        torch_timing = row.get("torch")
        copy_ms = copy.median_ms if copy and not copy.skipped else None
        torch_ms = torch_timing.median_ms if torch_timing and not torch_timing.skipped else None
        label = shape
        for provider in PROVIDERS:
            timing = row.get(provider)
            if timing is None:
                continue
            if timing.skipped:
                print(f"{label:<{width}}{provider:<17}{'skipped: ' + timing.skipped:>59}")
            else:
                print(
                    f"{label:<{width}}{provider:<17}{timing.median_ms:>9.2f}"
                    f"{min(timing.times_ms):>9.2f}{max(timing.times_ms):>9.2f}"
                    f"{_ratio(timing.median_ms, copy_ms):>11}{_ratio(torch_ms, timing.median_ms):>12}"
                )
            label = ""

    if memory:
        methods = sorted({str(entry["method"]) for entry in memory})
        print(
            "\npeak memory above the inputs (own process per provider; "
            f"{', '.join(methods)}), MiB and % of the logits"
        )
        print(f"{'shape':<{width}}" + "".join(f"{p:>24}" for p in MEMORY_PROVIDERS))
        rows: dict[str, dict[str, dict[str, float]]] = {}
        for entry in memory:
            rows.setdefault(str(entry["shape"]), {})[str(entry["provider"])] = entry
        for shape, entries in rows.items():
            cells = []
            for provider in MEMORY_PROVIDERS:
                entry = entries.get(provider)
                if entry is None:
                    cells.append(f"{'-':>24}")
                else:
                    text = f"{entry['extra_bytes'] / 2**20:.1f} ({entry['extra_percent_of_logits']:.1f}%)"
                    cells.append(f"{text:>24}")
            print(f"{shape:<{width}}" + "".join(cells))


def write_json(
    path: Path, timings: list[Timing], memory: list[dict[str, float]], config: dict[str, object]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for timing in timings:
        entry = asdict(timing)
        if timing.times_ms:
            entry.update(
                median_ms=timing.median_ms,
                min_ms=min(timing.times_ms),
                max_ms=max(timing.times_ms),
            )
        results.append(entry)
    document = {
        "benchmark": "cross_entropy forward+backward",
        "machine": machine_info(),
        "config": config,
        "timings": results,
        "memory": memory,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes",
        help=f"comma-separated NxC[:dtype][:probabilities], or per pixel NxCxd1x...xdk (classes on "
        f"axis 1) and, 4-D, :channels_last (default {DEFAULT_SHAPES})",
    )
    parser.add_argument(
        "--probabilities", action="store_true",
        help="class-probability targets for every shape (soft labels) instead of class indices",
    )
    parser.add_argument("--repeats", type=int, help="timed rounds per shape (default 7; --quick 3)")
    parser.add_argument(
        "--quick", action="store_true", help=f"small shapes ({QUICK_SHAPES}), 3 rounds"
    )
    parser.add_argument(
        "--providers",
        default=",".join(DEFAULT_PROVIDERS),
        help=f"comma-separated subset of {','.join(PROVIDERS)} (default {','.join(DEFAULT_PROVIDERS)})",
    )
    parser.add_argument(
        "--reference-max-elements",
        type=int,
        default=20_000_000,
        help="skip the NumPy reference above this many logits (default 2e7)",
    )
    parser.add_argument("--softcap", type=float, metavar="S", help="logits become S·tanh(x/S) first")
    parser.add_argument("--label-smoothing", type=float, default=0.0, metavar="E", help="label smoothing ε")
    parser.add_argument("--z-loss", type=float, default=0.0, metavar="Z", help="adds Z·logsumexp² per sample")
    parser.add_argument(
        "--class-weights", action="store_true",
        help=f"random class weights, uniform in [0.5, 2) (seed {WEIGHT_SEED})",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--memory-probe", metavar="PROVIDER", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shapes_text = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    shapes = [Shape.parse(text) for text in shapes_text.split(",") if text.strip()]
    if args.probabilities:
        shapes = [replace(shape, probabilities=True) for shape in shapes]
    options = BenchSettings.from_args(args)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, shapes[0], options)))
        return 0
    repeats = args.repeats or (3 if args.quick else 7)
    providers = available_providers([p.strip() for p in args.providers.split(",") if p.strip()])
    load_before = os.getloadavg()
    started = time.time()

    # memory probes first, while this process is small: a child's ru_maxrss starts from the
    # RSS of the process it was forked from (Linux carries it across exec)
    memory: list[dict[str, float]] = []
    if not args.no_memory:
        probe_providers = [p for p in MEMORY_PROVIDERS if p in providers]
        print("memory probes ...", file=sys.stderr)
        memory = run_memory_probes(shapes, probe_providers, options)
    timings: list[Timing] = []
    for shape in shapes:
        print(
            f"timing {shape.label} ({shape.nbytes / 2**20:.0f} MiB of logits) ...", file=sys.stderr
        )
        timings.extend(time_shape(shape, providers, repeats, args.reference_max_elements, options))
        gc.collect()

    load_after = os.getloadavg()
    print_table(timings, memory, options)
    for timing in timings:
        if timing.skipped:
            print(f"note: {timing.provider} skipped for {timing.shape} ({timing.skipped})")
    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
        f"(other processes on this machine inflate timings)"
    )
    config = {
        "shapes": [shape.label for shape in shapes],
        "repeats": repeats,
        "providers": providers,
        "loss_options": options.record(),
        "reference_max_elements": args.reference_max_elements,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "started_unix": started,
        "wall_seconds": time.time() - started,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    write_json(args.output, timings, memory, config)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
