"""Hostile environments (issue 8, item 4): adamgen keeps returning the reference's bits, or
fails with an error that says what to fix.

Process-global state (the environment, ``HOME``, the one-warning flags, loaded extension
modules) is why most of these run a fresh interpreter (:data:`SCRIPT`), which reports as JSON
what it computed, which warnings adamgen raised (every ``warn`` call is recorded: the filter is
"always", so "one warning" cannot come from Python's once-per-location default), and what the
kernel cache did.

* No usable cache: a read-only ``HOME`` without ``ADAMGEN_CACHE_DIR``; ``ADAMGEN_CACHE_DIR``
  under a read-only directory, read-only itself, a regular file, group-writable, owned by
  another user. adamgen builds into a private temporary directory (removed at exit), warns once,
  and still runs C. As root (which ignores permission bits) the child runs under ``setpriv``
  without ``CAP_DAC_OVERRIDE``/``CAP_DAC_READ_SEARCH``, so mode bits bind it too. No writable
  directory at all: NumPy kernels are rendered in memory, C falls back with one warning.
* Artifacts that do not load: a damaged ``.so`` (truncated: the manifest catches it; garbage
  with a matching manifest: ``dlopen`` fails, the entry is invalidated and rebuilt once), a
  damaged NumPy module. A load that always fails (``noexec``), and a build that fails with an
  ``OSError`` (disk full), fall back to NumPy with the one warning.
* A cache written by another adamgen version or for another CPU feature set is not used: with
  ``ADAMGEN_REQUIRE_CACHE_HIT=1`` the same process hits and the other one gets
  ``CacheMissError``; without it the other builds its own entries and measures its own choices.
* Bad values of every ``ADAMGEN_*`` variable: a ``ConfigError`` naming the variable, the value
  and the accepted values, from every entry point and from ``adamgen info``.
* The cache directory removed while a process runs: recreated on the next build.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_bitwise_equal
from hostile import (
    REPO,
    all_entry_points_match_the_reference,
    assert_correct,
    cache_entries,
    clean_env,
    needs_c,
    one_cache_warning,
    read_only_dir,
    rewrite,
    run_script,
    scratch_place,
    unprivileged,
    writable_tmp,
)
from loader_state import forget_loaded_modules
from reference import adam_update_ref

import adamgen
from adamgen.config import refresh_environment
from adamgen.errors import CacheError, ConfigError
from adamgen.runtime import c_kernels, dispatch, numpy_kernels


@pytest.fixture
def place():
    yield from scratch_place()


@pytest.fixture
def fresh_cache(fresh_loader, monkeypatch):
    """conftest's cold loader and cache dir, with ADAMGEN_STRICT and ADAMGEN_REQUIRE_CACHE_HIT
    unset (the fallback is what is tested) and the loaded NumPy modules forgotten as well."""
    for name in ("ADAMGEN_STRICT", "ADAMGEN_REQUIRE_CACHE_HIT"):
        monkeypatch.delenv(name, raising=False)
    refresh_environment()
    forget_loaded_modules()
    yield fresh_loader
    forget_loaded_modules()


# -- no usable cache directory ---------------------------------------------------------------

def test_read_only_home_without_a_cache_dir(place):
    prefix = unprivileged()
    home = read_only_dir(place / "home")
    tmp = writable_tmp(place)
    report = run_script(clean_env(HOME=str(home), TMPDIR=str(tmp), ADAMGEN_CACHE_DIR=None),
                        prefix)
    assert_correct(report)
    one_cache_warning(report, str(home / ".cache" / "adamgen"))
    assert report["cache_root"].startswith(str(tmp)), report["cache_root"]
    assert not list(tmp.iterdir()), "the private temporary cache was not removed at exit"


THREADED_SCRIPT = textwrap.dedent("""
    import json, threading, warnings
    import numpy as np
    import adamgen

    x = np.linspace(-3, 3, 5000).astype(np.float32)
    barrier, results, errors = threading.Barrier(8), [None] * 8, []

    def work(i):
        try:
            barrier.wait()
            if i % 2:
                results[i] = adamgen.adam_update(x, x[::-1], 0.01, x, abs(x), 7)[0].tobytes()
            else:
                y = x.astype(np.float64)
                adamgen.adam_update_vjp(y, y, 0.1, y, y * y, 2, (y, y, y))
        except BaseException as error:
            errors.append(repr(error))

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pool = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        [t.start() for t in pool]
        [t.join() for t in pool]
    print(json.dumps({"errors": errors,
                      "results": sorted({r.hex() for r in results if r is not None}),
                      "warnings": [str(w.message) for w in seen if "adamgen" in str(w.message)]}))
