"""The public ``adam_update_vjp``: the vector-Jacobian product of ``adam_update``.

``adam_update_vjp(w, dcdw, lr, mw_tm1, vw_tm1, step, (d_w_new, d_mw, d_vw))`` returns
``(d_w, d_dcdw, d_lr, d_mw_tm1, d_vw_tm1)``: the cotangents pulled back through one update, each
with the shape of its input. This is what differentiable optimizers and hypergradient methods
need (``d loss / d lr`` through the update).

How a call runs, and why:

* the elementwise VJP is a generated kernel (:mod:`adamgen.derivatives` -> the same lowering
  and backends as the update), evaluated over the broadcast shape ``S`` of the primal inputs;
* each result is then summed down to its input's shape by :func:`sum_to_shape`, **one fixed
  order for every backend**: ``np.sum``'s order depends on memory layout, so it cannot be the
  reference order. The order is pairwise, level by level, over the C-ordered broadcast
  elements (see :func:`pairwise_sum_rows`). Every backend's elementwise results go through this
  one function, so equal elementwise bits give equal reduced bits. NumPy and C elementwise
  results are bit-identical except for the sign and payload of NaNs, which IEEE 754 leaves to
  the hardware (x86 returns the first NaN operand, and C compilers commute ``a*b``);
* a cotangent of an output whose shape is smaller than ``S`` (``mw`` when only ``w`` is
  larger, say) is placed at the first replica of ``S`` and zero elsewhere, so that summing over
  ``S`` counts it once (the partial derivatives of such outputs are finite where the inputs
  are, so the zeros add exact zeros);
* the backend is C when it builds (float32, float64), else NumPy; ``ADAMGEN_BACKEND=numpy``
  forces NumPy;
* results are computed in the common float dtype of the array arguments (integer arrays and
  Python numbers alone give float64); Python numbers (``lr``, a cotangent) are weak, as in NumPy;
* the inputs are never written; a cache hit imports neither SymPy nor Jinja.

The rule at ``v = 0`` (where ``d sqrt(v)/dv`` is unbounded) is documented in
:mod:`adamgen.derivatives`: the path through ``sqrt(max(v, 0))`` contributes 0 where ``v <= 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..config import KernelConfig, environment
from ..interface import SpecRef
from ..errors import ArgumentTypeError, ArgumentValueError
from . import validate
from .api import prelude_scalars
from .c_kernels import CKernel, c_kernel
from .kernels import numpy_kernel

TENSORS = ("w", "dcdw", "lr", "mw_tm1", "vw_tm1")
VJP_SPEC = SpecRef("ivy_adam").derived("vjp")
FLOAT_DTYPES = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32",
                np.dtype(np.float64): "float64"}


# --- the fixed summation order --------------------------------------------------------------

def pairwise_sum_rows(rows: np.ndarray) -> np.ndarray:
    """Sum ``rows`` (shape ``(n, ...)``) over its first axis in the fixed pairwise order.

    Level by level: row ``i`` of the next level is ``rows[2i] + rows[2i+1]``, and an odd last
    row is carried to the next level unchanged, until one row is left. The same order in every
    backend; its rounding error grows like ``log2(n)``, not ``n``.
    """
    if rows.shape[0] == 0:
        return np.zeros(rows.shape[1:], rows.dtype)
    while rows.shape[0] > 1:
        n = rows.shape[0]
        pairs = rows[0:n - 1:2] + rows[1:n:2]
        rows = np.concatenate([pairs, rows[n - 1:]]) if n % 2 else pairs
    return rows[0]


def sum_to_shape(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``values`` over the dimensions along which ``shape`` was broadcast to its shape.

    Each result element sums its contributors in the C order of ``values``' indices over the
    broadcast dimensions, combined by :func:`pairwise_sum_rows`.
    """
    full = values.shape
    padded = (1,) * (len(full) - len(shape)) + tuple(shape)
    reduced = [d for d in range(len(full)) if padded[d] == 1 and full[d] != 1]
    if not reduced:
        return values.reshape(shape)
    kept = [d for d in range(len(full)) if d not in reduced]
    count = math.prod(full[d] for d in reduced)
    if count == 0:
        return np.zeros(shape, values.dtype)
    rows = np.ascontiguousarray(np.transpose(values, reduced + kept)).reshape(count, -1)
    return pairwise_sum_rows(rows).reshape(shape)


