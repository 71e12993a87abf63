"""How much CPU other processes take while we measure, and how long our threads waited for one.

This machine is shared: other tenants' processes run on the same two vCPUs, invisible to ``ps``
but not to ``/proc/stat``. A two-thread OpenMP region whose second thread has to share its core
waits for a scheduler time slice at its barrier (measured here: about 6 ms a call instead of
tens of microseconds), so a sample timed under foreign load says nothing about the code.

Two measures:

* :func:`run_delay`: the time this process's threads spent runnable but waiting for a CPU
  (``/proc/self/task/*/schedstat``, nanosecond resolution). Per timed burst it tells whether
  the sample was disturbed (by other tenants, or by another library's spinning threads).
* :class:`Meter`: the CPU other processes took (machine busy time from ``/proc/stat`` minus this
  process's CPU time), in vCPUs; coarse (10 ms ticks), used to wait for a quiet machine and to
  describe a case.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from adamgen.runtime.variant_choice import process_run_delay

#: Seconds this process's threads have spent waiting on a run queue (NaN if unknown): the
#: reading adamgen's loader takes per sample, so the benchmark judges disturbance the same way.
run_delay = process_run_delay

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: A machine with less foreign CPU than this (in vCPUs) is called quiet.
QUIET = 0.25
#: A burst whose threads waited for a CPU more than this share of its wall time is disturbed.
DISTURBED = 0.05


def _busy_seconds() -> float | None:
    """CPU time spent busy on every CPU since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat", encoding="ascii") as stream:
            fields = stream.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / _TICKS


class Meter:
    """Foreign CPU between :meth:`start` and :meth:`stop` (NaN where ``/proc/stat`` is absent)."""

    def __init__(self) -> None:
        self._start: tuple[float, float | None, float] = (0.0, None, 0.0)

    def start(self) -> None:
        self._start = (time.perf_counter(), _busy_seconds(), time.process_time())

    def stop(self) -> float:
        wall0, busy0, own0 = self._start
        wall, busy, own = time.perf_counter(), _busy_seconds(), time.process_time()
        if busy is None or busy0 is None or wall <= wall0:
            return float("nan")
        return max(0.0, ((busy - busy0) - (own - own0)) / (wall - wall0))


def foreign_load(seconds: float = 1.0) -> float:
    """Foreign CPU over the next ``seconds`` (this process sleeping meanwhile)."""
    meter = Meter()
    meter.start()
    time.sleep(seconds)
    return meter.stop()


def wait_until_quiet(limit_seconds: float, threshold: float = 0.2) -> tuple[float, float]:
    """Wait (up to ``limit_seconds``) for a second in which others take < ``threshold`` CPUs.

    Returns (seconds waited, the last foreign load seen).
    """
    started = time.monotonic()
    load = foreign_load(1.0)
    while load >= threshold and time.monotonic() - started < limit_seconds:
        load = foreign_load(1.0)
    return time.monotonic() - started, load


class CapacityCheck:
    """Does the machine give us whole cores right now? A fixed spin, alone and in parallel.

    ``run_delay`` cannot see the hypervisor: when the host runs this VM's two vCPUs on less
    than two cores, every thread looks running while each gets a fraction of a core (measured
    here: the C probe, which releases the GIL, took twice as long in two Python threads as in
    one, with no run delay at all). A spin of fixed work, timed alone and in ``threads``
    parallel Python threads (the spin releases the GIL), against the fastest spin seen so far,
    tells a round on whole cores from one on shared cores.

    Args:
        spin: runs ``iterations`` of GIL-free busy work.
        threads: how many cores the measurement needs.
        seconds: the target duration of one spin.
    """

    SLOWER = 1.25  # a spin this much slower than the best seen means a shared core

    def __init__(self, spin: Callable[[int], None], threads: int, seconds: float = 0.002):
        self.spin, self.threads = spin, threads
        spin(1000)
        started = time.perf_counter()
        spin(100_000)
        per = (time.perf_counter() - started) / 100_000
        self.iterations = max(1000, int(seconds / max(per, 1e-12)))
        self.best = float("inf")

    def sample(self) -> float:
        """Seconds of the slowest spin (alone, and each of ``threads`` at once)."""
        started = time.perf_counter()
        self.spin(self.iterations)
        alone = time.perf_counter() - started
        worst = alone
        if self.threads > 1:
            spans: list[float] = []

            def body() -> None:
                begun = time.perf_counter()
                self.spin(self.iterations)
                spans.append(time.perf_counter() - begun)

            workers = [threading.Thread(target=body) for _ in range(self.threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            worst = max([alone, *spans])
        self.best = min(self.best, alone)
        return worst

    def whole(self, sample: float) -> bool:
        """True if ``sample`` (from :meth:`sample`) was on whole cores."""
        return sample <= self.SLOWER * self.best
