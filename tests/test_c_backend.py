"""The C renderer: printed statements, aliasing qualifiers, warnings and vectorisation.

Golden-ish checks of the rendered text, plus compiles of the bare kernel file (``cc -c``, no cffi
wrapper): with ``-Wall -Wextra -Werror``, and with ``-fopt-info-vec-optimized`` to prove every
chunk loop vectorises.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_bitwise_equal, make_ir
from step_oracles import STEP_ORACLES, special_inputs

from adamgen.codegen import build
from adamgen.codegen.driver import c_source, kernel_ir
from adamgen.config import KernelConfig
from adamgen.interface import SpecRef

IVY = SpecRef("ivy_adam")

FLAGS32 = ("-O3", "-std=c99", "-ffp-contract=off", "-march=native")
BAKED = (("beta1", 0.9), ("beta2", 0.999), ("epsilon", 1e-7))


@pytest.fixture(scope="module")
def f32():
    return c_source(KernelConfig(spec=IVY, dtype="float32"), flags=FLAGS32)


@pytest.fixture(scope="module")
def f64():
    return c_source(KernelConfig(spec=IVY, dtype="float64"), flags=FLAGS32)


def sections(source: str) -> dict[str, str]:
    """The text of each form's section (``---- form NAME: ...``)."""
    parts = re.split(r"/\* ---- form (\w+):", source)
    return dict(zip(parts[1::2], parts[2::2]))


def test_header_names_spec_mode_dtype_flags_and_variant(f32):
    header = f32.source.split("*/", 1)[0]
    ir = kernel_ir(KernelConfig(spec=IVY))
    for expected in (f"spec:     ivy_adam (hash {ir.spec_hash})",
                     "variant:  c ivy_adam float32 exact",
                     "dtype:    float32 (C type float)", "mode:     exact",
                     "flags:    -O3 -std=c99 -ffp-contract=off -march=native",
                     "ivy_adam_inplace_all_omp (threaded)", "ivy_adam_multi_inplace"):
        assert expected in header, expected
    assert f32.variant == "c ivy_adam float32 exact"


def test_every_ir_step_is_one_statement_in_order(f32):
    body = sections(f32.source)["functional"]
    lines = [line.strip() for line in body.splitlines() if re.search(r"  /\* \w+ = \w+\(", line)]
    ir = kernel_ir(KernelConfig(spec=IVY))
    assert [line.split("/* ")[1].rstrip(" */") for line in lines] == [str(s) for s in ir.body]
    assert lines[:3] == ["const float t7 = beta1*mw_tm1[i];  /* t7 = mul(beta1, mw_tm1) */",
                         "const float t9 = s8*dcdw[i];  /* t9 = mul(s8, dcdw) */",
                         "const float mw = t7 + t9;  /* mw = add(t7, t9) */"]
    # temporaries are named after the spec's named subexpressions where it has them
    assert "const float t17 = (vw >= 0.0f ? vw : 0.0f);" in body
    assert "const float vw_sqrt = sqrtf(t17);" in body
    assert "const float effective_grad = t11/t19;" in body
    assert "const float w_new = w[i] - t21;" in body
    assert body.index("w_new_out[i] = w_new;") > body.index("w_new = w[i] - t21")  # stores last


def test_float64_prints_sqrt_and_double(f64):
    assert "sqrt(t17)" in f64.source and "sqrtf" not in f64.source
    assert "const double mw = t7 + t9;" in f64.source
    assert not re.search(r"\bfloat\b", f64.source.split("*/", 1)[1])


def test_no_fmax_and_int64_indices(f32, f64):
    for rendered in (f32, f64):
        assert "fmax" not in rendered.source
        assert "for (int64_t i = begin; i < end; ++i)" in rendered.source
        assert not re.search(r"\bint i\b|\bunsigned\b|\bsize_t\b", rendered.source)


def test_restrict_only_in_the_functional_form(f32):
    parts = sections(f32.source)
    assert parts["functional"].count("restrict") > 10
    for form in ("inplace_parameter", "inplace_all"):
        assert "restrict" not in parts[form], form
    for function in f32.functions:
        pointers = [p for p in function.parameters if "*" in p.ctype]
        restricted = [p for p in pointers if "restrict" in p.ctype]
        assert restricted == (pointers if function.form == "functional" else []), function


