"""adamgen: Ivy's Adam update, written once in SymPy, compiled to NumPy and C kernels.

Importing adamgen loads NumPy and the runtime only (never torch: :class:`Adam` recognises torch
tensors without importing it). SymPy and Jinja are generation-time dependencies: they load on a
kernel-cache miss, when you call :func:`verify`, or when you run ``adamgen generate``.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .errors import AdamgenError, CacheError, CompileError, ConfigError
from .runtime.array import Array, array
from .runtime.container import Container
from .runtime.ivy import Adam, adam_update, adam_update_vjp

__all__ = [
    "Adam", "AdamgenError", "Array", "CacheError", "CompileError", "ConfigError", "Container",
    "__version__", "adam_update", "adam_update_vjp", "array", "verify",
]


def verify(**options: Any) -> list:
    """Prove the generated kernels equal the spec, and Adam's properties (imports SymPy).

    See :func:`adamgen.theorems.verify`; returns one result per theorem.
    """
    from .theorems import verify as run

    return run(**options)
