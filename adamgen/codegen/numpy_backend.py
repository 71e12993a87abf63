"""NumPy renderer: kernel IR -> a readable Python module, through ``numpy_kernel.py.j2``.

As in the C backend, templates render the file's shell and printer classes render the math: each
IR step becomes an unevaluated SymPy expression (:func:`adamgen.codegen.steps.step_expression`)
and is printed by

* :class:`PreludePrinter` (a ``PythonCodePrinter``): the per-call scalars as Python floats,
  ``**`` as Python's ``pow``, ``sqrt`` as ``math.sqrt``, literals that round-trip exactly;
* :class:`KernelNumPyPrinter` (a ``NumPyPrinter``): body steps, in one of two forms.

The two forms, both from the same IR:

* for one element dtype (``float16``, ``float32``, ``float64``), ``update`` writes every step
  into a preallocated buffer with ``out=``: each step is one pass over memory and no temporary is
  allocated beyond the few buffers :func:`allocate_buffers` assigns. Because every operand has the
  same dtype, writing into a buffer of that dtype changes no rounding: the bits are those of the
  reference expression with its temporaries.
* for ``dtype="mixed"`` (arrays of different dtypes, a float64 0-d ``lr`` with float32 arrays,
  integer arrays), ``update`` is the plain expression in the reference order, so NumPy applies
  exactly the reference's promotions step by step.

Tensors stored narrower than the compute dtype (``Tensor.storage``: bfloat16 as ``uint16``
bits, float16) are widened exactly on entry (:func:`adamgen.ieee.widen`); an output replacing
one is computed into a buffer of the compute dtype and stored at the end
(:func:`adamgen.ieee.narrow`, exact: the spec rounded it). A kernel that rounds stochastically
takes ``rng = (seed, step, key)`` after ``scalars`` and draws each element's bits from
:func:`adamgen.ieee.stream_bits_like`, the C kernels' stream, element by element in memory order.

The spec language's nodes print as calls into :mod:`adamgen.ieee` (exact fused
multiply-add, torch's sign, NaN-propagating maximum, roundings). A module that cannot compute some
node exactly (a float64 ``fma``: NumPy has no wider type) *declines*: it says why in ``INEXACT``,
and its ``update`` raises :class:`~adamgen.errors.InexactVariantError`; its ``prelude`` and
interface still serve the C kernels of the same rule.

A select (``where``) prints as ``np.where``, in the buffered form copied into its buffer: no
ufunc selects, and ``np.fmax(x, 0)`` for the clamp ``x if x >= 0 else 0`` would be faster but may
turn ``-0.0`` into ``+0.0``, which a later division can see.
"""

from __future__ import annotations

import pprint
from dataclasses import dataclass

import sympy
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.pycode import PythonCodePrinter

from .. import language
from .._version import __version__
from .ir import KernelIR, Step, rounding, stochastic
from .steps import step_expression
from .templating import render

#: IR op -> the ufunc the buffered form calls with ``out=``.
_UFUNCS = {"add": "np.add", "sub": "np.subtract", "mul": "np.multiply", "div": "np.divide",
           "neg": "np.negative", "sqrt": "np.sqrt"}
#: IR op -> the function of :mod:`adamgen.ieee` (imported as ``ieee``) computing it.
_IEEE = {"fma": "ieee.fma", "sign": "ieee.sign", "maximum": "ieee.maximum",
         "minimum": "ieee.minimum", "round_bfloat16": "ieee.round_bfloat16",
         "round_float16": "ieee.round_float16", "round_float32": "ieee.round_float32"}
#: Element dtypes whose fused multiply-add NumPy computes exactly (see ``ieee.fma``).
EXACT_FMA = ("float16", "float32")


def python_literal(value: float) -> str:
    """A constant as Python source that round-trips exactly (``repr`` of a float does)."""
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    return text if text not in ("inf", "-inf", "nan") else f"float({text!r})"


class PreludePrinter(PythonCodePrinter):
    """Prelude steps as Python statements over Python floats, exactly as Python computes them;
    a rounding (``element``, ``round_to``) is :func:`adamgen.ieee.round_scalar`, exact."""

    def __init__(self, dtype: str) -> None:
        super().__init__({"order": "none"})
        self.dtype = dtype

    def _print_RoundToBase(self, expr: language.RoundToBase) -> str:
        target = self.dtype if expr.dtype == "element" else expr.dtype
        x = self._print(expr.args[0])
        if target == "mixed":  # the module declines (inexact_reason); never computed
            return f"_declined({x})"
        return x if target == "float64" else f"ieee.round_scalar({x}, {target!r})"

    def _print_Float(self, expr: sympy.Float) -> str:
        return python_literal(float(expr))

    def _print_Pow(self, expr: sympy.Pow, rational: bool = False) -> str:
        base, exponent = (self._print(a) for a in expr.args)
        return f"{base} ** {exponent}"  # Python's **: pow, never sqrt

    def _print_Sqrt(self, expr: language.Sqrt) -> str:
        return f"math.sqrt({self._print(expr.args[0])})"

    def _print_Piecewise(self, expr: sympy.Piecewise) -> str:
        (value, condition), (otherwise, _) = expr.args
        return f"{self._print(value)} if {self._print(condition)} else {self._print(otherwise)}"

    def statement(self, step: Step) -> str:
        names = {name: sympy.Symbol(name, real=True) for name in step.names()}
        if step.op == "pow":
            base, exponent = (names[a] if isinstance(a, str) else sympy.Float(float(a))
                              for a in step.args)
            expr: sympy.Basic = sympy.Pow(base, exponent, evaluate=False)
        else:
            expr = step_expression(step, names)
        return f"{step.target} = {self.doprint(expr)}"


