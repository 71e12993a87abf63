"""``adamgen.torch`` against torch's own optimizers, side by side in one run.

    python -m benchmarks.torch_step [--quick] [--rounds 9] [--json out.json]

Sections (each interleaved, medians of undisturbed samples, see :mod:`benchmarks.timing`):

* ``many``: 500 float32 parameters of 4096 elements, the whole ``optimizer.step()`` (torch's
  ``Optimizer`` machinery included): adamgen.torch.AdamW, torch fused, torch ``foreach=False``,
  at 1 and 2 threads (``torch.set_num_threads``, which adamgen follows);
* ``tiny``: one 16-element parameter against a do-nothing ``torch.optim.Optimizer`` subclass
  (a loop over its groups, ``@torch.no_grad()``), torch's own floor;
* ``large``: one parameter of 1e7 and 3e7 elements against the bandwidth probe with this rule's
  traffic (read param, grad, m, v; write param, m, v) on the same memory, at 1 and 2 threads;
* ``loop`` and ``policy``: the training loop of ``examples/train_torch.py`` (torch's backward
  runs just before each step), iterations interleaved between configurations; an iteration
  whose threads waited for a CPU more than :data:`benchmarks.load.DISTURBED` of its time is left
  out. ``loop`` gives the optimizer's share of an iteration for adamgen and torch; ``policy``
  crosses adamgen's thread count with torch's, and ``policy-passive`` repeats it in a child
  process with ``GOMP_SPINCOUNT=0`` (both OpenMP runtimes then sleep instead of spinning).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import adamgen.torch as agt
from adamgen.torch import _kernels

from .load import DISTURBED, CapacityCheck, run_delay, wait_until_quiet
from .probe import build_probe
from .timing import Contender, measure

ROOT = Path(__file__).resolve().parents[1]
#: torch's thread count at start (its default: the usable cores, or OMP_NUM_THREADS)
DEFAULT_THREADS = torch.get_num_threads()


class Nothing(torch.optim.Optimizer):
    """torch's floor: an optimizer whose step loops over its groups and returns."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for _ in self.param_groups:
            pass


