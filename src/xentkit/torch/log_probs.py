"""Token log-probabilities and entropies for PyTorch, from logits or straight from hidden states.

``log_probs(logits, target)`` and ``linear_log_probs(x, W, target)`` give, per position, log p(y)
(and on request the entropy H and the log-sum-exp) of softmax(z / T), differentiable with any
upstream gradients (formulas: :mod:`xentkit.reference.log_probs`). ``linear_log_probs`` never
holds the ``[N, V]`` logits. Per chunk of rows, into one reused ``[rows, V]`` buffer:

forward
    1. ``logits = x_chunk Wᵀ (+ b)``                     one matmul, ``out=`` the buffer
    2. pass 1 over the chunk: each row's (m, e, u, z_y)  (the row backend, see below)
    then, per row: log p(y), H and lse (``reference.log_probs.row_statistics``); kept for
    backward: m, e, log s, H (four numbers per row; e = s − 1) and the inputs.
backward (the upstream gradients are known only now, so each chunk's logits are recomputed:
one more matmul instead of keeping the logits)
    1. ``logits = x_chunk Wᵀ (+ b)``                     into the buffer again
    2. pass 2 writes ∂/∂logits over the logits           (coefficients from the upstream grads)
    3. ``grad_x[chunk] = dz W``,  ``grad_W += dzᵀ x_chunk``,  ``grad_b += Σ_rows dz``

Row backends (``_log_prob_rows``): plain CPU float32/float64 tensors run the fused Numba kernels;
CUDA float32/float16/bfloat16 tensors the fused Triton kernels (``xentkit.triton.log_probs``, when
Triton is installed; ``backend="triton"`` insists on them and says why when it cannot have them,
and takes CPU tensors only under Triton's interpreter, ``TRITON_INTERPRET=1``); everything else
(CPU float16/bfloat16, CUDA float64, ``backend="torch"``) the same two passes in torch ops, per
chunk, in float32 (float64 for float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, overload

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .._labels import _bad_labels, check_index_layout
from .._labels import check_labels as _check_labels
from .._options import Integer, LogProbOptions, Real, check_flag, describe, select_outputs
from ..api._config import reference_enabled
from ..api._validation import class_axis_of_shape
from ..reference.log_probs import gradient_coefficients
from . import _bridge, _log_prob_ops, _numba_ops, _triton_path, functional
from ._chunks import (
    add_chunk_gradients,
    batched_chunk_gradients,
    chunk_rows,
    detached,
    finish_gradients,
    gradient_buffers,
    idle_chunks,
    idle_flags,
    logit_chunks,
)
from ._linear_checks import check_linear
from ._log_prob_rows import NumbaRows, TorchRows, TritonRows, finish_rows

__all__ = ["linear_log_probs", "log_probs"]


def _check_labels_reading(
    labels: Tensor, num_classes: int, ignore_index: int, read: Callable[[Tensor], Tensor], *,
    classes: str | None = None, name: str = "target",
) -> tuple[Tensor, list[bool]]:
    """``_labels.check_labels`` of a tensor on a device, with one more device value brought back in the
    same transfer: ``read(valid)``, a 1-D bool tensor computed from the mask (e.g. which chunks of
    rows hold no valid row), returned as a list beside the mask. One wait for the device instead
    of two. A bad label raises as ``check_labels`` does (its message built after a second
    look, on the error path only)."""
    valid = labels != ignore_index
    bad = _bad_labels(labels, num_classes, ignore_index, valid)
    flags = torch.cat([bad.any().reshape(1), read(valid).reshape(-1)]).tolist()  # the one wait
    if flags[0]:
        _check_labels(labels, num_classes, ignore_index, classes=classes, name=name)
    return valid, flags[1:]


def _rows_backend(
    logits_like: Tensor, options: LogProbOptions, *others: Tensor | None, name: str = "logits",
    grid: tuple[int, int] | None = None,
) -> type:
    """The row backend of this call (see the module docstring); ``backend="triton"`` raises,
    saying why, when the Triton kernels cannot run it (``name``: what ``logits_like`` is called;
    ``grid``: the launches' rows and classes, the logits' by default)."""
    if _triton_path.takes_triton(
        options.backend, logits_like.device.type == "cuda",
        lambda: _triton_path.tensor_reason(
            logits_like, name=name, grid=grid or _triton_path.rows_and_classes(logits_like, -1)
        ),
    ):
        return TritonRows
    if (
        options.backend == "auto" and logits_like.dtype in _bridge.NUMBA_DTYPES and not reference_enabled()
        and _bridge.runs_on_xentkit(logits_like, *others)
    ):
        return NumbaRows
    return TorchRows  # (also under xentkit.use_reference(): the formulas in torch ops, no kernel)


def _coefficients(ctx: FunctionCtx, grads: tuple[Tensor | None, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """(a, t, k) per row from the upstream gradients of (log p, H, lse) (None: unused)."""
    dtype = ctx.log_s.dtype
    g, h, k = (
        ctx.log_s.new_zeros(()) if grad is None else grad.reshape(-1).to(dtype) for grad in grads
    )
    return gradient_coefficients(ctx.log_s, ctx.entropy, g, h, k)


def _unit_coefficients(ctx: FunctionCtx, output: int) -> tuple[Tensor, Tensor, Tensor]:
    """(a, t, k) per row for upstream ones on output ``output`` of (log p, H, lse) and none on the
    others: the gradient is linear in the upstream gradients, so a batched backward's is
    Σ_o grad_o · (this output's gradient at ones)."""
    ones = torch.ones_like(ctx.log_s)
    return _coefficients(ctx, tuple(ones if index == output else None for index in range(3)))


def _batched_logits_gradient(
    ctx: FunctionCtx, rows: type, logits: Tensor, labels: Tensor, valid: Tensor, m: Tensor, e: Tensor,
    grads: tuple[Tensor | None, ...], start: int = 0,
) -> Tensor:
    """The gradient of the ``[r, V]`` ``logits`` (rows ``start`` to ``start + r`` of the call) in
    a batched backward (``_bridge.batched_backward``): per output with an upstream gradient, the
    row backend's gradient at upstream ones on it alone (plain tensors), times the batch's
    upstream gradient out of place, summed over the outputs."""
    stop = start + logits.shape[0]
    total: Tensor | None = None
    for output, grad in enumerate(grads):
        if grad is None:
            continue
        part = tuple(
            c.expand(ctx.log_s.shape[0])[start:stop] if c.dim() == 0 else c[start:stop]
            for c in _unit_coefficients(ctx, output)
        )
        unit = rows.gradient(logits, labels, valid, ctx.options.temperature, m, e, part, torch.empty_like(logits))
        term = _bridge.batched_product(unit, grad.reshape(-1, 1)[start:stop])
        total = term if total is None else total + term
    return torch.zeros_like(logits) if total is None else total


def _finish(ctx: FunctionCtx, statistics: tuple[Tensor, ...], valid: Tensor, shape: torch.Size, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Per-row outputs from (m, e, u, z_y); keeps (m, e, log s, H) on ``ctx`` for backward."""
    log_p, entropy, lse, log_s, kept = finish_rows(statistics, valid, dtype, shape)
    return _keep(ctx, statistics[0], statistics[1], log_s, kept, (log_p, entropy, lse))


def _keep(
    ctx: FunctionCtx, m: Tensor, e: Tensor, log_s: Tensor, entropy: Tensor, outputs: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """Keeps the rows' (m, e, log s, H) on ``ctx`` for backward; returns ``outputs``."""
    ctx.m, ctx.e, ctx.log_s, ctx.entropy = m, e, log_s, entropy
    return outputs


class _LogProbsFunction(torch.autograd.Function):
    """log p(y), H, lse of existing logits ``[rows, V]``; backward is one pass of the kernel."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, logits: Tensor, target: Tensor, valid: Tensor, options: LogProbOptions, rows: type,
    ) -> tuple[Tensor, Tensor, Tensor]:
        _bridge.first_order_anchors(ctx, logits)
        matrix = logits.detach().reshape(-1, logits.shape[-1]).contiguous()
        labels = target.reshape(-1)
        ctx.options, ctx.rows, ctx.valid = options, rows, valid.reshape(-1)
        (m, e, _, _), (log_p, entropy, lse, log_s, kept) = rows.finished(
            matrix, labels, ctx.valid, options.temperature, target.shape
        )
        ctx.save_for_backward(logits, target)
        return _keep(ctx, m, e, log_s, kept, (log_p, entropy, lse))

    @staticmethod
    @_bridge.first_order_only("log_probs", _bridge.LOG_PROBS_DOUBLE_BACKWARD)
    def backward(ctx: FunctionCtx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        logits, target = ctx.saved_tensors
        matrix = logits.detach().reshape(-1, logits.shape[-1]).contiguous()
        if _bridge.batched_backward(*grads):  # (is_grads_batched: out of place, by linearity)
            grad = _batched_logits_gradient(ctx, ctx.rows, matrix, target.reshape(-1), ctx.valid, ctx.m, ctx.e, grads)
            return grad.reshape(logits.shape), None, None, None, None
        grad = torch.empty_like(matrix)
        ctx.rows.gradient(
            matrix, target.reshape(-1), ctx.valid, ctx.options.temperature, ctx.m, ctx.e,
            _coefficients(ctx, grads), grad,
        )
        return grad.reshape(logits.shape), None, None, None, None


def _traced(options: LogProbOptions, *tensors: Tensor | None, compiled_ops: bool = False) -> bool:
    """Whether this call is traced by torch.compile or runs inside a torch.func transform (vmap,
    grad; its own tensors wrapped or not): then the outputs are torch ops that autograd
    differentiates (``TorchRows.traced``), not an autograd Function around the kernels, and no
    label is looked at. ``backend="triton"`` says
    then that it cannot run (a ValueError). ``compiled_ops``: the caller has custom ops for
    torch.compile (``linear_log_probs``), so only torch.func counts."""
    compiling = torch.compiler.is_compiling()
    if compiling:
        traced = not compiled_ops
    else:
        traced = _bridge.transforms_running(*(tensor for tensor in tensors if tensor is not None))
    if traced and options.backend == "triton":
        where = "torch.compile" if compiling else "torch.func transforms (vmap, grad)"
        raise ValueError(
            f"backend='triton' cannot run this call: the Triton log-probability kernels do not run under "
            f"{where}; backend='auto' runs torch ops there"
        )
    return traced


def _linear_label_masks(
    target: Tensor, classes: int, options: LogProbOptions, rows: type, classes_text: str
) -> tuple[Tensor, Tensor | None, tuple[bool, ...] | None]:
    """:func:`_label_masks` of the eager ``linear_log_probs`` (``target`` in the caller's shape,
    the masks returned flat, one per input row), and which chunks of rows backward
    skips (none of their rows valid), with no wait of their own: on the CPU they are read at no
    cost; on a device they come back with the label check's one wait
    (:func:`_check_labels_reading`), and without that check (``check_labels=False``, which
    promises no wait) none is skipped (None)."""
    chunk = options.chunk_size
    if _reading_waits(target) and _bridge.values_readable(target):
        if options.check_labels:
            valid, flags = _check_labels_reading(
                target, classes, options.ignore_index, lambda valid: idle_flags(valid.reshape(-1), chunk),
                classes=classes_text,
            )
            return valid.reshape(-1), None, tuple(flags)
        valid, bad = _label_masks(target, classes, options, rows, classes_text)
        return valid.reshape(-1), _flat(bad), None
    valid, bad = _label_masks(target, classes, options, rows, classes_text)
    valid = valid.reshape(-1)
    return valid, _flat(bad), idle_chunks(valid, chunk)


def _flat(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else mask.reshape(-1)


def _reading_waits(tensor: Tensor) -> bool:
    """Whether reading ``tensor``'s values waits for a device (not for CPU tensors)."""
    return tensor.device.type != "cpu"


def _label_masks(
    target: Tensor, classes: int, options: LogProbOptions, rows: type | None, classes_text: str | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(valid, bad)``: the positions whose target is not ``ignore_index``, and among them those
    whose target lies outside ``[0, classes)`` (None when the targets were checked: a bad one
    raised the ValueError). They are checked unless ``check_labels=False`` where the check
    would wait for the device (the Numba kernels' CPU tensors are always checked: it costs no
    wait there), and never where nothing may wait or be branched on (``rows`` None: a traced
    call, or meta and fake tensors). Unchecked, a bad target is not read (the row backends' contract);
    :func:`_nan_where_bad` makes its log-probability NaN."""
    if rows is not None and _bridge.values_readable(target) and (options.check_labels or rows is NumbaRows):
        return _check_labels(target, classes, options.ignore_index, classes=classes_text), None
    # (compiled on the CPU, checked: by an op in the graph, eager's ValueError)
    target = _bridge.labels_checked_in_graph(target, classes, options.ignore_index, classes_text, check=options.check_labels)
    valid = target != options.ignore_index
    return valid, _bad_labels(target, classes, options.ignore_index, valid)


def _nan_where_bad(results: tuple[Tensor, Tensor, Tensor], bad: Tensor | None) -> tuple[Tensor, ...]:
    """The log-probabilities of the positions marked ``bad`` NaN, their gradient NaN too (a
    product, so that NaN reaches the logits' gradient of those rows); the entropy and the lse do
    not depend on the target and stay as they are."""
    if bad is None:
        return results
    log_p, *rest = results
    return log_p * torch.where(bad.reshape(log_p.shape), torch.nan, 1.0).to(log_p.dtype), *rest


def _check_target(
    target: object, sample_shape: tuple[int, ...], expected: str, classes: int, ignore_index: int,
    classes_text: str | None = None,
) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor of class indices, got {describe(target)}")
    _bridge.check_dense(target, "target")
    check_index_layout(
        not target.is_floating_point() and not target.is_complex() and target.dtype != torch.bool,
        tuple(target.shape), sample_shape, dtype_name=target.dtype,
        expected_shape=expected,
    )
    # int64, as the other paths: compared with a narrower tensor, ignore_index and the class
    # count would be cast to its dtype first (-100 is 156 in uint8, 2**32 is 0 in int32); uint64
    # labels beyond int64 are refused before the cast would wrap them
    return _bridge.int64_labels(target, classes, ignore_index, classes_text)


# The result's type follows the return_* flags (a type checker picks the overload from literals).
@overload
def log_probs(
    logits: Tensor, target: Tensor, *, temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[False] = ..., return_lse: Literal[False] = ..., backend: str = ..., check_labels: bool = ...,
) -> Tensor: ...
@overload
def log_probs(
    logits: Tensor, target: Tensor, *, temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[True], return_lse: Literal[False] = ..., backend: str = ..., check_labels: bool = ...,
) -> tuple[Tensor, Tensor]: ...
@overload
def log_probs(
    logits: Tensor, target: Tensor, *, temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[False] = ..., return_lse: Literal[True], backend: str = ..., check_labels: bool = ...,
) -> tuple[Tensor, Tensor]: ...
@overload
def log_probs(
    logits: Tensor, target: Tensor, *, temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[True], return_lse: Literal[True], backend: str = ..., check_labels: bool = ...,
) -> tuple[Tensor, Tensor, Tensor]: ...
@overload
def log_probs(
    logits: Tensor, target: Tensor, *, temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: bool = ..., return_lse: bool = ..., backend: str = ..., check_labels: bool = ...,
) -> Tensor | tuple[Tensor, ...]: ...


def log_probs(
    logits: Tensor,
    target: Tensor,
    *,
    temperature: Real = 1.0,
    ignore_index: Integer = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
    check_labels: bool = True,
) -> Tensor | tuple[Tensor, ...]:
    r"""The log-probability of each position's target token under softmax(logits / T) (T = ``temperature``), and on
    request the entropy and the log-sum-exp, with their gradients.

    With z = logits / T, lse = log Σ_c exp z_c, p = softmax(z):
    log p(y) = z_y − lse (≤ 0) and H = lse − Σ_c p_c·z_c (≥ 0); the gradient of
    Σ g·log p(y) + Σ h·H + Σ k·lse is ∂/∂z_j = g·([j = y] − p_j) − h·p_j·(z_j − lse + H) + k·p_j,
    divided by T for the logits (formulas and algorithm: :func:`xentkit.log_probs`).

    Shapes: logits ``[..., V]`` (classes last), target integer ``[...]``. Each output has the
    target's shape and dtype float32 (float64 for float64 logits), and is differentiable with
    respect to the logits with any upstream gradient (an output nobody uses costs nothing). A
    position whose target is ``ignore_index`` gets log-prob 0, entropy 0, lse 0 and no gradient.
    Returns ``log_probs``, or ``(log_probs, entropy)``, ``(log_probs, lse)``,
    ``(log_probs, entropy, lse)`` as asked (``return_entropy``, ``return_lse``). ``backend``: "auto" (CPU float32/float64: the fused
    Numba kernels; CUDA float32/float16/bfloat16: the fused Triton kernels; otherwise torch ops
    in float32, float64 for float64), "triton" (the Triton kernels or a ValueError saying why not) or "torch". Double
    backward raises, except where the outputs are plain torch ops (below).

    A target outside ``[0, V)`` that is not ``ignore_index`` is a ValueError naming it. On CUDA
    that check waits for the device once; ``check_labels=False`` skips it there (and on the
    torch-ops path): such a position's log-probability is then NaN, and so is its row's
    gradient, while its entropy and lse stay right (nothing is read out of bounds). CPU tensors
    on the Numba kernels are always checked (no wait). Under ``torch.compile`` (no graph break,
    ``fullgraph=True`` works) calls beyond small problems (65536 logits), and every call with
    ``backend="triton"``, run the kernels inside custom ops (eager's values and gradients);
    small ones, and calls under torch.func transforms (``vmap``, per-sample ``grad``), run the
    same formulas in torch ops, differentiated by autograd (under torch.func they have a second
    derivative; torch.compile's autograd refuses a double backward). There a
    CUDA target is not checked (a bad one gives NaN as with ``check_labels=False``), nor under
    torch.func; a compiled call on CPU tensors checks its targets with an op in its graph
    (eager's ``ValueError``, naming a bad one) unless ``check_labels=False``.

    >>> import torch, xentkit.torch as xt
    >>> logits = torch.tensor([[3.0, 1.0, -3.0], [0.0, 0.0, 0.0]], requires_grad=True)
    >>> lp, h = xt.log_probs(logits, torch.tensor([0, 2]), return_entropy=True)
    >>> lp, h
    (tensor([-0.1291, -1.0986], grad_fn=<_LogProbsFunctionBackward>), tensor([0.3801, 1.0986], grad_fn=<_LogProbsFunctionBackward>))

    See also: :func:`linear_log_probs` (from hidden states, without the logits).
    """
    options = LogProbOptions(temperature, ignore_index, None, backend, check_labels)
    return_entropy = check_flag(return_entropy, "return_entropy")
    return_lse = check_flag(return_lse, "return_lse")
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {describe(logits)}")
    _bridge.check_dense(logits, "logits")
    class_axis_of_shape(tuple(logits.shape), -1, "logits")
    _bridge.check_temperature_fits(options, logits.dtype)
    classes = logits.shape[-1]
    target = _check_target(
        target, tuple(logits.shape[:-1]), "(one class index per row of logits)", classes, options.ignore_index
    )
    if target.device != logits.device:
        raise ValueError(f"target must be on the logits' device {logits.device}, got {target.device}")
    # under torch.compile, beyond small problems, custom ops around the row backends (as the linear
    # form's); small ones and torch.func transforms trace torch ops. backend="triton" takes the
    # ops at every size, as cross_entropy's (the small-problem cut is the CPU's speed rule; a
    # compiled loop's last, smaller batch must not fail)
    use_ops = (
        torch.compiler.is_compiling() and not _numba_ops.transforms_active()
        and (
            options.backend == "triton"
            or _numba_ops.compiled_beyond_small(logits.numel(), functional.SMALL_MAX_LOGITS)
        )
    )
    if _traced(options, logits, target, compiled_ops=use_ops):
        valid, bad = _label_masks(target, classes, options, None)
        matrix, labels = logits.reshape(-1, classes), target.reshape(-1)
        results = tuple(
            value.to(_bridge.at_least_float32(logits.dtype)).reshape(target.shape)
            for value in TorchRows.traced(matrix, labels, valid.reshape(-1), options.temperature)
        )
    elif use_ops:  # (checked by an op in the graph on the CPU; else a bad target's log-probability is NaN)
        valid, bad = _label_masks(target, classes, options, None)
        results = tuple(
            value.reshape(target.shape)
            for value in _log_prob_ops.log_probs(
                logits.reshape(-1, classes), target.reshape(-1), valid.reshape(-1), options
            )
        )
    else:
        rows = _rows_backend(logits, options, target)
        valid, bad = _label_masks(target, classes, options, rows)
        results = _LogProbsFunction.apply(logits, target, valid, options, rows)
    return select_outputs(_nan_where_bad(results, bad), return_entropy, return_lse)


def linear_statistics(
    x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, valid: Tensor, options: LogProbOptions, rows: type,
    buffer: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Forward steps 1-2 over the chunks (module docstring) on contiguous detached operands:
    each row's (m, e, u, z_y) in ``rows.statistics_dtype``; ``buffer``: the reused
    ``[chunk, V]`` logits buffer (made here when None)."""
    n = x.shape[0]
    dtype = rows.statistics_dtype(x.dtype, x.device)
    statistics = [torch.empty(n, dtype=dtype, device=x.device) for _ in range(4)]
    if buffer is None:
        buffer = torch.empty((min(options.chunk_size, n), w.shape[0]), dtype=x.dtype, device=x.device)
    for start, stop, _, logits in logit_chunks(x, w, b, buffer, options.chunk_size):
        chunk = rows.statistics(logits, target[start:stop], valid[start:stop], options.temperature)
        for whole, part in zip(statistics, chunk, strict=False):
            whole[start:stop] = part
    return tuple(statistics)


def linear_gradients(
    x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, valid: Tensor, options: LogProbOptions, rows: type,
    m: Tensor, e: Tensor, coefficients: tuple[Tensor, Tensor, Tensor], want: tuple[bool, bool, bool],
    buffer: Tensor | None = None, skip: tuple[bool, ...] | None = None,
) -> tuple[Tensor | None, ...]:
    """Backward steps 1-3 over the chunks: the input, weight and bias gradients ``want``ed (else
    None) for the rows' coefficients (a, t, k); ``skip``: chunks with nothing to differentiate."""
    n = x.shape[0]
    buffers = gradient_buffers(x, w, b, want, zero_input=True)
    if buffer is None:
        buffer = torch.empty((min(options.chunk_size, n), w.shape[0]), dtype=x.dtype, device=x.device)
    for start, stop, x_chunk, logits in logit_chunks(x, w, b, buffer, options.chunk_size, skip=skip):
        part = tuple(c.expand(n)[start:stop] if c.dim() == 0 else c[start:stop] for c in coefficients)
        dz = rows.gradient(
            logits, target[start:stop], valid[start:stop], options.temperature, m[start:stop], e[start:stop],
            part, logits,
        )
        add_chunk_gradients(dz, x_chunk, w, buffers, start, stop)
    return finish_gradients(buffers, w, b)


class _LinearLogProbsFunction(torch.autograd.Function):
    """Chunked linear + log-probabilities; see the module docstring for the algorithm."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor,
        valid: Tensor, options: LogProbOptions, rows: type, idle: tuple[bool, ...] | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        _bridge.first_order_anchors(ctx, input, linear_weight, linear_bias)
        x, w, b = detached(input, linear_weight, linear_bias)
        ctx.options, ctx.rows, ctx.valid, ctx.idle = options, rows, valid, idle
        buffer = torch.empty((min(options.chunk_size, x.shape[0]), w.shape[0]), dtype=x.dtype, device=x.device)
        # on the CPU backward reuses the chunk buffer (≤ 32 MiB; a new one of the same size would
        # often come from the allocator's heap next to the old one's cached pages: a second
        # buffer of RSS); on a device the caching allocator hands the freed block back, so none is
        # held between forward and backward (a review: up to 512 MiB per call, several graphs
        # before one backward)
        ctx.buffer = buffer if x.device.type == "cpu" and any(ctx.needs_input_grad[:3]) else None
        statistics = linear_statistics(x, w, b, target, valid, options, rows, buffer)
        ctx.save_for_backward(input, linear_weight, linear_bias, target)
        return _finish(ctx, statistics, valid, target.shape, x.dtype)

    @staticmethod
    @_bridge.first_order_only("linear_log_probs", _bridge.LOG_PROBS_DOUBLE_BACKWARD)
    def backward(ctx: FunctionCtx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        input, linear_weight, linear_bias, target = ctx.saved_tensors
        x, w, b = detached(input, linear_weight, linear_bias)
        # chunks with no position to differentiate (padding) skip their three matmuls, as forward
        # found them (backward itself never waits for the device)
        buffer, ctx.buffer = ctx.buffer, None  # (None in a second backward of a retained graph)
        if _bridge.batched_backward(*grads):  # (is_grads_batched: out of place, by linearity)
            gradients = batched_chunk_gradients(
                x, w, b, ctx.options.chunk_size, tuple(ctx.needs_input_grad[:3]),
                lambda logits, start, stop: _batched_logits_gradient(
                    ctx, ctx.rows, logits, target[start:stop], ctx.valid[start:stop], ctx.m[start:stop],
                    ctx.e[start:stop], grads, start,
                ),
            )
            return *gradients, None, None, None, None, None
        gradients = linear_gradients(
            x, w, b, target, ctx.valid, ctx.options, ctx.rows, ctx.m, ctx.e, _coefficients(ctx, grads),
            tuple(ctx.needs_input_grad[:3]), buffer, skip=ctx.idle,
        )
        return *gradients, None, None, None, None, None


# The result's type follows the return_* flags (a type checker picks the overload from literals).
@overload
def linear_log_probs(
    input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Tensor | None = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[False] = ..., return_lse: Literal[False] = ..., chunk_size: int | None = ..., backend: str = ..., check_labels: bool = ...,
) -> Tensor: ...
@overload
def linear_log_probs(
    input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Tensor | None = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[True], return_lse: Literal[False] = ..., chunk_size: int | None = ..., backend: str = ..., check_labels: bool = ...,
) -> tuple[Tensor, Tensor]: ...
@overload
def linear_log_probs(
    input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Tensor | None = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[False] = ..., return_lse: Literal[True], chunk_size: int | None = ..., backend: str = ..., check_labels: bool = ...,
) -> tuple[Tensor, Tensor]: ...
@overload
def linear_log_probs(
    input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Tensor | None = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[True], return_lse: Literal[True], chunk_size: int | None = ..., backend: str = ..., check_labels: bool = ...,
) -> tuple[Tensor, Tensor, Tensor]: ...
@overload
def linear_log_probs(
    input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Tensor | None = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: bool = ..., return_lse: bool = ..., chunk_size: int | None = ..., backend: str = ..., check_labels: bool = ...,
) -> Tensor | tuple[Tensor, ...]: ...


def linear_log_probs(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    temperature: Real = 1.0,
    ignore_index: Integer = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    check_labels: bool = True,
) -> Tensor | tuple[Tensor, ...]:
    r"""Per-token log-probabilities (and entropies) of ``input @ linear_weight.T + linear_bias``
    at temperature T, without ever holding the logits.

    The values and gradients of :func:`log_probs` on z = (x Wᵀ + b)/T, i.e. log p(y) = z_y − lse
    and H = lse − Σ_c p_c·z_c, carried through the linear layer: ∂/∂x = dℓ·W, ∂/∂W = dℓᵀ·x,
    ∂/∂b = Σ_rows dℓ, with dℓ the gradient of the logits x Wᵀ + b (:func:`log_probs`'s, 1/T
    included). What PPO / GRPO
    trainers need per sampled token (the ratio of new to old log-probs, an entropy bonus), at the
    memory of a few chunks of logits instead of all of them.

    Rows are processed ``chunk_size`` at a time (default: as :func:`linear_cross_entropy`, a
    chunk's logits at most 1/16 of the full logits and at most 32 MiB on the CPU; 512 MiB on CUDA).
    Forward keeps four numbers per row (on the CPU also the chunk buffer, for backward to
    reuse); backward recomputes each chunk's logits (one more matmul)
    and turns them into their gradient in place, then two matmuls give the input and weight
    gradients. Chunks of ignored positions only are skipped in backward (on a device, where the
    labels are checked: the check's one wait finds them; backward never waits).

    Shapes: input ``[..., D]``, linear_weight ``[V, D]``, linear_bias ``[V]``, target integer
    ``[...]`` (input's leading shape). Outputs have the target's shape, dtype float32 (float64 for
    float64 inputs); a position whose target is ``ignore_index`` gets 0 and no gradient. Returns
    ``log_probs``, or a tuple with ``entropy`` and/or ``lse`` after it, as asked (``return_entropy``,
    ``return_lse``). ``backend``:
    "auto" (CPU float32/float64: the fused Numba kernels; CUDA float32/float16/bfloat16: the
    fused Triton kernels; otherwise the same passes in torch ops, per chunk), "triton" (the
    Triton kernels or a ValueError saying why not) or "torch". Double backward raises.
    ``check_labels`` as for :func:`log_probs`. Under ``torch.compile`` (``fullgraph=True``
    works) the chunks stay: two torch custom ops run the eager path's code on its row backend
    (on CUDA targets unchecked, a bad one's log-probability NaN; on the CPU checked by an op in
    the graph, as for :func:`log_probs`; chunks of ignored rows are not skipped in backward). Under torch.func transforms the whole ``[N, V]`` logits are formed
    (``F.linear``, then :func:`log_probs`' torch ops).

    >>> import torch, xentkit.torch as xt
    >>> x = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    >>> W = torch.tensor([[0.5, -0.5], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    >>> lp, h = xt.linear_log_probs(x, W, torch.tensor([2, 0]), temperature=0.5, return_entropy=True)
    >>> lp, h
    (tensor([-0.1328, -0.4927], grad_fn=<_LinearLogProbsFunctionBackward>), tensor([0.3993, 0.7426], grad_fn=<_LinearLogProbsFunctionBackward>))

    See also: :func:`log_probs` (logits already computed), :func:`linear_cross_entropy`.
    """
    options = LogProbOptions(temperature, ignore_index, chunk_size, backend, check_labels)
    return_entropy = check_flag(return_entropy, "return_entropy")
    return_lse = check_flag(return_lse, "return_lse")
    input, linear_weight, linear_bias = _bridge.autocast_operands(input, linear_weight, linear_bias)
    classes, _ = check_linear(input, linear_weight, linear_bias)
    _bridge.check_temperature_fits(options, input.dtype)
    classes_text = f"linear_weight has {classes} rows (classes)"
    target = _check_target(
        target, tuple(input.shape[:-1]), "(one class index per input row)", classes, options.ignore_index,
        classes_text,
    )
    if target.device != input.device:
        raise ValueError(f"target must be on the input's device {input.device}, got {target.device}")
    flat_target = target.reshape(-1)
    x = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])  # (-1 is ambiguous for D = 0)
    if _traced(options, input, linear_weight, linear_bias, target, compiled_ops=True):  # torch.func
        valid, bad = _label_masks(flat_target, classes, options, None, classes_text)
        logits = torch.nn.functional.linear(x, linear_weight, linear_bias)  # the whole logits
        results = tuple(
            value.to(_bridge.at_least_float32(x.dtype))
            for value in TorchRows.traced(logits, flat_target, valid, options.temperature)
        )
        return _finish_linear(results, bad, target, return_entropy, return_lse)
    if torch.compiler.is_compiling():  # custom ops the compiler keeps: the chunks (on the CPU an op checks the labels)
        # (the targets in the caller's shape: a bad one is named at its position there, as eager)
        valid, bad = _label_masks(target, classes, options, None, classes_text)
        valid, bad = valid.reshape(-1), _flat(bad)
        results = _log_prob_ops.linear_log_probs(x, linear_weight, linear_bias, flat_target, valid, options)
    else:
        options = options.replace(chunk_size=chunk_for(x, classes, options.chunk_size))
        rows = _rows_backend(
            x, options, linear_weight, linear_bias, target, name="input", grid=(min(len(x), options.chunk_size), classes)
        )
        # (the targets in the caller's shape: a bad one is named at its position there)
        valid, bad, idle = _linear_label_masks(target, classes, options, rows, classes_text)
        results = _LinearLogProbsFunction.apply(x, linear_weight, linear_bias, flat_target, valid, options, rows, idle)
    return _finish_linear(results, bad, target, return_entropy, return_lse)


def chunk_for(x: Tensor, classes: int, chunk_size: int | None) -> int:
    """Rows per chunk of ``linear_log_probs`` for the ``[N, D]`` input ``x`` (1 when N = 0)."""
    if not x.shape[0]:
        return 1
    return chunk_rows(x.shape[0], classes, x.element_size(), chunk_size, device_type=x.device.type)


def _finish_linear(
    results: tuple[Tensor, Tensor, Tensor], bad: Tensor | None, target: Tensor, return_entropy: bool,
    return_lse: bool,
) -> Tensor | tuple[Tensor, ...]:
    """The per-row results of ``linear_log_probs`` in the target's shape, as asked for."""
    results = _nan_where_bad(results, bad)
    if target.dim() != 1:
        results = tuple(result.reshape(target.shape) for result in results)
    return select_outputs(results, return_entropy, return_lse)
