"""Lowering: spec (SymPy graph) -> kernel IR, as a table of small named passes.

:func:`lower` reads like the pipeline it runs::

    translate -> eliminate common subexpressions -> hoist scalars -> fold constants
              -> (fast mode) fast rewrites -> eliminate dead steps -> assemble the IR

Each pass takes and returns a frozen :class:`Program`, so each can be tested alone, and each is
timed (``lower(..., timings=dict)``).

Why the passes keep the bits: translation maps each binary SymPy node to one step (the spec is
built unevaluated, so nesting is the reference's rounding order); CSE only merges steps that
compute the same operation on the same operands; hoisting moves steps whose operands are all
hyperparameters into the prelude, which the reference also computes with Python floats; constant
folding evaluates prelude steps with Python's own float operators, exactly as the generated
prelude would at run time. Only ``mode="fast"`` changes the rounding (see :func:`fast_rewrites`).
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import sympy

from .. import ieee, language
from ..config import KernelConfig
from ..errors import LoweringError
from ..spec import UpdateSpec
from .ir import COMMUTATIVE, COMPARISONS, PRELUDE_OPS, KernelIR, Operand, Step


def _select(test: Callable[[float, float], bool]) -> Callable[..., float]:
    """``x if test(a, b) else y``: a select step on Python floats."""
    return lambda a, b, x, y: x if test(a, b) else y


#: Python's float semantics for prelude steps: the generated prelude prints these same operators.
PYTHON_SCALAR_OPS: dict[str, Callable[..., float]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
    "pow": operator.pow, "neg": operator.neg, "sqrt": math.sqrt,
    **{f"select_{name}": _select(test)
       for name, test in (("gt", operator.gt), ("ge", operator.ge), ("lt", operator.lt),
                          ("le", operator.le), ("eq", operator.eq), ("ne", operator.ne))},
}


def scalar_op(op: str, dtype: str) -> Callable[..., float] | None:
    """The Python function computing a prelude op for kernels of ``dtype`` (``round_element``
    rounds to it), or None where the dtype does not say (``element()`` in the mixed form)."""
    if op.startswith("round_"):
        target = op[len("round_"):]
        target = dtype if target == "element" else target
        if target == "mixed":
            return None
        return lambda x: ieee.round_scalar(float(x), target)
    return PYTHON_SCALAR_OPS[op]


@dataclass(frozen=True)
class Program:
    """The IR under construction: steps in evaluation order, scalar or tensor per step."""

    spec: UpdateSpec
    config: KernelConfig
    steps: tuple[Step, ...]
    scalar_steps: frozenset[str]
    outputs: tuple[tuple[str, Operand], ...]

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.spec.tensors)

    @property
    def hyperparameter_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.spec.hyperparameters)


Pass = Callable[[Program], Program]


# --- translation --------------------------------------------------------------------------

#: SymPy relational class -> the comparison suffix of ``select_<cmp>``.
_RELATIONS: dict[type, str] = {
    sympy.StrictGreaterThan: "gt", sympy.GreaterThan: "ge", sympy.StrictLessThan: "lt",
    sympy.LessThan: "le", sympy.Equality: "eq", sympy.Unequality: "ne",
}
#: Spec-language node -> IR op (fixed arity, operands in order).
_NODES: dict[type, str] = {
    language.Fma: "fma", language.Sqrt: "sqrt", language.Sign: "sign",
    language.Maximum: "maximum", language.Minimum: "minimum",
    **{cls: f"round_{cls.dtype}" for cls in (language.RoundToBfloat16, language.RoundToFloat16,
                                               language.RoundToFloat32, language.RoundToElement)},
    **{cls: f"round_stochastic_{cls.dtype}" for cls in (language.StochasticRoundBfloat16,
                                                          language.StochasticRoundFloat16)},
}


class _Translator:
    """Turns the unevaluated SymPy graph into steps, one per operation, in post-order.

    A step that computes one of the spec's named values (an output, or a subexpression the spec
    names) takes that name, so generated code reads like the spec; other steps are ``s<k>``
    (scalars, computed once per call) and ``t<k>`` (per element).
    """

    def __init__(self, spec: UpdateSpec) -> None:
        self.hyperparameters = frozenset(spec.hyperparameters)
        self.steps: list[Step] = []
        self.scalar: set[str] = set()
        self.memo: dict[sympy.Basic, Operand] = {}
        self.taken = {s.name for s in spec.inputs}
        self.names: dict[sympy.Basic, str] = {}
        for name, expr in (*spec.outputs, *spec.names):
            self.names.setdefault(expr, name)

    def emit(self, op: str, args: tuple[Operand, ...], is_scalar: bool,
             expr: sympy.Basic | None = None) -> str:
        if op not in PRELUDE_OPS and is_scalar:
            raise LoweringError(f"{op} of hyperparameters only ({expr}) is not supported: "
                                f"the per-call prelude computes {', '.join(sorted(PRELUDE_OPS))}")
        target = self._name(expr, is_scalar)
        self.steps.append(Step(target, op, args))
        if is_scalar:
            self.scalar.add(target)
        return target

    def _name(self, expr: sympy.Basic | None, is_scalar: bool) -> str:
        wanted = self.names.get(expr) if expr is not None else None
        if wanted is None:
            wanted = f"{'s' if is_scalar else 't'}{len(self.steps)}"
        elif wanted in self.taken:  # an output named like its input (exp_avg -> exp_avg)
            wanted += "_new"
        name, suffix = wanted, 1
        while name in self.taken:
            suffix += 1
            name = f"{wanted}{suffix}"
        self.taken.add(name)
        return name

    def operand(self, expr: sympy.Basic) -> Operand:
        if expr not in self.memo:
            self.memo[expr] = self._translate(expr)
        return self.memo[expr]

    def _translate(self, expr: sympy.Basic) -> Operand:
        if isinstance(expr, sympy.Symbol):
            return expr.name
        if expr.is_Number:
            if not expr.is_finite:
                raise LoweringError(f"the constant {expr} is not a finite number")
            return int(expr) if expr.is_Integer else float(expr)
        is_scalar = expr.free_symbols <= self.hyperparameters
        if isinstance(expr, sympy.Add):
            return self._binary_chain(expr, "add", "sub", is_scalar)
        if isinstance(expr, sympy.Mul):
            return self._product(expr, is_scalar)
        if isinstance(expr, sympy.Pow):
            return self._power(expr, is_scalar)
        if isinstance(expr, sympy.Piecewise):
            return self._select(expr, is_scalar)
        if isinstance(expr, language.RoundToElement) and not is_scalar:
            raise LoweringError(f"element() rounds an expression of hyperparameters only; "
                                f"{expr.args[0]} uses a tensor (a tensor is in the element "
                                "dtype already)")
        if type(expr) in _NODES:
            op = _NODES[type(expr)]
            return self.emit(op, tuple(self.operand(a) for a in expr.args), is_scalar, expr)
        what = (f"the function {type(expr).__name__}" if isinstance(expr, sympy.Function)
                 else type(expr).__name__)
        raise LoweringError(f"cannot lower {what} in {expr}: it is not in the spec language "
                            "(+, -, *, /, x**2, x**-1, x**Rational(1, 2) of tensors, any power "
                            "of hyperparameters, where, and adamgen.spec's fma, sqrt, sign, "
                            "maximum, minimum, round_to, element)")

    def _binary_chain(self, expr: sympy.Add, op: str, inverse: str, is_scalar: bool) -> str:
        if len(expr.args) != 2:
            raise LoweringError(f"ambiguous evaluation order in {expr}: build the spec "
                                "unevaluated so every sum has two terms")
        first, second = expr.args
        if _is_negation(second) and not _is_negation(first):
            args = (self.operand(first), self.operand(-second))
            return self.emit(inverse, args, is_scalar, expr)
        if _is_negation(first) and not _is_negation(second):
            args = (self.operand(second), self.operand(-first))
            return self.emit(inverse, args, is_scalar, expr)
        return self.emit(op, (self.operand(first), self.operand(second)), is_scalar, expr)

    def _product(self, expr: sympy.Mul, is_scalar: bool) -> Operand:
        factors = list(expr.args)
        negate = sympy.S.NegativeOne in factors
        if negate:
            factors.remove(sympy.S.NegativeOne)
        inner = None if negate else expr  # the name belongs to the whole product
        if len(factors) == 1:
            result = self.operand(factors[0])
        elif len(factors) == 2:
            numerators = [f for f in factors if not _is_reciprocal(f)]
            denominators = [f.base for f in factors if _is_reciprocal(f)]
            if len(numerators) == 1 and len(denominators) == 1:
                result = self.emit("div", (self.operand(numerators[0]),
                                           self.operand(denominators[0])), is_scalar, inner)
            elif not denominators:
                result = self.emit("mul", tuple(self.operand(f) for f in factors), is_scalar,
                                   inner)
            else:
                raise LoweringError(f"cannot lower the quotient {expr}")
        else:
            raise LoweringError(f"ambiguous evaluation order in {expr}: build the spec "
                                "unevaluated so every product has two factors")
        return self.emit("neg", (result,), is_scalar, expr) if negate else result

    def _power(self, expr: sympy.Pow, is_scalar: bool) -> str:
        base, exponent = expr.args
        if exponent == 2:
            operand = self.operand(base)
            return self.emit("mul", (operand, operand), is_scalar, expr)
        if exponent == -1:
            return self.emit("div", (1, self.operand(base)), is_scalar, expr)
        if is_scalar:
            return self.emit("pow", (self.operand(base), self.operand(exponent)), True, expr)
        if exponent.free_symbols:
            raise LoweringError(f"{expr}: a tensor raised to a symbolic power; exponents of "
                                "tensors must be the numbers 2, -1 or 1/2 (a hyperparameter "
                                "exponent would need pow per element)")
        if exponent == sympy.S.Half:
            return self.emit("sqrt", (self.operand(base),), False, expr)
        raise LoweringError(f"elementwise power {expr} is not supported (only x**2, x**-1 and "
                            "x**Rational(1, 2) on tensors; any power of hyperparameters)")

    def _select(self, expr: sympy.Piecewise, is_scalar: bool) -> str:
        """``Piecewise((x, a <cmp> b), (y, True))``, as :func:`adamgen.spec.where` builds it."""
        if len(expr.args) != 2 or expr.args[1].cond != sympy.true:
            raise LoweringError(f"only two-branch Piecewise((x, condition), (y, True)) is "
                                f"supported (nest where() for more), got {expr}")
        (value, condition), (otherwise, _) = expr.args
        relation = _RELATIONS.get(type(condition))
        if relation is None:
            raise LoweringError(f"the condition {condition} must be one comparison "
                                "(>, >=, <, <=, Eq, Ne)")
        if not is_scalar and condition.free_symbols <= self.hyperparameters:
            # A condition on hyperparameters alone is decided once per call in Python floats,
            # as the peer's Python code decides it (torch's ``if weight_decay != 0``), not on
            # the values rounded to the arrays' dtype (1e-46 is not 0, its float32 is).
            decided = self.emit(f"select_{relation}", (self.operand(condition.lhs),
                                                       self.operand(condition.rhs), 1, 0), True)
            return self.emit("select_ne", (decided, 0, self.operand(value),
                                           self.operand(otherwise)), is_scalar, expr)
        args = (self.operand(condition.lhs), self.operand(condition.rhs), self.operand(value),
                self.operand(otherwise))
        return self.emit(f"select_{relation}", args, is_scalar, expr)


def _is_negation(expr: sympy.Basic) -> bool:
    return isinstance(expr, sympy.Mul) and sympy.S.NegativeOne in expr.args


def _is_reciprocal(expr: sympy.Basic) -> bool:
    return isinstance(expr, sympy.Pow) and expr.exp == -1


def translate(spec: UpdateSpec, config: KernelConfig) -> Program:
    """Spec -> steps, one per SymPy operation, with shared subgraphs translated once."""
    translator = _Translator(spec)
    outputs = tuple((name, translator.operand(expr)) for name, expr in spec.outputs)
    return Program(spec, config, tuple(translator.steps), frozenset(translator.scalar), outputs)


# --- passes ---------------------------------------------------------------------------------

def _rename(args: tuple[Operand, ...], renames: dict[str, Operand]) -> tuple[Operand, ...]:
    return tuple(renames.get(a, a) if isinstance(a, str) else a for a in args)


def eliminate_common_subexpressions(program: Program) -> Program:
    """Merge steps computing the same operation on the same operands.

    Operands of ``add`` and ``mul`` are compared as a set: IEEE addition and multiplication are
    commutative, so ``a*b`` and ``b*a`` are the same bits.
    """
    seen: dict[tuple, str] = {}
    renames: dict[str, Operand] = {}
    steps: list[Step] = []
    for step in program.steps:
        args = _rename(step.args, renames)
        key_args = tuple(sorted(args, key=repr)) if step.op in COMMUTATIVE else args
        key = (step.op, key_args)
        if key in seen:
            renames[step.target] = seen[key]
            continue
        seen[key] = step.target
        steps.append(Step(step.target, step.op, args))
    outputs = tuple((name, renames.get(v, v) if isinstance(v, str) else v)
                    for name, v in program.outputs)
    return replace(program, steps=tuple(steps), outputs=outputs)


def hoist_scalars(program: Program) -> Program:
    """Move every hyperparameter-only step before all tensor steps (it becomes the prelude).

    Translation already marks them; this pass only orders them, keeping relative order, so the
    prelude is one block computed once per call.
    """
    scalar = [s for s in program.steps if s.target in program.scalar_steps]
    tensor = [s for s in program.steps if s.target not in program.scalar_steps]
    return replace(program, steps=tuple(scalar + tensor))


def fold_constants(program: Program) -> Program:
    """Substitute baked-in hyperparameters and evaluate prelude steps that became constant.

    Evaluation uses Python's float operators (IEEE double, the spec's order), never SymPy's
    exact arithmetic: Python's ``1 - 0.9`` is ``0.09999999999999998``, SymPy's is ``1/10``.
    """
    values: dict[str, Operand] = dict(program.config.constants)
    steps: list[Step] = []
    for step in program.steps:
        args = _rename(step.args, values)
        compute = (scalar_op(step.op, program.config.dtype)
                   if step.target in program.scalar_steps else None)
        if compute is not None and all(not isinstance(a, str) for a in args):
            values[step.target] = float(compute(*args))
            continue
        steps.append(Step(step.target, step.op, args))
    outputs = tuple((name, values.get(v, v) if isinstance(v, str) else v)
                    for name, v in program.outputs)
    return replace(program, steps=tuple(steps), outputs=outputs)


def fast_rewrites(program: Program) -> Program:
    """Fast mode only: rewrites that change rounding but not the exact-arithmetic value.

    ``(s1*x / y) * s2`` with scalars ``s1`` (prelude) and ``s2`` (a hyperparameter or a scalar
    tensor) becomes ``(x / y) * (s1*s2)``: one multiply per element fewer, the scalar product
    computed once. :mod:`adamgen.theorems` proves the rewritten IR equal to the spec; FMA
    contraction is the C compiler's (``-ffp-contract=fast``).
    """
    if program.config.mode != "fast":
        return program
    by_target = {s.target: s for s in program.steps}
    uses: dict[str, int] = {}
    for step in program.steps:
        for name in step.names():
            uses[name] = uses.get(name, 0) + 1
    for _, value in program.outputs:
        if isinstance(value, str):
            uses[value] = uses.get(value, 0) + 1

    def is_scalar(operand: Operand) -> bool:
        return (not isinstance(operand, str) or operand in program.scalar_steps
                or operand in program.hyperparameter_names
                or operand in program.config.scalar_tensors)

    steps = list(program.steps)
    scalar_steps = set(program.scalar_steps)
    for index, step in enumerate(steps):
        if step.op != "mul":
            continue
        for quotient_name, outer in (step.args, step.args[::-1]):
            quotient = by_target.get(quotient_name) if isinstance(quotient_name, str) else None
            if quotient is None or quotient.op != "div" or not is_scalar(outer):
                continue
            numerator = (by_target.get(quotient.args[0]) if isinstance(quotient.args[0], str)
                         else None)
            if numerator is None or numerator.op != "mul" or uses.get(numerator.target) != 1 \
                    or uses.get(quotient.target) != 1:
                continue
            inner, element = numerator.args
            if not is_scalar(inner):
                inner, element = element, inner
            if not is_scalar(inner) or is_scalar(element):
                continue
            folded = f"{step.target}_scale"
            steps.insert(0, Step(folded, "mul", (inner, outer)))
            if all(a in program.scalar_steps or a in program.hyperparameter_names
                   or not isinstance(a, str) for a in (inner, outer)):
                scalar_steps.add(folded)
            position = steps.index(quotient)
            steps[position] = Step(quotient.target, "div", (element, quotient.args[1]))
            steps[steps.index(step)] = Step(step.target, "mul", (quotient.target, folded))
            steps.remove(numerator)
            break
    return hoist_scalars(replace(program, steps=tuple(steps), scalar_steps=frozenset(scalar_steps)))


def eliminate_dead_steps(program: Program) -> Program:
    """Drop steps no output needs."""
    live = {v for _, v in program.outputs if isinstance(v, str)}
    kept: list[Step] = []
    for step in reversed(program.steps):
        if step.target in live:
            kept.append(step)
            live.update(step.names())
    return replace(program, steps=tuple(reversed(kept)))


#: The default pass order. Each pass is ``Program -> Program``.
PASSES: tuple[tuple[str, Pass], ...] = (
    ("eliminate_common_subexpressions", eliminate_common_subexpressions),
    ("hoist_scalars", hoist_scalars),
    ("fold_constants", fold_constants),
    ("fast_rewrites", fast_rewrites),
    ("eliminate_dead_steps", eliminate_dead_steps),
)


def assemble(program: Program) -> KernelIR:
    """Split the program into prelude and body; the IR carries the spec's interface."""
    hyper = program.hyperparameter_names
    baked = program.config.constants_dict
    prelude = tuple(s for s in program.steps if s.target in program.scalar_steps)
    body = tuple(s for s in program.steps if s.target not in program.scalar_steps)
    scalar_names = {s.target for s in prelude} | (set(hyper) - set(baked))
    kernel_scalars: list[str] = []
    for step in body:
        for name in step.names():
            if name in scalar_names and name not in kernel_scalars:
                kernel_scalars.append(name)
    for name, value in program.outputs:
        if not isinstance(value, str) or value in scalar_names or value in program.tensor_names:
            raise LoweringError(f"output {name} must be computed element by element, got {value}")
    _check_narrow_outputs(program, {s.target: s for s in body})
    return KernelIR(
        interface=program.spec.interface, config=program.config, prelude=prelude,
        kernel_scalars=tuple(kernel_scalars), body=body,
        outputs=tuple((n, str(v)) for n, v in program.outputs))


