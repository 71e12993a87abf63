"""Argument conversion and validation for the public API: every check before any write.

The rules follow Ivy's ``adam_update`` on its NumPy backend, with errors where Ivy is silent or
computes garbage. Each error names the argument, what it got and what was expected.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any

import numpy as np

from ..errors import ArgumentTypeError, ArgumentValueError
from ..interface import Range, shown

#: NumPy dtype kinds an update can compute with: floating, signed and unsigned integers.
_NUMERIC_KINDS = "fiu"
_KIND_NAMES = {"b": "bool", "c": "complex", "O": "object", "U": "string", "S": "bytes",
               "V": "structured", "M": "datetime", "m": "timedelta"}


_INT32 = (-(2**31), 2**31 - 1)


def _fits_float32(value: float) -> bool:
    """Ivy's rule: a Python float float32 cannot hold (too large, or below float32's normal
    range) makes an array float64."""
    if not math.isfinite(value) or value == 0.0:
        return True
    exponent = math.frexp(value)[1]
    return abs(value) <= 3.4028234663852886e38 and -126 <= exponent <= 128


def _python_leaves(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _python_leaves(item)]
    return [value]


def ivy_default_dtype(value: Any) -> np.dtype:
    """The dtype ``ivy.array`` gives a Python scalar or (nested) list, on Ivy's NumPy backend.

    Each leaf takes float32 / int32 (float64 / int64 where the value does not fit), NumPy scalars
    their own dtype; any float leaf wins over integers and the widest float wins; no leaf gives
    float32.
    """
    dtypes = set()
    for leaf in _python_leaves(value):
        if isinstance(leaf, (np.generic, np.ndarray)):
            dtypes.add(leaf.dtype)
        elif isinstance(leaf, bool):
            dtypes.add(np.dtype(np.bool_))
        elif isinstance(leaf, int):
            fits = _INT32[0] <= leaf <= _INT32[1]
            dtypes.add(np.dtype(np.int32 if fits else np.int64))
        elif isinstance(leaf, float):
            dtypes.add(np.dtype(np.float32 if _fits_float32(leaf) else np.float64))
        else:
            dtypes.add(np.asarray(leaf).dtype)
    if not dtypes:
        return np.dtype(np.float32)
    floats = [d for d in dtypes if d.kind in "fc"]
    if floats:
        return max(floats, key=lambda d: d.itemsize)
    return np.result_type(*dtypes)


def as_tensor(name: str, value: Any, *, weak_scalars: bool = False) -> Any:
    """Convert one tensor argument as ``ivy.asarray`` would.

    Python scalars stay Python scalars when ``weak_scalars`` (``lr``): NumPy then rounds them to
    the arrays' dtype, as Ivy does. Lists, tuples and other Python scalars take
    :func:`ivy_default_dtype` (Python floats become float32). NumPy scalars become 0-d arrays
    (they are not weak). ``__array__`` and ``__dlpack__`` objects are read without copying where
    NumPy can.
    """
    if isinstance(value, np.ndarray):
        array = value
    elif weak_scalars and (type(value) is float or type(value) is int):
        if type(value) is int:
            _as_real(name, value)  # it becomes a float later: an int beyond range is named here
        return value
    elif isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} is a bool; expected a real number or a real array")
    elif isinstance(value, numbers.Real) and not isinstance(value, np.generic):
        if weak_scalars:
            _as_real(name, value)
            return value
        array = _as_integers_or_floats(name, value)
    elif isinstance(value, (list, tuple)):
        try:
            array = _as_integers_or_floats(name, value)
        except (ValueError, TypeError) as error:
            if isinstance(error, ArgumentValueError):
                raise
            raise ArgumentValueError(f"{name} is not a rectangular sequence of numbers: "
                                     f"{error}") from None
    elif isinstance(value, np.generic) or hasattr(value, "__array__"):
        array = np.asarray(value)
    elif hasattr(value, "__dlpack__"):
        try:
            array = np.from_dlpack(value)
        except Exception as error:  # noqa: BLE001 (foreign objects raise anything)
            raise ArgumentTypeError(f"{name} has __dlpack__ but NumPy cannot read it: "
                                    f"{error}") from None
    else:
        raise ArgumentTypeError(f"{name} is a {type(value).__name__}; expected an array, an "
                                "array-like or a real number")
    kind = array.dtype.kind
    if kind not in _NUMERIC_KINDS:
        raise ArgumentTypeError(
            f"{name} has dtype {array.dtype} ({_KIND_NAMES.get(kind, kind)}); expected a real "
            "floating-point or integer dtype")
    return array


def as_hyperparameter(name: str, value: Any, low: float, high: float | None) -> float:
    """A hyperparameter as a Python float, checked as ``torch.optim.Adam`` checks it."""
    number = _as_real(name, value)
    in_range = low <= number and (high is None or number < high)
    if not in_range:
        expected = f"{low} <= {name} < {high}" if high is not None else f"{name} >= {low}"
        raise ArgumentValueError(f"{name} must satisfy {expected}, got {value!r}")
    return number


def as_step(value: Any) -> float:
    """``float(step)``, as Ivy computes it; negative, NaN and infinite steps are errors."""
    number = _as_real("step", value)
    if not math.isfinite(number) or number < 0:
        raise ArgumentValueError(f"step must be a finite number >= 0, got {value!r}")
    return number


def _as_real(name: str, value: Any) -> float:
    if type(value) is float:  # the common case, without ABC checks
        return value
    try:
        return _to_float(name, value)
    except OverflowError:  # an int beyond float range: a bare OverflowError names nothing
        raise ArgumentValueError(f"{name}={shown(value)} is beyond the range of a float "
                                 "(largest: 1.8e308)") from None


def _to_float(name: str, value: Any) -> float:
    if type(value) is int:
        return float(value)
    if isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} is a bool; expected a real number")
    if isinstance(value, np.ndarray):
        if value.ndim != 0:
            raise ArgumentValueError(f"{name} must be a scalar, got an array of shape "
                                     f"{value.shape}")
        if value.dtype.kind not in _NUMERIC_KINDS:
            raise ArgumentTypeError(f"{name} has dtype {value.dtype}; expected a real number")
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise ArgumentTypeError(f"{name} is a {type(value).__name__}; expected a real number")


def as_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def broadcast_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The common shape of the named arguments, or a ValueError naming them and their shapes."""
    distinct = set(shapes.values())
    if len(distinct) == 1:
        return distinct.pop()
    try:
        return tuple(np.broadcast_shapes(*shapes.values()))
    except ValueError:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ArgumentValueError(f"shapes do not broadcast together: {listed}") from None


