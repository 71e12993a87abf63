"""``adamgen.torch`` follows its parameters as torch does: ``p.data = t``, ``set_()``,
``resize_()``, ZeroRedundancyOptimizer's bucket views; no step writes memory a parameter no
longer owns. Also: the version counter, and memory shared between parameters or gradients."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch_reference import assert_same_state, give_grads, ieee_sqrt, reference_step, torch, twins

import adamgen.torch as agt

ROOT = Path(__file__).resolve().parents[1]


def both(steps=2, **kwargs):
    mine_params, their_params = twins((300,), (12, 7), (5,))
    mine = agt.AdamW(mine_params, **kwargs)
    theirs = torch.optim.AdamW(their_params, foreach=False, **kwargs)
    advance(mine, theirs, mine_params, their_params, steps)
    return mine, theirs, mine_params, their_params


def advance(mine, theirs, mine_params, their_params, steps, seed=0):
    for step in range(steps):
        give_grads(mine_params, their_params, seed=seed + step)
        mine.step()
        reference_step(theirs)


@pytest.mark.parametrize("how", ["data", "set_", "copy_into_new"])
def test_a_rebound_parameter_is_followed(how):
    mine, theirs, mp, tp = both()
    for params in (mp, tp):
        new = params[1].detach().clone() * 1.5
        if how == "data":
            params[1].data = new
        elif how == "set_":
            with torch.no_grad():
                params[1].set_(new.untyped_storage(), 0, new.shape, new.stride())
        else:
            params[1].data = torch.empty_like(new).copy_(new)
    old_pointer = mine.state[mp[1]]["exp_avg"].data_ptr()
    advance(mine, theirs, mp, tp, 3, seed=10)
    assert_same_state(mine, theirs, mp, tp)
    assert mine.state[mp[1]]["exp_avg"].data_ptr() == old_pointer  # the state stayed put


def test_zero_redundancy_style_bucket_views_after_the_optimizer_is_built():
    """ZeroRedundancyOptimizer(parameters_as_bucket_view=True) copies the parameters into one
    flat bucket and rebinds ``param.data`` to views of it, after the local optimizer exists."""
    mine, theirs, mp, tp = both(steps=2)
    for params in (mp, tp):
        bucket = torch.empty(sum(p.numel() for p in params))
        offset = 0
        for p in params:
            bucket[offset:offset + p.numel()].copy_(p.data.flatten())
            p.data = bucket[offset:offset + p.numel()].view_as(p.data)
            offset += p.numel()
        params.append(bucket)  # keep it alive
    advance(mine, theirs, mp[:3], tp[:3], 3, seed=20)
    assert_same_state(mine, theirs, mp[:3], tp[:3])
    assert mp[0].data_ptr() == mp[3].data_ptr()  # still a view of the bucket: updated in place


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.distributed's own jit use
def test_zero_redundancy_optimizer_with_bucket_views(tmp_path):
    """The real ZeroRedundancyOptimizer (one gloo process) around adamgen's AdamW."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        found = []
        for cls, sqrt in ((agt.AdamW, None), (torch.optim.AdamW, ieee_sqrt)):
            params, _ = twins((300,), (12, 7), (5,))
            kwargs = {"lr": 0.01} if cls is agt.AdamW else {"lr": 0.01, "foreach": False}
            zero = ZeroRedundancyOptimizer(params, optimizer_class=cls,
                                           parameters_as_bucket_view=True, **kwargs)
            for step in range(3):
                give_grads(params, [torch.empty_like(p) for p in params], seed=step)
                if sqrt is None:
                    zero.step()
                else:
                    with sqrt():
                        zero.step()
            zero.consolidate_state_dict()
            found.append((params, zero.state_dict()))
        (mine, mine_state), (theirs, their_state) = found
        for p, q in zip(mine, theirs):
            assert torch.equal(p, q)
        for key, entry in their_state["state"].items():
            for name, tensor in entry.items():
                assert torch.equal(mine_state["state"][key][name], tensor), (key, name)
    finally:
        dist.destroy_process_group()


def test_a_parameter_that_changed_shape_after_its_state_was_created_is_an_error():
    mine, theirs, mp, tp = both()
    for params in (mp, tp):
        params[0].data = torch.zeros(10)
    give_grads(mp, tp, seed=5)
    with pytest.raises(RuntimeError):
        reference_step(theirs)  # torch fails too
    with pytest.raises(RuntimeError, match=r"parameter 0 of group 0 changed from shape \(300,\)"):
        mine.step()


def test_a_parameter_that_changed_before_its_first_step_is_planned_again():
    mp, tp = twins((300,), (12, 7))
    mine, theirs = agt.Adam(mp, lr=0.1), torch.optim.Adam(tp, lr=0.1, foreach=False)
    give_grads(mp[1:], tp[1:], seed=0)  # the first parameter has no gradient: no state
    mine.step()
    reference_step(theirs)
    for params in (mp, tp):
        params[0].data = torch.ones(4, 4, dtype=torch.float64)
    advance(mine, theirs, mp, tp, 3, seed=30)
    assert_same_state(mine, theirs, mp, tp)


