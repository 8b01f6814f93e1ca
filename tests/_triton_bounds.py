"""A bounds check for Triton kernels run by Triton's interpreter (``TRITON_INTERPRET=1``): every
load, store and atomic whose mask lets it through must fall inside the memory of one of the
launch's tensor arguments, or the launch raises :class:`OutOfBounds` naming the kernel, the
access and the address.

Under the interpreter a Triton pointer is a raw address: a masked-in access beyond a tensor reads
or writes whatever the process has there (on a GPU it is the same bug, unseen or an illegal
address). An out-of-bounds store corrupts the heap and the process dies later, somewhere else
(a CI run's segmentation fault); a load usually returns garbage that a mask then hides. Here
each one fails the test that made it.

The allowed memory of a launch: for each tensor argument (tuples and tensor descriptors too), the
bytes from its first element to the end of its last, by its sizes and strides; overlapping
spans merged, taken from the host tensors the interpreter runs the kernel on. :func:`install`
patches the interpreter's memory functions and its grid executor once; the spans of the launch
running on a thread live in a thread-local.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["OutOfBounds", "install"]


class OutOfBounds(AssertionError):
    """A masked-in access outside every tensor argument of the launch."""


_state = threading.local()


def _spans(args) -> np.ndarray:
    """``[k, 2]`` byte spans ``[start, end)`` of the tensors in ``args``, merged, sorted."""
    spans = []

    def visit(arg):
        if isinstance(arg, (tuple, list)):
            for item in arg:
                visit(item)
            return
        base = getattr(arg, "base", None)
        if base is not None and hasattr(base, "data_ptr") and not hasattr(arg, "data_ptr"):
            visit(base)  # a tensor descriptor
            return
        if not (hasattr(arg, "data_ptr") and hasattr(arg, "stride")):
            return
        if arg.numel() == 0:
            return
        last = sum((size - 1) * stride for size, stride in zip(arg.shape, arg.stride(), strict=True))
        start = arg.data_ptr()
        spans.append((start, start + (last + 1) * arg.element_size()))

    visit(list(args))
    if not spans:
        return np.zeros((0, 2), dtype=np.uint64)
    spans.sort()
    merged = [list(spans[0])]
    for start, end in spans[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return np.array(merged, dtype=np.uint64)


def _check(what: str, pointers: np.ndarray, mask: np.ndarray | None, itemsize: int) -> None:
    spans = getattr(_state, "spans", None)
    if spans is None:  # (not inside a launch we saw: nothing to check against)
        return
    addresses = np.asarray(pointers, dtype=np.uint64)
    if mask is not None:
        addresses = addresses[np.broadcast_to(np.asarray(mask, dtype=bool), addresses.shape)]
    addresses = addresses.reshape(-1)
    if addresses.size == 0:
        return
    index = np.searchsorted(spans[:, 0], addresses, side="right").astype(np.int64) - 1
    inside = index >= 0
    clipped = np.maximum(index, 0)
    inside &= addresses + np.uint64(itemsize) <= spans[clipped, 1]
    if not inside.all():
        bad = addresses[~inside]
        raise OutOfBounds(
            f"{_state.kernel}: a masked-in {what} of {itemsize}-byte elements reaches outside every "
            f"tensor argument ({bad.size} of {addresses.size} addresses, first {int(bad[0]):#x}; "
            f"the arguments span {[(hex(int(a)), int(b - a)) for a, b in spans]})"
        )


class _CheckedInterpreter:
    """The interpreter's C++ memory module with every access checked first."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, pointers, mask, other, dtype):
        _check("load", pointers, mask, np.dtype(dtype).itemsize)
        return self._inner.load(pointers, mask, other, dtype)

    def store(self, pointers, values, mask):
        _check("store", pointers, mask, np.asarray(values).dtype.itemsize)
        return self._inner.store(pointers, values, mask)

    def atomic_rmw(self, op, pointers, values, mask, semantic):
        _check("atomic", pointers, mask, np.asarray(values).dtype.itemsize)
        return self._inner.atomic_rmw(op, pointers, values, mask, semantic)

    def atomic_cas(self, pointers, compare, values, semantic):
        _check("atomic compare-and-swap", pointers, None, np.asarray(values).dtype.itemsize)
        return self._inner.atomic_cas(pointers, compare, values, semantic)


def install() -> bool:
    """Patch Triton's interpreter (idempotent); False where there is none to patch."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    if isinstance(interpreter._interpreter, _CheckedInterpreter):
        return True
    interpreter._interpreter = _CheckedInterpreter(interpreter._interpreter)
    executor = interpreter.GridExecutor
    launch, to_host = executor.__call__, executor._init_args_hst

    def checked_launch(self, *args, **kwargs):
        previous = getattr(_state, "spans", None), getattr(_state, "kernel", None)
        _state.spans, _state.kernel = None, getattr(self.fn, "__name__", "a kernel")
        try:
            return launch(self, *args, **kwargs)
        finally:
            _state.spans, _state.kernel = previous

    def checked_to_host(self, args, kwargs):
        # the spans of the tensors the kernel runs on: the arguments' host copies (the arguments
        # themselves for CPU tensors; CUDA tensors under the interpreter are copied)
        args_host, kwargs_host = to_host(self, args, kwargs)
        _state.spans = _spans([*args_host, *kwargs_host.values()])
        return args_host, kwargs_host

    executor.__call__, executor._init_args_hst = checked_launch, checked_to_host
    return True
