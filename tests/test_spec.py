"""The spec keeps the reference's nesting, and its hash identifies the graph."""

from __future__ import annotations

import sympy

from adamgen.rules.ivy_adam import spec as adam_spec


def binary_nodes_only(expr: sympy.Basic) -> bool:
    if isinstance(expr, sympy.Add) and len(expr.args) != 2:
        return False
    if isinstance(expr, sympy.Mul):
        factors = [a for a in expr.args if a != sympy.S.NegativeOne]
        if len(factors) > 2:
            return False
    return all(binary_nodes_only(a) for a in expr.args)


def test_outputs_and_inputs_follow_ivy_signature():
    spec = adam_spec()
    assert [s.name for s in spec.tensors] == ["w", "dcdw", "lr", "mw_tm1", "vw_tm1"]
    assert [s.name for s in spec.hyperparameters] == ["beta1", "beta2", "epsilon", "step"]
    assert [name for name, _ in spec.outputs] == ["w_new", "mw", "vw"]


def test_every_sum_and_product_is_binary_so_the_order_is_fixed():
    for _, expr in adam_spec().outputs:
        assert binary_nodes_only(expr)


def test_spec_equals_textbook_formula_in_exact_arithmetic():
    spec = adam_spec()
    w, g, lr, m, v = spec.tensors
    b1, b2, eps, t = spec.hyperparameters
    m_new = b1 * m + (1 - b1) * g
    v_new = b2 * v + (1 - b2) * g**2
    alpha = sympy.sqrt(1 - b2**t) / (1 - b1**t + eps)
    w_new = w - alpha * m_new / (sympy.sqrt(v_new) + eps) * lr
    assert sympy.simplify(spec.output("mw") - m_new) == 0
    assert sympy.simplify(spec.output("vw") - v_new) == 0
    # where v_new >= 0 the clamp is the identity: take the Piecewise's first branch
    unclamped = spec.output("w_new").replace(sympy.Piecewise, lambda *branches: branches[0][0])
    assert sympy.simplify(unclamped - w_new) == 0


def test_hash_is_stable_and_changes_with_the_graph():
    spec = adam_spec()
    assert spec.spec_hash == adam_spec().spec_hash
    assert len(spec.spec_hash) == 16
    _, dcdw, _, mw_tm1, _ = spec.tensors
    beta1, _, epsilon, _ = spec.hyperparameters
    with sympy.evaluate(False):
        # the same value in exact arithmetic, rounded differently: a different kernel
        regrouped = beta1 * mw_tm1 + (dcdw - beta1 * dcdw)
    assert sympy.simplify(regrouped - spec.output("mw")) == 0
    other_math = spec.output("w_new").xreplace({epsilon: 2 * epsilon})
    for name, expr in (("mw", regrouped), ("w_new", other_math)):
        outputs = tuple((n, expr if n == name else e) for n, e in spec.outputs)
        changed = spec.replace(outputs=outputs)
        assert changed.spec_hash != spec.spec_hash, name
