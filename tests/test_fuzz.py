"""Differential fuzzing (issue 8, item 1): every forced kernel variant against the reference.

What is fuzzed, and against what:

* ``adam_update`` under ``ADAMGEN_VARIANT`` = ``numpy``, ``c`` and ``c-omp`` (each example runs
  under all three) against :func:`reference.adam_update_ref`, bit for bit with the suite's NaN
  rule (:func:`conftest.assert_bitwise_equal`): dtypes float16/32/64, shapes of 0 to 3 dimensions
  (and sizes beyond the threading threshold, so ``c-omp`` really runs threaded, and up to
  90,001 elements, whose outputs come from recycled memory blocks), broadcasting,
  layouts (C, Fortran, negative strides, strided, slices of a larger buffer at odd element
  offsets, byte-misaligned, zero strides from ``np.broadcast_to``), inputs sharing one buffer,
  values (subnormals, the largest finite, NaN of any payload, infinities, signed zeros, negative
  state), ``lr`` in every accepted form (Python float/int, 0-d arrays, arrays, a float64 0-d
  ``lr`` with float32 arrays), ``step`` 0, 1 and 2**24+1 among others, hyperparameters at their
  bounds (beta 0 and the largest double below 1, epsilon 0), and ``out`` (None, ``out=w``, a
  separate array of any float dtype and layout). Inputs other than ``out``'s memory are checked
  unwritten, byte for byte (NaN payloads included).
* ``adamgen.Adam`` under the three variants against chained reference updates.
* ``adam_update_vjp``: the NumPy and C backends (``ivy.bind_adam_update_vjp("numpy")`` / ``ivy.bind_adam_update_vjp("c")``) on the same
  inputs, their reduced results bit for bit (NaN rule), float32 and float64, with broadcasting,
  layouts, Python-number and array cotangents.

Budget: the suite runs a fixed, derandomised number of examples per test (the whole file takes
well under a minute with a cold kernel cache). ``ADAMGEN_FUZZ_EXAMPLES=<n>`` runs ``n`` random
examples per test instead, over a wider space (every argument may then be a size-1 array, which
builds more kernel variants)::

    ADAMGEN_FUZZ_EXAMPLES=5000 ADAMGEN_CACHE_DIR=$(mktemp -d) python -m pytest -q tests/test_fuzz.py

Failures found by the fuzzer are kept below as explicit regression tests ("Regressions").
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import assert_bitwise_equal
from differential import forced
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reference import adam_update_ref

import adamgen
from adamgen.config import refresh_environment
from adamgen.runtime import ivy

EXAMPLES = int(os.environ.get("ADAMGEN_FUZZ_EXAMPLES", "0") or 0)
LONG = EXAMPLES > 0
VARIANTS = ("numpy", "c", "c-omp")
DTYPES = (np.float16, np.float32, np.float64)
NAMES = ("w", "dcdw", "lr", "mw_tm1", "vw_tm1")
ARRAYS = ("w", "dcdw", "mw_tm1", "vw_tm1")
#: Arguments that may be size-1 arrays (or Python numbers) against a larger shape. Each set of
#: such "scalar tensors" is its own compiled C kernel; the bounded run keeps the set small so a
#: cold cache compiles a handful of kernels, the long run allows every argument.
SIZE1_ARGUMENTS = set(NAMES) if LONG else {"lr", "mw_tm1", "vw_tm1"}
LAYOUTS = ("c", "f", "negative", "strided", "offset", "unaligned", "broadcast")
#: Shapes at or beyond ``dispatch.THREADING_THRESHOLD`` (4096): ``c-omp`` is a candidate there,
#: and ``threading("c-omp")`` passes threshold 0, so the OpenMP region really runs. 90,001
#: float32/float64 elements make outputs of at least 1 MiB, which come from recycled blocks
#: (``adamgen.runtime.outputs``).
THREADED_SHAPES = ((4099,), (2, 2053), (5000,), (65, 64), (3, 1, 1367), (90_001,))
ONE_BELOW_ONE = math.nextafter(1.0, 0.0)


def c_kernels_available(openmp: bool = False) -> bool:
    """Whether this machine builds the update's C kernels (and threaded ones)."""
    kernel = ivy.ivy_source().c_kernel("float32", frozenset({"lr"}))
    return kernel is not None and (kernel.openmp or not openmp)


needs_c = pytest.mark.skipif("not c_kernels_available()", reason="no C compiler: the C "
                             "variants fall back to NumPy")


