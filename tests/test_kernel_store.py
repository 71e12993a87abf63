"""Which cache serves a kernel, and what happens when it cannot (``adamgen/runtime/kernel_store.py``).

Each test runs the hostile script (:data:`hostile.SCRIPT`: ``adam_update`` in two dtypes,
``Adam.step`` and ``adam_update_vjp``) in a fresh interpreter against a damaged, limited or
read-only cache, and checks the reference's bits, the warnings and where each kernel came from:

* a write that fails (a file size limit: ``EFBIG``; a full ``tmpfs``: ``ENOSPC``): NumPy kernels
  are rendered in memory, C falls back with its one warning (issue 13, D3);
* a warm read-only cache (a read-only bind mount, or mode bits that bind): every kernel is a hit,
  nothing is written, no warning; a read-only cache missing a kernel builds it privately after
  one warning;
* an unsafe path inside the cache (an intermediate directory or a NumPy entry another user owns
  or can write, a symlinked lock): one warning naming it, and the private temporary cache serves,
  the same on the NumPy and the C side (issue 13, D7);
* a ``.pyc`` planted beside a cached NumPy kernel never runs, and none is written (issue 13, D5).

A warm cache is built once per module and copied for each test (copies keep modes and owner).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
from hostile import (
    assert_correct,
    cache_entries,
    clean_env,
    needs_c,
    one_cache_warning,
    private_mounts,
    read_only_mount,
    run_script,
    scratch_place,
    unprivileged,
    writable_tmp,
)

NOBODY = 65534


@pytest.fixture
def place():
    yield from scratch_place()


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding every kernel the hostile script needs."""
    cache = tmp_path_factory.mktemp("warm") / "cache"
    assert_correct(run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache))))
    return cache


def copy_cache(warm: Path, place: Path) -> Path:
    cache = place / "cache"
    shutil.copytree(warm, cache, symlinks=True)
    return cache


def c_warning_only(report: dict, mentions: str) -> None:
    assert len(report["warnings"]) == 1, report["warnings"]
    category, message = report["warnings"][0]
    assert category == "RuntimeWarning" and "C kernels are unavailable" in message, message
    assert mentions in message, message


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its mode, size and mtime: proof that nothing changed."""
    found = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        found[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


# -- a write that fails (D3) -----------------------------------------------------------------

def test_a_file_size_limit_renders_numpy_in_memory_and_c_falls_back(place):
    tmp = writable_tmp(place)
    limit = ("prlimit", "--fsize=1024", "--") if shutil.which("prlimit") else (
        "sh", "-c", 'ulimit -f 2 && exec "$@"', "sh")
    report = run_script(clean_env(ADAMGEN_CACHE_DIR=str(place / "cache"), TMPDIR=str(tmp),
                                  ADAMGEN_STRICT=None), limit)
    assert_correct(report, c_ran=False)
    c_warning_only(report, "")
    numpy_paths = report["paths"][:len(report["numpy_events"])]
    assert numpy_paths and all(p.startswith("(memory: ") and "File too large" in p
                               for p in numpy_paths), numpy_paths


@needs_c
def test_a_full_disk_renders_numpy_in_memory_and_c_falls_back(place):
    cache, tmp = place / "cache", writable_tmp(place)
    cache.mkdir(mode=0o700)
    quoted = shlex.quote(str(cache))
    full = private_mounts(f"mount -t tmpfs -o size=256k,mode=0700 tmpfs {quoted}",
                          f"mkdir -m 700 {quoted}/locks {quoted}/tmp",
                          f"(dd if=/dev/zero of={quoted}/filler bs=4k 2>/dev/null; true)")
    report = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache), TMPDIR=str(tmp),
                                  ADAMGEN_STRICT=None), full)
    assert_correct(report, c_ran=False)
    c_warning_only(report, "No space left on device")
    numpy_paths = report["paths"][:len(report["numpy_events"])]
    assert numpy_paths and all("No space left on device" in p for p in numpy_paths), numpy_paths


# -- a read-only cache -----------------------------------------------------------------------

def _read_only(cache: Path, how: str) -> tuple[str, ...]:
    if how == "read-only bind mount":
        return read_only_mount(cache)
    prefix = unprivileged()
    for path in [cache, *cache.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o500)
    return prefix


@pytest.mark.parametrize("how", ["read-only bind mount", "mode bits"])
def test_a_warm_read_only_cache_serves_every_kernel(how, warm, place):
    cache, tmp = copy_cache(warm, place), writable_tmp(place)
    prefix = _read_only(cache, how)
    before = tree(cache)
    report = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache), TMPDIR=str(tmp),
                                  ADAMGEN_REQUIRE_CACHE_HIT="1"), prefix)
    assert_correct(report)
    assert report["warnings"] == []
    assert all(not built for _, built in report["numpy_events"])
    assert all(not built for _, built, _ in report["c_events"])
    assert all(p.startswith(str(cache)) for p in report["paths"]), report["paths"]
    # every decision the warm cache remembered is read back; the ones it did not remember
    # are measured again (and cannot be written here: the tree is unchanged below)
    remembered = {(c["problem"], c["bucket"]) for c in map(
        json.loads, map(Path.read_text, (cache / "choices").glob("*.json")))}
    sources = {(problem, bucket): source for problem, bucket, source in report["decisions"]}
    assert remembered and all(sources[key] == "cache dir" for key in remembered
                              if key in sources), (remembered, sources)
    assert "cache dir" in sources.values()
    assert tree(cache) == before and not list(tmp.iterdir())


@needs_c
def test_a_read_only_cache_missing_a_kernel_builds_it_privately(warm, place):
    cache, tmp = copy_cache(warm, place), writable_tmp(place)
    missing = cache_entries(cache, "c-kernel", vjp_kernels=True)
    assert missing
    for entry in missing:
        shutil.rmtree(entry)
    report = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache), TMPDIR=str(tmp)),
                        _read_only(cache, "mode bits"))
    assert_correct(report)
    one_cache_warning(report, str(cache))
    assert "read-only" in report["warnings"][0][1]
    private = [p for p in report["paths"] if p.startswith(str(tmp))]
    assert len(private) == len(missing), report["paths"]  # the rest were hits
    assert not list(tmp.iterdir())


# -- unsafe paths inside the cache (D7) --------------------------------------------------------

def _tamper(cache: Path, how: str, place: Path) -> Path:
    """Make one path inside ``cache`` unsafe; return the path the warning must name."""
    if how == "schema directory owned by another user":
        os.chown(cache / "1", NOBODY, NOBODY)
        return cache / "1"
    if how == "kind directory writable by everyone":
        (cache / "1" / "c-kernel").chmod(0o777)
        return cache / "1" / "c-kernel"
    if how == "both, as in the report":  # chown nobody + chmod 0777 on both
        for path in (cache / "1", cache / "1" / "c-kernel"):
            os.chown(path, NOBODY, NOBODY)
            path.chmod(0o777)
        return cache / "1"
    if how == "NumPy entries owned by another user":
        for entry in cache_entries(cache, "numpy"):
            os.chown(entry, NOBODY, NOBODY)
        return cache / "1" / "numpy"
    if how == "symlinked lock of a missing NumPy entry":
        target = place / "attacker-owned-file"
        target.write_text("untouched\n")
        for entry in cache_entries(cache, "numpy"):
            shutil.rmtree(entry)
            lock = cache / "locks" / f"{entry.name}.lock"
            lock.unlink(missing_ok=True)
            lock.symlink_to(target)
        return cache / "locks"
    raise AssertionError(how)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a path away needs root")
@pytest.mark.parametrize("how", ["schema directory owned by another user",
                                 "kind directory writable by everyone", "both, as in the report",
                                 "NumPy entries owned by another user",
                                 "symlinked lock of a missing NumPy entry"])
def test_an_unsafe_path_inside_the_cache_is_refused_the_same_way_everywhere(how, warm, place):
    cache, tmp = copy_cache(warm, place), writable_tmp(place)
    named = _tamper(cache, how, place)
    report = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache), TMPDIR=str(tmp)))
    assert_correct(report)  # C still serves: built into the private temporary cache
    one_cache_warning(report, str(named))
    assert "refusing" in report["warnings"][0][1]
    # nothing was loaded from below the unsafe path, and kernels were found after it
    assert not any(p.startswith(f"{named}{os.sep}") for p in report["paths"]), report["paths"]
    assert any(p.startswith(str(tmp)) for p in report["paths"]), report["paths"]
    if how.startswith("symlinked lock"):
        assert (place / "attacker-owned-file").read_text() == "untouched\n"
    assert not list(tmp.iterdir())


# -- bytecode beside a cached NumPy kernel (D5) ---------------------------------------------------

EVIL = """
_hashed_prelude = prelude
def prelude(*arguments):  # planted: every step size doubled
    scalars = _hashed_prelude(*arguments)
    return (scalars[0] * 2, *scalars[1:])
