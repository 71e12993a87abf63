"""``adamgen verify``: theorems about the spec and its lowered kernels, proven by SymPy.

Each theorem is proven symbolically (identities by ``expand``/``cancel`` of a difference to 0,
recurrences by induction over a symbolic ``t``), never by sampling. Outcomes:

* ``PROVED``: SymPy reduced the claim to an identity;
* ``FAILED``: SymPy did not, and an exact counterexample (rational inputs, 50-digit evaluation)
  shows the claim false; the detail names it;
* ``UNPROVEN``: SymPy could not decide either way. Never reported as proven.

The IR under test comes from ``ir_factory(spec, config)`` (default: :func:`lower`), so a test
can hand in a deliberately wrong IR and see ``FAILED``. Symbols ``A1 = 1 - beta1**t`` and
``A2 = 1 - beta2**t`` (``B**2 = A2``) are positive: ``0 < beta < 1`` and ``t >= 1``.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sympy
from sympy import Piecewise, Rational, S, Symbol, sqrt

from .codegen.ir import KernelIR, Operand
from .codegen.lower import lower
from .config import KernelConfig
from .derivatives import PREFIX, evaluated, vjp_spec
from .spec import UpdateSpec, adam_spec

PROVED, FAILED, UNPROVEN = "PROVED", "FAILED", "UNPROVEN"
IRFactory = Callable[[UpdateSpec, KernelConfig], KernelIR]
#: Ivy's defaults: the ``--const`` specialisation checked by substitution.
DEFAULT_CONSTANTS: tuple[tuple[str, float], ...] = (
    ("beta1", 0.9), ("beta2", 0.999), ("epsilon", 1e-07))


@dataclass(frozen=True)
class TheoremResult:
    """One theorem's outcome: ``status`` is PROVED, FAILED or UNPROVEN."""

    name: str
    status: str
    seconds: float
    detail: str


class _Undecided(Exception):
    """SymPy could not decide a condition or an identity."""


# --- expressions from the IR ----------------------------------------------------------------

def _exact(value: Operand) -> sympy.Expr:
    """A constant as the exact rational its IEEE double is (0.1 is not 1/10)."""
    return sympy.Integer(value) if isinstance(value, int) else Rational(value)


def ir_expressions(ir: KernelIR, symbols: dict[str, Symbol]) -> dict[str, sympy.Expr]:
    """Each output of ``ir`` as a SymPy expression of the inputs, from its prelude and body."""
    values: dict[str, sympy.Expr] = {name: symbols[name] for name in ir.tensors}
    values.update({name: symbols[name] for name in ir.free_hyperparameters})
    ops: dict[str, Callable[..., sympy.Expr]] = {
        "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b, "neg": lambda a: -a, "pow": lambda a, b: a**b,
        "sqrt": sqrt, "clamp_nonnegative": lambda a: Piecewise((a, a >= 0), (0, True)),
        "select_positive": lambda c, a: Piecewise((a, c > 0), (0, True)),
    }
    for step in ir.prelude + ir.body:
        args = [values[a] if isinstance(a, str) else _exact(a) for a in step.args]
        values[step.target] = ops[step.op](*args)
    return {name: values[value] for name, value in ir.outputs}


