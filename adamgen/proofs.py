"""The proof tools ``adamgen verify`` is built from: IR to SymPy, deciding identities, witnesses.

Every claim is proven symbolically (an identity by ``expand``/``cancel`` of a difference to 0),
never by sampling. Outcomes:

* ``PROVED``: SymPy reduced the claim to an identity;
* ``FAILED``: SymPy did not, and an exact counterexample (rational inputs in the rule's declared
  ranges, 50-digit evaluation) shows the claim false; the detail names it;
* ``UNPROVEN``: SymPy could not decide either way. Never reported as proven.

Rules' own theorems (:mod:`adamgen.rules`) use these tools; :func:`ir_equals_spec` is the theorem
every rule gets: the lowered kernel computes the spec's value in exact arithmetic.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import sympy
from sympy import Piecewise, Rational, S, Symbol

from . import ieee, language
from .codegen.ir import COMPARISONS, KernelIR, Operand, comparison, rounding, stochastic
from .config import KernelConfig
from .interface import Hyperparameter
from .spec import UpdateSpec

PROVED, FAILED, UNPROVEN = "PROVED", "FAILED", "UNPROVEN"
#: Lowers a spec for a configuration (:func:`adamgen.codegen.lower.lower`, or a test's
#: deliberately broken one).
IRFactory = Callable[[UpdateSpec, KernelConfig], KernelIR]
Claim = tuple[str, sympy.Expr, sympy.Expr]


@dataclass(frozen=True)
class TheoremResult:
    """One theorem's outcome: ``status`` is PROVED, FAILED or UNPROVEN."""

    name: str
    status: str
    seconds: float
    detail: str


class Undecided(Exception):
    """SymPy could not decide a condition or an identity."""


# --- expressions from the IR ----------------------------------------------------------------

def exact_constant(value: Operand) -> sympy.Expr:
    """A constant as the exact rational its IEEE double is (0.1 is not 1/10)."""
    return sympy.Integer(value) if isinstance(value, int) else Rational(value)


_PYTHON_TESTS = {sympy.StrictGreaterThan: operator.gt, sympy.GreaterThan: operator.ge,
                 sympy.StrictLessThan: operator.lt, sympy.LessThan: operator.le,
                 sympy.Equality: operator.eq, sympy.Unequality: operator.ne}
_RELATIONS = {"gt": sympy.Gt, "ge": sympy.Ge, "lt": sympy.Lt, "le": sympy.Le,
              "eq": sympy.Eq, "ne": sympy.Ne}
_ROUNDINGS = {"bfloat16": language.RoundToBfloat16, "float16": language.RoundToFloat16,
              "float32": language.RoundToFloat32}
_OPS: dict[str, Callable[..., sympy.Expr]] = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "neg": lambda a: -a, "pow": lambda a, b: a**b,
    "sqrt": sympy.sqrt, "fma": lambda a, b, c: a * b + c, "sign": sympy.sign,
    "maximum": sympy.Max, "minimum": sympy.Min,
}


def _step_value(op: str, args: Sequence[sympy.Expr]) -> sympy.Expr:
    if op in _OPS:
        return _OPS[op](*args)
    target = rounding(op)
    if target is not None:
        return args[0] if target == "element" else _ROUNDINGS[target](args[0])
    target = stochastic(op)
    if target is not None:  # uninterpreted, as in the spec: the same node on both sides
        node = {"bfloat16": language.StochasticRoundBfloat16,
                "float16": language.StochasticRoundFloat16}[target]
        return node(args[0], sympy.Integer(int(args[1])))
    relation = comparison(op)
    if relation is not None:
        name = next(k for k, v in COMPARISONS.items() if v == relation)
        return Piecewise((args[2], _RELATIONS[name](args[0], args[1])), (args[3], True))
    raise Undecided(f"no exact value for the op {op}")


def ir_expressions(ir: KernelIR, symbols: Mapping[str, Symbol]) -> dict[str, sympy.Expr]:
    """Each output of ``ir`` as a SymPy expression of the inputs, from its prelude and body (each
    step's exact-arithmetic value; rounding steps stay uninterpreted)."""
    values: dict[str, sympy.Expr] = {name: symbols[name] for name in ir.tensors}
    values.update({name: symbols[name] for name in ir.free_hyperparameters})
    for step in ir.prelude + ir.body:
        args = [values[a] if isinstance(a, str) else exact_constant(a) for a in step.args]
        values[step.target] = _step_value(step.op, args)
    return {name: values[value] for name, value in ir.outputs}


