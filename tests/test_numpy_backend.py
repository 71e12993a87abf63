"""The NumPy renderer: golden source, buffer plans under aliasing, and bits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_bitwise_equal, make_ir
from reference import adam_update_ref
from step_oracles import STEP_ORACLES, special_inputs

from adamgen.codegen.driver import kernel_ir, numpy_source
from adamgen.codegen.ir import Step
from adamgen.codegen.numpy_backend import allocate_buffers
from adamgen.config import KernelConfig
from adamgen.interface import SpecRef

IVY = SpecRef("ivy_adam")

GOLDEN = Path(__file__).parent / "golden" / "numpy_float32_exact.py.txt"
ALIASES = {
    "functional": frozenset(),
    "w in place": frozenset({("w_new", "w")}),
    "all in place": frozenset({("w_new", "w"), ("mw", "mw_tm1"), ("vw", "vw_tm1")}),
}


def load(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, "<generated>", "exec"), namespace)  # noqa: S102 (generated code under test)
    return namespace


def test_golden_float32_module():
    """A change to this text is a change to generated code: review it, then update the file."""
    assert numpy_source(KernelConfig(spec=IVY, dtype="float32")) == GOLDEN.read_text()


def test_generated_module_is_readable_and_has_a_header():
    source = numpy_source(KernelConfig(spec=IVY, dtype="float64"))
    header = source.split('"""')[1]
    for expected in ("rule:      ivy_adam", "variant:   numpy ivy_adam float64 exact", "dtype:     float64",
                     "mode:      exact"):
        assert expected in header
    assert "def prelude(beta1, beta2, epsilon, step, /)" in source
    assert source.count("np.empty_like") <= 2  # few temporaries


@pytest.mark.parametrize("aliases", ALIASES.values(), ids=ALIASES.keys())
def test_buffer_plan_never_clobbers_an_aliased_input(aliases):
    ir = kernel_ir(KernelConfig(spec=IVY, aliases=aliases))
    plan = allocate_buffers(ir)
    aliased = {out: src for out, src in aliases}
    last_read = ir.last_reads()
    for index, step in enumerate(ir.body):
        buffer = plan.buffers[step.target]
        if buffer in aliased:
            assert last_read[aliased[buffer]] <= index, step


def reference(w, g, lr, m, v, t, b1=0.9, b2=0.999, eps=1e-7):
    """The suite's one independent reference (tests/reference.py), positionally."""
    return adam_update_ref(w, g, lr, m, v, t, beta1=b1, beta2=b2, epsilon=eps)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("aliases", ALIASES.values(), ids=ALIASES.keys())
def test_buffered_module_matches_reference_bits_under_every_aliasing(dtype, aliases):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(257).astype(dtype) for _ in range(4)]
    arrays[3] = np.abs(arrays[3])
    arrays[3][:3] = [np.nan, -1.0, -0.0]
    w, g, m, v = arrays
    expected = reference(w, g, 0.01, m, v, 1270.0)
    module = load(numpy_source(KernelConfig(spec=IVY, dtype=dtype, aliases=aliases)))
    scalars = module["prelude"](0.9, 0.999, 1e-7, 1270.0)
    w_, m_, v_ = w.copy(), m.copy(), v.copy()
    aliased = {out for out, _ in aliases}
    outputs = [w_ if "w_new" in aliased else np.empty_like(w),
               m_ if "mw" in aliased else np.empty_like(w),
               v_ if "vw" in aliased else np.empty_like(w)]
    with np.errstate(all="ignore"):
        module["update"](w_, g, 0.01, m_, v_, scalars, *outputs)
    for got, want in zip(outputs, expected):
        assert got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()


def test_mixed_module_promotes_like_the_reference():
    module = load(numpy_source(KernelConfig(spec=IVY, dtype="mixed")))
    w = np.arange(5, dtype=np.float32)
    g = np.linspace(-1, 1, 5)
    lr = np.array(0.1)  # float64 0-d
    m = np.zeros(5, np.int32)
    v = np.ones(5, np.float16)
    scalars = module["prelude"](0.9, 0.999, 1e-7, 3.0)
    got = module["update"](w, g, lr, m, v, scalars)
    for a, b in zip(got, reference(w, g, lr, m, v, 3.0)):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


OPS = STEP_ORACLES


@pytest.mark.parametrize("dtype", ["float32", "mixed"])
def test_every_op_in_both_forms(dtype):
    from adamgen.codegen.numpy_backend import render_numpy_module
    from adamgen.interface import SpecRef

    outputs = tuple((f"o{i}", step.target) for i, step in enumerate(OPS))
    ops = {s: f for s, f in OPS.items()  # the mixed form declines fma and roundings
           if dtype == "float32" or not s.op.startswith(("round", "fma"))}
    ir = make_ir(("x", "y"), tuple(ops), tuple(o for o in outputs if o[1] in
                                                {s.target for s in ops}),
                 config=KernelConfig(spec=SpecRef("ops"), dtype=dtype))
    module = load(render_numpy_module(ir))
    assert module["EXACT"] is True
    x, y = special_inputs(300, seed=3)
    with np.errstate(all="ignore"):
        if dtype == "mixed":
            got = module["update"](x, y, ())
        else:
            got = [np.full(300, 7, np.float32) for _ in ops]
            module["update"](x, y, (), *got)
        for out, (step, expected) in zip(got, ops.items()):
            assert_bitwise_equal(out, np.asarray(expected(x, y), np.float32), str(step))


def test_a_float64_fma_declines_and_says_why():
    from adamgen.codegen.numpy_backend import render_numpy_module
    from adamgen.errors import InexactVariantError
    from adamgen.interface import SpecRef

    ir = make_ir(("x", "y"), (Step("t0", "fma", ("x", "y", "x")),), (("o", "t0"),),
                 config=KernelConfig(spec=SpecRef("ops"), dtype="float64"))
    source = render_numpy_module(ir)
    assert "exact:     no" in source
    module = load(source)
    assert module["EXACT"] is False and "fused multiply-add" in module["INEXACT"]
    x = np.ones(3)
    with pytest.raises(InexactVariantError, match="float64 fused multiply-add"):
        module["update"](x, x, (), np.empty(3))
