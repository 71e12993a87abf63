"""Locks that a forked child gets fresh.

A process that forks while another of its threads holds a lock hands the child a lock nobody will
ever release (multiprocessing's ``fork`` start method, data-loader workers). Every module-level
lock of adamgen's runtime is a :class:`ForkSafeLock`: after a fork the child replaces each with a
new, unlocked one (``os.register_at_fork``). The child's caches stay valid; only a half-finished
operation of another thread is lost, and that thread does not exist in the child anyway.
"""

from __future__ import annotations

import os
import threading
import weakref

_instances: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()


class ForkSafeLock:
    """A ``threading.Lock`` (used with ``with``), renewed in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _instances.add(self)

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _renew_in_child() -> None:
    for lock in list(_instances):
        lock._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_in_child)
