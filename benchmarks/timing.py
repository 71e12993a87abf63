"""Interleaved timing: every contender of a case is timed round by round in one process.

Why interleaved: this machine's speed drifts by tens of percent over seconds (a shared VM), so
timing contender A for ten seconds and then B would mostly measure the drift. Each round times
every contender once, in an order rotated from round to round, and the figure reported is the
median over rounds: drift then moves every contender alike, and the ratios hold.

Why bursts: one sample is ``k`` back-to-back calls (``k`` chosen so a sample lasts about
``target_seconds``), preceded, for calls shorter than :data:`WARM_BELOW`, by untimed calls for
``warm_seconds``: an in-cache case is then measured with its data in cache (the previous
contender in the round evicted it), a thread pool is awake and spinning as in a training loop,
and a 1 us call is not measured at the timer's resolution.

Why warm up rather than pause between contenders: on this VM a pause made things worse. After
a sleep, a two-thread OpenMP loop at N=1e3 took 120-150 us a call for a whole burst instead of
1-4 us (waking an idle vCPU goes through the hypervisor), while back-to-back bursts with a short
warm-up were stable for every pair of libraries tried (torch, numba, numexpr, the C probe).

Why settle: several thread pools share a process (torch's and adamgen's OpenMP regions share
one libgomp pool, since torch's bundled libgomp has the system's soname; numexpr and numba
may keep their own). The pool that ran last keeps spinning after its region (measured here: its worker
burns about 4 ms of CPU after the last call), and on two vCPUs that spinning thread takes a
core from the next contender's threads. ``settle_seconds`` puts untimed calls (at least one)
before every burst, however long a call is, so the previous contender's pool has gone to sleep
(or is this contender's own) when the timing starts.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .load import DISTURBED, CapacityCheck, run_delay

#: Calls faster than this get ``warm_seconds`` of untimed calls before each timed burst.
WARM_BELOW = 0.005


@dataclass
class Contender:
    """One implementation in a case.

    Attributes:
        name: the label in tables and plots (``adamgen``, ``numpy best``, ``torch fused``, ...).
        family: ``adamgen`` (the loader's pick), ``variant`` (an adamgen variant forced by name),
            ``peer`` or ``probe`` (the bandwidth yardstick).
        call: runs one update.
        enter, leave: run around each burst, outside the timed region (e.g. forcing a variant).
    """

    name: str
    family: str
    call: Callable[[], object]
    enter: Callable[[], None] | None = None
    leave: Callable[[], None] | None = None


@dataclass
class Timing:
    """The result for one contender: seconds per call (median over rounds) and the samples.

    Attributes:
        samples: seconds per call, one per round.
        waits: per sample, the share of its wall time this process's threads spent waiting
            for a CPU (:func:`benchmarks.load.run_delay`).
        whole: per sample, whether its round ran on whole cores
            (:class:`benchmarks.load.CapacityCheck`).
        clean: how many samples were undisturbed (whole cores, no waiting); the median is
            over those when there are at least three (else over all, and the report flags it).
    """

    name: str
    family: str
    seconds: float
    samples: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    whole: list[bool] = field(default_factory=list)
    calls_per_sample: int = 1
    error: str = ""
    clean: int = 0


def _burst(contender: Contender, calls: int, warm: float) -> tuple[float, float]:
    """Seconds per call over ``calls`` timed calls, after ``warm`` seconds of untimed ones, and
    the share of the timed wall time that this process's threads waited for a CPU."""
    call = contender.call
    if contender.enter is not None:
        contender.enter()
    try:
        if warm > 0:
            until = time.perf_counter() + warm
            call()
            while time.perf_counter() < until:
                call()
        waited = run_delay()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        wall = time.perf_counter() - start
        return wall / calls, (run_delay() - waited) / wall
    finally:
        if contender.leave is not None:
            contender.leave()


def measure(contenders: Sequence[Contender], *, rounds: int, target_seconds: float,
            warm_seconds: float, check: CapacityCheck | None = None,
            max_calls: int = 100_000, settle_seconds: float = 0.0) -> list[Timing]:
    """Median seconds per call of every contender, timed interleaved.

    Each burst records how long this process's threads waited for a CPU meanwhile, and each
    round is bracketed by ``check`` (is the machine giving us whole cores?). A sample whose
    threads waited more than :data:`benchmarks.load.DISTURBED` of the time, or whose round ran
    on shared cores, measured the neighbours, not the code: it is left out of the median when
    three clean ones remain.

    A contender that raises while being warmed up is reported with its error and left out of
    the rounds: one broken peer must not cost the whole case. ``settle_seconds``: untimed calls
    before every burst, whatever a call's length (see the module docstring).
    """
    live: list[tuple[Contender, int, float]] = []
    results: dict[str, Timing] = {}
    for contender in contenders:
        try:
            _burst(contender, 1, 0.0)  # first call: page faults, JIT, kernel loading
            single = min(_burst(contender, 1, warm_seconds)[0] for _ in range(2))
        except Exception as exc:  # noqa: BLE001 - reported in the table, not fatal
            results[contender.name] = Timing(contender.name, contender.family, math.nan,
                                             error=f"{type(exc).__name__}: {exc}")
            continue
        calls = max(1, min(max_calls, int(target_seconds / max(single, 1e-9))))
        warm = warm_seconds if single < WARM_BELOW else 0.0
        live.append((contender, calls, max(warm, settle_seconds)))
        results[contender.name] = Timing(contender.name, contender.family, math.nan,
                                         calls_per_sample=calls)
    enabled = gc.isenabled()
    gc.disable()
    checks: list[tuple[float, float]] = []
    try:
        for index in range(rounds):
            shift = index % max(1, len(live))
            before = check.sample() if check else 0.0
            for contender, calls, warm in live[shift:] + live[:shift]:
                seconds, wait = _burst(contender, calls, warm)
                results[contender.name].samples.append(seconds)
                results[contender.name].waits.append(wait)
            checks.append((before, check.sample() if check else 0.0))
    finally:
        if enabled:
            gc.enable()
    whole = [check is None or (check.whole(a) and check.whole(b)) for a, b in checks]
    for timing in results.values():
        if timing.samples:
            timing.whole = whole
            clean = [s for s, w, ok in zip(timing.samples, timing.waits, whole)
                     if ok and not w > DISTURBED]
            timing.clean = len(clean)
            timing.seconds = statistics.median(
                clean if len(clean) >= min(3, len(timing.samples)) else timing.samples)
    return [results[c.name] for c in contenders]
