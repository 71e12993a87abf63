"""Where a rule's kernels come from: the JIT cache, or a generated package.

Every runtime entry (the functional update, the in-place optimizer, the VJP) is generic: it is
given a :class:`KernelSource` for one rule and asks it for the kernel of a configuration. The
source fills in what is the rule's (its :class:`~adamgen.interface.SpecRef`, the constants a
generated package was specialised for) and what is the process's (``ADAMGEN_MODE``,
``ADAMGEN_BACKEND``), so no caller can forget the rule in a key: a kernel is always the rule's.

The rule's interface (names, defaults, ranges, state pairs) is read from its NumPy module
(``INTERFACE``, plain data), so a cache hit never builds the spec's graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..config import C_DTYPES, KernelConfig, current_environment
from ..interface import Interface, SpecRef

if TYPE_CHECKING:
    from .c_kernels import CKernel

#: dtype -> the NumPy module of that configuration, or None when the source has none (a
#: generated package holds only the dtypes it was generated for).
NumpyProvider = Callable[[KernelConfig], "ModuleType | None"]
#: configuration -> the C kernel, or None when C cannot serve it.
CProvider = Callable[[KernelConfig], "CKernel | None"]
#: dtypes the C backend renders.


@dataclass
class KernelSource:
    """One rule's kernels.

    Attributes:
        spec: the rule.
        numpy: returns the NumPy module of a configuration (or None).
        c: returns the C kernel of a configuration (or None).
        constants: hyperparameters the kernels were specialised for (a generated package's
            ``--const``); any other value is an error.
        fixed_mode: the mode the kernels were generated in (a package), else ``ADAMGEN_MODE``.
    """

    spec: SpecRef
    numpy: NumpyProvider
    c: CProvider
    constants: tuple[tuple[str, float], ...] = ()
    fixed_mode: str | None = None
    _interface: Interface | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def mode(self) -> str:
        return self.fixed_mode or current_environment().mode

    def config(self, dtype: str, *, aliases: frozenset[tuple[str, str]] = frozenset(),
               scalar_tensors: frozenset[str] = frozenset()) -> KernelConfig:
        """The configuration of one of this rule's kernels."""
        return KernelConfig(spec=self.spec, dtype=dtype, mode=self.mode,
                            constants=self.constants, scalar_tensors=scalar_tensors,
                            aliases=aliases)

    def numpy_module(self, dtype: str, *, aliases: frozenset[tuple[str, str]] = frozenset(),
                     scalar_tensors: frozenset[str] = frozenset()) -> ModuleType | None:
        return self.numpy(self.config(dtype, aliases=aliases, scalar_tensors=scalar_tensors))

    def c_kernel(self, dtype: str, scalar_tensors: frozenset[str]) -> CKernel | None:
        """The C kernel for ``dtype`` with these scalar tensors, or None (``ADAMGEN_BACKEND=numpy``,
        a dtype C does not render, no compiler)."""
        if current_environment().backend == "numpy" or dtype not in C_DTYPES:
            return None
        return self.c(self.config(dtype, scalar_tensors=scalar_tensors))

    def derived(self, derivative: str) -> KernelSource:
        """The kernels of a spec derived from this rule (``"vjp"``), from the same provider."""
        return KernelSource(self.spec.derived(derivative), self.numpy, self.c, self.constants,
                            self.fixed_mode)

    @property
    def interface(self) -> Interface:
        """The rule's interface, from its mixed-dtype NumPy module (built once on a miss)."""
        if self._interface is None:
            module = self.numpy(self.config("mixed"))
            if module is None:
                raise LookupError(f"{self.name}: no NumPy module to read the interface from")
            self._interface = Interface.from_json(module.INTERFACE)
        return self._interface


def variant_source(source: KernelSource, spec: SpecRef) -> KernelSource:
    """The kernels of ``spec`` (a variant of ``source``'s rule: another option, a master-weight
    form) from the same providers, constants and mode."""
    if spec == source.spec:
        return source
    return KernelSource(spec, source.numpy, source.c, source.constants, source.fixed_mode)


def jit_source(spec: SpecRef) -> KernelSource:
    """The rule's kernels from the process's JIT cache (generated and compiled on a miss)."""
    from .c_kernels import c_kernel
    from .numpy_kernels import numpy_kernel

    return KernelSource(spec, numpy_kernel, c_kernel)


_sources: dict[Any, KernelSource] = {}


def cached_jit_source(spec: SpecRef) -> KernelSource:
    """:func:`jit_source`, one per rule per process (its interface is then read once)."""
    found = _sources.get(spec)
    if found is None:
        found = _sources[spec] = jit_source(spec)
    return found
