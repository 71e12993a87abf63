"""The NumPy-facing optimizer (``adamgen.rule(...).optimizer``) with float16 parameters.

The three modes of ``adamgen.torch`` (see tests/test_torch_mixed.py), for NumPy's float16:
the rule's own float16 arithmetic (``torch_adamw``'s is torch's, bit for bit), master weights
(the float32 rule on the master, rounded), stochastic rounding (the same bits in every variant,
and the same as adamgen.torch's for the same parameters and seed); state dicts in their own
dtypes, refused across modes.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import adamgen
from adamgen.errors import ArgumentTypeError, ArgumentValueError

SIZES = (1000, 33, 70_001)


def params(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float16) for n in SIZES]


def grads(step: int) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(n).astype(np.float16) for n in SIZES]


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


@pytest.fixture
def variant(request, monkeypatch):
    from adamgen.config import refresh_environment

    monkeypatch.setenv("ADAMGEN_VARIANT", request.param)
    refresh_environment()
    yield request.param
    monkeypatch.delenv("ADAMGEN_VARIANT")
    refresh_environment()


@pytest.mark.parametrize("variant", ["numpy", "c", "c-omp"], indirect=True)
def test_float16_default_is_torchs_arithmetic(variant):
    torch = pytest.importorskip("torch")
    mine = params()
    theirs = [torch.tensor(p, requires_grad=True) for p in mine]
    optimizer = adamgen.rule("torch_adamw").optimizer(mine, lr=0.01, eps=1e-3)
    reference = torch.optim.AdamW(theirs, lr=0.01, eps=1e-3, foreach=False)
    for step in range(3):
        optimizer.step(grads(step))
        for p, g in zip(theirs, grads(step)):
            p.grad = torch.tensor(g)
        reference.step()
    for p, q in zip(mine, theirs):
        assert bits(p) == bits(q.detach().numpy())
    assert optimizer.state["exp_avg"][0].dtype == np.float16


@pytest.mark.parametrize("variant", ["numpy", "c", "c-omp"], indirect=True)
def test_master_weights_are_the_float32_rule_on_the_master_then_rounded(variant):
    low = params(1)
    master = [p.astype(np.float32) for p in low]
    rule = adamgen.rule("torch_adam", amsgrad=True)
    optimizer = rule.optimizer(low, lr=0.01, weight_decay=0.1, master_weights=True)
    reference = rule.optimizer(master, lr=0.01, weight_decay=0.1)
    for step in range(3):
        optimizer.step(grads(step))
        reference.step([g.astype(np.float32) for g in grads(step)])
        for p, m, kept in zip(low, master, optimizer.state["master_param"]):
            assert bits(kept) == bits(m)
            assert bits(p) == bits(m.astype(np.float16))
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        for a, b in zip(optimizer.state[key], reference.state[key]):
            assert a.dtype == np.float32 and bits(a) == bits(b)


def stochastic(variant_seed: int = 3, steps: int = 3) -> list[np.ndarray]:
    low = params(2)
    optimizer = adamgen.rule("torch_adamw").optimizer(low, lr=0.01, stochastic_rounding=True,
                                                      seed=variant_seed)
    for step in range(steps):
        optimizer.step(grads(step))
    return low


def test_stochastic_rounding_gives_the_same_bits_in_every_variant(monkeypatch):
    from adamgen.config import refresh_environment

    found = {}
    for name in ("numpy", "c", "c-omp"):
        monkeypatch.setenv("ADAMGEN_VARIANT", name)
        refresh_environment()
        found[name] = stochastic()
    monkeypatch.delenv("ADAMGEN_VARIANT")
    refresh_environment()
    for name in ("c", "c-omp"):
        for a, b in zip(found["numpy"], found[name]):
            assert bits(a) == bits(b), name
    other = stochastic(variant_seed=4)
    assert bits(other[0]) != bits(found["numpy"][0])


def test_stochastic_rounding_matches_adamgen_torch_for_the_same_parameters_and_seed():
    torch = pytest.importorskip("torch")
    import adamgen.torch as agt

    mine = stochastic()
    low = [torch.tensor(p, requires_grad=True) for p in params(2)]
    optimizer = agt.AdamW(low, lr=0.01, stochastic_rounding=True, seed=3)
    for step in range(3):
        for p, g in zip(low, grads(step)):
            p.grad = torch.tensor(g)
        optimizer.step()
    for a, b in zip(mine, low):
        assert bits(a) == bits(b.detach().numpy())


def test_a_rule_without_float16_arithmetic_needs_master_weights():
    with pytest.raises(ArgumentTypeError, match="master_weights=True"):
        adamgen.rule("ivy_adam").optimizer(params(), lr=1e-3)
    low = params()
    optimizer = adamgen.rule("ivy_adam").optimizer(low, lr=1e-3, master_weights=True)
    optimizer.step(grads(0))
    assert optimizer.state["master_w"][0].dtype == np.float32


def test_float32_parameters_are_unaffected_and_keep_no_master_copy():
    rng = np.random.default_rng(5)
    full = [rng.standard_normal(50).astype(np.float32)]
    twin = [p.copy() for p in full]
    mixed = full + params()[:1]
    optimizer = adamgen.rule("lion").optimizer(mixed, master_weights=True)
    plain = adamgen.rule("lion").optimizer(twin)
    step_grads = [rng.standard_normal(50).astype(np.float32)]
    optimizer.step(step_grads + grads(0)[:1])
    plain.step(step_grads)
    assert bits(full[0]) == bits(twin[0])
    assert optimizer.state["master_param"][0] is None
    assert optimizer.state["master_param"][1].dtype == np.float32


@pytest.mark.parametrize("options", [{}, {"master_weights": True},
                                     {"stochastic_rounding": True, "seed": 11}])
def test_a_state_dict_round_trip_keeps_every_bit(options):
    low, twin = params(3), params(3)
    rule = adamgen.rule("torch_adamw")
    optimizer = rule.optimizer(low, lr=0.01, **options)
    optimizer.step(grads(0))
    saved = copy.deepcopy(optimizer.state_dict())
    for p, q in zip(low, twin):
        q[...] = p
    restored = rule.optimizer(twin, lr=0.01, **{k: v for k, v in options.items()
                                                if k != "seed"})
    restored.load_state_dict(saved)
    assert restored.seed == options.get("seed", 0)
    for step in (1, 2):
        optimizer.step(grads(step))
        restored.step(grads(step))
    for p, q in zip(low, twin):
        assert bits(p) == bits(q)
    for key, values in optimizer.state.items():
        for a, b in zip(values, restored.state[key]):
            assert a.dtype == b.dtype and bits(a) == bits(b)
    copied = pickle.loads(pickle.dumps((low, optimizer)))[1]
    assert copied.stochastic_rounding == optimizer.stochastic_rounding
    assert copied.seed == optimizer.seed


@pytest.mark.parametrize("saved,loading", [({"master_weights": True}, {}),
                                           ({}, {"stochastic_rounding": True})])
def test_a_state_dict_of_the_other_kind_is_refused_and_nothing_changes(saved, loading):
    rule = adamgen.rule("torch_adamw")
    source = rule.optimizer(params(), **saved)
    source.step(grads(0))
    target = rule.optimizer(params(), **loading)
    target.step(grads(1))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ArgumentValueError, match="master weights"):
        target.load_state_dict(source.state_dict())
    after = target.state_dict()
    assert after["step"] == before["step"]
    for key, values in before.items():
        if isinstance(values, list):
            assert all(bits(a) == bits(b) for a, b in zip(values, after[key]))


def test_stochastic_rounding_in_float16_is_unbiased_through_the_optimizer():
    """lr = 0: the master stays, and each step rounds it again with the step's bits."""
    values = (np.linspace(1.0, 2.0, 257)[:-1] + 2.0**-12).astype(np.float32)
    param = [values.astype(np.float16)]
    optimizer = adamgen.rule("torch_adamw").optimizer(param, lr=0.0, weight_decay=0.0,
                                                      stochastic_rounding=True)
    optimizer.state["master_param"][0][...] = values  # the master, between float16 values
    total = np.zeros(values.size)
    draws = 2000
    for _ in range(draws):
        optimizer.step([np.zeros(values.size, np.float16)])
        total += param[0].astype(np.float64)
    error = np.abs(total / draws - values) / 2.0**-10
    assert error.max() < 5 * 0.5 / np.sqrt(draws)
