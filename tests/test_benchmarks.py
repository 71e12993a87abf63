"""The benchmark still works: ``adamgen bench --quick``, from an installed wheel, runs end to end,
prints its summary and writes a report with its columns.

No speed is asserted here (CI machines are shared and noisy); the figures belong in
``docs/performance.md``. The optional peers and matplotlib may or may not be installed: either
way the report must say so, with the columns present or named as missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_COLUMNS = {"numexpr": ["× numexpr"], "numba": ["× numba"],
                    "torch": ["× torch fused", "× torch foreach"]}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory,
              installed_wheel) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's ``adamgen bench --quick``, run by the console script of an installed wheel
    in a directory that holds no checkout, so the suite can only come from the package."""
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    completed = subprocess.run(
        [str(installed_wheel.bin / "adamgen"), "bench", "--quick", "--out", str(out)],
        cwd=out, env=env, check=False, capture_output=True, text=True, timeout=900)
    return out, completed


@pytest.mark.slow
def test_quick_run_uses_the_installed_suite(quick_run, installed_wheel):
    out, completed = quick_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == f"adamgen bench --quick --out {out}"
    assert results["machine"]["commit"] == ""  # not a checkout: the wheel's copy ran
    assert "(not run from a git checkout)" in (out / "report.md").read_text()
    where = subprocess.run([str(installed_wheel.python), "-c",
                            "import adamgen.benchmarks.run as r; print(r.__file__)"],
                           cwd=out, capture_output=True, text=True, check=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert Path(where.stdout.strip()).is_relative_to(installed_wheel.python.parents[1])


@pytest.mark.slow
def test_quick_run_prints_a_summary_against_each_peer(quick_run):
    out, completed = quick_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["threads", "N"])
    for column in ("adamgen", "% of probe", "numpy naive", "numpy best"):
        assert column in header, (column, header)
    for package, columns in OPTIONAL_COLUMNS.items():
        for column in columns:
            assert (column[2:] in header) == _installed(package), (column, header)
    rows = [line.split() for line in lines[lines.index(header) + 1:] if line.strip()]
    sizes = [row[:2] for row in rows if row[0] in ("1", "2")]
    assert sizes == [[t, n] for t in ("1", "2") for n in ("16", "1e+03", "1e+04")]
    assert any(line.startswith("Speed targets: ") for line in lines)
    rule_header = next(line for line in lines if line.split()[:2] == ["rule", "threads"])
    rule_rows = [line.split()[0] for line in lines[lines.index(rule_header) + 1:]
                 if line.strip() and not line.startswith("Speed")][:20]
    assert {"ivy_adam", "torch_adam", "torch_adamw", "lion"} <= set(rule_rows)
    assert f"  {out / 'report.md'}" in lines and f"  {out / 'results.json'}" in lines
    if not _installed("matplotlib"):
        assert "matplotlib (the plot: pip install matplotlib)" in completed.stdout


@pytest.mark.slow
def test_quick_run_succeeds_and_writes_the_report(quick_run):
    out, completed = quick_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (out / "report.md").is_file()
    assert (out / "results.json").is_file()
    assert "[#" in completed.stderr  # the progress bar, on stderr
    if _installed("matplotlib"):
        png = out / "throughput.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "`matplotlib` is not installed," in (out / "report.md").read_text()


@pytest.mark.slow
def test_report_tables_have_the_expected_columns(quick_run):
    out, completed = quick_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = (out / "report.md").read_text()
    in_place = next(line for line in report.splitlines()
                    if line.startswith("| thr | N | adamgen |"))
    for column in ("adamgen", "GB/s", "% of probe", "probe GB/s", "× numpy naive",
                   "× numpy best", "clean rounds"):
        assert f"| {column} |" in in_place, (column, in_place)
    for package, columns in OPTIONAL_COLUMNS.items():
        for column in columns:
            if _installed(package):
                assert f"| {column} |" in in_place, (column, in_place)
            else:
                assert f"| {column} |" not in in_place
                assert f"`{package}` is not installed," in report
    for section in ("## Speed targets", "## Every rule in place", "## In place",
                    "## Functional", "## The loader's pick", "## Many tensors",
                    "## Per-call overhead", "## The GIL"):
        assert section in report, section
    rule_header = next(line for line in report.splitlines() if line.startswith("| rule |"))
    for column in ("read / written", "% of its probe", "peer", "× peer", "pick"):
        assert f"| {column} |" in rule_header, (column, rule_header)
    assert re.search(r"issues? \d", report, re.IGNORECASE) is None  # say what, not which ticket
    assert "- **torch fused**: `torch.optim.Adam(fused=True)`" in report


