"""An update rule, written once: a SymPy graph and the interface every stage and caller reads.

Every backend, every proof and every derivative is derived from an :class:`UpdateSpec`. Nothing
below this module knows which rule it compiles: the pipeline takes a spec, and a new rule is a
new spec (see :mod:`adamgen.rules` for the built-in ones).

**Evaluation order.** Floating point is not associative, and SymPy normally flattens ``a*b*c``
and ``a+b+c`` into canonical n-ary nodes, which would lose the order in which a reference rounds.
Write the graph under :func:`unevaluated` (``sympy.evaluate(False)``): every ``Add`` and ``Mul``
then stays binary, exactly as Python parses the reference expression; since IEEE addition and
multiplication are commutative, only this nesting (not the operand order inside a node) fixes the
bits. Operations that plain arithmetic cannot describe (a fused multiply-add, torch's sign, NaN-
propagating maximum, rounding to bfloat16) are the nodes of :mod:`adamgen.language`, re-exported
here: ``from adamgen.spec import fma, sqrt, sign, where, maximum, minimum, round_to, element``.

**Two kinds of inputs**, because references compute with two kinds of numbers:

* **tensors** are arrays (or, where declared ``scalar=True``, one number for every element):
  computed in the arrays' dtype, element by element;
* **hyperparameters** are Python floats: every subexpression of hyperparameters only is computed
  once per call in IEEE double, exactly as Python computes it (``x ** Rational(1, 2)`` there is
  Python's ``x ** 0.5``, i.e. C's ``pow``; :func:`sqrt` is ``math.sqrt``), and is then rounded to
  the arrays' dtype where it meets a tensor, as NumPy and torch round a Python float.

On tensors, ``x ** Rational(1, 2)`` and :func:`sqrt` are both the IEEE square root, and ``x**2``
is ``x*x``.

**Example** (heavy-ball momentum)::

    from adamgen.spec import Hyperparameter, Range, Tensor, UpdateSpec, symbols, unevaluated

    p, g, buf, lr, mu = symbols("p g buf lr mu")
    with unevaluated():
        buf_new = mu * buf + g
        p_new = p - lr * buf_new
    spec = UpdateSpec(
        "heavy_ball",
        tensors=[Tensor("p"), Tensor("g"), Tensor("buf")],
        hyperparameters=[Hyperparameter("lr", 0.01, Range(low=0, finite=True)),
                         Hyperparameter("mu", 0.9, Range(0, 1, high_open=True))],
        outputs={"p_new": p_new, "buf_new": buf_new},
        state={"p_new": "p", "buf_new": "buf"}, parameter="p", gradient="g")
"""

from __future__ import annotations

import functools
import hashlib
import json
import keyword
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sympy
from sympy import Symbol

from .errors import SpecError
from .interface import Hyperparameter, Interface, Range, SpecRef, StatePair, Tensor
from .language import (
    element,
    exact,
    fma,
    maximum,
    minimum,
    round_to,
    sign,
    sqrt,
    where,
)

__all__ = [
    "RESERVED_NAMES",
    "Hyperparameter",
    "Range",
    "StatePair",
    "Tensor",
    "UpdateSpec",
    "element",
    "exact",
    "fma",
    "maximum",
    "minimum",
    "round_to",
    "sign",
    "sqrt",
    "symbols",
    "unevaluated",
    "where",
]

#: Names no spec may use: Python's and C's keywords, and the names generated code uses itself
#: (loop indices and bounds, sizes, threading, the modules' own helpers).
RESERVED_NAMES = frozenset(keyword.kwlist) | frozenset(["auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum", "extern", "float", "for", "goto", "if", "inline", "int", "long", "register", "restrict", "return", "short", "signed", "sizeof", "static", "struct", "switch", "typedef", "union", "unsigned", "void", "volatile", "while", "_Bool", "_Complex", "_Imaginary", "i", "n", "k", "begin", "end", "lo", "hi", "offset", "total", "sizes", "count", "nthreads", "threshold", "part", "skip", "misalignment", "bytes", "np", "math", "ieee", "scalars", "prelude", "update", "fma", "fmaf", "sqrt", "sqrtf", "NAN", "INFINITY"])


def symbols(names: str) -> tuple[Symbol, ...]:
    """Real symbols for a spec's inputs: ``p, g = symbols("p g")``."""
    found = sympy.symbols(names, real=True, seq=True)
    return tuple(found)


@contextmanager
def unevaluated() -> Iterator[None]:
    """Build expressions as written: binary nodes, nothing reordered or folded."""
    with sympy.evaluate(False):
        yield


