"""The functional API's hot path: one remembered shortcut per argument signature.

Why: ``adam_update`` validates Ivy's whole contract (dtypes, broadcasting, weak scalars, ``out``,
hyperparameter ranges) and asks the dispatcher and the loader which kernel runs, on every call.
That cost 16 us at N=16, where Ivy's NumPy expression costs 7 us; yet a training loop asks the
same question at every step.

How: once a call has gone the whole way (:class:`adamgen.runtime.api.Updater`) and its arguments
have the common form below, the route it took is remembered as a :class:`Shortcut`, keyed by the
arguments' types, dtype and shape. A later call with that key takes the shortcut when a few
compares prove that the whole way would have passed every check and taken the same route: the
hyperparameters' types and ranges, the step, the lr rule, each array's dtype, shape, contiguity
and alignment, the same environment. Anything else, every error included, goes the whole way,
which raises exactly what it always raised. So a shortcut changes what a call costs, never what
it does: it calls the same C entry point with the same arguments, into fresh outputs.

The common form: ``w``, ``dcdw``, ``mw_tm1``, ``vw_tm1`` NumPy arrays (or ``adamgen.Array``) of
one float dtype with a C kernel and one shape, C-contiguous and aligned; ``lr`` a Python float or
a 0-d array of that dtype; ``step`` an int or a float; ``beta1``, ``beta2`` and ``epsilon``
Python floats; ``stop_gradients`` a bool; no ``out``; exact mode; a C variant picked (a NumPy
pick, forced or measured, goes the whole way).

What a call on a shortcut still pays: those compares, the prelude (the per-call scalars,
computed by the kernel's own prelude), three fresh outputs, one ``ffi.from_buffer`` per array (0.14 us: the
cheapest pointer path measured here; ``ffi.cast`` of ``arr.ctypes.data`` costs 1 us, because
``arr.ctypes`` builds an object), and the C call.

Forgetting: a shortcut holds a loader decision and a C kernel, so :func:`loader.forget` and
:func:`adamgen.runtime.dispatch.forget` drop every shortcut, a forked child drops them (libgomp
is not fork-safe: the child runs serially, see :func:`adamgen.runtime.c_kernels.resolve_threads`),
and a shortcut made under another environment (``refresh_environment``) is not taken.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from .. import config
from ..config import Environment, current_environment
from . import loader
from .array import Array
from .c_kernels import CKernel, KernelFunction, resolve_threads
from .guard import ThreadGuard
from .outputs import empty_outputs, pooled

#: ``0.0 <= x <= _MAX_FINITE`` is False for NaN, inf and negatives.
_MAX_FINITE = sys.float_info.max
#: Integer steps beyond this go the whole way (``float(step)`` would overflow near 2**1024).
_LARGEST_INT_STEP = 1 << 1000
_C_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: NumPy's flag bits C_CONTIGUOUS | ALIGNED: one ``flags.num`` read checks both.
_C_ALIGNED = 0x1 | 0x100
#: The parsed environment, as :func:`current_environment` holds it (an empty list until first
#: read; ``refresh_environment`` replaces its item): read here without a call per update.
_environments = config._current
#: The interface a shortcut is made for (the update's; another spec goes the whole way).
_TENSORS = ("w", "dcdw", "lr", "mw_tm1", "vw_tm1")
_HYPERPARAMETERS = ("beta1", "beta2", "epsilon", "step")
_OUTPUTS = ("w_new", "mw", "vw")
_MAX_SHORTCUTS = 4096  # shapes vary without end in some programs

#: Returns (variant, C kernel, C arguments, guard) for a buffered update:
#: :func:`adamgen.runtime.dispatch.route`.
Router = Callable[..., "tuple[str, CKernel | None, Any, ThreadGuard | None]"]


class Shortcut:
    """What a signature decided: the kernel's prelude, the C entry point and how to call it."""

    __slots__ = ("array_type", "c_function", "dtype", "env", "from_buffer", "guard",
                 "lr_is_array", "pooled", "prelude", "serial_function", "shape", "size", "tail",
                 "wrap")

    def __init__(self, *, dtype: np.dtype, shape: tuple[int, ...], lr_is_array: bool,
                 prelude: Callable[..., tuple[float, ...]], function: KernelFunction,
                 serial: KernelFunction | None, guard: ThreadGuard | None, kernel: CKernel,
                 threads: int, wrap: tuple[bool, bool, bool], env: Environment) -> None:
        self.dtype, self.shape, self.lr_is_array = dtype, shape, lr_is_array
        self.size = int(np.prod(shape))
        self.prelude = prelude
        self.c_function = function.c_function
        self.tail = (self.size, threads, 0) if function.threaded else (self.size,)
        # a threaded entry point is watched: serial C stands in while threads run slow
        self.guard = guard if function.threaded and serial is not None else None
        self.serial_function = (serial or function).c_function  # the guard's stand-in
        self.from_buffer = kernel.ffi.from_buffer
        self.array_type = kernel.ffi.typeof(f"{kernel.ctype}[]")
        self.pooled = pooled(len(_OUTPUTS), self.size * dtype.itemsize)
        self.wrap = wrap if any(wrap) else None
        self.env = env


