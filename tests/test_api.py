"""The array contract of ``adamgen.adam_update``: seed examples, the reference, ``out``, errors.

Every numerical check is bit for bit against :mod:`reference` (an independent plain-NumPy
transcription of Ivy's ``adam_step`` + ``optimizer_update``, itself checked against Ivy 1.0.0.5 by
the optional differential test at the end). Every call also checks that no input other than
``out`` was written. Containers and ``adamgen.Array`` live in ``test_api_containers.py``.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import tempfile
import textwrap
import warnings
import zlib
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from conftest import Snapshot, assert_all_bitwise_equal, assert_bitwise_equal
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reference import adam_prelude_ref, adam_update_ref, ivy_step_scalar

import adamgen

FLOATS = (np.float16, np.float32, np.float64)
FLOAT_IDS = ("float16", "float32", "float64")
STEPS = (0, 1, 2, 1270, 10**4, 2**24 + 1, 3.4)
SHAPES = ((), (0,), (1,), (7,), (1001,), (3, 3), (2, 3, 4))
HYPERPARAMETERS = (
    {},
    {"beta1": 0.0, "beta2": 0.0, "epsilon": 0.0},
    {"beta1": 0.0},
    {"beta2": 0.0},
    {"epsilon": 0.0},
    {"beta1": 0.5, "beta2": 0.75, "epsilon": 1e-3},
    {"beta1": 0.86, "beta2": 0.95, "epsilon": 1e-6},
    {"beta1": 0.9999999, "beta2": 0.9999999, "epsilon": 1e-8},
    {"beta1": 0.9999999999999999, "beta2": 0.9999999999999999, "epsilon": 1e-12},  # < 1
    {"epsilon": 1.0},
)
SPECIALS = (np.nan, -np.nan, np.inf, -np.inf, -1.0, -0.0, 0.0, 1e-30, 1e30, 65504.0, 1e-8,
            -1e-45)
ARRAY_ARGUMENTS = ("w", "dcdw", "mw_tm1", "vw_tm1")


# -- helpers ----------------------------------------------------------------------------------

def random_state(shape, dtype, rng):
    """w, dcdw, mw_tm1, vw_tm1 with magnitudes over many decades (v >= 0, as real state is)."""
    def one():
        x = rng.standard_normal(shape) * np.exp(rng.uniform(-8, 3, shape))
        return np.asarray(x).astype(dtype)
    w, g, m, v = one(), one(), one(), one()
    return w, g, m, np.abs(v)


def check_against_reference(w, dcdw, lr, mw_tm1, vw_tm1, step, **kwargs):
    """Call adamgen and the reference; every output bit-equal; no input written."""
    snapshot = Snapshot(w=w, dcdw=dcdw, lr=lr, mw_tm1=mw_tm1, vw_tm1=vw_tm1)
    expected = adam_update_ref(w, dcdw, lr, mw_tm1, vw_tm1, step, **kwargs)
    actual = adamgen.adam_update(w, dcdw, lr, mw_tm1, vw_tm1, step, **kwargs)
    snapshot.assert_unchanged()
    assert len(actual) == 3
    assert_all_bitwise_equal(actual, expected)
    return actual


def layout(array: np.ndarray, kind: str) -> np.ndarray:
    """The same values in another memory layout (a view when the layout needs one)."""
    if array.ndim == 0 or kind == "C":
        return array
    if kind == "F":
        return np.asfortranarray(array)
    if kind == "reversed":  # negative strides on every axis
        return np.flip(np.flip(array).copy())
    if kind == "strided":  # every other element of a buffer twice as big on each axis
        big = np.zeros(tuple(2 * n for n in array.shape), array.dtype)
        view = big[(slice(None, None, 2),) * array.ndim]
        view[...] = array
        return view
    if kind == "transposed":
        return np.ascontiguousarray(array.T).T
    if kind == "misaligned":  # C-contiguous, one byte past an element boundary
        raw = np.empty(array.nbytes + 1, np.uint8)
        view = raw[1:].view(array.dtype).reshape(array.shape)
        view[...] = array
        return view
    raise ValueError(kind)


def assert_close_to_printed(result, printed) -> None:
    """The seed page's digits, allowing print rounding.

    Tolerance: half a unit in the last printed digit, plus half a float32 ulp of the result. The
    second term is needed because the page printed digits of a value computed in higher
    precision: ``1.90000164`` is 5.09e-9 from the float32 result 1.9000016450881958 (more than
    half a unit of the 8th decimal), while the nearest float32 is a whole ulp (1.2e-7) away.
    The bits themselves are checked against the reference.
    """
    result = np.asarray(result)
    assert result.dtype == np.float32
    printed = np.asarray(printed, dtype=object)
    assert result.shape == printed.shape
    for value, text in zip(result.ravel().tolist(), printed.ravel().tolist()):
        unit = 10.0 ** Decimal(text).as_tuple().exponent
        tolerance = 0.5 * unit + 0.5 * float(np.spacing(np.float32(value)))
        assert abs(value - float(text)) <= tolerance, (value, text)


# -- seed examples ----------------------------------------------------------------------------

def test_seed_example_one_dimensional():
    w = np.array([1., 2, 3], np.float32)
    dcdw = np.array([0.5, 0.2, 0.1], np.float32)
    lr = np.array(0.1, np.float32)
    vw_tm1 = np.zeros(1, np.float32)
    mw_tm1 = np.zeros(3, np.float32)
    result = check_against_reference(w, dcdw, lr, mw_tm1, vw_tm1, 1)
    assert_close_to_printed(result[0], ["0.90000075", "1.90000164", "2.9000032"])
    assert_close_to_printed(result[1], ["0.05", "0.02", "0.01"])
    assert_close_to_printed(result[2], ["2.50000012e-04", "4.00000063e-05", "1.00000016e-05"])


def test_seed_example_two_dimensional_with_out():
    w = np.array([[1., 2, 3], [4, 2, 4], [6, 4, 2]], np.float32)
    dcdw = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.1], [0.1, 0.5, 0.3]], np.float32)
    lr = np.array(0.1, np.float32)
    mw_tm1 = np.zeros((3, 3), np.float32)
    vw_tm1 = np.zeros(3, np.float32)
    out = np.zeros_like(w)
    expected = adam_update_ref(w, dcdw, lr, mw_tm1, vw_tm1, 2)
    snapshot = Snapshot(w=w, dcdw=dcdw, lr=lr, mw_tm1=mw_tm1, vw_tm1=vw_tm1)
    result = adamgen.adam_update(w, dcdw, lr, mw_tm1, vw_tm1, 2, beta1=0.9, beta2=0.999,
                                 epsilon=1e-7, out=out, stop_gradients=True)
    snapshot.assert_unchanged()
    assert result[0] is out
    assert_all_bitwise_equal(result, expected)
    assert_close_to_printed(result[0], [["0.92558873", "1.92558754", "2.92558718"],
                                        ["3.92558694", "1.92558682", "3.92558861"],
                                        ["5.92558861", "3.92558694", "1.92558718"]])
    assert_close_to_printed(result[1], [["0.01", "0.02", "0.03"], ["0.04", "0.05", "0.01"],
                                        ["0.01", "0.05", "0.03"]])
    assert_close_to_printed(result[2], [
        ["1.00000016e-05", "4.00000063e-05", "9.00000086e-05"],
        ["1.60000025e-04", "2.50000012e-04", "1.00000016e-05"],
        ["1.00000016e-05", "2.50000012e-04", "9.00000086e-05"]])


def test_seed_example_of_the_array_method_through_the_function():
    w = np.array([1., 2, 3.], np.float32)
    dcdw = np.array([0.2, 0.1, 0.3], np.float32)
    lr = np.array(0.1, np.float32)
    result = check_against_reference(w, dcdw, lr, np.zeros(3, np.float32),
                                      np.zeros(1, np.float32), 2)
    assert_close_to_printed(result[0], ["0.92558753", "1.92558873", "2.92558718"])
    assert_close_to_printed(result[1], ["0.02", "0.01", "0.03"])
    assert_close_to_printed(result[2], ["4.00000063e-05", "1.00000016e-05", "9.00000086e-05"])


def test_seed_examples_with_ivy_style_list_inputs():
    """``ivy.array([1., 2, 3])`` is float32: lists of Python floats give the same bits."""
    result = check_against_reference([1., 2, 3], [0.5, 0.2, 0.1], np.array(0.1, np.float32),
                                      [0., 0., 0.], [0.], 1)
    assert_close_to_printed(result[0], ["0.90000075", "1.90000164", "2.9000032"])


# -- the reference, bit for bit ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("lr_kind", ["python float", "0-d same dtype", "0-d float64", "array"])
def test_dtypes_shapes_and_lr_kinds_match_reference(dtype, shape, lr_kind):
    rng = np.random.default_rng(zlib.crc32(repr((np.dtype(dtype).name, shape, lr_kind)).encode()))
    w, g, m, v = random_state(shape, dtype, rng)
    lr = {"python float": 0.01, "0-d same dtype": np.array(0.01, dtype),
          "0-d float64": np.array(0.01), "array": np.abs(random_state(shape, dtype, rng)[0])
          }[lr_kind]
    check_against_reference(w, g, lr, m, v, 7)


@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
@pytest.mark.parametrize("step", STEPS, ids=repr)
def test_steps_match_reference(dtype, step):
    w, g, m, v = random_state((101,), dtype, np.random.default_rng(3))
    check_against_reference(w, g, 0.001, m, v, step)


@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
@pytest.mark.parametrize("hyper", HYPERPARAMETERS, ids=repr)
@pytest.mark.parametrize("step", [1, 2, 1270])
def test_hyperparameters_match_reference(dtype, hyper, step):
    w, g, m, v = random_state((64,), dtype, np.random.default_rng(4))
    check_against_reference(w, g, 0.01, m, v, step, **hyper)


@pytest.mark.parametrize("step", range(1, 3000, 37))
def test_many_steps_float64_where_pow_and_sqrt_differ(step):
    """``(1 - beta2**t) ** 0.5`` is pow, not sqrt: they differ in the last bit for some t."""
    w, g, m, v = random_state((5,), np.float64, np.random.default_rng(step))
    check_against_reference(w, g, 0.1, m, v, step)


def test_step_1270_is_where_pow_and_sqrt_first_differ():
    import math

    base = 1 - 0.999 ** 1270.0
    assert base ** 0.5 != math.sqrt(base)  # the premise: this step exercises the pow bit
    w, g, m, v = random_state((33,), np.float64, np.random.default_rng(5))
    check_against_reference(w, g, 1.0, m, v, 1270)


BROADCASTS = {
    "vw_tm1 (1,) against (3, 3)": {"v": (1,)},
    "vw_tm1 (3,) against (3, 3)": {"v": (3,)},
    "mw_tm1 (3,)": {"m": (3,)},
    "dcdw (3,)": {"g": (3,)},
    "dcdw (3, 1)": {"g": (3, 1)},
    "w (1, 3): w_new is (3, 3)": {"w": (1, 3)},
    "w 0-d": {"w": ()},
    "lr (3, 1)": {"lr": (3, 1)},
    "lr (3, 3)": {"lr": (3, 3)},
    "lr (1,)": {"lr": (1,)},
    "everything but dcdw (1,)": {"w": (1,), "m": (1,), "v": (1,), "lr": (1,)},
}


@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
@pytest.mark.parametrize("shapes", BROADCASTS.values(), ids=BROADCASTS.keys())
def test_broadcasting_matches_reference(dtype, shapes):
    rng = np.random.default_rng(6)
    full = (3, 3)

    def make(name, positive=False):
        x = random_state(shapes.get(name, full), dtype, rng)[0]
        return np.abs(x) if positive else x

    lr = make("lr", positive=True) if "lr" in shapes else 0.05
    w_new, _, _ = check_against_reference(make("w"), make("g"), lr, make("m"),
                                          make("v", positive=True), 3)
    assert w_new.shape == np.broadcast_shapes(*(shapes.get(n, full) for n in "wgmv"),
                                              np.shape(lr))


@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
@pytest.mark.parametrize("kind", ["F", "strided", "reversed", "transposed"])
def test_non_contiguous_inputs_match_reference(dtype, kind):
    w, g, m, v = random_state((40, 31), dtype, np.random.default_rng(7))
    lr = np.abs(random_state((40, 31), dtype, np.random.default_rng(8))[0])
    check_against_reference(*(layout(x, kind) for x in (w, g, lr, m, v)), 5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("target", ["w", "out"])
def test_misaligned_arrays_match_reference_and_never_reach_c(dtype, target, monkeypatch):
    """A typed C pointer to a misaligned element is undefined behaviour: such calls run on
    NumPy, even with the C variant forced."""
    from adamgen.runtime.c_kernels import CKernel

    def refuse(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            assert not isinstance(value, np.ndarray) or value.flags.aligned, "misaligned to C"
    for form in ("functional", "inplace_parameter"):
        original = getattr(CKernel, form)
        monkeypatch.setattr(CKernel, form, lambda self, *a, _f=original, **k: (
            refuse(*a, **k), _f(self, *a, **k))[1])
    monkeypatch.setenv("ADAMGEN_VARIANT", "c")
    w, g, m, v = random_state((70_001,), dtype, np.random.default_rng(12))
    if target == "w":
        check_against_reference(layout(w, "misaligned"), g, 0.01, m, v, 3)
    else:
        expected = adam_update_ref(w, g, 0.01, m, v, 3)
        out = layout(w, "misaligned")
        adamgen.adam_update(out, g, 0.01, m, v, 3, out=out)
        assert_all_bitwise_equal([out], expected[:1])


def test_mixed_layouts_in_one_call_match_reference():
    w, g, m, v = random_state((17, 9), np.float32, np.random.default_rng(9))
    check_against_reference(layout(w, "F"), layout(g, "reversed"), 0.1, layout(m, "strided"),
                            layout(v, "transposed"), 11)


def test_one_dimensional_negative_and_step_slices_match_reference():
    w, g, m, v = random_state((1001,), np.float32, np.random.default_rng(10))
    check_against_reference(w[::-1][:501], g[::2], 0.1, m[::-2], v[-1::-2], 2)


@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
@pytest.mark.parametrize("step", [0, 1, 2, 1270, 3.4], ids=repr)
@pytest.mark.parametrize("hyper", HYPERPARAMETERS[:3] + HYPERPARAMETERS[7:8], ids=repr)
def test_nan_inf_and_negative_state_match_reference(dtype, step, hyper):
    if step == 0 and hyper.get("epsilon", 1e-7) == 0:
        pytest.skip("step=0 with epsilon=0 is an error, tested below")
    with np.errstate(over="ignore"):  # 1e30 is inf in float16
        values = np.array(SPECIALS).astype(dtype)
    w, g, m, v = (x.ravel() for x in np.meshgrid(values, values, values, values, indexing="ij"))
    check_against_reference(w, g, 0.1, m, v, step, **hyper)
    with np.errstate(invalid="ignore"):
        valid = values[np.isfinite(values) & (values >= 0)]  # adamgen's lr rule
    lr = np.resize(valid, w.size)  # zero, -0.0, subnormal and huge learning rates too
    check_against_reference(w, g, lr, m, v, step, **hyper)


@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
def test_nan_in_v_becomes_zero_before_the_square_root(dtype):
    """Ivy's ``maximum(v, 0)`` is ``where(v >= 0, v, 0)``: a NaN v acts as 0 there (np.maximum
    would propagate it). With dcdw = 0 the new v is NaN but the update stays finite."""
    w = np.array([1.0, 1.0], dtype)
    m = np.array([0.5, 0.5], dtype)
    v = np.array([np.nan, -1.0], dtype)
    w_new, _, vw = check_against_reference(w, np.zeros(2, dtype), 0.1, m, v, 3, epsilon=1e-3)
    assert np.isnan(vw[0]) and vw[1] < 0
    assert np.all(np.isfinite(w_new))
    assert w_new[0] == w_new[1]  # NaN and a negative v both clamp to 0


@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
def test_step_zero_is_no_update(dtype):
    w, g, m, v = random_state((50,), dtype, np.random.default_rng(11))
    w[w == 0] = 1
    w_new, mw, vw = check_against_reference(w, g, 0.1, m, v, 0)
    assert_bitwise_equal(w_new, w, "w_new")
    expected = adam_update_ref(w, g, 0.1, m, v, 5)
    assert_bitwise_equal(mw, expected[1], "mw")  # the moments still move
    assert_bitwise_equal(vw, expected[2], "vw")


MIXED = [
    ("float16", "float32", "float16", "float16"),
    ("float32", "float64", "float32", "float32"),
    ("float64", "float32", "float32", "float32"),
    ("float32", "float32", "float64", "float64"),
    ("float16", "float16", "float16", "float64"),
    ("int32", "float16", "float16", "float16"),
    ("float16", "int16", "float16", "float16"),
    ("float16", "int8", "float16", "float16"),
    ("float32", "uint8", "float32", "int64"),
    ("int64", "int64", "int64", "int64"),
    ("int32", "int32", "int32", "int32"),
    ("int8", "int8", "int8", "int8"),
    ("uint16", "uint16", "uint16", "uint16"),
    ("float32", "uint64", "int64", "int64"),
]


@pytest.mark.parametrize("dtypes", MIXED, ids="-".join)
@pytest.mark.parametrize("lr", [0.1, np.array(0.1), np.array(0.1, np.float16)], ids=repr)
def test_mixed_and_integer_dtypes_match_reference(dtypes, lr):
    rng = np.random.default_rng(12)

    def make(dtype):
        if np.dtype(dtype).kind in "iu":
            return rng.integers(0, 6, 9).astype(dtype)
        return rng.standard_normal(9).astype(dtype)

    w, g, m, v = (make(d) for d in dtypes)
    check_against_reference(w, g, lr, m, np.abs(v) if v.dtype.kind == "f" else v, 3)


# -- result dtypes ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
def test_float_in_gives_the_same_float_out(dtype):
    w, g, m, v = random_state((4,), dtype, np.random.default_rng(13))
    result = check_against_reference(w, g, 0.1, m, v, 1)
    assert [r.dtype for r in result] == [np.dtype(dtype)] * 3


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8", "uint32"])
def test_integer_arrays_give_float64(dtype):
    ints = np.array([1, 2, 3], dtype)
    result = check_against_reference(ints, ints, 0.1, np.zeros(3, dtype), np.zeros(3, dtype), 1)
    assert [r.dtype for r in result] == [np.dtype(np.float64)] * 3


def test_float64_zero_d_lr_makes_w_new_float64_and_leaves_the_moments_float32():
    w, g, m, v = random_state((4,), np.float32, np.random.default_rng(14))
    result = check_against_reference(w, g, np.array(0.1), m, v, 1)
    assert [r.dtype for r in result] == [np.dtype(np.float64), np.dtype(np.float32),
                                         np.dtype(np.float32)]  # what Ivy gives


def test_python_float_lr_is_weak_and_keeps_float16():
    w, g, m, v = random_state((4,), np.float16, np.random.default_rng(15))
    result = check_against_reference(w, g, 0.1, m, v, 1)
    assert result[0].dtype == np.float16


def test_lists_of_python_floats_give_float32():
    result = check_against_reference([1., 2.], [0.5, 0.25], 0.1, [0., 0.], [0.], 1)
    assert [r.dtype for r in result] == [np.dtype(np.float32)] * 3


# -- step: converted as Ivy's ``to_scalar`` does -----------------------------------------------

@pytest.mark.parametrize("step", [np.int64(5), np.array(7), np.array(3.4), np.float32(3.4),
                                  np.array(3.4, np.float32), np.uint8(3)], ids=repr)
def test_numpy_steps_match_reference(step):
    w, g, m, v = random_state((20,), np.float64, np.random.default_rng(16))
    check_against_reference(w, g, 0.1, m, v, step)


@pytest.mark.parametrize("step", [3.4, 0.1, 1270.3, 10000.3], ids=repr)
def test_python_float_step_is_used_as_float_step(step):
    """adamgen's contract is ``t = float(step)``. Ivy 1.0.0.5 instead rounds a Python-float step
    through float32 (``3.4`` becomes ``3.4000000953674316``); the README lists the difference."""
    assert ivy_step_scalar(step) == float(np.float32(step)) != step
    w, g, m, v = random_state((20,), np.float64, np.random.default_rng(17))
    exact = check_against_reference(w, g, 0.1, m, v, step)
    ivy_like = adam_update_ref(w, g, 0.1, m, v, step, ivy_step=True)
    assert exact[0].tobytes() != ivy_like[0].tobytes()  # the two rules really differ here


@pytest.mark.parametrize("step, t", [
    (3, 3), (2**24 + 1, 2**24 + 1), (2**40 + 1, 2**40 + 1),  # ints stay exact
    (3.4, 3.4000000953674316), (16777217.0, 16777216.0),   # Python floats: float32
    (1e-40, 1e-40), (1e39, 1e39),                          # ...unless float32 cannot hold them
    (np.array(3.4), 3.4), (np.float32(3.4), 3.4000000953674316), (np.int64(7), 7),
], ids=repr)
def test_reference_step_conversion_is_ivys_to_scalar(step, t):
    """What the reference claims about ``ivy.to_scalar`` (checked against Ivy itself by the
    differential test below)."""
    converted = ivy_step_scalar(step)
    assert converted == t and type(converted) in (int, float)
    assert type(ivy_step_scalar(np.float64(2.5))) is np.float64


def test_numpy_float64_step_is_a_plain_float():
    """``float(np.float64(2.5))``: the step never changes result dtypes (in Ivy 1.0.0.5 an
    ``np.float64`` step makes ``w_new`` float64; the README lists the difference)."""
    w, g, m, v = random_state((6,), np.float32, np.random.default_rng(18))
    result = check_against_reference(w, g, 0.1, m, v, np.float64(2.5))
    assert [r.dtype for r in result] == [np.dtype(np.float32)] * 3


# -- accepted inputs --------------------------------------------------------------------------

class ArrayLike:
    """Only ``__array__``."""

    def __init__(self, array):
        self._array = array

    def __array__(self, dtype=None, copy=None):
        return self._array if dtype is None else self._array.astype(dtype)


class DLPackOnly:
    """Only ``__dlpack__`` and ``__dlpack_device__``."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


