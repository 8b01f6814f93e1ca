"""Fused cross-entropy against class probabilities: per-row loss and gradient, the contract of
``cross_entropy_rows`` (``docs/CONTRACTS.md``) with an ``[N, C]`` target of probabilities.

For each row i (``prange`` over rows; logits x, target q, class weights w, smoothing ε, C
classes; z the optionally soft-capped logits):

    Pass 1 (the hard-label kernel's ``_pass1``, one read of the row): m = max z, s = Σ exp(z − m)
        (m taken as 0 for a row of −inf, as the reference does)
    Pass 2 (one read of the row and of q), in float64:
        mass_j = w_j·q'_j,  q' = (1 − ε)·q + ε/C         (q itself without smoothing)
        A      = Σ_j mass_j
        loss_i = Σ_{mass_j ≠ 0} mass_j·(log s − (z_j − m))  = −Σ_c w_c·q'_c·log p_c
                 (a class of zero mass adds nothing, not 0·log 0 = NaN at a −inf logit: the
                 reference's ``xlogy``), computed as A·log s − Σ_{mass_j ≠ 0} mass_j·(z_j − m),
                 or term by term where A is not finite (an infinite class weight or target:
                 there A·log s − S would be inf·0 = NaN where the reference finds +inf)
    Pass 3 (one read of the row and of q, one write of the gradient):
        grad_ij = s'(x_ij)·(g_i·(p_j·A − mass_j) + g^z_i·2·λ_z·lse·p_j),  p_j = exp(z_j − m)·(1/s)
        for a finite upstream g_i; for an infinite or NaN one torch's order, (g_i·A)·p_j − g_i·mass_j
        (NaN across the row, as the reference and torch). s'(x) = 1 − tanh²(x/softcap), 1 without.

Pass 3 reads x_ij and q_ij and then writes grad_ij of the same element, so ``grad_out`` may be
the logits (in place); it must not overlap the target (the api refuses that). The per-element
arithmetic of passes 2 and 3 is float64 (the exponentials in the logits' dtype, as pass 1), so
float32 rows lose nothing to cancellation in p_j·A − mass_j.

Drivers: ``_probability_rows_kernel`` gives each thread whole rows; its serial build runs small
problems on the calling thread. There is no split-row driver: fewer rows than threads run on as
many threads as there are rows.

No validation here: the api checks shapes and dtypes before calling.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from xentkit.kernels._exp import fast_exp_nonpositive, fast_tanh, like
from xentkit.kernels._threading import running_on, serial_build, threads_for
from xentkit.kernels.cross_entropy import (
    _JIT,
    _KERNEL_JIT,
    _ONE,
    DEFAULT_BLOCK,
    SERIAL_MAX_ELEMENTS,
    _pass1,
    _same_buffer,
    upstream_scales,
)

__all__ = ["probability_rows"]


@njit(forceinline=True, fastmath={"contract"}, error_model="numpy", nogil=True)
def _mass(q, w, has_weight, keep, uniform):  # pragma: no cover - compiled
    """A class's target mass w·q' in float64, q' = (1 − ε)·q + ε/C (q itself without smoothing)."""
    target = np.float64(q)
    if uniform > 0.0:
        target = keep * target + uniform
    return target * w if has_weight else target


@njit(forceinline=True, fastmath={"contract"}, error_model="numpy", nogil=True)
def _z(x, cap, inv_cap):  # pragma: no cover - compiled
    """The (soft-capped, ``cap`` 0: not) logit in float64, computed as pass 1 computes it."""
    if cap > 0.0:
        t, _ = fast_tanh(x * inv_cap)
        return np.float64(cap * t)
    return np.float64(x)


@njit(**_JIT)
def _loss_terms(row, q, weight, has_weight, keep, uniform, shift, cap, inv_cap):  # pragma: no cover
    """Pass 2 of one row, in float64: ``(S, A, nonzero)``, S = Σ_{mass_j ≠ 0} mass_j·(z_j − m),
    A = Σ_j mass_j and the number of classes of nonzero mass; the loss is A·log s − S (when
    nonzero > 0; else 0). The sums as the hard-label kernel's Σ w_j·(z_j − r): reassociated over
    vector lanes, each term's difference taken before its product."""
    weighted = 0.0
    total = 0.0
    nonzero = 0.0
    for j in range(row.shape[0]):
        mass = _mass(q[j], weight[j] if has_weight else 1.0, has_weight, keep, uniform)
        total += mass
        # a class of zero mass adds nothing (not 0·(−inf) = NaN); a NaN mass spreads
        live = mass != 0.0
        weighted += mass * (_z(row[j], cap, inv_cap) - shift) if live else 0.0
        nonzero += 1.0 if live else 0.0
    return weighted, total, nonzero