def parameters(count: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    found = []
    for _ in range(count):
        p = torch.randn(size, generator=generator).requires_grad_()
        p.grad = torch.randn(size, generator=generator)
        found.append(p)
    return found


def threaded(threads: int) -> Callable[[], None]:
    return lambda: torch.set_num_threads(threads)


def table(results: list[Any], reference: str) -> list[dict[str, Any]]:
    """Rows of (name, seconds, clean samples, reference/this)."""
    base = next(r.seconds for r in results if r.name == reference)
    return [{"name": r.name, "seconds": r.seconds, "clean": r.clean, "of": len(r.samples),
             "speedup": r.seconds and base / r.seconds, "error": r.error} for r in results]


def many(check: CapacityCheck, rounds: int, quick: bool) -> dict[str, Any]:
    found = {}
    for threads in (1, 2):
        enter = threaded(threads)
        contenders = [
            Contender("adamgen.torch.AdamW", "adamgen", agt.AdamW(parameters(500, 4096)).step,
                      enter),
            Contender("torch AdamW fused", "peer",
                      torch.optim.AdamW(parameters(500, 4096), fused=True).step, enter),
            Contender("torch AdamW foreach=False", "peer",
                      torch.optim.AdamW(parameters(500, 4096), foreach=False).step, enter)]
        results = measure(contenders, rounds=rounds, target_seconds=0.05 if quick else 0.2,
                          warm_seconds=0.02, check=check)
        found[f"{threads} thread(s)"] = table(results, "adamgen.torch.AdamW")
    return found


def tiny(check: CapacityCheck, rounds: int, quick: bool) -> dict[str, Any]:
    enter = threaded(1)
    contenders = [Contender("adamgen.torch.AdamW", "adamgen", agt.AdamW(parameters(1, 16)).step,
                            enter),
                  Contender("do-nothing Optimizer", "probe", Nothing(parameters(1, 16)).step,
                            enter),
                  Contender("torch AdamW fused", "peer",
                            torch.optim.AdamW(parameters(1, 16), fused=True).step, enter)]
    results = measure(contenders, rounds=rounds, target_seconds=0.02 if quick else 0.1,
                      warm_seconds=0.01, check=check)
    return {"1 thread": table(results, "adamgen.torch.AdamW")}


def large(check: CapacityCheck, rounds: int, quick: bool) -> dict[str, Any]:
    """The probe runs on the optimizer's own memory (the parameter and gradient torch
    allocated, the state adamgen allocated), so both move the same bytes through the same
    pages: torch's and NumPy's large allocations differ in alignment and huge-page use, which
    alone moved the 1-thread ratio by 10 % here."""
    probe = build_probe()
    found = {}
    for size in (10_000_000,) if quick else (10_000_000, 30_000_000):
        params = parameters(1, size)
        optimizer = agt.AdamW(params)
        optimizer.step()
        state = optimizer.state[params[0]]
        grad = params[0].grad
        assert grad is not None
        arrays = [params[0].detach().numpy(), grad.numpy(), state["exp_avg"].numpy(),
                  state["exp_avg_sq"].numpy()]
        for threads in (1, 2):
            enter = threaded(threads)
            contenders = [
                Contender("adamgen.torch.AdamW", "adamgen", optimizer.step, enter),
                Contender("probe", "probe", probe.bind(*arrays,
                                                       threads=None if threads == 1 else threads))]
            results = measure(contenders, rounds=rounds, target_seconds=0.1, warm_seconds=0.0,
                              check=check)
            found[f"{size:.0e} elements, {threads} thread(s)"] = table(results, "probe")
        del optimizer, arrays, params, state
    return found


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("train_torch",
                                                  ROOT / "examples" / "train_torch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LoopRun:
    """One configuration of the training loop: model, optimizer, threads (torch's, adamgen's)."""

    def __init__(self, example: Any, name: str, cls: Callable[..., Any], torch_threads: int,
                 adamgen_threads: int | None = None, **options: Any) -> None:
        self.name, self.torch_threads, self.adamgen_threads = name, torch_threads, adamgen_threads
        self.model = example.build(64, 12, 0)
        self.optimizer = cls(example.groups(self.model), lr=1e-3, **options)
        self.iterations: list[float] = []
        self.steps: list[float] = []
        self.waits: list[float] = []

    def iterate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        torch.set_num_threads(self.torch_threads)
        if self.adamgen_threads is not None:
            threads = self.adamgen_threads
            _kernels.thread_count = lambda: threads
        waited = run_delay()
        start = time.perf_counter()
        self.optimizer.zero_grad()
        torch.nn.functional.cross_entropy(self.model(x), y).backward()
        before = time.perf_counter()
        self.optimizer.step()
        end = time.perf_counter()
        _kernels.thread_count = FOLLOW_TORCH
        self.iterations.append(end - start)
        self.steps.append(end - before)
        self.waits.append((run_delay() - waited) / (end - start))

    def row(self) -> dict[str, Any]:
        """Medians over the undisturbed iterations when at least a third are (threads that
        sleep between parallel regions wait for a CPU by design, so with a passive OpenMP
        runtime few are: then over all), and the mean and 90th percentile of the step, which
        carry the cost of the slow iterations a median hides."""
        clean = [i for i, wait in enumerate(self.waits) if not wait > DISTURBED]
        chosen = clean if 3 * len(clean) >= len(self.waits) else list(range(len(self.waits)))
        iteration = statistics.median(self.iterations[i] for i in chosen)
        step = statistics.median(self.steps[i] for i in chosen)
        return {"name": self.name, "iteration": iteration, "step": step,
                "share": step / iteration, "step_mean": statistics.fmean(self.steps),
                "step_p90": float(np.percentile(self.steps, 90)),
                "iteration_mean": statistics.fmean(self.iterations), "clean": len(clean),
                "samples": len(self.waits), "median_over": "clean" if chosen is clean else "all"}


FOLLOW_TORCH = _kernels.thread_count


def loop(runs: list[LoopRun], iterations: int) -> list[dict[str, Any]]:
    x, y, _, _ = load_example().load_digits(0)
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, len(x), 128)]
    for index in range(iterations):
        shift = index % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.iterate(*batches[index % len(batches)])
    return [run.row() for run in runs]


