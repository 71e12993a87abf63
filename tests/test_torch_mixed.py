"""``adamgen.torch`` with bfloat16 and float16 parameters: the three mixed-precision modes.

* mode 1 (default): torch's own arithmetic, bit for bit against ``torch.optim`` itself (its
  low-precision square root is ``sqrtf``, correctly rounded, so there is no IEEE-sqrt caveat
  here), except where torch's own result depends on its thread count: coupled weight decay in
  the scalar tail of a parallel chunk (tested: exactly those elements, nothing else);
* mode 2 (``master_weights=True``): bit for bit the float32 rule applied to the master copy,
  then rounded to nearest even;
* mode 3 (``stochastic_rounding=True``): the same master and state, the parameter rounded
  stochastically, with bits that depend on the seed, the step, the parameter's key and the
  element only (threads, rebuilding, subsets), and unbiased;
* state dicts keep every dtype and every bit, and refuse a checkpoint of the other kind.

NaN payloads are not compared (torch's bfloat16 NaN depends on the SIMD lane), NaN-ness is.
"""

from __future__ import annotations

import copy
import io
import pickle
import zlib

import pytest
from peers import require_torch

torch = require_torch()
import adamgen.torch as agt

LOW = (torch.bfloat16, torch.float16)
INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor, name: str = "tensor") -> None:
    """Same dtype, shape and bits; a NaN equals any NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
    differ = differing(a, b)
    assert not differ.any(), (f"{name}: {int(differ.sum())} of {a.numel()} elements differ, "
                              f"first at {torch.nonzero(differ.reshape(-1))[:5].ravel().tolist()}")


def differing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where ``a`` and ``b`` differ in their bits (NaNs equal), flattened in memory order."""
    a, b = a.detach().contiguous().reshape(-1), b.detach().contiguous().reshape(-1)
    bits = INT[a.element_size()]
    return (a.view(bits) != b.view(bits)) & ~(torch.isnan(a) & torch.isnan(b))


def params(shapes, dtype, seed=0, layout="contiguous"):
    """Two lists of equal leaf parameters of ``dtype`` (separate memory)."""
    generator = torch.Generator().manual_seed(seed)
    first, second = [], []
    for shape in shapes:
        if layout == "transposed" and len(shape) == 2:
            base = torch.randn(shape[::-1], generator=generator).to(dtype)
            values = [base.t(), base.clone().t()]
        elif layout == "strided":
            base = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator).to(dtype)
            values = [base[..., ::2], base.clone()[..., ::2]]
        else:
            base = torch.randn(shape, generator=generator).to(dtype)
            values = [base, base.clone()]
        first.append(values[0].requires_grad_())
        second.append(values[1].requires_grad_())
    return first, second


def gradients(like, seed, specials=False, scale=1.0):
    """Fresh gradients shaped (and laid out) like ``like``, of its dtype."""
    generator = torch.Generator().manual_seed(seed)
    found = []
    for p in like:
        grad = torch.randn(p.shape, generator=generator) * scale
        if specials and grad.numel() > 8:
            grad.view(-1)[:5] = torch.tensor([0.0, -0.0, 1e-30, float("inf"), -1e-38])
        found.append(torch.empty_like(p).copy_(grad.to(p.dtype)))
    return found


def step_both(first, second, p1, p2, steps, specials=False, first_seed=0):
    for step in range(steps):
        for p, q, g in zip(p1, p2, gradients(p1, first_seed + step, specials)):
            p.grad, q.grad = g.clone(), g.clone()
        first.step()
        second.step()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHAPES = ((1000,), (33, 7), (5,), (4096,))


