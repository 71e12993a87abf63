"""A rule's interface as plain data: what a caller passes, what comes back, what is kept in place.

Why a module of its own, without SymPy: the runtime validates arguments, names errors, builds
optimizers and generated packages from this description, and all of that happens on the hot
path, where importing SymPy is forbidden. :class:`adamgen.spec.UpdateSpec` (the SymPy graph)
carries one :class:`Interface`; generated NumPy modules, C manifests and generated packages export
it as JSON (:meth:`Interface.to_json`), and the runtime reads it back (:meth:`Interface.from_json`).

The pieces:

* :class:`Tensor`: a per-element argument, in signature order; ``scalar`` says whether a caller
  may pass one number for every element (Ivy's ``lr``);
* :class:`Hyperparameter`: a Python-float argument with its default and :class:`Range` (the
  range's error text is what a caller sees);
* :class:`StatePair`: which output replaces which input in the in-place form, and the state's
  name in an optimizer's checkpoint;
* the roles an optimizer needs: the ``parameter`` (updated in place, owned by the caller) and the
  ``gradient``; every other state input is owned by the optimizer and starts at zero;
* :class:`SpecRef`: which rule (and which of its graph variants) a kernel computes, so cache keys,
  memo keys and loader decisions are keyed by the rule without building its graph.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ArgumentTypeError, ArgumentValueError

#: A derived VJP names the cotangent of output ``o`` and the gradient of tensor ``x``
#: ``d_o`` and ``d_x`` (``d_o_new`` when an output is named like a tensor: torch's ``param``).
DERIVATIVE_PREFIX = "d_"
#: Kinds of hyperparameter: a real number, or the step counter (``float(step)``; an optimizer
#: supplies it, counting from 1).
KINDS = ("real", "step")
#: Dtypes a tensor may be stored in when it is narrower than the kernel's compute dtype
#: (:attr:`Tensor.storage`).
STORAGE_DTYPES = ("bfloat16", "float16", "float32")
#: How an optimizer starts an owned state tensor: zeros, or a copy of the parameter
#: (:attr:`StatePair.init`; master weights start as the parameter, widened exactly).
INITS = ("zero", "parameter")
#: Low-precision parameter dtypes a rule's master-weight forms exist for (adamgen.mixed).
MASTER_DTYPES = ("bfloat16", "float16")
#: ``SpecRef.derivative`` of a rule's master-weight forms -> (parameter dtype, stochastic).
MASTER_FORMS: dict[str, tuple[str, bool]] = {
    **{f"master:{dtype}": (dtype, False) for dtype in MASTER_DTYPES},
    **{f"stochastic:{dtype}": (dtype, True) for dtype in MASTER_DTYPES},
}


def master_form(dtype: str, stochastic: bool) -> str:
    """The ``SpecRef.derivative`` of a rule's master-weight form (checked, no SymPy)."""
    name = f"{'stochastic' if stochastic else 'master'}:{dtype}"
    if name not in MASTER_FORMS:
        raise ValueError(f"no master-weight form {name!r}; there are {', '.join(MASTER_FORMS)}")
    return name