def training(quick: bool) -> dict[str, Any]:
    example = load_example()
    found = {}
    for threads in sorted({1, DEFAULT_THREADS}):
        runs = [LoopRun(example, "adamgen.torch.AdamW", agt.AdamW, threads),
                LoopRun(example, "torch AdamW fused", torch.optim.AdamW, threads, fused=True),
                LoopRun(example, "torch AdamW (default)", torch.optim.AdamW, threads)]
        found[f"torch threads {threads}"] = loop(runs, 60 if quick else 400)
    return found


def policy(quick: bool) -> dict[str, Any]:
    example = load_example()
    runs = [LoopRun(example, f"torch {t}, adamgen {a}", agt.AdamW, t, a)
            for t in (1, 2) for a in (1, 2)]
    runs += [LoopRun(example, f"torch {t}, torch fused", torch.optim.AdamW, t, fused=True)
             for t in (1, 2)]
    return {"spinning (default)": loop(runs, 40 if quick else 300)}


def passive(quick: bool) -> dict[str, Any]:
    """``policy`` in a child process whose OpenMP runtimes sleep instead of spinning."""
    command = [sys.executable, "-m", "benchmarks.torch_step", "--sections", "policy", "--json",
               "-"] + (["--quick"] if quick else [])  # a child: the variable is read at startup
    env = {**os.environ, "GOMP_SPINCOUNT": "0"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800, check=True)
    found = json.loads(done.stdout.split("\n#json\n", 1)[1])["policy"]
    return {"GOMP_SPINCOUNT=0": found["spinning (default)"]}


SECTIONS = {"many": many, "tiny": tiny, "large": large}
LOOPS = {"loop": training, "policy": policy, "policy-passive": passive}


def show(name: str, found: dict[str, Any]) -> None:
    print(f"\n## {name}")
    for case, rows in found.items():
        print(f"### {case}")
        for row in rows:
            if "iteration" in row:
                print(f"  {row['name']:<28} iteration {row['iteration'] * 1e3:7.3f} ms "
                      f"(mean {row['iteration_mean'] * 1e3:7.3f})  step "
                      f"{row['step'] * 1e6:8.1f} us (mean {row['step_mean'] * 1e6:8.1f}, p90 "
                      f"{row['step_p90'] * 1e6:8.1f})  share {row['share']:6.1%}  "
                      f"[{row['clean']}/{row['samples']} clean, median over {row['median_over']}]")
            else:
                print(f"  {row['name']:<28} {row['seconds'] * 1e3:10.4f} ms   x{row['speedup']:6.2f}"
                      f"   ({row['clean']}/{row['of']} clean) {row['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller sizes")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--sections", default=",".join([*SECTIONS, *LOOPS]))
    parser.add_argument("--json", default=None, help="write the figures here ('-': stdout)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each section, wait up to this long for a quiet machine")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 9)
    probe = build_probe()
    check = CapacityCheck(probe.spin, threads=2)
    results: dict[str, Any] = {"torch": torch.__version__, "cores": os.cpu_count()}
    for name in args.sections.split(","):
        if args.wait_quiet:
            waited, load = wait_until_quiet(args.wait_quiet)
            results.setdefault("foreign load", {})[name] = {"waited": waited, "load": load}
        if name in SECTIONS:
            results[name] = SECTIONS[name](check, rounds, args.quick)
        else:
            results[name] = LOOPS[name](args.quick)
        if args.json != "-":
            show(name, results[name])
    if args.json == "-":
        print("\n#json\n" + json.dumps(results))
    elif args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