# --- mode 1: torch's arithmetic ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_adamw_is_torch_bit_for_bit(dtype, amsgrad, maximize, weight_decay, layout):
    mine_params, their_params = params(SHAPES, dtype, layout=layout)
    options = {"lr": 0.01, "betas": (0.9, 0.999),
               "eps": 1e-3 if dtype == torch.float16 else 1e-8, "weight_decay": weight_decay,
               "amsgrad": amsgrad, "maximize": maximize}
    mine = agt.AdamW(mine_params, **options)
    theirs = torch.optim.AdamW(their_params, foreach=False, **options)
    step_both(mine, theirs, mine_params, their_params, steps=6, specials=True)
    for index, (p, q) in enumerate(zip(mine_params, their_params)):
        same_bits(p, q, f"param {index}")
        for key in theirs.state[q]:
            same_bits(mine.state[p][key], theirs.state[q][key], f"state[{index}][{key}]")
            assert mine.state[p][key].dtype == (torch.float32 if key == "step" else dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("betas,lr,eps", [((0.9, 0.999), 1e-3, 1e-3), ((0.3, 0.95), 0.0123, 1e-3)])
def test_adam_without_weight_decay_is_torch_bit_for_bit(dtype, betas, lr, eps):
    mine_params, their_params = params(SHAPES, dtype, seed=1)
    mine = agt.Adam(mine_params, lr=lr, betas=betas, eps=eps)
    theirs = torch.optim.Adam(their_params, lr=lr, betas=betas, eps=eps, foreach=False)
    step_both(mine, theirs, mine_params, their_params, steps=6)
    for p, q in zip(mine_params, their_params):
        same_bits(p, q)
        same_bits(mine.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("size", [4096, 4099, 1000, 40_005])
def test_adam_coupled_decay_differs_from_torch_only_in_its_scalar_tail(dtype, size):
    """At one torch thread a contiguous tensor of n elements is one chunk: its last n mod 32
    elements are torch's scalar tail, where ``grad.add(param, alpha=wd)`` rounds p*wd to the
    low dtype before adding; everywhere else torch is matched bit for bit, at every step."""
    mine_params, their_params = params(((size,),), dtype, seed=2)
    mine = agt.Adam(mine_params, lr=0.01, weight_decay=0.3, eps=1e-3)
    theirs = torch.optim.Adam(their_params, lr=0.01, weight_decay=0.3, eps=1e-3, foreach=False)
    tail = size % 32
    for step in range(5):
        step_both(mine, theirs, mine_params, their_params, steps=1, first_seed=10 + step)
        for a, b in ((mine_params[0], their_params[0]),
                     (mine.state[mine_params[0]]["exp_avg"],
                      theirs.state[their_params[0]]["exp_avg"])):
            where = torch.nonzero(differing(a, b)).ravel()
            assert where.numel() == 0 or int(where.min()) >= size - tail, where[:5]
    if tail == 0:
        same_bits(mine_params[0], their_params[0])


def test_float16_with_torchs_default_eps_divides_by_zero_as_torch_does():
    """float16(1e-8) is 0: a zero gradient at step 1 gives 0/0 in torch, and here."""
    mine_params, their_params = params(((64,),), torch.float16)
    mine = agt.AdamW(mine_params)
    theirs = torch.optim.AdamW(their_params, foreach=False)
    for p, q in zip(mine_params, their_params):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    mine.step()
    theirs.step()
    assert torch.isnan(mine_params[0]).all() and torch.isnan(their_params[0]).all()


# --- mode 2: master weights --------------------------------------------------------------------

def master_reference(cls, low_params, **options):
    """The float32 rule on float32 copies of the parameters (adamgen's own float32 optimizer,
    which the torch conformance tests tie to torch's arithmetic)."""
    masters = [p.detach().float().clone().requires_grad_() for p in low_params]
    return masters, cls(masters, **options)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("cls", [agt.AdamW, agt.Adam])
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, True)])
def test_master_weights_are_the_float32_rule_on_the_master_then_rounded(dtype, cls, amsgrad,
                                                                        maximize):
    low, _ = params(SHAPES, dtype, seed=3)
    options = {"lr": 0.01, "weight_decay": 0.1, "amsgrad": amsgrad, "maximize": maximize}
    mine = cls(low, master_weights=True, **options)
    masters, reference = master_reference(cls, low, **options)
    for step in range(6):
        for p, m, g in zip(low, masters, gradients(low, step, specials=True)):
            p.grad, m.grad = g, g.float()  # the low gradient, widened exactly
        mine.step()
        reference.step()
        for index, (p, m) in enumerate(zip(low, masters)):
            state = mine.state[p]
            same_bits(state["master_param"], m.detach(), f"master {index} at step {step}")
            same_bits(p.detach(), m.detach().to(dtype), f"param {index} at step {step}")
            for key in ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ())):
                same_bits(state[key], reference.state[m][key], f"{key} {index}")
    assert [k for k in mine.state[low[0]]] == \
        ["step", "exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if amsgrad else []),
         "master_param"]
    assert all(v.dtype == torch.float32 for v in mine.state[low[0]].values())