def fuzz_settings(examples: int):
    """A bounded, reproducible run in the suite; ``ADAMGEN_FUZZ_EXAMPLES`` examples otherwise."""
    common = {"deadline": None, "suppress_health_check": list(HealthCheck), "print_blob": True}
    if LONG:
        return settings(max_examples=EXAMPLES, **common)
    return settings(max_examples=examples, derandomize=True, database=None, **common)


@contextmanager
def forced_variant(variant: str | None):
    """``ADAMGEN_VARIANT=variant`` for the duration (monkeypatched, then the env is re-read)."""
    patch = pytest.MonkeyPatch()
    try:
        if variant is None:
            patch.delenv("ADAMGEN_VARIANT", raising=False)
        else:
            patch.setenv("ADAMGEN_VARIANT", variant)
        refresh_environment()
        yield
    finally:
        patch.undo()
        refresh_environment()


def report(name: str, tally: Counter, examples: int) -> None:
    print(f"\n[fuzz] {name}: {examples} examples; kernel runs by variant: {dict(tally)}",
          file=sys.stderr)


# -- values -----------------------------------------------------------------------------------

def specials(dtype) -> list[float]:
    info = np.finfo(dtype)
    tiny_sub = float(info.smallest_subnormal)
    return [0.0, -0.0, 1.0, -1.0, 0.5, 3.0, -2.5, 1e-3, tiny_sub, -tiny_sub, 3 * tiny_sub,
            float(info.smallest_normal), float(info.eps), float(info.max), -float(info.max),
            math.nan, -math.nan, math.inf, -math.inf]


def elements(dtype):
    return st.one_of(st.sampled_from(specials(dtype)),
                     st.floats(width=np.finfo(dtype).bits, allow_subnormal=True))


