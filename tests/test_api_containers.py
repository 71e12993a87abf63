"""Containers and Arrays through every call site: seed examples and the reference, leaf by leaf."""

from __future__ import annotations

import numpy as np
import pytest
from reference import adam_update_ref

import adamgen
from adamgen import Array, Container, array


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def close_to_printed(value, printed) -> None:
    """Ivy prints float32 through float64 with 8 decimals: allow half a unit of the last digit."""
    value, printed = np.asarray(value, dtype=np.float64), np.asarray(printed, dtype=np.float64)
    tolerance = 5e-9 * np.maximum(np.abs(printed), 1.0) * (1 + 1e-9)
    assert np.all(np.abs(value - printed) <= tolerance), (value, printed)


def seed_w() -> Container:
    return Container(a=array([1., 2., 3.]), b=array([4., 5., 6.]))


# The four ways to call the same update, as the seed page documents them.
CALL_SITES = {
    "function": lambda w, *args, **kw: adamgen.adam_update(w, *args, **kw),
    "instance method": lambda w, *args, **kw: w.adam_update(*args, **kw),
    "static method": lambda w, *args, **kw: Container.static_adam_update(w, *args, **kw),
}


@pytest.mark.parametrize("call", CALL_SITES.values(), ids=CALL_SITES.keys())
def test_seed_one_container_with_unusual_argument_order(call):
    # The page passes (w, dcdw, mw_tm1, vw_tm1, lr, step): by the signature, lr is the zero array,
    # mw_tm1 the one-element zero and vw_tm1 is 0.01, so w does not move.
    w = seed_w()
    new_w, mw, vw = call(w, array([0.5, 0.2, 0.4]), array([0., 0., 0.]), array([0.]),
                         array(0.01), 2)
    assert isinstance(new_w, Container) and isinstance(mw, Array) and isinstance(vw, Array)
    close_to_printed(new_w.a, [1., 2., 3.])
    close_to_printed(new_w.b, [4., 5., 6.])
    close_to_printed(mw, [0.05, 0.02, 0.04])
    np.testing.assert_allclose(vw, [0.01024, 0.01003, 0.01015], atol=5e-6)
    assert repr(new_w) == "{\n    a: adamgen.array([1., 2., 3.]),\n    b: adamgen.array([4., 5., 6.])\n}"


@pytest.mark.parametrize("call", CALL_SITES.values(), ids=CALL_SITES.keys())
def test_seed_one_container_instance_method_example(call):
    _new_w, mw, vw = call(seed_w(), array([1., 0.2, 0.4]), array([0., 0., 0.]), array([0.]),
                         array(0.01), 2)
    close_to_printed(mw, [0.1, 0.02, 0.04])
    np.testing.assert_allclose(vw, [0.01099, 0.01003, 0.01015], atol=5e-6)
    assert "adamgen.array([0.1 , 0.02, 0.04])" == repr(mw)


@pytest.mark.parametrize("call", CALL_SITES.values(), ids=CALL_SITES.keys())
def test_seed_multiple_containers(call):
    dcdw = Container(a=array([0.1, 0.3, 0.3]), b=array([0.3, 0.2, 0.2]))
    mw_tm1 = Container(a=array([0., 0., 0.]), b=array([0., 0., 0.]))
    vw_tm1 = Container(a=array([0.]), b=array([0.]))
    new_w, mw, vw = call(seed_w(), dcdw, array(0.001), mw_tm1, vw_tm1, 3, beta1=0.9,
                         beta2=0.999, epsilon=1e-7, stop_gradients=False)
    close_to_printed(new_w.a, [0.99936122, 1.99936116, 2.99936128])
    close_to_printed(new_w.b, [3.99936128, 4.99936104, 5.99936104])
    close_to_printed(mw.a, [0.01, 0.03, 0.03])
    close_to_printed(vw.b, [9.00000086e-05, 4.00000063e-05, 4.00000063e-05])
    assert repr(vw).splitlines()[1] == \
        "    a: adamgen.array([1.00000016e-05, 9.00000086e-05, 9.00000086e-05]),"


def test_seed_array_instance_method():
    w = array([1., 2, 3.])
    new_w, mw, vw = w.adam_update(array([0.2, 0.1, 0.3]), array(0.1), np.zeros(3, np.float32),
                                  np.zeros(1, np.float32), 2)
    assert all(isinstance(x, Array) for x in (new_w, mw, vw))
    assert repr(new_w) == "adamgen.array([0.92558753, 1.92558873, 2.92558718])"
    assert repr(vw) == "adamgen.array([4.00000063e-05, 1.00000016e-05, 9.00000086e-05])"