def test_in_place_forms_take_one_pointer_per_overwritten_array(f32):
    by_symbol = {f.symbol: f for f in f32.functions}
    all_in_place = [p.name for p in by_symbol["ivy_adam_inplace_all"].parameters]
    assert all_in_place[:5] == ["w", "dcdw", "lr", "mw_tm1", "vw_tm1"]
    assert not {"w_new_out", "mw_out", "vw_out"} & set(all_in_place)
    w_in_place = [p.name for p in by_symbol["ivy_adam_inplace_parameter"].parameters]
    assert "w_new_out" not in w_in_place and {"mw_out", "vw_out"} <= set(w_in_place)
    roles = {p.name: p.role for p in by_symbol["ivy_adam_inplace_all"].parameters}
    assert roles["w"] == roles["mw_tm1"] == roles["vw_tm1"] == "inout" and roles["dcdw"] == "in"
    threaded = by_symbol["ivy_adam_functional_omp"].parameters
    assert [p.name for p in threaded[-3:]] == ["n", "nthreads", "threshold"]
    assert "#pragma omp parallel for schedule(static) num_threads(nthreads)" in f32.source
    assert "if (nthreads <= 1 || n < threshold)" in f32.source


def test_baked_constants_are_float_literals_rounded_once():
    rendered = c_source(KernelConfig(spec=IVY, constants=BAKED), flags=FLAGS32)
    body = sections(rendered.source)["functional"]
    assert "const float t7 = 0.9f*mw_tm1[i];" in body
    # 1 - 0.9 in double is 0.09999999999999998; rounded once to float32 that is 0.1f
    assert "const float t9 = 0.1f*dcdw[i];" in body
    assert "t19 = vw_sqrt + 1e-07f;" in body
    code = re.sub(r"/\*.*?\*/", "", body, flags=re.DOTALL)
    literals = re.findall(r"(?<![\w.])(\d+\.\d*(?:e[-+]?\d+)?|\d+e[-+]?\d+)(f?)", code)
    assert literals and all(suffix == "f" for _, suffix in literals), literals
    assert "beta1" not in [p.name for p in rendered.functions[0].parameters]


def test_scalar_tensors_are_values_and_uniform_steps_leave_the_loop():
    rendered = c_source(KernelConfig(spec=IVY, mode="fast", scalar_tensors=frozenset({"lr"})))
    functional = sections(rendered.source)["functional"]
    assert "float lr," in functional and "lr[i]" not in functional
    loop = functional.index("for (int64_t i")
    assert -1 < functional.index("const float t21_scale = alpha*lr;") < loop
    state = c_source(KernelConfig(spec=IVY, scalar_tensors=frozenset({"mw_tm1", "vw_tm1"})))
    assert {f.form for f in state.functions} == {"functional", "inplace_parameter"}  # no inplace_all


def test_without_openmp_there_are_no_threaded_entry_points():
    rendered = c_source(KernelConfig(spec=IVY), openmp=False)
    assert not any(f.threaded for f in rendered.functions)
    assert "omp" not in rendered.cdef and "#pragma omp" not in rendered.source
    assert "ivy_adam_multi_inplace(" in rendered.source


def have_cc() -> bool:
    return build.probe_compiler().available


needs_cc = pytest.mark.skipif(not have_cc(), reason="no C compiler")


