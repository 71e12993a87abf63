"""Recycled output blocks: reused only when nothing can observe them."""

from __future__ import annotations

import numpy as np

import adamgen
from adamgen.runtime import outputs

N = 1 << 20  # large enough to be pooled


def test_outputs_are_aligned_distinct_and_writable():
    a, b, c = outputs.empty_outputs(3, (N,), np.float32)
    assert all(x.ctypes.data % 64 == 0 and x.flags.c_contiguous and x.flags.writeable
               for x in (a, b, c))
    assert not np.shares_memory(a, b) and not np.shares_memory(b, c)


def test_a_block_is_reused_only_after_every_view_is_gone():
    outputs.release()
    first = outputs.empty_outputs(3, (N,), np.float32)
    address = first[0].ctypes.data
    second = outputs.empty_outputs(3, (N,), np.float32)
    assert second[0].ctypes.data != address  # first is alive
    kept = first[2][5:9]  # a view of a view keeps the whole block
    del first
    third = outputs.empty_outputs(3, (N,), np.float32)
    assert third[0].ctypes.data != address
    del kept
    fourth = outputs.empty_outputs(3, (N,), np.float32)
    assert fourth[0].ctypes.data == address
    del second, third, fourth
    assert outputs.release() >= 1


def test_functional_loop_results_never_alias_live_arrays():
    rng = np.random.default_rng(0)
    w, g, m = (rng.standard_normal(N).astype(np.float32) for _ in range(3))
    v = np.abs(g)
    history = []
    for t in range(1, 6):
        w, m, v = adamgen.adam_update(w, g, 1e-3, m, v, t)
        history.append(w)  # keep every w alive: no block may be reused under them
        snapshot = [h.copy() for h in history]
    for kept, copy in zip(history, snapshot):
        assert kept.tobytes() == copy.tobytes()
    assert len({h.ctypes.data for h in history}) == len(history)