LIST_INPUTS = {
    "lists of floats": ([1., 2, 3], [0.5, 0.2, 0.1], 0.1, [0., 0, 0], [0.]),
    "tuples": ((1., 2, 3), (0.5, 0.2, 0.1), 0.1, (0., 0, 0), (0.,)),
    "nested lists": ([[1., 2], [3, 4]], [[.5, .2], [.1, .3]], 0.1, [[0., 0], [0, 0]], [0.]),
    "lists of ints": ([1, 2, 3], [5, 2, 1], 0.1, [0, 0, 0], [0]),
    "lists with a float32-subnormal value": ([1e-40, 1.0], [0.5, 0.25], 0.1, [0., 0.], [0.]),
    "lists with NumPy float64 scalars": ([np.float64(1.0), 2.0], [0.5, 0.25], 0.1, [0., 0.],
                                         [0.]),
    "lists mixed with arrays": ([1., 2, 3], np.array([.5, .2, .1]), 0.1,
                                np.zeros(3, np.float16), [0.]),
    "Python scalars": (1.0, 0.5, 0.1, 0.0, 0.0),
    "Python ints": (1, 2, 0.1, 0, 0),
    "empty lists": ([], [], 0.1, [], []),
}


@pytest.mark.parametrize("args", LIST_INPUTS.values(), ids=LIST_INPUTS.keys())
def test_lists_tuples_and_python_scalars_convert_as_ivy_array_does(args):
    w, g, lr, m, v = args
    check_against_reference(w, g, lr, m, v, 2)


