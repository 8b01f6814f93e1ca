"""Vocabulary-parallel cross-entropy (xentkit.torch.distributed) on real gloo process groups.

Each world size (2 and 4 processes on 127.0.0.1) is spawned once, by a module fixture, and runs
every scenario below in the same process group; each rank writes its findings to a JSON file and
the tests read them. Every rank builds the same full logits (seeded) and compares its loss and its
slice of the gradient with the single-process answer: ``xentkit.cross_entropy_and_grad`` on the
full logits (float64), and ``torch.nn.functional.cross_entropy`` where z-loss is off.
"""

from __future__ import annotations

import contextlib
import datetime
import doctest
import itertools
import json
import math
import os
import pickle
import signal
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import torch.nn.functional as F  # noqa: E402

import xentkit  # noqa: E402
from xentkit.torch import distributed as vp  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

# One table of tolerances, (atol, rtol) per dtype, against float64 answers.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (5e-6, 5e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
N, V = 13, 11  # 11 classes: uneven over 2 (6 + 5) and 4 (3 + 3 + 3 + 2) ranks
IGNORED_ROWS = (2, 7)
SPAWN_DEADLINE_S = 240
GROUP_TIMEOUT = datetime.timedelta(seconds=30)

# Shards given explicitly (vocab_start on every rank), out of rank order, one of them empty.
EXPLICIT_SHARDS = {
    2: [(5, 11), (0, 5)],
    4: [(7, 11), (0, 0), (0, 5), (5, 7)],
}


# ---------------------------------------------------------------------------------------------
# Single-process answers
# ---------------------------------------------------------------------------------------------


def torch_cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss):
    """torch's cross_entropy on the full logits plus xentkit's z-loss ("mean" of nothing = 0)."""
    valid = target != ignore_index
    total = F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction="sum",
                            label_smoothing=label_smoothing)
    per_row = F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction="none",
                              label_smoothing=label_smoothing)
    z_rows = torch.where(valid, z_loss * torch.logsumexp(logits, dim=-1) ** 2, 0.0)
    if reduction == "none":
        return per_row + z_rows
    if reduction == "sum":
        return total + z_rows.sum()
    w_y = valid.to(logits.dtype) if weight is None else torch.where(valid, weight[target.clamp(min=0)], 0.0)
    main = total / w_y.sum() if w_y.sum() != 0 else total * 0
    count = valid.sum()
    return main + (z_rows.sum() / count if count else z_rows.sum() * 0)


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        torch.as_tensor(actual).to(torch.float64), torch.as_tensor(expected).to(torch.float64),
        atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}",
    )


# ---------------------------------------------------------------------------------------------
# Scenarios (run on every rank of a spawned group; a failed check is recorded, not raised)
# ---------------------------------------------------------------------------------------------

# A rank whose check fails must not skip the collectives of the cases after it (the other ranks
# would wait for them), so each case records its failure here and the scenario goes on.
_FAILURES: list[str] = []


@contextlib.contextmanager
def recorded(what: str):
    try:
        yield
    except Exception as exc:
        _FAILURES.append(f"{what}: {type(exc).__name__}: {exc}")


def _shard(world: int, rank: int, explicit: bool) -> tuple[int, int, int | None]:
    """(start, stop, vocab_start argument) of this rank's columns."""
    if explicit:
        start, stop = EXPLICIT_SHARDS[world][rank]
        return start, stop, start
    start, stop = vp.vocab_shard_range(V, world, rank)
    return start, stop, None


def _problem(seed: int, dtype, scale: float = 3.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=generator, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, V, (N,), generator=generator)
    target[list(IGNORED_ROWS)] = -100
    weight = torch.rand(V, generator=generator, dtype=torch.float64) + 0.25
    upstream = torch.rand(N, generator=generator, dtype=torch.float64) + 0.5
    return logits, target, weight, upstream


def _check_logits_case(world, rank, *, dtype, reduction, weighted, smoothing, z_loss, explicit, seed,
                       logits=None, target=None, compare_torch=True, as_view=False):
    """One call of the logits form on every rank, compared with the single-process answers.

    ``as_view``: the shard is a (non-contiguous) column slice of a full leaf tensor, whose
    gradient must then be the shard's gradient in those columns and 0 elsewhere.
    """
    what = (f"dtype={dtype} reduction={reduction} weighted={weighted} smoothing={smoothing} "
            f"z_loss={z_loss} explicit={explicit} seed={seed} as_view={as_view} rank={rank}")
    with recorded(what):
        full, default_target, weight, upstream = _problem(seed, dtype)
        full = full if logits is None else logits
        target = default_target if target is None else target
        weight = weight if weighted else None
        start, stop, vocab_start = _shard(world, rank, explicit)
        leaf = full.clone().requires_grad_(True) if as_view else None
        shard = leaf[:, start:stop] if as_view else full[:, start:stop].clone().requires_grad_(True)
        loss = vp.vocab_parallel_cross_entropy(
            shard, target, vocab_start=vocab_start, weight=weight, reduction=reduction,
            label_smoothing=smoothing, z_loss=z_loss,
        )
        grad_output = upstream if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
        (loss * grad_output.to(dtype)).sum().backward()
        if as_view:
            assert not leaf.grad[:, :start].any() and not leaf.grad[:, stop:].any()
            shard = leaf[:, start:stop].detach()
            shard.grad = leaf.grad[:, start:stop]

        expected_loss, expected_grad = xentkit.cross_entropy_and_grad(
            full.to(torch.float64).numpy(), target.numpy(),
            weight=None if weight is None else weight.numpy(), reduction=reduction,
            label_smoothing=smoothing, z_loss=z_loss, grad_output=grad_output.numpy(),
            check_probabilities=False,
        )
        assert loss.dtype == dtype
        assert loss.shape == ((N,) if reduction == "none" else ())
        assert_close(loss.detach(), expected_loss, dtype, "loss vs xentkit")
        assert_close(shard.grad, expected_grad[:, start:stop], dtype, "gradient vs xentkit")
        if compare_torch and z_loss == 0.0:
            reference = full.to(torch.float64, copy=True).requires_grad_(True)
            torch_loss = torch_cross_entropy(reference, target, weight, -100, reduction, smoothing, 0.0)
            (torch_loss * grad_output).sum().backward()
            assert_close(loss.detach(), torch_loss.detach(), dtype, "loss vs torch")
            assert_close(shard.grad, reference.grad[:, start:stop], dtype, "gradient vs torch")


