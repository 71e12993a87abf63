"""End to end: the ``adamgen`` command line in fresh processes, on an empty cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def adamgen_cli(*args: str, cache, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADAMGEN_CACHE_DIR": str(cache)}
    env.pop("ADAMGEN_VARIANT", None)
    return subprocess.run([sys.executable, "-m", "adamgen", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_demo_builds_verifies_measures_and_trains(tmp_path):
    pytest.importorskip("sklearn")
    run = adamgen_cli("demo", "--epochs", "2", cache=tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for expected in ("1. kernels", "numpy float32 functional", "c float32", "compiled",
                     "PROVED", "winner", "multi-tensor", "epoch   2/2", "test accuracy",
                     "demo finished"):
        assert expected in out, (expected, out)
    again = adamgen_cli("demo", "--epochs", "1", "--no-verify", cache=tmp_path / "cache")
    assert again.returncode == 0 and "fetched from the cache" in again.stdout


def test_verify_exit_status_and_table(tmp_path):
    run = adamgen_cli("verify", cache=tmp_path / "cache")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failed" in run.stdout and "moment recurrences" in run.stdout


def test_cache_info_and_clear(tmp_path):
    cache = tmp_path / "cache"
    assert adamgen_cli("info", "--build", cache=cache).returncode == 0
    info = adamgen_cli("cache", "info", cache=cache)
    assert info.returncode == 0 and "entries:" in info.stdout and "c-kernel" in info.stdout
    cleared = adamgen_cli("cache", "clear", cache=cache)
    assert cleared.returncode == 0 and "removed" in cleared.stdout
    assert "entries:  0" in adamgen_cli("cache", "info", cache=cache).stdout


def test_bad_environment_is_a_clear_error_not_a_traceback(tmp_path):
    env = {**os.environ, "ADAMGEN_CACHE_DIR": str(tmp_path), "ADAMGEN_MODE": "slow"}
    run = subprocess.run([sys.executable, "-m", "adamgen", "info"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "ADAMGEN_MODE" in run.stderr and "exact, fast" in run.stderr
    assert "Traceback" not in run.stderr
