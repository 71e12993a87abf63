"""Compiled C kernels: bit-identity of every variant, the multi-tensor kernel, build and fallback.

Every variant (functional, in-place w, in-place all; serial, and OpenMP at 1 and 2 threads) is
compared bit for bit with the NumPy backend module and with an independent reference written
here, for float32 and float64, sizes 0 to 1e6+3, NaN/inf/negative state and several steps.

Hermetic: one cache directory for the module (``ADAMGEN_CACHE_DIR``), memos cleared around it.
Kernels are built once per configuration and shared (a build takes about a second).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Snapshot, assert_bitwise_equal
from reference import adam_update_ref

from adamgen.codegen import build
from adamgen.config import KernelConfig
from adamgen.errors import CacheError, CompileError
from adamgen.interface import SpecRef
from adamgen.runtime import c_kernels, kernel_store
from adamgen.runtime.c_kernels import CKernel, c_kernel
from adamgen.runtime.numpy_kernels import numpy_kernel

IVY = SpecRef("ivy_adam")

REPO = Path(__file__).resolve().parents[1]
SIZES = [0, 1, 15, 16, 17, 4097, 1_000_003]
STEPS = [1, 1270, 10**4, 3.4]
KINDS = {"array-lr": frozenset(), "scalar-lr": frozenset({"lr"}),
         "scalar-state": frozenset({"lr", "vw_tm1"})}
FORMS = ("functional", "inplace_parameter", "inplace_all")
HYPER = {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-7}

pytestmark = pytest.mark.skipif(not build.probe_compiler().available, reason="no C compiler")


def forget() -> None:
    c_kernels.clear_memo()
    kernel_store.forget_cache()
    build.probe_compiler.cache_clear()
    build.cpu_features.cache_clear()


@pytest.fixture(scope="module", autouse=True)
def hermetic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("ADAMGEN_") or name in ("CC", "OMP_NUM_THREADS"):
                patch.delenv(name)
        root = tmp_path_factory.mktemp("c-kernels") / "cache"
        patch.setenv("ADAMGEN_CACHE_DIR", str(root))
        forget()
        yield root
    forget()


@functools.cache
def kernel(dtype: str, kind: str) -> CKernel:
    built = c_kernel(KernelConfig(spec=IVY, dtype=dtype, scalar_tensors=KINDS[kind]))
    assert built is not None
    return built


# -- inputs and references ---------------------------------------------------------------------
def specials(dtype: str) -> np.ndarray:
    """NaNs of both signs and several payloads, infinities, signed zeros, negative state, huge
    and subnormal values."""
    bits = np.uint32 if dtype == "float32" else np.uint64
    shift = 0 if dtype == "float32" else 32
    nans = (np.array([0x7FC00000, 0xFFC00000, 0x7FC12345, 0xFFC54321, 0x7F800001],
                     np.uint64) << shift).astype(bits).view(dtype)
    values = np.array([np.inf, -np.inf, 0.0, -0.0, -1.0, -1e-3, 1e30, 1e-40], dtype)
    return np.concatenate([nans, values])


def make_inputs(dtype: str, n: int, kind: str, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    arrays = {"w": rng.standard_normal(n), "dcdw": rng.standard_normal(n) * 0.1,
              "mw_tm1": rng.standard_normal(n) * 0.01,
              "vw_tm1": np.abs(rng.standard_normal(n)) * 1e-3,
              "lr": rng.uniform(1e-4, 1e-2, n)}
    arrays = {name: a.astype(dtype) for name, a in arrays.items()}
    extra = specials(dtype)
    for a in arrays.values():
        mask = rng.random(n) < 0.1
        a[mask] = rng.choice(extra, int(mask.sum()))
    if n >= 4:
        arrays["vw_tm1"][0], arrays["vw_tm1"][1] = -1.0, np.nan  # negative and NaN state
        arrays["mw_tm1"][2], arrays["dcdw"][3] = np.nan, np.inf
    if "lr" in KINDS[kind]:
        arrays["lr"] = 0.001  # a Python float, rounded once to the dtype as NumPy does
    if "vw_tm1" in KINDS[kind]:
        arrays["vw_tm1"] = np.array([-0.25 if seed % 2 else 2e-3], dtype)  # state of shape (1,)
    return arrays


def reference(w, g, lr, m, v, t, b1=0.9, b2=0.999, eps=1e-7):
    """The suite's one independent reference (tests/reference.py), positionally."""
    return adam_update_ref(w, g, lr, m, v, t, beta1=b1, beta2=b2, epsilon=eps)