@dataclass(frozen=True, init=False)
class UpdateSpec:
    """An elementwise update rule: its graph and its interface.

    Args:
        name: the rule's identifier (generated names, cache keys, ``adamgen.rule(name)``).
        tensors: per-element inputs in signature order: :class:`Tensor` declarations, or
            symbols/names (plain tensors).
        hyperparameters: Python-float inputs in signature order: :class:`Hyperparameter`
            declarations, or symbols/names (required, any value).
        outputs: ``{name: expression}`` in the order the functional form returns them.
        state: ``{output: input}`` (or :class:`StatePair` items): what replaces what in place.
        parameter: the tensor an optimizer updates in place for the caller.
        gradient: the tensor carrying the gradient.
        names: ``{name: subexpression}``: generated code names these values after them.
        options: the graph variant's option values (``{"amsgrad": True}``), for keys and tables.
        summary: one line for ``adamgen rules`` and generated headers.

    Raises:
        SpecError: a name that is not an identifier, reserved or repeated; an undeclared
            symbol; a state pair, parameter or gradient that names nothing; a default outside
            its own range; an output that depends on no tensor.
    """

    name: str
    tensors: tuple[Symbol, ...]
    hyperparameters: tuple[Symbol, ...]
    outputs: tuple[tuple[str, sympy.Expr], ...]
    interface: Interface
    names: tuple[tuple[str, sympy.Expr], ...]

    def __init__(self, name: str, tensors: Sequence[Tensor | Symbol | str],
                 hyperparameters: Sequence[Hyperparameter | Symbol | str],
                 outputs: Mapping[str, Any] | Sequence[tuple[str, Any]], *,
                 state: Mapping[str, str] | Sequence[StatePair | tuple[str, ...]] = (),
                 parameter: str | None = None, gradient: str | None = None,
                 names: Mapping[str, Any] | Sequence[tuple[str, Any]] = (),
                 options: Mapping[str, Any] | Sequence[tuple[str, Any]] = (),
                 summary: str = "") -> None:
        _check_identifier("the rule's name", name)
        tensor_decls = tuple(t if isinstance(t, Tensor) else Tensor(_name_of(t)) for t in tensors)
        hyper_decls = tuple(h if isinstance(h, Hyperparameter) else Hyperparameter(_name_of(h))
                            for h in hyperparameters)
        declared = [d.name for d in tensor_decls + hyper_decls]
        for decl in tensor_decls + hyper_decls:
            _check_identifier(f"input {decl.name!r}", decl.name)
        _check_unique("inputs", declared)
        canonical = {n: Symbol(n, real=True) for n in declared}
        output_pairs = tuple((str(n), _canonical(e, canonical, f"output {n!r}"))
                             for n, e in _pairs(outputs))
        if not output_pairs:
            raise SpecError(f"{name}: a rule needs at least one output")
        for out_name, expr in output_pairs:
            _check_identifier(f"output {out_name!r}", out_name)
            if not {s.name for s in expr.free_symbols} & {t.name for t in tensor_decls}:
                raise SpecError(f"{name}: output {out_name!r} = {expr} depends on no tensor, "
                                "so it is not computed element by element; make it depend on a "
                                "tensor or compute it outside the rule")
        _check_unique("outputs", [n for n, _ in output_pairs])
        named = tuple((str(n), _canonical(e, canonical, f"name {n!r}")) for n, e in _pairs(names))
        for sub_name, _ in named:
            _check_identifier(f"subexpression name {sub_name!r}", sub_name)
            if sub_name in declared:
                raise SpecError(f"{name}: the subexpression name {sub_name!r} is an input's")
        _check_unique("subexpression names", [n for n, _ in named])
        pairs = _state_pairs(state)
        _check_state(name, pairs, [t.name for t in tensor_decls], [n for n, _ in output_pairs],
                     parameter, gradient, [h.name for h in hyper_decls])
        for hyper in hyper_decls:
            if hyper.default is not None and not hyper.range.contains(float(hyper.default)):
                raise SpecError(f"{name}: the default {hyper.name}={hyper.default!r} is outside "
                                f"its own range ({hyper.name} must "
                                f"{hyper.range.describe(hyper.name)})")
        inputs = [canonical[n] for n in declared]
        depends = tuple((out, tuple(s.name for s in inputs if s in expr.free_symbols))
                        for out, expr in output_pairs)
        interface = Interface(
            rule=name, tensors=tensor_decls, hyperparameters=hyper_decls,
            outputs=tuple(n for n, _ in output_pairs), state=pairs, parameter=parameter,
            gradient=gradient, options=tuple((str(k), v) for k, v in _pairs(options)),
            depends=depends, summary=summary)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "tensors", tuple(canonical[t.name] for t in tensor_decls))
        object.__setattr__(self, "hyperparameters",
                           tuple(canonical[h.name] for h in hyper_decls))
        object.__setattr__(self, "outputs", output_pairs)
        object.__setattr__(self, "names", named)
        digest = hashlib.sha256(json.dumps(interface.to_json(), sort_keys=True).encode())
        digest.update(sympy.srepr((output_pairs, named)).encode())
        object.__setattr__(self, "interface", _with_hash(interface, digest.hexdigest()[:16]))

    @property
    def inputs(self) -> tuple[Symbol, ...]:
        return self.tensors + self.hyperparameters

    def output(self, name: str) -> sympy.Expr:
        return dict(self.outputs)[name]

    @property
    def spec_hash(self) -> str:
        """A hash of the graph and the interface (``srepr`` keeps nesting and operand order)."""
        return self.interface.spec_hash

    def replace(self, **changes: Any) -> UpdateSpec:
        """A new spec with some of the constructor's arguments changed (``outputs=``, ...)."""
        interface = self.interface
        arguments: dict[str, Any] = {
            "name": self.name, "tensors": interface.tensors,
            "hyperparameters": interface.hyperparameters, "outputs": self.outputs,
            "state": interface.state, "parameter": interface.parameter,
            "gradient": interface.gradient, "names": self.names, "options": interface.options,
            "summary": interface.summary}
        unknown = set(changes) - set(arguments)
        if unknown:
            raise TypeError(f"UpdateSpec.replace() got unknown {', '.join(sorted(unknown))}")
        arguments.update(changes)
        return UpdateSpec(**arguments)

    def ref(self, *, builtin: bool = False) -> SpecRef:
        """This spec as kernels are keyed: by its hash unless it is a built-in rule (whose source
        is part of every key already)."""
        return SpecRef(self.name, self.interface.options, "" if builtin else self.spec_hash,
                       source=functools.partial(_itself, self))