def test_float32_parameters_are_unaffected_by_the_mixed_precision_arguments():
    first, second = params(((300,), (7, 3)), torch.float32)
    mine = agt.AdamW(first, master_weights=True, stochastic_rounding=True, seed=9)
    plain = agt.AdamW(second)
    step_both(mine, plain, first, second, steps=3)
    for p, q in zip(first, second):
        same_bits(p, q)
        assert sorted(mine.state[p]) == sorted(plain.state[q])


def test_groups_may_mix_modes_and_dtypes():
    low, low_too = params(((100,),), torch.bfloat16)
    full, full_too = params(((50,),), torch.float32)
    mine = agt.AdamW([{"params": low, "master_weights": True}, {"params": full}], lr=0.01)
    reference = agt.AdamW([{"params": low_too}, {"params": full_too}], lr=0.01)
    step_both(mine, reference, low + full, low_too + full_too, steps=2)
    assert "master_param" in mine.state[low[0]] and "master_param" not in reference.state[
        low_too[0]]
    same_bits(full[0], full_too[0])


# --- mode 3: stochastic rounding --------------------------------------------------------------

def stochastic_run(shapes=((100_003,), (37,)), steps=3, seed=0, threads=1, names=None,
                   build_seed=5, **options):
    torch.set_num_threads(threads)
    low, _ = params(shapes, torch.bfloat16, seed=build_seed)
    given = list(zip(names, low)) if names is not None else low
    optimizer = agt.AdamW(given, lr=0.01, stochastic_rounding=True, seed=seed, **options)
    for step in range(steps):
        for p, g in zip(low, gradients(low, 100 + step)):
            p.grad = g
        optimizer.step()
    return low, optimizer


def test_stochastic_rounding_keeps_the_master_of_master_weights_and_rounds_up_or_down():
    low, optimizer = stochastic_run(steps=4)
    twin, _ = params(((100_003,), (37,)), torch.bfloat16, seed=5)
    reference = agt.AdamW(twin, lr=0.01, master_weights=True)
    for step in range(4):
        for p, g in zip(twin, gradients(twin, 100 + step)):
            p.grad = g
        reference.step()
    for p, q in zip(low, twin):
        master = optimizer.state[p]["master_param"]
        same_bits(master, reference.state[q]["master_param"])
        bits = master.contiguous().view(torch.int32)
        down = (bits & ~0xFFFF).view(torch.float32).to(torch.bfloat16)  # toward zero
        up = ((bits & ~0xFFFF) + 0x10000).view(torch.float32).to(torch.bfloat16)
        value = p.detach()
        ok = (value.view(torch.int16) == down.view(torch.int16)) | \
            (value.view(torch.int16) == up.view(torch.int16))
        assert ok.all()
        rounded_up = (value.view(torch.int16) != down.view(torch.int16)) & \
            ((bits & 0xFFFF) != 0)
        inexact = int(((bits & 0xFFFF) != 0).sum())
        if inexact > 1000:  # both ways, about equally often
            assert 0.45 * inexact < int(rounded_up.sum()) < 0.55 * inexact


def test_stochastic_bits_depend_on_the_seed_only_not_on_threads_or_rebuilding():
    one, _ = stochastic_run(threads=1)
    two, _ = stochastic_run(threads=2)
    again, _ = stochastic_run(threads=1)
    other, _ = stochastic_run(threads=1, seed=1)
    for a, b, c in zip(one, two, again):
        same_bits(a, b, "1 vs 2 threads")
        same_bits(a, c, "rebuilt")
    assert differing(one[0], other[0]).any()


