"""The functional API's shortcuts: a seen signature skips re-deciding, and nothing else changes.

A shortcut must give the bits of the whole way (and the reference), raise every error the whole way
raises (it hands such calls to the whole way), return fresh arrays, and be forgotten with the
decisions and kernels it holds. Speed is measured in benchmarks/hotpath.py, not here.
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
from conftest import assert_all_bitwise_equal
from reference import adam_update_ref

import adamgen
from adamgen.config import refresh_environment
from adamgen.runtime import dispatch, functional, hotpath, ivy, variant_choice

needs_c = pytest.mark.skipif("ivy.ivy_source().c_kernel('float32', frozenset({'lr'})) is None",
                             reason="no C compiler: shortcuts serve C variants only")


def state(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    w, g, m = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    return w, g, m, np.abs(rng.standard_normal(n)).astype(dtype)


def whole_way():
    """An Updater on the JIT's kernels without a hot path: every call goes the whole way."""
    return ivy.bind_adam_update(ivy.IvyUpdater(ivy.ivy_source(), runner=ivy._JIT.runner))


@pytest.fixture
def counted_whole_way(monkeypatch):
    """How many calls of ``adam_update`` went the whole way."""
    calls = []
    real = functional.Updater.whole_way

    def counting(self, *args):
        calls.append(args)
        return real(self, *args)

    monkeypatch.setattr(functional.Updater, "whole_way", counting)
    return calls


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("n", [1, 16, 1000, 5000, 90_001])
def test_a_seen_signature_takes_its_shortcut_with_the_reference_bits(dtype, n, counted_whole_way):
    """5000: threaded C is a candidate; 90,001: outputs come from the recycled blocks."""
    w, g, m, v = state(n, dtype, seed=n)
    for step in (1, 2, 1270, 10**6, 2.5):  # 1270: pow and sqrt differ in the last bit
        expected = adam_update_ref(w, g, 1e-3, m, v, step)
        assert_all_bitwise_equal(adamgen.adam_update(w, g, 1e-3, m, v, step), expected)
        w, m, v = expected
    assert len(counted_whole_way) == 1  # the first call only


@needs_c
@pytest.mark.parametrize("variant", ["c", "c-omp"])
def test_a_forced_c_variant_takes_its_shortcut(variant, monkeypatch, counted_whole_way):
    monkeypatch.setenv("ADAMGEN_VARIANT", variant)
    refresh_environment()
    w, g, m, v = state(20_000, np.float32)
    for step in (3, 4):
        expected = adam_update_ref(w, g, 0.01, m, v, step)
        assert_all_bitwise_equal(adamgen.adam_update(w, g, 0.01, m, v, step), expected)
    assert len(counted_whole_way) == 1


@needs_c
def test_a_zero_d_lr_and_arrays_keep_their_types_on_the_shortcut(counted_whole_way):
    w, g, m, v = state(64, np.float32)
    lr = adamgen.array(np.float32(0.05))
    for _ in range(2):
        results = adamgen.adam_update(adamgen.array(w), g, lr, m, adamgen.array(v), 3)
        assert [type(r) for r in results] == [adamgen.Array, np.ndarray, adamgen.Array]
        assert_all_bitwise_equal(results, adam_update_ref(w, g, lr, m, v, 3))
        results = adamgen.array(w).adam_update(g, 0.05, m, v, 3)
        assert [type(r) for r in results] == [adamgen.Array, np.ndarray, np.ndarray]
    assert len(counted_whole_way) == 2  # one per signature


@needs_c
def test_outputs_are_fresh_arrays_every_call():
    w, g, m, v = state(16, np.float32)
    first = adamgen.adam_update(w, g, 0.1, m, v, 1)
    kept = [a.copy() for a in first]
    second = adamgen.adam_update(w, g, 0.1, m, v, 2)
    for a, b, c in zip(first, second, kept):
        assert a is not b and not np.shares_memory(a, b)
        assert a.flags.writeable and a.flags.c_contiguous and a.tobytes() == c.tobytes()
    for result in second:
        assert not any(np.shares_memory(result, x) for x in (w, g, m, v))


def good_call():
    w, g, m, v = state(6, np.float32, seed=3)
    return {"w": w, "dcdw": g, "lr": 0.1, "mw_tm1": m, "vw_tm1": v, "step": 2}


BAD = {
    "beta1 1.0": {"beta1": 1.0}, "beta1 NaN": {"beta1": float("nan")},
    "beta2 -0.1": {"beta2": -0.1}, "epsilon -1e-8": {"epsilon": -1e-8},
    "epsilon NaN": {"epsilon": float("nan")}, "step -1": {"step": -1},
    "step NaN": {"step": float("nan")}, "step inf": {"step": float("inf")},
    "step 2**1100": {"step": 2**1100}, "step True": {"step": True},
    "step 0, epsilon 0": {"step": 0, "epsilon": 0.0}, "lr -0.1": {"lr": -0.1},
    "lr NaN": {"lr": float("nan")}, "lr inf": {"lr": float("inf")},
    "lr 0-d NaN": {"lr": np.array(np.nan, np.float32)},
    "stop_gradients None": {"stop_gradients": None},
    "stop_gradients 1": {"stop_gradients": 1},
    "dcdw complex": {"dcdw": np.ones(6, np.complex64)},
    "dcdw shape": {"dcdw": np.ones(5, np.float32)},
    "vw_tm1 shape": {"vw_tm1": np.ones((2, 3), np.float32)},
}


