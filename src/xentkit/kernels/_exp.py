"""Vectorizable ``exp``, ``log`` and ``tanh`` for the Numba kernels.

Numba lowers ``math.exp`` / ``np.exp`` to a scalar libm call unless LLVM can use Intel's SVML
(``numba -s`` shows ``SVML Operational: False`` on the machines this was written on). A libm
call per element keeps the loop scalar: a float32 sum of exponentials measured 2.7 ns per
element with ``math.exp`` against 0.11-0.15 ns with the functions here (AVX-512 machine, one
core). These are plain arithmetic (multiply-adds, compares, selects, bit casts) compiled with
``forceinline``, so LLVM inlines them and vectorizes the calling loop (``<16 x float>`` /
``zmm`` on AVX-512, ``<8 x float>`` / ``ymm`` on AVX2).

exp, for float32 and float64 (Cody & Waite range reduction)::

    x = clamp(x, lo, hi)                   keeps NaN; lo, hi just past underflow/overflow
    k = round(x / ln 2)                    by the "magic number" trick: t = x·log2(e) + 1.5·2^m
    r = x − k·ln2_hi − k·ln2_lo            |r| ≤ ln(2)/2; ln2_hi has trailing zero bits
    exp(r) ≈ 1 + r + r²/2! + … + r^n/n!   Taylor, n = 7 (float32) or 13 (float64)
    exp(x) = exp(r) · 2^(k//2) · 2^(k − k//2)
                                           two factors so that subnormal results
                                           (float32: x down to −103.97) round once, and
                                           2^k for k = 128 (float32) overflows to inf.

Special values: −inf → 0, +inf → inf, NaN → NaN, overflow → inf, underflow → 0 (subnormals
kept). Accuracy against ``np.exp``: ≤ 1 ulp (see ``tests/test_kernels.py``).

``fast_exp_nonpositive`` is the softmax variant: its argument is z − max ≤ 0 (or −inf, NaN),
so it skips the overflow clamp and multiplies by 2^k once, flushing results below the
smallest normal float to 0 (float32: x < −87, where exp(x) < 1.7e-38). About 20% cheaper.

log, for float64 (fdlibm's method, branch-free: the tile kernel's finishing loop)::

    x = 2^k·(1 + f),  1 + f in [√2/2, √2)  k and 1 + f by integer arithmetic on the bits
                                           (subnormals scaled by 2^54 first)
    s = f/(2 + f),  log(1 + f) = f − (f²/2 − s·(f²/2 + R(s²)))   R: fdlibm's minimax polynomial
    log x = k·ln2_hi − ((f²/2 − (s·(f²/2 + R) + k·ln2_lo)) − f)

Special values by selects: ±0 → −inf, x < 0 → NaN, +inf → inf, NaN → NaN (quieted). Accuracy
against the exact log: < 1 ulp (``tests/test_kernels.py``; a review measured 0.86 ulp at worst,
near √2/2, over all finite doubles and subnormals). ``fast_log1p(x)`` is log(u) + (x − (u − 1))/u
with u = 1 + x, the correction carrying u's rounding (fdlibm's log1p has the same term).

tanh(u) and its derivative 1 − tanh²(u), for the softcap::

    a = |u|,  e = exp(−2a) ∈ (0, 1]
    a ≥ 0.625:  tanh(a) = (1 − e) / (1 + e),    1 − tanh²(a) = 4e / (1 + e)²   (e = 0 below
                                                 the smallest normal: tanh = ±1, derivative 0)
    a < 0.625:  tanh(a) = a + a³·P(a²),          1 − tanh²(a) = 1 − tanh(a)²
    tanh(u) = sign(u)·tanh(a)

P is a Chebyshev fit of (tanh(√s) − √s)/s^(3/2) on s ∈ [0, 0.625²] (computed with mpmath, 50
digits; relative error 6e-10 with 6 terms, 2e-18 with 12). The small-argument polynomial avoids
the cancellation in 1 − e, and 4e/(1 + e)² avoids the cancellation in 1 − tanh² for large a.

The scalar helpers must be compiled WITHOUT the ``reassoc`` fast-math flag: it would let LLVM
fold ``(x·log2e + magic) − magic`` into ``x·log2e`` and break the rounding. Only ``contract``
(fused multiply-add) is allowed here; callers may use ``reassoc`` for their own reductions (the
flags are per instruction and survive LLVM's inlining).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from xentkit.kernels import _jit  # noqa: F401  (first: the cache's stamp, before the cached functions below)

# Fast-math flags of the helpers: fused multiply-add only (see module docstring).
HELPER_FLAGS = {"contract"}

# ---------------------------------------------------------------------------------------------
# LLVM intrinsics (bit casts, maxnum)
# ---------------------------------------------------------------------------------------------


@intrinsic
def maxnum(typingctx, a, b):
    """``llvm.maxnum(a, b)``: the larger of two floats, ignoring a NaN operand.

    LLVM vectorizes a ``maxnum`` reduction without fast-math flags (a ``x if x > m else m``
    loop stays scalar).
    """
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        lty = args[0].type
        fn = builder.module.declare_intrinsic(
            "llvm.maxnum", [lty], ir.FunctionType(lty, [lty, lty])
        )
        return builder.call(fn, args)

    return a(a, b), codegen


@intrinsic
def _f64_bits(typingctx, x):
    """The bits of a float64 as an int64 (a bit cast)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(x), codegen