""")


def test_read_only_home_with_8_threads_warns_once(place):
    """The first use comes from 8 threads at once (update and VJP, which reach the cache
    through different locks): still one warning, one private cache, correct results."""
    prefix = unprivileged()
    home = read_only_dir(place / "home")
    tmp = writable_tmp(place)
    done = subprocess.run([*prefix, sys.executable, "-c", THREADED_SCRIPT],
                          env=clean_env(HOME=str(home), TMPDIR=str(tmp), ADAMGEN_CACHE_DIR=None),
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["errors"] == []
    x = np.linspace(-3, 3, 5000).astype(np.float32)
    assert report["results"] == [adam_update_ref(x, x[::-1], 0.01, x, abs(x), 7)[0]
                                 .tobytes().hex()]
    assert len(report["warnings"]) == 1, report["warnings"]
    assert not list(tmp.iterdir()), "a private temporary cache was left behind"


def _cache_dir(kind: str, place: Path) -> Path:
    if kind == "under a read-only directory":
        return read_only_dir(place / "ro") / "cache"
    if kind == "read-only itself":
        path = place / "cache"
        path.mkdir(mode=0o700)
        path.chmod(0o500)
        return path
    if kind == "a regular file":
        path = place / "cache"
        path.write_text("not a directory")
        return path
    if kind == "group and other writable":
        path = place / "cache"
        path.mkdir()
        path.chmod(0o777)
        return path
    if kind == "owned by another user":
        path = place / "cache"
        path.mkdir(mode=0o700)
        os.chown(path, 12345, 12345)
        return path
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["under a read-only directory", "read-only itself",
                                  "a regular file", "group and other writable",
                                  "owned by another user"])
def test_unusable_cache_dir_falls_back_to_a_private_temp_cache(kind, place):
    prefix: tuple[str, ...] = ()
    if kind in ("under a read-only directory", "read-only itself"):
        prefix = unprivileged()
    if kind == "owned by another user" and os.geteuid() != 0:
        pytest.skip("giving a directory away needs root")
    cache = _cache_dir(kind, place)
    tmp = writable_tmp(place)
    report = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache), TMPDIR=str(tmp),
                                  HOME=str(place)), prefix)
    assert_correct(report)
    one_cache_warning(report, str(cache))
    # a read-only cache is still read (it could hold kernels); every kernel came from tmp
    if kind != "read-only itself":
        assert report["cache_root"].startswith(str(tmp))
    assert report["paths"] and all(p.startswith(str(tmp)) for p in report["paths"])
    assert not list(tmp.iterdir())


def test_no_writable_directory_at_all_still_computes(place):
    prefix = unprivileged()
    home = read_only_dir(place / "home")
    tmp = read_only_dir(place / "tmp")
    # not strict: compiling needs a file, so C is unavailable here by design (strict would
    # rightly turn that fallback into an error)
    report = run_script(clean_env(HOME=str(home), TMPDIR=str(tmp), HOSTILE_TEMPDIR=str(tmp),
                                  ADAMGEN_CACHE_DIR=None, ADAMGEN_STRICT=None), prefix, cwd=home)
    assert_correct(report, c_ran=False)
    assert 1 <= len(report["warnings"]) <= 2, report["warnings"]  # the cache's, maybe C's


# -- artifacts that fail to load -------------------------------------------------------------

@needs_c
@pytest.mark.parametrize("damage", ["truncated .so", "garbage .so with a matching manifest",
                                    "garbage NumPy module",
                                    ("garbage NumPy module with a matching manifest")])
def test_damaged_artifacts_are_rebuilt(damage, tmp_path):
    cache = tmp_path / "cache"
    env = clean_env(ADAMGEN_CACHE_DIR=str(cache))
    first = run_script(env)
    assert_correct(first)
    fix = "matching manifest" in damage
    damaged = 0
    if ".so" in damage:
        # the VJP's C kernel is damaged only when the manifest catches it (see the test below)
        for entry in cache_entries(cache, "c-kernel", vjp_kernels=None if not fix else False):
            for so in entry.glob("*.so"):
                content = so.read_bytes()
                rewrite(entry, so.name, content[: len(content) // 3] if "truncated" in damage
                         else b"\x7fELF garbage" * 100, fix_manifest=fix)
                damaged += 1
    else:
        for entry in cache_entries(cache, "numpy"):
            rewrite(entry, "kernel.py", b"raise ImportError('damaged')\n", fix_manifest=fix)
            damaged += 1
    assert damaged
    second = run_script(env)
    assert_correct(second)
    events = second["c_events"] if ".so" in damage else second["numpy_events"]
    assert any(built for _, built, *rest in events), events  # rebuilt, not silently skipped
    assert second["warnings"] == []
    third = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache), ADAMGEN_REQUIRE_CACHE_HIT="1"))
    assert_correct(third)  # the rebuilt entries are valid hits now


@needs_c
def test_damaged_vjp_kernel_that_passes_validation_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    env = clean_env(ADAMGEN_CACHE_DIR=str(cache))
    assert_correct(run_script(env))
    entries = cache_entries(cache, "c-kernel", vjp_kernels=True)
    assert entries
    for entry in entries:
        for so in entry.glob("*.so"):
            rewrite(entry, so.name, b"\x7fELF garbage" * 100, fix_manifest=True)
    assert_correct(run_script(env))


@needs_c
def test_a_load_that_fails_once_is_rebuilt(fresh_cache, monkeypatch, caplog):
    from adamgen.codegen import build

    real, calls = build.load_extension, []
    first_event = len(c_kernels.EVENTS)

    def once(path, name):
        calls.append(name)
        if len(calls) == 1:
            raise CacheError(f"cannot load extension {name} from {path}: failed to map "
                             "segment from shared object (simulated)")
        return real(path, name)

    monkeypatch.setattr(build, "load_extension", once)
    with caplog.at_level(logging.DEBUG, logger="adamgen"):
        assert all_entry_points_match_the_reference() == []
    # the kernel that failed was loaded again at once, from a second build of its key (the
    # damaged entry was invalidated, not fetched again), and C served: no kernel failed
    assert len(calls) >= 2 and calls[1] == calls[0]
    key_prefix = calls[0].removeprefix("_adamgen_")
    builds = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith(f"cache miss: built c-kernel {key_prefix}")]
    assert len(builds) == 2, builds
    events = c_kernels.EVENTS[first_event:]
    assert events[0]["built"] is True and all("error" not in e for e in events), events


@needs_c
def test_a_load_that_always_fails_falls_back_to_numpy(fresh_cache, monkeypatch):
    from adamgen.codegen import build

    def noexec(path, name):
        raise CacheError(f"cannot load extension {name} from {path}: failed to map segment "
                         "from shared object (simulated noexec mount)")

    monkeypatch.setattr(build, "load_extension", noexec)
    seen = all_entry_points_match_the_reference()
    assert len(seen) == 1, [str(w.message) for w in seen]  # one warning, as for no compiler
    assert issubclass(seen[0].category, RuntimeWarning)


@needs_c
def test_a_build_that_fails_with_a_full_disk_falls_back_to_numpy(fresh_cache, monkeypatch):
    """In process, where no file system can be filled (``test_kernel_store.py`` fills a real one):
    every kernel's write fails, NumPy's too; they are rendered in memory, C falls back."""
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(c_kernels, "_build", disk_full)  # the update's and the VJP's kernels
    monkeypatch.setattr(numpy_kernels, "_write_numpy_module", disk_full)
    first_event = len(numpy_kernels.EVENTS)
    seen = all_entry_points_match_the_reference()
    assert len(seen) == 1, [str(w.message) for w in seen]  # one warning, as for no compiler
    assert "No space left on device" in str(seen[0].message)
    in_memory = numpy_kernels.EVENTS[first_event:]
    assert in_memory and all(e["path"] == "(memory: [Errno 28] No space left on device)"
                             for e in in_memory), in_memory


def test_the_no_compiler_warning_points_at_the_callers_line(fresh_cache, monkeypatch):
    """Not at ``dispatch.py`` or ``vjp.py``: at the user's line, whatever the entry point."""
    from adamgen.codegen import build

    monkeypatch.setenv("CC", "/nonexistent")
    x = np.linspace(-1, 1, 64).astype(np.float32)
    calls = {
        "adam_update": lambda: adamgen.adam_update(x, x, 0.1, x, x, 1),
        "Adam": lambda: adamgen.Adam([x.copy()], lr=0.1).step([x]),
        "adam_update_vjp": lambda: adamgen.adam_update_vjp(x, x, 0.1, x, x, 1, (x, x, x)),
    }
    try:
        for name, call in calls.items():
            build.probe_compiler.cache_clear()
            c_kernels.clear_memo()
            dispatch.forget()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                call()
            found = [(w.filename, w.lineno) for w in seen if "C kernels" in str(w.message)]
            assert found == [(__file__, call.__code__.co_firstlineno)], (name, found)
    finally:
        build.probe_compiler.cache_clear()


