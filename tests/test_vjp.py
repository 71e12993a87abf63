"""``adam_update_vjp``: finite differences, torch, broadcasting, the v = 0 rule, bits across
backends, the fixed summation order, no writes, and no SymPy on a cache hit.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import Snapshot, assert_bitwise_equal
from reference import adam_update_ref

from adamgen.errors import ArgumentTypeError, ArgumentValueError, StepZeroDivisionError
from adamgen.runtime import ivy
from adamgen.runtime.ivy import adam_update_vjp
from adamgen.runtime.vjp import pairwise_sum_rows, sum_to_shape

REPO = Path(__file__).resolve().parents[1]
NAMES = ("w", "dcdw", "lr", "mw_tm1", "vw_tm1")
#: name -> shapes of (w, dcdw, lr, mw_tm1, vw_tm1); None is a Python float
BROADCASTS = {
    "same shape": ((7,), (7,), (7,), (7,), (7,)),
    "scalar lr, v of shape (1,)": ((7,), (7,), None, (7,), (1,)),
    "2-D, 0-d lr, row state": ((3, 4), (4,), (), (3, 4), (1, 4)),
    "m and v smaller than w": ((3, 4), (4,), None, (4,), (4,)),
    "lr per row": ((3, 4), (3, 4), (3, 1), (1,), (3, 4)),
}
HYPER = {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-7}


def make_inputs(shapes, rng, dtype=np.float64):
    values = []
    for name, shape in zip(NAMES, shapes):
        if shape is None:
            values.append(0.01)
            continue
        if name == "lr":
            values.append(rng.uniform(0.001, 0.1, shape).astype(dtype))
        elif name == "vw_tm1":
            values.append(rng.uniform(0.1, 2.0, shape).astype(dtype))
        else:
            values.append(rng.normal(size=shape).astype(dtype))
    return values


def output_shapes(shapes):
    s = [() if x is None else x for x in shapes]
    return (np.broadcast_shapes(*s), np.broadcast_shapes(s[1], s[3]),
            np.broadcast_shapes(s[1], s[4]))


def objective(values, cotangents, step, hyper):
    outputs = adam_update_ref(*values, step, **hyper)
    return sum(float(np.sum(o * c)) for o, c in zip(outputs, cotangents))


def central_difference(values, index, cotangents, step, hyper, h=1e-6):
    x = np.array(values[index], np.float64)
    grad = np.empty_like(x)
    for i in np.ndindex(x.shape):
        delta = h * max(1.0, abs(float(x[i])))
        sides = []
        for sign in (1, -1):
            moved = x.copy()
            moved[i] += sign * delta
            args = list(values)
            args[index] = float(moved) if isinstance(values[index], float) else moved
            sides.append(objective(args, cotangents, step, hyper))
        grad[i] = (sides[0] - sides[1]) / (2 * delta)
    return grad


def assert_close(got, expected, tolerance=1e-6, name=""):
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    error = float(np.max(np.abs(np.asarray(got) - expected))) / scale
    assert error < tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("shapes", BROADCASTS.values(), ids=BROADCASTS.keys())
@pytest.mark.parametrize("step", [1, 7])
def test_vjp_matches_central_differences(shapes, step):
    rng = np.random.default_rng(step)
    values = make_inputs(shapes, rng)
    cotangents = tuple(rng.normal(size=s) for s in output_shapes(shapes))
    results = adam_update_vjp(*values, step, cotangents, **HYPER)
    for index, (name, got) in enumerate(zip(NAMES, results)):
        assert got.shape == np.shape(values[index]), name
        assert_close(got, central_difference(values, index, cotangents, step, HYPER), name=name)


def test_vjp_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    shapes = BROADCASTS["2-D, 0-d lr, row state"]
    values = make_inputs(shapes, rng)
    cotangents = tuple(rng.normal(size=s) for s in output_shapes(shapes))
    tensors = [torch.tensor(np.asarray(v), dtype=torch.float64, requires_grad=True)
               for v in values]
    w, g, lr, m, v = tensors
    b1, b2, eps, t = HYPER["beta1"], HYPER["beta2"], HYPER["epsilon"], 3
    m2 = b1 * m + (1 - b1) * g
    v2 = b2 * v + (1 - b2) * g**2
    alpha = (1 - b2**t) ** 0.5 / (1 - b1**t + eps)
    w2 = w - ((alpha * m2) / (torch.sqrt(torch.clamp(v2, min=0)) + eps)) * lr
    total = sum((o * torch.tensor(c)).sum() for o, c in zip((w2, m2, v2), cotangents))
    expected = torch.autograd.grad(total, tensors)
    for name, got, want in zip(NAMES, adam_update_vjp(*values, t, cotangents, **HYPER),
                               expected):
        assert_close(got, want.numpy(), 1e-12, name)


def test_results_are_arrays_of_the_inputs_shapes_and_dtype():
    rng = np.random.default_rng(0)
    values = make_inputs(BROADCASTS["scalar lr, v of shape (1,)"], rng, np.float32)
    results = adam_update_vjp(*values, 3, (1.0, 0.0, 0.0))
    assert [r.shape for r in results] == [(7,), (7,), (), (7,), (1,)]
    assert all(isinstance(r, np.ndarray) and r.dtype == np.float32 for r in results)
    ints = adam_update_vjp(np.arange(3), np.arange(3), 1, np.zeros(3, int), np.ones(3, int),
                           2, (1, 1, 1))
    assert all(r.dtype == np.float64 for r in ints)


def test_vjp_never_writes_its_inputs():
    rng = np.random.default_rng(1)
    values = make_inputs(BROADCASTS["2-D, 0-d lr, row state"], rng, np.float32)
    cotangents = [rng.normal(size=s).astype(np.float32)
                  for s in output_shapes(BROADCASTS["2-D, 0-d lr, row state"])]
    snapshot = Snapshot(**dict(zip(NAMES, values)), d_w_new=cotangents[0], d_mw=cotangents[1],
                        d_vw=cotangents[2])
    for array in [*values, *cotangents]:
        array.setflags(write=False)  # any write would raise
    for backend in ("numpy", "auto"):
        ivy.bind_adam_update_vjp(backend)(*values, 4, tuple(cotangents))
    snapshot.assert_unchanged()


def test_argument_errors():
    x = np.ones(3)
    with pytest.raises(ArgumentValueError, match="3 entries"):
        adam_update_vjp(x, x, 0.1, x, x, 1, (x, x))
    with pytest.raises(ArgumentTypeError, match="sequence"):
        adam_update_vjp(x, x, 0.1, x, x, 1, "abc")
    with pytest.raises(ArgumentValueError, match="cotangent d_mw"):
        adam_update_vjp(x, x, 0.1, x, x, 1, (x, np.ones((2, 3)), x))
    with pytest.raises(StepZeroDivisionError):
        adam_update_vjp(x, x, 0.1, x, x, 0, (x, x, x), epsilon=0.0)
    with pytest.raises(ArgumentValueError, match="beta1"):
        adam_update_vjp(x, x, 0.1, x, x, 1, (x, x, x), beta1=1.0)


# --- the rule where v = 0 ------------------------------------------------------------------

def vjp_and_fd(values, index, step=3, h=1e-8, **hyper):
    cotangents = (np.array([1.3]), np.array([0.4]), np.array([-0.7]))
    got = adam_update_vjp(*values, step, cotangents, **hyper)[index]
    return got, central_difference(values, index, cotangents, step, hyper, h)


@pytest.mark.parametrize("index", range(5), ids=NAMES)
def test_zero_state_and_gradient_is_differentiable_and_finite(index):
    """v = 0 with mw = 0: w_new does not depend on vw_tm1 there; everything is finite."""
    values = [np.array([0.5]), np.array([0.0]), 0.1, np.array([0.0]), np.array([0.0])]
    hyper = dict(HYPER, epsilon=1e-2)  # the |g| kink has width eps/sqrt(1-beta2): resolve it
    got, fd = vjp_and_fd(values, index, **hyper)
    assert np.isfinite(got).all()
    assert_close(got, fd, name=NAMES[index])


def test_v_zero_with_nonzero_moment_takes_the_documented_derivatives():
    """d_vw_tm1: the one-sided derivative from below (the sqrt path gives 0);
    d_dcdw: the symmetric derivative (what a central difference measures)."""
    values = [np.array([0.5]), np.array([0.0]), 0.1, np.array([0.8]), np.array([0.0])]
    hyper = dict(HYPER, epsilon=1e-2)
    d_dcdw, fd = vjp_and_fd(values, 1, **hyper)
    assert_close(d_dcdw, fd, name="d_dcdw")
    d_vw_tm1 = adam_update_vjp(*values, 3, (1.3, 0.4, -0.7), **hyper)[4]
    assert d_vw_tm1[0] == 0.999 * -0.7  # beta2 * d_vw exactly
    below = [*values[:4], np.array([-1e-8])]
    one_sided = (objective(values, (1.3, 0.4, -0.7), 3, hyper)
                 - objective(below, (1.3, 0.4, -0.7), 3, hyper)) / 1e-8
    assert abs(d_vw_tm1[0] - one_sided) < 1e-6


@pytest.mark.parametrize("index", range(5), ids=NAMES)
def test_negative_v_is_smooth_and_matches_differences(index):
    values = [np.array([0.5, -0.2]), np.array([0.3, -1.2]), 0.05, np.array([0.8, 0.1]),
              np.array([-1.0, -2.0])]
    cotangents = (np.array([1.3, 0.2]), np.array([0.4, -1.0]), np.array([-0.7, 0.5]))
    hyper = dict(HYPER, epsilon=1e-2)  # w_new ~ m/epsilon: keep the differences well rounded
    got = adam_update_vjp(*values, 3, cotangents, **hyper)[index]
    assert_close(got, central_difference(values, index, cotangents, 3, hyper), name=NAMES[index])


def test_underflowing_gradient_gives_finite_results():
    """float32: 1e-30**2 underflows, so v = 0 while mw != 0; no inf * 0 = NaN."""
    x = np.full(4, 1e-30, np.float32)
    results = adam_update_vjp(np.ones(4, np.float32), x, 0.1, x, np.zeros(4, np.float32), 2,
                              (1.0, 1.0, 1.0))
    assert all(np.isfinite(r).all() for r in results)


def test_epsilon_zero_at_v_zero_divides_by_zero_like_the_update():
    x = np.zeros(2)
    d_lr = adam_update_vjp(x, x, 0.1, x + 1, x, 2, (1.0, 0.0, 0.0), epsilon=0.0)[2]
    assert not np.isfinite(d_lr)


# --- the fixed summation order --------------------------------------------------------------

def pairwise_reference(values: list) -> object:
    """The documented order, one element at a time: pair neighbours level by level."""
    while len(values) > 1:
        pairs = [values[i] + values[i + 1] for i in range(0, len(values) - 1, 2)]
        values = pairs + values[-1:] if len(values) % 2 else pairs
    return values[0]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 1000])
def test_pairwise_sum_is_the_documented_order(n):
    rng = np.random.default_rng(n)
    rows = (rng.normal(size=(n, 3)) * 10.0 ** rng.integers(-8, 8, (n, 3))).astype(np.float32)
    got = pairwise_sum_rows(rows)
    for j in range(3):
        assert_bitwise_equal(got[j], pairwise_reference([rows[i, j] for i in range(n)]))


def test_sum_to_shape_follows_c_order_and_ignores_layout():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(3, 5, 4)) * 1e4).astype(np.float32)
    for shape in [(), (1,), (4,), (5, 1), (3, 1, 4), (1, 5, 1), (3, 5, 4)]:
        expected = sum_to_shape(x, shape)
        assert expected.shape == shape
        for layout in (np.asfortranarray(x), x.copy()[:, ::-1][:, ::-1]):
            assert_bitwise_equal(sum_to_shape(layout, shape), expected, str(shape))
    flat = [x.reshape(-1)[i] for i in range(x.size)]
    assert_bitwise_equal(sum_to_shape(x, ()), pairwise_reference(flat).reshape(()))
    per_column = [pairwise_reference([x[i, j, k] for i in range(3) for j in range(5)])
                  for k in range(4)]
    assert_bitwise_equal(sum_to_shape(x, (4,)), np.array(per_column, np.float32))
    assert sum_to_shape(np.zeros((0, 3), np.float32), (3,)).tolist() == [0.0, 0.0, 0.0]


def test_layout_of_the_inputs_does_not_change_a_bit():
    rng = np.random.default_rng(3)
    values = make_inputs(((6, 5), (6, 5), None, (6, 5), (1,)), rng, np.float32)
    cotangents = tuple(rng.normal(size=(6, 5)).astype(np.float32) for _ in range(3))
    contiguous = adam_update_vjp(*values, 3, cotangents)
    strided = [np.asfortranarray(v) if isinstance(v, np.ndarray) else v for v in values]
    for got, want in zip(adam_update_vjp(*strided, 3, tuple(np.asfortranarray(c)
                                                            for c in cotangents)), contiguous):
        assert_bitwise_equal(got, want)


# --- NumPy and C ----------------------------------------------------------------------------

SPECIAL = [0.0, -0.0, 1e-30, -1.0, np.nan, np.inf, -np.inf, 1e30, 3.0, -2.5]


def assert_bits_equal_but_nan_sign(actual, expected, name):
    """Every bit equal, NaNs equal as NaNs: IEEE 754 leaves a NaN result's sign and payload to
    the hardware (x86 returns the first NaN operand, and C compilers commute ``a*b``)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{name}: NaNs differ"
    assert_bitwise_equal(np.where(np.isnan(actual), 0, actual),
                         np.where(np.isnan(expected), 0, expected), name)