def numpy_backend(dtype: str, a: dict[str, Any], step: float) -> tuple[tuple, tuple]:
    module = numpy_kernel(KernelConfig(spec=IVY, dtype=dtype))
    scalars = module.prelude(HYPER["beta1"], HYPER["beta2"], HYPER["epsilon"], float(step))
    n = a["w"].size
    outs = tuple(np.empty(n, dtype) for _ in range(3))
    with np.errstate(all="ignore"):
        module.update(a["w"], a["dcdw"], a["lr"], a["mw_tm1"], a["vw_tm1"], scalars, *outs)
    return outs, scalars


def c_argument(value: Any, scalar: bool) -> Any:
    """What the C kernel takes for a tensor: arrays as they are, scalar tensors as numbers."""
    return float(np.asarray(value).reshape(-1)[0]) if scalar else value


def variants(k: CKernel) -> Iterator[tuple[str, str, Callable[..., None], dict[str, Any]]]:
    for form in FORMS:
        if form not in k.forms:
            continue
        yield form, "serial", k.function(f"ivy_adam_{form}"), {}
        yield form, "dispatch", functools.partial(k.call, form), {}
        if k.openmp:
            threaded = k.function(f"ivy_adam_{form}_omp")
            yield form, "omp-1", threaded, {"threads": 1, "threshold": 0}
            yield form, "omp-2", threaded, {"threads": 2, "threshold": 0}


def run_form(form: str, function: Callable[..., None], options: dict[str, Any],
             a: dict[str, Any], scalars: tuple[float, ...],
             scalar_tensors: frozenset[str]) -> tuple[np.ndarray, ...]:
    w, g, lr, m, v = (c_argument(a[name], name in scalar_tensors)
                      for name in ("w", "dcdw", "lr", "mw_tm1", "vw_tm1"))
    n, dtype = a["w"].size, a["w"].dtype
    if form == "functional":
        outs = tuple(np.full(n, 7, dtype) for _ in range(3))
        function(w, g, lr, m, v, scalars, *outs, **options)
        return outs
    if form == "inplace_parameter":
        mw, vw = np.full(n, 7, dtype), np.full(n, 7, dtype)
        w = w.copy()
        function(w, g, lr, m, v, scalars, mw, vw, **options)
        return w, mw, vw
    w, m, v = w.copy(), m.copy(), v.copy()
    function(w, g, lr, m, v, scalars, **options)
    return w, m, v


# -- bit-identity --------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_variant_is_bit_identical_to_numpy_and_the_reference(dtype, kind, size):
    k = kernel(dtype, kind)
    for index, step in enumerate(STEPS):
        a = make_inputs(dtype, size, kind, seed=size + index)
        expected, scalars = numpy_backend(dtype, a, step)
        independent = reference(a["w"], a["dcdw"], a["lr"], a["mw_tm1"], a["vw_tm1"],
                                float(step))
        for got, want, name in zip(expected, independent, ("w_new", "mw", "vw")):
            assert_bitwise_equal(got, np.broadcast_to(want, got.shape), f"numpy module {name}")
        untouched = Snapshot(**a)
        for form, how, function, options in variants(k):
            got = run_form(form, function, options, a, scalars, KINDS[kind])
            for g, e, name in zip(got, expected, ("w_new", "mw", "vw")):
                assert_bitwise_equal(g, e, f"{form} {how} {name} (n={size}, step={step})")
            untouched.assert_unchanged()


