"""The reduction plan shared by every loss and every path: the one home of "mean of nothing is 0".

A loss is a main term per row (the cross-entropy, NLL, BCE... of that row) and, for
cross-entropy with ``z_loss``, a z term per row. "none" returns them per row; "sum" adds them up
(float64 for NumPy rows, at least float32 for tensors); "mean" divides each sum by its own
denominator:

    hard labels:         main over Σ w_y (non-ignored rows),  z over the number of non-ignored rows
    probabilities, BCE:  both over the number of rows (elements)

and is 0 (with gradient 0) when a denominator is 0 (every target ignored, class weights summing
to 0 over the targets, or no rows), where PyTorch gives NaN. The gradient of row i's main term is
multiplied by ``scales(upstream)[0]`` (the upstream gradient, over the denominator for "mean"),
its z term by ``scales(upstream)[1]``.

Array-agnostic: rows may be NumPy arrays or torch tensors (denominators then stay tensors, so a
CUDA or compiled caller never synchronizes on them); torch is never imported here.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import numpy as np

__all__ = ["ReductionPlan", "masked"]


_HOST_TYPES = (np.ndarray, np.generic, float, int)


def _torch_tensor(value: object) -> bool:
    if isinstance(value, _HOST_TYPES):  # the NumPy api's per-call path: decided at once
        return False
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _total(rows: Any) -> Any:
    """The sum of ``rows``: float64 for NumPy, at least float32 for tensors (bfloat16 rows are
    not summed in bfloat16)."""
    if _torch_tensor(rows):
        import torch

        return rows.sum(dtype=torch.promote_types(rows.dtype, torch.float32))
    # rows of +inf and −inf: NaN, and a sum beyond the dtype: inf, without a warning (as torch)
    with np.errstate(invalid="ignore", over="ignore"):
        if isinstance(rows, np.ndarray):
            return rows.sum(dtype=np.float64)  # np.sum's own summation, without its wrapper
        return np.sum(rows, dtype=np.float64)


# the largest finite value of each NumPy float dtype (also the api's narrowing casts, ``rounded``)
FLOAT_MAX = {np.dtype(kind): float(np.finfo(kind).max) for kind in (np.float16, np.float32, np.float64)}


def _divide_or_zero(numerator: Any, denominator: Any) -> Any:
    """numerator / denominator, and 0 (gradient 0, not NaN) where the denominator is 0."""
    if _torch_tensor(denominator):
        import torch

        nonzero = denominator != 0
        quotient = numerator / torch.where(nonzero, denominator, 1.0)
        return torch.where(nonzero, quotient, 0.0)
    if denominator != 0:
        if _torch_tensor(numerator) and numerator.is_floating_point():
            # by a 0-d tensor, not the Python float: torch.func's jvp gives a tensor ÷ Python
            # float a float64 tangent (jacfwd of a float32 mean came out float64). The same bits
            # as torch's division by the float: float32 (half-precision numerators) or float64
            # arithmetic on the float rounded to that type; a CPU tensor, which a CUDA kernel takes
            # as a scalar, as it took the float (a CUDA divisor is divided by, not multiplied by
            # its reciprocal: 1 ulp apart).
            import torch

            work = numerator if numerator.dtype in (torch.float32, torch.float64) else numerator.float()
            return (work / torch.tensor(denominator, dtype=work.dtype, device="cpu")).to(numerator.dtype)
        if isinstance(numerator, (np.generic, np.ndarray)) and numerator.ndim == 0 and numerator.dtype.kind == "f":
            # in Python floats: inf/inf is NaN and an overflow ±inf, as in torch, without the
            # warnings NumPy would give (cheaper than silencing them)
            quotient = float(numerator) / denominator
            if abs(quotient) > FLOAT_MAX.get(numerator.dtype, math.inf):  # beyond a narrower dtype
                quotient = math.copysign(math.inf, quotient)
            return numerator.dtype.type(quotient)
        return numerator / denominator
    if _torch_tensor(numerator):  # 0 that keeps the graph (an empty batch's loss has a gradient)
        import torch

        return torch.where(torch.zeros_like(numerator, dtype=torch.bool), numerator, 0.0)
    return np.zeros_like(numerator) if isinstance(numerator, np.ndarray) else 0.0


def masked(values: Any, mask: Any) -> Any:
    """``values`` where ``mask``, else 0 (never 0·inf = NaN): np.where or torch.where."""
    if _torch_tensor(values):
        import torch

        return torch.where(mask, values, torch.zeros_like(values))
    return np.where(mask, values, values.dtype.type(0) if isinstance(values, np.ndarray) else 0.0)


def _count(values: Any, tensor_dtype: Any = None) -> Any:
    """The float sum of ``values`` (a mask or weights): a Python float for NumPy, a tensor of
    ``tensor_dtype`` for tensors."""
    if _torch_tensor(values):
        return values.sum(dtype=tensor_dtype)
    if values.dtype == np.bool_:
        return float(np.count_nonzero(values))
    with np.errstate(invalid="ignore"):  # weights of +inf and −inf: NaN, no warning (as torch)
        return float(np.sum(values, dtype=np.float64))


@dataclasses.dataclass(frozen=True)
class ReductionPlan:
    """How per-row terms become the loss and how the upstream gradient reaches each row.

    ``denominator`` divides the main term under "mean", ``z_denominator`` the z term (by default
    the same). Both are floats, or 0-d tensors when built from tensors.
    """

    reduction: str
    denominator: Any = 1.0
    z_denominator: Any = None

    def __post_init__(self) -> None:
        if self.z_denominator is None:
            object.__setattr__(self, "z_denominator", self.denominator)

    @classmethod
    def of_labels(
        cls, reduction: str, valid: Any, target_weight: Any = None, *, dtype: Any = None
    ) -> ReductionPlan:
        """Hard labels: ``valid`` marks the non-ignored rows, ``target_weight`` is w_y per row
        (0 on ignored rows; None without class weights). ``dtype``: the tensors' sum dtype."""
        count = _count(valid, dtype)
        main = count if target_weight is None else _count(target_weight, dtype)
        return cls(reduction, main, count)

    @classmethod
    def of_targets(
        cls, reduction: str, labels: Any, ignore_index: int, weight: Any = None, *, dtype: Any = None,
        valid: Any = None,
    ) -> tuple[Any, ReductionPlan]:
        """Hard labels (already checked to be in range or ``ignore_index``) and the class
        weights: ``(valid, plan)``, the non-ignored mask and the plan over Σ w_y and the count.
        ``dtype``: for tensors, the dtype of the weights and sums (float64 for NumPy); ``valid``:
        the mask ``labels != ignore_index`` when the caller has it already (the label check
        returns it)."""
        if valid is None:
            valid = labels != ignore_index
        if weight is None:
            return valid, cls.of_labels(reduction, valid, None, dtype=dtype)
        safe = masked(labels, valid)  # ignored rows look up class 0, then count 0
        if _torch_tensor(labels):
            # (indexing with a 0-d tensor would read its value: no graph under torch.compile)
            picked = weight.to(dtype).index_select(0, safe.long().reshape(-1)).reshape(safe.shape)
        else:
            picked = np.asarray(weight, dtype=np.float64)[safe.astype(np.int64)]
        return valid, cls.of_labels(reduction, valid, masked(picked, valid), dtype=dtype)

    @classmethod
    def of_rows(cls, reduction: str, rows: int) -> ReductionPlan:
        """Every row counts once (probability targets, elementwise losses)."""
        return cls(reduction, float(rows), float(rows))

    def scales(self, upstream: Any = 1.0) -> tuple[Any, Any]:
        """(main, z) gradient coefficients of each row for the upstream gradient ``upstream``
        (a scalar for "mean"/"sum", one value per row for "none")."""
        if self.reduction != "mean":
            return upstream, upstream
        return (
            _divide_or_zero(upstream, self.denominator),
            _divide_or_zero(upstream, self.z_denominator),
        )

    def reduce(self, main: Any, z: Any = None) -> Any:
        """The loss from per-row main terms and (optionally) z terms."""
        if self.reduction == "none":
            return main if z is None else main + z
        if self.reduction == "sum":
            loss = _total(main) if z is None else _total(main) + _total(z)
        else:
            loss = _divide_or_zero(_total(main), self.denominator)
            if z is not None:
                loss = loss + _divide_or_zero(_total(z), self.z_denominator)
        return loss if _torch_tensor(loss) else np.asarray(loss)
