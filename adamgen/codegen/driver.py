"""The pipeline in order, one line a stage: spec -> lower -> render.

Build and load (cache, compiler) belong to :mod:`adamgen.codegen.build` and the runtime; this
module only produces sources. It is imported on a cache miss, never on the hot path, because it
pulls in SymPy and Jinja.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..config import KernelConfig
from ..spec import UpdateSpec, adam_spec
from .c_backend import CKernelSource, render_c_module
from .ir import KernelIR
from .lower import lower
from .numpy_backend import render_numpy_module

#: The specs adamgen knows, by name. A new update rule is a new entry here and in spec.py.
SPECS: dict[str, Callable[[], UpdateSpec]] = {"adam": adam_spec}


def kernel_ir(config: KernelConfig, spec_name: str = "adam") -> KernelIR:
    """Lower the named spec for ``config``."""
    return lower(SPECS[spec_name](), config)


def numpy_source(config: KernelConfig, spec_name: str = "adam") -> str:
    """spec -> IR -> NumPy module source."""
    return render_numpy_module(kernel_ir(config, spec_name))


#: Per spec, the forms its C file holds: form name -> (output, the input it overwrites) pairs.
#: Which output may overwrite which input is knowledge about the spec, so it lives here beside
#: :data:`SPECS`. A VJP never overwrites its inputs: the functional form only.
ALIAS_FORMS: dict[str, dict[str, frozenset[tuple[str, str]]]] = {
    "adam": {
        "functional": frozenset(),
        "inplace_w": frozenset({("w_new", "w")}),
        "inplace_all": frozenset({("w_new", "w"), ("mw", "mw_tm1"), ("vw", "vw_tm1")}),
    },
    "adam_vjp": {"functional": frozenset()},
}


def c_source(config: KernelConfig, spec_name: str = "adam", *, openmp: bool = True,
             flags: tuple[str, ...] = ()) -> CKernelSource:
    """spec -> IR (one per alias form) -> one C file holding every form, and its cffi cdef.

    ``config.aliases`` is ignored: the file holds the forms :data:`ALIAS_FORMS` names for the
    spec. A form whose overwritten input is a scalar tensor is left out.
    """
    irs = {name: kernel_ir(replace(config, aliases=aliases), spec_name)
           for name, aliases in ALIAS_FORMS[spec_name].items()
           if not {source for _, source in aliases} & config.scalar_tensors}
    return render_c_module(irs, openmp=openmp, flags=flags)


def adam_vjp_spec() -> UpdateSpec:
    """The vector-Jacobian product of Adam, derived from the spec by :mod:`adamgen.derivatives`.

    Registered as ``"adam_vjp"`` so the VJP goes through the same lowering and backends.
    """
    from ..derivatives import vjp_spec

    return vjp_spec(adam_spec())


SPECS["adam_vjp"] = adam_vjp_spec
