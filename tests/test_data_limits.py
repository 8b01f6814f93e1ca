"""Hostile or degenerate data files: a gzip that inflates far beyond its size, IDX dimensions
whose product overflows int64, and splits with no samples each give one line naming the file,
without unpacking the bomb."""

from __future__ import annotations

import gzip
import resource
from pathlib import Path

import numpy as np
import pytest

from conftest_lab import fake_mnist, write_idx
from xentkit.cli import main
from xentkit.lab.formats import MAX_IDX_BYTES, DatasetError, read_idx, read_idx_pair, read_npz


def _header(shape: tuple[int, ...], type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)


def test_a_declared_size_beyond_the_limit_is_refused_before_any_data_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bomb-idx3-ubyte.gz"
    # 4 × 2^30 bytes declared; the data that follows is never unpacked
    path.write_bytes(gzip.compress(_header((4096, 1024, 1024)) + bytes(1 << 20)))
    with pytest.raises(DatasetError, match=rf"{path}: header declares shape \(4096, 1024, 1024\), 4294967296 values in 4294967296 bytes"):
        read_idx(path)
    assert MAX_IDX_BYTES < 4 << 30


def test_dimensions_whose_product_overflows_int64_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge"
    path.write_bytes(_header((2**32 - 1,) * 4))
    with pytest.raises(DatasetError, match=r"values in .* bytes: expected at most"):
        read_idx(path)


def test_a_gzip_bomb_behind_a_small_header_stops_after_one_extra_byte(tmp_path: Path) -> None:
    """A valid 10-byte IDX file followed by 256 MiB of zeros, compressed to a few hundred KiB:
    refused as trailing bytes with the memory of the declared size only."""
    path = tmp_path / "trailing.gz"
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(_header((10,)) + bytes(10))
        block = bytes(1 << 20)
        for _ in range(256):
            out.write(block)
    assert path.stat().st_size < 2 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DatasetError, match="trailing bytes"):
        read_idx(path)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"reading grew the peak memory by {grown_kib} KiB"


def test_splits_without_samples_are_refused(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "images.gz", np.zeros((0, 28, 28), np.uint8))
    labels = write_idx(tmp_path / "labels.gz", np.zeros(0, np.uint8))
    with pytest.raises(DatasetError, match=rf"{images}: holds no images \(N = 0\)"):
        read_idx_pair(images, labels)
    archive = tmp_path / "empty.npz"
    np.savez(archive, x_train=np.zeros((3, 784), np.uint8), y_train=np.zeros(3, np.int64),
             x_test=np.zeros((0, 784), np.uint8), y_test=np.zeros(0, np.int64))
    with pytest.raises(DatasetError, match=r"x_test holds no images"):
        read_npz(archive)