# --- kernels --------------------------------------------------------------------------------
# The VJP is one more spec (``adam_vjp`` in codegen/driver.py): the same cache, loaders and
# fallbacks as the update's kernels. Its C file holds the functional form only.

def numpy_vjp_kernel(config: KernelConfig) -> ModuleType:
    """The generated NumPy VJP module for ``config``, from the cache (built on a miss)."""
    return numpy_kernel(config)


def c_vjp_kernel(config: KernelConfig) -> CKernel | None:
    """The compiled C VJP kernel for ``config``, or None when C cannot serve it."""
    return c_kernel(config)


# --- the call -------------------------------------------------------------------------------

class VJP:
    """``adam_update_vjp`` on one backend: ``"numpy"``, ``"c"``, or ``"auto"`` (C if it builds).

    Every backend runs the same IR and hands its elementwise results to :func:`sum_to_shape`,
    so their results are bit-identical.
    """

    def __init__(self, backend: str = "auto") -> None:
        if backend not in ("auto", "numpy", "c"):
            raise ArgumentValueError(f"backend must be auto, numpy or c, got {backend!r}")
        self.backend = backend

    def __call__(self, w: Any, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any,
                 cotangents: Sequence[Any], *, beta1: Any = 0.9, beta2: Any = 0.999,
                 epsilon: Any = 1e-07) -> tuple[np.ndarray, ...]:
        hyper = {"beta1": validate.as_hyperparameter("beta1", beta1, 0.0, 1.0),
                 "beta2": validate.as_hyperparameter("beta2", beta2, 0.0, 1.0),
                 "epsilon": validate.as_hyperparameter("epsilon", epsilon, 0.0, None),
                 "step": validate.as_step(step)}
        primals = {"w": validate.as_tensor("w", w), "dcdw": validate.as_tensor("dcdw", dcdw),
                   "lr": validate.check_lr(validate.as_tensor("lr", lr, weak_scalars=True)),
                   "mw_tm1": validate.as_tensor("mw_tm1", mw_tm1),
                   "vw_tm1": validate.as_tensor("vw_tm1", vw_tm1)}
        if isinstance(cotangents, (str, bytes)) or not isinstance(cotangents, Sequence):
            raise ArgumentTypeError("cotangents must be a sequence (d_w_new, d_mw, d_vw), got "
                                    f"{type(cotangents).__name__}")
        forward = numpy_kernel(KernelConfig(dtype="float64"))  # names and dependencies
        if len(cotangents) != len(forward.OUTPUTS):
            raise ArgumentValueError(f"cotangents must have {len(forward.OUTPUTS)} entries "
                                     f"(one per output {forward.OUTPUTS}), got {len(cotangents)}")
        cots = {name: validate.as_tensor(f"cotangent d_{name}", value, weak_scalars=True)
                for name, value in zip(forward.OUTPUTS, cotangents)}
        dtype = _common_dtype([*primals.values(), *cots.values()])
        primals = {n: _as_dtype(v, dtype) for n, v in primals.items()}
        shapes = {n: np.shape(v) for n, v in primals.items()}
        full = validate.broadcast_shape(shapes)
        inputs = dict(primals)
        for name, value in cots.items():
            out_shape = validate.broadcast_shape(
                {d: shapes[d] for d in forward.DEPENDS[name] if d in shapes})
            inputs[f"d_{name}"] = _place_cotangent(name, _as_dtype(value, dtype), out_shape, full,
                                                   dtype)
        config = KernelConfig(spec=VJP_SPEC, dtype=FLOAT_DTYPES[dtype], scalar_tensors=frozenset(
            n for n, v in inputs.items() if not isinstance(v, np.ndarray)))
        module = numpy_vjp_kernel(config)  # the prelude is the one definition of the scalars
        scalars = prelude_scalars(module, hyper, step, epsilon)
        buffers = [np.empty(full, dtype) for _ in module.OUTPUTS]
        operands = [inputs[n] for n in module.TENSORS]
        backend = self.backend if self.backend != "auto" else environment().backend or "auto"
        kernel = c_vjp_kernel(config) if backend in ("auto", "c") else None
        if self.backend == "c" and kernel is None:
            raise ArgumentValueError(f"no C VJP kernel for {config.describe()}")
        if math.prod(full) == 0:
            pass  # nothing to compute (and no buffer to hand to C)
        elif kernel is not None:
            flat = [v if not isinstance(v, np.ndarray)
                    else np.ascontiguousarray(np.broadcast_to(v, full)).reshape(-1)
                    for v in operands]
            kernel.functional(*flat, scalars, *(b.reshape(-1) for b in buffers))
        else:
            # scalar tensors as 0-d arrays of the dtype: each is rounded once, and a step
            # between two of them computes in the dtype, as C computes it (two Python floats
            # would multiply in double)
            operands = [v if isinstance(v, np.ndarray) else np.asarray(v, dtype)
                        for v in operands]
            with np.errstate(all="ignore"):
                module.update(*operands, scalars, *buffers)
        elementwise = dict(zip(module.OUTPUTS, buffers))
        with np.errstate(all="ignore"):  # inf + -inf in a sum is NaN, as in the update itself
            return tuple(sum_to_shape(elementwise[f"d_{n}"], shapes[n]) for n in TENSORS)