@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
def test_numpy_scalars_are_accepted(dtype):
    result = check_against_reference(dtype(1.0), dtype(0.5), dtype(0.1), dtype(0.0), dtype(0.0),
                                     1)
    assert all(r.shape == () and r.dtype == dtype for r in result)
    check_against_reference(dtype(1.0), dtype(0.5), np.float64(0.1), dtype(0.0), dtype(0.0), 1)


@pytest.mark.parametrize("wrapper", [ArrayLike, DLPackOnly], ids=["__array__", "__dlpack__"])
@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
def test_array_protocol_objects_are_accepted(wrapper, dtype):
    w, g, m, v = random_state((2, 5), dtype, np.random.default_rng(19))
    expected = adam_update_ref(w, g, 0.01, m, v, 4)
    actual = adamgen.adam_update(wrapper(w), wrapper(g), 0.01, wrapper(m), wrapper(v), 4)
    assert_all_bitwise_equal(actual, expected)


@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
@pytest.mark.parametrize("lr", [[0.1, 0.2, 0.3], (0.1, 0.2, 0.3), [0.1], [1, 2, 3]], ids=repr)
def test_sequence_lr_takes_the_dtype_of_the_gradient_as_in_ivy(dtype, lr):
    """In Ivy, ``effective_grad * lr`` converts a dtype-less ``lr`` with
    ``asarray(lr, dtype=effective_grad.dtype)``: float64 arrays use the float64 0.1, float16
    arrays stay float16 (``ivy.asarray`` rules would make it float32)."""
    w, g, m, v = random_state((3,), dtype, np.random.default_rng(20))
    result = check_against_reference(w, g, lr, m, v, 2)
    assert result[0].dtype == dtype


