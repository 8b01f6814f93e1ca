"""Download MNIST / Fashion-MNIST into the cache, verifying each file's checksum (pooch).

The mirror is configurable (``--mirror URL`` or ``$XENTKIT_MNIST_MIRROR`` /
``$XENTKIT_FASHION_MNIST_MIRROR``) so that tests can serve files from 127.0.0.1. A file whose
checksum does not match is not kept in the cache: pooch downloads to a temporary file and only
moves it into place once its hash is verified. A downloaded file gets the permissions of any
new file (``0o666`` less the umask), not the private ones of pooch's temporary file, so that a
shared cache can be read by everyone it is shared with.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xentkit._extras import require
from xentkit.lab.datasets import DATASET_NAMES, EMBEDDED_DEFAULT, DatasetError, default_cache_dir
from xentkit.lab.folders import missing_folders, remove_empty_folders

__all__ = ["DEFAULT_MIRRORS", "KNOWN_HASHES", "download_dataset", "mirror_env_var"]

#: md5 of the four standard files, as published (and as torchvision checks them).
KNOWN_HASHES: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
    },
}

DEFAULT_MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}

DOWNLOADABLE = tuple(name for name in DATASET_NAMES if name != EMBEDDED_DEFAULT)


def mirror_env_var(name: str) -> str:
    """The environment variable that overrides ``name``'s mirror, e.g. ``XENTKIT_MNIST_MIRROR``."""
    return f"XENTKIT_{name.upper().replace('-', '_')}_MIRROR"


def download_dataset(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    mirror: str | None = None,
    hashes: Mapping[str, str] | None = None,
) -> Path:
    """Fetch the four standard files of ``name`` into ``cache_dir/name`` and verify them.

    Files already in the cache with the right hash are not downloaded again; a cached file with
    a wrong hash is downloaded again.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        cache_dir: the cache root (default :func:`xentkit.lab.datasets.default_cache_dir`).
        mirror: base URL the file names are appended to (default: ``$XENTKIT_<NAME>_MIRROR``,
            else :data:`DEFAULT_MIRRORS`).
        hashes: file name → ``"md5:..."`` / ``"sha256:..."`` (default :data:`KNOWN_HASHES`).

    Returns:
        The folder holding the verified files (what ``--dataset NAME`` then loads).

    Raises:
        DatasetError: unknown name, a file that cannot be fetched, or a checksum mismatch (the
            message names the file, the expected and the received hash).
    """
    if name not in DOWNLOADABLE:
        raise DatasetError(
            f"dataset: expected one of {list(DOWNLOADABLE)} to download, received {name!r}"
        )
    pooch = require("pooch", "lab", "xentkit data download")
    requests = require("requests", "lab", "xentkit data download")

    pooch.get_logger().setLevel("WARNING")
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / name
    # an empty --mirror is a mistake to say, not the default (an empty variable is unset, as usual)
    base = mirror if mirror is not None else os.environ.get(mirror_env_var(name)) or DEFAULT_MIRRORS[name]
    scheme = base.split("://", 1)[0].lower() if "://" in base else ""
    source = "--mirror" if mirror is not None else f"${mirror_env_var(name)}"
    try:
        parts = urllib.parse.urlsplit(base)
        port = parts.port
    except ValueError as error:  # (an unclosed IPv6 bracket, a port that is no number, say)
        raise DatasetError(f"{source}: {base!r} is not a URL ({error})") from None
    # (said here, not as a download that failed: the network is not the problem)
    blank = next((c for c in parts.netloc if c.isspace() or not c.isprintable()), None)  # (in the host)
    if scheme in _SCHEMES and (not parts.hostname or blank is not None):
        why = "no host after the scheme" if not parts.hostname else f"its host holds {blank!r}"
        raise DatasetError(f"{source}: {base!r} is not a URL ({why})")
    if scheme not in _SCHEMES:
        raise DatasetError(
            f"{source}: expected a URL starting with one of {', '.join(s + '://' for s in _SCHEMES)}, "
            f"received {base!r}. {_offline_hint(name)}"
        )
    if scheme == "ftp" and port is not None:  # pooch would take "host:port" for the host's name
        raise DatasetError(
            f"{source}: an ftp:// URL with a port ({port}) is not supported by the download "
            f"library (it takes host:port for a host name), received {base!r}; leave the port out "
            "(FTP's port 21 is the default) or use an http(s):// mirror"
        )
    base = base if base.endswith("/") else base + "/"
    new_folders = missing_folders(folder)
    try:  # a local problem is said as one, before any download (not with the network's hint)
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatasetError(
            f"{folder}: cannot make the cache folder ({error.strerror or error}); choose another "
            "with --cache or $XENTKIT_CACHE"
        ) from None
    try:
        _fetch_all(pooch, requests, name, folder, base, hashes or KNOWN_HASHES[name])
    except BaseException:  # a failed download leaves no empty folder it made behind
        remove_empty_folders(new_folders)
        raise
    return folder


