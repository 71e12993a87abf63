"""The training example runs, shows progress and learns (a short version of it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_example

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_mlp.py"


def test_short_training_run_learns_the_digits():
    pytest.importorskip("sklearn")
    module = load_example("train_mlp")
    lines: list[str] = []
    accuracy = module.train(epochs=4, log=lines.append)
    assert len(lines) == 5 and "epoch   4/4" in lines[-1]
    assert accuracy > 0.9


def test_example_script_runs_as_a_program():
    pytest.importorskip("sklearn")
    completed = subprocess.run([sys.executable, str(EXAMPLE), "--epochs", "2"],
                               capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "final test accuracy" in completed.stdout
