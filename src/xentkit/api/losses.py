"""Public NLL, binary cross-entropy, quadratic cost, entropy and KL divergence, with gradients."""

from __future__ import annotations

from typing import SupportsIndex

import numpy as np
from numpy.typing import ArrayLike

from .. import reference
from .._labels import as_class_indices, check_labels
from .._options import Integer, LossOptions, as_array, check_factor_kind, check_reduction
from ..reference.reductions import ReductionPlan
from ._config import reference_enabled
from ._half import widened
from ._rows import kernel_array
from ._validation import (
    as_float_array,
    check_broadcasts_to,
    check_class_weight,
    class_axis,
    compute_dtype,
    rounded,
    same_shape,
    upstream_gradient,
)


def _pair(first: ArrayLike, second: ArrayLike, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """Two float arrays of one shape and the output dtype (the first's). They are computed in the
    compute dtype of the first, or of both where the second is a wider float: a float64 target
    is not rounded to float32 logits before it is used (torch promotes alike); an integer or
    bool one does not widen it."""
    a = as_float_array(first, names[0])
    b = as_array(second, names[1])
    if b.dtype.kind not in "fiub":
        raise TypeError(f"{names[1]} must be a numeric array, got dtype {b.dtype}")
    same_shape(b, names[1], a, names[0])
    # (a long double target widens to float64 at most: the kernels take float32 and float64)
    wider = np.promote_types(a.dtype, b.dtype if b.dtype.itemsize <= 8 else np.float64)
    work = compute_dtype(wider if b.dtype.kind == "f" else a.dtype)
    return widened(a, work), widened(b, work) if b.dtype == np.float16 else rounded(b, work), a.dtype


def _broadcast_weight(
    weight: ArrayLike | None, shape: tuple[int, ...], dtype: np.dtype, name: str, *, one_for_all: bool = False,
) -> np.ndarray | None:
    """``weight`` (``name``: "weight" or "pos_weight") as an array of ``dtype`` that broadcasts to
    ``shape`` (None stays None), of the kinds ``_options.FACTOR_KINDS`` allows it (a weight may be
    a bool mask, which weighs 1 or 0, as in torch); ``one_for_all``: on a scalar input one value
    applies whatever its shape (a ``[1]``; elsewhere torch's broadcasting alone, which refuses a
    ``[[w]]`` beside a ``[3]``)."""
    if weight is None:
        return None
    array = as_array(weight, name)
    check_factor_kind(name, array.dtype.kind, weight)
    if one_for_all and array.size == 1 and not shape:
        array = array.reshape(())
    check_broadcasts_to(name, array.shape, shape)
    return rounded(array, dtype)


def _full(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Elementwise results spread to the input's ``shape`` (a broadcast weight may have left
    them smaller), as a writeable array of their own (``np.broadcast_to`` gives a read-only view)."""
    return values if values.shape == shape else np.broadcast_to(values, shape).copy()


# ---------------------------------------------------------------------------------------------
# NLL


def _nll(log_probs, target, axis, weight, options: LossOptions, want_grad, grad_output=None, loss_dtype=None):
    """NLL and (``want_grad``) its gradient; the loss rounded once to ``loss_dtype`` (default:
    the log-probabilities' dtype)."""
    original = as_float_array(log_probs, "log_probs")
    axis = class_axis(original, axis, "log_probs")
    reduction, ignore_index = options.reduction, options.ignore_index
    num_classes = original.shape[axis]
    work = compute_dtype(original.dtype)
    weight = check_class_weight(weight, num_classes, work)
    sample_shape = original.shape[:axis] + original.shape[axis + 1 :]
    classes = f"log_probs have {num_classes} classes"
    labels = as_class_indices(
        target, sample_shape, num_classes=num_classes, ignore_index=ignore_index, classes=classes,
        expected_shape="(class indices: log_probs' shape without the class axis)",
    )
    valid = check_labels(labels, num_classes, ignore_index, classes=classes)

    moved = np.moveaxis(widened(original, work), axis, -1)
    plan = ReductionPlan.of_targets(reduction, labels, ignore_index, weight, valid=valid)[1]
    scale = 1.0
    if want_grad:
        scale = plan.scales(upstream_gradient(grad_output, reduction, sample_shape, work))[0]
    per_sample, _, grad = reference.nll_loss_and_grad(moved, labels, weight, ignore_index, scale, want_grad=want_grad)
    loss = rounded(plan.reduce(per_sample), loss_dtype or original.dtype)
    if not want_grad:
        return loss, None
    return loss, rounded(np.moveaxis(grad, -1, axis), original.dtype)


def nll_loss(
    log_probs: ArrayLike,
    target: ArrayLike,
    *,
    axis: SupportsIndex = -1,
    weight: ArrayLike | None = None,
    ignore_index: Integer = -100,
    reduction: str = "mean",
) -> np.ndarray:
    """Negative log-likelihood of class indices: ``loss = −w_y·log_probs[y]`` per sample.

    ``cross_entropy(z, y) == nll_loss(log_softmax(z), y)`` (note 004). Shapes, ``weight``,
    ``ignore_index`` and ``reduction`` as :func:`cross_entropy` with class-index targets ("mean"
    divides by ``Σ w_y`` over non-ignored samples; 0 when nothing is left, where PyTorch gives NaN;
    a target of class weight 0 whose log-probability is −inf adds 0, 0·log 0, where PyTorch gives
    NaN).
    See also :func:`nll_loss_and_grad`.

    >>> import numpy as np, xentkit
    >>> p = np.array([[0.2, 0.3, 0.4, 0.6, 0.5]])  # note 000: true class 4 (index 3) at 0.6
    >>> np.round(xentkit.nll_loss(np.log(p), [3]), 4)  # −log 0.6
    np.float64(0.5108)
    """
    options = LossOptions(reduction=reduction, ignore_index=ignore_index)
    loss, _ = _nll(log_probs, target, axis, weight, options, want_grad=False)
    return loss


def nll_loss_and_grad(
    log_probs: ArrayLike,
    target: ArrayLike,
    *,
    axis: SupportsIndex = -1,
    weight: ArrayLike | None = None,
    ignore_index: Integer = -100,
    reduction: str = "mean",
    grad_output: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """NLL and its gradient ``∂loss/∂log_probs = −w_y·onehot(y)`` (scaled by the reduction).

    Returns ``(loss, dlog_probs)``; ``grad_output`` as in :func:`cross_entropy_and_grad`.

    >>> import numpy as np, xentkit
    >>> loss, grad = xentkit.nll_loss_and_grad(np.log([[0.5, 0.5], [0.9, 0.1]]), [0, 1])
    >>> grad
    array([[-0.5,  0. ],
           [ 0. , -0.5]])
    """
    options = LossOptions(reduction=reduction, ignore_index=ignore_index)
    return _nll(log_probs, target, axis, weight, options, True, grad_output)


# ---------------------------------------------------------------------------------------------
# Binary cross-entropy


def _bce_with_logits(
    logits, target, weight, pos_weight, reduction, want_grad, grad_output=None, loss_dtype=None, grad_dtype=None
):
    """``(loss, grad)``; ``loss_dtype``: the loss's dtype when it is not the logits' (the torch
    binding's promoted dtype), rounded once from the computed value; ``grad_dtype``: the same for
    the gradient (the torch binding keeps a float16 input's in float32 until it is scaled)."""
    x, y, dtype = _pair(logits, target, ("logits", "target"))
    reduction = check_reduction(reduction)
    # (any shape that broadcasts, as torch; on a scalar input one value also as a [1])
    w = _broadcast_weight(weight, x.shape, x.dtype, "weight", one_for_all=True)
    pw = _broadcast_weight(pos_weight, x.shape, x.dtype, "pos_weight", one_for_all=True)
    plan = ReductionPlan.of_rows(reduction, x.size)
    if x.size and x.ndim and not reference_enabled():
        return _bce_on_the_kernel(x, y, w, pw, plan, want_grad, grad_output, loss_dtype or dtype, grad_dtype or dtype)
    per_element, grad = reference.binary_cross_entropy_with_logits_and_grad(x, y, w, pw)
    per_element = _full(per_element, x.shape)
    loss = rounded(plan.reduce(per_element), loss_dtype or dtype)
    if not want_grad:
        return loss, None
    upstream = upstream_gradient(grad_output, reduction, x.shape, x.dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # (0·inf = NaN, as torch, silently)
        grad = np.broadcast_to(grad, x.shape) * plan.scales(upstream)[0]
    return loss, rounded(grad, grad_dtype or dtype)


def _per_class_or_element(values, shape):
    """A weight broadcast to ``shape`` as the binary kernel takes it, in float64: None, ``[C]``
    where it varies along the last axis only (or not at all), else ``[rows, C]``."""
    if values is None:
        return None
    classes = shape[-1]
    if values.size == 1 or (values.size == classes and values.shape[-1:] == (classes,)):
        return np.ascontiguousarray(np.broadcast_to(values.reshape(-1), (classes,)), dtype=np.float64)
    return kernel_array(np.broadcast_to(values, shape).reshape(-1, classes), np.float64)


def _bce_on_the_kernel(x, y, w, pw, plan, want_grad, grad_output, loss_dtype, dtype):
    """:func:`_bce_with_logits` on the fused kernel (``xentkit.kernels.binary``): ``x`` and
    ``y`` (checked, in the compute dtype, at least one dimension and one element) as
    ``[rows, C]``, C the last axis; a weight that varies only along that axis (or not at all)
    passed per class, any other one spread to every element; the reduction by ``plan``."""
    from ..kernels.binary import binary_rows

    shape, classes = x.shape, x.shape[-1]
    rows = x.size // classes
    weight, pw = (_per_class_or_element(values, shape) for values in (w, pw))
    scale, per_element = None, None  # the kernel's one number; an upstream per element ("none")
    if want_grad:
        if grad_output is None:
            scale = float(plan.scales(1.0)[0])
        else:
            # in the compute dtype, as the reference takes it (1e39 is inf in float32)
            upstream = plan.scales(upstream_gradient(grad_output, plan.reduction, shape, x.dtype))[0]
            if plan.reduction == "none":
                scale, per_element = 1.0, upstream
            else:
                scale = float(upstream)
    loss, grad = binary_rows(
        kernel_array(x.reshape(rows, classes)), kernel_array(y.reshape(rows, classes)), weight, pw,
        per_element_loss=plan.reduction == "none", scale=scale,
    )
    loss = loss.reshape(shape) if plan.reduction == "none" else plan.reduce(np.array([loss]))
    if grad is None:
        return rounded(loss, loss_dtype), None
    grad = grad.reshape(shape)
    if per_element is not None:
        with np.errstate(over="ignore", invalid="ignore"):  # (0·inf = NaN, as torch, silently)
            grad = grad * per_element  # (in the compute dtype, as the reference)
    return rounded(loss, loss_dtype), rounded(grad, dtype)


def binary_cross_entropy_with_logits(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    reduction: str = "mean",
) -> np.ndarray:
    """Binary cross-entropy on logits (sigmoid fused in), elementwise, as PyTorch's function::

        loss = −weight·[pos_weight·y·log σ(x) + (1 − y)·log σ(−x)]

    ``log(1 − σ(x))`` is evaluated as ``log σ(−x)``, exact for any ``x``. ``target`` has the
    logits' shape (values in [0, 1], not checked, as PyTorch: the formula extends to any real y);
    ``weight`` and ``pos_weight`` broadcast to it (as torch broadcasts them: ``pos_weight`` is
    usually one value per class along the last axis, ``(C,)``, but may vary by row too).
    "mean" averages over every element; with no element it is 0 (PyTorch: NaN).
    See also :func:`binary_cross_entropy` (on probabilities), :func:`binary_cross_entropy_with_logits_and_grad`.

    >>> import numpy as np, xentkit
    >>> np.round(xentkit.binary_cross_entropy_with_logits([1.5, -800.0], [0.0, 0.0]), 4)
    np.float64(0.8507)
    """
    loss, _ = _bce_with_logits(logits, target, weight, pos_weight, reduction, False)
    return loss


def binary_cross_entropy_with_logits_and_grad(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    reduction: str = "mean",
    grad_output: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Binary cross-entropy on logits and ``∂loss/∂x = weight·[(1 − y)·σ(x) − pos_weight·y·σ(−x)]``.

    Without weights this is ``σ(x) − y``: no ``σ'(x)`` factor, which is why the cross-entropy
    neuron of note 003 does not slow down when saturated. Returns ``(loss, dlogits)``.

    >>> import numpy as np, xentkit
    >>> loss, grad = xentkit.binary_cross_entropy_with_logits_and_grad([1.5], [0.0], reduction="sum")
    >>> np.round(grad, 4)  # σ(1.5) − 0
    array([0.8176])
    """
    return _bce_with_logits(logits, target, weight, pos_weight, reduction, True, grad_output)


def _check_unit_interval(values: np.ndarray, name: str, what: str, hint: str) -> None:
    """``values`` all in [0, 1], else a ValueError naming ``name`` and the first value outside (a
    NaN by its position: a min/max of NaN says nothing)."""
    if not values.size or (np.min(values) >= 0 and np.max(values) <= 1):
        return
    outside = np.flatnonzero(~((values >= 0) & (values <= 1)))[0]
    position = np.unravel_index(outside, values.shape) if values.ndim > 1 else (outside,)
    value = values.reshape(-1)[outside]
    got = "NaN" if value != value else f"{value}"
    where = f" at index {position[0] if len(position) == 1 else tuple(int(i) for i in position)}" if values.ndim else ""
    raise ValueError(f"{name} must lie in [0, 1] ({what}), got {got}{where}{hint}")


def _bce(probs, target, weight, reduction, want_grad, grad_output=None):
    p, y, dtype = _pair(probs, target, ("probs", "target"))
    reduction = check_reduction(reduction)
    _check_unit_interval(p, "probs", "probabilities, e.g. sigmoid outputs", "; for logits use binary_cross_entropy_with_logits")
    _check_unit_interval(y, "target", "as torch requires", "")
    w = _broadcast_weight(weight, p.shape, p.dtype, "weight", one_for_all=True)
    plan = ReductionPlan.of_rows(reduction, p.size)
    if not want_grad:  # the per-element losses by blocks: no gradient, block-sized temporaries
        operands = (p, y) if w is None else (p, y, np.broadcast_to(w, p.shape))
        per_element = _value_by_blocks(
            lambda p, y, w=None: reference.binary_cross_entropy_and_grad(p, y, w, want_grad=False)[0],
            *operands, elementwise=True,
        )
        return rounded(plan.reduce(_full(per_element, p.shape)), dtype), None
    per_element, grad = reference.binary_cross_entropy_and_grad(p, y, w)
    loss = rounded(plan.reduce(_full(per_element, p.shape)), dtype)
    upstream = upstream_gradient(grad_output, reduction, p.shape, p.dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # (0·inf = NaN, as torch, silently)
        grad = np.broadcast_to(grad, p.shape) * plan.scales(upstream)[0]
    return loss, rounded(grad, dtype)


def binary_cross_entropy(
    probs: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
) -> np.ndarray:
    """Binary cross-entropy on probabilities: ``loss = −weight·[y·log p + (1 − y)·log(1 − p)]``.

    As PyTorch, each log is clamped at −100 so p = 0 or 1 gives a finite loss. ``probs`` or
    ``target`` outside [0, 1] (or NaN) is a ``ValueError``, as PyTorch raises; "mean" of no
    element is 0 (PyTorch: NaN). Prefer :func:`binary_cross_entropy_with_logits` when you have logits.

    >>> import numpy as np, xentkit
    >>> np.round(xentkit.binary_cross_entropy([0.9, 0.2], [1.0, 0.0]), 4)
    np.float64(0.1643)
    """
    loss, _ = _bce(probs, target, weight, reduction, False)
    return loss


def binary_cross_entropy_and_grad(
    probs: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
    grad_output: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Binary cross-entropy on probabilities and ``∂loss/∂p = weight·(p − y) / (p·(1 − p))``.

    The denominator is clamped at 1e-12 (as a float32, 9.99999996e-13) as in PyTorch. Returns ``(loss, dprobs)``.

    >>> import numpy as np, xentkit
    >>> loss, grad = xentkit.binary_cross_entropy_and_grad([0.8], [1.0], reduction="sum")
    >>> np.round(grad, 4)  # −1/0.8
    array([-1.25])
    """
    return _bce(probs, target, weight, reduction, True, grad_output)


# ---------------------------------------------------------------------------------------------
# Quadratic cost


def _quadratic(prediction, target, reduction, want_grad, grad_output=None):
    yhat, y, dtype = _pair(prediction, target, ("prediction", "target"))
    reduction = check_reduction(reduction)
    plan = ReductionPlan.of_rows(reduction, yhat.size)
    upstream = upstream_gradient(grad_output, reduction, yhat.shape, yhat.dtype) if want_grad else 1
    per_element, grad = reference.quadratic_cost_and_grad(yhat, y, float(plan.scales(1.0)[0]), upstream)
    loss = rounded(plan.reduce(per_element), dtype)
    return loss, rounded(grad, dtype) if want_grad else None


def quadratic_cost(prediction: ArrayLike, target: ArrayLike, *, reduction: str = "mean") -> np.ndarray:
    """The quadratic cost of the seeds: ``mean((prediction − target)²)`` over every element.

    That is ``tf.reduce_mean(tf.square(y − prediction))`` of note 003 and PyTorch's
    ``mse_loss``; "sum" and "none" give the sum and the elementwise squares. "mean" of no element
    is 0 (PyTorch: NaN). See also :func:`quadratic_cost_and_grad`.

    >>> import numpy as np, xentkit
    >>> np.round(xentkit.quadratic_cost([[0.8, 0.2], [0.4, 0.6]], [[1.0, 0.0], [0.0, 1.0]]), 4)
    np.float64(0.1)
    """
    loss, _ = _quadratic(prediction, target, reduction, False)
    return loss


def quadratic_cost_and_grad(
    prediction: ArrayLike,
    target: ArrayLike,
    *,
    reduction: str = "mean",
    grad_output: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Quadratic cost and ``∂loss/∂prediction = 2·(prediction − target)`` (÷ element count for "mean").

    Through a sigmoid this gradient picks up ``σ'(z)``, the learning slowdown of note 003.
    Returns ``(loss, dprediction)``.

    >>> import numpy as np, xentkit
    >>> loss, grad = xentkit.quadratic_cost_and_grad([0.82], [0.0])
    >>> np.round(grad, 4)
    array([1.64])
    """
    return _quadratic(prediction, target, reduction, True, grad_output)


# ---------------------------------------------------------------------------------------------
# Entropy and KL divergence


def _distribution(p: ArrayLike, name: str, axis: int) -> tuple[np.ndarray, np.dtype, int]:
    array = as_float_array(p, name)
    axis = class_axis(array, axis, name)
    work = widened(array, compute_dtype(array.dtype))
    # (a min, no mask of the input's size; an all-NaN input passes, as before)
    if work.size and np.fmin.reduce(work, axis=None) < 0:  # (fmin: NaN-free where any value is)
        raise ValueError(f"{name} must hold probabilities (values >= 0), got a minimum of {work[work < 0].min()}")
    return work, array.dtype, axis


# Forward-only entropy and KL run the reference formulas over blocks of this many bytes of float64
# (their temporaries, about ten with a float64 copy of float32 inputs among them, then block-sized:
# whole, they came to 3 and 12 times the input's bytes, a review)
_BLOCK_BYTES = 2**20


def _value_by_blocks(value_of, *arrays: np.ndarray, elementwise: bool = False) -> np.ndarray:
    """``value_of(*blocks)`` over blocks of the arrays' first axis (one shape, the class axis last;
    ``elementwise``: values per element, so that a 1-D array is cut too), concatenated: the
    per-row values of the whole, with block-sized temporaries."""
    shape = arrays[0].shape
    per_row = 8 * int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, _BLOCK_BYTES // max(per_row, 1))
    if len(shape) < (1 if elementwise else 2) or shape[0] <= step:
        return value_of(*arrays)
    first = value_of(*(a[:step] for a in arrays))
    # (filled in place: no list of blocks; elementwise values in the input's memory layout, as the
    # whole computation gives them, and so summed in the same order)
    values = (
        np.empty_like(arrays[0], dtype=first.dtype) if elementwise
        else np.empty((shape[0], *first.shape[1:]), dtype=first.dtype)
    )
    values[:step] = first
    for start in range(step, shape[0], step):
        values[start : start + step] = value_of(*(a[start : start + step] for a in arrays))
    return values


def entropy(p: ArrayLike, axis: SupportsIndex = -1) -> np.ndarray:
    """Shannon entropy in nats along ``axis``: ``H(p) = −Σ_i p_i·log p_i`` with ``0·log 0 = 0``.

    ``p`` holds probabilities (non-negative; they are not renormalized). Returns the input's
    shape without ``axis``. See also :func:`entropy_and_grad`, :func:`kl_divergence`.

    >>> import numpy as np, xentkit
    >>> np.round(xentkit.entropy([[0.5, 0.5], [1.0, 0.0]]), 4)  # log 2 and 0
    array([0.6931, 0.    ])
    """
    work, dtype, axis = _distribution(p, "p", axis)

    def value_of(block: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # (as entropy_and_grad)
            return reference.entropy_and_grad(block, axis=-1)[0]

    return rounded(_value_by_blocks(value_of, np.moveaxis(work, axis, -1)), dtype)


def entropy_and_grad(p: ArrayLike, axis: SupportsIndex = -1) -> tuple[np.ndarray, np.ndarray]:
    """Entropy and ``∂H/∂p_i = −(log p_i + 1)`` (+inf where p_i = 0).

    Returns ``(entropy, dp)``.

    >>> import numpy as np, xentkit
    >>> H, grad = xentkit.entropy_and_grad([0.5, 0.5])
    >>> np.round(grad, 4)
    array([-0.3069, -0.3069])
    """
    work, dtype, axis = _distribution(p, "p", axis)
    with np.errstate(over="ignore"):  # p·log p beyond the dtype (p not a distribution): −inf, no warning
        value, grad = reference.entropy_and_grad(work, axis=axis)
    return rounded(value, dtype), rounded(grad, dtype)


def _kl_operands(
    p: ArrayLike, q: ArrayLike, axis: int
) -> tuple[np.ndarray, np.ndarray, int, np.dtype, tuple[np.dtype, np.dtype]]:
    """p and q checked and in one dtype (the one they promote to, in which KL is returned; each
    gradient in its argument's dtype, as torch), the class axis normalized, and their own dtypes."""
    p_array, q_array = as_float_array(p, "p"), as_float_array(q, "q")
    same_shape(q_array, "q", p_array, "p")
    dtype = np.result_type(p_array.dtype, q_array.dtype)
    p_work, _, axis = _distribution(p_array.astype(dtype, copy=False), "p", axis)
    q_work, _, _ = _distribution(q_array.astype(dtype, copy=False), "q", axis)
    return p_work, q_work, axis, dtype, (p_array.dtype, q_array.dtype)


def kl_divergence(p: ArrayLike, q: ArrayLike, axis: SupportsIndex = -1) -> np.ndarray:
    """Kullback–Leibler divergence ``KL(p‖q) = Σ_i p_i·(log p_i − log q_i)`` in nats along ``axis``.

    Equals ``cross-entropy H(p, q) − H(p)`` (note 000). Terms with ``p_i = 0`` add 0;
    ``p_i > 0`` where ``q_i = 0`` gives +inf. See also :func:`kl_divergence_and_grad`.

    >>> import numpy as np, xentkit
    >>> np.round(xentkit.kl_divergence([0.5, 0.5], [0.9, 0.1]), 4)
    np.float64(0.5108)
    """
    p_work, q_work, axis, dtype, _ = _kl_operands(p, q, axis)

    def value_of(p_block: np.ndarray, q_block: np.ndarray) -> np.ndarray:  # (in float64: see below)
        wide = (p_block.astype(np.float64, copy=False), q_block.astype(np.float64, copy=False))
        return reference.kl_divergence_and_grad(*wide, axis=-1)[0]

    return rounded(_value_by_blocks(value_of, np.moveaxis(p_work, axis, -1), np.moveaxis(q_work, axis, -1)), dtype)


def kl_divergence_and_grad(p: ArrayLike, q: ArrayLike, axis: SupportsIndex = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """KL divergence and both gradients: ``∂/∂p_i = log(p_i/q_i) + 1``, ``∂/∂q_i = −p_i/q_i``.

    Returns ``(kl, dp, dq)``: ``kl`` in the dtype p and q promote to, each gradient in its own
    argument's dtype, as torch; computed in float64 and rounded once. A class with p_i = 0 adds 0
    to ``kl`` (0·log 0 = 0) and 0 to ``dq``; its ``dp_i`` is −inf (log 0), or NaN where q_i = 0 too
    (log(0/0): the divergence has no derivative there).

    >>> import numpy as np, xentkit
    >>> kl, dp, dq = xentkit.kl_divergence_and_grad([0.5, 0.5], [0.5, 0.5])
    >>> dq
    array([-1., -1.])
    """
    p_work, q_work, axis, dtype, (p_dtype, q_dtype) = _kl_operands(p, q, axis)
    # in float64, rounded once: log p − log q of two close distributions cancels, and in float32
    # each log's rounding would be most of the difference (a KL of 3e-9 came out 9e-10)
    value, grad_p, grad_q = reference.kl_divergence_and_grad(
        p_work.astype(np.float64, copy=False), q_work.astype(np.float64, copy=False), axis=axis
    )
    return rounded(value, dtype), rounded(grad_p, p_dtype), rounded(grad_q, q_dtype)
