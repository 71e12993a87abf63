"""Reading a run's results: the cases, their rooflines and ratios, and adamgen's speed targets.

Kept apart from the Markdown and the plot so both read the same numbers the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .rules import SUBJECTS

PEERS = ("numpy naive", "numpy best", "numexpr", "numba", "torch fused", "torch foreach")
PICK = "adamgen"
PICK_STEP = "adamgen step()"


@dataclass(frozen=True)
class Case:
    """The timings of one case (one suite, mode, dtype, size and thread count, and for the rule
    family one rule), by contender.

    ``rule``, ``peer``, ``traffic`` and ``tensors`` are the rule family's: the subject's label,
    its peer, the arrays its step reads and writes, how many tensors the step updates.
    """

    suite: str
    mode: str
    dtype: str
    threads: int
    n: int
    bytes: int
    timings: dict[str, dict[str, Any]]
    rule: str = ""
    peer: str = ""
    traffic: tuple[int, int] = (4, 3)
    tensors: int = 1

    def seconds(self, name: str) -> float:
        record = self.timings.get(name)
        return float(record["seconds"]) if record and not record["error"] else math.nan

    def gbps(self, name: str) -> float:
        return self.bytes / self.seconds(name) / 1e9

    @property
    def roof(self) -> tuple[str, float]:
        """The fastest probe: (its name, its seconds); NaN when no probe ran."""
        probes = [(name, self.seconds(name)) for name, r in self.timings.items()
                  if r["family"] == "probe" and not math.isnan(self.seconds(name))]
        return min(probes, key=lambda p: p[1]) if probes else ("", math.nan)

    def percent_of_roof(self, name: str) -> float:
        return 100.0 * self.roof[1] / self.seconds(name)

    def ratio(self, name: str, other: str) -> float:
        """How many times faster ``name`` is than ``other`` (other's time / name's time)."""
        return self.seconds(other) / self.seconds(name)

    @property
    def clean(self) -> tuple[int, int]:
        """(fewest undisturbed samples of any contender, rounds): see :mod:`benchmarks.timing`."""
        live = [r for r in self.timings.values() if r["samples"]]
        if not live:
            return (0, 0)
        return (min(int(r.get("clean", len(r["samples"]))) for r in live),
                max(len(r["samples"]) for r in live))

    def names(self, family: str) -> list[str]:
        return [name for name, r in self.timings.items() if r["family"] == family]

    def adamgen_names(self) -> list[str]:
        """Forced variants, then adamgen's kernels called directly."""
        return self.names("variant") + self.names("kernel")

    def best_variant(self) -> tuple[str, float]:
        variants = [(name, self.seconds(name)) for name in self.names("variant")
                    if not math.isnan(self.seconds(name))]
        return min(variants, key=lambda v: v[1]) if variants else ("", math.nan)


def cases(results: dict[str, Any]) -> list[Case]:
    """Every case of every worker, in run order."""
    grouped: dict[tuple[Any, ...], Case] = {}
    for worker in results["workers"]:
        for record in worker.get("records", []):
            key = (record["suite"], record["mode"], record["dtype"], record["threads"],
                   record["n"])
            rule = record.get("rule", "")
            case = grouped.get((*key, rule))
            if case is None:
                case = grouped[(*key, rule)] = Case(
                    *key, bytes=record["bytes"], timings={}, rule=rule,
                    peer=record.get("peer", ""),
                    traffic=tuple(record.get("traffic", (4, 3))),  # type: ignore[arg-type]
                    tensors=int(record.get("tensors", 1)))
            case.timings[record["impl"]] = record
    return list(grouped.values())


def find(all_cases: Iterable[Case], suite: str, **match: Any) -> list[Case]:
    return [c for c in all_cases if c.suite == suite
            and all(getattr(c, k) == v for k, v in match.items())]


def one(all_cases: Iterable[Case], suite: str, **match: Any) -> Case | None:
    found = find(all_cases, suite, **match)
    return found[0] if found else None


# -- adamgen's speed targets ---------------------------------------------------------------------

