"""An independent reference for Ivy's ``adam_update`` on its numpy backend, in plain NumPy.

This module deliberately does not import :mod:`adamgen`: it is written from Ivy's formula
(``ivy/functional/ivy/gradients.py``: ``adam_step`` then ``optimizer_update``) and checked bit for
bit against Ivy 1.0.0.5 (see the test suite's optional differential test)::

    m = beta1*m + (1-beta1)*g;   v = beta2*v + (1-beta2)*g**2           # returned as mw, vw
    alpha = (1 - beta2**t) ** 0.5 / (1 - beta1**t + eps)    # Python floats, t = float(step)
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
* ``step`` goes through ``ivy.to_scalar``; for a float hyperparameter ``beta ** step`` is bit-equal
  to ``beta ** float(step)``.
* ``maximum(v, 0.0)`` is ``where(v >= 0, v, 0)``: NaN becomes 0 before the square root.
* ``x ** 2`` and ``x ** 0.5`` on arrays: Ivy calls ``np.power(x, asarray(2 or 0.5, x.dtype))``,
  which is bit-equal to NumPy's ``x ** 2`` / ``x ** 0.5`` fast paths (``square`` / ``sqrt``) for every
  value the update can reach (the one exception, float16 ``pow(-0.0, 0.5) = +0`` against
  ``sqrt(-0.0) = -0``, is unreachable: a new ``v`` is never ``-0.0``).

Inputs Ivy itself rejects or mangles (objects with ``__array__`` or ``__dlpack__`` as ``w``...) are
converted here with ``np.asarray`` / ``np.from_dlpack``, keeping their dtype: that is adamgen's
contract, not Ivy's (Ivy raises on them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["adam_update_ref", "as_ivy_array", "adam_prelude_ref"]


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        out: list[Any] = []
        for item in obj:
            out.extend(_leaves(item))
        return out
    return [obj]


def as_ivy_array(x: Any) -> np.ndarray:
    """Convert an array argument (w, dcdw, mw_tm1, vw_tm1) the way ``ivy.array`` does on numpy."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, np.generic):
        return np.asarray(x)
    if isinstance(x, bool):
        return np.asarray(x, dtype=np.bool_)
    if isinstance(x, float):
        return np.asarray(x, dtype=np.float32)
    if isinstance(x, int):
        return np.asarray(x, dtype=np.int32)
    if isinstance(x, (list, tuple)):
        leaves = _leaves(x)
        if not leaves:
            return np.asarray(x, dtype=np.float32)
        if any(isinstance(v, (np.generic, np.ndarray)) for v in leaves):
            return np.asarray(x)  # NumPy scalars inside: their dtype wins, as in Ivy
        if all(isinstance(v, bool) for v in leaves):
            return np.asarray(x, dtype=np.bool_)
        if any(isinstance(v, complex) for v in leaves):
            return np.asarray(x, dtype=np.complex64)
        if any(isinstance(v, float) for v in leaves):
            return np.asarray(x, dtype=np.float32)
        return np.asarray(x, dtype=np.int32)
    if hasattr(x, "__array__"):
        return np.asarray(x)
    if hasattr(x, "__dlpack__"):
        return np.from_dlpack(x)
    return np.asarray(x)


def _lr_operand(lr: Any, like: np.ndarray) -> Any:
    """``lr`` as ``effective_grad * lr`` sees it in Ivy (see the module docstring)."""
    if isinstance(lr, (bool, int, float)) or hasattr(lr, "dtype"):
        return lr  # weak Python scalar, or a typed NumPy array / scalar
    if not hasattr(lr, "__array__") and hasattr(lr, "__dlpack__"):
        lr = np.from_dlpack(lr)
        return lr
    return np.asarray(lr, dtype=like.dtype)


def adam_prelude_ref(step: Any, beta1: float, beta2: float, epsilon: float) -> float:
    """The scalar ``alpha``, computed with Python numbers exactly as Ivy does.

    Raises ``ZeroDivisionError`` when ``1 - beta1**t + epsilon == 0`` (``step == 0`` and
    ``epsilon == 0``), as Ivy does.
    """
    t = step.item() if isinstance(step, (np.ndarray, np.generic)) else step
    t = float(t)
    beta1_pow = beta1 ** t
    beta2_pow = beta2 ** t
    return (1 - beta2_pow) ** 0.5 / (1 - beta1_pow + epsilon)


def adam_update_ref(w: Any, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any, /, *,
                    beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-07,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ivy's ``adam_update`` (numpy backend) without ``out``: returns fresh ``(w_new, mw, vw)``.

    Inputs are never modified. NumPy floating-point warnings are silenced (Ivy's numpy backend lets
    them through; they change no bit).
    """
    w = as_ivy_array(w)
    g = as_ivy_array(dcdw)
    m = as_ivy_array(mw_tm1)
    v = as_ivy_array(vw_tm1)
    alpha = adam_prelude_ref(step, beta1, beta2, epsilon)
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