@dataclass(frozen=True)
class Range:
    """Which values are valid: ``low <= x`` (``low < x`` when ``low_open``), likewise ``high``,
    and finite when ``finite``. NaN is never in a range."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    finite: bool = False

    def contains(self, value: float) -> bool:
        if math.isnan(value) or (self.finite and math.isinf(value)):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None
                    and (value > self.high or (self.high_open and value == self.high)))

    def describe(self, name: str) -> str:
        """What a valid value is, to follow "``name`` must ": ``satisfy 0 <= beta1 < 1``,
        ``be a finite number >= 0``, ``be >= 0``."""
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {_number(self.low)}"
        high = None if self.high is None else \
            f"{'<' if self.high_open else '<='} {_number(self.high)}"
        if low and high:
            mirrored = low.replace(">", "<").split(" ", 1)
            text = f"satisfy {mirrored[1]} {mirrored[0]} {name} {high}"
            return text + " and be finite" if self.finite else text
        kind = "a finite number" if self.finite else "a number"
        bounds = " ".join(b for b in (low, high) if b)
        return f"be {kind} {bounds}" if bounds else f"be {kind} (not NaN)"

    def check(self, name: str, value: Any) -> float:
        """``value`` as a float in this range, or a ``ValueError`` naming ``name``."""
        number = as_real(name, value)
        if not self.contains(number):
            raise ArgumentValueError(f"{name} must {self.describe(name)}, got {shown(value)}")
        return number

    def to_json(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "low_open": self.low_open,
                "high_open": self.high_open, "finite": self.finite}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def shown(value: Any) -> str:
    """``repr(value)``, with an integer of more than 24 digits abbreviated: an error message
    should show ``10**400`` without printing 401 digits."""
    text = repr(value)
    if isinstance(value, int) and len(text) > 24:
        return f"{text[:8]}...({len(text.lstrip('-'))} digits)"
    return text


def as_real(name: str, value: Any) -> float:
    """``value`` as a Python float, or an error naming ``name`` (bools, strings, arrays with more
    than one element, and integers beyond float range are refused)."""
    if type(value) is float:  # the common case, without ABC checks
        return value
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            raise ArgumentValueError(f"{name}={shown(value)} is beyond the range of a "
                                     "float") from None
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ArgumentTypeError(f"{name} is a bool; expected a real number")
    if hasattr(value, "ndim") and hasattr(value, "dtype"):  # a NumPy array or scalar
        if value.ndim != 0:
            raise ArgumentValueError(f"{name} must be a scalar, got an array of shape "
                                     f"{value.shape}")
        if value.dtype.kind not in "fiu":
            raise ArgumentTypeError(f"{name} has dtype {value.dtype}; expected a real number")
        return float(value)
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            raise ArgumentValueError(f"{name}={shown(value)} is beyond the range of a "
                                     "float") from None
    raise ArgumentTypeError(f"{name} is a {type(value).__name__}; expected a real number")


@dataclass(frozen=True)
class Tensor:
    """A per-element argument.

    Attributes:
        name: its name in the signature and in generated code.
        scalar: a caller may pass one number (a Python float, a 0-d or one-element array) that
            applies to every element; it then reaches the kernel as one value, never an array.
        range: the values an element may take, checked where the runtime can do so without a
            copy (a number, or an array with a cheap reduction); ``None``: any value.
        doc: one line for generated docstrings and ``adamgen rules``.
        storage: the dtype the tensor is stored in when it is narrower than the kernel's
            compute dtype (one of :data:`STORAGE_DTYPES`): a kernel widens each element exactly
            when it reads it, and an output that replaces it in place must be rounded to it by
            the spec (``round_to``), so storing it is exact. ``None``: the kernel's dtype.
    """

    name: str
    scalar: bool = False
    range: Range | None = None
    doc: str = ""
    storage: str | None = None

    def __post_init__(self) -> None:
        if self.storage is not None and self.storage not in STORAGE_DTYPES:
            raise ValueError(f"tensor {self.name}: storage must be one of "
                             f"{', '.join(STORAGE_DTYPES)} or None, got {self.storage!r}")
        if self.storage is not None and self.scalar:
            raise ValueError(f"tensor {self.name}: a tensor that may be a scalar is passed as "
                             "one value in the compute dtype; it has no storage dtype")

    def to_json(self) -> dict[str, Any]:
        found = {"name": self.name, "scalar": self.scalar, "doc": self.doc,
                 "range": None if self.range is None else self.range.to_json()}
        if self.storage is not None:
            found["storage"] = self.storage
        return found


@dataclass(frozen=True)
class Hyperparameter:
    """A Python-float argument: computed with once per call, in IEEE double, as Python would.

    Attributes:
        name: its (keyword) name.
        default: the value when the caller gives none; ``None`` makes it required.
        range: the valid values; a value outside is a ``ValueError`` showing the condition.
        kind: ``"real"``, or ``"step"`` for the step counter (an optimizer supplies it).
        doc: one line for generated docstrings and ``adamgen rules``.
    """

    name: str
    default: float | None = None
    range: Range = field(default_factory=Range)
    kind: str = "real"
    doc: str = ""

    def check(self, value: Any) -> float:
        """``value`` as a float, or the rule's error naming this hyperparameter."""
        return self.range.check(self.name, value)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "default": self.default, "range": self.range.to_json(),
                "kind": self.kind, "doc": self.doc}