@st.composite
def values_of(draw, dtype, shape):
    """Values for one argument: drawn element by element when small; for the threaded sizes a
    seeded random array over many decades with specials sprinkled in."""
    size = math.prod(shape)
    if size <= 64:
        return draw(hnp.arrays(dtype, shape, elements=elements(dtype)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    with np.errstate(all="ignore"):
        x = (rng.standard_normal(size) * np.exp(rng.uniform(-20, 20, size))).astype(dtype)
    pool = np.array(specials(dtype), dtype)
    where = rng.integers(0, size, draw(st.integers(0, 64)))
    x[where] = rng.choice(pool, where.size)
    return x.reshape(shape)


# -- layouts ----------------------------------------------------------------------------------

@st.composite
def layouts(draw, values: np.ndarray, allowed: tuple[str, ...] = LAYOUTS):
    """(layout, its parameter): drawn up front so a case can be rebuilt in fresh memory."""
    layout = draw(st.sampled_from(allowed))
    if values.ndim == 0 and layout in ("f", "negative", "strided", "broadcast"):
        return "c", None
    if layout == "offset":
        return layout, draw(st.sampled_from([1, 3, 5]))
    if layout == "unaligned":
        return layout, draw(st.integers(1, values.dtype.itemsize - 1))
    if layout == "broadcast":
        axes = [a for a, n in enumerate(values.shape) if n > 1] or list(range(values.ndim))
        return layout, tuple(draw(st.lists(st.sampled_from(axes), min_size=1,
                                           max_size=len(axes), unique=True)))
    return layout, None


def with_layout(values: np.ndarray, layout: str, param: Any) -> np.ndarray:
    """New memory holding ``values`` (``broadcast``: one slice of it, repeated) in ``layout``."""
    shape, dtype = values.shape, values.dtype
    if layout == "c":
        return values.copy()
    if layout == "f":
        return np.asfortranarray(values)
    if layout == "negative":  # negative strides on every axis
        return np.flip(np.flip(values).copy())
    if layout == "strided":  # every other element of a larger buffer along the last axis
        big = np.zeros(shape[:-1] + (2 * shape[-1] + 1,), dtype)
        view = big[..., 1::2]
        view[...] = values
        return view
    if layout == "offset":  # C-contiguous, starting at an odd element of a larger buffer
        buffer = np.zeros(values.size + param + 3, dtype)
        view = buffer[param:param + values.size].reshape(shape)
        view[...] = values
        return view
    if layout == "unaligned":  # C-contiguous, not aligned to the element size
        raw = np.zeros(values.nbytes + dtype.itemsize + 64, np.uint8)
        view = raw[param:param + values.nbytes].view(dtype).reshape(shape)
        view[...] = values
        return view
    if layout == "broadcast":  # zero strides (read-only)
        index = tuple(slice(0, 1) if a in param else slice(None) for a in range(values.ndim))
        return np.broadcast_to(values[index].copy(), shape)
    raise AssertionError(layout)


def bits(a: np.ndarray) -> bytes:
    """The raw bytes in logical order (NaN payloads included): proves an input was unwritten."""
    return np.ascontiguousarray(a).tobytes()


@dataclass
class Arg:
    """One argument: a Python value, or logical values plus a memory layout."""

    values: Any
    layout: str = "c"
    param: Any = None

    def build(self) -> Any:
        if isinstance(self.values, np.ndarray):
            return with_layout(self.values, self.layout, self.param)
        return copy.deepcopy(self.values)


@dataclass
class Shared:
    """Several arguments as C-contiguous views of one buffer, at element offsets."""

    buffer: np.ndarray
    shape: tuple[int, ...]
    offsets: dict[str, int]

    def build(self) -> dict[str, np.ndarray]:
        buffer, n = self.buffer.copy(), math.prod(self.shape)
        return {name: buffer[k:k + n].reshape(self.shape) for name, k in self.offsets.items()}


@dataclass
class UpdateCase:
    args: dict[str, Arg]
    shared: Shared | None
    out: str | Arg | None  # None, "w", or a separate array
    step: Any
    hyper: dict[str, float]

    def build(self) -> tuple[dict[str, Any], Any]:
        """Fresh arguments (and ``out``) in new memory: every variant gets its own."""
        args = {name: arg.build() for name, arg in self.args.items()}
        if self.shared is not None:
            args.update(self.shared.build())
        out = args["w"] if self.out == "w" else self.out.build() if self.out else None
        return args, out


# -- adam_update cases ------------------------------------------------------------------------

@st.composite
def argument_shape(draw, name: str, full: tuple[int, ...]) -> tuple[int, ...]:
    # mostly full: C takes only full-shape and size-1 arguments (partial broadcasts run on
    # NumPy), and at the threaded sizes the point is to reach the threaded C kernels
    weight = 5 if math.prod(full) <= 64 else 40
    kind = draw(st.sampled_from(["full"] * weight + ["suffix", "ones", "size1"]))
    if kind == "suffix":
        shape = full[draw(st.integers(0, len(full))):]
    elif kind == "ones":
        shape = tuple(1 if draw(st.booleans()) else n for n in full)
    elif kind == "size1":
        shape = draw(st.sampled_from([(), (1,), (1,) * len(full)]))
    else:
        shape = full
    if math.prod(shape) == 1 and math.prod(full) != 1 and name not in SIZE1_ARGUMENTS:
        return full
    return shape


STEPS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 10, 1000, 2**24 + 1, 2**31, 2**53 + 1]),
    st.integers(0, 2**40),
    st.floats(0, 1e7, allow_nan=False, allow_infinity=False),
    st.sampled_from([np.int64(7), np.float32(2.5), np.array(5), np.array(0.5)]),
)
BETAS = st.one_of(st.sampled_from([0.0, 0.9, 0.999, 0.5, ONE_BELOW_ONE, 1e-300]),
                  st.floats(0, 1, exclude_max=True))
EPSILONS = st.one_of(st.sampled_from([0.0, 1e-7, 1e-8, 5e-324, 1.0, 1e30]),
                     st.floats(0, 1e3, allow_nan=False))


@st.composite
def array_arg(draw, dtype, shape, allowed: tuple[str, ...] = LAYOUTS) -> Arg:
    values = draw(values_of(dtype, shape))
    layout, param = draw(layouts(values, allowed))
    return Arg(values, layout, param)


@st.composite
def learning_rate(draw, dtype, full) -> Arg:
    kind = draw(st.sampled_from(["py_float"] * 4 + ["py_int", "0d", "0d_f64", "np_scalar",
                                                      "array", "list"]))
    if kind == "py_float":
        return Arg(draw(st.one_of(
            st.sampled_from([0.0, -0.0, 1e-3, 0.1, 1.0, 1e300, -1.0, math.nan, math.inf,
                             5e-324]),
            st.floats(allow_subnormal=True))))
    if kind == "py_int":
        return Arg(draw(st.one_of(st.sampled_from([0, 1, 3, -2]), st.integers(-2**62, 2**62))))
    if kind == "0d":
        return Arg(np.array(draw(elements(dtype)), dtype))
    if kind == "0d_f64":
        return Arg(np.array(draw(elements(np.float64)), np.float64))
    if kind == "np_scalar":
        return Arg(np.dtype(dtype).type(draw(elements(dtype))))
    if kind == "list":
        return Arg([draw(st.floats(-1, 1))])
    return draw(array_arg(dtype, draw(argument_shape("lr", full))))


