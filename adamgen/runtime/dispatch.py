"""Which kernel variants fit a call, and how to run each: the loader's view of the backends.

For a buffered update (one float dtype, every output of the full shape) the candidates are:

* ``numpy``: the generated NumPy module, always available;
* ``c``: the C kernel, serial;
* ``c-omp``: the C kernel, threaded (when OpenMP built and more than one thread is allowed).

C needs every array argument either of the full shape (copied to C order when it is not: a
documented copy, one extra pass) or of size one (then passed as a scalar, never materialised), and
the outputs C-contiguous; every array element-aligned (a misaligned typed pointer is undefined
behaviour in C). Anything else runs on NumPy, which broadcasts and strides natively.
:func:`adamgen.runtime.variant_choice.choose` times the candidates once per size bucket on scratch arrays
and remembers the winner; because every exact variant gives the same bits, the choice only
changes speed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ..config import current_environment
from ..errors import InexactVariantError
from . import variant_choice
from .c_kernels import CKernel, default_threads
from .guard import ThreadGuard
from .outputs import empty_outputs
from .source import KernelSource

#: Below this many elements threads cost more than they bring (OpenMP start-up; measured
#: 1.41 us against 0.78 us at 1e3 in PERFORMANCE-NOTES), so ``c-omp`` is not even a candidate.
THREADING_THRESHOLD = 4096


def variants(kernel: CKernel | None, size: int) -> tuple[str, ...]:
    """The variants that fit: NumPy always; C when it built; threaded C for large enough work.
    (A caller drops NumPy where it declines the rule: see :func:`exact_variants`.)"""
    if kernel is None:
        return ("numpy",)
    if kernel.openmp and default_threads() > 1 and size >= THREADING_THRESHOLD:
        return ("numpy", "c", "c-omp")
    return ("numpy", "c")


def exact_variants(module: ModuleType, kernel: CKernel | None,
                   size: int) -> tuple[str, ...]:
    """:func:`variants`, without NumPy where its module declines the rule (it cannot compute
    some operation exactly): the loader never picks a variant that would change a bit.

    Raises:
        InexactVariantError: no variant is exact (no C kernel here), or ``ADAMGEN_VARIANT=numpy``
            forces one that is not.
    """
    found = variants(kernel, size)
    if module.EXACT:
        return found
    if current_environment().variant == "numpy":
        raise InexactVariantError(f"ADAMGEN_VARIANT=numpy cannot serve this call: "
                                  f"{module.INEXACT}")
    if kernel is None:
        raise InexactVariantError(f"{module.INEXACT}; no C kernel serves this call here (no "
                                  "C compiler, ADAMGEN_BACKEND=numpy, or arguments C cannot "
                                  "take: every array of one shape, contiguous and aligned)")
    return found[1:]


def threading(variant: str) -> dict[str, int]:
    """C call options: serial, or every thread from the first element (the loader measured)."""
    return {"threads": 1} if variant == "c" else {"threads": default_threads(), "threshold": 0}


def forget() -> None:
    """Drop the loader-problem memo (tests that switch cache directories), and the call plans
    that hold kernels."""
    _descriptions.clear()
    variant_choice.forget_dependents()


def scalars_for(kernel: CKernel, source: KernelSource, hyper: Mapping[str, float],
                scalars: tuple[float, ...]) -> tuple[float, ...]:
    """The prelude's scalars in the C kernel's order (fast mode reorders with the signature):
    from the NumPy module of the kernel's own configuration."""
    if kernel.config.mode == "exact":
        return scalars
    module = source.numpy(kernel.config)
    assert module is not None
    return module.prelude(*(hyper[name] for name in module.HYPERPARAMETERS))


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
          hyper: Mapping[str, float], buffers: Sequence[np.ndarray], in_place: bool, *,
          source: KernelSource) -> Route:
    """Which variant runs a buffered update, on which C kernel, with which C arguments.

    Nothing is written (the loader measures on scratch arrays). :func:`run_update` follows the
    route; the functional API's shortcuts (:mod:`adamgen.runtime.hotpath`) remember it.
    """
    full = buffers[0]
    plan = (_c_arguments(tensors, full)
            if all(b.flags.c_contiguous and b.flags.aligned for b in buffers) else None)
    kernel = None
    if plan is not None:
        kernel = source.c_kernel(module.DTYPE, plan[1])
        if kernel is not None and in_place and (_replaced(module) in plan[1]
                                                or "inplace_parameter" not in kernel.forms):
            kernel = None
    candidates = exact_variants(module, kernel, full.size)
    if full.size and (len(candidates) > 1 or current_environment().variant is not None):
        problem, context = _describe(module, kernel, plan[1] if plan else None, in_place)
        variant = variant_choice.choose(
            problem, full.size, candidates, context,
            lambda m: _update_timers(module, kernel, source, tensors, scalars, hyper, plan, m,
                                     in_place, candidates),
            full.dtype.itemsize)
        guard = variant_choice.guard(problem, full.size, candidates, context)
    else:
        variant, guard = candidates[0], None
    return Route(variant, kernel, plan, guard if variant in variant_choice.THREADED else None)