class KernelNumPyPrinter(NumPyPrinter):
    """Body steps as NumPy code: expressions (the mixed form) or ufunc calls into buffers."""

    def __init__(self) -> None:
        super().__init__({"fully_qualified_modules": False, "order": "none"})

    def _print_Float(self, expr: sympy.Float) -> str:
        return python_literal(float(expr))

    def _print_Integer(self, expr: sympy.Integer) -> str:
        return python_literal(float(expr))

    def _print_Sqrt(self, expr: language.Sqrt) -> str:
        return f"np.sqrt({self._print(expr.args[0])})"

    def _print_Piecewise(self, expr: sympy.Piecewise) -> str:
        (value, condition), (otherwise, _) = expr.args
        return f"np.where({self._print(condition)}, {self._print(value)}, " \
               f"{self._print(otherwise)})"

    def _print_Relational(self, expr: sympy.core.relational.Relational) -> str:
        return f"{self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)}"

    def _print_Function(self, expr: sympy.Function) -> str:
        for node, name in ((language.Fma, "fma"), (language.Sign, "sign"),
                           (language.Maximum, "maximum"), (language.Minimum, "minimum")):
            if isinstance(expr, node):
                return f"{_IEEE[name]}({', '.join(self._print(a) for a in expr.args)})"
        if isinstance(expr, language.RoundToBase):
            return f"{_IEEE['round_' + expr.dtype]}({self._print(expr.args[0])})"
        if isinstance(expr, language.StochasticRoundBase):
            x = self._print(expr.args[0])
            return (f"ieee.round_stochastic_{expr.dtype}({x}, ieee.stream_bits_like({x}, *rng, "
                    f"{int(expr.args[1])}))")
        return super()._print_Function(expr)

    def expression(self, step: Step) -> str:
        """The mixed form: ``t = <expression>``; NumPy promotes each step as the reference."""
        leaves = {name: sympy.Symbol(name, real=True) for name in step.names()}
        return f"{step.target} = {self.doprint(step_expression(step, leaves))}"

    def buffered(self, step: Step, buffers: dict[str, str]) -> str:
        """One call writing into the step's buffer (``out=``); the step itself as a comment."""
        args = [buffers.get(a, a) if isinstance(a, str) else python_literal(a)
                for a in step.args]
        out = buffers[step.target]
        target = stochastic(step.op)
        if step.op in _UFUNCS:
            call = f"{_UFUNCS[step.op]}({', '.join(args)}, out={out})"
        elif target is not None:  # the bits of each element, laid out as the output
            call = (f"ieee.round_stochastic_{target}({args[0]}, ieee.stream_bits_like({out}, "
                    f"*rng, {int(step.args[1])}), out={out})")
        elif step.op in _IEEE:
            call = f"{_IEEE[step.op]}({', '.join(args)}, out={out})"
        else:  # a select: no ufunc selects; np.where allocates, copyto rounds once
            leaves = {name: sympy.Symbol(buffers.get(name, name), real=True)
                      for name in step.names()}
            call = f"np.copyto({out}, {self.doprint(step_expression(step, leaves))})"
        return f"{call}  # {step}"


def inexact_reason(ir: KernelIR) -> str:
    """Why NumPy cannot compute this kernel exactly, or "" when it can."""
    dtype = ir.config.dtype
    for step in ir.prelude:
        if step.op == "round_element" and dtype == "mixed":
            return (f"{step}: element() rounds to the arrays' one dtype, and the mixed-dtype "
                    "form has none")
    for step in ir.body:
        if step.op == "fma" and dtype not in EXACT_FMA:
            return (f"{step}: NumPy cannot round a {dtype} fused multiply-add once (no wider "
                    "type holds the exact product); the C kernel computes this rule")
        target = rounding(step.op) or stochastic(step.op)
        if target is not None and dtype == "mixed":
            return f"{step}: rounding to {target} needs one known element dtype"
    if dtype == "mixed" and ir.interface.narrow:
        return "narrow storage dtypes need one known compute dtype"
    return ""


def uniform_operands(ir: KernelIR) -> list[str]:
    """The per-call scalars and scalar tensors read by a body step that reads no array.

    Elsewhere a scalar meets an array and NumPy rounds it to the array's dtype; a step between
    two scalars would compute in double, so the buffered form converts these to the element
    dtype first (the C kernel computes such a step once, before its loop, in the element type).
    """
    scalars = set(ir.kernel_scalars) | set(ir.config.scalar_tensors)
    uniform = set(ir.uniform_steps())
    return list(dict.fromkeys(name for step in ir.body if step.target in uniform
                              for name in step.names() if name in scalars))