@st.composite
def update_cases(draw, partial_overlap_with_out: bool = False) -> UpdateCase:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    if draw(st.integers(0, 3)) == 0:  # often enough that c-omp meets a few dozen cases
        full = draw(st.sampled_from(THREADED_SHAPES))
    else:
        full = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    args: dict[str, Arg] = {}
    for name in ARRAYS:
        if name in SIZE1_ARGUMENTS and draw(st.integers(0, 15)) == 0:
            args[name] = Arg(draw(elements(np.float32)))  # a Python float: float32 (Ivy's rule)
        else:
            args[name] = draw(array_arg(dtype, draw(argument_shape(name, full))))
    args["lr"] = draw(learning_rate(dtype, full))
    out_kind = draw(st.sampled_from(["none"] * 3 + ["w", "w", "fresh"]))

    # Inputs sharing one buffer. Equal offsets make the same array (exact aliasing, allowed
    # everywhere); different offsets overlap partially, which is allowed while nothing writes
    # into the buffer. out=w with a partially overlapping input is the xfailed test below.
    shared = None
    n = math.prod(full)
    if n > 0 and (partial_overlap_with_out or draw(st.integers(0, 3)) == 0):
        sharing = draw(st.lists(st.sampled_from(ARRAYS), min_size=2, max_size=4, unique=True))
        offsets = {name: draw(st.integers(0, 3)) for name in sharing}
        if partial_overlap_with_out:
            out_kind = "w"
            # the other input starts before w: a forward loop then reads what it wrote
            other = draw(st.sampled_from(["dcdw", "mw_tm1", "vw_tm1"]))
            offsets = {"w": 3, other: draw(st.integers(0, 2))} | \
                {k: v for k, v in offsets.items() if k not in ("w", other)}
        elif out_kind == "w" and "w" in offsets:
            offsets = {name: offsets["w"] for name in offsets}
        shared = Shared(draw(values_of(dtype, (n + 3,))), full, offsets)
        for name in offsets:
            args.pop(name)
    elif partial_overlap_with_out:
        assume(False)

    def shape_of(name: str) -> tuple[int, ...]:
        if shared is not None and name in shared.offsets:
            return full
        return np.shape(args[name].values)

    full_shape = np.broadcast_shapes(*(shape_of(name) for name in NAMES))
    w_arg = args.get("w")
    w_writable = w_arg is None or (isinstance(w_arg.values, np.ndarray)
                                   and w_arg.layout != "broadcast")
    out: str | Arg | None = None
    if out_kind == "w" and w_writable and shape_of("w") == full_shape:
        out = "w"
    elif out_kind == "fresh":
        out_dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        out = draw(array_arg(out_dtype, full_shape, ("c", "f", "negative", "strided", "offset",
                                                     "unaligned")))
        out.values = np.zeros(full_shape, out_dtype)
    if partial_overlap_with_out:
        assume(out == "w")
    hyper = {"beta1": draw(BETAS), "beta2": draw(BETAS), "epsilon": draw(EPSILONS)}
    event(f"{dtype}, {'threaded size' if n > 64 else 'small'}, out={out_kind}, "
          f"shared={shared is not None}")
    return UpdateCase(args, shared, out, draw(STEPS), hyper)


def lr_is_valid(lr: Any) -> bool:
    """adamgen's lr rule, on the value as given (a list as NumPy reads it)."""
    try:
        values = np.asarray(lr, dtype=np.float64)
    except OverflowError:  # a Python int beyond float range
        return False
    return bool(np.all(np.isfinite(values)) and np.all(values >= 0))


