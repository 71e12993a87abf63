"""``adamgen.Adam``: in place, bit-identical to chained ``adam_update``, all-or-nothing."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import adamgen
from adamgen import Adam, Container
from adamgen.interface import SpecRef

IVY = SpecRef("ivy_adam")

SHAPES = [(3, 4), (5,), (2, 2, 2), (1,), (0,), (17, 3)]


def make_params(rng, dtype, container=False):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    if container:
        return Container(a=params[0], b=Container(c=params[1], d=params[2]),
                         e=Container(f=Container(g=params[3])), h=params[4], i=params[5])
    return params


def leaves(x):
    return [leaf for _, leaf in x.leaves()] if isinstance(x, Container) else list(x)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("container", [False, True], ids=["list", "container"])
@pytest.mark.parametrize("form", ["owned grads", "step(grads)"])
def test_fifty_steps_equal_fifty_chained_adam_updates(dtype, container, form):
    rng = np.random.default_rng(11)
    params = make_params(rng, dtype, container)
    reference = [p.copy() for p in leaves(params)]
    m = [np.zeros_like(p) for p in reference]
    v = [np.zeros_like(p) for p in reference]
    originals = [id(p) for p in leaves(params)]
    opt = Adam(params, lr=0.01)
    for t in range(1, 51):
        opt.lr = 0.01 / (1 + 0.1 * t)  # a schedule: lr may change every step
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in reference]
        if form == "owned grads":
            for target, g in zip(leaves(opt.grads), grads):
                target[...] = g
            opt.step()
        else:
            given = Container.from_leaves(zip(params.leaf_paths(), grads)) if container else grads
            opt.step(given)
        for i, g in enumerate(grads):
            reference[i], m[i], v[i] = adamgen.adam_update(reference[i], g, opt.lr, m[i], v[i], t)
    assert [id(p) for p in leaves(params)] == originals  # updated where they are
    for got, want in zip(leaves(params), reference):
        assert got.tobytes() == want.tobytes()
    for got, want in zip(leaves(opt.state["m"]) + leaves(opt.state["v"]), m + v):
        assert got.tobytes() == want.tobytes()


def test_owned_buffers_are_flat_and_64_byte_aligned():
    opt = Adam([np.ones(5, np.float32), np.ones((3, 3), np.float32)])
    first = opt.grads[0]
    assert first.ctypes.data % 64 == 0
    assert opt.grads[1].ctypes.data == first.ctypes.data + 5 * 4  # one flat buffer
    assert opt.state["m"][0].ctypes.data % 64 == 0


def test_checkpoint_mid_run_continues_bit_identically():
    rng = np.random.default_rng(2)
    params = make_params(rng, np.float32)
    twin = [p.copy() for p in params]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in params]
             for _ in range(20)]
    opt = Adam(params, lr=0.003)
    for g in grads[:10]:
        opt.step(g)
    saved = pickle.loads(pickle.dumps(opt.state_dict()))
    snapshot = [p.copy() for p in params]
    for g in grads[10:]:
        opt.step(g)
    resumed_params = [p.copy() for p in snapshot]
    resumed = Adam(resumed_params, lr=1.0)
    resumed.load_state_dict(saved)
    assert resumed.step_count == 10 and resumed.lr == 0.003
    for g in grads[10:]:
        resumed.step(g)
    for a, b in zip(params, resumed_params):
        assert a.tobytes() == b.tobytes()
    del twin


@pytest.mark.parametrize("bad", ["count", "shape", "dtype", "type"])
def test_bad_gradients_touch_nothing(bad):
    rng = np.random.default_rng(4)
    params = make_params(rng, np.float32)
    opt = Adam(params, lr=0.1)
    opt.step([np.ones(p.shape, np.float32) for p in params])
    before = [p.copy() for p in params] + [a.copy() for a in opt.state["m"] + opt.state["v"]]
    grads = [np.ones(p.shape, np.float32) for p in params]
    if bad == "count":
        grads = grads[:-1]
    elif bad == "shape":
        grads[-1] = np.ones((3, 17), np.float32)
    elif bad == "dtype":
        grads[2] = grads[2].astype(np.float64)
    else:
        grads[1] = "not an array"
    with pytest.raises((ValueError, TypeError), match="grad"):
        opt.step(grads)
    after = [p for p in params] + opt.state["m"] + opt.state["v"]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(before, after))
    assert opt.step_count == 1


def test_bad_construction_and_bad_state_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        Adam([])
    with pytest.raises(TypeError, match="int64"):
        Adam([np.ones(3, np.int64)])
    with pytest.raises(ValueError, match="contiguous"):
        Adam([np.ones(6, np.float32)[::2]])
    with pytest.raises(ValueError, match="parameter 0 starts at an address that is not a "
                                         "multiple of its 4-byte element"):
        Adam([np.zeros(13, np.uint8)[1:].view(np.float32)])
    with pytest.raises(ValueError, match="beta1"):
        Adam([np.ones(3, np.float32)], beta1=1.0)
    opt = Adam([np.ones(3, np.float32)])
    with pytest.raises(ValueError, match="lacks"):
        opt.load_state_dict({"step": 1})
    state = opt.state_dict()
    state["m"] = [np.ones(4, np.float32)]
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(state)


def test_torch_parameters_are_updated_in_place_without_copies():
    torch = pytest.importorskip("torch")
    weight = torch.nn.Parameter(torch.randn(4, 3))
    bias = torch.zeros(3)
    twin = [weight.detach().numpy().copy(), bias.numpy().copy()]
    opt = Adam([weight, bias], lr=0.05)
    assert opt.params[0].ctypes.data == weight.data_ptr()
    grads = [np.ones((4, 3), np.float32), np.full(3, -1, np.float32)]
    opt.step(grads)
    m = [np.zeros_like(t) for t in twin]
    v = [np.zeros_like(t) for t in twin]
    for i in range(2):
        twin[i], _, _ = adamgen.adam_update(twin[i], grads[i], 0.05, m[i], v[i], 1)
    assert weight.detach().numpy().tobytes() == twin[0].tobytes()
    assert bias.numpy().tobytes() == twin[1].tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_misaligned_gradients_are_copied_not_read_through_misaligned_pointers(dtype):
    rng = np.random.default_rng(6)
    params = [rng.standard_normal(s).astype(dtype) for s in [(70_001,), (3, 5)]]
    twin = [p.copy() for p in params]
    grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
    misaligned = []
    for g in grads:
        raw = np.empty(g.nbytes + 1, np.uint8)
        view = raw[1:].view(dtype).reshape(g.shape)
        view[...] = g
        assert not view.flags.aligned
        misaligned.append(view)
    Adam(params, lr=0.01).step(misaligned)
    Adam(twin, lr=0.01).step(grads)
    for got, want in zip(params, twin):
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("variant", ["c", "c-omp"])
def test_fast_mode_steps_with_the_fast_kernel_and_its_own_scalars(variant, monkeypatch):
    """ADAMGEN_MODE=fast: the optimizer's one C call per step runs the fast kernel with the fast
    prelude's scalars (reordered and folded), bit for bit as the kernel's own in-place form."""
    from adamgen.config import KernelConfig, refresh_environment
    from adamgen.runtime import dispatch
    from adamgen.runtime.c_kernels import c_kernel
    from adamgen.runtime.numpy_kernels import numpy_kernel

    monkeypatch.setenv("ADAMGEN_MODE", "fast")
    monkeypatch.setenv("ADAMGEN_VARIANT", variant)
    refresh_environment()
    dispatch.forget()
    fast = c_kernel(KernelConfig(spec=IVY, mode="fast", scalar_tensors=frozenset({"lr"})))
    if fast is None:
        pytest.skip("no C compiler")
    rng = np.random.default_rng(8)
    params = [rng.standard_normal(n).astype(np.float32) for n in (5000, 17, 3000)]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    expected = [p.copy() for p in params]
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    scalars = numpy_kernel(fast.config).prelude(0.9, 0.999, 1e-7, 1.0)
    for w, g, m, v in zip(expected, grads, ms, vs):
        fast.inplace_all(w, g, 0.01, m, v, scalars, threads=1)
    Adam(params, lr=0.01).step(grads)
    for got, want in zip(params, expected):
        assert got.tobytes() == want.tobytes()
    dispatch.forget()


# -- D2: parameters that share memory ----------------------------------------------------------

def _shared_memory_cases():
    buffer = np.zeros(10, np.float32)
    wide = np.zeros(4, np.float64)
    return {
        "the same array twice": ([buffer, buffer], "parameter 0 and parameter 1"),
        "overlapping views": ([np.ones(2, np.float32), buffer[:6], buffer[4:]],
                              "parameter 1 and parameter 2"),
        "one buffer seen as two dtypes": ([wide, wide.view(np.float32)],
                                          "parameter 0 and parameter 1"),
        "a Container": (Container(a=buffer, b=Container(c=buffer[3:5])),
                        "parameter a and parameter b.c"),
    }


@pytest.mark.parametrize("case", list(_shared_memory_cases()))
def test_parameters_that_share_memory_are_refused_naming_both(case):
    """Issue 13 D2: ``Adam([q, q])`` raced under c-omp and updated q twice elsewhere. Stricter
    than torch, which warns for [p, p] and updates p twice."""
    params, names = _shared_memory_cases()[case]
    with pytest.raises(ValueError, match=f"{names} share memory"):
        Adam(params)


def test_disjoint_views_of_one_buffer_are_parameters_like_any_other():
    buffer = np.linspace(-1, 1, 10, dtype=np.float32)
    twin = [buffer[:4].copy(), buffer[4:].copy()]
    opt, other = Adam([buffer[:4], buffer[4:]], lr=0.1), Adam(twin, lr=0.1)
    grads = [np.ones(4, np.float32), np.full(6, -2, np.float32)]
    opt.step(grads)
    other.step(grads)
    assert buffer.tobytes() == np.concatenate(twin).tobytes()


# -- D9: a gradient that overlaps memory the step writes ---------------------------------------

@pytest.mark.parametrize("variant", ["numpy", "c", "c-omp"])
@pytest.mark.parametrize("size", [5, 70_001], ids=["small", "threaded size"])
def test_a_gradient_overlapping_what_the_step_writes_is_read_as_it_was(variant, size,
                                                                       monkeypatch):
    """Issue 13 D9: ``opt.step([opt.state["m"][0]])`` gave -0.82665324 under numpy and
    -0.8259197 under c. Now every variant reads such a gradient from a copy taken at the start
    of the step: the bits are those of a step with copied gradients."""
    from adamgen.config import refresh_environment

    monkeypatch.setenv("ADAMGEN_VARIANT", variant)
    refresh_environment()
    rng = np.random.default_rng(9)
    params = [rng.standard_normal(size).astype(np.float32) for _ in range(4)]
    twin = [p.copy() for p in params]
    opt, reference = Adam(params, lr=0.1), Adam(twin, lr=0.1)
    first = [rng.standard_normal(size).astype(np.float32) for _ in range(4)]
    opt.step(first)
    reference.step(first)
    for grads in ([opt.state["m"][0], params[2], opt.state["v"][1], params[3]],
                  [opt.state["v"][0], opt.state["m"][0], params[0], opt.grads[3]]):
        copies = [np.array(g) for g in grads]
        opt.step(grads)
        reference.step(copies)
        for got, want in zip(params + opt.state["m"] + opt.state["v"],
                             twin + reference.state["m"] + reference.state["v"]):
            assert got.tobytes() == want.tobytes()


# -- D6: load_state_dict checks everything, names every entry --------------------------------

def _bad_states(state):
    m0, m1 = state["m"]
    return {
        "complex m[1]": ({"m": [m0 + 1, m1.astype(np.complex64)]}, TypeError,
                         r"state_dict\['m'\]\[1\].*complex64"),
        "string v[0]": ({"v": ["abc", state["v"][1]]}, TypeError, r"state_dict\['v'\]\[0\]"),
        "ragged m[0]": ({"m": [[[1.0], [1.0, 2.0]], m1]}, ValueError, r"state_dict\['m'\]\[0\]"),
        "shape of v[1]": ({"v": [state["v"][0], np.ones(5)]}, ValueError,
                          r"state_dict\['v'\]\[1\].*shape \(5,\); expected \(4,\)"),
        "m count": ({"m": [m0]}, ValueError, r"state_dict\['m'\] must be a list of 2"),
        "m not a list": ({"m": 3.0}, ValueError, r"state_dict\['m'\] must be a list"),
        "step 2.7": ({"step": 2.7}, ValueError, r"state_dict\['step'\].*2\.7"),
        "step NaN": ({"step": float("nan")}, ValueError, r"state_dict\['step'\].*nan"),
        "step -1": ({"step": -1}, ValueError, r"state_dict\['step'\].*-1"),
        "step True": ({"step": True}, TypeError, r"state_dict\['step'\].*bool"),
        "step '3'": ({"step": "3"}, TypeError, r"state_dict\['step'\].*str"),
        "step 10**400": ({"step": 10**400}, ValueError, r"state_dict\['step'\].*beyond"),
        "lr 'abc'": ({"lr": "abc"}, TypeError, r"state_dict\['lr'\].*str"),
        "lr -1": ({"lr": -1.0}, ValueError, r"state_dict\['lr'\].*finite number >= 0"),
        "lr inf": ({"lr": float("inf")}, ValueError, r"state_dict\['lr'\]"),
        "beta1 1.0": ({"beta1": 1.0}, ValueError, r"state_dict\['beta1'\]"),
        "epsilon -1": ({"epsilon": -1.0}, ValueError, r"state_dict\['epsilon'\]"),
    }


@pytest.mark.parametrize("case", list(_bad_states({"m": [np.zeros(1)] * 2,
                                                   "v": [np.zeros(1)] * 2})))
def test_a_bad_state_dict_changes_nothing_and_names_the_entry(case):
    """Issue 13 D6: ``m=[valid, complex]`` raised an unnamed TypeError after overwriting m[0];
    ``step=2.7`` was truncated to 2, ``step=NaN`` a bare ValueError, ``lr`` never checked."""
    rng = np.random.default_rng(3)
    opt = Adam([rng.standard_normal((2, 3)).astype(np.float32),
                rng.standard_normal(4).astype(np.float64)], lr=0.01)
    opt.step([np.ones((2, 3), np.float32), np.ones(4)])
    good = opt.state_dict()
    change, error, message = _bad_states(good)[case]
    before = [a.tobytes() for a in opt.state["m"] + opt.state["v"]]
    with pytest.raises(error, match=message):
        opt.load_state_dict({**good, **change})
    assert [a.tobytes() for a in opt.state["m"] + opt.state["v"]] == before
    assert (opt.step_count, opt.lr, opt.beta1, opt.epsilon) == (1, 0.01, 0.9, 1e-7)


def test_load_state_dict_takes_whole_float_steps_lists_and_same_kind_casts():
    opt = Adam([np.zeros(3, np.float32)])
    opt.load_state_dict({"step": 4.0, "lr": np.float64(0.5), "beta1": 0.5, "beta2": 0.9,
                         "epsilon": 0, "m": [[1, 2, 3]], "v": [np.full(3, 0.25)]})
    assert opt.step_count == 4 and type(opt.step_count) is int and opt.lr == 0.5
    assert opt.state["m"][0].tolist() == [1, 2, 3] and opt.state["v"][0].dtype == np.float32
    with pytest.raises(TypeError, match="mapping"):
        opt.load_state_dict([("step", 1)])


# -- issue 12 item 10 and issue 13 D8: the learning rate -------------------------------------

BAD_LEARNING_RATES = {
    "negative": (-1, ValueError, "finite number >= 0, got -1"),
    "NaN": (float("nan"), ValueError, "finite number >= 0, got nan"),
    "inf (torch accepts it; adamgen does not)": (float("inf"), ValueError, "got inf"),
    "a string": ("0.1", TypeError, "lr is a str"),
    "a bool": (True, TypeError, "lr is a bool"),
    "None": (None, TypeError, "lr is a NoneType"),
    "an int beyond float range": (10**400, ValueError,
                                  r"lr=10000000\.\.\.\(401 digits\) is beyond the range"),
    "an array of two": (np.array([0.1, 0.2]), ValueError, "lr must be a scalar"),
}


@pytest.mark.parametrize("case", list(BAD_LEARNING_RATES))
def test_a_bad_learning_rate_is_refused_at_construction_and_at_the_next_step(case):
    value, error, message = BAD_LEARNING_RATES[case]
    with pytest.raises(error, match=message):
        Adam([np.ones(3, np.float32)], lr=value)
    params = [np.ones(3, np.float32)]
    opt = Adam(params, lr=0.1)
    opt.lr = value  # a schedule may set anything: the step checks before it writes
    with pytest.raises(error, match=message):
        opt.step([np.ones(3, np.float32)])
    assert params[0].tolist() == [1, 1, 1] and opt.step_count == 0


@pytest.mark.parametrize("lr", [0, 0.0, 3, np.float32(0.25), np.float64(1e-3), np.array(0.5)])
def test_good_learning_rates_are_python_floats_equal_to_their_value(lr):
    opt = Adam([np.ones(3, np.float32)], lr=lr)
    assert type(opt.lr) is float and opt.lr == float(lr)
    opt.step([np.ones(3, np.float32)])


# -- issue 12 item 11: copies ----------------------------------------------------------------

@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("container", [False, True], ids=["list", "container"])
def test_a_copied_optimizer_continues_bit_for_bit_on_its_own_copies(how, container):
    """The state (m, v, owned gradients, step) and hyperparameters travel; the kernels are
    looked up again; the parameters are copies, as torch's deepcopy copies them."""
    import copy

    rng = np.random.default_rng(12)
    params = make_params(rng, np.float32, container)
    opt = Adam(params, lr=0.02, beta1=0.8, epsilon=1e-6)
    for _ in range(3):
        opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in leaves(params)])
    for g in leaves(opt.grads):
        g[...] = rng.standard_normal(g.shape)
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert (clone.step_count, clone.lr, clone.beta1, clone.epsilon) == (3, 0.02, 0.8, 1e-6)
    assert not any(np.shares_memory(a, b) for a in clone.params for b in opt.params)
    opt.step()
    clone.step()  # with the owned gradients it carried over
    for got, want in zip(leaves(clone.params) + leaves(clone.state["m"]),
                         leaves(params) + leaves(opt.state["m"])):
        assert got.tobytes() == want.tobytes()