@intrinsic
def _f64_from_bits(typingctx, i):
    """The float64 whose bits are the int64 ``i`` (a bit cast)."""
    if i != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(i), codegen


def _make_pow2_scaler(split: bool):
    """An intrinsic ``scale(p, t) = p · 2^k``, k sitting in the low mantissa bits of
    ``t = v + 1.5·2^m`` (float32: k = bits(t) − bits(1.5·2^23); float64: bits(t) − bits(1.5·2^52)).

    ``split=True`` multiplies by 2^(k >> 1) and then 2^(k − (k >> 1)), so that subnormal results
    round once and k up to the overflow point works; ``split=False`` multiplies by 2^k once and
    needs k in the normal exponent range. Integer work stays in 32-bit (float32) or 64-bit
    (float64) lanes, so it vectorizes next to the floats.
    """

    def scale(typingctx, p, t):
        if not (isinstance(p, types.Float) and p == t):
            return None
        single = p == types.float32

        def codegen(context, builder, signature, args):
            pv, tv = args
            if single:
                ity, mant, bias, magic_bits = ir.IntType(32), 23, 127, 0x4B400000
            else:
                ity, mant, bias, magic_bits = ir.IntType(64), 52, 1023, 0x4338000000000000
            fty = pv.type

            def pow2(k):
                biased = builder.add(k, ir.Constant(ity, bias))
                return builder.bitcast(builder.shl(biased, ir.Constant(ity, mant)), fty)

            k = builder.sub(builder.bitcast(tv, ity), ir.Constant(ity, magic_bits))
            if not split:
                return builder.fmul(pv, pow2(k))
            k1 = builder.ashr(k, ir.Constant(ity, 1))
            return builder.fmul(builder.fmul(pv, pow2(k1)), pow2(builder.sub(k, k1)))

        return p(p, t), codegen

    scale.__name__ = scale.__qualname__ = "scale_by_pow2_split" if split else "scale_by_pow2"
    return intrinsic(scale)


_scale_by_pow2_split = _make_pow2_scaler(split=True)
_scale_by_pow2 = _make_pow2_scaler(split=False)


# ---------------------------------------------------------------------------------------------
# exp
# ---------------------------------------------------------------------------------------------

_F32_LO = np.float32(-104.0)  # exp(-104) < smallest subnormal / 2 → 0
_F32_HI = np.float32(89.0)  # exp(89) > float32 max → inf
_F32_NORMAL_LO = np.float32(-87.0)  # k ≥ −126: 2^k is a normal float32
_F32_LOG2E = np.float32(1.4426950408889634)
_F32_MAGIC = np.float32(12582912.0)  # 1.5 · 2^23
_F32_LN2_HI = np.float32(0.693359375)  # 9 significant bits: k·ln2_hi is exact
_F32_LN2_LO = np.float32(-2.12194440e-4)  # ln 2 − ln2_hi
_F32_ZERO = np.float32(0.0)
_F32_ONE = np.float32(1.0)
# 1/n! for n = 7 … 2
_F32_C7 = np.float32(1.0 / 5040.0)
_F32_C6 = np.float32(1.0 / 720.0)
_F32_C5 = np.float32(1.0 / 120.0)
_F32_C4 = np.float32(1.0 / 24.0)
_F32_C3 = np.float32(1.0 / 6.0)
_F32_C2 = np.float32(0.5)