def check_update_case(case: UpdateCase, variant: str) -> None:
    """One call under ``variant`` against the reference; inputs checked unwritten."""
    args, out = case.build()
    copies = {name: copy.deepcopy(value) for name, value in args.items()}
    before = {name: bits(value) for name, value in args.items()
              if isinstance(value, np.ndarray)}
    call = [args[name] for name in NAMES]
    try:
        if not lr_is_valid(copies["lr"]):  # adamgen's rule (Ivy has none): finite and >= 0
            raise ValueError("lr")
        expected = adam_update_ref(*(copies[name] for name in NAMES), case.step, **case.hyper)
    except (ZeroDivisionError, ValueError) as error:
        out_before = None if out is None else bits(out)
        with forced_variant(variant), pytest.raises(type(error)):
            adamgen.adam_update(*call, case.step, **case.hyper, out=out)
        assert all(bits(args[name]) == saved for name, saved in before.items())
        assert out is None or bits(out) == out_before, "out was written before the error"
        return
    with forced_variant(variant):
        result = adamgen.adam_update(*call, case.step, **case.hyper, out=out)
    for name, got, want in zip(("w_new", "mw", "vw"), result, expected):
        if name == "w_new" and out is not None:
            assert got is out, "w_new must be out itself"
            with np.errstate(all="ignore"):
                want = want.astype(out.dtype)
        assert_bitwise_equal(got, want, f"{name} [{variant}]")
    for name, saved in before.items():
        if out is not None and np.shares_memory(args[name], out):
            continue  # out=w (or an input sharing w's memory): written on purpose
        assert bits(args[name]) == saved, f"{name} was modified [{variant}]"


def test_fuzz_adam_update_every_variant_against_the_reference():
    examples = 0
    with forced(None) as tally:  # counts the variants the loader actually picked
        @fuzz_settings(400)
        @given(case=update_cases())
        def check(case: UpdateCase) -> None:
            nonlocal examples
            examples += 1
            for variant in VARIANTS:
                check_update_case(case, variant)

        check()
    report("adam_update under numpy, c, c-omp", tally, examples)
    if not LONG and c_kernels_available(openmp=True):  # it must reach C and threaded C
        # c-omp only where every array is threaded-size and contiguous: a handful is proof
        # enough (the examples depend on Hypothesis's version; CI once drew 6 of them)
        assert tally["c"] >= 50 and tally["c-omp"] >= 5 and tally["numpy"] >= 50, tally


# -- adamgen.Adam -----------------------------------------------------------------------------

@dataclass
class AdamCase:
    params: list[np.ndarray]
    grads: list[list[np.ndarray]]  # per step, per parameter
    external: list[bool]  # per step: step(grads) (True) or through opt.grads (False)
    lr: float
    hyper: dict[str, float]


@st.composite
def adam_cases(draw) -> AdamCase:
    count = draw(st.integers(1, 4))
    shapes, dtypes = [], []
    for _ in range(count):
        dtypes.append(np.dtype(draw(st.sampled_from([np.float32, np.float64]))))
        shapes.append(draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
    if draw(st.integers(0, 3)) == 0:  # one large tensor: the group is past the threading bar
        shapes[draw(st.integers(0, count - 1))] = draw(st.sampled_from(THREADED_SHAPES))
    params = [draw(values_of(d, s)) for d, s in zip(dtypes, shapes)]
    steps = draw(st.integers(1, 3))
    grads = [[draw(values_of(d, s)) for d, s in zip(dtypes, shapes)] for _ in range(steps)]
    external = [draw(st.booleans()) for _ in range(steps)]
    # Adam's lr rule: finite and >= 0 (a negative or NaN lr is refused at construction)
    lr = draw(st.one_of(st.sampled_from([0.0, 1e-3, 0.1, 1e300]),
                        st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)))
    hyper = {"beta1": draw(BETAS), "beta2": draw(BETAS), "epsilon": draw(EPSILONS)}
    event(f"{count} parameters, {'threaded size' if max(map(math.prod, shapes)) > 64 else 'small'}")
    return AdamCase(params, grads, external, lr, hyper)


def check_adam_case(case: AdamCase, variant: str) -> None:
    params = [p.copy() for p in case.params]
    expected = [p.copy() for p in case.params]
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    with forced_variant(variant):
        opt = adamgen.Adam(params, lr=case.lr, **case.hyper)
        for t, (grads, external) in enumerate(zip(case.grads, case.external), start=1):
            if external:
                given_grads = [g.copy() for g in grads]
                opt.step(given_grads)
                for g, saved in zip(given_grads, grads):
                    assert bits(g) == bits(saved), "a gradient passed to step() was modified"
            else:
                for view, g in zip(opt.grads, grads):
                    view[...] = g
                opt.step()
            for i, g in enumerate(grads):
                expected[i], ms[i], vs[i] = adam_update_ref(expected[i], g, case.lr, ms[i],
                                                            vs[i], t, **case.hyper)
    for i, (p, e) in enumerate(zip(params, expected)):
        assert_bitwise_equal(p, e, f"parameter {i} [{variant}]")
    state = opt.state_dict()
    for i in range(len(params)):
        assert_bitwise_equal(state["m"][i], ms[i], f"m {i} [{variant}]")
        assert_bitwise_equal(state["v"][i], vs[i], f"v {i} [{variant}]")


