"""``adamgen.derivatives``: the VJP spec, its binary nesting, the ``v = 0`` rule, the new op.

Nothing in ``derivatives`` knows Adam, so a made-up spec exercises the re-nesting on forms Adam
does not produce (cubes, inverse squares, ``x**(3/2)``, non-dyadic coefficients).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy
from sympy import Piecewise, Rational, sqrt

from adamgen.codegen.c_backend import KernelCPrinter
from adamgen.codegen.driver import kernel_ir, numpy_source
from adamgen.codegen.ir import Step
from adamgen.codegen.lower import lower
from adamgen.codegen.numpy_backend import KernelNumPyPrinter, render_numpy_module
from adamgen.codegen.steps import step_expression
from adamgen.config import KernelConfig
from adamgen.derivatives import SqrtOfClamp, evaluated, vjp_expressions, vjp_spec
from adamgen.errors import LoweringError
from adamgen.interface import SpecRef
from adamgen.rules.ivy_adam import spec as adam_spec
from adamgen.spec import UpdateSpec

IVY = SpecRef("ivy_adam")

VJP = SpecRef("ivy_adam").derived("vjp")

REPO = Path(__file__).resolve().parents[1]


def load(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, "<generated>", "exec"), namespace)  # noqa: S102 - code we rendered
    return namespace


def _binary_everywhere(expr: sympy.Basic) -> bool:
    if isinstance(expr, (sympy.Add, sympy.Mul)) and len(expr.args) != 2:
        return False
    return all(_binary_everywhere(a) for a in expr.args)


def test_vjp_spec_interface():
    spec = vjp_spec(adam_spec())
    assert spec.name == "ivy_adam_vjp"
    assert [n for n, _ in spec.outputs] == ["d_w", "d_dcdw", "d_lr", "d_mw_tm1", "d_vw_tm1"]
    assert [s.name for s in spec.tensors] == ["dcdw", "lr", "mw_tm1", "vw_tm1", "d_w_new",
                                              "d_mw", "d_vw"]  # w is read by no derivative
    assert spec.hyperparameters == adam_spec().hyperparameters
    assert all(_binary_everywhere(expr) for _, expr in spec.outputs)


def test_vjp_spec_is_the_same_in_every_process():
    """The nesting is the reference order: it must not depend on hash seeds."""
    code = ("from adamgen.derivatives import vjp_spec; from adamgen.rules.ivy_adam import spec as adam_spec; "
            "print(vjp_spec(adam_spec()).spec_hash)")
    hashes = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": seed,
                                              "PYTHONPATH": str(REPO)}).stdout.strip()
              for seed in ("0", "1", "12345")}
    assert hashes == {vjp_spec(adam_spec()).spec_hash}


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "mixed"])
def test_vjp_lowers_and_renders(mode, dtype):
    config = KernelConfig(spec=VJP, dtype=dtype, mode=mode)
    ir = kernel_ir(config)
    assert ir.output_names == ("d_w", "d_dcdw", "d_lr", "d_mw_tm1", "d_vw_tm1")
    assert sum(s.op == "select_gt" for s in ir.body) == 1
    module = load(numpy_source(config))
    assert module["OUTPUTS"] == list(ir.output_names)


def test_sqrt_of_clamp_carries_the_rule():
    u = sympy.Symbol("u", real=True)
    assert sympy.diff(SqrtOfClamp(u), u) == Piecewise((1 / (2 * sqrt(u)), u > 0), (0, True))
    clamp_sqrt = sympy.Pow(Piecewise((u, sympy.GreaterThan(u, 0, evaluate=False)), (0, True),
                                     evaluate=False), Rational(1, 2), evaluate=False)
    assert evaluated(clamp_sqrt, abstract_sqrt_clamp=True) == SqrtOfClamp(u)
    assert isinstance(evaluated(clamp_sqrt), Piecewise)  # SymPy pushes sqrt inside otherwise


def test_vjp_expressions_are_sympys_derivatives_where_v_is_positive():
    spec = adam_spec()
    x = {s.name: s for s in spec.inputs}
    expressions = vjp_expressions(spec)
    values = {x["w"]: 0.3, x["dcdw"]: -0.7, x["lr"]: 0.01, x["mw_tm1"]: 0.2, x["vw_tm1"]: 0.4,
              x["beta1"]: 0.9, x["beta2"]: 0.999, x["epsilon"]: 1e-3, x["step"]: 5}
    cot = {sympy.Symbol(f"d_{n}", real=True): sympy.Float(c)
           for n, c in zip(("w_new", "mw", "vw"), (1.5, -0.5, 2.0))}
    for tensor in spec.tensors:
        direct = sum(c * sympy.diff(evaluated(spec.output(n[2:])), tensor)
                     for n, c in zip(("d_w_new", "d_mw", "d_vw"), cot.values()))
        ours = expressions[f"d_{tensor.name}"].xreplace(cot)
        assert abs(float(ours.xreplace(values)) - float(direct.xreplace(values))) < 1e-12


def _toy_spec() -> UpdateSpec:
    """Forms Adam does not produce: the re-nesting must handle them all."""
    a, b, c = sympy.symbols("a b c", real=True)
    k = sympy.Symbol("h", real=True)
    with sympy.evaluate(False):
        y = a * a * a * b / (c * c) + sqrt(a * a + b * b) * k
        z = (a * b) / (k + 3) - c * c * c + a * a * sqrt(a) / 3
    return UpdateSpec("toy", (a, b, c), (k,), (("y", y), ("z", z)))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_renesting_handles_general_expressions(mode):
    spec = _toy_spec()
    vjp = vjp_spec(spec)
    assert all(_binary_everywhere(e) for _, e in vjp.outputs)
    module = load(render_numpy_module(lower(vjp, KernelConfig(spec=IVY, dtype="float64", mode=mode))))
    rng = np.random.default_rng(3)
    a, b, c, d_y, d_z = (rng.uniform(0.5, 2.0, 9) for _ in range(5))
    inputs = {"a": a, "b": b, "c": c, "d_y": d_y, "d_z": d_z}
    outputs = [np.empty(9) for _ in module["OUTPUTS"]]
    module["update"](*(inputs[n] for n in module["TENSORS"]), module["prelude"](0.25), *outputs)
    sym = {s.name: s for s in spec.inputs}
    y, z = (evaluated(e) for _, e in spec.outputs)
    for name, got in zip(module["OUTPUTS"], outputs):
        x = sym[name[2:]]
        f = sympy.lambdify((*spec.tensors, sym["h"], "d_y", "d_z"),
                           sympy.Symbol("d_y") * sympy.diff(y, x)
                           + sympy.Symbol("d_z") * sympy.diff(z, x))
        np.testing.assert_allclose(got, f(a, b, c, 0.25, d_y, d_z), rtol=1e-13)


def test_constant_derivative_and_name_clash_are_errors():
    a, b, k = sympy.symbols("a b h", real=True)
    with pytest.raises(LoweringError, match="constant 0"):  # b reaches no output
        vjp_spec(UpdateSpec("unused", (a, b), (k,), (("y", sympy.Mul(k, a, evaluate=False)),)))
    d_y = sympy.Symbol("d_y", real=True)
    with pytest.raises(LoweringError, match="cotangent"):
        vjp_spec(UpdateSpec("clash", (a, d_y), (k,), (("y", sympy.Mul(a, d_y, evaluate=False)),)))


def test_select_lowers_renders_and_refuses_other_forms():
    c, a = sympy.symbols("c a", real=True)
    k = sympy.Symbol("h", real=True)
    select = Piecewise((a, sympy.StrictGreaterThan(c, 0, evaluate=False)), (0, True),
                       evaluate=False)
    ir = lower(UpdateSpec("sel", (c, a), (k,), (("y", select),)), KernelConfig(spec=IVY))
    assert [(s.op, s.args) for s in ir.body] == [("select_gt", ("c", 0, "a", 0))]
    three = Piecewise((a, sympy.StrictGreaterThan(c, 0, evaluate=False)),
                      (c, sympy.StrictLessThan(a, 0, evaluate=False)), (1, True), evaluate=False)
    with pytest.raises(LoweringError, match="two-branch"):
        lower(UpdateSpec("bad", (c, a), (k,), (("y", three),)), KernelConfig(spec=IVY))
    both = Piecewise((a, sympy.And(c > 0, a > 0)), (1, True), evaluate=False)
    with pytest.raises(LoweringError, match="one comparison"):
        lower(UpdateSpec("bad", (c, a), (k,), (("y", both),)), KernelConfig(spec=IVY))
    step = Step("y", "select_gt", ("c", 0, "a", 0))
    printer = KernelNumPyPrinter()
    assert printer.expression(step) == "y = np.where(c > 0.0, a, 0.0)"
    assert "np.copyto(out, np.where(c > 0.0, a, 0.0))" in printer.buffered(step, {"y": "out"})
    printed = KernelCPrinter("float32").doprint(step_expression(step, {
        "c": sympy.Symbol("c"), "a": sympy.Symbol("a")}))
    assert printed == "(c > 0.0f ? a : 0.0f)"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_select_in_the_numpy_kernel_discards_inf_and_nan(dtype):
    config = KernelConfig(spec=VJP, dtype=np.dtype(dtype).name)
    module = load(numpy_source(config))
    n = 5
    vw_tm1 = np.array([0.0, -1.0, np.nan, 1.0, 0.0], dtype)
    dcdw = np.array([0.0, 0.0, 0.0, 0.0, 1e-30], dtype)  # the last squares to 0 in float32
    ones = np.ones(n, dtype)
    outputs = [np.empty(n, dtype) for _ in module["OUTPUTS"]]
    inputs = {"dcdw": dcdw, "lr": ones * dtype(0.1), "mw_tm1": ones, "vw_tm1": vw_tm1,
              "d_w_new": ones, "d_mw": ones, "d_vw": ones}
    with np.errstate(all="ignore"):
        module["update"](*(inputs[t] for t in module["TENSORS"]),
                         module["prelude"](0.9, 0.999, 1e-7, 3), *outputs)
    d_vw_tm1 = outputs[module["OUTPUTS"].index("d_vw_tm1")]
    # v = 0, v < 0 and v NaN: the path through sqrt contributes 0, leaving beta2 * d_vw
    assert d_vw_tm1[0] == d_vw_tm1[1] == d_vw_tm1[2] == dtype(0.999)
    assert all(np.isfinite(o[[0, 1, 3, 4]]).all() for o in outputs)


def _torch_rule(torch, tensors, hyper, *, amsgrad, maximize, decoupled):
    """torch_adam/torch_adamw in exact-arithmetic torch ops, for autograd."""
    p, g, m, v = tensors[:4]
    lr, b1, b2, eps, wd, t = (hyper[k] for k in ("lr", "beta1", "beta2", "eps",
                                                 "weight_decay", "step"))
    g = -g if maximize else g
    if decoupled:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m_new = b1 * m + (1 - b1) * g
    v_new = b2 * v + (1 - b2) * g * g
    source = torch.maximum(tensors[4], v_new) if amsgrad else v_new
    p_new = p - (lr / (1 - b1**t)) * m_new / (torch.sqrt(source) / (1 - b2**t) ** 0.5 + eps)
    return (p_new, m_new, v_new) + ((source,) if amsgrad else ())


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("name", ["torch_adam", "torch_adamw"])
def test_the_torch_rules_vjps_are_autograds(name, maximize, amsgrad):
    """fma, sqrt, maximum, where on a hyperparameter and lerp's branch all differentiate: the
    VJP (float64) is torch.autograd's on the same rule in exact-arithmetic ops, to rounding."""
    torch = pytest.importorskip("torch", reason="torch is the reference for the torch rules' "
                                                "derivatives; pip install torch==2.13.0")
    import adamgen

    rule = adamgen.rule(name, amsgrad=amsgrad, maximize=maximize)
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal(9), rng.standard_normal(9), rng.standard_normal(9),
              np.abs(rng.standard_normal(9))]
    if amsgrad:  # both sides of the maximum
        arrays.append(np.abs(rng.standard_normal(9)) * np.where(np.arange(9) % 2, 4.0, 0.0))
    cotangents = [rng.standard_normal(9) for _ in rule.interface.outputs]
    hyper = {"lr": 0.01, "beta1": 0.3, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1,
             "step": 3}
    ours = rule.vjp(*arrays, cotangents=tuple(cotangents), **hyper)
    leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
    outputs = _torch_rule(torch, leaves, hyper, amsgrad=amsgrad, maximize=maximize,
                          decoupled=name == "torch_adamw")
    sum((o * torch.tensor(c)).sum() for o, c in zip(outputs, cotangents)).backward()
    for got, leaf, tensor in zip(ours, leaves, rule.interface.tensor_names):
        np.testing.assert_allclose(got, leaf.grad.numpy(), rtol=1e-12, atol=1e-300,
                                   err_msg=f"d_{tensor}")


