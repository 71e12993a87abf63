"""Derivatives of an update spec: its vector-Jacobian product (VJP), built as a new spec.

Why a spec: the VJP then goes through the same lowering, IR and backends as the update itself
(NumPy and C, exact and fast), and :mod:`adamgen.theorems` proves the lowered VJP equal to SymPy's
derivatives of the original spec. Nothing here knows that the spec is Adam, and nothing here
writes a derivative by hand: every one comes from :func:`sympy.diff`.

For a spec with tensor inputs ``x`` and outputs ``o``, the VJP spec has the tensor inputs
``x`` plus one cotangent ``d_<o>`` per output, the same hyperparameters, and one output
``d_<x>`` per tensor input::

    d_<x> = sum over outputs o of  d_<o> * (d o / d x)          (element by element)

Summing over broadcast dimensions is the runtime's job (:mod:`adamgen.runtime.vjp`).

**The rule where the argument of sqrt is not positive** (Adam's ``v``; written once, in
:class:`SqrtOfClamp`): the derivative of ``sqrt(max(u, 0))`` with respect to ``u`` is
``1 / (2*sqrt(u))`` where ``u > 0`` and ``0`` where ``u <= 0`` or ``u`` is NaN.

* ``u < 0``: the clamp is flat there, so 0 is the derivative.
* ``u = 0``: the one-sided derivatives are 0 (from below) and +inf (from above); none is
  finite on both sides, so the rule takes 0, the convention of ``relu'(0) = 0`` in PyTorch and
  JAX. Because the rule replaces the product ``clamp'(u) / (2*sqrt(clamp(u)))`` as a whole, the
  kernel never forms ``0 * inf = nan``, which is what differentiating ``where(u >= 0, u, 0)``
  and ``sqrt`` separately (as autodiff frameworks do) gives.

What this means for Adam (``v = beta2*vw_tm1 + (1-beta2)*dcdw**2``, ``mw`` the new moment):

* wherever ``w_new`` is differentiable the VJP is its derivative and finite, including at
  ``v = 0`` with ``mw = 0`` (zero state and zero gradient): ``w_new`` does not depend on
  ``vw_tm1`` there, and ``d w_new / d dcdw = -alpha*lr*(1-beta1)/epsilon``;
* at ``v = 0`` with ``mw != 0`` (e.g. a gradient so small that its square underflows), ``w_new``
  is not differentiable: ``d_vw_tm1`` gets the one-sided derivative from below (the path through
  ``sqrt`` contributes 0), and ``d_dcdw`` gets the symmetric derivative (the mean of the two
  one-sided ones, which is what a central finite difference measures), because
  ``d v / d dcdw = 2*(1-beta2)*dcdw`` is 0 there;
* with ``epsilon = 0`` and ``v = 0`` the update itself divides by zero; so does its VJP.

**The spec language's nodes** differentiate as their exact-arithmetic meaning: ``fma(a, b, c)``
as ``a*b + c``, ``sqrt`` as the square root, ``maximum``/``minimum`` as the branch they take
(on a tie, the second operand's derivative: a subgradient), ``sign`` as 0, and a
rounding (``round_to``, ``element``) as the identity: the VJP is the derivative of the rule in
exact arithmetic (the straight-through convention), evaluated at the primal values the kernel
computes with the spec's roundings. Conditions SymPy combines (``And``, ``Or``, ``ITE``) lower to
nested ``where`` of one comparison each.

**Evaluation order.** SymPy's derivatives are n-ary sums and products; the IR needs binary
steps. :func:`vjp_spec` shares subexpressions (``sympy.cse``, canonical order), then re-nests
every sum and product left to right, hyperparameter-only operands first (so they fold into the
prelude) and then by SymPy's ``default_sort_key``; a product is ``(scalar numerator / scalar
denominator) * (tensor numerator / tensor denominator)``. That nesting is the VJP's reference
rounding order, the same for every backend.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import sympy
from sympy import Piecewise, S, Symbol, sqrt

from . import language
from .errors import LoweringError
from .interface import DERIVATIVE_PREFIX
from .spec import UpdateSpec

#: Cotangent and gradient names: ``d_<output>`` and ``d_<tensor>``.
PREFIX = DERIVATIVE_PREFIX


class SqrtOfClamp(sympy.Function):
    """``sqrt(max(u, 0))`` as one node, so that its derivative carries the rule at ``u <= 0``.

    The derivative for ``u > 0`` is SymPy's derivative of ``sqrt``; the ``u <= 0`` branch is the
    module's documented rule (0).
    """

    nargs = 1

    @classmethod
    def eval(cls, u: sympy.Expr) -> sympy.Expr | None:
        """A number evaluates, as ``sqrt(max(u, 0))`` does (NaN gives 0)."""
        if u.is_Number:
            return S.Zero if u is S.NaN or u.is_nonpositive else sqrt(u)
        return None

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        u = self.args[0]
        x = sympy.Dummy("x", positive=True)
        return Piecewise((sympy.diff(sqrt(x), x).subs(x, u), u > 0), (0, True))


def _is_sqrt_of_clamp(expr: sympy.Basic) -> bool:
    """``sqrt(Piecewise((u, u >= 0), (0, True)))``, as the spec writes ``sqrt(max(u, 0))``."""
    if not (isinstance(expr, sympy.Pow) and expr.exp == S.Half
            and isinstance(expr.base, Piecewise) and len(expr.base.args) == 2):
        return False
    (value, condition), (otherwise, always) = expr.base.args
    return (always == sympy.true and otherwise == 0 and isinstance(condition, sympy.GreaterThan)
            and condition.lhs == value and condition.rhs == 0)


def evaluated(expr: sympy.Basic, *, abstract_sqrt_clamp: bool = False) -> sympy.Basic:
    """The spec's unevaluated graph rebuilt with SymPy's evaluation (canonical n-ary form).

    With ``abstract_sqrt_clamp``, each ``sqrt(max(u, 0))`` becomes :class:`SqrtOfClamp`
    (SymPy would otherwise push the ``sqrt`` inside the ``Piecewise`` and lose the pattern).
    """
    memo: dict[sympy.Basic, sympy.Basic] = {}

    def walk(node: sympy.Basic) -> sympy.Basic:
        if node in memo:
            return memo[node]
        if abstract_sqrt_clamp and _is_sqrt_of_clamp(node):
            result = SqrtOfClamp(walk(node.base.args[0].expr))
        elif not node.args or isinstance(node, sympy.Symbol):
            result = node
        else:
            result = node.func(*(walk(a) for a in node.args))
        memo[node] = result
        return result

    return walk(expr)


def vjp_expressions(spec: UpdateSpec) -> dict[str, sympy.Expr]:
    """``d_<x>`` for each tensor ``x``, as SymPy's (n-ary) derivatives of the spec.

    Contains :class:`SqrtOfClamp` and ``Piecewise((a, u > 0), (0, True))`` (the rule).
    """
    outputs = [(name, evaluated(expr, abstract_sqrt_clamp=True)) for name, expr in spec.outputs]
    cotangents = cotangent_symbols(spec)
    return {PREFIX + x.name: sympy.Add(*(cotangents[name] * sympy.diff(expr, x)
                                         for name, expr in outputs))
            for x in spec.tensors}


def cotangent_symbols(spec: UpdateSpec) -> dict[str, Symbol]:
    """One real symbol per output (:attr:`Interface.cotangents` names it), checked not to clash
    with an input or result."""
    taken = {s.name for s in spec.inputs} | {PREFIX + s.name for s in spec.tensors}
    cotangents = {name: Symbol(symbol, real=True)
                  for name, symbol in spec.interface.cotangents.items()}
    clashes = taken & {s.name for s in cotangents.values()}
    if clashes:
        raise LoweringError(f"cannot name the cotangents of {spec.name}: {sorted(clashes)} "
                            "already name an input or a gradient")
    return cotangents


@functools.cache
def vjp_spec(spec: UpdateSpec) -> UpdateSpec:
    """The VJP of ``spec`` as an :class:`UpdateSpec` whose graph is binary (ready to lower).

    Tensor inputs that no derivative reads (Adam's ``w``) are left out of the VJP's tensors.
    """
    expressions = vjp_expressions(spec)
    names = list(expressions)
    replacements, reduced = sympy.cse([expressions[n] for n in names], order="canonical")
    nester = _Nester(frozenset(spec.hyperparameters))
    for symbol, definition in replacements:
        nester.define(symbol, definition)
    outputs = []
    for name, expr in zip(names, reduced):
        tree = nester.build(expr)
        if tree.is_Number:
            raise LoweringError(f"{name} is the constant {tree}: a VJP output must be "
                                "computed element by element")
        if isinstance(tree, Symbol):  # d_w = d_w_new: `1*x` is exact and gives it a step
            tree = _mul(S.One, tree)
        outputs.append((name, tree))
    used = set().union(*(tree.free_symbols for _, tree in outputs))
    tensors = tuple(s for s in spec.tensors + tuple(cotangent_symbols(spec).values())
                    if s in used)
    return UpdateSpec(f"{spec.name}_vjp", tensors=tensors,
                      hyperparameters=spec.interface.hyperparameters, outputs=tuple(outputs),
                      summary=f"the vector-Jacobian product of {spec.name}")


def _is_dyadic(number: sympy.Rational) -> bool:
    """True if ``number`` is an integer over a power of two (so exact as a float)."""
    q = int(number.q)
    return q & (q - 1) == 0 and abs(int(number.p)) < 2**53


def _is_reciprocal(tree: sympy.Basic) -> bool:
    return isinstance(tree, sympy.Pow) and tree.exp == S.NegativeOne


def _mul(a: sympy.Basic, b: sympy.Basic) -> sympy.Basic:
    return sympy.Mul(a, b, evaluate=False)


def _add(a: sympy.Basic, b: sympy.Basic) -> sympy.Basic:
    return sympy.Add(a, b, evaluate=False)


def _pow(a: sympy.Basic, b: sympy.Basic) -> sympy.Basic:
    return sympy.Pow(a, b, evaluate=False)


class _Nester:
    """Re-nests SymPy's n-ary expressions into binary, unevaluated nodes the lowering accepts.

    Inputs are evaluated SymPy expressions; outputs are built with ``evaluate=False`` node by
    node. Shared inputs map to one tree object, so the lowering translates each once.
    """

    def __init__(self, hyperparameters: frozenset[Symbol]) -> None:
        self.scalar_symbols: set[Symbol] = set(hyperparameters)
        self.env: dict[Symbol, sympy.Basic] = {}
        self.memo: dict[sympy.Basic, sympy.Basic] = {}

    def define(self, symbol: Symbol, definition: sympy.Basic) -> None:
        """A ``sympy.cse`` replacement: later expressions refer to ``symbol``."""
        if isinstance(definition, sympy.logic.boolalg.Boolean):
            self.env[symbol] = definition  # a condition: lowered where a branch reads it
            return
        self.env[symbol] = self.build(definition)
        if self.is_scalar(definition):
            self.scalar_symbols.add(symbol)

    def is_scalar(self, expr: sympy.Basic) -> bool:
        return expr.free_symbols <= self.scalar_symbols

    def order(self, operands: Iterable[sympy.Basic]) -> list[sympy.Basic]:
        """Scalars first (they combine in the prelude), then SymPy's canonical order."""
        return sorted(operands, key=lambda e: (not self.is_scalar(e), sympy.default_sort_key(e)))

    def build(self, expr: sympy.Basic) -> sympy.Basic:
        if expr not in self.memo:
            self.memo[expr] = self._build(expr)
        return self.memo[expr]

    def _build(self, expr: sympy.Basic) -> sympy.Basic:
        if isinstance(expr, Symbol):
            return self.env.get(expr, expr)
        if expr.is_Number:
            if not expr.is_Rational:
                raise LoweringError(f"derivative has the non-rational constant {expr}")
            return expr if _is_dyadic(expr) else self._quotient(
                [sympy.Integer(expr.p)], [sympy.Integer(expr.q)])
        if isinstance(expr, sympy.Add):
            return self._sum(expr)
        if isinstance(expr, sympy.Mul):
            return self._product(expr)
        if isinstance(expr, sympy.Pow):
            return self._power(expr)
        if isinstance(expr, SqrtOfClamp):
            u = self.build(expr.args[0])
            clamp = Piecewise((u, sympy.GreaterThan(u, 0, evaluate=False)), (0, True),
                              evaluate=False)
            return _pow(clamp, S.Half)
        if isinstance(expr, Piecewise):
            return self._piecewise(expr)
        if isinstance(expr, sympy.core.relational.Relational):
            return expr.func(self.build(expr.lhs), self.build(expr.rhs), evaluate=False)
        if isinstance(expr, language.Node) or (isinstance(expr, sympy.Function)
                                               and self.is_scalar(expr)):
            # the spec language's nodes (fma, sqrt, sign, maximum, roundings) lower as they
            # are; any function of hyperparameters alone is a constant here
            return expr.func(*(self.build(a) for a in expr.args))
        raise LoweringError(f"cannot re-nest {type(expr).__name__} in a derivative: {expr}")

    def _sum(self, expr: sympy.Add) -> sympy.Basic:
        result: sympy.Basic | None = None
        for term in self.order(expr.args):
            coefficient, _ = term.as_coeff_Mul()
            negative = coefficient.is_negative
            tree = self.build(-term if negative else term)
            signed = _mul(S.NegativeOne, tree) if negative else tree
            result = signed if result is None else _add(result, signed)
        assert result is not None
        return result

    def _product(self, expr: sympy.Mul) -> sympy.Basic:
        coefficient, factors = expr.as_coeff_mul()
        if not coefficient.is_Rational:
            raise LoweringError(f"derivative has the non-rational coefficient {coefficient}")
        negative = coefficient.is_negative
        coefficient = abs(coefficient)
        numerators: list[sympy.Basic] = []
        denominators: list[sympy.Basic] = []
        if _is_dyadic(coefficient):  # exact as a float: one multiplication
            if coefficient != 1:
                numerators.append(coefficient)
        else:
            numerators.append(sympy.Integer(coefficient.p))
            denominators.append(sympy.Integer(coefficient.q))
        for factor in factors:
            if isinstance(factor, sympy.Pow) and factor.exp.is_Number and factor.exp.is_negative:
                denominators.append(factor.base ** (-factor.exp))
            else:
                numerators.append(factor)
        scalar = self._quotient([f for f in numerators if self.is_scalar(f)],
                                [f for f in denominators if self.is_scalar(f)])
        tensor_numerators = [f for f in numerators if not self.is_scalar(f)]
        tensor_denominators = [f for f in denominators if not self.is_scalar(f)]
        if not tensor_numerators and not tensor_denominators:
            result = scalar
        elif not tensor_numerators:
            result = self._divide(scalar, self._chain(tensor_denominators))
        else:
            numerator = self._chain(tensor_numerators)
            if scalar is not S.One:
                numerator = _mul(scalar, numerator)
            result = self._divide(numerator, self._chain(tensor_denominators))
        return _mul(S.NegativeOne, result) if negative else result

    def _chain(self, factors: list[sympy.Basic]) -> sympy.Basic | None:
        """``((f0*f1)*f2)*...`` in :meth:`order`, or None for no factors."""
        result: sympy.Basic | None = None
        for factor in self.order(factors):
            tree = self.build(factor)
            if result is not None and _is_reciprocal(result) and _is_reciprocal(tree):
                tree = _mul(S.One, tree)  # (1/a)*(1/b), not (1/a)/b: `1*x` is exact
            result = tree if result is None else _mul(result, tree)
        return result

    def _quotient(self, numerators: list[sympy.Basic],
                  denominators: list[sympy.Basic]) -> sympy.Basic:
        numerator = self._chain(numerators)
        return self._divide(S.One if numerator is None else numerator,
                            self._chain(denominators))

    @staticmethod
    def _divide(numerator: sympy.Basic, denominator: sympy.Basic | None) -> sympy.Basic:
        if denominator is None:
            return numerator
        if numerator is S.One:
            return _pow(denominator, S.NegativeOne)
        if isinstance(numerator, sympy.Pow) and numerator.exp == -1:
            numerator = _mul(S.One, numerator)  # else the lowering reads two reciprocals
        return _mul(numerator, _pow(denominator, S.NegativeOne))

    def _power(self, expr: sympy.Pow) -> sympy.Basic:
        base, exponent = expr.args
        if self.is_scalar(expr):  # the prelude computes it with Python's ** (or x*x, 1/x)
            return _pow(self.build(base), self.build(exponent))
        if exponent.is_Number and exponent.is_negative:
            return _pow(self.build(base ** (-exponent)), S.NegativeOne)
        if exponent == S.Half:
            return _pow(self.build(base), S.Half)
        if exponent.is_Integer and exponent >= 2:
            tree = self.build(base)
            return _pow(tree, 2) if exponent == 2 else self._chain([base] * int(exponent))
        if exponent.is_Rational and exponent.q == 2:
            whole = base ** (exponent.p // 2)
            return _mul(self.build(whole), _pow(self.build(base), S.Half))
        raise LoweringError(f"elementwise power {expr} cannot be lowered")

    def _piecewise(self, expr: Piecewise) -> sympy.Basic:
        """Nested ``where(comparison, a, b)``: SymPy's derivatives combine conditions (``And``,
        ``Or``, ``Not``, ``ITE``) and add branches; the lowering takes one comparison each."""
        *branches, (last, always) = expr.args
        if always != sympy.true:
            raise LoweringError(f"cannot lower the Piecewise {expr} in a derivative: its last "
                                "branch has a condition")
        result = self.build(last)
        for value, condition in reversed(branches):
            result = self._branch(self.env.get(condition, condition), self.build(value), result)
        return result

    def _branch(self, condition: sympy.Basic, yes: sympy.Basic, no: sympy.Basic) -> sympy.Basic:
        """``condition ? yes : no`` with a boolean condition, as wheres of one comparison."""
        if isinstance(condition, Symbol) and condition in self.env:  # a shared condition
            return self._branch(self.env[condition], yes, no)
        if condition == sympy.true:
            return yes
        if condition == sympy.false:
            return no
        if isinstance(condition, sympy.core.relational.Relational):
            return Piecewise((yes, self.build(condition)), (no, True), evaluate=False)
        if isinstance(condition, sympy.Not):
            return self._branch(condition.args[0], no, yes)
        if isinstance(condition, sympy.ITE):
            test, then, otherwise = condition.args
            return self._branch(test, self._branch(then, yes, no),
                                self._branch(otherwise, yes, no))
        if isinstance(condition, sympy.And):
            first, *rest = condition.args
            return self._branch(first, self._branch(sympy.And(*rest), yes, no), no)
        if isinstance(condition, sympy.Or):
            first, *rest = condition.args
            return self._branch(first, yes, self._branch(sympy.Or(*rest), yes, no))
        raise LoweringError(f"cannot lower the condition {condition} in a derivative")

