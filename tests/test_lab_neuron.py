"""Note 003's single sigmoid neuron: the quadratic cost's slowdown, and cross-entropy without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xentkit.lab.neuron import (
    ITERATIONS,
    NeuronRun,
    neuron_results_json,
    run_neuron_experiment,
    train_neuron,
)
from xentkit.lab.report import LEGEND_FONT_SIZE, neuron_figure, neuron_summary
from xentkit.lab.runner import run_neuron


@pytest.fixture(scope="module")
def runs() -> dict[tuple[tuple[float, float], str], NeuronRun]:
    return {(run.start, run.cost): run for run in run_neuron_experiment()}


@pytest.mark.parametrize(
    ("start", "first", "final"), [((0.6, 0.9), 0.82, 0.09), ((2.0, 2.0), 0.98, 0.20)]
)
def test_quadratic_cost_reproduces_note_003(
    runs: dict, start: tuple[float, float], first: float, final: float
) -> None:
    run = runs[start, "quadratic"]
    assert round(run.first_output, 2) == first
    assert round(run.final_output, 2) == final
    # The output read before the 300th update rounds the same: the convention does not matter.
    assert round(run.outputs[ITERATIONS - 1], 2) == final


@pytest.mark.parametrize("start", [(0.6, 0.9), (2.0, 2.0)])
def test_cross_entropy_falls_far_lower(runs: dict, start: tuple[float, float]) -> None:
    quadratic, entropy = runs[start, "quadratic"], runs[start, "cross-entropy"]
    assert entropy.first_output == quadratic.first_output
    assert entropy.final_output < 0.02
    assert entropy.final_output < quadratic.final_output / 4


def test_the_worse_start_learns_slower_only_under_the_quadratic_cost(runs: dict) -> None:
    # After 50 iterations the quadratic run from 0.98 has hardly moved; cross-entropy's has.
    assert runs[(2.0, 2.0), "quadratic"].outputs[50] > 0.97
    assert runs[(2.0, 2.0), "cross-entropy"].outputs[50] < 0.15
    for cost in ("quadratic", "cross-entropy"):
        run = runs[(2.0, 2.0), cost]
        assert len(run.outputs) == len(run.costs) == ITERATIONS + 1
        assert all(np.diff(run.outputs) < 0)


def test_gradient_matches_finite_differences() -> None:
    # One step from (w, b) moves the logit by −2·lr·dC/dz (x = 1); check dC/dz numerically.
    for cost in ("quadratic", "cross-entropy"):
        run = train_neuron((0.6, 0.9), cost, iterations=1, learning_rate=1e-6)
        z0 = 1.5
        z1 = np.log(run.outputs[1] / (1 - run.outputs[1]))
        dz = (z0 - z1) / (2 * 1e-6)

        def c(z: float, cost: str = cost) -> float:
            a = 1 / (1 + np.exp(-z))
            return 0.5 * a**2 if cost == "quadratic" else -np.log1p(-a)

        numeric = (c(z0 + 1e-6) - c(z0 - 1e-6)) / 2e-6
        assert dz == pytest.approx(numeric, rel=1e-4)
        assert run.costs[0] == pytest.approx(c(z0), rel=1e-12)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cost must be one of"):
        train_neuron((0.0, 0.0), "hinge")
    with pytest.raises(ValueError, match="iterations must be >= 0, got -1"):
        train_neuron((0.0, 0.0), "quadratic", iterations=-1)


def test_json_shape(runs: dict) -> None:
    results = neuron_results_json(list(runs.values()))
    assert len(results["runs"]) == 4
    for run in results["runs"]:
        assert set(run) >= {"start", "cost", "first_output", "final_output", "outputs"}
        assert run["cost"] in {"quadratic", "cross-entropy"}
        assert isinstance(run["start"], list)
        assert len(run["start"]) == 2
        assert isinstance(run["first_output"], float)
        assert run["outputs"][0] == run["first_output"]
        assert run["outputs"][-1] == run["final_output"]
    json.dumps(results)


def test_summary_states_the_numbers(runs: dict) -> None:
    text = neuron_summary(list(runs.values()))
    assert "0.82 falls to 0.09" in text
    assert "0.98 falls only to 0.20" in text


def test_run_neuron_writes_plot_json_and_report(tmp_path: Path) -> None:
    import io

    from xentkit.lab.console import Output

    stream = io.StringIO()
    results = run_neuron(tmp_path / "out", json_path=tmp_path / "n.json", output=Output(stream))
    out = tmp_path / "out"
    for name in ("neuron.png", "neuron.json", "report.html"):
        assert (out / name).stat().st_size > 1000
    assert (out / "neuron.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "n.json").read_text()) == json.loads(json.dumps(results))
    report = (out / "report.html").read_text()
    assert "data:image/png;base64," in report
    assert "<table>" in report
    assert "0.09" in stream.getvalue()
    assert "0.20" in stream.getvalue()


def test_json_round_trip(runs: dict) -> None:
    for run in runs.values():
        again = NeuronRun.from_json(json.loads(json.dumps(run.to_json())))
        assert again == run


def test_summary_counts_the_plateau_from_the_outputs(runs: dict) -> None:
    text = neuron_summary(list(runs.values()))
    slow = runs[(2.0, 2.0), "quadratic"].outputs
    fast = runs[(2.0, 2.0), "cross-entropy"].outputs
    plateau = next(k for k, a in enumerate(slow) if a < slow[0] - 0.1)
    drop = next(k for k, a in enumerate(fast) if a < fast[0] - 0.1)
    assert plateau > 100 > drop  # the experiment's point, in the numbers
    assert f"needs {plateau} iterations to fall by 0.1" in text
    assert f"falls by 0.1 in {drop} iterations" in text
    assert "the worse start learns slower" in text


def _display_points(figure) -> list[tuple[float, float]]:
    points = []
    for axes in figure.axes:
        for line in axes.get_lines():
            points += [tuple(p) for p in axes.transData.transform(line.get_xydata())]
    return points


def test_every_panel_has_a_readable_legend_that_covers_no_curve(runs: dict) -> None:
    import matplotlib.pyplot as plt

    figure = neuron_figure(list(runs.values()))
    try:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        frame = figure.bbox
        points = _display_points(figure)
        plateau = runs[(2.0, 2.0), "quadratic"].outputs[:150]
        assert min(plateau) > 0.9  # the curve the legend must leave visible
        assert len(figure.axes) == 2
        for axes in figure.axes:  # the output panel and the cost panel
            legend = axes.get_legend()
            assert legend is not None, axes.get_title()
            assert len(legend.get_texts()) == 4
            assert all(text.get_fontsize() >= LEGEND_FONT_SIZE >= 9 for text in legend.get_texts())
            box = legend.get_window_extent(renderer)
            assert not any(box.contains(x, y) for x, y in points), axes.get_title()
            # inside the saved image, not cut off at its edge
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0
    finally:
        plt.close(figure)
