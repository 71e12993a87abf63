"""adamgen's contenders: the loader's pick, every variant forced by name, and a bare C call.

The variants are not listed here: they are enumerated from the runtime, so the benchmark follows
the runtime as variants are added or renamed. :func:`variants_of` asks the loader: it runs one
call and reads the candidate names of the decisions that call made
(:func:`adamgen.runtime.variant_choice.decisions`; every decision records the seconds of each candidate
it measured). A forced contender sets ``ADAMGEN_VARIANT=<name>`` around its bursts (outside the
timed region) and has adamgen re-read its environment; :func:`forcing_works` checks once that
this takes effect (a name no candidate has must raise :class:`adamgen.ConfigError`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import adamgen
from adamgen import config as adamgen_config
from adamgen.config import KernelConfig
from adamgen.errors import ConfigError
from adamgen.interface import SpecRef
from adamgen.runtime import variant_choice

from .peers import BETA1, BETA2, EPSILON, LR, Counter
from .timing import Contender

VARIANT_VARIABLE = "ADAMGEN_VARIANT"


def _set_variant(name: str | None) -> None:
    """Set (or clear) ``ADAMGEN_VARIANT`` and make adamgen read it again.

    adamgen parses its environment once per process for the hot path; a tool changing it at
    run time asks for a re-read (``refresh_environment``, where the runtime has one).
    """
    if name is None:
        os.environ.pop(VARIANT_VARIABLE, None)
    else:
        os.environ[VARIANT_VARIABLE] = name
    refresh = getattr(adamgen_config, "refresh_environment", None)
    if refresh is not None:
        refresh()


def variants_of(run_once: Callable[[], object]) -> list[str]:
    """The variant names the loader chooses between for the call ``run_once`` makes.

    In-memory decisions are dropped first (:func:`adamgen.runtime.variant_choice.forget`), so the call
    decides again (from the cache dir, or by measuring) and its decisions can be read back.
    An empty list means the loader had nothing to choose (one candidate, or no loader call).
    """
    _set_variant(None)
    variant_choice.forget()
    run_once()
    names: list[str] = []
    for decision in variant_choice.decisions():
        for name in decision.seconds:
            if name not in names:
                names.append(name)
    return names


def forcing_works(run_once: Callable[[], object]) -> bool:
    """True if ``ADAMGEN_VARIANT`` takes effect (a bogus name makes ``run_once`` raise).

    ``run_once`` must not have run before: an optimizer asks the loader on its first step only.
    """
    try:
        _set_variant("adamgen-bench-no-such-variant")  # may already be refused when parsed
        run_once()
    except ConfigError:
        return True
    except Exception:  # noqa: BLE001 - anything else: forcing cannot be trusted
        return False
    finally:
        _set_variant(None)
    return False


def _forced(name: str, make_call: Callable[[], Callable[[], object]]) -> Contender:
    """A contender running ``make_call()``'s callable with ``ADAMGEN_VARIANT=name``."""
    _set_variant(name)
    try:
        call = make_call()
    finally:
        _set_variant(None)
    return Contender(f"adamgen[{name}]", "variant", call, enter=lambda: _set_variant(name),
                     leave=lambda: _set_variant(None))


def with_variants(make_call: Callable[[], Callable[[], object]], *,
                  forced: bool) -> list[Contender]:
    """The loader's pick, plus (when ``forced``) one contender per variant it chooses from."""
    pick = make_call()
    contenders = [Contender("adamgen", "adamgen", pick)]
    if not forced:
        return contenders
    names = variants_of(pick)
    # a fresh call object: the optimizer asks the loader once per group, on its first step
    if names and forcing_works(make_call()):
        contenders += [_forced(name, make_call) for name in names]
    return contenders


# -- the calls -----------------------------------------------------------------------------------

def optimizer_step(params: Sequence[np.ndarray], grads: Sequence[np.ndarray], *,
                   pass_grads: bool = False) -> Callable[[], object]:
    """``adamgen.Adam(params).step()`` with owned grads (copied in once), or ``.step(grads)``."""
    optimizer = adamgen.Adam(list(params), lr=LR, beta1=BETA1, beta2=BETA2, epsilon=EPSILON)
    if pass_grads:
        grad_list = list(grads)
        return lambda: optimizer.step(grad_list)
    owned_grads = optimizer.grads
    assert isinstance(owned_grads, list)  # params is a list, so grads is too
    for owned, g in zip(owned_grads, grads):
        owned[...] = g
    return optimizer.step


