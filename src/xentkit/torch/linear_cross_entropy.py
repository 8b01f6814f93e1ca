"""Cross-entropy of a linear layer's output without ever holding the full logits.

``linear_cross_entropy(x, W, y)`` equals ``cross_entropy(x @ W.T + b, y)`` but walks the rows of
``x`` in chunks. Per chunk of r rows (one reused ``[r, V]`` buffer):

1. ``logits = x_chunk @ W.T (+ b)``                       torch.mm / addmm with ``out=`` the buffer
2. loss and ``dlogits`` by ``xentkit.cross_entropy_and_grad(..., out=logits)``: the fused kernel
   overwrites the logits with their gradient, already scaled by the reduction
3. ``grad_x[chunk] = dlogits @ W``                        written in place into grad_x's rows
4. ``grad_W += dlogits.T @ x_chunk``,  ``grad_b += Σ_rows dlogits``   accumulated in place

So for "mean"/"sum" all gradients are computed in the forward pass (when anything requires a
gradient) and backward only multiplies them by the scalar upstream gradient. For "none" the
upstream gradient is per row and ``grad_W = Σ_i g_i·dlogits_iᵀ x_i`` cannot be factored out of a
stored sum, so forward computes only the losses and backward runs the chunks again with the
upstream gradient (one extra logits matmul; the way torch's chunked op does it too).

The reduction plan (``xentkit.reference.reductions``) is made from the whole batch's target and
weight before the chunks: Σ w_y over the non-ignored rows (hard labels, as torch) or N
(probabilities) for the main term, the non-ignored rows for the z-loss term. Every chunk is
reduced and differentiated with that one plan, so the chunks' losses add up to the batch's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .._options import Integer, LossOptions, Real
from ..api.cross_entropy import _cross_entropy
from ..reference.reductions import ReductionPlan
from . import (
    _bridge,
    _linear_numba,
    _linear_ops,
    _linear_triton,
    _numba_ops,
    _torch_ops,
    _triton_path,
    functional,
)
from ._chunks import batched_chunk_gradients, chunk_rows, detached
from ._linear_checks import check_linear, chunk_size_of

__all__ = ["linear_cross_entropy"]


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked linear + cross-entropy; see the module docstring for the algorithm."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        linear_weight: Tensor,
        linear_bias: Tensor | None,
        target: Tensor,
        weight: Tensor | None,
        options: LossOptions,
        grad_enabled: bool,
    ) -> Tensor:
        _bridge.first_order_anchors(ctx, input, linear_weight, linear_bias)
        x, w, b = detached(input, linear_weight, linear_bias)
        target_array = _bridge.as_numpy(target)
        class_weight = _bridge.optional_numpy(weight)
        want = tuple(grad_enabled and ctx.needs_input_grad[i] for i in range(3))
        plan = _linear_numba.reduction_plan(target_array, class_weight, w.shape[0], options)
        ctx.options, ctx.plan = options, plan

        if options.reduction == "none":
            # Forward computes the losses only; backward needs the per-row upstream gradient.
            _bridge.keep_for_backward(ctx, {}, input, linear_weight, linear_bias, target, weight)
            result = _linear_numba.chunked_pass(
                x, w, b, target_array, class_weight, options, plan, grad_output=None, want=want
            )
            return _bridge.as_tensor(result.loss, _bridge.at_least_float32(x.dtype))

        result = _linear_numba.chunked_pass(
            x, w, b, target_array, class_weight, options, plan,
            grad_output=1.0 if any(want) else None, want=want,
        )
        _bridge.keep_for_backward(ctx, dict(zip(
            _bridge.LINEAR_GRADIENT_NAMES, (result.grad_input, result.grad_weight, result.grad_bias), strict=True
        )))
        # (not the default device; float32 for half-precision inputs)
        return torch.tensor(result.loss, dtype=_bridge.at_least_float32(x.dtype), device=x.device)

    @staticmethod
    @_bridge.first_order_only("linear_cross_entropy")
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.options.reduction == "none":
            (input, linear_weight, linear_bias, target, weight), _ = _bridge.kept_for_backward(ctx)
            want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
            if _bridge.batched_backward(grad_output):
                gradients = _batched_none_gradients(
                    input, linear_weight, linear_bias, target, weight, ctx.options, ctx.plan, grad_output, want
                )
                return (*gradients, None, None, None, None)
            upstream = np.ascontiguousarray(_bridge.as_numpy(grad_output), dtype=np.float64)
            result = _linear_numba.chunked_pass(
                *detached(input, linear_weight, linear_bias),
                _bridge.as_numpy(target),
                _bridge.optional_numpy(weight),
                ctx.options,
                ctx.plan,
                grad_output=upstream.reshape(-1),
                want=want,
            )
            return result.grad_input, result.grad_weight, result.grad_bias, None, None, None, None

        gradients = _bridge.hand_over_gradients(ctx, _bridge.LINEAR_GRADIENT_NAMES, grad_output)
        return (*gradients, None, None, None, None)


def _batched_none_gradients(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
    options: LossOptions, plan: ReductionPlan, grad_output: Tensor, want: tuple[bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """The "none" backward for a batched upstream gradient (``_bridge.batched_backward``): per
    chunk, the kernel's logits gradient at upstream ones (rows do not interact, so row i's
    gradient is linear in its own upstream g_i) times the rows' batched g, then the matmuls out
    of place (``_chunks.batched_chunk_gradients``)."""
    target_array = _bridge.as_numpy(target)
    class_weight = _bridge.optional_numpy(weight)
    upstream = grad_output.reshape(-1, 1)
    ones = np.ones(options.chunk_size, dtype=np.float64)
    work = _linear_numba.work_buffer(input, options.chunk_size, linear_weight.shape[0])

    def chunk_gradient(logits: Tensor, start: int, stop: int) -> Tensor:
        with _linear_numba.widened_chunk(logits, work) as chunk:
            logits_array = chunk.numpy()
            _cross_entropy(
                logits_array, target_array[start:stop], axis=-1, weight=class_weight, options=options,
                check_probabilities=False, want_grad=True, grad_output=ones[: stop - start], out=logits_array,
                plan=plan, batch_rows=target_array.shape[0],  # (split as the batch: chunked_pass's bits)
            )
        return _bridge.batched_product(logits, upstream[start:stop])

    x, w, b = detached(input, linear_weight, linear_bias)
    return batched_chunk_gradients(x, w, b, options.chunk_size, want, chunk_gradient)


def _compiled_beyond_small(input: Tensor, linear_weight: Tensor) -> bool:
    """Whether a compiled call takes the custom ops (:func:`_numba_ops.compiled_beyond_small`, as
    ``cross_entropy``)."""
    rows = math.prod(input.shape[:-1])  # (not numel // in_features, which may be 0)
    return _numba_ops.compiled_beyond_small(rows * linear_weight.shape[0], functional.SMALL_MAX_LOGITS)


def _fused_applies(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
) -> bool:
    """Whether the chunked NumPy path handles the call (else: plain torch ops): float32/float64,
    and bfloat16, whose chunks it widens to float32 (``_linear_numba.chunked_pass``). Not float16:
    the chunks compute the gradients in forward and round them to the layer's dtype there, and
    float16 would flush the entries a loss scaler's factor keeps (a review: 44,777 of 2,048,000
    weight-gradient entries 0 under GradScaler, none on torch's ops); bfloat16 has float32's
    range."""
    if linear_weight.dim() != 2:  # (one dtype for all: check_linear)
        return False
    return _bridge.runs_on_xentkit(
        input, target, weight, grad_free=(target, weight),
        input_dtypes=_LINEAR_DTYPES, layer=(linear_weight, linear_bias),
    )


_LINEAR_DTYPES = (*_bridge.NUMBA_DTYPES, torch.bfloat16)


def _check_targets(input: Tensor, linear_weight: Tensor, target: Tensor, weight: Tensor | None) -> None:
    """The target's and the class weights' layouts (the linear layer's: ``_linear_checks``), by
    the rules of ``xentkit._labels`` as for the logits ``[*rows, V]`` this layer computes."""
    classes = linear_weight.shape[0]
    _bridge.check_class_weight(weight, classes)
    rows = tuple(input.shape[:-1])
    _bridge.target_layout(target, (*rows, classes), rows)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: Integer | None = None,
    label_smoothing: Real = 0.0,
    options: object = None,
    z_loss: Real = 0.0,
    softcap: Real | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    check_labels: bool = True,
    accumulate_in_float32: bool = True,
) -> Tensor:
    r"""Cross-entropy of ``input @ linear_weight.T + linear_bias`` without materializing the logits.

    The same value and gradients as ``cross_entropy(F.linear(input, linear_weight, linear_bias),
    target, ...)`` and as ``torch.nn.functional.linear_cross_entropy`` (whose arguments it takes,
    and ``chunk_size``, ``z_loss`` and ``softcap``; of torch's ``options``, a
    ``LinearCrossEntropyOptions`` or None, only ``batch_chunk_size`` is used, as ``chunk_size``:
    its other fields choose among torch's own strategies): with logits
    z = x Wᵀ + b, the loss of :func:`xentkit.torch.cross_entropy` (formulas at
    :func:`xentkit.cross_entropy`), and ∂loss/∂x = dz·W, ∂loss/∂W = dzᵀ·x, ∂loss/∂b = Σ_rows dz
    with dz the logits' gradient.

    Rows are processed ``chunk_size`` at a time (default: chunk logits at most 1/16 of the full
    logits and at most 32 MiB on the CPU; on CUDA the largest power of two of rows whose logits
    fit in 512 MiB); the fused kernel turns each chunk's logits into their gradient in
    place, which three matmuls per chunk turn into the input, weight and bias gradients. For
    "mean" and "sum" every gradient is computed in the forward pass (when one is needed) and the
    backward only scales it; it is then handed over to autograd, so a second backward needs
    ``retain_graph=True`` on the first. "none" computes the losses in forward and the gradients in
    backward (one extra logits matmul). "mean" with every target ignored gives 0 (torch: NaN).

    Shapes: input ``[N, D]`` or ``[D]``; linear_weight ``[V, D]``; linear_bias ``[V]``; target
    int64 ``[N]`` (``[]``) or probabilities ``[N, V]`` (``[V]``); weight ``[V]``. The loss is a
    scalar, or ``[N]`` for "none"; float32 for float16/bfloat16 inputs, else the input's dtype.
    CPU tensors take the chunked path: float32/float64 as they are, bfloat16 with each chunk's
    logits (the layer's own, from a bfloat16 matmul) widened to float32 for the kernels and their
    gradient rounded back for the chunk's matmuls. float16 (whose gradients, rounded in forward,
    would lose the entries a loss scaler keeps), multi-dimensional ``linear_weight``, bfloat16
    class weights or probability targets, and gradients with respect to target or class weight
    compute the logits with ``F.linear`` and the loss with torch ops.
    ``ignore_index=None`` means -100, as in torch. ``backend``: "auto" (2-D float32/float16/bfloat16
    CUDA inputs, class indices or probabilities: cuBLAS chunks around the Triton kernels, the gradient written
    over each chunk's logits; float32/float64 CPU tensors: the Numba kernels; torch ops elsewhere),
    "triton" (the CUDA path, or a ValueError saying why not) or "torch" (always torch ops). Double
    backward raises. ``check_labels=False``: as :func:`xentkit.torch.cross_entropy`'s (on CUDA no
    wait for the device; a bad label makes its row NaN; the CPU kernels always check).
    ``accumulate_in_float32``: for float16/bfloat16 weights the weight and bias gradients add the
    chunks' contributions in float32 and are rounded once at the end (True, the default: the
    precision contract of ``docs/precision.md``), or add them in the weight's dtype, one rounding
    per chunk (False: saves the float32 copy of the weight gradient, 4 bytes per weight during
    the call, the memory Liger-Kernel's default saves).

    Example:
        >>> import torch
        >>> import xentkit.torch as xt
        >>> x = torch.tensor([[1.0, 2.0], [0.5, -1.0], [0.0, 1.0]], requires_grad=True)
        >>> W = torch.tensor([[0.5, -0.5], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
        >>> loss = xt.linear_cross_entropy(x, W, torch.tensor([2, 0, 1]))
        >>> loss
        tensor(0.8350, grad_fn=<_LinearCrossEntropyFunctionBackward>)
        >>> loss.backward()
        >>> W.grad
        tensor([[-0.0624,  0.2471],
                [ 0.1510, -0.2201],
                [-0.0886, -0.0270]])

    See also: :func:`cross_entropy` (logits already computed), :class:`LinearCrossEntropyLoss`.
    """
    options = LossOptions(  # (torch's options= read first: its batch_chunk_size)
        reduction, -100 if ignore_index is None else ignore_index, label_smoothing, z_loss, softcap,
        chunk_size_of(options, chunk_size), backend, check_labels=check_labels,
        accumulate_in_float32=accumulate_in_float32,
    )
    input, linear_weight, linear_bias = _bridge.autocast_operands(input, linear_weight, linear_bias)
    check_linear(input, linear_weight, linear_bias, class_dims=True)  # K-dimensional: torch ops
    _bridge.check_tensors(input, target, weight)
    if input.dim() not in (1, 2):
        raise ValueError(
            f"input must have shape (N, in_features) or (in_features,), got {tuple(input.shape)}; "
            "flatten leading dimensions first: input.reshape(-1, D), target.reshape(-1)"
        )
    if input.dim() == 1 and linear_weight.dim() > 2:  # (torch: K-dimensional needs a batch)
        raise ValueError(
            f"input must have shape (N, in_features) with a K-dimensional linear_weight "
            f"{tuple(linear_weight.shape)} (its loss is per sample), got unbatched input of shape "
            f"{tuple(input.shape)}; pass input.unsqueeze(0) and a target of shape "
            f"(1, {', '.join(str(size) for size in linear_weight.shape[1:-1])})"
        )

    if _triton_path.takes_triton(
        options.backend, input.device.type == "cuda",
        lambda: _linear_triton.linear_reason(input, linear_weight, linear_bias, target, weight),
    ):
        _check_targets(input, linear_weight, target, weight)
        if torch.compiler.is_compiling():  # custom ops the compiler keeps (no label check)
            return _linear_ops.linear_cross_entropy(input, linear_weight, linear_bias, target, weight, options)
        options = options.replace(
            chunk_size=chunk_rows(
                input.shape[0], linear_weight.shape[0], input.element_size(), options.chunk_size,
                device_type=input.device.type,
            )
        )
        return _linear_triton.TritonLinearCrossEntropyFunction.apply(
            input, linear_weight, linear_bias, target, weight, options, _bridge.gradients_wanted()
        )

    if (
        torch.compiler.is_compiling() and options.backend == "auto"
        and _compiled_beyond_small(input, linear_weight)
        and _linear_numba.runs_compiled(input, linear_weight, linear_bias, target, weight, options)
    ):  # custom ops the compiler keeps, around the eager path's chunks (labels checked)
        _check_targets(input, linear_weight, target, weight)
        if input.dim() == 1:
            return _linear_numba.linear_cross_entropy(
                input.unsqueeze(0), linear_weight, linear_bias, target.unsqueeze(0), weight, options
            ).reshape(())  # (one sample: one loss)
        return _linear_numba.linear_cross_entropy(input, linear_weight, linear_bias, target, weight, options)
    if options.backend != "auto" or not _fused_applies(input, linear_weight, linear_bias, target, weight):
        if linear_weight.dim() == 2:  # the bias added inside the matmul: one rounding
            logits = F.linear(input, linear_weight, linear_bias)
        else:  # K-dimensional loss: classes on axis 1, then d1..dk
            logits = F.linear(input, linear_weight.flatten(0, -2), None)
            logits = logits.unflatten(-1, linear_weight.shape[:-1])
            if linear_bias is not None:
                logits = logits + linear_bias
        return _torch_ops.cross_entropy(
            logits, target, weight, options, result_dtype=_bridge.at_least_float32(logits.dtype),
            classes=f"linear_weight has {linear_weight.shape[0]} rows (classes)",
        )

    _check_targets(input, linear_weight, target, weight)
    unbatched = input.dim() == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    # chunk_size resolved to this call's rows per chunk
    options = options.replace(  # (half-precision chunks are widened: their float32 copy's bytes)
        chunk_size=chunk_rows(input.shape[0], linear_weight.shape[0], max(input.element_size(), 4), options.chunk_size)
    )
    loss = _LinearCrossEntropyFunction.apply(
        input, linear_weight, linear_bias, target, weight, options, _bridge.gradients_wanted()
    )
    return loss.squeeze(0) if unbatched and options.reduction == "none" else loss
