"""Public softmax cross-entropy: validation, layout, kernel-or-reference dispatch, reductions."""

from __future__ import annotations

import warnings
from typing import Literal, SupportsIndex

import numpy as np
from numpy.typing import ArrayLike

from .. import reference
from .._labels import as_class_indices, check_labels, holds_probabilities
from .._options import Integer, LossOptions, Real, as_array, callers_level, check_flag, loss_options
from ..reference.cross_entropy import z_term
from ..reference.reductions import ReductionPlan
from ._config import reference_enabled
from ._half import widened
from ._rows import (
    RowLayout,
    class_axis_last,
    class_rows,
    kernel_array,
    widened_blocks,
    widening_step,
)
from ._validation import (
    as_float_array,
    check_class_weight,
    check_out,
    class_axis,
    compute_dtype,
    copy_rounded,
    overlaps,
    rounded,
    upstream_gradient,
)


class ProbabilitiesAsLogitsWarning(UserWarning):
    """``cross_entropy`` got logits that look like probabilities: softmax applied twice?

    Silence it with ``check_probabilities=False`` or
    ``warnings.filterwarnings("ignore", category=xentkit.ProbabilitiesAsLogitsWarning)``.
    """


def _looks_like_probabilities(logits: np.ndarray, axis: int) -> bool:
    """Every value in [0, 1] and every slice along ``axis`` summing to 1.

    Screens one value, then a few values of the first sample, then that sample, before looking at
    everything, so that real logits cost almost nothing here.
    """
    if logits.shape[axis] < 2 or logits.size == 0:
        return False
    if not 0.0 <= logits.item(0) <= 1.0:  # the first sample's first class, whatever the axis
        return False
    moved = class_axis_last(logits, axis)
    tolerance = 1e-2 if logits.dtype == np.float16 else 1e-4
    first = moved[(0,) * (moved.ndim - 1)]
    head = first[:8].tolist()  # a few values as Python floats: real logits fail here in ~1 µs
    if not (all(0.0 <= value <= 1.0 for value in head) and sum(head) <= 1.0 + tolerance):
        return False
    if not (first.min() >= 0 and first.max() <= 1 and abs(float(first.sum(dtype=np.float64)) - 1) <= tolerance):
        return False
    if not (moved.min() >= 0 and moved.max() <= 1):
        return False
    return bool(np.all(np.abs(moved.sum(axis=-1, dtype=np.float64) - 1) <= tolerance))


def warn_if_probabilities(logits: np.ndarray, axis: int) -> None:
    """A :class:`ProbabilitiesAsLogitsWarning`, pointed at the user's call, when ``logits`` look
    like probabilities (softmax applied twice)."""
    if _looks_like_probabilities(logits, axis):
        warnings.warn(
            "logits look like probabilities (every value in [0, 1], summing to 1 along the class "
            "axis); did you apply softmax twice? Pass raw scores to cross_entropy, or silence "
            "this with check_probabilities=False.",
            ProbabilitiesAsLogitsWarning,
            stacklevel=callers_level(),
        )


_KERNEL: list = []  # the fused kernel's entry point, once imported


def _kernel_rows():
    """The fused kernel entry point, imported on first use so ``import xentkit`` stays light."""
    if not _KERNEL:
        from ..kernels import cross_entropy_rows

        _KERNEL.append(cross_entropy_rows)
    return _KERNEL[0]


def _reduced(
    loss_rows: np.ndarray, lse_rows: np.ndarray, valid: np.ndarray, options: LossOptions, plan: ReductionPlan
) -> np.ndarray:
    """The loss from the kernel's rows (``valid``: the samples' mask, of their shape)."""
    loss = plan.reduce(loss_rows, z_term(lse_rows, valid.reshape(loss_rows.shape), options.z_loss))
    return loss.reshape(valid.shape) if options.reduction == "none" else loss


