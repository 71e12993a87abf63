"""Which kernel variants fit a call, and how to run each: the loader's view of the backends.

For a buffered update (one float dtype, every output of the full shape) the candidates are:

* ``numpy``: the generated NumPy module, always available;
* ``c``: the C kernel, serial;
* ``c-omp``: the C kernel, threaded (when OpenMP built and more than one thread is allowed).

C needs every array argument either of the full shape (copied to C order when it is not: a
documented copy, one extra pass) or of size one (then passed as a scalar, never materialised), and
the outputs C-contiguous; every array element-aligned (a misaligned typed pointer is undefined
behaviour in C). Anything else runs on NumPy, which broadcasts and strides natively.
:func:`adamgen.runtime.loader.choose` times the candidates once per size bucket on scratch arrays
and remembers the winner; because every exact variant gives the same bits, the choice only
changes speed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ..config import KernelConfig, current_environment
from . import loader
from .c_kernels import CKernel, c_kernel, default_threads
from .guard import ThreadGuard
from .kernels import numpy_kernel
from .outputs import empty_outputs

C_DTYPES = ("float32", "float64")


#: Below this many elements threads cost more than they bring (OpenMP start-up; measured
#: 1.41 us against 0.78 us at 1e3 in PERFORMANCE-NOTES), so ``c-omp`` is not even a candidate.
THREADING_THRESHOLD = 4096


def variants(kernel: CKernel | None, size: int) -> tuple[str, ...]:
    """The variants that fit: NumPy always; C when it built; threaded C for large enough work."""
    if kernel is None:
        return ("numpy",)
    if kernel.openmp and default_threads() > 1 and size >= THREADING_THRESHOLD:
        return ("numpy", "c", "c-omp")
    return ("numpy", "c")


def threading(variant: str) -> dict[str, int]:
    """C call options: serial, or every thread from the first element (the loader measured)."""
    return {"threads": 1} if variant == "c" else {"threads": default_threads(), "threshold": 0}


_kernels: dict[tuple[str, str, frozenset[str]], CKernel | None] = {}


def forget() -> None:
    """Drop memoised C kernels (tests that switch cache directories), and the call plans that
    hold them."""
    _kernels.clear()
    _descriptions.clear()
    loader.forget_dependents()


def c_kernel_for(dtype: str, scalar_tensors: frozenset[str]) -> CKernel | None:
    env = current_environment()
    if env.backend == "numpy" or dtype not in C_DTYPES:
        return None
    key = (dtype, env.mode, scalar_tensors)
    if key not in _kernels:
        _kernels[key] = c_kernel(KernelConfig(dtype=dtype, mode=env.mode,
                                              scalar_tensors=scalar_tensors))
    return _kernels[key]


def scalars_for(kernel: CKernel, hyper: Mapping[str, float],
                 scalars: tuple[float, ...]) -> tuple[float, ...]:
    """The prelude's scalars in the C kernel's order (fast mode reorders with the signature).

    The prelude comes from the NumPy module of the kernel's own configuration: the kernel's
    ``prelude_module`` when its provider set one (a generated package), else the JIT cache's.
    """
    if kernel.config.mode == "exact":
        return scalars
    module = getattr(kernel, "prelude_module", None) or numpy_kernel(kernel.config)
    return module.prelude(*(hyper[name] for name in module.HYPERPARAMETERS))


#: Returns the C kernel for (dtype, scalar tensors), or None: the JIT cache's by default.
CKernelProvider = Callable[[str, frozenset[str]], "CKernel | None"]


#: The tensors as C takes them (arrays, and numbers for scalar tensors), and which are scalars.
CArguments = tuple[list[Any], frozenset[str]]


class Route(NamedTuple):
    """How a buffered update runs: the variant, its C kernel and C arguments (None for NumPy),
    and for a measured threaded pick the guard that watches its calls."""

    variant: str
    kernel: CKernel | None
    arguments: CArguments | None
    guard: ThreadGuard | None


def route(module: ModuleType, tensors: Mapping[str, Any], scalars: tuple[float, ...],
          hyper: Mapping[str, float], buffers: Sequence[np.ndarray], in_place: bool,
          c_kernels: CKernelProvider | None = None) -> Route:
    """Which variant runs a buffered update, on which C kernel, with which C arguments.

    Nothing is written (the loader measures on scratch arrays). :func:`run_update` follows the
    route; the functional API's shortcuts (:mod:`adamgen.runtime.hotpath`) remember it.
    """
    full = buffers[0]
    plan = (_c_arguments(tensors, full)
            if all(b.flags.c_contiguous and b.flags.aligned for b in buffers) else None)
    kernel = None
    if plan is not None:
        kernel = (c_kernels or c_kernel_for)(module.DTYPE, plan[1])
        if kernel is not None and in_place and "w" in plan[1]:
            kernel = None
    candidates = variants(kernel, full.size)
    if full.size and (len(candidates) > 1 or current_environment().variant is not None):
        problem, context = _describe(module, kernel, plan[1] if plan else None, in_place)
        variant = loader.choose(
            problem, full.size, candidates, context,
            lambda m: _update_timers(module, kernel, tensors, scalars, hyper, plan, m, in_place,
                                     candidates),
            full.dtype.itemsize)
        guard = loader.guard(problem, full.size, candidates, context)
    else:
        variant, guard = "numpy", None
    return Route(variant, kernel, plan, guard if variant in loader.THREADED else None)


def run_update(module: ModuleType, tensors: Mapping[str, Any], scalars: tuple[float, ...],
               hyper: Mapping[str, float], buffers: Sequence[np.ndarray], in_place: bool,
               c_kernels: CKernelProvider | None = None) -> None:
    """One buffered update into ``buffers`` (``buffers[0] is w`` when ``in_place``)."""
    variant, kernel, plan, guard = route(module, tensors, scalars, hyper, buffers, in_place,
                                         c_kernels)
    if variant == "numpy":
        arrays = tuple(tensors.values())
        with np.errstate(all="ignore"):  # inf and NaN are values here (see api.run_numpy)
            module.update(*arrays, scalars, *buffers)
        return
    assert kernel is not None and plan is not None
    run = kernel.inplace_parameter if in_place else kernel.functional
    arguments = (*plan[0], scalars_for(kernel, hyper, scalars),
                 *(buffers[1:] if in_place else buffers))
    if guard is None:
        run(*arguments, **threading(variant))
    else:  # threads while they keep their promise (a busy neighbour breaks it)
        guard.run(lambda: run(*arguments, **threading(variant)),
                  lambda: run(*arguments, threads=1), buffers[0].size)


_descriptions: dict[tuple, tuple[str, dict[str, str]]] = {}


def _describe(module: ModuleType, kernel: CKernel | None, scalar_names: frozenset[str] | None,
              in_place: bool) -> tuple[str, dict[str, str]]:
    """The loader's problem name and context for a call, memoised (the hot path asks often)."""
    key = (module.DTYPE, module.MODE, id(kernel), scalar_names, in_place)
    found = _descriptions.get(key)
    if found is None:
        form = "inplace" if in_place else "functional"
        problem = (f"{form} {module.DTYPE} {module.MODE} scalar({','.join(sorted(scalar_names))})"
                   if scalar_names is not None else f"{form} {module.DTYPE} numpy-only")
        context = {"c": kernel.cache_key if kernel else "", "threads": str(default_threads())}
        found = _descriptions[key] = (problem, context)
    return found


