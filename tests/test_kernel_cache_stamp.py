"""The kernel cache and the sources it was compiled from (a review of installs, 2026-12-07).

Numba keeps a cached function while the one file that defines it is unchanged; the kernels
inline helpers from other files (``_exp``, ``_jit``), so an upgrade that changed only a helper ran
the old machine code. ``_cache.stamp_kernel_sources`` adds the digest of every kernel source to
Numba's stamp. Also: a shared ``NUMBA_CACHE_DIR`` whose ``kernels_*`` folder another user made
first, and a relative user cache folder."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import xentkit
from xentkit.kernels import _cache

_PROBE = (
    "import numpy as np\n"
    "from xentkit.kernels import labels\n"
    "assert labels.first_bad_label(np.array([0, 7, 2]), 5, -100) == 1\n"
    "stats = labels._first_bad_label.stats\n"
    "print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))\n"
)


def _run_probe(site: Path, cache: Path) -> tuple[int, int]:
    environment = {**os.environ, "PYTHONPATH": str(site), "NUMBA_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", _PROBE], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    hits, misses = (int(word) for word in done.stdout.split())
    return hits, misses


def test_a_changed_helper_source_compiles_the_kernels_again(tmp_path: Path) -> None:
    package = Path(xentkit.__file__).parent
    copy = tmp_path / "site" / "xentkit"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / "cache"
    assert _run_probe(tmp_path / "site", cache) == (0, 1)  # compiled
    assert _run_probe(tmp_path / "site", cache) == (1, 0)  # loaded from the cache
    # a helper's file changes, the kernel's own (labels.py) does not
    helper = copy / "kernels" / "_exp.py"
    helper.write_text(helper.read_text() + "\n# changed by an upgrade\n")
    assert _run_probe(tmp_path / "site", cache) == (0, 1)  # compiled again, not the stale code
    assert _run_probe(tmp_path / "site", cache) == (1, 0)


def test_the_digest_covers_every_module_a_kernel_reads() -> None:
    """Every xentkit module the kernel modules import from outside ``kernels/`` at module level is
    in ``KERNEL_SOURCES`` (a constant read by a kernel is baked into its machine code), but for the
    host-side threading setup (``_tbb``), which no kernel reads."""
    kernels = Path(_cache.__file__).parent
    outside = set()
    for path in kernels.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # (module level: what a kernel can read as a global)
            if isinstance(node, ast.ImportFrom) and node.module:
                package = ["xentkit", "kernels"][: 2 - (node.level - 1)] if node.level else []
                name = ".".join([*package, node.module])
                if name.startswith("xentkit.") and not name.startswith("xentkit.kernels"):
                    outside.add(name)
    covered = {
        "xentkit." + ".".join(path.relative_to(kernels.parent).with_suffix("").parts)
        for path in _cache.KERNEL_SOURCES if path.parent != kernels
    }
    assert outside - {"xentkit._tbb"} <= covered, outside
    assert set(kernels.glob("*.py")) <= set(_cache.KERNEL_SOURCES)
    assert len(_cache.sources_digest()) == 32


def test_the_stamped_locators_take_xentkits_kernels_only() -> None:
    from numba import njit
    from numba.core import caching

    from xentkit.kernels import labels

    assert _cache.stamp_kernel_sources()  # (installed when the kernels were imported)
    names = [cls.__name__ for cls in caching.CacheImpl._locator_classes]
    assert names[:3] == ["XentkitUserProvidedCacheLocator", "XentkitInTreeCacheLocator", "XentkitUserWideCacheLocator"]
    assert names.count("XentkitInTreeCacheLocator") == 1  # (installed once)
    labels.first_bad_label(labels.np.array([0]), 1, -100)
    locator = labels._first_bad_label._cache._impl.locator
    assert type(locator).__name__.startswith("Xentkit") and locator.get_source_stamp()[1] == _cache.sources_digest()
    # every cached function of every kernel module, those of _exp (imported before _jit's own
    # importers define theirs) too
    import importlib

    from numba.core.registry import CPUDispatcher

    cached = []
    for path in sorted(Path(_cache.__file__).parent.glob("*.py")):
        module = importlib.import_module(f"xentkit.kernels.{path.stem}")
        cached += [value for value in vars(module).values() if isinstance(value, CPUDispatcher) and value._cache.__class__.__name__ == "FunctionCache"]
    assert len(cached) > 40
    assert all(type(function._cache._impl.locator).__name__.startswith("Xentkit") for function in cached), [
        function.__name__ for function in cached if not type(function._cache._impl.locator).__name__.startswith("Xentkit")
    ]
    another = caching.CompileResultCacheImpl(njit(lambda x: x).py_func)  # a function of another file: Numba's own
    assert not type(another.locator).__name__.startswith("Xentkit")


def test_a_shared_cache_folder_with_another_users_kernels_is_passed_over(tmp_path: Path, monkeypatch) -> None:
    """NUMBA_CACHE_DIR shared (mode 1777), xentkit's ``kernels_<hash>`` folder in it made by
    another user first: Numba cannot write there ("no locator available" for every kernel where
    the install and home are read-only too); it is passed over for the fallback, with the
    warning."""
    import numba

    shared = tmp_path / "shared"
    theirs = shared / _cache.kernels_subfolder()
    theirs.mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != theirs and real_access(path, mode))  # (root may write anywhere)
    writable = _cache._writable
    monkeypatch.setattr(_cache, "_writable", lambda folder: folder != Path(_cache.__file__).parent / "__pycache__" and writable(folder))
    monkeypatch.setattr(_cache, "_user_cache", lambda: tmp_path / "no-home")
    monkeypatch.setattr(_cache, "fallback_dir", lambda: tmp_path / "fallback")
    (tmp_path / "no-home").write_text("")  # a file: no folder there
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(shared))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(shared))
    assert not _cache._usable(shared) and _cache._usable(tmp_path / "fine")
    with pytest.warns(RuntimeWarning, match=f"NUMBA_CACHE_DIR={shared} cannot be written"):
        assert _cache.ensure_cache_dir() == str(tmp_path / "fallback")
    assert str(tmp_path / "fallback") == numba.config.CACHE_DIR
    # a relative NUMBA_CACHE_DIR is the user's choice as Numba takes it (the folder it names in
    # the working folder), not passed over
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NUMBA_CACHE_DIR", "relative-cache")
    monkeypatch.setattr(numba.config, "CACHE_DIR", "relative-cache")
    assert _cache.ensure_cache_dir() is None and _cache.cache_location()[0] == Path("relative-cache")


def test_warm_says_no_folder_could_be_used_not_that_a_file_is_damaged() -> None:
    """Numba raises "no locator available" inside its caching code: it was called a damaged
    cache file, with advice to delete files."""
    from numba.core.caching import CompileResultCacheImpl

    from xentkit.cli import _kernel_failure

    namespace: dict = {}
    exec("def f():\n    pass\n", namespace)  # a function with no source file: no locator for it
    with pytest.raises(RuntimeError, match="no locator available") as raised:
        CompileResultCacheImpl(namespace["f"])
    raised = raised.value
    failure = _kernel_failure(raised)
    assert failure is not None and failure.startswith("cannot cache function") and "damaged" not in failure


def test_a_relative_user_cache_folder_is_not_made_in_the_working_folder(tmp_path: Path, monkeypatch) -> None:
    """Without HOME and a passwd entry Numba's user cache folder is the relative ``~/.cache/numba``:
    the check made a folder "~" in the working folder and cached the kernels there (a review)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NUMBA_CACHE_DIR", "")  # (recorded, so that the teardown restores it)
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setattr(_cache, "_writable", lambda folder: folder != Path(_cache.__file__).parent / "__pycache__" and folder.mkdir(parents=True, exist_ok=True) is None)
    monkeypatch.setattr(_cache, "_user_cache", lambda: Path("~/.cache/numba"))
    monkeypatch.setattr(_cache, "fallback_dir", lambda: tmp_path / "fallback")
    import numba

    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    assert _cache.ensure_cache_dir() == str(tmp_path / "fallback")
    assert not (tmp_path / "~").exists()


def test_the_shared_folder_check_looks_at_the_subfolder_numba_uses_behind_a_symlinked_install(tmp_path: Path) -> None:
    """Numba names the kernels' subfolder after their folder as imported, not resolved: behind a
    symlinked install the check looked at another ``kernels_<hash>`` (a review)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "xentkit").symlink_to(Path(xentkit.__file__).resolve().parent, target_is_directory=True)
    probe = (
        "import inspect\n"
        "from numba.core.caching import _CacheLocator\n"
        "from xentkit.kernels import _cache, labels\n"
        "assert '/site/xentkit/' in labels.__file__, labels.__file__\n"
        "numbas = _CacheLocator.get_suitable_cache_subpath(inspect.getfile(labels._first_bad_label.py_func))\n"
        "print(numbas == _cache.kernels_subfolder(), numbas)\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "True", done.stdout