@njit(fastmath={"contract"}, error_model="numpy", nogil=True)
def _loss_by_terms(row, q, weight, has_weight, keep, uniform, shift, log_s, cap, inv_cap):  # pragma: no cover
    """The loss of one row term by term, Σ_{mass_j ≠ 0} mass_j·(log s − (z_j − m)), as the
    reference adds it: for rows whose total mass is not finite (an infinite class weight or
    target), where A·log s − S would make inf·0 = NaN of terms the reference finds infinite."""
    loss = 0.0
    for j in range(row.shape[0]):
        mass = _mass(q[j], weight[j] if has_weight else 1.0, has_weight, keep, uniform)
        if mass != 0.0:
            loss += mass * (log_s - (_z(row[j], cap, inv_cap) - shift))
    return loss


# Pass 3's helpers: no reductions here, so no reassociation either (torch's order for a
# non-finite upstream stays as written); fused multiply-adds only.
_GRAD_JIT = {"fastmath": {"contract"}, "error_model": "numpy", "nogil": True}


@njit(forceinline=True, **_GRAD_JIT)
def _gradient_entry(x, q, w, has_weight, keep, uniform, shift, inv_s, total, g, finite, z_coef, cap, inv_cap):  # pragma: no cover
    """One gradient entry from its logit ``x``, target ``q`` and class weight ``w`` (the module
    docstring's pass 3; ``cap`` 0 means no softcap)."""
    if cap > 0.0:
        t, d = fast_tanh(x * inv_cap)
        z = cap * t
    else:
        z = x
        d = like(1.0, x)
    p = np.float64(fast_exp_nonpositive(z - shift)) * inv_s
    mass = _mass(q, w, has_weight, keep, uniform)
    if finite:
        value = g * (p * total - mass)
    else:  # torch's order: NaN where p = 0 (0·∞) and where the two terms cancel (∞ − ∞)
        value = (g * total) * p - g * mass
    if z_coef != 0.0:
        value += z_coef * p
    return np.float64(d) * value


@njit(**_GRAD_JIT)
def _gradient(row, q, dst, weight, has_weight, keep, uniform, shift, inv_s, total, g, z_coef, cap, inv_cap):  # pragma: no cover
    """Pass 3: one row's gradient into ``dst``."""
    finite = math.isfinite(g)
    for j in range(row.shape[0]):
        w = weight[j] if has_weight else 1.0
        dst[j] = _gradient_entry(
            row[j], q[j], w, has_weight, keep, uniform, shift, inv_s, total, g, finite, z_coef, cap, inv_cap
        )


@njit(**_GRAD_JIT)
def _gradient_inplace(row, q, weight, has_weight, keep, uniform, shift, inv_s, total, g, z_coef, cap, inv_cap):  # pragma: no cover
    """Pass 3 over the logits' own memory (one array: no aliasing check, so LLVM vectorizes)."""
    finite = math.isfinite(g)
    for j in range(row.shape[0]):
        w = weight[j] if has_weight else 1.0
        row[j] = _gradient_entry(
            row[j], q[j], w, has_weight, keep, uniform, shift, inv_s, total, g, finite, z_coef, cap, inv_cap
        )


@njit(parallel=True, **_KERNEL_JIT)
def _probability_rows_kernel(  # pragma: no cover - compiled
    logits,
    targets,
    weight,
    has_weight,
    label_smoothing,
    z_loss,
    softcap,
    grad_scale,
    z_grad_scale,
    grad_out,
    want_grad,
    in_place,
    block,
    loss_rows,
    lse_rows,
):
    """Every row, spread over Numba's threads: the three passes of the module docstring.
    ``weight`` is a 1-element dummy without weights (``has_weight`` False); ``grad_out``,
    ``grad_scale`` and ``z_grad_scale`` are dummies unless ``want_grad``."""
    n_rows, n_classes = logits.shape
    keep = 1.0 - label_smoothing
    uniform = label_smoothing / n_classes
    cap = like(softcap, logits)  # 0: no softcap
    inv_cap = like(1.0 / softcap if softcap > 0.0 else 1.0, logits)
    for i in prange(n_rows):
        row = logits[i]
        q = targets[i]
        m, s, _, _ = _pass1(row, 0, n_classes, weight, False, 0.0, softcap, block)
        shift = np.float64(m) if m > -np.inf else 0.0  # a row of −inf: shift 0, as pass 1
        log_s = math.log(s)
        lse = shift + log_s
        weighted, total, nonzero = _loss_terms(row, q, weight, has_weight, keep, uniform, shift, cap, inv_cap)
        # −Σ mass_j·log p_j = Σ mass_j·(log s − (z_j − m)); nothing when every mass is 0
        if not math.isfinite(total):  # an infinite mass: term by term, as the reference
            loss_rows[i] = _loss_by_terms(row, q, weight, has_weight, keep, uniform, shift, log_s, cap, inv_cap)
        else:
            loss_rows[i] = total * log_s - weighted if nonzero > 0.0 else 0.0
        lse_rows[i] = lse
        if want_grad:
            z_coef = 2.0 * z_loss * lse * z_grad_scale[i] if z_loss > 0.0 else 0.0
            shift_work = like(shift, row)  # the exponent as pass 1 takes it, in the row's dtype
            inv_s = 1.0 / s
            if in_place:
                _gradient_inplace(
                    row, q, weight, has_weight, keep, uniform, shift_work, inv_s, total, grad_scale[i],
                    z_coef, cap, inv_cap,
                )
            else:
                _gradient(
                    row, q, grad_out[i], weight, has_weight, keep, uniform, shift_work, inv_s, total,
                    grad_scale[i], z_coef, cap, inv_cap,
                )


