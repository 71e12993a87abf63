"""One optimizer step over every parameter of one dtype: a single C call where C is built.

The group is built once, when the optimizer is constructed: the pointers of the parameters and of
the optimizer-owned ``m``, ``v`` and gradient buffers are gathered then and reused every step.
Gradients handed to ``step(grads)`` are the only pointers gathered per step; a torch parameter
that moved gets a new pointer table through :meth:`MultiTensorGroup.rebind`.

Variants (the loader measures them per size bucket and dispatches to the winner): the C
multi-tensor kernel, serial or threaded across and within tensors, and the NumPy in-place module
applied tensor by tensor (always available, and the winner wherever C is not faster).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..config import KernelConfig, current_environment
from . import dispatch, loader, memory
from .c_kernels import resolve_threads
from .kernels import numpy_kernel

HYPER = ("beta1", "beta2", "epsilon", "step")
ALL_IN_PLACE = frozenset({("w_new", "w"), ("mw", "mw_tm1"), ("vw", "vw_tm1")})
DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}
#: a pointer table read as unsigned integers (struct format of uintptr_t)
_POINTER_FORMAT: Any = np.dtype(np.uintp).char


def flat(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """1-d views in memory order: the C kernels walk memory, and a Fortran-ordered parameter,
    its state and its gradient share one memory order (the optimizer makes sure of it)."""
    return [a.ravel(order="K") for a in arrays]


class MultiTensorGroup:
    """The parameters of one dtype and their optimizer-owned state."""

    def __init__(self, dtype: np.dtype, params: Sequence[np.ndarray],
                 grads: Sequence[np.ndarray], ms: Sequence[np.ndarray],
                 vs: Sequence[np.ndarray], indices: Sequence[int]) -> None:
        self.dtype = np.dtype(dtype)
        self.params, self.grads, self.ms, self.vs = list(params), list(grads), list(ms), list(vs)
        self.indices = list(indices)
        self.size = sum(p.size for p in self.params)
        #: each gradient's bytes (it has its parameter's size), for the overlap check
        self._nbytes = memory.sizes([p.nbytes for p in self.params])
        name = DTYPE_NAMES[self.dtype]
        mode = current_environment().mode
        self.numpy_module = numpy_kernel(KernelConfig(dtype=name, mode=mode,
                                                      aliases=ALL_IN_PLACE))
        self.kernel = dispatch.c_kernel_for(name, frozenset({"lr"}))
        if self.kernel is not None and "multi_inplace" not in self.kernel.forms:
            self.kernel = None
        if self.kernel is not None:  # pointers gathered once, reused every step
            pointers = self.kernel.pointers
            self.pointers = (pointers(flat(self.params), writable=True), pointers(flat(self.grads)),
                             pointers(flat(self.ms), writable=True),
                             pointers(flat(self.vs), writable=True))
            # step(grads): the same sizes as the owned gradients (checked by the optimizer), so
            # one pointer table is refilled in place instead of a new list per step
            self._external = pointers(flat(self.grads))
            # cffi reads C-contiguous memory: a Fortran-ordered gradient is passed flattened
            self._fortran = [p.flags.f_contiguous and not p.flags.c_contiguous
                             for p in self.params]
            self._from_buffer = self.kernel.ffi.from_buffer
            self._array_type = self.kernel.ffi.typeof(f"{self.kernel.ctype}[]")
            # the C entry points themselves: the pointer tables above are all they take
            symbol = f"{self.kernel.config.spec.name}_multi_inplace"
            self._serial = self.kernel.function(symbol).c_function
            threaded = self.kernel.functions.get(f"{symbol}_omp")
            self._threaded = threaded.c_function if threaded else None
        self.variants = dispatch.variants(self.kernel, self.size)
        self._variant: str | None = None

    def describe(self) -> str:
        chosen = self._variant or "not yet chosen"
        return f"{self.dtype} x{len(self.params)}: {chosen} of {'/'.join(self.variants)}"

    def variant(self, hyper: tuple[float, ...]) -> str:
        """The loader's pick for this group (its sizes never change, so it is asked once)."""
        if self._variant is None:
            self._variant = loader.choose(
                f"multi-tensor {self.dtype} {self.numpy_module.MODE} "
                f"x2^{loader.bucket_of(len(self.params))}",
                self.size, self.variants,
                {"c": self.kernel.cache_key if self.kernel else "",
                 "threads": str(dispatch.default_threads())},
                lambda m: self._timers(m, hyper), self.dtype.itemsize)
        return self._variant

    def rebind(self, moved: Mapping[int, np.ndarray]) -> None:
        """Point the group at parameters that moved (keyed by the optimizer's index), each of
        its old shape, dtype and memory order (the optimizer checked): one new pointer table."""
        for position, index in enumerate(self.indices):
            if index in moved:
                self.params[position] = moved[index]
        if self.kernel is not None:
            self.pointers = (self.kernel.pointers(flat(self.params), writable=True),
                             *self.pointers[1:])

    def run(self, lr: float, hyper: tuple[float, ...],
            external_grads: Sequence[np.ndarray] | None,
            written: memory.WrittenMemory | None = None) -> None:
        """Update every parameter of the group once; ``hyper`` is (beta1, beta2, epsilon, t).

        An external gradient that overlaps ``written`` (memory the step writes) is read from a
        copy: each variant reads it at a different moment relative to those writes, so reading
        it in place would make the bits depend on the variant.
        """
        variant = self._variant or self.variant(hyper)
        scalars = self.numpy_module.prelude(*hyper)
        if variant == "numpy":
            grads = self.grads if external_grads is None else \
                [external_grads[i] for i in self.indices]
            if external_grads is not None and written is not None:
                addresses = [memory.address(g) for g in grads]
                for position in written.overlapping(addresses, self._nbytes):
                    grads[position] = np.array(grads[position], order="K")
            self._run_numpy(self.params, grads, self.ms, self.vs, lr, scalars)
            return
        kernel = self.kernel
        assert kernel is not None
        pw, pg, pm, pv = self.pointers
        buffers = None
        if external_grads is not None:
            pg = self._external
            from_buffer, array_type = self._from_buffer, self._array_type
            buffers = [from_buffer(array_type, external_grads[i].ravel(order="K") if fortran
                                   else external_grads[i])
                       for i, fortran in zip(self.indices, self._fortran)]
            slots = pg.cdata
            for slot, buffer in enumerate(buffers):
                slots[slot] = buffer
            if written is not None:  # the addresses, read back from the table just filled
                starts = memoryview(kernel.ffi.buffer(slots)).cast(_POINTER_FORMAT)
                for slot in written.overlapping(starts, self._nbytes):
                    copy = np.array(external_grads[self.indices[slot]], order="K")
                    buffers[slot] = from_buffer(array_type, copy.ravel(order="K"))
                    slots[slot] = buffers[slot]
        if kernel.config.mode != "exact":
            scalars = dispatch.scalars_for(kernel, dict(zip(HYPER, hyper)), scalars)
        arguments = (pw.cdata, pg.cdata, lr, pm.cdata, pv.cdata, *scalars, pw.sizes_cdata,
                     pw.count)
        if variant == "c" or self._threaded is None:
            self._serial(*arguments)
        else:  # as dispatch.threading("c-omp"): every thread from the first element
            self._threaded(*arguments, resolve_threads(None), 0)
        del buffers  # the C call is over: the gradients' buffers may be released

    def _run_numpy(self, params, grads, ms, vs, lr: float, scalars: tuple[float, ...]) -> None:
        update = self.numpy_module.update
        with np.errstate(all="ignore"):
            for w, g, m, v in zip(params, grads, ms, vs):
                update(w, g, lr, m, v, scalars, w, m, v)

    def _timers(self, limit: int, hyper: tuple[float, ...]) -> dict[str, Callable[[], None]]:
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
        def scratch(fill: float) -> list[np.ndarray]:
            flat = np.full(total, fill, self.dtype)
            return np.split(flat, np.cumsum(sizes)[:-1])
        w, g, m, v = scratch(1.0), scratch(0.5), scratch(0.25), scratch(0.125)
        scalars = self.numpy_module.prelude(*hyper)
        timers: dict[str, Callable[[], None]] = {
            "numpy": lambda: self._run_numpy(w, g, m, v, 1e-3, scalars)}
        if self.kernel is not None:
            kernel = self.kernel
            lists = (kernel.pointers(w, writable=True), kernel.pointers(g),
                     kernel.pointers(m, writable=True), kernel.pointers(v, writable=True))
            if kernel.config.mode != "exact":
                scalars = dispatch.scalars_for(kernel, dict(zip(HYPER, hyper)), scalars)
            for variant in self.variants[1:]:
                options = dispatch.threading(variant)
                timers[variant] = functools.partial(kernel.multi_inplace, lists[0], lists[1],
                                                    1e-3, lists[2], lists[3], scalars,
                                                    **options)
        return timers
