"""Differential tests of Lion (``adamgen/rules/lion.py``, issue 15) against lion-pytorch itself.

The rule promises ``lion_pytorch.Lion`` 0.2.5's arithmetic (its ``update_fn``), bit for bit, NaN
and inf included, so the reference is that very function (:func:`peers.lion_step`) run on torch
tensors. Proven here:

* every exact variant (the functional form and the in-place optimizer, each forced to NumPy in
  float32, serial C and, on two of the settings, OpenMP C at 2 threads) equals ``update_fn``
  bit for bit over 50 steps,
  in float32 and float64, sizes 1 to 16411, five hyperparameter settings (weight decay 0 and >
  0; betas inside (0, 1) and at the ends of their closed range, where ``fma(inf, 0, m)`` is a
  NaN), gradients with NaN, +-inf, +-0, subnormals and extremes on a few steps ("bit for bit"
  as the suite means it: :func:`differential.assert_state_equal`);
* ``lion_pytorch.Lion`` itself, ``decoupled_weight_decay=True`` and an ``lr`` changed midway,
  equals the optimizer given ``weight_decay / initial lr`` (the rule's docstring says so);
* ``ADAMGEN_VARIANT=numpy`` on float64 is an ``InexactVariantError``;
* bad options, hyperparameters and tensors are errors naming them.

The tests that need lion-pytorch (and torch) skip, saying how to install them; the others run
without.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from conftest import assert_bitwise_equal
from differential import (
    check_every_variant,
    exact_variants,
    forced,
    make_trajectory,
    reference_trajectory,
    require_c,
    two_threads,
)
from peers import lion_step, require_lion, require_torch

import adamgen
from adamgen.errors import InexactVariantError

NAMES = ("param", "exp_avg")

#: (lr, beta1, beta2, weight_decay)
SETTINGS = (
    (1e-4, 0.9, 0.99, 0.0),  # lion-pytorch's defaults
    (3e-3, 0.95, 0.98, 0.1),
    (0.0123456789, 0.5, 0.3, 1.5),
    (1e-2, 0.123456789, 0.9, 0.01),
    (1e-3, 1.0, 0.0, 2.0),  # the ends: 1 - beta1 = 0, so an infinite gradient gives inf*0 = NaN
)

#: ``c-omp`` runs these (a threaded call costs milliseconds on this shared machine, where its
#: second thread waits for a busy core): the defaults (weight decay 0), and the ends of the
#: betas' range with weight decay > 0.
THREADED_SETTINGS = (SETTINGS[0], SETTINGS[4])


@pytest.fixture(autouse=True)
def _two_threads() -> Iterator[None]:
    with two_threads():
        yield


def hyperparameters(setting: tuple[float, ...]) -> dict[str, float]:
    return dict(zip(("lr", "beta1", "beta2", "weight_decay"), setting))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_every_exact_variant_equals_lion_pytorch_bit_for_bit(setting, dtype):
    require_lion()
    require_c("lion", openmp=True)
    dtype = np.dtype(dtype)
    hyper = hyperparameters(setting)
    trajectory = make_trajectory(dtype, seed=SETTINGS.index(setting))

    def step_of(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray,
                step: int) -> tuple[np.ndarray, ...]:
        return lion_step(param, grad, exp_avg, **hyper)

    reference = reference_trajectory(trajectory, 1, step_of)
    variants = exact_variants(dtype)
    if setting not in THREADED_SETTINGS:
        variants = variants[:-1]
    check_every_variant(adamgen.rule("lion"), trajectory, reference, NAMES, hyper, variants,
                        f"lion {dtype} {hyper}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_optimizer_is_lion_pytorchs_lion_with_decoupled_weight_decay(dtype):
    """``Lion(decoupled_weight_decay=True)`` divides weight_decay by the initial lr before every
    step: the optimizer given that quotient follows it bit for bit, also after lr changes."""
    lion_pytorch, torch = require_lion(), require_torch()
    dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(3)
    params = [torch.randn(n, dtype=dtype, generator=generator) for n in (17, 4099)]
    mine = [p.numpy().copy() for p in params]
    lr, weight_decay = 3e-3, 0.2
    peer = lion_pytorch.Lion(params, lr=lr, betas=(0.95, 0.98), weight_decay=weight_decay,
                             decoupled_weight_decay=True)
    opt = adamgen.rule("lion").optimizer(mine, lr=lr, beta1=0.95, beta2=0.98,
                                         weight_decay=weight_decay / lr)
    for step in range(1, 31):
        if step == 16:
            for group in peer.param_groups:
                group["lr"] = lr / 2
            opt.hyperparameters["lr"] = lr / 2
        grads = [torch.randn(p.shape, dtype=dtype, generator=generator) for p in params]
        grads[0][step % 17] = float("nan") if step == 9 else float("inf")
        for p, g in zip(params, grads):
            p.grad = g
        peer.step()
        opt.step([g.numpy() for g in grads])
    for p, m, got, got_m in zip(params, (peer.state[p]["exp_avg"] for p in params), mine,
                                opt.state["exp_avg"]):
        assert_bitwise_equal(got, p.numpy(), "param")
        assert_bitwise_equal(got_m, m.numpy(), "exp_avg")


def test_numpy_forced_on_float64_is_an_error_not_an_approximation():
    rule = adamgen.rule("lion")
    x = np.linspace(-1, 1, 17)
    with forced("numpy"):
        with pytest.raises(InexactVariantError, match="float64 fused multiply-add"):
            rule.update(x, x, x)
        with pytest.raises(InexactVariantError, match="ADAMGEN_VARIANT=numpy.*float64 fused"):
            rule.optimizer([x.copy()])


def test_bad_options_hyperparameters_and_tensors_are_named():
    with pytest.raises(ValueError, match="rule 'lion' has no option 'amsgrad'; its options: "
                                         "none"):
        adamgen.rule("lion", amsgrad=True)
    rule = adamgen.rule("lion")
    x = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got 0.0"):
        rule.update(x, x, x, lr=0.0)
    with pytest.raises(ValueError, match="beta1 must satisfy 0 <= beta1 <= 1, got 1.5"):
        rule.update(x, x, x, beta1=1.5)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0, got -1"):
        rule.optimizer([x.copy()], weight_decay=-1)
    with pytest.raises(TypeError, match="has no hyperparameter eps; it takes lr, beta1, beta2, "
                                        "weight_decay"):
        rule.update(x, x, x, eps=1e-8)
    with pytest.raises(ValueError, match=r"exp_avg \(9,\)"):
        rule.update(x, x, np.ones(9, np.float32))
    with pytest.raises(TypeError, match=r"grad differs from param .*grad float64 \(8,\)"):
        rule.update(x, x.astype(np.float64), x)
    opt = rule.optimizer([x.copy()])
    with pytest.raises(ValueError, match=r"gradient 0 is \(8,\) float64; expected \(8,\) "
                                         r"float32"):
        opt.step([x.astype(np.float64)])