def test_a_different_tensor_in_the_group_list_is_planned_again():
    mine, theirs, mp, tp = both()
    replacement = twins((300,), seed=5)
    mine.param_groups[0]["params"][0] = mp[0] = replacement[0][0]
    theirs.param_groups[0]["params"][0] = tp[0] = replacement[1][0]
    advance(mine, theirs, mp, tp, 2, seed=40)
    assert_same_state(mine, theirs, mp, tp)


def run_isolated(script: str) -> subprocess.CompletedProcess:
    """A fresh interpreter: a write into freed memory may abort it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300, check=False)


@pytest.mark.parametrize("free,outcome", [
    ("p.data.resize_(1 << 18)", "stepped"),  # the storage moved, the parameter kept its shape
    ("p.data = torch.zeros(1 << 12)", "refused"),  # its state no longer fits
    ("p.untyped_storage().resize_(0)", "refused")])  # FSDP frees storage this way
def test_no_step_writes_memory_the_parameter_no_longer_owns(free, outcome):
    """The freed block is handed out again before the step; glibc aborts at exit if the step
    wrote into it."""
    result = run_isolated(f"""
        import numpy as np, torch, adamgen.torch as agt
        p = torch.ones(1 << 16, requires_grad=True)
        opt = agt.Adam([p], lr=0.1)
        p.grad = torch.ones(1 << 16)
        opt.step()
        with torch.no_grad():
            {free}
        junk = [np.zeros(1 << 15, np.float32) for _ in range(64)]
        p.grad = torch.ones_like(p)
        try:
            opt.step()
            print("stepped", float(p[0]))
        except RuntimeError as error:
            print("refused:", error)
        del junk
        print("clean exit")
    """)
    assert result.returncode == 0, result.stderr
    assert "clean exit" in result.stdout
    assert outcome in result.stdout, result.stdout


def test_the_step_bumps_the_version_counter_as_torchs_in_place_ops_do():
    for cls in (agt.Adam, agt.Lion):
        p = torch.randn(5, requires_grad=True)
        optimizer = cls([p], lr=0.1)
        loss = (p * p).sum()  # saves p for backward
        p.grad = torch.ones(5)
        version = p._version
        optimizer.step()
        assert p._version > version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_the_same_parameter_twice_is_refused():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="parameters 0 and 1 of group 0 are the same tensor"):
        agt.Adam([p, p])
    with pytest.raises(ValueError, match="some parameters appear in more than one"):
        agt.AdamW([{"params": [p]}, {"params": [p]}])  # torch's own error
    optimizer = agt.Adam([p])
    with pytest.raises(ValueError, match="same tensor"):
        optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)] * 2})
    assert len(optimizer.param_groups) == 1


def test_parameters_sharing_memory_are_refused():
    base = torch.zeros(10)
    first, second = base[:6].requires_grad_(), base[4:].requires_grad_()
    with pytest.raises(ValueError, match="share memory"):
        agt.Lion([first, second])
    optimizer = agt.Adam([first])
    with pytest.raises(ValueError, match="share memory"):
        optimizer.add_param_group({"params": [second]})
    assert len(optimizer.param_groups) == 1
    mine, _, mp, tp = both()
    mp[2].data = mp[0].data[:5]  # now overlapping another parameter
    give_grads(mp, tp, seed=1)
    with pytest.raises(ValueError, match="share memory"):
        mine.step()


def test_a_gradient_sharing_memory_with_what_the_step_writes_is_refused():
    mine, _, mp, _ = both()
    for culprit in (mp[0].detach()[:5], mine.state[mp[0]]["exp_avg"][:5]):
        mp[2].grad = culprit
        with pytest.raises(ValueError, match="gradient of parameter 2 of group 0 shares memory"):
            mine.step()


def test_a_sparse_gradient_gets_torchs_error():
    p = torch.zeros(4, requires_grad=True)
    optimizer = agt.Adam([p])
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        optimizer.step()


def test_a_strided_view_of_another_parameter_as_a_gradient_is_refused():
    """A gradient in another layout is copied to its parameter's layout before the call, but
    the check looks at where the gradient lies, not at its copy."""
    params, _ = twins((6, 4))
    other = torch.zeros(4, 6).t().requires_grad_()  # dense, strides (1, 6)
    optimizer = agt.AdamW([{"params": params}, {"params": [other]}])
    params[0].grad = torch.zeros(4, 6).t()  # its own memory, another layout: accepted
    optimizer.step()
    params[0].grad = other.detach()  # another parameter's memory
    with pytest.raises(ValueError, match="gradient of parameter 0 of group 0 shares memory"):
        optimizer.step()


def test_a_gradient_whose_storage_is_swapped_in_place_is_followed():
    mine, theirs, mp, tp = both()
    give_grads(mp, tp, seed=50)
    for step in range(3):  # the same gradient objects: the identity path
        if step == 1:
            for params in (mp, tp):
                fresh = torch.randn(params[0].shape, generator=torch.Generator().manual_seed(7))
                with torch.no_grad():
                    params[0].grad.set_(fresh)  # same object, other memory
        mine.step()
        reference_step(theirs)
    assert_same_state(mine, theirs, mp, tp)
