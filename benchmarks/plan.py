"""What one benchmark run measures: sizes, dtypes, thread counts, repetitions.

A :class:`Plan` is made by :func:`make_plan` from the command line and handed to each worker
process as JSON, so the parent and its workers agree on the work (and the progress bar on its
total) without sharing anything else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .rules import RULES, SUBJECTS, check_rule_names

FULL_SIZES = (16, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 30_000_000)
QUICK_SIZES = (16, 1_000, 10_000)
DTYPES = ("float32", "float64")
MODES = ("inplace", "functional")
BYTES_PER_ELEMENT = {"float32": 28, "float64": 56}  # 4 arrays read, 3 written
#: From this size on a case is "beyond cache" and gets :attr:`Plan.rounds_large` rounds.
LARGE = 5_000_000
#: The rule family's sizes: beyond cache, where a step is bound by memory.
RULE_SIZES = (10_000_000, 30_000_000)
QUICK_RULE_SIZES = (100_000,)
#: Untimed calls before every burst of the rule family at more than one thread: torch's OpenMP
#: pool and adamgen's spin for some milliseconds after a call (see :mod:`benchmarks.timing`).
SETTLE_SECONDS = 0.02


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs to know.

    Attributes:
        quick: the CI smoke run (small sizes, few rounds).
        sizes, dtypes, threads, modes: the sweep's axes.
        rounds, rounds_large: interleaved rounds per case (medians over these).
        target_seconds: how long one timed burst of calls should last.
        warm_seconds: untimed calls before each burst of short calls
            (see :mod:`benchmarks.timing`).
        forced: also time every adamgen variant forced by name.
        wait_quiet: before each case, wait up to this many seconds for other processes to
            leave the CPUs (see :mod:`benchmarks.load`); 0 does not wait.
        multi_count, multi_size: the multi-tensor case (``multi_count`` tensors of ``multi_size``).
        tiny_size: the per-call overhead case.
        gil_sizes, gil_steps: the GIL case (two Python threads updating their own arrays).
        rules: the built-in rules benchmarked (see :mod:`benchmarks.rules`); ``ivy_adam`` also
            brings the Ivy sweep, functional, per-call, many-tensor and GIL cases above.
        rule_sizes: the rule family's single-tensor sizes (its many-tensor case uses
            ``multi_count`` x ``multi_size``).
        settle_seconds: untimed calls before every burst of the rule family at more than one
            thread (see :mod:`benchmarks.timing`).
    """

    quick: bool
    sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    threads: tuple[int, ...]
    modes: tuple[str, ...]
    rounds: int
    rounds_large: int
    target_seconds: float
    warm_seconds: float
    forced: bool
    wait_quiet: float
    multi_count: int
    multi_size: int
    tiny_size: int
    gil_sizes: tuple[int, ...]
    gil_steps: int
    rules: tuple[str, ...] = RULES
    rule_sizes: tuple[int, ...] = RULE_SIZES
    settle_seconds: float = SETTLE_SECONDS

    @property
    def ivy(self) -> bool:
        """Whether the Ivy rule's own sweep runs (it is selected)."""
        return "ivy_adam" in self.rules

    def rounds_for(self, n: int) -> int:
        return self.rounds_large if n >= LARGE else self.rounds

    def units(self, threads: int) -> int:
        """Progress units of one worker: one per sweep case, plus multi-tensor, tiny and GIL,
        and one per case of each rule subject (its sizes and its many-tensor case)."""
        subjects = sum(len(SUBJECTS[name]) for name in self.rules)
        family = subjects * (len(self.rule_sizes) + 1)
        if not self.ivy:
            return family
        sweep = len(self.sizes) * len(self.dtypes) * len(self.modes)
        return sweep + 2 + (len(self.gil_sizes) if threads == 1 else 0) + family

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        for name in ("sizes", "dtypes", "threads", "modes", "gil_sizes", "rules", "rule_sizes"):
            if name in data:  # a results.json from before the rule family has no rules
                data[name] = tuple(data[name])
        return cls(**data)


def make_plan(*, quick: bool, sizes: tuple[int, ...] | None = None,
              dtypes: tuple[str, ...] | None = None, threads: tuple[int, ...] | None = None,
              rounds: int | None = None, forced: bool = True,
              wait_quiet: float | None = None, rules: tuple[str, ...] | None = None,
              rule_sizes: tuple[int, ...] | None = None) -> Plan:
    """The default full or quick plan, with any axis overridden (``rules`` are checked: an
    unknown name is a ``ValueError`` listing the built-in rules)."""
    if quick:
        plan = Plan(quick=True, sizes=QUICK_SIZES, dtypes=DTYPES, threads=(1, 2), modes=MODES,
                    rounds=3, rounds_large=3, target_seconds=0.0005, warm_seconds=0.001,
                    forced=forced, wait_quiet=0.0, multi_count=50, multi_size=4096,
                    tiny_size=16, gil_sizes=(100_000,), gil_steps=20,
                    rule_sizes=QUICK_RULE_SIZES)
    else:
        plan = Plan(quick=False, sizes=FULL_SIZES, dtypes=DTYPES, threads=(1, 2), modes=MODES,
                    rounds=11, rounds_large=7, target_seconds=0.003, warm_seconds=0.003,
                    forced=forced, wait_quiet=0.0,
                    multi_count=500, multi_size=4096, tiny_size=16,
                    gil_sizes=(1_000_000, 10_000_000), gil_steps=20)
    overrides = {"sizes": sizes, "dtypes": dtypes, "threads": threads, "rounds": rounds,
                 "wait_quiet": wait_quiet, "rule_sizes": rule_sizes,
                 "rules": None if rules is None else check_rule_names(rules)}
    changes = {k: v for k, v in overrides.items() if v is not None}
    if rounds is not None:
        changes["rounds_large"] = rounds
    data = asdict(plan)
    data.update(changes)
    return Plan(**data)
