"""Shared test helpers: bit-exact comparison and "this input was not touched" snapshots.

``tests/`` is on ``sys.path`` (pytest's default rootdir-relative import), so test modules can do
``from conftest import assert_bitwise_equal`` and ``from reference import adam_update_ref``.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import site
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

try:  # Hypothesis keeps examples and constants in ./.hypothesis by default: in the checkout
    from hypothesis import settings as _hypothesis_settings
    from hypothesis.configuration import set_hypothesis_home_dir
except ImportError:  # the property tests skip without it
    pass
else:
    _HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="adamgen-tests-hypothesis-")
    atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
    set_hypothesis_home_dir(_HYPOTHESIS_HOME)
    _hypothesis_settings.register_profile("adamgen", database=None)
    _hypothesis_settings.load_profile("adamgen")


def load_example(name: str) -> Any:
    """``examples/<name>.py`` imported as a module (the examples are scripts, not a package)."""
    import importlib.util

    path = REPO / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bytes(a: np.ndarray) -> bytes:
    """The bits of ``a`` in C order, every NaN replaced by one canonical NaN.

    IEEE 754 leaves the sign and payload of a NaN produced from two NaN operands unspecified, and
    hardware picks one operand's: NumPy itself returns different NaN bits for ``np.add(x, y)`` and
    ``np.add(x, y, out=x)``. So "bit-identical" means: every non-NaN element has the same bits,
    and every NaN is a NaN in both.
    """
    a = np.ascontiguousarray(a)
    if a.dtype.kind == "f" and np.isnan(a).any():
        a = np.where(np.isnan(a), np.array(np.nan, a.dtype), a)
    return a.tobytes()


def assert_bitwise_equal(actual: Any, expected: Any, name: str = "result") -> None:
    """Same dtype, same shape, same bits; NaNs are equal to NaNs whatever their sign or payload
    (see :func:`_bytes`).

    Layout does not matter: a Fortran-ordered or strided result equals its C-ordered copy.
    """
    actual_array, expected_array = np.asarray(actual), np.asarray(expected)
    assert actual_array.dtype == expected_array.dtype, (
        f"{name}: dtype {actual_array.dtype}, expected {expected_array.dtype}")
    assert actual_array.shape == expected_array.shape, (
        f"{name}: shape {actual_array.shape}, expected {expected_array.shape}")
    if _bytes(actual_array) != _bytes(expected_array):
        bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}.get(actual_array.dtype.itemsize)
        a_flat, e_flat = (np.frombuffer(_bytes(x), x.dtype)
                          for x in (actual_array, expected_array))
        if bits is not None:
            differ = np.flatnonzero(np.ascontiguousarray(a_flat).view(bits)
                                    != np.ascontiguousarray(e_flat).view(bits))
        else:
            differ = np.flatnonzero(a_flat != e_flat)
        first = differ[:5]
        raise AssertionError(
            f"{name}: {differ.size} of {a_flat.size} elements differ in their bits; first at "
            f"flat index {first.tolist()}: got {a_flat[first].tolist()}, expected "
            f"{e_flat[first].tolist()}")


def assert_all_bitwise_equal(actual: tuple, expected: tuple,
                             names: tuple[str, ...] = ("w_new", "mw", "vw")) -> None:
    assert len(actual) == len(expected), (len(actual), len(expected))
    for a, e, name in zip(actual, expected, names):
        assert_bitwise_equal(a, e, name)


class Snapshot:
    """Bytes, dtype, shape and strides of arrays, to prove later that nothing wrote to them.

    Non-array arguments (Python numbers, lists) are deep-copied and compared by equality.
    """

    def __init__(self, **arguments: Any) -> None:
        import copy

        self.arguments = arguments
        self.saved = {}
        for name, value in arguments.items():
            if isinstance(value, np.ndarray):
                self.saved[name] = (value.dtype, value.shape, value.strides, _bytes(value))
            else:
                self.saved[name] = copy.deepcopy(value)

    def assert_unchanged(self, *, except_: tuple[str, ...] = ()) -> None:
        for name, value in self.arguments.items():
            if name in except_:
                continue
            saved = self.saved[name]
            if isinstance(value, np.ndarray):
                now = (value.dtype, value.shape, value.strides, _bytes(value))
                assert now == saved, f"{name} was modified"
            else:
                assert _same_python_value(value, saved), f"{name} was modified"


def _same_python_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_python_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b) if not isinstance(a, np.ndarray) else np.array_equal(a, b)


#: Variables pointing every cache the suite may fill at the session's temporary directory:
#: adamgen's kernel cache, and matplotlib's font cache and config (the benchmark's plot), which
#: would otherwise land in the user's home.
SESSION_CACHE_VARIABLES = {"ADAMGEN_CACHE_DIR": "adamgen-cache", "MPLCONFIGDIR": "matplotlib"}


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Every test, and every process a test starts (they inherit the environment), uses a cache
    directory of this session, never the user's ``~/.cache/adamgen``.

    A test that needs its own cache still sets ``ADAMGEN_CACHE_DIR`` under its ``tmp_path``.
    ``.ci/run`` proves the whole suite leaves a throwaway ``HOME`` empty.
    """
    from adamgen.config import refresh_environment
    from adamgen.runtime.kernel_store import forget_cache

    root = tmp_path_factory.mktemp("session-caches")
    with pytest.MonkeyPatch.context() as patch:
        for variable, name in SESSION_CACHE_VARIABLES.items():
            patch.setenv(variable, str(root / name))
        refresh_environment()
        forget_cache()
        yield root
    refresh_environment()
    forget_cache()