def test_named_parameters_keep_their_stream_in_a_subset():
    """With names (``named_parameters()``) each parameter's key is the CRC-32 of its name, so
    an optimizer over a subset (a sharding wrapper's shard) draws the same bits for it."""
    full, _ = stochastic_run(shapes=((64,), (300,), (17,)), names=["a", "b", "c"])
    generator_values, _ = params(((64,), (300,), (17,)), torch.bfloat16, seed=5)
    torch.set_num_threads(1)
    subset = [("b", generator_values[1]), ("c", generator_values[2])]
    optimizer = agt.AdamW(subset, lr=0.01, stochastic_rounding=True)
    for step in range(3):
        for p, g in zip(generator_values, gradients(generator_values, 100 + step)):
            p.grad = g
        optimizer.step()
    same_bits(full[1], generator_values[1])
    same_bits(full[2], generator_values[2])
    assert optimizer._stream_keys(0) == [zlib.crc32(b"b"), zlib.crc32(b"c")]


def test_without_names_the_key_is_the_position():
    _, optimizer = stochastic_run(shapes=((8,), (8,)), steps=1)
    assert optimizer._stream_keys(0) == [0, 1]
    optimizer.add_param_group({"params": [torch.zeros(3, dtype=torch.bfloat16,
                                                      requires_grad=True)]})
    assert optimizer._stream_keys(1) == [2]


def test_stochastic_rounding_is_unbiased_through_the_optimizer():
    """lr = 0 keeps each master fixed; each step rounds it again with fresh bits (the step is
    in the counter): the mean of the parameter over many steps converges to the master."""
    torch.set_num_threads(1)
    values = torch.linspace(1.0, 2.0, 257)[:-1] + 2.0**-12  # strictly between bf16 numbers
    param = values.to(torch.bfloat16).requires_grad_()
    optimizer = agt.AdamW([param], lr=0.0, weight_decay=0.0, stochastic_rounding=True)
    param.grad = torch.zeros_like(param)
    optimizer.step()
    master = optimizer.state[param]["master_param"].clone()
    total = torch.zeros_like(master, dtype=torch.float64)
    draws = 4000
    for _ in range(draws):
        optimizer.step()
        total += param.detach().double()
    same_bits(optimizer.state[param]["master_param"], master)
    mean = total / draws
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    # each draw is down or up (ulp apart): the mean's standard error is at most ulp/2/sqrt(n)
    error = ((mean - master.double()) / ulp).abs()
    assert float(error.max()) < 5 * 0.5 / draws**0.5
    assert float((mean - master.double()).mean().abs() / ulp) < 0.5 / (256 * draws) ** 0.5 * 5


def test_float16_stochastic_rounding_keeps_the_master_and_rounds_to_a_neighbour():
    low, _ = params(((5000,),), torch.float16, seed=8)
    twin, _ = params(((5000,),), torch.float16, seed=8)
    sr = agt.AdamW(low, lr=0.01, stochastic_rounding=True)
    rn = agt.AdamW(twin, lr=0.01, master_weights=True)
    step_both(sr, rn, low, twin, steps=3)
    master = sr.state[low[0]]["master_param"]
    same_bits(master, rn.state[twin[0]]["master_param"])
    nearest = master.to(torch.float16).float()
    spacing = torch.where(master.abs() < 2**-14, torch.tensor(2.0**-24),
                          2.0 ** (torch.floor(torch.log2(master.abs())) - 10))
    gap = (low[0].detach().float() - master).abs()
    assert bool((gap < spacing).all())
    assert int((low[0].detach().float() != nearest).sum()) > 100  # not rounding to nearest


# --- state dicts ------------------------------------------------------------------------------

MODES = {"torch": {}, "master": {"master_weights": True},
         "stochastic": {"stochastic_rounding": True, "seed": 7}}


def trained(mode, dtype=torch.bfloat16, steps=3, amsgrad=False):
    low, twin = params(((200,), (9, 4)), dtype, seed=4)
    optimizer = agt.AdamW(low, lr=0.01, amsgrad=amsgrad, **MODES[mode])
    for step in range(steps):
        for p, g in zip(low, gradients(low, step)):
            p.grad = g
        optimizer.step()
    for p, q in zip(low, twin):
        q.data.copy_(p.data)
    return low, twin, optimizer


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("amsgrad", [False, True])
def test_a_checkpoint_round_trip_keeps_every_bit_and_training_continues(mode, amsgrad):
    low, twin, optimizer = trained(mode, amsgrad=amsgrad)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    restored = agt.AdamW(twin, lr=0.01, amsgrad=amsgrad,
                         **{k: v for k, v in MODES[mode].items() if k != "seed"})
    restored.load_state_dict(loaded)
    for p, q in zip(low, twin):
        for key, value in optimizer.state[p].items():
            assert restored.state[q][key].dtype == value.dtype, key
            same_bits(restored.state[q][key], value, key)
    expected = torch.float32 if mode != "torch" else torch.bfloat16
    assert optimizer.state[low[0]]["exp_avg"].dtype == expected
    step_both(optimizer, restored, low, twin, steps=3, first_seed=50)
    for p, q in zip(low, twin):
        same_bits(p, q)
        for key in optimizer.state[p]:
            same_bits(optimizer.state[p][key], restored.state[q][key], key)


