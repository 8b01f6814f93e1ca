"""kernels.cross_entropy.compile_all: every kernel specialization compiled (or loaded) ahead."""

from __future__ import annotations

import numpy as np

from xentkit.kernels import cross_entropy as kernels


def test_compile_all_builds_both_kernels_for_both_dtypes() -> None:
    assert kernels.compile_all() == [
        "rows float32", "split rows float32", "serial rows float32", "tile float32", "serial tile float32",
        "rows float64", "split rows float64", "serial rows float64", "tile float64", "serial tile float64",
    ]
    for kernel in (
        kernels._cross_entropy_rows_kernel, kernels._cross_entropy_split_kernel, kernels._cross_entropy_rows_serial,
        kernels._cross_entropy_tile_kernel, kernels._cross_entropy_tile_serial,
    ):
        dtypes = {str(signature[0].dtype) for signature in kernel.signatures}
        assert {"float32", "float64"} <= dtypes, kernel


def test_compile_all_leaves_the_thread_count_alone() -> None:
    import numba

    before = numba.get_num_threads()
    kernels.compile_all()
    assert numba.get_num_threads() == before
    # and the kernels still compute: uniform logits over 4 classes give log 4
    loss, lse = kernels.cross_entropy_rows(
        np.zeros((2, 4), np.float32), np.array([0, 3]), None, -100, 0.0, 0.0, None, None, None, None
    )
    np.testing.assert_allclose(loss, np.log(4.0), rtol=1e-7)
    np.testing.assert_allclose(lse, np.log(4.0), rtol=1e-7)


def test_the_packages_compile_all_covers_every_kernel_module_and_xentkit_warm_runs_it(capsys) -> None:
    import xentkit.kernels
    from xentkit.cli import main
    from xentkit.kernels import log_probs

    names = xentkit.kernels.compile_all()
    assert names[:10] == [
        "rows float32", "split rows float32", "serial rows float32", "tile float32", "serial tile float32",
        "rows float64", "split rows float64", "serial rows float64", "tile float64", "serial tile float64",
    ]
    assert names[10:22] == [
        "probabilities rows float32", "probabilities serial float32",
        "probabilities tile float32", "probabilities serial tile float32",
        "probabilities rows float64", "probabilities serial float64",
        "probabilities tile float64", "probabilities serial tile float64",
        "binary rows float32", "binary serial float32", "binary rows float64", "binary serial float64",
    ]
    assert names[22:] == [
        "log-prob statistics float32", "log-prob gradient float32",
        "log-prob serial statistics float32", "log-prob serial gradient float32",
        "log-prob statistics float64", "log-prob gradient float64",
        "log-prob serial statistics float64", "log-prob serial gradient float64",
        "shard statistics float32", "shard gradient float32",
        "shard statistics float64", "shard gradient float64",
        "label scan int64",
        "softmax rows float32", "softmax serial float32", "log_softmax rows float32", "log_softmax serial float32",
        "logsumexp rows float32", "logsumexp serial float32",
        "log_softmax tile rows float32", "log_softmax tile serial float32",
        "logsumexp tile rows float32", "logsumexp tile serial float32",
        "softmax rows float64", "softmax serial float64", "log_softmax rows float64", "log_softmax serial float64",
        "logsumexp rows float64", "logsumexp serial float64",
        "log_softmax tile rows float64", "log_softmax tile serial float64",
        "logsumexp tile rows float64", "logsumexp tile serial float64",
        "narrow to float16 float32", "narrow to float16 serial float32",
        "narrow to float16 float64", "narrow to float16 serial float64",
        "widen float16", "widen float16 serial",
    ]
    from xentkit.kernels import activations, binary, labels, probabilities, vocab_parallel

    for kernel in (probabilities._probability_rows_kernel, probabilities._probability_rows_serial,
                   probabilities._probability_tile_kernel, probabilities._probability_tile_serial,
                   binary._binary_rows_kernel, binary._binary_rows_serial,
                   log_probs._statistics_kernel, log_probs._gradient_kernel,
                   log_probs._statistics_serial, log_probs._gradient_serial,
                   vocab_parallel._stats_kernel, vocab_parallel._grad_kernel,
                   activations._softmax_kernel, activations._softmax_serial,
                   activations._log_softmax_kernel, activations._log_softmax_serial,
                   activations._logsumexp_kernel, activations._logsumexp_serial,
                   activations._log_softmax_tile_kernel, activations._log_softmax_tile_serial,
                   activations._logsumexp_tile_kernel, activations._logsumexp_tile_serial):
        assert {str(signature[0].dtype) for signature in kernel.signatures} >= {"float32", "float64"}
    assert [str(signature[0].dtype) for signature in labels._first_bad_label.signatures] == ["int64"]
    assert main(["warm"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("xentkit warm: 61 kernel specializations ready in ")
    assert "log-prob gradient float64" in printed


def test_compile_all_builds_the_threaded_kernels_on_one_thread_too() -> None:
    """``NUMBA_NUM_THREADS=1 xentkit warm`` (a container of one CPU) had run only the serial
    builds, so a later process with threads still waited for the compiler."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import numba
        import xentkit.kernels
        from xentkit.kernels import activations, binary, cross_entropy, log_probs, probabilities

        assert numba.get_num_threads() == 1
        xentkit.kernels.compile_all()
        for kernel in (cross_entropy._cross_entropy_rows_kernel, cross_entropy._cross_entropy_tile_kernel,
                       probabilities._probability_rows_kernel, probabilities._probability_tile_kernel,
                       binary._binary_rows_kernel, log_probs._statistics_kernel, log_probs._gradient_kernel,
                       activations._softmax_kernel, activations._log_softmax_kernel):
            dtypes = {str(signature[0].dtype) for signature in kernel.signatures}
            assert {"float32", "float64"} <= dtypes, (kernel, dtypes)
        print("ok")
    """)
    environment = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
