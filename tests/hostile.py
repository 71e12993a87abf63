"""Helpers for the hostile-environment tests (``test_hostile_env.py``, ``test_kernel_store.py``).

A hostile process runs :data:`SCRIPT` in a fresh interpreter and reports as JSON what it
computed, which warnings adamgen raised (every ``warn`` call is recorded: the filter is "always",
so "one warning" cannot come from Python's once-per-location default), and what the kernel
cache did. Faults are real where the machine allows it: permission bits bind root through
:func:`unprivileged` (``setpriv`` without ``CAP_DAC_OVERRIDE``), and :func:`private_mounts`
gives a child its own mount namespace (``unshare -m``), where a read-only bind mount or a full
``tmpfs`` is real without touching anyone else's view of the file system.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_bitwise_equal
from reference import adam_update_ref

import adamgen
from adamgen.runtime import ivy

REPO = Path(__file__).resolve().parents[1]

#: The work every hostile process does, and what it reports.
SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile, types, warnings
    if os.environ.get("HOSTILE_VERSION"):  # another adamgen version: preload its _version
        fake = types.ModuleType("adamgen._version")
        fake.__version__ = os.environ["HOSTILE_VERSION"]
        sys.modules["adamgen._version"] = fake
    if os.environ.get("HOSTILE_TEMPDIR"):  # the only temporary directory there is
        tempfile.tempdir = os.environ["HOSTILE_TEMPDIR"]
    import numpy as np
    import adamgen
    from adamgen.codegen import build
    from adamgen.runtime import c_kernels, kernel_store, numpy_kernels, variant_choice
    if os.environ.get("HOSTILE_CPU"):  # another CPU feature set
        build.cpu_features = lambda: os.environ["HOSTILE_CPU"]
    variant_choice.run_delay = lambda: 0.0  # a busy machine must not stop a choice being persisted

    report = {"warnings": [], "results": {}, "error": None}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            x = np.linspace(-3, 3, 5000).astype(np.float32)
            v = np.abs(x[::-1]).copy()
            report["results"]["update32"] = [r.tobytes().hex() for r in
                                             adamgen.adam_update(x, x[::-1], 0.01, x, v, 7)]
            y = np.linspace(-1, 1, 7)
            report["results"]["update64"] = [r.tobytes().hex() for r in
                                             adamgen.adam_update(y, y, 0.1, y, y ** 2, 2)]
            p = [x.copy()]
            opt = adamgen.Adam(p, lr=0.01)
            opt.step([x[::-1].copy()])
            report["results"]["adam"] = p[0].tobytes().hex()
            report["results"]["vjp"] = [r.tobytes().hex() for r in adamgen.adam_update_vjp(
                y, y, 0.1, y, y ** 2, 2, (y, y, y))]
        except Exception as error:
            report["error"] = [type(error).__name__, str(error)]
    report["warnings"] = [[w.category.__name__, str(w.message)] for w in seen
                          if "adamgen" in str(w.message)]
    try:
        report["cache_root"] = str(kernel_store.kernel_cache().root)
    except Exception as error:
        report["cache_root"] = None
    report["c_events"] = [[str(e.get("kernel")), e.get("built"), e.get("error")]
                          for e in c_kernels.EVENTS]
    report["numpy_events"] = [[str(e["kernel"]), e["built"]] for e in numpy_kernels.EVENTS]
    report["paths"] = [str(e.get("path")) for e in numpy_kernels.EVENTS + c_kernels.EVENTS]
    report["decisions"] = [[d.problem, d.bucket, d.source] for d in variant_choice.decisions()]
    print(json.dumps(report))
""")


def expected_results() -> dict:
    x = np.linspace(-3, 3, 5000).astype(np.float32)
    v = np.abs(x[::-1]).copy()
    y = np.linspace(-1, 1, 7)
    w, _m, _vv = adam_update_ref(x, x[::-1], 0.01, np.zeros_like(x), np.zeros_like(x), 1)
    return {
        "update32": [r.tobytes().hex() for r in adam_update_ref(x, x[::-1], 0.01, x, v, 7)],
        "update64": [r.tobytes().hex() for r in adam_update_ref(y, y, 0.1, y, y ** 2, 2)],
        "adam": w.tobytes().hex(),
    }


def clean_env(**values: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ADAMGEN_", "HOSTILE_")) and k != "XDG_CACHE_HOME"}
    env["PYTHONPATH"] = str(REPO)
    env["ADAMGEN_STRICT"] = "1"
    for name, value in values.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_script(env: dict[str, str], prefix: tuple[str, ...] = (), cwd: Path = REPO) -> dict:
    done = subprocess.run([*prefix, sys.executable, "-c", SCRIPT], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@functools.cache
def c_available() -> bool:
    from adamgen.codegen import build

    return build.probe_compiler().available


needs_c = pytest.mark.skipif(not c_available(), reason="no C compiler")


def assert_correct(report: dict, *, c_ran: bool = True) -> None:
    assert report["error"] is None, report["error"]
    expected = expected_results()
    for name in ("update32", "update64", "adam"):
        assert report["results"][name] == expected[name], f"{name} differs from the reference"
    assert len(report["results"]["vjp"]) == 5
    if c_ran and c_available():
        assert report["c_events"], "no C kernel was loaded: the fallback lost the C backend"
        assert all(error is None for _, _, error in report["c_events"]), report["c_events"]


@functools.cache
def _unprivileged() -> tuple[str, ...] | None:
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = (setpriv, "--bounding-set=-dac_override,-dac_read_search", "--")
    probe = Path(tempfile.mkdtemp(prefix="adamgen-ro-probe-"))
    try:
        probe.chmod(0o555)
        done = subprocess.run([*prefix, sys.executable, "-c",
                               f"import os; os.mkdir({str(probe / 'x')!r})"],
                              capture_output=True, text=True, timeout=60, check=False)
        return prefix if done.returncode != 0 and "Permission" in done.stderr else None
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe, ignore_errors=True)


def unprivileged() -> tuple[str, ...]:
    """A command prefix under which permission bits bind this user (root included)."""
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (no usable setpriv): "
                    "a read-only directory would not be read-only")
    return prefix


