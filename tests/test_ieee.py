"""The exact IEEE operations NumPy kernels use, against exact rational arithmetic."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from conftest import assert_bitwise_equal

from adamgen import ieee
from adamgen.errors import InexactVariantError


def rounded_once(value: Fraction, dtype: type) -> float:
    """``value`` rounded to nearest even into ``dtype``, from its exact rational value."""
    info = np.finfo(dtype)
    if value == 0:
        return dtype(0.0)
    low = dtype(float(value))  # a neighbour; step to the two candidates around value
    candidates = [np.nextafter(low, dtype(-np.inf)), low, np.nextafter(low, dtype(np.inf))]
    best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - value),
                                          int(np.asarray(c).view(f"u{info.bits // 8}")) % 2))
    return best


def test_the_double_rounding_example_of_the_issue():
    """float64 a*b + c then float32 gives 1.0004883; the correctly rounded fma is 1.0004884."""
    a = np.array([1 + 2**-12], np.float32)
    c = np.array([2**-60], np.float32)
    naive = np.float32(np.float64(a[0]) * np.float64(a[0]) + np.float64(c[0]))
    exact = ieee.fma(a, a, c)[0]
    assert naive == np.float32(1.0004883) and exact == np.float32(1.0004884)
    assert exact == rounded_once(Fraction(float(a[0])) ** 2 + Fraction(float(c[0])), np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fma_is_correctly_rounded(dtype):
    rng = np.random.default_rng(7)
    n = 3000
    scale = 20 if dtype == np.float16 else 60
    a, b, c = ((rng.standard_normal(n) * 2.0 ** rng.integers(-scale, scale // 2, n)).astype(dtype)
               for _ in range(3))
    with np.errstate(all="ignore"):
        c[: n // 3] = -(a[: n // 3].astype(np.float64) * b[: n // 3]).astype(dtype)  # cancel
        got = ieee.fma(a, b, c)
    finite = np.isfinite(got)
    want = np.array([rounded_once(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)),
                                  dtype) if ok else np.nan
                     for x, y, z, ok in zip(a, b, c, finite)], dtype)
    assert_bitwise_equal(got[finite], want[finite])


def test_fma_special_values_follow_ieee():
    nan, inf = np.float32(np.nan), np.float32(np.inf)
    a = np.array([inf, 0, inf, 1, nan, 2], np.float32)
    b = np.array([0, inf, 1, 1, 1, 3], np.float32)
    c = np.array([1, 1, -inf, nan, 1, -6], np.float32)
    with np.errstate(all="ignore"):
        got = ieee.fma(a, b, c)
    assert np.isnan(got[[0, 1, 2, 3, 4]]).all() and got[5] == 0.0 and not np.signbit(got[5])


def test_float64_fma_declines():
    with pytest.raises(InexactVariantError, match="float64"):
        ieee.fma(np.ones(2), np.ones(2), np.ones(2))


def test_sign_maximum_minimum_follow_torch():
    x = np.array([0.0, -0.0, np.nan, -np.inf, 2.0, -1e-45], np.float32)
    assert_bitwise_equal(ieee.sign(x), np.array([0, 0, 0, -1, 1, -1], np.float32))
    a = np.array([0.0, -0.0, np.nan, 1.0, 3.0], np.float32)
    b = np.array([-0.0, 0.0, 1.0, np.nan, 2.0], np.float32)
    top, bottom = ieee.maximum(a, b), ieee.minimum(a, b)
    assert [np.signbit(v) for v in top[:2]] == [False, True]  # ties keep the first operand
    assert np.isnan(top[2:4]).all() and top[4] == 3.0
    assert np.isnan(bottom[2:4]).all() and bottom[4] == 2.0


def test_roundings_are_to_nearest_even():
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 3.4e38, np.nan, -0.0],
                 np.float32)
    got = ieee.round_bfloat16(x)
    assert got[0] == 1.0 and got[1] == 1 + 4 * 2**-8 and got[2] == 1 + 2**-7
    assert np.isinf(got[3]) and np.isnan(got[4]) and np.signbit(got[5])
    half = ieee.round_float16(np.array([1 + 2**-11, 70000.0], np.float32))
    assert half[0] == 1.0 and np.isinf(half[1])
    single = ieee.round_float32(np.array([1 + 2**-24, 1 + 3 * 2**-24]))
    assert single.dtype == np.float64 and single[0] == 1.0 and single[1] == 1 + 2**-22


@pytest.mark.parametrize("target", ["bfloat16", "float16"])
def test_float64_rounds_once_to_half_precision(target):
    """float64 arrays round straight to the narrow format (no float32 detour), exactly as the
    scalar rounding does, ties, subnormals, overflow and signed zeros included."""
    rng = np.random.default_rng(7)
    bits = {"bfloat16": 8, "float16": 11}[target]
    spread = rng.standard_normal(5000) * 10.0 ** rng.integers(-50, 45, 5000)
    ties = (1 + (2 * rng.integers(0, 2 ** (bits - 1), 500) + 1) * 2.0**-bits) \
        * 2.0 ** rng.integers(-10, 10, 500)
    x = np.concatenate([spread, ties, -ties, [0.0, -0.0, np.inf, -np.inf, 65519.99, 65520.0,
                                             3.4e38, 1e-45, 1.5 * 2.0**-133, 1 + 2.0**-8 + 2.0**-30]])
    got = getattr(ieee, f"round_{target}")(x)
    expected = np.array([ieee.round_scalar(float(v), target) for v in x])
    assert got.dtype == np.float64
    assert_bitwise_equal(got, expected)
