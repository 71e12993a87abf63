"""The functional API's hot path: one remembered shortcut per argument signature.

Why: a functional update validates the rule's whole contract (dtypes, broadcasting, weak
scalars, ``out``, hyperparameter ranges) and asks the dispatcher and the loader which kernel
runs, on every call. That cost 16 us at N=16 for Ivy's ``adam_update``, where Ivy's NumPy
expression costs 7 us; yet a training loop asks the same question at every step.

How: once a call has gone the whole way (:class:`adamgen.runtime.functional.Updater`) and its
arguments have the common form below, the route it took is remembered as a :class:`Shortcut`,
keyed by the arguments' types, dtype and shape. A later call with that key takes the shortcut
when a few compares prove that the whole way would have passed every check and taken the same
route: the hyperparameters' types and ranges (the rule's own, from its interface), each array's
dtype, shape, contiguity and alignment, each scalar tensor's range, the same environment.
Anything else, every error included, goes the whole way, which raises exactly what it always
raised. So a shortcut changes what a call costs, never what it does: it calls the same C entry
point with the same arguments, into fresh outputs.

The compares are generated for the rule: :func:`shortcut_source` writes, from the interface, a
Python function with the rule's argument names and each range as a chained comparison, compiled
once per rule (a loop over the interface per call would cost as much as the compares).

The common form: every tensor that may not be a scalar a NumPy array (or a subclass) of one float
dtype with a C kernel and one shape, C-contiguous and aligned; every scalar tensor a Python float
or a 0-d array of that dtype; hyperparameters Python floats (a step also an int); no ``out``;
exact mode; a C variant picked (a NumPy pick, forced or measured, goes the whole way).

Forgetting: a shortcut holds a loader decision and a C kernel, so :func:`variant_choice.forget` and
:func:`adamgen.runtime.dispatch.forget` drop every shortcut, a forked child drops them (libgomp
is not fork-safe: the child runs serially, see :func:`adamgen.runtime.c_kernels.resolve_threads`),
and a shortcut made under another environment (``refresh_environment``) is not taken.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import config
from ..config import C_DTYPES, current_environment
from ..interface import Interface, Range
from . import variant_choice
from .c_kernels import CKernel, KernelFunction, resolve_threads
from .guard import ThreadGuard
from .outputs import empty_outputs, pooled

if TYPE_CHECKING:
    from .prepared import PreparedCall

#: Integer steps beyond this go the whole way (``float(step)`` would overflow near 2**1024).
_LARGEST_INT_STEP = 1 << 1000
_C_DTYPES = tuple(np.dtype(name) for name in C_DTYPES)
#: NumPy's flag bits C_CONTIGUOUS | ALIGNED: one ``flags.num`` read checks both.
_C_ALIGNED = 0x1 | 0x100
_MAX_SHORTCUTS = 4096  # shapes vary without end in some programs

#: Returns (variant, C kernel, C arguments, guard) for a buffered update:
#: :func:`adamgen.runtime.dispatch.route`.
Router = Callable[..., "tuple[str, CKernel | None, Any, ThreadGuard | None]"]


class Shortcut:
    """What a signature decided: the kernel's prelude, the C entry point and how to call it."""

    __slots__ = ("array_type", "c_function", "count", "dtype", "env", "from_buffer", "guard",
                 "pooled", "prelude", "serial_function", "shape", "size", "tail", "wrap")

    def __init__(self, *, dtype: np.dtype, shape: tuple[int, ...], count: int,
                 prelude: Callable[..., tuple[float, ...]], function: KernelFunction,
                 serial: KernelFunction | None, guard: ThreadGuard | None, kernel: CKernel,
                 threads: int, wrap: tuple[type | None, ...], env: config.Environment) -> None:
        self.dtype, self.shape, self.count = dtype, shape, count
        self.size = int(np.prod(shape))
        self.prelude = prelude
        self.c_function = function.c_function
        self.tail = (self.size, threads, 0) if function.threaded else (self.size,)
        # a threaded entry point is watched: serial C stands in while threads run slow
        self.guard = guard if function.threaded and serial is not None else None
        self.serial_function = (serial or function).c_function  # the guard's stand-in
        self.from_buffer = kernel.ffi.from_buffer
        self.array_type = kernel.ffi.typeof(f"{kernel.ctype}[]")
        self.pooled = pooled(count, self.size * dtype.itemsize)
        self.wrap = wrap if any(wrap) else None
        self.env = env

    def guarded(self, arguments: tuple[Any, ...]) -> None:
        """The threaded call, watched: serial C stands in while threads run slow."""
        assert self.guard is not None
        self.guard.run(lambda: self.c_function(*arguments, *self.tail),
                       lambda: self.serial_function(*arguments, self.size), self.size)


