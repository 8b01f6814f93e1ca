"""Vocabulary-parallel token log-probabilities (``vocab_parallel_linear_log_probs``) on real gloo
process groups.

Each world size (2 and 3 processes on 127.0.0.1; V = 11 classes split 6 + 5 and 4 + 4 + 3) is
spawned once by a module fixture and runs every scenario below in one process group; each rank
writes its findings to a JSON file and the tests read them. Every rank builds the same full input,
weight and bias (seeded), takes its rows of the weight, and compares its outputs and gradients
with the single-process answers: ``xentkit.torch.linear_log_probs`` on the full weight (the same
dtype) and float64 torch on the materialized logits (``log_softmax``). The spawning, the recorded
failures and the tolerances are those of ``test_distributed.py``.
"""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import torch.nn.functional as F  # noqa: E402

import xentkit.torch as xt  # noqa: E402
from test_distributed import (  # noqa: E402
    _all_reduces_during,
    _expect_error,
    _world_of_one,
    assert_close,
    check_findings,
    recorded,
    run_scenarios,
    spawn_group,
)
from xentkit._options import LogProbOptions, LossOptions  # noqa: E402
from xentkit.torch import distributed as vp  # noqa: E402
from xentkit.torch.distributed import _agreement  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

N, V, D = 13, 11, 6  # 11 classes: uneven over 2 (6 + 5) and 3 (4 + 4 + 3) ranks
IGNORED_ROWS = (2, 7)
SPAWN_DEADLINE_S = 300
# Shards given explicitly (vocab_start on every rank), out of rank order, one of them empty.
EXPLICIT_SHARDS = {2: [(5, 11), (0, 5)], 3: [(4, 11), (0, 0), (0, 4)]}
OUTPUTS = ("log_probs", "entropy", "lse")


# ---------------------------------------------------------------------------------------------
# The problem and the single-process answers
# ---------------------------------------------------------------------------------------------


def _problem(seed: int, bias_offset: float = 0.0):
    """Full input [N, D], weight [V, D], bias [V] (float64), target with ignored rows, and one
    upstream gradient per output (positive, so that none cancels)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=generator, dtype=torch.float64)
    w = torch.randn(V, D, generator=generator, dtype=torch.float64)
    b = torch.randn(V, generator=generator, dtype=torch.float64) + bias_offset
    target = torch.randint(0, V, (N,), generator=generator)
    target[list(IGNORED_ROWS)] = -100
    upstream = {name: torch.rand(N, generator=generator, dtype=torch.float64) + 0.5 for name in OUTPUTS}
    return x, w, b, target, upstream


def _torch_float64(x, w, b, target, temperature, upstream):
    """(outputs, gradients of x, w, b) by float64 torch on the materialized logits: log_softmax,
    H = −Σ p·log p, logsumexp; 0 and no gradient on ignored rows."""
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    z = F.linear(x, w, b) / temperature
    valid = target != -100
    log_p_all = torch.log_softmax(z, dim=-1)
    outputs = {
        "log_probs": torch.where(valid, log_p_all.gather(1, target.clamp(min=0)[:, None])[:, 0], 0.0),
        "entropy": torch.where(valid, -(log_p_all.exp() * log_p_all).sum(dim=-1), 0.0),
        "lse": torch.where(valid, torch.logsumexp(z, dim=-1), 0.0),
    }
    sum(((outputs[name] * up).sum() for name, up in upstream.items()), torch.zeros((), dtype=torch.float64)).backward()
    return outputs, (x.grad, w.grad, None if b is None else b.grad)


def _run(function, x, w, b, target, upstream, **options):
    """Outputs of ``function`` (all three asked for) and the gradients of x, w, b after backward of
    Σ upstream·output over the outputs named in ``upstream``."""
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    bias = {"linear_bias_shard" if function is vp.vocab_parallel_linear_log_probs else "linear_bias": b}
    values = function(x, w, target, return_entropy=True, return_lse=True, **bias, **options)
    outputs = dict(zip(OUTPUTS, values, strict=True))
    loss = sum((outputs[name] * up.to(outputs[name].dtype)).sum() for name, up in upstream.items())
    loss.backward()
    return outputs, (x.grad, w.grad, None if b is None else b.grad)


def _shard(world: int, rank: int, explicit: bool) -> tuple[int, int, int | None]:
    """(start, stop, vocab_start argument) of this rank's rows of the weight."""
    if explicit:
        start, stop = EXPLICIT_SHARDS[world][rank]
        return start, stop, start
    start, stop = vp.vocab_shard_range(V, world, rank)
    return start, stop, None


