"""Following torch tensors that move: the cheap per-step check behind ``Adam`` (D1, D10).

A multi-tensor step writes through pointers gathered once. A torch tensor can leave them behind:
``p.resize_()`` reallocates its storage and frees the old block (a step through the old pointer
writes freed memory: heap corruption), ``p.data = t`` and ``p.set_(...)`` rebind it (a step
through the old pointer updates storage the parameter no longer uses: it never trains),
``p.untyped_storage().resize_(0)`` (FSDP) frees it, and ZeroRedundancyOptimizer rebinds ``.data``
to bucket views after the optimizer is built. ``torch.optim`` re-reads each parameter every
step, so it follows all of these; a pointer table must check before it writes.

:class:`StorageWatch` is that check. Each step it reads every watched tensor's data pointer and
element count, two C-level ``map`` passes compared as lists, and reports the positions that
changed; the owner then re-reads those tensors in full (dtype, layout, storage size) and
re-gathers their pointers, or refuses with an error naming the tensor. Why these two numbers:

* every event that frees or rebinds memory changes the data pointer (measured on torch 2.13:
  ``resize_`` to a larger size, ``set_``, ``.data =``, a storage ``resize_``), while the owner
  keeps the original storage object alive through its NumPy view, so memory whose pointer did
  not change is still allocated;
* ``resize_`` to a smaller size, and ``.data =`` a shorter view of the same memory, keep the
  pointer: the element count catches them.

What it does not catch, by design: metadata changes that keep the pointer and the element count
(``t_()``, ``unsqueeze_()``, ``.data = p.data.view(...)``). Those never move memory out from under
the pointers; a step updates the same elements. One case is out of reach of any cheap check: the
old block freed, then a tensor with the same element count but overlapping strides (``expand``)
placed at exactly the old address and assigned with ``.data =`` before the next step.

Measured cost (torch 2.13 on the 2-core development VM; medians of ``timeit`` and of interleaved
steps, over ``torch.zeros(4096)`` tensors, owned gradients):

* :meth:`StorageWatch.moved` when nothing moved, metadata in cache: 0.5 us for 1 tensor, 64 us
  for 500 (two reads of about 0.06 us per tensor; a Python loop reading only ``data_ptr()``
  takes 32 us, one reading ``data_ptr(), shape, stride()`` 130 us);
* :meth:`StorageWatch.bump_versions`: 0.3 us for 1 tensor, 23 us for 500;
* in a real step both together cost 1.1 us at 1 tensor (2.6 -> 3.7 us) and 110-270 us at 500
  tensors of 4096 float32 (about 1.25 ms -> 1.4 ms): the kernel streams 57 MB through the
  caches between two steps, so every tensor's metadata is a cache miss again.

torch is never imported here: a tensor is recognised through ``sys.modules``, so ``import
adamgen`` does not load torch, and nothing torch-specific runs for NumPy arrays.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any


def torch_of(value: Any) -> ModuleType | None:
    """The torch module when ``value`` is a torch tensor, else None (never imports torch: a
    tensor cannot exist unless torch is already in ``sys.modules``)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return torch
    return None


def storage_problem(tensor: Any) -> str | None:
    """Why ``tensor``'s elements are not all inside its storage (a storage resized to fewer
    bytes, as FSDP's ``untyped_storage().resize_(0)`` does), or None when they are."""
    needed = (tensor.storage_offset() + tensor.numel()) * tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    if tensor.numel() and held < needed:
        return (f"its storage holds {held} bytes but its {tensor.numel()} elements need "
                f"{needed} (was the storage resized, e.g. untyped_storage().resize_(0)?)")
    return None


class StorageWatch:
    """Which of a fixed list of torch tensors moved since their pointers were gathered.

    Args:
        tensors: torch tensors (parameters as the user holds them: the objects ``.data =``,
            ``resize_`` and ``set_`` act on, not detached views of them).
    """

    def __init__(self, tensors: Sequence[Any]) -> None:
        self.tensors = tuple(tensors)
        torch = torch_of(self.tensors[0]) if self.tensors else None
        if torch is None:
            raise TypeError("StorageWatch watches torch tensors")
        self._data_ptr = torch.Tensor.data_ptr
        self._numel = torch.Tensor.numel
        self._increment_version = torch.autograd.graph.increment_version
        self._pointers: list[int] = []
        self._sizes: list[int] = []
        self.accept()

    def accept(self) -> None:
        """Record where every tensor is now: the owner has gathered these pointers."""
        self._pointers = list(map(self._data_ptr, self.tensors))
        self._sizes = list(map(self._numel, self.tensors))

    def moved(self) -> list[int]:
        """Positions of the tensors whose data pointer or element count changed (see the
        module docstring for the cost: about 0.11 us per tensor when nothing moved)."""
        pointers = list(map(self._data_ptr, self.tensors))
        sizes = list(map(self._numel, self.tensors))
        if pointers == self._pointers and sizes == self._sizes:
            return []
        return [i for i, (p, s, p0, s0) in
                enumerate(zip(pointers, sizes, self._pointers, self._sizes))
                if p != p0 or s != s0]

    def bump_versions(self) -> None:
        """Tell autograd the tensors were modified in place, as torch's in-place ops do, so a
        backward pass through a graph that saved one raises instead of using the new values."""
        self._increment_version(self.tensors)
