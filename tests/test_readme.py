"""The README's Python examples run as written, in order, in a fresh process, and print what
the README says they print. A reader copies them first; a stale name there is the first bug
anyone meets.

Blocks that need a model get a small one (``model`` is never defined in the README); the ZeRO
block needs a process group, which ``tests/test_torch_zero.py`` sets up, so here it runs in a
one-process gloo group on a loopback port.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.DOTALL)

NEEDS_TORCH = ("adamgen.torch",)
MODEL = """
import torch
model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
"""
BF16_MODEL = MODEL + "model = model.to(torch.bfloat16)\n"
ONE_RANK_GROUP = """
import socket, torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
"""


def run(code: str, tmp_path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=False,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def block(containing: str) -> str:
    found = [b for b in BLOCKS if containing in b]
    assert len(found) == 1, f"README: one Python block holds {containing!r}"
    return found[0]


def test_every_python_block_is_checked_here():
    assert len(BLOCKS) == 6, "a README block was added or removed: check it in this file too"


def test_the_numpy_ivy_and_user_rule_examples_run_in_order(tmp_path):
    code = "\n".join([block("import numpy as np"), block("adamgen.array"),
                      block("from adamgen.spec import Hyperparameter"),
                      "print('verified', all(r.status == 'PROVED' for r in rule.verify()))"])
    out = run(code, tmp_path)
    assert "[0.9899 1.9898 2.9897]" in out
    assert "adamgen.array([0.90000075, 1.90000164, 2.9000032 ])" in out
    assert "verified True" in out
    assert "torch_adamw" in out and "lion" in out  # adamgen.rules()


def test_the_torch_examples_run(tmp_path):
    pytest.importorskip("torch", reason="the README's torch examples need torch")
    code = "\n".join([MODEL, block("import adamgen.torch"), BF16_MODEL, "import adamgen.torch",
                      block("master_weights"),
                      ONE_RANK_GROUP, block("ZeroRedundancyOptimizer"),
                      "dist.destroy_process_group(); print('ok')"])
    assert run(code, tmp_path).strip().endswith("ok")
