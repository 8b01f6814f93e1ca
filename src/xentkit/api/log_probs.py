"""Public token log-probabilities and entropies (NumPy): validation, layout, kernel or reference."""

from __future__ import annotations

from typing import Literal, SupportsIndex, overload

import numpy as np
from numpy.typing import ArrayLike

from .. import reference
from .._labels import as_class_indices, check_labels
from .._options import Integer, LogProbOptions, Real, check_flag, select_outputs
from ..reference.log_probs import gradient_coefficients, row_statistics
from ._config import reference_enabled
from ._half import widened
from ._rows import RowLayout
from ._validation import as_float_array, class_axis, compute_dtype, output_gradient, rounded

__all__ = ["log_probs", "log_probs_backward"]


class _Rows:
    """One call's inputs checked and laid out for the kernels: the logits' :class:`RowLayout`
    (compute dtype), the int64 labels in the samples' shape (the reference's) and as ``[rows]``
    (the kernels'), the non-ignored rows, and the logits' own dtype."""

    def __init__(self, logits: ArrayLike, target: ArrayLike, axis: int, options: LogProbOptions) -> None:
        original = as_float_array(logits, "logits")
        self.input_dtype = original.dtype
        self.dtype = compute_dtype(original.dtype)
        options.check_fits(self.dtype, float(np.finfo(self.dtype).tiny))
        work = widened(original, self.dtype)
        self.layout = layout = RowLayout(work, class_axis(work, axis, "logits"), private=work is not original)
        labels = as_class_indices(
            target, layout.sample_shape, expected_shape="(one class index per row)",
            num_classes=layout.classes, ignore_index=options.ignore_index,
        )
        self.valid = check_labels(
            labels, layout.classes, options.ignore_index, compiled=not reference_enabled()
        ).reshape(layout.rows)
        self.labels_shaped = labels
        self.labels = layout.labels(labels)
        self.options = options

    def shaped(self, rows: np.ndarray) -> np.ndarray:
        """Per-row float64 results in the compute dtype and the rows' shape."""
        with np.errstate(over="ignore"):  # a log-probability beyond float32's range: −inf
            return rows.astype(self.dtype).reshape(self.layout.sample_shape)

    def statistics(self) -> tuple[np.ndarray, ...]:
        """(m, e, log_s, log_probs, entropy, lse) per row, float64, from the fused kernel (e = s − 1)."""
        from ..kernels.log_probs import log_prob_statistics

        m, e, u, z_target = log_prob_statistics(
            self.layout.matrix, self.labels, self.valid, self.options.temperature
        )
        log_probs, entropy, lse, log_s = row_statistics(m, e, u, z_target, self.valid)
        return m, e, log_s, log_probs, entropy, lse


