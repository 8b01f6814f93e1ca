"""What a user meets at install: the version, the typing marker and license, and a missing
optional dependency named in one line with the extra that provides it."""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import xentkit
from xentkit._extras import MissingExtraError, require
from xentkit.cli import main


def test_version_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"xentkit {xentkit.__version__}"


def test_the_installed_version_is_the_packages() -> None:
    # written once, as xentkit.__version__; pyproject.toml reads it from there
    import importlib.metadata

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "xentkit.__version__"}
    assert importlib.metadata.version("xentkit") == xentkit.__version__


def test_the_package_is_typed() -> None:
    assert importlib.resources.files("xentkit").joinpath("py.typed").is_file()


def test_a_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.delitem(sys.modules, "rich.console", raising=False)
    with pytest.raises(MissingExtraError, match=r"^xentkit lab needs the package 'rich', .*pip install 'xentkit\[lab\]'$"):
        require("rich.console", "lab", "xentkit lab")


def test_the_lab_without_rich_says_so_and_exits_2(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.delitem(sys.modules, "rich.console", raising=False)
    out = tmp_path / "lab"
    assert main(["lab", "neuron", "--out", str(out), "--json", str(tmp_path / "j" / "x.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("xentkit: error: xentkit lab needs the package 'rich'") and "\n" not in error
    assert sorted(tmp_path.iterdir()) == []  # no folder made


def test_import_xentkit_torch_without_torch_names_the_extra() -> None:
    code = "import sys; sys.modules['torch'] = None; import xentkit.torch"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        "xentkit._extras.MissingExtraError: xentkit.torch needs the package 'torch', which is not "
        "installed: pip install 'xentkit[torch]'"
    ), done.stderr


def test_the_transformers_integration_without_torch_names_the_extra() -> None:
    code = "import sys; sys.modules['torch'] = None; from xentkit.integrations.transformers import patch"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "xentkit._extras.MissingExtraError: xentkit.integrations.transformers needs the package "
        "'torch', which is not installed: pip install 'xentkit[transformers]'"
    ), done.stderr


def test_log_probs_results_are_typed_by_their_flags() -> None:
    """Type checkers pick the result's type from the literal flags (a tuple only when asked)."""
    get_overloads = getattr(typing, "get_overloads", None)
    if get_overloads is None:
        pytest.skip("typing.get_overloads is Python 3.11+")
    torch = pytest.importorskip("torch")  # noqa: F841
    import xentkit.torch as xt
    from xentkit.integrations.transformers import token_log_probs
    from xentkit.torch.distributed import vocab_parallel_linear_log_probs

    for function, single in (
        (xentkit.log_probs, "np.ndarray"), (xt.log_probs, "Tensor"), (xt.linear_log_probs, "Tensor"),
        (vocab_parallel_linear_log_probs, "Tensor"),
    ):
        returns = {
            (o.__annotations__["return_entropy"], o.__annotations__["return_lse"]): o.__annotations__["return"]
            for o in get_overloads(function)
        }
        assert returns == {
            ("Literal[False]", "Literal[False]"): single,
            ("Literal[True]", "Literal[False]"): f"tuple[{single}, {single}]",
            ("Literal[False]", "Literal[True]"): f"tuple[{single}, {single}]",
            ("Literal[True]", "Literal[True]"): f"tuple[{single}, {single}, {single}]",
            ("bool", "bool"): f"{single} | tuple[{single}, ...]",
        }, function.__qualname__
    assert [o.__annotations__["return"] for o in get_overloads(token_log_probs)] == [
        "Tensor", "tuple[Tensor, Tensor]", "Tensor | tuple[Tensor, Tensor]"
    ]


def test_kernels_compile_where_neither_the_install_nor_the_home_is_writable(tmp_path) -> None:
    """A read-only install run by a user without a writable home (a non-root container): Numba
    found no folder to cache in and refused every cache=True kernel ("no locator available"). The
    kernels now cache in a folder of the user's own in the temporary folder."""
    import os
    import shutil
    from pathlib import Path

    package = Path(xentkit.__file__).parent
    copy = tmp_path / "site" / "xentkit"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "kernels" / "__pycache__").write_text("")  # a file: no cache folder can be made there
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    environment = {
        **os.environ, "PYTHONPATH": str(tmp_path / "site"), "HOME": "/nonexistent",
        "XDG_CACHE_HOME": "/dev/null/cache", "TMPDIR": str(temporary),
    }  # fmt: skip
    environment.pop("NUMBA_CACHE_DIR", None)
    script = (
        "import numpy as np, numba\n"
        "from xentkit.kernels.labels import first_bad_label\n"
        "print(first_bad_label(np.array([0, 7, 2]), 5, -100), numba.config.CACHE_DIR)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    index, folder = done.stdout.split()
    assert index == "1" and Path(folder).parent == temporary
    assert any(Path(folder).rglob("*.nbi"))  # cached there


def test_the_triton_kernels_without_triton_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import xentkit.triton as kernels

    if "cross_entropy_rows" in vars(kernels):  # (loaded by an earlier test; hasattr would load it)
        monkeypatch.delattr(kernels, "cross_entropy_rows")
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(MissingExtraError, match=r"^xentkit.triton.cross_entropy_rows needs the package 'triton', .*pip install 'xentkit\[triton\]'$"):
        kernels.cross_entropy_rows  # noqa: B018


def test_the_fallback_cache_folder_is_private(tmp_path, monkeypatch) -> None:
    """Numba unpickles its cache index: a folder that another user could write (or a link) in
    the shared temporary folder is passed over for a fresh one of this process's own (made in
    the temporary folder: here one under tmp_path, where it made two in the real one per run)."""
    import stat
    import tempfile

    from xentkit.kernels._cache import _private

    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))

    mine = _private(tmp_path / "xentkit-numba-me")
    assert mine == tmp_path / "xentkit-numba-me"
    assert stat.S_IMODE(mine.stat().st_mode) & 0o077 == 0
    shared = tmp_path / "xentkit-numba-shared"
    shared.mkdir()
    shared.chmod(0o777)
    other = _private(shared)
    assert other is not None and other != shared and other.name.startswith("xentkit-numba-shared-")
    assert stat.S_IMODE(other.stat().st_mode) & 0o077 == 0
    link = tmp_path / "xentkit-numba-link"
    link.symlink_to(mine)
    assert _private(link) not in (None, link, mine)
    assert other.parent == system_tmp and len(list(system_tmp.iterdir())) == 2