def _check_case(world, rank, *, dtype, bias, temperature, chunk_size=None, explicit=False, used=OUTPUTS,
                seed=3, bias_offset=0.0, backend="auto", target=None, against_xentkit=True):
    """One call on every rank; its outputs and this rank's gradients against both answers."""
    what = (f"dtype={dtype} bias={bias} T={temperature} chunk_size={chunk_size} explicit={explicit} "
            f"used={used} backend={backend} bias_offset={bias_offset} rank={rank}")
    with recorded(what):
        x, w, b, default_target, upstream = _problem(seed, bias_offset)
        target = default_target if target is None else target
        upstream = {name: upstream[name] for name in used}
        b = b if bias else None
        start, stop, vocab_start = _shard(world, rank, explicit)
        outputs, (grad_x, grad_w, grad_b) = _run(
            vp.vocab_parallel_linear_log_probs, x.to(dtype), w[start:stop].to(dtype),
            None if b is None else b[start:stop].to(dtype), target, upstream, temperature=temperature,
            chunk_size=chunk_size, vocab_start=vocab_start, backend=backend,
        )
        expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert all(value.dtype == expected_dtype and value.shape == (N,) for value in outputs.values())
        assert (outputs["log_probs"] <= 0).all() and (outputs["entropy"] >= 0).all()
        answers = [("torch float64", _torch_float64(x, w, b, target, temperature, upstream))]
        if against_xentkit:
            single = _run(xt.linear_log_probs, x.to(dtype), w.to(dtype), None if b is None else b.to(dtype),
                          target, upstream, temperature=temperature, chunk_size=chunk_size)
            answers.append(("xentkit.torch.linear_log_probs", single))
        for source, (expected, (ex_x, ex_w, ex_b)) in answers:
            for name in OUTPUTS:
                assert_close(outputs[name].detach(), expected[name].detach(), dtype, f"{name} vs {source}")
            assert_close(grad_x, ex_x, dtype, f"input gradient vs {source}")
            assert_close(grad_w, ex_w[start:stop], dtype, f"weight shard gradient vs {source}")
            if bias:
                assert_close(grad_b, ex_b[start:stop], dtype, f"bias shard gradient vs {source}")


# ---------------------------------------------------------------------------------------------
# Scenarios (run on every rank of a spawned group; a failed check is recorded, not raised)
# ---------------------------------------------------------------------------------------------


def scenario_values_and_gradients(world, rank):
    """Temperatures, bias or not, chunks (the last one short), even and explicit shards (out of
    rank order, one empty with 3 ranks), float64 and float32."""
    for dtype, bias, temperature, chunk_size, explicit in itertools.product(
        (torch.float64, torch.float32), (False, True), (1.0, 0.5, 2.0), (None, 4), (False, True)
    ):
        if dtype == torch.float32 and (explicit or temperature == 2.0):
            continue  # float32 on a subset: the arithmetic is the same
        _check_case(world, rank, dtype=dtype, bias=bias, temperature=temperature, chunk_size=chunk_size,
                    explicit=explicit)


def scenario_upstream(world, rank):
    """Any subset of the outputs differentiated: entropy only, log-probs only, lse only, two."""
    for used in (("entropy",), ("log_probs",), ("lse",), ("log_probs", "entropy")):
        _check_case(world, rank, dtype=torch.float64, bias=True, temperature=0.7, chunk_size=5,
                    explicit=True, used=used)


