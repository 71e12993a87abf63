"""``examples/train_torch.py`` runs, learns, prints the losses side by side, and its claims hold
(bit-identical to torch.optim with an IEEE sqrt, a checkpoint that continues bit for bit); and
``benchmarks/torch_step.py`` runs end to end. Short versions; no speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_example

pytest.importorskip("torch", reason="the torch example needs torch (pip install torch==2.13.0)")
pytest.importorskip("sklearn", reason="the torch example trains on scikit-learn's digits")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_torch.py"


def test_a_short_training_run_keeps_every_promise():
    example = load_example("train_torch")
    lines: list[str] = []
    found = example.train(example.parse(["--epochs", "2"]), log=lines.append)
    assert "78 parameter tensors" in lines[0]
    assert found["identical"] and found["reloaded_identical"]
    assert any("checkpoint saved and reloaded" in line for line in lines)
    epochs = [line.split() for line in lines if line.split()[0].isdigit()]
    assert len(epochs) == 2
    for epoch in epochs:  # adamgen's loss and torch's with an IEEE sqrt, to 9 digits
        assert epoch[1] == epoch[2], epoch
    assert found["accuracy"] > 0.5
    assert any(line.startswith("torch.optim.AdamW(fused=True)") for line in lines)


def test_the_example_runs_as_a_program():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(EXAMPLE), "--epochs", "2", "--depth", "9"],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "parameters bit-identical to torch.optim.AdamW with an IEEE sqrt: True" in done.stdout


@pytest.mark.slow
def test_the_torch_benchmark_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ADAMGEN_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "benchmarks.torch_step", "--quick", "--rounds",
                           "1", "--sections", "tiny,loop", "--json", "-"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.split("\n#json\n", 1)[1])
    names = [row["name"] for row in found["tiny"]["1 thread"]]
    assert names == ["adamgen.torch.AdamW", "do-nothing Optimizer", "torch AdamW fused"]
    assert {row["name"] for rows in found["loop"].values() for row in rows} >= {
        "adamgen.torch.AdamW", "torch AdamW fused"}
