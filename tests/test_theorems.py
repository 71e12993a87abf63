"""``adamgen.theorems`` (``adamgen verify``): every theorem is proven here, and a wrong IR is reported FAILED.

The wrong IRs are made by an ``ir_factory`` that lowers normally and then breaks one step: two
operands of a ``sub`` or ``div`` swapped, an exactly folded constant, a broken ``v = 0`` rule.
Each must come back FAILED with a concrete counterexample, never PROVED.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import pytest

from adamgen import proofs
from adamgen import theorems as V
from adamgen.codegen.ir import KernelIR, Step
from adamgen.codegen.lower import lower
from adamgen.config import KernelConfig
from adamgen.errors import LoweringError
from adamgen.interface import SpecRef
from adamgen.proofs import ir_expressions, symbols_of
from adamgen.rules.ivy_adam import spec as adam_spec
from adamgen.spec import UpdateSpec

IVY = SpecRef("ivy_adam")

NAMES = [name for name, _ in V.theorems(adam_spec())]


@pytest.fixture(scope="module")
def results() -> dict[str, V.TheoremResult]:
    start = time.perf_counter()
    found = {r.name: r for r in V.verify([adam_spec()])}
    found["__total__"] = V.TheoremResult("total", V.PROVED, time.perf_counter() - start, "")
    return found


@pytest.mark.parametrize("name", NAMES)
def test_theorem_is_proved(results, name):
    result = results[name]
    assert result.status == V.PROVED, f"{name}: {result.status}: {result.detail}"
    assert result.seconds > 0


def test_the_required_theorems_are_in_the_table():
    text = " | ".join(NAMES)
    for required in ("IR == spec [ivy_adam float64 exact]", "IR == spec [ivy_adam float64 fast]", "const(",
                     "moment recurrences", "bias correction", "scale invariance",
                     "Kingma & Ba", "VJP kernel == d spec [exact]", "VJP kernel == d spec [fast]"):
        assert required in text


def test_verify_runs_well_within_its_budget(results):
    assert results["__total__"].seconds < 30


def test_ivy_vs_paper_reports_the_exact_difference(results):
    detail = results["Ivy's form vs Kingma & Ba"].detail
    assert "equal at epsilon = 0" in detail and "w_ivy - w_paper =" in detail
    assert "epsilon" in detail.split("=", 2)[-1]


def _breaking(spec_name: str, edit: Callable[[Step], Step | None]) -> Callable:
    """A factory that lowers ``spec_name`` normally, then applies ``edit`` to its first step
    for which ``edit`` returns a replacement."""
    def factory(spec: UpdateSpec, config: KernelConfig) -> KernelIR:
        ir = lower(spec, config)
        if spec.name != spec_name:
            return ir
        body = list(ir.body)
        for index, step in enumerate(body):
            replacement = edit(step)
            if replacement is not None:
                body[index] = replacement
                break
        else:
            raise AssertionError("nothing to break")
        return dataclasses.replace(ir, body=tuple(body))
    return factory


def _swap(op: str) -> Callable[[Step], Step | None]:
    return lambda s: Step(s.target, s.op, s.args[::-1]) if s.op == op else None


@pytest.mark.parametrize("op", ["sub", "div"])
def test_swapped_operands_are_failed(op, capsys):
    results = V.verify([adam_spec()], ir_factory=_breaking("ivy_adam", _swap(op)), only=["IR == spec"])
    assert len(results) == 5
    for result in results:
        assert result.status == V.FAILED, result
        assert "w_new" in result.detail and " != " in result.detail and " at " in result.detail
    assert V.print_report(results) == 1
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("op", ["sub", "div"])
def test_swapped_operands_in_the_vjp_are_failed(op):
    results = V.verify([adam_spec()], ir_factory=_breaking("ivy_adam_vjp", _swap(op)), only=["VJP"])
    assert [r.status for r in results] == [V.FAILED, V.FAILED]


def test_a_broken_rule_at_v_zero_is_failed():
    """Without the select, 0.5/sqrt(v) leaks through where v <= 0 (inf, or NaN in floats)."""
    unguarded = _breaking("ivy_adam_vjp", lambda s: Step(s.target, "mul", (1, s.args[2]))
                          if s.op == "select_gt" else None)
    results = V.verify([adam_spec()], ir_factory=unguarded, only=["VJP"])
    assert all(r.status == V.FAILED for r in results)
    assert any("v < 0" in r.detail or "v = 0" in r.detail for r in results)


def test_constants_folded_in_exact_arithmetic_are_failed():
    """SymPy's 1 - 9/10 = 1/10 is not Python's 1 - 0.9 = 0.09999999999999998."""
    exact = _breaking("ivy_adam", lambda s: Step(s.target, s.op, tuple(
        0.1 if a == 1 - 0.9 else a for a in s.args)) if (1 - 0.9) in s.args else None)
    results = V.verify([adam_spec()], ir_factory=exact, only=["const"])
    assert [r.status for r in results] == [V.FAILED, V.FAILED]


def test_an_error_while_lowering_is_failed_not_proven():
    def broken(spec: UpdateSpec, config: KernelConfig) -> KernelIR:
        raise LoweringError("no")

    results = V.verify([adam_spec()], ir_factory=broken, only=["IR == spec [ivy_adam float64 exact]"])
    assert results[0].status == V.FAILED and "LoweringError" in results[0].detail


def test_undecided_is_unproven_and_never_proven(monkeypatch, capsys):
    monkeypatch.setattr(proofs, "is_zero", lambda expr: False)
    monkeypatch.setattr(proofs, "counterexample", lambda lhs, rhs, hyperparameters=None: None)
    results = V.verify([adam_spec()], only=["moment", "bias"])
    assert [r.status for r in results] == [V.UNPROVEN, V.UNPROVEN]
    assert V.print_report(results) == 0
    assert V.print_report(results, strict=True) == 1
    assert "2 unproven" in capsys.readouterr().out


def test_ir_expressions_use_exact_binary_constants():
    config = KernelConfig(spec=IVY, constants=(("beta1", 0.9),))
    ir = lower(adam_spec(), config)
    rebuilt = ir_expressions(ir, symbols_of(adam_spec()))
    import sympy

    assert sympy.Rational(0.9) != sympy.Rational(9, 10)
    assert sympy.Rational(1 - 0.9) in rebuilt["mw"].atoms(sympy.Rational)