def scenario_logits_options(world, rank):
    """Every option combination, even and explicit (out-of-order, one empty) shards; float32 on
    two ranks only (its arithmetic does not depend on the world size, and 4 ranks share 2 cores)."""
    dtypes = (torch.float64, torch.float32) if world <= 2 else (torch.float64,)
    for dtype, reduction, weighted, smoothing, z_loss, explicit in itertools.product(
        dtypes, ("mean", "sum", "none"), (False, True), (0.0, 0.1),
        (0.0, 1e-2), (False, True),
    ):
        _check_logits_case(world, rank, dtype=dtype, reduction=reduction, weighted=weighted,
                           smoothing=smoothing, z_loss=z_loss, explicit=explicit, seed=7)


def scenario_logits_torch_ops(world, rank):
    """The torch-ops path (CUDA and float16/bfloat16 take it): forced in float64, natural in half."""
    vp.USE_KERNELS = False
    try:
        for reduction, weighted, smoothing, z_loss in itertools.product(
            ("mean", "none"), (False, True), (0.0, 0.1), (0.0, 1e-2)
        ):
            _check_logits_case(world, rank, dtype=torch.float64, reduction=reduction, weighted=weighted,
                               smoothing=smoothing, z_loss=z_loss, explicit=weighted, seed=11,
                               as_view=smoothing > 0)
    finally:
        vp.USE_KERNELS = True
    # the kernels on a column slice of a full tensor (not contiguous)
    _check_logits_case(world, rank, dtype=torch.float32, reduction="none", weighted=True,
                       smoothing=0.1, z_loss=1e-2, explicit=False, seed=11, as_view=True)
    for dtype in (torch.float16, torch.bfloat16):
        full, _, _, _ = _problem(13, torch.float64, scale=1.0)
        # the half-precision values are the inputs; the answer is computed from them in float64
        _check_logits_case(world, rank, dtype=dtype, reduction="mean", weighted=True, smoothing=0.1,
                           z_loss=1e-3, explicit=False, seed=13, logits=full.to(dtype), compare_torch=False)


def scenario_logits_special_values(world, rank):
    """Huge logits (exp overflows without the max shift), −inf classes, a whole shard of −inf in
    a row, every target ignored ("mean" of nothing = 0), reductions of an empty batch."""
    full, target, _, _ = _problem(17, torch.float64, scale=300.0)
    full[0, :] = -torch.inf
    full[0, 4] = 2.0
    target[0] = 4
    full[1, 6:] = -torch.inf  # the last shard(s) hold no finite logit in row 1
    target[1] = 0
    full[3, 1] = -torch.inf
    for dtype, reduction, z_loss, kernels in itertools.product(
        (torch.float64, torch.float32), ("mean", "none"), (0.0, 1e-3), (True, False)
    ):
        vp.USE_KERNELS = kernels
        try:
            _check_logits_case(world, rank, dtype=dtype, reduction=reduction, weighted=True,
                               smoothing=0.0, z_loss=z_loss, explicit=True, seed=17,
                               logits=full.to(dtype), target=target)
        finally:
            vp.USE_KERNELS = True
    all_ignored = torch.full((N,), -100)
    for reduction in ("mean", "sum"):
        _check_logits_case(world, rank, dtype=torch.float64, reduction=reduction, weighted=True,
                           smoothing=0.1, z_loss=1e-2, explicit=False, seed=19, target=all_ignored,
                           compare_torch=False)
    start, stop, _ = _shard(world, rank, False)
    with recorded("empty batch"):
        empty = torch.zeros(0, stop - start, dtype=torch.float64, requires_grad=True)
        loss = vp.vocab_parallel_cross_entropy(empty, torch.zeros(0, dtype=torch.int64))
        loss.backward()
        assert float(loss.detach()) == 0.0 and empty.grad.shape == empty.shape


def scenario_linear(world, rank):
    """The fused linear form: loss and the gradients of input, weight shard and bias shard."""
    features = 6
    generator = torch.Generator().manual_seed(23)
    x_full = torch.randn(N, features, generator=generator, dtype=torch.float64)
    w_full = torch.randn(V, features, generator=generator, dtype=torch.float64)
    b_full = torch.randn(V, generator=generator, dtype=torch.float64)
    _, target, class_weight, upstream = _problem(23, torch.float64)
    for dtype, reduction, bias, smoothing, z_loss, chunk_size, explicit in itertools.product(
        (torch.float64, torch.float32), ("mean", "sum", "none"), (False, True), (0.0, 0.1),
        (0.0, 1e-2), (None, 4), (False, True),
    ):
        if dtype == torch.float32 and (chunk_size is None or explicit or world > 2):
            continue  # float32 on a subset: the arithmetic is the same
        what = (f"linear dtype={dtype} reduction={reduction} bias={bias} smoothing={smoothing} "
                f"z_loss={z_loss} chunk_size={chunk_size} explicit={explicit} rank={rank}")
        with recorded(what):
            start, stop, vocab_start = _shard(world, rank, explicit)
            x = x_full.to(dtype, copy=True).requires_grad_(True)
            w_shard = w_full[start:stop].to(dtype, copy=True).requires_grad_(True)
            b_shard = b_full[start:stop].to(dtype, copy=True).requires_grad_(True) if bias else None
            loss = vp.vocab_parallel_linear_cross_entropy(
                x, w_shard, target, vocab_start=vocab_start, linear_bias_shard=b_shard,
                weight=class_weight, reduction=reduction, label_smoothing=smoothing, z_loss=z_loss,
                chunk_size=chunk_size,
            )
            grad_output = upstream if reduction == "none" else torch.tensor(0.6, dtype=torch.float64)
            (loss * grad_output.to(dtype)).sum().backward()

            x_ref = x_full.clone().requires_grad_(True)
            w_ref = w_full.clone().requires_grad_(True)
            b_ref = b_full.clone().requires_grad_(True) if bias else None
            logits = F.linear(x_ref, w_ref, b_ref)
            expected = torch_cross_entropy(logits, target, class_weight, -100, reduction, smoothing, z_loss)
            (expected * grad_output).sum().backward()
            assert_close(loss.detach(), expected.detach(), dtype, "loss")
            assert_close(x.grad, x_ref.grad, dtype, "input gradient")
            assert_close(w_shard.grad, w_ref.grad[start:stop], dtype, "weight shard gradient")
            if bias:
                assert_close(b_shard.grad, b_ref.grad[start:stop], dtype, "bias shard gradient")
    # the same as the logits form on the shard logits
    start, stop, _ = _shard(world, rank, False)
    with recorded("linear form vs logits form"):
        logits_shard = F.linear(x_full, w_full[start:stop], b_full[start:stop])
        assert_close(
            vp.vocab_parallel_linear_cross_entropy(x_full, w_full[start:stop], target,
                                                   linear_bias_shard=b_full[start:stop]),
            vp.vocab_parallel_cross_entropy(logits_shard, target), torch.float64, "losses",
        )


