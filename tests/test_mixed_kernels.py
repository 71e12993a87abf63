"""Mixed precision below the torch layer: storage dtypes, master-weight specs, the random stream.

* the spec language: ``Tensor.storage``, ``StatePair.init``, ``round_to(..., stochastic=True)``
  and the lowering's check that a narrow output is a value of its dtype;
* :func:`adamgen.mixed.master_spec` for any rule, and the IR of every new variant proven equal
  to its spec;
* the stream (:func:`adamgen.ieee.stream_bits`): Random123's known answers for ARS, AES's
  tables, its element layout, each of the C kernels' three implementations of it,
  and stochastic rounding's unbiasedness;
* the C kernels and the NumPy modules agree bit for bit, serial, threaded with any number of
  parts, single- and multi-tensor: the bits never depend on chunking.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import sympy

from adamgen import ieee
from adamgen.codegen.driver import kernel_ir
from adamgen.codegen.lower import lower
from adamgen.config import KernelConfig
from adamgen.errors import LoweringError
from adamgen.interface import Interface, StatePair, Tensor
from adamgen.mixed import derivative_name, master_spec
from adamgen.proofs import PROVED, ir_equals_spec
from adamgen.rules import builtin, resolve
from adamgen.runtime.c_kernels import c_kernel
from adamgen.runtime.numpy_kernels import numpy_kernel
from adamgen.spec import UpdateSpec, round_to, symbols, unevaluated

# --- the language ---------------------------------------------------------------------------


def test_storage_and_init_are_declared_and_travel_as_plain_data():
    tensor = Tensor("p", storage="bfloat16")
    pair = StatePair("m_new", "m", init="parameter")
    assert Tensor.__name__ and tensor.to_json()["storage"] == "bfloat16"
    assert "storage" not in Tensor("p").to_json()  # default: the JSON of every rule unchanged
    assert pair.to_json()["init"] == "parameter" and "init" not in StatePair("a", "b").to_json()
    spec = resolve(builtin("torch_adamw").ref().derived("master:bfloat16"))
    again = Interface.from_json(spec.interface.to_json())
    assert again.tensor("grad").storage == "bfloat16"
    assert [p.init for p in again.state] == ["zero", "parameter", "zero", "zero"]
    with pytest.raises(ValueError, match="storage must be one of"):
        Tensor("p", storage="int8")
    with pytest.raises(ValueError, match="scalar"):
        Tensor("lr", scalar=True, storage="bfloat16")
    with pytest.raises(ValueError, match="init must be one of"):
        StatePair("a", "b", init="ones")
    with pytest.raises(ValueError, match="stochastic"):
        round_to(sympy.Symbol("x"), "float32", stochastic=True)
    with pytest.raises(ValueError, match="stream"):
        round_to(sympy.Symbol("x"), "bfloat16", stochastic=True, stream=256)


def _narrow_spec(rounded: bool) -> UpdateSpec:
    p, g = symbols("p g")
    with unevaluated():
        new = p - g / 8
    return UpdateSpec("narrow", [Tensor("p", storage="bfloat16"), Tensor("g")], [],
                      {"p_new": round_to(new, "bfloat16") if rounded else new},
                      state={"p_new": "p"}, parameter="p", gradient="g")


def test_a_narrow_output_must_be_rounded_to_its_storage_dtype():
    spec = _narrow_spec(rounded=False)
    with pytest.raises(LoweringError, match="stored as bfloat16.*round_to"):
        lower(spec, KernelConfig(spec=spec.ref(), dtype="float32"))
    spec = _narrow_spec(rounded=True)
    lower(spec, KernelConfig(spec=spec.ref(), dtype="float32"))


def test_every_master_form_is_constructible_and_named_without_sympy():
    from adamgen.interface import MASTER_DTYPES, MASTER_FORMS
    from adamgen.language import STOCHASTIC_DTYPES

    assert set(STOCHASTIC_DTYPES) == set(MASTER_DTYPES)
    for form in MASTER_FORMS:
        assert resolve(builtin("lion").ref().derived(form)).interface.tensor("param").storage


def test_master_spec_for_any_rule():
    ivy = resolve(builtin("ivy_adam").ref())
    master = master_spec(ivy, "float16")
    interface = master.interface
    assert interface.tensor_names[:3] == ("w", "dcdw", "master_w")
    assert interface.tensor("w").storage == interface.tensor("dcdw").storage == "float16"
    assert "w" not in interface.dependencies("w_new")  # the old parameter is never read
    lion = master_spec(resolve(builtin("lion").ref()), "bfloat16", stochastic=True)
    assert lion.interface.outputs[:2] == ("param", "master_param")
    with pytest.raises(ValueError, match="no master-weight form"):
        derivative_name("float32", True)


VARIANTS = [
    builtin("torch_adamw").ref(precision="bfloat16"),
    builtin("torch_adam").ref(precision="float16", amsgrad=True, maximize=True),
    builtin("torch_adam").ref().derived("master:float16"),
    builtin("torch_adamw").ref(amsgrad=True).derived("stochastic:bfloat16"),
    builtin("lion").ref().derived("master:bfloat16"),
    builtin("torch_adam").ref(maximize=True).derived("stochastic:float16"),
]


@pytest.mark.parametrize("ref", VARIANTS, ids=lambda r: r.label)
def test_every_variants_kernel_is_proven_equal_to_its_spec(ref):
    spec = resolve(ref)
    status, detail = ir_equals_spec(spec, lower, KernelConfig(spec=ref, dtype="float32"))
    assert status == PROVED, detail


# --- the stream ------------------------------------------------------------------------------

@pytest.mark.parametrize("counter,key,expected", [  # Random123's kat_vectors, ars4x32 10
    ((0, 0, 0, 0), (0, 0, 0, 0), (0x8D73EE19, 0x506401EF, 0x13C2DBE4, 0x0CBE9C0D)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xA4093822, 0x299F31D0, 0x082EFA98, 0xEC4E6C89),
     (0xA516E7D6, 0x8357AD74, 0x5B59B3EC, 0x8763FFF3)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF, 0, 0),
     (0xBB3743B1, 0x9F635551, 0xECBC87FC, 0xA19478A9)),
])
def test_ars_gives_random123s_known_answers(counter, key, expected):
    assert tuple(int(w) for w in ieee.ars4x32(counter, key, rounds=10)) == expected


def test_the_aes_tables_are_fips_197s():
    sbox, xtime, _ = ieee._aes_tables()
    assert (sbox[0x00], sbox[0x53], sbox[0xFF]) == (0x63, 0xED, 0x16)  # FIPS-197 figure 7
    assert sorted(sbox.tolist()) == list(range(256))
    assert (xtime[0x57], xtime[0xAE], xtime[0x47]) == (0xAE, 0x47, 0x8E)  # FIPS-197 4.2.1


def test_the_stream_layout_and_any_window_of_it():
    seed, step, key, stream = 2**40 + 5, 9, 123, 1
    bits = ieee.stream_bits(seed, step, key, stream, 1000)
    for i in (0, 1, 7, 8, 15, 16, 127, 128, 999):
        block = i // 8
        words = ieee.ars4x32((block, stream << 16, step, key),
                             (seed & 0xFFFFFFFF, seed >> 32, 0, 0))
        word = int(words[(i % 8) // 2])
        assert bits[i] == (word >> 16 if i % 2 else word & 0xFFFF), i
    for start, count in ((0, 1), (5, 300), (127, 2), (500, 500)):
        assert np.array_equal(ieee.stream_bits(seed, step, key, stream, count, start),
                              bits[start:start + count])
    # a block index past 2**32 carries into the second word, below the stream's bits
    far = 2**35 + 3
    words = ieee.ars4x32((far & 0xFFFFFFFF, (far >> 32) + (stream << 16), step, key),
                         (seed & 0xFFFFFFFF, seed >> 32, 0, 0))
    assert int(ieee.stream_bits(seed, step, key, stream, 1, 8 * far)[0]) == int(words[0]) & 0xFFFF
    others = [ieee.stream_bits(*changed, 1000) for changed in
              ((seed + 1, step, key, stream), (seed, step + 1, key, stream),
               (seed, step, key + 1, stream), (seed, step, key, stream + 1),
               (seed + 2**32, step, key, stream))]
    assert all(np.mean(other == bits) < 0.01 for other in others)


def test_the_bits_look_uniform():
    bits = ieee.stream_bits(0, 1, 0, 0, 1 << 18).astype(np.int64)
    assert abs(bits.mean() / 65535 - 0.5) < 0.005
    counts = np.bincount(bits >> 12, minlength=16)  # 16 bins of the top 4 bits
    assert counts.min() > 0.95 * counts.mean() and counts.max() < 1.05 * counts.mean()


def test_stochastic_rounding_is_unbiased_and_exact_where_it_can_be():
    x = np.float32(1.0) + np.float32(2.0**-7) * np.float32([0.1, 0.25, 0.5, 0.9, 0.999])
    x = np.concatenate([x, -x, np.float32([3.0e-39, 6.0e-39])])  # subnormals too
    draws = 20_000
    total = np.zeros(x.size)
    for step in range(draws):
        bits = ieee.stream_bits(0, step, 7, 0, x.size)
        total += ieee.round_stochastic_bfloat16(x, bits).astype(np.float64)
    mean = total / draws
    spacing = np.abs(ieee.round_stochastic_bfloat16(x, np.full(x.size, 0xFFFF, np.uint16)) -
                     ieee.round_stochastic_bfloat16(x, np.zeros(x.size, np.uint16)))
    assert np.all(np.abs(mean - x) <= 5 * 0.5 * spacing / np.sqrt(draws))
    exact = np.float32([1.0, -2.5, 0.0, np.inf, -np.inf, 2.0**-130])
    same = ieee.round_stochastic_bfloat16(exact, np.full(exact.size, 0xFFFF, np.uint16))
    assert np.array_equal(same.view(np.uint32), exact.view(np.uint32))
    assert np.isnan(ieee.round_stochastic_bfloat16(np.float32([np.nan]), [0x1234]))[0]


# --- the kernels: C and NumPy, any chunking -----------------------------------------------------

def _config(ref):
    return KernelConfig(spec=ref, dtype="float32")


def _arrays(interface, n, seed):
    rng = np.random.default_rng(seed)
    arrays = {}
    for tensor in interface.tensors:
        values = (rng.standard_normal(n) * (0.01 if tensor.name == "grad" else 1.0)).astype(
            np.float32)
        if "exp_avg_sq" in tensor.name:
            values = np.abs(values)
        storage = tensor.storage or "float32"
        arrays[tensor.name] = ieee.narrow(values, storage) if storage != "float32" else values
    return arrays


@pytest.mark.parametrize("ref", VARIANTS[:4] + VARIANTS[5:], ids=lambda r: r.label)
def test_c_and_numpy_agree_at_every_thread_count_and_tensor_split(ref):
    config = _config(ref)
    kernel = c_kernel(config)
    if kernel is None:
        pytest.skip("no C compiler")
    module = numpy_kernel(config)
    interface = Interface.from_json(module.INTERFACE)
    in_place = numpy_kernel(replace(config, aliases=interface.in_place))
    names = interface.tensor_names
    written = [o for o in in_place.OUTPUTS]
    output_of = {p.output: p.input for p in interface.state}
    scalars = module.prelude(*[{"step": 3.0, "lr": 1e-3}.get(h, 0.9 if "beta" in h else 0.01)
                               for h in module.HYPERPARAMETERS])
    random = bool(getattr(module, "STREAMS", ()))
    sizes = (1, 127, 129, 4099, 40_000)
    keys = [11, 12, 13, 14, 15]
    rows = [_arrays(interface, n, seed) for seed, n in enumerate(sizes)]
    expected = []
    for row, key in zip(rows, keys):
        arrays = {name: value.copy() for name, value in row.items()}
        rng = ((2**63 + 17, 3, key),) if random else ()
        in_place.update(*(arrays[n] for n in names), scalars, *rng,
                        *(arrays[output_of[o]] for o in written))
        expected.append(arrays)
    for threads in (1, 2, 3, 7):
        arrays = [{name: value.copy() for name, value in row.items()} for row in rows]
        rng = ((2**63 + 17, 3, keys),) if random else ()
        kernel.multi_inplace(*([a[n] for a in arrays] for n in names), scalars, *rng,
                             threads=threads, threshold=0)
        for index, (got, want) in enumerate(zip(arrays, expected)):
            for name in names:
                assert np.array_equal(got[name].view(np.uint8), want[name].view(np.uint8)), \
                    (threads, index, name)
    if random:  # one tensor alone, serial and in parts: the same bits as among the others
        for threads in (1, 5):
            single = {name: value.copy() for name, value in rows[4].items()}
            kernel.inplace_all(*(single[n] for n in names), scalars, (2**63 + 17, 3, keys[4]),
                               threads=threads, threshold=0)
            for name in names:
                assert np.array_equal(single[name].view(np.uint8),
                                      expected[4][name].view(np.uint8))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((set(line.split(":", 1)[1].split()) for line in cpuinfo
                         if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.mark.parametrize("tier,needs", [(0, ()), (1, ("aes",)), (2, ("vaes", "avx512f")),
                                        ("portable", ())],
                         ids=["plain-c", "aes-ni", "vaes", "portable"])
def test_every_implementation_of_the_stream_gives_the_same_bits(monkeypatch, tier, needs):
    """The C fill has three implementations (VAES, AES-NI, plain C), picked by the target: each
    one forced in turn, and a portable build (no -march=native, so plain C on x86-64), gives
    NumPy's bits for a stochastically rounded step of 1 to 4099 elements."""
    from adamgen.codegen import build
    from adamgen.runtime import c_kernels

    if not build.probe_compiler().available:
        pytest.skip("no C compiler")
    missing = [flag for flag in needs if flag not in _cpu_flags()]
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)}")
    if tier != "portable":
        plain = build.compile_flags
        monkeypatch.setattr(build, "compile_flags", lambda *args, **kwargs: [
            *plain(*args, **kwargs), f"-DADAMGEN_ARS_TIER={tier}"])
    config = _config(VARIANTS[3])
    c_kernels.clear_memo()
    try:
        kernel = c_kernel(config, portable=tier == "portable")
        assert kernel is not None
        module = numpy_kernel(config)
        interface = Interface.from_json(module.INTERFACE)
        in_place = numpy_kernel(replace(config, aliases=interface.in_place))
        names = interface.tensor_names
        output_of = {p.output: p.input for p in interface.state}
        scalars = module.prelude(*[{"step": 3.0, "lr": 1e-3}.get(h, 0.9 if "beta" in h else 0.01)
                                   for h in module.HYPERPARAMETERS])
        for index, n in enumerate((1, 9, 127, 129, 4099)):
            rng = (2**63 + 17, 3, 40 + index)
            want = _arrays(interface, n, index)
            got = {name: value.copy() for name, value in want.items()}
            in_place.update(*(want[n] for n in names), scalars, rng,
                            *(want[output_of[o]] for o in in_place.OUTPUTS))
            kernel.inplace_all(*(got[n] for n in names), scalars, rng, threads=1, threshold=0)
            for name in names:
                assert np.array_equal(got[name].view(np.uint8), want[name].view(np.uint8)), \
                    (n, name)
    finally:
        c_kernels.clear_memo()


