"""What a review of the lab found: a --json path that --out makes a folder, settings interpolated
into the report unescaped, a damaged plot blamed on its results, images of any shape of 784
pixels, an unwritable cache called a network failure, private cache files, and pyplot's global
backend switched under the caller."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest_lab import fake_mnist, md5_of, serve_folder, write_idx
from xentkit.cli import main
from xentkit.lab import datasets, download, report
from xentkit.lab.console import Output
from xentkit.lab.datasets import Dataset, DatasetError, default_cache_dir
from xentkit.lab.formats import read_idx_pair, read_npz
from xentkit.lab.mnist import MnistRun, MnistSettings, mnist_results_json
from xentkit.lab.runner import run_neuron

NEURON_TITLE = "<h2>Single sigmoid neuron: quadratic cost vs cross-entropy</h2>"


@pytest.fixture
def http_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1: ``(base_url, served_folder)``."""
    yield from serve_folder(tmp_path, monkeypatch)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's cache or a system-wide Fashion-MNIST."""
    monkeypatch.setenv("XENTKIT_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-files")


@pytest.fixture(scope="module")
def neuron_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The neuron experiment's files, written once (each test copies what it changes)."""
    out = tmp_path_factory.mktemp("neuron")
    run_neuron(out, output=Output(io.StringIO(), progress=False))
    return out


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    return error.strip()


# --- 1. --json and --out ------------------------------------------------------------------------


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("above", [False, True])
def test_json_at_the_out_folder_it_makes_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], above: bool
) -> None:
    new = tmp_path / "new"
    out = new / "a" / "b" if above else new
    assert main(["lab", "neuron", "--out", str(out), "--json", str(new), "--no-progress"]) == 2
    error = _one_line(capsys)
    assert (
        error
        == f"xentkit: error: --json: {new} is a folder that --out makes, expected the path of a file"
    )
    assert not new.exists()