def scenario_communication(world, rank):
    """O(N) floats all-reduced, counted exactly; backward makes no collective (logits form)."""
    full, target, weight, _ = _problem(29, torch.float32)
    start, stop, _ = _shard(world, rank, False)
    record_bytes = world * len(vp._FIELDS) * 8
    # per row: the max (MAX), then whether the shard holds it, the excess and z_y (and S_z) (SUM)
    for smoothing, floats_per_row in ((0.0, 4), (0.1, 5)):
        with recorded(f"logits form, label_smoothing={smoothing}"):
            stats = vp.CommunicationStats()
            shard = full[:, start:stop].clone().requires_grad_(True)
            loss = vp.vocab_parallel_cross_entropy(shard, target, weight=weight,
                                                   label_smoothing=smoothing, stats=stats)
            assert stats.all_reduce_calls == 2, stats
            assert stats.all_reduce_bytes == 8 * N * floats_per_row, stats
            assert stats.all_gather_calls == 1 and stats.all_gather_bytes == record_bytes, stats
            assert _all_reduces_during(loss.backward) == 0, "backward of the logits form communicates"
    # linear form, 4 chunks of 4 rows (the last has 1): 2 all-reduces each, then grad_input (N·D)
    with recorded("linear form, chunk_size=4"):
        features = 5
        x = torch.randn(N, features, dtype=torch.float64, requires_grad=True)
        w_shard = torch.randn(stop - start, features, dtype=torch.float64, requires_grad=True)
        stats = vp.CommunicationStats()
        vp.vocab_parallel_linear_cross_entropy(x, w_shard, target, chunk_size=4, stats=stats).backward()
        assert stats.all_reduce_calls == 2 * 4 + 1, stats
        assert stats.all_reduce_bytes == 8 * N * 4 + 8 * N * features, stats


def _all_reduces_during(action: Callable[[], object]) -> int:
    """How many times ``action`` calls torch.distributed.all_reduce."""
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        action()
    finally:
        dist.all_reduce = original
    return len(calls)


def _expect_error(function: Callable[[], object], *fragments: str, kind: type = ValueError) -> None:
    with recorded(f"expected {kind.__name__} mentioning {fragments}"):
        with pytest.raises((ValueError, TypeError)) as caught:
            function()
        message = str(caught.value)
        assert issubclass(caught.type, kind), f"got {caught.type.__name__}: {message}"
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} not in the message: {message}"


def scenario_errors(world, rank):
    """Bad input on one rank raises on every rank (no hang), and the group stays usable."""
    full, target, weight, _ = _problem(31, torch.float64)
    start, stop, _ = _shard(world, rank, False)
    shard = full[:, start:stop]
    bad = rank == 1

    def call(**overrides):
        arguments = {"logits_shard": shard, "target": target} | overrides
        return lambda: vp.vocab_parallel_cross_entropy(**arguments)

    # a label outside [0, V) on every rank: V is only known globally
    out_of_range = target.clone()
    out_of_range[4] = V
    _expect_error(call(target=out_of_range), f"label {V}", f"V = {V} classes")
    # a negative label (not ignore_index) on one rank only
    negative = target.clone()
    negative[5] = -3
    _expect_error(call(target=negative if bad else target), "rank 1", "label -3")
    # a target of the wrong length on rank 1: a local check, the message reaches every rank
    _expect_error(call(target=target[:-1] if bad else target), "rank(s) [1]", "target must have shape")
    # an unknown reduction on rank 1
    _expect_error(call(reduction="avg" if bad else "mean"), "rank(s) [1]", "reduction must be one of")
    # a wrong type on rank 1: TypeError there, ValueError elsewhere
    _expect_error(call(z_loss="big" if bad else 0.0), "rank(s) [1]", "z_loss must be",
                  kind=TypeError if bad else ValueError)
    # options that differ between ranks
    _expect_error(call(label_smoothing=0.1 if bad else 0.0), "label_smoothing must be the same")
    # targets that differ between ranks
    shuffled = target.roll(1) if bad else target
    _expect_error(call(target=shuffled), "target must be the same on every rank", "[1]")
    # class weights of the wrong length
    _expect_error(call(weight=weight[:-1]), f"full ({V},) class-weight vector")
    # explicit shards that overlap
    _expect_error(call(vocab_start=0), "must tile the vocabulary")
    # the linear form: a weight shard with the wrong in_features on rank 1
    x = torch.randn(N, 4, dtype=torch.float64)
    w_shard = torch.randn(stop - start, 5 if bad else 4, dtype=torch.float64)
    _expect_error(lambda: vp.vocab_parallel_linear_cross_entropy(x, w_shard, target), "rank(s) [1]",
                  "input must have linear_weight_shard's in_features=5")
    _expect_error(lambda: vp.vocab_parallel_linear_cross_entropy(
        x, w_shard[:, :4].contiguous(), target, chunk_size=3 if bad else 4), "chunk_size must be the same")
    # rank 1 on the linear form with a bad option, the others on the logits form: both are told
    # (the mismatch had been hidden behind the local failure)
    linear = lambda: vp.vocab_parallel_linear_cross_entropy(x, w_shard[:, :4].contiguous(), target, reduction="avg")  # noqa: E731
    _expect_error(linear if bad else call(), "rank(s) [1]", "reduction must be one of",
                  "every rank must call the same function")
    # the package's chunk budget set on rank 1 only: it would change rank 1's number of chunks,
    # and so of all-reduces (gloo aborted the process on the mismatched collective)
    floor = vp.CHUNK_FLOOR_BYTES
    vp.CHUNK_FLOOR_BYTES = 8 if bad else floor
    try:
        _expect_error(lambda: vp.vocab_parallel_linear_cross_entropy(x, w_shard[:, :4].contiguous(), target),
                      "CHUNK_FLOOR_BYTES must be the same on every rank", "rank(s) [1]")
    finally:
        vp.CHUNK_FLOOR_BYTES = floor
    # still in step: a good call afterwards agrees with the single-process answer
    _check_logits_case(world, rank, dtype=torch.float64, reduction="mean", weighted=True, smoothing=0.1,
                       z_loss=1e-2, explicit=False, seed=31)


