"""The ``torch.optim.Optimizer`` machinery shared by Adam, AdamW and Lion.

What torch provides and is kept as is: ``param_groups`` (plain dicts anyone may edit, as LR
schedulers do), ``zero_grad``, the state-dict hooks and format. What this class adds:

* ``step`` is wrapped as torch wraps every optimizer's (:func:`hooked_step`: the global and
  per-optimizer pre/post hooks, ``_optimizer_step_code``, a profiler record named
  ``Optimizer.step#<class>.step``), but with a cheaper record outside a profiler: torch's
  ``record_function`` costs 6 us a step warm and about 40 us right after a backward pass,
  more than the whole kernel of a small model;

* ``step`` is one C call per (group, dtype) through :class:`~adamgen.torch._plan.GroupPlan`;
* ``state`` is a :class:`~adamgen.torch._state.TrackedState`, so a step notices in O(1) that
  someone wrote it (``load_state_dict``, ZeroRedundancyOptimizer, a user) and adopts the new
  entries: copies them into the optimizer's own rows, which replace them in the dict (and to
  which the placed tensors are rebound: :func:`~adamgen.torch._layout.rebind`);
* ``load_state_dict`` validates everything first (groups, sizes, every state tensor's shape)
  and refuses a mismatched checkpoint before anything changes; it copies the loaded tensors
  (torch's would alias the checkpoint's) and keeps this optimizer's implementation flags
  (``foreach``, ``fused``, ``capturable``, ``differentiable``): a checkpoint of
  ``torch.optim.AdamW(fused=True)`` loads and continues with adamgen's kernel;
* parameters are checked as torch does not: two parameters sharing memory (``[p, p]``, which
  torch only warns about and then updates twice, or overlapping views) are refused, since one
  kernel call over both would update the shared elements twice or race between threads.
"""

from __future__ import annotations

import functools
import operator
import zlib
from collections.abc import Callable
from copy import deepcopy
from itertools import chain
from typing import Any

import torch
from torch.optim import optimizer as _torch_optimizer

from . import _state
from ._bucket import MASTER
from ._kernels import first_overlap, rule_kernel
from ._layout import LOW_PRECISION, WrittenRanges, describe, span
from ._plan import GroupPlan, Replan, check_param
from ._state import TrackedState, plain

#: Group keys that choose an implementation, not the arithmetic: a loaded checkpoint keeps the
#: loading optimizer's values.
IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")
#: Group keys of the mixed-precision modes that a loaded checkpoint also leaves as they are (its
#: state must fit them: checked); its ``seed`` is kept, so a stochastic run continues the same.
PRECISION_FLAGS = ("master_weights", "stochastic_rounding")


_profiler_enabled = torch._C._autograd._profiler_enabled
#: torch's C-level record (what torch.compile's generated code uses): a fraction of a us when
#: nothing listens; None in a torch without it
_FastRecord = getattr(torch._C._profiler, "_RecordFunctionFast", None)