def _fetch_all(
    pooch: Any, requests: Any, name: str, folder: Path, base: str, hashes: Mapping[str, str]
) -> None:
    """Fetch and verify each file into ``folder`` (:func:`download_dataset`'s loop)."""
    for filename, known_hash in hashes.items():
        url = base + filename
        path = folder / filename
        before = _identity(path)
        if before is None:  # to download: a folder it cannot be written into is a local problem
            _check_writable(folder)
        try:
            pooch.retrieve(
                url, known_hash=known_hash, fname=filename, path=folder, progressbar=False
            )
        except ValueError as error:
            if "hash" not in str(error).lower():
                raise
            raise DatasetError(
                f"{url}: checksum mismatch for {filename}: expected {known_hash}, received "
                f"{_received_hash(error)}; the download was discarded (not kept in {folder})"
            ) from None
        except (requests.RequestException, OSError) as error:
            if not isinstance(error, requests.RequestException):  # (a cached file to replace, say)
                _check_writable(folder)
            raise DatasetError(
                f"{url}: download of {filename} failed ({error}). {_offline_hint(name)}"
            ) from None
        if _identity(path) != before:  # downloaded now, into pooch's private temporary file
            with contextlib.suppress(OSError):  # (a file system without modes keeps its own)
                os.chmod(path, 0o666 & ~_umask())


def _identity(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of the file at ``path``, or None when there is none: a file that
    pooch downloads is a new one, moved into place."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _check_writable(folder: Path) -> None:
    """A DatasetError, said as the local problem it is (not as a failed download with the
    network's hint), when no file can be written into ``folder``."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DatasetError(
            f"{folder}: cannot write into the cache folder (it is not writable); "
            "choose another with --cache or $XENTKIT_CACHE"
        )


def _umask() -> int:
    """The process's umask: read from Linux's /proc/self/status, which leaves it as it is; else
    set (to a strict one, for the moment it is changed) and restored at once."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


# the URL schemes pooch downloads from with the lab's extras (a local folder is --data DIR, not a
# mirror; pooch's sftp:// needs paramiko, which the extras do not install)
_SCHEMES = ("https", "http", "ftp")


def _offline_hint(name: str) -> str:
    """What to do without the network (or with a mirror that does not answer)."""
    hint = (
        f"Without network access, pass the four IDX files (or an .npz) with --data DIR, or point "
        f"--mirror URL (or ${mirror_env_var(name)}) at a server that has them"
    )
    if name == "fashion-mnist":
        hint += "; Debian's dataset-fashion-mnist package installs the files xentkit finds by itself"
    return hint + "."


def _received_hash(error: ValueError) -> str:
    """The hash pooch computed, from its message '... expected X but got Y. Deleted ...'."""
    message = " ".join(str(error).split())
    marker = " but got "
    if marker not in message:
        return f"a different hash ({message})"
    return message.split(marker, 1)[1].split(".", 1)[0].strip()
