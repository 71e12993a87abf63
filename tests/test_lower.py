"""Each lowering pass alone, and the assembled IR."""

from __future__ import annotations

import pytest
import sympy

from adamgen.codegen.ir import Step
from adamgen.codegen.lower import (
    eliminate_common_subexpressions,
    eliminate_dead_steps,
    fold_constants,
    hoist_scalars,
    lower,
    translate,
)
from adamgen.config import KernelConfig
from adamgen.errors import LoweringError
from adamgen.interface import SpecRef
from adamgen.rules.ivy_adam import spec as adam_spec
from adamgen.spec import UpdateSpec

IVY = SpecRef("ivy_adam")

BAKED = (("beta1", 0.9), ("beta2", 0.999), ("epsilon", 1e-7))


def test_translate_maps_each_binary_node_to_one_step():
    program = translate(adam_spec(), KernelConfig(spec=IVY))
    ops = [s.op for s in program.steps]
    assert ops.count("sqrt") == 1 and ops.count("select_ge") == 1
    assert ops.count("pow") == 3  # beta2**step, (.)**0.5, beta1**step
    assert all(s.target in program.scalar_steps for s in program.steps if s.op == "pow")


def test_cse_merges_commutative_duplicates_only():
    program = translate(adam_spec(), KernelConfig(spec=IVY))
    extra = program.steps + (Step("dup", "mul", tuple(reversed(program.steps[-1].args)))
                             if program.steps[-1].op == "mul" else Step("dup", "neg", ("w",)),)
    merged = eliminate_common_subexpressions(
        type(program)(program.spec, program.config, extra, program.scalar_steps,
                      program.outputs))
    assert len(merged.steps) <= len(extra)
    # the real spec shares mw between two outputs: it is translated once
    assert len({(s.op, s.args) for s in merged.steps}) == len(merged.steps)


def test_hoisting_puts_every_hyperparameter_only_step_first():
    program = hoist_scalars(eliminate_common_subexpressions(
        translate(adam_spec(), KernelConfig(spec=IVY))))
    flags = [s.target in program.scalar_steps for s in program.steps]
    assert flags == sorted(flags, reverse=True)


def test_constant_folding_uses_python_floats_not_exact_arithmetic():
    program = fold_constants(hoist_scalars(translate(adam_spec(), KernelConfig(spec=IVY, constants=BAKED))))
    constants = [a for s in program.steps for a in s.args if isinstance(a, float)]
    assert 1 - 0.9 in constants and 0.09999999999999998 == 1 - 0.9
    assert 1 - 0.999 in constants
    assert 0.1 not in constants  # SymPy's exact 1 - 9/10 would have given this


def test_dead_steps_are_removed():
    program = translate(adam_spec(), KernelConfig(spec=IVY))
    spare = program.steps + (Step("unused", "neg", ("w",)),)
    cleaned = eliminate_dead_steps(type(program)(program.spec, program.config, spare,
                                                 program.scalar_steps, program.outputs))
    assert "unused" not in {s.target for s in cleaned.steps}


def test_exact_ir_keeps_the_reference_order():
    ir = lower(adam_spec(), KernelConfig(spec=IVY))
    body = [(s.op, s.args) for s in ir.body]
    # w_new = w - ((alpha*mw)/(sqrt(clamp(vw)) + eps)) * lr, as a chain of binary steps
    assert [op for op, _ in body][-6:] == ["select_ge", "sqrt", "add", "div", "mul", "sub"]
    assert ir.prelude[-1].op == "sub" or any(s.op == "div" for s in ir.prelude)
    assert set(ir.kernel_scalars) >= {"beta1", "beta2", "epsilon"}


def test_dependency_record():
    ir = lower(adam_spec(), KernelConfig(spec=IVY))
    assert set(ir.dependencies("mw")) == {"dcdw", "mw_tm1", "beta1"}
    assert set(ir.dependencies("vw")) == {"dcdw", "vw_tm1", "beta2"}
    assert set(ir.dependencies("w_new")) == {"w", "dcdw", "lr", "mw_tm1", "vw_tm1", "beta1",
                                            "beta2", "epsilon", "step"}


def test_baked_constants_leave_only_step_as_hyperparameter():
    ir = lower(adam_spec(), KernelConfig(spec=IVY, constants=BAKED))
    assert ir.free_hyperparameters == ("step",)
    assert ir.kernel_scalars == (ir.prelude[-1].target,)


def test_fast_mode_folds_the_learning_rate_into_one_scalar():
    exact = lower(adam_spec(), KernelConfig(spec=IVY, scalar_tensors=frozenset({"lr"})))
    fast = lower(adam_spec(), KernelConfig(spec=IVY, mode="fast", scalar_tensors=frozenset({"lr"})))
    assert len(fast.body) == len(exact.body)  # one per-element multiply becomes loop-invariant
    scale = [s for s in fast.body if s.target.endswith("_scale")]
    assert len(scale) == 1 and "lr" in scale[0].args


def test_unknown_constant_and_unsupported_constructs_are_errors():
    with pytest.raises(LoweringError, match="gamma"):
        lower(adam_spec(), KernelConfig(spec=IVY, constants=(("gamma", 1.0),)))
    x, y, z = sympy.symbols("x y z")
    flat = UpdateSpec("flat", (x, y, z), (), (("out", x * y * z),))  # evaluated: 3 factors
    with pytest.raises(LoweringError, match="ambiguous"):
        lower(flat, KernelConfig(spec=IVY))


def test_passes_are_timed():
    timings: dict[str, float] = {}
    lower(adam_spec(), KernelConfig(spec=IVY), timings)
    assert {"translate", "eliminate_common_subexpressions", "hoist_scalars", "fold_constants",
            "fast_rewrites", "eliminate_dead_steps"} <= set(timings)