def hooked_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` wrapped as ``torch.optim.Optimizer.profile_hook_step`` wraps it: the same hooks
    in the same order, with the same power to replace the arguments, and the same record.

    The difference is the record's cost. Under a profiler (``torch.profiler.profile``,
    ``torch.autograd.profiler.profile``) it is torch's ``record_function``, so a trace shows
    the step exactly as it shows torch's optimizers (a ``user_annotation``). Otherwise it is
    ``_RecordFunctionFast``, which other RecordFunction observers still see (as a
    ``cpu_op``), at 0.3 us instead of 6 us warm, and about 40 us less right after a backward
    pass has evicted the dispatcher's code from the caches. Marked ``hooked`` so that torch's
    ``__init__`` does not wrap it a second time."""
    pre_hooks = _torch_optimizer._global_optimizer_pre_hooks
    post_hooks = _torch_optimizer._global_optimizer_post_hooks

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        name = self._step_profile_name
        record = (torch.autograd.profiler.record_function(name)
                  if _FastRecord is None or _profiler_enabled() else _FastRecord(name))
        with record:
            if pre_hooks or self._optimizer_step_pre_hooks:
                for pre_hook in chain(pre_hooks.values(),
                                      self._optimizer_step_pre_hooks.values()):
                    result = pre_hook(self, args, kwargs)
                    if result is not None:
                        if isinstance(result, tuple) and len(result) == 2:
                            args, kwargs = result
                        else:
                            raise RuntimeError(f"{step} must return None or a tuple of "
                                               f"(new_args, new_kwargs), but got {result}.")
            out = step(*args, **kwargs)
            self._optimizer_step_code()
            if self._optimizer_step_post_hooks or post_hooks:
                for post_hook in chain(self._optimizer_step_post_hooks.values(),
                                       post_hooks.values()):
                    post_hook(self, args, kwargs)
            return out

    wrapper.hooked = True  # type: ignore[attr-defined]
    return wrapper


class KernelOptimizer(torch.optim.Optimizer):
    """Base of the drop-in optimizers (see the module docstring); subclasses say which rule
    a group runs (:meth:`_group_call`) and which state it keeps (:meth:`_state_keys`)."""

    #: whether the rule keeps torch's per-parameter ``state["step"]``
    _counts_steps = True
    #: the group keys :meth:`_group_call` reads: their values key a per-group memo
    _group_keys: tuple[str, ...] = ()
    #: whether bfloat16/float16 parameters are accepted (the mixed-precision modes)
    _low_precision = False

    # -- subclass interface ----------------------------------------------------------------------
    def _group_call(self, group: dict[str, Any]
                    ) -> tuple[str, tuple[tuple[str, Any], ...], tuple[float, ...]]:
        """(rule, options, hyperparameters) for one group, validated; the step count, when the
        rule counts steps, is appended per call."""
        raise NotImplementedError

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def _precision(self, group: dict[str, Any]) -> tuple[str, int]:
        """(mode, seed): how the group's bfloat16/float16 parameters are updated (``torch``,
        ``master`` or ``stochastic``) and the random stream's seed."""
        return "torch", 0

    def _config(self) -> dict[str, Any]:
        """Attributes beyond torch's three that a pickled or copied optimizer needs."""
        return {}

    # -- construction ----------------------------------------------------------------------------
    def _setup(self) -> None:
        """After torch's ``__init__`` or ``__setstate__``: tracked state, no plans yet."""
        if not isinstance(self.state, TrackedState):
            self.state = TrackedState(self.state)
        self._step_profile_name = f"Optimizer.step#{type(self).__name__}.step"
        self._tracked = self.state
        self._seen = -1
        self._plans: list[GroupPlan | None] = []
        #: per group: (its values of _group_keys, (kernels, hyper, state keys))
        self._calls: dict[int, tuple[tuple[Any, ...], tuple[Any, ...]]] = {}
        self._values = operator.itemgetter(*self._group_keys)
        self._written = WrittenRanges([])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, refusing what a multi-tensor kernel cannot update: the
        same tensor twice (torch only warns), tensors sharing memory, and parameters that are
        not CPU float32/float64 tensors. Nothing is added when it refuses."""
        index = len(self.param_groups)
        if isinstance(param_group, dict) and "params" in param_group and \
                not isinstance(param_group["params"], (torch.Tensor, set)):
            param_group["params"] = list(param_group["params"])
            _refuse_duplicates(param_group["params"], index)
        super().add_param_group(param_group)
        try:
            for position, param in enumerate(self.param_groups[index]["params"]):
                check_param(param, f"parameter {position} of group {index}",
                            self._low_precision)
            _refuse_overlaps(self.param_groups)
        except BaseException:
            del self.param_groups[index:]
            raise

    # -- the step --------------------------------------------------------------------------------
    @hooked_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()``'s loss.

        The arithmetic is torch's single-tensor path with an IEEE square root (see the class
        docstring of :class:`adamgen.torch.Adam` for what differs from torch.optim itself).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.state is not self._tracked or _state.VERSION[0] != self._seen:
            self._readopt()
        plans, state = self._plans, self.state
        for index, group in enumerate(self.param_groups):
            values = self._values(group)
            call = self._calls.get(index)
            if call is None or call[0] != values:
                call = self._remember_call(index, group, values)
            kernels, hyper, keys = call[1]
            mode, seed = kernels["precision"]
            plan = plans[index] if index < len(plans) else None
            try:
                if plan is None:
                    raise Replan()
                plan.check(group, keys, self._moved, mode)
            except Replan:
                plan = self._replan(index, group, keys, mode)
            for bucket in plan.buckets:
                kernel = kernels.get(bucket.dtype_name)
                if kernel is None:
                    kernel = kernels[bucket.dtype_name] = rule_kernel(
                        *kernels["rule"], bucket.dtype_name, bucket.mode)
                bucket.step(kernel, hyper, state, seed)
        self._seen = _state.VERSION[0]
        return loss

    def _remember_call(self, index: int, group: dict[str, Any], values: tuple[Any, ...]
                       ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """A group's validated call, memoised on its values while none is a tensor (a tensor
        ``lr`` may change in place, so it is read at every step): (its kernels by dtype, with
        ``"rule"``: (rule, options); the hyperparameters; the state keys)."""
        rule, options, hyper = self._group_call(group)
        kernels = {"rule": (rule, options), "precision": self._precision(group)}
        call = (values, (kernels, hyper, self._state_keys(group)))
        if any(isinstance(value, torch.Tensor) for value in values):
            self._calls.pop(index, None)
        else:
            self._calls[index] = call
        return call

    def _replan(self, index: int, group: dict[str, Any], keys: tuple[str, ...],
                mode: str = "torch") -> GroupPlan:
        """Plan a group afresh (its first step, or after it changed), adopting its state."""
        with torch.no_grad():
            plan = GroupPlan(index, group, self.state, keys, self._counts_steps, mode,
                             self._stream_keys(index))
        self._plans.extend([None] * (index + 1 - len(self._plans)))
        self._plans[index] = plan
        self._moved()
        return plan

    def _readopt(self) -> None:
        """``state`` was written (or replaced) since the last step: adopt it in every plan."""
        if self.state is not self._tracked:
            self.state = TrackedState(self.state)
            self._tracked = self.state
        for index, plan in enumerate(self._plans):
            if plan is None:
                continue
            if index >= len(self.param_groups) or \
                    plan.source is not self.param_groups[index]["params"]:
                self._plans[index] = None
                continue
            try:
                with torch.no_grad():
                    plan.adopt(self.state)
            except Replan:
                self._plans[index] = None

    def _stream_keys(self, index: int) -> list[int]:
        """Each parameter's key in the random stream of stochastic rounding: the CRC-32 of its
        name when the optimizer was given names (``model.named_parameters()``), else its
        position counted over every group in order. Both are the same when the same model is
        built again; only names survive a wrapper that hands the optimizer a subset of the
        parameters (ZeroRedundancyOptimizer's shards), positions then shift."""
        group = self.param_groups[index]
        names = group.get("param_names")
        if names is not None and len(names) == len(group["params"]):
            return [zlib.crc32(str(name).encode()) for name in names]
        start = sum(len(g["params"]) for g in self.param_groups[:index])
        return [(start + position) & 0xFFFFFFFF for position in range(len(group["params"]))]

    def _moved(self) -> None:
        """Parameters were (re)bound: check they still own their memory, and record what a
        step writes (for the gradient overlap check)."""
        plans = [plan for plan in self._plans if plan is not None]
        ranges = list(chain.from_iterable(plan.param_ranges() for plan in plans))
        clash = first_overlap(ranges)
        if clash:
            raise ValueError(_shared_memory(*clash))
        owned = [r for plan in plans for bucket in plan.buckets for r in bucket.written_ranges()]
        self._written = WrittenRanges([(start, end) for _, start, end in ranges] + owned)
        for plan in plans:
            for bucket in plan.buckets:
                bucket.writes = self._written

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; with ``set_to_none`` the gradients the last step held for its
        identity check are released too, so none outlives the ``None``."""
        super().zero_grad(set_to_none)
        if set_to_none:
            for plan in self._plans:
                if plan is not None:
                    plan.release()

    # -- state dicts, copies, pickles ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's format, with plain dicts (``torch.load(weights_only=True)`` accepts it)."""
        return plain(super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this optimizer or of ``torch.optim.Adam/AdamW`` (and, for Lion,
        of ``lion_pytorch.Lion``): validated in full before anything changes (see the module
        docstring)."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match "
                             "the size of optimizer's group")
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        modes = {}
        for index, (group, saved) in enumerate(zip(groups, saved_groups)):
            mode = self._precision(group)[0]
            _check_modes(index, group, mode, saved, self._precision(saved)[0])
            modes.update({id(p): mode for p in group["params"]})
        state = TrackedState()
        for key, value in state_dict["state"].items():
            if key in id_map:
                param = id_map[key]
                state[param] = self._loaded_state(param, key, value, state_dict["param_groups"],
                                                  modes[id(param)])
            else:
                state[key] = value
        for group, saved in zip(groups, saved_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            for flag in (*IMPLEMENTATION_FLAGS, *PRECISION_FLAGS):
                if flag in group:
                    saved[flag] = group[flag]
            if "seed" in group and "seed" not in saved:
                saved["seed"] = group["seed"]
        self.__setstate__({"state": state, "param_groups": saved_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded_state(self, param: torch.Tensor, key: Any, value: Any,
                      saved_groups: list[dict[str, Any]], mode: str = "torch") -> Any:
        """One parameter's loaded state: checked, cast as torch casts it (the master-weight
        modes' float32 state and master copy keep float32), copied."""
        if not isinstance(value, dict):
            raise TypeError(f"loaded state {key!r} is a {type(value).__name__}; expected a "
                            "dict of tensors")
        master = param.dtype in LOW_PRECISION and mode != "torch"
        if (MASTER in value) != master:
            raise ValueError(_mode_mismatch(f"the state of parameter {key!r}", param, mode,
                                            MASTER in value))
        loaded = {}
        for name, tensor in value.items():
            if not isinstance(tensor, torch.Tensor):
                loaded[name] = deepcopy(tensor)
                continue
            if name != "step" and tensor.shape != param.shape:
                raise ValueError(f"loaded state {key!r}[{name!r}] has {describe(tensor)}, but "
                                 f"its parameter has shape {tuple(param.shape)}; the "
                                 "checkpoint does not match this optimizer's parameters")
            if master and name != "step":
                cast = tensor.to(torch.float32)
            else:
                cast = torch.optim.Optimizer._process_value_according_to_param_policy(
                    param, tensor, key, saved_groups, name)
            loaded[name] = cast.clone() if cast is tensor else cast
        return loaded

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(self._config())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._setup()


def _mode_name(mode: str) -> str:
    return {"torch": "torch-compatible state in the parameter's dtype (master_weights=False)",
            "master": "float32 master weights and state (master_weights=True)",
            "stochastic": "float32 master weights and state, stochastic rounding "
                          "(stochastic_rounding=True)"}[mode]


def _mode_mismatch(what: str, param: Any, mode: str, has_master: bool) -> str:
    if param.dtype not in LOW_PRECISION:
        return (f"{what} holds master weights ({MASTER!r}), but the parameter is "
                f"{str(param.dtype).removeprefix('torch.')}; master weights belong to "
                "bfloat16/float16 parameters. Nothing was loaded")
    saved = "float32 master weights and state" if has_master else \
        "state in the parameter's dtype, without master weights"
    return (f"{what} was saved with {saved}, but this optimizer keeps {_mode_name(mode)}. "
            "Load it into an optimizer built with the same master_weights setting. Nothing "
            "was loaded")


def _check_modes(index: int, group: dict[str, Any], mode: str, saved: dict[str, Any],
                 saved_mode: str) -> None:
    """A checkpoint saved with master weights (modes 2 and 3) loads only into an optimizer
    that keeps them, and the other way round, for groups with bfloat16/float16 parameters."""
    if "master_weights" not in saved and "stochastic_rounding" not in saved:
        return  # a checkpoint of torch.optim: the parameters' state says (checked per entry)
    if (mode == "torch") == (saved_mode == "torch") or \
            not any(getattr(p, "dtype", None) in LOW_PRECISION for p in group["params"]):
        return
    raise ValueError(f"parameter group {index} of the checkpoint was saved with "
                     f"{_mode_name(saved_mode)}, but this optimizer's group keeps "
                     f"{_mode_name(mode)}. Nothing was loaded")


def _refuse_duplicates(params: list[Any], index: int) -> None:
    tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
    first: dict[int, int] = {}
    for position, tensor in enumerate(tensors):
        seen = first.setdefault(id(tensor), position)
        if seen != position:
            raise ValueError(
                f"parameters {seen} and {position} of group {index} are the same tensor; "
                "torch.optim only warns about duplicate parameters and then updates them "
                "twice, adamgen refuses: one kernel call would update it twice or race "
                "between threads")


def _refuse_overlaps(groups: list[dict[str, Any]]) -> None:
    ranges = [(f"parameter {i} of group {g}", *span(p))
              for g, group in enumerate(groups) for i, p in enumerate(group["params"])
              if isinstance(p, torch.Tensor) and p.layout == torch.strided]
    clash = first_overlap(ranges)
    if clash:
        raise ValueError(_shared_memory(*clash))


def _shared_memory(first: str, second: str) -> str:
    return (f"{first} and {second} share memory (overlapping views of one tensor); each "
            "parameter must own its elements: one kernel call over both would update the "
            "shared elements twice, or race between threads")
