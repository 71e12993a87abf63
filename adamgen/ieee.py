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
* :func:`stream_bits`: the random bits of stochastic rounding, defined here once: ARS-7, a
  counter-based generator from the paper that gave Philox (Salmon et al., "Parallel random
  numbers: as easy as 1, 2, 3", SC'11), AES's round function under a Weyl key schedule. The
  paper finds ARS Crush-resistant (all of TestU01's BigCrush passed) from 5 rounds; 7 is
  Random123's default. It was chosen over Philox4x32-10 for speed alone: on x86's VAES one
  instruction makes a round of four blocks, and the C fill costs a quarter of Philox's.
"""

from __future__ import annotations

import functools
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
    return _round_finite(x, dtype)


@functools.lru_cache(maxsize=1024)
def _round_finite(x: float, dtype: str) -> float:
    """:func:`round_scalar` of a finite, nonzero ``x`` (where equal floats have equal bits, so
    a cache keyed on the value is exact). Cached: a generated prelude rounds the same
    hyperparameter expressions (``1 - beta1``) at every step, and computing it costs 0.6 us of
    a 13 us torch step on a small parameter."""
    bits, emin, emax = _FORMATS[dtype]
    exponent = max(math.frexp(x)[1] - 1, emin)  # subnormals share the smallest exponent's step
    quantum = exponent - (bits - 1)
    # round(): ties to even; copysign: a negative value that rounds to zero is -0.0
    rounded = math.copysign(math.ldexp(round(math.ldexp(x, -quantum)), quantum), x)
    largest = math.ldexp(2.0 - math.ldexp(1.0, 1 - bits), emax)
    return math.copysign(math.inf, x) if abs(rounded) > largest else rounded


# --- narrow storage: bfloat16 and float16 elements widened and stored ---------------------------

#: How NumPy holds each storage dtype: bfloat16 as its bits (``uint16``; NumPy has no bfloat16),
#: the others as themselves.
STORAGE_NUMPY: dict[str, np.dtype[Any]] = {
    "bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


def widen(x: Any, storage: str, compute: str) -> np.ndarray:
    """Elements stored as ``storage`` (bfloat16 as ``uint16`` bits) as ``compute`` values,
    exactly (every bfloat16/float16 value is a float32 value), in ``x``'s memory layout."""
    x = np.asarray(x)
    if storage == "bfloat16":
        wide = (x.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return wide if compute == "float32" else wide.astype(compute)
    return x.astype(compute)


def narrow(x: Any, storage: str, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` stored as ``storage`` (bfloat16 as ``uint16`` bits), rounded to nearest even (the
    kernels store values the spec rounded already, for which this is exact)."""
    x = np.asarray(x)
    if storage == "bfloat16":
        rounded = round_bfloat16(x)
        result = (rounded.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    else:
        with np.errstate(over="ignore"):
            result = x.astype(STORAGE_NUMPY[storage])
    if out is None:
        return result
    np.copyto(out, result, casting="unsafe")
    return out


# --- the random stream of stochastic rounding: ARS-7 ---------------------------------------------

#: ARS's Weyl key increments, added to the key's two 64-bit halves before each round
#: (Salmon et al., SC'11; Random123's ``ars.h``).
ARS_W = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)
#: Rounds of the stream: Random123's default for ARS (5 are Crush-resistant, per the paper).
ARS_ROUNDS = 7
#: Elements per 128-bit block of the stream (16 bits each).
STREAM_BLOCK = 8
_MASK64 = (1 << 64) - 1


@functools.cache
def _aes_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AES's S-box, ``xtime`` (multiplication by 2 in GF(2**8)) and ShiftRows as byte tables,
    computed from their definitions in FIPS-197 rather than typed in."""
    def multiply(a: int, b: int) -> int:
        product = 0
        for _ in range(8):
            if b & 1:
                product ^= a
            a = ((a << 1) ^ (0x11B if a & 0x80 else 0)) & 0xFF
            b >>= 1
        return product

    powers = [1]  # 3 generates GF(2**8)'s multiplicative group: a**-1 = 3**(255 - log3(a))
    for _ in range(254):
        powers.append(multiply(powers[-1], 3))
    log3 = {power: exponent for exponent, power in enumerate(powers)}
    inverse = [0] + [powers[(255 - log3[a]) % 255] for a in range(1, 256)]
    sbox = [0] * 256
    for a in range(256):
        b = inverse[a]
        rotations = [((b << k) | (b >> (8 - k))) & 0xFF for k in range(5)]
        sbox[a] = rotations[0] ^ rotations[1] ^ rotations[2] ^ rotations[3] ^ rotations[4] ^ 0x63
    xtime = [multiply(a, 2) for a in range(256)]
    # state byte r + 4c (row r, column c, as the bytes lie in memory) takes byte r + 4((c+r) % 4)
    shift_rows = [r + 4 * ((c + r) % 4) for c in range(4) for r in range(4)]
    return (np.array(sbox, np.uint8), np.array(xtime, np.uint8), np.array(shift_rows, np.intp))


def _aes_round(state: np.ndarray, round_key: np.ndarray, last: bool) -> np.ndarray:
    """One AES encryption round of ``(n, 16)`` byte states, as x86's ``aesenc`` (or
    ``aesenclast``, without MixColumns) computes it: ShiftRows, SubBytes, MixColumns, then the
    round key."""
    sbox, xtime, shift_rows = _aes_tables()
    state = sbox[state[:, shift_rows]]
    if not last:
        a = state.reshape(-1, 4, 4)  # [block, column, row]
        rolled = np.roll(a, -1, axis=2)  # a[r + 1]
        total = a[:, :, 0] ^ a[:, :, 1] ^ a[:, :, 2] ^ a[:, :, 3]
        # b[r] = 2 a[r] ^ 3 a[r+1] ^ a[r+2] ^ a[r+3] = a[r] ^ total ^ 2 (a[r] ^ a[r+1])
        state = (a ^ total[:, :, None] ^ xtime[a ^ rolled]).reshape(-1, 16)
    return state ^ round_key


def _key_bytes(low: int, high: int) -> np.ndarray:
    return np.array([low, high], "<u8").view(np.uint8)


def ars4x32(counter: tuple[Any, Any, Any, Any], key: tuple[int, int, int, int],
            rounds: int = ARS_ROUNDS) -> tuple[np.ndarray, ...]:
    """ARS-``rounds`` (Random123's ``ars4x32``) of counters (four arrays or ints of 32-bit
    words) under ``key`` (four 32-bit words): four ``uint32`` arrays. Random123's known answers
    hold (tests)."""
    words = np.broadcast_arrays(*[np.asarray(word, np.uint64) & np.uint64(0xFFFFFFFF)
                                  for word in counter])
    shape = words[0].shape
    state = np.stack([w.reshape(-1).astype("<u4") for w in words], axis=1).view(np.uint8)
    low = (int(key[0]) & 0xFFFFFFFF) | (int(key[1]) & 0xFFFFFFFF) << 32
    high = (int(key[2]) & 0xFFFFFFFF) | (int(key[3]) & 0xFFFFFFFF) << 32
    state = state ^ _key_bytes(low, high)
    for round_index in range(1, rounds + 1):
        low, high = (low + ARS_W[0]) & _MASK64, (high + ARS_W[1]) & _MASK64
        state = _aes_round(state, _key_bytes(low, high), last=round_index == rounds)
    out = np.ascontiguousarray(state).view("<u4").astype(np.uint32)
    return tuple(out[:, w].reshape(shape) for w in range(4))


def stream_bits(seed: int, step: int, key: int, stream: int, count: int,
                start: int = 0) -> np.ndarray:
    """The 16 random bits of elements ``start .. start+count-1`` of a tensor, as ``uint16``.

    The definition every backend implements (the C kernels' ``adamgen_ars_fill`` included):
    element ``i`` takes block ``b = i // 8`` and the ``i % 8``-th 16-bit half of its 128 bits
    in little-endian order (word ``(i % 8) // 2``, its low half when ``i`` is even). Block ``b``
    is ARS-7 of the counter ``(b mod 2**32, (b // 2**32 + stream * 2**16) mod 2**32, step mod
    2**32, key mod 2**32)`` under the key ``(seed mod 2**32, seed // 2**32 mod 2**32, 0, 0)``.
    So the bits depend on the seed, the step, the tensor's key, the stream and the element's
    index, and on nothing else (threads, chunks, backends). ARS is AES's round function with a
    Weyl key schedule: four blocks are one instruction a round on x86's VAES.
    """
    if count <= 0:
        return np.empty(0, np.uint16)
    first, last = start // STREAM_BLOCK, (start + count - 1) // STREAM_BLOCK
    block = np.arange(first, last + 1, dtype=np.uint64)
    words = ars4x32((block, (block >> np.uint64(32)) + np.uint64(stream << 16), step, key),
                    (seed, seed >> 32, 0, 0))
    halves = np.stack(words, axis=1).astype("<u4").view("<u2").reshape(-1)
    offset = start - first * STREAM_BLOCK
    return halves[offset:offset + count].astype(np.uint16)


def stream_bits_like(like: np.ndarray, seed: int, step: int, key: int,
                     stream: int) -> np.ndarray:
    """:func:`stream_bits` for every element of ``like``, laid out as ``like`` is in memory
    (element ``i`` is the ``i``-th in memory order, as the C kernels walk it)."""
    like = np.asarray(like)
    fortran = like.flags.f_contiguous and not like.flags.c_contiguous
    bits = stream_bits(seed, step, key, stream, like.size)
    return bits.reshape(like.shape, order="F" if fortran else "C")


def round_stochastic_bfloat16(x: Any, bits: Any, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``x`` rounded stochastically to bfloat16 with the 16 random ``bits`` of each
    element, as float32: the dropped 16 bits plus the random ones carry into the kept ones
    with probability (dropped / 2**16), so the expected value is ``x`` exactly. NaN becomes the
    quiet NaN ``0x7fc0``; inf stays inf (its dropped bits are 0)."""
    x = np.asarray(x, np.float32)
    raw = x.view(np.uint32)
    nan = (raw & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    with np.errstate(over="ignore"):
        rounded = (raw + np.asarray(bits, np.uint16).astype(np.uint32)) & np.uint32(0xFFFF0000)
    return _store(np.where(nan, np.uint32(0x7FC00000), rounded).view(np.float32), out)


def round_stochastic_float16(x: Any, bits: Any, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``x`` rounded stochastically to float16 with the 16 random ``bits`` of each
    element, as float32 (the definition the C kernels implement):

    * ``|x| >= 2**-14`` (float16's normal range, and beyond): the top 13 random bits are added
      to the 13 bits float16 drops, which carry with probability (dropped / 2**13), exactly
      unbiased; a result beyond float16's largest value is inf;
    * below: ``|x|`` in units of ``2**-40`` (cut to an integer: bits below are dropped, a bias
      of at most ``2**-16`` of float16's smallest step) plus the 16 random bits, shifted to
      units of ``2**-24`` (float16's subnormal step), with ``x``'s sign;
    * NaN stays NaN.
    """
    x = np.asarray(x, np.float32)
    raw = x.view(np.uint32)
    r = np.asarray(bits, np.uint16).astype(np.uint32)
    normal = (raw & np.uint32(0x7FFFFFFF)) >= np.uint32(0x38800000)
    with np.errstate(over="ignore", invalid="ignore"):
        big = ((raw + (r >> np.uint32(3))) & np.uint32(0xFFFFE000)).view(np.float32)
        small = np.where(normal, np.float32(0), np.abs(x)) * np.float32(2.0**40)
        count = (small.astype(np.uint32) + r) >> np.uint32(16)
        tiny = np.copysign(count.astype(np.float32) * np.float32(2.0**-24), x)
        value = np.where(np.isnan(x), x, np.where(normal, big, tiny))
        return _store(value.astype(np.float16).astype(np.float32), out)