def test_fuzz_adam_optimizer_every_variant_against_chained_reference_updates():
    examples = 0
    with forced(None) as tally:  # counts the variants the loader actually picked
        @fuzz_settings(300)
        @given(case=adam_cases())
        def check(case: AdamCase) -> None:
            nonlocal examples
            examples += 1
            for variant in VARIANTS:
                check_adam_case(case, variant)

        check()
    report("Adam.step under numpy, c, c-omp", tally, examples)
    if not LONG and c_kernels_available(openmp=True):
        assert tally["c"] >= 40 and tally["c-omp"] >= 5, tally


# -- adam_update_vjp: NumPy and C backends --------------------------------------------------

VJP_THREADED_SHAPES = ((16_385,), (130, 130))  # c_kernels.DEFAULT_THRESHOLD is 16384


def c_vjp_available() -> bool:
    return ivy.ivy_source().derived("vjp").c_kernel("float64", frozenset()) is not None


@dataclass
class VJPCase:
    args: dict[str, Arg]
    cotangents: list[Arg]
    step: Any
    hyper: dict[str, float]


@st.composite
def vjp_cases(draw, number_cotangents: bool = False) -> VJPCase:
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    if draw(st.integers(0, 9)) == 0:
        full = draw(st.sampled_from(VJP_THREADED_SHAPES))
    else:
        full = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    args: dict[str, Arg] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ARRAYS:
        shape = draw(argument_shape("lr", full))  # the VJP broadcasts everything itself
        args[name] = draw(array_arg(dtype, shape))
        shapes[name] = shape
    if draw(st.booleans()):
        args["lr"] = Arg(draw(st.one_of(st.sampled_from([0.0, 0.1, -1.0, math.nan, 1e300]),
                                        st.floats())))
        shapes["lr"] = ()
    else:
        shapes["lr"] = draw(argument_shape("lr", full))
        args["lr"] = draw(array_arg(dtype, shapes["lr"]))
    outputs = {"w_new": np.broadcast_shapes(*shapes.values()),
               "mw": np.broadcast_shapes(shapes["dcdw"], shapes["mw_tm1"]),
               "vw": np.broadcast_shapes(shapes["dcdw"], shapes["vw_tm1"])}
    # Python-number cotangents (scalar tensors of the C kernel) have their own fuzz test below
    # (they once disagreed between the backends); this one uses array cotangents.
    cotangents = []
    for name, shape in outputs.items():
        if number_cotangents:
            cotangents.append(Arg(draw(st.one_of(st.sampled_from([1.0, 0.0, -0.5, math.nan]),
                                                 st.floats()))))
        else:
            cot_shape = shape if draw(st.integers(0, 3)) else shape[draw(st.integers(0, len(shape))):]
            cot_dtype = dtype if draw(st.integers(0, 7)) else np.dtype(np.float64)
            cotangents.append(draw(array_arg(cot_dtype, cot_shape)))
    hyper = {"beta1": draw(BETAS), "beta2": draw(BETAS), "epsilon": draw(EPSILONS)}
    return VJPCase(args, cotangents, draw(STEPS), hyper)


def check_vjp_case(case: VJPCase) -> None:
    """``ivy.bind_adam_update_vjp("numpy")`` and ``ivy.bind_adam_update_vjp("c")`` on fresh copies: same bits, inputs unwritten."""
    results = {}
    for backend in ("numpy", "c"):
        args = {name: arg.build() for name, arg in case.args.items()}
        cotangents = tuple(c.build() for c in case.cotangents)
        before = [bits(v) for v in (*args.values(), *cotangents) if isinstance(v, np.ndarray)]
        call = [args[name] for name in NAMES]
        try:
            with np.errstate(all="ignore"):
                results[backend] = ivy.bind_adam_update_vjp(backend)(*call, case.step, cotangents, **case.hyper)
        except (ZeroDivisionError, ValueError) as error:  # ValueError: an lr < 0, NaN or inf
            results[backend] = type(error)
        after = [bits(v) for v in (*args.values(), *cotangents) if isinstance(v, np.ndarray)]
        assert before == after, f"an input was modified [{backend}]"
    if isinstance(results["numpy"], type) or isinstance(results["c"], type):
        assert results["numpy"] == results["c"], results
        return
    for name, a, b in zip(("d_w", "d_dcdw", "d_lr", "d_mw_tm1", "d_vw_tm1"), results["c"],
                          results["numpy"]):
        assert_bitwise_equal(a, b, name)


