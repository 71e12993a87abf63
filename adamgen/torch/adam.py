"""``adamgen.torch.Adam`` and ``AdamW``: torch 2.13's constructors, adamgen's kernels."""

from __future__ import annotations

from typing import Any

import torch

from ..runtime.precision import check_arguments
from ._optimizer import KernelOptimizer

_UNSUPPORTED = {
    "fused": "adamgen's kernel is already one fused pass; torch's fused CPU kernel rounds "
             "differently from its single-tensor path, which adamgen reproduces",
    "capturable": "it serves CUDA graph capture; adamgen updates CPU tensors",
    "differentiable": "it makes autograd record the step; adamgen's kernel is opaque to "
                      "autograd",
}
_STATE = ("exp_avg", "exp_avg_sq")
_AMSGRAD_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_LR_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_OPTIONS: dict[tuple[bool, bool, str], tuple[tuple[str, Any], ...]] = {}

_DIFFERENCES = """
    What differs from ``torch.optim.{name}`` itself, and why:

    * **The square root.** torch's CPU ``sqrt`` is MKL's vector routine, which is not correctly
      rounded (1 ulp off in about 17 % of float32 and 1.3 % of float64 elements); adamgen uses
      the IEEE one. Every other operation is torch's, rounded as torch rounds it (``lerp_``,
      ``addcmul_`` and ``add(alpha=)`` as one fused multiply-add each), so results are
      bit-identical to torch's single-tensor arithmetic with an IEEE square root, and within
      about 1 ulp of torch.optim for one step from the same state.
    * **Refused input.** ``fused=True``, ``capturable=True`` and ``differentiable=True``
      (``NotImplementedError``, naming the flag), betas given as tensors, sparse gradients
      (torch's error), parameters that are not CPU float32/float64/bfloat16/float16 tensors,
      the same tensor twice in the parameters (torch warns, then updates it twice: a
      multi-tensor kernel would race), parameters sharing memory, and a gradient sharing memory
      with what the step writes.
    * **bfloat16 and float16 parameters** are updated in one of three modes (constructor
      arguments, also per param group): by default torch's own arithmetic, state in the
      parameter's dtype, bit for bit ``torch.optim.{name}(foreach=False)`` (Adam's coupled
      weight decay only outside torch's scalar tail); ``master_weights=True``: a float32
      master copy (``state[p]["master_param"]``) and float32 state, the parameter the master
      rounded to nearest even; ``stochastic_rounding=True`` (implies master weights): the
      parameter rounded stochastically, with ARS-7 bits (AES rounds) keyed by ``seed``, the
      step, the parameter (the CRC-32 of its name when given ``named_parameters()``, else its
      position) and the element. State dicts keep each mode's dtypes; a checkpoint of the other
      kind is refused. See docs/mixed-precision.md.
    * **State tensors** live in flat buffers the optimizer owns; tensors placed in
      ``optimizer.state`` by ``load_state_dict``, ZeroRedundancyOptimizer or a user are
      copied into them at the next step, and then rebound to the copies (so whoever holds a
      placed tensor sees the live state, as torch updates placed tensors in place).
      ``load_state_dict`` copies the checkpoint (torch aliases it) and keeps this optimizer's
      ``foreach``/``fused``/``capturable``/``differentiable``.
    * **Following parameters.** Pointers are re-read every step, so ``p.data = t``,
      ``set_()``, ``resize_()`` and ZeroRedundancyOptimizer's bucket views are followed, and so
      is a gradient whose storage is swapped in place; a state tensor's storage swapped in
      place (``state["exp_avg"].set_(...)``) is not (the optimizer's own buffer keeps being
      updated).
    """


def _options(amsgrad: bool, maximize: bool, lr_dtype: str) -> tuple[tuple[str, Any], ...]:
    key = (amsgrad, maximize, lr_dtype)
    found = _OPTIONS.get(key)
    if found is None:
        found = _OPTIONS[key] = (("amsgrad", amsgrad), ("maximize", maximize),
                                 ("lr_dtype", lr_dtype))
    return found


def _real(name: str, value: Any) -> float:
    """A hyperparameter as a Python float (ints and NumPy reals convert exactly)."""
    if isinstance(value, (torch.Tensor, bool)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name} is {value!r} ({type(value).__name__}); adamgen.torch "
                        "expects a Python float here")
    return float(value)


def learning_rate(value: Any) -> tuple[float, str]:
    """``lr`` as (value, the dtype torch computes its scalars in): a Python float's double, or
    a 0-d float32/float64 tensor's own dtype."""
    if type(value) is float:
        return value, "float64"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if value.dtype not in _LR_DTYPES:
            raise TypeError(f"lr is a {str(value.dtype).removeprefix('torch.')} tensor; "
                            "adamgen.torch models an lr tensor of float32 or float64 (torch "
                            "computes lr's scalars in the tensor's dtype)")
        return float(value.item()), _LR_DTYPES[value.dtype]
    return _real("lr", value), "float64"


