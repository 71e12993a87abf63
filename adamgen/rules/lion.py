"""Lion (Chen et al., 2023), as ``lion_pytorch.Lion`` 0.2.5 computes it (its ``update_fn``).

Measured against lion-pytorch on this machine, bit for bit, NaN and inf included::

    p.data.mul_(1 - lr*wd)                                  p = param * (1 - lr*wd)
    update = exp_avg.clone().mul_(beta1)                    c = fma(grad, 1 - beta1,
                 .add(grad, alpha=1 - beta1).sgn_()                 exp_avg*beta1)
    p.add_(update, alpha=-lr)                               p = fma(sign(c), -lr, p)
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)         m = fma(grad, 1 - beta2,
                                                                    exp_avg*beta2)

``sign`` is torch's: 0 for 0, -0 and NaN, so a NaN gradient never moves the parameter (it does
make ``exp_avg`` NaN). The decay runs even when ``weight_decay`` is 0 (multiplying by 1.0 changes
no bit). lion-pytorch's ``decoupled_weight_decay=True`` divides ``weight_decay`` by the initial
``lr`` before the step: pass that quotient as ``weight_decay``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import sympy
from sympy import S, Symbol

from ..language import exact, fma, sign
from ..proofs import IRFactory, identity, symbols_of
from ..spec import Hyperparameter, Range, Tensor, UpdateSpec, symbols, unevaluated

CLOSED_UNIT = Range(0.0, 1.0)


def spec() -> UpdateSpec:
    param, grad, exp_avg = symbols("param grad exp_avg")
    lr, beta1, beta2, weight_decay = symbols("lr beta1 beta2 weight_decay")
    with unevaluated():
        p = param * (1 - lr * weight_decay)
        interpolation = fma(grad, 1 - beta1, exp_avg * beta1)
        p_new = fma(sign(interpolation), -lr, p)
        m = fma(grad, 1 - beta2, exp_avg * beta2)
    return UpdateSpec(
        "lion",
        tensors=[Tensor("param", doc="the parameter"), Tensor("grad", doc="its gradient"),
                 Tensor("exp_avg", doc="momentum")],
        hyperparameters=[
            Hyperparameter("lr", 1e-4, Range(low=0.0, low_open=True, finite=True),
                           doc="learning rate (> 0)"),
            Hyperparameter("beta1", 0.9, CLOSED_UNIT, doc="interpolation factor"),
            Hyperparameter("beta2", 0.99, CLOSED_UNIT, doc="momentum decay"),
            Hyperparameter("weight_decay", 0.0, Range(low=0.0, finite=True),
                           doc="decoupled decay (multiplied by lr)")],
        outputs={"param": p_new, "exp_avg": m}, state={"param": "param", "exp_avg": "exp_avg"},
        parameter="param", gradient="grad",
        names={"param_decayed": p, "interpolation": interpolation},
        summary="lion_pytorch.Lion 0.2.5: sign of the interpolation, fused as torch fuses")


def _step_is_a_sign(spec: UpdateSpec) -> tuple[str, str]:
    """param_new = decayed param - lr*sign(c): each element moves by lr*|sign(c)|, so not at all
    where the interpolation c is 0 (sign's rule makes NaN 0 too)."""
    x = symbols_of(spec)
    named = dict(spec.names)
    decayed, interpolation = exact(named["param_decayed"]), exact(named["interpolation"])
    new = exact(spec.output("param"))
    claims = [("param_new - decayed = -lr*sign(c)", new - decayed,
               -x["lr"] * sympy.sign(interpolation)),
              ("c = 0 (grad = exp_avg = 0): no move",
               new.xreplace({x["grad"]: S.Zero, x["exp_avg"]: S.Zero}),
               decayed.xreplace({x["grad"]: S.Zero, x["exp_avg"]: S.Zero}))]
    c = Symbol("c", positive=True)
    claims.append(("|step| = lr when c != 0", sympy.Abs(-x["lr"] * sympy.sign(c)),
                   sympy.Abs(x["lr"])))
    status, detail = identity(claims)
    return status, (f"{detail} (sign's rule: sign(NaN) = 0)" if status == "PROVED" else detail)


def theorems(spec: UpdateSpec, factory: IRFactory
             ) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    return [("step = decayed param - lr*sign(interpolation)",
             functools.partial(_step_is_a_sign, spec))]
