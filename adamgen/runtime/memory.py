"""Where arrays live: byte ranges, "do these share memory?", and "does this read what we write?".

Two optimizer rules rest on this (docs/reliability.md, D2 and D9):

* parameters must not share memory: a multi-tensor kernel updating ``[q, q]`` would race
  (threaded C) or update ``q`` twice (serial C, NumPy). :func:`first_overlap` finds such a pair
  among hundreds of parameters in O(n log n) by sorting byte ranges, where ``np.shares_memory``
  on every pair would be O(n^2);
* a gradient must not overlap memory the step writes (parameters, ``m``, ``v``): each variant
  reads it at a different moment relative to those writes, so the bits would depend on the
  loader's pick. :class:`WrittenMemory` answers that for a whole pointer table, from addresses
  the C path has already gathered: about 1 us for 1 gradient (a bisect), 14 us for 500
  (vectorised NumPy), measured on the development VM.

Every array here is contiguous (the optimizer checks it, or copies gradients to its parameters'
layout), so its bytes are exactly ``[address, address + nbytes)``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

#: Below this many gradients a Python loop over ``bisect`` beats NumPy's fixed per-call costs.
_VECTORISE_FROM = 16


def address(array: np.ndarray) -> int:
    """The address of ``array``'s first byte (about 1 us: use where it is not per step)."""
    return int(array.__array_interface__["data"][0])


def byte_range(array: np.ndarray) -> tuple[int, int]:
    """``[start, end)`` of a contiguous array's bytes."""
    start = address(array)
    return start, start + array.nbytes


def first_overlap(named: Sequence[tuple[str, int, int]]) -> tuple[str, str] | None:
    """The names of two ranges that share a byte, in the order given, or None; ``named`` holds
    ``(name, start, end)``. Empty ranges hold no memory and overlap nothing."""
    ranges = sorted((start, end, i) for i, (_, start, end) in enumerate(named) if end > start)
    reach, owner = -1, -1  # the furthest end seen so far, and whose it is
    for start, end, i in ranges:
        if start < reach:
            first, second = sorted((owner, i))
            return named[first][0], named[second][0]
        if end > reach:
            reach, owner = end, i
    return None


class WrittenMemory:
    """The byte ranges one optimizer step writes, sorted, for overlap queries.

    Built when the optimizer is built and whenever a parameter moves; the ranges are disjoint
    (the optimizer refuses parameters that share memory, and owns ``m`` and ``v``).
    """

    def __init__(self, ranges: Sequence[tuple[int, int]]) -> None:
        ordered = sorted((start, end) for start, end in ranges if end > start)
        self.starts = np.array([start for start, _ in ordered], dtype=np.uint64)
        self.ends = np.array([end for _, end in ordered], dtype=np.uint64)
        self._starts = self.starts.tolist()
        self._ends = self.ends.tolist()

    def overlapping(self, starts: Sequence[int], nbytes: Sequence[int]) -> list[int]:
        """Positions ``i`` whose range ``[starts[i], starts[i] + nbytes[i])`` shares a byte
        with a written range. ``starts`` may be any sequence of addresses (a memoryview of a
        pointer table included); ``nbytes`` as :func:`sizes` made it.

        Written ranges are disjoint and sorted, so the only candidate for ``[s, e)`` is the last
        written range that starts before ``e``: it overlaps iff it ends after ``s``.
        """
        if len(starts) < _VECTORISE_FROM:
            hits = []
            for i, (start, size) in enumerate(zip(starts, nbytes)):
                j = bisect.bisect_left(self._starts, start + size) - 1
                if size and j >= 0 and self._ends[j] > start:
                    hits.append(i)
            return hits
        begin = np.asarray(starts, dtype=np.uint64)
        length = np.asarray(nbytes, dtype=np.uint64)
        last = np.searchsorted(self.starts, begin + length, side="left").astype(np.int64) - 1
        candidate = self.ends[np.maximum(last, 0)]
        hit = (last >= 0) & (candidate > begin) & (length > 0)
        return np.flatnonzero(hit).tolist()


def sizes(nbytes: Sequence[int]) -> Sequence[int]:
    """``nbytes`` in the form :meth:`WrittenMemory.overlapping` reads fastest for its length:
    a list for a few ranges (a Python loop), a uint64 array for many (NumPy)."""
    if len(nbytes) < _VECTORISE_FROM:
        return [int(n) for n in nbytes]
    return np.asarray(nbytes, dtype=np.uint64)  # type: ignore[return-value]