def test_fuzz_vjp_numpy_and_c_backends_agree_bit_for_bit():
    if not c_vjp_available():
        pytest.skip("no C compiler: the C VJP kernel is unavailable")
    examples = 0

    @fuzz_settings(200)
    @given(case=vjp_cases())
    def check(case: VJPCase) -> None:
        nonlocal examples
        examples += 1
        check_vjp_case(case)

    check()
    print(f"\n[fuzz] adam_update_vjp, numpy vs c: {examples} examples", file=sys.stderr)


def test_fuzz_vjp_backends_agree_with_python_number_cotangents():
    if not c_vjp_available():
        pytest.skip("no C compiler: the C VJP kernel is unavailable")

    @fuzz_settings(40)
    @given(case=vjp_cases(number_cotangents=True))
    def check(case: VJPCase) -> None:
        check_vjp_case(case)

    check()


# -- regressions: failures the fuzzer found, shrunk -------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [8, 5000])
def test_regression_exactly_aliased_inputs_with_out_w(variant, n):
    """``adam_update(w, w, lr, w, w, t, out=w)``: every input is w itself (allowed, and the
    in-place kernels read every input element before writing it)."""
    w = np.linspace(-2, 2, n, dtype=np.float32)
    expected = adam_update_ref(w.copy(), w.copy(), 0.1, w.copy(), np.abs(w), 3)
    v = np.abs(w)
    with forced_variant(variant):
        result = adamgen.adam_update(w, w, 0.1, w, v, 3, out=w)
    assert result[0] is w
    for name, got, want in zip(("w_new", "mw", "vw"), result, expected):
        assert_bitwise_equal(got, want, name)


@needs_c
@pytest.mark.parametrize("variant", ["c", "c-omp"])
@pytest.mark.parametrize("other", ["dcdw", "mw_tm1", "vw_tm1"])
def test_regression_out_w_with_a_partially_overlapping_input(variant, other):
    """Shrunk from the fuzzer: ``w = buf[1:]``, ``dcdw = buf[:-1]``, ``out=w``. The NumPy
    variant is right (ufuncs buffer overlapping operands); C reads elements it already wrote."""
    n = 5000  # at or past the threading bar, so c-omp runs threaded
    buffer = (np.arange(n + 1, dtype=np.float32) - 2500) / 7
    args = {"w": buffer[1:], "dcdw": np.full(n, 0.5, np.float32), "lr": 0.1,
            "mw_tm1": np.full(n, 0.25, np.float32), "vw_tm1": np.full(n, 0.125, np.float32)}
    args[other] = buffer[:-1]
    expected = adam_update_ref(*(copy.deepcopy(args[name]) for name in NAMES), 1)
    with forced_variant(variant):
        result = adamgen.adam_update(*(args[name] for name in NAMES), 1, out=args["w"])
    for name, got, want in zip(("w_new", "mw", "vw"), result, expected):
        assert_bitwise_equal(got, want, name)


@needs_c
def test_fuzz_out_w_with_partially_overlapping_inputs():
    """The fuzzer's own form of the bug above; turns into a plain fuzz test once it is fixed."""
    @fuzz_settings(60)
    @given(case=update_cases(partial_overlap_with_out=True))
    def check(case: UpdateCase) -> None:
        for variant in VARIANTS:
            check_update_case(case, variant)

    check()


def _adam_reference(param, grads, lr=0.1):
    w, m, v = param.copy(), np.zeros_like(param), np.zeros_like(param)
    for t, g in enumerate(grads, start=1):
        w, m, v = adam_update_ref(w, g, lr, m, v, t)
    return w


NON_C_CONTIGUOUS = {
    "fortran": lambda g: np.asfortranarray(g),
    "strided": lambda g: np.repeat(g, 2, axis=1)[:, ::2],
    "negative": lambda g: np.flip(np.flip(g).copy()),
    "broadcast": lambda g: np.broadcast_to(g[:1], g.shape),
}


