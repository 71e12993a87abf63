"""The Markdown report of a run: targets first, then one table per case family.

Ratios read "how many times faster adamgen is": a peer's time divided by adamgen's, so above 1
adamgen wins and below 1 the peer does. GB/s counts one Adam step's traffic: 28 bytes per
float32 element, 56 per float64 (4 arrays read, 3 written), whatever an implementation really
moves (naive NumPy moves several times that; the figure is then an effective rate). The rule
family's tables count each rule's own traffic (Lion 20 bytes per float32 element, AMSGrad 36).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .results import (
    GOALS,
    NOT_IN_RUN,
    PEER,
    PEERS,
    PICK,
    Case,
    cases,
    find,
    ivy_selected,
    rule_labels,
    targets,
)
from .rules import SUBJECTS


def fmt_time(seconds: float) -> str:
    if math.isnan(seconds):
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_num(value: float, spec: str = ".3g", suffix: str = "") -> str:
    return "—" if math.isnan(value) else f"{value:{spec}}{suffix}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def present_peers(all_cases: Sequence[Case]) -> list[str]:
    seen = {name for case in all_cases for name in case.timings}
    return [peer for peer in PEERS if peer in seen]


#: What each optional package adds to a run, and the requirement that installs it (the
#: ``bench`` extra pins the same range; torch is pinned for its size, see the README).
OPTIONAL_EFFECTS = {
    "numexpr": ("the numexpr column", "numexpr"),
    "numba": ("the numba column and the GIL control", "numba"),
    "torch": (("the torch fused and torch foreach columns, the torch rules' peers and the "
               "torch targets"), "torch==2.13.0"),
    "lion_pytorch": ("the Lion rule's peer and its target", "lion-pytorch"),
    "matplotlib": ("the plot", "matplotlib"),
}


def optional_versions(results: dict[str, Any]) -> dict[str, str | None]:
    """Each optional package's version in the run's first worker, None where it is missing."""
    if not results["workers"]:
        return {}
    return dict(results["workers"][0].get("environment", {}).get("optional", {}))


def missing_columns(results: dict[str, Any]) -> list[str]:
    """Sentences naming each optional package that is missing and what it removes."""
    return [f"`{name}` is not installed, so {OPTIONAL_EFFECTS[name][0]} "
            f"{'are' if ' and ' in OPTIONAL_EFFECTS[name][0] else 'is'} missing "
            f"(`pip install {OPTIONAL_EFFECTS[name][1]}`, or the `bench` extra)."
            for name, version in optional_versions(results).items()
            if version is None and name in OPTIONAL_EFFECTS]


def sweep_table(all_cases: Sequence[Case], mode: str, dtype: str, peers: Sequence[str]) -> str:
    columns = [p for p in peers if not (mode == "functional" and p.startswith("torch"))]
    header = ["thr", "N", "adamgen", "GB/s", "% of probe", "probe GB/s",
              *[f"× {p}" for p in columns], "clean rounds"]
    rows = []
    for case in sorted(find(all_cases, "sweep", mode=mode, dtype=dtype),
                       key=lambda c: (c.threads, c.n)):
        rows.append([str(case.threads), f"{case.n:.0e}" if case.n >= 1000 else str(case.n),
                     fmt_time(case.seconds(PICK)), fmt_num(case.gbps(PICK), ".1f"),
                     fmt_num(case.percent_of_roof(PICK), ".0f", " %"),
                     fmt_num(case.bytes / case.roof[1] / 1e9, ".1f"),
                     *[fmt_num(case.ratio(PICK, p), ".2f") for p in columns],
                     clean_cell(case)])
    return table(header, rows)


def size_cell(case: Case) -> str:
    """``1e+07`` for one tensor, ``500 x 4096`` for many."""
    if case.tensors > 1:
        return f"{case.tensors} x {case.n // case.tensors}"
    return f"{case.n:.0e}" if case.n >= 1000 else str(case.n)


def rule_cases(all_cases: Sequence[Case], labels: Sequence[str], suite: str) -> list[Case]:
    """The rule family's cases of ``suite``, in the order of ``labels``, threads, size."""
    order = {label: i for i, label in enumerate(labels)}
    return sorted((c for c in find(all_cases, suite) if c.rule in order),
                  key=lambda c: (order[c.rule], c.threads, c.n))


