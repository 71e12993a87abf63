"""``examples/mixed_precision.py`` (the figure of docs/mixed-precision.md) and
``benchmarks/mixed_precision.py`` run end to end. Short versions; no speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_example

pytest.importorskip("torch", reason="the mixed-precision example needs torch")
pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mixed_precision.py"


def test_a_short_run_trains_every_mode_and_mode_one_is_torchs(tmp_path):
    module = load_example("mixed_precision")
    lines: list[str] = []
    arguments = module.parse(["--epochs", "2", "--depth", "3"])
    found = module.train(arguments, log=lines.append)
    assert found["identical"]
    assert set(found["curves"]) == set(module.RUNS)
    for curve in found["curves"].values():
        assert len(curve) == 2 and curve[1] < curve[0]  # it learns
    pytest.importorskip("matplotlib")
    module.plot(found, tmp_path / "figure.png", arguments)
    assert (tmp_path / "figure.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_mixed_precision_benchmark_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ADAMGEN_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "benchmarks.mixed_precision", "--quick",
                           "--rounds", "1", "--size", "2e5", "--json", "-"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.split("\n#json\n", 1)[1])
    table = found["large"]["2e+05 elements, 1 thread(s)"]
    assert [row["name"] for row in table["rows"]] == [
        "adamgen master", "adamgen stochastic", "adamgen torch-compatible", "torch AdamW fused",
        "probe"]
    assert all(not row["error"] for row in table["rows"])
    assert table["probe / master"] > 0
