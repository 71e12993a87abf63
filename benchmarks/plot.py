"""The PNG: throughput against N, one line per implementation, the probe as the roof.

One panel per (mode, dtype, thread count); the probe is drawn as a shaded roof, adamgen's pick
as the thick line, forced variants thin and dashed, peers in fixed colours across panels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .results import PEERS, PICK, cases, find

COLOURS = {PICK: "#d62728", "numpy naive": "#7f7f7f", "numpy best": "#8c564b",
           "numexpr": "#9467bd", "numba": "#2ca02c", "torch fused": "#1f77b4",
           "torch foreach": "#17becf"}


def write_png(results: dict[str, Any], path: Path) -> bool:
    """Draw the plot into ``path``; False (nothing written) without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    all_cases = find(cases(results), "sweep")
    panels = sorted({(c.mode, c.dtype, c.threads) for c in all_cases},
                    key=lambda p: (p[0] != "inplace", p[1], p[2]))
    if not panels:
        return False
    columns = len({(d, t) for _, d, t in panels})
    rows = len({m for m, _, _ in panels})
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows),
                                squeeze=False, sharex=True)
    column_of = {key: i for i, key in enumerate(sorted({(d, t) for _, d, t in panels}))}
    row_of = {mode: i for i, mode in enumerate(sorted({m for m, _, _ in panels},
                                                      key=lambda m: m != "inplace"))}
    for mode, dtype, threads in panels:
        ax = axes[row_of[mode]][column_of[(dtype, threads)]]
        group = sorted((c for c in all_cases
                        if (c.mode, c.dtype, c.threads) == (mode, dtype, threads)),
                       key=lambda c: c.n)
        sizes = [c.n for c in group]
        roof = [c.bytes / c.roof[1] / 1e9 for c in group]
        if not all(math.isnan(r) for r in roof):
            ax.fill_between(sizes, roof, [1e-3] * len(roof), color="#f2e6c9", zorder=0)
            ax.plot(sizes, roof, color="#b8860b", lw=2.5, label="probe (roof)", zorder=1)
        names: list[str] = []
        for case in group:
            names += [n for n, r in case.timings.items()
                      if n not in names and r["family"] in ("adamgen", "variant", "kernel",
                                                            "peer")]
        for name in names:
            values = [c.gbps(name) for c in group]
            if all(math.isnan(v) for v in values):
                continue
            family = next(c.timings[name]["family"] for c in group if name in c.timings)
            style: dict[str, Any] = {"marker": "o", "ms": 3, "lw": 1.3,
                                     "color": COLOURS.get(name)}
            if name == PICK:
                style.update(lw=2.8, ms=5, zorder=5)
            elif family == "variant":
                style.update(ls="--", lw=1.0, marker="x", zorder=4)
            elif family == "kernel":
                style.update(ls=":", lw=1.2, marker="+", zorder=4, color="#ff7f0e"
                             if name.endswith("OpenMP") else "#e377c2")
            ax.plot(sizes, values, label=name, **style)
        title = "in place" if mode == "inplace" else "functional"
        ax.set_title(f"{title}, {dtype}, {threads} thread{'s' if threads > 1 else ''}",
                     fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.01)
        ax.grid(True, which="both", alpha=0.25)
        ax.set_xlabel("N (elements)")
        ax.set_ylabel("GB/s (one step's traffic)")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    order = ["probe (roof)", PICK] + [n for n in handles if n.startswith("adamgen[")] + \
        [n for n in handles if n.startswith("C kernel")] + [p for p in PEERS if p in handles]
    figure.legend([handles[n] for n in order if n in handles],
                  [n for n in order if n in handles], loc="lower center",
                  ncol=min(6, len(handles)), fontsize=9, frameon=False)
    figure.suptitle("Adam step throughput against N (higher is better; the shaded area is "
                    "under the bandwidth probe)", fontsize=11)
    figure.tight_layout(rect=(0, 0.07, 1, 0.96))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
