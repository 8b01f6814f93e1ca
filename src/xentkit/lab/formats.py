"""The data file formats: IDX (MNIST / Fashion-MNIST, gzip or not) and ``.npz``, checked.

Readers return plain arrays: images ``[N, 784]`` float32 in [0, 1], labels ``[N]`` int64 in
[0, 10). Anything malformed raises :class:`DatasetError` naming the file, what was expected and
what was received, never an error from deep inside NumPy or gzip.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "IDX_FILES",
    "NPZ_KEYS",
    "DatasetError",
    "as_labels",
    "as_pixels",
    "find_idx_file",
    "has_idx_files",
    "read_idx",
    "read_idx_pair",
    "read_npz",
]

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
IMAGE_PIXELS = 28 * 28

#: The standard file stems of MNIST and Fashion-MNIST (each may also end in ``.gz``).
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: The arrays an ``.npz`` must hold.
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

# IDX type codes (third byte of the magic number) and the NumPy dtype each stores, big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetError(ValueError):
    """A data file is missing or malformed; the message names the file, expected and received."""


# The most data one IDX file may declare: far above MNIST's largest file (47 MB of images), far
# below what a gzip bomb would make us allocate.
MAX_IDX_BYTES = 1 << 30

# The most values one array may hold (IDX or .npz): its float32 pixels are 4 bytes each, so
# 2^28 values are 1 GiB once converted (MNIST's training images: 47 million).
MAX_VALUES = 1 << 28

# What the magic number of an images and of a labels file says (type 0x08, 3 or 1 dimensions).
_KIND_MAGIC = {"images": bytes([0, 0, 0x08, 3]), "labels": bytes([0, 0, 0x08, 1])}


@contextlib.contextmanager
def _stream(path: Path) -> Iterator[BinaryIO]:
    """The file's bytes as a stream, gunzipped on the fly when it starts with the gzip magic."""
    try:
        raw = path.open("rb")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror or error})") from None
    with raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        if not compressed:
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            yield unzipped


def _read(stream: BinaryIO, size: int, path: Path) -> bytes:
    """Up to ``size`` bytes (fewer at the end); gzip damage is a DatasetError naming the file."""
    try:
        return stream.read(size)
    except EOFError:
        raise DatasetError(
            f"{path}: truncated gzip file (the compressed stream ends early)"
        ) from None
    except (OSError, zlib.error) as error:
        raise DatasetError(f"{path}: corrupt gzip file ({error})") from None


