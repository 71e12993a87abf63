"""The loader: measured choices apply an update exactly once, persist, and never change bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from reference import adam_update_ref

import adamgen
from adamgen.config import refresh_environment
from adamgen.errors import ConfigError
from adamgen.runtime import loader

VARIANTS = [None, "numpy", "c", "c-omp"]  # None: measured


def one_step(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    w, g, m = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    v = np.abs(rng.standard_normal(n)).astype(dtype)
    return w, g, m, v


def forget_everything():
    from adamgen.runtime import c_kernels, dispatch, kernels

    loader.forget()
    dispatch.forget()
    c_kernels.clear_memo()
    kernels.kernel_cache.cache_clear()


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAMGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ADAMGEN_VARIANT", raising=False)
    refresh_environment()
    forget_everything()
    yield
    monkeypatch.undo()
    forget_everything()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v or "measured")
@pytest.mark.parametrize("n", [1, 17, 5000, 70_001])
def test_out_is_w_applies_exactly_one_update(variant, n, monkeypatch):
    if variant:
        monkeypatch.setenv("ADAMGEN_VARIANT", variant)
    refresh_environment()
    loader.forget()  # a new bucket decision: the measurement runs during this very call
    w, g, m, v = one_step(n, np.float32, seed=n)
    expected = adam_update_ref(w, g, 0.01, m, v, 3)
    result = adamgen.adam_update(w, g, 0.01, m, v, 3, out=w)
    assert result[0] is w
    for got, want in zip((w, result[1], result[2]), expected):
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v or "measured")
def test_optimizer_step_applies_exactly_one_update(variant, monkeypatch):
    if variant:
        monkeypatch.setenv("ADAMGEN_VARIANT", variant)
    refresh_environment()
    loader.forget()
    params = [one_step(n, np.float64, seed=n)[0] for n in (3, 4096, 20_000)]
    before = [p.copy() for p in params]
    opt = adamgen.Adam(params, lr=0.05)
    grads = [np.full(p.shape, 0.5) for p in params]
    opt.step(grads)
    for p, b, g in zip(params, before, grads):
        expected = adam_update_ref(b, g, 0.05, np.zeros_like(b), np.zeros_like(b), 1)[0]
        assert p.tobytes() == expected.tobytes()


def test_every_variant_gives_the_same_bits(monkeypatch):
    results = {}
    w, g, m, v = one_step(100_003, np.float32, seed=9)
    v[:3] = [np.nan, -1.0, np.inf]
    for variant in ("numpy", "c", "c-omp"):
        monkeypatch.setenv("ADAMGEN_VARIANT", variant)
        refresh_environment()
        results[variant] = [r.tobytes() for r in adamgen.adam_update(w, g, 0.01, m, v, 1270)]
    assert results["numpy"] == results["c"] == results["c-omp"]


@pytest.mark.parametrize("forced, candidates, expected", [
    ("c-omp", ("numpy", "c"), "c"),  # one thread, no OpenMP or few elements: serial C
    ("c-omp", ("numpy",), "numpy"),  # float16: no C at all
    ("c", ("numpy",), "numpy"),
    ("c", ("numpy", "c", "c-omp"), "c"),
    ("numpy", ("numpy", "c", "c-omp"), "numpy"),
])
def test_a_forced_variant_that_does_not_fit_yields_to_the_nearest_that_does(
        forced, candidates, expected, monkeypatch):
    monkeypatch.setenv("ADAMGEN_VARIANT", forced)
    refresh_environment()
    never = {"numpy": None}  # forcing measures nothing
    assert loader.choose("p", 100, candidates, {}, lambda m: never, 4) == expected


def test_unknown_variant_is_an_error_naming_the_accepted_ones(monkeypatch):
    monkeypatch.setenv("ADAMGEN_VARIANT", "gpu")
    with pytest.raises(ConfigError, match="ADAMGEN_VARIANT.*numpy, c, c-omp"):
        refresh_environment()


def test_measurement_stays_within_its_budget_and_is_remembered(fresh_loader, monkeypatch):
    monkeypatch.setattr(loader, "run_delay", lambda: 0.0)  # a busy machine: tested below
    w, g, m, v = one_step(1 << 22, np.float32)  # beyond the timed slice: a slice is timed
    adamgen.adam_update(w, g, 0.01, m, v, 2)
    decisions = [d for d in loader.decisions() if d.bucket == (1 << 22).bit_length()]
    assert decisions and decisions[0].source == "measured"
    assert decisions[0].timed_elements < (1 << 22)
    assert sum(decisions[0].seconds.values()) < 0.5
    assert set(decisions[0].seconds) >= {"numpy", "c"}


@pytest.mark.parametrize("waits", [[0.0, 1.0, 1.0, 2.0], [0.0, 1.0, 1.0, 1.0]],
                         ids=["disturbed twice", "disturbed once"])
def test_a_disturbed_measurement_is_repeated_and_never_persisted(fresh_loader, monkeypatch,
                                                                 tmp_path, waits):
    """A measurement during which this thread waited for a CPU (a neighbour, or another
    library's spinning threads) is taken again; only an undisturbed one is remembered."""
    delays = iter(waits)  # run_delay() before and after each attempt: 1 s of waiting = disturbed
    monkeypatch.setattr(loader, "run_delay", lambda: next(delays))
    made = []

    def timers(m):
        made.append(m)
        return {"numpy": lambda: None, "c": lambda: None}

    winner = loader.choose("p", 5000, ("numpy", "c"), {}, timers, 4)
    assert winner in ("numpy", "c") and len(made) == 2
    (decision,) = loader.decisions()
    persisted = list((tmp_path / "cache").rglob("choices/*.json"))
    if waits[-1] > waits[-2]:
        assert decision.source == "measured, disturbed: not remembered" and persisted == []
    else:
        assert decision.source == "measured" and len(persisted) == 1


def test_a_later_process_reuses_the_persisted_choice(tmp_path):
    env = {**os.environ, "ADAMGEN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("ADAMGEN_VARIANT", None)
    code = textwrap.dedent("""
        import json
        import numpy as np
        import adamgen
        from adamgen.runtime import loader
        loader.run_delay = lambda: 0.0  # a busy machine must not stop the choice being persisted
        x = np.ones(50_000, np.float32)
        adamgen.adam_update(x, x, 0.1, x, x, 1)
        print(json.dumps([[d.problem, d.bucket, d.winner, d.source] for d in loader.decisions()]))
    """)
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert [d[3] for d in first] == ["measured"]
    assert [d[3] for d in second] == ["cache dir"]
    assert first[0][:3] == second[0][:3]


def test_info_prints_the_variant_table(tmp_path):
    env = {**os.environ, "ADAMGEN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("ADAMGEN_VARIANT", None)
    completed = subprocess.run([sys.executable, "-m", "adamgen", "info", "--build"], env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    for expected in ("variants", "bucket", "winner", "float16", "mode"):
        assert expected in completed.stdout, completed.stdout


@pytest.mark.parametrize("shape", [(), (1,)])
def test_measuring_a_one_element_in_place_update_never_touches_the_callers_array(
        shape, fresh_loader):
    """Regression (found by hypothesis): timing ran the in-place form on a view of ``w``."""
    w = np.full(shape, 3.0)
    g, m, v = np.full(shape, 0.5), np.full(shape, 0.1), np.full(shape, 0.2)
    expected = adam_update_ref(w.copy(), g, 0.01, m, v, 2)
    adamgen.adam_update(w, g, 0.01, m, v, 2, out=w)
    assert w.tobytes() == expected[0].tobytes()
