"""The built-in rules, by name: plain data here, their graphs in one module each.

Why the split: ``adamgen.rule("torch_adam", amsgrad=True)`` must validate the name and options,
and a kernel-cache hit must find the kernels, without importing SymPy. This module knows each
rule's name, options and summary as plain data; the graph (:func:`spec` in the rule's own module,
SymPy) is built only on a cache miss or when a caller asks for it. A rule's source files are part
of the generator fingerprint (:func:`adamgen._resources.generation_files`), so a built-in rule's
kernels are keyed by name and options alone.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ArgumentValueError
from ..interface import SpecRef


@dataclass(frozen=True)
class Option:
    """A Python value that selects a graph variant (each variant its own kernels)."""

    name: str
    default: Any = False
    doc: str = ""
    choices: tuple[Any, ...] = (False, True)


@dataclass(frozen=True)
class BuiltinRule:
    """A rule adamgen ships: its name, its options, its peer, and where its graph is written."""

    name: str
    summary: str
    peer: str
    module: str
    options: tuple[Option, ...] = ()
    #: arguments of the module's ``spec()`` this rule always passes (AdamW is Adam, decoupled)
    fixed: tuple[tuple[str, Any], ...] = ()

    def option_values(self, **options: Any) -> tuple[tuple[str, Any], ...]:
        """Every option's value (defaults filled in), checked: unknown names and non-bools are
        errors that list what is valid."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            valid = ", ".join(known) or "none"
            raise ArgumentValueError(f"rule {self.name!r} has no option "
                                     f"{', '.join(map(repr, unknown))}; its options: {valid}")
        values = []
        for option in self.options:
            value = options.get(option.name, option.default)
            if option.choices == (False, True) and type(value) is int and value in (0, 1):
                value = bool(value)  # --option amsgrad=1
            if value not in option.choices or type(value) is not type(option.default):
                raise ArgumentValueError(
                    f"option {option.name} of rule {self.name!r} must be one of "
                    f"{', '.join(map(repr, option.choices))}, got {value!r}")
            values.append((option.name, value))
        return tuple(values)

    def ref(self, **options: Any) -> SpecRef:
        values = self.option_values(**options)
        return SpecRef(self.name, values, "", source=functools.partial(self.build, **dict(values)))

    def build(self, **options: Any) -> Any:
        """The rule's :class:`~adamgen.spec.UpdateSpec` for these options (imports SymPy)."""
        values = dict(self.option_values(**options))
        return importlib.import_module(self.module).spec(**values, **dict(self.fixed))

    def theorems(self, spec: Any, ir_factory: Callable[..., Any]
                 ) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
        """The rule's own theorems (``adamgen verify``), beside the generic IR == spec proofs;
        ``ir_factory`` lowers a spec for a configuration (theorems about generated kernels)."""
        found = getattr(importlib.import_module(self.module), "theorems", None)
        return list(found(spec, ir_factory)) if found is not None else []


_ADAM_OPTIONS = (
    Option("amsgrad", False, "keep the maximum of exp_avg_sq and divide by it (AMSGrad)"),
    Option("maximize", False, "maximise the objective: step along the gradient"),
    Option("lr_dtype", "float64", "the dtype torch computes lr's scalars in: float64 for a "
           "Python float (or a float64 0-d tensor), float32 for a float32 0-d tensor",
           ("float64", "float32")),
    Option("precision", "native", "the tensors' dtype: native (float32/float64), or bfloat16/"
           "float16 tensors with torch's per-op rounding (each op in float32, rounded once)",
           ("native", "bfloat16", "float16")),
)

BUILTINS: Mapping[str, BuiltinRule] = {rule.name: rule for rule in (
    BuiltinRule("ivy_adam", "Ivy's adam_update: epsilon twice, alpha in Python floats",
                "ivy.adam_update (Ivy 1.0.0.5, NumPy backend)", f"{__name__}.ivy_adam"),
    BuiltinRule("torch_adam", "torch's Adam: coupled weight decay, fused as torch fuses, "
                "IEEE square root", "torch.optim.Adam(foreach=False), torch 2.13.0, CPU",
                f"{__name__}.torch_adam", _ADAM_OPTIONS, (("decoupled", False),)),
    BuiltinRule("torch_adamw", "torch's AdamW: decoupled weight decay, fused as torch fuses, "
                "IEEE square root", "torch.optim.AdamW(foreach=False), torch 2.13.0, CPU",
                f"{__name__}.torch_adam", _ADAM_OPTIONS, (("decoupled", True),)),
    BuiltinRule("lion", "Lion: the sign of an interpolation, lion-pytorch's rounding",
                "lion_pytorch.Lion 0.2.5 (its update_fn)", f"{__name__}.lion"),
)}


def builtin(name: str) -> BuiltinRule:
    """The built-in rule ``name``, or an error listing the valid names."""
    try:
        return BUILTINS[name]
    except (KeyError, TypeError):
        raise ArgumentValueError(f"no built-in rule {name!r}; the rules are: "
                                 f"{', '.join(BUILTINS)}") from None


def resolve(ref: SpecRef) -> Any:
    """The :class:`~adamgen.spec.UpdateSpec` a reference names (generation time: SymPy): the
    rule's own (built by ``ref.source``, or the built-in's module), or one derived from it."""
    spec = ref.source() if ref.source is not None else \
        builtin(ref.name).build(**dict(ref.options))
    if not ref.derivative:
        return spec
    if ref.derivative == "vjp":
        from ..derivatives import vjp_spec

        return vjp_spec(spec)
    from ..mixed import DERIVATIVES, derived

    if ref.derivative in DERIVATIVES:
        return derived(spec, ref.derivative)
    raise ArgumentValueError(f"unknown derived spec {ref.derivative!r} of {ref.name}")