def pick_cell(case: Case) -> str:
    """The variant the loader picked for adamgen's step, marked when a disturbed measurement
    made it fall back to the safe choice (serial C)."""
    picks = case.timings.get(PICK, {}).get("pick", [])
    return ", ".join(winner + (" (disturbed)" if "disturbed" in source else "")
                     for winner, source in picks) or "—"


def rule_legend(labels: Sequence[str]) -> str:
    """One line per subject: its traffic and its peer."""
    subjects = {s.label: s for group in SUBJECTS.values() for s in group}
    lines = []
    for label in labels:
        subject = subjects[label]
        lines.append(f"- **{label}**: `adamgen.rule({subject.rule!r}"
                     + "".join(f", {k}={v!r}" for k, v in subject.options)
                     + f").optimizer(params)`; its peer `{subject.peer}`")
    return "\n".join(lines) + "\n"


def rule_table(all_cases: Sequence[Case], labels: Sequence[str], suite: str) -> str:
    """Per rule, thread count and size: adamgen's time and GB/s of the rule's own traffic, its
    share of the probe with that traffic, the peer's time and the peer's time over adamgen's."""
    chosen = rule_cases(all_cases, labels, suite)
    if not chosen:
        return "Not measured in this run.\n"
    header = ["rule", "read / written", "thr", "N", "adamgen", "pick", "GB/s", "% of its probe",
              "probe GB/s", "peer", "× peer", "clean rounds"]
    rows = [[c.rule, f"{c.traffic[0]} / {c.traffic[1]}", str(c.threads), size_cell(c),
             fmt_time(c.seconds(PICK)), pick_cell(c), fmt_num(c.gbps(PICK), ".1f"),
             fmt_num(c.percent_of_roof(PICK), ".0f", " %"),
             fmt_num(c.bytes / c.roof[1] / 1e9, ".1f"), fmt_time(c.seconds(PEER)),
             fmt_num(c.ratio(PICK, PEER), ".2f"), clean_cell(c)] for c in chosen]
    return table(header, rows)


def rule_section(results: dict[str, Any], all_cases: Sequence[Case]) -> list[str]:
    """The rule family: each selected rule beyond cache, then on many tensors."""
    labels = rule_labels(results)
    if not labels:
        return []
    plan = results["plan"]
    sizes = ", ".join(f"{n:.0e}" for n in plan.get("rule_sizes", ()))
    settle = 1e3 * plan.get("settle_seconds", 0)
    intro = ("Each rule's optimizer updates float32 parameters in place, one C call over every "
             "tensor per step, its gradients written once into the buffer it owns. The probe "
             "reads and writes exactly the arrays that rule's step reads and writes (GB/s counts "
             "that traffic); the peer runs with the same hyperparameters on tensors of its own. "
             f"At more than one thread every burst follows {settle:.0f} ms of untimed calls, so "
             "the OpenMP pool of the previous contender (torch bundles its own) has stopped "
             "spinning. *pick* is the variant the loader chose for the step (`c` serial C, "
             "`c-omp` threaded; *disturbed*: its measurement was disturbed twice, so it fell "
             "back to serial C for this process).\n")
    many = (f"### Many tensors: {plan['multi_count']} float32 tensors of {plan['multi_size']} "
            "elements\n")
    return ["## Every rule in place: against a probe with its own traffic, and its peer\n",
            intro, rule_legend(labels), f"### One tensor beyond cache (N = {sizes})\n",
            rule_table(all_cases, labels, "rule"), many,
            ("`% of its probe` compares with the probe on one flat buffer of the same total "
             "size.\n"),
            rule_table(all_cases, labels, "rule-multi")]


def clean_cell(case: Case) -> str:
    """Undisturbed rounds of the least lucky contender; ⚠ when its median had to use others."""
    clean, rounds = case.clean
    return f"{clean}/{rounds}" + (" ⚠" if clean < min(3, rounds) else "")


