"""Fresh output arrays for the functional API, recycled once the caller has dropped them.

Why: ``adam_update`` must return new arrays (Ivy's contract), and above glibc's mmap threshold
every new array is fresh pages: first-touching the three outputs of a 1e6-element update costs
several times the kernel itself (PERFORMANCE-NOTES). A training loop written functionally,
``w, m, v = adam_update(w, g, lr, m, v, t)``, drops the previous outputs one call later, so their
memory can serve the next call warm.

How: the outputs of one call are views into one pooled block. A block is reused only when no
array references it any more: every view (and every view of a view, and anything that holds an
array, such as a memoryview or a torch tensor from ``torch.from_numpy``) keeps it referenced, so a
reused block is one nobody can observe. Only blocks of at least :data:`MIN_BYTES` are pooled (small
arrays come from malloc's warm free lists anyway), and at most :data:`MAX_FREE_BLOCKS` unused
blocks are kept, so an abandoned pool costs at most a few blocks of the largest recent size.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from .forksafe import ForkSafeLock

MIN_BYTES = 1 << 20
MAX_FREE_BLOCKS = 2

_lock = ForkSafeLock()
_blocks: list[np.ndarray] = []


def _free_indices() -> list[int]:
    """Blocks no array references: only the pool's list holds them (getrefcount adds one)."""
    return [i for i in range(len(_blocks)) if sys.getrefcount(_blocks[i]) == 2]


def _take(nbytes: int) -> np.ndarray:
    """A 64-byte-aligned view of ``nbytes`` into a free block (or a new one).

    The pool holds the allocations themselves: NumPy points every view's ``base`` at the array
    that owns the memory, so the owner's reference count sees every view.
    """
    with _lock:
        for index in _free_indices():
            if _blocks[index].nbytes == nbytes + 64:
                return _aligned(_blocks[index], nbytes)
        _blocks.append(np.empty(nbytes + 64, np.uint8))
        free = _free_indices()[:-1]  # never the block just made (it is the last)
        for index in reversed(free[:max(0, len(free) - MAX_FREE_BLOCKS)]):
            del _blocks[index]
        return _aligned(_blocks[-1], nbytes)


def _aligned(raw: np.ndarray, nbytes: int) -> np.ndarray:
    offset = (-raw.ctypes.data) % 64
    return raw[offset:offset + nbytes]


def pooled(count: int, nbytes: int) -> bool:
    """Whether ``count`` outputs of ``nbytes`` each come from a pooled block (else malloc)."""
    return nbytes * count >= MIN_BYTES


def empty_outputs(count: int, shape: tuple[int, ...], dtype: np.dtype) -> list[np.ndarray]:
    """``count`` new C-contiguous arrays of ``shape`` and ``dtype``, from one (recycled) block."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    if not pooled(count, size):
        return [np.empty(shape, dtype) for _ in range(count)]
    aligned = -(-size // 64) * 64  # each output starts on a 64-byte boundary
    block = _take(aligned * count)
    return [block[i * aligned:i * aligned + size].view(dtype).reshape(shape)
            for i in range(count)]


def release() -> int:
    """Forget every unused block (returns how many); used ones stay with their arrays."""
    with _lock:
        free = _free_indices()
        for index in reversed(free):
            del _blocks[index]
        return len(free)