def scenario_torch_ops(world, rank):
    """The row passes in torch ops (CUDA and float16/bfloat16 take them): backend="torch" and the
    package switch USE_KERNELS = False, with an empty shard (3 ranks)."""
    for dtype in (torch.float64, torch.float32):
        _check_case(world, rank, dtype=dtype, bias=True, temperature=0.5, chunk_size=4, explicit=True,
                    backend="torch")
    vp.USE_KERNELS = False
    try:
        _check_case(world, rank, dtype=torch.float64, bias=True, temperature=1.5, explicit=True,
                    used=("entropy",))
    finally:
        vp.USE_KERNELS = True


def scenario_far_from_zero(world, rank):
    """Logits near −1000 (bias −500 at T = 0.5): exp(z) underflows unless every piece is shifted
    by the row's true max, which an empty shard must not raise to 0; and every row ignored."""
    for backend in ("auto", "torch"):
        _check_case(world, rank, dtype=torch.float64, bias=True, temperature=0.5, explicit=True,
                    bias_offset=-500.0, backend=backend)
    with recorded("every row ignored"):
        x, w, _, _, _ = _problem(5)
        start, stop, _ = _shard(world, rank, False)
        x = x.clone().requires_grad_(True)
        w_shard = w[start:stop].clone().requires_grad_(True)
        log_p, entropy = vp.vocab_parallel_linear_log_probs(
            x, w_shard, torch.full((N,), -100), return_entropy=True, chunk_size=4)
        (log_p + entropy).sum().backward()
        assert not log_p.any() and not entropy.any()
        assert not x.grad.any() and not w_shard.grad.any()


def scenario_input_grad_on_one_rank(world, rank):
    """The input requires a gradient on rank 0 only: every rank still takes part in its
    all-reduce (the record says some rank wants it), and rank 0 gets the full gradient."""
    with recorded("input gradient on rank 0 only"):
        x, w, _, target, upstream = _problem(7)
        start, stop, _ = _shard(world, rank, False)
        x_here = x.clone().requires_grad_(rank == 0)
        w_shard = w[start:stop].clone().requires_grad_(True)
        log_p = vp.vocab_parallel_linear_log_probs(x_here, w_shard, target, temperature=0.8)
        (log_p * upstream["log_probs"]).sum().backward()
        _, (ex_x, ex_w, _) = _torch_float64(x, w, None, target, 0.8, {"log_probs": upstream["log_probs"]})
        assert_close(w_shard.grad, ex_w[start:stop], torch.float64, "weight shard gradient")
        if rank == 0:
            assert_close(x_here.grad, ex_x, torch.float64, "input gradient")
        else:
            assert x_here.grad is None


def scenario_communication(world, rank):
    """Per chunk with a valid row: an all-reduce MAX of r and SUM of 4r float64; backward one
    all-reduce of the input gradient (N·D); a chunk of ignored rows only makes no collective."""
    x, w, _, target, _ = _problem(11)
    start, stop, _ = _shard(world, rank, False)
    record_bytes = world * len(vp._FIELDS) * 8
    quiet = target.clone()
    quiet[4:8] = -100  # chunk_size 4: chunks [0, 4), [4, 8) (idle), [8, 12), [12, 13)
    for labels, busy_rows, chunks in ((target, N, 4), (quiet, N - 4, 3)):
        with recorded(f"communication, {chunks} busy chunks"):
            stats = vp.CommunicationStats()
            x_leaf = x.clone().requires_grad_(True)
            log_p = vp.vocab_parallel_linear_log_probs(x_leaf, w[start:stop], labels, chunk_size=4, stats=stats)
            assert stats.all_gather_calls == 1 and stats.all_gather_bytes == record_bytes, stats
            assert stats.all_reduce_calls == 2 * chunks, stats
            assert stats.all_reduce_bytes == 8 * busy_rows * 5, stats
            assert _all_reduces_during(log_p.sum().backward) == 1
            assert stats.all_reduce_bytes == 8 * busy_rows * 5 + 8 * N * D, stats


