"""References built from the real peers, for the differential tests (not a test module).

* :func:`torch_adam_step`: one step of ``torch.optim.Adam/AdamW(foreach=False)`` written with
  torch's own in-place ops in torch's order (a transcription of ``_single_tensor_adam``), with a
  choice of square root: ``"torch"`` (torch's, MKL's vector routine) or ``"ieee"`` (correctly
  rounded, NumPy's). With ``"torch"`` it equals ``torch.optim`` bit for bit
  (``test_peers.py`` proves it); with ``"ieee"`` it is the contract of adamgen's torch rules.
* :func:`lion_step`: ``lion_pytorch``'s own ``update_fn`` on copies.

Each skips the calling test with a clear message when its peer is not installed.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest


@functools.cache  # the references call it every step; importorskip costs ~80 us a call
def require_torch() -> Any:
    return pytest.importorskip("torch", reason="torch is not installed: pip install "
                                               "torch==2.13.0 (the CPU wheel) to run this test")


@functools.cache
def require_lion() -> Any:
    require_torch()
    return pytest.importorskip("lion_pytorch", reason="lion-pytorch is not installed: pip "
                                                      "install lion-pytorch==0.2.5")


def _tensor(torch: Any, array: Any) -> Any:
    if isinstance(array, torch.Tensor):
        return array.detach().clone(memory_format=torch.preserve_format)
    return torch.from_numpy(np.array(array, copy=True))


def torch_adam_step(param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any,
                    max_exp_avg_sq: Any = None, *, step: int, lr: Any = 1e-3,
                    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                    weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
                    decoupled: bool = False, sqrt: str = "ieee") -> tuple[np.ndarray, ...]:
    """New ``(param, exp_avg, exp_avg_sq[, max_exp_avg_sq])`` as NumPy arrays; inputs untouched.

    ``lr`` may be a Python float or a 0-d tensor (torch then computes its scalars in the tensor's
    dtype); ``step`` is the step count after the increment (1 on the first step).
    """
    torch = require_torch()
    p, m, v = _tensor(torch, param), _tensor(torch, exp_avg), _tensor(torch, exp_avg_sq)
    vmax = _tensor(torch, max_exp_avg_sq) if amsgrad else None
    g = _tensor(torch, grad)

    def root(t: Any) -> Any:
        if sqrt == "torch":
            return t.sqrt()
        return torch.from_numpy(np.sqrt(t.contiguous().numpy())).reshape(t.shape)

    g = -g if maximize else g
    step_t = torch.tensor(float(step), dtype=torch.float32)  # torch's counter, after += 1
    if weight_decay != 0:
        if decoupled:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    t = step_t.item()
    bias_correction1 = 1 - beta1 ** t
    bias_correction2 = 1 - beta2 ** t
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    if amsgrad:
        torch.maximum(vmax, v, out=vmax)
        denom = (root(vmax) / bias_correction2_sqrt).add_(eps)
    else:
        denom = (root(v) / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)
    found = (p, m, v) + ((vmax,) if amsgrad else ())
    return tuple(x.numpy() for x in found)


def lion_step(param: Any, grad: Any, exp_avg: Any, *, lr: float = 1e-4, beta1: float = 0.9,
              beta2: float = 0.99, weight_decay: float = 0.0) -> tuple[np.ndarray, ...]:
    """New ``(param, exp_avg)`` from lion-pytorch's ``update_fn`` itself, on copies."""
    torch = require_torch()
    lion = require_lion()
    p, m = _tensor(torch, param), _tensor(torch, exp_avg)
    lion.lion_pytorch.update_fn(p, _tensor(torch, grad), m, lr, weight_decay, beta1, beta2)
    return p.numpy(), m.numpy()