def scenario_meta_and_dtypes(world, rank):
    """Meta-device logits on one rank, and ranks disagreeing on the dtype, raise on every rank
    before any other collective (the group stays usable)."""
    full, target, _, _ = _problem(37, torch.float64)
    start, stop, _ = _shard(world, rank, False)
    shard = full[:, start:stop]
    bad = rank == 1
    meta = torch.empty(shard.shape, dtype=shard.dtype, device="meta")
    _expect_error(lambda: vp.vocab_parallel_cross_entropy(meta if bad else shard, target), "rank(s) [1]",
                  "meta device")
    _expect_error(lambda: vp.vocab_parallel_cross_entropy(shard.float() if bad else shard, target),
                  "one dtype on every rank", "float32")
    # the same N samples, arranged differently on one rank ((1, N) against (N,))
    _expect_error(lambda: vp.vocab_parallel_cross_entropy(
        shard.unsqueeze(0) if bad else shard, target.unsqueeze(0) if bad else target),
        "same shape", "rank(s) [1]")
    x = torch.randn(N, 4, dtype=torch.float64)
    w_shard = torch.randn(stop - start, 4, dtype=torch.float64)
    _expect_error(lambda: vp.vocab_parallel_linear_cross_entropy(
        x.to("meta") if bad else x, w_shard.to("meta") if bad else w_shard, target), "rank(s) [1]", "meta device")
    _expect_error(lambda: vp.vocab_parallel_cross_entropy(shard, target.to("meta") if bad else target),
                  "rank(s) [1]", "target is on the meta device")
    # a bad stats object on one rank: every rank raises before any counted collective
    _expect_error(lambda: vp.vocab_parallel_cross_entropy(shard, target, stats={} if bad else None),
                  "rank(s) [1]", "stats must be None or a", kind=TypeError if bad else ValueError)
    # an empty vocabulary on every rank
    _expect_error(lambda: vp.vocab_parallel_cross_entropy(shard[:, :0], torch.full_like(target, -100)),
                  "at least one class")
    # "none" all-reduces the input's gradient in backward: a rank without a graph would never call
    # it and leave the others waiting, so forward refuses that on every rank
    leaf = x.clone().requires_grad_(not bad)
    _expect_error(lambda: vp.vocab_parallel_linear_cross_entropy(leaf, w_shard, target, reduction="none"),
                  "every rank must call backward", "rank(s) [1]")
    _expect_error(lambda: vp.vocab_parallel_linear_log_probs(leaf, w_shard, target), "every rank must call backward")
    # an inference tensor (made under torch.inference_mode) on one rank: autograd cannot save it,
    # which it found only in forward, after the collectives (the others then waited in backward)
    with torch.inference_mode():
        inference_shard = w_shard.clone()
    grad_input = x.clone().requires_grad_()
    _expect_error(lambda: vp.vocab_parallel_linear_log_probs(
        grad_input, inference_shard if bad else w_shard, target), "rank(s) [1]", "inference_mode")
    # class weights equal as numbers, 0.0 on one rank and −0.0 on another: the same weights
    signed_zero = torch.ones(V, dtype=torch.float64)
    signed_zero[0] = -0.0 if bad else 0.0
    with recorded("signed zero class weights"):
        torch.testing.assert_close(
            vp.vocab_parallel_cross_entropy(shard, target, weight=signed_zero),
            torch.nn.functional.cross_entropy(full, target, weight=signed_zero.abs()), rtol=1e-12, atol=1e-12,
        )
    # integer class weights, as the single-process loss
    integer_weight = torch.arange(1, V + 1)
    with recorded("integer class weights"):
        loss = vp.vocab_parallel_cross_entropy(shard, target, weight=integer_weight)
        expected = torch.nn.functional.cross_entropy(full, target, weight=integer_weight.double())
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    _check_logits_case(world, rank, dtype=torch.float64, reduction="mean", weighted=False, smoothing=0.0,
                       z_loss=0.0, explicit=False, seed=37)