def _c_arguments(tensors: Mapping[str, Any], full: np.ndarray) -> CArguments | None:
    """The tensors as C takes them, and which are scalars; None when C cannot take them."""
    size = full.size
    arguments: list[Any] = []
    scalar_names = []
    for name, value in tensors.items():
        if not isinstance(value, np.ndarray):
            arguments.append(float(value))
            scalar_names.append(name)
        elif value.size == 1 and size != 1:
            arguments.append(float(value.reshape(-1)[0]))
            scalar_names.append(name)
        elif value.shape != full.shape or not value.flags.aligned:
            return None  # a partial broadcast, or misaligned elements: NumPy handles them
        else:
            arguments.append(value if value.flags.c_contiguous else np.ascontiguousarray(value))
    return arguments, frozenset(scalar_names)


def _scratch_like(value: Any, m: int, dtype: np.dtype, fill: float) -> Any:
    return value if not isinstance(value, np.ndarray) else np.full(m, fill, dtype)


def _timing_outputs(w: Any, in_place: bool, m: int, dtype: np.dtype) -> list[np.ndarray]:
    """Outputs laid out as the real call's: the functional API's come from the aligned pool
    (the C kernel streams into outputs that share an alignment), in place ``w`` is one."""
    if in_place:
        return [w, np.empty(m, dtype), np.empty(m, dtype)]
    return empty_outputs(3, (m,), dtype)


def _update_timers(module: ModuleType, kernel: CKernel | None, tensors: Mapping[str, Any],
                   scalars: tuple[float, ...], hyper: Mapping[str, float],
                   plan: CArguments | None, m: int, in_place: bool,
                   variants: tuple[str, ...]) -> dict[str, Callable[[], None]]:
    """Timing closures on scratch arrays of ``m`` elements: copies, never the caller's arrays
    (a size-one argument is copied too: with ``out=w`` the timed in-place run writes into it)."""
    dtype = np.dtype(module.DTYPE)
    numpy_in = [value.reshape(-1).copy() if isinstance(value, np.ndarray) and value.size == 1
                else value if not isinstance(value, np.ndarray)
                else np.full(m, 0.5 + 0.25 * i, dtype) for i, value in enumerate(tensors.values())]
    outputs = _timing_outputs(numpy_in[0], in_place, m, dtype)
    def numpy_timer() -> None:
        with np.errstate(all="ignore"):  # as run_update calls it
            module.update(*numpy_in, scalars, *outputs)

    timers: dict[str, Callable[[], None]] = {"numpy": numpy_timer}
    if kernel is not None and plan is not None:
        c_in = [a if not isinstance(a, np.ndarray) else np.full(m, 0.5 + 0.25 * i, dtype)
                for i, a in enumerate(plan[0])]
        c_scalars = scalars_for(kernel, hyper, scalars)
        c_out = _timing_outputs(c_in[0], in_place, m, dtype)
        run = kernel.inplace_parameter if in_place else kernel.functional
        tail = c_out[1:] if in_place else c_out
        for variant in variants[1:]:
            options = threading(variant)
            timers[variant] = lambda options=options: run(*c_in, c_scalars, *tail, **options)
    return timers
