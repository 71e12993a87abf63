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
shared by the tensors of its row, of its dtype in the kernel (the parameter's dtype, or float32
for the state of the master-weight modes); rows never overlap one another; a gradient overlaps
nothing the call writes.

**Mixed precision.** A bfloat16 or float16 parameter is updated in one of three modes
(:data:`MODES`), each a spec of its own: ``torch`` is the rule's ``precision`` variant (torch's
per-op rounding, state in the parameter's dtype); ``master`` and ``stochastic`` are the rule's
master-weight forms (:mod:`adamgen.mixed`: float32 master and state, the parameter the master
rounded to nearest even or stochastically). A stochastic kernel also takes the random stream's
seed, the step and one key per row.

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

from .. import ieee
from ..config import KernelConfig, current_environment, environment
from ..errors import AdamgenError
from ..interface import Interface
from ..rules import builtin
from ..runtime import memory
from ..runtime.c_kernels import c_kernel, resolve_threads
from ..runtime.numpy_kernels import numpy_kernel
from ..runtime.precision import variant_ref

#: ``[(name, start, end)]`` -> the names of two ranges sharing a byte, or None
first_overlap = memory.first_overlap

#: How a bfloat16/float16 parameter is updated (see the module docstring).
MODES = ("torch", "master", "stochastic")
#: Parameter dtypes with mixed-precision modes; their kernels compute in float32.
LOW_PRECISION = ("bfloat16", "float16")


def kernel_config(rule: str, options: tuple[tuple[str, Any], ...], mode: str,
                  dtype: str) -> KernelConfig:
    """The kernel a group with these options runs on parameters of ``dtype`` in ``mode``
    (:mod:`adamgen.runtime.precision` picks the variant; ``torch`` is its ``rule`` mode)."""
    ref = variant_ref(builtin(rule).ref(**dict(options)), dtype,
                      "rule" if mode == "torch" else mode)
    return KernelConfig(spec=ref, dtype="float32" if dtype in LOW_PRECISION else dtype,
                        mode="exact")


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
    #: per row, the random stream's key (``uint32``); None for a kernel without randomness
    keys: np.ndarray | None = None
    keys_cdata: Any = None


class RuleKernel:
    """One rule (with its options) for one dtype: the prelude and the multi-tensor call.

    Attributes:
        rule: the built-in rule's name (``torch_adam``, ``torch_adamw``, ``lion``).
        dtype: the parameters' dtype (``float32``, ``float64``, ``bfloat16``, ``float16``).
        mode: how a bfloat16/float16 parameter is updated (one of :data:`MODES`).
        tensors: the rule's tensors in table order.
        hyperparameters: the prelude's arguments, in order.
        storage: each tensor's dtype in the kernel, by name.
        init: each state tensor's start (``zero``, or ``parameter`` for master weights).
        random: whether a call takes the random stream (stochastic rounding).
        c: True when a compiled C kernel serves (else NumPy).
    """

    def __init__(self, rule: str, options: tuple[tuple[str, Any], ...], dtype: str,
                 mode: str = "torch") -> None:
        self.rule, self.options, self.dtype, self.mode = rule, options, dtype, mode
        config = kernel_config(rule, options, mode, dtype)
        module = numpy_kernel(config)
        interface = Interface.from_json(module.INTERFACE)
        self.tensors: tuple[str, ...] = interface.tensor_names
        self.hyperparameters: tuple[str, ...] = tuple(module.HYPERPARAMETERS)
        self.storage = {name: interface.storage(name, config.dtype) for name in self.tensors}
        self.init = {p.label: p.init for p in interface.owned_state}
        self.random = bool(getattr(module, "STREAMS", ()))
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
            self._ctypes = kernel.element_ctypes()
            symbol = f"{kernel.config.spec.name}_multi_inplace"
            self._serial = kernel.function(symbol).c_function
            threaded = kernel.functions.get(f"{symbol}_omp")
            self._threaded = threaded.c_function if threaded is not None else None
            self.threshold = kernel.threshold
        else:
            numpy_module = numpy_kernel(KernelConfig(
                spec=config.spec, dtype=config.dtype, mode="exact", aliases=interface.in_place))
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

    def tables(self, arrays: Sequence[np.ndarray], sizes: np.ndarray,
               keys: np.ndarray | None = None) -> Tables:
        """Wrap pointer tables (``uintp`` arrays, one per tensor of the rule), sizes and, for
        a random kernel, the rows' stream keys (``uint32``)."""
        keys_cdata = None
        if self.c:
            cdata = tuple(self.ffi.cast(f"{self._ctypes[name]} **", a.ctypes.data)
                          for name, a in zip(self.tensors, arrays))
            sizes_cdata = self.ffi.cast("int64_t *", sizes.ctypes.data)
            if self.random:
                assert keys is not None
                keys_cdata = self.ffi.cast("uint32_t *", keys.ctypes.data)
        else:
            cdata, sizes_cdata = (), None
        return Tables(tuple(arrays), sizes, cdata, sizes_cdata, len(sizes), int(sizes.sum()),
                      keys, keys_cdata)

    def run(self, tables: Tables, scalars: tuple[float, ...],
            rng: tuple[int, int] | None = None) -> None:
        """Update every row of ``tables`` in place: threaded (:func:`thread_count` threads)
        from the kernel's size threshold on, when OpenMP built; serial below it. ``rng``:
        ``(seed, step)`` of a random kernel's stream."""
        if self._numpy is not None:
            self._run_numpy(tables, scalars, rng)
            return
        stream = () if rng is None else (rng[0], rng[1] & 0xFFFFFFFF, tables.keys_cdata)
        if self._threaded is not None and tables.total >= self.threshold and \
                (threads := thread_count()) > 1:
            self._threaded(*tables.cdata, *scalars, *stream, tables.sizes_cdata, tables.count,
                           threads, self.threshold)
        else:
            self._serial(*tables.cdata, *scalars, *stream, tables.sizes_cdata, tables.count)

    def _run_numpy(self, tables: Tables, scalars: tuple[float, ...],
                   rng: tuple[int, int] | None) -> None:
        """The fallback: the in-place NumPy module on arrays made from the pointers."""
        update = self._numpy.update
        dtypes = {name: ieee.STORAGE_NUMPY[storage] for name, storage in self.storage.items()}
        written = [name for name in self.tensors if name != "grad"]
        for row, size in enumerate(tables.sizes.tolist()):
            views = {name: _array_at(int(table[row]), size, dtypes[name])
                     for name, table in zip(self.tensors, tables.arrays)}
            stream: tuple[tuple[int, int, int], ...] = ()
            if rng is not None:
                assert tables.keys is not None
                stream = ((rng[0], rng[1] & 0xFFFFFFFF, int(tables.keys[row])),)
            with np.errstate(all="ignore"):
                update(*(views[name] for name in self.tensors), scalars, *stream,
                       *(views[name] for name in written))


def _array_at(address: int, size: int, dtype: np.dtype) -> np.ndarray:
    """A NumPy array over ``size`` elements at ``address`` (the caller keeps the memory alive)."""
    if size == 0:
        return np.empty(0, dtype)
    interface = {"data": (address, False), "shape": (size,), "typestr": dtype.str, "version": 3}
    holder = type("_At", (), {"__array_interface__": interface})()
    return np.asarray(holder)


@functools.cache
def rule_kernel(rule: str, options: tuple[tuple[str, Any], ...], dtype: str,
                mode: str = "torch") -> RuleKernel:
    """The kernel of a built-in rule for one parameter dtype and mode, memoised per process."""
    return RuleKernel(rule, options, dtype, mode)


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