def check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype, output: str) -> np.ndarray:
    """``out`` must be a writable array of the shape of ``output`` (the result it receives),
    that its dtype casts to."""
    if not isinstance(out, np.ndarray):
        raise ArgumentTypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != shape:
        raise ArgumentValueError(f"out has shape {out.shape}; expected {shape}, the shape of "
                                 f"{output}")
    if not np.can_cast(dtype, out.dtype, casting="same_kind"):
        raise ArgumentTypeError(f"out has dtype {out.dtype}; {output} is {dtype}, which cannot "
                                "be cast to it with same_kind casting")
    if not out.flags.writeable:
        raise ArgumentValueError("out is read-only")
    return out


# --- learning rates and large Python integers (the lr rule; D8: integers beyond float64) ----------

def _as_integers_or_floats(name: str, value: Any) -> np.ndarray:
    """``np.asarray`` with Ivy's default dtype, where an integer beyond int64 is a named error
    rather than NumPy's bare ``OverflowError: Python int too large to convert to C long``."""
    try:
        return np.asarray(value, dtype=ivy_default_dtype(value))
    except OverflowError:
        big = max((leaf for leaf in _python_leaves(value) if type(leaf) is int), key=abs,
                  default=value)
        raise ArgumentValueError(
            f"{name} holds the integer {shown(big)}, beyond the range of int64 (Ivy makes "
            "Python ints int32, or int64 where they do not fit); pass floats") from None


def as_learning_rate(name: str, value: Any) -> float:
    """A learning rate as a Python float: a real number, finite and >= 0.

    torch.optim rejects a negative or NaN lr and accepts inf; adamgen rejects inf too, its own
    choice: an infinite step turns every parameter into inf or NaN at the first step, so the
    run is lost either way, and an error naming the value is the cheaper way to learn it.
    Strings are rejected (``Adam(p, lr="0.1")``), not parsed: a config file read as text would
    otherwise fail only at the first step, or never. Arrays of learning rates are checked
    with :func:`check_lr`.
    """
    number = _as_real(name, value)
    if not 0.0 <= number < math.inf:  # False for NaN too
        raise ArgumentValueError(f"{name} must be a finite number >= 0, got {shown(value)}")
    return number


