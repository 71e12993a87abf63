"""``adamgen.Rule``: one update rule, compiled, with every entry point adamgen has.

The built-in rules (``adamgen.rule("torch_adam", amsgrad=True)``) and the rules users write
(``adamgen.Rule(spec)``) are the same object: ``update`` (the functional form), ``optimizer``
(the in-place multi-tensor optimizer), ``vjp``, ``spec``, ``verify()``, ``generate()`` and
``code()`` (the generated source of one kernel).

A built-in rule is made from its name and options without SymPy (its graph is built only on a
kernel-cache miss, or when ``spec``/``verify``/``generate`` asks for it); a user's rule arrives
as a graph and is checked once, when made (:func:`adamgen.validation.check_rule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..interface import Interface, SpecRef
from ..rules import BUILTINS, builtin
from .bindings import package_bindings
from .optimizer import Optimizer
from .source import KernelSource, cached_jit_source
from .tree import Tree
from .vjp import VJP

if TYPE_CHECKING:
    from ..spec import UpdateSpec
    from ..theorems import TheoremResult


class Rule:
    """A compiled update rule.

    Args:
        spec: an :class:`adamgen.UpdateSpec` (for a built-in rule use :func:`adamgen.rule`).

    Raises:
        SpecError: the spec is not a rule adamgen can compile; the message names why.
    """

    def __init__(self, spec: UpdateSpec) -> None:
        from ..validation import check_rule

        check_rule(spec)
        self._spec: UpdateSpec | None = spec
        self._ref = spec.ref()
        self._source = cached_jit_source(self._ref)
        self._source._interface = spec.interface
        self._bindings: dict[str, Any] | None = None

    @classmethod
    def builtin(cls, name: str, **options: Any) -> Rule:
        """A built-in rule by name (see :func:`adamgen.rules`), with its options checked."""
        self = object.__new__(cls)
        self._spec = None
        self._ref = builtin(name).ref(**options)
        self._source = cached_jit_source(self._ref)
        self._bindings = None
        return self

    # -- what it is -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._ref.name

    @property
    def options(self) -> dict[str, Any]:
        return dict(self._ref.options)

    @property
    def ref(self) -> SpecRef:
        """How the rule's kernels are keyed."""
        return self._ref

    @property
    def source(self) -> KernelSource:
        """The rule's kernels (the JIT cache)."""
        return self._source

    @property
    def interface(self) -> Interface:
        """Names, defaults, ranges, state pairs: plain data, no SymPy."""
        return self._source.interface

    @property
    def spec(self) -> UpdateSpec:
        """The rule's graph (a built-in rule's is built here: imports SymPy)."""
        if self._spec is None:
            self._spec = builtin(self.name).build(**self.options)
        return self._spec

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self._ref.options)
        kind = "adamgen.rule" if self.name in BUILTINS and self._ref.digest == "" else "Rule"
        return f"{kind}({self.name!r}{options})"

    # -- entry points ---------------------------------------------------------------------------

    def _bound(self) -> dict[str, Any]:
        if self._bindings is None:
            self._bindings = package_bindings(self._source)
        return self._bindings

    def update(self, *tensors: Any, out: Any = None, **hyperparameters: Any) -> tuple[Any, ...]:
        """The functional form: fresh outputs, in the rule's order.

        Tensors go positionally in the rule's order (``rule.interface.tensor_names``), each an
        array (lists and Python numbers follow NumPy/Ivy conversions; a tensor the rule lets be
        a scalar may be one number), all broadcasting together; hyperparameters go by keyword,
        omitted ones at their defaults. ``out`` receives the first output.
        """
        return self._bound()["update"](*tensors, out=out, **hyperparameters)

    def optimizer(self, params: Sequence[Any] | Tree, *, master_weights: bool = False,
                  stochastic_rounding: bool = False, seed: int = 0,
                  **hyperparameters: Any) -> Optimizer:
        """The in-place multi-tensor optimizer over ``params`` (arrays or CPU tensors, a list
        or a Container): ``opt.grads``, ``opt.step()``, ``opt.step(grads)``, ``opt.state``,
        ``state_dict()``/``load_state_dict()``. float16 parameters run in one of the
        mixed-precision modes (:class:`~adamgen.runtime.optimizer.Optimizer`)."""
        return Optimizer(self._source, params, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, seed=seed, **hyperparameters)

    def vjp(self, *tensors: Any, cotangents: Sequence[Any], backend: str = "auto",
            **hyperparameters: Any) -> tuple[np.ndarray, ...]:
        """Cotangents of the outputs (one per output, in order) pulled back through one update:
        one gradient per tensor, each with its input's shape."""
        names = self.interface.tensor_names
        if len(tensors) != len(names):
            raise TypeError(f"rule {self.name} takes {len(names)} tensors ({', '.join(names)}), "
                            f"got {len(tensors)}")
        values = self._bound()["update"].complete(hyperparameters)
        return VJP(self._source, backend)(dict(zip(names, tensors)), cotangents, values)

    # -- generation time ------------------------------------------------------------------------

    def verify(self, **options: Any) -> list[TheoremResult]:
        """Prove the lowered kernels equal the spec, and the rule's own theorems (SymPy).

        ``options`` go to :func:`adamgen.theorems.verify` (``only=``, ``constants=``).
        """
        from ..theorems import verify

        return verify([self.spec], **options)

    def code(self, backend: str = "c", dtype: str = "float32", *, mode: str | None = None,
             scalar_tensors: Sequence[str] = ()) -> str:
        """The generated source of one of this rule's kernels, as the JIT builds it.

        Args:
            backend: ``"c"`` (the C file, every form of the kernel: functional, in place,
                multi-tensor, serial and threaded) or ``"numpy"`` (the NumPy module).
            dtype: ``"float32"`` or ``"float64"`` (NumPy also ``"float16"``, ``"mixed"``).
            mode: ``"exact"`` or ``"fast"`` (default: ``ADAMGEN_MODE``, else exact).
            scalar_tensors: tensors passed as one number (``lr`` given as a Python float).

        Rendering imports SymPy and Jinja (as a kernel-cache miss does) and compiles nothing;
        the C text is the file the JIT compiles for this machine (its flags in the header).
        """
        from dataclasses import replace

        from ..codegen.driver import c_source, numpy_source
        from ..config import C_DTYPES, DTYPES

        config = self._source.config(dtype, scalar_tensors=frozenset(scalar_tensors))
        if mode is not None:
            config = replace(config, mode=mode)
        if backend == "numpy":
            if dtype not in (*DTYPES, "mixed"):
                raise ValueError(f"dtype must be one of {', '.join((*DTYPES, 'mixed'))}, "
                                 f"got {dtype!r}")
            return numpy_source(config, self.spec)
        if backend != "c":
            raise ValueError(f"backend must be 'c' or 'numpy', got {backend!r}")
        if dtype not in C_DTYPES:
            raise ValueError(f"the C backend renders {', '.join(C_DTYPES)}, got {dtype!r}")
        from ..codegen.artifact import c_key
        from ..errors import CompileError

        try:
            _, flags, openmp = c_key(config, portable=False)
        except CompileError:  # no compiler here: the file as it would be rendered anyway
            flags, openmp = [], True
        return c_source(config, self.spec, openmp=openmp, flags=tuple(flags)).source

    def generate(self, out: str | Path, name: str | None = None, **options: Any) -> Path:
        """Write an importable package of this rule's kernels into ``out/name`` (default: the
        rule's name); ``options`` are those of ``adamgen generate`` (``dtypes``, ``constants``,
        ``mode``, ``portable``, ``with_c``, ``progress``)."""
        from ..codegen.package import generate

        return generate(out, name or self.name, self.spec, self._ref, **options)


def rule(name: str, **options: Any) -> Rule:
    """The built-in rule ``name`` with ``options`` (an unknown name or option is an error that
    lists the valid ones)."""
    return Rule.builtin(name, **options)


def rules() -> dict[str, str]:
    """The built-in rules: name -> one line (what it is, and its peer)."""
    return {r.name: f"{r.summary} (peer: {r.peer})" for r in BUILTINS.values()}
