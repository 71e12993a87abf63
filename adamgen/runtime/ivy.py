"""The Ivy rule's public bindings: Ivy's signatures over the generic runtime.

``adamgen.Adam`` is the generic in-place :class:`~adamgen.runtime.optimizer.Optimizer` bound to
the built-in ``ivy_adam`` rule, with Ivy's names and defaults as its signature and its state
under ``m`` and ``v``. Nothing here computes: the rule's spec says what the kernels do, the
generic runtime runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..interface import SpecRef
from .optimizer import Optimizer
from .source import KernelSource, cached_jit_source
from .tree import Tree

#: The Ivy rule (a built-in: its kernels are keyed by name).
IVY_ADAM = SpecRef("ivy_adam")


def ivy_source() -> KernelSource:
    return cached_jit_source(IVY_ADAM)


class Adam(Optimizer):
    """Ivy's Adam over a list (or a Container) of float32/float64 arrays, updated in place.

    Args:
        params: the parameters; a list of arrays or CPU tensors, or a Container of them. No two
            may share memory.
        lr: the learning rate, finite and >= 0 (torch accepts inf; adamgen does not); may be
            changed between steps (``opt.lr = ...``, checked at the next step).
        beta1, beta2, epsilon: as in :func:`adamgen.adam_update`.
    """

    display_name = "Adam"

    def __init__(self, params: Sequence[Any] | Tree, lr: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, epsilon: float = 1e-7) -> None:
        super().__init__(ivy_source(), params, lr=lr, beta1=beta1, beta2=beta2,
                         epsilon=epsilon)

    @property
    def lr(self) -> Any:
        return self.hyperparameters["lr"]

    @lr.setter
    def lr(self, value: Any) -> None:  # checked at the next step, with the others
        self.hyperparameters["lr"] = value

    @property
    def beta1(self) -> float:
        return self.hyperparameters["beta1"]

    @property
    def beta2(self) -> float:
        return self.hyperparameters["beta2"]

    @property
    def epsilon(self) -> float:
        return self.hyperparameters["epsilon"]
