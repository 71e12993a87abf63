"""The step helper (adamgen/torch/_native.py): built once, all-or-nothing, and never a
difference a step can show: with it and without it (the Python path), every step gives the same
bits, state, version counters and errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from torch_reference import assert_same_state, give_grads, reference_step, torch, twins

import adamgen.torch as agt
from adamgen.torch import _native

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def helper():
    found = _native.helper()
    if found is None:
        pytest.skip(f"the step helper is unavailable here: {_native.EVENTS[-1:]}")
    return found


@pytest.fixture
def without_helper(monkeypatch):
    """Optimizers built inside take the Python path."""
    monkeypatch.setattr(_native, "_helper", None)
    monkeypatch.setattr(_native, "_tried", True)


def test_the_helper_is_built_where_a_cxx_compiler_and_torchs_headers_are(helper):
    assert callable(helper.take_grads) and callable(helper.same_params)
    params, _ = twins((40,), (3, 5))
    optimizer = agt.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    (bucket,) = optimizer._plans[0].buckets
    assert bucket._native is not None and optimizer._plans[0]._same is not None


# -- the helper's functions: all or nothing ------------------------------------------------------
class Table:
    """A bucket's arrays, as the helper takes them."""

    def __init__(self, params, written=()):
        self.params = params
        self.table = np.full(len(params), 7, np.uintp)
        self.numels = np.array([p.numel() for p in params], np.int64)
        ordered = sorted(written)
        self.starts = np.array([s for s, _ in ordered] or [0], np.uint64)
        self.ends = np.array([e for _, e in ordered] or [0], np.uint64)
        self.count = len(ordered)

    def take(self, helper, counts=None):
        where = (0, 0) if counts is None else (counts.ctypes.data, counts.itemsize)
        return helper.take_grads(self.params, self.table.ctypes.data, self.numels.ctypes.data,
                                 self.starts.ctypes.data, self.ends.ctypes.data, self.count,
                                 *where)


def fresh(*shapes):
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def test_take_grads_writes_every_pointer_and_bumps_every_version(helper):
    params = fresh((4,), (2, 3))
    arrays = Table(params)
    versions = [p._version for p in params]
    assert arrays.take(helper) is True
    assert arrays.table.tolist() == [p.grad.data_ptr() for p in params]
    assert [p._version for p in params] == [v + 1 for v in versions]


@pytest.mark.parametrize("odd", ["no gradient", "wrong size", "non-contiguous", "sparse",
                                 "overlaps a parameter", "overlaps a state buffer", "not a list",
                                 "wrong dtype"])
def test_take_grads_refuses_the_uncommon_case_having_changed_nothing(helper, odd):
    params = fresh((4,), (2, 3), (5,))
    state = torch.zeros(64)
    written = [(p.data_ptr(), p.data_ptr() + 4 * p.numel()) for p in params]
    written.append((state.data_ptr(), state.data_ptr() + 256))
    arrays = Table(params, written)
    with torch.no_grad():
        if odd == "no gradient":
            params[1].grad = None
        elif odd == "wrong size":
            params[2].grad.resize_(3)  # in place: torch's setter would refuse it
        elif odd == "non-contiguous":
            params[1].grad = torch.randn(3, 2).t()
        elif odd == "sparse":
            params[0].grad = torch.zeros(4).to_sparse()
        elif odd == "overlaps a parameter":
            params[0].grad = params[0].detach()
        elif odd == "overlaps a state buffer":
            params[2].grad = state[10:15]
        elif odd == "wrong dtype":
            params[0].data = params[0].data.double()  # the gradient stays float32
    versions = [p._version for p in params]
    if odd == "not a list":
        arrays.params = tuple(params)
    counts = np.full(3, 4.0, np.float32)
    assert arrays.take(helper, counts) is False
    assert arrays.table.tolist() == [7, 7, 7]
    assert [p._version for p in params] == versions
    assert counts.tolist() == [4.0, 4.0, 4.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_take_grads_advances_equal_step_counts_as_torchs_add_rounds(helper, dtype):
    params = fresh((4,), (3,))
    counts = np.full(2, 2.0 ** 24, dtype)  # float32: 2^24 + 1 rounds back to 2^24
    taken = Table(params).take(helper, counts)
    expected = 2.0 ** 24 if dtype is np.float32 else 2.0 ** 24 + 1
    assert type(taken) is float and taken == expected and counts.tolist() == [expected] * 2
    counts = np.array([3.0, 5.0], dtype)  # unequal: committed, counts left to Python
    assert Table(params).take(helper, counts) is True and counts.tolist() == [3.0, 5.0]


def test_same_params_compares_identity_and_pointers(helper):
    params = fresh((4,), (3,))
    pointers = np.array([p.data_ptr() for p in params], np.uint64)
    address = pointers.ctypes.data
    assert helper.same_params(params, tuple(params), address) is True
    assert helper.same_params(params[::-1], tuple(params), address) is False
    assert helper.same_params(params[:1], tuple(params), address) is False
    assert helper.same_params(tuple(params), tuple(params), address) is False  # only lists
    params[1].data = torch.zeros(3)  # moved
    assert helper.same_params(params, tuple(params), address) is False


# -- with and without: the same steps ------------------------------------------------------------
def scenario(cls, events, dtype=None, **options):
    """Steps of ``cls`` through ``events``, returning what a user can see: parameters, state,
    version counters, and each step's error (None when it stepped)."""
    params = [torch.nn.Parameter(t) for t in twins((300,), (12, 7), (5,), dtype=dtype)[0]]
    optimizer = cls(params, lr=0.01, **options)
    seen = []
    for step, event in enumerate(events):
        give_grads(params, [p.detach().clone() for p in params], seed=step,
                   skip=(1,) if event == "skip" else ())
        if event == "rebind":
            params[2].data = params[2].detach().clone() * 1.5
        elif event == "transposed":
            params[1].grad = params[1].grad.t().contiguous().t()
        elif event == "overlap":
            params[2].grad = params[0].detach()[:5]
        elif event == "persist":
            optimizer.zero_grad(set_to_none=False)
            for p in params:
                p.grad.add_(0.25)
        try:
            optimizer.step()
            seen.append(None)
        except (RuntimeError, ValueError) as error:
            seen.append(f"{type(error).__name__}: {error}")
    return params, optimizer, [p._version for p in params], seen


EVENTS = ["plain", "plain", "skip", "plain", "rebind", "plain", "transposed", "persist",
          "persist", "overlap", "plain"]


@pytest.mark.parametrize("cls,options,dtype", [
    (agt.AdamW, {}, None), (agt.Adam, {"amsgrad": True, "weight_decay": 0.1}, None),
    (agt.Lion, {}, None), (agt.AdamW, {"master_weights": True}, torch.bfloat16),
    (agt.AdamW, {"stochastic_rounding": True}, torch.bfloat16)],
    ids=["AdamW", "Adam amsgrad", "Lion", "AdamW bf16 master", "AdamW bf16 stochastic"])
def test_the_helper_changes_no_bit_state_version_or_error(helper, monkeypatch, cls, options,
                                                           dtype):
    fast = scenario(cls, EVENTS, dtype, **options)
    monkeypatch.setattr(_native, "_helper", None)
    monkeypatch.setattr(_native, "_tried", True)
    slow = scenario(cls, EVENTS, dtype, **options)
    assert fast[3] == slow[3]  # the same steps refused, with the same messages
    assert "shares memory" in str(fast[3][EVENTS.index("overlap")])
    assert fast[2] == slow[2]  # version counters
    for index, (p, q) in enumerate(zip(fast[0], slow[0])):
        assert same_bits(p, q), f"param {index}"
        a, b = fast[1].state[p], slow[1].state[q]
        assert sorted(a) == sorted(b)
        for key in a:
            assert same_bits(a[key], b[key]), f"state[{index}][{key!r}]"


def same_bits(a, b):
    """The same dtype, shape and bytes (bfloat16 included, which NumPy cannot hold)."""
    raw = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*raw)