def functional_call(w: np.ndarray, g: np.ndarray, m: np.ndarray,
                    v: np.ndarray) -> Callable[[], object]:
    """``adamgen.adam_update(w, g, lr, m, v, t)``: three fresh outputs per call."""
    counter = Counter()
    update = adamgen.adam_update
    return lambda: update(w, g, LR, m, v, counter.next(), beta1=BETA1, beta2=BETA2,
                          epsilon=EPSILON)


def _c_kernel_and_scalars(dtype: str) -> tuple[Any, tuple[float, ...]] | None:
    """adamgen's compiled kernels for ``dtype`` (``lr`` a scalar) and step-1 scalars, or None."""
    try:
        from adamgen.runtime.c_kernels import c_kernel
        from adamgen.runtime.numpy_kernels import numpy_kernel
    except ImportError:
        return None
    config = KernelConfig(spec=SpecRef("ivy_adam"), dtype=dtype,
                          scalar_tensors=frozenset({"lr"}))
    kernel = c_kernel(config)
    if kernel is None:
        return None
    module = numpy_kernel(config)
    hyper = {"beta1": BETA1, "beta2": BETA2, "epsilon": EPSILON, "step": 1.0}
    return kernel, tuple(module.prelude(*(hyper[name] for name in module.HYPERPARAMETERS)))


def kernel_contenders(w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *,
                      functional: bool, threads: int) -> list[Contender]:
    """adamgen's C kernels called directly (no validation, no variant choice): what dispatch costs.

    ``C kernel serial`` always; ``C kernel OpenMP`` at more than one thread when built with
    OpenMP. Empty when the runtime has no C kernels.
    """
    found = _c_kernel_and_scalars(w.dtype.name)
    if found is None:
        return []
    kernel, scalars = found
    counts = [1] + ([threads] if threads > 1 and kernel.openmp else [])
    contenders = []
    for count in counts:
        label = "C kernel serial" if count == 1 else "C kernel OpenMP"
        if functional:
            def call(count: int = count) -> object:
                outs = (np.empty_like(w), np.empty_like(m), np.empty_like(v))
                kernel.functional(w, g, LR, m, v, scalars, *outs, threads=count)
                return outs
        else:
            def call(count: int = count) -> object:
                return kernel.inplace_all(w, g, LR, m, v, scalars, threads=count)
        contenders.append(Contender(label, "kernel", call))
    return contenders


def multi_kernel_contenders(ws: Sequence[np.ndarray], gs: Sequence[np.ndarray],
                            ms: Sequence[np.ndarray], vs: Sequence[np.ndarray], *,
                            threads: int) -> list[Contender]:
    """adamgen's multi-tensor C kernel called directly with pointer lists gathered once."""
    found = _c_kernel_and_scalars(ws[0].dtype.name)
    if found is None or "multi_inplace" not in found[0].forms:
        return []
    kernel, scalars = found
    lists = (kernel.pointers(ws, writable=True), kernel.pointers(gs),
             kernel.pointers(ms, writable=True), kernel.pointers(vs, writable=True))
    counts = [1] + ([threads] if threads > 1 and kernel.openmp else [])
    return [Contender("C kernel serial" if count == 1 else "C kernel OpenMP", "kernel",
                      lambda count=count: kernel.multi_inplace(  # type: ignore[misc]
                          lists[0], lists[1], LR, lists[2], lists[3], scalars, threads=count))
            for count in counts]


def bare_c_call(w: np.ndarray, g: np.ndarray, m: np.ndarray,
                v: np.ndarray) -> Callable[[], object] | None:
    """adamgen's serial in-place C entry point called through cffi with cached pointers.

    The floor of per-call cost: no validation, no dispatch, no pointer gathering. None when the
    runtime has no C kernels (no compiler, or a runtime without ``c_kernels``).
    """
    found = _c_kernel_and_scalars(w.dtype.name)
    if found is None:
        return None
    kernel, prelude = found
    try:
        function = next(f for f in kernel.functions.values()
                        if f.form == "inplace_all" and not f.threaded)
    except StopIteration:
        return None
    scalars = iter(prelude)
    arrays = {"w": w, "dcdw": g, "mw_tm1": m, "vw_tm1": v}
    ffi = kernel.ffi
    args: list[Any] = []
    for name, ctype, role in function.parameters:
        if role in ("in", "inout"):
            args.append(ffi.cast(ctype.replace("restrict", "").replace("const", "").strip(),
                                 arrays[name].ctypes.data))
        elif role == "value":
            args.append(LR)
        elif role == "scalar":
            args.append(next(scalars))
        elif role == "n":
            args.append(w.size)
        else:
            return None
    c_function = getattr(kernel.lib, function.symbol)
    return lambda: c_function(*args)
