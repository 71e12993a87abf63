"""``adamgen.torch`` state: torch's ``state_dict`` format both ways, ``torch.save``/``load``,
copies and pickles, state written from outside (ZeroRedundancyOptimizer's way), refused
checkpoints. Every "continues" check is bit for bit against the reference."""

from __future__ import annotations

import copy
import pickle

import pytest
from torch_reference import assert_same, assert_same_state, give_grads, reference_step, torch, twins

import adamgen.torch as agt

SHAPES = ((300,), (12, 7), (5,))


def trained(cls, params, steps=3, **kwargs):
    optimizer = cls(params, **kwargs)
    for step in range(steps):
        for index, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + index),
                                 dtype=p.dtype)
        if cls in (agt.Adam, agt.AdamW, agt.Lion):
            optimizer.step()
        else:
            reference_step(optimizer)
    return optimizer


def continue_both(mine, theirs, mine_params, their_params, steps=3, direct=False):
    """More steps of both (``direct``: ``theirs`` is not a torch.optim reference: step it as
    is), then the same bits everywhere."""
    for step in range(steps):
        give_grads(mine_params, their_params, seed=100 + step)
        mine.step()
        theirs.step() if direct else reference_step(theirs)
    assert_same_state(mine, theirs, mine_params, their_params)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_a_torch_checkpoint_loads_into_adamgen_and_training_continues(amsgrad):
    mine_params, their_params = twins(*SHAPES)
    theirs = trained(torch.optim.AdamW, their_params, amsgrad=amsgrad, weight_decay=0.1, lr=0.01)
    for p, q in zip(mine_params, their_params):
        p.data.copy_(q.data)
    mine = agt.AdamW(mine_params, amsgrad=amsgrad, weight_decay=0.1, lr=0.01)
    mine.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert_same_state(mine, theirs, mine_params, their_params)
    continue_both(mine, theirs, mine_params, their_params)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_an_adamgen_checkpoint_loads_into_torch_and_training_continues(amsgrad):
    mine_params, their_params = twins(*SHAPES)
    mine = trained(agt.AdamW, mine_params, amsgrad=amsgrad, lr=0.01)
    for p, q in zip(mine_params, their_params):
        q.data.copy_(p.data)
    theirs = torch.optim.AdamW(their_params, amsgrad=amsgrad, lr=0.01, foreach=False)
    theirs.load_state_dict(copy.deepcopy(mine.state_dict()))
    assert_same_state(mine, theirs, mine_params, their_params)
    continue_both(mine, theirs, mine_params, their_params)


def test_state_dict_is_torchs_format():
    mine_params, their_params = twins(*SHAPES)
    mine = trained(agt.Adam, mine_params, amsgrad=True)
    theirs = trained(torch.optim.Adam, their_params, amsgrad=True)
    a, b = mine.state_dict(), theirs.state_dict()
    # torch's keys, plus the mixed-precision modes' (torch.optim ignores keys it does not read)
    precision = {"master_weights": False, "stochastic_rounding": False, "seed": 0}
    assert a["param_groups"] == [{**group, **precision} for group in b["param_groups"]]
    assert sorted(a["state"]) == sorted(b["state"])
    for key in b["state"]:
        assert type(a["state"][key]) is dict
        assert list(a["state"][key]) == list(b["state"][key])  # the same keys, in torch's order
        for name, tensor in b["state"][key].items():
            assert a["state"][key][name].dtype == tensor.dtype
            assert a["state"][key][name].shape == tensor.shape