class HotPath:
    """The shortcuts of one :class:`adamgen.runtime.api.Updater`.

    Args:
        router: the dispatcher's :func:`adamgen.runtime.dispatch.route`, bound to the Updater's
            C kernels: asked once per signature, after the call that went the whole way.
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        self.shortcuts: dict[tuple, Shortcut] = {}
        _every.add(self)

    def clear(self) -> None:
        self.shortcuts.clear()

    def run(self, w: Any, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any, beta1: Any,
            beta2: Any, epsilon: Any, stop_gradients: Any) -> tuple[Any, Any, Any] | None:
        """The update by the remembered shortcut, or None when the call must go the whole way."""
        kind = type(w)
        if kind is not np.ndarray and kind is not Array:
            return None
        cut = self.shortcuts.get((kind, type(dcdw), type(lr), type(mw_tm1), type(vw_tm1),
                                  w.dtype, w.shape))
        if cut is None:
            return None
        dtype, shape = cut.dtype, cut.shape
        # every check of the whole way, as compares that hold exactly when it would pass with
        # the same outcome (the key already fixed the types, w's dtype and w's shape)
        if not (type(stop_gradients) is bool
                and type(beta1) is float and 0.0 <= beta1 < 1.0
                and type(beta2) is float and 0.0 <= beta2 < 1.0
                and type(epsilon) is float and 0.0 <= epsilon
                and dcdw.dtype is dtype and mw_tm1.dtype is dtype and vw_tm1.dtype is dtype
                and dcdw.shape == shape and mw_tm1.shape == shape and vw_tm1.shape == shape
                and w.flags.num & _C_ALIGNED == _C_ALIGNED
                and dcdw.flags.num & _C_ALIGNED == _C_ALIGNED
                and mw_tm1.flags.num & _C_ALIGNED == _C_ALIGNED
                and vw_tm1.flags.num & _C_ALIGNED == _C_ALIGNED
                and _environments and _environments[0] is cut.env):
            return None
        if type(step) is int:
            if not 0 <= step < _LARGEST_INT_STEP:
                return None
            t = float(step)
        elif type(step) is float and 0.0 <= step <= _MAX_FINITE:
            t = step
        else:
            return None
        if cut.lr_is_array:
            if lr.dtype is not dtype or lr.shape != ():
                return None
            rate = float(lr)
        else:
            rate = lr
        if not 0.0 <= rate <= _MAX_FINITE:  # the lr rule; the whole way names the problem
            return None
        try:
            scalars = cut.prelude(beta1, beta2, epsilon, t)
        except ZeroDivisionError:  # the whole way raises it with an explanation
            return None
        if cut.pooled:
            w_new, mw, vw = empty_outputs(3, shape, dtype)
        else:
            w_new, mw, vw = np.empty(shape, dtype), np.empty(shape, dtype), np.empty(shape, dtype)
        pointer, array_type = cut.from_buffer, cut.array_type
        arguments = (pointer(array_type, w), pointer(array_type, dcdw), rate,
                     pointer(array_type, mw_tm1), pointer(array_type, vw_tm1), *scalars,
                     pointer(array_type, w_new), pointer(array_type, mw),
                     pointer(array_type, vw))
        if cut.guard is None:
            cut.c_function(*arguments, *cut.tail)
        else:
            cut.guard.run(lambda: cut.c_function(*arguments, *cut.tail),
                          lambda: cut.serial_function(*arguments, cut.size), cut.size)
        if cut.wrap is None:
            return w_new, mw, vw
        wrap = cut.wrap
        return (w_new.view(Array) if wrap[0] else w_new, mw.view(Array) if wrap[1] else mw,
                vw.view(Array) if wrap[2] else vw)

    def learn(self, module: ModuleType, tensors: dict[str, Any], scalars: tuple[float, ...],
              hyper: dict[str, float], buffered: bool, arguments: tuple[Any, ...]) -> None:
        """Remember the route of a call that just went the whole way, when it has the common
        form (module docstring). ``arguments`` are the call's own: (w, dcdw, lr, mw_tm1, vw_tm1,
        step, beta1, beta2, epsilon, stop_gradients)."""
        w, dcdw, lr, mw_tm1, vw_tm1, step, beta1, beta2, epsilon, stop_gradients = arguments
        arrays = (w, dcdw, mw_tm1, vw_tm1)
        if not (buffered and _common_form(arrays, lr, step, (beta1, beta2, epsilon),
                                          stop_gradients)
                and module.MODE == "exact" and tuple(module.TENSORS) == _TENSORS
                and tuple(module.HYPERPARAMETERS) == _HYPERPARAMETERS
                and tuple(module.OUTPUTS) == _OUTPUTS and all(
                    tensors[name] is value for name, value in zip(_TENSORS, arguments))):
            return
        dtype, shape = w.dtype, w.shape
        buffers = empty_outputs(3, shape, dtype)
        variant, kernel, c_arguments, guard = self.router(module, tensors, scalars, hyper,
                                                          buffers, False)
        if (variant not in ("c", "c-omp") or kernel is None or c_arguments is None
                or c_arguments[1] != frozenset({"lr"}) or any(
                    c_arguments[0][index] is not array
                    for index, array in zip((0, 1, 3, 4), arrays))):
            return  # NumPy runs it, or C takes copies or other scalars: the whole way
        threads = resolve_threads(kernel_threads(variant))
        function = _functional_entry(kernel, threaded=threads > 1, scalars=len(scalars))
        serial = _functional_entry(kernel, threaded=False, scalars=len(scalars))
        if function is None:
            return
        wrap = tuple(any(type(tensors[d]) is Array for d in module.DEPENDS[name]
                         if d in tensors) for name in _OUTPUTS)
        if len(self.shortcuts) >= _MAX_SHORTCUTS:
            self.shortcuts.clear()
        self.shortcuts[(type(w), type(dcdw), type(lr), type(mw_tm1), type(vw_tm1), dtype, shape)] = \
            Shortcut(dtype=dtype, shape=shape, lr_is_array=type(lr) is not float,
                 prelude=module.prelude, function=function, serial=serial, guard=guard,
                 kernel=kernel, threads=threads, wrap=wrap,  # type: ignore[arg-type]
                 env=current_environment())


def kernel_threads(variant: str) -> int:
    """The thread count a variant runs with (:func:`adamgen.runtime.dispatch.threading`)."""
    from .dispatch import threading

    return threading(variant)["threads"]


def _common_form(arrays: tuple[Any, ...], lr: Any, step: Any, hyper: tuple[Any, ...],
                 stop_gradients: Any) -> bool:
    """The arguments :meth:`HotPath.run` can take (the module docstring's common form)."""
    first = arrays[0]
    if not all(type(a) in (np.ndarray, Array) for a in arrays):
        return False
    dtype = first.dtype
    return (dtype in _C_DTYPES and first.size > 0
            and all(a.dtype is dtype and a.shape == first.shape and a.flags.c_contiguous
                    and a.flags.aligned for a in arrays)
            and (type(lr) is float or (type(lr) in (np.ndarray, Array) and lr.dtype is dtype
                                       and lr.shape == ()))
            and type(step) in (int, float) and all(type(h) is float for h in hyper)
            and type(stop_gradients) is bool)


def _functional_entry(kernel: CKernel, *, threaded: bool, scalars: int) -> KernelFunction | None:
    """The functional C entry point, when its parameters are exactly what :meth:`HotPath.run`
    passes: w, dcdw, lr (a value), mw_tm1, vw_tm1, the scalars, w_new, mw, vw, n (and the
    thread count and threshold when threaded)."""
    expected = [("w", "in"), ("dcdw", "in"), ("lr", "value"), ("mw_tm1", "in"),
                ("vw_tm1", "in"), *[(None, "scalar")] * scalars, ("w_new", "out"),
                ("mw", "out"), ("vw", "out"), (None, "n")]
    if threaded:
        expected += [(None, "nthreads"), (None, "threshold")]
    for function in kernel.functions.values():
        if function.form == "functional" and function.threaded == threaded:
            found = [(name if want is not None else None, role)
                     for (name, _, role), (want, _) in zip(function.parameters, expected)]
            if len(function.parameters) == len(expected) and found == expected:
                return function
    return None


_every: weakref.WeakSet[HotPath] = weakref.WeakSet()


def forget() -> None:
    """Drop every shortcut (their decisions or kernels were forgotten, or this is a forked child)."""
    for hotpath in list(_every):
        hotpath.clear()


loader.on_forget(forget)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=forget)
