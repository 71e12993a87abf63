"""Differential tests of torch's Adam and AdamW (``adamgen/rules/torch_adam.py``, issue 15).

The rules promise torch's arithmetic operation by operation with an IEEE square root, so their
reference is :func:`peers.torch_adam_step` with ``sqrt="ieee"`` (torch's own in-place ops in
torch's order; ``test_peers.py`` proves the same code with torch's square root *is*
``torch.optim``). What is proven here:

* **Bit for bit against the reference, over 50 steps**, through every exact variant: the
  functional form (``rule.update``) forced to NumPy (float32 only: NumPy declines a float64 fused
  multiply-add), to serial C and to OpenMP C at 2 threads, and the in-place multi-tensor
  optimizer (``rule.optimizer``) on the same three, alternating ``step()`` (gradients written
  into ``opt.grads``) and ``step(grads)``. Every option: Adam and AdamW x amsgrad x maximize x
  ``lr_dtype`` float64/float32, in float32 and float64, each with two of four hyperparameter
  settings (weight decay 0 and > 0; the lerp weight ``1 - beta1`` below, at and above 0.5; eps
  0; lr as a Python float and as a 0-d tensor); sizes 1 to 16411 (:data:`differential.SIZES`);
  gradients with NaN, +-inf, +-0, subnormals and extremes on a few steps. "Bit for bit" is the
  suite's: NaN exactly where the reference has NaN, whatever its sign and payload (why:
  :func:`differential.assert_state_equal`).
* **Against ``torch.optim`` itself**, one step from the same state: the moments are torch's,
  the parameter differs only where torch's square root (MKL's, not correctly rounded) differs
  from IEEE's, that square root is within 1 ulp, and the parameter's difference stays within
  the bound those roundings allow. The share of differing elements is printed (README figure).
* ``ADAMGEN_VARIANT=numpy`` on float64 is an ``InexactVariantError``, for ``update`` and for
  the optimizer; unforced, the loader serves float64 from C, bit for bit.
* Bad input is refused with errors naming what is wrong.

The tests that need torch skip, saying how to install it; the others run without.

Time: the 32 rule variants x dtypes are 32 C builds (about 0.8 s each, on a cold cache); the
threaded calls are the next largest cost on this shared 2-core machine (each waits milliseconds
for its second thread), so ``c-omp`` runs one setting of each pair.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import assert_bitwise_equal
from differential import (
    STEPS,
    Trajectory,
    check_every_variant,
    check_functional,
    check_optimizer,
    exact_variants,
    forced,
    make_trajectory,
    reference_trajectory,
    require_c,
    two_threads,
)
from peers import require_torch, torch_adam_step

import adamgen
from adamgen.errors import InexactVariantError


@pytest.fixture(autouse=True)
def _two_threads() -> Iterator[None]:
    with two_threads():
        yield


@dataclass(frozen=True)
class Setting:
    """One set of hyperparameters; ``lr_tensor``: hand torch ``lr`` as a 0-d tensor."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    lr_tensor: bool = False

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "weight_decay": self.weight_decay}


SETTINGS = (
    Setting(1e-3, 0.9, 0.999, 1e-8, 0.0),  # torch's defaults: lerp weight 0.1 < 0.5
    Setting(0.0123456789, 0.3, 0.95, 1e-3, 0.1, lr_tensor=True),  # weight 0.7 > 0.5
    Setting(0.05, 0.5, 0.9, 1e-6, 1.5),  # weight exactly 0.5: lerp's second branch
    Setting(0.1, 0.6, 0.99, 0.0, 0.0, lr_tensor=True),  # weight 0.4 < 0.5; eps 0: 0/0 is NaN
)
#: Each case runs one pair: weight decay 0 and > 0, a lerp weight in each of lerp's branches.
#: The pairs alternate between the two dtypes of an option combination, so each combination
#: meets all four settings. ``c-omp`` runs one setting of the pair, alternating every two
#: combinations, so it too meets all four in both dtypes.
SETTING_PAIRS = ((SETTINGS[2], SETTINGS[0]), (SETTINGS[1], SETTINGS[3]))