def test_torch_save_and_load_with_weights_only(tmp_path):
    mine_params, their_params = twins(*SHAPES)
    mine = trained(agt.AdamW, mine_params)
    for p, q in zip(mine_params, their_params):
        q.data.copy_(p.data)
    path = tmp_path / "optimizer.pt"
    torch.save(mine.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    fresh = agt.AdamW(mine_params)
    fresh.load_state_dict(loaded)
    theirs_too = torch.optim.AdamW(their_params, foreach=False)
    theirs_too.load_state_dict(torch.load(path, weights_only=True))
    continue_both(fresh, theirs_too, mine_params, their_params)
    assert_same_state(fresh, theirs_too, mine_params, their_params)


def test_lion_checkpoints_both_ways():
    from peers import require_lion

    lion = require_lion()
    mine_params, their_params = twins(*SHAPES)
    mine = trained(agt.Lion, mine_params, lr=1e-3, weight_decay=0.1)
    theirs = lion.Lion(their_params, lr=1e-3, weight_decay=0.1)
    for p, q in zip(mine_params, their_params):
        q.data.copy_(p.data)
    theirs.load_state_dict(copy.deepcopy(mine.state_dict()))
    assert_same_state(mine, theirs, mine_params, their_params)
    continue_both(mine, theirs, mine_params, their_params, direct=True)
    again = agt.Lion(mine_params, lr=1e-3, weight_decay=0.1)
    again.load_state_dict(copy.deepcopy(theirs.state_dict()))
    continue_both(again, theirs, mine_params, their_params, direct=True)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls", [agt.Adam, agt.AdamW, agt.Lion])
def test_copies_and_pickles_continue_bit_for_bit(cls, how):
    params, _ = twins(*SHAPES)
    optimizer = trained(cls, params, decoupled_weight_decay=True, weight_decay=0.1) \
        if cls is agt.Lion else trained(cls, params)
    pair = (params, optimizer)
    copied_params, copied = copy.deepcopy(pair) if how == "deepcopy" else \
        pickle.loads(pickle.dumps(pair))
    assert type(copied) is cls
    assert_same_state(copied, optimizer, copied_params, params)
    continue_both(copied, optimizer, copied_params, params, direct=True)
    if cls is agt.Lion:
        assert copied._init_lr == optimizer._init_lr and copied.decoupled_wd


def test_a_mismatched_checkpoint_is_refused_before_anything_changes():
    params, _ = twins(*SHAPES)
    optimizer = trained(agt.Adam, params, lr=0.01)
    before = copy.deepcopy(optimizer.state_dict())
    other_params, _ = twins((300,), (7, 12), (5,))  # a transposed shape
    wrong = trained(agt.Adam, other_params, lr=0.5).state_dict()
    with pytest.raises(ValueError, match=r"'exp_avg'.*shape \(7, 12\).*\(12, 7\)"):
        optimizer.load_state_dict(wrong)
    too_few = trained(agt.Adam, twins((300,), (12, 7))[0]).state_dict()
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        optimizer.load_state_dict(too_few)
    two_groups = agt.Adam([{"params": params[:1]}, {"params": params[1:]}]).state_dict()
    with pytest.raises(ValueError, match="different number of parameter groups"):
        optimizer.load_state_dict(two_groups)
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, entry in before["state"].items():
        for name, tensor in entry.items():
            assert_same(after["state"][key][name], tensor, f"{key}.{name}")


def test_loading_copies_the_checkpoint_and_keeps_the_implementation_flags():
    mine_params, their_params = twins(*SHAPES)
    theirs = trained(torch.optim.AdamW, their_params)
    checkpoint = theirs.state_dict()
    checkpoint["param_groups"][0]["fused"] = True  # as a fused=True run saves it
    mine = agt.AdamW(mine_params)
    mine.load_state_dict(checkpoint)
    assert mine.param_groups[0]["fused"] is None
    exp_avg = mine.state[mine_params[0]]["exp_avg"]
    assert exp_avg.data_ptr() != checkpoint["state"][0]["exp_avg"].data_ptr()
    for p, q in zip(mine_params, their_params):
        p.data.copy_(q.data)
    continue_both(mine, theirs, mine_params, their_params)


def test_load_state_dict_hooks_run():
    params, _ = twins(*SHAPES)
    optimizer = trained(agt.Adam, params)
    calls = []
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("post"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: calls.append("save") or None)
    optimizer.load_state_dict(optimizer.state_dict())
    assert calls == ["save", "pre", "post"]


def test_state_written_directly_is_adopted_as_zero_redundancy_optimizer_writes_it():
    """ZeroRedundancyOptimizer loads a checkpoint by assigning ``self.optim.state[param]`` (a
    new dict, then its 0-d tensors moved to the CPU one by one), never calling the local
    optimizer's ``load_state_dict``."""
    mine_params, their_params = twins(*SHAPES)
    theirs = trained(torch.optim.Adam, their_params, amsgrad=True)
    mine = trained(agt.Adam, mine_params, amsgrad=True, steps=1)
    for p, q in zip(mine_params, their_params):
        p.data.copy_(q.data)
    saved = copy.deepcopy(theirs.state_dict())
    for index, param in enumerate(mine_params):
        mine.state[param] = {key: value.to("cpu") for key, value in saved["state"][index].items()}
        for name, value in mine.state[param].items():
            if value.dim() == 0:
                mine.state[param][name] = value.cpu()
    assert_same_state(mine, theirs, mine_params, their_params)
    continue_both(mine, theirs, mine_params, their_params)


@pytest.mark.parametrize("reset", ["del", "clear", "assign", "replace_mapping", "clear_all"])
def test_resetting_a_parameters_state_starts_it_afresh(reset):
    mine_params, their_params = twins(*SHAPES)
    mine, theirs = trained(agt.Adam, mine_params), trained(torch.optim.Adam, their_params)
    for optimizer, params in ((mine, mine_params), (theirs, their_params)):
        if reset == "del":
            del optimizer.state[params[1]]
        elif reset == "clear":
            optimizer.state[params[1]].clear()
        elif reset == "assign":
            optimizer.state[params[1]] = {}
        elif reset == "replace_mapping":
            from collections import defaultdict

            optimizer.state = defaultdict(dict, {p: optimizer.state[p] for p in params[::2]})
        else:
            optimizer.state.clear()
    continue_both(mine, theirs, mine_params, their_params)


def test_an_in_place_edit_of_a_state_tensor_is_seen():
    mine_params, their_params = twins(*SHAPES)
    mine, theirs = trained(agt.Adam, mine_params), trained(torch.optim.Adam, their_params)
    for optimizer, params in ((mine, mine_params), (theirs, their_params)):
        optimizer.state[params[0]]["exp_avg"].mul_(0.5)
        optimizer.state[params[2]]["step"].fill_(1.0)
    continue_both(mine, theirs, mine_params, their_params)


def test_add_param_group_after_steps():
    mine_params, their_params = twins(*SHAPES, (40,), (6, 6))
    mine = trained(agt.AdamW, mine_params[:3], lr=0.01)
    theirs = trained(torch.optim.AdamW, their_params[:3], lr=0.01)
    mine.add_param_group({"params": mine_params[3:], "lr": 0.1, "amsgrad": True})
    theirs.add_param_group({"params": their_params[3:], "lr": 0.1, "amsgrad": True})
    continue_both(mine, theirs, mine_params, their_params)
    assert float(mine.state[mine_params[0]]["step"]) == 6.0
    assert float(mine.state[mine_params[4]]["step"]) == 3.0


def test_turning_amsgrad_on_after_steps_fails_as_torch_fails():
    params, their_params = twins(*SHAPES)
    mine, theirs = trained(agt.Adam, params), trained(torch.optim.Adam, their_params)
    for optimizer in (mine, theirs):
        optimizer.param_groups[0]["amsgrad"] = True
    give_grads(params, their_params, seed=7)
    with pytest.raises(KeyError, match="max_exp_avg_sq"):
        theirs.step()
    with pytest.raises(KeyError, match="max_exp_avg_sq"):
        mine.step()