def run_update(module: ModuleType, tensors: Mapping[str, Any], scalars: tuple[float, ...],
               hyper: Mapping[str, float], buffers: Sequence[np.ndarray], in_place: bool, *,
               source: KernelSource) -> None:
    """One buffered update into ``buffers`` (``buffers[0]`` is the input the first output
    replaces when ``in_place``)."""
    variant, kernel, plan, guard = route(module, tensors, scalars, hyper, buffers, in_place,
                                         source=source)
    if variant == "numpy":
        arrays = tuple(tensors.values())
        with np.errstate(all="ignore"):  # inf and NaN are values here (see api.run_numpy)
            module.update(*arrays, scalars, *buffers)
        return
    assert kernel is not None and plan is not None
    run = kernel.inplace_parameter if in_place else kernel.functional
    arguments = (*plan[0], scalars_for(kernel, source, hyper, scalars),
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
    key = (module.SPEC_HASH, module.DTYPE, module.MODE, id(kernel), scalar_names, in_place)
    found = _descriptions.get(key)
    if found is None:
        form = "inplace" if in_place else "functional"
        rule = module.INTERFACE["rule"]
        problem = (f"{rule} {form} {module.DTYPE} {module.MODE} "
                   f"scalar({','.join(sorted(scalar_names))})"
                   if scalar_names is not None else f"{rule} {form} {module.DTYPE} numpy-only")
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


def _replaced(module: ModuleType) -> str | None:
    """The input the rule's first output replaces in place (``w`` for ``w_new``), if any."""
    first = module.OUTPUTS[0]
    return next((p["input"] for p in module.INTERFACE["state"] if p["output"] == first), None)


def _run_kernel(run: Callable[..., None], inputs: list[Any], scalars: Any, outputs: list[Any],
                options: dict[str, Any]) -> None:
    run(*inputs, scalars, *outputs, **options)


def _timing_outputs(replaced: Any, in_place: bool, count: int, m: int,
                    dtype: np.dtype) -> list[np.ndarray]:
    """Outputs laid out as the real call's: the functional API's come from the aligned pool
    (the C kernel streams into outputs that share an alignment); in place, the replaced input
    is the first."""
    if in_place:
        return [replaced] + [np.empty(m, dtype) for _ in range(count - 1)]
    return empty_outputs(count, (m,), dtype)


def _update_timers(module: ModuleType, kernel: CKernel | None, source: KernelSource,
                   tensors: Mapping[str, Any], scalars: tuple[float, ...],
                   hyper: Mapping[str, float], plan: CArguments | None, m: int, in_place: bool,
                   variants: tuple[str, ...]) -> dict[str, Callable[[], None]]:
    """Timing closures on scratch arrays of ``m`` elements: copies, never the caller's arrays
    (a size-one argument is copied too: with ``out=w`` the timed in-place run writes into it)."""
    dtype = np.dtype(module.DTYPE)
    numpy_in = [value.reshape(-1).copy() if isinstance(value, np.ndarray) and value.size == 1
                else value if not isinstance(value, np.ndarray)
                else np.full(m, 0.5 + 0.25 * i, dtype) for i, value in enumerate(tensors.values())]
    names = list(tensors)
    replaced_name = _replaced(module) if in_place else None
    replaced = names.index(replaced_name) if replaced_name is not None else 0
    count = len(module.OUTPUTS)
    outputs = _timing_outputs(numpy_in[replaced], in_place, count, m, dtype)

    def numpy_timer() -> None:
        with np.errstate(all="ignore"):  # as run_update calls it
            module.update(*numpy_in, scalars, *outputs)

    timers: dict[str, Callable[[], None]] = {"numpy": numpy_timer} if "numpy" in variants else {}
    if kernel is not None and plan is not None:
        c_in = [a if not isinstance(a, np.ndarray) else np.full(m, 0.5 + 0.25 * i, dtype)
                for i, a in enumerate(plan[0])]
        c_scalars = scalars_for(kernel, source, hyper, scalars)
        c_out = _timing_outputs(c_in[replaced], in_place, count, m, dtype)
        run = kernel.inplace_parameter if in_place else kernel.functional
        tail = c_out[1:] if in_place else c_out
        for variant in (v for v in variants if v != "numpy"):
            options = threading(variant)
            timers[variant] = functools.partial(_run_kernel, run, c_in, c_scalars, tail, options)
    return timers