@needs_c
@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_a_learned_signature_raises_exactly_what_the_whole_way_raises(bad):
    """With a shortcut in place for the good signature, a bad argument raises the same error, with
    the same message, as an Updater that has never made a shortcut."""
    good = good_call()
    adamgen.adam_update(*good.values())  # learn
    adamgen.adam_update(*good.values())  # on the shortcut
    errors = []
    for update in (adamgen.adam_update, whole_way()):
        arguments = {**good_call(), **bad}
        positional = [arguments.pop(n) for n in ("w", "dcdw", "lr", "mw_tm1", "vw_tm1", "step")]
        with pytest.raises(Exception) as error:
            update(*positional, **arguments)
        errors.append((type(error.value), str(error.value)))
    assert errors[0] == errors[1]


@needs_c
@pytest.mark.parametrize("layout", ["strided", "negative", "misaligned", "fortran", "big-endian",
                                    "float64 dcdw", "int w", "list w", "subclass"])
def test_other_layouts_and_types_of_a_learned_shape_go_the_whole_way(layout,
                                                                     counted_whole_way):
    w, g, m, v = state(12, np.float32)
    adamgen.adam_update(w, g, 0.1, m, v, 2)
    adamgen.adam_update(w, g, 0.1, m, v, 3)
    assert len(counted_whole_way) == 1
    if layout == "strided":
        g = np.repeat(g, 2)[::2]
    elif layout == "negative":
        g = g[::-1].copy()[::-1]
    elif layout == "misaligned":
        raw = np.zeros(g.nbytes + 1, np.uint8)
        g = raw[1:].view(np.float32)
        g[...] = state(12, np.float32)[1]
        assert not g.flags.aligned
    elif layout == "fortran":
        w, g, m, v = (np.asfortranarray(x.reshape(3, 4).T) for x in (w, g, m, v))
    elif layout == "big-endian":
        m = m.astype(">f4")
    elif layout == "float64 dcdw":
        g = g.astype(np.float64)
    elif layout == "int w":
        w = np.arange(12)
    elif layout == "list w":
        w = w.tolist()
    else:
        w = np.ma.masked_array(w)
    expected = adam_update_ref(w, g, 0.1, m, v, 4)
    assert_all_bitwise_equal(adamgen.adam_update(w, g, 0.1, m, v, 4), expected)
    assert len(counted_whole_way) == 2


@needs_c
def test_shortcuts_follow_the_environment_and_are_forgotten_with_the_decisions(
        monkeypatch, counted_whole_way):
    w, g, m, v = state(16, np.float32)
    for _ in range(2):
        adamgen.adam_update(w, g, 0.1, m, v, 2)
    assert len(counted_whole_way) == 1 and ivy._JIT.hotpath.shortcuts
    monkeypatch.setenv("ADAMGEN_VARIANT", "numpy")  # NumPy is not a shortcut's: the whole way
    refresh_environment()
    for _ in range(2):
        adamgen.adam_update(w, g, 0.1, m, v, 2)
    assert len(counted_whole_way) == 3
    monkeypatch.delenv("ADAMGEN_VARIANT")
    refresh_environment()
    adamgen.adam_update(w, g, 0.1, m, v, 2)  # a new environment: learned again
    assert len(counted_whole_way) == 4
    for forget in (variant_choice.forget, dispatch.forget):
        adamgen.adam_update(w, g, 0.1, m, v, 2)
        assert ivy._JIT.hotpath.shortcuts
        forget()
        assert not ivy._JIT.hotpath.shortcuts


def _shortcuts_in_a_forked_child(queue):
    queue.put(len(ivy._JIT.hotpath.shortcuts))


@needs_c
@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="no fork here")
def test_a_forked_child_forgets_the_shortcuts():
    """libgomp is not fork-safe: a child relearns its shortcuts, serially."""
    w, g, m, v = state(16, np.float32)
    adamgen.adam_update(w, g, 0.1, m, v, 2)
    assert ivy._JIT.hotpath.shortcuts
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_shortcuts_in_a_forked_child, args=(queue,))
    child.start()
    child.join(60)
    assert queue.get(timeout=5) == 0


def test_the_flag_bits_are_numpys():
    """``flags.num & _C_ALIGNED`` reads C_CONTIGUOUS and ALIGNED (NumPy's C API values)."""
    assert np.ones(4).flags.num & hotpath._C_ALIGNED == hotpath._C_ALIGNED
    assert np.ones(8)[::2].flags.num & 0x1 == 0
    assert np.zeros(17, np.uint8)[1:].view(np.float64).flags.num & 0x100 == 0


def test_updaters_without_a_router_make_no_shortcuts():
    assert ivy.IvyUpdater(ivy.ivy_source(), runner=ivy._JIT.runner).hotpath is None