def test_a_fresh_cache_folder_is_removed_when_the_process_exits(tmp_path) -> None:
    """The fallback folder serves one process: it goes at exit (9 MB of kernels a process before)."""
    code = (
        "import pathlib, tempfile, sys; tempfile.tempdir = sys.argv[1]; "
        "from xentkit.kernels._cache import _private; "
        "shared = pathlib.Path(sys.argv[1]) / 'xentkit-numba-shared'; shared.mkdir(); shared.chmod(0o777); "
        "fresh = _private(shared); (fresh / 'index.nbi').write_bytes(b'x'); print(fresh)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    fresh = Path(result.stdout.strip())
    assert fresh.parent == tmp_path and fresh.name.startswith("xentkit-numba-shared-") and not fresh.exists()


def test_a_numba_cache_dir_that_cannot_be_written_is_passed_over_with_a_warning(tmp_path, monkeypatch) -> None:
    """A review (2026-12-07): with NUMBA_CACHE_DIR unwritable and neither the install nor the
    user's cache folder writable, every kernel failed ("no locator available"), as the variable
    had stopped the fallback. Now it is passed over, as Numba passes it over, for the fallback,
    with a warning naming it; a writable one is Numba's choice, as before."""
    import numba

    from xentkit.kernels import _cache

    unwritable = tmp_path / "read-only"
    monkeypatch.setattr(_cache, "_writable", lambda folder: folder in (tmp_path / "fine", tmp_path / "fallback"))
    monkeypatch.setattr(_cache, "fallback_dir", lambda: tmp_path / "fallback")
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(unwritable))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(unwritable))
    with pytest.warns(RuntimeWarning, match=f"NUMBA_CACHE_DIR={unwritable} cannot be written: xentkit's kernels are cached in {tmp_path / 'fallback'} instead"):
        assert _cache.ensure_cache_dir() == str(tmp_path / "fallback")
    assert Path(numba.config.CACHE_DIR) == tmp_path / "fallback"
    assert _cache.cache_location() == (tmp_path / "fallback", True)  # (xentkit warm says where)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "fine"))
    assert _cache.ensure_cache_dir() is None
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(unwritable))  # a folder the user's code set is kept
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "fine"))
    assert _cache.ensure_cache_dir() is None and Path(numba.config.CACHE_DIR) == tmp_path / "fine"


