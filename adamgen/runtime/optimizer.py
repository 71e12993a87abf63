"""``adamgen.Adam``: the in-place, multi-tensor optimizer for training code.

Where the speed lives. The functional ``adam_update`` must allocate three new arrays per call (its
contract); a training loop does not need that. ``Adam`` keeps the parameters where they are and
owns, per dtype, three flat 64-byte-aligned buffers: ``m``, ``v`` and a gradient buffer whose
views it hands out as ``opt.grads``. A step is then one kernel call over every parameter of a
dtype, with pointers gathered once at construction (PERFORMANCE-NOTES: collecting and checking
hundreds of pointers per step costs more than the update itself).

Bits: a step computes exactly what ``adam_update(w, g, lr, m, v, step)`` computes for each tensor
(same kernel IR, same prelude, ``lr`` rounded to the dtype as NumPy rounds a Python float), so 50
steps of ``Adam`` equal 50 chained ``adam_update`` calls bit for bit.

Memory rules (docs/reliability.md, D1, D2, D9, D10):

* torch parameters are followed as ``torch.optim`` follows them: every step checks, cheaply,
  whether one moved (``p.data = t``, ``p.set_()``, ``p.resize_()``, a resized storage), and
  re-gathers its pointer when its shape, dtype and layout are unchanged, or raises naming it
  when the state no longer fits. No step writes memory a parameter no longer owns.
  After a step, torch parameters' version counters are bumped, as torch's in-place ops do;
* parameters that share memory are refused at construction (torch only warns for ``[p, p]``
  and then updates ``p`` twice; here a threaded step would race);
* a gradient that overlaps memory the step writes (a parameter, ``m``, ``v``) is copied first,
  so its bits never depend on which variant the loader picked.

Copies: ``copy.deepcopy(opt)`` and ``pickle`` work as for torch's optimizers: the parameters,
the state (``m``, ``v``, the owned gradients, the step) and the hyperparameters travel, and the
kernels are looked up again when the copy is built. Like torch's, a deep copy copies the
parameters too: deep-copy the model and the optimizer in one call (``copy.deepcopy((params,
opt))``) for a copy whose optimizer updates the copied parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from ..errors import ArgumentTypeError, ArgumentValueError
from . import memory, validate
from .container import Container
from .follow import StorageWatch, storage_problem, torch_of
from .multitensor import MultiTensorGroup

ALIGNMENT = 64
SUPPORTED_DTYPES = "float32 and float64"
_STATE_KEYS = ("step", "lr", "beta1", "beta2", "epsilon", "m", "v")
_LARGEST_STEP = int(np.finfo(np.float64).max)


def aligned_empty(size: int, dtype: np.dtype) -> np.ndarray:
    """A 1-d array of ``size`` elements whose data starts on a 64-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(size * itemsize + ALIGNMENT, dtype=np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset:offset + size * itemsize].view(dtype)


def _as_parameter(name: str, value: Any, role: str = "parameter") -> np.ndarray:
    """A writable NumPy view of a parameter, without copying (torch tensors via DLPack)."""
    if isinstance(value, np.ndarray):
        array = value
    elif hasattr(value, "__dlpack__"):
        dtype = str(getattr(value, "dtype", "")).removeprefix("torch.")
        if dtype == "bfloat16":
            raise ArgumentTypeError(
                f"{role} {name} is a bfloat16 tensor; bfloat16 is not supported yet (it needs "
                f"mixed precision: float32 state and master weights); Adam updates "
                f"{SUPPORTED_DTYPES} {role}s in place")
        problem = storage_problem(value) if torch_of(value) is not None else None
        if problem:
            raise ArgumentValueError(f"{role} {name}: {problem}")
        source = value.detach() if hasattr(value, "detach") else value
        try:
            array = np.from_dlpack(source)
        except Exception as error:  # noqa: BLE001 (foreign objects raise anything)
            raise ArgumentTypeError(f"{role} {name} ({dtype or type(value).__name__}): cannot "
                                    f"view it without a copy through DLPack ({error}); Adam "
                                    f"updates CPU tensors of {SUPPORTED_DTYPES}") from None
        if not array.flags.writeable:  # NumPy marks DLPack imports read-only; memory is ours
            array.flags.writeable = True
    else:
        raise ArgumentTypeError(f"{role} {name} is a {type(value).__name__}; expected a "
                                "float array or a CPU tensor with __dlpack__")
    if array.dtype not in (np.float32, np.float64):
        raise ArgumentTypeError(f"{role} {name} has dtype {array.dtype}; Adam updates "
                                f"{SUPPORTED_DTYPES} {role}s in place")
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        raise ArgumentValueError(f"{role} {name} is not contiguous (shape {array.shape}, "
                                 f"strides {array.strides} in bytes); pass a contiguous array "
                                 "to update in place")
    if not array.flags.writeable:
        raise ArgumentValueError(f"{role} {name} is read-only")
    if not array.flags.aligned:  # C reads elements through typed pointers: UB when misaligned
        raise ArgumentValueError(f"{role} {name} starts at an address that is not a multiple "
                                 f"of its {array.dtype.itemsize}-byte element; pass an aligned "
                                 "array (np.array(p) makes one) to update in place")
    return array


