"""NumPy renderer: kernel IR -> a readable Python module, through ``numpy_kernel.py.j2``.

Two forms, both from the same IR:

* for one element dtype (``float16``, ``float32``, ``float64``), ``update`` writes every step
  into a preallocated buffer with ``out=``: each step is one pass over memory and no temporary is
  allocated beyond the few buffers :func:`allocate_buffers` assigns. Because every operand has the
  same dtype, writing into a buffer of that dtype changes no rounding: the bits are those of the
  reference expression with its temporaries.
* for ``dtype="mixed"`` (arrays of different dtypes, a float64 0-d ``lr`` with float32 arrays,
  integer arrays), ``update`` is the plain expression in the reference order, so NumPy applies
  exactly the reference's promotions step by step.

The prelude is a small Python function over Python floats: the single definition of every
per-call scalar, which the C backend's loader calls too.

The clamp ``x if x >= 0 else 0`` prints as ``np.fmax(x, 0.0)``: the same value for every ``x``
(NaN and -inf become 0) except that it may turn ``-0.0`` into ``+0.0``; the spec only takes its
square root and adds ``epsilon``, which erases the sign of a zero. The mixed form prints
``np.where(x >= 0, x, 0)``, the reference's own form.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._version import __version__
from .ir import KernelIR, Operand, Step
from .templating import render

#: IR op -> (ufunc for the buffered form, infix/call pattern for the expression form)
_UFUNCS = {"add": "np.add", "sub": "np.subtract", "mul": "np.multiply", "div": "np.divide",
           "neg": "np.negative", "sqrt": "np.sqrt", "clamp_nonnegative": "np.fmax"}
_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}


def python_literal(value: Operand) -> str:
    """A constant as Python source that round-trips exactly (``repr`` of a float does)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    return text if text not in ("inf", "-inf", "nan") else f"float({text!r})"


def print_scalar_step(step: Step) -> str:
    """A prelude step as a Python statement over Python floats."""
    args = [python_literal(a) for a in step.args]
    if step.op == "neg":
        return f"{step.target} = -{args[0]}"
    return f"{step.target} = {args[0]} {_INFIX[step.op]} {args[1]}"


def print_expression_step(step: Step) -> str:
    """A body step as a NumPy expression (NumPy promotes each operation as the reference does)."""
    args = [python_literal(a) for a in step.args]
    if step.op in _INFIX:
        return f"{step.target} = {args[0]} {_INFIX[step.op]} {args[1]}"
    if step.op == "neg":
        return f"{step.target} = -{args[0]}"
    if step.op == "sqrt":
        return f"{step.target} = np.sqrt({args[0]})"
    if step.op == "clamp_nonnegative":
        return f"{step.target} = np.where({args[0]} >= 0, {args[0]}, 0)"
    if step.op == "select_positive":
        return f"{step.target} = np.where({args[0]} > 0, {args[1]}, 0)"
    raise ValueError(f"no NumPy expression for {step.op}")


def print_buffered_step(step: Step, buffers: dict[str, str]) -> str:
    """A body step as one ufunc call writing into its assigned buffer."""
    args = [buffers.get(a, a) if isinstance(a, str) else python_literal(a) for a in step.args]
    if step.op == "select_positive":  # no ufunc selects; np.where allocates, copyto rounds once
        selected = f"np.where(np.greater({args[0]}, 0), {args[1]}, 0.0)"
        return f"np.copyto({buffers[step.target]}, {selected})  # {step}"
    if step.op == "clamp_nonnegative":
        args.append("0.0")
    call = f"{_UFUNCS[step.op]}({', '.join(args)}, out={buffers[step.target]})"
    return f"{call}  # {step}"


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
    output_of_value = {value: name for name, value in ir.outputs}
    aliased_input = dict(ir.config.aliases)
    output_step = {name: step_index[value] for name, value in ir.outputs}
    buffers: dict[str, str] = {}
    holder: dict[str, str | None] = {name: None for name in ir.output_names}
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
            scratch = [b for b in ir.output_names if free(b, index)] + \
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
    plan = None if mixed else allocate_buffers(ir)
    body = ([print_expression_step(s) for s in ir.body] if mixed
            else [print_buffered_step(s, plan.buffers) for s in ir.body])
    return render(
        "numpy_kernel.py.j2",
        version=__version__,
        ir=ir,
        mixed=mixed,
        config_name=ir.config.describe(),
        constants=dict(ir.config.constants),
        depends={name: deps for name, deps in ir.depends},
        free_hyperparameters=ir.free_hyperparameters,
        prelude_lines=[print_scalar_step(s) for s in ir.prelude],
        kernel_scalars=ir.kernel_scalars,
        body_lines=body,
        temporaries=plan.temporaries if plan else (),
        returns=[value for _, value in ir.outputs],
    )
