"""The loader: pick the fastest kernel variant for a call, by measurement, once per size bucket.

Why measure: which variant wins depends on the machine, the size (in cache or not), the thread
count and whether OpenMP's start-up pays off; a rule of thumb is wrong somewhere. Why it is safe:
every exact variant gives bit-identical results, so the choice changes speed, never a result.

How: a decision is keyed by the problem (operation, dtype, argument signature), the size bucket
(``n.bit_length()``: powers of two), the variant keys, the CPU and the thread count. On the first
call in a bucket the candidates are timed on **scratch arrays** made for the purpose (never the
caller's: an update must be applied exactly once), interleaved, within a budget of about 50 ms;
a bucket too large to time whole is timed on a representative slice of ``MAX_TIMED_BYTES`` per
array, which is already far beyond the caches. The winner is remembered in memory and in the cache
directory (``<cache>/choices/``), so a later process skips the measurement.

The rule (:func:`decide`, a pure function of the samples, tested with injected timings):

* a **sample** during which this process's threads waited for a CPU (``/proc/self/task/*/
  schedstat``: a neighbour, or another library's threads spinning in this process; a threaded
  variant's workers count too) for more than :data:`DISTURBED_SHARE` of it is set aside; a
  candidate left with fewer than :data:`MIN_CLEAN` clean samples cannot win;
* among the rest, the **safest** candidate within :data:`TIE_MARGIN` of the fastest median wins:
  serial C, then NumPy, then threaded C (threads are fragile: beside a busy neighbour one
  OpenMP call measured 6.5 ms against 97 us serial), so threads must earn their place;
* a **measurement** during which this thread waited for a CPU is repeated once and, if disturbed
  again, gives the safe choice (serial C), for this process only: a persisted wrong winner would
  slow every later process (seen on the shared development VM: serial C timed at 4x its cost
  beside spinning OpenMP workers, NumPy crowned, 105 % slower than the best variant).

So a pick is never much slower than the best variant: serial C, the fallback, is at most about
the thread count slower than threaded C, and nothing slower than it wins without clean evidence.
A neighbour arriving after the measurement is the guard's business (:mod:`.guard`, fetched with
:func:`guard`): a threaded pick whose calls run slow gives way to serial C until they do not.

``ADAMGEN_VARIANT=<name>`` forces one variant wherever it fits (C does not fit float16, nor a
partially broadcast argument: NumPy serves those; ``c-omp`` where threads do not fit runs serial
C); an unknown name is an error listing the accepted ones (:data:`adamgen.config.VARIANTS`).
``adamgen info`` prints :func:`decisions`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import current_environment
from ..errors import CacheError
from .forksafe import ForkSafeLock
from .guard import ThreadGuard

BUDGET_SECONDS = 0.05
MAX_ROUNDS = 9
MAX_TIMED_BYTES = 8 << 20
#: A measurement (or one sample) during which this process waited for a CPU more than this
#: share of the time measured the neighbours (another process, or another library's spinning
#: threads), not the variants: the sample is set aside; a disturbed measurement is repeated
#: once, and a second disturbed one gives the safe choice, for this process only.
DISTURBED_SHARE = 0.05
#: A candidate needs this many undisturbed samples to win (the safe candidate wins without).
MIN_CLEAN = 3
#: Medians within this share of the fastest are a tie, won by the safest candidate: a threaded
#: variant must be more than 10 % faster than serial C to be picked (its start-up and its
#: exposure to a busy neighbour are not worth less).
TIE_MARGIN = 0.10
#: Candidates from safest to most fragile; the first present is the safe choice.
SAFETY_ORDER = ("c", "numpy", "c-omp")
#: Variants that run on several threads: their calls are watched (:mod:`.guard`).
THREADED = frozenset({"c-omp"})
#: The source of a serial pick over threads that did not clearly lose: this process keeps it,
#: the cache dir does not (the next process measures again).
AGAINST_THREADS = "measured, serial over threads: not remembered"
#: The source of a measurement disturbed twice (serial C, the safe choice, in this process).
DISTURBED = "measured, disturbed: not remembered"
#: Sources a later process measures again: a warm cache dir never holds these.
NOT_REMEMBERED = frozenset({AGAINST_THREADS, DISTURBED})
#: Threads slower than the winner by this factor lost on merit (start-up costs more than the
#: work it splits): that serial pick is remembered like any other.
CLEAR_LOSS = 1.5

#: A timing closure: runs one candidate once on scratch data.
Timer = Callable[[], None]


@dataclass(frozen=True)
class Decision:
    problem: str
    bucket: int
    winner: str
    seconds: dict[str, float]
    timed_elements: int
    source: str  # "measured", "cache dir", "forced", or measured but not remembered
    reason: str = ""  # why the winner won (:attr:`Verdict.reason`)


@dataclass(frozen=True)
class Sample:
    """One timed run of one candidate: its wall time, and how long this process's threads
    waited for a CPU meanwhile (NaN when unknown: then it counts as clean)."""

    seconds: float
    waited: float = 0.0

    @property
    def disturbed(self) -> bool:
        return self.waited > DISTURBED_SHARE * self.seconds  # NaN compares False


@dataclass(frozen=True)
class Verdict:
    """What :func:`decide` concluded: the winner, each candidate's median (over its clean
    samples, or over all when too few were clean), and why."""

    winner: str
    seconds: dict[str, float]
    reason: str


_lock = ForkSafeLock()
_decisions: dict[str, Decision] = {}
_winners: dict[tuple, str] = {}  # the hot path's memo: no hashing, no JSON
_guards: dict[tuple, ThreadGuard] = {}  # by the same key, for threaded winners


def bucket_of(n: int) -> int:
    """Size buckets are powers of two: 1000 and 1023 share one, 1024 starts the next."""
    return int(n).bit_length()


def timed_elements(n: int, itemsize: int) -> int:
    """How many elements to time for a bucket: the whole array, or a representative slice."""
    return max(1, min(n, MAX_TIMED_BYTES // itemsize))


def _decision_key(problem: str, bucket: int, context: Mapping[str, str]) -> str:
    text = json.dumps({"problem": problem, "bucket": bucket, **context}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _choices_dir() -> Path | None:
    from .kernel_store import kernel_cache

    try:
        return kernel_cache().root / "choices"
    except (CacheError, OSError):  # no usable cache: decisions live in memory only
        return None


def _read(path: Path) -> Decision | None:
    try:
        data = json.loads(path.read_text())
        return Decision(**{**data, "source": "cache dir"})
    except (OSError, ValueError, TypeError):
        return None


def _write(path: Path, decision: Decision) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".choice-")
        with os.fdopen(handle, "w") as stream:
            json.dump(asdict(decision), stream)
        os.replace(temporary, path)
    except OSError:
        pass  # remembering is an optimisation; the decision stands for this process


def run_delay() -> float:
    """Seconds the calling thread has spent runnable but waiting for a CPU (NaN if unknown:
    ``/proc/thread-self/schedstat`` is Linux's)."""
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as stream:
            return int(stream.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def process_run_delay() -> float:
    """Seconds every thread of this process has spent waiting for a CPU (NaN if unknown).

    Per sample, the threads count: an OpenMP worker descheduled by a neighbour stalls the whole
    parallel region while the calling thread spins or sleeps at the barrier, which
    :func:`run_delay` (the calling thread's) does not see.
    """
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return float("nan")
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat", encoding="ascii") as stream:
                total += int(stream.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return total / 1e9


def _measure_watched(timers: Mapping[str, Timer]) -> tuple[dict[str, list[Sample]], bool]:
    """:func:`measure`, and whether this thread waited for a CPU more than
    :data:`DISTURBED_SHARE` of the time meanwhile (a decision persisted from such a run would
    stay wrong for every later process)."""
    waited, start = run_delay(), time.perf_counter()
    samples = measure(timers)
    wall = time.perf_counter() - start
    return samples, run_delay() - waited > DISTURBED_SHARE * wall  # NaN compares False


def measure(timers: Mapping[str, Timer], budget: float = BUDGET_SECONDS,
            ) -> dict[str, list[Sample]]:
    """Samples of every candidate, interleaved round by round within ``budget``.

    Each sample records how long this process's threads waited for a CPU meanwhile (read
    outside the timed region), so :func:`decide` can set disturbed ones aside.
    """
    samples: dict[str, list[Sample]] = {name: [] for name in timers}
    for run in timers.values():  # warm-up: page in scratch memory, load code
        run()
    deadline = time.perf_counter() + budget
    waited = process_run_delay()  # read between samples: one read serves two of them
    for _ in range(MAX_ROUNDS):
        for name, run in timers.items():
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            before, waited = waited, process_run_delay()
            samples[name].append(Sample(seconds, waited - before))
        if time.perf_counter() > deadline and all(len(s) >= 3 for s in samples.values()):
            break
    return samples


def decide(samples: Mapping[str, Sequence[Sample]], candidates: tuple[str, ...]) -> Verdict:
    """The winner among ``candidates`` from their samples: the rule of the module docstring.

    The median, not the minimum, of a candidate's clean samples: what a variant typically costs
    includes its start-up (waking OpenMP threads on a VM can cost milliseconds per call), and
    one lucky run must not crown a variant that is slow on most calls. Pure: no clock, no I/O.
    """
    safe = safe_choice(candidates)
    medians: dict[str, float] = {}
    usable: dict[str, float] = {}
    for name in candidates:
        every = [s.seconds for s in samples[name]]
        clean = [s.seconds for s in samples[name] if not s.disturbed]
        if clean and len(clean) >= min(MIN_CLEAN, len(every)):
            medians[name] = usable[name] = statistics.median(clean)
        else:
            medians[name] = statistics.median(every) if every else math.nan
    if safe not in usable:
        return Verdict(safe, medians, f"the safe choice: too few undisturbed samples of {safe} "
                                      "to compare against")
    fastest = min(usable, key=usable.__getitem__)
    winner = min((name for name in usable if usable[name] <= usable[fastest] * (1 + TIE_MARGIN)),
                 key=_safety)
    reason = "fastest" if winner == fastest else \
        f"within {TIE_MARGIN:.0%} of {fastest}, and safer"
    left_out = [name for name in candidates if name not in usable]
    if left_out:
        reason += f" ({', '.join(left_out)}: too few undisturbed samples)"
    return Verdict(winner, medians, reason)


def _threads_lost_on_merit(samples: Mapping[str, Sequence[Sample]], verdict: Verdict) -> bool:
    """A threaded candidate has enough clean samples, and their median is :data:`CLEAR_LOSS`
    times the winner's or more."""
    for name in THREADED & set(samples):
        every = [s.seconds for s in samples[name]]
        clean = [s.seconds for s in samples[name] if not s.disturbed]
        if (clean and len(clean) >= min(MIN_CLEAN, len(every)) and statistics.median(clean)
                >= CLEAR_LOSS * verdict.seconds[verdict.winner]):
            return True
    return False


def safe_choice(candidates: tuple[str, ...]) -> str:
    """The candidate to fall back on: the safest present (serial C), else the first."""
    return min(candidates, key=_safety)  # min keeps the first of equals


def _safety(name: str) -> int:
    return SAFETY_ORDER.index(name) if name in SAFETY_ORDER else len(SAFETY_ORDER)


def choose(problem: str, n: int, candidates: tuple[str, ...], context: Mapping[str, str],
           make_timers: Callable[[int], Mapping[str, Timer]], itemsize: int) -> str:
    """The variant to run for ``n`` elements of ``problem``.

    Args:
        problem: what is being computed (operation, dtype, signature), for keys and tables.
        candidates: the variant names that fit this call; the first is the fallback.
        context: what else changes the answer (variant cache keys, CPU, threads).
        make_timers: given a number of elements, returns one timing closure per candidate,
            each running on scratch arrays of that size.
    """
    forced = current_environment().variant  # validated against config.VARIANTS when read
    if forced is not None:
        # a variant that does not fit this call yields: c-omp to serial C (one thread, no
        # OpenMP, too few elements to split), C to the always-available first candidate, NumPy
        # (float16, a partially broadcast argument)
        if forced == "c-omp" and forced not in candidates and "c" in candidates:
            return "c"
        return forced if forced in candidates else candidates[0]
    if len(candidates) == 1:
        return candidates[0]
    bucket = int(n).bit_length()
    memo_key = (problem, bucket, candidates, tuple(context.items()))
    winner = _winners.get(memo_key)
    if winner is not None:
        return winner
    key = _decision_key(problem, bucket, {**context, "candidates": ",".join(candidates)})
    with _lock:
        decision = _decisions.get(key)
        if decision is None:
            directory = _choices_dir()
            decision = _read(directory / f"{key}.json") if directory else None
            if decision is None or decision.winner not in candidates:
                elements = timed_elements(n, itemsize)
                for _attempt in range(2):
                    samples, disturbed = _measure_watched(make_timers(elements))
                    if not disturbed:
                        break
                verdict = decide(samples, candidates)
                if disturbed:  # twice: the safe choice, for this process only
                    winner = safe_choice(candidates)
                    reason = "the safe choice: this thread waited for a CPU, twice"
                    source = DISTURBED
                elif (verdict.winner not in THREADED and THREADED & set(candidates)
                      and not _threads_lost_on_merit(samples, verdict)):
                    # Threads that lose narrowly (or lose their samples) lose to causes that
                    # pass: a neighbour, another OpenMP runtime's pool still spinning. A
                    # persisted threaded pick has a guard; a persisted serial one would have
                    # nothing to revisit it, and cost every later process its threads.
                    winner, reason, source = verdict.winner, verdict.reason, AGAINST_THREADS
                else:
                    winner, reason, source = verdict.winner, verdict.reason, "measured"
                decision = Decision(problem, bucket, winner, verdict.seconds, elements, source,
                                    reason)
                if directory and source == "measured":
                    _write(directory / f"{key}.json", decision)
            _decisions[key] = decision
        _winners[memo_key] = decision.winner
        if decision.winner in THREADED:
            serial = decision.seconds.get(safe_choice(candidates), math.nan)
            if serial > 0 and decision.timed_elements > 0:  # NaN compares False
                _guards[memo_key] = ThreadGuard(serial / decision.timed_elements)
    return decision.winner


def guard(problem: str, n: int, candidates: tuple[str, ...],
          context: Mapping[str, str]) -> ThreadGuard | None:
    """The guard watching the calls of a threaded winner :func:`choose` measured (or read from
    the cache dir) for these arguments; None for any other pick, a forced one included."""
    if current_environment().variant is not None:
        return None
    return _guards.get((problem, int(n).bit_length(), candidates, tuple(context.items())))


def decisions() -> list[Decision]:
    """Every decision this process has made or loaded, for ``adamgen info``."""
    return sorted(_decisions.values(), key=lambda d: (d.problem, d.bucket))


def persisted_decisions() -> list[Decision]:
    """Every decision remembered in the cache directory (any process), for ``adamgen info``."""
    directory = _choices_dir()
    if directory is None or not directory.is_dir():
        return []
    found = (_read(path) for path in sorted(directory.glob("*.json")))
    return sorted((d for d in found if d is not None), key=lambda d: (d.problem, d.bucket))


def forget() -> None:
    """Drop in-memory decisions (tests use it to prove a later process reads the cache dir),
    and everything remembered on top of them (:func:`on_forget`)."""
    _decisions.clear()
    _winners.clear()
    _guards.clear()
    forget_dependents()


_dependents: list[Callable[[], None]] = []


def on_forget(hook: Callable[[], None]) -> None:
    """Call ``hook`` whenever decisions or kernels are forgotten: a memo that remembers a
    decision (the functional API's call plans) must forget it too."""
    _dependents.append(hook)


def forget_dependents() -> None:
    for hook in _dependents:
        hook()