#: (rule, amsgrad, maximize, lr_dtype): every option combination of both rules
OPTIONS = list(itertools.product(("torch_adam", "torch_adamw"), (False, True), (False, True),
                                 ("float64", "float32")))


def option_id(options: tuple[str, bool, bool, str]) -> str:
    name, amsgrad, maximize, lr_dtype = options
    return "-".join([name] + ["amsgrad"] * amsgrad + ["maximize"] * maximize + [f"lr{lr_dtype}"])


def state_names(amsgrad: bool) -> tuple[str, ...]:
    return ("param", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())


def torch_reference(trajectory: Trajectory, setting: Setting, lr_dtype: str,
                    **options: bool) -> list:
    """The reference's trajectory, with ``lr`` as torch would get it for ``lr_dtype``."""
    torch = require_torch()
    lr: Any = setting.lr
    if lr_dtype == "float32":  # what makes torch compute lr's scalars in float32
        lr = torch.tensor(setting.lr, dtype=torch.float32)
    elif setting.lr_tensor:  # a float64 0-d tensor computes as a Python float
        lr = torch.tensor(setting.lr, dtype=torch.float64)

    def step_of(*tensors: np.ndarray, step: int) -> tuple[np.ndarray, ...]:
        return torch_adam_step(*tensors, step=step, lr=lr, beta1=setting.beta1,
                               beta2=setting.beta2, eps=setting.eps,
                               weight_decay=setting.weight_decay, sqrt="ieee", **options)

    return reference_trajectory(trajectory, 3 if options["amsgrad"] else 2, step_of)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_every_exact_variant_equals_the_ieee_reference_bit_for_bit(options, dtype):
    require_torch()
    require_c("torch_adam", openmp=True)
    name, amsgrad, maximize, lr_dtype = options
    dtype = np.dtype(dtype)
    rule = adamgen.rule(name, amsgrad=amsgrad, maximize=maximize, lr_dtype=lr_dtype)
    case = OPTIONS.index(options)
    pair = SETTING_PAIRS[(case + (dtype == np.float64)) % 2]
    threaded = pair[case // 2 % 2]
    for setting in pair:
        trajectory = make_trajectory(dtype, seed=SETTINGS.index(setting))
        reference = torch_reference(trajectory, setting, lr_dtype, amsgrad=amsgrad,
                                    maximize=maximize, decoupled=name == "torch_adamw")
        variants = exact_variants(dtype)
        check_every_variant(rule, trajectory, reference, state_names(amsgrad),
                            setting.hyperparameters(),
                            variants if setting == threaded else variants[:-1],
                            f"{option_id(options)} {dtype} {setting}")


# -- against torch.optim itself -----------------------------------------------------------------

def torch_optim_one_step(options: tuple[str, bool, bool, str], dtype_name: str, n: int,
                         seed: int = 0, **hyper: float
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Three steps of ``torch.optim.Adam/AdamW(foreach=False)``, then a fourth: the state before
    the fourth (with its gradient) and torch's result of it."""
    torch = require_torch()
    dtype = getattr(torch, dtype_name)
    name, amsgrad, maximize, lr_dtype = options
    generator = torch.Generator().manual_seed(seed)
    param = torch.randn(n, dtype=dtype, generator=generator)
    lr: Any = hyper["lr"]
    if lr_dtype == "float32":
        lr = torch.tensor(lr, dtype=torch.float32)
    peer = (torch.optim.AdamW if name == "torch_adamw" else torch.optim.Adam)(
        [param], lr=lr, betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
        weight_decay=hyper["weight_decay"], amsgrad=amsgrad, maximize=maximize, foreach=False)
    state_names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    for step in range(1, 5):
        if step == 4:
            before = {"param": param.detach().numpy().copy(), **{
                k: peer.state[param][k].numpy().copy() for k in state_names}}
        param.grad = torch.randn(n, dtype=dtype, generator=generator)
        peer.step()
    before["grad"] = param.grad.numpy().copy()
    after = {"param": param.detach().numpy(),
             **{k: peer.state[param][k].numpy() for k in state_names}}
    return before, after


def ulps_apart(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How many representable numbers lie between ``a`` and ``b`` (finite, same dtype)."""
    signed = {4: np.int32, 8: np.int64}[a.dtype.itemsize]
    top = np.iinfo(signed).min

    def ordered(x: np.ndarray) -> np.ndarray:  # the bits as a monotonic integer
        bits = x.view(signed).astype(np.int64)
        return np.where(bits < 0, top - bits, bits)

    return np.abs(ordered(a) - ordered(b))


ONE_STEP = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_one_step_differs_from_torch_optim_only_through_its_square_root(options, dtype):
    """From torch.optim's own state, one step: the moments are torch's bit for bit (the square
    root does not feed them); the parameter is torch's bit for bit wherever torch's square root
    of the new (max_)exp_avg_sq equals IEEE's; torch's is never more than 1 ulp off; and where
    the parameter differs, it differs by no more than those roundings allow:
    ``|p - p_torch| <= 4 eps |step| + 2 ulp(p)``, where 4 eps bounds the relative difference of
    the step that 1 ulp in the square root makes through ``/ bc2**0.5``, ``+ eps`` and the
    quotient (one rounding each, both sides), and the ulps the final ``+ p`` rounding.

    Not "within 1 ulp of the parameter": where the step nearly cancels the parameter, its last
    bit is worth many of the parameter's (measured, over 10**6 elements: up to 64 ulp in float32,
    2 in float64)."""
    torch = require_torch()
    name, amsgrad, maximize, lr_dtype = options
    before, torch_after = torch_optim_one_step(options, dtype, 10_007, **ONE_STEP)
    rule = adamgen.rule(name, amsgrad=amsgrad, maximize=maximize, lr_dtype=lr_dtype)
    state = [before[k] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in before]
    found = dict(zip(torch_after, rule.update(before["param"], before["grad"], *state, step=4,
                                              **ONE_STEP)))
    for key in torch_after:
        if key != "param":
            assert_bitwise_equal(found[key], torch_after[key], key)
    root_of = found["max_exp_avg_sq" if amsgrad else "exp_avg_sq"]
    torch_root, ieee_root = torch.from_numpy(root_of).sqrt().numpy(), np.sqrt(root_of)
    assert ulps_apart(torch_root, ieee_root).max() <= 1
    mine, theirs = found["param"], torch_after["param"]
    same_root = torch_root == ieee_root
    assert_bitwise_equal(mine[same_root], theirs[same_root], "param where the roots agree")
    old = before["param"].astype(np.float64)
    step = np.abs(theirs - old) + ONE_STEP["lr"] * ONE_STEP["weight_decay"] * np.abs(old)
    bound = 4 * np.finfo(mine.dtype).eps * step + 2 * np.spacing(
        np.maximum(np.abs(mine), np.abs(theirs)))
    gap = np.abs(mine.astype(np.float64) - theirs)
    assert (gap <= bound).all(), (
        f"{(gap > bound).sum()} elements beyond the bound; worst {np.max(gap / bound):.2f}x")


def share_differing_from_torch_optim(dtype_name: str, n: int = 1_000_003,
                                     steps: int = STEPS) -> tuple[float, int, float]:
    """For the README: torch_adam against ``torch.optim.Adam(foreach=False)`` at its defaults.
    Returns the share of parameter elements that differ after one step from torch's own state,
    their largest distance in ulps, and the share that differ after ``steps`` steps from the
    same start with the same gradients (the differences then feed the moments too)."""
    torch = require_torch()
    dtype = getattr(torch, dtype_name)
    options = ("torch_adam", False, False, "float64")
    defaults = {**ONE_STEP, "weight_decay": 0.0}
    before, after = torch_optim_one_step(options, dtype_name, n, seed=1, **defaults)
    rule = adamgen.rule("torch_adam")
    mine = rule.update(before["param"], before["grad"], before["exp_avg"], before["exp_avg_sq"],
                       step=4, **defaults)[0]
    one_step = float(np.mean(mine != after["param"]))
    worst = int(ulps_apart(mine, after["param"]).max())
    generator = torch.Generator().manual_seed(2)
    param = torch.randn(n // 50, dtype=dtype, generator=generator)
    mine_param = param.numpy().copy()
    peer = torch.optim.Adam([param], foreach=False)
    opt = rule.optimizer([mine_param])
    for _ in range(steps):
        param.grad = torch.randn(param.shape, dtype=dtype, generator=generator)
        peer.step()
        opt.step([param.grad.numpy()])
    return one_step, worst, float(np.mean(mine_param != param.detach().numpy()))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_share_of_elements_that_differ_from_torch_optim(dtype):
    """The README's figure, printed (``pytest -s``) and carried by the assertion: small, and
    not zero (were it zero, torch's square root would have become IEEE's and the README's
    explanation stale)."""
    one_step, worst, many_steps = share_differing_from_torch_optim(dtype)
    message = (f"[numerics] torch_adam vs torch.optim.Adam, {dtype}: {one_step:.4%} of the "
               f"parameter's elements differ after one step from the same state (at most "
               f"{worst} ulp), {many_steps:.2%} after {STEPS} steps from the same start")
    print(message, file=sys.stderr)
    limit = 1e-3 if dtype == "float32" else 1e-4
    assert 0 < one_step < limit, message


# -- NumPy declines float64, the loader does not ------------------------------------------------

@pytest.mark.parametrize("name", ["torch_adam", "torch_adamw"])
def test_numpy_forced_on_float64_is_an_error_not_an_approximation(name):
    """NumPy cannot round a float64 fused multiply-add once: forced to NumPy, the functional
    form and the optimizer refuse, naming why (the optimizer used to switch to C silently)."""
    rule = adamgen.rule(name)
    x = np.linspace(-1, 1, 17)
    with forced("numpy"):
        with pytest.raises(InexactVariantError, match="float64 fused multiply-add"):
            rule.update(x, x, x, x, step=1)
        with pytest.raises(InexactVariantError, match="ADAMGEN_VARIANT=numpy.*float64 fused"):
            rule.optimizer([x.copy()])
        single = x.astype(np.float32)  # float32 is exact on NumPy
        rule.update(single, single, single, single, step=1)
        opt = rule.optimizer([single])
        opt.step()
        assert "float32 x1: numpy" in repr(opt), repr(opt)


def test_the_loader_serves_float64_from_c_bit_for_bit():
    """Unforced, float64 runs where it is exact: on C (the loader measures serial against
    threaded where both fit), bit for bit, in the functional form and the optimizer."""
    require_c("torch_adam")
    trajectory = make_trajectory(np.dtype(np.float64), seed=7)
    setting = SETTINGS[1]
    reference = torch_reference(trajectory, setting, "float64", amsgrad=True, maximize=False,
                                decoupled=True)
    rule = adamgen.rule("torch_adamw", amsgrad=True)
    for check in (check_functional, check_optimizer):
        tally = check(rule, trajectory, reference, state_names(True),
                      setting.hyperparameters(), None, "unforced")
        assert tally and "numpy" not in tally, dict(tally)


# -- bad input ----------------------------------------------------------------------------------

def test_an_unknown_rule_or_option_is_an_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match="no built-in rule 'torch-adam'; the rules are: "
                                         "ivy_adam, torch_adam, torch_adamw, lion"):
        adamgen.rule("torch-adam")
    with pytest.raises(ValueError, match="no option 'decoupled'; its options: amsgrad, "
                                         "maximize, lr_dtype"):
        adamgen.rule("torch_adam", decoupled=True)  # AdamW is its own rule
    with pytest.raises(ValueError, match="option maximize of rule 'torch_adamw' must be one "
                                         "of False, True, got 'yes'"):
        adamgen.rule("torch_adamw", maximize="yes")
    with pytest.raises(ValueError, match="lr_dtype .* must be one of 'float64', 'float32', "
                                         "got 'bfloat16'"):
        adamgen.rule("torch_adam", lr_dtype="bfloat16")


@pytest.mark.parametrize("name, value, message", [
    ("lr", -1e-3, "lr must be a finite number >= 0, got -0.001"),
    ("lr", float("inf"), "lr must be a finite number >= 0, got inf"),
    ("beta1", 1.0, "beta1 must satisfy 0 <= beta1 < 1, got 1.0"),
    ("beta2", -0.5, "beta2 must satisfy 0 <= beta2 < 1, got -0.5"),
    ("eps", -1e-8, "eps must be a number >= 0, got -1e-08"),
    ("weight_decay", float("nan"), "weight_decay must be a number >= 0, got nan"),
])
def test_a_hyperparameter_outside_its_range_is_a_value_error_naming_it(name, value, message):
    """In the functional form, when an optimizer is made, and when one is changed between
    steps (checked at the next step, before anything is written)."""
    rule = adamgen.rule("torch_adamw")
    x = np.ones(5, np.float32)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rule.update(x, x, x, x, step=1, **{name: value})
    with pytest.raises(ValueError, match=f"^{name} must"):
        rule.optimizer([x.copy()], **{name: value})
    param = x.copy()
    opt = rule.optimizer([param])
    opt.hyperparameters[name] = value
    with pytest.raises(ValueError, match=f"^{name} must"):
        opt.step([x])
    assert_bitwise_equal(param, x, "the parameter after a refused step")


def test_a_step_outside_its_range_or_a_missing_one_is_named():
    rule = adamgen.rule("torch_adam")
    x = np.ones(5)
    with pytest.raises(ValueError, match="step must be a finite number >= 1, got 0"):
        rule.update(x, x, x, x, step=0)
    with pytest.raises(TypeError, match="needs the hyperparameter step"):
        rule.update(x, x, x, x)
    with pytest.raises(TypeError, match="has no hyperparameter betas; it takes lr, beta1"):
        rule.update(x, x, x, x, step=1, betas=(0.9, 0.999))


def test_a_tensor_of_the_wrong_shape_or_dtype_is_named():
    rule = adamgen.rule("torch_adam", amsgrad=True)
    x = np.ones(10, np.float32)
    with pytest.raises(ValueError, match=r"grad \(11,\)"):
        rule.update(x, np.ones(11, np.float32), x, x, x, step=1)
    with pytest.raises(ValueError, match=r"exp_avg differs from param \(float32 \(10,\)\)"):
        rule.update(x, x, np.ones((2, 10), np.float32), x, x, step=1)
    with pytest.raises(TypeError, match=r"max_exp_avg_sq differs from param .*max_exp_avg_sq "
                                        r"float64 \(10,\)"):
        rule.update(x, x, x, x, x.astype(np.float64), step=1)
    with pytest.raises(TypeError, match=r"takes 5 tensors \(param, grad, exp_avg, exp_avg_sq, "
                                        r"max_exp_avg_sq\), got 4"):
        rule.update(x, x, x, x, step=1)
    with pytest.raises(TypeError, match="parameter 0 has dtype int32"):
        rule.optimizer([x.astype(np.int32)])
    param = x.copy()
    opt = rule.optimizer([param])
    with pytest.raises(ValueError, match=r"gradient 0 is \(11,\) float32; expected \(10,\) "
                                         r"float32"):
        opt.step([np.ones(11, np.float32)])
    with pytest.raises(ValueError, match=r"gradient 0 is \(10,\) float64; expected \(10,\) "
                                         r"float32"):
        opt.step([x.astype(np.float64)])
    with pytest.raises(ValueError, match=r"state_dict\['max_exp_avg_sq'\]\[0\] \(parameter 0\) "
                                         r"has shape \(9,\)"):
        opt.load_state_dict({**opt.state_dict(), "max_exp_avg_sq": [np.ones(9, np.float32)]})
    assert opt.step_count == 0
    assert_bitwise_equal(param, x, "the parameter after refused steps")