def read_idx(path: str | os.PathLike[str], kind: str | None = None) -> np.ndarray:
    """Read one IDX file (the format of MNIST and Fashion-MNIST), gzip-compressed or not.

    The header is a magic number ``00 00 TT DD`` (``TT`` the element type, ``0x08`` for unsigned
    bytes; ``DD`` the number of dimensions), then ``DD`` big-endian uint32 sizes, then the data.
    The file is read as a stream, never more than the header declares (and at most
    ``MAX_IDX_BYTES`` and ``MAX_VALUES``): a small gzip that inflates to gigabytes is refused,
    not unpacked. ``kind`` ("images" or "labels") requires that file's magic number first.

    Returns:
        The array with the shape the header declares, in native byte order.

    Raises:
        DatasetError: unreadable file, wrong magic number, unknown type, a declared size over
            ``MAX_IDX_BYTES``, or a data section whose length differs from the declared one.
    """
    path = Path(path)
    with _stream(path) as stream:
        magic = _read(stream, 4, path)
        if len(magic) < 4:
            raise DatasetError(
                f"{path}: expected an IDX header of at least 4 bytes, received {len(magic)} bytes"
            )
        if kind is not None and magic != _KIND_MAGIC[kind]:
            raise DatasetError(
                f"{path}: wrong magic number 0x{magic.hex()}: expected 0x{_KIND_MAGIC[kind].hex()} "
                f"for {kind} (uint8, {_KIND_MAGIC[kind][3]} dimension"
                f"{'s' if _KIND_MAGIC[kind][3] > 1 else ''})"
            )
        zero, type_code, ndim = int.from_bytes(magic[:2], "big"), magic[2], magic[3]
        if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
            raise DatasetError(
                f"{path}: wrong magic number 0x{magic.hex()}: expected an IDX file "
                f"(0x00000801 for labels, 0x00000803 for images)"
            )
        header_size = 4 + 4 * ndim
        sizes = _read(stream, 4 * ndim, path)
        if len(sizes) < 4 * ndim:
            raise DatasetError(
                f"{path}: truncated header: expected {header_size} bytes for {ndim} dimensions, "
                f"received {4 + len(sizes)}"
            )
        shape = tuple(int.from_bytes(sizes[4 * i : 4 * i + 4], "big") for i in range(ndim))
        dtype = _IDX_DTYPES[type_code]
        data_size = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if data_size > MAX_IDX_BYTES or math.prod(shape) > MAX_VALUES:
            raise DatasetError(
                f"{path}: header declares shape {shape}, {math.prod(shape)} values in {data_size} bytes: "
                f"expected at most {MAX_VALUES} values and {MAX_IDX_BYTES} bytes (an IDX file of images or labels)"
            )
        expected = header_size + data_size
        data = _read(stream, data_size, path)
        if len(data) < data_size:
            raise DatasetError(
                f"{path}: truncated file: header declares shape {shape}, expected {expected} "
                f"bytes, received {header_size + len(data)}"
            )
        if _read(stream, 1, path):
            raise DatasetError(
                f"{path}: trailing bytes: header declares shape {shape}, expected {expected} "
                f"bytes, received more"
            )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx_pair(
    images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Read an images file and its labels file; check that they agree.

    Returns:
        ``(images, labels)``: images ``[N, 784]`` float32 in [0, 1], labels ``[N]`` int64.

    Raises:
        DatasetError: as :func:`read_idx` (with each file's magic number), or the two counts
            differ, or a label outside [0, 10).
    """
    images = read_idx(images_path, "images")  # uint8 [N, rows, cols] (its magic number says so)
    labels = read_idx(labels_path, "labels")  # uint8 [N]
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels: expected the same count"
        )
    if images.shape[0] == 0:
        raise DatasetError(f"{images_path}: holds no images (N = 0): expected at least one sample")
    return as_pixels(images, images_path), as_labels(labels, labels_path)


def find_idx_file(folder: str | os.PathLike[str], stem: str) -> Path | None:
    """The file for ``stem`` in ``folder``: ``stem``, ``stem.gz``, or the ``idx3.ubyte`` spelling."""
    folder = Path(folder)
    spellings = (stem, stem.replace("-idx", ".idx"))
    for spelling in spellings:
        for suffix in (".gz", ""):
            candidate = folder / f"{spelling}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def has_idx_files(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds all four standard IDX files."""
    return not missing_idx_files(folder)


def missing_idx_files(folder: str | os.PathLike[str]) -> list[str]:
    """The standard IDX files (their stems) that ``folder`` lacks as readable files, each with
    what stands there instead when something does (a folder, a broken link)."""
    missing = []
    for stem in IDX_FILES.values():
        if find_idx_file(folder, stem) is not None:
            continue
        there = [entry for entry in (Path(folder) / stem, Path(folder) / f"{stem}.gz") if os.path.lexists(entry)]
        what = "a folder" if there and there[0].is_dir() else "not a readable file" if there else None
        missing.append(f"{stem} ({there[0].name} is {what})" if there else stem)
    return missing


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read an ``.npz`` with keys ``x_train``, ``y_train``, ``x_test``, ``y_test``; check them.

    Images may be ``[N, 28, 28]`` or ``[N, 784]``, uint8 (0–255) or floats already in [0, 1].

    Returns:
        The four arrays by key: images as :func:`as_pixels`, labels as :func:`as_labels`.
    """
    path = Path(path)
    with contextlib.suppress(OSError), path.open("rb") as handle:  # unreadable: np.load says why
        start = handle.read(4)
        if start[:2] != b"PK":  # every .npz is a zip archive
            raise DatasetError(
                f"{path}: expected an .npz archive (a zip of arrays x_train, y_train, x_test, "
                f"y_test) or a folder of IDX files, received a file starting with {start!r}"
            )
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in NPZ_KEYS if key not in archive.files]
            if missing:
                raise DatasetError(
                    f"{path}: expected keys {list(NPZ_KEYS)}, received {sorted(archive.files)} "
                    f"(missing {missing})"
                )
            for key in NPZ_KEYS:  # sizes from the arrays' headers, before anything is unpacked
                _check_npz_member(archive, key, path)
            arrays = {key: archive[key] for key in NPZ_KEYS}
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except DatasetError:
        raise
    except Exception as error:  # zipfile/pickle/format errors from np.load: say which file
        raise DatasetError(
            f"{path}: expected an .npz archive of arrays, could not read it ({error})"
        ) from None
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.shape[:1] != labels.shape[:1] or labels.ndim != 1:
            raise DatasetError(
                f"{path}: x_{split} has shape {images.shape} and y_{split} shape {labels.shape}: "
                f"expected [N, 28, 28] or [N, 784] images and [N] labels with the same N"
            )
        if labels.shape[0] == 0:
            raise DatasetError(f"{path}: x_{split} holds no images (N = 0): expected at least one sample")
    return {
        key: (as_pixels if key.startswith("x") else as_labels)(arrays[key], f"{path}[{key}]")
        for key in NPZ_KEYS
    }


def _check_npz_member(archive: Any, key: str, path: Path) -> None:
    """Refuse an array of the archive holding more than ``MAX_VALUES`` values, from its ``.npy``
    header alone (a compressed archive of zeros inflates to anything)."""
    name = f"{key}.npy" if f"{key}.npy" in archive.zip.namelist() else key  # (np.load takes both)
    with archive.zip.open(name) as member:
        version = np.lib.format.read_magic(member)
        # (3.0 is 2.0 with a UTF-8 header: the same layout for the shape)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(member)
    if math.prod(shape) > MAX_VALUES:
        raise DatasetError(f"{path}: {key} has shape {shape}: expected at most {MAX_VALUES} values")


def as_pixels(images: np.ndarray, source: object) -> np.ndarray:
    """``[N, 784]`` float32 in [0, 1] from uint8 0–255 or floats already in [0, 1]."""
    if images.ndim == 3 and images.shape[1:] == IMAGE_SHAPE:  # (not any rows × columns of 784)
        images = images.reshape(images.shape[0], -1)
    if images.ndim != 2 or images.shape[1] != IMAGE_PIXELS:
        raise DatasetError(
            f"{source}: expected 28×28 images ([N, 28, 28] or [N, 784]), received shape "
            f"{images.shape}"
        )
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(images.dtype, np.floating):
        if images.size and not (
            np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
        ):
            raise DatasetError(
                f"{source}: expected float pixels in [0, 1] (or uint8 0–255), received values "
                f"from {images.min()} to {images.max()}"
            )
        return images.astype(np.float32)
    raise DatasetError(f"{source}: expected uint8 or float pixels, received dtype {images.dtype}")


def as_labels(labels: np.ndarray, source: object) -> np.ndarray:
    """``[N]`` int64 labels, each in [0, 10)."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{source}: expected integer labels, received dtype {labels.dtype}")
    # checked in their own dtype: a uint64 beyond int64 would be quoted as the negative it wraps to
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = int(np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))[0])
        raise DatasetError(
            f"{source}: expected labels in [0, {NUM_CLASSES}), received {labels.reshape(-1)[bad]} at "
            f"position {bad}"
        )
    return labels.astype(np.int64)