def python_folded(expr: sympy.Basic, constants: Mapping[str, float],
                  dtype: str = "float64") -> sympy.Basic:
    """The spec with baked hyperparameters, each all-constant subtree folded as Python would.

    Independent of the lowering: it evaluates the spec's own binary tree with Python floats
    (``a - b``, ``a / b``, ``a ** b``, ``math.sqrt`` in the spec's order) and keeps the result's
    exact value; roundings are :func:`adamgen.ieee.round_scalar` (``element`` to ``dtype``).
    """
    def negated(node: sympy.Basic) -> sympy.Basic | None:
        """``x`` for ``-x`` (``Mul(-1, ...)``, as SymPy negates a product: its other factors)."""
        if isinstance(node, sympy.Mul) and S.NegativeOne in node.args:
            rest = [f for f in node.args if f != S.NegativeOne]
            return rest[0] if len(rest) == 1 else sympy.Mul(*rest, evaluate=False)
        return None

    def value(node: sympy.Basic) -> float:
        if isinstance(node, Symbol):
            return constants[node.name]
        if node.is_Number:
            return float(node)
        if isinstance(node, language.Sqrt):
            return math.sqrt(value(node.args[0]))
        if isinstance(node, language.RoundToBase):
            target = dtype if node.dtype == "element" else node.dtype
            return ieee.round_scalar(value(node.args[0]), target)
        if isinstance(node, Piecewise):
            (then, condition), (otherwise, _) = node.args
            test = _PYTHON_TESTS[type(condition)]
            return value(then) if test(value(condition.lhs), value(condition.rhs)) \
                else value(otherwise)
        if negated(node) is not None:
            return -value(negated(node))
        if len(node.args) != 2:
            raise Undecided(f"cannot fold {node}: not a binary node")
        a, b = node.args
        if isinstance(node, sympy.Add):
            if negated(b) is not None and negated(a) is None:
                return value(a) - value(negated(b))
            if negated(a) is not None and negated(b) is None:
                return value(b) - value(negated(a))
            return value(a) + value(b)
        if isinstance(node, sympy.Mul) and isinstance(b, sympy.Pow) and b.exp == -1:
            return value(a) / value(b.base)
        if isinstance(node, sympy.Mul):
            return value(a) * value(b)
        if isinstance(node, sympy.Pow) and b in (-1, 2):
            return 1 / value(a) if b == -1 else value(a) * value(a)
        if isinstance(node, sympy.Pow):
            return value(a) ** value(b)
        raise Undecided(f"cannot fold {node}")

    def walk(node: sympy.Basic) -> sympy.Basic:
        names = {s.name for s in node.free_symbols}
        if names and names <= set(constants):
            if isinstance(node, sympy.core.relational.Relational):
                test = _PYTHON_TESTS[type(node)](value(node.lhs), value(node.rhs))
                return sympy.true if test else sympy.false
            return Rational(value(node))
        if not node.args or isinstance(node, Symbol):
            return node
        with sympy.evaluate(False):
            return node.func(*(walk(a) for a in node.args))

    return walk(expr)


# --- deciding ---------------------------------------------------------------------------------

def is_zero(expr: sympy.Expr) -> bool:
    if sympy.expand(expr) == 0:
        return True
    return sympy.cancel(sympy.together(expr)) == 0


def _sample(symbols: set[Symbol], rng: random.Random,
            hyperparameters: Mapping[str, Hyperparameter]) -> dict[Symbol, sympy.Expr]:
    """Exact inputs in the rule's declared ranges (an integer step from 1), else any rational."""
    values: dict[Symbol, sympy.Expr] = {}
    for s in symbols:
        hyper = hyperparameters.get(s.name)
        if s.is_integer or (hyper is not None and hyper.kind == "step"):
            values[s] = sympy.Integer(rng.randint(1, 9))
            continue
        value = Rational(rng.randint(1, 40), rng.randint(7, 23))
        if hyper is not None:
            low = hyper.range.low if hyper.range.low is not None else -1e3
            high = hyper.range.high if hyper.range.high is not None else low + 1e3
            value = Rational(low) + (Rational(high) - Rational(low)) * Rational(
                rng.randint(1, 98), 100)
        elif not (s.is_positive or s.is_nonnegative) and (s.is_negative or rng.random() < 0.5):
            value = -value
        values[s] = value
    return values


