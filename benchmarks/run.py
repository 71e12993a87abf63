"""The benchmark's entry point: ``python -m benchmarks.run`` (or ``adamgen bench``).

For every built-in rule selected with ``--rule`` (default: all of them), its in-place optimizer
beyond cache (N = 1e7, 3e7, float32) against a bandwidth probe with that rule's own traffic, and
on 500 tensors of 4096 elements against its peer (:mod:`benchmarks.rules`). For the Ivy rule
also its own suite: float32 and float64, N from 16 to 3e7, the in-place optimizer step and the
functional ``adam_update``, against every peer and the probe; then the many-tensor, per-call
overhead and GIL cases. One worker process per thread count (1 and 2; see
:mod:`benchmarks.worker`), run one after the other so they never compete for the cores.

Writes into ``--out`` (default ``bench-results/``): ``report.md`` (the tables, targets first),
``throughput.png`` (with matplotlib) and ``results.json`` (every sample, to re-render with
``--render``). ``--quick`` is the CI smoke run: small sizes, few rounds, well under a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # ``python benchmarks/run.py``: run the package
    import runpy

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    runpy.run_module("benchmarks.run", run_name="__main__", alter_sys=True)

from . import plot, report
from .plan import DTYPES, Plan, make_plan
from .progress import Progress
from .rules import RULES, check_rule_names
from .summary import summary
from .worker import PROGRESS

#: ``benchmarks`` in a source checkout, ``adamgen.benchmarks`` when installed with adamgen.
PACKAGE = __package__ or "benchmarks"
#: The source checkout the suite runs from (for ``git describe``), or None when installed.
CHECKOUT = Path(__file__).resolve().parents[1]
if not (CHECKOUT / ".git").exists():
    CHECKOUT = None
#: Variables removed from the workers' environment: OpenBLAS tuning that slows NumPy here
#: (PERFORMANCE-NOTES) and a forced variant, which would make "the loader's pick" a lie.
UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "ADAMGEN_VARIANT")
REPORT, PLOT, DATA = "report.md", "throughput.png", "results.json"


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(float(part)) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("sizes must be >= 1")
    return sizes


def _choices(accepted: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(part.strip() for part in text.split(",") if part.strip())
        wrong = [v for v in values if v not in accepted]
        if wrong or not values:
            raise argparse.ArgumentTypeError(f"accepted: {', '.join(accepted)}")
        return values
    return parse


def _rules(text: str) -> tuple[str, ...]:
    """``--rule torch_adam`` or ``--rule torch_adam,lion``: built-in rule names, checked."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        return check_rule_names(names) if names else check_rule_names([text])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _threads(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of thread counts: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("thread counts must be >= 1")
    return values


def build_parser(prog: str = f"python -m {PACKAGE}.run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark adamgen against its peers and the memory-bandwidth limit.")
    parser.add_argument("--quick", action="store_true",
                        help="the CI smoke run: small sizes, few rounds (about a minute)")
    parser.add_argument("--rule", action="append", type=_rules, metavar="NAME",
                        help="benchmark this built-in rule (repeatable, or comma-separated; "
                             f"default: every rule: {', '.join(RULES)}); ivy_adam also runs "
                             "the Ivy sweep, torch_adam also its AMSGrad variant")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for report.md, throughput.png, results.json")
    parser.add_argument("--sizes", type=_sizes,
                        help="the Ivy sweep's comma-separated N, e.g. 1e3,1e6,3e7")
    parser.add_argument("--rule-sizes", type=_sizes, metavar="SIZES",
                        help="the rule family's one-tensor N (default 1e7,3e7; quick 1e5)")
    parser.add_argument("--dtypes", type=_choices(DTYPES), help="float32,float64")
    parser.add_argument("--threads", type=_threads, help="thread counts, e.g. 1,2")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per case")
    parser.add_argument("--wait-quiet", type=float, metavar="SECONDS",
                        help="before each case, wait up to SECONDS for other processes to "
                             "leave the CPUs (this machine is shared; default: do not wait)")
    parser.add_argument("--no-forced", action="store_true",
                        help="time only the loader's pick, not every variant forced by name")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: re-render the report from a results.json")
    return parser