@pytest.fixture(scope="module", params=["float32", "float64"])
def c_dtype(request):
    if ivy.ivy_source().derived("vjp").c_kernel(request.param, frozenset()) is None:
        pytest.skip("no C compiler: the C VJP kernel is unavailable")
    return np.dtype(request.param)


@pytest.mark.parametrize("shapes", [*BROADCASTS.values(), ((100_003,),) * 4 + ((1,),)],
                         ids=[*BROADCASTS.keys(), "large, threaded"])
def test_numpy_and_c_agree_bit_for_bit(c_dtype, shapes):
    rng = np.random.default_rng(4)
    values = [v.astype(c_dtype) if isinstance(v, np.ndarray) else v
              for v in make_inputs(shapes, rng, c_dtype)]
    cotangents = tuple(rng.normal(size=s).astype(c_dtype) for s in output_shapes(shapes))
    numpy_results = ivy.bind_adam_update_vjp("numpy")(*values, 9, cotangents)
    c_results = ivy.bind_adam_update_vjp("c")(*values, 9, cotangents)
    for name, a, b in zip(NAMES, c_results, numpy_results):
        assert_bitwise_equal(a, b, name)


def test_numpy_and_c_agree_with_python_number_cotangents(c_dtype):
    rng = np.random.default_rng(6)
    shapes = BROADCASTS["m and v smaller than w"]
    values = [v.astype(c_dtype) if isinstance(v, np.ndarray) else v
              for v in make_inputs(shapes, rng, c_dtype)]
    cotangents = (rng.normal(size=(3, 4)).astype(c_dtype), 1.0, -0.1)
    numpy_results = ivy.bind_adam_update_vjp("numpy")(*values, 2, cotangents)
    for name, a, b in zip(NAMES, ivy.bind_adam_update_vjp("c")(*values, 2, cotangents), numpy_results):
        assert_bitwise_equal(a, b, name)
    exact = ivy.bind_adam_update_vjp("numpy")(*(v.astype(np.float64) if isinstance(v, np.ndarray) else v
                          for v in values), 2, (cotangents[0].astype(np.float64), 1.0, -0.1))
    for name, a, b in zip(NAMES, numpy_results, exact):
        assert_close(a, b, 1e-5, name)


