"""``adamgen.Array`` and ``adamgen.array``: Ivy's array type, as a thin NumPy subclass.

Why a subclass and not a wrapper: every NumPy function, every ufunc and the generated kernels
take an ``Array`` as it is, with no unwrapping on the hot path, and NumPy keeps the subclass
through ufuncs, slicing and reductions. The class adds only what Ivy's ``ivy.Array`` has and
NumPy lacks: the ``.adam_update`` method, Ivy's printing, and Ivy's dtype defaults in
:func:`array` (a Python float makes a float32 array, where NumPy would make float64).

This module is part of the runtime: it imports NumPy, the standard library, and the Ivy
bindings its method calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import ivy

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

__all__ = ["Array", "array"]

_PREFIX = "adamgen.array("

# Ivy prints float arrays rounded to this many significant figures (ivy.array_significant_figures)
# and then with NumPy's print options; doing the same reproduces Ivy's printed digits exactly.
_SIGNIFICANT_FIGURES = 10


class Array(np.ndarray):
    """An ndarray with Ivy's ``.adam_update`` method and Ivy's printing.

    An ``Array`` carries no state beyond the ndarray's, so it needs no ``__array_finalize__``:
    NumPy already returns the subclass from ufuncs, views and reductions on ``Array`` inputs.
    Make one with :func:`array` or ``ndarray.view(Array)`` (no copy).
    """

    def __repr__(self) -> str:
        """Print as Ivy does: ``adamgen.array([0.90000075, 1.90000164, 2.9000032 ])``.

        Continuation lines of a multi-dimensional array align under the opening bracket, and no
        dtype is shown (Ivy shows none either).
        """
        body = np.array2string(_ivy_printable(np.asarray(self)), separator=", ",
                               prefix=_PREFIX, suffix=")")
        return f"{_PREFIX}{body})"

    __str__ = __repr__

    def adam_update(self, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any, /, *,
                    beta1: Any = ivy.BETA1, beta2: Any = ivy.BETA2, epsilon: Any = ivy.EPSILON,
                    stop_gradients: Any = True, out: Any = None) -> Any:
        """Ivy's ``Array.adam_update``: :func:`adamgen.adam_update` with ``self`` as ``w``.

        Returns ``(w_new, mw, vw)`` exactly as the function does; see it for the arguments.
        """
        return ivy.adam_update(self, dcdw, lr, mw_tm1, vw_tm1, step, beta1=beta1, beta2=beta2,
                                epsilon=epsilon, stop_gradients=stop_gradients, out=out)


def _ivy_printable(a: np.ndarray) -> np.ndarray:
    """The values Ivy would print for ``a``: real floats in double, to 10 significant figures.

    Ivy rounds to significant figures in double precision before printing, which is why its
    float32 results show 8 decimals (``2.50000012e-04``) where NumPy's own float32 repr shows
    the shortest round-tripping digits (``2.5000001e-04``). Arrays NumPy will summarise (more
    elements than the ``threshold`` print option) are printed as they are, to avoid a
    full-size double copy just to print a few corners.
    """
    if a.dtype.kind != "f" or a.size == 0 or a.size > np.get_printoptions()["threshold"]:
        return a
    x = a.astype(np.float64)
    with np.errstate(all="ignore"):
        finite = np.isfinite(x) & (x != 0)
        magnitude = np.floor(np.log10(np.where(finite, np.abs(x), 1.0)))
        scale = 10.0 ** (_SIGNIFICANT_FIGURES - 1 - magnitude)
        rounded = np.round(x * scale) / scale
    # Subnormals overflow the scale; keep those (and inf, nan, 0) as they are.
    return np.where(finite & np.isfinite(rounded), rounded, x)


# Python scalar types from weakest to strongest, and the dtype Ivy gives each by default.
_PY_KINDS = (bool, int, float, complex)
_PY_DEFAULTS = (np.dtype(np.bool_), np.dtype(np.int64), np.dtype(np.float32),
                np.dtype(np.complex64))


def _python_default_dtype(x: object) -> np.dtype | None:
    """Ivy's default dtype for ``x`` made of Python scalars only, else ``None`` (let NumPy infer).

    Python scalars carry no precision, so Ivy gives them its defaults: float32 for floats,
    int64 for ints, complex64 for complex numbers, bool for bools; a nest mixing kinds takes the
    strongest (``[1, 2.5]`` is float32), and an empty list is float32 like any float default.
    Anything typed inside (a NumPy scalar or array, an object with ``__array__``) or anything
    not numeric returns ``None``: then the data's own dtypes decide, as in NumPy.
    """
    ranks = set()
    stack = [x]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif type(item) in _PY_KINDS:  # exact types: np.float64 and np.bool_ are excluded
            ranks.add(_PY_KINDS.index(type(item)))
        else:
            return None
    return _PY_DEFAULTS[max(ranks, default=_PY_KINDS.index(float))]


def array(x: object, dtype: DTypeLike | None = None) -> Array:
    """Make an :class:`Array` from ``x``, with Ivy's dtype defaults (``ivy.array``).

    Args:
        x: a Python scalar or a (nested) list or tuple, an ndarray, an object with
            ``__array__``, or an object with ``__dlpack__`` (read with ``np.from_dlpack``).
        dtype: the dtype of the result; when given it always wins.

    Without ``dtype``, Python floats (alone or in lists and tuples) make float32, Python ints
    int64, bools bool and complex numbers complex64; ndarrays and other typed data keep their
    dtype.

    Copying: lists, tuples and scalars are always copied into a new array. An ndarray, an
    ``__array__`` object or a ``__dlpack__`` object whose dtype already matches is **not**
    copied: the result is an ``Array`` view of the same memory, so ``out=`` writes into it reach
    the original buffer. A ``dtype`` that differs from the data's makes a converted copy.
    """
    if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
        data = np.asarray(x, dtype=dtype)
    elif hasattr(x, "__dlpack__"):
        data = np.from_dlpack(x)
        if dtype is not None:
            data = data.astype(dtype, copy=False)
    else:
        if dtype is None:
            dtype = _python_default_dtype(x)
        data = np.array(x, dtype=dtype)
    return data.view(Array)