@pytest.mark.parametrize("layout", NON_C_CONTIGUOUS)
def test_adam_step_with_non_contiguous_gradients_on_numpy(layout):
    """The NumPy variant takes any gradient layout (the C variants should too: see below)."""
    param = (np.arange(12, dtype=np.float32).reshape(3, 4) - 5) / 3
    grad = NON_C_CONTIGUOUS[layout]((np.arange(12, dtype=np.float32).reshape(3, 4) - 4) / 7)
    expected = _adam_reference(param, [np.array(grad), np.array(grad)])
    with forced_variant("numpy"):
        opt = adamgen.Adam([param], lr=0.1)
        opt.step([grad])
        opt.step([grad])
    assert_bitwise_equal(param, expected)


@needs_c
@pytest.mark.parametrize("layout", NON_C_CONTIGUOUS)
@pytest.mark.parametrize("variant", ["c", "c-omp"])
def test_regression_adam_step_with_non_contiguous_gradients(variant, layout):
    cols = 4 if variant == "c" else 2000  # c-omp is a candidate from 4096 elements
    param = (np.arange(3 * cols, dtype=np.float32).reshape(3, cols) - 5) / 3
    grad = NON_C_CONTIGUOUS[layout]((np.arange(3 * cols, dtype=np.float32)
                                     .reshape(3, cols) - 4) / 7)
    expected = _adam_reference(param, [np.array(grad), np.array(grad)])
    with forced_variant(variant):
        opt = adamgen.Adam([param], lr=0.1)
        try:
            opt.step([grad])
        finally:
            # either the step happened or nothing did: never a counted step without an update
            assert opt.step_count in (0, 1)
        opt.step([grad])
    assert opt.step_count == 2
    assert_bitwise_equal(param, expected)


@needs_c
@pytest.mark.parametrize("grads", ["opt.grads", "C-ordered", "F-ordered"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_regression_adam_with_fortran_ordered_parameters(variant, grads):
    param = np.asfortranarray((np.arange(12, dtype=np.float64).reshape(3, 4) - 5) / 3)
    grad = (np.arange(12, dtype=np.float64).reshape(3, 4) - 4) / 7
    expected = _adam_reference(param, [grad, grad])
    with forced_variant(variant):
        opt = adamgen.Adam([param], lr=0.1)
        for _ in range(2):
            if grads == "opt.grads":
                opt.grads[0][...] = grad
                opt.step()
            else:
                opt.step([grad if grads == "C-ordered" else np.asfortranarray(grad)])
    assert_bitwise_equal(param, expected)


def test_regression_vjp_python_number_cotangent_is_rounded_like_c():
    """Shrunk: float32 0-d primals, ``d_mw = 121129691.0``, beta1 = 0.75. C computes
    ``beta1 * float32(d_mw)`` = 90847264; NumPy ``0.75 * 121129691.0`` in double, rounded
    once to float32: 90847272. (float64 is unaffected: the Python float is the double.)"""
    if not c_vjp_available():
        pytest.skip("no C compiler")
    primals = [np.array(x, np.float32) for x in (0.0, 1.0, 0.0, 0.0, 0.0)]
    cotangents = (1.0, 121129691.0, 1.0)
    numpy_results = ivy.bind_adam_update_vjp("numpy")(*primals, 1, cotangents, beta1=0.75, beta2=0.0, epsilon=0.0)
    c_results = ivy.bind_adam_update_vjp("c")(*primals, 1, cotangents, beta1=0.75, beta2=0.0, epsilon=0.0)
    for name, a, b in zip(("d_w", "d_dcdw", "d_lr", "d_mw_tm1", "d_vw_tm1"), c_results,
                          numpy_results):
        assert_bitwise_equal(a, b, name)


@pytest.mark.parametrize("name", ["step", "beta1", "beta2", "epsilon"])
def test_regression_integer_beyond_float_range_is_a_named_error(name):
    """Found with ``st.integers()`` for the scalars: ``step=10**400`` (a Python int, which the
    API accepts) fails inside ``float(step)``. README: "every error names the argument"."""
    x = np.ones(3, np.float32)
    args = {"step": 1, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-7, name: 10**400}
    with pytest.raises(adamgen.AdamgenError, match=name):
        adamgen.adam_update(x, x, 0.1, x, x, args.pop("step"), **args)
