"""An independent reference for Ivy's ``adam_update`` on its numpy backend, in plain NumPy.

This module deliberately does not import :mod:`adamgen`: it is written from Ivy's formula
(``ivy/functional/ivy/gradients.py``: ``adam_step`` then ``optimizer_update``) and checked bit for
bit against Ivy 1.0.0.5 (see the test suite's optional differential test)::

    m = beta1*m + (1-beta1)*g;   v = beta2*v + (1-beta2)*g**2           # returned as mw, vw
    alpha = (1 - beta2**t) ** 0.5 / (1 - beta1**t + eps)    # Python floats, t = to_scalar(step)
    w_new = w - ((alpha*m) / (where(v >= 0, v, 0) ** 0.5 + eps)) * lr

How Ivy's numpy backend converts and promotes, and so how this reference does:

* ``w``, ``dcdw``, ``mw_tm1`` and ``vw_tm1`` are passed through ``ivy.array`` when they are not
  arrays: a Python float (or a list of them) becomes **float32**, a Python int (or a list of them)
  **int32**, an empty list float32. Plain NumPy would give float64 / int64.
* Hyperparameters and a Python-number ``lr`` are *weak* scalars: they take the array's dtype, except
  that a Python float against an integer array gives float64 (NumPy 2 does the same).
* An ``lr`` without a ``dtype`` attribute that is not a Python number (a list, a tuple, an object
  with ``__array__``) is converted **to the dtype of the effective gradient** (Ivy's
  ``promote_types_of_inputs`` does ``asarray(lr, dtype=other.dtype)``), not by ``ivy.asarray``'s
  own rules: ``lr=[0.1, 0.2, 0.3]`` with float64 arrays is the float64 0.1, not float32(0.1), and
  with float16 arrays the result stays float16.
* ``lr`` with a dtype (an ndarray, a 0-d array, a NumPy scalar) promotes normally: a float64 0-d
  ``lr`` with float32 arrays makes ``w_new`` float64 while ``mw`` and ``vw`` stay float32.
* Array/array promotion is NumPy's (Ivy's table equals ``np.result_type`` for every pair of bool,
  int, uint and float dtypes).
* ``step`` goes through ``ivy.to_scalar``, which first makes it an Ivy array: a Python int stays
  exact, but **a Python float is rounded to float32** (``3.4`` is used as ``3.4000000953674316``),
  and an ``np.float64`` step is kept as a NumPy float64, which makes ``alpha`` a strong float64
  scalar and ``w_new`` float64 (see :func:`ivy_step_scalar`). For a Python-float beta and an int
  step, ``beta ** step`` is bit-equal to ``beta ** float(step)``.
* ``ivy.array`` of a Python float that float32 cannot hold (``1e-40``, ``1e39``) gives float64, of
  an int above 2**31-1 int64; lists promote leaf by leaf in Ivy's non-precise mode
  (``[1, 2.5]`` is float32; see :func:`ivy_asarray_dtype`).
* ``maximum(v, 0.0)`` is ``where(v >= 0, v, 0)``: NaN becomes 0 before the square root.
* ``x ** 2`` and ``x ** 0.5`` on arrays: Ivy calls ``np.power(x, asarray(2 or 0.5, x.dtype))``,
  which is bit-equal to NumPy's ``x ** 2`` / ``x ** 0.5`` fast paths (``square`` / ``sqrt``)
  for every value the update can reach (checked exhaustively for float16). The one exception,
  float16 ``power(-0.0, 0.5) = +0`` against ``sqrt(-0.0) = -0`` (float16 ``power`` goes through
  ``powf``; float32/64 ``power`` by 0.5 is ``sqrt``), is unreachable: a new ``v`` is never -0.0.

Inputs Ivy itself rejects or mangles (objects with ``__array__`` or ``__dlpack__`` as ``w``...) are
converted here with ``np.asarray`` / ``np.from_dlpack``, keeping their dtype: that is adamgen's
contract, not Ivy's (Ivy raises on them).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "adam_prelude_ref",
    "adam_update_ref",
    "as_ivy_array",
    "ivy_asarray_dtype",
    "ivy_step_scalar",
]


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        out: list[Any] = []
        for item in obj:
            out.extend(_leaves(item))
        return out
    return [obj]


def _needs_float64(x: float) -> bool:
    """Ivy's ``_check_float64``: a Python float that float32 cannot hold (too big or too small)."""
    if not math.isfinite(x):
        return False
    _, exponent = math.frexp(x)
    return abs(x) > 3.4028235e38 or exponent < -126 or exponent > 128


def _leaf_dtype(x: Any) -> np.dtype:
    """The dtype ``ivy.default_dtype(item=x)`` gives one leaf of a (nested) sequence."""
    if isinstance(x, (np.ndarray, np.generic)):
        return x.dtype
    if isinstance(x, bool):
        return np.dtype(np.bool_)
    if isinstance(x, int):
        if x > 9223372036854775807:
            return np.dtype(np.uint64)
        if x > 2147483647:
            return np.dtype(np.int64)
        return np.dtype(np.int32)  # a very negative int overflows int32, as in Ivy
    if isinstance(x, float):
        return np.dtype(np.float64 if _needs_float64(x) else np.float32)
    if isinstance(x, complex):
        return np.dtype(np.complex64)
    return np.asarray(x).dtype