def nested(rng, dtype, shape=(5,)):
    return Container(a=rng.standard_normal(shape).astype(dtype),
                     b=Container(c=rng.standard_normal(shape).astype(dtype),
                                 d=Container(e=rng.standard_normal(shape).astype(dtype))))


POSITIONS = ["w", "dcdw", "lr", "mw_tm1", "vw_tm1"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("position", POSITIONS)
def test_nested_container_in_each_position_matches_reference_leaf_by_leaf(position, dtype):
    rng = np.random.default_rng(POSITIONS.index(position))
    args = {"w": rng.standard_normal(5).astype(dtype), "dcdw": rng.standard_normal(5).astype(dtype),
            "lr": 0.01, "mw_tm1": rng.standard_normal(5).astype(dtype),
            "vw_tm1": np.abs(rng.standard_normal(5)).astype(dtype)}
    container = nested(rng, dtype)
    if position in ("vw_tm1", "lr"):  # state v >= 0; lr finite and >= 0 (adamgen's rule)
        container = container.map_leaves(np.abs)
    args[position] = container
    results = adamgen.adam_update(*args.values(), 7)
    depends = {"w_new": set(POSITIONS), "mw": {"dcdw", "mw_tm1"}, "vw": {"dcdw", "vw_tm1"}}
    for output, result in zip(("w_new", "mw", "vw"), results):
        assert isinstance(result, Container) == (position in depends[output]), output
    for path, leaf in container.leaves():
        leaf_args = {**args, position: leaf}
        expected = adam_update_ref(*leaf_args.values(), 7)
        for result, want in zip(results, expected):
            got = dict(result.leaves())[path] if isinstance(result, Container) else result
            assert same_bits(got, want), path


def test_container_hyperparameters_one_value_per_leaf():
    rng = np.random.default_rng(3)
    w = Container(a=rng.standard_normal(4).astype(np.float32),
                  b=rng.standard_normal(4).astype(np.float32))
    g = rng.standard_normal(4).astype(np.float32)
    m = np.zeros(4, np.float32)
    v = np.zeros(4, np.float32)
    step = Container(a=1, b=1270)
    beta1 = Container(a=0.9, b=0.5)
    beta2 = Container(a=0.999, b=0.99)
    epsilon = Container(a=1e-7, b=1e-3)
    new_w, mw, vw = adamgen.adam_update(w, g, 0.1, m, v, step, beta1=beta1, beta2=beta2,
                                        epsilon=epsilon)
    assert isinstance(mw, Container) and isinstance(vw, Container)  # m depends on beta1
    for key in "ab":
        expected = adam_update_ref(w[key], g, 0.1, m, v, step[key], beta1=beta1[key],
                                   beta2=beta2[key], epsilon=epsilon[key])
        for got, want in zip((new_w[key], mw[key], vw[key]), expected):
            assert same_bits(got, want)


def test_key_mismatch_is_an_error_naming_the_keys():
    w = Container(a=np.ones(2), b=Container(c=np.ones(2)))
    g = Container(a=np.ones(2), b=Container(d=np.ones(2)))
    with pytest.raises(ValueError, match=r"b\.c.*b\.d|b\.d.*b\.c"):
        adamgen.adam_update(w, g, 0.1, np.zeros(2), np.zeros(2), 1)


def test_bad_leaf_with_out_container_writes_nothing():
    w = Container(a=np.ones(3, np.float32), b=np.ones(3, np.float32))
    out = Container(a=np.full(3, 7, np.float32), b=np.full(3, 7, np.float32))
    g = Container(a=np.ones(3, np.float32), b=np.ones(3, np.complex64))  # b is bad
    with pytest.raises(TypeError, match="dcdw"):
        adamgen.adam_update(w, g, 0.1, np.zeros(3, np.float32), np.zeros(3, np.float32), 1,
                            out=out)
    assert (out.a == 7).all() and (out.b == 7).all()
    step = Container(a=1, b=-1)  # a bad hyperparameter leaf
    with pytest.raises(ValueError, match="step"):
        adamgen.adam_update(w, np.ones(3, np.float32), 0.1, np.zeros(3, np.float32),
                            np.zeros(3, np.float32), step, out=out)
    assert (out.a == 7).all() and (out.b == 7).all()


def test_out_container_receives_w_new():
    rng = np.random.default_rng(5)
    w = nested(rng, np.float32)
    out = w.map_leaves(np.zeros_like)
    new_w, _, _ = adamgen.adam_update(w, 1.0, 0.1, 0.0, 0.0, 1, out=out)
    for (path, leaf), (_, target) in zip(new_w.leaves(), out.leaves()):
        assert leaf is target
    with pytest.raises(TypeError, match="out"):
        adamgen.adam_update(w, 1.0, 0.1, 0.0, 0.0, 1, out=np.zeros(5, np.float32))
