"""The test suite itself: it caches under its own temporary directory, never the user's home.

Not a module of the package: this checks ``tests/conftest.py``'s session fixture, which the
whole suite relies on. ``.ci/run`` checks the rest: the suite, run with a throwaway ``HOME``,
leaves it empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import SESSION_CACHE_VARIABLES

from adamgen.cache_location import default_cache_dir
from adamgen.runtime.kernel_store import kernel_cache


def test_every_cache_points_into_the_session_temporary_directory(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    for variable in SESSION_CACHE_VARIABLES:
        assert Path(os.environ[variable]).is_relative_to(base), (variable, os.environ[variable])
    assert default_cache_dir().is_relative_to(base)
    assert kernel_cache().root.is_relative_to(base)


def test_processes_started_by_a_test_inherit_the_session_cache(tmp_path_factory):
    run = subprocess.run(
        [sys.executable, "-c", "from adamgen.cache_location import default_cache_dir as d; print(d())"],
        capture_output=True, text=True, timeout=120, check=True)
    assert Path(run.stdout.strip()).is_relative_to(tmp_path_factory.getbasetemp())