@dataclass(frozen=True)
class InstalledWheel:
    """adamgen's wheel, and a fresh virtual environment it is installed in."""

    wheel: Path
    python: Path
    bin: Path


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> InstalledWheel:
    """This checkout built as a wheel and installed, without its dependencies, into a fresh
    venv that sees this interpreter's packages (numpy, cffi, the optional peers): what a user
    who installed adamgen has, with nothing downloaded.

    The sources are copied first: building writes ``build/`` and ``*.egg-info`` into the tree.
    """
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", "bench-results",
        "generated"))
    # pip and what it starts get a HOME of their own: pip asks `rustc --version` for its user
    # agent, and a rustup-managed rustc then writes ~/.rustup/settings.toml
    env = {**os.environ, "HOME": str(root / "home"), "PYTHONUSERBASE": site.getuserbase()}

    def run(*argv: str | Path) -> None:
        done = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                              timeout=600, check=False, env=env)
        assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]}{done.stderr[-3000:]}"

    pip = (sys.executable, "-m", "pip", "--no-cache-dir", "--disable-pip-version-check")
    run(*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
        "--wheel-dir", root / "dist", source)
    wheel = next((root / "dist").glob("adamgen-*.whl"))
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", root / "venv")
    python = root / "venv" / "bin" / "python"
    run(*pip, "--python", python, "install", "--quiet", "--no-deps", "--no-index",
        "--force-reinstall", wheel)
    return InstalledWheel(wheel, python, python.parent)


@pytest.fixture
def fresh_loader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A cold loader on a cache dir of this test's own (yielded), no variant forced; the
    runtime forgets everything before and after."""
    from loader_state import forget_everything

    monkeypatch.delenv("ADAMGEN_VARIANT", raising=False)
    monkeypatch.setenv("ADAMGEN_CACHE_DIR", str(tmp_path / "cache"))
    from adamgen.config import refresh_environment

    refresh_environment()
    forget_everything()
    yield tmp_path / "cache"
    monkeypatch.undo()
    refresh_environment()
    forget_everything()


@pytest.fixture(autouse=True)
def _fresh_adamgen_environment():
    """adamgen reads ADAMGEN_* once per process; tests that monkeypatch them need a re-read."""
    from adamgen.config import refresh_environment

    refresh_environment()
    yield
    refresh_environment()


@pytest.fixture
def recorded_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple, dict]]:
    """Replace ``adamgen.runtime.ivy.adam_update`` with a recorder, so a test sees what the
    Array and Container methods forward, not what the math gives."""
    from adamgen.runtime import ivy

    calls: list[tuple[tuple, dict]] = []

    def record(*args: object, **kwargs: object) -> str:
        calls.append((args, kwargs))
        return "result"

    monkeypatch.setattr(ivy, "adam_update", record)
    return calls


def make_ir(tensors: tuple[str, ...], body: tuple, outputs: tuple[tuple[str, str], ...], *,
            config: Any = None, kernel_scalars: tuple[str, ...] = (),
            rule: str = "ops") -> Any:
    """A hand-built kernel IR (for renderer tests): every output depends on every tensor."""
    from adamgen.codegen.ir import KernelIR
    from adamgen.config import KernelConfig
    from adamgen.interface import Interface, SpecRef, Tensor

    interface = Interface(rule=rule, tensors=tuple(Tensor(t) for t in tensors),
                          hyperparameters=(), outputs=tuple(o for o, _ in outputs),
                          depends=tuple((o, tensors) for o, _ in outputs), spec_hash="0" * 16)
    config = config if config is not None else KernelConfig(spec=SpecRef(rule))
    return KernelIR(interface=interface, config=config, prelude=(),
                    kernel_scalars=kernel_scalars, body=tuple(body), outputs=outputs)
