"""IR steps as SymPy expressions: what both printers (C and NumPy) print.

Each backend renders the math the same way: a step becomes one unevaluated SymPy expression
over the backend's leaves (``w[i]`` in C, a buffer name in NumPy), and the backend's printer
class prints it. Every expression here is exactly one operation of the step, so the printed code
performs the IR's operations in the IR's order; the spec language's nodes
(:mod:`adamgen.language`) are reused as the printable forms of ``fma``, ``sqrt``, ``sign``,
``maximum``, ``minimum`` and the roundings, and ``select_<cmp>`` is a two-branch ``Piecewise``.
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy

from .. import language
from .ir import Operand, Step, comparison, rounding, stochastic

_RELATIONALS: dict[str, type] = {
    ">": sympy.StrictGreaterThan, ">=": sympy.GreaterThan, "<": sympy.StrictLessThan,
    "<=": sympy.LessThan, "==": sympy.Equality, "!=": sympy.Unequality,
}
_UNARY: dict[str, type] = {"sqrt": language.Sqrt, "sign": language.Sign}
_NODES: dict[str, type] = {"fma": language.Fma, "maximum": language.Maximum,
                           "minimum": language.Minimum}
_ROUNDING: dict[str, type] = {"bfloat16": language.RoundToBfloat16,
                              "float16": language.RoundToFloat16,
                              "float32": language.RoundToFloat32,
                              "element": language.RoundToElement}
_STOCHASTIC: dict[str, type] = {"bfloat16": language.StochasticRoundBfloat16,
                                "float16": language.StochasticRoundFloat16}


def step_expression(step: Step, leaves: Mapping[str, sympy.Basic]) -> sympy.Basic:
    """One IR step as an unevaluated SymPy expression, printed back as exactly that operation.

    ``leaves`` maps every name the step reads to the leaf the backend prints for it; constants
    become ``sympy.Float`` (the printers render each rounded once to the element type).
    """
    def leaf(operand: Operand) -> sympy.Basic:
        return leaves[operand] if isinstance(operand, str) else sympy.Float(float(operand))

    op = step.op
    target = stochastic(op)
    if target is not None:  # the stream stays an integer: it selects bits, it is no value
        return _STOCHASTIC[target](leaf(step.args[0]), sympy.Integer(int(step.args[1])))
    args = [leaf(a) for a in step.args]
    minus_one = sympy.Integer(-1)
    if op == "add":
        return sympy.Add(args[0], args[1], evaluate=False)
    if op == "sub":
        return sympy.Add(args[0], sympy.Mul(minus_one, args[1], evaluate=False), evaluate=False)
    if op == "mul":
        return sympy.Mul(args[0], args[1], evaluate=False)
    if op == "div":
        return sympy.Mul(args[0], sympy.Pow(args[1], minus_one, evaluate=False), evaluate=False)
    if op == "neg":
        return sympy.Mul(minus_one, args[0], evaluate=False)
    if op in _UNARY:
        return _UNARY[op](args[0])
    if op in _NODES:
        return _NODES[op](*args)
    dtype = rounding(op)
    if dtype is not None:
        return _ROUNDING[dtype](args[0])
    relation = comparison(op)
    if relation is not None:
        condition = _RELATIONALS[relation](args[0], args[1], evaluate=False)
        return sympy.Piecewise((args[2], condition), (args[3], True), evaluate=False)
    raise ValueError(f"no element-wise form for {step} (pow belongs in the prelude)")
