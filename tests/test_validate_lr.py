"""adamgen's learning-rate rule (``validate.check_lr``): finite and >= 0, arrays read in place.

torch rejects a negative or NaN lr and accepts inf; adamgen rejects inf too (its own choice, in
the README's table of deliberate differences). The entry points that take an lr are tested in
test_api.py; this file tests the rule itself.
"""

from __future__ import annotations

import math
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest

from adamgen.errors import AdamgenError
from adamgen.runtime.validate import check_lr

FLOATS = (np.float16, np.float32, np.float64)


@pytest.mark.parametrize("value", [0.0, -0.0, 1e-3, 0.1, 1.0, 1e300, 5e-324, 0, 3, 10**300,
                                   Fraction(1, 3)], ids=repr)
def test_finite_non_negative_numbers_pass_unchanged(value):
    assert check_lr(value) is value


@pytest.mark.parametrize("value", [-1e-30, -1.0, -5e-324, -1, math.nan, -math.nan, math.inf,
                                   -math.inf, 10**400, -(10**400)], ids=repr)
def test_negative_nan_infinite_and_overflowing_numbers_raise_value_error(value):
    expected = (r"lr=.*\(401 digits\) is beyond the range of a float" if isinstance(value, int)
                and abs(value) > 10**300 else r"lr must be a finite number >= 0, got")
    with pytest.raises(ValueError, match=expected) as error:
        check_lr(value)
    assert isinstance(error.value, AdamgenError)


@pytest.mark.parametrize("dtype", FLOATS + (np.int32, np.uint8), ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (0,)], ids=repr)
def test_finite_non_negative_arrays_pass_unchanged(dtype, shape):
    lr = np.full(shape, 2, dtype)
    assert check_lr(lr) is lr


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: d.__name__)
@pytest.mark.parametrize("bad, message", [
    (np.nan, "holds NaN"), (-np.nan, "holds NaN"), (np.inf, "holds inf"),
    (-np.inf, r"holds a negative value \(its minimum is -inf\)"),
    (-1.0, r"holds a negative value \(its minimum is -1.0\)"),
], ids=["nan", "-nan", "inf", "-inf", "-1"])
@pytest.mark.parametrize("where", [0, -1], ids=["first", "last"])
def test_arrays_with_a_bad_element_raise_value_error_saying_which(dtype, bad, message, where):
    lr = np.full(9, 0.5, dtype)
    lr[where] = bad
    with pytest.raises(ValueError, match=r"lr must be finite and >= 0 everywhere, but it "
                                         + message):
        check_lr(lr)


def test_negative_zero_passes_in_arrays_too():
    lr = np.array([0.5, -0.0, 0.0], np.float32)
    assert check_lr(lr) is lr


@pytest.mark.parametrize("layout", ["strided", "negative", "fortran", "big-endian",
                                    "unaligned"])
def test_any_layout_is_checked(layout):
    base = np.full((6, 8), 0.25)
    base[3, 5] = np.nan
    lr = {"strided": base[1::2, 1::2], "negative": base[::-1, ::-1],
          "fortran": np.asfortranarray(base), "big-endian": base.astype(">f8"),
          "unaligned": np.frombuffer(b"\0" + base.tobytes(), np.float64, offset=1)}[layout]
    with pytest.raises(ValueError, match="holds NaN"):
        check_lr(lr)


def test_integer_arrays_are_checked_for_sign():
    with pytest.raises(ValueError, match=r"minimum is -2.0"):
        check_lr(np.array([1, -2, 3], np.int64))


def test_a_masked_array_is_checked_on_its_data():
    """The kernel reads the data under the mask, so that is what is checked."""
    lr = np.ma.masked_array([0.1, -1.0], mask=[False, True])
    with pytest.raises(ValueError, match="negative"):
        check_lr(lr)


def test_a_large_array_is_checked_without_copying_it():
    lr = np.full(1 << 20, 1e-3, np.float64)
    tracemalloc.start()
    try:
        check_lr(lr)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < lr.nbytes // 64, peak
