"""One parameter group's buckets, and the per-step check that its parameters did not move.

torch re-reads ``group["params"]`` and each parameter at every step, so ``p.data = t``,
``p.set_()``, ``p.resize_()`` and ZeroRedundancyOptimizer's bucket views (which rebind
``param.data`` after the optimizer is built) all just work there. Here pointers are gathered
once, so :meth:`GroupPlan.check` re-reads the parameters' data pointers at every step and
compares them with the gathered ones: in one call of the step helper
(:mod:`adamgen.torch._native`, identities and pointers, about 0.03 us a parameter right after
a backward pass), else in Python (a C-level ``map``, 0.06 us a parameter warm, 0.25 us cold):

* unchanged: every write goes to memory the parameter owns (each bucket holds an alias of
  every parameter's storage, so an unchanged address is the same live allocation);
* a parameter moved, keeping its shape, dtype and layout: its pointer is re-gathered (this is
  ZeroRedundancyOptimizer's case);
* it changed shape, dtype or layout: with state, an error naming it (torch's step would fail on
  the mismatched state too); without state yet, the group is planned again;
* a different tensor in the list (checked by identity, about 0.015 us a parameter), or a list
  of another length: the group is planned again.

Changes of shape alone that keep the data pointer (``p.data = p.data[:10]``, a smaller
``resize_``) are not seen here; they write only memory the bucket keeps alive, and torch would
raise a size mismatch at such a step.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from . import _native
from ._bucket import Bucket
from ._layout import DTYPE_NAMES, LOW_PRECISION, describe, is_dense, span

_data_ptr = torch.Tensor.data_ptr
_is = operator.is_


class Replan(Exception):
    """The group's parameters changed in a way only a new plan can follow."""


def scalar_dtype() -> torch.dtype:
    """The dtype torch gives a new ``state["step"]`` (torch.optim.optimizer._get_scalar_dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def step_dtype_of(state: Any) -> torch.dtype:
    """The dtype a parameter's step count is kept in: its ``state["step"]`` tensor's (float32
    or float64; an integer or other count is kept as float64, which counts integers exactly),
    or torch's default for a new count."""
    step = state.get("step") if state else None
    if isinstance(step, torch.Tensor):
        return step.dtype if step.dtype in (torch.float32, torch.float64) else torch.float64
    return scalar_dtype()


