"""The in-place, multi-tensor optimizer for training code, for any rule.

Where the speed lives. A functional update must allocate new outputs per call (its contract); a
training loop does not need that. :class:`Optimizer` keeps the parameters where they are and
owns, per dtype, flat 64-byte-aligned buffers: one per state tensor of the rule (Adam's ``m`` and
``v``, AMSGrad's maximum, Lion's momentum), and a gradient buffer whose views it hands out as
``opt.grads``. A step is then one kernel call over every parameter of a dtype, with pointers
gathered once at construction (PERFORMANCE-NOTES: collecting and checking hundreds of pointers
per step costs more than the update itself). The rule's interface says which tensor is which
(:class:`~adamgen.runtime.multitensor.Roles`); :class:`adamgen.Adam` is this optimizer bound to
the Ivy rule with Ivy's names.

Bits: a step computes exactly what the rule's functional update computes for each tensor (same
kernel IR, same prelude, scalars rounded to the dtype as NumPy rounds a Python float).

Memory rules (docs/reliability.md, D1, D2, D9, D10):

* torch parameters are followed as ``torch.optim`` follows them: every step checks, cheaply,
  whether one moved (``p.data = t``, ``p.set_()``, ``p.resize_()``, a resized storage), and
  re-gathers its pointer when its shape, dtype and layout are unchanged, or raises naming it
  when the state no longer fits. No step writes memory a parameter no longer owns.
  After a step, torch parameters' version counters are bumped, as torch's in-place ops do;
* parameters that share memory are refused at construction (torch only warns for ``[p, p]``
  and then updates ``p`` twice; here a threaded step would race);
* a gradient that overlaps memory the step writes (a parameter, the state) is copied first,
  so its bits never depend on which variant the loader picked.

Copies: ``copy.deepcopy(opt)`` and ``pickle`` work as for torch's optimizers: the parameters,
the state (every state tensor, the owned gradients, the step) and the hyperparameters travel,
and the kernels are looked up again when the copy is built. Like torch's, a deep copy copies the
parameters too: deep-copy the model and the optimizer in one call (``copy.deepcopy((params,
opt))``) for a copy whose optimizer updates the copied parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from .. import ieee
from ..errors import ArgumentTypeError, ArgumentValueError
from ..interface import Hyperparameter, Range
from . import memory
from .follow import StorageWatch, torch_of
from .multitensor import MultiTensorGroup, Roles
from .params import aligned_empty, as_parameter, checked_step, is_fortran, shared_memory_error
from .precision import LOW_PRECISION, check_arguments, mode_of, variant_ref
from .source import KernelSource, variant_source
from .tree import Tree


class Optimizer:
    """A rule's in-place optimizer over a list (or a Container) of float16/32/64 arrays.

    Args:
        source: the rule's kernels (``adamgen.rule(name).optimizer(...)`` builds this).
        params: the parameters; arrays or CPU tensors, a list or a Container. No two may share
            memory.
        **hyperparameters: the rule's hyperparameters (and the tensors it lets be scalars, such
            as Ivy's ``lr``), checked against the rule's ranges; omitted ones take their
            defaults. They may be changed between steps (``opt.hyperparameters[name] = ...``),
            checked at the next step.
        master_weights, stochastic_rounding, seed: how float16 parameters are updated
            (:mod:`adamgen.runtime.precision`): by default with the rule's own float16
            arithmetic (its ``precision`` option: ``torch_adam``'s is torch's per-op
            rounding, state in float16); with ``master_weights`` from a float32 master copy
            and float32 state, the parameter the master rounded to nearest even; with
            ``stochastic_rounding`` (which implies master weights) rounded stochastically, with
            bits from a counter-based stream of ``seed``, the step, the parameter's position
            and the element. float32/float64 parameters are not affected.
    """

    #: how errors name this optimizer
    display_name = "the optimizer"

    def __init__(self, source: KernelSource, params: Sequence[Any] | Tree, *,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 seed: int = 0, **hyperparameters: Any) -> None:
        self.seed = check_arguments(master_weights, stochastic_rounding, seed)
        self.master_weights, self.stochastic_rounding = master_weights, stochastic_rounding
        self._source = source
        interface = source.interface
        self._roles = Roles.of(interface)
        #: the values a caller sets, each with its declaration (range, default)
        self._settable = {h.name: h for h in interface.hyperparameters if h.kind != "step"}
        for name in self._roles.scalars:
            tensor = interface.tensor(name)
            self._settable[name] = Hyperparameter(name, None, tensor.range or Range())
        self._step_name = next((h.name for h in interface.hyperparameters if h.kind == "step"),
                               None)
        self.hyperparameters = self._checked_values(hyperparameters, defaults=True)
        self._checked = dict(self.hyperparameters)
        self._checked_source: dict[str, Any] = {}
        self.step_count = 0
        self._build(params)

    @property
    def rule(self) -> str:
        return self._source.name

    # -- construction ----------------------------------------------------------------------------

    def _checked_values(self, given: Mapping[str, Any], *, defaults: bool,
                        where: str = "{}") -> dict[str, float]:
        """Every settable value, checked against its range (``where`` formats its name in
        errors: ``state_dict[{!r}]``); unknown names and missing required ones are errors."""
        unknown = sorted(set(given) - set(self._settable))
        if unknown:
            raise TypeError(f"{self.display_name} for rule {self.rule} got unknown "
                            f"{', '.join(unknown)}; it takes {', '.join(self._settable)}")
        values = {}
        baked = dict(self._source.constants)  # a package's constants are its defaults
        for name, declaration in self._settable.items():
            if name in given:
                value = given[name]
            elif defaults and name in baked:
                value = baked[name]
            elif defaults and declaration.default is not None:
                value = declaration.default
            else:
                raise TypeError(f"{self.display_name} for rule {self.rule} needs {name}")
            values[name] = declaration.range.check(where.format(name), value)
            if name in baked and values[name] != baked[name]:
                raise ArgumentValueError(f"{where.format(name)}={values[name]!r}, but these "
                                         f"kernels were generated with {name} fixed to "
                                         f"{baked[name]!r}")
        return values

    def _build(self, params: Sequence[Any] | Tree) -> None:
        """Views of the parameters, the owned buffers, the groups and the torch watch."""
        self._structure = params if isinstance(params, Tree) else None
        if self._structure is not None:
            self._paths = [path for path, _ in self._structure.leaves()]
            raw = [leaf for _, leaf in self._structure.leaves()]
            names = [".".join(path) for path in self._paths]
        else:
            raw = list(params)
            names = [str(i) for i in range(len(raw))]
        if not raw:
            raise ArgumentValueError("params is empty: nothing to optimise")
        self._names = names
        self._originals = raw  # what the caller holds: torch moves these, pickle saves these
        self.params = [as_parameter(name, p, owner=self.display_name)
                       for name, p in zip(names, raw)]
        clash = memory.first_overlap([(f"parameter {name}", *memory.byte_range(p))
                                      for name, p in zip(names, self.params)])
        if clash:
            raise shared_memory_error(*clash)
        #: what each gradient must be: the parameter's shape, dtype and memory order
        self._expected = [(p.shape, p.dtype, is_fortran(p)) for p in self.params]
        #: per owned tensor (gradient, state), one view per parameter (None where the
        #: parameter's group has no such tensor: a master copy exists for float16 only)
        self._owned: dict[str, list[Any]] = {}
        #: every group's flat buffers, by description: the state (which a step writes) and
        #: the gradient (which it only reads)
        self._written_buffers: dict[str, np.ndarray] = {}
        self._read_buffers: dict[str, np.ndarray] = {}
        self._groups: list[MultiTensorGroup] = []
        mode = mode_of(self.master_weights, self.stochastic_rounding)
        for dtype in sorted({p.dtype for p in self.params}, key=str):
            members = [i for i, p in enumerate(self.params) if p.dtype == dtype]
            total = sum(self.params[i].size for i in members)
            low = dtype.name in LOW_PRECISION
            source = self._source if not low else \
                variant_source(self._source, variant_ref(self._source.spec, dtype.name, mode))
            compute = "float32" if low else dtype.name
            roles = Roles.of(source.interface) if low else self._roles
            inits = {p.input: p.init for p in source.interface.owned_state}
            for name in (roles.gradient, *roles.state):
                storage = ieee.STORAGE_NUMPY[source.interface.storage(name, compute)]
                buffer = aligned_empty(total, storage)
                buffer[:] = 0
                kept = self._read_buffers if name == roles.gradient else self._written_buffers
                kept[f"the optimizer's {dtype} {self._label(name)} buffer"] = buffer
                views = self._owned.setdefault(name, [None] * len(raw))
                offset = 0
                for i in members:
                    p = self.params[i]
                    order: Literal["C", "F"] = "F" if is_fortran(p) else "C"
                    views[i] = buffer[offset:offset + p.size].reshape(p.shape, order=order)
                    if inits.get(name) == "parameter":  # master weights: the parameter, widened
                        views[i][...] = p
                    offset += p.size
            arrays = {name: [self._owned[name][i] for i in members]
                      for name in (roles.gradient, *roles.state)}
            arrays[roles.parameter] = [self.params[i] for i in members]
            self._groups.append(MultiTensorGroup(
                source, roles, dtype, arrays, members, self._step_name, compute=compute,
                stream=(self.seed, members) if mode == "stochastic" and low else None))
        self._written = self._written_memory()
        self._watched = [i for i, p in enumerate(raw) if torch_of(p) is not None]
        self._watch = StorageWatch([raw[i] for i in self._watched]) if self._watched else None

    def _label(self, tensor: str) -> str:
        """A state tensor's name in checkpoints and ``opt.state`` (``m`` for Ivy's mw_tm1)."""
        for pair in self._source.interface.state:
            if pair.input == tensor:
                return pair.label
        return tensor

    def _written_memory(self) -> memory.WrittenMemory:
        """What a step writes: every parameter and the owned state (not the gradients)."""
        ranges = [memory.byte_range(p) for p in self.params]
        ranges += [memory.byte_range(buffer) for buffer in self._written_buffers.values()]
        return memory.WrittenMemory(ranges)

    # -- the training loop's side ---------------------------------------------------------------

    @property
    def grads(self) -> list[np.ndarray] | Tree:
        """Views of the owned gradient buffer, shaped like ``params``: write gradients here."""
        return self._shaped(self._owned[self._roles.gradient])

    @property
    def _state_names(self) -> list[str]:
        """Every owned state tensor of any group (the rule's, then a master copy's)."""
        gradient = self._roles.gradient
        return [name for name in self._owned if name != gradient]

    @property
    def state(self) -> dict[str, Any]:
        """The state tensors by their checkpoint names, each shaped like ``params`` (a master
        copy, in the master-weight modes: None for parameters that have none)."""
        return {self._label(name): self._shaped(self._owned[name]) for name in self._state_names}

    def _shaped(self, arrays: list[np.ndarray]) -> list[np.ndarray] | Tree:
        if self._structure is None:
            return list(arrays)
        return type(self._structure).from_leaves(zip(self._paths, arrays))

    def step(self, grads: Sequence[Any] | Tree | None = None) -> None:
        """One step over every parameter, in place; ``grads`` defaults to ``opt.grads``.

        Everything is checked before any parameter is touched: the hyperparameters, where each
        torch parameter lives now (see the module docstring), and every gradient (count, shape,
        dtype). A gradient overlapping memory the step writes is read from a copy.
        """
        values = self._step_values()
        watch = self._watch
        if watch is not None:
            moved = watch.moved()
            if moved:
                self._follow(moved)
        external = None if grads is None else self._checked_grads(grads)
        step = float(self.step_count + 1)
        for group in self._groups:
            group.run(values, step, external, self._written)
        self.step_count += 1
        if self._watch is not None:
            self._watch.bump_versions()

    def _step_values(self) -> dict[str, float]:
        """The hyperparameters, checked: again only when one changed since the last step (a
        training loop changes them rarely; checking is most of a small step's cost)."""
        current = self.hyperparameters
        if current != self._checked_source:
            self._checked = self._checked_values(current, defaults=False)
            self._checked_source = dict(current)
        return self._checked

    def _follow(self, positions: list[int]) -> None:
        """Re-gather the pointers of the torch parameters at ``positions`` of the watch, which
        moved, or raise naming one whose state no longer fits; checked whole before anything
        changes."""
        assert self._watch is not None
        views = {}
        for position in positions:
            i, tensor = self._watched[position], self._watch.tensors[position]
            name, (shape, dtype, fortran) = self._names[i], self._expected[i]
            view = as_parameter(name, tensor, owner=self.display_name)
            if view.shape != shape or view.dtype != dtype or is_fortran(view) != fortran:
                was, now = f"{shape} {dtype}", f"{view.shape} {view.dtype}"
                if was == now:
                    was, now = (f"{was} in {'Fortran' if f else 'C'} order"
                                for f in (fortran, not fortran))
                raise ArgumentValueError(
                    f"parameter {name} changed from {was} to {now} after "
                    f"{self.display_name} was built (p.resize_, p.set_ or p.data = ...); its "
                    "optimizer state no longer fits: give it back its shape, or build a new "
                    "optimizer for it")
            views[i] = view
        params = [views.get(i, p) for i, p in enumerate(self.params)]
        named = [(f"parameter {name}", *memory.byte_range(p))
                 for name, p in zip(self._names, params)]
        owned = {**self._written_buffers, **self._read_buffers}
        clash = memory.first_overlap(named + [(name, *memory.byte_range(buffer))
                                              for name, buffer in owned.items()])
        if clash:
            raise shared_memory_error(*clash)
        self.params[:] = params
        for group in self._groups:
            group.rebind(views)
        self._written = self._written_memory()
        self._watch.accept()

    def _checked_grads(self, grads: Sequence[Any] | Tree) -> list[np.ndarray]:
        if isinstance(grads, Tree):
            if self._structure is None:
                raise ArgumentTypeError("grads is a Container but params is a list")
            paths = grads.leaf_paths()
            if paths != self._paths:
                raise ArgumentValueError(f"grads has leaves {['.'.join(p) for p in paths]}; "
                                         f"expected {self._names}")
            values: Iterable[Any] = (leaf for _, leaf in grads.leaves())
        else:
            values = list(grads)
            if len(values) != len(self.params):
                raise ArgumentValueError(f"grads has {len(values)} arrays; expected "
                                         f"{len(self.params)}, one per parameter")
        checked = []
        for name, (shape, dtype, fortran), grad in zip(self._names, self._expected, values):
            if not isinstance(grad, np.ndarray) and hasattr(grad, "__dlpack__"):
                grad = as_parameter(name, grad, "gradient", self.display_name)
            if not isinstance(grad, np.ndarray) or grad.shape != shape or grad.dtype != dtype:
                got = (f"{getattr(grad, 'shape', '?')} {getattr(grad, 'dtype', type(grad))}")
                raise ArgumentValueError(f"gradient {name} is {got}; expected {shape} {dtype}")
            # the kernels walk memory through typed pointers: the parameter's order, aligned
            flags = grad.flags
            if not (flags.aligned and (flags.f_contiguous if fortran else flags.c_contiguous)):
                grad = np.array(grad, order="F" if fortran else "C")
            checked.append(grad)
        return checked

    # -- checkpoints and copies -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Copies of the state tensors (in their own dtypes; None where a parameter has no
        master copy), the step counter, the hyperparameters and the mixed-precision mode."""
        state: dict[str, Any] = {"step": self.step_count, **self.hyperparameters,
                                 "master_weights": self.master_weights,
                                 "stochastic_rounding": self.stochastic_rounding,
                                 "seed": self.seed}
        for name in self._state_names:
            state[self._label(name)] = [None if x is None else x.copy()
                                        for x in self._owned[name]]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Every entry is checked before anything changes, and
        every error names the entry (``state_dict['m'][1]``)."""
        if not isinstance(state, Mapping):
            raise ArgumentTypeError(f"state_dict must be a mapping, got {type(state).__name__}")
        self._check_mode(state)
        names = self._state_names
        labels = [self._label(name) for name in names]
        missing = [key for key in ("step", *self._settable, *labels) if key not in state]
        if missing:
            raise ArgumentValueError(f"state_dict lacks {missing}")
        step = checked_step("state_dict['step']", state["step"])
        values = self._checked_values({k: state[k] for k in self._settable}, defaults=False,
                                      where="state_dict[{!r}]")
        seed = check_arguments(False, False, state.get("seed", self.seed))
        sources = {name: self._checked_state_arrays(label, state[label], self._owned[name])
                   for name, label in zip(names, labels)}
        for name, arrays in sources.items():
            for target, source in zip(self._owned[name], arrays):
                if target is not None:
                    np.copyto(target, source, casting="same_kind")
        self.step_count = step
        self.hyperparameters = values
        self.seed = seed
        for group in self._groups:
            group.reseed(seed)

    def _check_mode(self, state: Mapping[str, Any]) -> None:
        """A checkpoint with master weights loads only into an optimizer that keeps them (and
        the other way round), where some parameter is low precision: nothing changes else."""
        if "master_weights" not in state or not any(
                p.dtype.name in LOW_PRECISION for p in self.params):
            return
        saved = bool(state["master_weights"]) or bool(state.get("stochastic_rounding"))
        mine = self.master_weights or self.stochastic_rounding
        if saved != mine:
            kinds = {True: "float32 master weights and state (master_weights=True)",
                     False: "state in the parameters' dtype (master_weights=False)"}
            raise ArgumentValueError(f"state_dict was saved with {kinds[saved]}, but this "
                                     f"optimizer keeps {kinds[mine]}; nothing was loaded")

    def _checked_state_arrays(self, key: str, values: Any,
                              targets: Sequence[Any]) -> list[Any]:
        count = len(self.params)
        if not isinstance(values, (list, tuple)) or len(values) != count:
            got = f"{len(values)} entries" if isinstance(values, (list, tuple)) else \
                type(values).__name__
            raise ArgumentValueError(f"state_dict[{key!r}] must be a list of {count} arrays, "
                                     f"one per parameter; got {got}")
        arrays: list[Any] = []
        for i, (target, value) in enumerate(zip(targets, values)):
            if target is None:  # this parameter keeps no such state (no master copy)
                arrays.append(None)
                continue
            param = target  # the state's own dtype and shape
            entry = f"state_dict[{key!r}][{i}] (parameter {self._names[i]})"
            try:
                array = np.asarray(value)
            except (ValueError, TypeError) as error:
                raise ArgumentValueError(f"{entry} is not an array: {error}") from None
            if array.dtype.kind not in "fiu" or not np.can_cast(array.dtype, param.dtype,
                                                                 casting="same_kind"):
                raise ArgumentTypeError(f"{entry} has dtype {array.dtype}; expected a real "
                                        f"dtype that casts to {param.dtype}")
            if array.shape != param.shape:
                raise ArgumentValueError(f"{entry} has shape {array.shape}; expected "
                                         f"{param.shape}")
            arrays.append(array)
        return arrays

    def __getstate__(self) -> dict[str, Any]:
        """What pickle and deepcopy carry: the rule, the parameters as the caller holds them,
        the state and the hyperparameters; never kernels (looked up again on load)."""
        moved = self._watch.moved() if self._watch is not None else []
        if moved:
            self._follow(moved)  # a moved parameter is followed, or refused, before it is saved
        return {"rule": self._source.spec, "constants": self._source.constants,
                "mode": self._source.fixed_mode,
                "params": self._structure if self._structure is not None else self._originals,
                "step": self.step_count, "hyperparameters": dict(self.hyperparameters),
                "precision": {"master_weights": self.master_weights,
                              "stochastic_rounding": self.stochastic_rounding,
                              "seed": self.seed},
                "owned": {name: list(views) for name, views in self._owned.items()}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from .source import cached_jit_source

        source = cached_jit_source(state["rule"])
        if state["constants"] or state["mode"]:
            from dataclasses import replace

            source = replace(source, constants=state["constants"], fixed_mode=state["mode"])
        Optimizer.__init__(self, source, state["params"], **state.get("precision", {}),
                           **state["hyperparameters"])
        self.step_count = state["step"]
        for name, views in state["owned"].items():
            for target, saved in zip(self._owned[name], views):
                if target is not None:
                    target[...] = saved

    def __repr__(self) -> str:
        sizes = sum(p.size for p in self.params)
        backends = ", ".join(group.describe() for group in self._groups)
        count = len(self.params)
        values = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
        return (f"{type(self).__name__}({count} parameter{'s' if count != 1 else ''}, "
                f"{sizes} elements, {values}, step={self.step_count}; {backends})")