def test_hyperparameters_are_floats():
    """``beta1=0`` is ``0.0``: hyperparameters are Python floats in adamgen's contract, so integer
    arrays give float64 state (Ivy 1.0.0.5 keeps a Python-int ``beta1`` weak and ``mw`` int64;
    the README lists the difference)."""
    ints = np.array([1, 2, 3])
    result = adamgen.adam_update(ints, ints, 0.1, np.zeros(3, np.int64), np.zeros(3, np.int64), 3,
                                 beta1=0)
    expected = adam_update_ref(ints, ints, 0.1, np.zeros(3, np.int64), np.zeros(3, np.int64), 3,
                               beta1=0.0)
    assert_all_bitwise_equal(result, expected)
    assert result[1].dtype == np.float64


@pytest.mark.parametrize("flag", [True, False, np.True_, np.False_], ids=repr)
def test_stop_gradients_bools_change_nothing(flag):
    w, g, m, v = random_state((5,), np.float32, np.random.default_rng(21))
    expected = adam_update_ref(w, g, 0.1, m, v, 3)
    assert_all_bitwise_equal(adamgen.adam_update(w, g, 0.1, m, v, 3, stop_gradients=flag),
                             expected)


def test_signature_is_ivys():
    import inspect

    parameters = inspect.signature(adamgen.adam_update).parameters
    assert list(parameters) == ["w", "dcdw", "lr", "mw_tm1", "vw_tm1", "step", "beta1", "beta2",
                                "epsilon", "stop_gradients", "out"]
    kinds = [p.kind for p in parameters.values()]
    assert kinds[:6] == [inspect.Parameter.POSITIONAL_ONLY] * 6
    assert kinds[6:] == [inspect.Parameter.KEYWORD_ONLY] * 5
    defaults = {n: p.default for n, p in parameters.items() if p.default is not p.empty}
    assert defaults == {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-07,
                        "stop_gradients": True, "out": None}


