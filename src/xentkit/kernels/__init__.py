"""Fused Numba kernels on contiguous 2-D arrays (rows × classes).

Importing this package is cheap: Numba and the compiled kernels load on the first call
(``cache=True``: compiled once per machine, then loaded from ``__pycache__``).
Contract: ``docs/CONTRACTS.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["cross_entropy_rows"]


def cross_entropy_rows(
    logits: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad_scale: np.ndarray | None,
    z_grad_scale: np.ndarray | None,
    grad_out: np.ndarray | None,
    **tuning: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row cross-entropy loss and log-sum-exp, and the gradient when ``grad_out`` is given.

    Returns ``(loss_rows, lse_rows)``; see
    :func:`xentkit.kernels.cross_entropy.cross_entropy_rows` for the formulas. This wrapper
    only defers importing Numba to the first call.
    """
    from xentkit.kernels.cross_entropy import cross_entropy_rows as _cross_entropy_rows

    return _cross_entropy_rows(
        logits,
        labels,
        weight,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        grad_scale,
        z_grad_scale,
        grad_out,
        **tuning,
    )
