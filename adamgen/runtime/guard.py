"""Serial C instead of threaded C while threaded calls run slow: the loader's pick, kept honest.

Why: the loader measures once per size bucket. If the machine was quiet then and a neighbour
takes a core later, every OpenMP region waits for its descheduled worker: on the shared
development VM a two-thread update of 1e4 float64 elements took 4.6 ms a call against 14 us
serially (and the demo measured 6,474 us against 97 us). No decision made in advance survives
that; watching the calls does.

How: each threaded call is timed (two clock reads, on calls of several microseconds at least:
threads are only a candidate from 4096 elements). A call slower than :data:`SLOW` times what the
serial kernel was measured to take for that many elements is slow; :data:`IN_A_ROW` slow calls
in a row (one slow call can be an interrupt) make the following calls run serially for a
back-off that doubles with each strike, from :data:`BACKOFF_MIN` to :data:`BACKOFF_MAX`
seconds; then one threaded call probes again (slow: a longer back-off at once; in time: threads
are back). While a neighbour stays, threads cost one slow probe per back-off: at most a few
milliseconds a second. Serial and threaded C give the same bits, so this changes speed only.

The rule is :class:`ThreadGuard`, fed with times and clock readings, so it is tested with
injected timings; :func:`adamgen.runtime.variant_choice.pick` makes one per threaded decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: A threaded call slower than this multiple of the serial estimate is slow.
SLOW = 2.0
#: Slow threaded calls in a row that make a strike.
IN_A_ROW = 2
#: The first back-off after a strike, and the longest (seconds of serial calls).
BACKOFF_MIN = 0.01
BACKOFF_MAX = 1.0
#: The clock the calls are timed with (tests inject one).
clock: Callable[[], float] = time.perf_counter


class ThreadGuard:
    """Whether the next call may use threads, from how the last threaded calls went.

    Args:
        serial_seconds_per_element: the serial kernel's measured time per element (the
            loader's median over its clean samples, divided by the elements it timed).
    """

    __slots__ = ("backoff", "serial_seconds_per_element", "slow", "strikes", "until")

    def __init__(self, serial_seconds_per_element: float) -> None:
        self.serial_seconds_per_element = serial_seconds_per_element
        self.until = 0.0  # no threads before this clock reading
        self.backoff = 0.0
        self.slow = 0  # slow threaded calls in a row
        self.strikes = 0  # how often threads were set aside (for tests and ``info``)

    def run(self, threaded: Callable[[], None], serial: Callable[[], None],
            elements: int) -> None:
        """One call of ``elements``: ``threaded`` (timed) unless threads are set aside."""
        start = clock()
        if start < self.until:
            serial()
            return
        threaded()
        self.record(start, clock() - start, elements)

    def record(self, now: float, seconds: float, elements: int) -> None:
        """A threaded call of ``elements`` took ``seconds``, starting at clock reading ``now``."""
        if not seconds > SLOW * self.serial_seconds_per_element * elements:
            self.slow = 0
            self.backoff = 0.0
            return
        self.slow += 1
        if self.slow >= IN_A_ROW:
            self.backoff = min(BACKOFF_MAX, 2 * self.backoff) if self.backoff else BACKOFF_MIN
            self.until = now + seconds + self.backoff
            self.slow = IN_A_ROW - 1  # after the back-off, one slow probe strikes again
            self.strikes += 1

    def __repr__(self) -> str:
        return (f"ThreadGuard(serial {self.serial_seconds_per_element * 1e9:.3g} ns/element, "
                f"{self.strikes} strikes, back-off {self.backoff:g} s)")