#: Each target's yardstick, and why adamgen measures itself against it: the report explains
#: every goal that appears in its table with these sentences.
GOALS = {
    "bandwidth": "Beyond cache a step can go no faster than memory allows. The probe is a plain "
                 "C loop with exactly one step's traffic, so the in-place step should reach 95 % "
                 "of it.",
    "torch fused": "`torch.optim.Adam(fused=True)` is the fastest widely used CPU Adam: "
                   "adamgen should never be slower beyond cache (where both are bound by "
                   "memory), and faster in cache and on many tensors (one C call for all).",
    "numpy naive": "Ivy's NumPy expression is what `adamgen.adam_update` replaces: the "
                   "functional call must beat it by a wide margin (less at 1e7, where the page "
                   "faults of three fresh outputs dominate).",
    "many tensors": "Many tensors should cost what one tensor of their total size costs: "
                    "`step()` within 1.25x of one flat call, `step(list)` at most 1 µs more per "
                    "tensor.",
    "per-call overhead": "On 16 elements the call is all overhead: `step()` within 3 µs and "
                         "`step([g])` within 5 µs, below the NumPy expression's ~7 µs.",
    "loader's pick": "The loader times its variants once per size bucket: its pick should be "
                     "within 10 % (from 1e3 elements) or 0.5 µs (below) of the best variant "
                     "forced by name.",
    "GIL": "A call releases the GIL, so two Python threads updating their own arrays take about "
           "the time of one (at most 1.3x), judged against the GIL-free C probe run the same "
           "way.",
    "rule vs its probe": "Every built-in rule's in-place optimizer, beyond cache, should reach "
                         "95 % of a probe with that rule's own traffic (Adam reads 4 arrays and "
                         "writes 3, Lion 3 and 2, AMSGrad 5 and 4).",
    "rule vs its peer": "On many small tensors one `step()` is one C call: each rule's optimizer "
                        "should be 2.5x its peer's fastest CPU path at one thread and 4x at two "
                        "(torch's fused Adam/AdamW for the Adam rules, lion-pytorch for Lion).",
}
#: The rule family's targets: (size, threads) beyond cache, and the many-tensor ratio per thread
#: count.
RULE_BANDWIDTH_CASES = ((10_000_000, 1), (30_000_000, 1), (10_000_000, 2), (30_000_000, 2))
RULE_PEER_LIMITS = ((1, 2.5), (2, 4.0))
#: The contender names of the rule family's cases (see :func:`benchmarks.worker.rule_cases`).
PEER = "peer"
#: ``Target.detail`` of a target whose case the run did not sweep (``--quick``, ``--sizes``).
NOT_IN_RUN = "not in this run (see --quick / --sizes)"


@dataclass(frozen=True)
class Target:
    """One promise, what was measured for it, and whether it holds.

    ``goal`` names its yardstick (a key of :data:`GOALS`); ``status`` is ``met``, ``short`` or
    ``not measured``; ``detail`` says by how much or why.
    """

    goal: str
    promise: str
    case: str
    measured: str
    status: str
    detail: str = ""


def _check(goal: str, promise: str, case: str, value: float, limit: float, *,
           higher_is_better: bool, fmt: str) -> Target:
    if math.isnan(value):
        return Target(goal, promise, case, "—", "not measured",
                      "a contender is missing: see the missing columns")
    ok = value >= limit if higher_is_better else value <= limit
    if ok:
        return Target(goal, promise, case, fmt.format(value), "met")
    gap = (limit / value if higher_is_better else value / limit) - 1
    return Target(goal, promise, case, fmt.format(value), "short",
                  f"{100 * gap:.0f} % short of {fmt.format(limit)}")


def targets(results: dict[str, Any]) -> list[Target]:
    """Every speed target of the rules the run selected (see :data:`GOALS`), checked against
    this run (float32)."""
    all_cases = cases(results)
    out = ivy_targets(results, all_cases) if ivy_selected(results) else []
    return out + rule_targets(results, all_cases)


def ivy_selected(results: dict[str, Any]) -> bool:
    """Whether the run measured the Ivy rule's own suite (a run from before the rule family
    always did)."""
    return "ivy_adam" in results["plan"].get("rules", ("ivy_adam",))