def python_folded(expr: sympy.Basic, constants: dict[str, float]) -> sympy.Basic:
    """The spec with baked hyperparameters, each all-constant subtree folded as Python would.

    Independent of the lowering: it evaluates the spec's own binary tree with Python floats
    (``a - b``, ``a / b``, ``a ** b`` in the spec's order) and keeps the result's exact value.
    """
    def negated(node: sympy.Basic) -> sympy.Basic | None:
        is_negation = isinstance(node, sympy.Mul) and len(node.args) == 2 and node.args[0] == -1
        return node.args[1] if is_negation else None

    def value(node: sympy.Basic) -> float:
        if isinstance(node, Symbol):
            return constants[node.name]
        if node.is_Number:
            return float(node)
        a, b = node.args if len(node.args) == 2 else (node.args[0], S.Zero)
        if isinstance(node, sympy.Add):
            if negated(b) is not None and negated(a) is None:
                return value(a) - value(negated(b))
            if negated(a) is not None and negated(b) is None:
                return value(b) - value(negated(a))
            return value(a) + value(b)
        if isinstance(node, sympy.Mul) and a == -1:
            return -value(b)
        if isinstance(node, sympy.Mul) and isinstance(b, sympy.Pow) and b.exp == -1:
            return value(a) / value(b.base)
        if isinstance(node, sympy.Mul):
            return value(a) * value(b)
        if isinstance(node, sympy.Pow) and b in (-1, 2):
            return 1 / value(a) if b == -1 else value(a) * value(a)
        if isinstance(node, sympy.Pow):
            return value(a) ** value(b)
        raise _Undecided(f"cannot fold {node}")

    def walk(node: sympy.Basic) -> sympy.Basic:
        names = {s.name for s in node.free_symbols}
        if names and names <= set(constants):
            return Rational(value(node))
        if not node.args or isinstance(node, Symbol):
            return node
        return node.func(*(walk(a) for a in node.args))

    return walk(expr)


# --- deciding ---------------------------------------------------------------------------------

def _is_zero(expr: sympy.Expr) -> bool:
    if sympy.expand(expr) == 0:
        return True
    return sympy.cancel(sympy.together(expr)) == 0


def _sample(symbols: set[Symbol], rng: random.Random) -> dict[Symbol, sympy.Expr]:
    """Exact inputs in the theorems' domain (0 < beta < 1, epsilon > 0, integer step)."""
    named = {"beta1": Rational(9, 10), "beta2": Rational(999, 1000),
             "epsilon": Rational(1, 1000), "step": sympy.Integer(rng.randint(1, 9))}
    values = {}
    for s in symbols:
        value = named.get(s.name, Rational(rng.randint(1, 40), rng.randint(7, 23)))
        if s.name not in named and not (s.is_positive or s.is_nonnegative) \
                and (s.is_negative or rng.random() < 0.5):
            value = -value
        values[s] = sympy.Integer(rng.randint(1, 9)) if s.is_integer else value
    return values


def _counterexample(lhs: sympy.Expr, rhs: sympy.Expr) -> str | None:
    """Exact inputs where ``lhs != rhs``: both finite and apart, or one finite and one not."""
    rng = random.Random(0)
    for _ in range(6):
        values = _sample(lhs.free_symbols | rhs.free_symbols, rng)
        a, b = (sympy.N(side.xreplace(values), 50) for side in (lhs, rhs))
        if not (a.is_Number or a.is_number) or not (b.is_Number or b.is_number):
            continue
        finite_a, finite_b = a.is_finite, b.is_finite
        if finite_a and finite_b and abs(a - b) <= 1e-30 * max(1, abs(a), abs(b)):
            continue  # equal within the 50 digits evaluated
        if (finite_a and finite_b) or (finite_a is True) != (finite_b is True):
            shown = ", ".join(f"{k}={v}" for k, v in sorted(values.items(), key=str))
            gap = f" (difference {sympy.N(a - b, 6)})" if finite_a and finite_b else ""
            return f"{sympy.N(a, 6)} != {sympy.N(b, 6)}{gap} at {shown}"
    return None


def _identity(claims: Sequence[tuple[str, sympy.Expr, sympy.Expr]]) -> tuple[str, str]:
    """Each ``(label, lhs, rhs)`` must be an identity: PROVED, FAILED (witness) or UNPROVEN."""
    undecided = []
    for label, lhs, rhs in claims:
        if _is_zero(lhs - rhs):
            continue
        witness = _counterexample(lhs, rhs)
        if witness is not None:
            return FAILED, f"{label}: {witness}"
        undecided.append(label)
    if undecided:
        return UNPROVEN, "SymPy could not reduce to 0: " + ", ".join(undecided)
    return PROVED, "; ".join(label for label, _, _ in claims)