# The result's type follows the return_* flags (a type checker picks the overload from literals).
@overload
def log_probs(
    logits: ArrayLike, target: ArrayLike, *, axis: SupportsIndex = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[False] = ..., return_lse: Literal[False] = ...,
) -> np.ndarray: ...
@overload
def log_probs(
    logits: ArrayLike, target: ArrayLike, *, axis: SupportsIndex = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[True], return_lse: Literal[False] = ...,
) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def log_probs(
    logits: ArrayLike, target: ArrayLike, *, axis: SupportsIndex = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[False] = ..., return_lse: Literal[True],
) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def log_probs(
    logits: ArrayLike, target: ArrayLike, *, axis: SupportsIndex = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: Literal[True], return_lse: Literal[True],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
@overload
def log_probs(
    logits: ArrayLike, target: ArrayLike, *, axis: SupportsIndex = ..., temperature: Real = ..., ignore_index: Integer = ...,
    return_entropy: bool = ..., return_lse: bool = ...,
) -> np.ndarray | tuple[np.ndarray, ...]: ...


def log_probs(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    axis: SupportsIndex = -1,
    temperature: Real = 1.0,
    ignore_index: Integer = -100,
    return_entropy: bool = False,
    return_lse: bool = False,
) -> np.ndarray | tuple[np.ndarray, ...]:
    r"""The log-probability of each row's target token, and optionally the entropy and lse.

    With z = logits / T (T = ``temperature``) along ``axis``, lse = log Σ_c exp z_c and
    p = softmax(z):

        log p(y) = z_y − lse ≤ 0,      H = −Σ_c p_c·log p_c = lse − Σ_c p_c·z_c ≥ 0

    computed in one fused pass over each row (max, Σ exp(z − m), Σ exp(z − m)·(z − m), z_y),
    in float64 across blocks, as log p(y) = (z_y − m) − log s and H = log s − u/s, so that the
    log-probability is never above 0 and the entropy never below 0; log s = log1p(s − 1) with the
    max's own terms of s counted apart, so that a confident token's log p(y) (−1e-20, say) keeps
    its digits instead of rounding to 0. What reinforcement learning
    on language models (PPO, GRPO) needs per token; the gradient is :func:`log_probs_backward`.

    Shapes: logits ``[..., C]`` (classes on ``axis``), target int ``[...]``; each output has the
    target's shape and the logits' dtype (float16 computed and returned in float32). A row whose
    target is ``ignore_index`` gets 0 for each. Returns ``log_probs``, or a tuple
    ``(log_probs, entropy)``, ``(log_probs, lse)`` or ``(log_probs, entropy, lse)`` as asked
    (``return_entropy``, ``return_lse``).

    >>> import numpy as np, xentkit
    >>> logits = np.array([[3.0, 1.0, -3.0], [0.0, 0.0, 0.0]])
    >>> lp, h = xentkit.log_probs(logits, [0, 2], return_entropy=True)
    >>> np.round(lp, 4), np.round(h, 4)   # log 0.879; −log 3 and entropy log 3 for a uniform row
    (array([-0.1291, -1.0986]), array([0.3801, 1.0986]))

    See also: :func:`cross_entropy` (the mean of −log p(y), with the loss options),
    ``xentkit.torch.linear_log_probs`` (fused with the output layer, for PyTorch).
    """
    options = LogProbOptions(temperature, ignore_index)
    return_entropy = check_flag(return_entropy, "return_entropy")
    return_lse = check_flag(return_lse, "return_lse")
    rows = _Rows(logits, target, axis, options)
    if reference_enabled():
        results = reference.log_probs.log_probs_and_entropy(
            rows.layout.moved, rows.labels_shaped, temperature=options.temperature,
            ignore_index=options.ignore_index,
        )
        log_p, entropy, lse = (np.asarray(result, dtype=rows.dtype) for result in results)
    else:
        _, _, _, log_p, entropy, lse = rows.statistics()
        log_p, entropy, lse = rows.shaped(log_p), rows.shaped(entropy), rows.shaped(lse)
    return select_outputs((log_p, entropy, lse), return_entropy, return_lse)


def log_probs_backward(
    logits: ArrayLike,
    target: ArrayLike,
    grad_log_probs: ArrayLike | None,
    grad_entropy: ArrayLike | None = None,
    *,
    grad_lse: ArrayLike | None = None,
    axis: SupportsIndex = -1,
    temperature: Real = 1.0,
    ignore_index: Integer = -100,
) -> np.ndarray:
    r"""The vector-Jacobian product of :func:`log_probs`: ∂(Σ g·log p(y) + Σ h·H + Σ k·lse)/∂logits.

    With g = ``grad_log_probs``, h = ``grad_entropy``, k = ``grad_lse`` (each broadcast to the
    target's shape; None means 0) and the notation of :func:`log_probs`, per row:

        ∂/∂z_j = g·([j = y] − p_j) − h·p_j·(z_j − lse + H) + k·p_j,     ∂/∂logits = ∂/∂z / T

    computed by a fused kernel (the row statistics, then one write of the gradient). Ignored rows
    get a zero gradient. Returns an array of the logits' shape and dtype (float16 computed in
    float32).

    >>> import numpy as np, xentkit
    >>> np.round(xentkit.log_probs_backward([[3.0, 1.0, -3.0]], [0], [1.0]), 4)   # onehot − p
    array([[ 0.1211, -0.1189, -0.0022]])

    See also: :func:`softmax_backward`, :func:`log_softmax_backward`.
    """
    options = LogProbOptions(temperature, ignore_index)
    rows = _Rows(logits, target, axis, options)
    layout = rows.layout
    g, h, k = (
        output_gradient(value, name, layout.sample_shape, rows.dtype)
        for value, name in ((grad_log_probs, "grad_log_probs"), (grad_entropy, "grad_entropy"), (grad_lse, "grad_lse"))
    )
    if reference_enabled():
        grad = reference.log_probs.log_probs_backward(
            layout.moved, rows.labels_shaped, g, h, k, temperature=options.temperature,
            ignore_index=options.ignore_index,
        )
    else:
        from ..kernels.log_probs import log_prob_gradient

        m, e, log_s, _, entropy, _ = rows.statistics()
        with np.errstate(invalid="ignore", over="ignore"):  # infinite upstream gradients: NaN, as torch
            coefficients = gradient_coefficients(log_s, entropy, *(layout.per_row(value) for value in (g, h, k)))
        grad = log_prob_gradient(
            layout.matrix, rows.labels, rows.valid, options.temperature, m, e, coefficients,
            layout.gradient_buffer(),
        )
    return rounded(layout.in_layout(grad), rows.input_dtype)
