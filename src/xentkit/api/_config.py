"""Which implementation the api runs: the fused kernels (default) or the NumPy reference."""

from __future__ import annotations

import os
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


_state = {"reference": _from_environment()}


def reference_enabled() -> bool:
    """True when the api runs the NumPy reference instead of the compiled kernels."""
    return _state["reference"]


class use_reference:
    """Force the NumPy reference (``enabled=True``) or the kernels (``False``) in the api.

    Called plainly it switches for the rest of the process; used as a context manager it switches
    inside the ``with`` block and restores the previous choice afterwards. The environment
    variable ``XENTKIT_REFERENCE`` sets the initial choice: ``1``, ``true``, ``yes`` or ``on`` the
    reference; ``0``, ``false``, ``no``, ``off`` or unset the kernels; any other value makes
    ``import xentkit`` raise a ValueError naming it. The switch is process-wide (not
    per thread).

    >>> import xentkit
    >>> with xentkit.use_reference():
    ...     loss = xentkit.cross_entropy([[2.0, 0.5]], [0])
    >>> xentkit.reference_enabled()
    False
    """

    def __init__(self, enabled: bool = True) -> None:
        enabled = check_flag(enabled, "enabled")
        self._previous = _state["reference"]
        _state["reference"] = enabled

    def __enter__(self) -> use_reference:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        _state["reference"] = self._previous