def _is_fortran(array: np.ndarray) -> bool:
    return array.flags.f_contiguous and not array.flags.c_contiguous


def _shared_memory_error(first: str, second: str) -> ArgumentValueError:
    return ArgumentValueError(
        f"{first} and {second} share memory (the same array twice, or overlapping views of "
        "one buffer); each parameter must own its memory: one step over both would update the "
        "shared elements twice, or race between threads (torch.optim only warns for [p, p] "
        "and updates p twice; adamgen refuses)")


class Adam:
    """Adam over a list (or a Container) of float32/float64 arrays, updated in place.

    Args:
        params: the parameters; a list of arrays or CPU tensors, or a Container of them. No two
            may share memory.
        lr: the learning rate, finite and >= 0 (torch accepts inf; adamgen does not); may be
            changed between steps (``opt.lr = ...``, checked at the next step).
        beta1, beta2, epsilon: as in :func:`adamgen.adam_update`.
    """

    def __init__(self, params: Sequence[Any] | Container, lr: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, epsilon: float = 1e-7) -> None:
        self.lr: Any = validate.as_learning_rate("lr", lr)
        self.beta1 = validate.as_hyperparameter("beta1", beta1, 0.0, 1.0)
        self.beta2 = validate.as_hyperparameter("beta2", beta2, 0.0, 1.0)
        self.epsilon = validate.as_hyperparameter("epsilon", epsilon, 0.0, None)
        self.step_count = 0
        self._build(params)

    def _build(self, params: Sequence[Any] | Container) -> None:
        """Views of the parameters, the owned buffers, the groups and the torch watch."""
        self._structure = params if isinstance(params, Container) else None
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
        self.params = [_as_parameter(name, p) for name, p in zip(names, raw)]
        clash = memory.first_overlap([(f"parameter {name}", *memory.byte_range(p))
                                      for name, p in zip(names, self.params)])
        if clash:
            raise _shared_memory_error(*clash)
        #: what each gradient must be: the parameter's shape, dtype and memory order
        self._expected = [(p.shape, p.dtype, _is_fortran(p)) for p in self.params]
        self._groups: list[MultiTensorGroup] = []
        #: every group's flat m and v (which a step writes) and g (which it only reads), by name
        self._written_buffers: dict[str, np.ndarray] = {}
        self._read_buffers: dict[str, np.ndarray] = {}
        self._m: list[np.ndarray] = [np.empty(0)] * len(self.params)
        self._v: list[np.ndarray] = [np.empty(0)] * len(self.params)
        self._g: list[np.ndarray] = [np.empty(0)] * len(self.params)
        for dtype in sorted({p.dtype for p in self.params}, key=str):
            members = [i for i, p in enumerate(self.params) if p.dtype == dtype]
            total = sum(self.params[i].size for i in members)
            flat = {name: aligned_empty(total, dtype) for name in ("m", "v", "g")}
            for name, buffer in flat.items():
                buffer[:] = 0
                owned = self._read_buffers if name == "g" else self._written_buffers
                owned[f"the optimizer's {dtype} {name} buffer"] = buffer
            offset = 0
            for i in members:
                p = self.params[i]
                order: Literal["C", "F"] = "F" if _is_fortran(p) else "C"
                for name, views in (("m", self._m), ("v", self._v), ("g", self._g)):
                    views[i] = flat[name][offset:offset + p.size].reshape(p.shape, order=order)
                offset += p.size
            self._groups.append(MultiTensorGroup(
                dtype, [self.params[i] for i in members], [self._g[i] for i in members],
                [self._m[i] for i in members], [self._v[i] for i in members], members))
        self._written = self._written_memory()
        self._watched = [i for i, p in enumerate(raw) if torch_of(p) is not None]
        self._watch = StorageWatch([raw[i] for i in self._watched]) if self._watched else None

    def _written_memory(self) -> memory.WrittenMemory:
        """What a step writes: every parameter, and the owned ``m`` and ``v`` (not ``g``)."""
        ranges = [memory.byte_range(p) for p in self.params]
        ranges += [memory.byte_range(buffer) for buffer in self._written_buffers.values()]
        return memory.WrittenMemory(ranges)

    # -- the training loop's side ---------------------------------------------------------------

    @property
    def grads(self) -> list[np.ndarray] | Container:
        """Views of the owned gradient buffer, shaped like ``params``: write gradients here."""
        return self._shaped(self._g)

    @property
    def state(self) -> dict[str, Any]:
        return {"m": self._shaped(self._m), "v": self._shaped(self._v)}

    def _shaped(self, arrays: list[np.ndarray]) -> list[np.ndarray] | Container:
        if self._structure is None:
            return list(arrays)
        return Container.from_leaves(zip(self._paths, arrays))

    def step(self, grads: Sequence[Any] | Container | None = None) -> None:
        """One Adam step over every parameter, in place; ``grads`` defaults to ``opt.grads``.

        Everything is checked before any parameter is touched: ``opt.lr``, where each torch
        parameter lives now (see the module docstring), and every gradient (count, shape,
        dtype). A gradient overlapping memory the step writes is read from a copy.
        """
        lr = validate.as_learning_rate("lr", self.lr)
        watch = self._watch
        if watch is not None:
            moved = watch.moved()
            if moved:
                self._follow(moved)
        external = None if grads is None else self._checked_grads(grads)
        hyper = (self.beta1, self.beta2, self.epsilon, float(self.step_count + 1))
        for group in self._groups:
            group.run(lr, hyper, external, self._written)
        self.step_count += 1
        if self._watch is not None:
            self._watch.bump_versions()

    def _follow(self, positions: list[int]) -> None:
        """Re-gather the pointers of the torch parameters at ``positions`` of the watch, which
        moved, or raise naming one whose state no longer fits; checked whole before anything
        changes."""
        assert self._watch is not None
        views = {}
        for position in positions:
            i, tensor = self._watched[position], self._watch.tensors[position]
            name, (shape, dtype, fortran) = self._names[i], self._expected[i]
            view = _as_parameter(name, tensor)
            if view.shape != shape or view.dtype != dtype or _is_fortran(view) != fortran:
                was, now = f"{shape} {dtype}", f"{view.shape} {view.dtype}"
                if was == now:
                    was, now = (f"{was} in {'Fortran' if f else 'C'} order"
                                for f in (fortran, not fortran))
                raise ArgumentValueError(
                    f"parameter {name} changed from {was} to {now} after Adam was built "
                    "(p.resize_, p.set_ or p.data = ...); its optimizer state no longer fits: "
                    "give it back its shape, or build a new Adam for it")
            views[i] = view
        params = [views.get(i, p) for i, p in enumerate(self.params)]
        named = [(f"parameter {name}", *memory.byte_range(p))
                 for name, p in zip(self._names, params)]
        owned = {**self._written_buffers, **self._read_buffers}
        clash = memory.first_overlap(named + [(name, *memory.byte_range(buffer))
                                              for name, buffer in owned.items()])
        if clash:
            raise _shared_memory_error(*clash)
        self.params[:] = params
        for group in self._groups:
            group.rebind(views)
        self._written = self._written_memory()
        self._watch.accept()

    def _checked_grads(self, grads: Sequence[Any] | Container) -> list[np.ndarray]:
        if isinstance(grads, Container):
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
                grad = _as_parameter(name, grad, "gradient")
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
        """Copies of m and v, the step counter and the hyperparameters."""
        return {"step": self.step_count, "lr": self.lr, "beta1": self.beta1,
                "beta2": self.beta2, "epsilon": self.epsilon,
                "m": [m.copy() for m in self._m], "v": [v.copy() for v in self._v]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Every entry is checked before anything changes, and
        every error names the entry (``state_dict['m'][1]``)."""
        if not isinstance(state, Mapping):
            raise ArgumentTypeError(f"state_dict must be a mapping, got {type(state).__name__}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ArgumentValueError(f"state_dict lacks {missing}")
        step = _checked_step("state_dict['step']", state["step"])
        lr = validate.as_learning_rate("state_dict['lr']", state["lr"])
        hyper = [validate.as_hyperparameter(f"state_dict[{key!r}]", state[key], 0.0, high)
                 for key, high in (("beta1", 1.0), ("beta2", 1.0), ("epsilon", None))]
        sources = [self._checked_state_arrays(key, state[key]) for key in ("m", "v")]
        for target, source in zip(self._m + self._v, sources[0] + sources[1]):
            np.copyto(target, source, casting="same_kind")
        self.step_count, self.lr = step, lr
        self.beta1, self.beta2, self.epsilon = hyper

    def _checked_state_arrays(self, key: str, values: Any) -> list[np.ndarray]:
        count = len(self.params)
        if not isinstance(values, (list, tuple)) or len(values) != count:
            got = f"{len(values)} entries" if isinstance(values, (list, tuple)) else \
                type(values).__name__
            raise ArgumentValueError(f"state_dict[{key!r}] must be a list of {count} arrays, "
                                     f"one per parameter; got {got}")
        arrays = []
        for i, (param, value) in enumerate(zip(self.params, values)):
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
        """What pickle and deepcopy carry: parameters as the caller holds them, state, and
        hyperparameters; never kernels (looked up again by :meth:`__setstate__`)."""
        moved = self._watch.moved() if self._watch is not None else []
        if moved:
            self._follow(moved)  # a moved parameter is followed, or refused, before it is saved
        return {"params": self._structure if self._structure is not None else self._originals,
                "step": self.step_count, "lr": self.lr, "beta1": self.beta1,
                "beta2": self.beta2, "epsilon": self.epsilon,
                "m": list(self._m), "v": list(self._v), "grads": list(self._g)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._build(state["params"])
        self.step_count, self.lr = state["step"], state["lr"]
        self.beta1, self.beta2, self.epsilon = state["beta1"], state["beta2"], state["epsilon"]
        for targets, key in ((self._m, "m"), (self._v, "v"), (self._g, "grads")):
            for target, source in zip(targets, state[key]):
                target[...] = source

    def __repr__(self) -> str:
        sizes = sum(p.size for p in self.params)
        backends = ", ".join(group.describe() for group in self._groups)
        count = len(self.params)
        return (f"Adam({count} parameter{'s' if count != 1 else ''}, {sizes} elements, "
                f"lr={self.lr}, step={self.step_count}; {backends})")


def _checked_step(name: str, value: Any) -> int:
    """A step counter: a whole number >= 0 (``2.0`` is 2; ``2.7``, NaN and inf are errors,
    never truncated) small enough that ``float(step + 1)`` exists."""
    if isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} is a bool; expected a whole number >= 0")
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or value != math.floor(value):
            raise ArgumentValueError(f"{name} must be a whole number >= 0, got {value!r}")
        number = int(value)
    else:
        raise ArgumentTypeError(f"{name} is a {type(value).__name__}; expected a whole number "
                                ">= 0")
    if number < 0:
        raise ArgumentValueError(f"{name} must be a whole number >= 0, got {value!r}")
    if number + 1 > _LARGEST_STEP:  # the next step computes float(step + 1)
        raise ArgumentValueError(f"{name}={validate.shown(value)} is beyond the range of a "
                                 "float")
    return number