@pytest.mark.slow
def test_results_hold_every_case_and_rerender(quick_run, tmp_path):
    out, completed = quick_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [w["threads"] for w in results["workers"]] == [1, 2]
    suites = {r["suite"] for w in results["workers"] for r in w["records"]}
    assert suites == {"sweep", "multi", "tiny", "rule", "rule-multi"}
    family = {(r["rule"], r["suite"], r["threads"], r["impl"]) for w in results["workers"]
              for r in w["records"] if r["suite"].startswith("rule")}
    for label in ("ivy_adam", "torch_adam", "torch_adam amsgrad", "torch_adamw", "lion"):
        for threads in (1, 2):
            for case in ("rule", "rule-multi"):
                assert (label, case, threads, "adamgen") in family, (label, case, threads)
                assert (label, case, threads, "probe serial") in family, (label, case, threads)
                package = "lion_pytorch" if label == "lion" else "torch"
                assert ((label, case, threads, "peer") in family) == (
                    _installed(package) and _installed("torch")), (label, case, threads)
    sweep = [r for w in results["workers"] for r in w["records"] if r["suite"] == "sweep"]
    assert {r["dtype"] for r in sweep} == {"float32", "float64"}
    assert {r["mode"] for r in sweep} == {"inplace", "functional"}
    assert {"adamgen", "numpy naive", "numpy best"} <= {r["impl"] for r in sweep}
    assert all(r["seconds"] > 0 for r in sweep if r["impl"] == "adamgen")
    assert results["workers"][0]["gil"], "the GIL case runs in the one-thread worker"

    (run,) = suite("run")
    assert run.main(["--render", str(out / "results.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == (out / "report.md").read_text()


def test_runs_as_a_script():
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--help"],
                               check=False, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "--quick" in completed.stdout


def suite(*names: str) -> tuple[ModuleType, ...]:
    """Modules of the checkout's benchmark suite (``benchmarks/`` is not on ``sys.path``)."""
    sys.path.insert(0, str(ROOT))
    try:
        return tuple(importlib.import_module(f"benchmarks.{name}") for name in names)
    finally:
        sys.path.remove(str(ROOT))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("functional", [False, True])
def test_every_peer_computes_one_adam_step_in_the_arrays_dtype(dtype, functional):
    """A peer that silently computed in float64, or something else than Adam, would make the
    comparison meaningless (PERFORMANCE-NOTES: NumPy 2 and numexpr promote on float scalars)."""
    import numpy as np

    peers, worker = suite("peers", "worker")
    w0, g, m0, v0 = worker.make_arrays(1000, dtype)
    expected = peers.ivy_expression(w0, g, peers.LR, m0, v0, 1.0)
    names = [c.name for c in peers.single_tensor_peers(*(a.copy() for a in (w0, g, m0, v0)),
                                                       functional=functional, threads=1)]
    for index, name in enumerate(names):
        w, m, v = w0.copy(), m0.copy(), v0.copy()
        contender = peers.single_tensor_peers(w, g, m, v, functional=functional,
                                              threads=1)[index]
        result = contender.call()
        if name == "numpy naive" and not functional:
            continue  # rebinds its own state instead of writing into w, m, v
        got = result if functional else (w, m, v)
        if name.startswith("torch"):
            # torch's state starts at zero (only w is shared) and it uses the paper's formula
            # (eps after the bias-corrected sqrt), which differs where |g| is near eps: check
            # the direction of every step and the size of the typical one.
            zeros = np.zeros_like(w0)
            step = w - w0
            reference = peers.ivy_expression(w0, g, peers.LR, zeros, zeros, 1.0)[0] - w0
            assert w.dtype == np.dtype(dtype)
            assert np.array_equal(np.sign(step), np.sign(reference)), name
            assert np.median(np.abs(step / reference - 1)) < 1e-3, name
            continue
        eps = float(np.finfo(dtype).eps)
        for label, actual, reference, before in zip(("w", "m", "v"), got, expected,
                                                    (w0, m0, v0)):
            assert np.asarray(actual).dtype == np.dtype(dtype), (name, label)
            # compare the change, with a few ulps of the old value as slack (w - step rounds)
            np.testing.assert_allclose(np.asarray(actual) - before, reference - before,
                                       rtol=16 * eps, atol=4 * eps * float(np.abs(before).max()),
                                       err_msg=f"{name} {label}")


def _empty_run(**optional: str | None) -> dict:
    """A run that measured nothing, on a machine with the given optional packages."""
    (plan,) = suite("plan")
    machine = {"cpu": "cpu", "cores": "2", "caches": "-", "memory": "1 GiB", "kernel": "6",
               "python": "3.11.7", "numpy": "2.4.6", "compiler": "cc 12", "adamgen": "0.1.0",
               "commit": "", "probe_flags": [], "unset": []}
    return {"plan": json.loads(plan.make_plan(quick=True).to_json()), "machine": machine,
            "workers": [{"threads": 1, "records": [], "gil": [],
                         "environment": {"optional": optional}}]}


def test_machine_line_without_optional_packages_has_no_stray_separator():
    (report,) = suite("report")
    lines = report.machine_lines(_empty_run(numexpr=None, numba=None, torch=None,
                                            matplotlib=None))
    assert "- **Software**: Python 3.11.7, numpy 2.4.6; cc 12" in lines
    assert "- **adamgen**: 0.1.0 (not run from a git checkout)" in lines
    with_one = report.machine_lines(_empty_run(numexpr="2.14", numba=None))
    assert "- **Software**: Python 3.11.7, numpy 2.4.6, numexpr 2.14; cc 12" in with_one


def test_summary_says_how_to_get_each_missing_package(tmp_path):
    (summary,) = suite("summary")
    text = summary.summary(_empty_run(numexpr="2.14", numba=None, torch=None, matplotlib=None),
                           [tmp_path / "report.md"])
    assert "matplotlib (the plot: pip install matplotlib)" in text
    assert "torch (the torch fused and torch foreach columns, the torch rules' peers and the " \
           "torch targets: pip install torch==2.13.0)" in text
    assert "numexpr (" not in text
    assert f"  {tmp_path / 'report.md'}" in text.splitlines()


def test_summary_columns_stay_aligned():
    (summary,) = suite("summary")
    lines = summary.aligned(["threads", "N", "a peer with a long name"],
                            [["1", "16", "1.00"], ["2", "1e+04", "12345.67"]],
                            over=(2, "× label"))
    assert len({len(line) for line in lines[1:]}) == 1
    assert lines[0].index("×") == lines[1].index("a peer")


# -- the rule family -----------------------------------------------------------------------------

def test_every_builtin_rule_is_benchmarked_with_its_traffic():
    """Each built-in rule has subjects, and each subject's probe traffic comes from its
    interface: the parameter and gradient read, the parameter and every owned state written."""
    import adamgen
    from adamgen.rules import BUILTINS

    (rules,) = suite("rules")
    assert rules.missing_builtins() == []
    assert list(rules.RULES) == list(BUILTINS)
    traffic = {s.label: (s.traffic().reads, s.traffic().writes)
               for s in rules.subjects(rules.RULES)}
    assert traffic == {"ivy_adam": (4, 3), "torch_adam": (4, 3), "torch_adam amsgrad": (5, 4),
                       "torch_adamw": (4, 3), "lion": (3, 2)}
    assert dict(rules.SUBJECTS["torch_adam"][1].options) == {"amsgrad": True}
    assert repr(rules.SUBJECTS["torch_adam"][1].make_rule()) == repr(
        adamgen.rule("torch_adam", amsgrad=True))


def test_rule_selection_keeps_the_builtin_order_and_names_the_valid_rules():
    rules, plan = suite("rules", "plan")
    assert rules.check_rule_names(["lion", "torch_adam", "lion"]) == ("torch_adam", "lion")
    assert [s.label for s in rules.subjects(["torch_adam"])] == ["torch_adam",
                                                                  "torch_adam amsgrad"]
    with pytest.raises(ValueError, match="no built-in rule 'adam'; the rules are: ivy_adam, "
                                         "torch_adam, torch_adamw, lion"):
        rules.check_rule_names(["adam"])
    assert plan.make_plan(quick=False).rules == rules.RULES  # default: every rule
    chosen = plan.make_plan(quick=True, rules=("lion",), rule_sizes=(1000,))
    assert (chosen.rules, chosen.rule_sizes, chosen.ivy) == (("lion",), (1000,), False)
    assert plan.Plan.from_json(chosen.to_json()) == chosen


def test_progress_units_count_the_rule_family():
    (plan,) = suite("plan")
    quick = plan.make_plan(quick=True)
    only_rules = plan.make_plan(quick=True, rules=("torch_adam", "lion"))
    family = 3 * (len(quick.rule_sizes) + 1)  # torch_adam, its AMSGrad variant, lion
    assert only_rules.units(1) == only_rules.units(2) == family
    ivy = len(quick.sizes) * len(quick.dtypes) * len(quick.modes) + 2
    assert quick.units(2) == ivy + 5 * (len(quick.rule_sizes) + 1)
    assert quick.units(1) == quick.units(2) + len(quick.gil_sizes)


@pytest.mark.parametrize("argv", [["--rule", "lion", "--rule", "torch_adam"],
                                  ["--rule", "lion,torch_adam"]])
def test_rule_option_is_repeatable_and_comma_separated(argv):
    (run,) = suite("run")
    args = run.build_parser().parse_args(argv)
    assert sorted(name for names in args.rule for name in names) == ["lion", "torch_adam"]


def test_an_unknown_rule_is_an_error_listing_the_rules(capsys):
    (run,) = suite("run")
    with pytest.raises(SystemExit) as exit_status:
        run.main(["--rule", "torch_adam,sgd", "--out", "/nonexistent/never-written"])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert "argument --rule: no built-in rule 'sgd'; the rules are: ivy_adam, torch_adam, " \
           "torch_adamw, lion" in error


def test_adamgen_bench_forwards_the_rule_option():
    completed = subprocess.run([sys.executable, "-m", "adamgen", "bench", "--rule", "nope"],
                               capture_output=True, text=True, timeout=120, check=False,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 2, completed.stderr
    assert "usage: adamgen bench" in completed.stderr
    assert "no built-in rule 'nope'; the rules are: ivy_adam" in completed.stderr


# -- the probe's traffic -------------------------------------------------------------------------

def test_traffic_counts_reads_and_writes():
    (probe,) = suite("probe")
    assert probe.ADAM == probe.Traffic(4, 3)
    assert probe.ADAM.bytes_per_element("float32") == 28
    assert probe.Traffic(3, 2).bytes_per_element("float32") == 20
    assert probe.Traffic(5, 4).bytes_per_element("float64") == 72
    for reads, writes in ((3, 4), (3, 0)):
        with pytest.raises(ValueError, match="reads at least as many"):
            probe.Traffic(reads, writes)


def test_probe_source_has_one_loop_per_traffic_with_its_arrays():
    (probe,) = suite("probe")
    source, cdef = probe.probe_source(True, [probe.Traffic(5, 4), probe.ADAM,
                                             probe.Traffic(3, 2)])
    for name, written, read in (("r3w2", 2, 1), ("r4w3", 3, 1), ("r5w4", 4, 1)):
        for dtype, c in (("float32", "float"), ("float64", "double")):
            for suffix, extra in (("", ""), ("_omp", ", int nthreads")):
                declared = ", ".join([f"{c} *out{k}" for k in range(written)]
                                     + [f"const {c} *in{k}" for k in range(read)])
                assert f"void bench_probe_{name}_{dtype}{suffix}({declared}, int64_t n{extra});" \
                    in cdef
                assert f"bench_probe_{name}_{dtype}{suffix}(" in source
    assert "int64_t bench_spin(int64_t n);" in cdef
    serial, _ = probe.probe_source(False)
    assert "_omp" not in serial and "bench_probe_r4w3_float32(" in serial  # Adam's by default
    assert "r3w2" not in serial


@pytest.fixture(scope="module")
def built_probe():
    (probe,) = suite("probe")
    from adamgen.errors import CompileError

    try:
        return probe.build_probe([probe.Traffic(3, 2), probe.Traffic(5, 4)])
    except CompileError as error:
        pytest.skip(f"no C compiler: {error}")


@pytest.mark.parametrize("reads,writes", [(3, 2), (4, 3), (5, 4)])
@pytest.mark.parametrize("threads", [None, 2])
def test_the_probe_reads_every_array_and_writes_the_first_ones(built_probe, reads, writes,
                                                               threads):
    import numpy as np

    if threads and not built_probe.openmp:
        pytest.skip("no OpenMP")
    rng = np.random.default_rng(reads)
    arrays = [rng.standard_normal(1000, dtype=np.float32) for _ in range(reads)]
    before = [a.copy() for a in arrays]
    built_probe.bind_traffic(arrays[:writes], arrays[writes:], threads=threads)()
    x = sum(before[writes:], np.zeros(1000, np.float32))
    expected = [before[0] - np.float32(0.001) * x]
    expected += [np.float32(0.5) * before[k] + (x * x if k % 2 == 0 else x)
                 for k in range(1, writes)]
    for k in range(writes):
        np.testing.assert_allclose(arrays[k], expected[k], rtol=1e-6, err_msg=f"out{k}")
    for k in range(writes, reads):
        assert np.array_equal(arrays[k], before[k]), "a read-only array was written"


def test_the_probe_checks_its_arrays_and_keeps_them_alive(built_probe):
    import gc
    import weakref

    import numpy as np

    (probe,) = suite("probe")
    w, g, m, v = (np.ones(64, np.float32) for _ in range(4))
    with pytest.raises(ValueError, match="one size and dtype"):
        built_probe.bind_traffic([w, m[:32]], [g], threads=None)
    with pytest.raises(ValueError, match="not r6w5"):
        built_probe.bind_traffic([w, m, v, np.ones(64, np.float32), np.ones(64, np.float32)],
                                 [g], threads=None)
    temporary = np.ones(64, np.float32)
    alive = weakref.ref(temporary)
    call = built_probe.bind_traffic([temporary, m], [g], threads=None)
    del temporary
    gc.collect()
    assert alive() is not None  # the call holds the arrays its pointers point into
    call()
    assert probe.ADAM in built_probe.traffics


def test_settled_bursts_start_with_untimed_calls():
    """settle_seconds puts untimed calls before every burst, even of calls too long to warm."""
    import time

    (timing,) = suite("timing")
    counts = {}
    for settle in (0.0, 0.001):
        calls = []

        def slow(calls=calls):
            calls.append(1)
            time.sleep(timing.WARM_BELOW + 0.001)

        timing.measure([timing.Contender("slow", "peer", slow)], rounds=2,
                       target_seconds=0.001, warm_seconds=0.0, settle_seconds=settle)
        counts[settle] = len(calls)
    assert counts == {0.0: 1 + 2 + 2, 0.001: 1 + 2 + 2 * 2}


# -- the rule family's report --------------------------------------------------------------------

def _record(suite_name: str, impl: str, family: str, seconds: float, **case) -> dict:
    return {"suite": suite_name, "mode": "inplace", "dtype": "float32", "impl": impl,
            "family": family, "seconds": seconds, "samples": [seconds] * 3,
            "waits": [0.0] * 3, "whole": [True] * 3, "calls": 1, "error": "", "clean": 3,
            **case}


def _family_run(rules_selected=("torch_adam", "lion")) -> dict:
    """A run of the rule family with made-up timings: torch_adam at 97 % of its probe and 5x its
    peer, its AMSGrad variant at 90 % and 3x, lion at 100 % and 20x."""
    run = _empty_run(torch="2.13.0", lion_pytorch="0.2.5")
    run["plan"].update(rules=list(rules_selected), rule_sizes=[10_000_000, 30_000_000],
                       multi_count=500, multi_size=4096, settle_seconds=0.02)
    run.update(command="adamgen bench --rule torch_adam --rule lion", started="today",
               seconds=1.0)
    figures = {"torch_adam": (0.97, 5.0, (4, 3)), "torch_adam amsgrad": (0.90, 3.0, (5, 4)),
               "lion": (1.0, 20.0, (3, 2))}
    workers = []
    for threads in (1, 2):
        records = []
        for label, (share, ratio, traffic) in figures.items():
            peer = "lion_pytorch.Lion" if label == "lion" else "torch.optim.Adam(fused=True)"
            for suite_name, n, tensors in (("rule", 10_000_000, 1), ("rule", 30_000_000, 1),
                                           ("rule-multi", 500 * 4096, 500)):
                case = {"threads": threads, "n": n, "tensors": tensors, "rule": label,
                        "peer": peer, "traffic": list(traffic),
                        "bytes": 4 * sum(traffic) * n}
                mine = 1e-3 * n / 1e6
                records.append({**_record(suite_name, "adamgen", "adamgen", mine, **case),
                                "pick": [["c-omp" if threads == 2 else "c", "measured"]]})
                records.append(_record(suite_name, "peer", "peer", mine * ratio, **case))
                records.append(_record(suite_name, "probe serial", "probe", mine * share,
                                       **case))
        workers.append({"threads": threads, "records": records, "gil": [],
                        "environment": {"optional": {"torch": "2.13.0",
                                                     "lion_pytorch": "0.2.5"}}})
    run["workers"] = workers
    return run


def test_report_shows_every_selected_rule_against_its_probe_and_peer():
    (report,) = suite("report")
    text = report.markdown(_family_run(), None)
    assert "## Every rule in place: against a probe with its own traffic, and its peer" in text
    assert "- **torch_adam amsgrad**: `adamgen.rule('torch_adam', amsgrad=True)" \
           ".optimizer(params)`; its peer `torch.optim.Adam(fused=True, amsgrad=True)`" in text
    rows = [line for line in text.splitlines() if line.startswith("| torch_adam amsgrad |")]
    assert len(rows) == 6  # 1e7 and 3e7, then 500 x 4096, at 1 and 2 threads
    assert rows[0].split(" | ")[1:5] == ["5 / 4", "1", "1e+07", "10 ms"]
    assert "| 90 % |" in rows[0] and "| 3.00 |" in rows[0] and "| c |" in rows[0]
    assert "| c-omp |" in rows[2] and "| 30 ms |" in rows[2]  # the peer: 3x adamgen's time
    assert "| 500 x 4096 |" in rows[4] and "| c-omp |" in rows[5]
    lion = next(line for line in text.splitlines() if line.startswith("| lion | 3 / 2 | 1 |"))
    assert "| 100 % |" in lion and "| 20.00 |" in lion
    assert "| 20.0 |" in lion  # GB/s of lion's traffic: 20 bytes an element, 1e7 in 10 ms
    # only the rules selected; the Ivy sweep was not run, so its sections are absent
    assert "| ivy_adam |" not in text and "torch_adamw" not in text
    assert "## In place: `adamgen.Adam([w]).step()`" not in text
    assert "## The GIL" not in text


def test_targets_check_each_rule_against_its_probe_and_its_peer():
    (results,) = suite("results")
    checked = {(t.goal, t.case): t for t in results.targets(_family_run())}
    probe = checked[("rule vs its probe", "torch_adam amsgrad, N=3e+07, 2 thr")]
    assert (probe.measured, probe.status) == ("90 %", "short")
    assert checked[("rule vs its probe", "torch_adam, N=1e+07, 1 thr")].status == "met"
    peer = checked[("rule vs its peer", "torch_adam amsgrad, 500 x 4096, 2 thr")]
    assert (peer.promise, peer.measured, peer.status) == (">= 4x its peer", "3.0x", "short")
    assert checked[("rule vs its peer", "torch_adam amsgrad, 500 x 4096, 1 thr")].status == \
        "met"
    assert checked[("rule vs its peer", "lion, 500 x 4096, 2 thr")].measured == "20.0x"
    assert {goal for goal, _ in checked} == {"rule vs its probe", "rule vs its peer"}
    assert len(checked) == 3 * (4 + 2)
    # a rule selected but not measured is listed as such, not dropped
    unmeasured = _family_run(("torch_adam", "torch_adamw", "lion"))
    missing = [t for t in results.targets(unmeasured) if t.case.startswith("torch_adamw")]
    assert len(missing) == 6 and {t.status for t in missing} == {"not measured"}


def test_summary_lists_each_rule_case():
    (summary,) = suite("summary")
    text = summary.summary(_family_run(), [])
    lines = text.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["rule", "threads"])
    assert header.split() == ["rule", "threads", "N", "adamgen", "%", "of", "its", "probe", "×",
                              "peer"]
    rows = [line.split() for line in lines[lines.index(header) + 1:] if line.strip()][:18]
    assert ["lion", "2", "500", "x", "4096"] == rows[-1][:5] and rows[-1][-1] == "20.00"
    assert "adamgen.Adam([w]).step()" not in text  # no Ivy sweep in this run
    assert "Speed targets: 13 met, 5 short, 0 not measured" in text


def test_a_results_file_from_before_the_rule_family_still_renders():
    """Old results have no rules in their plan and no rule records: Ivy's report, unchanged."""
    report, results = suite("report", "results")
    old = _empty_run(torch="2.13.0")
    old["plan"].pop("rules"), old["plan"].pop("rule_sizes")
    old.update(command="python -m benchmarks.run", started="yesterday", seconds=1.0)
    text = report.markdown(old, None)
    assert "## In place: `adamgen.Adam([w]).step()`" in text
    assert "## Every rule in place" not in text
    assert not [t for t in results.targets(old) if t.goal.startswith("rule")]
