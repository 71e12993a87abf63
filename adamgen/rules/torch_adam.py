"""torch's Adam and AdamW (``torch.optim.Adam/AdamW(foreach=False)``, torch 2.13.0, CPU), with an
IEEE square root.

Every operation below was measured against torch on this machine (AVX-512 build; the AVX2 build
rounds the same way): ``lerp_``, ``addcmul_`` and ``add(alpha=)`` are one fused multiply-add each,
``addcdiv_`` and the divisions are not, the per-call scalars are Python doubles rounded once to the
tensors' dtype (``bias_correction2 ** 0.5`` is C's ``pow``), and ``torch.maximum`` propagates NaN.
The one operation not reproduced is the square root: torch's CPU ``sqrt`` is MKL's vector routine,
which is not correctly rounded (it differs from IEEE's in 17 % of float32 and 1.3 % of float64
elements, by 1 ulp); these rules use the correctly rounded one. So the contract is torch's
arithmetic, operation by operation, with an IEEE square root.

torch's step (``_single_tensor_adam``, the non-capturable branch), and the spec's line for it::

    grad = -grad if maximize                          g = -grad
    param.mul_(1 - lr*wd)            (AdamW)          p = param * (1 - lr*wd)
    grad = grad.add(param, alpha=wd) (Adam, wd != 0)  g = fma(param, wd, g)
    exp_avg.lerp_(grad, 1 - beta1)                    w = fl(1 - beta1):
                                                      m = fma(w, g - m, m)      if w < 0.5
                                                      m = fma(w - 1, g - m, g)  otherwise
    exp_avg_sq.mul_(beta2)                            v = v * beta2
        .addcmul_(grad, grad, value=1 - beta2)        v = fma((1 - beta2)*g, g, v)
    torch.maximum(max_exp_avg_sq, exp_avg_sq, out=)   vmax = maximum(vmax, v)   (amsgrad)
    denom = (src.sqrt() / (bc2 ** 0.5)).add_(eps)     den = sqrt(src) / bc2**0.5 + eps
    param.addcdiv_(exp_avg, denom, value=-lr/bc1)     p = ((-lr/bc1)*m)/den + p

with ``bc1 = 1 - beta1**step`` and ``bc2 = 1 - beta2**step`` in Python floats. An ``lr`` held in
a float32 0-d tensor makes torch compute ``lr/bc1`` and ``1 - lr*wd`` in float32
(``lr_dtype="float32"``).

**bfloat16 and float16 tensors** (``precision="bfloat16"``/``"float16"``: parameter, gradient and
state all stored in that dtype, the kernel computing in float32). torch computes each op in
float32 and rounds its result once to the tensors' dtype, written R below; its scalars are
rounded to float32, except the scalars of add/sub (``eps``, ``alpha``), which are rounded to
the low dtype first; its square root is then ``sqrtf`` (correctly rounded), not MKL's, so this
variant is torch's arithmetic exactly. Measured on the development machine (torch 2.13,
AVX-512; /work/research/torch_rounding.md, section 5, re-checked by the tests)::

    param.mul_(1 - lr*wd)            (AdamW)          p = R(param * (1 - lr*wd))
    grad.add(param, alpha=wd)        (Adam, wd != 0)  g = R(fma(param, R(wd), g))
    exp_avg.lerp_(grad, 1 - beta1)                    m = R(lerp as above, in float32)
    exp_avg_sq.mul_(beta2)                            v = R(v * beta2)
        .addcmul_(grad, grad, value=1 - beta2)        v = R(fma((1 - beta2)*g, g, v))
    denom = src.sqrt()                                den = R(sqrt(src))
        / (bc2 ** 0.5)                                den = R(den / bc2**0.5)
        .add_(eps)                                    den = R(den + R(eps))
    param.addcdiv_(exp_avg, denom, value=-lr/bc1)     p = R(((-lr/bc1)*m)/den + p)

The coupled decay is the one op whose rounding depends on where an element lies: torch's
vectorised loop computes ``R(fma(p, R(wd), g))`` (``p*R(wd)`` is exact in float32), but its
scalar tail (the last ``n mod 32`` elements of each parallel chunk) and every element of a
non-contiguous tensor compute ``R(g + R(R(wd)*p))``. This spec says the vectorised form for
every element; docs/mixed-precision.md lists the elements where torch's tail differs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import sympy
from sympy import Ne, Rational, S, Symbol

from ..language import element, exact, fma, maximum, round_to, sqrt, where
from ..proofs import IRFactory, cases, hyperparameters_of, identity, resolve, symbols_of
from ..spec import Hyperparameter, Range, Tensor, UpdateSpec, symbols, unevaluated

UNIT = Range(0.0, 1.0, high_open=True)
#: The dtypes torch computes ``lr``'s scalars in: a Python float's, or a 0-d tensor's.
LR_DTYPES = ("float64", "float32")
#: The tensors' dtype: ``native`` (the kernel's: float32 or float64), or a low precision whose
#: tensors are stored in it while torch's ops compute in float32 and round each result.
PRECISIONS = ("native", "bfloat16", "float16")


def spec(amsgrad: bool = False, maximize: bool = False, decoupled: bool = False,
         lr_dtype: str = "float64", precision: str = "native") -> UpdateSpec:
    """Adam (``decoupled=False``) or AdamW (``decoupled=True``)."""
    if lr_dtype not in LR_DTYPES:
        raise ValueError(f"lr_dtype must be one of {LR_DTYPES}, got {lr_dtype!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq = symbols(
        "param grad exp_avg exp_avg_sq max_exp_avg_sq")
    lr, beta1, beta2, eps, weight_decay, step = symbols("lr beta1 beta2 eps weight_decay step")
    low_precision = precision != "native"

    def in_lr_dtype(x: sympy.Expr) -> sympy.Expr:
        return round_to(x, "float32") if lr_dtype == "float32" else x

    def op(x: sympy.Expr) -> sympy.Expr:
        """One torch op's result, rounded to the tensors' dtype (no-op in native precision)."""
        return round_to(x, precision) if low_precision else x

    with unevaluated():
        g = -grad if maximize else grad
        if decoupled:
            p = op(param * in_lr_dtype(1 - in_lr_dtype(in_lr_dtype(lr) *
                                                       in_lr_dtype(weight_decay))))
        else:
            p = param
            alpha = op(weight_decay)  # add's alpha is rounded to the tensors' dtype first
            g = where(Ne(weight_decay, 0), op(fma(param, alpha, g)), g)
        weight = element(1 - beta1)  # lerp_ rounds its weight first, then branches on it
        low = weight < Rational(1, 2)
        m = op(fma(where(low, weight, weight - 1), g - exp_avg, where(low, exp_avg, g)))
        if low_precision:  # mul_ and addcmul_ round their results separately
            v = op(fma((1 - beta2) * g, g, op(exp_avg_sq * beta2)))
        else:
            v = fma((1 - beta2) * g, g, exp_avg_sq * beta2)
        source = maximum(max_exp_avg_sq, v) if amsgrad else v
        step_size = in_lr_dtype(in_lr_dtype(lr) / in_lr_dtype(1 - beta1**step))
        if low_precision:  # sqrt, the division and add_(eps) round each; eps rounded first
            denom = op(op(op(sqrt(source)) / (1 - beta2**step) ** Rational(1, 2)) + op(eps))
        else:
            denom = sqrt(source) / (1 - beta2**step) ** Rational(1, 2) + eps
        p_new = op(((-step_size) * m) / denom + p)
    storage = precision if low_precision else None
    outputs = {"param": p_new, "exp_avg": m, "exp_avg_sq": v}
    tensors = [Tensor("param", doc="the parameter", storage=storage),
               Tensor("grad", doc="its gradient", storage=storage),
               Tensor("exp_avg", doc="first moment", storage=storage),
               Tensor("exp_avg_sq", doc="second moment", storage=storage)]
    if amsgrad:
        outputs["max_exp_avg_sq"] = source
        tensors.append(Tensor("max_exp_avg_sq", doc="running maximum of exp_avg_sq",
                              storage=storage))
    name = "torch_adamw" if decoupled else "torch_adam"
    return UpdateSpec(
        name, tensors=tensors,
        hyperparameters=[
            Hyperparameter("lr", 1e-3, Range(low=0.0, finite=True), doc="learning rate"),
            Hyperparameter("beta1", 0.9, UNIT, doc="first-moment decay"),
            Hyperparameter("beta2", 0.999, UNIT, doc="second-moment decay"),
            Hyperparameter("eps", 1e-8, Range(low=0.0), doc="added to the denominator"),
            Hyperparameter("weight_decay", 1e-2 if decoupled else 0.0, Range(low=0.0),
                           doc="decoupled decay" if decoupled else "L2 penalty (coupled)"),
            Hyperparameter("step", None, Range(low=1.0, finite=True), kind="step",
                           doc="the step count, from 1")],
        outputs=outputs, state={name: name for name in outputs},
        parameter="param", gradient="grad",
        names={"m_weight": weight, "step_size": step_size, "denom": denom,
               "grad_decayed": g, "param_decayed": p},
        options={"amsgrad": amsgrad, "maximize": maximize, "lr_dtype": lr_dtype,
                 **({"precision": precision} if low_precision else {})},
        summary=f"torch.optim.{'AdamW' if decoupled else 'Adam'}(foreach=False): torch's "
                "arithmetic, an IEEE square root")


# --- theorems (``adamgen verify --rule torch_adam``) ------------------------------------------

def _first_step(spec: UpdateSpec) -> tuple[str, str]:
    """From zero state, with eps = 0, one step moves each element by -lr*sign(direction), with
    weight decay and without, in both branches of lerp's weight (exact arithmetic: the claim is
    about the rule, up to rounding)."""
    x = symbols_of(spec)
    maximize = dict(spec.interface.options)["maximize"]
    decoupled = spec.name == "torch_adamw"
    b1, b2 = Symbol("B1", positive=True), Symbol("B2", positive=True)  # 1 - beta1, 1 - beta2
    zero_state = {x["exp_avg"]: S.Zero, x["exp_avg_sq"]: S.Zero, x["step"]: S.One,
                  x["eps"]: S.Zero, x["beta1"]: 1 - b1, x["beta2"]: 1 - b2}
    if "max_exp_avg_sq" in x:
        zero_state[x["max_exp_avg_sq"]] = S.Zero
    wd = x["weight_decay"]
    claims = []
    for decay, decay_subs in (("weight_decay != 0", {Ne(wd, 0): sympy.true}),
                              ("weight_decay = 0", {wd: S.Zero})):
        for label, sign_of in (("direction > 0", 1), ("direction < 0", -1)):
            d = Symbol("d", positive=True) * sign_of  # the (decayed, maximize-signed) direction
            grad = (-1 if maximize else 1) * (d if decoupled else d - wd * x["param"])
            start = x["param"] * (1 - x["lr"] * wd) if decoupled else x["param"]
            new = exact(spec.output("param"), drop_rounding=True).xreplace(
                {**zero_state, x["grad"]: grad}).xreplace(decay_subs)
            for branch, value in cases(new):
                claims.append((f"{decay}, {label}, {branch}",
                               sympy.simplify(resolve(value) - start.xreplace(decay_subs)),
                               -x["lr"] * sign_of))
    status, detail = identity(claims, hyperparameters_of(spec))
    what = ("the decayed parameter minus lr*sign(grad)" if decoupled
            else "-lr*sign(grad + weight_decay*param)")
    flipped = ", sign flipped by maximize" if maximize else ""
    return status, (f"first step from zero state, eps = 0: {what}{flipped}; cases: {detail}"
                    if status == "PROVED" else detail)


def _max_never_decreases(spec: UpdateSpec) -> tuple[str, str]:
    """amsgrad: the new max_exp_avg_sq is at least the old one and at least exp_avg_sq."""
    x = symbols_of(spec)
    new = exact(spec.output("max_exp_avg_sq"))
    v_new = exact(spec.output("exp_avg_sq"))
    claims = [("new >= old", sympy.Max(new, x["max_exp_avg_sq"]), new),
              ("new >= exp_avg_sq", sympy.Max(new, v_new), new)]
    status, detail = identity(claims, hyperparameters_of(spec))
    return status, ("max(new, old) == new and max(new, exp_avg_sq) == new"
                    if status == "PROVED" else detail)


def theorems(spec: UpdateSpec, factory: IRFactory
             ) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    table: list[tuple[str, Callable[[], tuple[str, str]]]] = [
        ("first step = -lr*sign(...)", functools.partial(_first_step, spec))]
    if "max_exp_avg_sq" in spec.interface.tensor_names:
        table.append(("amsgrad: max_exp_avg_sq never decreases",
                      functools.partial(_max_never_decreases, spec)))
    return table

