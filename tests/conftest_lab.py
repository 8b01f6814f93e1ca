"""Helpers shared by the lab's tests (imported by them; not ``conftest.py``, the lead's file)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

#: The real MNIST test set beside the repository (../shared); absent on users' machines.
SHARED_T10K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist-t10k"
T10K_IMAGES = SHARED_T10K / "t10k-images-idx3-ubyte.gz"
T10K_LABELS = SHARED_T10K / "t10k-labels-idx1-ubyte.gz"

needs_shared_t10k = pytest.mark.skipif(
    not (T10K_IMAGES.is_file() and T10K_LABELS.is_file()),
    # named relative to the repository: a machine's own paths stay out of test reports
    reason="the real MNIST t10k files are not at ../shared/datasets/mnist-t10k (beside the repository)",
)

STANDARD_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray, *, magic: bytes | None = None) -> bytes:
    """The IDX encoding of a uint8 array (or any header given as ``magic``)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    sizes = b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    return header + sizes + array.tobytes()


def write_idx(path: Path, array: np.ndarray, *, compress: bool | None = None, **kwargs) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed when the name ends in ``.gz``."""
    content = idx_bytes(array, **kwargs)
    compress = path.suffix == ".gz" if compress is None else compress
    path.write_bytes(gzip.compress(content, mtime=0) if compress else content)
    return path


def fake_mnist(
    folder: Path, *, n_train: int = 30, n_test: int = 20, compress: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write the four standard IDX files of a tiny random MNIST look-alike; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for key, stem in STANDARD_NAMES.items():
        write_idx(folder / f"{stem}{suffix}", arrays[key])
    return arrays


def md5_of(path: Path) -> str:
    """``md5:<hex>`` of a file, the way pooch names hashes."""
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving a fresh folder: yields ``(base_url, folder)``.

    A generator for a test module's fixture: ``yield from serve_folder(tmp_path, monkeypatch)``.
    """
    for variable in ("NO_PROXY", "no_proxy"):  # never send 127.0.0.1 through a proxy
        monkeypatch.setenv(variable, "127.0.0.1,localhost")
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