def test_numpy_and_c_agree_on_special_values(c_dtype):
    """Elementwise results (all inputs full-shape) including v = 0, v < 0, NaN and inf."""
    grid = np.array(np.meshgrid(*[SPECIAL] * 3, indexing="ij")).reshape(3, -1)
    dcdw, mw_tm1, vw_tm1 = (g.astype(c_dtype) for g in grid)
    w = np.linspace(-1, 1, dcdw.size).astype(c_dtype)
    lr_values = [x for x in SPECIAL if np.isfinite(x) and x >= 0]  # adamgen's lr rule
    lr = np.resize(np.array(lr_values, c_dtype), dcdw.size)
    cotangents = tuple(np.resize(np.array(SPECIAL[::k], c_dtype), dcdw.size) for k in (1, 2, 3))
    for hyper in ({}, {"epsilon": 0.0}, {"beta1": 0.0, "beta2": 0.5}):
        numpy_results = ivy.bind_adam_update_vjp("numpy")(w, dcdw, lr, mw_tm1, vw_tm1, 5, cotangents, **hyper)
        c_results = ivy.bind_adam_update_vjp("c")(w, dcdw, lr, mw_tm1, vw_tm1, 5, cotangents, **hyper)
        for name, a, b in zip(NAMES, c_results, numpy_results):
            assert_bits_equal_but_nan_sign(a, b, f"{name} {hyper}")


