"""Fused binary cross-entropy on logits: per-element loss (or per-row sums) and gradient in one
read of the logits and targets, the formulas of ``xentkit.reference.losses``::

    L        = log1p(exp(−|x|))
    log σ(x) = min(x, 0) − L,   log σ(−x) = min(−x, 0) − L
    loss     = −w·(pw·y·log σ(x) + (1 − y)·log σ(−x))
    grad     = w·((1 − y)·σ(x) − pw·y·σ(−x)) · scale,   σ(x) = 1/(1 + e) (x ≥ 0), e/(1 + e) (x < 0)
               (NaN for a non-finite y or pw, as torch's σ(x)·(pw·y + 1 − y) − pw·y gives)

with e = exp(−|x|), in the same order of operations as the reference, so that special values
come out alike (x = ±inf: 0·inf terms are NaN, and x = −inf takes torch's own form there: NaN
for targets in (0, 1], ±inf where a target outside [0, 1] or a negative ``pos_weight`` tips it). Every element is computed in float64,
for float32 logits too (so where a float32 reference's intermediates overflow or flush to 0,
say an infinite weight times a σ that float32 rounds to 1, this can give ±inf or a number where
it gives NaN; and for targets far outside [0, 1], near float64's largest value, the fused
multiply-adds round otherwise than the reference, and the two may differ widely, neither then
accurate): exp by the vectorized polynomial of ``_exp.py`` and log1p(e), e ∈ [0, 1],
as 2·atanh(u) = 2u·Σ_k u^(2k)/(2k + 1) with u = e/(2 + e) ≤ 1/3 (18 terms: below float64's
rounding), so the loop vectorizes (Numba's ``math.log1p`` is a scalar libm call). log σ stays
accurate for confident logits (x = −17: 4.14e-8, where torch's float32 kernel gives 0).

Weights: none, one per class (the last axis, ``[C]``), or one per element (``[rows, C]``, the
api's broadcast of any other shape); ``pos_weight`` likewise none, ``[C]`` or ``[rows, C]``; the
gradient's ``scale`` one
number (the api multiplies a per-element upstream gradient afterwards). Sums per row in
float64, added by the host in a fixed order (deterministic). Drivers: ``prange`` over rows, and
a serial build for small problems.

No validation here: the api checks shapes and dtypes before calling.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from xentkit.kernels._exp import fast_exp
from xentkit.kernels._jit import helper_options
from xentkit.kernels._threading import running_on, runs_serial, serial_build, threads_for
from xentkit.kernels.cross_entropy import _JIT, _KERNEL_JIT, SERIAL_MAX_ELEMENTS

__all__ = ["binary_rows"]

# atanh series coefficients 1/(2k + 1), k = 0..17
_ATANH = tuple(1.0 / (2 * k + 1) for k in range(18))


@njit(**helper_options({"contract"}))
def _log1p_unit(e):  # pragma: no cover - compiled
    """log(1 + e) for e in [0, 1] (NaN stays NaN), float64: 2u·P(u²), u = e/(2 + e), with 2u
    taken as e·(2/(2 + e)) so that a subnormal e keeps its last bit (e/2 would lose it)."""
    ratio = 2.0 / (2.0 + e)
    u = 0.5 * e * ratio
    u2 = u * u
    c = _ATANH
    poly = c[17]
    poly = poly * u2 + c[16]
    poly = poly * u2 + c[15]
    poly = poly * u2 + c[14]
    poly = poly * u2 + c[13]
    poly = poly * u2 + c[12]
    poly = poly * u2 + c[11]
    poly = poly * u2 + c[10]
    poly = poly * u2 + c[9]
    poly = poly * u2 + c[8]
    poly = poly * u2 + c[7]
    poly = poly * u2 + c[6]
    poly = poly * u2 + c[5]
    poly = poly * u2 + c[4]
    poly = poly * u2 + c[3]
    poly = poly * u2 + c[2]
    poly = poly * u2 + c[1]
    poly = poly * u2 + c[0]
    return e * ratio * poly


@njit(**helper_options({"contract"}))
def _element(x, y, w, pw):  # pragma: no cover - compiled
    """``(loss, grad)`` of one element (gradient unscaled), float64, the reference's order."""
    e = fast_exp(-abs(x))  # (not the softmax variant: subnormal results kept, as np.exp)
    lg = _log1p_unit(e)
    log_sig_pos = min(x, 0.0) - lg
    log_sig_neg = min(-x, 0.0) - lg
    loss = 0.0 - w * (pw * y * log_sig_pos + (1.0 - y) * log_sig_neg)  # (0 − …: +0 where it vanishes, as torch)
    # x = −inf: torch's value there, its form (1 − y)·x − (1 + (pw − 1)·y)·log σ(x) (the reference
    # says why): ∞ − ∞ = NaN for y in (0, 1], ±inf for a target or pos_weight that tips the
    # balance (a select, not a branch: the loop stays vectorized)
    at_neg_inf = w * ((1.0 - y) * x - (1.0 + (pw - 1.0) * y) * log_sig_pos)
    loss = at_neg_inf if x == -np.inf else loss
    # (1 − y)·σ(x) − pw·y·σ(−x), σ(±x) = (1 or e)/(1 + e): no cancellation of σ(x)·(pw·y + 1 − y)
    # against pw·y (at y = 1, x = 40 that gave 0 for −4.2e-18). A non-finite target or pos_weight
    # makes torch's form NaN (∞ − ∞, or 0·∞): so is pw·y − pw·y then, 0 otherwise (as m − m)
    top_pos, top_neg = (1.0, e) if x >= 0.0 else (e, 1.0)  # the numerators of σ(x) and σ(−x)
    py = pw * y
    grad = w * ((top_pos * (1.0 - y) - top_neg * py) / (1.0 + e) + (py - py))
    return loss, grad


