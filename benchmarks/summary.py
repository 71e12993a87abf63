"""What a run prints on the terminal: a short table and where the rest is.

The Markdown report holds every table; the terminal gets the ones a reader wants first: adamgen's
in-place float32 step against each peer at every size and thread count of the run, with its
share of the bandwidth probe (the Ivy rule's sweep), each selected rule's optimizer against a
probe with its own traffic and against its peer, then a count of the targets and the paths
written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import (
    OPTIONAL_EFFECTS,
    fmt_num,
    fmt_time,
    optional_versions,
    present_peers,
    rule_cases,
    size_cell,
)
from .results import PEER, PICK, cases, find, ivy_selected, rule_labels, targets


def aligned(header: Sequence[str], rows: Sequence[Sequence[str]],
            over: tuple[int, str] | None = None) -> list[str]:
    """Plain-text columns, right-aligned, as wide as their widest cell; ``over`` is a label
    written above the columns from index ``over[0]`` on."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths))
             for row in [header, *rows]]
    if over is not None:
        lines.insert(0, " " * sum(width + 2 for width in widths[:over[0]]) + over[1])
    return lines


def peer_table(results: dict[str, Any], mode: str = "inplace",
               dtype: str = "float32") -> list[str]:
    """adamgen's time and % of the probe, and each peer's time over adamgen's (above 1:
    adamgen is faster), one row per thread count and size."""
    chosen = sorted(find(cases(results), "sweep", mode=mode, dtype=dtype),
                    key=lambda c: (c.threads, c.n))
    if not chosen:
        return []
    peers = present_peers(chosen)
    header = ["threads", "N", "adamgen", "% of probe", *peers]
    rows = [[str(c.threads), f"{c.n:.0e}" if c.n >= 1000 else str(c.n),
             fmt_time(c.seconds(PICK)), fmt_num(c.percent_of_roof(PICK), ".0f", " %"),
             *[fmt_num(c.ratio(PICK, p), ".2f") for p in peers]] for c in chosen]
    return aligned(header, rows, over=(4, "× (each peer's time over adamgen's)") if peers
                   else None)


def rule_table(results: dict[str, Any]) -> list[str]:
    """Per selected rule, thread count and size (one tensor, then many): adamgen's time, its
    share of the probe with the rule's traffic, and the peer's time over adamgen's."""
    all_cases = cases(results)
    labels = rule_labels(results)
    chosen = rule_cases(all_cases, labels, "rule") + rule_cases(all_cases, labels, "rule-multi")
    if not chosen:
        return []
    header = ["rule", "threads", "N", "adamgen", "% of its probe", "× peer"]
    rows = [[c.rule, str(c.threads), size_cell(c), fmt_time(c.seconds(PICK)),
             fmt_num(c.percent_of_roof(PICK), ".0f", " %"),
             fmt_num(c.ratio(PICK, PEER), ".2f")] for c in chosen]
    return aligned(header, rows)


def summary(results: dict[str, Any], written: Sequence[Path]) -> str:
    """The terminal's summary of a run whose files are ``written``."""
    lines = [""]
    if ivy_selected(results):
        lines += [("adamgen.Adam([w]).step(), float32, against each peer: above 1, adamgen "
                   "is faster. % of probe is"),
                  ("adamgen's share of the memory-bandwidth limit (a plain C loop with one "
                   "step's traffic)."), ""]
        table = peer_table(results)
        lines += ["  " + line for line in table] if table else ["  (no in-place float32 case)"]
        lines.append("")
    family = rule_table(results)
    if family:
        lines += [("Each rule's optimizer, float32, in place: % of a probe with that rule's own "
                   "traffic, and"),
                  "its peer's time over adamgen's (above 1, adamgen is faster).", ""]
        lines += ["  " + line for line in family]
    checked = targets(results)
    counts = {status: sum(t.status == status for t in checked)
              for status in ("met", "short", "not measured")}
    lines += ["", (f"Speed targets: {counts['met']} met, {counts['short']} short, "
                   f"{counts['not measured']} not measured in this run (the report says "
                   "which; a full run measures all).")]
    missing = [name for name, version in optional_versions(results).items()
               if version is None and name in OPTIONAL_EFFECTS]
    if missing:
        lines.append("Not installed: " + "; ".join(
            f"{name} ({OPTIONAL_EFFECTS[name][0]}: pip install {OPTIONAL_EFFECTS[name][1]})"
            for name in missing) + ". Or install adamgen with its `bench` extra (README).")
    lines += ["", "Written:", *(f"  {path}" for path in written)]
    return "\n".join(lines)