def _common_dtype(values: list[Any]) -> np.dtype:
    """The float dtype every step computes in: arrays decide, Python numbers are weak."""
    arrays = [v for v in values if isinstance(v, np.ndarray)]
    dtype = np.result_type(*arrays) if arrays else np.dtype(np.float64)
    return dtype if dtype in FLOAT_DTYPES else np.dtype(np.float64)


def _as_dtype(value: Any, dtype: np.dtype) -> Any:
    """Arrays in ``dtype`` (a new array when converted: inputs are never written anyway)."""
    return np.asarray(value, dtype) if isinstance(value, np.ndarray) else float(value)


def _place_cotangent(name: str, value: Any, out_shape: tuple[int, ...],
                     full: tuple[int, ...], dtype: np.dtype) -> Any:
    """The cotangent of an output of shape ``out_shape`` as an operand over ``full``."""
    shape = np.shape(value)
    try:
        fits = np.broadcast_shapes(shape, out_shape) == out_shape
    except ValueError:
        fits = False
    if not fits:
        raise ArgumentValueError(f"cotangent d_{name} has shape {shape}, which does not "
                                 f"broadcast to the shape {out_shape} of {name}")
    if out_shape == full:
        return value
    padded = (1,) * (len(full) - len(out_shape)) + out_shape
    placed = np.zeros(full, dtype)  # a Python number is rounded to dtype, as NumPy would
    first = tuple(slice(0, 1) if p == 1 and f != 1 else slice(None)
                  for p, f in zip(padded, full))
    placed[first] = np.broadcast_to(value, padded)
    return placed


_AUTO = VJP("auto")


def adam_update_vjp(w: Any, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any,
                    cotangents: Sequence[Any], *, beta1: Any = 0.9, beta2: Any = 0.999,
                    epsilon: Any = 1e-07) -> tuple[np.ndarray, ...]:
    """Pull ``cotangents = (d_w_new, d_mw, d_vw)`` back through one ``adam_update``.

    Returns ``(d_w, d_dcdw, d_lr, d_mw_tm1, d_vw_tm1)``, each an array with its input's shape
    (a Python-number ``lr`` gets a 0-d array), summed over broadcast dimensions in the fixed
    order of :func:`sum_to_shape`. Arguments are those of :func:`adamgen.adam_update`; each
    cotangent has its output's shape or broadcasts to it (``1.0`` is a cotangent of ones).
    Where ``v = beta2*vw_tm1 + (1-beta2)*dcdw**2 <= 0`` the path through ``sqrt`` contributes
    0 (see :mod:`adamgen.derivatives`). The inputs are never written.
    """
    return _AUTO(w, dcdw, lr, mw_tm1, vw_tm1, step, cotangents, beta1=beta1, beta2=beta2,
                  epsilon=epsilon)