def ivy_targets(results: dict[str, Any], all_cases: list[Case]) -> list[Target]:
    """The Ivy rule's targets: its sweep, many tensors, per-call overhead, loader, GIL."""
    out: list[Target] = []

    def missing(goal: str, promise: str, case: str) -> None:
        out.append(Target(goal, promise, case, "—", "not measured", NOT_IN_RUN))

    # Beyond cache, in place, 1 and 2 threads: the probe and torch fused.
    for threads in (1, 2):
        for n in (10_000_000, 30_000_000):
            label = f"N={n:.0e}, {threads} thr"
            case = one(all_cases, "sweep", mode="inplace", dtype="float32", threads=threads, n=n)
            if case is None:
                missing("bandwidth", ">= 95 % of the probe", label)
                missing("torch fused", "no slower than torch fused", label)
                continue
            out.append(_check("bandwidth", ">= 95 % of the probe", label, case.percent_of_roof(PICK),
                              95.0, higher_is_better=True, fmt="{:.0f} %"))
            out.append(_check("torch fused", "no slower than torch fused", label,
                              case.ratio(PICK, "torch fused"), 1.0, higher_is_better=True,
                              fmt="{:.2f}x"))
    # In cache, 2 threads, >= 1.5x torch fused.
    for n in (10_000, 100_000, 1_000_000):
        label = f"N={n:.0e}, 2 thr"
        case = one(all_cases, "sweep", mode="inplace", dtype="float32", threads=2, n=n)
        if case is None:
            missing("torch fused", ">= 1.5x torch fused", label)
            continue
        out.append(_check("torch fused", ">= 1.5x torch fused", label, case.ratio(PICK, "torch fused"),
                          1.5, higher_is_better=True, fmt="{:.2f}x"))
    # The functional API against the naive NumPy expression.
    for n, threads, limit in ((1_000_000, 1, 10.0), (1_000_000, 2, 10.0),
                              (10_000_000, 1, 3.5), (10_000_000, 2, 5.0)):
        label = f"functional N={n:.0e}, {threads} thr"
        case = one(all_cases, "sweep", mode="functional", dtype="float32", threads=threads, n=n)
        promise = f">= {limit:g}x numpy naive"
        if case is None:
            missing("numpy naive", promise, label)
            continue
        out.append(_check("numpy naive", promise, label, case.ratio(PICK, "numpy naive"), limit,
                          higher_is_better=True, fmt="{:.1f}x"))
    # Many tensors.
    for threads, limit in ((1, 2.5), (2, 4.0)):
        label = f"{results['plan']['multi_count']} x {results['plan']['multi_size']}, " \
                f"{threads} thr"
        case = one(all_cases, "multi", threads=threads)
        if case is None:
            missing("many tensors", "step() within 1.25x of one flat call", label)
            continue
        out.append(_check("many tensors", "step() within 1.25x of one flat call", label,
                          case.ratio("adamgen flat buffer", "adamgen step()"), 1.25,
                          higher_is_better=False, fmt="{:.2f}x"))
        count = results["plan"]["multi_count"]
        extra = (case.seconds("adamgen step(list)") - case.seconds("adamgen flat buffer")) / count
        out.append(_check("many tensors", "step(list) <= 1 us per tensor above the flat call",
                          label, extra * 1e6, 1.0, higher_is_better=False, fmt="{:.2f} us"))
        out.append(_check("torch fused", f">= {limit:g}x torch fused", label,
                          case.ratio("adamgen step()", "torch fused"), limit,
                          higher_is_better=True, fmt="{:.1f}x"))
    # Per-call overhead.
    for threads in (1, 2):
        case = one(all_cases, "tiny", threads=threads)
        label = f"N={results['plan']['tiny_size']}, {threads} thr"
        if case is None:
            missing("per-call overhead", "step() <= 3 us", label)
            continue
        out.append(_check("per-call overhead", "step() <= 3 us", label,
                          case.seconds("adamgen step()") * 1e6, 3.0, higher_is_better=False,
                          fmt="{:.2f} us"))
        out.append(_check("per-call overhead", "step([g]) <= 5 us", label,
                          case.seconds("adamgen step([g])") * 1e6, 5.0,
                          higher_is_better=False, fmt="{:.2f} us"))
    # The loader's pick against the best variant forced by hand.
    out += loader_targets(all_cases)
    # The GIL, judged against the GIL-free C probe run the same way.
    promise = "two threads take about the time of one (<= 1.3x)"
    for worker in results["workers"]:
        for n in sorted({row["n"] for row in worker.get("gil", [])}):
            mine = next((r for r in worker["gil"] if r["n"] == n and r["impl"] == PICK_STEP),
                        None)
            control = next((r for r in worker["gil"] if r["n"] == n
                            and r["impl"] == "probe serial"), None)
            if mine is None:
                continue
            label = f"GIL, N={n:.0e}"
            if control is not None and control["ratio"] > 1.5:
                out.append(Target("GIL", promise, label, f"{mine['ratio']:.2f}x", "not measured",
                                  f"the machine gave one core: the GIL-free C probe took "
                                  f"{control['ratio']:.2f}x too"))
                continue
            out.append(_check("GIL", promise, label, mine["ratio"], 1.3, higher_is_better=False,
                              fmt="{:.2f}x"))
    return out


