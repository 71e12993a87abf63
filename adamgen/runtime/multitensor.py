"""One optimizer step over every parameter of one dtype: a single C call where C is built.

The group is built once, when the optimizer is constructed: the pointers of the parameters and of
the optimizer-owned state and gradient buffers are gathered then and reused every step. Gradients
handed to ``step(grads)`` are the only pointers gathered per step; a torch parameter that moved
gets a new pointer table through :meth:`MultiTensorGroup.rebind`.

Which tensor of the rule is what comes from its interface (:class:`Roles`): the parameter (the
caller's arrays, updated in place), the gradient, each owned state tensor, and the tensors that
may be scalars (Ivy's ``lr``), which an optimizer passes as one value for every element.

Variants (the loader measures them per size bucket and dispatches to the winner): the C
multi-tensor kernel, serial or threaded across and within tensors, and the NumPy in-place module
applied tensor by tensor (where it computes the rule exactly; it is the winner wherever C is not
faster). A threaded pick is watched like the functional API's (:mod:`.guard`): when a neighbour
takes a core, every OpenMP region waits for its descheduled worker (measured on the shared
development VM: 500 x 4096 float32 tensors took 7-11 ms a step at two threads against 0.9 ms
serially), so slow threaded steps give way to serial C for a back-off. Serial and threaded C
compute every element with the same chunk function: the bits do not depend on it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import InexactVariantError
from ..interface import Interface
from . import dispatch, memory, variant_choice
from .c_kernels import resolve_threads
from .guard import ThreadGuard
from .source import KernelSource

DTYPE_NAMES = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32",
               np.dtype(np.float64): "float64"}
#: a pointer table read as unsigned integers (struct format of uintptr_t)
_POINTER_FORMAT: Any = np.dtype(np.uintp).char


@dataclass(frozen=True)
class Roles:
    """What each of a rule's tensors is to an optimizer, from its interface."""

    order: tuple[str, ...]
    parameter: str
    gradient: str
    state: tuple[str, ...]
    scalars: tuple[str, ...]

    @classmethod
    def of(cls, interface: Interface) -> Roles:
        """The roles, or a ``TypeError`` saying why the rule cannot be an in-place optimizer."""
        if interface.parameter is None or interface.gradient is None:
            raise TypeError(f"rule {interface.rule} declares no parameter and gradient, so it "
                            "has no in-place optimizer")
        state = tuple(p.input for p in interface.owned_state)
        named = {interface.parameter, interface.gradient, *state}
        scalars = tuple(t.name for t in interface.tensors if t.name not in named)
        loose = [name for name in scalars if not interface.tensor(name).scalar]
        if loose:
            raise TypeError(f"rule {interface.rule}: the tensor(s) {', '.join(loose)} are "
                            "neither parameter, gradient nor state, and may not be scalars, so "
                            "an optimizer cannot supply them")
        return cls(interface.tensor_names, interface.parameter, interface.gradient, state,
                   scalars)


