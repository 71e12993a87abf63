"""One benchmark worker: every case at one thread count, in one process, interleaved.

Why a process per thread count: adamgen reads ``ADAMGEN_NUM_THREADS`` once per process, and
OpenMP, numexpr and numba size their thread pools at start-up; a fresh process with the
variables set is the only way every implementation sees the same count.

Protocol with :mod:`benchmarks.run`: progress lines on stdout (``@@progress <label>``), the
results as JSON in the file named by ``--out``. Run it directly only to debug a case.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from adamgen.runtime import variant_choice

from . import adamgen_side, peers, rules
from .load import DISTURBED, CapacityCheck, run_delay, wait_until_quiet
from .plan import BYTES_PER_ELEMENT, Plan
from .probe import Probe, Traffic, build_probe
from .rules import Subject
from .timing import Contender, Timing, measure

PROGRESS = "@@progress "
ALIGNMENT = 64


def aligned(values: np.ndarray) -> np.ndarray:
    """A 64-byte-aligned copy: every contender gets arrays as well placed as adamgen's own."""
    raw = np.empty(values.nbytes + ALIGNMENT, dtype=np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    array = raw[offset:offset + values.nbytes].view(values.dtype)
    array[...] = values
    return array


def make_arrays(n: int, dtype: str, seed: int = 0) -> tuple[np.ndarray, ...]:
    """w, g, m, v: the state after a few steps (v > 0), all finite and normal."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n, dtype=np.dtype(dtype).type)
    g = rng.standard_normal(n, dtype=np.dtype(dtype).type) * np.dtype(dtype).type(0.01)
    m = g * np.dtype(dtype).type(0.1)
    v = g * g * np.dtype(dtype).type(0.001)
    return tuple(aligned(a) for a in (w, g, m, v))


def quiet(plan: Plan) -> None:
    """Wait (within the plan's limit) for other processes to leave the CPUs."""
    if plan.wait_quiet > 0:
        wait_until_quiet(plan.wait_quiet)


def progress(label: str) -> None:
    print(PROGRESS + label, flush=True)


def records(timings: Sequence[Timing], **case: Any) -> list[dict[str, Any]]:
    return [{**case, "impl": t.name, "family": t.family, "seconds": t.seconds,
             "samples": t.samples, "waits": t.waits, "whole": t.whole,
             "calls": t.calls_per_sample,
             "error": t.error, "clean": t.clean}
            for t in timings]


def probe_contenders(probe: Probe | None, w: np.ndarray, g: np.ndarray, m: np.ndarray,
                     v: np.ndarray, threads: int) -> list[Contender]:
    """The bandwidth probe with Adam's traffic on Ivy's four arrays."""
    return traffic_probes(probe, [w, m, v], [g], threads)


def traffic_probes(probe: Probe | None, written: Sequence[np.ndarray],
                   read: Sequence[np.ndarray], threads: int) -> list[Contender]:
    """The bandwidth probe reading ``written`` and ``read``, writing ``written``: serial always,
    OpenMP too when more than one thread is asked for."""
    if probe is None:
        return []
    contenders = [Contender("probe serial", "probe",
                            probe.bind_traffic(written, read, threads=None))]
    if threads > 1 and probe.openmp:
        contenders.append(Contender("probe OpenMP", "probe",
                                    probe.bind_traffic(written, read, threads=threads)))
    return contenders


# -- the cases -----------------------------------------------------------------------------------

def sweep_case(plan: Plan, probe: Probe | None, arrays: tuple[np.ndarray, ...], mode: str,
               threads: int, check: CapacityCheck | None) -> list[Timing]:
    """One tensor of one size: the pick, the forced variants, the peers and the probe."""
    w, g, m, v = arrays
    functional = mode == "functional"
    if functional:
        contenders = adamgen_side.with_variants(
            lambda: adamgen_side.functional_call(w, g, m, v), forced=plan.forced)
    else:
        contenders = adamgen_side.with_variants(
            lambda: adamgen_side.optimizer_step([w], [g]), forced=plan.forced)
    contenders += adamgen_side.kernel_contenders(w, g, m, v, functional=functional,
                                                 threads=threads)
    contenders += peers.single_tensor_peers(w, g, m, v, functional=functional, threads=threads)
    contenders += probe_contenders(probe, w, g, m, v, threads)
    return measure(contenders, rounds=plan.rounds_for(w.size),
                   target_seconds=plan.target_seconds, warm_seconds=plan.warm_seconds,
                   check=check)


def multi_case(plan: Plan, probe: Probe | None, threads: int,
               check: CapacityCheck | None) -> list[Timing]:
    """Many small tensors (500 x 4096 by default), float32: one step over all of them."""
    count, size = plan.multi_count, plan.multi_size
    params = [make_arrays(size, "float32", seed=i) for i in range(count)]
    ws, gs, ms, vs = (list(column) for column in zip(*params))
    flat = make_arrays(count * size, "float32", seed=count)
    contenders = adamgen_side.with_variants(
        lambda: adamgen_side.optimizer_step(ws, gs), forced=plan.forced)
    contenders[0].name = "adamgen step()"
    contenders.append(Contender("adamgen step(list)", "adamgen",
                                adamgen_side.optimizer_step(ws, gs, pass_grads=True)))
    contenders.append(Contender("adamgen flat buffer", "adamgen",
                                adamgen_side.optimizer_step([flat[0]], [flat[1]])))
    kernel_state = [make_arrays(size, "float32", seed=i) for i in range(count)]
    contenders += adamgen_side.multi_kernel_contenders(
        ws, gs, [s[2] for s in kernel_state], [s[3] for s in kernel_state], threads=threads)
    contenders += peers.torch_optimizer_contenders(ws, gs, threads=threads)
    naive_state = [list(ws), list(ms), list(vs)]
    counter_naive, counter_best = peers.Counter(), peers.Counter()
    scratch = np.empty(size, np.float32)

    def numpy_naive_loop() -> None:
        t = counter_naive.next()
        for i, g in enumerate(gs):
            naive_state[0][i], naive_state[1][i], naive_state[2][i] = peers.ivy_expression(
                naive_state[0][i], g, peers.LR, naive_state[1][i], naive_state[2][i], t)

    def numpy_best_loop() -> None:
        t = counter_best.next()
        for w, g, m, v in zip(ws, gs, ms, vs):
            peers.numpy_best_into(w, g, m, v, w, m, v, scratch[:w.size], t)

    contenders.append(Contender("numpy naive", "peer", numpy_naive_loop))
    contenders.append(Contender("numpy best", "peer", numpy_best_loop))
    contenders += probe_contenders(probe, flat[0], flat[1], flat[2], flat[3], threads)
    return measure(contenders, rounds=plan.rounds, target_seconds=plan.target_seconds,
                   warm_seconds=plan.warm_seconds, check=check)


def tiny_case(plan: Plan, probe: Probe | None, threads: int,
              check: CapacityCheck | None) -> list[Timing]:
    """Per-call overhead: one float32 tensor of ``tiny_size`` elements, every way of calling."""
    w, g, m, v = make_arrays(plan.tiny_size, "float32")
    contenders = [
        Contender("adamgen step()", "adamgen", adamgen_side.optimizer_step([w], [g])),
        Contender("adamgen step([g])", "adamgen",
                  adamgen_side.optimizer_step([w], [g], pass_grads=True)),
        Contender("adamgen adam_update", "adamgen", adamgen_side.functional_call(w, g, m, v)),
    ]
    bare = adamgen_side.bare_c_call(*make_arrays(plan.tiny_size, "float32", seed=1))
    if bare is not None:
        contenders.append(Contender("adamgen bare cffi call", "adamgen", bare))
    contenders += peers.single_tensor_peers(w, g, m, v, functional=False, threads=threads)
    if probe is not None:
        contenders.append(Contender("probe bare cffi call", "probe",
                                    probe.bind(w, g, m, v, threads=None)))
    return measure(contenders, rounds=plan.rounds, target_seconds=plan.target_seconds,
                   warm_seconds=plan.warm_seconds, check=check)


def _threads_wall(calls: Sequence[Callable[[], object]], steps: int) -> float:
    """Wall time for each callable run ``steps`` times, each in its own Python thread, at once."""
    barrier = threading.Barrier(len(calls) + 1)

    def body(call: Callable[[], object]) -> None:
        barrier.wait()
        for _ in range(steps):
            call()

    workers = [threading.Thread(target=body, args=(call,)) for call in calls]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start


def gil_case(plan: Plan, probe: Probe | None, n: int,
             check: CapacityCheck | None) -> list[dict[str, Any]]:
    """Two Python threads each updating its own array vs one: ratio ~1 if the GIL is released.

    The ratio is taken per round (one thread, then two, back to back) and its median reported
    (over the rounds in which our threads did not wait for a CPU, see :mod:`benchmarks.load`),
    with its minimum: other tenants of this VM sometimes take a core, which makes any two
    threads look serialised, so the controls matter as much as the absolute ratio.

    Run at one thread per call (``ADAMGEN_NUM_THREADS=1``) so the two Python threads use the
    two cores. The bare C probe (cffi releases the GIL) shows what the memory system allows;
    numba without ``nogil`` is the control that holds the GIL (ratio ~2).
    """
    a, b = make_arrays(n, "float32", seed=1), make_arrays(n, "float32", seed=2)
    pairs: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "adamgen step()": (adamgen_side.optimizer_step([a[0]], [a[1]]),
                           adamgen_side.optimizer_step([b[0]], [b[1]])),
    }
    if probe is not None:
        pairs["probe serial"] = (probe.bind(*a, threads=None), probe.bind(*b, threads=None))
    in_place = peers.numba_serial_kernel()
    if in_place is not None:
        s = [np.float32(x) for x in (peers.BETA1, 0.1, peers.BETA2, 0.001, 0.3, 1e-7, 1e-3)]
        pairs["numba (holds the GIL)"] = (lambda: in_place(*a, *s), lambda: in_place(*b, *s))
    ratios: dict[str, list[float]] = {name: [] for name in pairs}
    one: dict[str, list[float]] = {name: [] for name in pairs}
    waits: list[float] = []
    checks: list[tuple[float, float]] = []
    for first, second in pairs.values():  # warm up: page in, compile
        first(), second()
    for _ in range(plan.rounds_for(n)):
        before = check.sample() if check else 0.0
        waited, started = run_delay(), time.perf_counter()
        for name, (first, second) in pairs.items():
            alone = _threads_wall([first], plan.gil_steps)
            both = _threads_wall([first, second], plan.gil_steps)
            one[name].append(alone / plan.gil_steps)
            ratios[name].append(both / alone)
        waits.append((run_delay() - waited) / (time.perf_counter() - started))
        checks.append((before, check.sample() if check else 0.0))
    clean = [i for i, (wait, (a, b)) in enumerate(zip(waits, checks))
             if not wait > DISTURBED and (check is None or (check.whole(a) and check.whole(b)))]
    chosen = clean if len(clean) >= min(3, len(waits)) else list(range(len(waits)))
    return [{"suite": "gil", "n": n, "dtype": "float32", "threads": 1, "impl": name,
             "one_thread": statistics.median(one[name][i] for i in chosen),
             "ratio": statistics.median(ratios[name][i] for i in chosen),
             "ratio_min": min(ratios[name]), "clean": len(clean), "rounds": len(waits)}
            for name in pairs]


# -- the rule family -----------------------------------------------------------------------------

class Fill:
    """Starting values for the rule family's arrays: one random draw per size, copied into each
    contender's own aligned arrays (drawing 3e7 normals per array would cost more than the
    case). Parameters are standard normal, gradients and the probe's other arrays 0.01 times
    that, all finite and normal."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(n)
        self.param = rng.standard_normal(n, dtype=np.float32)
        self.grad = rng.standard_normal(n, dtype=np.float32) * np.float32(0.01)

    def params(self) -> np.ndarray:
        return aligned(self.param)

    def grads(self) -> np.ndarray:
        return aligned(self.grad)


def rule_contenders(plan: Plan, probe: Probe | None, subject: Subject, traffic: Traffic,
                    sizes: Sequence[int], threads: int) -> list[Contender]:
    """The subject's optimizer, its peer and the probe with its traffic, on tensors of ``sizes``
    (the probe on one flat buffer of their total size); every contender has arrays of its own."""
    fills = {n: Fill(n) for n in set(sizes)}
    total = sum(sizes)
    contenders = [Contender("adamgen", "adamgen", rules.optimizer_step(
        subject, [fills[n].params() for n in sizes], [fills[n].grads() for n in sizes]))]
    peer = rules.peer_step(subject, [fills[n].params() for n in sizes],
                           [fills[n].grads() for n in sizes], threads=threads)
    if peer is not None:
        contenders.append(Contender("peer", "peer", peer))
    flat = fills[total] if total in fills else Fill(total)
    written = [flat.params()] + [flat.grads() for _ in range(traffic.writes - 1)]
    read = [flat.grads() for _ in range(traffic.reads - traffic.writes)]
    contenders += traffic_probes(probe, written, read, threads)
    return contenders


def rule_cases(plan: Plan, probe: Probe | None, subject: Subject, threads: int,
               check: CapacityCheck | None) -> list[dict[str, Any]]:
    """One subject: one tensor of each of ``plan.rule_sizes``, then ``multi_count`` tensors of
    ``multi_size``, each case timed interleaved (settled at more than one thread)."""
    traffic = subject.traffic()
    settle = plan.settle_seconds if threads > 1 else 0.0
    tag = {"rule": subject.label, "peer": subject.peer,
           "traffic": [traffic.reads, traffic.writes]}
    out: list[dict[str, Any]] = []
    cases = [("rule", n, [n]) for n in plan.rule_sizes]
    cases.append(("rule-multi", plan.multi_count * plan.multi_size,
                  [plan.multi_size] * plan.multi_count))
    for suite, n, sizes in cases:
        quiet(plan)
        variant_choice.forget()  # the decisions read back below are this case's
        contenders = rule_contenders(plan, probe, subject, traffic, sizes, threads)
        # The loader decides at the first step: take it before this case's peer runs and after
        # the last case's OpenMP pools (torch bundles its own) stopped spinning, as the bursts
        # below are settled; a pool spinning beside the loader's one measurement once made
        # threads look slower and serial C was picked for the whole case.
        time.sleep(settle)
        contenders[0].call()
        timings = measure(contenders, rounds=plan.rounds_for(max(sizes)),
                          target_seconds=plan.target_seconds, warm_seconds=plan.warm_seconds,
                          check=check, settle_seconds=settle)
        case = records(timings, suite=suite, mode="inplace", dtype="float32", n=n,
                       threads=threads, bytes=traffic.bytes_per_element("float32") * n,
                       tensors=len(sizes), **tag)
        for record in case:
            if record["impl"] == "adamgen":  # the loader's pick, and where it came from
                record["pick"] = [[d.winner, d.source] for d in variant_choice.decisions()]
        out += case
        del contenders
        gc.collect()
        shape = f"N={n:.0e}" if suite == "rule" else f"{len(sizes)} x {sizes[0]}"
        progress(f"{threads} thr {subject.label} {shape}")
    return out


# -- the worker ----------------------------------------------------------------------------------

def environment_report(probe: Probe | None, probe_error: str) -> dict[str, Any]:
    from adamgen.runtime import variant_choice

    info: dict[str, Any] = {
        "python": platform.python_version(), "numpy": np.__version__,
        "optional": peers.available(), "probe_flags": list(probe.flags) if probe else [],
        "probe_error": probe_error,
        "decisions": [{"problem": d.problem, "bucket": d.bucket, "winner": d.winner,
                       "seconds": d.seconds, "source": d.source}
                      for d in variant_choice.decisions()],
    }
    try:
        from adamgen.runtime import c_kernels

        info["c_kernels"] = [str(event.get("kernel")) for event in c_kernels.EVENTS]
        info["adamgen_threads"] = c_kernels.default_threads()
    except ImportError:
        info["c_kernels"] = []
    return info


def run(plan: Plan, threads: int) -> dict[str, Any]:
    subjects = rules.subjects(plan.rules)
    probe, probe_error = None, ""
    try:
        probe = build_probe(s.traffic() for s in subjects)
    except Exception as exc:  # noqa: BLE001 - the report says why the roof is missing
        probe_error = f"{type(exc).__name__}: {exc}"
    check = CapacityCheck(probe.spin, threads) if probe else None
    results: list[dict[str, Any]] = []
    gil: list[dict[str, Any]] = []
    if plan.ivy:
        results, gil = ivy_cases(plan, probe, threads, check)
    for subject in subjects:
        results += rule_cases(plan, probe, subject, threads, check)
    return {"threads": threads, "records": results, "gil": gil,
            "environment": environment_report(probe, probe_error)}


def ivy_cases(plan: Plan, probe: Probe | None, threads: int, check: CapacityCheck | None
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The Ivy rule's own suite: the sweep, many tensors, per-call overhead, the GIL."""
    results: list[dict[str, Any]] = []
    for dtype in plan.dtypes:
        for n in plan.sizes:
            arrays = make_arrays(n, dtype)
            for mode in plan.modes:
                label = f"{threads} thr {dtype} N={n:.0e} {mode}"
                quiet(plan)
                timings = sweep_case(plan, probe, arrays, mode, threads, check)
                results += records(timings, suite="sweep", mode=mode, dtype=dtype, n=n,
                                   threads=threads, bytes=BYTES_PER_ELEMENT[dtype] * n)
                progress(label)
                gc.collect()
            del arrays
            gc.collect()
    total = plan.multi_count * plan.multi_size
    quiet(plan)
    results += records(multi_case(plan, probe, threads, check), suite="multi", mode="inplace",
                       dtype="float32", n=total, threads=threads,
                       bytes=BYTES_PER_ELEMENT["float32"] * total)
    progress(f"{threads} thr multi-tensor {plan.multi_count} x {plan.multi_size}")
    gc.collect()
    quiet(plan)
    results += records(tiny_case(plan, probe, threads, check), suite="tiny", mode="inplace",
                       dtype="float32", n=plan.tiny_size, threads=threads,
                       bytes=BYTES_PER_ELEMENT["float32"] * plan.tiny_size)
    progress(f"{threads} thr per-call overhead N={plan.tiny_size}")
    gil: list[dict[str, Any]] = []
    if threads == 1:
        gil_check = CapacityCheck(probe.spin, 2) if probe else None  # two threads need 2 cores
        for n in plan.gil_sizes:
            quiet(plan)
            gil += gil_case(plan, probe, n, gil_check)
            progress(f"GIL N={n:.0e}")
            gc.collect()
    return results, gil


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--plan", required=True, help="the Plan as JSON")
    parser.add_argument("--out", required=True, help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    result = run(Plan.from_json(args.plan), args.threads)
    with open(args.out, "w", encoding="utf-8") as stream:
        json.dump(result, stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