def scenario_confident_rows(world, rank):
    """Rows whose target sits 40 above the rest (float64, V = 11): each shard keeps its excess
    e_r = s_r − 1 with its max's terms counted apart, and the all-reduce sums them with whether
    each shard holds the row's max, so that the loss log1p(E) ≈ 4e-17 and the target's gradient
    −E/S keep float64's relative accuracy (log of S = 1 + E summed gave 0 below 1e-16). A tie at
    the max in two shards (row 1), the max in the last shard (row 2); the logits and the linear
    form, on the Numba shards."""
    full = torch.full((3, V), -40.0, dtype=torch.float64)
    full[0, 0] = full[1, 0] = full[1, V - 1] = full[2, V - 1] = 0.0
    full[:, 3] = -41.0
    target = torch.tensor([0, V - 1, V - 1])
    others = torch.exp(full).masked_fill(full == 0, 0.0)
    excess = others.sum(dim=1) + ((full == 0).sum(dim=1) - 1)  # exact: each term below 1
    want_loss = torch.log1p(excess)
    want_target_grad = -excess / (1 + excess)
    start, stop, _ = _shard(world, rank, False)
    rows = torch.arange(3)
    with recorded("logits form"):
        shard = full[:, start:stop].clone().requires_grad_(True)
        loss = vp.vocab_parallel_cross_entropy(shard, target, reduction="none")
        loss.sum().backward()
        torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-14, atol=0)
        mine = (target >= start) & (target < stop)
        got = shard.grad[rows[mine], (target - start)[mine]]
        torch.testing.assert_close(got, want_target_grad[mine], rtol=1e-14, atol=0)
    with recorded("linear form"):
        x = torch.eye(3, dtype=torch.float64)
        w_shard = full[:, start:stop].T.contiguous().requires_grad_(True)
        loss = vp.vocab_parallel_linear_cross_entropy(x, w_shard, target, reduction="none", chunk_size=2)
        torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-14, atol=0)


def scenario_smoothing_at_huge_logits(world, rank):
    """Label smoothing over rows of huge logits (a row filled with −3e38 and left valid, one near
    −1e15, one spread around +1e4), with and without class weights (one of them 0 on a masked
    class), on the Numba and the torch-ops shards: each shard's weighted sum is taken relative to
    its own max and restated at the row's, so the smoothing term Σ w_c·(lse − z_c) is a sum of
    small terms. W·lse − Σ w_c·z_c had cancelled to garbage there (−4.3e21 for log 7)."""
    full = torch.randn(4, V, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    full[0] = -3e38
    full[1] = full[1] - 1e15
    full[2] = full[2] + 1e4
    full[3, 4] = -math.inf  # a masked class, weight 0 below
    target = torch.tensor([3, 0, V - 1, 2])
    weight = torch.rand(V, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) + 0.5
    weight[4] = 0.0
    start, stop, _ = _shard(world, rank, False)
    for backend in ("auto", "torch"):
        for weighted in (False, True):
            w = weight if weighted else None
            with recorded(f"{backend} weighted={weighted}"):
                shard = full[:, start:stop].clone().requires_grad_(True)
                loss = vp.vocab_parallel_cross_entropy(
                    shard, target, weight=w, label_smoothing=0.1, reduction="none", backend=backend
                )
                want = xentkit.torch.cross_entropy(full, target, w, label_smoothing=0.1, reduction="none")
                if not weighted:  # (row 3 holds a −inf class of weight 1: +inf, as torch's)
                    assert loss[3] == math.inf and want[3] == math.inf
                    loss, want = loss[:3], want[:3]
                torch.testing.assert_close(loss.detach(), want, rtol=1e-12, atol=0)


SCENARIOS = {
    "confident_rows": scenario_confident_rows,
    "smoothing_at_huge_logits": scenario_smoothing_at_huge_logits,
    "logits_options": scenario_logits_options,
    "logits_torch_ops": scenario_logits_torch_ops,
    "logits_special_values": scenario_logits_special_values,
    "linear": scenario_linear,
    "communication": scenario_communication,
    "errors": scenario_errors,
    "meta_and_dtypes": scenario_meta_and_dtypes,
}


def run_scenarios(rank: int, world: int, port: int, results: str, scenarios: dict) -> None:
    """One rank of a spawned group: join the gloo group, run every scenario, write
    ``{scenario: failure or None}`` to ``results/rank{rank}.json``. Shared by the distributed test
    files (each spawns a module-level worker that calls this with its own scenarios)."""
    import numba

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
    findings: dict[str, str | None] = {}
    try:
        for name, scenario in scenarios.items():
            _FAILURES.clear()
            try:
                scenario(world, rank)
            except Exception:  # outside a recorded case: the ranks may be out of step now
                _FAILURES.append(traceback.format_exc(limit=4))
            findings[name] = "\n".join(_FAILURES) or None
            dist.barrier()
    finally:
        Path(results, f"rank{rank}.json").write_text(json.dumps(findings))
        dist.destroy_process_group()


def spawn_group(worker, world: int, results: Path, names) -> dict[str, dict[int, str | None]]:
    """Spawn ``world`` ranks running ``worker(rank, world, port, results)``; their findings by
    scenario name and rank (a group that outlives ``SPAWN_DEADLINE_S`` is killed and fails)."""
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=(world, _free_port(), str(results)), nprocs=world, join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    # each rank waited for on its own (not context.join, which on the first rank to fail
    # terminates the others, perhaps before they have written their findings)
    for process in context.processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    if any(process.is_alive() for process in context.processes):
        for process in context.processes:
            if process.is_alive():
                process.kill()
        pytest.fail(f"the {world} spawned ranks did not finish in {SPAWN_DEADLINE_S} s")
    for rank, process in enumerate(context.processes):
        if process.exitcode == 0:
            continue
        # A rank that wrote its findings and then aborted ("terminate called without an active
        # exception", SIGABRT) died in the process group's teardown at exit, after its work: seen
        # in about one spawned group of five, and in plain gloo scripts; its findings stand.
        if process.exitcode == -signal.SIGABRT and Path(results, f"rank{rank}.json").exists():
            continue
        error_file = Path(context.error_files[rank])  # (torch pickles a failed rank's traceback there)
        detail = pickle.loads(error_file.read_bytes()) if error_file.exists() and error_file.stat().st_size else "no traceback"
        pytest.fail(f"rank {rank} of {world} exited with code {process.exitcode}:\n{detail}")
    findings: dict[str, dict[int, str | None]] = {name: {} for name in names}
    for rank in range(world):
        for name, failure in json.loads(Path(results, f"rank{rank}.json").read_text()).items():
            findings[name][rank] = failure
    return findings


def check_findings(findings: dict[str, dict[int, str | None]], scenario: str, world: int) -> None:
    """The scenario ran on every rank and failed on none."""
    assert len(findings[scenario]) == world, f"{scenario} did not run on every rank: {findings[scenario]}"
    failures = {rank: text for rank, text in findings[scenario].items() if text}
    assert not failures, "\n".join(f"rank {rank} of {world}:\n{text}" for rank, text in failures.items())


def _worker(rank: int, world: int, port: int, results: str) -> None:
    run_scenarios(rank, world, port, results, SCENARIOS)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _warm_kernels() -> None:
    """Compile (or load) the Numba kernels here, so that the spawned ranks load them from the cache."""
    for dtype in (torch.float32, torch.float64):
        logits = torch.randn(3, 4, dtype=dtype, requires_grad=True)
        vp.vocab_parallel_cross_entropy(logits, torch.tensor([0, 3, -100]), label_smoothing=0.1,
                                        weight=torch.ones(4)).backward()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda world: f"world{world}")
