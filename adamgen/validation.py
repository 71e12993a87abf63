"""Is a user's spec a rule adamgen can compile? One :class:`~adamgen.errors.SpecError` naming why.

:class:`~adamgen.spec.UpdateSpec` checks its own declarations when it is built (names, symbols,
kinds, state pairs, defaults within their ranges). What needs the graph's meaning, or how the
runtime will call the rule, is checked here, once, when a rule is made from the spec
(``adamgen.Rule(spec)``). Every message names the rule, the output (or subexpression, tensor,
hyperparameter) concerned, and what was expected:

* **elementwise**: each output element is computed from the same element of every tensor; a
  reduction (``Sum``, ``Product``), an index, a matrix, an integral or a derivative is named;
* **the spec language**: ``+ - * /``, powers (see below), :func:`~adamgen.spec.where` on one
  comparison, and the nodes :func:`~adamgen.spec.fma`, :func:`~adamgen.spec.sqrt`,
  :func:`~adamgen.spec.sign`, :func:`~adamgen.spec.maximum`, :func:`~adamgen.spec.minimum`,
  :func:`~adamgen.spec.round_to`, :func:`~adamgen.spec.element`; any other function (SymPy's
  ``gamma``, ``exp``, ``Abs``, ``Max``; an undefined ``Function('f')``) is named, with the
  language's equivalent where there is one; so are complex and non-finite constants;
* **tensors where tensors belong, hyperparameters where hyperparameters belong**: an exponent
  may use hyperparameters only, and a tensor's exponent is the number 2, -1 or 1/2;
  ``element()`` rounds hyperparameters only; an output is computed from a tensor (not an input
  passed through unchanged);
* **state**: each state pair's output can replace its input in place, so both have one shape
  and dtype: the input is a full tensor (not ``scalar=True``) and the output depends on one;
* **names the runtime needs**: a hyperparameter (or a scalar tensor, which an optimizer takes
  by keyword) is not named like an entry point's own keyword (``out``, ``params``, ...);
  ``step`` is the step counter's name (in checkpoints too); state labels are distinct from
  each other and from every settable value; at most one hyperparameter is the step counter;
* **the rule's name** is not a built-in rule's (``adamgen.rule(name)`` would be ambiguous).

Finally the spec is lowered as every kernel will be; a construct only lowering refuses (an
evaluated ``a*b*c`` whose order is ambiguous, ``x**3`` on a tensor) is attributed to the
output that holds it.
"""

from __future__ import annotations

import sympy
from sympy.core.function import AppliedUndef
from sympy.logic.boolalg import Boolean

from . import language
from .config import KernelConfig
from .errors import LoweringError, SpecError
from .rules import BUILTINS
from .spec import UpdateSpec

__all__ = ["ENTRY_POINT_KEYWORDS", "LANGUAGE", "check_rule", "not_elementwise"]

#: SymPy constructs that are not elementwise, with the name a message uses for them.
_NOT_ELEMENTWISE: tuple[tuple[type, str], ...] = (
    (sympy.Sum, "a sum over an index (a reduction)"),
    (sympy.Product, "a product over an index (a reduction)"),
    (sympy.Integral, "an integral"),
    (sympy.Derivative, "a derivative (differentiate with adamgen's VJP instead)"),
    (sympy.Indexed, "an indexed element (a shape-changing or cross-element access)"),
    (sympy.IndexedBase, "an indexed array (a shape-changing or cross-element access)"),
    (sympy.MatrixBase, "a matrix (a shape-changing operation)"),
    (sympy.MatrixExpr, "a matrix expression (a shape-changing operation)"),
)

#: What a spec may compute, for messages.
LANGUAGE = ("+, -, *, /, x**2, x**-1, x**Rational(1, 2) of tensors, any power of "
            "hyperparameters, where(comparison, a, b), and adamgen.spec's fma, sqrt, sign, "
            "maximum, minimum, round_to, element")

#: SymPy functions a user may reach for first, and the spec language's way to say them.
_HINTS: dict[str, str] = {
    "Max": "use adamgen.spec.maximum(a, b) (NaN-propagating, as torch.maximum)",
    "Min": "use adamgen.spec.minimum(a, b) (NaN-propagating, as torch.minimum)",
    "sign": "use adamgen.spec.sign(x) (torch's sign: 0 for 0 and NaN)",
    "Abs": "there is no abs node: where(x < 0, -x, x) computes |x| (keeping the sign of -0.0)",
    "sqrt": "use adamgen.spec.sqrt(x) or x**Rational(1, 2)",
}

#: Keywords of the entry points every rule gets (``update(*tensors, out=...)``,
#: ``optimizer(params, ...)``, ``vjp(..., cotangents=, backend=)``, the optimizer's own
#: ``source``): a hyperparameter, or a scalar tensor (an optimizer takes it by keyword), with one
#: of these names could not be passed.
ENTRY_POINT_KEYWORDS = frozenset({"self", "out", "params", "source", "cotangents", "backend"})
#: The key of the step counter in an optimizer's checkpoint (``state_dict()["step"]``).
STEP = "step"