def test_cache_dir_removed_while_running(fresh_cache):
    x = np.linspace(-1, 1, 64).astype(np.float32)
    adamgen.adam_update(x, x, 0.1, x, x, 1)
    shutil.rmtree(fresh_cache)
    y = x.astype(np.float64)  # new kernels: built into the recreated directory
    for a, b in zip(adamgen.adam_update(y, y, 0.1, y, y[:1], 2),
                    adam_update_ref(y, y, 0.1, y, y[:1], 2)):
        assert_bitwise_equal(a, b)
    assert (fresh_cache / "1" / "c-kernel").is_dir()


# -- another version, another CPU ------------------------------------------------------------

def _entry_manifests(cache: Path) -> dict[str, str]:
    return {str(p.relative_to(cache)): p.read_text()
            for p in (cache / "1").glob("*/*/manifest.json")}


def test_cache_from_another_adamgen_version_is_not_used(tmp_path):
    cache = tmp_path / "cache"
    assert_correct(run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache))))
    before = _entry_manifests(cache)
    hit = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache), ADAMGEN_REQUIRE_CACHE_HIT="1"))
    assert_correct(hit)  # the control: this version hits everything
    other = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache), ADAMGEN_REQUIRE_CACHE_HIT="1",
                                 HOSTILE_VERSION="0.0.9"))
    assert other["error"] and other["error"][0] == "CacheMissError", other["error"]
    built = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache), HOSTILE_VERSION="0.0.9"))
    assert_correct(built)
    assert all(b for _, b in built["numpy_events"]) and all(b for _, b, _ in built["c_events"])
    after = _entry_manifests(cache)
    assert all(after[k] == v for k, v in before.items()), "the other version's entries changed"
    assert len(after) == 2 * len(before)  # side by side, under different keys
    versions = {json.loads(text)["adamgen_version"] for text in after.values()}
    assert versions == {adamgen.__version__, "0.0.9"}


