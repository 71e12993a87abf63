"""The parameters of one group that share a dtype: their pointer tables and their state.

A bucket is where a step's speed comes from. It holds, per tensor of the rule, a table of
data pointers (NumPy ``uintp`` arrays cast to C once) and the state rows in owned flat buffers
(:mod:`adamgen.torch._layout`). Its :meth:`Bucket.step` is the hot path: it reads every
gradient (``p.grad`` may be a new tensor after each ``zero_grad()``), re-gathers gradient
pointers only when a gradient object changed, counts the steps, and makes one C call per
distinct step count (one call in every ordinary step).

In the common case (every parameter a plain contiguous tensor with state, every gradient a
contiguous tensor of its parameter's dtype and size) the step helper
(:mod:`adamgen.torch._native`) makes every check below, writes the gradient table and bumps the
version counters in one C++ call; anything else, or a process without the helper, takes the
Python path, which makes the same checks and raises the errors.

What it checks, and what that costs in Python (docs/torch.md has the measurements):

* gradients that are the same objects as at the previous step (``zero_grad(set_to_none=
  False)``, or repeated steps), at the same addresses: one identity comparison and one
  pointer read; nothing else about them can have changed unless a gradient was reshaped in
  place within its allocation (then the kernel reads memory that gradient still owns);
* new gradient objects: their pointers, element counts and layouts are read and checked
  against the parameters', and they must not overlap memory the step writes (torch's result
  would depend on the order of its in-place operations there: refused). A gradient whose
  strides differ from its parameter's is copied to the parameter's layout first;
* parameters without a gradient are skipped, as torch skips them (their step count does not
  move).

The parameters themselves are checked by the group (:mod:`adamgen.torch._plan`), before any
bucket writes.
"""

from __future__ import annotations

import array
import operator
import struct
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import _native
from ._kernels import RuleKernel, Tables
from ._layout import (
    DTYPE_NAMES,
    LOW_PRECISION,
    NUMPY_DTYPES,
    FlatBuffer,
    WrittenRanges,
    describe,
    is_dense,
    owned,
    rebind,
    span,
)

#: The state key of the float32 master copy of a bfloat16/float16 parameter (master-weight
#: modes): the master-weight spec's name for it (``master_<parameter>``, adamgen.mixed).
MASTER = "master_param"

_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_is_contiguous = torch.Tensor.is_contiguous
_is = operator.is_
_increment_version = torch._C._increment_version