def check_param(param: Any, name: str, low_precision: bool = True) -> None:
    """What a parameter must be for these kernels: a dense-or-strided CPU float32/float64
    tensor, or bfloat16/float16 where the optimizer has mixed-precision modes (errors name the
    parameter and what it is)."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"{name} is a {type(param).__name__}; expected a torch.Tensor")
    if param.device.type != "cpu":
        raise ValueError(f"{name} is on {param.device}; adamgen.torch updates CPU tensors")
    if param.layout != torch.strided:
        raise ValueError(f"{name} has layout {param.layout}; adamgen.torch updates strided "
                         "(dense) tensors")
    if param.dtype not in DTYPE_NAMES or (not low_precision and param.dtype in LOW_PRECISION):
        kinds = ("float32, float64, bfloat16 and float16 parameters" if low_precision else
                 "float32 and float64 parameters (bfloat16 and float16 need Adam/AdamW's "
                 "mixed-precision modes)")
        raise TypeError(f"{name} is a {str(param.dtype).removeprefix('torch.')} tensor; "
                        f"adamgen.torch updates {kinds}")


class GroupPlan:
    """The buckets of one parameter group, built from the group's params and their state.

    Args:
        index: the group's position (for error messages).
        group: the group dict; its ``params`` list object is what the plan follows.
        state: ``optimizer.state``; existing entries are adopted (copied into owned rows).
        state_keys: the rule's state tensors for this group (``exp_avg``, ...).
        counts_steps: whether the rule keeps ``state["step"]``.
        mode: how the group's bfloat16/float16 parameters are updated (``torch``, ``master``,
            ``stochastic``).
        keys: each parameter's key in the random stream of stochastic rounding.
    """

    def __init__(self, index: int, group: dict[str, Any], state: Any,
                 state_keys: tuple[str, ...], counts_steps: bool, mode: str = "torch",
                 keys: Sequence[int] = ()) -> None:
        self.source = group["params"]
        self.params = tuple(self.source)
        self.count = len(self.params)
        self.state_keys = state_keys
        self.mode = mode
        keys = list(keys) or [0] * self.count
        names = [f"parameter {i} of group {index}" for i in range(self.count)]
        for param, name in zip(self.params, names):
            check_param(param, name)
        keyed: dict[tuple[torch.dtype, torch.dtype | None], list[int]] = {}
        for position, param in enumerate(self.params):
            step = step_dtype_of(state.get(param)) if counts_steps else None
            keyed.setdefault((param.dtype, step), []).append(position)
        self.buckets: list[Bucket] = []
        #: where each position lives: (bucket, row)
        self.where: list[tuple[Bucket, int]] = [None] * self.count  # type: ignore[list-item]
        for (_, step), positions in keyed.items():
            bucket = Bucket([self.params[i] for i in positions], [names[i] for i in positions],
                            state_keys, step, mode, [keys[i] for i in positions])
            self.buckets.append(bucket)
            for row, position in enumerate(positions):
                self.where[position] = (bucket, row)
        self.adopt(state)
        self._set_pointers(list(map(_data_ptr, self.params)))
        helper = _native.helper()
        #: the step helper's check of identities and pointers, in one call (None: Python's)
        self._same = helper.same_params if helper is not None else None

    def _set_pointers(self, pointers: list[int]) -> None:
        self.pointers = pointers
        self._pointer_array = np.array(pointers, dtype=np.uint64)
        self._pointer_address = self._pointer_array.ctypes.data

    def adopt(self, state: Any) -> None:
        """Adopt every parameter's state as ``state`` holds it now (raises :class:`Replan` when
        a step count's dtype puts a parameter in another bucket)."""
        for position, param in enumerate(self.params):
            bucket, row = self.where[position]
            entry = state.get(param)
            if bucket.step_dtype is not None and entry and \
                    step_dtype_of(entry) != bucket.step_dtype:
                raise Replan()
            bucket.adopt(row, entry)
        for bucket in self.buckets:
            bucket.settle()

    def check(self, group: dict[str, Any], state_keys: tuple[str, ...],
              moved: Callable[[], None], mode: str = "torch") -> None:
        """The per-step check (see the module docstring); ``moved`` is told when parameters
        were re-bound. Raises :class:`Replan` when the plan no longer describes the group."""
        params = group["params"]
        if params is not self.source or len(params) != self.count or mode != self.mode or \
                state_keys != self.state_keys:
            raise Replan()
        same = self._same
        if same is not None and same(params, self.params, self._pointer_address):
            return
        if not all(map(_is, params, self.params)):
            raise Replan()
        pointers = list(map(_data_ptr, params))
        if pointers != self.pointers:
            self._follow(params, pointers)
            moved()

    def _follow(self, params: Sequence[Any], pointers: list[int]) -> None:
        changed = [i for i, (new, old) in enumerate(zip(pointers, self.pointers)) if new != old]
        for position in changed:
            param = params[position]  # the same object: check() compared identities
            bucket, row = self.where[position]
            old = bucket.keep[row]
            name = bucket.names[row]
            check_param(param, name)
            problem = _storage_problem(param)
            if problem:
                raise RuntimeError(f"{name}: {problem}")
            same = (param.dtype == old.dtype and param.shape == old.shape and
                    is_dense(param) == bucket.dense[row] and
                    (not bucket.dense[row] or param.stride() == old.stride()))
            if not same:
                if not bucket.has_state[row]:
                    raise Replan()
                raise RuntimeError(
                    f"{name} changed from {describe(old)} to {describe(param)} after its "
                    f"optimizer state was created (p.data = ..., set_() or resize_()); its "
                    f"state no longer fits it (torch.optim would fail at this step too). "
                    f"Delete its state (del optimizer.state[p]) to start it afresh")
        rebound: dict[int, tuple[Bucket, list[int]]] = {}
        for position in changed:
            bucket, row = self.where[position]
            rebound.setdefault(id(bucket), (bucket, []))[1].append(row)
        for bucket, rows in rebound.values():
            bucket.bind_params(rows)
        self._set_pointers(pointers)

    def release(self) -> None:
        for bucket in self.buckets:
            bucket.release()

    def param_ranges(self) -> list[tuple[str, int, int]]:
        """``(name, start, end)`` of every parameter's bytes, for the overlap checks."""
        return [(bucket.names[row], *span(bucket.params[row]))
                for bucket in self.buckets for row in range(bucket.count)]


def _storage_problem(tensor: torch.Tensor) -> str | None:
    """Why ``tensor``'s elements are not all inside its storage (a storage resized to fewer
    bytes, as FSDP's ``untyped_storage().resize_(0)`` does), or None."""
    start, end = span(tensor)
    storage = tensor.untyped_storage()
    if tensor.numel() and (start < storage.data_ptr() or
                           end > storage.data_ptr() + storage.nbytes()):
        return (f"its storage holds {storage.nbytes()} bytes, fewer than its "
                f"{tensor.numel()} elements need (was the storage resized, e.g. "
                "untyped_storage().resize_(0)?)")
    return None
