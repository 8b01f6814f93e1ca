"""Conversions between float16 and the kernels' float32 / float64, element by element.

Not a kernel of the contract (``docs/CONTRACTS.md``): the api's half-precision paths call these to
round a result to float16 and to widen float16 inputs. NumPy's own casts give the same values, but
its float32 → float16 cast takes ~70 ns per element whose result is a float16 subnormal (below
6.1e-5 in magnitude), against ~2 ns for others: a float16 gradient (most entries are p/N, tiny)
took 1.1 s for 8192 × 2000, where computing it took ~35 ms. These work on the bits, the same
~1 ns for every value, on Numba's threads.

Narrowing rounds to nearest, ties to even, once (float64 straight to float16, never through
float32); beyond 65504 (from 65520 up) a value is ±inf, as NumPy and torch give it; a NaN stays a
NaN of its sign, made quiet, with its payload's top bits (NumPy keeps a signalling NaN signalling:
the one difference in bits, checked on every float32 pattern). Widening is exact.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from xentkit.kernels._jit import KERNEL_OPTIONS, helper_options
from xentkit.kernels._threading import (
    prefer_tbb,
    running_on,
    runs_serial,
    serial_build,
    threads_for,
)

# TBB chosen before these start threads, as cross_entropy does: a float16 call's conversion may be
# the process's first parallel kernel (a review: without it Numba took GNU OpenMP there where
# xentkit._tbb had not preloaded TBB, and a forked child was killed)
THREADING_LAYER = prefer_tbb()

__all__ = ["SERIAL_MAX_VALUES", "compile_all", "narrow_to_half", "widen_half"]

# Conversions of up to this many values run on the calling thread (a memory-bound pass: the pool
# pays for itself only on large arrays).
SERIAL_MAX_VALUES = 1 << 18

_HELPER = helper_options(False)
_KERNEL = dict(KERNEL_OPTIONS, parallel=True)

_SUBNORMAL_STEP = 2.0**24  # a float16 subnormal is an integer multiple of 2**-24


@njit(**_HELPER)
def _half_bits_of_float32(bits, value):  # pragma: no cover - compiled
    """The float16 bits nearest the float32 of ``bits`` (int32, the value's own bits) and ``value``."""
    wide = np.int64(bits)
    sign = (wide >> 16) & 0x8000
    magnitude = wide & 0x7FFFFFFF
    if magnitude >= 0x47800000:  # 65536 and beyond, inf, NaN
        if magnitude > 0x7F800000:
            return sign | 0x7E00 | ((magnitude >> 13) & 0x3FF)
        return sign | 0x7C00
    if magnitude < 0x38800000:  # below 2**-14, float16's smallest normal: k·2**-24, k = 0..1024
        return sign | np.int64(np.rint(abs(np.float64(value)) * _SUBNORMAL_STEP))
    # float16's exponent and 10 significand bits are the float32 bits shifted by 13, the exponent
    # rebiased (127 → 15); the 13 bits shifted out round the result (a carry may reach the
    # exponent, and from 65520 up to inf: both right)
    result = (magnitude - (112 << 23)) >> 13
    rest = magnitude & 0x1FFF
    if rest > 0x1000 or (rest == 0x1000 and (result & 1) == 1):
        result += 1
    return sign | result


@njit(**_HELPER)
def _half_bits_of_float64(bits, value):  # pragma: no cover - compiled
    """The float16 bits nearest the float64 of ``bits`` (int64) and ``value``: one rounding."""
    sign = 0x8000 if bits < 0 else 0
    magnitude = bits & 0x7FFFFFFFFFFFFFFF
    if magnitude >= 0x40F0000000000000:  # 65536 and beyond, inf, NaN
        if magnitude > 0x7FF0000000000000:
            return sign | 0x7E00 | ((magnitude >> 42) & 0x3FF)
        return sign | 0x7C00
    if magnitude < 0x3F10000000000000:  # below 2**-14
        return sign | np.int64(np.rint(abs(value) * _SUBNORMAL_STEP))
    result = (magnitude - (np.int64(1008) << 52)) >> 42  # (exponent 1023 → 15; 42 bits shifted out)
    rest = magnitude & 0x3FFFFFFFFFF
    if rest > 0x20000000000 or (rest == 0x20000000000 and (result & 1) == 1):
        result += 1
    return sign | result


@njit(**_KERNEL)
def _narrow32_kernel(values, bits, out):  # pragma: no cover - compiled
    for i in prange(values.shape[0]):
        out[i] = np.uint16(_half_bits_of_float32(bits[i], values[i]))


@njit(**_KERNEL)
def _narrow64_kernel(values, bits, out):  # pragma: no cover - compiled
    for i in prange(values.shape[0]):
        out[i] = np.uint16(_half_bits_of_float64(bits[i], values[i]))


@njit(**_KERNEL)
def _widen_kernel(halves, out, out_bits):  # pragma: no cover - compiled
    for i in prange(halves.shape[0]):
        h = np.int64(halves[i])
        exponent = (h >> 10) & 0x1F
        significand = h & 0x3FF
        if exponent == 0:  # zero or a subnormal: significand·2**-24, exact in float32
            magnitude = np.float64(significand) / _SUBNORMAL_STEP
            out[i] = -magnitude if h & 0x8000 else magnitude
        else:
            # inf and NaN (exponent 31) keep float32's all-ones exponent; others are rebiased
            wide = 0xFF if exponent == 0x1F else exponent + 112
            out_bits[i] = np.uint32(((h & 0x8000) << 16) | (wide << 23) | (significand << 13))


_narrow32_serial = serial_build(_narrow32_kernel, "_narrow32_serial", **KERNEL_OPTIONS)
_narrow64_serial = serial_build(_narrow64_kernel, "_narrow64_serial", **KERNEL_OPTIONS)
_widen_serial = serial_build(_widen_kernel, "_widen_serial", **KERNEL_OPTIONS)


def _run(kernel, serial, size: int, *arguments) -> None:
    threads = threads_for(size, None, SERIAL_MAX_VALUES)
    if runs_serial(threads, None):
        serial(*arguments)
    else:
        with running_on(threads):
            kernel(*arguments)


def narrow_to_half(values: np.ndarray, out: np.ndarray) -> None:
    """Write ``values`` (C-contiguous float32 or float64) rounded to float16 into ``out`` (a
    C-contiguous, writeable float16 array of the same size). Nothing is validated."""
    flat = values.reshape(-1)
    target = out.reshape(-1).view(np.uint16)
    if values.dtype == np.float32:
        _run(_narrow32_kernel, _narrow32_serial, flat.size, flat, flat.view(np.int32), target)
    else:
        _run(_narrow64_kernel, _narrow64_serial, flat.size, flat, flat.view(np.int64), target)


def widen_half(halves: np.ndarray, out: np.ndarray) -> None:
    """Write the float16 ``halves`` (C-contiguous) into ``out`` (a C-contiguous, writeable
    float32 array of the same size), exactly. Nothing is validated."""
    target = out.reshape(-1)
    _run(_widen_kernel, _widen_serial, target.size, halves.reshape(-1).view(np.uint16), target, target.view(np.uint32))


def compile_all() -> list[str]:
    """Compile (or load from Numba's cache) the conversions and their serial builds."""
    done = []
    for dtype in (np.float32, np.float64):
        values = np.zeros(1, dtype=dtype)
        flat, out = values, np.zeros(1, dtype=np.float16)
        bits = flat.view(np.int32 if dtype == np.float32 else np.int64)
        kernel, serial = (
            (_narrow32_kernel, _narrow32_serial) if dtype == np.float32 else (_narrow64_kernel, _narrow64_serial)
        )
        kernel(flat, bits, out.view(np.uint16))
        serial(flat, bits, out.view(np.uint16))
        done += [f"narrow to float16 {np.dtype(dtype).name}", f"narrow to float16 serial {np.dtype(dtype).name}"]
    halves, wide = np.zeros(1, dtype=np.float16), np.zeros(1, dtype=np.float32)
    _widen_kernel(halves.view(np.uint16), wide, wide.view(np.uint32))
    _widen_serial(halves.view(np.uint16), wide, wide.view(np.uint32))
    return [*done, "widen float16", "widen float16 serial"]
