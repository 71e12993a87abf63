"""The rule family: every built-in rule's in-place optimizer, its traffic and its peer.

Each built-in rule is benchmarked the same way (:func:`benchmarks.worker.rule_case`): its
optimizer (``adamgen.rule(name, **options).optimizer(params)``, one C call over every tensor per
step, gradients written into the buffer it owns) beyond cache against a bandwidth probe with
*that rule's* traffic, and on many small tensors against the fastest CPU path of the library it
reproduces. A rule selected by name brings every :class:`Subject` listed for it here
(``torch_adam`` brings its AMSGrad variant too).

The traffic is read from the rule's interface, not written down: the parameter and the gradient
are read, the parameter and each state tensor the optimizer owns are read and written (Adam 4 and
3, Lion 3 and 2, AMSGrad 5 and 4), so a rule that gains a state tensor gets a matching probe.
The peers run with the same hyperparameters as adamgen (each rule's defaults, Ivy's lr), on
tensors of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adamgen.rules import BUILTINS

from .peers import BETA1, BETA2, EPSILON, LR, module
from .probe import Traffic


@dataclass(frozen=True)
class Subject:
    """One benchmarked optimizer: a built-in rule with options, and its peer.

    Attributes:
        label: its name in tables (``torch_adam amsgrad``).
        rule: the built-in rule's name.
        options: the rule's options.
        hyperparameters: what adamgen's optimizer is built with (beyond the rule's defaults).
        peer: the peer's label in tables.
        peer_package: the optional package the peer needs (see :data:`benchmarks.peers.OPTIONAL`).
    """

    label: str
    rule: str
    options: tuple[tuple[str, Any], ...]
    hyperparameters: tuple[tuple[str, float], ...]
    peer: str
    peer_package: str

    def make_rule(self) -> Any:
        import adamgen

        return adamgen.rule(self.rule, **dict(self.options))

    def traffic(self) -> Traffic:
        """The arrays one in-place step reads and writes, from the rule's interface."""
        from adamgen.runtime.multitensor import Roles

        state = len(Roles.of(self.make_rule().interface).state)
        return Traffic(reads=2 + state, writes=1 + state)


_IVY = (("lr", LR), ("beta1", BETA1), ("beta2", BETA2), ("epsilon", EPSILON))
#: Per built-in rule, what is benchmarked. Every rule of :data:`adamgen.rules.BUILTINS` must
#: appear (``tests/test_benchmarks.py`` checks it).
SUBJECTS: dict[str, tuple[Subject, ...]] = {
    "ivy_adam": (Subject("ivy_adam", "ivy_adam", (), _IVY, "torch.optim.Adam(fused=True)",
                         "torch"),),
    "torch_adam": (
        Subject("torch_adam", "torch_adam", (), (), "torch.optim.Adam(fused=True)", "torch"),
        Subject("torch_adam amsgrad", "torch_adam", (("amsgrad", True),), (),
                "torch.optim.Adam(fused=True, amsgrad=True)", "torch")),
    "torch_adamw": (Subject("torch_adamw", "torch_adamw", (), (),
                            "torch.optim.AdamW(fused=True)", "torch"),),
    "lion": (Subject("lion", "lion", (), (), "lion_pytorch.Lion", "lion_pytorch"),),
}
RULES = tuple(SUBJECTS)


def check_rule_names(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` in the order of :data:`RULES`, each once; an unknown name is a ``ValueError``
    that lists the valid ones."""
    wrong = [name for name in names if name not in SUBJECTS]
    if wrong:
        raise ValueError(f"no built-in rule {', '.join(map(repr, wrong))}; the rules are: "
                         f"{', '.join(RULES)}")
    return tuple(name for name in RULES if name in names)


def subjects(names: Sequence[str]) -> list[Subject]:
    """Every subject of the rules ``names``, in the order of :data:`SUBJECTS`."""
    return [s for name in check_rule_names(names) for s in SUBJECTS[name]]


def missing_builtins() -> list[str]:
    """Built-in rules the family does not cover (should be none)."""
    return [name for name in BUILTINS if name not in SUBJECTS]


# -- the contenders ------------------------------------------------------------------------------

def optimizer_step(subject: Subject, params: Sequence[np.ndarray],
                   grads: Sequence[np.ndarray]) -> Callable[[], object]:
    """``rule.optimizer(params).step`` with the gradients copied once into its own buffer."""
    optimizer = subject.make_rule().optimizer(list(params), **dict(subject.hyperparameters))
    for owned, g in zip(optimizer.grads, grads):
        owned[...] = g
    return optimizer.step


def peer_step(subject: Subject, params: Sequence[np.ndarray], grads: Sequence[np.ndarray], *,
              threads: int) -> Callable[[], object] | None:
    """The peer's ``step`` on tensors sharing ``params`` and ``grads`` (which it updates), with
    adamgen's hyperparameters; None when the peer's package is not installed.

    torch's threads are set here for the thread count measured (``torch.set_num_threads``).
    """
    torch = module("torch")
    if torch is None or module(subject.peer_package) is None:
        return None
    torch.set_num_threads(threads)
    tensors = []
    for p, g in zip(params, grads):
        tensor = torch.from_numpy(p)
        tensor.grad = torch.from_numpy(g)
        tensors.append(tensor)
    rule = subject.make_rule()
    values = {h.name: h.default for h in rule.interface.hyperparameters if h.kind != "step"}
    values.update(dict(subject.hyperparameters))
    if subject.rule == "lion":
        lion = module("lion_pytorch")
        optimizer = lion.Lion(tensors, lr=values["lr"], betas=(values["beta1"], values["beta2"]),
                              weight_decay=values["weight_decay"])
        return optimizer.step  # type: ignore[no-any-return]
    kind = torch.optim.AdamW if subject.rule == "torch_adamw" else torch.optim.Adam
    eps = values["epsilon"] if subject.rule == "ivy_adam" else values["eps"]
    extra = {} if subject.rule == "ivy_adam" else {"weight_decay": values["weight_decay"],
                                                   **dict(subject.options)}
    optimizer = kind(tensors, lr=values["lr"], betas=(values["beta1"], values["beta2"]),
                     eps=eps, fused=True, **extra)
    return optimizer.step  # type: ignore[no-any-return]