def scenario_errors(world, rank):
    """Bad input on one rank raises on every rank (no hang), and the group stays usable."""
    x, w, _, target, _ = _problem(13)
    start, stop, _ = _shard(world, rank, False)
    w_shard = w[start:stop]
    bad = rank == 1

    def call(**overrides):
        arguments = {"input": x, "linear_weight_shard": w_shard, "target": target} | overrides
        return lambda: vp.vocab_parallel_linear_log_probs(**arguments)

    # a label outside [0, V) on one rank: V is only known globally
    out_of_range = target.clone()
    out_of_range[4] = V
    _expect_error(call(target=out_of_range if bad else target), "rank 1", f"label {V}", f"V = {V} classes")
    # temperatures that differ between ranks, and one that is invalid on rank 1 only
    _expect_error(call(temperature=0.5 if bad else 1.0), "temperature must be the same on every rank",
                  "[1.0, 0.5")
    _expect_error(call(temperature=0.0 if bad else 1.0), "rank(s) [1]", "temperature must be a finite float > 0")
    _expect_error(call(ignore_index=-1 if bad else -100), "ignore_index must be the same on every rank")
    _expect_error(call(chunk_size=3 if bad else 4), "chunk_size must be the same on every rank")
    # a wrong type on rank 1: TypeError there, ValueError elsewhere
    _expect_error(call(return_entropy="yes" if bad else True), "rank(s) [1]", "return_entropy must be a bool",
                  kind=TypeError if bad else ValueError)
    _expect_error(call(linear_weight_shard=w_shard[:, :-1] if bad else w_shard), "rank(s) [1]",
                  "input must have linear_weight_shard's in_features=5")
    _expect_error(call(target=target[:-1] if bad else target), "rank(s) [1]", "target must have shape")
    # a backend that cannot run these (CPU float64) tensors, on every rank
    _expect_error(call(backend="triton"), "rank(s) [0, 1", "backend='triton'")
    # still in step: a good call afterwards agrees with the single-process answers
    _check_case(world, rank, dtype=torch.float64, bias=True, temperature=0.5, chunk_size=4, seed=13)


SCENARIOS = {
    "values_and_gradients": scenario_values_and_gradients,
    "upstream": scenario_upstream,
    "torch_ops": scenario_torch_ops,
    "far_from_zero": scenario_far_from_zero,
    "input_grad_on_one_rank": scenario_input_grad_on_one_rank,
    "communication": scenario_communication,
    "errors": scenario_errors,
}


def _worker(rank: int, world: int, port: int, results: str) -> None:
    run_scenarios(rank, world, port, results, SCENARIOS)


def _warm_kernels() -> None:
    """Compile (or load) the Numba kernels here, so that the spawned ranks load them from the cache."""
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 2, dtype=dtype, requires_grad=True)
        xt.linear_log_probs(x, torch.randn(4, 2, dtype=dtype), torch.tensor([0, 3, -100])).sum().backward()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda world: f"world{world}")
def spawned(request, tmp_path_factory) -> tuple[int, dict[str, dict[int, str | None]]]:
    """Spawn one gloo group of ``world`` ranks that runs every scenario; its findings by scenario."""
    world = request.param
    _warm_kernels()
    return world, spawn_group(_worker, world, tmp_path_factory.mktemp(f"log_probs_world{world}"), SCENARIOS)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_rank_matches_the_single_process_answer(spawned, scenario):
    world, findings = spawned
    check_findings(findings, scenario, world)


