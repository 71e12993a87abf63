"""The reference for ``adamgen.torch`` (not a test module): torch.optim itself, with an IEEE
square root.

adamgen's contract for its torch optimizers is torch's single-tensor arithmetic operation by
operation, with a correctly rounded square root in place of torch's (MKL's, which is not).
:func:`ieee_sqrt` swaps ``torch.Tensor.sqrt`` for NumPy's (IEEE) while a reference optimizer
steps, so the reference is ``torch.optim.Adam/AdamW(foreach=False)`` with all of its machinery
(param groups, lazy state, per-parameter step counts, skipped parameters, lr tensors,
schedulers, closures, GradScaler) and nothing else changed. ``test_torch_conformance.py`` ties
it to ``peers.torch_adam_step(sqrt="ieee")``, the rules' proven reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from conftest import assert_bitwise_equal
from peers import require_torch

torch = require_torch()
_SQRT = torch.Tensor.sqrt


def _ieee(tensor: Any) -> Any:
    return torch.from_numpy(np.sqrt(tensor.detach().numpy())).reshape(tensor.shape)


@contextlib.contextmanager
def ieee_sqrt() -> Iterator[None]:
    """``Tensor.sqrt`` is NumPy's correctly rounded square root inside the block."""
    torch.Tensor.sqrt = _ieee  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.sqrt = _SQRT  # type: ignore[method-assign]


def reference_step(optimizer: Any, closure: Any = None) -> Any:
    """One step of a torch optimizer with the IEEE square root."""
    with ieee_sqrt():
        return optimizer.step(closure)


def assert_same(actual: Any, expected: Any, name: str = "tensor") -> None:
    """Same dtype, shape and bits (a NaN equals any NaN)."""
    assert_bitwise_equal(_numpy(actual), _numpy(expected), name)


def _numpy(value: Any) -> Any:
    return value.detach().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def assert_same_state(mine: Any, theirs: Any, params_mine: list, params_theirs: list) -> None:
    """Every parameter and every state tensor the same bits (step counts included)."""
    for index, (p, q) in enumerate(zip(params_mine, params_theirs)):
        assert_same(p, q, f"param {index}")
        a, b = mine.state.get(p, {}), theirs.state.get(q, {})
        assert sorted(a) == sorted(b), (index, sorted(a), sorted(b))
        for key in a:
            assert_same(a[key], b[key], f"state[{index}][{key!r}]")


def ulps(a: Any, b: Any) -> int:
    """The largest distance between ``a`` and ``b`` in units in the last place (same dtype,
    finite values): the count of representable numbers between them."""
    x, y = _numpy(a).ravel(), _numpy(b).ravel()
    bits = {4: np.int32, 8: np.int64}[x.dtype.itemsize]
    ix, iy = x.view(bits).astype(np.int64), y.view(bits).astype(np.int64)
    # map the sign-magnitude bit patterns onto a monotonic integer line
    magnitude = np.int64(np.iinfo(bits).max)
    ix = np.where(ix < 0, -(ix & magnitude), ix)
    iy = np.where(iy < 0, -(iy & magnitude), iy)
    return int(np.abs(ix - iy).max()) if x.size else 0


def twins(*shapes: tuple[int, ...], dtype: Any = None, seed: int = 0,
          layout: str = "contiguous") -> tuple[list[Any], list[Any]]:
    """Two lists of equal leaf parameters (the same values, separate memory).

    ``layout``: ``contiguous``; ``transposed`` (2-d parameters made from a transposed tensor:
    dense, not contiguous); ``strided`` (every other element of a larger tensor: not dense).
    """
    generator = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    first, second = [], []
    for shape in shapes:
        if layout == "transposed":
            base = torch.randn(shape[::-1], generator=generator, dtype=dtype)
            values = [base.t(), base.clone().t()]
        elif layout == "strided":
            base = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator, dtype=dtype)
            values = [base[..., ::2], base.clone()[..., ::2]]
        else:
            base = torch.randn(shape, generator=generator, dtype=dtype)
            values = [base, base.clone()]
        first.append(values[0].requires_grad_())
        second.append(values[1].requires_grad_())
    return first, second


def give_grads(params: list[Any], params_too: list[Any], seed: int, skip: tuple[int, ...] = (),
               specials: bool = False) -> None:
    """The same fresh gradients on both lists (None at the positions in ``skip``)."""
    generator = torch.Generator().manual_seed(seed)
    for index, (p, q) in enumerate(zip(params, params_too)):
        if index in skip:
            p.grad = q.grad = None
            continue
        grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        if specials and grad.numel() > 6:
            grad.view(-1)[:6] = torch.tensor([0.0, -0.0, 1e-40, -3.0e38, float("inf"),
                                              float("nan")], dtype=p.dtype)
        # in the parameter's layout, as autograd delivers it
        p.grad = torch.empty_like(p).copy_(grad)
        q.grad = torch.empty_like(q).copy_(grad)
