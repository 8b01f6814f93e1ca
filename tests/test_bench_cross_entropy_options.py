"""benchmarks/bench_cross_entropy.py with its loss options and a per-pixel shape runs end to end
(tiny shapes, one round, no memory probes): every provider that ran agrees with torch's gradient
(the script's own check, torch given first), and the JSON records the options. Times mean
nothing here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PROVIDERS = "copy,torch,xentkit,xentkit_out,xentkit_inplace,xentkit_kernel,reference,xentkit_torch"
OPTIONS = ["--softcap", "30", "--label-smoothing", "0.1", "--z-loss", "1e-3", "--class-weights"]


def test_all_options_on_rows_and_per_pixel_shapes(tmp_path):
    output = tmp_path / "cross_entropy.json"
    completed = subprocess.run(
        [sys.executable, "bench_cross_entropy.py", "--shapes", "64x100,2x5x6x7,2x5x6x7:channels_last",
         *OPTIONS, "--repeats", "1", "--no-memory", "--providers", PROVIDERS, "--output", str(output)],
        cwd=BENCHMARKS, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    header = "loss options, every provider that takes them: "
    assert f"{header}label_smoothing=0.1, z_loss=0.001, softcap=30.0, class weights (seed 1)\n" in completed.stdout
    report = json.loads(output.read_text())
    assert report["config"]["loss_options"] == {
        "softcap": 30.0, "label_smoothing": 0.1, "z_loss": 1e-3,
        "class_weights": {"seed": 1, "uniform": [0.5, 2.0]},
    }
    assert report["config"]["shapes"] == [
        "64x100:float32", "2x5x6x7:float32", "2x5x6x7:float32:channels_last"
    ]
    timings = report["timings"]
    assert len(timings) == 3 * len(PROVIDERS.split(","))
    for timing in timings:
        if timing["skipped"]:  # the kernel takes [N, C] rows only
            assert timing["provider"] == "xentkit_kernel" and timing["shape"].startswith("2x5x6x7")
            continue
        assert len(timing["times_ms"]) == 1
        if timing["provider"] not in ("copy", "torch"):  # each against torch's (the first) gradient
            assert timing["gradient_difference"] is not None, timing
            assert timing["gradient_difference"] <= 1e-4, timing
    assert sum(timing["skipped"] is None for timing in timings) == len(timings) - 2


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_cross_entropy

    return bench_cross_entropy


@pytest.mark.parametrize("text", ["64x100", "64x100:float64:probabilities", "8x21x16x16",
                                  "8x21x16x16:float32:probabilities:channels_last", "2x3x4x5x6"])
def test_a_shape_label_parses_back_to_the_shape(bench, text):
    shape = bench.Shape.parse(text)
    assert bench.Shape.parse(shape.label) == shape
    logits, labels = bench.make_inputs(shape.tiny())
    assert logits.shape[1] == 16 and logits.ndim == len(shape.logits_shape)
    assert labels.shape == (logits.shape if shape.probabilities else (logits.shape[0], *logits.shape[2:]))


def test_channels_last_is_only_for_4d_shapes(bench):
    with pytest.raises(ValueError, match="channels_last"):
        bench.Shape.parse("8x21x16:channels_last")


@pytest.mark.parametrize("text", ["64x100", "2x5x6x7", "64x100:float32:probabilities"])
def test_the_torch_loss_with_options_is_xentkits(bench, text):
    """The torch providers' softcap and z-loss, written in torch ops: the loss value (the
    smoke run above compares gradients only)."""
    import torch

    import xentkit

    options = bench.BenchSettings(softcap=3.0, label_smoothing=0.1, z_loss=1e-2, class_weights=True)
    logits, labels = bench.make_inputs(bench.Shape.parse(text))
    logits, labels = logits.astype(np.float64), labels if labels.dtype.kind == "i" else labels.astype(np.float64)
    ours = xentkit.cross_entropy(logits, labels, **bench.api_keywords(logits, options))
    weight = torch.from_numpy(options.weight(logits.shape[1], logits.dtype))
    theirs = bench.torch_cross_entropy(options, weight)(torch.from_numpy(logits), torch.from_numpy(labels))
    assert float(theirs) == pytest.approx(float(ours), rel=1e-12)
