"""The update rule, written once as a SymPy graph: the single source of truth of adamgen.

Every backend, every proof and every derivative is derived from :func:`adam_spec`. Nothing else
in the package writes the formula, and nothing below this module knows that it is Adam: the
pipeline takes an :class:`UpdateSpec`, so AdamW or AMSGrad would be a new spec, not edits across
the stages.

Why ``sympy.evaluate(False)``: floating point is not associative, and SymPy normally flattens
``a*b*c`` and ``a+b+c`` into canonical n-ary nodes, which would lose the order in which the
reference rounds. Built unevaluated, every ``Add`` and ``Mul`` stays binary, exactly as Python
parses the reference expression; since IEEE addition and multiplication are commutative, only
this nesting (not the operand order inside a node) fixes the bits.

Two kinds of inputs, because the reference computes with two kinds of numbers:

* **tensors** are arrays (or a weak scalar such as a Python float ``lr``): computed in the
  arrays' dtype, element by element;
* **hyperparameters** are Python floats: every subexpression of hyperparameters only is computed
  once per call in IEEE double, exactly as Python computes it (``x ** Rational(1, 2)`` there is
  Python's ``x ** 0.5``, i.e. C's ``pow``, not ``sqrt``), and is then rounded to the arrays'
  dtype where it meets a tensor, as NumPy does with a Python float.

On tensors, ``sqrt`` is NumPy's ``sqrt`` (which ``x ** 0.5`` on an array is) and ``x**2`` is
``x*x`` (NumPy's fast path for ``x ** 2``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import sympy
from sympy import Piecewise, Rational, Symbol, sqrt


@dataclass(frozen=True)
class UpdateSpec:
    """An elementwise update rule.

    Attributes:
        name: short identifier, used in generated names.
        tensors: array inputs, in the public signature's order.
        hyperparameters: Python-float inputs, in the public signature's order.
        outputs: ``(name, expression)`` pairs, in the order the public function returns them.
    """

    name: str
    tensors: tuple[Symbol, ...]
    hyperparameters: tuple[Symbol, ...]
    outputs: tuple[tuple[str, sympy.Expr], ...]

    @property
    def inputs(self) -> tuple[Symbol, ...]:
        return self.tensors + self.hyperparameters

    def output(self, name: str) -> sympy.Expr:
        return dict(self.outputs)[name]

    @property
    def spec_hash(self) -> str:
        """A hash of the graph itself (``srepr`` keeps nesting and operand order)."""
        text = sympy.srepr((self.name, self.tensors, self.hyperparameters, self.outputs))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def adam_spec() -> UpdateSpec:
    """Ivy's ``adam_update`` (Ivy's ``adam_step`` followed by ``optimizer_update``).

    The reference, in Ivy's words::

        mw = beta1 * mw + (1 - beta1) * dcdw
        vw = beta2 * vw + (1 - beta2) * dcdw**2
        vw_sqrt = maximum(vw, 0.0) ** 0.5            # Ivy's maximum is where(x >= 0, x, 0)
        alpha = (1 - beta2**step) ** 0.5 / (1 - beta1**step + epsilon)
        w_new = w - ((alpha * mw) / (vw_sqrt + epsilon)) * lr

    Note that ``epsilon`` enters twice, and that ``alpha`` is not the paper's bias correction.
    """
    w, dcdw, lr, mw_tm1, vw_tm1 = sympy.symbols("w dcdw lr mw_tm1 vw_tm1", real=True)
    beta1, beta2, epsilon, step = sympy.symbols("beta1 beta2 epsilon step", real=True)
    with sympy.evaluate(False):
        mw = beta1 * mw_tm1 + (1 - beta1) * dcdw
        vw = beta2 * vw_tm1 + (1 - beta2) * dcdw**2
        vw_sqrt = sqrt(Piecewise((vw, vw >= 0), (0, True)))
        alpha = (1 - beta2**step) ** Rational(1, 2) / (1 - beta1**step + epsilon)
        w_new = w - ((alpha * mw) / (vw_sqrt + epsilon)) * lr
    return UpdateSpec(
        name="adam",
        tensors=(w, dcdw, lr, mw_tm1, vw_tm1),
        hyperparameters=(beta1, beta2, epsilon, step),
        outputs=(("w_new", w_new), ("mw", mw), ("vw", vw)),
    )