def _resolve(expr: sympy.Basic) -> sympy.Basic:
    """Replace each Piecewise by the branch whose condition SymPy decides true."""
    if isinstance(expr, Piecewise):
        for value, condition in expr.args:
            if condition not in (sympy.true, sympy.false):
                condition = condition.func(sympy.expand(condition.lhs - condition.rhs), 0)
            if condition == sympy.true:
                return _resolve(value)
            if condition != sympy.false:
                raise _Undecided(f"cannot decide {condition}")
        raise _Undecided(f"no branch of {expr} holds")
    if not expr.args or isinstance(expr, Symbol):
        return expr
    return expr.func(*(_resolve(a) for a in expr.args))


# --- the theorems ---------------------------------------------------------------------------

def _symbols(spec: UpdateSpec) -> dict[str, Symbol]:
    return {s.name: s for s in spec.inputs}


def _ir_equals_spec(factory: IRFactory, config: KernelConfig) -> tuple[str, str]:
    spec = adam_spec()
    rebuilt = ir_expressions(factory(spec, config), _symbols(spec))
    constants = config.constants_dict
    claims = []
    for name, expr in spec.outputs:
        reference = evaluated(python_folded(expr, constants) if constants else expr)
        claims.append((name, rebuilt[name], reference))
    status, detail = _identity(claims)
    return status, (f"expand(IR - spec) == 0 for {detail}" if status == PROVED else detail)


def _moment_recurrences() -> tuple[str, str]:
    spec = adam_spec()
    x = _symbols(spec)
    t = Symbol("t", integer=True, nonnegative=True)
    g = Symbol("g", real=True)
    m = sympy.Function("m")
    claims, solved = [], []
    for out, state, beta, power in (("mw", "mw_tm1", "beta1", 1), ("vw", "vw_tm1", "beta2", 2)):
        update = evaluated(spec.output(out))
        closed = lambda k, b=x[beta], p=power: (1 - b**k) * g**p
        step = update.xreplace({x[state]: closed(t), x["dcdw"]: g})
        claims += [(f"{out}: base t=0", closed(0), S.Zero),
                   (f"{out}: step t->t+1", step, closed(t + 1))]
        recurrence = update.xreplace({x[state]: m(t), x["dcdw"]: g})
        answer = sympy.rsolve(m(t + 1) - recurrence, m(t), {m(0): 0})
        solved.append(answer is not None and _is_zero(answer - closed(t)))
    status, detail = _identity(claims)
    if status == PROVED:
        detail = ("m_t = (1-beta1**t)*g and v_t = (1-beta2**t)*g**2 by induction on symbolic t; "
                  f"rsolve of the spec's recurrences {'agrees' if all(solved) else 'differs'}")
    return status, detail


def _step_of_moments() -> tuple[sympy.Expr, dict[str, Symbol], Symbol, Symbol]:
    """``w_new`` as a function of the new moments ``M``, ``V`` (the spec's own subgraphs)."""
    spec = adam_spec()
    m_sym, v_sym = Symbol("M", real=True), Symbol("V", real=True)
    w_new = spec.output("w_new").xreplace({spec.output("mw"): m_sym, spec.output("vw"): v_sym})
    w_new = evaluated(w_new)
    if {s.name for s in w_new.free_symbols} & {"dcdw", "mw_tm1", "vw_tm1"}:
        raise _Undecided("w_new reads the state other than through mw and vw")
    return w_new, _symbols(spec), m_sym, v_sym


def _bias_powers(x: dict[str, Symbol], a1: sympy.Expr, a2: sympy.Expr) -> dict:
    return {x["beta1"] ** x["step"]: 1 - a1, x["beta2"] ** x["step"]: 1 - a2}