def test_lions_vjp_is_autograds():
    """sign's derivative is 0: the parameter's gradient flows only through the decay."""
    torch = pytest.importorskip("torch", reason="torch is the reference for Lion's derivatives")
    import adamgen

    rule = adamgen.rule("lion")
    rng = np.random.default_rng(6)
    arrays = [rng.standard_normal(9) for _ in range(3)]
    cotangents = [rng.standard_normal(9) for _ in rule.interface.outputs]
    ours = rule.vjp(*arrays, cotangents=tuple(cotangents), lr=0.01, beta1=0.9, beta2=0.99,
                    weight_decay=0.1)
    p, g, m = leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
    p_new = p * (1 - 0.01 * 0.1) - 0.01 * torch.sign(m * 0.9 + g * (1 - 0.9))
    m_new = m * 0.99 + g * (1 - 0.99)
    ((p_new * torch.tensor(cotangents[0])).sum()
     + (m_new * torch.tensor(cotangents[1])).sum()).backward()
    for got, leaf in zip(ours, leaves):
        np.testing.assert_allclose(got, leaf.grad.numpy(), rtol=1e-15)


def test_an_output_named_like_its_input_gets_a_distinct_cotangent():
    """torch's rules name outputs after the tensors they replace: the cotangent of ``param``
    is ``d_param_new``, the gradient of ``param`` is ``d_param``."""
    import adamgen

    interface = adamgen.rule("torch_adam").interface
    assert interface.cotangents["param"] == "d_param_new"
    assert adamgen.rule("ivy_adam").interface.cotangents["w_new"] == "d_w_new"
