"""Is a user's spec a rule adamgen can compile? One :class:`~adamgen.errors.SpecError` naming why.

:class:`~adamgen.spec.UpdateSpec` checks its own declarations when it is built (names, symbols,
state pairs, defaults). What needs the graph's meaning is checked here, once, when a rule is made
from the spec (``adamgen.Rule(spec)``), by lowering it the way every kernel will be lowered, and
by the rules a kernel relies on:

* every operation is elementwise and known (the spec language's nodes, ``+ - * /``, powers,
  ``where``); a reduction, an index, a derivative or an unknown function is named;
* hyperparameters stay Python floats and tensors stay tensors: a tensor in a power's exponent,
  or in ``element()`` (which rounds a hyperparameter expression), is named;
* each state pair's output can replace its input in place: the input is a full tensor (not one
  that may be a scalar) and the output is computed per element from full tensors;
* the name is not a built-in rule's (``adamgen.rule(name)`` would be ambiguous).
"""

from __future__ import annotations

import sympy

from .config import KernelConfig
from .errors import LoweringError, SpecError
from .rules import BUILTINS
from .spec import UpdateSpec

#: SymPy constructs that are not elementwise, with the name a message uses for them.
_NOT_ELEMENTWISE: tuple[tuple[type, str], ...] = (
    (sympy.Sum, "a sum over an index (a reduction)"),
    (sympy.Product, "a product over an index (a reduction)"),
    (sympy.Integral, "an integral"),
    (sympy.Derivative, "a derivative (differentiate with adamgen's VJP instead)"),
    (sympy.Indexed, "an indexed element (a shape-changing or cross-element access)"),
    (sympy.MatrixBase, "a matrix"),
    (sympy.MatrixExpr, "a matrix expression"),
)


def check_rule(spec: UpdateSpec, *, builtin: bool = False) -> None:
    """Raise :class:`SpecError` naming the first reason ``spec`` cannot be compiled."""
    if not builtin and spec.name in BUILTINS:
        raise SpecError(f"the rule name {spec.name!r} is a built-in rule's; choose another "
                        f"(built-in: {', '.join(BUILTINS)})")
    for name, expr in (*spec.outputs, *spec.names):
        for node in sympy.preorder_traversal(expr):
            for kind, what in _NOT_ELEMENTWISE:
                if isinstance(node, kind):
                    raise SpecError(f"{spec.name}: {name} uses {what}: {node}; an update rule "
                                    "is elementwise, each output element computed from the "
                                    "same element of every tensor")
    _check_state_shapes(spec)
    try:
        from .codegen.lower import lower

        lower(spec, KernelConfig(spec=spec.ref(), dtype="float64"))
    except LoweringError as error:
        raise SpecError(f"{spec.name}: {error}") from None


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
            raise SpecError(f"{spec.name}: state pair {pair.output} -> {pair.input}: "
                            f"{pair.output} depends on no full tensor, so it does not have "
                            f"{pair.input}'s shape")