def test_the_ir_knows_storage_dtypes_and_streams():
    ref = builtin("torch_adamw").ref(precision="bfloat16")
    ir = kernel_ir(_config(ref))
    assert ir.storage("param") == "bfloat16" and ir.output_storage("exp_avg") == "bfloat16"
    assert ir.streams == ()
    assert kernel_ir(_config(builtin("torch_adamw").ref().derived(
        "stochastic:bfloat16"))).streams == (0,)


def test_float16_stochastic_rounding_is_unbiased_in_every_range():
    step16 = np.float32(2.0**-10)
    x = np.float32([1.0 + 0.3 * step16, -(1.0 + 0.7 * step16), 3.0e4 + 0.5 * 16,
                    2.0**-20 + 0.25 * 2.0**-24, -(2.0**-15 + 0.6 * 2.0**-24), 65504.0 + 8.0])
    draws = 20_000
    total = np.zeros(x.size)
    for step in range(draws):
        total += ieee.round_stochastic_float16(x, ieee.stream_bits(1, step, 2, 0, x.size))
    mean = total / draws
    spacing = np.float64([2.0**-10, 2.0**-10, 16.0, 2.0**-24, 2.0**-24, 32.0])
    finite = np.isfinite(mean)
    assert np.all(np.abs(mean - x)[finite] <= 5 * 0.5 * spacing[finite] / np.sqrt(draws))
    assert not finite[-1]  # above float16's largest value, some draws are inf
    exact = np.float32([1.0, -2.5, 0.0, -0.0, 2.0**-24, 65504.0, np.inf])
    same = ieee.round_stochastic_float16(exact, np.full(exact.size, 0xFFFF, np.uint16))
    assert np.array_equal(same.view(np.uint32), exact.view(np.uint32))