def scratch_place() -> Iterator[Path]:
    """A scratch directory the (possibly capability-less) child can reach; read-only
    directories in it are made writable again before removal (a fixture's body)."""
    root = Path(tempfile.mkdtemp(prefix="adamgen-hostile-"))
    root.chmod(0o755)
    yield root
    for path in [root, *root.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o700)
    shutil.rmtree(root, ignore_errors=True)


def read_only_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


def writable_tmp(place: Path) -> Path:
    tmp = place / "tmp"
    tmp.mkdir(mode=0o700)
    return tmp


def one_cache_warning(report: dict, mentions: str) -> None:
    cache_warnings = [w for w in report["warnings"] if "kernel cache" in w[1]]
    assert len(report["warnings"]) == 1 and len(cache_warnings) == 1, report["warnings"]
    category, message = cache_warnings[0]
    assert category == "RuntimeWarning"
    assert mentions in message and "private temporary directory" in message, message


def cache_entries(cache: Path, kind: str, *, vjp_kernels: bool | None = None) -> list[Path]:
    """The entries of one kind; for C kernels, only the VJP's or only the update's."""
    found = []
    for path in sorted(p for p in (cache / "1" / kind).iterdir() if p.is_dir()):
        if vjp_kernels is not None:
            symbols = [f["symbol"] for f in
                       json.loads((path / "manifest.json").read_text())["functions"]]
            if any(s.startswith("ivy_adam_vjp") for s in symbols) != vjp_kernels:
                continue
        found.append(path)
    return found


def rewrite(entry: Path, name: str, content: bytes, *, fix_manifest: bool) -> None:
    """Replace one file of an entry; optionally make the manifest agree (a file that passes
    validation but does not load, like a ``.so`` on a ``noexec`` mount)."""
    import hashlib

    target = entry / name
    target.chmod(0o600)
    target.write_bytes(content)
    target.chmod(0o500 if name.endswith(".so") else 0o400)
    if fix_manifest:
        manifest_path = entry / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["files"][name] = {"sha256": hashlib.sha256(content).hexdigest(),
                                   "size": len(content)}
        manifest_path.chmod(0o600)
        manifest_path.write_text(json.dumps(manifest))
        manifest_path.chmod(0o400)


def all_entry_points_match_the_reference() -> list[warnings.WarningMessage]:
    x = np.linspace(-3, 3, 5000).astype(np.float32)
    y = np.linspace(-1, 1, 7)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for w in (x, y):
            got = adamgen.adam_update(w, w[::-1], 0.01, w, np.abs(w), 3)
            for a, b in zip(got, adam_update_ref(w, w[::-1], 0.01, w, np.abs(w), 3)):
                assert_bitwise_equal(a, b)
        p = [x.copy()]
        adamgen.Adam(p, lr=0.01).step([x[::-1].copy()])
        assert_bitwise_equal(p[0], adam_update_ref(x, x[::-1], 0.01, 0 * x, 0 * x, 1)[0])
        numpy_vjp = ivy.bind_adam_update_vjp("numpy")(y, y, 0.1, y, y ** 2, 2, (y, y, y))
        for a, b in zip(adamgen.adam_update_vjp(y, y, 0.1, y, y ** 2, 2, (y, y, y)), numpy_vjp):
            assert_bitwise_equal(a, b)
    return [w for w in seen if "adamgen" in str(w.message)]


@functools.cache
def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="adamgen-mount-probe-"))
    try:
        done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f"mount -t tmpfs -o size=4k tmpfs {shlex.quote(str(probe))}"],
                              capture_output=True, text=True, timeout=60, check=False)
        return done.returncode == 0
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def private_mounts(*commands: str) -> tuple[str, ...]:
    """A command prefix that runs ``commands`` (shell, e.g. ``mount ...``) in a private mount
    namespace, then the command; skips the test where mount namespaces are not permitted."""
    if not _can_mount():
        pytest.skip("cannot create a private mount namespace (unshare -m and mount need "
                    "CAP_SYS_ADMIN): a read-only or full file system cannot be made real here")
    script = " && ".join([*commands, 'exec "$@"'])
    return ("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh")


def read_only_mount(path: Path) -> tuple[str, ...]:
    """Run the child with ``path`` bind-mounted read-only over itself (EROFS, even for root)."""
    quoted = shlex.quote(str(path))
    return private_mounts(f"mount --bind {quoted} {quoted}",
                          f"mount -o remount,bind,ro {quoted} {quoted}")