@dataclass(frozen=True)
class StatePair:
    """``output`` replaces ``input`` in the in-place form; ``name`` labels it in checkpoints;
    ``init`` says how an optimizer starts the state (one of :data:`INITS`: zeros, or the
    parameter's value, widened exactly to the state's dtype)."""

    output: str
    input: str
    name: str = ""
    init: str = "zero"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"state pair {self.output} -> {self.input}: init must be one of "
                             f"{', '.join(INITS)}, got {self.init!r}")

    @property
    def label(self) -> str:
        return self.name or self.input

    def to_json(self) -> dict[str, Any]:
        found = {"output": self.output, "input": self.input, "name": self.name}
        if self.init != "zero":
            found["init"] = self.init
        return found


@dataclass(frozen=True)
class SpecRef:
    """Which rule (and which graph variant of it) a kernel computes.

    The key fields identify the graph without building it: a built-in rule by ``name`` and
    ``options`` (its source files are in the generator fingerprint of every cache key), any
    other rule also by ``digest``, the hash of its graph. ``derivative`` names a spec derived
    from the rule (``"vjp"``). ``source`` builds the :class:`~adamgen.spec.UpdateSpec` on a cache
    miss; it is not part of the identity.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    digest: str = ""
    derivative: str = ""
    source: Callable[[], Any] | None = field(default=None, compare=False, hash=False,
                                             repr=False)

    def key(self) -> dict[str, Any]:
        """The identity, JSON-ready (for cache keys)."""
        return {"name": self.name, "options": [list(o) for o in self.options],
                "digest": self.digest, "derivative": self.derivative}

    @classmethod
    def from_key(cls, key: Mapping[str, Any]) -> SpecRef:
        """The reference :meth:`key` describes (without ``source``: a generated package's
        kernels are all there, nothing is built)."""
        return cls(str(key["name"]), tuple((str(k), v) for k, v in key["options"]),
                   str(key["digest"]), str(key["derivative"]))

    @property
    def label(self) -> str:
        """``torch_adam(amsgrad=True)``, ``ivy_adam.vjp``: for headers and tables."""
        text = self.name
        chosen = [f"{k}={v!r}" for k, v in self.options]
        if chosen:
            text += "(" + ", ".join(chosen) + ")"
        return f"{text}.{self.derivative}" if self.derivative else text

    def derived(self, derivative: str) -> SpecRef:
        """The spec derived from this one (``"vjp"``); ``source`` still builds the rule's own
        spec, which the derivation starts from."""
        return SpecRef(self.name, self.options, self.digest, derivative, self.source)


@dataclass(frozen=True)
class Interface:
    """Everything a caller or a stage needs to know about a rule, as plain data."""

    rule: str
    tensors: tuple[Tensor, ...]
    hyperparameters: tuple[Hyperparameter, ...]
    outputs: tuple[str, ...]
    state: tuple[StatePair, ...] = ()
    parameter: str | None = None
    gradient: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    depends: tuple[tuple[str, tuple[str, ...]], ...] = ()
    summary: str = ""
    spec_hash: str = ""

    # -- lookups ---------------------------------------------------------------------------------
    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def hyperparameter_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hyperparameters)

    def tensor(self, name: str) -> Tensor:
        return _find(self.tensors, name, "tensor", self.rule)

    def storage(self, name: str, compute: str) -> str:
        """The dtype tensor ``name`` is stored in, for a kernel computing in ``compute``."""
        return self.tensor(name).storage or compute

    def output_storage(self, output: str, compute: str) -> str:
        """The dtype output ``output`` is stored in: that of the tensor it replaces in place
        (its state pair's input), else the compute dtype."""
        for pair in self.state:
            if pair.output == output:
                return self.storage(pair.input, compute)
        return compute

    @property
    def narrow(self) -> bool:
        """Whether some tensor is stored narrower than the compute dtype."""
        return any(t.storage is not None for t in self.tensors)

    def hyperparameter(self, name: str) -> Hyperparameter:
        return _find(self.hyperparameters, name, "hyperparameter", self.rule)

    def dependencies(self, output: str) -> tuple[str, ...]:
        return dict(self.depends)[output]

    @property
    def in_place(self) -> frozenset[tuple[str, str]]:
        """Every ``(output, input)`` pair of the all-in-place form (an optimizer's step)."""
        return frozenset((p.output, p.input) for p in self.state)

    @property
    def owned_state(self) -> tuple[StatePair, ...]:
        """The state an optimizer owns: every pair but the parameter's."""
        return tuple(p for p in self.state if p.input != self.parameter)

    @property
    def cotangents(self) -> dict[str, str]:
        """Each output's cotangent name in the VJP: ``d_<output>``, or ``d_<output>_new`` when
        that names the gradient of a tensor (an output named like the tensor it replaces)."""
        gradients = {DERIVATIVE_PREFIX + name for name in self.tensor_names}
        named = {}
        for output in self.outputs:
            name = DERIVATIVE_PREFIX + output
            named[output] = f"{name}_new" if name in gradients else name
        return named

    @property
    def defaults(self) -> dict[str, float]:
        return {h.name: h.default for h in self.hyperparameters if h.default is not None}

    # -- plain data ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "summary": self.summary, "spec_hash": self.spec_hash,
            "tensors": [t.to_json() for t in self.tensors],
            "hyperparameters": [h.to_json() for h in self.hyperparameters],
            "outputs": list(self.outputs), "state": [p.to_json() for p in self.state],
            "parameter": self.parameter, "gradient": self.gradient,
            "options": [list(o) for o in self.options],
            "depends": {name: list(deps) for name, deps in self.depends},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Interface:
        return cls(
            rule=data["rule"], summary=data.get("summary", ""),
            spec_hash=data.get("spec_hash", ""),
            tensors=tuple(Tensor(t["name"], t["scalar"], _range(t.get("range")), t.get("doc", ""),
                                 t.get("storage"))
                          for t in data["tensors"]),
            hyperparameters=tuple(
                Hyperparameter(h["name"], h["default"], _range(h["range"]) or Range(),
                               h.get("kind", "real"), h.get("doc", ""))
                for h in data["hyperparameters"]),
            outputs=tuple(data["outputs"]),
            state=tuple(StatePair(p["output"], p["input"], p.get("name", ""),
                                  p.get("init", "zero"))
                        for p in data["state"]),
            parameter=data.get("parameter"), gradient=data.get("gradient"),
            options=tuple((str(k), v) for k, v in data.get("options", ())),
            depends=tuple((name, tuple(deps)) for name, deps in data["depends"].items()))


def _range(data: Mapping[str, Any] | None) -> Range | None:
    return None if data is None else Range(**data)


def _find(items: Sequence[Any], name: str, what: str, rule: str) -> Any:
    for item in items:
        if item.name == name:
            return item
    names = ", ".join(item.name for item in items) or "none"
    raise KeyError(f"{rule} has no {what} {name!r} (its {what}s: {names})")