# -- out --------------------------------------------------------------------------------------

def float32_case(shape=(6,), seed=22):
    return random_state(shape, np.float32, np.random.default_rng(seed))


def test_out_receives_w_new_and_is_returned():
    w, g, m, v = float32_case()
    out = np.full(6, 7.0, np.float32)
    expected = adam_update_ref(w, g, 0.1, m, v, 2)
    snapshot = Snapshot(w=w, g=g, m=m, v=v)
    result = adamgen.adam_update(w, g, 0.1, m, v, 2, out=out)
    snapshot.assert_unchanged()
    assert result[0] is out
    assert_all_bitwise_equal(result, expected)
    assert not np.shares_memory(result[1], out) and not np.shares_memory(result[2], out)


@pytest.mark.parametrize("out_dtype", [np.float64, np.float16])
def test_out_casts_same_kind(out_dtype):
    w, g, m, v = float32_case()
    out = np.zeros(6, out_dtype)
    expected = adam_update_ref(w, g, 0.1, m, v, 2)
    result = adamgen.adam_update(w, g, 0.1, m, v, 2, out=out)
    assert result[0] is out and out.dtype == out_dtype
    assert_bitwise_equal(out, expected[0].astype(out_dtype), "out")
    assert_bitwise_equal(result[1], expected[1], "mw")


@pytest.mark.parametrize("out_dtype", [np.int32, np.int64, np.bool_, np.uint8])
def test_out_that_needs_unsafe_casting_raises_type_error_and_stays_untouched(out_dtype):
    w, g, m, v = float32_case()
    out = np.ones(6, out_dtype)
    snapshot = Snapshot(out=out, w=w, g=g, m=m, v=v)
    with pytest.raises(TypeError, match="out"):
        adamgen.adam_update(w, g, 0.1, m, v, 2, out=out)
    snapshot.assert_unchanged()


def test_out_float32_for_a_float64_result_is_same_kind():
    w, g, m, v = float32_case()
    out = np.zeros(6, np.float32)
    expected = adam_update_ref(w, g, np.array(0.1), m, v, 2)  # w_new float64
    result = adamgen.adam_update(w, g, np.array(0.1), m, v, 2, out=out)
    assert result[0] is out
    assert_bitwise_equal(out, expected[0].astype(np.float32), "out")


@pytest.mark.parametrize("variant", ["numpy", "c", "c-omp"])
@pytest.mark.parametrize("lr", [1e30, np.array(1e30)], ids=["one-dtype", "mixed-dtypes"])
def test_inf_and_nan_are_values_not_floating_point_warnings(variant, lr, monkeypatch):
    """Overflow, inf - inf, 0/0 and NaN compare as the reference computes them, on every
    variant (the mixed-dtype form runs NumPy whatever is forced), with warnings as errors."""
    from adamgen.config import refresh_environment

    monkeypatch.setenv("ADAMGEN_VARIANT", variant)
    refresh_environment()
    specials = np.array(SPECIALS + (3e38, -3e38), np.float32)
    w, g, m, v = (np.resize(np.roll(specials, k), 5003) for k in range(4))
    expected = adam_update_ref(w, g, lr, m, v, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actual = adamgen.adam_update(w, g, lr, m, v, 2)
    assert_all_bitwise_equal(actual, expected)


@pytest.mark.parametrize("buffered", [True, False], ids=["one-dtype", "mixed-dtypes"])
def test_out_narrower_than_w_new_takes_inf_without_a_warning(buffered):
    w = np.array([1e300, -1e300, 1.0])
    g, m, v = (np.full(3, 0.5, np.float64 if buffered else np.float32) for _ in range(3))
    out = np.zeros(3, np.float32)
    expected = adam_update_ref(w, g, 0.1, m, v, 2)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adamgen.adam_update(w, g, 0.1, m, v, 2, out=out)
    with np.errstate(over="ignore"):
        assert_bitwise_equal(out, expected.astype(np.float32), "out")
    assert np.isinf(out[:2]).all()


@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS)
@pytest.mark.parametrize("kind", ["C", "F", "reversed", "strided"])
def test_out_is_w_updates_w_in_place(dtype, kind):
    w, g, m, v = (layout(x, kind) for x in random_state((8, 5), dtype,
                                                         np.random.default_rng(23)))
    expected = adam_update_ref(w, g, 0.1, m, v, 3)
    snapshot = Snapshot(g=g, m=m, v=v)
    result = adamgen.adam_update(w, g, 0.1, m, v, 3, out=w)
    snapshot.assert_unchanged()
    assert result[0] is w
    assert_all_bitwise_equal(result, expected)


@pytest.mark.parametrize("target", ["dcdw", "mw_tm1", "vw_tm1", "reversed w", "shifted w"])
def test_out_aliasing_another_input_gives_the_reference_and_spares_the_rest(target):
    """``out`` may be any writable array, even one that overlaps an input: the result is the
    update of the inputs as they were, and every input that is not ``out`` stays untouched."""
    buffer = np.random.default_rng(24).standard_normal(13).astype(np.float32)
    w = buffer[:12].copy()
    g, m, v = (x[:12] for x in float32_case((13,), 25)[1:])
    args = {"w": w, "dcdw": g.copy(), "mw_tm1": m.copy(), "vw_tm1": v.copy()}
    if target == "reversed w":
        out = w[::-1]
    elif target == "shifted w":
        args["w"] = buffer[:12]
        out = buffer[1:]
    else:
        out = args[target]
    expected = adam_update_ref(*(args[n].copy() for n in ("w", "dcdw")), 0.1,
                               *(args[n].copy() for n in ("mw_tm1", "vw_tm1")), 3)
    spared = {n: a for n, a in args.items() if not np.shares_memory(a, out)}
    snapshot = Snapshot(**spared)
    result = adamgen.adam_update(args["w"], args["dcdw"], 0.1, args["mw_tm1"], args["vw_tm1"], 3,
                                 out=out)
    snapshot.assert_unchanged()
    assert result[0] is out
    assert_all_bitwise_equal(result, expected)


@pytest.mark.parametrize("shape", [(4,), (2,), (6, 1), (), (1, 6), (2, 6)], ids=str)
def test_out_of_the_wrong_shape_raises_value_error_naming_both_shapes(shape):
    w, g, m, v = float32_case()
    out = np.full(shape, 7.0, np.float32)
    snapshot = Snapshot(out=out, w=w, g=g, m=m, v=v)
    with pytest.raises(ValueError, match="out") as error:
        adamgen.adam_update(w, g, 0.1, m, v, 2, out=out)
    assert str(shape) in str(error.value) and "(6,)" in str(error.value)
    snapshot.assert_unchanged()