def variants_table(all_cases: Sequence[Case]) -> str:
    with_variants = [c for c in find(all_cases, "sweep") if c.adamgen_names()]
    if not with_variants:
        return ("The loader had no variants to choose between in this run (one candidate per "
                "call, or a runtime without the measured choice), so none was forced.\n")
    names: list[str] = []
    for family in ("variant", "kernel"):
        for case in with_variants:
            names += [n for n in case.names(family) if n not in names]
    header = ["mode", "dtype", "thr", "N", "pick", *names, "pick vs best forced"]
    rows = []
    for case in sorted(with_variants, key=lambda c: (c.mode, c.dtype, c.threads, c.n)):
        best = case.best_variant()[1]
        pick = case.seconds(PICK)
        gap = ("—" if math.isnan(best) else f"{100 * (pick / best - 1):+.0f} %"
               if case.n >= 1000 else f"{(pick - best) * 1e6:+.2f} µs")
        rows.append([case.mode, case.dtype, str(case.threads), f"{case.n:.0e}",
                     fmt_time(pick), *[fmt_time(case.seconds(n)) for n in names], gap])
    return table(header, rows)


def per_thread_table(all_cases: Sequence[Case], suite: str, reference: str,
                     *, unit: str = "time") -> str:
    """Rows: contenders; columns: time and ratio to ``reference`` at each thread count."""
    group = sorted(find(all_cases, suite), key=lambda c: c.threads)
    if not group:
        return "Not measured in this run.\n"
    names: list[str] = []
    for case in group:
        names += [n for n in case.timings if n not in names]
    header = ["implementation"]
    for case in group:
        header += [f"{case.threads} thr", "GB/s" if unit == "time" else "calls/s",
                   f"{reference} is × faster"]
    rows = []
    for name in names:
        row = [name]
        for case in group:
            seconds = case.seconds(name)
            error = case.timings.get(name, {}).get("error", "")
            row += [("error: " + error[:40]) if error else fmt_time(seconds),
                    fmt_num(case.gbps(name), ".1f") if unit == "time"
                    else fmt_num(1 / seconds, ".3g"),
                    fmt_num(case.ratio(reference, name), ".2f")]
        rows.append(row)
    rows.append(["*clean rounds*", *[cell for case in group
                                     for cell in (clean_cell(case), "", "")]])
    return table(header, rows)


def gil_table(results: dict[str, Any]) -> str:
    rows = []
    for worker in results["workers"]:
        for row in worker.get("gil", []):
            rows.append([row["impl"], f"{row['n']:.0e}", fmt_time(row["one_thread"]),
                         f"{row['ratio']:.2f}", f"{row['ratio_min']:.2f}",
                         f"{row['clean']}/{row['rounds']}"
                         + (" ⚠" if row["clean"] < min(3, row["rounds"]) else "")])
    if not rows:
        return "Not measured in this run.\n"
    return table(["implementation", "N (float32)", "one step, one thread",
                  "two threads / one (median)", "(best round)", "clean rounds"], rows)


def targets_section(results: dict[str, Any]) -> str:
    """The targets this run measured, each goal's yardstick explained, and a count of those
    whose sizes it did not sweep (a ``--quick`` run leaves out everything beyond cache)."""
    checked = targets(results)
    shown = [t for t in checked if t.detail != NOT_IN_RUN]
    goals = [f"- **{goal}**: {text}" for goal, text in GOALS.items()
             if any(t.goal == goal for t in shown)]
    parts = ["adamgen's own speed goals, each against a yardstick measured in the same run:\n",
             "\n".join(goals) + "\n"]
    if shown:
        parts.append(table(["goal", "target", "case", "measured", "status", "gap"],
                           [[t.goal, t.promise, t.case, t.measured,
                             {"met": "met", "short": "**short**"}.get(t.status, t.status),
                             t.detail] for t in shown]))
    skipped = len(checked) - len(shown)
    if skipped:
        parts.append(f"{skipped} more target{'s' if skipped > 1 else ''} need sizes or cases "
                     "this run did not measure (a full run without `--quick` or `--sizes` "
                     "checks every target).\n")
    return "\n".join(parts)