def check_rule(spec: UpdateSpec, *, builtin: bool = False) -> None:
    """Raise :class:`SpecError` naming the first reason ``spec`` cannot be compiled and served.

    Args:
        spec: the rule.
        builtin: ``spec`` is one of adamgen's own rules (its name is then its own).
    """
    if not builtin and spec.name in BUILTINS:
        raise SpecError(f"the rule name {spec.name!r} is a built-in rule's; choose another "
                        f"(built-in: {', '.join(BUILTINS)})")
    _check_state_shapes(spec)
    _check_names(spec)
    tensors = frozenset(spec.tensors)
    for name, expr in spec.outputs:
        _check_expression(spec, f"output {name!r}", expr, tensors, top=True)
    for name, expr in spec.names:
        _check_expression(spec, f"subexpression {name!r}", expr, tensors, top=False)
    _check_lowering(spec)


def not_elementwise(expr: sympy.Basic) -> str:
    """``"uses <what>: <node>; ..."`` for the first construct in ``expr`` that is not
    elementwise, or ``""``."""
    for node in sympy.preorder_traversal(expr):
        for kind, what in _NOT_ELEMENTWISE:
            if isinstance(node, kind):
                return (f"uses {what}: {node}; an update rule is elementwise, each output "
                        "element computed from the same element of every tensor")
    return ""


# --- names ----------------------------------------------------------------------------------

def _check_names(spec: UpdateSpec) -> None:
    interface = spec.interface
    scalar_tensors = [t.name for t in interface.tensors if t.scalar]
    for hyper in interface.hyperparameters:
        _keyword_name(spec, f"hyperparameter {hyper.name!r}", hyper.name)
    for name in scalar_tensors:
        _keyword_name(spec, f"scalar tensor {name!r} (an optimizer takes it by keyword)", name)
    steps = [h.name for h in interface.hyperparameters if h.kind == "step"]
    if len(steps) > 1:
        raise SpecError(f"{spec.name}: hyperparameters {', '.join(map(repr, steps))} are all "
                        "kind='step'; a rule has one step counter")
    settable = [h.name for h in interface.hyperparameters if h.kind != "step"] + scalar_tensors
    if STEP in settable:
        raise SpecError(f"{spec.name}: {STEP!r} is not a step counter here (declare "
                        f"Hyperparameter({STEP!r}, kind='step'), or choose another name): an "
                        f"optimizer's checkpoint keeps its step count under {STEP!r}")
    labels: dict[str, str] = {}
    for pair in interface.state:
        what = f"state pair {pair.output} -> {pair.input}"
        if pair.label in labels:
            raise SpecError(f"{spec.name}: {what} and {labels[pair.label]} are both labelled "
                            f"{pair.label!r} in checkpoints; give one StatePair(..., name=...)")
        if pair.label == STEP or pair.label in settable:
            clash = "the step count" if pair.label == STEP else f"the value of {pair.label}"
            raise SpecError(f"{spec.name}: {what} is labelled {pair.label!r} in checkpoints, "
                            f"where {pair.label!r} is {clash}; give it StatePair(..., name=...)")
        labels[pair.label] = what


def _keyword_name(spec: UpdateSpec, what: str, name: str) -> None:
    if name in ENTRY_POINT_KEYWORDS:
        raise SpecError(f"{spec.name}: {what} is named like a keyword of adamgen's entry points "
                        f"({', '.join(sorted(ENTRY_POINT_KEYWORDS))}), so a caller could not "
                        "pass it; choose another name")


# --- the graph --------------------------------------------------------------------------------

