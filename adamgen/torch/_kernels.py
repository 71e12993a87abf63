"""The one place ``adamgen.torch`` touches adamgen's runtime: a rule's kernel, called with
pointer tables.

Why one module: the runtime's internal API (``KernelConfig``, ``c_kernel``, ``numpy_kernel``,
the multi-tensor entry points) is being redesigned; everything ``adamgen.torch`` needs from it
is :func:`rule_kernel` and :class:`RuleKernel` below, so an adaptation happens here only.

What a call looks like: per tensor of the rule, in the rule's order (``param, grad, exp_avg,
...``), a NumPy ``uintp`` array of data pointers (a pointer table); one ``int64`` array of
element counts; the kernel scalars from :meth:`RuleKernel.prelude`. Every state tensor and the
parameter are overwritten in place. The tables are NumPy arrays because they are refilled in
place from ``map(torch.Tensor.data_ptr, ...)``: their C pointers (:class:`Tables`) are cast once
and stay valid.

The caller guarantees what the C file's header lists: every tensor dense, in one memory order
shared by the tensors of its row, of the kernel's dtype; rows never overlap one another; a
gradient overlaps nothing the call writes.

No C compiler: NumPy serves float32 (its in-place module, one tensor at a time, the same bits);
float64 is refused with :class:`KernelUnavailableError`, because NumPy cannot round a float64
fused multiply-add once (the module's ``EXACT`` is False).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import KernelConfig, current_environment, environment
from ..errors import AdamgenError
from ..interface import Interface
from ..rules import builtin
from ..runtime import memory
from ..runtime.c_kernels import c_kernel, resolve_threads
from ..runtime.numpy_kernels import numpy_kernel

#: ``[(name, start, end)]`` -> the names of two ranges sharing a byte, or None
first_overlap = memory.first_overlap

_CTYPES = {"float32": "float", "float64": "double"}


class KernelUnavailableError(AdamgenError, RuntimeError):
    """No kernel can compute this rule exactly for this dtype (float64 without a C compiler)."""


@dataclass(frozen=True)
class Tables:
    """Pointer tables and sizes for one call, with their C pointers cast once.

    The arrays are owned here and refilled in place by the caller, so ``cdata`` stays valid for
    as long as this object lives.
    """

    arrays: tuple[np.ndarray, ...]
    sizes: np.ndarray
    cdata: tuple[Any, ...]
    sizes_cdata: Any
    count: int
    total: int


class RuleKernel:
    """One rule (with its options) for one dtype: the prelude and the multi-tensor call.

    Attributes:
        rule: the built-in rule's name (``torch_adam``, ``torch_adamw``, ``lion``).
        dtype: ``float32`` or ``float64``.
        tensors: the rule's tensors in table order.
        hyperparameters: the prelude's arguments, in order.
        c: True when a compiled C kernel serves (else NumPy, float32 only).
    """

    def __init__(self, rule: str, options: tuple[tuple[str, Any], ...], dtype: str) -> None:
        self.rule, self.options, self.dtype = rule, options, dtype
        config = KernelConfig(spec=builtin(rule).ref(**dict(options)), dtype=dtype, mode="exact")
        module = numpy_kernel(config)
        interface = Interface.from_json(module.INTERFACE)
        self.tensors: tuple[str, ...] = interface.tensor_names
        self.hyperparameters: tuple[str, ...] = tuple(module.HYPERPARAMETERS)
        #: the per-call scalars, computed in Python floats exactly as the peer computes them
        self.prelude = module.prelude
        kernel = None if current_environment().backend == "numpy" else c_kernel(config)
        self.c = kernel is not None and "multi_inplace" in kernel.forms
        self._numpy: Any = None
        self._serial: Any = None
        self._threaded: Any = None
        if self.c:
            assert kernel is not None
            self.ffi = kernel.ffi
            symbol = f"{rule}_multi_inplace"
            self._serial = kernel.function(symbol).c_function
            threaded = kernel.functions.get(f"{symbol}_omp")
            self._threaded = threaded.c_function if threaded is not None else None
            self.threshold = kernel.threshold
        else:
            numpy_module = numpy_kernel(KernelConfig(
                spec=config.spec, dtype=dtype, mode="exact", aliases=interface.in_place))
            if not numpy_module.EXACT:
                why = ("ADAMGEN_BACKEND=numpy forbids them" if current_environment().backend ==
                       "numpy" else "no C compiler could build them (see the warning above; "
                       "ADAMGEN_STRICT=1 shows the compiler's error)")
                raise KernelUnavailableError(
                    f"{rule} on {dtype} tensors needs adamgen's C kernels, and {why}: NumPy "
                    f"cannot round a {dtype} fused multiply-add once, so it cannot give torch's "
                    "bits. Install a C compiler (gcc or clang), or use float32 parameters")
            self._numpy = numpy_module
            self.threshold = 0

    def __repr__(self) -> str:
        how = "C" if self.c else "NumPy"
        return f"<RuleKernel {self.rule}{dict(self.options) or ''} {self.dtype} ({how})>"

    def tables(self, arrays: Sequence[np.ndarray], sizes: np.ndarray) -> Tables:
        """Wrap pointer tables (``uintp`` arrays, one per tensor of the rule) and sizes."""
        if self.c:
            pointer = f"{_CTYPES[self.dtype]} **"
            cdata = tuple(self.ffi.cast(pointer, a.ctypes.data) for a in arrays)
            sizes_cdata = self.ffi.cast("int64_t *", sizes.ctypes.data)
        else:
            cdata, sizes_cdata = (), None
        return Tables(tuple(arrays), sizes, cdata, sizes_cdata, len(sizes), int(sizes.sum()))

    def run(self, tables: Tables, scalars: tuple[float, ...]) -> None:
        """Update every row of ``tables`` in place: threaded (:func:`thread_count` threads)
        from the kernel's size threshold on, when OpenMP built; serial below it."""
        if self._numpy is not None:
            self._run_numpy(tables, scalars)
        elif self._threaded is not None and tables.total >= self.threshold and \
                (threads := thread_count()) > 1:
            self._threaded(*tables.cdata, *scalars, tables.sizes_cdata, tables.count, threads,
                           self.threshold)
        else:
            self._serial(*tables.cdata, *scalars, tables.sizes_cdata, tables.count)

    def _run_numpy(self, tables: Tables, scalars: tuple[float, ...]) -> None:
        """The fallback: the in-place NumPy module on arrays made from the pointers."""
        update, dtype = self._numpy.update, np.dtype(self.dtype)
        written = [name for name in self.tensors if name != "grad"]
        for row, size in enumerate(tables.sizes.tolist()):
            views = {name: _array_at(int(table[row]), size, dtype)
                     for name, table in zip(self.tensors, tables.arrays)}
            with np.errstate(all="ignore"):
                update(*(views[name] for name in self.tensors), scalars,
                       *(views[name] for name in written))