def counterexample(lhs: sympy.Expr, rhs: sympy.Expr,
                   hyperparameters: Mapping[str, Hyperparameter] | None = None) -> str | None:
    """Exact inputs where ``lhs != rhs``: both finite and apart, or one finite and one not."""
    rng = random.Random(0)
    for _ in range(6):
        values = _sample(lhs.free_symbols | rhs.free_symbols, rng, hyperparameters or {})
        a, b = (sympy.N(side.xreplace(values), 50) for side in (lhs, rhs))
        if not (a.is_Number or a.is_number) or not (b.is_Number or b.is_number):
            continue
        finite_a, finite_b = a.is_finite, b.is_finite
        if finite_a and finite_b and abs(a - b) <= 1e-30 * max(1, abs(a), abs(b)):
            continue  # equal within the 50 digits evaluated
        if (finite_a and finite_b) or (finite_a is True) != (finite_b is True):
            shown = ", ".join(f"{k}={v}" for k, v in sorted(values.items(), key=str))
            gap = f" (difference {sympy.N(a - b, 6)})" if finite_a and finite_b else ""
            return f"{sympy.N(a, 6)} != {sympy.N(b, 6)}{gap} at {shown}"
    return None


def identity(claims: Sequence[Claim],
             hyperparameters: Mapping[str, Hyperparameter] | None = None) -> tuple[str, str]:
    """Each ``(label, lhs, rhs)`` must be an identity: PROVED, FAILED (witness) or UNPROVEN."""
    undecided = []
    for label, lhs, rhs in claims:
        if is_zero(lhs - rhs):
            continue
        witness = counterexample(lhs, rhs, hyperparameters)
        if witness is not None:
            return FAILED, f"{label}: {witness}"
        undecided.append(label)
    if undecided:
        return UNPROVEN, "SymPy could not reduce to 0: " + ", ".join(undecided)
    return PROVED, "; ".join(label for label, _, _ in claims)


def resolve(expr: sympy.Basic) -> sympy.Basic:
    """Replace each Piecewise by the branch whose condition SymPy decides true."""
    if isinstance(expr, Piecewise):
        for value, condition in expr.args:
            if condition not in (sympy.true, sympy.false):
                condition = condition.func(sympy.expand(condition.lhs - condition.rhs), 0)
            if condition == sympy.true:
                return resolve(value)
            if condition != sympy.false:
                raise Undecided(f"cannot decide {condition}")
        raise Undecided(f"no branch of {expr} holds")
    if not expr.args or isinstance(expr, Symbol):
        return expr
    return expr.func(*(resolve(a) for a in expr.args))


def cases(expr: sympy.Basic) -> list[tuple[str, sympy.Basic]]:
    """``expr`` once per truth assignment of the conditions of its Piecewise nodes that SymPy
    cannot decide (a rule's branch on a hyperparameter: both branches must satisfy a claim)."""
    conditions: list[sympy.Basic] = []
    for piece in expr.atoms(Piecewise):
        for _, condition in piece.args:
            if condition not in (sympy.true, sympy.false) and condition not in conditions:
                try:
                    resolve(Piecewise((S.One, condition), (S.Zero, True)))
                except Undecided:
                    conditions.append(condition)
    found = [("", expr)]
    for condition in conditions:
        found = [(f"{label}{', ' if label else ''}{condition} {truth}",
                  value.xreplace({condition: sympy.true if truth else sympy.false}))
                 for label, value in found for truth in (True, False)]
    return [(label or "one case", value) for label, value in found]


def symbols_of(spec: UpdateSpec) -> dict[str, Symbol]:
    """The spec's inputs by name."""
    return {s.name: s for s in spec.inputs}


def hyperparameters_of(spec: UpdateSpec) -> dict[str, Hyperparameter]:
    return {h.name: h for h in spec.interface.hyperparameters}


# --- the theorem every rule gets ------------------------------------------------------------

def ir_equals_spec(spec: UpdateSpec, factory: IRFactory, config: KernelConfig) -> tuple[str, str]:
    """The lowered kernel computes each output's exact-arithmetic value (baked constants folded
    with Python floats, as the kernel's prelude folds them)."""
    rebuilt = ir_expressions(factory(spec, config), symbols_of(spec))
    constants = config.constants_dict
    claims = []
    for name, expr in spec.outputs:
        folded = python_folded(expr, constants, config.dtype) if constants else expr
        reference = language.exact(folded)
        claims.append((name, rebuilt[name], reference))
    status, detail = identity(claims, hyperparameters_of(spec))
    return status, (f"expand(IR - spec) == 0 for {detail}" if status == PROVED else detail)