"""


def plant_pyc(entry: Path) -> Path:
    """A ``.pyc`` whose header matches ``kernel.py`` (mtime and size), running other code."""
    source = entry / "kernel.py"
    st = source.stat()
    code = compile(source.read_text() + EVIL, str(source), "exec")
    data = importlib._bootstrap_external._code_to_timestamp_pyc(  # type: ignore[attr-defined]
        code, int(st.st_mtime), st.st_size)
    pyc = Path(importlib.util.cache_from_source(str(source)))
    pyc.parent.mkdir(mode=0o700, exist_ok=True)
    pyc.write_bytes(data)
    return pyc


def test_a_planted_pyc_beside_a_cached_kernel_never_runs(warm, place):
    cache = copy_cache(warm, place)
    manifests = {e: (e / "manifest.json").read_text() for e in cache_entries(cache, "numpy")}
    planted = [plant_pyc(entry) for entry in manifests]
    report = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache), ADAMGEN_REQUIRE_CACHE_HIT="1"))
    assert_correct(report)  # the planted prelude would double every step
    assert all(p.exists() for p in planted)  # it was there to be run, and was not
    assert {e: (e / "manifest.json").read_text() for e in manifests} == manifests


def test_loading_a_cached_kernel_writes_no_bytecode(warm, place):
    cache = copy_cache(warm, place)
    prefix = place / "pycache"
    env = clean_env(ADAMGEN_CACHE_DIR=str(cache), ADAMGEN_REQUIRE_CACHE_HIT="1",
                    PYTHONDONTWRITEBYTECODE=None, PYTHONPYCACHEPREFIX=str(prefix))
    assert_correct(run_script(env))
    assert prefix.is_dir()  # bytecode writing was on: the interpreter wrote its own modules'
    written = [p for p in prefix.rglob("*.pyc") if str(cache).lstrip("/") in str(p)]
    assert written == [] and not list(cache.rglob("__pycache__")), written
    for entry in cache_entries(cache, "numpy"):
        assert set(json.loads((entry / "manifest.json").read_text())["files"]) == {"kernel.py"}
