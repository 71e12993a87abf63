"""The pipeline in order, one line a stage: spec -> lower -> render.

:func:`create_kernel` reads like the pipeline it runs (pystencils' ``create_kernel(config)`` is
the model): the configuration names the rule (:attr:`KernelConfig.spec`), and each stage takes
the previous stage's frozen result. Build and load (cache, compiler) belong to
:mod:`adamgen.codegen.build` and the runtime; this module only produces sources. It is imported on
a cache miss, never on the hot path, because it pulls in SymPy and Jinja.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import KernelConfig
from ..interface import Interface
from ..rules import resolve
from ..spec import UpdateSpec
from .c_backend import CKernelSource, render_c_module
from .ir import KernelIR
from .lower import lower
from .numpy_backend import render_numpy_module


@dataclass(frozen=True)
class GeneratedKernel:
    """What the pipeline produced for one configuration: the IR and the NumPy module's source,
    and (when asked for) the C file with every alias form."""

    ir: KernelIR
    numpy_source: str
    c: CKernelSource | None


def spec_for(config: KernelConfig) -> UpdateSpec:
    """The spec ``config`` names (built-in rules are built here, on a miss)."""
    return resolve(config.spec)


def kernel_ir(config: KernelConfig, spec: UpdateSpec | None = None) -> KernelIR:
    """spec -> IR for ``config``."""
    return lower(spec if spec is not None else spec_for(config), config)


def numpy_source(config: KernelConfig, spec: UpdateSpec | None = None) -> str:
    """spec -> IR -> NumPy module source."""
    return render_numpy_module(kernel_ir(config, spec))


def alias_forms(interface: Interface) -> dict[str, frozenset[tuple[str, str]]]:
    """The forms a C file holds, each as its ``(output, input it overwrites)`` pairs: the
    functional form; the parameter's output written over the parameter (``out=w``); every state
    pair in place (an optimizer's step, also over many tensors at once)."""
    forms: dict[str, frozenset[tuple[str, str]]] = {"functional": frozenset()}
    parameter = [p for p in interface.state if p.input == interface.parameter]
    if parameter:
        forms["inplace_parameter"] = frozenset({(parameter[0].output, parameter[0].input)})
    if interface.state:
        forms["inplace_all"] = interface.in_place
    return forms


def c_source(config: KernelConfig, spec: UpdateSpec | None = None, *, openmp: bool = True,
             flags: tuple[str, ...] = ()) -> CKernelSource:
    """spec -> IR (one per alias form) -> one C file holding every form, and its cffi cdef.

    ``config.aliases`` is ignored: the file holds every form of :func:`alias_forms`. A form whose
    overwritten input is a scalar tensor is left out.
    """
    spec = spec if spec is not None else spec_for(config)
    irs = {name: kernel_ir(replace(config, aliases=aliases), spec)
           for name, aliases in alias_forms(spec.interface).items()
           if not {source for _, source in aliases} & config.scalar_tensors}
    return render_c_module(irs, openmp=openmp, flags=flags)


def create_kernel(config: KernelConfig, *, with_c: bool = False, openmp: bool = True,
                  flags: tuple[str, ...] = ()) -> GeneratedKernel:
    """The whole pipeline for one configuration: spec -> lower -> render."""
    spec = spec_for(config)
    ir = kernel_ir(config, spec)
    numpy = render_numpy_module(ir)
    c = c_source(config, spec, openmp=openmp, flags=flags) if with_c else None
    return GeneratedKernel(ir, numpy, c)