def outputs_at(byte_offsets: tuple[int, ...], n: int, dtype: str) -> list[np.ndarray]:
    """Arrays of ``n`` elements starting ``byte_offsets`` past 64-byte boundaries, filled with 7
    (so an element the kernel skipped shows)."""
    itemsize = np.dtype(dtype).itemsize
    arrays = []
    for offset in byte_offsets:
        raw = np.empty(n * itemsize + 128, np.uint8)
        start = (-raw.ctypes.data) % 64 + offset
        arrays.append(raw[start:start + n * itemsize].view(dtype))
        arrays[-1][...] = 7
    return arrays


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_streaming_stores_write_every_element_at_any_alignment(dtype):
    """The functional form streams its outputs above 4 MiB per thread: aligned blocks with a
    direct head and tail when all outputs share an alignment, direct stores when they do not.
    Every case against the NumPy backend, bit for bit, serial and split over two threads."""
    k = kernel(dtype, "scalar-lr")
    itemsize = np.dtype(dtype).itemsize
    n = (12 << 20) // (3 * itemsize) + 37  # 12 MiB of output: both threads' parts stream
    a = make_inputs(dtype, n, "scalar-lr", seed=11)
    expected, scalars = numpy_backend(dtype, a, 1270)
    layouts = [(0, 0, 0), (itemsize, itemsize, itemsize), (40, 40, 40), (0, itemsize, 0),
               (2, 2, 2)]  # aligned; one element in; 40 bytes in; mixed; not element-aligned
    calls = [("serial", k.function("ivy_adam_functional"), {})]
    if k.openmp:
        calls.append(("omp-2", k.function("ivy_adam_functional_omp"), {"threads": 2, "threshold": 0}))
    for layout in layouts:
        if layout == (2, 2, 2):  # NumPy refuses to view misaligned memory; cffi does not care
            continue
        for how, function, options in calls:
            outs = outputs_at(layout, n, dtype)
            function(a["w"], a["dcdw"], 0.001, a["mw_tm1"], a["vw_tm1"], scalars, *outs,
                     **options)
            for got, e, name in zip(outs, expected, ("w_new", "mw", "vw")):
                assert_bitwise_equal(got, e, f"{how} {name} at byte offsets {layout}")


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_scalars_are_the_numpy_preludes(kind):
    k = kernel("float64", kind)
    assert k.kernel_scalars == tuple(numpy_kernel(k.config).KERNEL_SCALARS)


def test_forms_present_per_signature():
    assert kernel("float32", "array-lr").forms == FORMS + ("multi_inplace",)
    assert kernel("float32", "scalar-state").forms == ("functional", "inplace_parameter")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_multi_tensor_kernel_equals_per_tensor_calls(dtype):
    k = kernel(dtype, "scalar-lr")
    sizes = [0, 1, 15, 16, 17, 4097, 100_003, 64, 3, 70_000]
    rng = np.random.default_rng(3)
    tensors = [make_inputs(dtype, n, "array-lr", seed=int(rng.integers(1 << 30))) for n in sizes]
    scalars = numpy_kernel(KernelConfig(spec=IVY, dtype=dtype)).prelude(0.9, 0.999, 1e-7, 1270.0)
    expected = []
    single = k.function("ivy_adam_inplace_all")
    for t in tensors:
        w, m, v = t["w"].copy(), t["mw_tm1"].copy(), t["vw_tm1"].copy()
        single(w, t["dcdw"], 0.001, m, v, scalars)
        expected.append((w, m, v))
    calls: list[tuple[str, Callable[..., None], dict[str, Any]]] = [
        ("serial", k.function("ivy_adam_multi_inplace"), {}),
        ("dispatch", k.multi_inplace, {})]
    if k.openmp:
        calls += [("omp-1", k.function("ivy_adam_multi_inplace_omp"), {"threads": 1, "threshold": 0}),
                  ("omp-2", k.function("ivy_adam_multi_inplace_omp"), {"threads": 2, "threshold": 0}),
                  ("omp-2-cached", k.function("ivy_adam_multi_inplace_omp"),
                   {"threads": 2, "threshold": 0, "cached": True})]
    for how, function, options in calls:
        ws = [t["w"].copy() for t in tensors]
        ms = [t["mw_tm1"].copy() for t in tensors]
        vs = [t["vw_tm1"].copy() for t in tensors]
        gs = [t["dcdw"] for t in tensors]
        if options.pop("cached", False):
            ws, ms, vs = (k.pointers(x, writable=True) for x in (ws, ms, vs))
            gs = k.pointers(gs)
        function(ws, gs, 0.001, ms, vs, scalars, **options)
        arrays = [getattr(x, "arrays", x) for x in (ws, ms, vs)]
        for index, want in enumerate(expected):
            for got, e, name in zip((arrays[0][index], arrays[1][index], arrays[2][index]),
                                    want, ("w", "m", "v")):
                assert_bitwise_equal(got, e, f"multi {how} tensor {index} {name}")


