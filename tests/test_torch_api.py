"""``adamgen.torch`` as a torch user meets it: constructors and their errors (torch's types and
messages), unsupported flags, LR schedulers, hooks, ``GradScaler``, ``zero_grad``, imports, and
the NumPy fallback without a C compiler."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch_reference import assert_same_state, give_grads, reference_step, torch, twins

import adamgen.torch as agt

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [(agt.Adam, torch.optim.Adam), (agt.AdamW, torch.optim.AdamW)]


def test_they_are_torch_optimizers():
    params = twins((3,))[0]
    assert isinstance(agt.Adam(params), torch.optim.Adam)
    assert isinstance(agt.AdamW(params), torch.optim.AdamW)
    assert isinstance(agt.Lion(params), torch.optim.Optimizer)
    precision = {"master_weights": False, "stochastic_rounding": False, "seed": 0}
    assert agt.AdamW(params).defaults == {**torch.optim.AdamW(params).defaults, **precision}
    assert agt.Adam(params, decoupled_weight_decay=True).defaults == \
        {**torch.optim.Adam(params, decoupled_weight_decay=True).defaults, **precision}
    named = agt.AdamW([("weight", params[0])])
    assert named.state_dict()["param_groups"][0]["param_names"] == ["weight"]


def error_inputs():
    pytest.importorskip("expecttest", reason="torch's optim_db needs expecttest")
    from torch.testing._internal.common_optimizers import optim_db

    for info in optim_db:
        for mine, theirs in PAIRS:
            if info.optim_cls is theirs:
                for error in info.optim_error_inputs_func("cpu", torch.float32):
                    yield mine, theirs, error


def test_every_error_torch_tests_on_cpu_is_raised_the_same_way():
    """optim_db's error inputs for Adam and AdamW: the same exception type and message; the one
    deliberate difference is duplicate parameters in a group (torch warns, adamgen raises)."""
    count = 0
    for mine, _, error in error_inputs():
        optim_input = error.optimizer_error_input
        params = optim_input.params if optim_input.params is not None else twins((2, 2))[0]
        if error.error_type is UserWarning:
            with pytest.raises(ValueError, match="same tensor"):
                mine(params, **optim_input.kwargs)
        else:
            with pytest.raises(error.error_type, match=error.error_regex):
                mine(params, **optim_input.kwargs)
        count += 1
    assert count >= 20


@pytest.mark.parametrize("kwargs,error,match", [
    ({"lr": -1e-3}, ValueError, "Invalid learning rate: -0.001"),
    ({"lr": float("nan")}, ValueError, "Invalid learning rate: nan"),
    ({"eps": -1.0}, ValueError, "Invalid epsilon value: -1.0"),
    ({"betas": (0.9, 1.0)}, ValueError, "Invalid beta parameter at index 1: 1.0"),
    ({"betas": (-0.1, 0.9)}, ValueError, "Invalid beta parameter at index 0: -0.1"),
    ({"fused": True}, NotImplementedError, "does not implement fused=True"),
    ({"capturable": True}, NotImplementedError, "does not implement capturable=True"),
    ({"differentiable": True}, NotImplementedError, "does not implement differentiable=True"),
    ({"betas": (torch.tensor(0.9), torch.tensor(0.99))}, NotImplementedError, "betas given as"),
    ({"lr": torch.tensor(1e-3, dtype=torch.bfloat16)}, TypeError, "bfloat16 tensor"),
])
@pytest.mark.parametrize("cls", [agt.Adam, agt.AdamW])
def test_bad_input_at_construction(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(twins((3,))[0], **kwargs)


def test_what_torch_refuses_about_parameters_is_refused_the_same_way():
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        agt.Adam([])
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        agt.AdamW([torch.zeros(3, requires_grad=True) * 2])
    with pytest.raises(TypeError, match="should be an iterable of Tensors or dicts"):
        agt.Lion(torch.zeros(3))
    with pytest.raises(TypeError, match="optimizer can only optimize Tensors"):
        agt.Adam([1.0])


@pytest.mark.parametrize("param,error,match", [
    (torch.zeros(3, dtype=torch.float8_e4m3fn), TypeError, "float8_e4m3fn tensor"),
    (torch.zeros(3, dtype=torch.complex64), TypeError, "complex64 tensor"),
    (torch.zeros(3, device="meta"), ValueError, "is on meta"),
])
def test_parameters_adamgen_does_not_update_are_named(param, error, match):
    with pytest.raises(error, match=f"parameter 0 of group 0.*{match}"):
        agt.Adam([param.requires_grad_()])


def test_unsupported_flags_set_on_a_group_later_fail_at_the_step():
    params, _ = twins((3,))
    optimizer = agt.AdamW(params)
    params[0].grad = torch.ones(3)
    optimizer.param_groups[0]["differentiable"] = True
    with pytest.raises(NotImplementedError, match="differentiable=True"):
        optimizer.step()
    optimizer.param_groups[0]["differentiable"] = False
    optimizer.param_groups[0]["lr"] = torch.tensor(0.1)
    optimizer.param_groups[0]["foreach"] = True
    with pytest.raises(RuntimeError, match="lr as a Tensor is not supported"):
        optimizer.step()


def test_foreach_true_is_accepted_with_the_single_tensor_bits():
    mine_params, their_params = twins((100,), (4, 5))
    mine = agt.AdamW(mine_params, foreach=True, weight_decay=0.1)
    theirs = torch.optim.AdamW(their_params, foreach=False, weight_decay=0.1)
    for step in range(3):
        give_grads(mine_params, their_params, seed=step)
        mine.step()
        reference_step(theirs)
    assert_same_state(mine, theirs, mine_params, their_params)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"lr": 0.0}, ValueError, "Invalid learning rate: 0.0"),
    ({"lr": -1.0}, ValueError, "Invalid learning rate"),
    ({"lr": float("nan")}, ValueError, "Invalid learning rate"),
    ({"betas": (1.5, 0.99)}, ValueError, "Invalid beta parameter at index 0: 1.5"),
    ({"betas": (0.9, -0.01)}, ValueError, "Invalid beta parameter at index 1"),
    ({"use_triton": True}, NotImplementedError, "use_triton=True"),
    ({"lr": torch.tensor(1e-4)}, TypeError, "not a tensor"),
])
def test_lion_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        agt.Lion(twins((3,))[0], **kwargs)


def test_lion_accepts_its_closed_beta_interval():
    agt.Lion(twins((3,))[0], betas=(0.0, 1.0))


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1,
                                                                  total_steps=12),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, patience=0, factor=0.3),
    "tensor lr, ExponentialLR": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.8),
}


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("mine_cls,theirs_cls", PAIRS, ids=["Adam", "AdamW"])
def test_lr_schedulers_drive_it_as_they_drive_torch(mine_cls, theirs_cls, name):
    mine_params, their_params = twins((200,), (6, 7))
    lr = torch.tensor(0.01) if name.startswith("tensor") else 0.01
    kwargs = {"lr": lr, "weight_decay": 0.05}
    mine = mine_cls(mine_params, **kwargs)
    theirs = theirs_cls(their_params, foreach=False, **kwargs)
    schedulers = SCHEDULERS[name](mine), SCHEDULERS[name](theirs)
    for step in range(10):
        give_grads(mine_params, their_params, seed=step)
        mine.step()
        reference_step(theirs)
        for scheduler in schedulers:
            if name == "ReduceLROnPlateau":
                scheduler.step(1.0)  # never improves: the lr drops
            else:
                scheduler.step()
    assert mine.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    assert mine.param_groups[0]["betas"] == theirs.param_groups[0]["betas"]
    assert_same_state(mine, theirs, mine_params, their_params)


def test_step_hooks_run_and_may_replace_the_arguments():
    from torch.optim.optimizer import register_optimizer_step_post_hook

    params, _ = twins((3,))
    optimizer = agt.Adam(params, lr=0.1)
    params[0].grad = torch.ones(3)
    calls = []
    loss = torch.tensor(4.0)

    def pre(opt, args, kwargs):
        calls.append(("pre", opt))
        return args, {"closure": lambda: loss}  # torch's hooks may replace the arguments

    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", kwargs)))
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs:
                                               calls.append(("global", opt)))
    try:
        assert optimizer.step() is loss
    finally:
        handle.remove()
    assert [c[0] for c in calls] == ["pre", "post", "global"]
    assert calls[0][1] is optimizer and "closure" in calls[1][1]
    assert float(optimizer.state[params[0]]["step"]) == 1.0


@pytest.mark.parametrize("mine_cls,theirs_cls", PAIRS, ids=["Adam", "AdamW"])
def test_grad_scaler_cpu_as_with_torchs_optimizers(mine_cls, theirs_cls):
    """GradScaler unscales ``p.grad`` in place, skips a step whose gradients hold inf/NaN, and
    updates its scale; both optimizers see the same scaler decisions."""
    mine_params, their_params = twins((50,), (5, 5))
    mine, theirs = mine_cls(mine_params, lr=0.01), theirs_cls(their_params, lr=0.01,
                                                               foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
               for _ in range(2)]
    target = torch.randn(50)
    skipped = 0
    for step in range(6):
        for params, optimizer, scaler in ((mine_params, mine, scalers[0]),
                                          (their_params, theirs, scalers[1])):
            optimizer.zero_grad()
            loss = ((params[0] - target) ** 2).sum() + params[1].sum() * (
                float("inf") if step == 2 else 1.0)
            scaler.scale(loss).backward()
            if optimizer is theirs:
                from torch_reference import ieee_sqrt

                with ieee_sqrt():
                    scaler.step(optimizer)
            else:
                scaler.step(optimizer)
            scaler.update()
        skipped += int(step == 2)
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert float(mine.state[mine_params[0]]["step"]) == 6 - skipped
    assert_same_state(mine, theirs, mine_params, their_params)


def test_zero_grad_sets_to_none_or_zeroes_in_place():
    mine_params, their_params = twins((10,), (3,))
    mine, theirs = agt.Adam(mine_params, lr=0.1), torch.optim.Adam(their_params, lr=0.1)
    give_grads(mine_params, their_params, seed=0)
    mine.step()
    reference_step(theirs)
    mine.zero_grad()
    assert all(p.grad is None for p in mine_params)
    give_grads(mine_params, their_params, seed=1)
    grads = [p.grad for p in mine_params]
    for step in range(3):  # the same gradient objects, accumulated into in place
        mine.zero_grad(set_to_none=False)
        theirs.zero_grad(set_to_none=False)
        assert all(p.grad is g for p, g in zip(mine_params, grads))
        for params in (mine_params, their_params):
            for index, p in enumerate(params):
                p.grad.add_(float(step + index + 1))
        mine.step()
        reference_step(theirs)
    assert_same_state(mine, theirs, mine_params, their_params)


def run(script: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, cwd=ROOT, env=environment, timeout=300, check=False)


def test_import_adamgen_does_not_import_torch():
    result = run("import adamgen, sys; assert 'torch' not in sys.modules; print('ok')")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_without_c_numpy_serves_float32_and_float64_is_a_clear_error(tmp_path):
    """ADAMGEN_BACKEND=numpy stands for "no compiler": float32 gets the same bits from NumPy;
    float64 cannot (NumPy cannot round a float64 fma once) and says so."""
    result = run("""
        import torch, adamgen.torch as agt
        from torch_reference import assert_same_state, give_grads, reference_step, twins
        mine_params, their_params = twins((300,), (7, 9), layout="transposed")
        mine = agt.AdamW(mine_params, weight_decay=0.1, amsgrad=True)
        theirs = torch.optim.AdamW(their_params, weight_decay=0.1, amsgrad=True, foreach=False)
        for step in range(3):
            give_grads(mine_params, their_params, seed=step, specials=True)
            mine.step()
            reference_step(theirs)
        assert_same_state(mine, theirs, mine_params, their_params)
        print("float32 served by", mine._plans[0].buckets[0]._tables)
        d = torch.randn(3, dtype=torch.float64).requires_grad_()
        d.grad = torch.ones(3, dtype=torch.float64)
        try:
            agt.Adam([d]).step()
        except RuntimeError as error:
            print("float64:", error)
    """, ADAMGEN_BACKEND="numpy", ADAMGEN_CACHE_DIR=str(tmp_path),
                 PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    assert result.returncode == 0, result.stderr
    assert "float32 served by {<RuleKernel torch_adamw" in result.stdout
    assert "(NumPy)>" in result.stdout
    assert "float64: torch_adam on float64 tensors needs adamgen's C kernels" in result.stdout
    assert "C compiler" in result.stdout