def machine_info(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """What the report says about this machine (``lscpu``, memory, versions, commit)."""
    import numpy as np

    import adamgen
    from adamgen.codegen.build import probe_compiler

    lscpu: dict[str, str] = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            lscpu[key.strip()] = value.strip()
    except OSError:
        pass
    memory = "unknown"
    try:
        with open("/proc/meminfo", encoding="utf-8") as stream:
            kib = int(stream.readline().split()[1])
        memory = f"{kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    commit = ""
    if CHECKOUT is not None:
        try:
            commit = subprocess.run(["git", "-C", str(CHECKOUT), "describe", "--always",
                                     "--dirty"], capture_output=True, text=True,
                                    check=False).stdout.strip()
        except OSError:
            pass
    cores = (f"{os.cpu_count()} logical CPUs: {lscpu.get('Socket(s)', '?')} socket(s) x "
             f"{lscpu.get('Core(s) per socket', '?')} core(s) x "
             f"{lscpu.get('Thread(s) per core', '?')} thread(s)")
    caches = ", ".join(f"{name} {lscpu[name]}" for name in ("L1d cache", "L2 cache", "L3 cache")
                       if name in lscpu) or "unknown"
    flags = lscpu.get("Flags", "")
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    environment = workers[0].get("environment", {}) if workers else {}
    return {
        "cpu": " ".join(filter(None, [lscpu.get("Model name", platform.processor()), simd,
                                      lscpu.get("Hypervisor vendor", "") and
                                      f"(VM, {lscpu['Hypervisor vendor']})"])),
        "cores": cores, "caches": caches, "memory": memory, "kernel": platform.release(),
        "python": platform.python_version(), "numpy": np.__version__,
        "compiler": probe_compiler().version, "adamgen": adamgen.__version__,
        "commit": commit, "probe_flags": environment.get("probe_flags", []),
        "unset": [name for name in UNSET[:2] if name in os.environ],
    }


def worker_environment(threads: int, plan: Plan) -> dict[str, str]:
    """This environment with the thread counts set, and this process's ``sys.path`` as
    ``PYTHONPATH``: a worker imports the same adamgen and the same suite as its parent, however
    the parent found them (a checkout, an installed wheel, ``pip install --target``)."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    count = str(threads)
    env.update(ADAMGEN_NUM_THREADS=count, OMP_NUM_THREADS=count, MKL_NUM_THREADS=count,
               OPENBLAS_NUM_THREADS=count, NUMEXPR_NUM_THREADS=count,
               NUMEXPR_MAX_THREADS=str(max(plan.threads)))
    env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
    return env


def run_worker(plan: Plan, threads: int, bar: Progress) -> dict[str, Any]:
    """One worker process; its progress lines move the bar, its other output goes to stderr."""
    with tempfile.TemporaryDirectory(prefix="adamgen-bench-") as scratch:
        out = Path(scratch, "worker.json")
        argv = [sys.executable, "-m", f"{PACKAGE}.worker", "--threads", str(threads),
                "--plan", plan.to_json(), "--out", str(out)]
        process = subprocess.Popen(argv, env=worker_environment(threads, plan), cwd=scratch,
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith(PROGRESS):
                bar.advance(line[len(PROGRESS):].strip())
            else:
                sys.stderr.write(line)
        code = process.wait()
        if code != 0 or not out.is_file():
            return {"threads": threads, "records": [], "gil": [], "environment": {},
                    "failed": f"exit status {code}: {shlex.join(argv[:3])} ..."}
        return json.loads(out.read_text(encoding="utf-8"))


def render(results: dict[str, Any], out: Path) -> list[Path]:
    """Write the report (and the plot, with matplotlib) from ``results`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    plot_written = plot.write_png(results, out / PLOT)
    if plot_written:
        written.append(out / PLOT)
    (out / REPORT).write_text(report.markdown(results, PLOT if plot_written else None),
                              encoding="utf-8")
    written.insert(0, out / REPORT)
    return written


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark (or re-render one); ``prog`` names the command in help and reports
    (``adamgen bench`` forwards its arguments here)."""
    prog = prog or f"python -m {PACKAGE}.run"
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text(encoding="utf-8"))
        print(summary(results, render(results, args.out)))
        return 0
    rules = None if args.rule is None else tuple(name for names in args.rule for name in names)
    plan = make_plan(quick=args.quick, sizes=args.sizes, dtypes=args.dtypes,
                     threads=args.threads, rounds=args.rounds, forced=not args.no_forced,
                     wait_quiet=args.wait_quiet, rules=rules, rule_sizes=args.rule_sizes)
    started, stamp = time.monotonic(), datetime.datetime.now().astimezone()
    bar = Progress(sum(plan.units(t) for t in plan.threads))
    workers = [run_worker(plan, threads, bar) for threads in plan.threads]
    bar.close()
    results = {"plan": json.loads(plan.to_json()), "workers": workers,
               "machine": machine_info(workers),
               "command": f"{prog} {shlex.join(argv)}".strip(),
               "started": stamp.isoformat(timespec="seconds"),
               "seconds": time.monotonic() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / DATA).write_text(json.dumps(results), encoding="utf-8")
    print(summary(results, render(results, args.out) + [args.out / DATA]))
    failed = [w for w in workers if w.get("failed")]
    for worker in failed:
        print(f"benchmark worker at {worker['threads']} thread(s) failed: {worker['failed']}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