def test_multi_tensor_lists_must_agree():
    k = kernel("float32", "scalar-lr")
    ws = [np.zeros(4, np.float32), np.zeros(5, np.float32)]
    scalars = (0.9, 0.1, 1.0, 0.999, 0.001, 1e-7)
    with pytest.raises(ValueError, match="differ"):
        k.multi_inplace(ws, [np.zeros(4, np.float32)] * 2, 0.001, ws, ws, scalars)
    with pytest.raises(ValueError, match="read-only"):
        frozen = np.zeros(4, np.float32)
        frozen.flags.writeable = False
        k.multi_inplace([frozen], [frozen], 0.001, [frozen], [frozen], scalars)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_in_place_forms_allow_exactly_aliased_inputs(dtype):
    """``adam_update(w, w, ..., out=w)``: an input that is the overwritten array itself."""
    k = kernel(dtype, "scalar-lr")
    a = make_inputs(dtype, 4097, "scalar-lr", seed=5)
    a["dcdw"] = a["w"].copy()
    expected, scalars = numpy_backend(dtype, a, 1270)
    for form, how, function, options in variants(k):
        if form == "functional":
            continue
        w = a["w"].copy()
        if form == "inplace_parameter":
            mw, vw = np.empty_like(w), np.empty_like(w)
            function(w, w, 0.001, a["mw_tm1"], a["vw_tm1"], scalars, mw, vw, **options)
        else:
            mw, vw = a["mw_tm1"].copy(), a["vw_tm1"].copy()
            function(w, w, 0.001, mw, vw, scalars, **options)
        for got, e, name in zip((w, mw, vw), expected, ("w_new", "mw", "vw")):
            assert_bitwise_equal(got, e, f"{form} {how} {name} with dcdw is w")


def test_calls_release_the_gil():
    """cffi's API mode releases the GIL around each call: check the wrapper it generated."""
    k = kernel("float32", "array-lr")
    wrapper = (k.cache_path / f"{build.extension_module_name(k.cache_key)}.c").read_text()
    assert wrapper.count("Py_BEGIN_ALLOW_THREADS") >= len(k.functions)


def test_non_contiguous_arrays_are_refused_not_misread():
    """The API passes contiguous copies; a strided view reaching the kernel is an error."""
    k = kernel("float32", "scalar-lr")
    base = np.zeros((8, 2), np.float32)
    outs = [np.zeros(8, np.float32) for _ in range(3)]
    with pytest.raises(ValueError, match="contiguous"):
        k.functional(base[:, 0], base[:, 1], 0.001, outs[0], outs[1], (0.9,) * 6, *outs)
    assert not any(o.any() for o in outs)


# -- fast mode -----------------------------------------------------------------------------------
def test_fast_mode_is_contracted_and_close():
    """Fast mode (FMA contraction, lr folded into alpha) against exact mode, stated bounds:

    * the update step ``w - w_new``: within 1 ulp of ``w_new`` (its final rounding) plus 16 ulp
      of the exact step (measured: at most 8 over 1e6 elements and steps 1..1270);
    * ``mw``: within 1 ulp of ``|beta1*mw_tm1| + |(1-beta1)*dcdw|`` (one contraction; relative
      to ``mw`` itself it is unbounded where the two terms cancel);
    * ``vw``: within 1 ulp (its terms never cancel: both are >= 0 for valid state).
    """
    fast = c_kernel(KernelConfig(spec=IVY, mode="fast", scalar_tensors=frozenset({"lr"})))
    exact = kernel("float32", "scalar-lr")
    assert fast is not None and "-ffp-contract=fast" in fast.flags
    assert "-ffp-contract=fast" in fast.source and "t21_scale" in fast.source
    assert fast.kernel_scalars == tuple(numpy_kernel(fast.config).KERNEL_SCALARS)
    rng = np.random.default_rng(11)
    n = 100_000
    w, g, m = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    v = np.abs(rng.standard_normal(n)).astype(np.float32)
    terms = np.abs(np.float32(0.9) * m).astype(np.float64) + np.abs(np.float32(0.1) * g)
    for step in (1.0, 10.0, 1270.0):
        outs = {}
        for name, k in (("exact", exact), ("fast", fast)):
            scalars = numpy_kernel(k.config).prelude(0.9, 0.999, 1e-7, step)
            outs[name] = [np.empty(n, np.float32) for _ in range(3)]
            k.functional(w, g, 0.01, m, v, scalars, *outs[name])
        e, f = outs["exact"], outs["fast"]
        step_e = w.astype(np.float64) - e[0]
        step_f = w.astype(np.float64) - f[0]
        bound = np.spacing(np.abs(e[0])) + 16.0 * np.spacing(np.abs(step_e).astype(np.float32))
        assert np.all(np.abs(step_f - step_e) <= bound), step
        assert np.all(np.abs(f[1].astype(np.float64) - e[1])
                      <= np.spacing(terms.astype(np.float32))), step
        assert np.all(np.abs(f[2].astype(np.float64) - e[2]) <= np.spacing(np.abs(e[2]))), step