def test_deep_copying_parameters_and_optimizer_together_keeps_them_connected():
    import copy

    params = [np.ones(3, np.float32), np.ones(2, np.float64)]
    copied_params, clone = copy.deepcopy((params, Adam(params, lr=0.1)))
    clone.step([np.ones(3, np.float32), np.ones(2)])
    assert copied_params[0].tolist() != [1, 1, 1] and params[0].tolist() == [1, 1, 1]


# -- issue 12 item 12: messages -----------------------------------------------------------------

def test_repr_counts_parameters_in_good_english():
    assert repr(Adam([np.ones(3, np.float32)])).startswith("Adam(1 parameter, 3 elements")
    assert repr(Adam([np.ones(3), np.ones(2)])).startswith("Adam(2 parameters, 5 elements")


def test_the_not_contiguous_error_says_its_strides_are_bytes():
    with pytest.raises(ValueError, match=r"shape \(3,\), strides \(8,\) in bytes"):
        Adam([np.ones(6, np.float32)[::2]])


def test_numpy_forced_where_it_is_inexact_is_an_error_not_a_silent_switch_to_c(monkeypatch):
    """A rule with a fused multiply-add, in float64, which NumPy cannot round once: forced to
    NumPy, the optimizer refuses at construction, as the functional form refuses the call (it
    used to run C without a word); float32, which NumPy computes exactly, runs on NumPy."""
    from adamgen.config import refresh_environment
    from adamgen.errors import InexactVariantError
    from adamgen.spec import UpdateSpec, fma, symbols, unevaluated

    p, g, lr = symbols("p g lr")
    with unevaluated():
        p_new = fma(g, -lr, p)
    rule = adamgen.Rule(UpdateSpec("fma_descent_test", ["p", "g"], ["lr"], {"p_new": p_new},
                                   state={"p_new": "p"}, parameter="p", gradient="g"))
    monkeypatch.setenv("ADAMGEN_VARIANT", "numpy")
    refresh_environment()
    with pytest.raises(InexactVariantError, match="ADAMGEN_VARIANT=numpy cannot serve.*float64 "
                                                  "fused multiply-add"):
        rule.optimizer([np.ones(5)], lr=0.5)
    params = [np.ones(5, np.float32)]
    opt = rule.optimizer(params, lr=0.5)
    opt.step([np.full(5, 0.25, np.float32)])
    assert "numpy of numpy" in repr(opt) and (params[0] == 0.875).all(), repr(opt)