# --- runtime hygiene and the example --------------------------------------------------------

def test_a_cache_hit_imports_neither_sympy_nor_jinja(tmp_path):
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from adamgen.runtime.ivy import adam_update_vjp
        x = np.ones(5, np.float32)
        adam_update_vjp(x, x, 0.1, x, x[:1], 2, (x, 1.0, 0.0))
        print(sorted(m for m in ("sympy", "jinja2") if m in sys.modules))
    """)
    env = {**os.environ, "ADAMGEN_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    hit = subprocess.run([sys.executable, "-c", code], env={**env, "ADAMGEN_REQUIRE_CACHE_HIT": "1"},
                         check=True, capture_output=True, text=True)
    assert hit.stdout.strip() == "[]", hit.stderr


def test_hypergradient_example_agrees_with_finite_differences(capsys):
    module = runpy.run_path(str(REPO / "examples" / "hypergradient.py"))
    assert module["main"](["--steps", "6", "--outer", "3"]) == 0
    out = capsys.readouterr().out
    assert "central difference" in out and "tuned lr" in out


@pytest.mark.parametrize("where", ["cotangent d_w_new", "cotangent d_mw", "lr", "w"])
@pytest.mark.parametrize("form", ["int", "list of ints"])
def test_an_integer_beyond_range_is_a_named_error(where, form):
    """Issue 13 D8: ``10**400`` as a cotangent or lr gave ``OverflowError: int too large to
    convert to float``, as a list ``Python int too large to convert to C long``: no name."""
    big = 10**400 if form == "int" else [10**400] * 3
    x = np.ones(3)
    arguments = {"w": x, "lr": 0.1}
    cotangents = [1.0, 0.0, 0.0]
    if where.startswith("cotangent"):
        cotangents[["d_w_new", "d_mw"].index(where.split()[1])] = big
    else:
        arguments[where] = big
    with pytest.raises(ArgumentValueError, match=rf"{where}.*10000000\.\.\.\(401 digits\)"):
        adam_update_vjp(arguments["w"], x, arguments["lr"], x, x, 1, cotangents)
