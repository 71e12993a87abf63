"""The public entry points of a rule, for any source of its kernels (the JIT, a package).

Every rule gets the generic ones: ``update`` (the functional form) and the optimizer. A rule with
a public signature of its own (Ivy's ``adam_update``) registers a binding here, by rule name:
that is the one place a new rule touches besides its spec, and only when it wants a custom
signature. Generated packages export the names listed here (:func:`binding_names`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .functional import Updater, jit_updater
from .source import KernelSource


def _ivy_bindings(source: KernelSource) -> dict[str, Any]:
    from . import ivy
    from .array import Array, array
    from .container import Container

    updater = jit_updater(source, ivy.IvyUpdater)
    return {"update": updater, "adam_update": ivy.bind_adam_update(updater, dict(
        source.constants)), "Array": Array, "Container": Container, "array": array}


#: rule name -> the bindings of its custom signature, over a source of its kernels.
CUSTOM: dict[str, Callable[[KernelSource], dict[str, Any]]] = {"ivy_adam": _ivy_bindings}
#: the names each rule's custom bindings export (besides ``update``), for generated packages.
NAMES: dict[str, tuple[str, ...]] = {"ivy_adam": ("adam_update", "Array", "Container", "array")}


def binding_names(rule: str) -> tuple[str, ...]:
    """The names a rule's custom bindings add to a generated package."""
    return NAMES.get(rule, ())


def package_bindings(source: KernelSource) -> dict[str, Any]:
    """``update`` and the rule's custom bindings, over ``source``."""
    custom = CUSTOM.get(source.name)
    if custom is not None:
        return custom(source)
    updater: Updater = jit_updater(source)
    return {"update": updater}