_F64_LO = -746.0  # exp(-746) < smallest subnormal / 2 → 0
_F64_HI = 710.0  # exp(710) > float64 max → inf
_F64_NORMAL_LO = -708.0  # k ≥ −1022: 2^k is a normal float64
_F64_LOG2E = 1.4426950408889634
_F64_MAGIC = 6755399441055744.0  # 1.5 · 2^52
_F64_LN2_HI = 6.93147180369123816490e-01  # 32 trailing zero bits: k·ln2_hi is exact
_F64_LN2_LO = 1.90821492927058770002e-10  # ln 2 − ln2_hi
# 1/n! for n = 13 … 2
_F64_C13 = 1.0 / 6227020800.0
_F64_C12 = 1.0 / 479001600.0
_F64_C11 = 1.0 / 39916800.0
_F64_C10 = 1.0 / 3628800.0
_F64_C9 = 1.0 / 362880.0
_F64_C8 = 1.0 / 40320.0
_F64_C7 = 1.0 / 5040.0
_F64_C6 = 1.0 / 720.0
_F64_C5 = 1.0 / 120.0
_F64_C4 = 1.0 / 24.0
_F64_C3 = 1.0 / 6.0
_F64_C2 = 0.5

_HELPER_JIT = {"fastmath": HELPER_FLAGS, "error_model": "numpy", "forceinline": True}


@njit(**_HELPER_JIT)
def _exp_reduced_f32(x):
    """(exp(r), t): r = x − k·ln 2 with k = round(x·log2 e) held in the low bits of t."""
    # k = round(x·log2 e): after adding 1.5·2^23 the float has k in its low mantissa bits
    t = x * _F32_LOG2E + _F32_MAGIC
    k = t - _F32_MAGIC
    # r = x − k·ln 2 in two steps (Cody & Waite), |r| ≤ ln(2)/2
    r = x - k * _F32_LN2_HI
    r = r - k * _F32_LN2_LO
    # exp(r) ≈ Σ_{n≤7} r^n/n!, Horner
    p = _F32_C7
    p = p * r + _F32_C6
    p = p * r + _F32_C5
    p = p * r + _F32_C4
    p = p * r + _F32_C3
    p = p * r + _F32_C2
    p = p * r + _F32_ONE
    p = p * r + _F32_ONE
    return p, t


@njit(**_HELPER_JIT)
def _exp_reduced_f64(x):
    t = x * _F64_LOG2E + _F64_MAGIC
    k = t - _F64_MAGIC
    r = x - k * _F64_LN2_HI
    r = r - k * _F64_LN2_LO
    # exp(r) ≈ Σ_{n≤13} r^n/n!, Horner
    p = _F64_C13
    p = p * r + _F64_C12
    p = p * r + _F64_C11
    p = p * r + _F64_C10
    p = p * r + _F64_C9
    p = p * r + _F64_C8
    p = p * r + _F64_C7
    p = p * r + _F64_C6
    p = p * r + _F64_C5
    p = p * r + _F64_C4
    p = p * r + _F64_C3
    p = p * r + _F64_C2
    p = p * r + 1.0
    p = p * r + 1.0
    return p, t


@njit(**_HELPER_JIT)
def _exp_f32(x):
    # clamp; written so that a NaN passes through (NaN < lo and NaN > hi are False)
    x = _F32_LO if x < _F32_LO else x
    x = _F32_HI if x > _F32_HI else x
    p, t = _exp_reduced_f32(x)
    # exp(x) = exp(r) · 2^k, in two factors (subnormal results, k = 128 → inf)
    return _scale_by_pow2_split(p, t)


@njit(**_HELPER_JIT)
def _exp_f64(x):
    x = _F64_LO if x < _F64_LO else x
    x = _F64_HI if x > _F64_HI else x
    p, t = _exp_reduced_f64(x)
    return _scale_by_pow2_split(p, t)


@njit(**_HELPER_JIT)
def _exp_nonpositive_f32(x):
    # x ≤ 0 (or −inf, NaN): no overflow; results below 2^−125.5 (x < −87) are flushed to 0
    xc = _F32_NORMAL_LO if x < _F32_NORMAL_LO else x
    p, t = _exp_reduced_f32(xc)
    e = _scale_by_pow2(p, t)
    return _F32_ZERO if x < _F32_NORMAL_LO else e


@njit(**_HELPER_JIT)
def _exp_nonpositive_f64(x):
    xc = _F64_NORMAL_LO if x < _F64_NORMAL_LO else x
    p, t = _exp_reduced_f64(xc)
    e = _scale_by_pow2(p, t)
    return 0.0 if x < _F64_NORMAL_LO else e