def machine_lines(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    software = ", ".join([f"Python {machine['python']}", f"numpy {machine['numpy']}",
                          *(f"{k} {v}" for k, v in optional_versions(results).items() if v)])
    commit = (f"at commit {machine['commit']}" if machine.get("commit") not in (None, "")
              else "(not run from a git checkout)")
    lines = [
        f"- **CPU**: {machine['cpu']} ({machine['cores']}); caches: {machine['caches']}",
        f"- **Memory**: {machine['memory']}; kernel {machine['kernel']}",
        f"- **Software**: {software}; {machine['compiler']}",
        f"- **adamgen**: {machine['adamgen']} {commit}",
        f"- **Probe flags**: `{' '.join(machine['probe_flags']) or 'probe not built'}`",
    ]
    if machine.get("unset"):
        lines.append(f"- Unset for the workers: {', '.join(machine['unset'])} (they slow NumPy "
                     "on this machine, PERFORMANCE-NOTES).")
    return lines


def markdown(results: dict[str, Any], plot_name: str | None) -> str:
    all_cases = cases(results)
    peers = present_peers(all_cases)
    plan = results["plan"]
    parts = [f"# adamgen benchmark report{' (quick)' if plan['quick'] else ''}\n",
             f"Run {results['started']} in {results['seconds']:.0f} s: `{results['command']}`\n",
             "\n".join(machine_lines(results)) + "\n"]
    missing = missing_columns(results)
    if missing:
        parts.append("**Missing columns.** " + " ".join(missing) + "\n")
    for worker in results["workers"]:
        if worker.get("failed"):
            parts.append(f"**Worker at {worker['threads']} thread(s) failed**: "
                         f"{worker['failed']}\n")
        if worker.get("environment", {}).get("probe_error"):
            parts.append(f"**No probe** ({worker['environment']['probe_error']}): % of probe "
                         "is missing.\n")
    parts.append("Every figure is the median of interleaved rounds in one process per thread "
                 "count. This VM is shared: a sample during which our threads waited for a CPU "
                 "(other tenants, `/proc/self/task/*/schedstat`) more than 5 % of the time is "
                 "left out when three clean ones remain; *clean rounds* gives the least lucky "
                 "contender's count, ⚠ where its median had to include disturbed samples. "
                 "Ratios (×) are a peer's time over adamgen's: above 1 adamgen is faster. "
                 "GB/s counts 28 bytes per float32 element and 56 per float64 (one Adam "
                 "step's traffic: 4 arrays read, 3 written; the rule family counts each rule's "
                 "own); the probe is a plain C loop with exactly that traffic, serial and "
                 "OpenMP, the best of which is the roof.\n")
    if plot_name:
        parts.append(f"![throughput against N]({plot_name})\n")
    parts.append("## Speed targets (float32)\n")
    parts.append(targets_section(results))
    parts += rule_section(results, all_cases)
    if not ivy_selected(results):
        return "\n".join(parts)
    for mode, title in (("inplace", "In place: `adamgen.Adam([w]).step()` with owned grads"),
                        ("functional", "Functional: `adamgen.adam_update` (three fresh outputs)")):
        for dtype in plan["dtypes"]:
            parts.append(f"## {title}, {dtype}\n")
            parts.append(sweep_table(all_cases, mode, dtype, peers))
    parts.append("## The loader's pick against every variant forced by name\n")
    parts.append(variants_table(all_cases))
    parts.append(f"## Many tensors: {plan['multi_count']} float32 tensors of "
                 f"{plan['multi_size']} elements\n")
    parts.append("`step()` uses the optimizer's own gradient buffer, `step(list)` takes a list "
                 "of gradient arrays, `flat buffer` is one tensor of the same total size; peers "
                 "loop over the tensors (torch's fused and foreach kernels take them all).\n")
    parts.append(per_thread_table(all_cases, "multi", "adamgen step()"))
    parts.append(f"## Per-call overhead: one float32 tensor of {plan['tiny_size']} elements\n")
    parts.append(per_thread_table(all_cases, "tiny", "adamgen step()", unit="calls"))
    parts.append("## The GIL: two Python threads, each updating its own array\n")
    parts.append("At `ADAMGEN_NUM_THREADS=1`, one thread runs steps alone, then two threads run "
                 "the same number of steps each at once. About 1 means the call releases the "
                 "GIL; 2 means it holds it (the numba control). Beyond cache the two threads "
                 "share memory bandwidth, so the bare C probe shows what the memory allows.\n")
    parts.append(gil_table(results))
    return "\n".join(parts)
