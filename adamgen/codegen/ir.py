"""The kernel IR: a small, frozen description of one elementwise kernel.

The IR is what every backend renders and what :mod:`adamgen.theorems` proves equal to the spec.
It is deliberately flat (three-address code), because the order of floating-point operations is
part of the contract: a tree could be re-associated by a printer, a list of two-operand steps
cannot.

A kernel has

* **tensors**: array arguments (each per-element, or one value broadcast to every element,
  per variant: see :attr:`KernelConfig.scalar_tensors`);
* **hyperparameters**: Python floats;
* a **prelude**: steps over hyperparameters only, evaluated once per call in IEEE double with
  Python's semantics (``pow`` is Python's ``**``);
* **kernel scalars**: the prelude results and hyperparameters the body reads, in the order the
  kernel receives them; each is rounded once to the element dtype, as NumPy rounds a Python float;
* a **body**: steps over tensors and kernel scalars, evaluated element by element in the
  element dtype, in exactly this order;
* **outputs**: which body value each output is, and which inputs each output depends on.

An operand is a name (of an input, a prelude value or an earlier step) or a float constant.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import KernelConfig
from ..interface import Interface

Operand = str | float

#: Comparison suffixes of ``select_<cmp>(a, b, x, y)`` (``x if a <cmp> b else y``; a comparison
#: with NaN is false, as in IEEE), with their Python/C operator.
COMPARISONS: dict[str, str] = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "eq": "==",
                               "ne": "!="}
#: Dtypes ``round_<dtype>`` rounds to (to nearest even; the result is held in the kernel's type).
ROUNDINGS = ("bfloat16", "float16", "float32", "element")
#: Dtypes ``round_stochastic_<dtype>(x, stream)`` rounds to, stochastically, with the random bits
#: of ``stream`` (an int constant) at each element (:func:`adamgen.ieee.stream_bits`).
STOCHASTIC_ROUNDINGS = ("bfloat16", "float16")

#: op name -> arity. Each op is rounded once in the kernel's element type (the prelude: in IEEE
#: double, with Python's semantics). ``pow`` is Python's ``**`` and appears only in the prelude;
#: ``sqrt`` is IEEE's square root everywhere (``math.sqrt`` in the prelude); ``fma(a, b, c)`` is
#: ``a*b + c`` rounded once; ``round_element`` (prelude only) rounds a Python float to the kernel's
#: element dtype; ``sign`` is torch's (0 for 0, -0 and NaN); ``maximum``/``minimum``
#: propagate NaN and keep their first operand on ties; ``select_<cmp>`` is described above.
OPS: dict[str, int] = {
    "add": 2, "sub": 2, "mul": 2, "div": 2, "neg": 1, "pow": 2, "sqrt": 1, "fma": 3,
    "sign": 1, "maximum": 2, "minimum": 2,
    **{f"select_{cmp}": 4 for cmp in COMPARISONS},
    **{f"round_{dtype}": 1 for dtype in ROUNDINGS},
    **{f"round_stochastic_{dtype}": 2 for dtype in STOCHASTIC_ROUNDINGS},
}
#: Ops the prelude can compute (Python floats); the others exist only element by element.
PRELUDE_OPS = frozenset({"add", "sub", "mul", "div", "neg", "pow", "sqrt",
                         *(f"select_{cmp}" for cmp in COMPARISONS),
                         *(f"round_{dtype}" for dtype in ROUNDINGS)})
#: Ops whose two operands may be swapped without changing a bit (IEEE ``+`` and ``*``).
COMMUTATIVE = frozenset({"add", "mul"})


def comparison(op: str) -> str | None:
    """``">"`` for ``select_gt`` and so on; ``None`` for an op that is not a select."""
    return COMPARISONS.get(op[len("select_"):]) if op.startswith("select_") else None


def rounding(op: str) -> str | None:
    """``"bfloat16"`` for ``round_bfloat16`` and so on; ``None`` for other ops (stochastic
    rounding included: see :func:`stochastic`)."""
    if op.startswith("round_") and not op.startswith("round_stochastic_"):
        return op[len("round_"):]
    return None


def stochastic(op: str) -> str | None:
    """``"bfloat16"`` for ``round_stochastic_bfloat16``; ``None`` for other ops."""
    return op[len("round_stochastic_"):] if op.startswith("round_stochastic_") else None


@dataclass(frozen=True)
class Step:
    """``target = op(*args)``: one operation, rounded once."""

    target: str
    op: str
    args: tuple[Operand, ...]

    def __post_init__(self) -> None:
        if OPS.get(self.op) != len(self.args):
            raise ValueError(f"{self.op} takes {OPS.get(self.op)} operands, got {self.args}")

    def names(self) -> tuple[str, ...]:
        """The operands that are names (not constants)."""
        return tuple(a for a in self.args if isinstance(a, str))

    def __str__(self) -> str:
        return f"{self.target} = {self.op}({', '.join(map(str, self.args))})"


@dataclass(frozen=True)
class KernelIR:
    """One kernel, lowered from a spec for one :class:`KernelConfig`.

    ``interface`` is the spec's interface (plain data: names, defaults, ranges, state pairs,
    dependencies), carried so that every renderer can export it without the spec's graph.
    """

    interface: Interface
    config: KernelConfig
    prelude: tuple[Step, ...]
    kernel_scalars: tuple[str, ...]
    body: tuple[Step, ...]
    outputs: tuple[tuple[str, str], ...]

    @property
    def spec_name(self) -> str:
        return self.interface.rule

    @property
    def spec_hash(self) -> str:
        return self.interface.spec_hash

    @property
    def tensors(self) -> tuple[str, ...]:
        return self.interface.tensor_names

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        return self.interface.hyperparameter_names

    @property
    def depends(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return self.interface.depends

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.outputs)

    @property
    def free_hyperparameters(self) -> tuple[str, ...]:
        """Hyperparameters the caller still supplies (those not baked in as constants)."""
        baked = self.config.constants_dict
        return tuple(h for h in self.hyperparameters if h not in baked)

    def dependencies(self, output: str) -> tuple[str, ...]:
        return self.interface.dependencies(output)

    @property
    def streams(self) -> tuple[int, ...]:
        """The random streams the body's stochastic roundings draw from (sorted; empty for a
        kernel without randomness). A kernel with streams takes a seed, a step and a key per
        tensor (see :func:`adamgen.ieee.stream_bits`)."""
        return tuple(sorted({int(step.args[1]) for step in self.body
                             if stochastic(step.op) is not None}))

    def storage(self, tensor: str) -> str:
        """The dtype tensor ``tensor`` is stored in (its declared storage, else the kernel's)."""
        return self.interface.storage(tensor, self.config.dtype)

    def output_storage(self, output: str) -> str:
        """The dtype output ``output`` is stored in (that of the input it replaces)."""
        return self.interface.output_storage(output, self.config.dtype)

    def uniform_steps(self) -> tuple[str, ...]:
        """Body steps that read no array (only per-call scalars, scalar tensors, constants and
        earlier such steps): a backend computes each once per call, in the element type. A
        stochastic rounding is never uniform: its bits differ per element."""
        uniform = set(self.kernel_scalars) | set(self.config.scalar_tensors)
        found: list[str] = []
        for step in self.body:
            if stochastic(step.op) is None and all(name in uniform for name in step.names()):
                uniform.add(step.target)
                found.append(step.target)
        return tuple(found)

    def buffer_names(self) -> dict[str, str]:
        """Output -> the name of the array an output is written to in a functional form:
        ``<output>_out``, distinct from every input and every value of the body."""
        taken = set(self.tensors) | set(self.kernel_scalars) | {s.target for s in self.body}
        names: dict[str, str] = {}
        for output in self.output_names:
            name = f"{output}_out"
            while name in taken:
                name += "_"
            taken.add(name)
            names[output] = name
        return names

    def last_reads(self) -> dict[str, int]:
        """For each name, the index of the last body step that reads it (outputs: past the end)."""
        last: dict[str, int] = {}
        for index, step in enumerate(self.body):
            for name in step.names():
                last[name] = index
        for _, value in self.outputs:
            last[value] = len(self.body)
        return last

    def describe(self) -> str:
        """The IR as text, one step a line: for debugging and golden tests."""
        lines = [f"kernel {self.spec_name} [{self.config.describe()}] spec {self.spec_hash}",
                 f"  tensors: {', '.join(self.tensors)}",
                 f"  hyperparameters: {', '.join(self.free_hyperparameters) or '-'}"]
        lines += [f"  prelude {step}" for step in self.prelude]
        lines.append(f"  kernel scalars: {', '.join(self.kernel_scalars) or '-'}")
        lines += [f"  body {step}" for step in self.body]
        lines += [f"  output {name} = {value}" for name, value in self.outputs]
        return "\n".join(lines)
