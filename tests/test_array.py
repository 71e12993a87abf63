"""``adamgen.runtime.array``: Ivy's dtype defaults, Ivy's printing, and the method's forwarding."""

from __future__ import annotations

import numpy as np
import pytest

from adamgen.runtime.array import Array, array

# -- dtype defaults -------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "dtype"), [
    (1.5, np.float32), ([1.0, 2.0], np.float32), ((1.0, 2), np.float32), ([[1, 2.5]], np.float32),
    (3, np.int64), ([1, 2], np.int64), (True, np.bool_), ([True, False], np.bool_),
    ([True, 2], np.int64), (1 + 2j, np.complex64), ([], np.float32),
])
def test_python_values_take_ivy_defaults(value: object, dtype: type) -> None:
    result = array(value)
    assert type(result) is Array
    assert result.dtype == dtype
    np.testing.assert_array_equal(result, np.array(value, dtype=dtype))


def test_python_float_rounds_once_to_float32() -> None:
    assert array(0.1)[()] == np.float32(0.1)
    assert array(0.1).shape == ()


def test_explicit_dtype_wins() -> None:
    assert array([1.0, 2.0], dtype=np.float64).dtype == np.float64
    assert array(1, dtype="float16").dtype == np.float16
    assert array(np.arange(3, dtype=np.float64), dtype=np.float32).dtype == np.float32


def test_typed_values_keep_their_dtype() -> None:
    assert array(np.float64(1.0)).dtype == np.float64
    assert array([np.float64(1.0), np.float64(2.0)]).dtype == np.float64
    assert array([np.arange(2, dtype=np.float16)]).dtype == np.float16


def test_ndarray_is_viewed_not_copied() -> None:
    base = np.arange(4, dtype=np.float64)
    result = array(base)
    assert type(result) is Array and result.dtype == np.float64
    assert np.shares_memory(result, base)
    result[0] = 7.0
    assert base[0] == 7.0
    assert not np.shares_memory(array(base, dtype=np.float32), base)


def test_lists_are_copied() -> None:
    values = [1.0, 2.0]
    result = array(values)
    result[0] = 5.0
    assert values == [1.0, 2.0]


def test_array_protocol_object() -> None:
    class Wrapped:
        def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
            return np.array([1.0, 2.0], dtype=np.float64)

    result = array(Wrapped())
    assert type(result) is Array and result.dtype == np.float64
    assert array(Wrapped(), dtype=np.float32).dtype == np.float32


class DLPackOnly:
    """Exposes an ndarray through DLPack alone (as a tensor of another library would)."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data

    def __dlpack__(self, **kwargs: object) -> object:
        return self._data.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._data.__dlpack_device__()


def test_dlpack_object() -> None:
    base = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    wrapped = DLPackOnly(base)
    assert not hasattr(wrapped, "__array__")
    result = array(wrapped)
    assert type(result) is Array and result.dtype == np.float32
    assert np.shares_memory(result, base)
    converted = array(DLPackOnly(base), dtype=np.float64)
    assert converted.dtype == np.float64
    np.testing.assert_array_equal(converted, base)


# -- the subclass ---------------------------------------------------------------------------

def test_ufuncs_views_and_reductions_stay_arrays() -> None:
    a = array([1.0, 4.0, 9.0])
    assert type(a + 1) is Array
    assert type(np.sqrt(a)) is Array
    assert type(a[1:]) is Array
    assert type(a.sum()) is Array
    assert type(np.arange(3.0).view(Array)) is Array


# -- printing -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "adamgen.array([0.90000075, 1.90000164, 2.9000032 ])",
    "adamgen.array([0.05, 0.02, 0.01])",
    "adamgen.array([2.50000012e-04, 4.00000063e-05, 1.00000016e-05])",
    "adamgen.array([0.01024, 0.01003, 0.01015])",
    "adamgen.array([0.99936122, 1.99936116, 2.99936128])",
    "adamgen.array([0.1 , 0.02, 0.04])",
    "adamgen.array([1., 2., 3.])",
])
def test_repr_reproduces_the_seed_digits(text: str) -> None:
    # float32 arrays made from the seed's printed digits print those digits back, as Ivy does.
    values = eval(text.removeprefix("adamgen.array(").removesuffix(")"))
    assert repr(array(values)) == text
    assert str(array(values)) == text


def test_multi_line_repr_aligns_under_the_bracket() -> None:
    w = array([[0.92558873, 1.92558754, 2.92558718],
               [3.92558694, 1.92558682, 3.92558861],
               [5.92558861, 3.92558694, 1.92558718]])
    assert repr(w) == ("adamgen.array([[0.92558873, 1.92558754, 2.92558718],\n"
                       "               [3.92558694, 1.92558682, 3.92558861],\n"
                       "               [5.92558861, 3.92558694, 1.92558718]])")


def test_repr_of_scalars_ints_and_special_values() -> None:
    assert repr(array(0.1)) == "adamgen.array(0.1)"
    assert repr(array([1, 2])) == "adamgen.array([1, 2])"
    assert repr(array([True])) == "adamgen.array([ True])"
    assert repr(array([])) == "adamgen.array([])"
    special = np.array([np.inf, -np.inf, np.nan, 0.0], dtype=np.float32)
    assert repr(array(special)) == f"adamgen.array({np.array2string(special, separator=', ')})"
    subnormal = array([5e-324], dtype=np.float64)  # the rounding scale overflows: kept as it is
    assert repr(subnormal) == "adamgen.array([5.e-324])"


def test_repr_of_large_arrays_is_summarised() -> None:
    text = repr(array(np.zeros(5000, dtype=np.float32)))
    assert text.startswith("adamgen.array([0., 0., 0., ..., 0., 0., 0.]")


# -- the method -----------------------------------------------------------------------------

def test_adam_update_method_forwards_self_as_w(recorded_calls: list) -> None:
    w = array([1.0, 2.0, 3.0])
    result = w.adam_update("dcdw", "lr", "mw", "vw", 2)
    assert result == "result"
    (args, kwargs), = recorded_calls
    assert args[0] is w and args[1:] == ("dcdw", "lr", "mw", "vw", 2)
    assert kwargs == {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-07,
                      "stop_gradients": True, "out": None}


def test_adam_update_method_forwards_keywords(recorded_calls: list) -> None:
    w, out = array([1.0]), array([0.0])
    w.adam_update(1, 2, 3, 4, 5, beta1=0.5, beta2=0.25, epsilon=0.0, stop_gradients=False,
                  out=out)
    (_, kwargs), = recorded_calls
    assert kwargs == {"beta1": 0.5, "beta2": 0.25, "epsilon": 0.0,
                      "stop_gradients": False, "out": out}
    with pytest.raises(TypeError):
        w.adam_update(1, 2, 3, 4, 5, 0.5)  # type: ignore[misc]  # beta1 is keyword-only