@pytest.mark.parametrize("out", [[0.0] * 6, 0.0, (0.0,) * 6], ids=["list", "float", "tuple"])
def test_out_that_is_not_an_array_raises_type_error(out):
    w, g, m, v = float32_case()
    with pytest.raises(TypeError, match="out"):
        adamgen.adam_update(w, g, 0.1, m, v, 2, out=out)


def test_read_only_out_raises_and_stays_untouched():
    w, g, m, v = float32_case()
    out = np.zeros(6, np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        adamgen.adam_update(w, g, 0.1, m, v, 2, out=out)
    assert not out.any()


# -- bad input: the named error, naming the argument, nothing written --------------------------

BAD_DTYPES = {
    "complex": lambda a: a.astype(np.complex64),
    "object": lambda a: a.astype(object),
    "string": lambda a: a.astype(str),
    "bool": lambda a: a > 0,
}


def failing_call(expected_error, match, **overrides):
    """Call with one bad argument and a live ``out``; assert the error and that nothing moved."""
    w, g, m, v = float32_case()
    arguments = {"w": w, "dcdw": g, "lr": 0.1, "mw_tm1": m, "vw_tm1": v, "step": 2}
    keywords = {}
    for name, value in overrides.items():
        if name in arguments:
            arguments[name] = value
        else:
            keywords[name] = value
    out = np.full(6, 7.0, np.float32)
    snapshot = Snapshot(out=out, **{n: a for n, a in arguments.items()
                                    if isinstance(a, np.ndarray)})
    with pytest.raises(expected_error, match=match) as error:
        adamgen.adam_update(*arguments.values(), out=out, **keywords)
    snapshot.assert_unchanged()
    return error.value


@pytest.mark.parametrize("kind", BAD_DTYPES, ids=BAD_DTYPES.keys())
@pytest.mark.parametrize("name", ARRAY_ARGUMENTS + ("lr",))
def test_non_real_dtypes_raise_type_error_naming_the_argument(kind, name):
    values = BAD_DTYPES[kind](np.abs(float32_case()[0]))
    failing_call(TypeError, rf"\b{name}\b", **{name: values})


@pytest.mark.parametrize("name", ARRAY_ARGUMENTS)
def test_complex_python_scalars_and_lists_raise_type_error(name):
    failing_call(TypeError, rf"\b{name}\b", **{name: [1 + 2j] * 6})


@pytest.mark.parametrize("name, shape", [("dcdw", (4,)), ("mw_tm1", (5,)), ("vw_tm1", (2,)),
                                         ("lr", (3,)), ("w", (6, 2)), ("dcdw", (2, 3))])
def test_shapes_that_do_not_broadcast_raise_value_error_naming_them(name, shape):
    bad = np.ones(shape, np.float32)
    error = failing_call(ValueError, rf"\b{name}\b", **{name: bad})
    message = str(error)
    assert str(shape) in message and "(6,)" in message


@pytest.mark.parametrize("step", [-1, -0.5, -2**40, float("nan"), float("inf"), float("-inf"),
                                  np.array(np.nan), np.float32(-1.0), np.int64(-3)], ids=repr)
def test_negative_nan_and_infinite_steps_raise_value_error(step):
    failing_call(ValueError, "step", step=step)


def test_step_zero_with_epsilon_zero_raises_zero_division_error():
    error = failing_call(ZeroDivisionError, "step", step=0, epsilon=0.0)
    assert "epsilon" in str(error)
    failing_call(ZeroDivisionError, "epsilon", step=0.0, epsilon=0)


@pytest.mark.parametrize("name, value", [
    ("beta1", -0.1), ("beta1", 1.0), ("beta1", 1.5), ("beta1", float("nan")),
    ("beta1", float("inf")), ("beta1", -1e-300),
    ("beta2", -0.1), ("beta2", 1.0), ("beta2", 2), ("beta2", float("nan")),
    ("epsilon", -1e-8), ("epsilon", float("nan")), ("epsilon", float("-inf")), ("epsilon", -1),
], ids=lambda x: repr(x))
def test_hyperparameters_out_of_range_raise_value_error_showing_the_value(name, value):
    error = failing_call(ValueError, rf"\b{name}\b", **{name: value})
    assert repr(value) in str(error) or str(value) in str(error)


BAD_LRS = [-0.1, -1, float("nan"), float("inf"), float("-inf"), 10**400, np.float32(-1.0),
           np.float64("nan"), np.array(np.inf), np.array([0.1] * 5 + [-0.1], np.float32),
           np.array([0.1] * 5 + [np.nan]), [0.1, -0.2, 0.3, 0.1, 0.1, 0.1], (float("inf"),)]


@pytest.mark.parametrize("lr", BAD_LRS, ids=repr)
def test_negative_nan_and_infinite_lr_raise_value_error_naming_lr(lr):
    """adamgen's rule: finite and >= 0 (torch accepts an infinite lr; adamgen does not)."""
    error = failing_call(ValueError, r"\blr\b", lr=lr)
    assert isinstance(error, adamgen.AdamgenError)


@pytest.mark.parametrize("lr", [0.0, -0.0, 0, 5e-324, 1e300, np.array(0.0), np.float32(-0.0),
                                np.zeros(6, np.float32)], ids=repr)
def test_zero_and_huge_finite_lr_are_accepted(lr):
    w, g, m, v = float32_case()
    check_against_reference(w, g, lr, m, v, 3)


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf")], ids=repr)
def test_the_array_and_container_forms_and_the_vjp_apply_the_lr_rule(lr):
    w, g, m, v = float32_case()
    snapshot = Snapshot(w=w, g=g, m=m, v=v)
    with pytest.raises(ValueError, match=r"\blr\b"):
        adamgen.array(w).adam_update(g, lr, m, v, 2, out=w)
    container = adamgen.Container(a=w, b=w.copy())
    with pytest.raises(ValueError, match=r"\blr\b"):
        container.adam_update(adamgen.Container(a=g, b=g), lr, m, v, 2)
    with pytest.raises(ValueError, match=r"\blr\b"):
        adamgen.adam_update(container, g, adamgen.Container(a=0.1, b=lr), m, v, 2)
    with pytest.raises(ValueError, match=r"\blr\b"):
        adamgen.adam_update_vjp(w, g, lr, m, v, 2, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"\blr\b"):
        adamgen.adam_update_vjp(w, g, np.full(6, lr, np.float32), m, v, 2, (1.0, 1.0, 1.0))
    snapshot.assert_unchanged()


@pytest.mark.parametrize("flag", [None, 1, 0, "yes", 1.0, np.array(True), [True]], ids=repr)
def test_stop_gradients_that_is_not_a_bool_raises_type_error(flag):
    failing_call(TypeError, "stop_gradients", stop_gradients=flag)


def test_checks_run_before_an_in_place_write():
    """``out=w`` and a bad argument late in the signature: w is not touched."""
    w, g, m, v = float32_case()
    snapshot = Snapshot(w=w, g=g, m=m, v=v)
    for bad in ({"step": -1}, {"epsilon": -1.0}, {"stop_gradients": None}, {"beta2": 1.0}):
        with pytest.raises((TypeError, ValueError)):
            adamgen.adam_update(w, g, 0.1, m, v, bad.pop("step", 2), out=w, **bad)
        snapshot.assert_unchanged()
    with pytest.raises(TypeError):
        adamgen.adam_update(w, g, 0.1, m, v.astype(complex), 2, out=w)
    with pytest.raises(ValueError):
        adamgen.adam_update(w, g, 0.1, m, np.ones(4, np.float32), 2, out=w)
    with pytest.raises(ZeroDivisionError):
        adamgen.adam_update(w, g, 0.1, m, v, 0, epsilon=0.0, out=w)
    snapshot.assert_unchanged()


def test_errors_derive_from_adamgen_error_too():
    w, g, m, v = float32_case()
    for call in (lambda: adamgen.adam_update(w, g, 0.1, m, v, -1),
                 lambda: adamgen.adam_update(w.astype(complex), g, 0.1, m, v, 1),
                 lambda: adamgen.adam_update(w, g, 0.1, m, v, 0, epsilon=0.0)):
        with pytest.raises(adamgen.AdamgenError):
            call()


# -- hypothesis -------------------------------------------------------------------------------

DTYPES = st.sampled_from(FLOATS)
LAYOUTS = st.sampled_from(["C", "F", "reversed", "strided"])


def float_elements(dtype):
    return st.floats(width=np.finfo(dtype).bits, allow_nan=True, allow_infinity=True)


@st.composite
def broadcastable(draw, shape):
    """A shape that broadcasts to ``shape``: drop leading axes and/or set axes to 1."""
    drop = draw(st.integers(0, len(shape)))
    kept = shape[drop:]
    return tuple(1 if draw(st.booleans()) else n for n in kept)


@st.composite
def update_cases(draw):
    dtype = draw(DTYPES)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    arrays = {}
    for name in ARRAY_ARGUMENTS:
        arg_shape = draw(broadcastable(shape)) if draw(st.booleans()) else shape
        values = draw(hnp.arrays(dtype, arg_shape, elements=float_elements(dtype)))
        arrays[name] = layout(values, draw(LAYOUTS))
    lr = draw(st.one_of(
        st.floats(0, 10, allow_nan=False),
        st.builds(lambda x: np.array(x, dtype), st.floats(0, 10, width=32)),
        st.builds(np.array, st.floats(0, 10)),  # a float64 0-d lr promotes w_new
        hnp.arrays(dtype, st.just(shape), elements=float_elements(dtype)),
    ))
    # Python float steps only where Ivy's float32 rounding of them is exact (tested above);
    # 0-d float64 arrays carry arbitrary non-integer steps exactly.
    step = draw(st.one_of(
        st.sampled_from(STEPS[:-1]),
        st.integers(0, 2**31),
        st.builds(np.array, st.floats(0, 1e6, allow_nan=False)),
        st.integers(0, 2**20).map(lambda k: k / 8),
    ))
    hyper = {
        "beta1": draw(st.floats(0, 1, exclude_max=True)),
        "beta2": draw(st.floats(0, 1, exclude_max=True)),
        "epsilon": draw(st.one_of(st.just(1e-7), st.just(0.0), st.floats(0, 10))),
    }
    return arrays, lr, step, hyper


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(update_cases())
def test_property_matches_reference(case):
    arrays, lr, step, hyper = case
    args = (arrays["w"], arrays["dcdw"], lr, arrays["mw_tm1"], arrays["vw_tm1"], step)
    if not lr_is_valid(lr):
        with pytest.raises(ValueError, match=r"\blr\b"):
            adamgen.adam_update(*args, **hyper)
        return
    if divides_by_zero(step, hyper):
        with pytest.raises(ZeroDivisionError):
            adamgen.adam_update(*args, **hyper)
        return
    check_against_reference(*args, **hyper)


def lr_is_valid(lr) -> bool:
    """adamgen's rule (not Ivy's): every element of ``lr`` finite and >= 0."""
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.isfinite(lr)) and np.all(np.asarray(lr) >= 0))


