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
    for section in ("## Speed targets", "## In place", "## Functional",
                    "## The loader's pick", "## Many tensors", "## Per-call overhead",
                    "## The GIL"):
        assert section in report, section
    assert re.search(r"issues? \d", report, re.IGNORECASE) is None  # say what, not which ticket
    assert "- **torch fused**: `torch.optim.Adam(fused=True)`" in report


@pytest.mark.slow
def test_results_hold_every_case_and_rerender(quick_run, tmp_path):
    out, completed = quick_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [w["threads"] for w in results["workers"]] == [1, 2]
    suites = {r["suite"] for w in results["workers"] for r in w["records"]}
    assert suites == {"sweep", "multi", "tiny"}
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
    assert "torch (the torch fused and torch foreach columns and the torch targets: pip " \
           "install torch==2.13.0)" in text
    assert "numexpr (" not in text
    assert f"  {tmp_path / 'report.md'}" in text.splitlines()


def test_summary_columns_stay_aligned():
    (summary,) = suite("summary")
    lines = summary.aligned(["threads", "N", "a peer with a long name"],
                            [["1", "16", "1.00"], ["2", "1e+04", "12345.67"]],
                            over=(2, "× label"))
    assert len({len(line) for line in lines[1:]}) == 1
    assert lines[0].index("×") == lines[1].index("a peer")
