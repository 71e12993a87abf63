"""Memory layout of torch tensors, and the optimizer-owned buffers state lives in.

A kernel walks memory linearly. A *dense* tensor (non-overlapping, no gaps: contiguous, a
transposed weight, channels-last) occupies exactly ``numel`` elements from its data pointer, in
an order its state tensors share when they have its strides (torch's
``zeros_like(p, memory_format=torch.preserve_format)`` gives them those strides). A non-dense
parameter (a strided view made a leaf) is copied to a contiguous scratch row and back around
the kernel call: the arithmetic of every element is independent of its position, so the bits
are the same.

State lives in flat buffers the optimizer allocates with NumPy, 64-byte aligned (the serial
kernel measured 0-18 % faster on aligned rows), and hands to torch with ``torch.from_numpy``.
Why NumPy owns them: torch cannot resize a storage it did not allocate, so no
``resize_``/``untyped_storage().resize_`` on a state tensor can free memory a pointer table
still points at; ``set_`` or ``.data =`` on one only detaches that tensor from the buffer.
"""

from __future__ import annotations

import bisect
import contextlib
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ALIGNMENT = 64
#: How NumPy holds each dtype's elements (bfloat16: its bits, as NumPy has no bfloat16).
NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {torch.float32: np.dtype(np.float32),
                                             torch.float64: np.dtype(np.float64),
                                             torch.bfloat16: np.dtype(np.uint16),
                                             torch.float16: np.dtype(np.float16)}
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64",
               torch.bfloat16: "bfloat16", torch.float16: "float16"}
#: Parameter dtypes whose arithmetic is a mixed-precision mode's (see adamgen.torch.Adam).
LOW_PRECISION = frozenset({torch.bfloat16, torch.float16})


#: The arrays adamgen's optimizers own now (state buffers, step counts), by address: a tensor
#: whose storage starts at one of them is some optimizer's live state (see :func:`rebind`).
_OWNED: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


def owned(array: np.ndarray) -> np.ndarray:
    """``array``, registered as optimizer-owned memory (see :func:`rebind`)."""
    _OWNED[int(array.ctypes.data)] = array
    return array


def rebind(placed: Any, row: torch.Tensor) -> None:
    """Make a state tensor someone placed in ``optimizer.state`` a view of the owned row it was
    just copied into (call under ``torch.no_grad()``).

    torch's optimizers update a placed tensor in place, so whoever else holds it sees the live
    state and no memory is held twice. ZeroRedundancyOptimizer counts on that: its
    ``load_state_dict`` places the checkpoint's tensors in ``optim.state`` and also keeps them
    in its own ``state`` (torch's ``Optimizer.load_state_dict`` on the wrapper). Copied and
    left alone, they would keep each rank's shard in memory twice, as much as one unsharded
    process holds. Rebound, they show the live state, and their old storage goes with its last
    other reference.

    Left alone (copied only): tensors of another dtype, shape or device, tensors that require
    grad, tensors torch will not rebind, and tensors in memory an adamgen optimizer owns
    (another optimizer's live state, as after ``b.load_state_dict(a.state_dict())`` in one
    process: rebinding them would make ``a``'s state dict show ``b``'s values).
    """
    if (not isinstance(placed, torch.Tensor) or placed is row or placed.dtype != row.dtype or
            placed.shape != row.shape or placed.device != row.device or placed.requires_grad or
            placed.untyped_storage().data_ptr() in _OWNED):
        return
    with contextlib.suppress(RuntimeError):
        placed.set_(row.untyped_storage(), row.storage_offset(), row.shape, row.stride())


def is_dense(tensor: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill ``numel`` consecutive slots from its data
    pointer (strides a permutation of a contiguous tensor's; size-1 dimensions ignored)."""
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride())
                  if size != 1)
    expected = 1
    for stride, size in dims:
        if size == 0:
            return True
        if stride != expected:
            return False
        expected *= size
    return True


def span(tensor: torch.Tensor) -> tuple[int, int]:
    """``[start, end)`` of the bytes ``tensor`` can touch (exact for dense tensors; for others,
    from the first to the last element, which may include gaps)."""
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return start, start + (last + 1) * tensor.element_size()