def _range_test(name: str, valid: Range) -> str:
    """``valid`` as a Python condition on ``name`` (false for NaN, as the range is)."""
    parts = []
    if valid.low is not None:
        parts.append(f"{float(valid.low)!r} {'<' if valid.low_open else '<='} {name}")
    if valid.high is not None:
        parts.append(f"{name} {'<' if valid.high_open else '<='} {float(valid.high)!r}")
    if valid.finite:
        parts.append(f"-{sys.float_info.max!r} <= {name} <= {sys.float_info.max!r}")
    return " and ".join(f"({p})" for p in parts) if parts else f"{name} == {name}"


def shortcut_source(interface: Interface, constants: Mapping[str, float],
                    prelude_order: tuple[str, ...]) -> str:
    """The source of ``run(<tensors>, <hyperparameters>)``: the shortcut for this rule, or None
    (see the module docstring); ``prelude_order``: the module's ``HYPERPARAMETERS``."""
    full = [t.name for t in interface.tensors if not t.scalar]
    scalar = [t for t in interface.tensors if t.scalar]
    first = full[0]
    arguments = [t.name for t in interface.tensors] + list(interface.hyperparameter_names)
    checks = [f"{name}.dtype is dtype and {name}.shape == shape" for name in full[1:]]
    checks += [f"{name}.flags.num & {_C_ALIGNED} == {_C_ALIGNED}" for name in full]
    steps = []
    for h in interface.hyperparameters:
        if h.kind == "step":
            steps.append(h)
            continue
        test = (f"{h.name} == {constants[h.name]!r}" if h.name in constants
                else _range_test(h.name, h.range))
        checks.append(f"type({h.name}) is float and {test}")
    checks.append("environments and environments[0] is cut.env")
    lines = [f"def run({', '.join(arguments)}):",
             f"    if not isinstance({first}, ndarray):",
             "        return None",
             (f"    cut = shortcuts.get(({', '.join(f'type({t.name})' for t in interface.tensors)},"
              f" {first}.dtype, {first}.shape))"),
             "    if cut is None:",
             "        return None",
             "    dtype, shape = cut.dtype, cut.shape",
             "    if not (" + "\n            and ".join(checks) + "):",
             "        return None"]
    for h in steps:
        lines += [f"    if type({h.name}) is int:",
                  f"        if not 0 <= {h.name} < {_LARGEST_INT_STEP}:",
                  "            return None",
                  f"        {h.name} = float({h.name})",
                  f"    elif type({h.name}) is not float:",
                  "        return None",
                  f"    if not ({_range_test(h.name, h.range)}):",
                  "        return None"]
    for t in scalar:
        lines += [f"    if type({t.name}) is not float:",
                  f"        if {t.name}.dtype is not dtype or {t.name}.shape != ():",
                  "            return None",
                  f"        {t.name} = float({t.name})"]
        if t.range is not None:
            lines += [f"    if not ({_range_test(t.name, t.range)}):",
                      "        return None"]
    pointer = "from_buffer(array_type, {})"
    passed = [t.name if t.scalar else pointer.format(t.name) for t in interface.tensors]
    outputs = [f"o{i}" for i in range(len(interface.outputs))]
    listed = ", ".join(outputs) + ("," if len(outputs) == 1 else "")
    lines += ["    try:",
              f"        scalars = cut.prelude({', '.join(prelude_order)})",
              "    except ZeroDivisionError:  # the whole way raises it with an explanation",
              "        return None",
              "    if cut.pooled:",
              f"        {listed} = empty_outputs({len(outputs)}, shape, dtype)",
              "    else:",
              *[f"        {o} = empty(shape, dtype)" for o in outputs],
              "    from_buffer, array_type = cut.from_buffer, cut.array_type",
              f"    arguments = ({', '.join(passed)}, *scalars,",
              f"                 {', '.join(pointer.format(o) for o in outputs)})",
              "    if cut.guard is None:",
              "        cut.c_function(*arguments, *cut.tail)",
              "    else:",
              "        cut.guarded(arguments)",
              "    wrap = cut.wrap",
              "    if wrap is None:",
              f"        return ({listed})",
              "    return tuple(o if kind is None else o.view(kind)",
              f"                 for o, kind in zip(({listed}), wrap))"]
    return "\n".join(lines) + "\n"


