"""Which implementation the api runs: the fused kernels (default) or the NumPy reference."""

from __future__ import annotations

import contextvars
import dis
import functools
import itertools
import os
import sys
import threading
import weakref
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


_state = {"reference": _from_environment()}  # the process-wide choice (kept by _apply)
# a ``with use_reference(...)`` block's choice, for its own thread (or asyncio task) only: blocks
# in two threads that overlap would otherwise restore each other's values, and leave the
# process-wide choice stuck on
_BLOCK: contextvars.ContextVar[bool | None] = contextvars.ContextVar("xentkit_use_reference", default=None)
# reentrant: a signal handler (or a __del__) that switches while this thread holds it would
# otherwise wait for itself forever (a review)
_LOCK = threading.RLock()
# ``use_reference(...)`` cannot tell in ``__init__`` whether it is called plainly (a process-wide
# switch) or for a ``with`` block (whose ``__enter__`` comes next and takes the switch back). So
# the process-wide choice is that of the latest switch not taken back, over the initial one: a
# log of (the object, by weak reference, its choice). ``__enter__`` removes its own entry, wherever
# it is, so two blocks whose ``__init__`` and ``__enter__`` interleave in two threads leave the
# choice as it was (restoring a remembered "previous" value left it stuck on a block's choice).
# An object that is gone can never be entered: its switch is for good, and what came before it
# no longer counts (dropped now and then: the log stays short however many plain calls).
_INITIAL = _state["reference"]
_SWITCHES: dict[int, tuple[weakref.ref, bool]] = {}  # in the order of the switches
_NUMBERS = itertools.count()
_PRUNE_AT = 64  # the log's length at which gone objects' entries are looked for (then 2× what stays)


def _apply() -> None:
    """Set the process-wide choice from the log (under ``_LOCK``): the latest entry's, else the
    initial one. Now and then (amortized O(1) a call) what no longer counts is dropped: every
    entry up to the latest whose object is gone, whose choice becomes the initial one."""
    global _INITIAL, _PRUNE_AT
    if len(_SWITCHES) >= _PRUNE_AT:
        entries = list(_SWITCHES.items())
        for index in range(len(entries) - 1, -1, -1):
            reference, enabled = entries[index][1]
            if reference() is None:
                _INITIAL = enabled
                for number, _ in entries[: index + 1]:
                    _SWITCHES.pop(number, None)  # (a reentrant switch may have taken it)
                break
        _PRUNE_AT = max(64, 2 * len(_SWITCHES))
    _state["reference"] = next(reversed(_SWITCHES.values()))[1] if _SWITCHES else _INITIAL


# the instruction that opens a ``with`` block, right after the call that makes its context manager
_OPENS_A_BLOCK = frozenset({"BEFORE_WITH", "SETUP_WITH"})  # (Python 3.11-3.13; 3.10)


@functools.lru_cache(maxsize=256)
def _opens_a_block(code: object, offset: int) -> bool:
    """Whether the instruction after ``offset`` in ``code`` (the call that made a ``use_reference``)
    opens a ``with`` block: then ``__init__`` leaves the process-wide choice alone, where a switch
    taken back by ``__enter__`` let other threads run the reference in between. Where this cannot
    tell (another Python's bytecode, an expression between the call and the block), False: the
    switch and its taking back, as before."""
    try:
        for instruction in dis.get_instructions(code):  # type: ignore[arg-type]
            if instruction.offset > offset:
                return instruction.opname in _OPENS_A_BLOCK
    except (TypeError, ValueError):
        return False
    return False


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
    ``numpy.errstate``), also while the block is being set up (``with use_reference(...):``
    never touches the process-wide choice; an object made first and entered later switched it
    when made, and entering takes that back: so do spellings that make it apart from the
    ``with`` statement, such as ``ExitStack.enter_context(use_reference())`` or
    ``with (use_reference() if flag else nullcontext()):``, during which other threads may run
    the reference for a moment). The environment variable ``XENTKIT_REFERENCE`` sets the initial choice:
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
        self._number: int | None = None
        self._tokens: list[contextvars.Token] = []  # (one per block: an object may be entered in its own)
        try:
            caller = sys._getframe(1)
        except ValueError:  # no Python caller (a thread's or atexit's target): a plain call
            caller = None
        if caller is not None and _opens_a_block(caller.f_code, caller.f_lasti):  # ``with use_reference(...):``
            return  # nothing process-wide: no other thread sees this block's choice, even briefly
        with _LOCK:  # called plainly: the process-wide switch (taken back by __enter__ for a block)
            self._number = next(_NUMBERS)
            _SWITCHES[self._number] = (weakref.ref(self), self._enabled)
            _apply()

    def __enter__(self) -> use_reference:
        global _PRUNE_AT
        with _LOCK:  # a block's choice is its thread's alone: this object's switch taken back
            if self._number is not None and _SWITCHES.pop(self._number, None) is not None:
                _PRUNE_AT = min(_PRUNE_AT, max(64, 2 * len(_SWITCHES)))  # (the log shrank)
                _apply()
        self._tokens.append(_BLOCK.set(self._enabled))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # this context's latest block: one object may be in blocks of several threads (or tasks)
        # at once, and a token resets only the context that made it (ValueError in any other)
        with _LOCK:
            for index in range(len(self._tokens) - 1, -1, -1):
                try:
                    _BLOCK.reset(self._tokens[index])
                except ValueError:
                    continue
                del self._tokens[index]
                return