def divides_by_zero(step, hyper) -> bool:
    """``1 - beta1**t + epsilon == 0``: step 0, or a tiny step against epsilon 0."""
    try:
        adam_prelude_ref(step, hyper["beta1"], hyper["beta2"], hyper["epsilon"])
    except ZeroDivisionError:
        return True
    return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(update_cases())
def test_property_out_is_w_in_place(case):
    arrays, lr, step, hyper = case
    w = arrays["w"]
    assume(not divides_by_zero(step, hyper) and lr_is_valid(lr))
    expected = adam_update_ref(w, arrays["dcdw"], lr, arrays["mw_tm1"], arrays["vw_tm1"], step,
                               **hyper)
    assume(expected[0].shape == w.shape and expected[0].dtype == w.dtype)
    snapshot = Snapshot(dcdw=arrays["dcdw"], mw_tm1=arrays["mw_tm1"], vw_tm1=arrays["vw_tm1"])
    result = adamgen.adam_update(w, arrays["dcdw"], lr, arrays["mw_tm1"], arrays["vw_tm1"], step,
                                 out=w, **hyper)
    snapshot.assert_unchanged()
    assert result[0] is w
    assert_all_bitwise_equal(result, expected)


@settings(max_examples=100, deadline=None)
@given(dtype=DTYPES, shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4),
       step=st.integers(1, 10**6), data=st.data())
def test_property_bad_out_shapes_and_bad_steps_write_nothing(dtype, shape, step, data):
    w = data.draw(hnp.arrays(dtype, shape, elements=float_elements(dtype)))
    out_shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
    assume(out_shape != shape)
    out = np.full(out_shape, 3, dtype)
    snapshot = Snapshot(out=out, w=w)
    with pytest.raises(ValueError, match="out"):
        adamgen.adam_update(w, w, 0.1, w, np.abs(w), step, out=out)
    with pytest.raises(ValueError, match="step"):
        adamgen.adam_update(w, w, 0.1, w, np.abs(w), -step, out=w)
    snapshot.assert_unchanged()


# -- optional differential test against Ivy ---------------------------------------------------

IVY_RUNNER = textwrap.dedent("""
    import logging, pickle, sys, warnings
    import numpy as np
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    import ivy
    ivy.set_backend("numpy")
    np.seterr(all="ignore")
    with open(sys.argv[1], "rb") as f:
        cases = pickle.load(f)
    results = []
    for args, kwargs in cases:
        try:
            r = ivy.adam_update(*args, **kwargs)
            results.append(tuple(np.asarray(ivy.to_numpy(x)) for x in r))
        except Exception as e:
            results.append(type(e).__name__ + ": " + str(e))
    with open(sys.argv[2], "wb") as f:
        pickle.dump(results, f)
""")


