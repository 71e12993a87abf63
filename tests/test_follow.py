"""``adamgen.runtime.follow``: the per-step check that torch tensors did not move (D1, D10)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from adamgen.runtime.follow import StorageWatch, storage_problem, torch_of

ROOT = Path(__file__).resolve().parents[1]


def test_importing_adamgen_and_stepping_numpy_parameters_never_imports_torch():
    script = ("import sys, numpy as np, adamgen\n"
              "adamgen.Adam([np.ones(3, np.float32)]).step()\n"
              "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_a_numpy_array_is_not_a_torch_tensor():
    np = pytest.importorskip("numpy")
    assert torch_of(np.ones(3)) is None
    with pytest.raises(TypeError, match="torch tensors"):
        StorageWatch([np.ones(3)])


def test_the_watch_reports_exactly_the_tensors_that_moved_or_changed_size():
    torch = pytest.importorskip("torch", reason="StorageWatch watches torch tensors")
    tensors = [torch.zeros(8), torch.zeros(8), torch.zeros(8), torch.zeros(8)]
    watch = StorageWatch(tensors)
    assert watch.moved() == []
    tensors[0].mul_(2)  # in place: nothing moved
    tensors[1].data = torch.ones(8)  # rebound
    tensors[3].resize_(4)  # same pointer, fewer elements
    assert watch.moved() == [1, 3]
    assert watch.moved() == [1, 3]  # until the owner accepts
    watch.accept()
    assert watch.moved() == []


def test_bump_versions_tells_autograd():
    torch = pytest.importorskip("torch", reason="StorageWatch watches torch tensors")
    tensors = [torch.zeros(3, requires_grad=True), torch.zeros(2)]
    before = [t._version for t in tensors]
    StorageWatch(tensors).bump_versions()
    assert [t._version for t in tensors] == [v + 1 for v in before]


def test_storage_problem_names_a_storage_smaller_than_its_tensor():
    torch = pytest.importorskip("torch", reason="storage sizes are a torch notion")
    tensor = torch.zeros(100)
    assert storage_problem(tensor) is None
    tensor.untyped_storage().resize_(0)
    assert "holds 0 bytes" in storage_problem(tensor)
    assert storage_problem(torch.zeros(0)) is None
