"""``adamgen.runtime.memory``: shared-memory detection (D2) and the written-memory index (D9)."""

from __future__ import annotations

import numpy as np
import pytest

from adamgen.runtime import memory


def test_byte_range_is_the_arrays_bytes():
    buffer = np.zeros(10, np.float64)
    start, end = memory.byte_range(buffer[2:5])
    assert (start, end) == (buffer.ctypes.data + 16, buffer.ctypes.data + 40)


def test_first_overlap_names_the_pair_and_ignores_touching_and_empty_ranges():
    assert memory.first_overlap([("a", 0, 10), ("b", 10, 20), ("c", 30, 40)]) is None
    assert memory.first_overlap([("a", 0, 10), ("empty", 5, 5)]) is None
    assert memory.first_overlap([("c", 30, 40), ("a", 0, 10), ("b", 35, 36)]) == ("c", "b")
    assert memory.first_overlap([("b", 35, 36), ("a", 0, 10), ("c", 30, 40)]) == ("b", "c")
    assert memory.first_overlap([("x", 0, 10), ("y", 0, 4)]) == ("x", "y")
    # a long range covering a later one that starts after its neighbour ended
    assert memory.first_overlap([("long", 0, 100), ("mid", 10, 20), ("late", 50, 60)]) == \
        ("long", "mid")
    assert memory.first_overlap([("long", 0, 100), ("late", 50, 60)]) == ("long", "late")


@pytest.mark.parametrize("count", [3, 40], ids=["bisect", "vectorised"])
def test_written_memory_finds_exactly_the_overlapping_ranges(count):
    """Both code paths (a Python loop for few gradients, NumPy for many) agree with a brute
    force check on random ranges, including empty and touching ones."""
    rng = np.random.default_rng(count)
    written = [(100 * k, 100 * k + 60) for k in range(0, 20, 2)]  # disjoint, unsorted below
    index = memory.WrittenMemory(written[::-1])
    for _ in range(50):
        starts = rng.integers(0, 2100, count).astype(np.uint64)
        sizes = rng.integers(0, 120, count).astype(np.uint64)
        sizes[rng.integers(0, count)] = 0
        expected = [i for i, (s, n) in enumerate(zip(starts.tolist(), sizes.tolist()))
                    if n and any(s < e and w < s + n for w, e in written)]
        assert index.overlapping(starts.tolist(), memory.sizes(sizes.tolist())) == expected
        assert index.overlapping(memoryview(starts), memory.sizes(sizes)) == expected


def test_touching_ranges_do_not_overlap():
    index = memory.WrittenMemory([(100, 200)])
    assert index.overlapping([60, 200, 99, 199], memory.sizes([40, 8, 2, 1])) == [2, 3]