def ivy_interpreter() -> str | None:
    """``ADAMGEN_IVY_PYTHON`` if it names an interpreter with Ivy, else this one if it has Ivy."""
    configured = os.environ.get("ADAMGEN_IVY_PYTHON")
    if configured:
        try:
            probe = subprocess.run([configured, "-c", "import ivy"], capture_output=True,
                                   timeout=120, check=False, cwd=tempfile.gettempdir())
        except (OSError, subprocess.TimeoutExpired):
            return None
        return configured if probe.returncode == 0 else None
    import importlib.util

    return sys.executable if importlib.util.find_spec("ivy") is not None else None


def differential_cases() -> list[tuple[tuple, dict]]:
    """Valid calls (under adamgen's contract) covering the reference's space."""
    rng = np.random.default_rng(2024)
    cases: list[tuple[tuple, dict]] = []
    for dtype in FLOATS:
        for shape in ((), (0,), (7,), (3, 3)):
            w, g, m, v = random_state(shape, dtype, rng)
            for step in STEPS + (0.1, 1270.3, 16777217.0, 1e-40, np.array(3.4), np.float32(3.4),
                                 np.int64(9), np.float64(2.5)):
                for lr in (0.01, np.array(0.01, dtype), np.array(0.01)):
                    cases.append(((w, g, lr, m, v, step), {}))
            for hyper in HYPERPARAMETERS:
                cases.append(((w, g, 0.1, m, v, 3), hyper))
        with np.errstate(over="ignore"):
            values = np.array(SPECIALS).astype(dtype)
        grid = [x.ravel() for x in np.meshgrid(values, values, values, values, indexing="ij")]
        for step in (0, 1, 1270, 3.4):
            cases.append(((grid[0], grid[1], 0.1, grid[2], grid[3], step), {}))
        w, g, m, v = random_state((3, 3), dtype, rng)
        cases.append(((w, g, 0.1, m, v[:1, 0], 2), {}))
        cases.append(((w[0], g, np.abs(w[:, :1]), m[0], v, 2), {}))
        for lr in ([0.1, 0.2, 0.3], (0.5,), [1, 2, 3]):
            cases.append(((w, g, lr, m, v, 2), {}))
    for dtypes in MIXED:
        arrays = [rng.integers(0, 6, 5).astype(d) if np.dtype(d).kind in "iu"
                  else np.abs(rng.standard_normal(5)).astype(d) for d in dtypes]
        cases.append(((arrays[0], arrays[1], 0.1, arrays[2], arrays[3], 3), {}))
        cases.append(((arrays[0], arrays[1], np.array(0.1), arrays[2], arrays[3], 3), {}))
    for args in LIST_INPUTS.values():
        cases.append((tuple(args) + (2,), {}))
    cases.append((([1, 2, 3], [1, 2, 3], 0.1, [0, 0, 0], [0], 3), {"beta1": 0}))
    return cases


@pytest.fixture(scope="module")
def ivy_results(tmp_path_factory):
    python = ivy_interpreter()
    if python is None:
        pytest.skip("Ivy is not importable here; set ADAMGEN_IVY_PYTHON to an interpreter "
                    "with ivy installed (e.g. /tmp/ivyenv/bin/python) to run this test")
    directory = tmp_path_factory.mktemp("ivy")
    cases = differential_cases()
    (directory / "runner.py").write_text(IVY_RUNNER)
    with open(directory / "cases.pkl", "wb") as f:
        pickle.dump(cases, f)
    run = subprocess.run([python, str(directory / "runner.py"), str(directory / "cases.pkl"),
                          str(directory / "results.pkl")], capture_output=True, text=True,
                         timeout=600, check=False, cwd=directory)  # Ivy writes ivy_logs.txt
    assert run.returncode == 0, run.stderr[-3000:]
    with open(directory / "results.pkl", "rb") as f:
        return cases, pickle.load(f)


def _describe(args, kwargs) -> str:
    parts = [f"{type(a).__name__}{getattr(a, 'dtype', '')}{list(np.shape(a))}"
             if not isinstance(a, (int, float)) else repr(a) for a in args]
    return ", ".join(parts) + (f", {kwargs}" if kwargs else "")


def test_reference_matches_ivy_bit_for_bit(ivy_results):
    cases, results = ivy_results
    failures = []
    for (args, kwargs), ivy_result in zip(cases, results):
        assert not isinstance(ivy_result, str), (_describe(args, kwargs), ivy_result)
        try:
            assert_all_bitwise_equal(adam_update_ref(*args, **kwargs, ivy_step=True), ivy_result)
        except AssertionError as error:
            failures.append(f"{_describe(args, kwargs)}: {error}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures[:20])


def documented_deviation(args, kwargs) -> bool:
    """Calls where adamgen's contract deliberately differs from Ivy 1.0.0.5 (README): a step whose
    ``float(step)`` differs from Ivy's conversion, and integer hyperparameters."""
    step = args[5]
    ivy_t = ivy_step_scalar(step)
    return (type(ivy_t) is not int and (ivy_t != float(step) or type(ivy_t) is np.float64)) or \
        any(isinstance(v, int) for v in kwargs.values())


def test_adamgen_matches_ivy_bit_for_bit(ivy_results):
    cases, results = ivy_results
    failures = []
    compared = 0
    for (args, kwargs), ivy_result in zip(cases, results):
        if documented_deviation(args, kwargs):
            continue
        compared += 1
        try:
            assert_all_bitwise_equal(adamgen.adam_update(*args, **kwargs), ivy_result)
        except (AssertionError, ValueError, TypeError, ZeroDivisionError) as error:
            failures.append(f"{_describe(args, kwargs)}: {type(error).__name__}: {error}")
    assert not failures, f"{len(failures)} of {compared} cases:\n" + "\n".join(failures[:20])
    assert compared > 0.7 * len(cases)  # most cases are not deviations


def test_no_ivy_means_a_clean_skip_not_an_error(monkeypatch):
    monkeypatch.setenv("ADAMGEN_IVY_PYTHON", str(Path(sys.executable).parent / "no-such-python"))
    assert ivy_interpreter() is None
    monkeypatch.setenv("ADAMGEN_IVY_PYTHON", sys.executable)
    if subprocess.run([sys.executable, "-c", "import ivy"], capture_output=True, check=False,
                      cwd=tempfile.gettempdir()).returncode:
        assert ivy_interpreter() is None


def test_error_messages_are_readable():
    """Spot-check wording: argument, value, expectation."""
    w, g, m, v = float32_case()
    with pytest.raises(ValueError) as error:
        adamgen.adam_update(w, g, 0.1, m, v, 2, beta1=1.5)
    assert re.search(r"beta1.*1\.5", str(error.value))
    with pytest.raises(TypeError) as error:
        adamgen.adam_update(w, g.astype(np.complex64), 0.1, m, v, 2)
    assert "dcdw" in str(error.value) and "complex" in str(error.value)
