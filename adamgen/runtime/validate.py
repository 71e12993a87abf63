"""Argument conversion and validation for the public API: every check before any write.

The rules follow Ivy's ``adam_update`` on its NumPy backend, with errors where Ivy is silent or
computes garbage. Each error names the argument, what it got and what was expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ..errors import ArgumentTypeError, ArgumentValueError

#: NumPy dtype kinds an update can compute with: floating, signed and unsigned integers.
_NUMERIC_KINDS = "fiu"
_KIND_NAMES = {"b": "bool", "c": "complex", "O": "object", "U": "string", "S": "bytes",
               "V": "structured", "M": "datetime", "m": "timedelta"}


def _contains_python_float(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_contains_python_float(v) for v in value)
    return isinstance(value, float) and not isinstance(value, np.floating)


def as_tensor(name: str, value: Any, *, weak_scalars: bool = False) -> Any:
    """Convert one tensor argument as ``ivy.asarray`` would.

    Python scalars stay Python scalars when ``weak_scalars`` (``lr``): NumPy then rounds them to
    the arrays' dtype, as Ivy does. Lists and tuples become arrays, Python floats as float32.
    NumPy scalars become 0-d arrays (they are not weak). ``__array__`` and ``__dlpack__``
    objects are read without copying where NumPy can.
    """
    if isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} is a bool; expected a real number or a real array")
    elif isinstance(value, numbers.Real) and not isinstance(value, np.generic):
        if weak_scalars:
            return value
        array = np.asarray(value, dtype=np.float32 if isinstance(value, float) else None)
    elif isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except ValueError as error:
            raise ArgumentValueError(f"{name} is a ragged sequence: {error}") from None
        if array.dtype == np.float64 and _contains_python_float(value):
            array = array.astype(np.float32)
    elif isinstance(value, np.generic) or hasattr(value, "__array__"):
        array = np.asarray(value)
    elif hasattr(value, "__dlpack__"):
        try:
            array = np.from_dlpack(value)
        except Exception as error:
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
    try:
        return tuple(np.broadcast_shapes(*shapes.values()))
    except ValueError:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ArgumentValueError(f"shapes do not broadcast together: {listed}") from None


def check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``out`` must be a writable array of the result's shape that ``dtype`` casts to."""
    if not isinstance(out, np.ndarray):
        raise ArgumentTypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != shape:
        raise ArgumentValueError(f"out has shape {out.shape}; expected {shape}, the shape of "
                                 "w_new")
    if not np.can_cast(dtype, out.dtype, casting="same_kind"):
        raise ArgumentTypeError(f"out has dtype {out.dtype}; w_new is {dtype}, which cannot be "
                                "cast to it with same_kind casting")
    if not out.flags.writeable:
        raise ArgumentValueError("out is read-only")
    return out