#: Ops whose result is one of their operands (or its negation): a value of a narrow dtype
#: stays one through them.
_SELECTING = frozenset({"maximum", "minimum", "neg", *(f"select_{c}" for c in COMPARISONS)})


def _check_narrow_outputs(program: Program, steps: dict[str, Step]) -> None:
    """An output stored in a narrower dtype than the kernel computes in (it replaces a tensor
    declared with ``storage``) must be a value of that dtype by construction, so that storing
    it is exact: a kernel never rounds where the spec does not say so. A value is one if it is
    rounded to the dtype (``round_to``, stochastic or not), read from a tensor stored in it, or
    chosen among such values (``maximum``, ``minimum``, ``where``, negation)."""
    interface = program.spec.interface
    compute = program.config.dtype

    def representable(value: Operand, storage: str, depth: int = 0) -> bool:
        if not isinstance(value, str):
            return False
        if value in program.tensor_names:
            return interface.storage(value, compute) == storage
        step = steps.get(value)
        if step is None or depth > 64:
            return False
        if step.op in (f"round_{storage}", f"round_stochastic_{storage}"):
            return True
        if step.op in _SELECTING:
            chosen = step.args[2:] if step.op.startswith("select_") else step.args
            return all(representable(a, storage, depth + 1) for a in chosen)
        return False

    for name, value in program.outputs:
        storage = interface.output_storage(name, compute)
        if storage != compute and not representable(value, storage):
            raise LoweringError(
                f"output {name} replaces a tensor stored as {storage}, but the spec does not "
                f"make it a {storage} value (round it last: round_to(..., {storage!r}))")


def lower(spec: UpdateSpec, config: KernelConfig,
          timings: dict[str, float] | None = None) -> KernelIR:
    """Lower ``spec`` for ``config``; with ``timings``, record each pass's seconds in it."""
    unknown = set(config.constants_dict) - {s.name for s in spec.hyperparameters}
    if unknown:
        raise LoweringError(f"cannot bake {sorted(unknown)}: the spec's hyperparameters are "
                            f"{[s.name for s in spec.hyperparameters]}")
    start = time.perf_counter()
    program = translate(spec, config)
    if timings is not None:
        timings["translate"] = time.perf_counter() - start
    for name, run_pass in PASSES:
        start = time.perf_counter()
        program = run_pass(program)
        if timings is not None:
            timings[name] = time.perf_counter() - start
    return assemble(program)