# -- the kernel object, the cache and the runtime contract ---------------------------------------
def test_kernel_explains_itself():
    k = kernel("float32", "array-lr")
    assert k.variant.startswith("c ivy_adam float32 exact [native") and k.openmp == ("openmp" in k.variant)
    assert len(k.cache_key) == 64 and k.cache_path.is_dir() and k.cache_key in str(k.cache_path)
    assert k.source.startswith("/*\n * Generated by adamgen") and "ivy_adam_inplace_all" in k.source
    assert k.cache_key[:12] in repr(k) and k.variant in repr(k) and "forms=" in repr(k)
    function = k.function("ivy_adam_inplace_all")
    assert function.declaration.startswith("void ivy_adam_inplace_all(float *w, const float *dcdw")
    assert "ivy_adam_inplace_all" in repr(function)
    with pytest.raises(KeyError, match="ivy_adam_functional"):
        k.function("ivy_adam_nope")
    with pytest.raises(TypeError, match="scalars"):
        function(np.zeros(1, np.float32))


def test_memoised_per_process_and_aliases_ignored():
    k = kernel("float64", "scalar-lr")
    config = KernelConfig(spec=IVY, dtype="float64", scalar_tensors=frozenset({"lr"}),
                          aliases=frozenset({("w_new", "w")}))
    assert c_kernel(config) is k
    assert c_kernel(KernelConfig(spec=IVY, dtype="float16")) is None
    assert c_kernel(KernelConfig(spec=IVY, dtype="mixed")) is None


def test_second_process_hits_the_cache_without_sympy_or_jinja(hermetic: Path):
    """Also with two scalar tensors: the key must not depend on the hash seed."""
    kernel("float32", "scalar-lr")
    kernel("float64", "scalar-state")
    script = textwrap.dedent("""
        import sys
        from adamgen.config import KernelConfig
        from adamgen.interface import SpecRef
        IVY = SpecRef('ivy_adam')
        from adamgen.runtime.c_kernels import EVENTS, c_kernel
        k = c_kernel(KernelConfig(spec=IVY, dtype="float32", scalar_tensors=frozenset({"lr"})))
        assert k is not None and not k.built, k
        state = c_kernel(KernelConfig(spec=IVY, dtype="float64",
                                      scalar_tensors=frozenset({"vw_tm1", "lr"})))
        assert state is not None and not state.built, state
        assert EVENTS[-1]["built"] is False
        assert "sympy" not in sys.modules and "jinja2" not in sys.modules
        print("ok", k.cache_key)
    """)
    env = {**os.environ, "ADAMGEN_REQUIRE_CACHE_HIT": "1", "ADAMGEN_CACHE_DIR": str(hermetic)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", kernel("float32", "scalar-lr").cache_key]


def test_build_and_fetch_are_logged_and_recorded(caplog: pytest.LogCaptureFixture):
    kernel("float64", "array-lr")
    c_kernels.clear_memo()
    before = len(c_kernels.EVENTS)
    with caplog.at_level(logging.DEBUG, logger="adamgen.c_kernels"):
        fetched = c_kernel(KernelConfig(spec=IVY, dtype="float64"))
    assert fetched is not None and not fetched.built
    assert "fetched from cache" in caplog.text
    event = c_kernels.EVENTS[before]
    assert event["built"] is False and event["path"] == str(fetched.cache_path)
    assert isinstance(event["seconds"], float)


def test_a_kernel_that_fails_to_load_is_rebuilt_once(monkeypatch: pytest.MonkeyPatch):
    kernel("float64", "scalar-state")
    c_kernels.clear_memo()
    real_load, calls = build.load_extension, []

    def flaky(path: Path, name: str) -> Any:
        calls.append(path)
        if len(calls) == 1:
            raise CacheError(f"cannot load extension {name} from {path}: simulated")
        return real_load(path, name)

    monkeypatch.setattr(build, "load_extension", flaky)
    rebuilt = c_kernel(KernelConfig(spec=IVY, dtype="float64", scalar_tensors=KINDS["scalar-state"]))
    assert rebuilt is not None and rebuilt.built and len(calls) == 2


def test_thread_count_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "5")
        c_kernels.default_threads.cache_clear()
        assert c_kernels.default_threads() == 5
        monkeypatch.setenv("ADAMGEN_NUM_THREADS", "3")
        c_kernels.default_threads.cache_clear()
        assert c_kernels.default_threads() == 3 and c_kernels.resolve_threads(None) == 3
        assert c_kernels.resolve_threads(2) == 2 and c_kernels.resolve_threads(0) == 1
        monkeypatch.delenv("ADAMGEN_NUM_THREADS")
        monkeypatch.delenv("OMP_NUM_THREADS")
        c_kernels.default_threads.cache_clear()
        assert c_kernels.default_threads() == len(os.sched_getaffinity(0))
    finally:
        c_kernels.default_threads.cache_clear()