def spawned(request, tmp_path_factory) -> tuple[int, dict[str, dict[int, str | None]]]:
    """Spawn one gloo group of ``world`` ranks that runs every scenario; its findings by scenario."""
    world = request.param
    _warm_kernels()
    return world, spawn_group(_worker, world, tmp_path_factory.mktemp(f"world{world}"), SCENARIOS)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_rank_matches_the_single_process_answer(spawned, scenario):
    world, findings = spawned
    check_findings(findings, scenario, world)


# ---------------------------------------------------------------------------------------------
# In-process: a world of one (no process group, and a gloo group of one)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_single_process_without_a_group_is_plain_cross_entropy(reduction):
    assert not dist.is_initialized()
    _FAILURES.clear()
    _check_logits_case(1, 0, dtype=torch.float32, reduction=reduction, weighted=True, smoothing=0.1,
                       z_loss=1e-2, explicit=False, seed=37)
    assert not _FAILURES, "\n".join(_FAILURES)


def test_a_gloo_group_of_one_process():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=GROUP_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=GROUP_TIMEOUT)
    try:
        stats = vp.CommunicationStats()
        full, target, weight, _ = _problem(41, torch.float64)
        logits = full.clone().requires_grad_(True)
        loss = vp.vocab_parallel_cross_entropy(logits, target, weight=weight, z_loss=1e-2, stats=stats,
                                               group=dist.group.WORLD)
        loss.backward()
        expected_loss, expected_grad = xentkit.cross_entropy_and_grad(
            full.numpy(), target.numpy(), weight=weight.numpy(), z_loss=1e-2)
        assert_close(loss.detach(), expected_loss, torch.float64, "loss")
        assert_close(logits.grad, expected_grad, torch.float64, "gradient")
        assert stats.total_bytes == 0  # a world of one communicates nothing
        # a group that is not a process group: a TypeError naming it, before any collective (was an
        # AttributeError from inside: 'int' object has no attribute 'size')
        with pytest.raises(TypeError, match=r"^group must be a torch.distributed process group or None, got int 0$"):
            vp.vocab_parallel_cross_entropy(logits, target, group=0)
    finally:
        dist.destroy_process_group()


def test_errors_in_a_single_process_name_the_argument():
    logits = torch.randn(4, 5)
    with pytest.raises(IndexError, match=r"label 5 .* V = 5 classes") as caught:  # as torch's, and
        vp.vocab_parallel_cross_entropy(logits, torch.tensor([0, 1, 5, 2]))
    assert isinstance(caught.value, ValueError)  # a ValueError as every other bad input
    with pytest.raises(ValueError, match="probability targets are not supported"):
        vp.vocab_parallel_cross_entropy(logits, torch.rand(4, 5))
    with pytest.raises(ValueError, match="weight requires a gradient"):
        vp.vocab_parallel_cross_entropy(logits, torch.tensor([0, 1, 2, 3]),
                                        weight=torch.ones(5, requires_grad=True))
    with pytest.raises(ValueError, match="group was given"):
        vp.vocab_parallel_cross_entropy(logits, torch.tensor([0, 1, 2, 3]), group=object())


@pytest.mark.parametrize("form", ["logits", "linear"])
def test_backward_twice_needs_retain_graph(form):
    """The forward pass computes the gradient; backward hands it over (no copy) unless the graph
    is retained, so a second backward works with retain_graph=True and raises clearly without."""
    generator = torch.Generator().manual_seed(43)
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, -100, 2, 1, 3])
    leaf = x if form == "linear" else torch.randn(6, 5, generator=generator, dtype=torch.float64,
                                                  requires_grad=True)

    def loss_of():
        if form == "linear":
            return vp.vocab_parallel_linear_cross_entropy(x, w, target, label_smoothing=0.1)
        return vp.vocab_parallel_cross_entropy(leaf, target, label_smoothing=0.1)

    loss = loss_of()
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward()
    torch.testing.assert_close(leaf.grad, 2 * first)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()
    with torch.no_grad():
        assert not loss_of().requires_grad