@dataclass(frozen=True)
class BufferPlan:
    """Which buffer holds each body value: an output buffer or one of ``temporaries``."""

    buffers: dict[str, str]
    temporaries: tuple[str, ...]


def allocate_buffers(ir: KernelIR) -> BufferPlan:
    """Assign each body value a buffer, reusing dead ones, never clobbering a live input.

    Output buffers double as scratch space before their output is written, as long as (a) every
    value put there is dead by the time the output is written and (b) when the output aliases an
    input (``out=w``), that input has been read for the last time. Elementwise ufuncs may read and
    write the same buffer in one call, so a value may land in the buffer of an operand that dies
    at that very step.
    """
    last_read = ir.last_reads()
    step_index = {step.target: i for i, step in enumerate(ir.body)}
    names = ir.buffer_names()
    output_of_value = {value: names[name] for name, value in ir.outputs}
    aliased_input = {names[o]: i for o, i in ir.config.aliases}
    output_step = {names[name]: step_index[value] for name, value in ir.outputs}
    buffers: dict[str, str] = {}
    holder: dict[str, str | None] = {names[name]: None for name in ir.output_names}
    temporaries: list[str] = []

    def free(buffer: str, at: int) -> bool:
        value = holder.get(buffer)
        return value is None or last_read.get(value, -1) <= at

    def may_scratch(buffer: str, value: str, at: int) -> bool:
        """May ``value`` (computed at step ``at``) live in ``buffer`` until it dies?"""
        if buffer in output_step:
            if at > output_step[buffer] or last_read[value] > output_step[buffer]:
                return False
            source = aliased_input.get(buffer)
            if source is not None and last_read.get(source, -1) > at:
                return False
        return True

    for index, step in enumerate(ir.body):
        if step.target in output_of_value:
            destination = output_of_value[step.target]
            source = aliased_input.get(destination)
            if source is not None and last_read.get(source, -1) > index:
                raise ValueError(f"{destination} aliases {source}, which is still read after "
                                 f"step {step}; this variant cannot run in place")
        else:
            dying = [buffers[a] for a in step.names()
                     if a in buffers and last_read[a] == index and a not in output_of_value]
            scratch = [b for b in holder if free(b, index)] + \
                [t for t in temporaries if free(t, index)]
            candidates = [b for b in dying + scratch if may_scratch(b, step.target, index)]
            if candidates:
                destination = candidates[0]
            else:
                destination = f"tmp{len(temporaries)}"
                temporaries.append(destination)
        buffers[step.target] = destination
        holder[destination] = step.target
    return BufferPlan(buffers, tuple(temporaries))


def render_numpy_module(ir: KernelIR) -> str:
    """The source of one NumPy kernel module."""
    mixed = ir.config.dtype == "mixed"
    reason = inexact_reason(ir)
    compute = ir.config.dtype
    read = {name for step in ir.body for name in step.names()}
    widened = [(t, ir.storage(t)) for t in ir.tensors
               if t in read and t not in ir.config.scalar_tensors and ir.storage(t) != compute]
    buffer_of = ir.buffer_names()
    narrowed = [(buffer_of[o], ir.output_storage(o)) for o in ir.output_names
                if ir.output_storage(o) != compute]
    printer = KernelNumPyPrinter()
    plan = None if mixed else allocate_buffers(ir)
    body = ([printer.expression(s) for s in ir.body] if plan is None
            else [printer.buffered(s, plan.buffers) for s in ir.body])
    return render(
        "numpy_kernel.py.j2",
        version=__version__,
        ir=ir,
        mixed=mixed,
        config_name=ir.config.describe(),
        constants=dict(ir.config.constants),
        interface=pprint.pformat(ir.interface.to_json(), width=96, sort_dicts=False),
        depends={name: deps for name, deps in ir.depends},
        free_hyperparameters=ir.free_hyperparameters,
        prelude_lines=[PreludePrinter(ir.config.dtype).statement(s) for s in ir.prelude],
        kernel_scalars=ir.kernel_scalars,
        body_lines=body,
        temporaries=plan.temporaries if plan else (),
        buffer_names=list(ir.buffer_names().values()),
        returns=[value for _, value in ir.outputs],
        inexact=reason,
        uses_math="sqrt" in {s.op for s in ir.prelude},
        uses_ieee=any(step.op in _IEEE or stochastic(step.op) for step in ir.body)
        or any(rounding(step.op) for step in ir.prelude) or ir.interface.narrow,
        as_element=[] if mixed else uniform_operands(ir),
        numbers_as_element=[] if mixed else [
            t.name for t in ir.interface.tensors
            if t.scalar and t.name not in ir.config.scalar_tensors],
        streams=list(ir.streams),
        storage={t: ir.storage(t) for t in ir.tensors if ir.storage(t) != compute},
        widened=[] if mixed else widened,
        narrowed=[] if mixed else narrowed,
    )

