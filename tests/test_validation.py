"""``adamgen.Rule(spec)`` refuses a spec it cannot compile or serve with one :class:`SpecError`
that names the culprit (the output, tensor or hyperparameter concerned) and what was expected.

One case per mistake (issue 16, item 2), each built from a valid little rule with one thing
changed; each message is matched on the culprit's name and on the expectation. The built-in
rules (every option) and a rule using every node of the language pass.
"""

from __future__ import annotations

import itertools

import pytest
import sympy

import adamgen
from adamgen.errors import SpecError
from adamgen.rules import BUILTINS
from adamgen.rules.torch_adam import spec as torch_adam_spec
from adamgen.spec import (
    Hyperparameter,
    Range,
    StatePair,
    Tensor,
    UpdateSpec,
    element,
    fma,
    maximum,
    minimum,
    round_to,
    sign,
    sqrt,
    symbols,
    unevaluated,
    where,
)
from adamgen.validation import check_rule

p, g, m, lr, mu = symbols("p g m lr mu")
i = sympy.Symbol("i", integer=True)


def spec(**changes) -> UpdateSpec:
    """A valid momentum rule (``p - lr*g``, ``mu*m + g``) with ``changes`` applied."""
    with unevaluated():
        outputs = {"p_new": p - lr * g, "m_new": mu * m + g}
    arguments = {"name": "user_rule", "tensors": ["p", "g", "m"], "hyperparameters": ["lr", "mu"],
                 "outputs": outputs, "state": {"p_new": "p", "m_new": "m"}, "parameter": "p",
                 "gradient": "g"}
    arguments.update(changes)
    return UpdateSpec(**arguments)


def outputs(p_new: object) -> dict[str, object]:
    """The valid outputs with ``p_new`` replaced."""
    with unevaluated():
        return {"p_new": p_new, "m_new": mu * m + g}


def rejected(make) -> str:
    """The message of the SpecError that building the spec or ``Rule(spec)`` raises."""
    with pytest.raises(SpecError) as caught:
        adamgen.Rule(make())
    return str(caught.value)