# One loop per output combination, each straight-line code that LLVM vectorizes (weights and
# pos_weight are always rows of C values: ones where absent).


@njit(**_JIT)
def _sum(x, y, w, pw):  # pragma: no cover - compiled
    """Σ_j loss_j of one row (float64)."""
    total = 0.0
    for j in range(x.shape[0]):
        loss, _ = _element(np.float64(x[j]), np.float64(y[j]), w[j], pw[j])
        total += loss
    return total


@njit(**_JIT)
def _sum_grad(x, y, w, pw, scale, grad):  # pragma: no cover - compiled
    """Σ_j loss_j of one row, and its gradient times ``scale`` into ``grad``."""
    total = 0.0
    for j in range(x.shape[0]):
        loss, g = _element(np.float64(x[j]), np.float64(y[j]), w[j], pw[j])
        total += loss
        grad[j] = g * scale
    return total


@njit(**_JIT)
def _elements(x, y, w, pw, losses):  # pragma: no cover - compiled
    """Each element's loss of one row into ``losses``."""
    for j in range(x.shape[0]):
        loss, _ = _element(np.float64(x[j]), np.float64(y[j]), w[j], pw[j])
        losses[j] = loss


@njit(**_JIT)
def _elements_grad(x, y, w, pw, scale, losses, grad):  # pragma: no cover - compiled
    """Each element's loss of one row, and its gradient times ``scale``."""
    for j in range(x.shape[0]):
        loss, g = _element(np.float64(x[j]), np.float64(y[j]), w[j], pw[j])
        losses[j] = loss
        grad[j] = g * scale


@njit(parallel=True, **_KERNEL_JIT)
def _binary_rows_kernel(  # pragma: no cover - compiled
    logits, targets, weight_rows, weight_class, pos_weight_rows, pos_weight_class, scale, loss_out,
    per_element_loss, grad_out, want_grad, row_sums,
):
    """Every row over Numba's threads (``prange``). ``weight_rows`` is ``[rows, C]`` (a weight
    per element) or a 1-row dummy, and then ``weight_class`` (``[C]``, ones for no weight)
    serves every row; ``pos_weight_rows`` and ``pos_weight_class`` the same for ``pos_weight``;
    ``loss_out`` and ``grad_out`` are 1-row dummies unless ``per_element_loss`` / ``want_grad``."""
    n_rows = logits.shape[0]
    per_row_weight = weight_rows.shape[0] == n_rows and n_rows > 1
    per_row_pos_weight = pos_weight_rows.shape[0] == n_rows and n_rows > 1
    for i in prange(n_rows):
        r = np.int64(i)  # (prange's index may be unsigned: min() with a signed one would be a float)
        w = weight_rows[r] if per_row_weight else weight_class
        pos_weight = pos_weight_rows[r] if per_row_pos_weight else pos_weight_class
        losses = loss_out[min(r, loss_out.shape[0] - 1)]
        grad = grad_out[min(r, grad_out.shape[0] - 1)]
        if per_element_loss:
            if want_grad:
                _elements_grad(logits[i], targets[i], w, pos_weight, scale, losses, grad)
            else:
                _elements(logits[i], targets[i], w, pos_weight, losses)
            row_sums[i] = 0.0
        elif want_grad:
            row_sums[i] = _sum_grad(logits[i], targets[i], w, pos_weight, scale, grad)
        else:
            row_sums[i] = _sum(logits[i], targets[i], w, pos_weight)