def test_forked_child_runs_threaded_kernels_serially(hermetic: Path):
    """libgomp may hang in a child forked after the parent ran a parallel region."""
    k = kernel("float32", "scalar-lr")
    if not k.openmp:
        pytest.skip("no OpenMP")
    script = textwrap.dedent("""
        import os, numpy as np
        from adamgen.config import KernelConfig
        from adamgen.interface import SpecRef
        IVY = SpecRef('ivy_adam')
        from adamgen.runtime.c_kernels import c_kernel
        k = c_kernel(KernelConfig(spec=IVY, dtype="float32", scalar_tensors=frozenset({"lr"})))
        f = k.function("ivy_adam_inplace_all_omp")
        arrays = [np.ones(100_000, np.float32) for _ in range(4)]
        f(arrays[0], arrays[1], 0.001, arrays[2], arrays[3], (0.9,) * 6, threads=2, threshold=0)
        pid = os.fork()
        if pid == 0:
            f(arrays[0], arrays[1], 0.001, arrays[2], arrays[3], (0.9,) * 6, threads=2,
              threshold=0)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """)
    env = {**os.environ, "ADAMGEN_CACHE_DIR": str(hermetic)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.split() == ["child", "0"], proc.stderr


def test_portable_and_openmp_less_builds(monkeypatch: pytest.MonkeyPatch):
    """``portable=True`` drops -march=native; without OpenMP the threaded entry points are
    absent (not broken) and every call runs serially. Both give the same bits."""
    config = KernelConfig(spec=IVY, dtype="float64", scalar_tensors=frozenset({"lr"}))
    a = make_inputs("float64", 4097, "scalar-lr", seed=9)
    expected, scalars = numpy_backend("float64", a, 10**4)
    portable = c_kernel(config, portable=True)
    assert portable is not None and "-march=native" not in portable.flags
    assert "portable" in portable.variant and portable is not kernel("float64", "scalar-lr")
    info = build.probe_compiler()
    monkeypatch.setattr(build, "probe_compiler", lambda: replace(info, openmp=False))
    c_kernels.clear_memo()
    serial_only = c_kernel(config)
    assert serial_only is not None and not serial_only.openmp
    assert "-fopenmp" not in serial_only.flags and "#pragma omp" not in serial_only.source
    assert not any(f.threaded for f in serial_only.functions.values())
    assert serial_only.forms == FORMS + ("multi_inplace",)
    for k in (portable, serial_only):
        for form in FORMS:
            got = run_form(form, functools.partial(k.call, form, threads=2), {}, a, scalars,
                           KINDS["scalar-lr"])
            for g, e, name in zip(got, expected, ("w_new", "mw", "vw")):
                assert_bitwise_equal(g, e, f"{k.variant} {form} {name}")
    c_kernels.clear_memo()


# -- no compiler, a failed build -----------------------------------------------------------------
@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No memoised kernels, compiler probe or warning flag; restored afterwards."""
    c_kernels.clear_memo()
    build.probe_compiler.cache_clear()
    build.cpu_features.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    c_kernels.clear_memo()
    build.probe_compiler.cache_clear()
    build.cpu_features.cache_clear()
    kernel.cache_clear()


def test_missing_compiler_falls_back_with_exactly_one_warning(fresh: pytest.MonkeyPatch):
    fresh.setenv("CC", "/nonexistent")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert c_kernel(KernelConfig(spec=IVY, dtype="float32")) is None
        assert c_kernel(KernelConfig(spec=IVY, dtype="float64")) is None
        assert c_kernel(KernelConfig(spec=IVY, dtype="float32")) is None
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert "/nonexistent" in str(runtime[0].message) and "NumPy" in str(runtime[0].message)
    assert c_kernels.EVENTS[-1]["built"] is False and "error" in c_kernels.EVENTS[-1]


def test_missing_compiler_is_an_error_when_strict(fresh: pytest.MonkeyPatch):
    fresh.setenv("CC", "/nonexistent")
    fresh.setenv("ADAMGEN_STRICT", "1")
    with pytest.raises(CompileError, match="/nonexistent"):
        c_kernel(KernelConfig(spec=IVY, dtype="float32"))


FAILING_CC = """#!/bin/sh
# Passes the probe, fails on adamgen's kernels: a stand-in for a broken toolchain.
for arg in "$@"; do
    case "$arg" in
        *_adamgen_*.c) echo "$arg:3:1: error: injected failure for the test" >&2
                       echo "compilation terminated." >&2; exit 1 ;;
    esac