class Bucket:
    """One (group, parameter dtype, step dtype) set of parameters, in group order.

    Args:
        params: the parameters (the objects the user holds).
        names: how errors name each one (``"parameter 3 of group 0"``).
        state_keys: the rule's state tensors, in torch's order (``exp_avg``, ...).
        step_dtype: the dtype of ``state["step"]`` (None: the rule counts no steps).
        mode: how bfloat16/float16 parameters are updated (``torch``: state in their dtype;
            ``master``/``stochastic``: float32 state and a float32 master copy, ``MASTER``).
        keys: each parameter's key in the random stream of stochastic rounding.

    The owner sets :attr:`written` (which gradients overlap memory a step writes) once it
    knows every bucket's memory.
    """

    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str],
                 state_keys: tuple[str, ...], step_dtype: torch.dtype | None,
                 mode: str = "torch", keys: Sequence[int] = ()) -> None:
        self.params = list(params)
        self.names = list(names)
        self.step_dtype = step_dtype
        self.count = len(self.params)
        self.dtype = self.params[0].dtype
        self.dtype_name = DTYPE_NAMES[self.dtype]
        self.mode = mode if self.dtype in LOW_PRECISION else "torch"
        #: master weights: float32 state, and a float32 copy of each parameter
        self.master = self.mode != "torch"
        self.state_keys = (*state_keys, MASTER) if self.master else state_keys
        self.state_dtype = torch.float32 if self.master else self.dtype
        self.keys = np.array(list(keys) or [0] * len(self.params), dtype=np.uint32)
        self.numels = [p.numel() for p in self.params]
        self.nbytes = [n * self.params[0].element_size() for n in self.numels]
        self.dense = [is_dense(p) for p in self.params]
        self.contiguous = all(p.is_contiguous() for p in self.params)
        #: aliases holding each parameter's storage: an unchanged pointer is live memory
        self.keep = [p.detach() for p in self.params]
        self.buffers = {key: FlatBuffer(self.params, self.state_dtype)
                        for key in self.state_keys}
        self.views: dict[str, list[torch.Tensor | None]] = {
            key: [None] * self.count for key in self.state_keys}
        # non-dense parameters are copied to a contiguous row around the call
        self.staged = [row for row, dense in enumerate(self.dense) if not dense]
        self.scratch = FlatBuffer(self.params, self.dtype) if self.staged else None
        self.has_state = [False] * self.count
        self.all_have_state = False
        if step_dtype is not None:
            self.steps = owned(np.zeros(self.count, NUMPY_DTYPES[step_dtype]))
            steps = torch.from_numpy(self.steps)
            self.step_views = [steps[row] for row in range(self.count)]
            self._step_bytes = self.steps.data.cast("B")
            # struct rounds a double to float32 to nearest even, as torch's float32 add does
            self._step_pack = struct.Struct("<f" if self.steps.itemsize == 4 else "<d")
        # pointer tables, in the rule's tensor order: param, grad, then the state keys
        self.pointers = {name: np.zeros(self.count, np.uintp)
                         for name in ("param", "grad", *self.state_keys)}
        for key, buffer in self.buffers.items():
            self.pointers[key][:] = [buffer.pointer(row) for row in range(self.count)]
        self.sizes = np.array(self.numels, dtype=np.int64)
        self._grad_table = self.pointers["grad"].data
        self.bind_params(range(self.count))
        self._tables: dict[RuleKernel, Tables] = {}
        #: last step's gradients, held only while they persist from step to step (see
        #: :meth:`_hold`): a check of their identity then replaces every other check
        self._grads: list[Any] | None = None
        self._first: Any = None  # a weak reference to the first gradient seen
        #: the gradients that are not None, and their data pointers when last checked
        self._live: list[Any] = []
        self._live_pointers: list[int] = []
        self._rows: list[int] | None = None  # rows with a gradient (None: all of them)
        self._grad_copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._plain = False
        self.seed = 0
        #: every byte a step writes, the group's parameters included (the owner sets it)
        self.writes = WrittenRanges([])
        helper = _native.helper()
        plain_tensors = all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in self.params)
        #: the step helper's all-or-nothing gradient check (None: the Python path serves)
        self._native = helper.take_grads if helper is not None and self.contiguous and \
            plain_tensors and not self.staged else None
        self._grad_address = self.pointers["grad"].ctypes.data
        self._numel_address = self.sizes.ctypes.data
        #: the step counts as the helper advances them: (address, bytes per count; 0: none)
        self._counts = (self.steps.ctypes.data, self.steps.itemsize) \
            if step_dtype is not None else (0, 0)

    # -- binding ---------------------------------------------------------------------------------
    def bind_params(self, rows: Sequence[int] | range) -> None:
        """(Re-)read the pointers of these parameters: their own memory, or their scratch row."""
        for row in rows:
            param = self.params[row]
            self.keep[row] = param.detach()
            if self.scratch is not None and not self.dense[row]:
                self.pointers["param"][row] = self.scratch.pointer(row)
            else:
                self.pointers["param"][row] = param.data_ptr()
        self.release()  # gradients are checked again, against the new memory

    def release(self) -> None:
        """Forget the gradients held since the last step (``zero_grad`` calls this: a gradient
        set to None must be freed before the next backward allocates its successor, and
        freeing 78 of them inside the next step cost it 40 us)."""
        self._grads = self._first = None
        self._live = []

    def written_ranges(self) -> list[tuple[int, int]]:
        """The bytes a step writes: the owned buffers (parameters are the group's to report)."""
        found = [(b.address, b.address + b.nbytes) for b in self.buffers.values()]
        if self.scratch is not None:
            found.append((self.scratch.address, self.scratch.address + self.scratch.nbytes))
        return found

    def tables(self, kernel: RuleKernel, rows: Sequence[int] | None = None) -> Tables:
        """The full tables for ``kernel`` (cast once, memoised), or a copy of some rows."""
        if rows is None:
            found = self._tables.get(kernel)
            if found is None:
                arrays = [self.pointers[name] for name in kernel.tensors]
                found = self._tables[kernel] = kernel.tables(arrays, self.sizes, self.keys)
            return found
        index = np.asarray(rows, dtype=np.intp)
        return kernel.tables([self.pointers[name][index] for name in kernel.tensors],
                             self.sizes[index], self.keys[index])

    # -- state -----------------------------------------------------------------------------------
    def state_row(self, row: int, key: str) -> torch.Tensor:
        view = self.views[key][row]
        if view is None:
            view = self.views[key][row] = self.buffers[key].row(row, self.params[row])
        return view

    def init_state(self, row: int, state: dict[Any, Any]) -> None:
        """torch's lazy initialisation: a zero step count and zero state, in torch's key order
        (the master copy, last, starts as the parameter, widened exactly)."""
        with torch.no_grad():
            if self.step_dtype is not None:
                self.steps[row] = 0
                state["step"] = self.step_views[row]
            for key in self.state_keys:
                view = self.state_row(row, key)
                if key == MASTER:
                    view.copy_(self.params[row])
                else:
                    view.zero_()
                state[key] = view
        self.has_state[row] = True

    def adopt(self, row: int, state: dict[Any, Any] | None) -> None:
        """Take over a parameter's state as found in ``optimizer.state``: tensors placed there
        by someone else (``load_state_dict``, ZeroRedundancyOptimizer, a user) are copied into
        this bucket's rows, which then replace them in the dict; the placed tensors themselves
        become views of those rows where they can (:func:`~._layout.rebind`)."""
        if not state:
            self.has_state[row] = False
            return
        param, name = self.params[row], self.names[row]
        for key in ("step", *self.state_keys) if self.step_dtype is not None else self.state_keys:
            if key not in state:
                raise KeyError(f"{key!r}: the state of {name} has {sorted(map(str, state))} but "
                               f"no {key!r} (torch.optim would fail the same way at its step)")
        for key in self.state_keys:  # every check before any write
            value = state[key]
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                raise RuntimeError(
                    f"state[{key!r}] of {name} is {describe(value)}; it must be a tensor of "
                    f"the parameter's shape {tuple(param.shape)}")
        count = None
        if self.step_dtype is not None and state["step"] is not self.step_views[row]:
            count = _step_value(state["step"], name)
        with torch.no_grad():
            if count is not None:
                placed = state["step"]
                self.steps[row] = count
                state["step"] = self.step_views[row]
                rebind(placed, self.step_views[row])
            for key in self.state_keys:
                value, view = state[key], self.state_row(row, key)
                if value is not view:
                    view.copy_(value)
                    state[key] = view
                    rebind(value, view)  # whoever else holds it sees the live state
        self.has_state[row] = True

    def settle(self) -> None:
        self.all_have_state = all(self.has_state)
        self._refresh()

    def _refresh(self) -> None:
        """Whether a step may take the short path: every row has a gradient and state, no
        gradient is copied, no parameter staged, the rule counts steps."""
        self._plain = (self.all_have_state and self._rows is None and not self._grad_copies
                       and not self.staged and self.step_dtype is not None)

    # -- the step --------------------------------------------------------------------------------
    def step(self, kernel: RuleKernel, hyper: tuple[Any, ...], state: Any, seed: int = 0) -> None:
        """One step of every parameter with a gradient (see the module docstring); ``seed``:
        the random stream's, for a kernel that rounds stochastically."""
        self.seed = seed
        native = self._native
        taken = native is not None and self.all_have_state and native(
            self.params, self._grad_address, self._numel_address, *self.writes.addresses,
            *self._counts)
        if taken is not False:
            # every row has a checked gradient in the table, versions bumped (and, a float,
            # every step count advanced to it): the usual step
            if self._rows is not None or self._grad_copies:
                self._rows, self._grad_copies = None, []
                self._refresh()
            if self._grads is not None or self._live:
                self.release()  # the Python path's memo no longer describes the table
            if type(taken) is float:
                self._call(kernel, hyper, None, taken)
            else:
                self._run(kernel, hyper, None)
            return
        grads = [param.grad for param in self.params]
        held = self._grads
        if held is None or not all(map(_is, grads, held)) or \
                list(map(_data_ptr, self._live)) != self._live_pointers:
            self._take_grads(grads)
        if self._plain:  # every row, all with state, nothing to copy: the usual step
            _increment_version(self.params)  # see below
            self._run_counted(kernel, hyper, None)
            return
        rows = self._rows
        if rows is not None and not rows:
            return
        if not self.all_have_state:
            for row in range(self.count) if rows is None else rows:
                if not self.has_state[row]:
                    self.init_state(row, state[self.params[row]])
            self.settle()
        for staging, grad in self._grad_copies:
            staging.copy_(grad)
        # Tell autograd the parameters change, as torch's in-place ops do. Before the call,
        # not after: their metadata is still in cache from the reads above (after the kernel
        # has streamed every tensor through the caches, the same bump measured 110 us slower
        # at 500 tensors), and a saved-tensor check only compares versions at backward time.
        _increment_version(self.params if rows is None else [self.params[r] for r in rows])
        if self.staged:
            self._stage_in(rows)
        self._run(kernel, hyper, rows)
        if self.staged:
            self._stage_out(rows)

    def _run(self, kernel: RuleKernel, hyper: tuple[Any, ...], rows: list[int] | None) -> None:
        """The kernel call(s) for these rows (None: all), once their gradients are checked."""
        if self.step_dtype is None:
            self._call(kernel, hyper, rows)
        else:
            self._run_counted(kernel, hyper, rows)

    def _call(self, kernel: RuleKernel, hyper: tuple[Any, ...], rows: list[int] | None,
              count: float | None = None) -> None:
        """One kernel call over these rows (None: all), at step ``count`` when the rule counts
        steps."""
        scalars = kernel.prelude(*hyper) if count is None else kernel.prelude(*hyper, count)
        kernel.run(self.tables(kernel, rows), scalars,
                   (self.seed, int(count or 0)) if kernel.random else None)

    def _run_counted(self, kernel: RuleKernel, hyper: tuple[Any, ...],
                     rows: list[int] | None) -> None:
        """torch's ``step_t += 1`` (in the step tensor's dtype), then one call per distinct
        count: every parameter's bias correction uses its own count."""
        steps = self.steps
        if rows is None:
            # All at one count (the usual case), seen and advanced on the raw bytes: two
            # C-level byte operations instead of NumPy calls, which cost about 10 us each
            # right after a backward pass has evicted NumPy's code from the caches.
            raw, pack = self._step_bytes, self._step_pack
            current = raw.tobytes() if self.count > 1 else b""
            if not current or current == current[:pack.size] * self.count:
                # torch's += 1, rounded to the step's dtype
                count = pack.unpack(pack.pack(pack.unpack_from(raw)[0] + 1.0))[0]
                raw[:] = pack.pack(count) * self.count
                self._call(kernel, hyper, None, count)
                return
            rows = list(range(self.count))
            np.add(steps, 1, out=steps)
        else:
            steps[rows] += 1
        values = steps[rows]
        for value in np.unique(values).tolist():
            self._call(kernel, hyper, [row for row, v in zip(rows, values.tolist()) if v == value],
                       value)

    def _take_grads(self, grads: list[Any]) -> None:
        """Check new gradient objects and put their pointers in the table."""
        rows, live, numels = None, grads, self.numels
        try:  # every parameter has a gradient: the usual case, one pass
            pointers = list(map(_data_ptr, grads))
        except TypeError:  # a None: the parameters without a gradient are skipped
            rows = [row for row, grad in enumerate(grads) if grad is not None]
            live, numels = [grads[row] for row in rows], [self.numels[row] for row in rows]
            pointers = None
        except RuntimeError:  # a sparse gradient has no data pointer: _grad_problem says so
            raise _grad_problem(self, grads) from None
        if pointers is None:
            try:
                pointers = list(map(_data_ptr, live))
            except RuntimeError:
                raise _grad_problem(self, grads) from None
        if list(map(_numel, live)) != numels:
            raise _grad_problem(self, grads)
        self._live, self._live_pointers = live, list(pointers)
        nbytes = self.nbytes if rows is None else [self.nbytes[row] for row in rows]
        copies, staged = [], {}
        if not self.contiguous or not all(map(_is_contiguous, live)):
            nbytes = list(nbytes)
            for position, row in enumerate(range(self.count) if rows is None else rows):
                grad, param = grads[row], self.params[row]
                expected = param.stride() if self.dense[row] else None
                if (grad.is_contiguous() if expected is None else grad.stride() == expected):
                    continue
                staging = (torch.empty_strided(param.shape, param.stride(), dtype=self.dtype)
                           if self.dense[row] else torch.empty(param.shape, dtype=self.dtype))
                copies.append((staging, grad))
                staged[position] = staging.data_ptr()
                start, end = span(grad)  # checked where it lies, read from its copy
                pointers[position], nbytes[position] = start, end - start
        overlaps = self.writes.overlapping(pointers, nbytes)
        for position, pointer in staged.items():
            pointers[position] = pointer
        if overlaps:
            row = overlaps[0] if rows is None else rows[overlaps[0]]
            raise ValueError(
                f"the gradient of {self.names[row]} shares memory with a parameter or state "
                "tensor this step writes; torch.optim's result would depend on the order of its "
                "in-place operations, so adamgen refuses: assign a gradient with its own memory")
        if rows is None:  # a memcpy from a C array: half of NumPy's list conversion
            self._grad_table[:] = array.array(self._grad_table.format, pointers)
        else:
            self.pointers["grad"][rows] = pointers
        self._rows, self._grad_copies = rows, copies
        self._refresh()
        self._hold(grads)

    def _hold(self, grads: list[Any]) -> None:
        """Hold these gradients for the next step's identity check only if the first one
        survived from the previous step: with ``zero_grad(set_to_none=True)`` every gradient
        is new at every step, and holding the old ones would keep two sets alive during
        backward."""
        first = grads[0]
        survived = first is not None and self._first is not None and self._first() is first
        self._grads = grads if survived else None
        self._first = weakref.ref(first) if first is not None else None

    def _stage_in(self, rows: list[int] | None) -> None:
        assert self.scratch is not None
        with torch.no_grad():
            for row in self.staged:
                if rows is None or row in rows:
                    self.scratch.row(row, self.params[row]).copy_(self.params[row])

    def _stage_out(self, rows: list[int] | None) -> None:
        assert self.scratch is not None
        with torch.no_grad():
            for row in self.staged:
                if rows is None or row in rows:
                    self.params[row].copy_(self.scratch.row(row, self.params[row]))