def _bias_correction() -> tuple[str, str]:
    w_new, x, m_sym, v_sym = _step_of_moments()
    a1, a2 = sympy.symbols("A1 A2", positive=True)
    g_pos = Symbol("g", positive=True)
    claims = []
    for label, g, sign in (("g > 0", g_pos, 1), ("g < 0", -g_pos, -1)):
        at_t = w_new.xreplace({m_sym: a1 * g, v_sym: a2 * g**2, x["epsilon"]: S.Zero})
        at_t = at_t.xreplace(_bias_powers(x, a1, a2))
        claims.append((label, _resolve(at_t - x["w"]), -x["lr"] * sign))
    status, detail = _identity(claims)
    return status, ("w_t - w_{t-1} = -lr*sign(g) for every t >= 1 (epsilon = 0, constant g != 0, "
                    "m0 = v0 = 0), cases " + detail if status == PROVED else detail)


def _scale_invariance() -> tuple[str, str]:
    spec = adam_spec()
    w_new, x, m_sym, v_sym = _step_of_moments()
    c = Symbol("c", positive=True)
    mw, vw = evaluated(spec.output("mw")), evaluated(spec.output("vw"))
    scaled = {x["dcdw"]: c * x["dcdw"], x["mw_tm1"]: c * x["mw_tm1"],
              x["vw_tm1"]: c**2 * x["vw_tm1"]}
    v_pos = Symbol("V", positive=True)
    step = w_new.xreplace({x["epsilon"]: S.Zero, v_sym: v_pos})
    claims = [("m scales by c", mw.xreplace(scaled), c * mw),
              ("v scales by c**2", vw.xreplace(scaled), c**2 * vw),
              ("step unchanged", _resolve(step.xreplace({m_sym: c * m_sym, v_pos: c**2 * v_pos})),
               _resolve(step))]
    status, detail = _identity(claims)
    return status, ("by induction from m0 = v0 = 0 for any gradient sequence: " + detail
                    + " (epsilon = 0, v > 0; at v <= 0 both steps divide by zero)"
                    if status == PROVED else detail)


def _ivy_vs_paper() -> tuple[str, str]:
    w_new, x, m_sym, _ = _step_of_moments()
    a1, b, s_ = sympy.symbols("A1 B S", positive=True)  # A2 = B**2, V = S**2
    eps, lr = x["epsilon"], x["lr"]
    ivy = _resolve(w_new.xreplace({Symbol("V", real=True): s_**2})
                   .xreplace(_bias_powers(x, a1, b**2)))
    paper = x["w"] - lr * (m_sym / a1) / (sqrt(s_**2 / b**2) + eps)  # Kingma & Ba, Alg. 1
    closed = (eps * lr * m_sym * b * (a1 * (1 - b) + s_ + eps)
              / (a1 * (a1 + eps) * (s_ + eps) * (s_ + eps * b)))
    status, detail = _identity([("epsilon = 0", ivy.xreplace({eps: S.Zero}),
                                 paper.xreplace({eps: S.Zero})),
                                ("difference", ivy - paper, closed)])
    if status != PROVED:
        return status, detail
    a2 = Symbol("A2", positive=True)
    shown = closed.xreplace({b: sqrt(a2), s_: sqrt(Symbol("v", positive=True))})
    return PROVED, (f"equal at epsilon = 0; w_ivy - w_paper = {shown} with A1 = 1-beta1**t, "
                    "A2 = 1-beta2**t and M, v the new moments (each factor is positive for "
                    "epsilon, lr, M > 0 and 0 < A1, A2 < 1: Ivy's step is the smaller)")


def _vjp_equals_derivatives(factory: IRFactory, mode: str) -> tuple[str, str]:
    spec = adam_spec()
    vjp = vjp_spec(spec)
    x = _symbols(vjp) | _symbols(spec)
    rebuilt = ir_expressions(factory(vjp, KernelConfig(dtype="float64", mode=mode)), x)
    outputs = [(name, evaluated(expr)) for name, expr in spec.outputs]
    v_expr = evaluated(spec.output("vw"))
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
            ours = _resolve(abstract(rebuilt[PREFIX + tensor.name]))
            reference = _resolve(abstract(reference))
            if x["vw_tm1"] in (ours - reference).free_symbols:
                raise _Undecided("v could not be isolated in the VJP")
            claims.append((f"{PREFIX}{tensor.name} at {region}", ours, reference))
    status, detail = _identity(claims)
    return status, ("sum_o d_o * diff(o, x) (SymPy) == lowered VJP for every x, in each region "
                    "v > 0, v < 0, and v = 0 (sqrt path cut, the documented rule)"
                    if status == PROVED else detail)