def ivy_asarray_dtype(obj: Any) -> np.dtype:
    """The dtype ``ivy.array(obj)`` picks on the numpy backend for a scalar or a nested sequence.

    Each leaf gets its default dtype (float32 / int32, float64 / int64 / uint64 when the value does
    not fit), then the leaves promote in Ivy's non-precise mode: any float leaf wins over every
    integer (``[1, 2.5]`` is float32, ``[2**40, 0.5]`` float32), the widest float wins among floats,
    integers promote as NumPy does (uint64 with a signed int gives float64). No leaf: float32.
    """
    dtypes = {_leaf_dtype(leaf) for leaf in _leaves(obj)}
    if not dtypes:
        return np.dtype(np.float32)
    complexes = [d for d in dtypes if d.kind == "c"]
    if complexes:
        return max(complexes, key=lambda d: d.itemsize)
    floats = [d for d in dtypes if d.kind == "f"]
    if floats:
        return max(floats, key=lambda d: d.itemsize)
    return np.result_type(*dtypes)


def as_ivy_array(x: Any) -> np.ndarray:
    """Convert an array argument (w, dcdw, mw_tm1, vw_tm1) the way ``ivy.array`` does on numpy.

    NumPy arrays and NumPy scalars keep their dtype. Python scalars and (nested) lists or tuples
    get :func:`ivy_asarray_dtype`. Objects with ``__array__`` or only ``__dlpack__`` (which Ivy
    itself rejects) keep their own dtype.
    """
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, np.generic):
        return np.asarray(x)
    if isinstance(x, (bool, int, float, complex, list, tuple)):
        return np.asarray(x, dtype=ivy_asarray_dtype(x))
    if hasattr(x, "__array__"):
        return np.asarray(x)
    if hasattr(x, "__dlpack__"):
        return np.from_dlpack(x)
    return np.asarray(x)


def _lr_operand(lr: Any, like: np.ndarray) -> Any:
    """``lr`` as ``effective_grad * lr`` sees it in Ivy (see the module docstring)."""
    if isinstance(lr, (bool, int, float)) or hasattr(lr, "dtype"):
        return lr  # a weak Python scalar, or a typed NumPy array / NumPy scalar
    if not hasattr(lr, "__array__") and hasattr(lr, "__dlpack__"):
        return np.from_dlpack(lr)  # Ivy rejects these; keep their dtype
    return np.asarray(lr, dtype=like.dtype)


def ivy_step_scalar(step: Any) -> Any:
    """``ivy.to_scalar(step)`` on the numpy backend: the ``t`` of ``beta ** t``.

    * a Python int stays exact (it becomes an int32 / int64 array, then ``.item()``);
    * a **Python float is rounded to float32** (``ivy.array(3.4)`` is float32): ``3.4`` becomes
      ``3.4000000953674316`` and ``16777217.0`` becomes ``16777216.0``; only a value float32
      cannot hold (``1e-40``, ``1e39``) stays float64;
    * an ndarray or a NumPy scalar gives ``.item()``, except ``np.float64``, a subclass of
      ``float``, which is returned as is: ``beta ** t`` and so ``alpha`` are then NumPy float64
      scalars, not weak Python floats, and the effective gradient and ``w_new`` become float64.
    """
    if isinstance(step, (np.ndarray, np.generic)):
        if isinstance(step, (float, int)):
            return step
        return step.item()
    return as_ivy_array(step).item()


def contract_step_scalar(step: Any) -> float:
    """adamgen's contract: ``t = float(step)`` (DEVELOPERS brief).

    Ivy 1.0.0.5 deviates for two inputs (see :func:`ivy_step_scalar`): it rounds a Python-float
    step through float32 and keeps an ``np.float64`` step as a strong NumPy scalar. adamgen follows
    its contract there, and the README lists the difference.
    """
    return float(step)


def adam_prelude_ref(step: Any, beta1: float, beta2: float, epsilon: float, *,
                     ivy_step: bool = False) -> float:
    """The scalar ``alpha``, computed with Python numbers exactly as Ivy does.

    Raises ``ZeroDivisionError`` when ``1 - beta1**t + epsilon == 0`` (``step == 0`` and
    ``epsilon == 0``), as Ivy does. ``ivy_step=True`` converts ``step`` as Ivy 1.0.0.5 really does
    (for the differential test against Ivy); the default is adamgen's ``float(step)``.
    """
    t = ivy_step_scalar(step) if ivy_step else contract_step_scalar(step)
    beta1_pow = beta1 ** t
    beta2_pow = beta2 ** t
    return (1 - beta2_pow) ** 0.5 / (1 - beta1_pow + epsilon)


def adam_update_ref(w: Any, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any, /, *,
                    beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-07,
                    ivy_step: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ivy's ``adam_update`` (numpy backend) without ``out``: returns fresh ``(w_new, mw, vw)``.

    Inputs are never modified. NumPy floating-point warnings are silenced (Ivy's numpy backend lets
    them through; they change no bit).
    """
    w = as_ivy_array(w)
    g = as_ivy_array(dcdw)
    m = as_ivy_array(mw_tm1)
    v = as_ivy_array(vw_tm1)
    alpha = adam_prelude_ref(step, beta1, beta2, epsilon, ivy_step=ivy_step)
    with np.errstate(all="ignore"):
        # adam_step
        m_new = beta1 * m + (1 - beta1) * g
        g_sq = g ** 2
        v_new = beta2 * v + (1 - beta2) * g_sq
        v_sqrt = np.where(v_new >= 0, v_new, 0) ** 0.5
        effective_grad = (alpha * m_new) / (v_sqrt + epsilon)
        # optimizer_update
        effective_grad = np.asarray(effective_grad)
        deltas = effective_grad * _lr_operand(lr, effective_grad)
        w_new = w - deltas
    return np.asarray(w_new), np.asarray(m_new), np.asarray(v_new)