done
exec {cc} "$@"
"""


def failing_compiler(tmp_path: Path) -> Path:
    script = tmp_path / "failing-cc"
    script.write_text(FAILING_CC.format(cc=build.probe_compiler().argv[0]))
    script.chmod(0o755)
    build.probe_compiler.cache_clear()  # probe again once $CC points at the script
    return script


def test_failed_build_warns_once_with_the_first_error_line(fresh, tmp_path: Path):
    fresh.setenv("CC", str(failing_compiler(tmp_path)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert c_kernel(KernelConfig(spec=IVY, dtype="float64", mode="fast")) is None
        assert c_kernel(KernelConfig(spec=IVY, dtype="float32", mode="fast")) is None
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1 and "error: injected failure for the test" in runtime[0], runtime


def test_failed_builds_keep_only_the_last_sources_inside_the_cache(fresh, tmp_path: Path,
                                                                   hermetic: Path):
    """Each failed build used to leave ~108 KB in ``/tmp/adamgen-failed-build-*`` forever."""
    fresh.setenv("CC", str(failing_compiler(tmp_path)))
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    fresh.setattr(tempfile, "tempdir", str(system_tmp))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype, mode in [("float64", "fast"), ("float32", "fast"), ("float32", "exact")]:
            assert c_kernel(KernelConfig(spec=IVY, dtype=dtype, mode=mode)) is None
    kept = list((hermetic / "tmp").glob("failed-build-*"))
    assert len(kept) == 1, kept  # the last one; the stale-tmp sweep removes it after an hour
    assert [p.name for p in kept[0].iterdir()] and all(p.suffix == ".c" for p in kept[0].iterdir())
    assert "float32" in c_kernels.EVENTS[-1]["kernel"]
    assert list(system_tmp.iterdir()) == []  # nothing left in the system's temporary directory


def test_failed_build_raises_compile_error_when_strict(fresh, tmp_path: Path):
    fresh.setenv("CC", str(failing_compiler(tmp_path)))
    fresh.setenv("ADAMGEN_STRICT", "1")
    with pytest.raises(CompileError) as info:
        c_kernel(KernelConfig(spec=IVY, dtype="float64", mode="fast"))
    error = info.value
    assert "error: injected failure" in str(error).splitlines()[0]
    assert error.argv and error.argv[0].endswith("failing-cc") and "-ffp-contract=fast" in error.argv
    assert "injected failure" in error.stderr
    assert error.c_path is not None and error.c_path.is_file()
    assert "ivy_adam_inplace_all" in error.c_path.read_text()
    shutil.rmtree(error.c_path.parent)


# -- sanitizers and vectorisation ----------------------------------------------------------------
def sanitizer_runtime() -> str | None:
    info = build.probe_compiler()
    if info.family != "gcc":
        return None
    found = []
    for name in ("libasan.so", "libubsan.so"):
        proc = subprocess.run([*info.argv, f"-print-file-name={name}"], capture_output=True,
                              text=True, check=False)
        path = proc.stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            return None
        found.append(path)
    return found[0]


ASAN_SCRIPT = """
import json, sys, numpy as np
from adamgen.codegen import build
from adamgen.config import KernelConfig
from adamgen.interface import SpecRef
IVY = SpecRef('ivy_adam')
from adamgen.runtime.c_kernels import KernelFunction
from adamgen.runtime.numpy_kernels import numpy_kernel
from adamgen.interface import SpecRef

IVY = SpecRef("ivy_adam")

so, name, dtype, descriptions = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
module = build.load_extension(so, name)
ctype = "float" if dtype == "float32" else "double"
functions = {d["symbol"]: KernelFunction(module.ffi, module.lib, ctype, d, 0)
             for d in descriptions}