@needs_c
def test_cache_from_another_cpu_feature_set_is_not_used(tmp_path):
    cache = tmp_path / "cache"
    first = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache)))
    assert_correct(first)
    remembered = {(problem, bucket) for problem, bucket, source in first["decisions"]
                  if source == "measured"}
    other_cpu = "x86_64 gcc: -march=otherlake -mavx2 -mno-avx512f"
    miss = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache), ADAMGEN_REQUIRE_CACHE_HIT="1",
                                HOSTILE_CPU=other_cpu))
    assert miss["error"] and miss["error"][0] == "CacheMissError", miss["error"]
    assert "'c-kernel'" in miss["error"][1]  # the NumPy modules were hits: no CPU in their key
    assert all(not built for _, built in miss["numpy_events"])
    same = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache)))
    other = run_script(clean_env(ADAMGEN_CACHE_DIR=str(cache), HOSTILE_CPU=other_cpu))
    assert_correct(other)
    assert all(built for _, built, _ in other["c_events"])
    # every choice this CPU remembered is reused (the ones it did not remember are measured
    # again, and may be remembered now); another CPU's never are
    same_sources = {(problem, bucket): source for problem, bucket, source in same["decisions"]}
    assert remembered and all(same_sources[key] == "cache dir" for key in remembered), (
        remembered, same_sources)
    assert "cache dir" not in {source for *_, source in other["decisions"]}


