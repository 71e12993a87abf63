"""``adamgen.torch.Lion``: ``lion_pytorch.Lion`` 0.2.5's constructor, adamgen's kernel."""

from __future__ import annotations

from typing import Any

import torch

from ._optimizer import KernelOptimizer
from .adam import _real

_STATE = ("exp_avg",)
_NO_OPTIONS: tuple[tuple[str, Any], ...] = ()


class Lion(KernelOptimizer):
    """``lion_pytorch.Lion`` (0.2.5, ``use_triton=False``) with adamgen's kernel, bit for bit.

    Same signature, defaults, state (``state[p]["exp_avg"]``, no step count) and state-dict
    format as lion-pytorch; each step is one C call per (group, dtype). With
    ``decoupled_weight_decay=True`` the weight decay is divided by the learning rate given at
    construction, as lion-pytorch divides it.

    Differences from lion-pytorch: its constructor checks ``lr > 0`` and ``0 <= beta <= 1``
    with bare ``assert`` statements (which ``python -O`` removes); this one raises
    ``ValueError``. ``use_triton=True`` (a CUDA kernel) raises ``NotImplementedError``, and an
    ``lr`` tensor ``TypeError``. Parameters must be CPU float32/float64 tensors, not shared, as
    for :class:`adamgen.torch.Adam`. Copies and pickles keep the constructor's ``lr`` and
    ``decoupled_weight_decay`` (torch's ``__getstate__``, which lion-pytorch inherits, drops
    them).
    """

    _counts_steps = False
    _group_keys = ("lr", "betas", "weight_decay")

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, use_triton: bool = False,
                 decoupled_weight_decay: bool = False) -> None:
        if isinstance(lr, torch.Tensor):
            raise TypeError("Lion's lr must be a Python float, not a tensor (lion-pytorch "
                            "multiplies it into Python scalars)")
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr} (Lion needs lr > 0)")
        if len(betas) != 2:
            raise ValueError(f"betas must be two numbers, got {betas!r}")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta} (Lion needs "
                                 "0 <= beta <= 1)")
        if use_triton:
            raise NotImplementedError("adamgen.torch.Lion does not implement use_triton=True "
                                      "(a CUDA kernel); adamgen updates CPU tensors")
        self._init_lr = lr
        self.decoupled_wd = decoupled_weight_decay
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})
        self._setup()

    def _config(self) -> dict[str, Any]:
        return {"_init_lr": self._init_lr, "decoupled_wd": self.decoupled_wd}

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return _STATE

    def _group_call(self, group: dict[str, Any]
                    ) -> tuple[str, tuple[tuple[str, Any], ...], tuple[float, ...]]:
        lr, weight_decay = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        if type(lr) is not float:
            lr = _real("lr", lr)
        if type(beta1) is not float or type(beta2) is not float:
            beta1, beta2 = _real("betas[0]", beta1), _real("betas[1]", beta2)
        if type(weight_decay) is not float:
            weight_decay = _real("weight_decay", weight_decay)
        if self.decoupled_wd:
            weight_decay /= self._init_lr
        return "lion", _NO_OPTIONS, (lr, beta1, beta2, weight_decay)