def fast_exp(x):
    """Vectorizable exp of a float32 or float64 scalar (for use inside Numba code)."""
    raise NotImplementedError("fast_exp is only callable from Numba-compiled code")


@overload(fast_exp, jit_options={"forceinline": True})
def _fast_exp_overload(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    if x == types.float64:
        return lambda x: _exp_f64(x)
    return None


def fast_exp_nonpositive(x):
    """exp for x ≤ 0, −inf or NaN (softmax exponents): as :func:`fast_exp` but results below
    the smallest normal float are flushed to 0 (float32: x < −87; float64: x < −708), and
    positive x is not handled (x > 88.7 / 709.7 gives garbage). About 20% cheaper.
    """
    raise NotImplementedError("fast_exp_nonpositive is only callable from Numba-compiled code")


@overload(fast_exp_nonpositive, jit_options={"forceinline": True})
def _fast_exp_nonpositive_overload(x):
    if x == types.float32:
        return lambda x: _exp_nonpositive_f32(x)
    if x == types.float64:
        return lambda x: _exp_nonpositive_f64(x)
    return None


# ---------------------------------------------------------------------------------------------
# log (float64)
# ---------------------------------------------------------------------------------------------

# x = 2^k·(1 + f) with 1 + f in [√2/2, √2): subtracting the bits of √2/2 puts the exponent of the
# reduced mantissa in the top bits, so k and 1 + f come out of integer arithmetic, branch-free
_F64_SQRT_HALF_BITS = 0x3FE6A09E667F3BCD
_F64_MANTISSA_MASK = 0x000FFFFFFFFFFFFF
_F64_TINY = 2.2250738585072014e-308  # the smallest normal float64
_F64_TWO_54 = 18014398509481984.0  # 2^54, to lift subnormals into the normal range
# log(1 + f) = 2s + s·R(s²)·…, s = f/(2 + f): the minimax coefficients of fdlibm's e_log.c
_F64_LG1 = 6.666666666666735130e-01
_F64_LG2 = 3.999999999940941908e-01
_F64_LG3 = 2.857142874366239149e-01
_F64_LG4 = 2.222219843214978396e-01
_F64_LG5 = 1.818357216161805012e-01
_F64_LG6 = 1.531383769920937332e-01
_F64_LG7 = 1.479819860511658591e-01


@njit(**_HELPER_JIT)
def _log_f64(x):
    # subnormals: scale by 2^54 first (a select, not a branch), and take 54 off the exponent
    small = x < _F64_TINY
    x_normal = x * _F64_TWO_54 if small else x
    bits = _f64_bits(x_normal) - _F64_SQRT_HALF_BITS
    k = np.float64((bits >> 52) - (54 if small else 0))
    f = _f64_from_bits((bits & _F64_MANTISSA_MASK) + _F64_SQRT_HALF_BITS) - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = (z * (_F64_LG1 + w * (_F64_LG3 + w * (_F64_LG5 + w * _F64_LG7)))
         + w * (_F64_LG2 + w * (_F64_LG4 + w * _F64_LG6)))
    half_f2 = 0.5 * f * f
    value = k * _F64_LN2_HI - ((half_f2 - (s * (half_f2 + r) + k * _F64_LN2_LO)) - f)
    # special values by selects: log 0 = −inf, log(x < 0) = NaN, log inf = inf, NaN stays
    value = -np.inf if x == 0.0 else value
    value = np.nan if x < 0.0 else value
    value = np.inf if x == np.inf else value
    return x + x if x != x else value  # a NaN as it came, quieted


def fast_log(x):
    """Vectorizable natural log of a float64 scalar (for use inside Numba code): within 1 ulp of
    ``np.log`` (fdlibm's method, branch-free), ±0 → −inf, negative → NaN, inf → inf, NaN → NaN."""
    raise NotImplementedError("fast_log is only callable from Numba-compiled code")


@overload(fast_log, jit_options={"forceinline": True})
def _fast_log_overload(x):
    if x == types.float64:
        return lambda x: _log_f64(x)
    return None


@njit(fastmath=False, error_model="numpy", forceinline=True)
def _log1p_f64(x):
    # log1p(x) = log(u) + (x − (u − 1))/u, u = 1 + x rounded: the correction is the rounding of
    # u, to first order (fdlibm's log1p carries the same term); no fast-math flags, which could
    # fold x − (u − 1) to 0. Special values by selects: −1 → −inf, inf → inf, NaN stays.
    u = 1.0 + x
    value = _log_f64(u) + (x - (u - 1.0)) / u
    value = -np.inf if u == 0.0 else value
    return np.inf if u == np.inf else value


def fast_log1p(x):
    """Vectorizable log(1 + x) of a float64 scalar (for use inside Numba code), accurate for
    small x (within a few ulps of ``np.log1p``, branch-free): −1 → −inf, below → NaN, inf → inf,
    NaN → NaN."""
    raise NotImplementedError("fast_log1p is only callable from Numba-compiled code")


@overload(fast_log1p, jit_options={"forceinline": True})
def _fast_log1p_overload(x):
    if x == types.float64:
        return lambda x: _log1p_f64(x)
    return None


# ---------------------------------------------------------------------------------------------
# tanh and 1 − tanh²
# ---------------------------------------------------------------------------------------------

_TANH_SPLIT = 0.625
# tanh(a) = a + a³·P(a²) on a < 0.625; coefficients of P from the highest power down.
_F32_TANH_P = (
    0.0022927448161781423431,
    -0.008343945515839152048,
    0.021768918651028210152,
    -0.053959259577204542744,
    0.13333303556915741766,
    -0.33333333172140361638,
)
_F64_TANH_P = (
    6.48516348279311315e-6,
    -0.000031201101425797400033,
    0.000092571161295567682707,
    -0.00023759064960555619551,
    0.0005896606577757043347,
    -0.0014557754120478055104,
    0.0035921217511549622695,
    -0.008863235103240877925,
    0.021869488519008305756,
    -0.05396825396789699169,
    0.13333333333333041602,
    -0.33333333333333332938,
)
_F32_T0, _F32_T1, _F32_T2, _F32_T3, _F32_T4, _F32_T5 = (np.float32(c) for c in _F32_TANH_P)
(
    _F64_T0,
    _F64_T1,
    _F64_T2,
    _F64_T3,
    _F64_T4,
    _F64_T5,
    _F64_T6,
    _F64_T7,
    _F64_T8,
    _F64_T9,
    _F64_T10,
    _F64_T11,
) = _F64_TANH_P
_F32_SPLIT = np.float32(_TANH_SPLIT)
_F32_FOUR = np.float32(4.0)
_F32_MINUS_TWO = np.float32(-2.0)


@njit(**_HELPER_JIT)
def _tanh_f32(u):
    a = -u if u < _F32_ZERO else u
    # large |u|: e = exp(−2a), tanh = (1 − e)/(1 + e), 1 − tanh² = 4e/(1 + e)²
    e = _exp_nonpositive_f32(_F32_MINUS_TWO * a)
    inv = _F32_ONE / (_F32_ONE + e)
    t_big = (_F32_ONE - e) * inv
    d_big = _F32_FOUR * e * inv * inv
    # small |u|: tanh = a + a³·P(a²)
    s = a * a
    p = _F32_T0
    p = p * s + _F32_T1
    p = p * s + _F32_T2
    p = p * s + _F32_T3
    p = p * s + _F32_T4
    p = p * s + _F32_T5
    t_small = a + a * s * p
    d_small = _F32_ONE - t_small * t_small
    small = a < _F32_SPLIT
    t = t_small if small else t_big
    d = d_small if small else d_big
    t = -t if u < _F32_ZERO else t
    # NaN: a NaN u makes e, t_big and d_big NaN, and `a < split` is False, so NaN comes out
    return t, d


@njit(**_HELPER_JIT)
def _tanh_f64(u):
    a = -u if u < 0.0 else u
    e = _exp_nonpositive_f64(-2.0 * a)
    inv = 1.0 / (1.0 + e)
    t_big = (1.0 - e) * inv
    d_big = 4.0 * e * inv * inv
    s = a * a
    p = _F64_T0
    p = p * s + _F64_T1
    p = p * s + _F64_T2
    p = p * s + _F64_T3
    p = p * s + _F64_T4
    p = p * s + _F64_T5
    p = p * s + _F64_T6
    p = p * s + _F64_T7
    p = p * s + _F64_T8
    p = p * s + _F64_T9
    p = p * s + _F64_T10
    p = p * s + _F64_T11
    t_small = a + a * s * p
    d_small = 1.0 - t_small * t_small
    small = a < _TANH_SPLIT
    t = t_small if small else t_big
    d = d_small if small else d_big
    t = -t if u < 0.0 else t
    return t, d


@njit(fastmath=False, error_model="numpy", nogil=True, forceinline=True)
def capped_product(cap, t):  # pragma: no cover - compiled
    """``cap·t``, a soft-capped logit z from t = tanh(x/cap), rounded on its own: the product
    carries no ``contract`` flag, so a caller's z − m (whose loop may allow contraction) is not
    fused into fma(cap, t, −m). Fused, the row's max got exp(rounding error of cap·t) instead of
    exp(0) = 1: a confident row's loss near 1e-9 came out 1e-6 off in float32, a one-class row's
    ±1e-7 instead of 0. (LLVM fuses only where both the product and the sum allow it.)"""
    return cap * t


@njit(fastmath=False, error_model="numpy", nogil=True, forceinline=True)
def difference(a, b):  # pragma: no cover - compiled
    """``a − b``, rounded on its own: the subtraction carries no ``reassoc`` flag, so a caller's
    reassociating sum of differences Σ (x_j − m) stays a sum of the differences (LLVM regroups two
    operations only where both allow it). Regrouped, the label-smoothing sum became Σ x_j − k·m
    in some order, which overflowed for float64 logits past about ±6e307 whose exact sum fits."""
    return a - b


def fast_tanh(u):
    """Vectorizable ``(tanh(u), 1 − tanh(u)²)`` of a float32/float64 scalar (Numba code only)."""
    raise NotImplementedError("fast_tanh is only callable from Numba-compiled code")


@overload(fast_tanh, jit_options={"forceinline": True})
def _fast_tanh_overload(u):
    if u == types.float32:
        return lambda u: _tanh_f32(u)
    if u == types.float64:
        return lambda u: _tanh_f64(u)
    return None


def like(value, array):
    """``value`` cast to the float dtype of ``array`` (an array or a float scalar; Numba only)."""
    raise NotImplementedError("like is only callable from Numba-compiled code")


@overload(like, jit_options={"forceinline": True})
def _like_overload(value, array):
    dtype = array.dtype if isinstance(array, types.Array) else array
    if dtype == types.float32:
        return lambda value, array: np.float32(value)
    if dtype == types.float64:
        return lambda value, array: np.float64(value)
    return None


# ---------------------------------------------------------------------------------------------
# Array versions (tests, and checking that the loops vectorize)
# ---------------------------------------------------------------------------------------------


@njit(cache=True, fastmath=HELPER_FLAGS, error_model="numpy")
def exp_into(x, out):  # pragma: no cover - compiled
    """``out[:] = exp(x)`` elementwise, 1-D arrays of one float dtype."""
    for j in range(x.shape[0]):
        out[j] = fast_exp(x[j])


@njit(cache=True, fastmath=HELPER_FLAGS, error_model="numpy")
def exp_nonpositive_into(x, out):  # pragma: no cover - compiled
    """``out[:] = exp(x)`` for x ≤ 0 (the softmax variant), 1-D arrays of one float dtype."""
    for j in range(x.shape[0]):
        out[j] = fast_exp_nonpositive(x[j])


@njit(cache=True, fastmath=HELPER_FLAGS, error_model="numpy")
def log_into(x, out):  # pragma: no cover - compiled
    """``out[:] = log(x)`` elementwise, 1-D float64 arrays."""
    for j in range(x.shape[0]):
        out[j] = fast_log(x[j])


@njit(cache=True, fastmath=HELPER_FLAGS, error_model="numpy")
def tanh_into(u, out, dout):  # pragma: no cover - compiled
    """``out[:] = tanh(u)``, ``dout[:] = 1 − tanh(u)²`` elementwise, 1-D arrays."""
    for j in range(u.shape[0]):
        t, d = fast_tanh(u[j])
        out[j] = t
        dout[j] = d


def exp(x: np.ndarray) -> np.ndarray:
    """The kernels' exp on a 1-D float32/float64 array (a test and inspection helper)."""
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    exp_into(x, out)
    return out


def exp_nonpositive(x: np.ndarray) -> np.ndarray:
    """The kernels' softmax exp (arguments ≤ 0, subnormal results flushed to 0) on a 1-D array."""
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    exp_nonpositive_into(x, out)
    return out


def log(x: np.ndarray) -> np.ndarray:
    """The kernels' log on a 1-D float64 array (a test and inspection helper)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty_like(x)
    log_into(x, out)
    return out


def tanh_and_derivative(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' ``(tanh(u), 1 − tanh(u)²)`` on a 1-D float32/float64 array."""
    u = np.ascontiguousarray(u)
    t = np.empty_like(u)
    d = np.empty_like(u)
    tanh_into(u, t, d)
    return t, d