def test_shard_ranges_tile_the_vocabulary():
    for vocab, world in [(11, 4), (32000, 3), (3, 4), (0, 2)]:
        ranges = [vp.vocab_shard_range(vocab, world, rank) for rank in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_shard_ranges_refuse_what_is_not_an_int():
    """(a review: 1.5 gave the bounds (4.5, 7.5), True a world of one)"""
    for arguments, name in [((11, 4, 1.5), "rank"), ((11.0, 4, 1), "vocab_size"), ((11, True, 0), "world_size")]:
        with pytest.raises(TypeError, match=rf"^vocab_shard_range: {name} must be an int, got "):
            vp.vocab_shard_range(*arguments)
    assert vp.vocab_shard_range(11, 4, 1) == (3, 6)


def test_a_bad_label_is_named_at_its_position_in_a_shaped_target():
    """An [s, b] target (Megatron's layout): the label's position as the caller shaped it, as the
    single-process loss names it (a review: the flat position (3,) for (1, 1))."""
    logits = torch.randn(3, 2, 5)
    target = torch.zeros(3, 2, dtype=torch.long)
    target[1, 1] = 7
    with pytest.raises(ValueError, match=r"\(checked across 1 rank\) — target has label 7 at position \(1, 1\) but"):
        vp.vocab_parallel_cross_entropy(logits, target)
    with pytest.raises(ValueError, match=r"target has label 7 at position \(1, 1\)"):
        xentkit.torch.cross_entropy(logits.permute(0, 2, 1), target)


def test_docstring_examples():
    result = doctest.testmod(vp, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------
# First order only: differentiating the gradient raises (no process group, a gloo group of one)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _world_of_one(kind: str):
    """The group argument for a world of one: no process group ("none"), or a gloo group of this
    process alone on 127.0.0.1 ("gloo"), set up as in test_a_gloo_group_of_one_process."""
    if kind == "none":
        assert not dist.is_initialized()
        yield None
        return
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=GROUP_TIMEOUT)  # port 0: a free port
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=GROUP_TIMEOUT)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _first_order_problem(form: str, group, reduction: str):
    """(x, loss of x) for the vocab-parallel form and (x, the same loss) by xentkit.torch's
    single-process cross_entropy, ``x`` the leaf differentiated (logits, or the linear input)."""
    from xentkit.torch import cross_entropy

    generator = torch.Generator().manual_seed(53)
    target = torch.tensor([0, 4, -100, 2, 1, 3])
    options = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-2}
    if form == "logits":
        x = torch.randn(6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
        loss = vp.vocab_parallel_cross_entropy(x, target, group=group, vocab_start=0, **options)
        return x, loss, cross_entropy(x, target, **options)
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    loss = vp.vocab_parallel_linear_cross_entropy(x, w, target, group=group, vocab_start=0,
                                                  linear_bias_shard=b, chunk_size=4, **options)
    return x, loss, cross_entropy(F.linear(x, w, b), target, **options)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("form", ["logits", "linear"])
@pytest.mark.parametrize("world", ["none", "gloo"])
def test_double_backward_raises_instead_of_dropping_the_penalty(world, form, reduction):
    """A gradient penalty on the loss's gradient (create_graph=True) must raise, not be silently
    dropped; the first-order gradient itself is the single-process one."""
    with _world_of_one(world) as group:
        x, loss, expected = _first_order_problem(form, group, reduction)
        upstream = torch.linspace(0.5, 1.5, 6, dtype=torch.float64) if reduction == "none" else 1.0
        grad, = torch.autograd.grad((loss * upstream).sum(), x)
        expected_grad, = torch.autograd.grad((expected * upstream).sum(), x)
        assert_close(loss.detach(), expected.detach(), torch.float64, "loss vs xentkit.torch")
        assert_close(grad, expected_grad, torch.float64, "gradient vs xentkit.torch")

        x, loss, _ = _first_order_problem(form, group, reduction)
        penalized, = torch.autograd.grad((loss * upstream).sum(), x, create_graph=True)
        assert_close(penalized.detach(), expected_grad, torch.float64, "create_graph gradient")
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(penalized.square().sum() + x.sum(), x)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_linear_form_returns_linear_cross_entropys_float32_loss_for_half_inputs(dtype, reduction):
    """The precision contract (docs/precision.md): a world of one gives linear_cross_entropy's
    float32 loss, not its rounding to the half dtype (~3 digits lost in bfloat16)."""
    import xentkit.torch as xt

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=generator).to(dtype).requires_grad_()
    w = torch.randn(11, 16, generator=generator).to(dtype).requires_grad_()
    y = torch.randint(0, 11, (8,), generator=generator)
    got = vp.vocab_parallel_linear_cross_entropy(x, w, y, reduction=reduction)
    want = xt.linear_cross_entropy(x, w, y, reduction=reduction)
    assert got.dtype == want.dtype == torch.float32
    # the float64 loss of the logits the matmul gives (in the half dtype, as every path has them)
    exact = F.cross_entropy(F.linear(x, w).double(), y, reduction=reduction)
    torch.testing.assert_close(got.double(), exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want.double(), exact, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype


def test_torch_func_transforms_are_refused_with_a_clear_error():
    """Not a 'data pointer' error from inside the label check: every rank says why, before any
    collective (a world of one here)."""
    target = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"do not run under torch\.func transforms"):
        torch.func.grad(lambda z: vp.vocab_parallel_cross_entropy(z, target))(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"do not run under torch\.func transforms"):
        torch.vmap(lambda z: vp.vocab_parallel_cross_entropy(z, target))(torch.randn(2, 3, 4))


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_torch_compile_runs_them_eagerly(compiler):
    """Under torch.compile the three forms are a graph break and run eagerly (their label checks
    and collectives need the values; the compiler's functionalization is a torch.func transform,
    which they refuse): the compiled function gives the eager values and gradients (a world of
    one here). Before, every compile raised the torch.func error."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(10, 4, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 10, (6,), generator=generator)
    calls = (
        (lambda z: vp.vocab_parallel_cross_entropy(z, target) * 2, logits),
        (lambda h: vp.vocab_parallel_linear_cross_entropy(h, weight, target), hidden),
        (lambda h: vp.vocab_parallel_linear_log_probs(h, weight, target).sum(), hidden),
    )
    for call, operand in calls:
        want = call(operand)
        (want_grad,) = torch.autograd.grad(want, operand)
        got = torch.compile(call, backend=compiler)(operand)
        (got_grad,) = torch.autograd.grad(got, operand)
        assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_says_it_cannot_export_them(strict):
    """Export cannot break a graph: it traced into the label checks and failed with torch's own
    data-dependent guard error, naming neither the function nor why (a review)."""
    weight = torch.nn.Parameter(torch.randn(11, 16))

    class Head(torch.nn.Module):
        def forward(self, hidden, target):
            return vp.vocab_parallel_linear_cross_entropy(hidden, weight, target)

    with pytest.raises(Exception) as raised:
        torch.export.export(Head(), (torch.randn(8, 16), torch.randint(0, 11, (8,))), strict=strict)
    if strict:  # (dynamo meets the function torch.compile skips: torch's error, naming it)
        assert "marked as skipped" in str(raised.value) and "vocab_parallel_linear_cross_entropy" in str(raised.value)
    else:
        assert "xentkit.torch.vocab_parallel_linear_cross_entropy cannot be exported (torch.export)" in str(raised.value)


def test_a_float16_shards_gradient_waits_for_the_loss_scale():
    """The logits form keeps a float16 shard's gradient in float32 until backward has scaled it,
    as xentkit.torch.cross_entropy does: under a loss scaler's 32768 no entry is lost to float16
    before the scale reaches it (a review found 9201 of 131072 zeros and 95% errors), and the
    result is the float64 gradient rounded once (a world of one here)."""
    generator = torch.Generator().manual_seed(7)
    full = (torch.randn(4096, 64, generator=generator) * 2).half()
    target = torch.randint(0, 64, (4096,), generator=generator)
    scale = torch.tensor(32768.0, dtype=torch.float16)
    shard = full.clone().requires_grad_()
    vp.vocab_parallel_cross_entropy(shard, target).backward(scale)
    exact = full.double().requires_grad_()
    torch.nn.functional.cross_entropy(exact, target).backward(scale.double())
    assert shard.grad.dtype == torch.float16 and int((shard.grad == 0).sum()) == int((exact.grad.half() == 0).sum())
    large = exact.grad.abs() > 1e-3
    relative = ((shard.grad.double() - exact.grad).abs() / exact.grad.abs())[large]
    assert float(relative.max()) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_linear_forms_chunks_keep_to_their_budget_in_every_dtype(dtype):
    """The default chunk's logits buffer (the input's dtype) stays within the budget: float64
    chunks were sized with float32's 4 bytes, twice the budget (a review)."""
    from xentkit.torch.distributed import CHUNK_BUDGET_BYTES
    from xentkit.torch.distributed._rows import _chunk_rows

    item = torch.empty(0, dtype=dtype).element_size()
    rows = _chunk_rows(4096, 65536, None, item)
    assert rows * 65536 * item <= CHUNK_BUDGET_BYTES and rows * 65536 * item > CHUNK_BUDGET_BYTES // 2


