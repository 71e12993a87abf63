"""The functional hot path: ``adamgen.adam_update`` against Ivy's NumPy expression, side by side.

Run it with ``python -m benchmarks.hotpath`` (under a minute). Options: ``--sizes 16,1e3``,
``--dtypes float32``, ``--threads 1,2``, ``--rounds N``, ``--json PATH`` (every sample).

What is timed, per thread count, dtype and N, in one process, interleaved:

* ``adamgen``: ``adamgen.adam_update(w, g, lr, m, v, t)``, the public call: three fresh outputs,
  the step counting up (after its first call, a call of this signature takes its remembered
  shortcut, :mod:`adamgen.runtime.hotpath`);
* ``adamgen, whole way``: the same call through an ``Updater`` without a hot path, which
  validates and dispatches every call from scratch (what every call cost before shortcuts);
* ``numpy naive``: Ivy's NumPy expression (:func:`benchmarks.peers.ivy_expression`), the seed's
  math with its temporaries, as :mod:`benchmarks.run` times it.

At one thread it also times the lr rule on an array ``lr`` of 1e6 elements
(:func:`adamgen.runtime.validate.check_lr`) against the checks it was chosen over.

The rules of :mod:`benchmarks.timing` hold: one process per thread count (``ADAMGEN_NUM_THREADS``
and ``OMP_NUM_THREADS`` set), contenders interleaved in rotated order, bursts of about 3 ms
after 3 ms of untimed calls, medians over rounds; a burst during which this process's threads
waited for a CPU (``/proc/self/task/*/schedstat``) more than 5 % of the time, or whose round ran
on shared cores (a GIL-free spin, alone and in parallel), is set aside when three clean ones
remain. The goal checked at the end (issue 12, item 14): ``adamgen`` at least 1.5x the NumPy
expression at N=16 and never slower than it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
SIZES = (16, 1_000, 10_000, 100_000)
DTYPES = ("float32", "float64")
THREADS = (1, 2)
ROUNDS = 11
TARGET_SECONDS = WARM_SECONDS = 0.003
GOAL_AT_16, GOAL_EVERYWHERE = 1.5, 1.0
LR_CHECK_SIZE = 1_000_000


def contenders(w: Any, g: Any, m: Any, v: Any) -> list[Any]:
    """adamgen (on its shortcut), adamgen the whole way, and Ivy's NumPy expression."""
    import adamgen
    from adamgen.runtime import api, dispatch

    from .peers import LR, Counter, ivy_expression
    from .timing import Contender

    whole_way = api.Updater(api._JIT.kernels, runner=dispatch.run_update)  # no hot path
    counters = Counter(), Counter(), Counter()
    update = adamgen.adam_update
    return [
        Contender("adamgen", "adamgen", lambda: update(w, g, LR, m, v, counters[0].next())),
        Contender("adamgen, whole way", "adamgen",
                  lambda: whole_way(w, g, LR, m, v, counters[1].next())),
        Contender("numpy naive", "peer",
                  lambda: ivy_expression(w, g, LR, m, v, counters[2].next())),
    ]


def lr_contenders(n: int, dtype: str) -> list[Any]:
    """The lr rule on an array lr of ``n`` elements: adamgen's check (one integer max over the
    bits), the alternatives it was chosen over, and one update with that lr for scale."""
    import numpy as np

    import adamgen
    from adamgen.runtime.validate import check_lr

    from .timing import Contender
    from .worker import make_arrays

    w, g, m, v = make_arrays(n, dtype)
    lr = np.full(n, 1e-3, dtype)
    return [
        Contender("check_lr", "adamgen", lambda: check_lr(lr)),
        Contender("min and max", "peer", lambda: (lr.min() >= 0, lr.max() < np.inf)),
        Contender("isfinite().all() and (lr >= 0).all()", "peer",
                  lambda: np.isfinite(lr).all() and (lr >= 0).all()),
        Contender("adam_update with this lr", "adamgen",
                  lambda: adamgen.adam_update(w, g, lr, m, v, 3)),
    ]


def worker(threads: int, sizes: tuple[int, ...], dtypes: tuple[str, ...],
           rounds: int) -> list[dict[str, Any]]:
    """Every case at this process's thread count (set by the parent's environment)."""
    from .load import CapacityCheck
    from .probe import build_probe
    from .timing import measure
    from .worker import make_arrays

    try:
        check: CapacityCheck | None = CapacityCheck(build_probe().spin, threads)
    except Exception:  # noqa: BLE001 - without the probe, waits alone flag disturbances
        check = None
    cases = [("update", dtype, n) for dtype in dtypes for n in sizes]
    if threads == 1:
        cases += [("lr check", dtype, LR_CHECK_SIZE) for dtype in dtypes]
    records = []
    for suite, dtype, n in cases:
        timed = contenders(*make_arrays(n, dtype)) if suite == "update" else \
            lr_contenders(n, dtype)
        for timing in measure(timed, rounds=rounds, target_seconds=TARGET_SECONDS,
                              warm_seconds=WARM_SECONDS, check=check):
            records.append({"suite": suite, "threads": threads, "dtype": dtype, "n": n,
                            "impl": timing.name, "seconds": timing.seconds,
                            "samples": timing.samples, "waits": timing.waits,
                            "clean": timing.clean, "error": timing.error})
        print(f"  {threads} thr {dtype} N={_n(n)} {suite}", file=sys.stderr, flush=True)
    return records


