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

__all__ = [
    "KERNEL_SOURCES", "cache_location", "ensure_cache_dir", "kernels_subfolder", "sources_digest",
    "stamp_kernel_sources",
]

_HERE = Path(__file__).resolve().parent
# the folder as imported (behind a symlinked install, not resolved): the one Numba's locators
# name their subfolder after, from the functions' code objects
_IMPORTED = Path(os.path.abspath(__file__)).parent

#: The sources whose code the cached kernels hold: this folder's modules (a kernel inlines the
#: helpers of ``_exp`` and ``_jit``, and Numba bakes in the globals it reads) and the one module
#: outside it that a kernel reads a constant from (``tests/test_kernel_cache_stamp.py`` checks
#: that the kernels import no other).
KERNEL_SOURCES = (*sorted(_HERE.glob("*.py")), _HERE.parent / "reference" / "log_probs.py")


def _writable(folder: Path) -> bool:
    """Whether Numba could cache into ``folder``: made if need be, and writable (Numba's own test
    writes a file there; the permission bits say the same, without importing ``tempfile``)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _usable(folder: Path) -> bool:
    """Whether Numba could cache xentkit's kernels in ``folder`` (``NUMBA_CACHE_DIR``'s or the
    user's cache folder): :func:`_writable`, and so is the subfolder Numba puts them in (named
    after this folder, ``kernels_<hash>``) where it is there already: a shared folder another
    user cached xentkit's kernels in first holds theirs, which this user cannot write into."""
    if not _writable(folder):
        return False
    name = kernels_subfolder()
    if name is None:  # (a Numba without its locator: the folder's own check alone)
        return True
    subfolder = folder / name
    return not subfolder.exists() or os.access(subfolder, os.W_OK | os.X_OK)


def kernels_subfolder() -> str | None:
    """The subfolder Numba caches xentkit's kernels in, inside ``NUMBA_CACHE_DIR``'s or the user's
    cache folder (``kernels_<hash>``, named after the kernels' folder as imported), or None for a
    Numba without that locator."""
    try:
        from numba.core.caching import _CacheLocator
    except ImportError:
        return None
    return _CacheLocator.get_suitable_cache_subpath(str(_IMPORTED / "_jit.py"))


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
    so, or None (Numba's own choice). One look at the sources' ``__pycache__`` in the common case
    (no Numba import; with ``NUMBA_CACHE_DIR`` set, Numba's locator names its subfolder). A ``NUMBA_CACHE_DIR`` that cannot be
    written is passed over as Numba passes it over (for the sources' ``__pycache__``, then the
    user's cache folder), and where neither can be written either, for the fallback, with a
    RuntimeWarning naming it (every kernel had failed: "no locator available")."""
    chosen = os.environ.get("NUMBA_CACHE_DIR")
    if (chosen and _usable(Path(chosen))) or _writable(_HERE / "__pycache__"):
        return None
    import numba

    configured = numba.config.CACHE_DIR  # (the variable's, or one the user's code set)
    # (a relative user cache folder is not used: with neither HOME nor a passwd entry Numba's is
    # ~/.cache/numba, a folder named "~" in whatever folder the process runs in)
    user_cache = _user_cache()
    if (configured and configured != chosen and _usable(Path(configured))) or (
        user_cache.is_absolute() and _usable(user_cache)
    ):
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
    if configured and _usable(Path(configured)):
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


def sources_digest(paths=KERNEL_SOURCES) -> bytes:
    """sha256 of the kernels' sources (:data:`KERNEL_SOURCES`), their names and contents."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    return digest.digest()


def stamp_kernel_sources() -> bool:
    """Tie the cached kernels to all their sources, not to their own module alone.

    Numba keeps a cached function while the one file that defines it is unchanged (its index
    holds that file's sha256): a kernel whose inlined helper (``_exp.fast_exp``, say) changed in
    an upgrade, its own module not, was loaded from the cache with the old helper's code. The
    locators here are Numba's own (``NUMBA_CACHE_DIR``'s, the sources' ``__pycache__``, the
    user's cache folder: the same folders and file names), for xentkit's kernels only, with the
    digest of :data:`KERNEL_SOURCES` added to the stamp: any change to those sources makes every
    kernel's index stale, and the kernels compile again once. Installed before the first cached
    function is defined (``_jit`` calls it, and ``_exp`` imports ``_jit`` first); returns whether
    it was (not where ``NUMBA_CACHE_LOCATOR_CLASSES`` names the locators, where this Numba lacks
    them, or where the sources cannot be read (a frozen application): then Numba's own stamp)."""
    import numba
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None)
    bases = [getattr(caching, name, None) for name in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")]
    if impl is None or None in bases or getattr(numba.config, "CACHE_LOCATOR_CLASSES", None):
        return False
    if any(getattr(cls, "_xentkit_stamp", False) for cls in impl._locator_classes):
        return True  # (installed already)
    try:
        digest = sources_digest()
    except OSError:  # (no sources to read: a frozen application's bytecode alone)
        return False

    def stamped(base: type) -> type:
        class Stamped(base):  # type: ignore[misc, valid-type]
            _xentkit_stamp = True

            @classmethod
            def from_function(cls, py_func, py_file):  # type: ignore[no-untyped-def]
                if Path(py_file).resolve().parent != _HERE:
                    return None  # (another library's function: Numba's locators as ever)
                return super().from_function(py_func, py_file)

            def get_source_stamp(self):  # type: ignore[no-untyped-def]
                return (super().get_source_stamp(), digest)

        Stamped.__name__ = Stamped.__qualname__ = f"Xentkit{base.__name__}"
        return Stamped

    impl._locator_classes = [*(stamped(base) for base in bases), *impl._locator_classes]
    return True
