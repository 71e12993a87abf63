"""A rule's vector-Jacobian product: cotangents pulled back through one update.

For Ivy's rule, ``adam_update_vjp(w, dcdw, lr, mw_tm1, vw_tm1, step, (d_w_new, d_mw, d_vw))``
returns ``(d_w, d_dcdw, d_lr, d_mw_tm1, d_vw_tm1)``: one gradient per tensor, each with the shape
of its input. This is what differentiable optimizers and hypergradient methods need
(``d loss / d lr`` through the update). Any rule gets the same (:class:`VJP`).

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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..config import C_DTYPES, environment
from ..errors import ArgumentTypeError, ArgumentValueError, InexactVariantError
from ..interface import DERIVATIVE_PREFIX as PREFIX
from . import validate
from .functional import FLOAT_DTYPES, prelude_scalars
from .source import KernelSource

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


# --- the call -------------------------------------------------------------------------------

class VJP:
    """A rule's vector-Jacobian product on one backend: ``"numpy"``, ``"c"``, or ``"auto"`` (C
    if it builds). The VJP is one more spec, derived from the rule
    (:func:`adamgen.derivatives.vjp_spec`): the same cache, loaders and fallbacks as the
    update's kernels.

    Every backend runs the same IR and hands its elementwise results to :func:`sum_to_shape`,
    so their results are bit-identical.
    """

    def __init__(self, source: KernelSource, backend: str = "auto") -> None:
        if backend not in ("auto", "numpy", "c"):
            raise ArgumentValueError(f"backend must be auto, numpy or c, got {backend!r}")
        self.source = source
        self.backend = backend

    def __call__(self, tensors: Mapping[str, Any], cotangents: Sequence[Any],
                 hyper: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
        """``(d_<tensor>, ...)`` in the rule's tensor order; ``tensors`` and ``hyper`` by name
        (every hyperparameter given), ``cotangents`` one per output, in the rule's order."""
        forward = self.source.interface
        values = {h.name: h.check(hyper[h.name]) for h in forward.hyperparameters}
        primals: dict[str, Any] = {}
        for t in forward.tensors:
            value = validate.as_tensor(t.name, tensors[t.name], weak_scalars=t.scalar)
            primals[t.name] = (validate.check_range(value, t.range, t.name)
                               if t.range is not None else value)
        outputs = forward.outputs
        named = forward.cotangents
        if isinstance(cotangents, (str, bytes)) or not isinstance(cotangents, Sequence):
            raise ArgumentTypeError(f"cotangents must be a sequence "
                                    f"({', '.join(named[o] for o in outputs)}), got "
                                    f"{type(cotangents).__name__}")
        if len(cotangents) != len(outputs):
            raise ArgumentValueError(f"cotangents must have {len(outputs)} entries (one per "
                                     f"output {list(outputs)}), got {len(cotangents)}")
        cots = {name: validate.as_tensor(f"cotangent {named[name]}", value, weak_scalars=True)
                for name, value in zip(outputs, cotangents)}
        dtype = _common_dtype([*primals.values(), *cots.values()])
        primals = {n: _as_dtype(v, dtype) for n, v in primals.items()}
        shapes = {n: np.shape(v) for n, v in primals.items()}
        full = validate.broadcast_shape(shapes)
        inputs = dict(primals)
        for name, value in cots.items():
            out_shape = validate.broadcast_shape(
                {d: shapes[d] for d in forward.dependencies(name) if d in shapes})
            inputs[named[name]] = _place_cotangent(name, _as_dtype(value, dtype), out_shape,
                                                      full, dtype)
        source = self.source.derived("vjp")
        module = source.numpy_module(FLOAT_DTYPES[dtype])  # names of the VJP's own tensors
        assert module is not None
        scalar_tensors = frozenset(n for n in module.TENSORS
                                   if not isinstance(inputs[n], np.ndarray))
        config = source.config(FLOAT_DTYPES[dtype], scalar_tensors=scalar_tensors)
        module = source.numpy(config)  # the prelude is the one definition of the scalars
        assert module is not None
        scalars = prelude_scalars(module, values)
        buffers = [np.empty(full, dtype) for _ in module.OUTPUTS]
        operands = [inputs[n] for n in module.TENSORS]
        backend = self.backend if self.backend != "auto" else environment().backend or "auto"
        kernel = source.c(config) if backend in ("auto", "c") and \
            FLOAT_DTYPES[dtype] in C_DTYPES else None
        if self.backend == "c" and kernel is None:
            raise ArgumentValueError(f"no C VJP kernel for {config.describe()}")
        if kernel is None and not module.EXACT:
            raise InexactVariantError(f"{module.INEXACT}; no C kernel serves this VJP here")
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
            return tuple(sum_to_shape(elementwise[f"{PREFIX}{n}"], shapes[n])
                         for n in forward.tensor_names)


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