# ---------------------------------------------------------------------------------------------
# In-process: a world of one (no process group, and a gloo group of one)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", ["none", "gloo"])
def test_a_world_of_one_is_linear_log_probs(world):
    with _world_of_one(world) as group:
        x, w, b, target, upstream = _problem(17)
        stats = vp.CommunicationStats()
        outputs, grads = _run(vp.vocab_parallel_linear_log_probs, x, w, b, target, upstream,
                              temperature=1.3, chunk_size=5, group=group, stats=stats)
        expected, expected_grads = _run(xt.linear_log_probs, x, w, b, target, upstream, temperature=1.3,
                                        chunk_size=5)
        for name in OUTPUTS:
            assert_close(outputs[name].detach(), expected[name].detach(), torch.float64, name)
        for grad, expected_grad, name in zip(grads, expected_grads, ("input", "weight", "bias"), strict=True):
            assert_close(grad, expected_grad, torch.float64, f"{name} gradient")
        assert stats.total_bytes == 0  # a world of one communicates nothing


def test_shapes_and_what_is_returned():
    x = torch.randn(2, 3, 4)
    w = torch.randn(5, 4)
    target = torch.tensor([[0, 4, -100], [1, 2, 3]])
    log_p = vp.vocab_parallel_linear_log_probs(x, w, target)
    assert log_p.shape == (2, 3) and log_p.dtype == torch.float32 and log_p[0, 2] == 0
    both = vp.vocab_parallel_linear_log_probs(x, w, target, return_lse=True)
    assert len(both) == 2
    torch.testing.assert_close(both[1], torch.logsumexp(x @ w.T, dim=-1).masked_fill(target == -100, 0))
    with torch.no_grad():
        assert not vp.vocab_parallel_linear_log_probs(x.requires_grad_(), w, target).requires_grad
    empty = vp.vocab_parallel_linear_log_probs(torch.zeros(0, 4), w, torch.zeros(0, dtype=torch.int64),
                                               return_entropy=True)
    assert [value.shape for value in empty] == [(0,), (0,)]


def test_errors_in_a_single_process_name_the_argument():
    x, w = torch.randn(4, 3), torch.randn(5, 3)
    target = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"label 5 .* V = 5 classes"):
        vp.vocab_parallel_linear_log_probs(x, w, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match=r"temperature must be a finite float > 0, got -1.0"):
        vp.vocab_parallel_linear_log_probs(x, w, target, temperature=-1.0)
    with pytest.raises(TypeError, match=r"temperature must be a positive float, got str 'hot'"):
        vp.vocab_parallel_linear_log_probs(x, w, target, temperature="hot")
    with pytest.raises(TypeError, match=r"input must be a floating-point tensor, got list \[\[1.0, 2.0, 3.0\]\]"):
        vp.vocab_parallel_linear_log_probs([[1.0, 2.0, 3.0]], w, target)
    with pytest.raises(ValueError, match=r"linear_bias_shard must have shape \(5,\), got \(4,\)"):
        vp.vocab_parallel_linear_log_probs(x, w, target, linear_bias_shard=torch.zeros(4))
    with pytest.raises(TypeError, match=r"input, linear_weight_shard and linear_bias_shard must share one dtype"):
        vp.vocab_parallel_linear_log_probs(x, w, target, linear_bias_shard=torch.zeros(5, dtype=torch.float64))


def test_double_backward_raises():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    log_p, entropy = vp.vocab_parallel_linear_log_probs(x, w, torch.tensor([0, 4, -100, 2]),
                                                        return_entropy=True)
    grad, = torch.autograd.grad((log_p + entropy).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(grad.square().sum() + x.sum(), x)


def test_the_record_carries_every_option_of_every_options_class():
    """The agreement record encodes LossOptions and LogProbOptions fields generically: each field
    once, each value decoded back, a field the call's options lack travelling as None."""
    names = {field for kind in (LossOptions, LogProbOptions) for field in kind.__dataclass_fields__}
    assert set(_agreement._OPTION_NAMES) == names
    assert len(_agreement._OPTION_NAMES) == len(names)
    assert {f"option_{name}" for name in names} <= set(vp._FIELDS)
    options = LogProbOptions(temperature=0.25, ignore_index=-(2**63), chunk_size=None, backend="torch")
    for name in names:
        value = getattr(options, name, None)
        assert _agreement._decode_option(name, _agreement._encode_option(name, value)) == value, name