_binary_rows_serial = serial_build(_binary_rows_kernel, "_binary_rows_serial", **_KERNEL_JIT)

_DUMMY_2D = np.zeros((1, 1), dtype=np.float64)


def _rows_or_class(values, n_rows, ones):
    """The kernel's ``(rows, class)`` pair for a weight of None, ``[C]`` or ``[rows, C]``: the
    per-element rows (else a 1-row dummy) and the one row that serves every row (else ``ones``)."""
    if values is not None and values.ndim == 2 and n_rows == 1:
        values = values[0]  # (one row: the same as one value per class)
    rows = values if values is not None and values.ndim == 2 else _DUMMY_2D
    return rows, values if values is not None and values.ndim == 1 else ones


def binary_rows(
    logits: np.ndarray,
    targets: np.ndarray,
    weight: np.ndarray | None,
    pos_weight: np.ndarray | None,
    *,
    per_element_loss: bool,
    scale: float | None,
    parallel: bool | None = None,
) -> tuple[np.ndarray | float, np.ndarray | None]:
    """Binary cross-entropy of C-contiguous ``[rows, C]`` logits and targets (one dtype,
    float32 or float64). ``weight``: None, ``[C]`` (per class) or ``[rows, C]`` (per element),
    float64; ``pos_weight``: the same. ``scale``: None (no gradient) or the number
    each gradient entry is multiplied by.

    Returns ``(loss, grad)``: ``loss`` is the ``[rows, C]`` per-element loss in the logits' dtype
    when ``per_element_loss``, else the float64 sum over every element; ``grad`` the scaled
    ``[rows, C]`` gradient in the logits' dtype, or None.
    """
    n_rows, n_classes = logits.shape
    dtype = logits.dtype
    dummy = np.zeros((1, 1), dtype=dtype)
    ones = np.ones(n_classes)
    weight_rows, weight_class = _rows_or_class(weight, n_rows, ones)
    pos_weight_rows, pos_weight_class = _rows_or_class(pos_weight, n_rows, ones)
    want_grad = scale is not None
    loss_out = np.empty_like(logits) if per_element_loss else dummy
    grad_out = np.empty_like(logits) if want_grad else dummy
    row_sums = np.zeros(n_rows, dtype=np.float64)
    if n_rows and n_classes:
        arguments = (
            logits, targets, weight_rows, weight_class, pos_weight_rows, pos_weight_class,
            float(scale) if want_grad else 0.0, loss_out, per_element_loss, grad_out, want_grad, row_sums,
        )
        threads = threads_for(n_rows * n_classes, parallel, SERIAL_MAX_ELEMENTS)
        if runs_serial(threads, parallel):
            _binary_rows_serial(*arguments)
        else:
            with running_on(min(threads, n_rows)):
                _binary_rows_kernel(*arguments)
    loss = loss_out if per_element_loss else float(row_sums.sum())
    return loss, grad_out if want_grad else None


def compile_all() -> list[str]:
    """Compile (or load from Numba's cache) the binary kernel and its serial build for float32
    and float64 logits (see ``xentkit.kernels.compile_all``)."""
    done = []
    for dtype in (np.float32, np.float64):
        logits = np.zeros((1, 4), dtype=dtype)
        for parallel, name in ((True, "rows"), (False, "serial")):
            binary_rows(logits, logits, None, None, per_element_loss=True, scale=1.0, parallel=parallel)
            done.append(f"binary {name} {np.dtype(dtype).name}")
    return done