class HotPath:
    """The shortcuts of one :class:`adamgen.runtime.functional.Updater`.

    Args:
        router: the dispatcher's :func:`adamgen.runtime.dispatch.route`, bound to the Updater's
            kernels: asked once per signature, after the call that went the whole way.
        interface: the rule's interface.
        constants: hyperparameters the kernels were specialised for (a generated package).
    """

    def __init__(self, router: Router, interface: Interface,
                 constants: tuple[tuple[str, float], ...] = ()) -> None:
        self.router = router
        self.interface = interface
        self.constants = dict(constants)
        self.shortcuts: dict[tuple, Shortcut] = {}
        self._run: Callable[..., tuple[Any, ...] | None] | None = None
        _every.add(self)

    def clear(self) -> None:
        self.shortcuts.clear()

    def run(self, *arguments: Any) -> tuple[Any, ...] | None:
        """The update by the remembered shortcut (tensors, then hyperparameters, in the rule's
        order), or None when the call must go the whole way."""
        return self._run(*arguments) if self._run is not None else None

    def _compile(self, prelude_order: tuple[str, ...]) -> None:
        source = shortcut_source(self.interface, self.constants, prelude_order)
        namespace: dict[str, Any] = {"shortcuts": self.shortcuts, "ndarray": np.ndarray,
                                     "environments": config._current, "empty": np.empty,
                                     "empty_outputs": empty_outputs}
        exec(compile(source, f"<adamgen shortcut {self.interface.rule}>", "exec"),  # noqa: S102
             namespace)
        self._run = namespace["run"]
        self.source = source

    @property
    def shortcut(self) -> Callable[..., tuple[Any, ...] | None] | None:
        """The generated shortcut function itself (None until a first shortcut is learned): a
        binding calls it directly, saving the frames of :meth:`run`."""
        return self._run

    def learn(self, call: PreparedCall, tensors: Mapping[str, Any],
              hyper: Mapping[str, Any]) -> None:
        """Remember the route of a call that just went the whole way, when it has the common
        form (module docstring); ``tensors`` and ``hyper`` are the call's own arguments."""
        interface, module = self.interface, call.module
        full = [t.name for t in interface.tensors if not t.scalar]
        if not (call.buffered and module.MODE == "exact" and module.EXACT
                and _common_form(interface, tensors, hyper)
                and all(call.tensors[n] is tensors[n] for n in full)):
            return
        first = tensors[full[0]]
        dtype, shape = first.dtype, first.shape
        count = len(module.OUTPUTS)
        buffers = empty_outputs(count, shape, dtype)
        variant, kernel, c_arguments, guard = self.router(module, call.tensors, call.scalars,
                                                          call.hyper, buffers, False)
        scalar_names = frozenset(t.name for t in interface.tensors if t.scalar)
        if (variant not in ("c", "c-omp") or kernel is None or c_arguments is None
                or c_arguments[1] != scalar_names or any(
                    c_arguments[0][index] is not tensors[t.name]
                    for index, t in enumerate(interface.tensors) if not t.scalar)):
            return  # NumPy runs it, or C takes copies or other scalars: the whole way
        threads = resolve_threads(kernel_threads(variant))
        function = _functional_entry(kernel, interface, threaded=threads > 1,
                                     scalars=len(call.scalars), outputs=count)
        serial = _functional_entry(kernel, interface, threaded=False,
                                   scalars=len(call.scalars), outputs=count)
        if function is None:
            return
        if self._run is None:
            self._compile(tuple(module.HYPERPARAMETERS))
        wrap = tuple(next((type(tensors[d]) for d in module.DEPENDS[name]
                           if d in tensors and isinstance(tensors[d], np.ndarray)
                           and type(tensors[d]) is not np.ndarray), None)
                     for name in module.OUTPUTS)
        if len(self.shortcuts) >= _MAX_SHORTCUTS:
            self.shortcuts.clear()
        key = (*(type(tensors[t.name]) for t in interface.tensors), dtype, shape)
        self.shortcuts[key] = Shortcut(
            dtype=dtype, shape=shape, count=count, prelude=module.prelude, function=function,
            serial=serial, guard=guard, kernel=kernel, threads=threads, wrap=wrap,
            env=current_environment())