# -- bad environment values ------------------------------------------------------------------

BAD_VALUES = [
    ("ADAMGEN_BACKEND", "gpu", "numpy, c"),
    ("ADAMGEN_MODE", "slow", "exact, fast"),
    ("ADAMGEN_VARIANT", "x", "numpy, c, c-omp"),
    ("ADAMGEN_NUM_THREADS", "0", "a whole number >= 1"),
    ("ADAMGEN_NUM_THREADS", "abc", "a whole number >= 1"),
    ("ADAMGEN_NUM_THREADS", "-2", "a whole number >= 1"),
    ("ADAMGEN_NUM_THREADS", "1.5", "a whole number >= 1"),
    ("ADAMGEN_STRICT", "maybe", "1, 0, true, false, yes, no, on, off"),
    ("ADAMGEN_REQUIRE_CACHE_HIT", "maybe", "1, 0, true, false, yes, no, on, off"),
]

BAD_ENV_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import adamgen
    x = np.ones(3, np.float32)
    calls = {
        "adam_update": lambda: adamgen.adam_update(x, x, 0.1, x, x, 1),
        "Adam": lambda: adamgen.Adam([x.copy()], lr=0.1).step([x]),
        "adam_update_vjp": lambda: adamgen.adam_update_vjp(x, x, 0.1, x, x, 1, (x, x, x)),
    }
    report = {}
    for name, call in calls.items():
        try:
            call()
            report[name] = None
        except Exception as error:
            report[name] = [type(error).__name__, isinstance(error, ValueError),
                            isinstance(error, adamgen.AdamgenError), str(error)]
    print(json.dumps(report))
""")


@pytest.mark.parametrize(("name", "value", "accepted"), BAD_VALUES,
                         ids=[f"{n}={v}" for n, v, _ in BAD_VALUES])
def test_bad_environment_value_is_a_clear_error(name, value, accepted, tmp_path):
    env = clean_env(**{"ADAMGEN_CACHE_DIR": str(tmp_path / "cache"), "ADAMGEN_STRICT": None,
                       name: value})
    done = subprocess.run([sys.executable, "-c", BAD_ENV_SCRIPT], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr  # import adamgen itself works
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for entry_point, error in report.items():
        assert error is not None, f"{entry_point} accepted {name}={value!r}"
        kind, is_value_error, is_adamgen_error, message = error
        assert kind == "ConfigError" and is_value_error and is_adamgen_error, error
        assert name in message and repr(value) in message and accepted in message, message
    cli = subprocess.run([sys.executable, "-m", "adamgen", "info"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert cli.returncode != 0
    assert name in cli.stderr and accepted in cli.stderr and "Traceback" not in cli.stderr


@pytest.mark.parametrize(("name", "value", "accepted"), BAD_VALUES,
                         ids=[f"{n}={v}" for n, v, _ in BAD_VALUES])
def test_bad_environment_value_in_process(name, value, accepted, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        refresh_environment()
    assert name in str(caught.value) and accepted in str(caught.value)
    monkeypatch.undo()
    refresh_environment()