#: The largest finite double: ``0 <= lr <= _MAX_FINITE`` is False for NaN and for inf.
_MAX_FINITE = sys.float_info.max


def check_lr(value: Any, name: str = "lr") -> Any:
    """``value`` itself when it is a learning rate adamgen accepts: finite and ``>= 0``.

    torch rejects a negative or NaN ``lr`` and accepts inf; adamgen rejects inf too, because an
    infinite step size turns every weight into inf or NaN on the first step, which is never what
    a caller meant (README: where adamgen deliberately differs). ``-0.0`` is accepted (it is
    ``>= 0``).

    ``value`` is what the update uses: a Python number (checked as given), or an array of any
    shape (every element is checked, in place: never copied, see :func:`_check_lr_array`).
    """
    if isinstance(value, np.ndarray):
        _check_lr_array(value, name)
        return value
    as_learning_rate(name, value)
    return value


#: For an IEEE float of each size: the bit patterns, read as unsigned integers, below this are
#: exactly the finite values >= +0.0 (sign bit clear, exponent not all ones).
_FIRST_NON_FINITE = {2: 0x7C00, 4: 0x7F80_0000, 8: 0x7FF0_0000_0000_0000}


def _check_lr_array(array: np.ndarray, name: str) -> None:
    """Every element finite and ``>= 0``, read in place.

    The common case costs one integer ``max`` over the float's bits viewed as unsigned integers
    (a view, not a copy): below :data:`_FIRST_NON_FINITE` is exactly "finite and >= +0.0".
    ``np.isfinite(lr).all()`` would allocate a boolean array of ``lr``'s size, and ``min`` plus
    ``max`` read it twice (docs/performance.md has the figures at 1e6 elements). Only when
    that test fails (a bad value, or a ``-0.0``, which is allowed) are ``min`` and ``max`` taken
    to tell which.
    """
    if type(array) is not np.ndarray:
        array = np.asarray(array)  # a view: a subclass's own min/max (masked) do not count
    kind, size = array.dtype.kind, array.dtype.itemsize
    if array.size == 0 or kind == "u":
        return  # nothing to check: no elements, or unsigned integers (finite and >= 0)
    if kind == "f" and size in _FIRST_NON_FINITE and array.dtype.isnative \
            and array.view(f"u{size}").max() < _FIRST_NON_FINITE[size]:
        return
    with np.errstate(invalid="ignore"):  # NaN in a reduction is the finding, not a warning
        low = float(array.min())
        high = float(array.max()) if kind == "f" else 0.0
    if math.isnan(low):  # min propagates NaN
        problem = "holds NaN"
    elif low < 0:
        problem = f"holds a negative value (its minimum is {low!r})"
    elif high > _MAX_FINITE:
        problem = "holds inf"
    else:
        return  # finite and >= 0 (a -0.0 made the quick test fail)
    raise ArgumentValueError(f"{name} must be finite and >= 0 everywhere, but it {problem}")


def check_range(value: Any, valid: Range, name: str) -> Any:
    """``value`` itself when every value it holds is in ``valid`` (a tensor the rule lets be a
    scalar, such as Ivy's ``lr``): a Python number is checked as given, an array element by
    element without copying it (the lr rule's range takes :func:`check_lr`'s quick path)."""
    if valid == _LR_RANGE:
        return check_lr(value, name)
    if not isinstance(value, np.ndarray):
        valid.check(name, value)
        return value
    if value.size and value.dtype.kind != "u":
        with np.errstate(invalid="ignore"):
            low, high = float(value.min()), float(value.max())
        for bound in (low, high):
            if not valid.contains(bound):
                raise ArgumentValueError(f"{name} must hold values that "
                                         f"{valid.describe(name).replace('be ', 'are ', 1)}; "
                                         f"it holds {bound!r} (shape {value.shape}, dtype "
                                         f"{value.dtype})")
    return value


#: The lr rule (finite and >= 0), as a rule's interface declares it.
_LR_RANGE = Range(low=0.0, finite=True)