numpy_module = numpy_kernel(KernelConfig(spec=IVY, dtype=dtype, scalar_tensors=frozenset({"lr"})))
scalars = numpy_module.prelude(0.9, 0.999, 1e-7, 1270.0)
rng = np.random.default_rng(0)
for n in (0, 1, 15, 16, 17, 63, 64, 65, 255, 256, 257, 300, 4097):
    w, g, m, v = (rng.standard_normal(n).astype(dtype) for _ in range(4))
    expected = [np.empty(n, dtype) for _ in range(3)]
    with np.errstate(all="ignore"):
        numpy_module.update(w, g, 0.001, m, v, scalars, *expected)
    for symbol, f in functions.items():
        options = {"threads": 2} if f.threaded else {}
        if f.form == "functional":  # outputs sharing an alignment take the streaming path
            raw = np.empty(3 * 4 * (n + 16) + 64, np.uint8)
            base = (-raw.ctypes.data) % 64 + 4
            shared = [raw[base + k * 4 * (n + 16):][:4 * n].view(dtype) for k in range(3)]
            for got in ([np.empty(n, dtype) for _ in range(3)], shared):
                f(w, g, 0.001, m, v, scalars, *got, **options)
                for a, b in zip(got, expected):
                    assert a.tobytes() == b.tobytes(), (symbol, n)
            continue
        elif f.form == "inplace_parameter":
            got = [w.copy(), np.empty(n, dtype), np.empty(n, dtype)]
            f(got[0], g, 0.001, m, v, scalars, got[1], got[2], **options)
        elif f.form == "inplace_all":
            got = [w.copy(), m.copy(), v.copy()]
            f(got[0], g, 0.001, got[1], got[2], scalars, **options)
        else:
            got = [[w.copy(), w[:0].copy()], [m.copy(), m[:0].copy()], [v.copy(), v[:0].copy()]]
            f(got[0], [g, g[:0]], 0.001, got[1], got[2], scalars, **options)
            got = [x[0] for x in got]
        for a, b in zip(got, expected):
            assert a.tobytes() == b.tobytes(), (symbol, n)
print("clean")
"""


def test_kernels_are_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path, hermetic):
    libasan = sanitizer_runtime()
    if libasan is None:
        pytest.skip("the AddressSanitizer/UBSan runtimes are not installed")
    import json

    from adamgen.codegen.driver import c_source

    info = build.probe_compiler()
    numpy_kernel(KernelConfig(spec=IVY, dtype="float32", scalar_tensors=frozenset({"lr"})))
    flags = build.compile_flags("exact", openmp=info.openmp, portable=False) + [
        "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
        "-g", "-DADAMGEN_STREAM_MIN_BYTES=0"]  # stream at every size: its head, blocks, tail
    rendered = c_source(KernelConfig(spec=IVY, scalar_tensors=frozenset({"lr"})), openmp=info.openmp,
                        flags=tuple(flags))
    name = "_adamgen_sanitized_f32"
    so = build.compile_extension(name, rendered.source, rendered.cdef, tmp_path, flags)
    descriptions = json.dumps([f.describe() for f in rendered.functions])
    env = {**os.environ, "LD_PRELOAD": libasan, "ASAN_OPTIONS": "detect_leaks=0",
           "UBSAN_OPTIONS": "print_stacktrace=1", "ADAMGEN_CACHE_DIR": str(hermetic)}
    proc = subprocess.run([sys.executable, "-c", ASAN_SCRIPT, str(so), name, "float32",
                           descriptions], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300, check=False)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stderr[-4000:]
    assert "runtime error" not in proc.stderr and "AddressSanitizer" not in proc.stderr


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_built_chunk_loops_use_vector_sqrt_and_div(dtype):
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump is not installed")
    k = kernel(dtype, "array-lr")
    so = k.cache_path / f"{build.extension_module_name(k.cache_key)}{build.extension_suffix()}"
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(so)], capture_output=True,
                          text=True, check=True).stdout
    suffix = "ps" if dtype == "float32" else "pd"
    for form in FORMS:
        body = text.split(f"<ivy_adam_{form}_chunk>:", 1)[1].split("\n\n", 1)[0]
        for op in ("vsqrt", "vdiv"):
            assert any(f"{op}{suffix}" in line and ("%zmm" in line or "%ymm" in line)
                       for line in body.splitlines()), (form, op)