def rule_labels(results: dict[str, Any]) -> list[str]:
    """The labels of every subject of the rules the run selected (none in a run from before the
    rule family)."""
    return [s.label for name in results["plan"].get("rules", ()) for s in SUBJECTS.get(name, ())]


def rule_targets(results: dict[str, Any], all_cases: Iterable[Case]) -> list[Target]:
    """Each selected rule beyond cache against its own probe, and on many tensors against its
    peer (float32)."""
    all_cases = list(all_cases)
    plan = results["plan"]
    out = []
    for label in rule_labels(results):
        for n, threads in RULE_BANDWIDTH_CASES:
            where = f"{label}, N={n:.0e}, {threads} thr"
            case = one(all_cases, "rule", rule=label, threads=threads, n=n)
            if case is None:
                out.append(Target("rule vs its probe", ">= 95 % of its probe", where, "—",
                                  "not measured", NOT_IN_RUN))
                continue
            out.append(_check("rule vs its probe", ">= 95 % of its probe", where,
                              case.percent_of_roof(PICK), 95.0, higher_is_better=True,
                              fmt="{:.0f} %"))
        for threads, limit in RULE_PEER_LIMITS:
            where = f"{label}, {plan['multi_count']} x {plan['multi_size']}, {threads} thr"
            promise = f">= {limit:g}x its peer"
            case = one(all_cases, "rule-multi", rule=label, threads=threads)
            if case is None:
                out.append(Target("rule vs its peer", promise, where, "—", "not measured",
                                  NOT_IN_RUN))
                continue
            out.append(_check("rule vs its peer", promise, where, case.ratio(PICK, PEER), limit,
                              higher_is_better=True, fmt="{:.1f}x"))
    return out


def loader_targets(all_cases: Iterable[Case]) -> list[Target]:
    """The pick is never > 10 % slower than the best forced variant from 1e3 on, nor > 0.5 us
    slower below (float32); one row per mode and thread count, naming the worst size."""
    out = []
    groups: dict[tuple[str, str, int], list[Case]] = {}
    for case in find(all_cases, "sweep", dtype="float32"):
        if case.names("variant"):
            groups.setdefault((case.mode, case.dtype, case.threads), []).append(case)
    for (mode, dtype, threads), group in sorted(groups.items()):
        worst_large = max(((c.seconds(PICK) / c.best_variant()[1] - 1, c) for c in group
                           if c.n >= 1000), default=None, key=lambda p: p[0])
        worst_small = max(((c.seconds(PICK) - c.best_variant()[1], c) for c in group
                           if c.n < 1000), default=None, key=lambda p: p[0])
        label = f"{mode} {dtype}, {threads} thr"
        if worst_large is not None:
            gap, case = worst_large
            out.append(_check("loader's pick", "pick <= 10 % slower than the best forced variant",
                              f"{label}, worst N={case.n:.0e}", 100 * gap, 10.0,
                              higher_is_better=False, fmt="{:+.0f} %"))
        if worst_small is not None:
            gap, case = worst_small
            out.append(_check("loader's pick", "pick <= 0.5 us slower than the best forced variant",
                              f"{label}, N={case.n}", gap * 1e6, 0.5,
                              higher_is_better=False, fmt="{:+.2f} us"))
    return out
