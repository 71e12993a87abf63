"""Ivy's ``adam_update`` (Ivy's ``adam_step`` followed by ``optimizer_update``), the seed rule.

The reference, in Ivy's words::

    mw = beta1 * mw + (1 - beta1) * dcdw
    vw = beta2 * vw + (1 - beta2) * dcdw**2
    vw_sqrt = maximum(vw, 0.0) ** 0.5            # Ivy's maximum is where(x >= 0, x, 0)
    alpha = (1 - beta2**step) ** 0.5 / (1 - beta1**step + epsilon)
    effective_grad = (alpha * mw) / (vw_sqrt + epsilon)
    w_new = w - effective_grad * lr

``epsilon`` enters twice, ``alpha`` is not the paper's bias correction, and ``alpha`` is computed
in Python floats (its ``** 0.5`` is C's ``pow``). Bit-identical to Ivy's NumPy backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import sympy
from sympy import Piecewise, Rational, S, Symbol
from sympy import sqrt as power_half

from ..config import KernelConfig
from ..derivatives import PREFIX, vjp_spec
from ..language import exact
from ..proofs import (
    PROVED,
    IRFactory,
    Undecided,
    identity,
    ir_expressions,
    is_zero,
    resolve,
    symbols_of,
)
from ..spec import Hyperparameter, Range, StatePair, Tensor, UpdateSpec, symbols, unevaluated

UNIT = Range(0.0, 1.0, high_open=True)


def spec() -> UpdateSpec:
    """The rule's graph; ``** 0.5`` on the tensor clamp is NumPy's square root."""
    w, dcdw, lr, mw_tm1, vw_tm1 = symbols("w dcdw lr mw_tm1 vw_tm1")
    beta1, beta2, epsilon, step = symbols("beta1 beta2 epsilon step")
    with unevaluated():
        mw = beta1 * mw_tm1 + (1 - beta1) * dcdw
        vw = beta2 * vw_tm1 + (1 - beta2) * dcdw**2
        vw_sqrt = power_half(Piecewise((vw, vw >= 0), (0, True)))
        alpha = (1 - beta2**step) ** Rational(1, 2) / (1 - beta1**step + epsilon)
        effective_grad = (alpha * mw) / (vw_sqrt + epsilon)
        w_new = w - effective_grad * lr
    return UpdateSpec(
        "ivy_adam",
        tensors=[Tensor("w", doc="weights"), Tensor("dcdw", doc="gradient of the cost"),
                 Tensor("lr", scalar=True, range=Range(low=0.0, finite=True),
                        doc="learning rate: a number or an array"),
                 Tensor("mw_tm1", doc="first moment"), Tensor("vw_tm1", doc="second moment")],
        hyperparameters=[
            Hyperparameter("beta1", 0.9, UNIT, doc="gradient forgetting factor"),
            Hyperparameter("beta2", 0.999, UNIT, doc="second-moment forgetting factor"),
            Hyperparameter("epsilon", 1e-07, Range(low=0.0), doc="added twice, see the rule"),
            Hyperparameter("step", None, Range(low=0.0, finite=True), kind="step",
                           doc="training step, used as float(step)")],
        outputs={"w_new": w_new, "mw": mw, "vw": vw},
        state=[StatePair("w_new", "w"), StatePair("mw", "mw_tm1", "m"),
               StatePair("vw", "vw_tm1", "v")],
        parameter="w", gradient="dcdw",
        names={"alpha": alpha, "vw_sqrt": vw_sqrt, "effective_grad": effective_grad},
        summary="Ivy's adam_update: epsilon twice, alpha in Python floats")


# --- the rule's theorems (``adamgen verify --rule ivy_adam``) --------------------------------
# Symbols A1 = 1 - beta1**t and A2 = 1 - beta2**t (B**2 = A2) are positive: 0 < beta < 1, t >= 1.

def _moment_recurrences(spec: UpdateSpec) -> tuple[str, str]:
    x = symbols_of(spec)
    t = Symbol("t", integer=True, nonnegative=True)
    g = Symbol("g", real=True)
    m = sympy.Function("m")
    claims, solved = [], []
    for out, state, beta, power in (("mw", "mw_tm1", "beta1", 1), ("vw", "vw_tm1", "beta2", 2)):
        update = exact(spec.output(out))
        closed = lambda k, b=x[beta], p=power: (1 - b**k) * g**p
        step = update.xreplace({x[state]: closed(t), x["dcdw"]: g})
        claims += [(f"{out}: base t=0", closed(0), S.Zero),
                   (f"{out}: step t->t+1", step, closed(t + 1))]
        recurrence = update.xreplace({x[state]: m(t), x["dcdw"]: g})
        answer = sympy.rsolve(m(t + 1) - recurrence, m(t), {m(0): 0})
        solved.append(answer is not None and is_zero(answer - closed(t)))
    status, detail = identity(claims)
    if status == PROVED:
        detail = ("m_t = (1-beta1**t)*g and v_t = (1-beta2**t)*g**2 by induction on symbolic t; "
                  f"rsolve of the spec's recurrences {'agrees' if all(solved) else 'differs'}")
    return status, detail


def _step_of_moments(spec: UpdateSpec) -> tuple[sympy.Expr, dict[str, Symbol], Symbol, Symbol]:
    """``w_new`` as a function of the new moments ``M``, ``V`` (the spec's own subgraphs)."""
    m_sym, v_sym = Symbol("M", real=True), Symbol("V", real=True)
    w_new = spec.output("w_new").xreplace({spec.output("mw"): m_sym, spec.output("vw"): v_sym})
    w_new = exact(w_new)
    if {s.name for s in w_new.free_symbols} & {"dcdw", "mw_tm1", "vw_tm1"}:
        raise Undecided("w_new reads the state other than through mw and vw")
    return w_new, symbols_of(spec), m_sym, v_sym


def _bias_powers(x: dict[str, Symbol], a1: sympy.Expr, a2: sympy.Expr) -> dict:
    return {x["beta1"] ** x["step"]: 1 - a1, x["beta2"] ** x["step"]: 1 - a2}


def _bias_correction(spec: UpdateSpec) -> tuple[str, str]:
    w_new, x, m_sym, v_sym = _step_of_moments(spec)
    a1, a2 = sympy.symbols("A1 A2", positive=True)
    g_pos = Symbol("g", positive=True)
    claims = []
    for label, g, sign in (("g > 0", g_pos, 1), ("g < 0", -g_pos, -1)):
        at_t = w_new.xreplace({m_sym: a1 * g, v_sym: a2 * g**2, x["epsilon"]: S.Zero})
        at_t = at_t.xreplace(_bias_powers(x, a1, a2))
        claims.append((label, resolve(at_t - x["w"]), -x["lr"] * sign))
    status, detail = identity(claims)
    return status, ("w_t - w_{t-1} = -lr*sign(g) for every t >= 1 (epsilon = 0, constant g != 0, "
                    "m0 = v0 = 0), cases " + detail if status == PROVED else detail)


def _scale_invariance(spec: UpdateSpec) -> tuple[str, str]:
    w_new, x, m_sym, v_sym = _step_of_moments(spec)
    c = Symbol("c", positive=True)
    mw, vw = exact(spec.output("mw")), exact(spec.output("vw"))
    scaled = {x["dcdw"]: c * x["dcdw"], x["mw_tm1"]: c * x["mw_tm1"],
              x["vw_tm1"]: c**2 * x["vw_tm1"]}
    v_pos = Symbol("V", positive=True)
    step = w_new.xreplace({x["epsilon"]: S.Zero, v_sym: v_pos})
    claims = [("m scales by c", mw.xreplace(scaled), c * mw),
              ("v scales by c**2", vw.xreplace(scaled), c**2 * vw),
              ("step unchanged", resolve(step.xreplace({m_sym: c * m_sym, v_pos: c**2 * v_pos})),
               resolve(step))]
    status, detail = identity(claims)
    return status, ("by induction from m0 = v0 = 0 for any gradient sequence: " + detail
                    + " (epsilon = 0, v > 0; at v <= 0 both steps divide by zero)"
                    if status == PROVED else detail)


def _ivy_vs_paper(spec: UpdateSpec) -> tuple[str, str]:
    w_new, x, m_sym, _ = _step_of_moments(spec)
    a1, b, s_ = sympy.symbols("A1 B S", positive=True)  # A2 = B**2, V = S**2
    eps, lr = x["epsilon"], x["lr"]
    ivy = resolve(w_new.xreplace({Symbol("V", real=True): s_**2})
                   .xreplace(_bias_powers(x, a1, b**2)))
    paper = x["w"] - lr * (m_sym / a1) / (power_half(s_**2 / b**2) + eps)  # Kingma & Ba, Alg. 1
    closed = (eps * lr * m_sym * b * (a1 * (1 - b) + s_ + eps)
              / (a1 * (a1 + eps) * (s_ + eps) * (s_ + eps * b)))
    status, detail = identity([("epsilon = 0", ivy.xreplace({eps: S.Zero}),
                                 paper.xreplace({eps: S.Zero})),
                                ("difference", ivy - paper, closed)])
    if status != PROVED:
        return status, detail
    a2 = Symbol("A2", positive=True)
    shown = closed.xreplace({b: power_half(a2), s_: power_half(Symbol("v", positive=True))})
    return PROVED, (f"equal at epsilon = 0; w_ivy - w_paper = {shown} with A1 = 1-beta1**t, "
                    "A2 = 1-beta2**t and M, v the new moments (each factor is positive for "
                    "epsilon, lr, M > 0 and 0 < A1, A2 < 1: Ivy's step is the smaller)")


def _vjp_equals_derivatives(spec: UpdateSpec, factory: IRFactory, mode: str) -> tuple[str, str]:
    vjp = vjp_spec(spec)
    x = symbols_of(vjp) | symbols_of(spec)
    rebuilt = ir_expressions(factory(vjp, KernelConfig(spec=vjp.ref(), dtype="float64",
                                                       mode=mode)), x)
    outputs = [(name, exact(expr)) for name, expr in spec.outputs]
    v_expr = exact(spec.output("vw"))
    a1, b, s_, n_ = sympy.symbols("A1 B S N", positive=True)
    z = Symbol("Z")
    regions = {"v > 0": s_**2, "v < 0": -n_, "v = 0": S.Zero}
    claims = []
    for region, v_value in regions.items():
        def abstract(e: sympy.Expr, v_value: sympy.Expr = v_value) -> sympy.Expr:
            return e.xreplace({v_expr: v_value}).xreplace(_bias_powers(x, a1, b**2))

        def branch(e: sympy.Expr, region: str = region) -> sympy.Expr:  # the spec, locally
            pieces = e.atoms(Piecewise)
            if region == "v = 0":  # the documented rule: the path through sqrt is cut
                return e.xreplace({p: z for p in pieces})
            return e.xreplace({p: _branch_at(p, abstract) for p in pieces})

        for tensor in spec.tensors:
            reference = sum((x[PREFIX + name] * sympy.diff(branch(expr), tensor)
                             for name, expr in outputs), S.Zero).xreplace({z: S.Zero})
            ours = resolve(abstract(rebuilt[PREFIX + tensor.name]))
            reference = resolve(abstract(reference))
            if x["vw_tm1"] in (ours - reference).free_symbols:
                raise Undecided("v could not be isolated in the VJP")
            claims.append((f"{PREFIX}{tensor.name} at {region}", ours, reference))
    status, detail = identity(claims)
    return status, ("sum_o d_o * diff(o, x) (SymPy) == lowered VJP for every x, in each region "
                    "v > 0, v < 0, and v = 0 (sqrt path cut, the documented rule)"
                    if status == PROVED else detail)


def _branch_at(piece: Piecewise, abstract: Callable[[sympy.Expr], sympy.Expr]) -> sympy.Expr:
    """The branch of ``piece`` that holds in the region ``abstract`` substitutes."""
    for value, condition in piece.args:
        decided = resolve(Piecewise((S.One, abstract(condition)), (S.Zero, True)))
        if decided == 1:
            return value
    raise Undecided(f"no branch of {piece} holds")


def theorems(spec: UpdateSpec, factory: IRFactory) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    """Adam's properties, proven on this spec's graph, and its VJP kernel against SymPy's
    derivatives of the spec."""
    table: list[tuple[str, Callable[[], tuple[str, str]]]] = [
        ("moment recurrences m_t, v_t", functools.partial(_moment_recurrences, spec)),
        ("bias correction: step = -lr*sign(g)", functools.partial(_bias_correction, spec)),
        ("scale invariance (epsilon = 0)", functools.partial(_scale_invariance, spec)),
        ("Ivy's form vs Kingma & Ba", functools.partial(_ivy_vs_paper, spec)),
    ]
    table += [(f"VJP kernel == d spec [{mode}]",
               functools.partial(_vjp_equals_derivatives, spec, factory, mode))
              for mode in ("exact", "fast")]
    return table
