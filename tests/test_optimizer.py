"""``adamgen.Adam``: in place, bit-identical to chained ``adam_update``, all-or-nothing."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import adamgen
from adamgen import Adam, Container

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
    from adamgen.runtime.kernels import numpy_kernel

    monkeypatch.setenv("ADAMGEN_MODE", "fast")
    monkeypatch.setenv("ADAMGEN_VARIANT", variant)
    refresh_environment()
    dispatch.forget()
    fast = c_kernel(KernelConfig(mode="fast", scalar_tensors=frozenset({"lr"})))
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
