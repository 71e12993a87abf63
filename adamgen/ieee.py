"""Exact IEEE operations that NumPy lacks, for generated NumPy kernels (NumPy only).

Generated NumPy modules call these for the spec language's nodes (:mod:`adamgen.language`), so a
NumPy kernel computes every node exactly as the C kernel does, bit for bit, or declines:

* :func:`fma`: ``a*b + c`` rounded once. For float32 (and float16) operands it is exact: the
  product of two float32 numbers is exact in float64 (24 + 24 <= 53 bits), the sum is computed
  with its exact error (TwoSum), the float64 sum is rounded *to odd* with that error (a sticky
  bit), and rounding that to float32 is then correct (rounding to odd with p >= q + 2 bits, then
  to nearest with q bits, equals rounding to nearest once: Boldo & Melquiond, "Emulation of FMA
  and correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008). The naive
  float64 route is *not* exact: with ``a = b = 1 + 2**-12`` and ``c = 2**-60`` it gives
  ``1.0004883`` where ``fmaf`` gives ``1.0004884``. For float64 operands NumPy has no wider type,
  so :func:`fma` raises :class:`~adamgen.errors.InexactVariantError` (the C kernel serves).
* :func:`sign`: torch's sign (0 for 0, -0 and NaN; ``np.sign`` gives NaN for NaN).
* :func:`maximum`, :func:`minimum`: NaN if either operand is NaN, else the first operand on ties
  (``np.maximum``'s vector paths may return either zero of ``maximum(-0.0, 0.0)``).
* :func:`round_bfloat16`, :func:`round_float16`, :func:`round_float32`: round to nearest even into
  a narrower type, the result held in the operand's type.
* :func:`round_scalar`: the same for one Python float, exactly (pure Python), for the per-call
  prelude: a reference that rounds a Python float to the tensors' dtype and keeps computing with
  it (torch's ``lerp_`` computes ``weight - 1`` from the rounded weight) is written with it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import InexactVariantError

#: Dtypes :func:`fma` computes exactly (through float64 rounded to odd).
EXACT_FMA_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


def _store(result: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return result
    np.copyto(out, result, casting="same_kind")
    return out


def fma(a: Any, b: Any, c: Any, out: np.ndarray | None = None) -> np.ndarray:
    """``a*b + c`` rounded once into the operands' common dtype (float16 or float32)."""
    dtype = np.result_type(a, b, c)
    if dtype not in EXACT_FMA_DTYPES:
        raise InexactVariantError(
            f"NumPy cannot compute a fused multiply-add in {dtype} exactly (no wider float type "
            "holds the exact product); the C kernel computes it")
    a64, b64, c64 = (np.asarray(x, dtype).astype(np.float64) for x in (a, b, c))
    with np.errstate(invalid="ignore", over="ignore"):  # inf and NaN are values here
        product = a64 * b64  # exact: at most 2 * 24 significand bits
        total = product + c64
        virtual = total - product  # TwoSum: the exact error of total, wherever it is finite
        error = (product - (total - virtual)) + (c64 - virtual)
    bits = total.view(np.int64)
    inexact_even = (error != 0) & ((bits & 1) == 0) & np.isfinite(total)
    # round to odd: an inexact even result moves one unit in the last place toward the error
    toward = np.where((error > 0) == (total > 0), 1, -1)
    odd = np.where(inexact_even, bits + toward, bits).view(np.float64)
    with np.errstate(over="ignore"):
        return _store(odd.astype(dtype), out)


def sign(x: Any, out: np.ndarray | None = None) -> np.ndarray:
    """torch's sign: 1 where ``x > 0``, -1 where ``x < 0``, else +0 (NaN and -0 included)."""
    x = np.asarray(x)
    result = np.greater(x, 0).astype(x.dtype) - np.less(x, 0).astype(x.dtype)
    return _store(result, out)


def maximum(a: Any, b: Any, out: np.ndarray | None = None) -> np.ndarray:
    """NaN if either is NaN, else ``a if a >= b else b``."""
    a, b = np.asarray(a), np.asarray(b)
    return _store(np.where((a >= b) | np.isnan(a), a, b), out)


def minimum(a: Any, b: Any, out: np.ndarray | None = None) -> np.ndarray:
    """NaN if either is NaN, else ``a if a <= b else b``."""
    a, b = np.asarray(a), np.asarray(b)
    return _store(np.where((a <= b) | np.isnan(a), a, b), out)


def round_bfloat16(x: Any, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` rounded to the nearest bfloat16 (ties to even), in ``x``'s dtype (float32 unless
    float64); from float32, NaN becomes the quiet NaN ``0x7fc0`` (as ``c10::BFloat16`` does);
    overflow gives inf."""
    if np.asarray(x).dtype == np.float64:
        return _store(_round_float64(x, "bfloat16"), out)
    x = np.asarray(x, np.float32)
    bits = x.view(np.uint32)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) \
        & np.uint32(0xFFFF0000)
    return _store(np.where(nan, np.uint32(0x7FC00000), rounded).view(np.float32), out)


def round_float16(x: Any, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` rounded to the nearest float16 (ties to even), in ``x``'s dtype."""
    x = np.asarray(x)
    if x.dtype == np.float64:
        return _store(_round_float64(x, "float16"), out)
    with np.errstate(over="ignore"):
        return _store(x.astype(np.float16).astype(x.dtype), out)


def round_float32(x: Any, out: np.ndarray | None = None) -> np.ndarray:
    """float64 ``x`` rounded to the nearest float32 (ties to even), as float64."""
    x = np.asarray(x)
    with np.errstate(over="ignore"):
        return _store(x.astype(np.float32).astype(x.dtype), out)


#: dtype -> (significand bits, smallest normal exponent, largest exponent) of IEEE-style formats.
_FORMATS = {"float16": (11, -14, 15), "bfloat16": (8, -126, 127), "float32": (24, -126, 127)}


def _round_float64(x: Any, dtype: str) -> np.ndarray:
    """float64 ``x`` rounded once to nearest even into ``dtype``, as float64: :func:`round_scalar`
    on arrays (scaling by powers of two and ``rint`` are exact; no intermediate format)."""
    bits, emin, emax = _FORMATS[dtype]
    x = np.asarray(x, np.float64)
    with np.errstate(all="ignore"):
        exponent = np.maximum(np.frexp(x)[1] - 1, emin)  # subnormals: the smallest exponent's step
        quantum = exponent - (bits - 1)
        rounded = np.ldexp(np.rint(np.ldexp(x, -quantum)), quantum)
        largest = math.ldexp(2.0 - math.ldexp(1.0, 1 - bits), emax)
        return np.where(np.abs(rounded) > largest, np.copysign(np.inf, x), rounded)


def round_scalar(x: float, dtype: str) -> float:
    """The Python float ``x`` rounded to nearest even into ``dtype`` (``"float64"``: unchanged),
    exactly, from ``x`` itself (no double rounding); overflow gives inf, NaN stays NaN."""
    if dtype == "float64" or not math.isfinite(x) or x == 0.0:
        return x
    bits, emin, emax = _FORMATS[dtype]
    exponent = max(math.frexp(x)[1] - 1, emin)  # subnormals share the smallest exponent's step
    quantum = exponent - (bits - 1)
    # round(): ties to even; copysign: a negative value that rounds to zero is -0.0
    rounded = math.copysign(math.ldexp(round(math.ldexp(x, -quantum)), quantum), x)
    largest = math.ldexp(2.0 - math.ldexp(1.0, 1 - bits), emax)
    return math.copysign(math.inf, x) if abs(rounded) > largest else rounded