def _precision_arguments(master_weights: Any, stochastic_rounding: Any, seed: Any
                         ) -> dict[str, Any]:
    """The mixed-precision constructor arguments, checked as the NumPy-facing optimizer checks
    them, as group defaults."""
    seed = check_arguments(master_weights, stochastic_rounding, seed)
    return {"master_weights": master_weights, "stochastic_rounding": stochastic_rounding,
            "seed": seed}


class _TorchAdam(KernelOptimizer):
    """What Adam and AdamW share: the unsupported flags, the state, the rule a group runs."""

    _group_keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
                   "decoupled_weight_decay", "foreach", "capturable", "differentiable", "fused",
                   "master_weights", "stochastic_rounding", "seed")
    _low_precision = True

    def _adopt_precision(self, arguments: dict[str, Any]) -> None:
        """The mixed-precision arguments become group defaults (and keys of every group)."""
        self.defaults.update(arguments)
        for group in self.param_groups:
            for key, value in arguments.items():
                group.setdefault(key, value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a checkpoint or pickle from before these keys
            group.setdefault("master_weights", False)
            group.setdefault("stochastic_rounding", False)
            group.setdefault("seed", 0)

    def _precision(self, group: dict[str, Any]) -> tuple[str, int]:
        if group.get("stochastic_rounding", False):
            mode = "stochastic"
        elif group.get("master_weights", False):
            mode = "master"
        else:
            mode = "torch"
        return mode, int(group.get("seed", 0))

    def _refuse_unsupported(self, group: dict[str, Any]) -> None:
        for flag, reason in _UNSUPPORTED.items():
            if group.get(flag):
                raise NotImplementedError(
                    f"adamgen.torch.{type(self).__name__} does not implement {flag}=True: "
                    f"{reason}. Leave {flag} unset, or use torch.optim.{type(self).__name__}")
        if any(isinstance(beta, torch.Tensor) for beta in group["betas"]):
            raise NotImplementedError(
                f"adamgen.torch.{type(self).__name__} does not implement betas given as "
                "tensors (torch then computes with tensor arithmetic, which the kernel does "
                "not model); pass Python floats")

    def _finish_init(self) -> None:
        """After torch's constructor (its checks, its groups): adamgen's own checks."""
        self._refuse_unsupported(self.defaults)
        learning_rate(self.defaults["lr"])
        self._setup()

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return _AMSGRAD_STATE if group["amsgrad"] else _STATE

    def _group_call(self, group: dict[str, Any]
                    ) -> tuple[str, tuple[tuple[str, Any], ...], tuple[float, ...]]:
        if group["capturable"] or group["differentiable"] or group["fused"]:
            self._refuse_unsupported(group)
        lr = group["lr"]
        if type(lr) is float:
            lr_dtype = "float64"
        else:
            if isinstance(lr, torch.Tensor) and group["foreach"] and not group["capturable"]:
                raise RuntimeError("lr as a Tensor is not supported for capturable=False and "
                                   "foreach=True")
            lr, lr_dtype = learning_rate(lr)
        beta1, beta2 = group["betas"]
        if type(beta1) is not float or type(beta2) is not float:
            self._refuse_unsupported(group)
            beta1, beta2 = _real("betas[0]", beta1), _real("betas[1]", beta2)
        eps, weight_decay = group["eps"], group["weight_decay"]
        if type(eps) is not float:
            eps = _real("eps", eps)
        if type(weight_decay) is not float:
            weight_decay = _real("weight_decay", weight_decay)
        rule = "torch_adamw" if group["decoupled_weight_decay"] else "torch_adam"
        options = _options(bool(group["amsgrad"]), bool(group["maximize"]), lr_dtype)
        return rule, options, (lr, beta1, beta2, eps, weight_decay)


class Adam(_TorchAdam, torch.optim.Adam):
    """``torch.optim.Adam`` (torch 2.13) with adamgen's kernels: same signature, defaults,
    validation (torch's own constructor runs), param groups, hooks, schedulers and state dicts;
    each step is one C call per (group, dtype).
    """

    __doc__ = (__doc__ or "") + _DIFFERENCES.format(name="Adam")

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 decoupled_weight_decay: bool = False, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0) -> None:
        precision = _precision_arguments(master_weights, stochastic_rounding, seed)
        torch.optim.Adam.__init__(
            self, params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
            maximize=maximize, capturable=capturable, differentiable=differentiable,
            fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        self._adopt_precision(precision)
        self._finish_init()


class AdamW(_TorchAdam, torch.optim.AdamW):
    """``torch.optim.AdamW`` (torch 2.13) with adamgen's kernels: same signature, defaults,
    validation (torch's own constructor runs), param groups, hooks, schedulers and state dicts;
    each step is one C call per (group, dtype).
    """

    __doc__ = (__doc__ or "") + _DIFFERENCES.format(name="AdamW")

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 seed: int = 0) -> None:
        precision = _precision_arguments(master_weights, stochastic_rounding, seed)
        torch.optim.AdamW.__init__(
            self, params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused)
        self._adopt_precision(precision)
        self._finish_init()