def _array_at(address: int, size: int, dtype: np.dtype) -> np.ndarray:
    """A NumPy array over ``size`` elements at ``address`` (the caller keeps the memory alive)."""
    if size == 0:
        return np.empty(0, dtype)
    interface = {"data": (address, False), "shape": (size,), "typestr": dtype.str, "version": 3}
    holder = type("_At", (), {"__array_interface__": interface})()
    return np.asarray(holder)


@functools.cache
def rule_kernel(rule: str, options: tuple[tuple[str, Any], ...], dtype: str) -> RuleKernel:
    """The kernel of a built-in rule for one dtype, memoised per process."""
    return RuleKernel(rule, options, dtype)


@functools.cache
def _explicit_threads() -> int | None:
    """``ADAMGEN_NUM_THREADS`` when set (parsed and checked by adamgen's one parser), else None.
    ``OMP_NUM_THREADS`` is not read here: torch already follows it."""
    raw = os.environ.get("ADAMGEN_NUM_THREADS", "")
    return environment({"ADAMGEN_NUM_THREADS": raw}).num_threads if raw else None


def thread_count() -> int:
    """The threads one step uses: ``ADAMGEN_NUM_THREADS`` when set, else torch's intra-op
    count (``torch.get_num_threads()``); 1 in a forked child, where libgomp may hang.

    Why torch's count: adamgen's and torch's OpenMP pools share the cores; following torch's
    setting makes ``torch.set_num_threads`` (and ``OMP_NUM_THREADS``, which torch reads) the one
    knob for both. docs/torch.md has the measurement behind this choice.
    """
    explicit = _explicit_threads()
    return resolve_threads(explicit if explicit is not None else torch.get_num_threads())
