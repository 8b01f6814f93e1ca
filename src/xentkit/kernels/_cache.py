"""Where Numba caches the compiled kernels (``cache=True``), made sure to exist before the first
kernel module is imported.

Numba writes its cache beside the sources (``__pycache__``, per install) or, where that folder
is read-only (a system, shared or container install), in the user's cache folder
(``~/.cache/numba``, per user). Where neither is writable (a non-root container user without a
home, say) Numba refuses to compile a ``cache=True`` function at all ("no locator available").
Then, unless ``NUMBA_CACHE_DIR`` says where, the cache goes to a folder of the user's own in the
system's temporary folder (made with mode 0700, and used only if this user owns it and nobody else
can write it): the kernels compile once and are loaded from there afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_location", "ensure_cache_dir"]

_HERE = Path(__file__).resolve().parent


def _writable(folder: Path) -> bool:
    """Whether Numba could cache into ``folder``: made if need be, and writable (Numba's own test
    writes a file there; the permission bits say the same, without importing ``tempfile``)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _user_cache() -> Path:
    """Numba's user-wide cache folder (its ``UserWideCacheLocator``'s)."""
    from numba.misc.appdirs import AppDirs

    return Path(AppDirs(appname="numba", appauthor=False).user_cache_dir)


def fallback_dir() -> Path:
    """The cache folder used when Numba has none: per user, in the temporary folder."""
    import tempfile

    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"xentkit-numba-{user}"


def ensure_cache_dir() -> str | None:
    """Point Numba at :func:`fallback_dir` when it has nowhere to cache; returns the folder chosen
    so, or None (Numba's own choice). One look at ``NUMBA_CACHE_DIR`` or at the sources'
    ``__pycache__`` in the common case (no Numba import). A ``NUMBA_CACHE_DIR`` that cannot be
    written is passed over as Numba passes it over (for the sources' ``__pycache__``, then the
    user's cache folder), and where neither can be written either, for the fallback, with a
    RuntimeWarning naming it (every kernel had failed: "no locator available")."""
    chosen = os.environ.get("NUMBA_CACHE_DIR")
    if (chosen and _writable(Path(chosen))) or _writable(_HERE / "__pycache__"):
        return None
    import numba

    configured = numba.config.CACHE_DIR  # (the variable's, or one the user's code set)
    if (configured and configured != chosen and _writable(Path(configured))) or _writable(_user_cache()):
        return None
    folder = _private(fallback_dir())
    if folder is None:
        return None  # (nothing better to offer: Numba's own error says what it needs)
    if chosen or configured:  # (a folder the user chose, passed over: said)
        import warnings

        named = f"NUMBA_CACHE_DIR={chosen}" if chosen else f"numba.config.CACHE_DIR={configured}"
        warnings.warn(
            f"{named} cannot be written: xentkit's kernels are cached in {folder} instead",
            RuntimeWarning, stacklevel=2,
        )
    numba.config.CACHE_DIR = str(folder)
    return str(folder)


def cache_location() -> tuple[Path, bool]:
    """Where Numba caches the kernels (after :func:`ensure_cache_dir`), as its locators choose:
    ``NUMBA_CACHE_DIR`` (or the fallback) if set and writable, else the sources' ``__pycache__``,
    else the user's cache folder; and whether the folder outlives this process (a fresh folder
    of the process's own, :func:`_private`, is removed at exit)."""
    import numba

    configured = numba.config.CACHE_DIR
    if configured and _writable(Path(configured)):
        folder = Path(configured)
    elif _writable(_HERE / "__pycache__"):
        folder = _HERE / "__pycache__"
    else:
        folder = _user_cache()
    return folder, folder not in _TEMPORARY


def _private(folder: Path) -> Path | None:
    """``folder`` made for this user alone (mode 0700), or checked to be: a real folder (no link),
    owned by this user, that nobody else can write. Numba unpickles its cache index, so a folder
    someone else planted in the shared temporary folder would run their code; such a folder is
    passed over for a fresh one of this process's own (compiled again in each process, and
    removed when the process exits). None when no folder can be made."""
    import atexit
    import shutil
    import stat
    import tempfile

    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        status = folder.lstat()
    except OSError:
        return None
    owned = not hasattr(os, "getuid") or status.st_uid == os.getuid()
    if stat.S_ISDIR(status.st_mode) and owned and not status.st_mode & 0o022 and os.access(folder, os.W_OK | os.X_OK):
        return folder
    try:
        fresh = Path(tempfile.mkdtemp(prefix=f"{folder.name}-"))
    except OSError:
        return None
    atexit.register(shutil.rmtree, fresh, ignore_errors=True)  # (its cache serves this process only)
    _TEMPORARY.add(fresh)
    return fresh


# the folders :func:`_private` made for this process alone (removed at exit)
_TEMPORARY: set[Path] = set()