def _branch_at(piece: Piecewise, abstract: Callable[[sympy.Expr], sympy.Expr]) -> sympy.Expr:
    """The branch of ``piece`` that holds in the region ``abstract`` substitutes."""
    for value, condition in piece.args:
        decided = _resolve(Piecewise((S.One, abstract(condition)), (S.Zero, True)))
        if decided == 1:
            return value
    raise _Undecided(f"no branch of {piece} holds")


# --- running and reporting -------------------------------------------------------------------

def theorems(ir_factory: IRFactory | None = None,
             constants: Sequence[tuple[str, float]] = DEFAULT_CONSTANTS
             ) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    """The theorem table, in report order: ``(name, prove)``."""
    factory: IRFactory = ir_factory or lower
    configs = [KernelConfig(dtype="float64", mode="exact"),
               KernelConfig(dtype="float64", mode="fast"),
               KernelConfig(dtype="float64", mode="fast", scalar_tensors=frozenset({"lr"}))]
    if constants:
        configs += [KernelConfig(dtype="float64", mode=mode, constants=tuple(constants))
                    for mode in ("exact", "fast")]
    table: list[tuple[str, Callable[[], tuple[str, str]]]] = [
        (f"IR == spec [{c.describe()}]", functools.partial(_ir_equals_spec, factory, c))
        for c in configs]
    table += [
        ("moment recurrences m_t, v_t", _moment_recurrences),
        ("bias correction: step = -lr*sign(g)", _bias_correction),
        ("scale invariance (epsilon = 0)", _scale_invariance),
        ("Ivy's form vs Kingma & Ba", _ivy_vs_paper),
    ]
    table += [(f"VJP kernel == d spec [{mode}]",
               functools.partial(_vjp_equals_derivatives, factory, mode))
              for mode in ("exact", "fast")]
    return table


def verify(*, ir_factory: IRFactory | None = None,
           constants: Sequence[tuple[str, float]] = DEFAULT_CONSTANTS,
           only: Sequence[str] = ()) -> list[TheoremResult]:
    """Prove every theorem (or those whose name contains one of ``only``), each timed."""
    results = []
    for name, prove in theorems(ir_factory, constants):
        if only and not any(part.lower() in name.lower() for part in only):
            continue
        start = time.perf_counter()
        try:
            status, detail = prove()
        except _Undecided as reason:
            status, detail = UNPROVEN, str(reason)
        except Exception as error:  # noqa: BLE001 - a broken IR or pass must show, not crash
            status, detail = FAILED, f"error: {type(error).__name__}: {error}"
        results.append(TheoremResult(name, status, time.perf_counter() - start, detail))
    return results


def print_report(results: Sequence[TheoremResult], *, verbose: bool = True,
                 strict: bool = False) -> int:
    """Print the table; return 1 if any theorem FAILED (or, with ``strict``, is UNPROVEN)."""
    width = max([len(r.name) for r in results] + [7])
    print(f"{'theorem':<{width}}  {'status':<8}  {'seconds':>7}")
    for r in results:
        print(f"{r.name:<{width}}  {r.status:<8}  {r.seconds:7.2f}")
        if verbose or r.status != PROVED:
            print(f"    {r.detail}")
    counts = {s: sum(r.status == s for r in results) for s in (PROVED, FAILED, UNPROVEN)}
    total = sum(r.seconds for r in results)
    print(f"{counts[PROVED]} proved, {counts[FAILED]} failed, {counts[UNPROVEN]} unproven "
          f"in {total:.1f} s")
    return 1 if counts[FAILED] or (strict and counts[UNPROVEN]) else 0