def test_without_numbas_compiler_the_kernels_say_so_and_the_reference_runs(tmp_path: Path) -> None:
    """NUMBA_DISABLE_JIT=1 had failed with "cannot import name 'cross_entropy_rows'" (the real
    error, from a kernel module's import, hidden by the package's lazy import) or an
    AttributeError; `xentkit warm` with a traceback (a review, 2026-12-07)."""
    pytest.importorskip("torch")  # (its compiled call; the test extra has it)
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    code = (
        "import numpy as np, xentkit as xk\n"
        "try:\n    xk.cross_entropy(np.array([[2.0, 0.5]]), [0])\nexcept RuntimeError as e:\n    print('refused', e)\n"
        "with xk.use_reference(True):\n    print('reference', float(xk.cross_entropy(np.array([[2.0, 0.5]]), [0])))\n"
        "import torch, xentkit.torch as xt\n"  # (compiled, the labels are checked by NumPy's scan)
        "f = torch.compile(lambda a, b: xt.cross_entropy(a, b, backend='torch'), backend='aot_eager')\n"
        "print('compiled', round(float(f(torch.tensor([[2.0, 0.5]]), torch.tensor([0]))), 4))\n"
        "try:\n    f(torch.tensor([[2.0, 0.5]]), torch.tensor([5]))\nexcept ValueError as e:\n    print('label', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "refused xentkit's kernels need Numba's compiler, which NUMBA_DISABLE_JIT=1 turns off" in done.stdout
    assert "reference 0.2014" in done.stdout and "compiled 0.2014" in done.stdout, done.stdout
    assert "label target has label 5 at position (0,)" in done.stdout, done.stdout
    warm = subprocess.run([sys.executable, "-m", "xentkit", "warm"], capture_output=True, text=True, env=env, timeout=300)
    assert warm.returncode == 2 and warm.stderr.count("\n") == 1 and "NUMBA_DISABLE_JIT=1" in warm.stderr, warm.stderr
    # the lab says it in the same line (it had ended in a traceback, exit 1: a review, 2026-12-07)
    lab = subprocess.run(
        [sys.executable, "-m", "xentkit", "lab", "neuron", "--out", str(tmp_path / "lab"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert lab.returncode == 2 and lab.stderr.count("\n") == 1 and "NUMBA_DISABLE_JIT=1" in lab.stderr, lab.stderr


def test_the_reference_switch_takes_the_log_probabilities_and_vocabulary_parallel_forms_off_the_kernels() -> None:
    """Under XENTKIT_REFERENCE=1 (and NUMBA_DISABLE_JIT=1, where a kernel cannot run at all)
    ``xentkit.torch``'s log-probabilities and the vocabulary-parallel forms still took the Numba
    kernels, and raised the error that says to set XENTKIT_REFERENCE=1 (a review): they take
    torch ops, the formulas of the reference."""
    pytest.importorskip("torch")
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", XENTKIT_REFERENCE="1")
    code = (
        "import torch, xentkit.torch as xt\n"
        "from xentkit.torch import distributed as vp\n"
        "torch.manual_seed(0)\n"
        "z, h, w = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)\n"
        "y = torch.tensor([0, 6, 2, 3])\n"
        "expected = torch.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1)\n"
        "print('log_probs', bool(torch.allclose(xt.log_probs(z, y), expected, rtol=1e-12, atol=0)))\n"
        "print('linear_log_probs', bool(torch.allclose(xt.linear_log_probs(h, w, y), torch.log_softmax(h @ w.T, 1).gather(1, y[:, None]).squeeze(1), rtol=1e-12, atol=0)))\n"
        "print('vocab_parallel', bool(torch.allclose(vp.vocab_parallel_cross_entropy(z, y), -expected.mean(), rtol=1e-12, atol=0)))\n"
        "print('vocab_parallel_linear', float(vp.vocab_parallel_linear_cross_entropy(h, w, y)) > 0)\n"
        "print('vocab_parallel_linear_log_probs', vp.vocab_parallel_linear_log_probs(h, w, y).shape == (4,))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "log_probs", "True", "linear_log_probs", "True", "vocab_parallel", "True", "vocab_parallel_linear", "True",
        "vocab_parallel_linear_log_probs", "True",
    ], done.stdout