with unevaluated():
    F = sympy.Function("f")
    CASES = {
        # -- not elementwise --------------------------------------------------------------------
        "a sum over an index": (
            lambda: spec(outputs=outputs(p - lr * sympy.Sum(g, (i, 0, 3)))),
            ["user_rule", "output 'p_new'", "a sum over an index (a reduction)", "elementwise"]),
        "a product over an index": (
            lambda: spec(outputs=outputs(p - lr * sympy.Product(g, (i, 1, 3)))),
            ["output 'p_new'", "a product over an index"]),
        "an indexed (shape-changing) access": (
            lambda: spec(outputs=outputs(p - lr * sympy.IndexedBase("G")[i])),
            ["output 'p_new'", "an indexed", "shape-changing"]),
        "a matrix": (
            lambda: spec(outputs=outputs(p - lr * sympy.MatrixSymbol("A", 2, 2)[0, 0])),
            ["output 'p_new'", "matrix", "shape-changing"]),
        "a derivative": (
            lambda: spec(outputs=outputs(p - lr * sympy.Derivative(F(g), g))),
            ["output 'p_new'", "a derivative"]),
        # -- unknown or unsupported functions ---------------------------------------------------
        "sympy.gamma": (lambda: spec(outputs=outputs(p - lr * sympy.gamma(g))),
                        ["user_rule", "output 'p_new'", "the function gamma", "gamma(g)",
                         "cannot compute", "the spec language is"]),
        "gamma of hyperparameters": (lambda: spec(outputs=outputs(p - sympy.gamma(lr) * g)),
                                     ["output 'p_new'", "the function gamma", "gamma(lr)"]),
        "an undefined Function('f')": (
            lambda: spec(outputs=outputs(p - lr * F(g))),
            ["output 'p_new'", "the function f", "an undefined function",
             "sympy.Function('f')"]),
        "sympy.exp": (lambda: spec(outputs=outputs(p - lr * sympy.exp(g))),
                      ["output 'p_new'", "the function exp"]),
        "sympy.Max, with the language's equivalent": (
            lambda: spec(outputs=outputs(p - lr * sympy.Max(g, 0))),
            ["output 'p_new'", "Max", "adamgen.spec.maximum"]),
        "sympy.Abs, with the language's way": (
            lambda: spec(outputs=outputs(p - lr * sympy.Abs(g))),
            ["output 'p_new'", "the function Abs", "where(x < 0, -x, x)"]),
        "a subexpression's unknown function": (
            lambda: spec(names={"bad": sympy.tanh(g)}),
            ["subexpression 'bad'", "the function tanh"]),
        "a complex constant": (lambda: spec(outputs=outputs(p - sympy.I * g)),
                               ["output 'p_new'", "complex number I"]),
        "an infinite constant": (lambda: spec(outputs=outputs(p - sympy.oo * g)),
                                 ["output 'p_new'", "oo", "not a finite number"]),
        "a comparison as a number": (
            lambda: spec(outputs=outputs(p - fma(lr, g > m, g))),
            ["output 'p_new'", "a condition", "where(condition, a, b)"]),
        "an output that is a comparison": (
            lambda: spec(outputs={"p_new": p - lr * g, "m_new": m > g}),
            ["output 'm_new'", "not a number-valued expression"]),
        "a where() on two conditions": (
            lambda: spec(outputs=outputs(where(sympy.And(g > 0, m > 0), p, g))),
            ["output 'p_new'", "not one comparison", "nest where()"]),
        "an ambiguous evaluation order": (
            lambda: spec(outputs=outputs(sympy.Mul(lr, mu, g, evaluate=False))),
            ["output 'p_new'", "ambiguous evaluation order", "unevaluated"]),
        "an elementwise power no kernel has": (
            lambda: spec(outputs=outputs(p - lr * g**3)),
            ["output 'p_new'", "g**3", "x**2, x**-1 and x**Rational(1, 2)"]),
        "not an expression at all": (
            lambda: spec(outputs=outputs(object())), ["output 'p_new'", "not a SymPy expression"]),
        # -- state pairs whose input and output cannot share shape and dtype --------------------
        "a state pair's output of hyperparameters only": (
            lambda: spec(outputs={"p_new": p - lr * g, "m_new": mu * lr}),
            ["output 'm_new'", "depends on no tensor"]),
        "a state pair's output of scalar tensors only": (
            lambda: spec(tensors=["p", "g", "m", Tensor("c", scalar=True)],
                         outputs={"p_new": p - lr * g, "m_new": mu * sympy.Symbol("c")}),
            ["state pair m_new -> m", "depends on no full tensor (only on c, mu)",
             "does not have m's shape"]),
        "a state pair naming a scalar tensor": (
            lambda: spec(tensors=["p", "g", Tensor("m", scalar=True)]),
            ["state pair m_new -> m", "m may be a scalar", "not scalar=True"]),
        "an output that is an input unchanged": (
            lambda: spec(outputs={"p_new": p - lr * g, "m_new": m}),
            ["output 'm_new'", "the tensor m itself, unchanged"]),
        "a state pair naming no output": (
            lambda: spec(state={"p_new": "p", "q_new": "m"}),
            ["state pair q_new -> m", "no output 'q_new'"]),
        # -- a hyperparameter where a tensor is required, or the reverse ------------------------
        "a hyperparameter as a state pair's input": (
            lambda: spec(state={"p_new": "p", "m_new": "lr"}),
            ["state pair m_new -> lr", "lr is a hyperparameter", "state is a tensor"]),
        "a hyperparameter as the parameter": (
            lambda: spec(parameter="lr"),
            ["the parameter 'lr' is a hyperparameter", "must be a tensor"]),
        "a hyperparameter as the gradient": (
            lambda: spec(gradient="mu"),
            ["the gradient 'mu' is a hyperparameter", "must be a tensor"]),
        "an output that contains no tensor": (
            lambda: spec(outputs={"p_new": lr * mu, "m_new": mu * m + g}, state={"m_new": "m"},
                         parameter=None),
            ["output 'p_new'", "depends on no tensor"]),
        "a Tensor declared among the hyperparameters": (
            lambda: spec(hyperparameters=[Tensor("lr"), "mu"]),
            ["hyperparameters lists Tensor('lr')", "move it to tensors="]),
        "a Hyperparameter declared among the tensors": (
            lambda: spec(tensors=["p", "g", Hyperparameter("m", 0.0)]),
            ["tensors lists Hyperparameter('m')", "move it to hyperparameters="]),
        "a tensor in a hyperparameter's exponent": (
            lambda: spec(outputs=outputs(p - mu**g)),
            ["output 'p_new'", "the exponent g uses the tensor(s) g",
             "hyperparameters only"]),
        "a hyperparameter power of a tensor": (
            lambda: spec(outputs=outputs(p - lr * g**mu)),
            ["output 'p_new'", "a tensor raised to a symbolic power", "mu",
             "2, -1 or 1/2"]),
        "element() of a tensor": (
            lambda: spec(outputs=outputs(p - element(lr * g))),
            ["output 'p_new'", "element() rounds an expression of hyperparameters",
             "the tensor(s) g"]),
        # -- defaults and declarations ----------------------------------------------------------
        "a default outside its own range": (
            lambda: spec(hyperparameters=[Hyperparameter("lr", -1.0, Range(low=0.0)), "mu"]),
            ["the default lr=-1.0 is outside its own range", "lr must be a number >= 0"]),
        "a NaN default": (
            lambda: spec(hyperparameters=["lr", Hyperparameter("mu", float("nan"))]),
            ["the default mu=nan is outside its own range"]),
        "a default outside an open bound": (
            lambda: spec(hyperparameters=["lr", Hyperparameter("mu", 1.0,
                                                               Range(0, 1, high_open=True))]),
            ["the default mu=1.0", "mu must satisfy 0 <= mu < 1"]),
        "a default that is not a number": (
            lambda: spec(hyperparameters=[Hyperparameter("lr", "0.1"), "mu"]),
            ["the default lr='0.1' is a str", "a real number"]),
        "an empty range": (
            lambda: spec(hyperparameters=["lr", Hyperparameter("mu", None, Range(1.0, 0.0))]),
            ["the range of 'mu' is empty"]),
        "an unknown kind": (
            lambda: spec(hyperparameters=["lr", Hyperparameter("mu", 0.9, kind="int")]),
            ["hyperparameter 'mu' has kind 'int'", "'real', 'step'"]),
        "two step counters": (
            lambda: spec(hyperparameters=[Hyperparameter("lr", kind="step"),
                                          Hyperparameter("mu", kind="step")]),
            ["'lr', 'mu' are all kind='step'", "one step counter"]),
        "an undeclared symbol": (
            lambda: spec(outputs=outputs(p - sympy.Symbol("q") * g)),
            ["output 'p_new' uses q, which is not declared"]),
        # -- names ------------------------------------------------------------------------------
        "a built-in rule's name": (lambda: spec(name="torch_adamw"),
                                   ["'torch_adamw' is a built-in rule's", "ivy_adam, torch_adam"]),
        "a Python keyword as the rule's name": (
            lambda: spec(name="lambda"), ["the rule's name 'lambda'", "a Python keyword"]),
        "a C keyword as a tensor": (
            lambda: spec(tensors=["p", "g", "m", "double"]),
            ["input 'double'", "'double' is a C keyword"]),
        "a name generated code uses as an output": (
            lambda: spec(outputs={"p_new": p - lr * g, "end": mu * m + g},
                         state={"p_new": "p", "end": "m"}),
            ["output 'end'", "a name adamgen's generated code uses itself"]),
        "adamgen's namespace": (
            lambda: spec(tensors=["p", "g", "m", "adamgen_x"]),
            ["input 'adamgen_x'", "adamgen's own namespace"]),
        "a hyperparameter named like update()'s out=": (
            lambda: spec(hyperparameters=["lr", "mu", "out"]),
            ["hyperparameter 'out'", "a keyword of adamgen's entry points"]),
        "a scalar tensor named like optimizer()'s params": (
            lambda: spec(tensors=["p", "g", "m", Tensor("params", scalar=True)]),
            ["scalar tensor 'params'", "a keyword of adamgen's entry points"]),
        "a real hyperparameter named step": (
            lambda: spec(hyperparameters=["lr", "mu", "step"]),
            ["'step' is not a step counter here", "kind='step'"]),
        "a state label that is a hyperparameter's": (
            lambda: spec(state=[StatePair("p_new", "p"), StatePair("m_new", "m", "mu")]),
            ["state pair m_new -> m is labelled 'mu'", "the value of mu"]),
        "a state label that is the step count's": (
            lambda: spec(state=[StatePair("p_new", "p"), StatePair("m_new", "m", "step")]),
            ["labelled 'step'", "the step count"]),
        "two state pairs with one label": (
            lambda: spec(state=[StatePair("p_new", "p", "buf"), StatePair("m_new", "m", "buf")]),
            ["both labelled 'buf'"]),
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_spec_error_names_the_culprit_and_what_was_expected(case):
    make, expected = CASES[case]
    message = rejected(make)
    for text in expected:
        assert text in message, (text, message)


def test_a_spec_error_is_an_adamgen_error_and_a_value_error():
    with pytest.raises(adamgen.AdamgenError):
        adamgen.Rule(spec(name="lion"))
    with pytest.raises(ValueError):
        adamgen.Rule(spec(name="lion"))


def test_every_builtin_rule_passes_with_every_option():
    for rule in BUILTINS.values():
        check_rule(rule.build(), builtin=True)
    for amsgrad, maximize, decoupled, lr_dtype in itertools.product(
            (False, True), (False, True), (False, True), ("float64", "float32")):
        check_rule(torch_adam_spec(amsgrad, maximize, decoupled, lr_dtype), builtin=True)


def test_a_rule_using_every_node_of_the_language_passes():
    step = sympy.Symbol("step", real=True)
    with unevaluated():
        m_new = fma(element(1 - mu), g - m, m)
        clipped = minimum(maximum(m_new, -lr), lr)
        scale = round_to(sqrt(1 - mu**step), "bfloat16")
        p_new = p - where(sign(clipped) > 0, clipped, g**2) * scale
    check_rule(spec(hyperparameters=["lr", "mu", Hyperparameter("step", kind="step")],
                    outputs={"p_new": p_new, "m_new": m_new}))


def test_the_spec_language_has_one_public_place_and_import_adamgen_stays_light():
    """``adamgen.spec`` exports the whole language; ``adamgen.UpdateSpec`` is the same class,
    loaded on first use: ``import adamgen`` imports no SymPy."""
    import subprocess
    import sys

    names = ["UpdateSpec", "Tensor", "Hyperparameter", "Range", "StatePair", "symbols",
             "unevaluated", "fma", "sqrt", "sign", "where", "maximum", "minimum", "round_to",
             "element", "SpecError"]
    code = ("import sys, adamgen; light = 'sympy' not in sys.modules; "
            "import adamgen.spec as s; "
            f"missing = [n for n in {names!r} if n not in s.__all__ or not hasattr(s, n)]; "
            "print(light, missing, adamgen.UpdateSpec is s.UpdateSpec, "
            "s.SpecError is adamgen.SpecError)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert run.stdout.split() == ["True", "[]", "True", "True"], run.stdout + run.stderr


def test_the_update_spec_docstring_example_runs():
    import numpy as np

    doc = UpdateSpec.__doc__
    example = doc[doc.index("Example"):doc.index("    Args:")].split("::", 1)[1]
    lines = [line[8:] for line in example.splitlines()]
    values = np.linspace(-1, 1, 5)
    namespace = {"p0": values, "g0": values, "buf0": np.zeros(5), "params": [values.copy()]}
    exec("\n".join(lines), namespace)  # noqa: S102 - the docstring's own example
    assert namespace["rule"].interface.rule == "heavy_ball"
    assert np.array_equal(namespace["p_new"], values - 0.1 * values)