def test_the_command_line_says_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "idx"
    fake_mnist(folder, n_train=10, n_test=5)
    bomb = folder / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(_header((100000, 28, 28 * 1024)) + bytes(1 << 16)))
    code = main(["lab", "mnist", "--data", str(folder), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(bomb) in error and "expected at most" in error, error


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_a_bad_out_folder_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    import os

    if kind == "file":
        out = tmp_path / "taken"
        out.write_text("not a folder")
        expected = "exists and is not a folder"
    else:
        if os.geteuid() == 0:
            out, expected = Path("/proc/forbidden"), "cannot make the folder"
        else:
            locked = tmp_path / "locked"
            locked.mkdir(mode=0o500)
            out, expected = locked / "out", "cannot make the folder"
    assert main(["lab", "--out", str(out), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("xentkit: error: --out:") and expected in error, error


def test_a_subcommand_error_prints_that_subcommands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "neuron", "--epochs", "5"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: xentkit lab neuron"), error
    assert "xentkit lab neuron: error: unrecognized arguments: --epochs 5" in error


def test_a_text_file_as_data_says_what_was_expected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert main(["lab", "mnist", "--data", str(text), "--no-progress", "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip()
    assert f"{text}: expected an .npz archive" in error and "b'hell'" in error and "pickle" not in error


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_an_unreachable_mirror_says_what_to_do_instead(tmp_path: Path, name: str) -> None:
    from xentkit.lab.download import download_dataset

    with pytest.raises(DatasetError) as error:  # nothing listens on port 9 of this machine
        download_dataset(name, cache_dir=tmp_path, mirror="http://127.0.0.1:9/")
    message = str(error.value)
    assert "download of" in message and "--data DIR" in message and "--mirror URL" in message
    assert ("dataset-fashion-mnist" in message) == (name == "fashion-mnist")


@pytest.mark.usefixtures("no_training")
def test_a_folder_as_json_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    assert main(["lab", "neuron", "--out", str(tmp_path / "o"), "--json", str(folder), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"xentkit: error: --json: {folder} is a folder, expected the path of a file", error
    assert not (tmp_path / "o" / "neuron.png").exists()


def test_a_negative_seed_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "mnist", "--seed", "-1", "--no-progress"]) == 2
    assert "argument --seed: expected a non-negative integer, received -1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mirror", "environment"), [("not a url", False), ("file:///srv/mnist", False), ("ftp//host/", True)]
)
def test_a_mirror_that_is_not_a_url_says_so_before_any_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mirror: str, environment: bool
) -> None:
    from xentkit.lab.download import download_dataset, mirror_env_var

    if environment:
        monkeypatch.setenv(mirror_env_var("mnist"), mirror)
    with pytest.raises(DatasetError) as error:
        download_dataset("mnist", cache_dir=tmp_path, mirror=None if environment else mirror)
    message = str(error.value)
    source = "$XENTKIT_MNIST_MIRROR" if environment else "--mirror"
    assert message.startswith(f"{source}: expected a URL starting with one of https://, http://"), message
    assert repr(mirror) in message and "--data DIR" in message
    assert not any(tmp_path.rglob("*-ubyte*"))


@pytest.mark.parametrize(
    ("mirror", "why"),
    [("http://", "no host after the scheme"), ("https:///mnist/", "no host after the scheme"),
     ("https://exa mple.org/", "its host holds ' '")],
)
def test_a_mirror_without_a_host_is_not_a_download_failure(tmp_path: Path, mirror: str, why: str) -> None:
    """A review: "http://" tried the host train-images-idx3-ubyte.gz and said to go offline; a
    space in the host came out of the download library as its own InvalidURL traceback."""
    from xentkit.lab.download import download_dataset

    with pytest.raises(DatasetError) as error:
        download_dataset("mnist", cache_dir=tmp_path, mirror=mirror)
    assert str(error.value) == f"--mirror: {mirror!r} is not a URL ({why})"
    assert not any(tmp_path.iterdir())


def test_data_that_is_neither_file_nor_folder_says_what_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--data /dev/null (a device) said "found nothing there"; a broken link says it is one; and a
    folder whose IDX files are folders says so even when all four are (it said "lacks all four")."""
    broken = tmp_path / "link"
    broken.symlink_to(tmp_path / "gone")
    folder = tmp_path / "idx"
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (folder / stem).mkdir(parents=True)
    for data, said in (
        ("/dev/null", "found neither a file nor a folder (a device, a pipe?)"),
        (str(broken), "found a broken link"),
        (str(tmp_path / "absent"), "found nothing there"),
        (str(folder), "(it lacks train-images-idx3-ubyte (train-images-idx3-ubyte is a folder), "),
    ):
        assert main(["lab", "mnist", "--data", data, "--no-progress", "--out", str(tmp_path / "o")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"xentkit: error: --data {data}: expected ") and said in error, error


def test_an_npz_whose_arrays_inflate_beyond_the_limit_is_refused_from_their_headers(tmp_path: Path) -> None:
    """A 300 KB compressed archive of zeros declaring 313 million pixels (1.2 GiB as float32)."""
    from xentkit.lab.formats import MAX_VALUES

    archive = tmp_path / "bomb.npz"
    np.savez_compressed(archive, x_train=np.zeros((400000, 784), np.uint8), y_train=np.zeros(400000, np.int64),
                        x_test=np.zeros((10, 784), np.uint8), y_test=np.zeros(10, np.int64))  # fmt: skip
    assert archive.stat().st_size < 1 << 20 and MAX_VALUES < 400000 * 784
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DatasetError, match=rf"{archive}: x_train has shape \(400000, 784\): expected at most"):
        read_npz(archive)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024


def test_an_idx_file_of_too_many_values_for_its_float32_copy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.gz"  # 0.9 GB of uint8 (under the byte limit), 3.8 GB as float32 pixels
    path.write_bytes(gzip.compress(_header((400000, 28, 28 * 3))))
    with pytest.raises(DatasetError, match="values"):
        read_idx(path)


def test_an_images_and_a_labels_file_swapped_say_wrong_magic(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.write_bytes(_header((3, 28, 28)) + bytes(3 * 784))
    labels = tmp_path / "labels"
    labels.write_bytes(_header((3,)) + bytes(3))
    with pytest.raises(DatasetError, match=rf"{labels}: wrong magic number 0x00000801: expected 0x00000803 for images"):
        read_idx_pair(labels, images)
    with pytest.raises(DatasetError, match=rf"{images}: wrong magic number 0x00000803: expected 0x00000801 for labels"):
        read_idx_pair(images, images)
    assert read_idx_pair(images, labels)[0].shape == (3, 784)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["lab", "--out", ""], "argument --out: expected a path, received an empty string"),
        (["lab", "--json", " "], "argument --json: expected a path, received an empty string"),
        (["lab", "mnist", "--lr", "1e39"], "argument --lr: expected a positive number between 1.17549e-38 and 3.40282e+38"),
    ],
)
def test_empty_paths_and_learning_rates_beyond_float32_are_usage_errors(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(arguments) == 2
    assert message in capsys.readouterr().err


def test_a_diverged_runs_nan_is_written_as_json_null(tmp_path: Path) -> None:
    import json

    from xentkit.lab.runner import write_json

    path = write_json({"train_loss": [0.5, float("nan"), float("inf")], "x": {"y": -float("inf")}}, tmp_path / "r.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"train_loss": [0.5, None, None], "x": {"y": None}}


def test_a_cache_that_cannot_be_a_folder_is_a_local_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "afile"
    taken.write_text("")
    assert main(["data", "download", "mnist", "--cache", str(taken), "--mirror", "http://127.0.0.1:9/"]) == 2
    error = capsys.readouterr().err
    assert f"{taken}/mnist: cannot make the cache folder (Not a directory)" in error
    assert "Without network access" not in error


def test_npz_members_without_the_npy_suffix_and_version_3_headers_are_sized_too(tmp_path: Path) -> None:
    import io
    import zipfile

    from xentkit.lab.formats import MAX_VALUES

    def member(array: np.ndarray, version: tuple[int, int]) -> bytes:
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, version=version)
        return buffer.getvalue()

    arrays = {"x_train": np.zeros((3, 784), np.uint8), "y_train": np.zeros(3, np.int64),
              "x_test": np.zeros((2, 784), np.uint8), "y_test": np.zeros(2, np.int64)}  # fmt: skip
    plain = tmp_path / "plain.npz"  # members named without ".npy", which np.load accepts
    with zipfile.ZipFile(plain, "w") as archive:
        for key, array in arrays.items():
            archive.writestr(key, member(array, (1, 0)))
    assert read_npz(plain)["x_train"].shape == (3, 784)
    bomb = tmp_path / "v3.npz"  # a 3.0 header declaring more values than allowed (the data is
    # never read: the header alone decides)
    text = repr({"descr": "|u1", "fortran_order": False, "shape": (MAX_VALUES + 16,)}).encode()
    text += b" " * ((64 - (12 + len(text) + 1) % 64) % 64) + b"\n"
    header = b"\x93NUMPY\x03\x00" + len(text).to_bytes(4, "little") + text
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x_train.npy", header + bytes(1024))
        for key in ("y_train", "x_test", "y_test"):
            archive.writestr(f"{key}.npy", member(arrays[key], (1, 0)))
    with pytest.raises(DatasetError, match=r"x_train has shape .*: expected at most"):
        read_npz(bomb)
