"""Which implementation the api runs: the fused kernels (default) or the NumPy reference."""

from __future__ import annotations

import contextvars
import os
import threading
from types import TracebackType

from .._options import check_flag

_ENVIRONMENT_VARIABLE = "XENTKIT_REFERENCE"
_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _from_environment() -> bool:
    """The initial choice, from ``XENTKIT_REFERENCE``: a value this cannot read is an error
    rather than a guess (a typo must not silently switch paths)."""
    value = os.environ.get(_ENVIRONMENT_VARIABLE, "").strip().lower()
    if value not in _ON + _OFF:
        raise ValueError(
            f"{_ENVIRONMENT_VARIABLE} must be one of {', '.join(_ON)} (the NumPy reference) or "
            f"{', '.join(repr(v) for v in _OFF)} (the kernels), got {os.environ[_ENVIRONMENT_VARIABLE]!r}"
        )
    return value in _ON


_state = {"reference": _from_environment()}  # the process-wide choice
# a ``with use_reference(...)`` block's choice, for its own thread (or asyncio task) only: blocks
# in two threads that overlap would otherwise restore each other's values, and leave the
# process-wide choice stuck on
_BLOCK: contextvars.ContextVar[bool | None] = contextvars.ContextVar("xentkit_use_reference", default=None)
_LOCK = threading.Lock()


def reference_enabled() -> bool:
    """True when the api runs the NumPy reference instead of the compiled kernels (here: in this
    thread's ``with use_reference(...)`` block, else the process-wide choice)."""
    block = _BLOCK.get()
    return _state["reference"] if block is None else block


class use_reference:
    """Force the NumPy reference (``enabled=True``) or the kernels (``False``) in the api.

    Called plainly it switches for the rest of the process (every thread); used as a context
    manager it switches inside the ``with`` block, for the thread (or asyncio task) that runs the
    block, and the previous choice holds again afterwards; other threads keep theirs (as
    ``numpy.errstate``). The environment variable ``XENTKIT_REFERENCE`` sets the initial choice:
    ``1``, ``true``, ``yes`` or ``on`` the reference; ``0``, ``false``, ``no``, ``off`` or unset
    the kernels; any other value makes ``import xentkit`` raise a ValueError naming it.

    >>> import xentkit
    >>> with xentkit.use_reference():
    ...     loss = xentkit.cross_entropy([[2.0, 0.5]], [0])
    >>> xentkit.reference_enabled()
    False
    """

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = check_flag(enabled, "enabled")
        with _LOCK:  # called plainly: the process-wide switch (undone by __enter__ for a block)
            self._previous = _state["reference"]
            _state["reference"] = self._enabled
        self._token: contextvars.Token | None = None

    def __enter__(self) -> use_reference:
        with _LOCK:  # a block's choice is its thread's alone: the process-wide one as it was
            if _state["reference"] == self._enabled:
                _state["reference"] = self._previous
        self._token = _BLOCK.set(self._enabled)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _BLOCK.reset(self._token)
            self._token = None