def _step_value(step: Any, name: str) -> float:
    """``state["step"]`` as a number (a 0-d tensor, or a number from an old checkpoint)."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            raise RuntimeError(f"state['step'] of {name} is {describe(step)}; expected a "
                               "0-d tensor")
        return float(step.item())
    if isinstance(step, (int, float)) and not isinstance(step, bool):
        return float(step)
    raise TypeError(f"state['step'] of {name} is a {type(step).__name__}; expected a 0-d "
                    "tensor or a number")


def _grad_problem(bucket: Bucket, grads: list[Any]) -> Exception:
    """The error for gradients the kernel cannot read: torch's for sparse ones."""
    for row, grad in enumerate(grads):
        if grad is None:
            continue
        if grad.is_sparse or grad.layout != torch.strided:
            return RuntimeError("Adam does not support sparse gradients, please consider "
                                "SparseAdam instead" if bucket.step_dtype is not None else
                                f"the gradient of {bucket.names[row]} is sparse "
                                f"({grad.layout}); this optimizer needs dense gradients")
        param = bucket.params[row]
        if grad.shape != param.shape or grad.dtype != param.dtype:
            return RuntimeError(f"the gradient of {bucket.names[row]} has {describe(grad)}, "
                                f"but the parameter has {describe(param)}")
    return RuntimeError("a gradient cannot be read (no data pointer)")