def _fused_rows(
    logits: np.ndarray,
    labels: np.ndarray,
    axis: int,
    weight: np.ndarray | None,
    options: LossOptions,
    plan: ReductionPlan,
    upstream: np.ndarray | float | None,
    out: np.ndarray | None,
    private: bool,
    batch_rows: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Cross-entropy on the kernel: class axis last, rows × classes, one sweep. ``labels`` are
    class indices of the samples' shape, or class probabilities of the logits' shape (the
    probability kernel).

    ``logits`` is already in the compute dtype (float32 or float64); ``private`` says it is the
    api's own copy, free to be overwritten by the gradient. ``upstream``: the checked upstream
    gradient (``upstream_gradient``, or a float), None for no gradient. Returns the per-row
    losses and log-sum-exps (float64 ``[rows]``, for :func:`_reduced`) and the gradient in the
    logits' layout, in the compute dtype (or ``out``), or None."""
    layout = RowLayout(logits, axis, private)
    label_rows = layout.targets(labels) if labels.ndim == logits.ndim else layout.labels(labels)
    weight64 = None if weight is None else kernel_array(weight, np.float64)

    grad_matrix = None
    grad_scale = z_grad_scale = None
    if upstream is not None:
        # the reduction's scaling (1/Σw for "mean") applied here, then spread over the rows
        scale, z_scale = plan.scales(upstream)
        grad_scale = layout.per_row(scale)
        # without a z-loss the kernel never reads its scales: the same array serves
        z_grad_scale = layout.per_row(z_scale) if options.z_loss else grad_scale
        grad_matrix = layout.gradient_buffer(out)  # may be the logits themselves: in place

    loss_rows, lse_rows = _kernel_rows()(
        layout.matrix, label_rows, weight64, **options.formula_arguments(),
        grad_scale=grad_scale, z_grad_scale=z_grad_scale, grad_out=grad_matrix, batch_rows=batch_rows,
    )
    return loss_rows, lse_rows, None if grad_matrix is None else layout.in_layout(grad_matrix)


def _fused_by_blocks(
    original: np.ndarray,
    target: np.ndarray,
    probabilities: bool,
    valid: np.ndarray,
    axis: int,
    weight: np.ndarray | None,
    options: LossOptions,
    plan: ReductionPlan,
    upstream: np.ndarray | float | None,
    out: np.ndarray | None,
    grad_dtype: np.dtype,
    batch_rows: int | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Cross-entropy on the kernel (:func:`_fused_rows`) for half-precision ``original`` logits
    widened block by block (``_rows.widened_blocks``: rows, or entries of the first axis, never
    the class axis) into one reused buffer, where a whole copy in the compute dtype had doubled the call's memory.
    Each block's gradient is rounded into the result (``out``, else a new array of
    ``grad_dtype``) as it comes; the rows' losses are reduced once, as the whole's (the same
    bits: the kernel computes each row alone, with the whole batch's split of rows). A
    probability ``target`` is converted block by block too."""
    work_dtype = compute_dtype(original.dtype)
    loss_rows = np.empty(valid.size, dtype=np.float64)
    lse_rows = np.empty(valid.size, dtype=np.float64)
    per_sample = upstream is not None and options.reduction == "none"
    grad = blocks_grad = None
    if out is not None and upstream is not None:
        grad = blocks_grad = out
    elif upstream is not None:
        # a new gradient in the layout the whole computation gives it (the class axis last in memory)
        moved = np.empty(original.shape[:axis] + original.shape[axis + 1 :] + original.shape[axis : axis + 1], dtype=grad_dtype)
        grad = blocks_grad = np.moveaxis(moved, -1, axis)
    # [batch, sequence, vocabulary] logits (C-contiguous; a C-contiguous out, a contiguous
    # probability target: views of the same rows) cut by rows; else by the first axis
    flat = None
    if (out is None or out.flags.c_contiguous) and not (probabilities and not target.flags.c_contiguous):
        flat = class_rows(original, axis)
    blocks_of = original
    if flat is None:
        step = max(1, widening_step(original, axis, work_dtype))  # (a sequence batch by whole entries)
    else:
        blocks_of, axis = flat, 1
        step = widening_step(flat, 1, work_dtype)
        target = target.reshape(flat.shape if probabilities else flat.shape[:1])
        upstream = upstream.reshape(-1) if per_sample else upstream  # (upstream: rows' float64)
        blocks_grad = None if grad is None else grad.reshape(flat.shape)
    rows_per_entry = valid.size // blocks_of.shape[0]
    for start, stop, block in widened_blocks(blocks_of, step, work_dtype):
        labels = rounded(target[start:stop], work_dtype) if probabilities else target[start:stop]
        rows, lse, block_grad = _fused_rows(
            block, labels, axis, weight, options, plan, upstream[start:stop] if per_sample else upstream,
            None, True, batch_rows or valid.size,
        )
        loss_rows[start * rows_per_entry : stop * rows_per_entry] = rows
        lse_rows[start * rows_per_entry : stop * rows_per_entry] = lse
        if blocks_grad is not None:
            copy_rounded(blocks_grad[start:stop], block_grad)
    return _reduced(loss_rows, lse_rows, valid, options, plan), grad


_FLOAT64 = np.dtype(np.float64)


def _takes_blocks(logits: np.ndarray, axis: int, work_dtype: np.dtype, batch_rows: int | None) -> bool:
    """Whether half-precision ``logits`` are widened block by block (:func:`_fused_by_blocks`):
    beyond one block (``_rows.widening_step``, of their rows where ``_rows.class_rows`` takes
    them), and where the batch (``batch_rows`` for a chunked caller's) has at least as many rows
    as Numba's threads: the kernel then never splits a row, and each row's bits are the same in
    any block."""
    rows = class_rows(logits, axis)
    if not (widening_step(logits, axis, work_dtype) if rows is None else widening_step(rows, 1, work_dtype)):
        return False
    import numba

    return max(logits.size // logits.shape[axis], batch_rows or 0) >= numba.get_num_threads()


def _cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    axis: int,
    weight: ArrayLike | None,
    options: LossOptions,
    check_probabilities: bool,
    want_grad: bool,
    grad_output: ArrayLike | None = None,
    out: np.ndarray | None = None,
    plan: ReductionPlan | None = None,
    loss_dtype: np.dtype | None = None,
    grad_dtype: np.dtype | None = None,
    batch_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The api's cross-entropy with options already checked (the entry point of the torch
    binding and of ``linear_cross_entropy``'s chunks). ``plan``: the reduction plan to use
    instead of these samples' own (a chunked caller passes its whole batch's); ``loss_dtype``:
    the loss's dtype when it is not the logits' (torch promotes with floating targets), so that
    it is rounded once, from the computed value; ``grad_dtype``: the same for the gradient (the
    torch binding keeps a float16 input's gradient in float32 until its upstream is known);
    ``batch_rows``: the whole batch's rows, for a chunked caller (the kernel's ``batch_rows``)."""
    check_probabilities = check_flag(check_probabilities, "check_probabilities")
    # read once: another thread may switch it mid-call (a review: a kernel call without a plan)
    use_reference = reference_enabled()
    original = as_float_array(logits, "logits")
    axis = class_axis(original, axis, "logits")
    reduction = options.reduction
    num_classes = original.shape[axis]
    work_dtype = compute_dtype(original.dtype)
    if options.softcap is not None:
        options.check_fits(work_dtype, float(np.finfo(work_dtype).max), float(np.finfo(work_dtype).tiny))
    weight_given = weight
    weight = check_class_weight(weight, num_classes, work_dtype)
    sample_shape = original.shape[:axis] + original.shape[axis + 1 :]

    target_array = as_array(target, "target")
    probabilities = holds_probabilities(
        target_array.shape, original.shape, floating=target_array.dtype.kind == "f", dtype_name=target_array.dtype
    )
    # half-precision logits beyond a block: widened block by block (no whole float32 copy)
    blocks = not use_reference and work_dtype != original.dtype and _takes_blocks(original, axis, work_dtype, batch_rows)
    if probabilities:
        if not blocks:  # (the blocks convert their own rows)
            target_array = rounded(target_array, work_dtype)
        valid = np.ones(sample_shape, dtype=bool)  # every sample counts (the z term's rows)
        if plan is None:
            plan = ReductionPlan.of_rows(reduction, valid.size)
    else:
        target_array = as_class_indices(
            target_array, sample_shape, num_classes=num_classes, ignore_index=options.ignore_index,
            logits_shape=original.shape,
        )
        valid = check_labels(
            target_array, num_classes, options.ignore_index, compiled=not use_reference
        )
        if plan is None and not use_reference:
            plan = ReductionPlan.of_targets(
                reduction, target_array, options.ignore_index, weight, valid=valid
            )[1]

    upstream = None
    if want_grad:
        if grad_output is None and reduction != "none":
            upstream = 1.0  # a plain float: its scales are floats too, cheap to spread over rows
        else:
            # rounded to the compute dtype first, as the reference takes it (1e39 is inf in float32)
            upstream = upstream_gradient(grad_output, reduction, sample_shape, work_dtype).astype(_FLOAT64)
    if out is not None:
        out = check_out(out, original.shape, original.dtype)
        if overlaps(out, original) and not (
            out.ctypes.data == original.ctypes.data and out.strides == original.strides
        ):
            raise ValueError("out must be logits itself (in place) or an array that does not overlap logits")
        for name, other in (("weight", weight_given), ("target", target), ("grad_output", grad_output)):
            if isinstance(other, np.ndarray) and overlaps(out, other):
                raise ValueError(f"out must not overlap {name} (the gradient would overwrite it mid-computation)")
    if check_probabilities:
        warn_if_probabilities(original, axis)

    if blocks:
        loss, grad = _fused_by_blocks(
            original, target_array, probabilities, valid, axis, weight, options, plan, upstream, out,
            np.dtype(grad_dtype or original.dtype), batch_rows,
        )
        return rounded(loss, loss_dtype or original.dtype), grad
    work = widened(original, work_dtype)
    if use_reference:
        loss, grad = reference.cross_entropy_and_grad(
            work, target_array, axis=axis, weight=weight, reduction=reduction,
            **options.formula_arguments(), grad_output=upstream, want_grad=want_grad, plan=plan,
        )
    else:
        kernel_out = out if out is not None and out.dtype == work_dtype else None
        loss_rows, lse_rows, grad = _fused_rows(
            work, target_array, axis, weight, options, plan, upstream, kernel_out, work is not original, batch_rows
        )
        loss = _reduced(loss_rows, lse_rows, valid, options, plan)

    loss = rounded(loss, loss_dtype or original.dtype)
    if grad is None:
        return loss, None
    if out is not None:
        return loss, out if grad is out else copy_rounded(out, grad)
    return loss, rounded(grad, grad_dtype or original.dtype)  # (float16 beyond 65504: ±inf, no warning)


def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    axis: SupportsIndex = -1,
    weight: ArrayLike | None = None,
    ignore_index: Integer = -100,
    reduction: str = "mean",
    label_smoothing: Real = 0.0,
    z_loss: Real = 0.0,
    softcap: Real | None = None,
    check_probabilities: bool = True,
) -> np.ndarray:
    r"""Softmax cross-entropy of raw ``logits`` against class indices or class probabilities.

    Per sample, with ``z`` the logits along ``axis``, ``log p = z − logsumexp(z)``, class weights
    ``w`` (``weight``, shape ``[classes]``; ones by default), ``ε = label_smoothing`` and ``C`` classes::

        class index y:        loss = (1 − ε)·w_y·(−log p_y) + (ε/C)·Σ_c w_c·(−log p_c)
        probabilities q:      loss = −Σ_c w_c·((1 − ε)·q_c + ε/C)·log p_c
        z_loss > 0 adds       z_loss·logsumexp(z)²          (PaLM's auxiliary loss)
        softcap = s replaces  z by s·tanh(z/s) first        (Gemma 2)

    Without options this is note 004's hand formula ``−z_y + log Σ_i exp z_i``.

    Shapes: ``logits`` ``[batch, classes]`` with ``axis=-1``, or PyTorch's per-pixel layout
    ``[batch, classes, d1, ..., dk]`` with ``axis=1``; ``target`` either integer indices with the
    logits' shape minus ``axis`` (``-100``, or ``ignore_index``, skips a sample) or floating
    probabilities with the logits' shape.

    ``reduction``: "none" (a loss per sample), "sum", or "mean", which follows
    ``torch.nn.functional.cross_entropy``: hard labels divide by ``Σ w_y`` over non-ignored
    samples, probabilities by the number of samples. The z term is not class-weighted and its
    "mean" is over non-ignored samples. Where that denominator is 0 (every target ignored, no
    samples, or class weights summing to 0 over the targets), xentkit returns 0 and a zero
    gradient for that term (a z term still adds its own mean, over its own count of non-ignored
    samples): PyTorch returns NaN there (and ±inf when negative class weights sum to 0 beside a
    loss that is not 0).

    float16 is computed in float32 and returned as float16. A ``−inf`` logit is a masked class:
    probability 0 and no NaN while the target class is finite (with ``label_smoothing`` > 0 its
    smoothing term is +inf, as in PyTorch). A masked class of class weight 0 adds nothing, as a
    target or to the smoothing term: 0·log 0 = 0, where PyTorch gives NaN; with probabilities,
    likewise, a masked class of no weighted target mass adds nothing. Both hold on every path of
    ``xentkit.torch`` too. With a ``softcap`` s a −inf logit is capped to −s first (s·tanh(−∞) = −s), so it
    is no longer masked (any large negative logit lands there too): to mask, cap the logits
    yourself, set the masked ones to −inf, and pass ``softcap=None``. A warning (:class:`ProbabilitiesAsLogitsWarning`) is
    given when the logits look like probabilities; ``check_probabilities=False`` silences it.
    See also :func:`cross_entropy_and_grad` (loss and gradient in one sweep), :func:`nll_loss`.

    >>> import numpy as np, xentkit
    >>> np.round(xentkit.cross_entropy([[3.0, 1.0, -3.0]], [0]), 4)  # −log 0.879
    np.float64(0.1291)
    >>> np.round(xentkit.cross_entropy([[3.0, 1.0, -3.0], [0.0, 0.0, 0.0]], [0, 2], reduction="none"), 4)
    array([0.1291, 1.0986])
    """
    options = loss_options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    loss, _ = _cross_entropy(
        logits, target, axis=axis, weight=weight, options=options,
        check_probabilities=check_probabilities, want_grad=False,
    )
    return loss


def cross_entropy_and_grad(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    axis: SupportsIndex = -1,
    weight: ArrayLike | None = None,
    ignore_index: Integer = -100,
    reduction: str = "mean",
    label_smoothing: Real = 0.0,
    z_loss: Real = 0.0,
    softcap: Real | None = None,
    check_probabilities: bool = True,
    grad_output: ArrayLike | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Cross-entropy and its exact gradient with respect to the logits, in one sweep.

    Same arguments and loss as :func:`cross_entropy`. The gradient (note 002: "the output minus
    one at the true class") is, per sample and before the reduction's scaling::

        ∂loss/∂z_j = p_j·((1 − ε)·w_y + ε·Σ_c w_c / C) − (1 − ε)·w_y·[j = y] − ε·w_j/C
                     + 2·z_loss·logsumexp(z)·p_j

    i.e. ``softmax(z) − onehot(y)`` without options; with probabilities ``q'``
    ``∂loss/∂z_j = p_j·Σ_c w_c·q'_c − w_j·q'_j``; with a softcap it is multiplied by
    ``1 − tanh²(logits/s)``. Ignored samples get a zero gradient.

    ``grad_output``: the upstream gradient, a scalar for "mean"/"sum" or one value per sample
    for "none" (default 1: the gradient of ``loss.sum()``). ``out``: an array of the logits'
    shape and dtype for the gradient; passing ``logits`` itself overwrites the logits with their
    gradient, with no extra array of their size (float16 logits are computed in float32, read
    in blocks of about 4 MiB of rows, or of whole entries of the first axis where the class axis
    is not last, and from as many rows as Numba's threads: a block-sized buffer), and returns
    that buffer.

    Returns ``(loss, dlogits)``: the loss as :func:`cross_entropy` and the gradient with the
    logits' shape and dtype.

    >>> import numpy as np, xentkit
    >>> loss, grad = xentkit.cross_entropy_and_grad([[3.0, 1.0, -3.0]], [0])
    >>> np.round(grad, 4)  # softmax − onehot
    array([[-0.1211,  0.1189,  0.0022]])
    """
    options = loss_options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    loss, grad = _cross_entropy(
        logits, target, axis=axis, weight=weight, options=options,
        check_probabilities=check_probabilities, want_grad=True, grad_output=grad_output, out=out,
    )
    return loss, grad


def perplexity(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    axis: SupportsIndex = -1,
    weight: ArrayLike | None = None,
    ignore_index: Integer = -100,
    reduction: Literal["mean"] = "mean",
    label_smoothing: Real = 0.0,
    z_loss: Real = 0.0,
    softcap: Real | None = None,
    check_probabilities: bool = True,
) -> np.ndarray:
    r"""Perplexity ``exp(mean cross-entropy)``: a language model's test-set measure (note 003).

    Takes the arguments of :func:`cross_entropy`; ``reduction`` is always "mean" (over
    non-ignored tokens, weighted as cross-entropy's mean; another value is a ``TypeError``).
    Returns a 0-d array of the logits' dtype, as :func:`cross_entropy`'s mean. Uniform logits
    over ``C`` classes give perplexity ``C``. Where no token counts (every target ignored, no
    rows, or the targets' class weights summing to 0) it is NaN, with or without a z-loss, as
    ``exp`` of torch's mean (but for negative weights summing to 0, where torch divides a
    nonzero sum by 0): the training loss's "mean of nothing is 0" would read as a perfect 1.

    >>> import numpy as np, xentkit
    >>> np.round(xentkit.perplexity(np.zeros((4, 10)), [1, 2, 3, 4]), 4)
    np.float64(10.0)
    """
    if not (isinstance(reduction, str) and reduction == "mean"):
        raise TypeError(f"perplexity always averages (reduction='mean'); got reduction={reduction!r}")
    options = loss_options("mean", ignore_index, label_smoothing, z_loss, softcap)
    # the mean cross-entropy in float64, exponentiated, then rounded once to cross_entropy's dtype
    # (exp of the already rounded mean was up to 7.7 and 12.7 float32 ulps off in two reviews' random batches)
    loss, _ = _cross_entropy(
        logits, target, axis=axis, weight=weight, options=options,
        check_probabilities=check_probabilities, want_grad=False, loss_dtype=np.dtype(np.float64),
    )  # fmt: skip
    dtype = as_float_array(logits, "logits").dtype
    # (a mean of nothing is 0, or with a z-loss the z term's mean alone: asked then only)
    if (loss == 0.0 or options.z_loss) and _nothing_counts(logits, target, axis, weight, options.ignore_index):
        return np.asarray(np.nan, dtype=dtype)
    with np.errstate(over="ignore"):  # beyond the dtype: inf, as torch.exp
        return np.asarray(rounded(np.exp(loss), dtype))


def _nothing_counts(logits: ArrayLike, target: ArrayLike, axis: int, weight: ArrayLike | None, ignore_index: int) -> bool:
    """Whether a "mean" of these targets has nothing to average (its denominator, the rows or the
    non-ignored targets' class weights, is 0); asked of inputs already checked, when the mean
    came out 0."""
    logits = as_float_array(logits, "logits")
    axis = class_axis(logits, axis, "logits")
    target = as_array(target, "target")
    if target.shape == logits.shape:  # probabilities: every row counts
        return logits.size == 0
    labels = as_class_indices(target, logits.shape[:axis] + logits.shape[axis + 1 :], num_classes=logits.shape[axis],
                              ignore_index=ignore_index)  # fmt: skip
    weight = check_class_weight(weight, logits.shape[axis], compute_dtype(logits.dtype))
    return ReductionPlan.of_targets("mean", labels, ignore_index, weight)[1].denominator == 0
