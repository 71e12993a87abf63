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

Operand = str | float

#: op name -> arity. ``pow`` appears only in the prelude; ``sqrt``, ``clamp_nonnegative``
#: (``x if x >= 0 else 0``, so NaN becomes 0) and ``select_positive`` (``select_positive(c, a)``
#: is ``a if c > 0 else 0``: NaN ``c`` gives 0, and an inf or NaN ``a`` is discarded where
#: ``c <= 0``; derivatives use it for their rule at ``v = 0``) only in the body.
OPS: dict[str, int] = {
    "add": 2, "sub": 2, "mul": 2, "div": 2, "neg": 1, "pow": 2, "sqrt": 1,
    "clamp_nonnegative": 1, "select_positive": 2,
}
COMMUTATIVE = frozenset({"add", "mul"})


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
    """One kernel, lowered from a spec for one :class:`KernelConfig`."""

    spec_name: str
    spec_hash: str
    config: KernelConfig
    tensors: tuple[str, ...]
    hyperparameters: tuple[str, ...]
    prelude: tuple[Step, ...]
    kernel_scalars: tuple[str, ...]
    body: tuple[Step, ...]
    outputs: tuple[tuple[str, str], ...]
    depends: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.outputs)

    @property
    def free_hyperparameters(self) -> tuple[str, ...]:
        """Hyperparameters the caller still supplies (those not baked in as constants)."""
        baked = self.config.constants_dict
        return tuple(h for h in self.hyperparameters if h not in baked)

    def dependencies(self, output: str) -> tuple[str, ...]:
        return dict(self.depends)[output]

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