def kernel_threads(variant: str) -> int:
    """The thread count a variant runs with (:func:`adamgen.runtime.dispatch.threading`)."""
    from .dispatch import threading

    return threading(variant)["threads"]


def _common_form(interface: Interface, tensors: Mapping[str, Any],
                 hyper: Mapping[str, Any]) -> bool:
    """The arguments a shortcut can take (the module docstring's common form)."""
    full = [tensors[t.name] for t in interface.tensors if not t.scalar]
    if not all(isinstance(a, np.ndarray) for a in full):
        return False
    first = full[0]
    dtype = first.dtype
    if not (dtype in _C_DTYPES and first.size > 0
            and all(a.dtype is dtype and a.shape == first.shape and a.flags.c_contiguous
                    and a.flags.aligned for a in full)):
        return False
    for t in interface.tensors:
        value = tensors[t.name]
        if t.scalar and not (type(value) is float or (isinstance(value, np.ndarray)
                                                      and value.dtype is dtype
                                                      and value.shape == ())):
            return False
    return all(type(hyper[h.name]) is float or (h.kind == "step"
                                                and type(hyper[h.name]) is int)
               for h in interface.hyperparameters)


def _functional_entry(kernel: CKernel, interface: Interface, *, threaded: bool, scalars: int,
                      outputs: int) -> KernelFunction | None:
    """The functional C entry point, when its parameters are exactly what the shortcut passes:
    each tensor (an array, or a value for a scalar tensor), the scalars, the outputs, n (and the
    thread count and threshold when threaded)."""
    expected = [("value" if t.scalar else "in") for t in interface.tensors]
    expected += ["scalar"] * scalars + ["out"] * outputs + ["n"]
    if threaded:
        expected += ["nthreads", "threshold"]
    for function in kernel.functions.values():
        if (function.form == "functional" and function.threaded == threaded
                and [role for _, _, role in function.parameters] == expected):
            return function
    return None


_every: weakref.WeakSet[HotPath] = weakref.WeakSet()


def forget() -> None:
    """Drop every shortcut (their decisions or kernels were forgotten, or this is a forked child)."""
    for hotpath in list(_every):
        hotpath.clear()


variant_choice.on_forget(forget)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=forget)