def aligned_zeros(count: int, dtype: np.dtype) -> np.ndarray:
    """``count`` zeros whose first element sits on a 64-byte boundary (``np.zeros`` maps
    zero pages lazily, so unused rows cost no memory)."""
    raw = np.zeros(count * dtype.itemsize + ALIGNMENT, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT
    return raw[start:start + count * dtype.itemsize].view(dtype)


class FlatBuffer:
    """One flat, owned, aligned buffer of rows, each shaped like a parameter.

    Args:
        like: the parameters, one row each; dense ones get their strides, others are
            contiguous.
        dtype: the buffer's torch dtype.
    """

    def __init__(self, like: list[torch.Tensor], dtype: torch.dtype) -> None:
        self.offsets = [0] * len(like)
        total = 0
        for row, tensor in enumerate(like):
            self.offsets[row] = total
            total += tensor.numel()
        self.array = owned(aligned_zeros(max(total, 1), NUMPY_DTYPES[dtype]))
        self.tensor = torch.from_numpy(self.array).view(dtype)
        self.address = int(self.array.ctypes.data)
        self.itemsize = self.array.dtype.itemsize
        self.nbytes = total * self.itemsize

    def row(self, row: int, like: torch.Tensor) -> torch.Tensor:
        """Row ``row`` as a tensor of ``like``'s shape (and strides when ``like`` is dense)."""
        offset = self.offsets[row]
        if is_dense(like):
            return self.tensor.as_strided(like.shape, like.stride(), offset)
        return self.tensor[offset:offset + like.numel()].view(like.shape)

    def pointer(self, row: int) -> int:
        return self.address + self.offsets[row] * self.itemsize


def describe(tensor: Any) -> str:
    """``shape (…), dtype …, strides (…)`` for error messages."""
    if not isinstance(tensor, torch.Tensor):
        return f"a {type(tensor).__name__}"
    return (f"shape {tuple(tensor.shape)}, dtype {str(tensor.dtype).removeprefix('torch.')}, "
            f"strides {tuple(tensor.stride()) if tensor.layout == torch.strided else '-'}")


class WrittenRanges:
    """The bytes one step writes (parameters, owned buffers), sorted, for the question "which
    of these gradients overlap them?".

    The ranges are disjoint (parameters sharing memory are refused, owned buffers are separate
    allocations), so for a query ``[s, e)`` only the last range starting before ``e`` can
    overlap it, and does iff it ends after ``s``. Measured right after a backward pass (cold
    caches, 26 gradients), the runtime's ``WrittenMemory``, vectorised from 16 queries on,
    took 106 us; this one, a ``bisect`` loop below :data:`VECTORISE_FROM` queries and four
    NumPy calls above, about a tenth.
    """

    VECTORISE_FROM = 128

    def __init__(self, ranges: Sequence[tuple[int, int]]) -> None:
        ordered = sorted((start, end) for start, end in ranges if end > start)
        self.starts = [start for start, _ in ordered]
        self.ends = [end for _, end in ordered]
        self._starts = np.array(self.starts, dtype=np.uint64)
        self._ends = np.array([0, *self.ends], dtype=np.uint64)  # [0]: "no range before"
        #: (starts, ends, count) as the step helper takes them: addresses of uint64 arrays
        self.addresses = (self._starts.ctypes.data, self._ends.ctypes.data + 8, len(self.starts))

    def overlapping(self, starts: Sequence[int], nbytes: Sequence[int]) -> list[int]:
        """Positions ``i`` whose ``[starts[i], starts[i] + nbytes[i])`` overlaps a range
        (empty queries overlap nothing)."""
        if not self.starts:
            return []
        if len(starts) < self.VECTORISE_FROM:
            ends, hits = self.ends, []
            for i, (start, size) in enumerate(zip(starts, nbytes)):
                j = bisect.bisect_left(self.starts, start + size)
                if size and j and ends[j - 1] > start:
                    hits.append(i)
            return hits
        begin = np.array(starts, dtype=np.uint64)
        before = np.searchsorted(self._starts, begin + np.array(nbytes, dtype=np.uint64))
        hit = self._ends[before] > begin
        if not hit.any():
            return []
        return [i for i in np.flatnonzero(hit).tolist() if nbytes[i]]