def _itself(spec: UpdateSpec) -> UpdateSpec:
    """A spec's own source (a module-level function, so a reference to a spec pickles)."""
    return spec


def _with_hash(interface: Interface, spec_hash: str) -> Interface:
    from dataclasses import replace

    return replace(interface, spec_hash=spec_hash)


def _name_of(item: Symbol | str) -> str:
    return item.name if isinstance(item, Symbol) else str(item)


def _pairs(items: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return list(items.items()) if isinstance(items, Mapping) else [tuple(i) for i in items]


def _check_identifier(what: str, name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError(f"{what} must be an identifier, got {name!r}")
    if name in RESERVED_NAMES or name.startswith(("adamgen_", "ADAMGEN_")):
        raise SpecError(f"{what} is a reserved word (Python, C, or a name generated code uses "
                        f"itself); choose another")


def _check_unique(what: str, names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise SpecError(f"{what}: {name!r} is declared twice")
        seen.add(name)


def _canonical(expr: Any, canonical: Mapping[str, Symbol], what: str) -> sympy.Expr:
    """``expr`` over the declared inputs' symbols (matched by name, whatever assumptions the
    author gave them); an undeclared symbol is an error."""
    expr = sympy.sympify(expr, evaluate=False)
    unknown = sorted(s.name for s in expr.free_symbols if s.name not in canonical)
    if unknown:
        raise SpecError(f"{what} uses {', '.join(unknown)}, which is not declared as a tensor "
                        "or hyperparameter")
    renames = {s: canonical[s.name] for s in expr.free_symbols if s != canonical[s.name]}
    if not renames:
        return expr
    with sympy.evaluate(False):  # rebuilding must not flatten the author's binary nodes
        return expr.xreplace(renames)


def _state_pairs(state: Mapping[str, str] | Sequence[StatePair | tuple[str, ...]]
                 ) -> tuple[StatePair, ...]:
    if isinstance(state, Mapping):
        return tuple(StatePair(str(o), str(i)) for o, i in state.items())
    return tuple(p if isinstance(p, StatePair) else StatePair(*p) for p in state)


def _check_state(rule: str, pairs: Sequence[StatePair], tensors: Sequence[str],
                 outputs: Sequence[str], parameter: str | None, gradient: str | None,
                 hyperparameters: Sequence[str]) -> None:
    for pair in pairs:
        if pair.input in hyperparameters or pair.output in hyperparameters:
            raise SpecError(f"{rule}: state pair {pair.output} -> {pair.input}: "
                            f"{pair.input if pair.input in hyperparameters else pair.output} is "
                            "a hyperparameter (a Python float); state is a tensor")
        if pair.output not in outputs:
            raise SpecError(f"{rule}: state pair {pair.output} -> {pair.input}: no output "
                            f"{pair.output!r} (outputs: {', '.join(outputs)})")
        if pair.input not in tensors:
            raise SpecError(f"{rule}: state pair {pair.output} -> {pair.input}: no tensor "
                            f"{pair.input!r} (tensors: {', '.join(tensors)})")
    _check_unique("state outputs", [p.output for p in pairs])
    _check_unique("state inputs", [p.input for p in pairs])
    for role, value in (("parameter", parameter), ("gradient", gradient)):
        if value is not None and value not in tensors:
            raise SpecError(f"{rule}: the {role} {value!r} is not a tensor "
                            f"(tensors: {', '.join(tensors)})")
    if parameter is not None and parameter not in {p.input for p in pairs}:
        raise SpecError(f"{rule}: the parameter {parameter!r} must be the input of a state "
                        "pair (the output that replaces it in place)")
    if gradient is not None and gradient in {p.input for p in pairs}:
        raise SpecError(f"{rule}: the gradient {gradient!r} cannot also be state")
