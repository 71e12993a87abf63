"""The optimizer's multi-tensor step under a busy neighbour: a threaded pick whose steps run slow
gives way to serial C (the guard of :mod:`adamgen.runtime.guard`), with the same bits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_bitwise_equal
from loader_state import forget_everything

import adamgen
from adamgen.config import refresh_environment
from adamgen.runtime import dispatch, guard, variant_choice


class Clock:
    """An injected clock: each reading advances by the next step (seconds), if any."""

    def __init__(self) -> None:
        self.now, self.steps, self.reads = 100.0, [], 0

    def __call__(self) -> float:
        self.reads += 1
        self.now += self.steps.pop(0) if self.steps else 0.0
        return self.now


def _params(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size).astype(np.float32) for size in (3000, 4096, 5000, 77)]


def _optimizer(rule: str, seed: int):
    params = _params(seed)
    optimizer = adamgen.rule(rule).optimizer(params, **({"lr": 0.01} if rule == "ivy_adam"
                                                        else {}))
    for k, grad in enumerate(optimizer.grads):
        grad[...] = np.random.default_rng(100 + k).standard_normal(grad.shape)
    return params, optimizer


@pytest.mark.parametrize("rule", ["ivy_adam", "torch_adam", "lion"])
def test_slow_threaded_steps_give_way_to_serial_c_with_the_same_bits(fresh_loader, monkeypatch,
                                                                     rule):
    monkeypatch.setattr(dispatch, "default_threads", lambda: 2)
    monkeypatch.setattr(variant_choice, "run_delay", lambda: 0.0)
    clock = Clock()
    monkeypatch.setattr(guard, "clock", clock)
    # the loader picks threads, with serial C measured at 1 ms for the timed elements
    monkeypatch.setattr(variant_choice, "measure", lambda timers: {
        name: [variant_choice.Sample(seconds)] * 3
        for name, seconds in (("numpy", 9e-3), ("c", 1e-3), ("c-omp", 0.4e-3)) if name in timers})
    params, optimizer = _optimizer(rule, seed=1)
    (group,) = optimizer._groups
    if "c-omp" not in group.variants:
        pytest.skip("no OpenMP: no threaded variant to guard")
    ran = []
    real_serial, real_threaded = group._serial, group._threaded
    group._serial = lambda *a: (ran.append("serial"), real_serial(*a))
    group._threaded = lambda *a: (ran.append("threaded"), real_threaded(*a))
    clock.steps = [0.0, 1.0] * 2  # the first two threaded steps take a second each
    for _ in range(4):
        optimizer.step()
    assert ran == ["threaded", "threaded", "serial", "serial"]
    assert group._guard is not None and group._guard.strikes == 1

    monkeypatch.setenv("ADAMGEN_VARIANT", "c")  # the same steps, serial C throughout
    refresh_environment()
    forget_everything()
    serial_params, serial_optimizer = _optimizer(rule, seed=1)
    for _ in range(4):
        serial_optimizer.step()
    assert serial_optimizer._groups[0]._guard is None
    for k, (mine, reference) in enumerate(zip(params, serial_params)):
        assert_bitwise_equal(mine, reference, f"param {k}")
    for name, views in optimizer.state.items():
        for k, (mine, reference) in enumerate(zip(views, serial_optimizer.state[name])):
            assert_bitwise_equal(mine, reference, f"{name} {k}")


def test_a_forced_threaded_variant_is_not_guarded(fresh_loader, monkeypatch):
    monkeypatch.setattr(dispatch, "default_threads", lambda: 2)
    monkeypatch.setenv("ADAMGEN_VARIANT", "c-omp")
    refresh_environment()
    _, optimizer = _optimizer("torch_adam", seed=2)
    optimizer.step()
    (group,) = optimizer._groups
    assert group._guard is None
