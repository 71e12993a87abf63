"""The pipeline in order, one line a stage: spec -> lower -> render.

Build and load (cache, compiler) belong to :mod:`adamgen.codegen.build` and the runtime; this
module only produces sources. It is imported on a cache miss, never on the hot path, because it
pulls in SymPy and Jinja.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import KernelConfig
from ..spec import UpdateSpec, adam_spec
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