def flat(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """1-d views in memory order: the C kernels walk memory, and a Fortran-ordered parameter,
    its state and its gradient share one memory order (the optimizer makes sure of it)."""
    return [a.ravel(order="K") for a in arrays]


class MultiTensorGroup:
    """The parameters of one dtype and their optimizer-owned state.

    Args:
        source: the rule's kernels (for low-precision parameters: the mode's variant).
        roles: what each tensor of the rule is.
        dtype: the group's (parameters') dtype.
        arrays: per tensor name of the rule (parameter, gradient, state), the group's arrays,
            each in its storage dtype.
        indices: each member's position among all the optimizer's parameters.
        step_name: the rule's step counter hyperparameter, if it has one.
        compute: the kernels' dtype (float32 for float16 parameters), default ``dtype``.
        stream: for stochastic rounding, (seed, each member's key).
    """

    def __init__(self, source: KernelSource, roles: Roles, dtype: np.dtype,
                 arrays: Mapping[str, Sequence[np.ndarray]], indices: Sequence[int],
                 step_name: str | None = None, *, compute: str | None = None,
                 stream: tuple[int, Sequence[int]] | None = None) -> None:
        self.roles = roles
        self._rule = source.name  # the loader's problem names the rule (``adamgen info``)
        self._step_name = step_name
        self._values: Mapping[str, float] | None = None
        self.dtype = np.dtype(dtype)
        self.arrays = {name: list(found) for name, found in arrays.items()}
        self.indices = list(indices)
        self.params = self.arrays[roles.parameter]
        self.size = sum(p.size for p in self.params)
        #: each gradient's bytes (it has its parameter's size), for the overlap check
        self._nbytes = memory.sizes([p.nbytes for p in self.params])
        name = compute or DTYPE_NAMES[self.dtype]
        self._seed = stream[0] if stream is not None else 0
        self._step = 0
        self._keys = np.array([key & 0xFFFFFFFF for key in stream[1]] if stream else [],
                              dtype=np.uint32)
        interface = source.interface
        scalars = frozenset(roles.scalars)
        numpy_module = source.numpy_module(name, aliases=interface.in_place,
                                           scalar_tensors=scalars)
        if numpy_module is None:
            raise LookupError(f"{source.name} has no {name} NumPy module here")
        self.numpy_module: ModuleType = numpy_module
        #: outputs in the module's order, each the tensor it overwrites
        self._outputs = tuple({p.output: p.input for p in interface.state}[o]
                              for o in self.numpy_module.OUTPUTS)
        self.random = bool(getattr(self.numpy_module, "STREAMS", ()))
        self.kernel = source.c_kernel(name, scalars)
        if self.kernel is not None and "multi_inplace" not in self.kernel.forms:
            self.kernel = None
        self._writable = {roles.parameter, *roles.state}
        if self.kernel is not None:  # pointers gathered once, reused every step
            ctypes = self.kernel.element_ctypes()
            self._ctypes = ctypes
            self.pointers = {t: self.kernel.pointers(flat(self.arrays[t]),
                                                     writable=t in self._writable,
                                                     ctype=ctypes[t])
                             for t in (roles.parameter, roles.gradient, *roles.state)}
            # step(grads): the same sizes as the owned gradients (checked by the optimizer), so
            # one pointer table is refilled in place instead of a new list per step
            self._external = self.kernel.pointers(flat(self.arrays[roles.gradient]),
                                                  ctype=ctypes[roles.gradient])
            # cffi reads C-contiguous memory: a Fortran-ordered gradient is passed flattened
            self._fortran = [p.flags.f_contiguous and not p.flags.c_contiguous
                             for p in self.params]
            self._from_buffer = self.kernel.ffi.from_buffer
            self._array_type = self.kernel.ffi.typeof(f"{ctypes[roles.gradient]}[]")
            self._keys_cdata = self.kernel.ffi.new("uint32_t[]", self._keys.tolist()) \
                if self.random else None
            # the C entry points themselves: the pointer tables above are all they take
            symbol = f"{self.kernel.config.spec.name}_multi_inplace"
            self._serial = self.kernel.function(symbol).c_function
            threaded = self.kernel.functions.get(f"{symbol}_omp")
            self._threaded = threaded.c_function if threaded else None
            #: where the scalar tensors' values and the gradients' table go among the C
            #: arguments
            self._value_slots = [(slot, name) for slot, name in enumerate(roles.order)
                                 if name in roles.scalars]
            self._gradient_slot = roles.order.index(roles.gradient)
            self._template: list[Any] | None = None
        # the functional form's rule: NumPy only where it computes the rule exactly, and
        # ADAMGEN_VARIANT=numpy where it does not is an error (it used to yield to C silently)
        try:
            self.variants = dispatch.exact_variants(self.numpy_module, self.kernel, self.size)
        except InexactVariantError as error:
            raise InexactVariantError(f"the optimizer of {source.name} in {name}: "
                                      f"{error}") from None
        self._variant: str | None = None
        self._guard: ThreadGuard | None = None

    def describe(self) -> str:
        chosen = self._variant or "not yet chosen"
        return f"{self.dtype} x{len(self.params)}: {chosen} of {'/'.join(self.variants)}"

    def variant(self, values: Mapping[str, float], scalars: tuple[float, ...]) -> str:
        """The loader's pick for this group (its sizes never change, so it is asked once)."""
        if self._variant is None:
            problem = (f"{self._rule} multi-tensor {self.roles.parameter}:"
                       f"{self.numpy_module.SPEC_HASH} {self.dtype} {self.numpy_module.MODE} "
                       f"x2^{variant_choice.bucket_of(len(self.params))}")
            context = {"c": self.kernel.cache_key if self.kernel else "",
                       "threads": str(dispatch.default_threads())}
            variant = variant_choice.choose(
                problem, self.size, self.variants, context,
                lambda m: self._timers(m, values, scalars), self.dtype.itemsize)
            if variant in variant_choice.THREADED:  # None when forced by ADAMGEN_VARIANT
                self._guard = variant_choice.guard(problem, self.size, self.variants, context)
            self._variant = variant
        return self._variant

    def rebind(self, moved: Mapping[int, np.ndarray]) -> None:
        """Point the group at parameters that moved (keyed by the optimizer's index), each of
        its old shape, dtype and memory order (the optimizer checked): one new pointer table."""
        for position, index in enumerate(self.indices):
            if index in moved:
                self.params[position] = moved[index]
        if self.kernel is not None:
            self.pointers[self.roles.parameter] = self.kernel.pointers(
                flat(self.params), writable=True, ctype=self._ctypes[self.roles.parameter])
            self._template = None
            self._values = None  # the C arguments are rebuilt at the next step

    def run(self, values: Mapping[str, float], step: float | None,
            external_grads: Sequence[np.ndarray] | None,
            written: memory.WrittenMemory | None = None) -> None:
        """Update every parameter of the group once.

        Args:
            values: the checked hyperparameters and scalar tensors (Ivy's ``lr``); a new
                mapping whenever one changed (what derives from it is cached until then).
            step: the step counter's value (None for a rule without one).
            external_grads: ``step(grads)``'s gradients (all the optimizer's), else None.
            written: memory the step writes; an external gradient overlapping it is read from a
                copy (each variant reads it at a different moment relative to those writes, so
                reading it in place would make the bits depend on the variant).
        """
        if values is not self._values:
            self._adopt(values)
        arguments = self._prelude_arguments
        if self._step_slot is not None:
            arguments = arguments.copy()
            arguments[self._step_slot] = step
        scalars = self.numpy_module.prelude(*arguments)
        self._step = int(step or 0) & 0xFFFFFFFF  # the random stream's counter
        variant = self._variant or self.variant(values, scalars)
        roles = self.roles
        if variant == "numpy":
            grads = self.arrays[roles.gradient] if external_grads is None else \
                [external_grads[i] for i in self.indices]
            if external_grads is not None and written is not None:
                addresses = [memory.address(g) for g in grads]
                for position in written.overlapping(addresses, self._nbytes):
                    grads[position] = np.array(grads[position], order="K")
            self._run_numpy({**self.arrays, roles.gradient: grads}, values, scalars)
            return
        stream = (self._seed, self._step, self._keys_cdata) if self.random else ()
        buffers = None
        if external_grads is None:  # the owned buffers: the pointer tables gathered once
            leading = self._c_arguments
        else:
            buffers = self._fill_external(external_grads, written)
            leading = self._c_arguments.copy()
            leading[self._gradient_slot] = self._external.cdata
        if variant == "c" or self._threaded is None:
            self._serial(*leading, *scalars, *stream, *self._tail)
        elif self._guard is None:  # as dispatch.threading("c-omp"): every thread from element 0
            self._threaded(*leading, *scalars, *stream, *self._tail, resolve_threads(None), 0)
        else:  # threads while they keep their promise (a busy neighbour breaks it)
            serial, threaded = self._serial, self._threaded
            self._guard.run(
                lambda: threaded(*leading, *scalars, *stream, *self._tail,
                                 resolve_threads(None), 0),
                lambda: serial(*leading, *scalars, *stream, *self._tail), self.size)
        del buffers  # the C call is over: the gradients' buffers may be released

    def reseed(self, seed: int) -> None:
        """The random stream's seed from now on (a loaded checkpoint's)."""
        self._seed = seed

    def _adopt(self, values: Mapping[str, float]) -> None:
        """What a step derives from the hyperparameters: the prelude's arguments (the step's
        slot left to fill) and the C arguments before the kernel scalars."""
        self._values = values
        names = list(self.numpy_module.HYPERPARAMETERS)
        self._step_slot = names.index(self._step_name) if self._step_name in names else None
        self._prelude_arguments = [values.get(name) for name in names]
        if self.kernel is not None:
            if self._template is None:
                self._template = [self.pointers[t].cdata if t in self.pointers else 0.0
                                  for t in self.roles.order]
                first = self.pointers[self.roles.parameter]
                self._tail = (first.sizes_cdata, first.count)
            self._c_arguments = self._template.copy()
            for slot, name in self._value_slots:
                self._c_arguments[slot] = values[name]

    def _fill_external(self, external_grads: Sequence[np.ndarray],
                       written: memory.WrittenMemory | None) -> list[Any]:
        """The external gradients' pointers, refilled into one table; a gradient overlapping
        memory the step writes is replaced by a copy. Returns the buffers to keep alive."""
        kernel = self.kernel
        assert kernel is not None
        from_buffer, array_type = self._from_buffer, self._array_type
        buffers = [from_buffer(array_type, external_grads[i].ravel(order="K") if fortran
                               else external_grads[i])
                   for i, fortran in zip(self.indices, self._fortran)]
        slots = self._external.cdata
        for slot, buffer in enumerate(buffers):
            slots[slot] = buffer
        if written is not None:  # the addresses, read back from the table just filled
            starts = memoryview(kernel.ffi.buffer(slots)).cast(_POINTER_FORMAT)
            for slot in written.overlapping(starts, self._nbytes):
                copy = np.array(external_grads[self.indices[slot]], order="K")
                buffers[slot] = from_buffer(array_type, copy.ravel(order="K"))
                slots[slot] = buffers[slot]
        return buffers

    def _run_numpy(self, arrays: Mapping[str, Sequence[np.ndarray]], values: Mapping[str, float],
                   scalars: tuple[float, ...]) -> None:
        update = self.numpy_module.update
        order, outputs = self.roles.order, self._outputs
        step = getattr(self, "_step", 0)
        with np.errstate(all="ignore"):
            for position in range(len(arrays[self.roles.parameter])):
                tensors = {t: arrays[t][position] if t in arrays else values[t] for t in order}
                stream = ((self._seed, step, int(self._keys[position])),) if self.random else ()
                update(*(tensors[t] for t in order), scalars, *stream,
                       *(tensors[t] for t in outputs))

    def _timers(self, limit: int, values: Mapping[str, float],
                scalars: tuple[float, ...]) -> dict[str, Callable[[], None]]:
        """Timing closures on scratch tensors shaped like the group's, at most ``limit``
        elements in all (the first tensors that fit, or a slice of the first)."""
        sizes, total = [], 0
        for p in self.params:
            if total + p.size > limit:
                break
            sizes.append(p.size)
            total += p.size
        if not sizes:
            sizes, total = [limit], limit

        def scratch(fill: float, like: np.ndarray) -> list[np.ndarray]:
            values = np.full(total, fill, np.float32).astype(like.dtype) \
                if like.dtype.kind == "f" else np.full(total, 0x3F80, like.dtype)
            return np.split(values, np.cumsum(sizes)[:-1])

        names = (self.roles.parameter, self.roles.gradient, *self.roles.state)
        arrays = {name: scratch(1.0 / (2 ** k), self.arrays[name][0])
                  for k, name in enumerate(names)}
        timers: dict[str, Callable[[], None]] = {}
        if "numpy" in self.variants:
            timers["numpy"] = functools.partial(self._run_numpy, arrays, values, scalars)
        if self.kernel is not None:
            kernel = self.kernel
            tables = {t: kernel.pointers(arrays[t], writable=t in self._writable,
                                         ctype=self._ctypes[t]) for t in names}
            ordered = [tables[t] if t in tables else values[t] for t in self.roles.order]
            stream = ((self._seed, 1, self._keys[:len(sizes)].tolist()),) if self.random \
                else ()
            for variant in self.variants:
                if variant != "numpy":
                    timers[variant] = functools.partial(kernel.multi_inplace, *ordered, scalars,
                                                        *stream, **dispatch.threading(variant))
        return timers
