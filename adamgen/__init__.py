"""adamgen: optimizer update rules, each written once in SymPy, compiled to NumPy and C kernels.

Importing adamgen loads NumPy and the runtime only (never torch: :class:`Adam` recognises torch
tensors without importing it). SymPy and Jinja are generation-time dependencies: they load on a
kernel-cache miss, when you call :func:`verify`, or when you run ``adamgen generate``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import AdamgenError, CacheError, CompileError, ConfigError, SpecError
from .runtime.array import Array, array
from .runtime.container import Container
from .runtime.ivy import Adam, adam_update, adam_update_vjp
from .runtime.rule import Rule, rule, rules

__all__ = [
    "Adam", "AdamgenError", "Array", "CacheError", "CompileError", "ConfigError", "Container",
    "Rule", "SpecError", "UpdateSpec", "__version__", "adam_update", "adam_update_vjp", "array",
    "rule", "rules", "verify",
]


def __getattr__(name: str) -> Any:
    """``adamgen.UpdateSpec`` (and the spec language through :mod:`adamgen.spec`) import SymPy:
    only when asked for, never by ``import adamgen``."""
    if name == "UpdateSpec":
        from .spec import UpdateSpec

        return UpdateSpec
    raise AttributeError(f"module 'adamgen' has no attribute {name!r}")


if TYPE_CHECKING:  # SymPy is imported by verify(), never by import adamgen
    from .theorems import TheoremResult


def verify(**options: Any) -> list[TheoremResult]:
    """Prove every built-in rule's kernels equal its spec, and each rule's theorems (imports
    SymPy). See :func:`adamgen.theorems.verify`; returns one result per theorem."""
    from .theorems import verify as run

    return run(**options)