# the row kernel on the calling thread alone, for small problems (see serial_build)
_probability_rows_serial = serial_build(_probability_rows_kernel, "_probability_rows_serial", **_KERNEL_JIT)

def probability_rows(
    logits: np.ndarray,
    targets: np.ndarray,
    weight: np.ndarray | None,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad_scale: np.ndarray | None,
    z_grad_scale: np.ndarray | None,
    grad_out: np.ndarray | None,
    *,
    block: int = DEFAULT_BLOCK,
    parallel: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row cross-entropy against class probabilities and log-sum-exp, and optionally the
    gradient (fused): ``cross_entropy_rows`` for an ``[N, C]`` target (which calls this).

    ``logits`` and ``targets`` are C-contiguous ``[N, C]`` arrays of one dtype, float32 or
    float64; nothing is validated. Returns ``(loss_rows, lse_rows)``, both ``[N]`` float64:
    ``loss_rows[i] = −Σ_c w[c]·q'[c]·log p_c`` (q' = (1−ε)·q + ε/C; a class with w·q' = 0 adds
    nothing) and ``lse_rows[i] = log Σ_c exp(z_c)``. When ``grad_out`` is given (it may be
    ``logits`` itself, never ``targets``), it receives
    ``s'(x)·(grad_scale[i]·(p·Σ_c w[c]·q'[c] − w·q') + z_grad_scale[i]·2·z_loss·lse·p)`` row by
    row (ones by default). The z-loss term itself is not in ``loss_rows``. ``block`` and
    ``parallel`` as in ``cross_entropy_rows``.
    """
    n_rows, n_classes = logits.shape
    if weight is None:
        has_weight, weight64 = False, _ONE
    else:
        has_weight, weight64 = True, np.ascontiguousarray(weight, dtype=np.float64)
    want_grad = grad_out is not None
    in_place = want_grad and _same_buffer(grad_out, logits)
    grad_scale, z_grad_scale = upstream_scales(grad_scale, z_grad_scale, n_rows, want_grad)
    loss_rows = np.empty(n_rows, dtype=np.float64)
    lse_rows = np.empty(n_rows, dtype=np.float64)
    if n_rows == 0:
        return loss_rows, lse_rows
    arguments = (
        logits,
        targets,
        weight64,
        has_weight,
        float(label_smoothing),
        float(z_loss),
        0.0 if softcap is None else float(softcap),
        grad_scale,
        z_grad_scale,
        logits if (in_place or not want_grad) else grad_out,
        want_grad,
        in_place,
        max(int(block), 1),
        loss_rows,
        lse_rows,
    )
    threads = threads_for(n_rows * n_classes, parallel, SERIAL_MAX_ELEMENTS)
    if threads == 1:  # the calling thread alone: no pool, no thread count
        _probability_rows_serial(*arguments)
        return loss_rows, lse_rows
    with running_on(min(threads, n_rows)):
        _probability_rows_kernel(*arguments)
    return loss_rows, lse_rows


def compile_all() -> list[str]:
    """Compile (or load from Numba's cache) the probability kernel and its serial build for
    float32 and float64 logits (see ``xentkit.kernels.compile_all``)."""
    done = []
    for dtype in (np.float32, np.float64):
        logits = np.zeros((1, 4), dtype=dtype)
        targets = np.full((1, 4), 0.25, dtype=dtype)
        for parallel, name in ((True, "rows"), (False, "serial")):
            probability_rows(logits, targets, None, 0.0, 0.0, None, None, None, logits.copy(), parallel=parallel)
            done.append(f"probabilities {name} {np.dtype(dtype).name}")
    return done