def test_json_at_a_file_the_lab_writes_into_out_is_refused_also_through_links(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    # the file by its name in a folder not made yet; the file through a link that points at it
    link = tmp_path / "results.json"
    link.symlink_to(out / "mnist.json")
    # a link in --out that points elsewhere is still the lab's file there (written through)
    out.mkdir()
    elsewhere = tmp_path / "elsewhere.json"
    (out / "neuron.json").symlink_to(elsewhere)
    for json_path in (tmp_path / "new" / "report.html", link, out / "neuron.json"):
        folder = json_path.parent if json_path.name == "report.html" else out
        assert (
            main(["lab", "neuron", "--out", str(folder), "--json", str(json_path), "--no-progress"])
            == 2
        )
        assert (
            "is one of the files the lab writes into --out; give another path"
            in capsys.readouterr().err
        )
    assert not (tmp_path / "new").exists() and not elsewhere.exists()


# --- 2. the report escapes mnist.json's settings -------------------------------------------------


def test_the_report_escapes_the_settings_it_quotes(tmp_path: Path) -> None:
    data = Dataset("fashion-mnist", "fashion-mnist, made up", np.zeros((100, 784), np.float32),
                   np.zeros(100, np.int64), np.zeros((10, 784), np.float32), np.zeros(10, np.int64))  # fmt: skip
    runs = [MnistRun("cross-entropy", test_accuracy=[0.5, 0.6], train_loss=[1.0, 0.9])]
    results = json.loads(json.dumps(mnist_results_json(data, MnistSettings(), runs)))
    results["settings"].update(batch_size="<b>batch</b>", seed="<script>seed()</script>")
    (tmp_path / "mnist.json").write_text(json.dumps(results))
    page = report.write_report(tmp_path).read_text()
    assert "<h2>Softmax regression on Fashion-MNIST" in page  # the section is there
    assert "<b>batch</b>" not in page and "<script>" not in page
    assert "mini-batch &lt;b&gt;batch&lt;/b&gt;" in page
    assert "shuffling seed &lt;script&gt;seed()&lt;/script&gt;" in page


# --- 3. a damaged plot, and plots saved whole ----------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "truncated", "not a png"])
def test_a_damaged_plot_is_named_and_its_section_kept(
    neuron_out: Path, tmp_path: Path, damage: str
) -> None:
    for name in ("neuron.json", "neuron.png"):
        (tmp_path / name).write_bytes((neuron_out / name).read_bytes())
    whole = (tmp_path / "neuron.png").read_bytes()
    broken = {
        "empty": b"",
        "truncated": whole[: len(whole) // 2],
        "not a png": b"GIF89a" + bytes(40),
    }[damage]
    (tmp_path / "neuron.png").write_bytes(broken)
    page = report.write_report(tmp_path).read_text()
    assert NEURON_TITLE in page, "the section was left out"
    assert "neuron.json is not results" not in page
    assert (
        f"neuron.png cannot be shown (expected a whole PNG image, received {len(broken)} bytes"
        in page
    )
    assert "<img" not in page


def test_a_whole_plot_is_still_shown(neuron_out: Path) -> None:
    page = report.write_report(neuron_out).read_text()
    assert NEURON_TITLE in page and '<img class="plot"' in page and "cannot be shown" not in page


def test_a_plot_is_saved_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "neuron.png"
    path.write_bytes(b"the old plot")

    class Interrupted:
        def savefig(self, file: io.BufferedWriter, **options: object) -> None:
            assert options["format"] == "png"
            file.write(b"\x89PNG half a plot")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        report._save(Interrupted(), path)
    assert path.read_bytes() == b"the old plot"
    assert [entry.name for entry in tmp_path.iterdir()] == ["neuron.png"]  # no temporary left


def test_a_plot_takes_the_format_of_its_file_name(tmp_path: Path) -> None:
    """``plot_neuron`` / ``plot_mnist`` are public: a caller's ``.svg`` is an SVG, as matplotlib's
    ``savefig(path)`` chose it (the atomic save wrote PNG bytes whatever the name)."""
    from xentkit.lab.neuron import run_neuron_experiment

    runs = run_neuron_experiment(iterations=3)
    svg = report.plot_neuron(runs, tmp_path / "n.svg")
    assert svg.read_bytes().lstrip().startswith((b"<?xml", b"<svg"))
    assert report.plot_neuron(runs, tmp_path / "n.png").read_bytes().startswith(b"\x89PNG")


# --- 4. images must be 28×28 ---------------------------------------------------------------------


def test_images_of_another_shape_with_784_pixels_are_refused(tmp_path: Path) -> None:
    images, labels = tmp_path / "images-idx3-ubyte", tmp_path / "labels-idx1-ubyte"
    write_idx(images, np.zeros((40, 56, 14), np.uint8))
    write_idx(labels, np.zeros(40, np.uint8))
    with pytest.raises(
        DatasetError, match=r"expected 28×28 images .* received shape \(40, 56, 14\)"
    ):
        read_idx_pair(images, labels)
    archive = tmp_path / "data.npz"
    for x_train in (np.zeros((20, 56, 14), np.uint8), np.zeros((20, 784, 1), np.uint8)):
        np.savez(archive, x_train=x_train, y_train=np.zeros(20, np.int64),
                 x_test=np.zeros((10, 28, 28), np.uint8), y_test=np.zeros(10, np.int64))  # fmt: skip
        with pytest.raises(
            DatasetError,
            match=rf"x_train\]: expected 28×28 images .* received shape \(20, {x_train.shape[1]}",
        ):
            read_npz(archive)
    # [N, 28, 28] and [N, 784] stay accepted
    np.savez(archive, x_train=np.zeros((20, 784), np.uint8), y_train=np.zeros(20, np.int64),
             x_test=np.zeros((10, 28, 28), np.uint8), y_test=np.zeros(10, np.int64))  # fmt: skip
    arrays = read_npz(archive)
    assert arrays["x_train"].shape == (20, 784) and arrays["x_test"].shape == (10, 784)


# --- 5. and 6. the download cache ----------------------------------------------------------------


def _serve_fake_mnist(folder: Path) -> dict[str, str]:
    fake_mnist(folder, n_train=20, n_test=10)
    return {path.name: md5_of(path) for path in sorted(folder.iterdir())}


def _deny_writing(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``os.access`` says ``folder`` is not writable (as for a user without the permission, or
    an immutable folder: root passes permission bits)."""
    access = os.access

    def fake(path: object, mode: int, **kwargs: object) -> bool:
        if Path(path) == folder and mode & os.W_OK:
            return False
        return access(path, mode, **kwargs)

    monkeypatch.setattr(download.os, "access", fake)


def _assert_local_problem(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    error = _one_line(capsys)
    assert error == (
        f"xentkit: error: {folder}: cannot write into the cache folder (it is not writable); choose "
        "another with --cache or $XENTKIT_CACHE"
    ), error


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into any folder"
)
def test_an_unwritable_cache_folder_is_a_local_problem(
    http_server: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_url, served = http_server
    _serve_fake_mnist(served)
    folder = tmp_path / "cache" / "mnist"
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    try:
        assert (
            main(["data", "download", "mnist", "--cache", str(folder.parent), "--mirror", base_url])
            == 2
        )
    finally:
        folder.chmod(0o755)
    _assert_local_problem(capsys, folder)


def test_an_unwritable_cache_folder_is_a_local_problem_whoever_runs_it(
    http_server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    base_url, served = http_server
    hashes = _serve_fake_mnist(served)
    folder = tmp_path / "cache" / "mnist"
    folder.mkdir(parents=True)
    _deny_writing(monkeypatch, folder)
    assert (
        main(["data", "download", "mnist", "--cache", str(folder.parent), "--mirror", base_url])
        == 2
    )
    _assert_local_problem(capsys, folder)
    assert not any(folder.iterdir())
    # a cached file with a wrong hash, to replace: the same
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"corrupt")
    with pytest.raises(DatasetError, match="cannot write into the cache folder"):
        download.download_dataset("mnist", cache_dir=folder.parent, mirror=base_url, hashes=hashes)
    # a complete, verified cache is read as it is: nothing to write, no error
    monkeypatch.undo()
    for name in hashes:
        (folder / name).write_bytes((served / name).read_bytes())
    _deny_writing(monkeypatch, folder)
    assert (
        download.download_dataset("mnist", cache_dir=folder.parent, mirror=base_url, hashes=hashes)
        == folder
    )


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=["022", "027", "077"])
def test_downloaded_files_get_the_permissions_of_any_new_file(
    http_server: tuple[str, Path], tmp_path: Path, umask: int
) -> None:
    base_url, served = http_server
    hashes = _serve_fake_mnist(served)
    kept = (
        tmp_path / "cache" / "mnist" / "t10k-labels-idx1-ubyte.gz"
    )  # cached already: left as it is
    kept.parent.mkdir(parents=True)
    kept.write_bytes((served / kept.name).read_bytes())
    kept.chmod(0o640)
    before = os.umask(umask)
    try:
        folder = download.download_dataset(
            "mnist", cache_dir=tmp_path / "cache", mirror=base_url, hashes=hashes
        )
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
        assert modes == {name: 0o640 if name == kept.name else 0o666 & ~umask for name in hashes}
        assert download._umask() == umask and download._umask() == umask  # read, not changed
    finally:
        os.umask(before)


# --- 7. the caller's matplotlib backend ----------------------------------------------------------


def test_the_lab_leaves_the_callers_matplotlib_backend_alone(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import io, sys
        import matplotlib
        matplotlib.use("svg")
        from xentkit.lab.console import Output
        from xentkit.lab.runner import run_neuron
        run_neuron(sys.argv[1], output=Output(io.StringIO(), progress=False))
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
        """
    )
    environment = {
        key: value for key, value in os.environ.items() if key not in ("DISPLAY", "MPLBACKEND")
    }
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=environment)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False"]
    assert (tmp_path / "neuron.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert '<img class="plot"' in (tmp_path / "report.html").read_text()


# --- minor: `xentkit data` without an action, $XDG_CACHE_HOME ------------------------------------


def test_data_without_an_action_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data"]) == 2
    error = capsys.readouterr().err
    assert (
        error.startswith("usage: xentkit data ")
        and "the following arguments are required: ACTION" in error
    )
    assert main([]) == 0  # bare `xentkit` prints its help (a promise of test_cli)


def test_a_relative_xdg_cache_home_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XENTKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for value, expected in (("relative/cache", tmp_path / "home" / ".cache"), ("", tmp_path / "home" / ".cache"),
                            (str(tmp_path / "xdg"), tmp_path / "xdg")):  # fmt: skip
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert default_cache_dir() == expected / "xentkit", value


# --- stdout that goes away or fills up -------------------------------------------------------


def test_a_reader_that_stops_early_leaves_the_run_to_finish(tmp_path: Path) -> None:
    """`xentkit lab | head -1`: rich's broken-pipe handling exited with 1, silently, and the run's
    folder was removed unwritten (a review, 2026-12-07). It goes on and writes its files."""
    out = tmp_path / "out"
    run = subprocess.Popen(
        [sys.executable, "-m", "xentkit", "lab", "neuron", "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert run.stdout is not None and run.stdout.readline().startswith(b"Single sigmoid neuron")
    run.stdout.close()  # the reader is gone before the tables come
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert err == b""
    assert (out / "neuron.json").is_file() and (out / "report.html").is_file()


def test_a_failed_write_of_the_printed_output_is_named_as_such(tmp_path: Path) -> None:
    """A full disk behind `> file` read as "OSError: [Errno 28] No space left on device", as if
    --out were full."""

    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    output = Output(Full(), progress=False)
    with pytest.raises(OSError, match=r"writing the lab's printed output to the output stream: No space left on device"):
        output.line("x")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not Path("/sys/kernel").is_dir(),
                    reason="root passes os.access on /sys: the case needs root")
def test_an_out_folder_that_takes_no_file_is_refused_before_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    """As root, --out was checked with os.access alone, which /sys passes: the whole run went
    before the write failed (a review, 2026-12-07). The file the report's write makes is tried
    first, as for --json."""
    assert main(["lab", "neuron", "--out", "/sys/kernel", "--no-progress"]) == 2
    printed = capsys.readouterr()
    # (the first of the files the run writes there: neuron.json)
    assert printed.err.startswith("xentkit: error: --out: cannot write /sys/kernel/neuron.json: a new file in its folder")
    assert printed.err.count("\n") == 1
    assert "Single sigmoid neuron" not in printed.out  # (refused before the run)