def compile_only(tmp_path: Path, source: str, flags: list[str]) -> str:
    path = tmp_path / "kernel.c"
    path.write_text(source)
    proc = subprocess.run([*build.probe_compiler().argv, *flags, "-c", "-o",
                           str(tmp_path / "kernel.o"), str(path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@needs_cc
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "serial"])
@pytest.mark.parametrize("config", [KernelConfig(spec=IVY, dtype="float32"), KernelConfig(spec=IVY, dtype="float64"),
                                    KernelConfig(spec=IVY, mode="fast", constants=BAKED,
                                                 scalar_tensors=frozenset({"lr"}))],
                         ids=["float32", "float64", "fast-baked-scalar-lr"])
def test_compiles_with_all_warnings_as_errors(tmp_path: Path, config, openmp):
    if openmp and not build.probe_compiler().openmp:
        pytest.skip("no OpenMP")
    flags = build.compile_flags(config.mode, openmp=openmp, portable=False)
    rendered = c_source(config, openmp=openmp, flags=tuple(flags))
    assert compile_only(tmp_path, rendered.source, [*flags, "-Werror"]).strip() == ""


@needs_cc
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_chunk_loop_vectorises(tmp_path: Path, dtype):
    info = build.probe_compiler()
    if info.family != "gcc":
        pytest.skip("-fopt-info is GCC's")
    flags = build.compile_flags("exact", openmp=info.openmp, portable=False)
    rendered = c_source(KernelConfig(spec=IVY, dtype=dtype), openmp=info.openmp, flags=tuple(flags))
    report = compile_only(tmp_path, rendered.source, [*flags, "-fopt-info-vec-optimized"])
    vectorised = {int(m.group(1)) for m in re.finditer(r"kernel\.c:(\d+):\d+: optimized: loop "
                                                       r"vectorized", report)}
    loops = [number for number, line in enumerate(rendered.source.splitlines(), 1)
             if line.strip().startswith("for (int64_t i = begin")]
    assert len(loops) == 3 and set(loops) <= vectorised, report


@needs_cc
def test_every_op_prints_as_exactly_that_ieee_operation(tmp_path: Path):
    """A hand-built IR using every body op, constants on either side and negative constants,
    compiled and run against NumPy's float32 arithmetic (weak Python-float constants)."""
    from adamgen.codegen.c_backend import render_c_module
    from adamgen.runtime.c_kernels import KernelFunction

    cases = STEP_ORACLES
    outputs = tuple((f"o{index}", step.target) for index, step in enumerate(cases))
    ir = make_ir(("x", "y"), tuple(cases), outputs)
    rendered = render_c_module({"functional": ir}, openmp=False)
    assert "-0.3f" in rendered.source and "0.1f*x[i]" in rendered.source
    flags = build.compile_flags("exact", openmp=False, portable=False)
    so = build.compile_extension("_adamgen_ops_test", rendered.source, rendered.cdef, tmp_path,
                                 flags)
    module = build.load_extension(so, "_adamgen_ops_test")
    function = KernelFunction(module.ffi, module.lib, "float", rendered.functions[0].describe(),
                              0)
    x, y = special_inputs(1000, seed=1)
    got = [np.full(1000, 7, np.float32) for _ in cases]
    function(x, y, (), *got)
    with np.errstate(all="ignore"):
        for out, (step, expected) in zip(got, cases.items()):
            assert_bitwise_equal(out, np.asarray(expected(x, y), np.float32), str(step))


@needs_cc
def test_a_one_output_spec_renders_compiles_and_streams(tmp_path: Path):
    """The streaming wrapper for any number of outputs: one here (Adam has three, its VJP
    five), forced to stream at every size, with the head, whole blocks and the tail."""
    from adamgen.codegen.c_backend import render_c_module
    from adamgen.codegen.ir import Step
    from adamgen.runtime.c_kernels import KernelFunction

    ir = make_ir(("x",), (Step("t0", "add", ("x", "x")),), (("y", "t0"),), rule="twice")
    rendered = render_c_module({"functional": ir}, openmp=False)
    flags = [*build.compile_flags("exact", openmp=False, portable=False), "-Werror",
             "-DADAMGEN_STREAM_MIN_BYTES=0"]
    so = build.compile_extension("_adamgen_twice_test", rendered.source, rendered.cdef, tmp_path,
                                 flags)
    module = build.load_extension(so, "_adamgen_twice_test")
    function = KernelFunction(module.ffi, module.lib, "float", rendered.functions[0].describe(),
                              0)
    raw = np.empty(4 * 2000 + 128, np.uint8)
    start = (-raw.ctypes.data) % 64
    for offset in (0, 4, 60):  # aligned; one element in; one element short of a line
        for n in (0, 1, 17, 255, 256, 300, 1000):
            x = np.arange(n, dtype=np.float32) - 7.5
            y = raw[start + offset:start + offset + 4 * n].view(np.float32)
            y[...] = 7
            function(x, (), y)
            assert_bitwise_equal(y, x + x, f"n={n} offset={offset}")