def test_the_python_path_matches_torch_as_the_helper_does(without_helper):
    """The Python path alone, against the reference (the rest of the suite runs with the
    helper wherever it is built)."""
    mine_params, their_params = twins((300,), (12, 7), (5,))
    mine = agt.AdamW(mine_params, lr=0.01)
    theirs = torch.optim.AdamW(their_params, lr=0.01, foreach=False)
    for step in range(4):
        give_grads(mine_params, their_params, seed=step, skip=(1,) if step == 2 else ())
        mine.step()
        reference_step(theirs)
    assert mine._plans[0]._same is None and mine._plans[0].buckets[0]._native is None
    assert_same_state(mine, theirs, mine_params, their_params)


# -- building, and doing without ------------------------------------------------------------------
def run(script: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("ADAMGEN_STRICT", "CXX")}
    environment.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, cwd=ROOT, env=environment, timeout=600, check=False)


STEP = """
    import warnings, torch, adamgen.torch as agt
    from adamgen.torch import _native
    p = torch.nn.Parameter(torch.ones(8))
    optimizer = agt.AdamW([p], lr=0.1)
    p.grad = torch.ones(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    print("helper", _native.helper() is not None, float(p[0]))
    print("warnings", [str(w.message) for w in caught])
"""


def test_a_later_process_loads_the_helper_without_compiling(helper):
    done = run(STEP)  # the session's cache, where this process built or found it
    assert done.returncode == 0, done.stderr
    assert "helper True" in done.stdout and "compiling" not in done.stderr


def test_without_a_cxx_compiler_steps_take_the_python_path_after_one_warning(tmp_path):
    done = run(STEP, CXX=str(tmp_path / "no-such-compiler"),
               ADAMGEN_CACHE_DIR=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert "helper False" in done.stdout
    assert "step helper is unavailable" in done.stdout and "no-such-compiler" in done.stdout
    strict = run(STEP, CXX=str(tmp_path / "no-such-compiler"), ADAMGEN_STRICT="1",
                 ADAMGEN_CACHE_DIR=str(tmp_path / "cache"))
    assert strict.returncode != 0 and "CompileError" in strict.stderr


def test_the_numpy_backend_compiles_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAMGEN_BACKEND", "numpy")
    monkeypatch.setenv("ADAMGEN_CACHE_DIR", str(tmp_path / "cache"))
    from adamgen.config import refresh_environment

    refresh_environment()
    monkeypatch.setattr(_native, "_helper", None)
    monkeypatch.setattr(_native, "_tried", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.helper() is None
    assert _native.EVENTS[-1]["error"] == "ADAMGEN_BACKEND=numpy"
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.so"))