def run_worker(threads: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One fresh process per thread count: adamgen and OpenMP read the count at start-up."""
    env = {k: v for k, v in os.environ.items() if k != "ADAMGEN_VARIANT"}
    env.update(ADAMGEN_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="adamgen-hotpath-") as scratch:
        out = Path(scratch, "records.json")
        argv = [sys.executable, "-m", "benchmarks.hotpath", "--worker", str(threads),
                "--sizes", ",".join(map(str, args.sizes)), "--dtypes", ",".join(args.dtypes),
                "--rounds", str(args.rounds), "--json", str(out)]
        subprocess.run(argv, env=env, cwd=ROOT, check=True)
        return json.loads(out.read_text(encoding="utf-8"))


def lr_table(records: list[dict[str, Any]]) -> str:
    """The lr check's cost against its alternatives and one update (one thread)."""
    lines = ["| dtype | N | implementation | median | clean rounds |", "|---|---|---|---|---|"]
    for record in records:
        if record.get("suite") == "lr check":
            lines.append(f"| {record['dtype']} | {_n(record['n'])} | {record['impl']} | "
                         f"{_time(record['seconds'])} | {record['clean']}/"
                         f"{len(record['samples'])} |")
    return "\n".join(lines)


def table(records: list[dict[str, Any]]) -> str:
    """The markdown table: per case the three medians, the speed-up, the clean rounds."""
    lines = [("| thr | dtype | N | adamgen | adamgen, whole way | numpy naive | "
              "adamgen × faster than numpy naive | clean rounds (least) |"),
             "|---|---|---|---|---|---|---|---|"]
    for (threads, dtype, n), case in _cases(records).items():
        ratio = case["numpy naive"]["seconds"] / case["adamgen"]["seconds"]
        clean = min(r["clean"] for r in case.values())
        times = " | ".join(_time(case[name]["seconds"])
                           for name in ("adamgen", "adamgen, whole way", "numpy naive"))
        lines.append(f"| {threads} | {dtype} | {_n(n)} | {times} | {ratio:.2f} | "
                     f"{clean}/{len(case['adamgen']['samples'])} |")
    return "\n".join(lines)


def goals(records: list[dict[str, Any]]) -> list[str]:
    """One line per case that misses the goal (empty: every goal met)."""
    short = []
    for (threads, dtype, n), case in _cases(records).items():
        ratio = case["numpy naive"]["seconds"] / case["adamgen"]["seconds"]
        goal = GOAL_AT_16 if n == 16 else GOAL_EVERYWHERE
        if not ratio >= goal:
            short.append(f"short: {threads} thr {dtype} N={_n(n)}: {ratio:.2f}x, goal {goal}x")
    return short


def _cases(records: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[str, Any]]]:
    cases: dict[tuple, dict[str, dict[str, Any]]] = {}
    for record in records:
        if record.get("suite", "update") != "update":
            continue
        cases.setdefault((record["threads"], record["dtype"], record["n"]), {})[
            record["impl"]] = record
    return cases


def _n(n: int) -> str:
    return str(n) if n < 1000 else f"{n:.0e}"


def _time(seconds: float) -> str:
    return f"{seconds * 1e6:.3g} µs" if seconds < 1e-3 else f"{seconds * 1e3:.3g} ms"


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(float(part)) for part in text.split(",") if part.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotpath", description=(
        "adamgen.adam_update against Ivy's NumPy expression, interleaved, per thread count."))
    parser.add_argument("--sizes", type=_sizes, default=SIZES, help="e.g. 16,1e3,1e4,1e5")
    parser.add_argument("--dtypes", type=_names, default=DTYPES, help="float32,float64")
    parser.add_argument("--threads", type=_sizes, default=THREADS, help="e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds")
    parser.add_argument("--json", type=Path, help="write every record (samples too) here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        records = worker(args.worker, args.sizes, args.dtypes, args.rounds)
    else:
        records = [r for threads in args.threads for r in run_worker(threads, args)]
    if args.json is not None:
        args.json.write_text(json.dumps(records), encoding="utf-8")
    if args.worker is None:
        print(table(records))
        print()
        print(lr_table(records))
        print()
        for line in goals(records) or ["every goal met: >= 1.5x at N=16, >= 1x everywhere"]:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
