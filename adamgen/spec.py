"""An update rule, written once: a SymPy graph and the interface every stage and caller reads.

Every backend, every proof and every derivative is derived from an :class:`UpdateSpec`. Nothing
below this module knows which rule it compiles: the pipeline takes a spec, and a new rule is a
new spec (see :mod:`adamgen.rules` for the built-in ones).

**The one public place of the spec language** is this module: :class:`UpdateSpec`,
:class:`Tensor`, :class:`Hyperparameter`, :class:`Range`, :class:`StatePair`, :func:`symbols`,
:func:`unevaluated`, the nodes (:func:`fma`, :func:`sqrt`, :func:`sign`, :func:`where`,
:func:`maximum`, :func:`minimum`, :func:`round_to`, :func:`element`) and :class:`SpecError`.
``adamgen.UpdateSpec`` is the same class; ``import adamgen`` does not import this module (nor
SymPy) until it is asked for. A spec becomes a rule with ``adamgen.Rule(spec)``.

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
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sympy
from sympy import Symbol

from .errors import SpecError
from .interface import KINDS, Hyperparameter, Interface, Range, SpecRef, StatePair, Tensor
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
    "SpecError",
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

#: C's keywords (C99), which generated C code cannot use as variable names.
C_KEYWORDS = frozenset(["auto", "break", "case", "char", "const", "continue", "default", "do",
                        "double", "else", "enum", "extern", "float", "for", "goto", "if",
                        "inline", "int", "long", "register", "restrict", "return", "short",
                        "signed", "sizeof", "static", "struct", "switch", "typedef", "union",
                        "unsigned", "void", "volatile", "while", "_Bool", "_Complex",
                        "_Imaginary"])
#: The names generated code uses itself: loop indices and bounds, sizes, threading, the
#: modules' own helpers and imports.
GENERATED_NAMES = frozenset(["i", "n", "k", "begin", "end", "lo", "hi", "offset", "total",
                             "sizes", "count", "nthreads", "threshold", "part", "skip",
                             "misalignment", "bytes", "np", "math", "ieee", "scalars",
                             "prelude", "update", "fma", "fmaf", "sqrt", "sqrtf", "NAN",
                             "INFINITY"])
#: Names no spec may use: Python's and C's keywords, and the names generated code uses itself
#: (names starting with ``adamgen_`` are reserved too).
RESERVED_NAMES = frozenset(keyword.kwlist) | C_KEYWORDS | GENERATED_NAMES


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
    """An elementwise update rule: its graph and its interface. ``adamgen.Rule(spec)`` compiles it.

    Everything is imported from this module (``from adamgen.spec import ...``); build the
    expressions under :func:`unevaluated`, so that each ``+`` and ``*`` keeps the order in which
    you wrote it (that order is the rounding order every kernel follows).

    Example (SGD with heavy-ball momentum, as ``torch.optim.SGD`` computes it)::

        import adamgen
        from adamgen.spec import Hyperparameter, Range, Tensor, UpdateSpec, symbols, unevaluated

        p, g, buf, lr, mu = symbols("p g buf lr mu")
        with unevaluated():
            buf_new = mu * buf + g
            p_new = p - lr * buf_new
        spec = UpdateSpec(
            "heavy_ball",
            tensors=[Tensor("p", doc="the parameter"), Tensor("g"), Tensor("buf")],
            hyperparameters=[Hyperparameter("lr", 0.01, Range(low=0, finite=True)),
                             Hyperparameter("mu", 0.9, Range(0, 1, high_open=True))],
            outputs={"p_new": p_new, "buf_new": buf_new},
            state={"p_new": "p", "buf_new": "buf"}, parameter="p", gradient="g",
            summary="SGD with heavy-ball momentum")
        rule = adamgen.Rule(spec)              # checked here: a SpecError names any problem
        p_new, buf_new = rule.update(p0, g0, buf0, lr=0.1)
        opt = rule.optimizer(params, lr=0.1)   # in place; opt.step(grads)

    Args:
        name: the rule's identifier: it names generated functions, files and cache entries, and
            may be neither a built-in rule's name (``adamgen.rules()``) nor a reserved word.
        tensors: the per-element inputs (arrays), in the order ``rule.update`` takes them
            positionally. Each is a :class:`Tensor` (``Tensor("lr", scalar=True)``: a caller may
            pass one number for every element; ``range=``: values checked where cheap;
            ``doc=``: one line) or, for a plain tensor, a symbol or a name. Tensors compute in
            the arrays' dtype, one element at a time.
        hyperparameters: the Python-float inputs, passed by keyword. Each is a
            :class:`Hyperparameter` (``default``: ``None`` makes it required; ``range``: the
            valid values, a :class:`Range` whose text is the caller's error message, and which
            must contain the default; ``kind="step"``: the step counter, which an optimizer
            supplies, counting from 1) or a symbol/name (required, any value). Any subexpression
            of hyperparameters only is computed once per call in IEEE double, as Python computes
            it, and rounded to the arrays' dtype where it meets a tensor.
        outputs: ``{name: expression}``, in the order ``rule.update`` returns them. Each
            expression uses the declared symbols only (matched by name), and the spec
            language: ``+ - * /``; ``x**2``, ``x**-1``, ``x**Rational(1, 2)`` of tensors and any
            power of hyperparameters; :func:`where` on one comparison; :func:`fma`,
            :func:`sqrt`, :func:`sign`, :func:`maximum`, :func:`minimum`, :func:`round_to`,
            :func:`element`. Each output depends on at least one tensor.
        state: which output replaces which input in the in-place form (an optimizer's step):
            ``{output: input}``, or :class:`StatePair` items (``StatePair("m_new", "m",
            name="exp_avg")`` labels it in checkpoints; by default the input's name). Both sides
            of a pair have one shape and dtype: the input is a tensor not declared
            ``scalar=True`` and the output depends on such a tensor.
        parameter: the tensor an optimizer updates in place for the caller (the input of a
            state pair); an optimizer owns every other state input and starts it at zero.
        gradient: the tensor an optimizer fills from the caller's gradients (never state).
        names: ``{name: subexpression}``: generated code names these intermediate values after
            them (documentation only: it does not change a result).
        options: the values of the options that selected this graph (``{"amsgrad": True}``),
            shown in tables and part of the rule's identity.
        summary: one line, shown by ``adamgen info`` and in generated files' headers.

    Raises:
        SpecError: a name that is not an identifier, reserved or repeated; a declaration in
            the wrong list (a :class:`Tensor` among the hyperparameters); an undeclared symbol;
            a state pair, parameter or gradient that names nothing, or names a hyperparameter;
            a default that is not a number or is outside its own range; an empty range; an
            output that depends on no tensor; a construct that is not elementwise. What needs
            the graph's meaning (unknown functions, exponents, state shapes, names the runtime
            needs) is checked by ``adamgen.Rule(spec)``: see :mod:`adamgen.validation`.
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
        _check_identifier(f"the rule's name {name!r}", name)
        tensor_decls = tuple(_declaration(name, "tensors", t, Tensor)
                             for t in tensors)
        hyper_decls = tuple(_declaration(name, "hyperparameters", h, Hyperparameter)
                            for h in hyperparameters)
        declared = [d.name for d in tensor_decls + hyper_decls]
        for decl in tensor_decls + hyper_decls:
            _check_identifier(f"{name}: input {decl.name!r}", decl.name)
        _check_unique(f"{name}: inputs", declared)
        canonical = {n: Symbol(n, real=True) for n in declared}
        output_pairs = tuple((str(n), _canonical(e, canonical, f"{name}: output {n!r}"))
                             for n, e in _pairs(outputs))
        if not output_pairs:
            raise SpecError(f"{name}: a rule needs at least one output")
        for out_name, expr in output_pairs:
            _check_identifier(f"{name}: output {out_name!r}", out_name)
            if not {s.name for s in expr.free_symbols} & {t.name for t in tensor_decls}:
                raise SpecError(f"{name}: output {out_name!r} = {expr} depends on no tensor, "
                                "so it is not computed element by element; make it depend on a "
                                "tensor or compute it outside the rule")
        _check_unique(f"{name}: outputs", [n for n, _ in output_pairs])
        named = tuple((str(n), _canonical(e, canonical, f"{name}: subexpression {n!r}"))
                      for n, e in _pairs(names))
        for sub_name, _ in named:
            _check_identifier(f"{name}: subexpression name {sub_name!r}", sub_name)
            if sub_name in declared:
                raise SpecError(f"{name}: the subexpression name {sub_name!r} is an input's")
        _check_unique(f"{name}: subexpression names", [n for n, _ in named])
        pairs = _state_pairs(state)
        _check_state(name, pairs, [t.name for t in tensor_decls], [n for n, _ in output_pairs],
                     parameter, gradient, [h.name for h in hyper_decls])
        for hyper in hyper_decls:
            _check_hyperparameter(name, hyper)
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


def _declaration(rule: str, where: str, item: Any, kind: type) -> Any:
    """``item`` of the ``where`` list as a ``kind`` declaration; a declaration of the other kind
    there (``Tensor("lr")`` among the hyperparameters) is an error naming both places."""
    if isinstance(item, kind):
        return item
    if isinstance(item, (Tensor, Hyperparameter)):
        other = type(item).__name__
        wanted = "tensors" if isinstance(item, Tensor) else "hyperparameters"
        meaning = "a tensor is an array" if isinstance(item, Tensor) else \
            "a hyperparameter is a Python float"
        raise SpecError(f"{rule}: {where} lists {other}({item.name!r}): {meaning}, but {where} "
                        f"holds {kind.__name__.lower()}s; move it to {wanted}= or declare it "
                        f"{kind.__name__}({item.name!r})")
    return kind(_name_of(item))


def _check_hyperparameter(rule: str, hyper: Hyperparameter) -> None:
    """A hyperparameter's own declaration: its kind, its range, its default within it."""
    if hyper.kind not in KINDS:
        raise SpecError(f"{rule}: hyperparameter {hyper.name!r} has kind {hyper.kind!r}; the "
                        f"kinds are {', '.join(map(repr, KINDS))}")
    bounds = [b for b in (hyper.range.low, hyper.range.high) if b is not None]
    if any(not _is_real(b) or math.isnan(float(b)) for b in bounds):
        raise SpecError(f"{rule}: the range of {hyper.name!r} has a bound that is not a real "
                        f"number: {hyper.range}")
    low, high = hyper.range.low, hyper.range.high
    if low is not None and high is not None and (
            low > high or (low == high and (hyper.range.low_open or hyper.range.high_open))):
        raise SpecError(f"{rule}: the range of {hyper.name!r} is empty (it must "
                        f"{hyper.range.describe(hyper.name)}): no value is valid")
    if hyper.default is None:
        return
    if not _is_real(hyper.default):
        raise SpecError(f"{rule}: the default {hyper.name}={hyper.default!r} is a "
                        f"{type(hyper.default).__name__}; a default is a real number (or None: "
                        "required)")
    if not hyper.range.contains(float(hyper.default)):
        raise SpecError(f"{rule}: the default {hyper.name}={hyper.default!r} is outside "
                        f"its own range ({hyper.name} must "
                        f"{hyper.range.describe(hyper.name)})")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _pairs(items: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return list(items.items()) if isinstance(items, Mapping) else [tuple(i) for i in items]


def reserved_because(name: str) -> str:
    """Why ``name`` is reserved (``"a Python keyword"``...), or ``""`` if it is not."""
    if keyword.iskeyword(name):
        return "a Python keyword"
    if name in C_KEYWORDS:
        return "a C keyword"
    if name in GENERATED_NAMES:
        return "a name adamgen's generated code uses itself"
    if name.startswith(("adamgen_", "ADAMGEN_")):
        return "in adamgen's own namespace (adamgen_...)"
    return ""


def _check_identifier(what: str, name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError(f"{what} must be an identifier, got {name!r}")
    why = reserved_because(name)
    if why:
        raise SpecError(f"{what} is a reserved word ({name!r} is {why}); choose another")


def _check_unique(what: str, names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise SpecError(f"{what}: {name!r} is declared twice")
        seen.add(name)


def _canonical(expr: Any, canonical: Mapping[str, Symbol], what: str) -> sympy.Expr:
    """``expr`` over the declared inputs' symbols (matched by name, whatever assumptions the
    author gave them); an undeclared symbol is an error."""
    try:
        expr = sympy.sympify(expr, evaluate=False)
    except (sympy.SympifyError, TypeError, SyntaxError) as error:
        raise SpecError(f"{what} is {expr!r}, not a SymPy expression ({error})") from None
    if not isinstance(expr, sympy.Basic) or not isinstance(expr, sympy.Expr):
        raise SpecError(f"{what} is {expr} ({type(expr).__name__}), not a number-valued "
                        "expression (a comparison or a condition belongs in where(...))")
    from .validation import not_elementwise  # the one table of non-elementwise constructs

    problem = not_elementwise(expr)
    if problem:
        raise SpecError(f"{what} {problem}")
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
    _check_unique(f"{rule}: state outputs", [p.output for p in pairs])
    _check_unique(f"{rule}: state inputs", [p.input for p in pairs])
    for role, value in (("parameter", parameter), ("gradient", gradient)):
        if value is not None and value in hyperparameters:
            raise SpecError(f"{rule}: the {role} {value!r} is a hyperparameter (a Python float); "
                            f"the {role} must be a tensor (tensors: {', '.join(tensors)})")
        if value is not None and value not in tensors:
            raise SpecError(f"{rule}: the {role} {value!r} is not a tensor "
                            f"(tensors: {', '.join(tensors)})")
    if parameter is not None and parameter not in {p.input for p in pairs}:
        raise SpecError(f"{rule}: the parameter {parameter!r} must be the input of a state "
                        "pair (the output that replaces it in place)")
    if gradient is not None and gradient in {p.input for p in pairs}:
        raise SpecError(f"{rule}: the gradient {gradient!r} cannot also be state")