def test_a_frozen_inference_weight_works_where_nothing_is_saved():
    """The linear forms refuse an inference tensor only where they save it for backward ("none"
    and the log-probabilities): "mean" and "sum" compute the gradients in forward, and a frozen
    weight made under torch.inference_mode works there, as in single-process
    linear_cross_entropy (a review of the first version of the check, which refused it)."""
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 4, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 10, (6,), generator=generator)
    with torch.inference_mode():
        frozen = w.clone()
    for reduction in ("mean", "sum"):
        (got,) = torch.autograd.grad(vp.vocab_parallel_linear_cross_entropy(x, frozen, target, reduction=reduction), x)
        (want,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x @ w.T, target, reduction=reduction), x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="inference_mode"):
        vp.vocab_parallel_linear_cross_entropy(x, frozen, target, reduction="none")


def test_wrong_types_and_a_rank_outside_the_group_are_named():
    """A vocab_start that is not an int and integer logits are TypeErrors (they were ValueErrors,
    unlike the other losses); a rank outside ``group`` (dist.new_group gives it the int
    NON_GROUP_MEMBER) is told so, not that an int is no process group (a review)."""
    logits, target = torch.randn(3, V), torch.tensor([0, 1, 2])
    for bad in (0.0, True, torch.tensor(0)):
        with pytest.raises(TypeError, match=r"vocab_start must be None or an int in \[0, 2\*\*63\), got"):
            vp.vocab_parallel_cross_entropy(logits, target, vocab_start=bad)
    for bad in (-1, 2**63):  # (2**63 had been torch's "Overflow when unpacking long long")
        with pytest.raises(ValueError, match=rf"vocab_start must be None or an int in \[0, 2\*\*63\), got {bad}$"):
            vp.vocab_parallel_cross_entropy(logits, target, vocab_start=bad)
    with pytest.raises(TypeError, match=r"logits_shard must be a floating tensor .* got dtype int64"):
        vp.vocab_parallel_cross_entropy(torch.ones(3, V, dtype=torch.int64), target)
    with _world_of_one("gloo"), pytest.raises(ValueError, match="this process is not a member of group"):
        vp.vocab_parallel_cross_entropy(logits, target, group=dist.GroupMember.NON_GROUP_MEMBER)


def _records(world, **fields_per_rank):
    """Records as ``_agree`` gathers them, all fields 0 but ``width`` 2 and ``start`` -1 (None),
    with ``fields_per_rank[name]`` a list of one value per rank."""
    from xentkit.torch.distributed import _agreement

    records = [dict.fromkeys(_agreement._FIELDS, 0) | {"width": 2, "start": -1, "weight_length": -1} for _ in range(world)]
    for name, values in fields_per_rank.items():
        for record, value in zip(records, values, strict=True):
            record[name] = value
    return records


def test_a_disagreement_blames_the_ranks_outside_the_largest_group():
    """Rank 0 alone with other labels had been reported as 'rank(s) [1, 2] hold different labels
    than rank 0' (a review, 2026-12-07)."""
    from xentkit.torch.distributed._agreement import _global_problems

    problems, _ = _global_problems(_records(3, target_digest=[7, 9, 9]))
    assert problems == [
        "target must be the same on every rank (the labels of all N samples, replicated), but in the labels "
        "rank(s) [0] differ from rank(s) [1, 2]"
    ]
    problems, _ = _global_problems(_records(4, weight_digest=[1, 2, 2, 1], weight_length=[8] * 4))
    assert problems == ["weight must be the same on every rank, but in the class weights rank(s) [1, 2] differ "
                        "from rank(s) [0, 3]"]  # fmt: skip
    problems, _ = _global_problems(_records(3, chunk_budget=[5, 5, 6]))
    assert problems[0].endswith("but in their values rank(s) [2] differ from rank(s) [0, 1]")


def test_ranks_that_call_different_functions_are_told_so():
    """One rank on the logits form and another on the linear form had been told of in_features
    [0, 3], or of options they never passed (inplace_backward, to the log-probabilities)."""
    from xentkit.torch.distributed._agreement import _global_problems

    problems, bad_label = _global_problems(_records(2, function=[0, 1], features=[0, 3], option_reduction=[1, 2]))
    assert problems == [
        "every rank must call the same function, got ['vocab_parallel_cross_entropy', "
        "'vocab_parallel_linear_cross_entropy'] on ranks 0..1"
    ] and not bad_label