def _check_expression(spec: UpdateSpec, what: str, expr: sympy.Basic,
                      tensors: frozenset[sympy.Symbol], *, top: bool) -> None:
    """Walk ``expr`` as lowering will, naming the first construct no kernel computes."""
    prefix = f"{spec.name}: {what}"
    if top and isinstance(expr, sympy.Symbol):
        kind = "tensor" if expr in tensors else "hyperparameter"
        raise SpecError(f"{prefix} is the {kind} {expr} itself, unchanged; an output is "
                        "computed from the inputs (drop it, or compute something)")

    def used_tensors(node: sympy.Basic) -> list[str]:
        return sorted(s.name for s in node.free_symbols & tensors)

    def walk(node: sympy.Basic) -> None:
        if isinstance(node, sympy.Symbol):
            return
        if node.is_number and not node.free_symbols and not isinstance(node, sympy.Function):
            if node.is_finite is False or node is sympy.nan:
                raise SpecError(f"{prefix} uses the constant {node}, which is not a finite "
                                "number")
            if node.is_extended_real is False or node.has(sympy.I):
                raise SpecError(f"{prefix} uses the complex number {node}; kernels compute "
                                "with real numbers")
            return
        problem = not_elementwise(node)
        if problem:
            raise SpecError(f"{prefix} {problem}")
        if isinstance(node, (sympy.Add, sympy.Mul)):
            for arg in node.args:
                walk(arg)
            return
        if isinstance(node, sympy.Pow):
            _check_power(prefix, node, tensors)
            walk(node.base)
            walk(node.exp)
            return
        if isinstance(node, sympy.Piecewise):
            for value, condition in node.args:
                walk(value)
                if condition is sympy.true:
                    continue
                if not isinstance(condition, sympy.core.relational.Relational):
                    raise SpecError(f"{prefix}: the condition {condition} of {node} is not one "
                                    "comparison (>, >=, <, <=, Eq, Ne); nest where() to "
                                    "combine conditions")
                walk(condition.lhs)
                walk(condition.rhs)
            return
        if isinstance(node, (sympy.core.relational.Relational, Boolean)):
            raise SpecError(f"{prefix} uses {node}, a condition (true or false), as a number; "
                            "a condition belongs in where(condition, a, b)")
        if isinstance(node, language.RoundToElement) and used_tensors(node):
            raise SpecError(f"{prefix}: element() rounds an expression of hyperparameters "
                            f"only; its argument {node.args[0]} uses the tensor(s) "
                            f"{', '.join(used_tensors(node))} (a tensor is in the element "
                            "dtype already)")
        if type(node) in language.NODES:
            for arg in node.args:
                walk(arg)
            return
        if isinstance(node, AppliedUndef):
            raise SpecError(f"{prefix} uses the function {type(node).__name__} ({node}), an "
                            f"undefined function (sympy.Function({type(node).__name__!r})): "
                            f"a kernel can only compute what it is written in, the spec "
                            f"language: {LANGUAGE}")
        name = type(node).__name__
        kind = f"the function {name}" if isinstance(node, sympy.Function) else name
        hint = _HINTS.get(name, f"the spec language is {LANGUAGE}")
        raise SpecError(f"{prefix} uses {kind} ({node}), which adamgen cannot compute in a "
                        f"kernel; {hint}")

    walk(expr)


def _check_power(prefix: str, node: sympy.Pow, tensors: frozenset[sympy.Symbol]) -> None:
    """An exponent uses hyperparameters only; a tensor's exponent is 2, -1 or 1/2."""
    in_exponent = sorted(s.name for s in node.exp.free_symbols & tensors)
    if in_exponent:
        raise SpecError(f"{prefix}: in {node}, the exponent {node.exp} uses the tensor(s) "
                        f"{', '.join(in_exponent)}; an exponent may use hyperparameters only "
                        "(a tensor exponent would need pow per element)")
    in_base = sorted(s.name for s in node.base.free_symbols & tensors)
    if in_base and node.exp.free_symbols:
        powers = ", ".join(sorted(s.name for s in node.exp.free_symbols))
        raise SpecError(f"{prefix}: {node} is a tensor raised to a symbolic power (the "
                        f"hyperparameter(s) {powers} in the exponent of {', '.join(in_base)}); "
                        "a tensor's exponent must be the number 2, -1 or 1/2 (there is no "
                        "per-element pow)")


def _check_state_shapes(spec: UpdateSpec) -> None:
    interface = spec.interface
    full = {t.name for t in interface.tensors if not t.scalar}
    for pair in interface.state:
        if interface.tensor(pair.input).scalar:
            raise SpecError(f"{spec.name}: state pair {pair.output} -> {pair.input}: "
                            f"{pair.input} may be a scalar, so {pair.output} cannot replace it "
                            f"in place; declare it Tensor({pair.input!r}), not scalar=True")
        depends = set(interface.dependencies(pair.output))
        if not depends & full:
            uses = ", ".join(sorted(depends)) or "nothing"
            raise SpecError(f"{spec.name}: state pair {pair.output} -> {pair.input}: "
                            f"{pair.output} depends on no full tensor (only on {uses}), so it "
                            f"does not have {pair.input}'s shape; make it depend on a tensor "
                            "declared without scalar=True")


def _check_lowering(spec: UpdateSpec) -> None:
    """Lower ``spec`` as a kernel will be; a refusal is attributed to the output holding it."""
    from .codegen.lower import lower

    try:
        lower(spec, KernelConfig(spec=spec.ref(), dtype="float64"))
        return
    except LoweringError as error:
        whole = error
    interface = spec.interface
    for name, expr in spec.outputs:
        alone = UpdateSpec(spec.name, interface.tensors, interface.hyperparameters,
                           [(name, expr)])
        try:
            lower(alone, KernelConfig(spec=alone.ref(), dtype="float64"))
        except LoweringError as error:
            raise SpecError(f"{spec.name}: output {name!r}: {error}") from None
    raise SpecError(f"{spec.name}: {whole}") from None