@pytest.mark.parametrize("saved,loading", [("master", "torch"), ("stochastic", "torch"),
                                           ("torch", "master"), ("torch", "stochastic")])
def test_a_checkpoint_of_the_other_kind_is_refused_and_nothing_changes(saved, loading):
    _, _, source = trained(saved)
    low, _, target = trained(loading)
    before = copy.deepcopy(target.state_dict())
    kept = [p.detach().clone() for p in low]
    with pytest.raises(ValueError, match="master"):
        target.load_state_dict(source.state_dict())
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, value in before["state"].items():
        for name, tensor in value.items():
            same_bits(after["state"][key][name], tensor, name)
    for p, q in zip(low, kept):
        same_bits(p.detach(), q)


def test_a_torch_checkpoint_of_bf16_parameters_is_refused_by_master_weights():
    low, twin = params(((50,),), torch.bfloat16)
    theirs = torch.optim.AdamW(twin, foreach=False)
    twin[0].grad = torch.ones_like(twin[0])
    theirs.step()
    mine = agt.AdamW(low, master_weights=True)
    with pytest.raises(ValueError, match="without master weights"):
        mine.load_state_dict(theirs.state_dict())
    assert not mine.state


def test_master_and_stochastic_checkpoints_load_into_each_other():
    low, twin, optimizer = trained("master")
    other = agt.AdamW(twin, lr=0.01, stochastic_rounding=True)
    other.load_state_dict(optimizer.state_dict())
    same_bits(other.state[twin[0]]["master_param"], optimizer.state[low[0]]["master_param"])
    assert other.param_groups[0]["stochastic_rounding"]


def test_mode_one_checkpoints_cross_with_torch_both_ways():
    low, twin, optimizer = trained("torch")
    theirs = torch.optim.AdamW(twin, lr=0.01, foreach=False)
    theirs.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    step_both(optimizer, theirs, low, twin, steps=3, first_seed=70)
    for p, q in zip(low, twin):
        same_bits(p, q)


def test_copies_and_pickles_keep_the_mode_and_the_state():
    _, _, optimizer = trained("stochastic")
    for copied in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        group = copied.param_groups[0]
        assert group["stochastic_rounding"] and group["seed"] == 7
        p = copied.param_groups[0]["params"][0]
        assert copied.state[p]["master_param"].dtype == torch.float32


def test_constructor_arguments_are_checked():
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(TypeError, match="master_weights"):
        agt.AdamW([p], master_weights=1)
    with pytest.raises(ValueError, match="seed"):
        agt.AdamW([p], seed=-1)
    with pytest.raises(TypeError, match="bfloat16"):
        agt.Lion([p])
    assert agt.Adam([p]).defaults["master_weights"] is False


def test_numpy_serves_when_c_is_forbidden(monkeypatch):
    """ADAMGEN_BACKEND=numpy: the generated NumPy modules give the same bits in every mode."""
    from adamgen import config
    from adamgen.torch import _kernels

    results = {}
    for backend in ("c", "numpy"):
        monkeypatch.setenv("ADAMGEN_BACKEND", backend)
        config.refresh_environment()
        _kernels.rule_kernel.cache_clear()
        try:
            for mode in MODES:
                low, _, optimizer = trained(mode, steps=2)
                results[backend, mode] = [p.detach().clone() for p in low] + [
                    optimizer.state[low[0]]["exp_avg"].clone()]
        finally:
            monkeypatch.delenv("ADAMGEN_BACKEND")
            config.refresh_environment()
            _kernels.rule_kernel.cache_clear()
    for mode in MODES:
        for a, b in zip(results["c", mode], results["numpy", mode]):
            same_bits(a, b, mode)
