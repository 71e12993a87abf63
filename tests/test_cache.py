"""The artifact cache: hits and misses, concurrency, crashes, corruption and ownership.

Every test uses its own cache directory (``ADAMGEN_CACHE_DIR`` under ``tmp_path``); several start
real processes, because locks and "a second process gets a hit" can only be shown that way.
"""

from __future__ import annotations

import ast
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest

from adamgen import cache as cache_module
from adamgen import cache_location
from adamgen.cache import SCHEMA, ArtifactCache, Entry, cache_key
from adamgen.cache_location import default_cache_dir, open_default_cache, private_temp_cache
from adamgen.config import refresh_environment
from adamgen.errors import (
    CacheError,
    CacheMissError,
    CacheReadOnlyError,
    CacheUnsafeError,
)

REPO = Path(__file__).resolve().parents[1]
KEY = cache_key({"test": "artifact", "n": "1"})


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("ADAMGEN_"):
            monkeypatch.delenv(name)
    root = tmp_path / "cache"
    monkeypatch.setenv("ADAMGEN_CACHE_DIR", str(root))
    monkeypatch.setattr(cache_location, "_warned_unusable", False)
    return root


@pytest.fixture
def cache(cache_dir: Path) -> ArtifactCache:
    return ArtifactCache(default_cache_dir())


def write_artifact(payload: bytes = b"\x7fELF fake shared object " * 64):
    """A builder that writes one artifact and counts its calls."""
    calls: list[Path] = []

    def build(workdir: Path) -> dict[str, str]:
        calls.append(workdir)
        (workdir / "kernel.so").write_bytes(payload)
        return {"source_sha256": "0" * 64}

    build.calls = calls  # type: ignore[attr-defined]
    return build


def child_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAMGEN_")}
    env.update(ADAMGEN_CACHE_DIR=str(cache_dir), PYTHONPATH=str(REPO), **extra)
    return env


CHILD_PRELUDE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from adamgen.cache import ArtifactCache
    from adamgen.cache_location import default_cache_dir
    cache = ArtifactCache(default_cache_dir())
""")


def run_child(code: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code)],
                          check=False, env=env, capture_output=True, text=True, timeout=timeout)


# -- basics ------------------------------------------------------------------------------------
def test_miss_builds_then_hit_fetches(cache: ArtifactCache, cache_dir: Path) -> None:
    build = write_artifact()
    first = cache.get_or_build("kernel", KEY, build)
    second = cache.get_or_build("kernel", KEY, build)
    assert isinstance(first, Entry)
    assert (first.built, second.built) == (True, False)
    assert len(build.calls) == 1
    assert first.build_seconds > 0 and second.build_seconds == 0.0
    assert first.path == cache_dir / str(SCHEMA) / "kernel" / KEY == second.path
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest == second.manifest
    assert manifest["key"] == KEY and manifest["kind"] == "kernel"
    assert manifest["source_sha256"] == "0" * 64 and "adamgen_version" in manifest
    assert 0 <= manifest["build_seconds"] <= first.build_seconds and manifest["created"] > 0
    assert manifest["files"]["kernel.so"]["size"] == (first.path / "kernel.so").stat().st_size
    assert (cache_dir.stat().st_mode & 0o777) == 0o700
    assert not any((cache_dir / "tmp").iterdir()), "the private build dir was moved, not copied"


def test_build_and_fetch_are_logged_at_debug(cache: ArtifactCache,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="adamgen.cache"):
        cache.get_or_build("kernel", KEY, write_artifact())
        cache.get_or_build("kernel", KEY, write_artifact())
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("cache miss: built kernel") and " s into " in m for m in messages)
    assert any(m.startswith("cache hit: fetched kernel") for m in messages)


def test_cache_deleted_under_a_running_process_is_recreated(cache: ArtifactCache,
                                                            cache_dir: Path) -> None:
    cache.get_or_build("kernel", KEY, write_artifact())
    shutil.rmtree(cache_dir)
    assert cache.get_or_build("kernel", KEY, write_artifact()).built
    assert (cache_dir.stat().st_mode & 0o777) == 0o700


def test_cache_key_is_stable_and_sensitive() -> None:
    a = cache_key({"flags": "-O3", "cc": "gcc"})
    assert a == cache_key({"cc": "gcc", "flags": "-O3"})
    assert a != cache_key({"cc": "gcc", "flags": "-O2"})
    assert len(a) == 64 and int(a, 16) >= 0


def test_default_cache_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("ADAMGEN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "adamgen"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "adamgen"


def test_kind_and_key_cannot_escape_the_cache(cache: ArtifactCache) -> None:
    with pytest.raises(CacheError, match="invalid cache kind"):
        cache.get_or_build("../evil", KEY, write_artifact())
    with pytest.raises(CacheError, match="invalid cache key"):
        cache.get_or_build("kernel", "a/b", write_artifact())


def test_builder_cannot_overwrite_reserved_manifest_fields(cache: ArtifactCache) -> None:
    def build(workdir: Path) -> dict[str, str]:
        (workdir / "x").write_text("x")
        return {"key": "forged"}

    with pytest.raises(CacheError, match="reserved"):
        cache.get_or_build("kernel", KEY, build)


def test_failed_build_leaves_nothing_behind(cache: ArtifactCache, cache_dir: Path) -> None:
    def broken(workdir: Path) -> dict[str, str]:
        (workdir / "half.so").write_bytes(b"half")
        raise RuntimeError("compiler exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        cache.get_or_build("kernel", KEY, broken)
    assert not any((cache_dir / "tmp").iterdir())
    assert not cache.entry_path("kernel", KEY).exists()
    assert cache.get_or_build("kernel", KEY, write_artifact()).built


# -- proving hits across processes -------------------------------------------------------------
def test_require_cache_hit_raises_on_miss(cache: ArtifactCache,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAMGEN_REQUIRE_CACHE_HIT", "1")
    with pytest.raises(CacheMissError, match=f"kind 'kernel' key {KEY}"):
        cache.get_or_build("kernel", KEY, write_artifact())


def test_second_process_gets_a_hit(cache: ArtifactCache, cache_dir: Path) -> None:
    cache.get_or_build("kernel", KEY, write_artifact(b"payload"))
    code = f"""
        entry = cache.get_or_build("kernel", {KEY!r}, lambda d: 1 / 0)
        print(entry.built, (entry.path / "kernel.so").read_bytes().decode())
    """
    hit = run_child(code, child_env(cache_dir, ADAMGEN_REQUIRE_CACHE_HIT="1"))
    assert hit.returncode == 0, hit.stderr
    assert hit.stdout.split() == ["False", "payload"]
    miss = run_child(code.replace(KEY, "f" * 64), child_env(cache_dir,
                                                             ADAMGEN_REQUIRE_CACHE_HIT="1"))
    assert miss.returncode != 0 and "CacheMissError" in miss.stderr and "f" * 64 in miss.stderr


def test_eight_processes_at_once_build_exactly_once(cache_dir: Path, tmp_path: Path) -> None:
    counter, go = tmp_path / "builds.txt", tmp_path / "go"
    code = f"""
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        def build(workdir):
            with open({str(counter)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(0.3)  # keep the others waiting on the lock
            (workdir / "kernel.so").write_bytes(b"built by %d" % os.getpid())
            return {{}}
        entry = cache.get_or_build("kernel", {KEY!r}, build)
        print(entry.built, (entry.path / "kernel.so").read_bytes().decode())
    """
    env = child_env(cache_dir)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    time.sleep(0.2)
    go.touch()
    results = [proc.communicate(timeout=60) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in results]
    builders = counter.read_text().split()
    assert len(builders) == 1
    outputs = [out.strip() for out, _ in results]
    assert sorted(o.split()[0] for o in outputs) == ["False"] * 7 + ["True"]
    assert {o.split(" ", 1)[1] for o in outputs} == {f"built by {builders[0]}"}


# -- crashes and corruption ----------------------------------------------------------------------
def test_builder_killed_mid_build_does_not_block(cache: ArtifactCache, cache_dir: Path,
                                                 tmp_path: Path) -> None:
    started = tmp_path / "started"
    code = f"""
        def build(workdir):
            (workdir / "kernel.so").write_bytes(b"half written")
            Path({str(started)!r}).touch()
            time.sleep(60)
        cache.get_or_build("kernel", {KEY!r}, build)
    """
    proc = subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code)],
                            env=child_env(cache_dir), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "child never started"
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    leftovers = list((cache_dir / "tmp").iterdir())
    assert len(leftovers) == 1, "the killed builder's private dir is left for the sweeper"

    began = time.monotonic()
    entry = cache.get_or_build("kernel", KEY, write_artifact(b"whole"), lock_timeout=5)
    assert entry.built and (entry.path / "kernel.so").read_bytes() == b"whole"
    assert time.monotonic() - began < 3

    old = time.time() - 2 * 3600  # an hour later the sweeper removes the abandoned dir
    os.utime(leftovers[0], (old, old))
    ArtifactCache(cache_dir).get_or_build("kernel", cache_key({"other": "1"}), write_artifact())
    assert not leftovers[0].exists()


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete", "bad_manifest",
                                    "wrong_key_in_manifest"])
def test_damaged_entry_is_rebuilt(cache: ArtifactCache, damage: str) -> None:
    payload = bytes(range(256)) * 16
    entry = cache.get_or_build("kernel", KEY, write_artifact(payload))
    artifact, manifest = entry.path / "kernel.so", entry.path / "manifest.json"
    if damage == "truncate":
        artifact.write_bytes(payload[:100])
    elif damage == "flip_byte":
        data = bytearray(payload)
        data[1000] ^= 0xFF
        artifact.write_bytes(bytes(data))  # same size: only the sha256 can tell
        later = time.time() + 5  # a real later write has a later mtime (the hash memo's key)
        os.utime(artifact, (later, later))
    elif damage == "delete":
        artifact.unlink()
    elif damage == "bad_manifest":
        manifest.write_text('{"key": ')
    else:
        manifest.write_text(manifest.read_text().replace(KEY, "0" * 64))
    build = write_artifact(payload)
    again = cache.get_or_build("kernel", KEY, build)
    assert again.built and len(build.calls) == 1
    assert artifact.read_bytes() == payload
    assert not cache.get_or_build("kernel", KEY, build).built


def test_invalidate_forces_a_rebuild(cache: ArtifactCache) -> None:
    cache.get_or_build("kernel", KEY, write_artifact())
    cache.invalidate("kernel", KEY)
    assert not cache.entry_path("kernel", KEY).exists()
    assert cache.get_or_build("kernel", KEY, write_artifact()).built
    cache.invalidate("kernel", cache_key({"never": "built"}))  # a no-op, not an error


def test_lock_timeout_names_the_lock(cache: ArtifactCache) -> None:
    holder = os.open(cache.lock_path(KEY), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        began = time.monotonic()
        with pytest.raises(CacheError, match="timed out") as caught:
            cache.get_or_build("kernel", KEY, write_artifact(), lock_timeout=0.3)
        assert str(cache.lock_path(KEY)) in str(caught.value)
        assert 0.3 <= time.monotonic() - began < 3
    finally:
        os.close(holder)
    assert cache.get_or_build("kernel", KEY, write_artifact(), lock_timeout=0.3).built


# -- ownership ------------------------------------------------------------------------------------
def test_group_or_other_writable_cache_dir_is_refused(cache_dir: Path) -> None:
    cache_dir.mkdir(mode=0o700)
    os.chmod(cache_dir, 0o777)
    with pytest.raises(CacheError, match="writable by group or others") as caught:
        ArtifactCache(cache_dir)
    assert str(cache_dir) in str(caught.value)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert open_default_cache() is None
        assert open_default_cache() is None
    assert len(seen) == 1, "one warning per process, not one per call"
    assert issubclass(seen[0].category, RuntimeWarning)
    assert str(cache_dir) in str(seen[0].message) and "0777" in str(seen[0].message)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_cache_dir_owned_by_another_user_is_refused(cache_dir: Path) -> None:
    cache_dir.mkdir(mode=0o700)
    os.chown(cache_dir, 12345, 12345)
    with pytest.raises(CacheError, match="owned by uid 12345"):
        ArtifactCache(cache_dir)


def test_writable_artifact_inside_the_cache_is_refused(cache: ArtifactCache) -> None:
    entry = cache.get_or_build("kernel", KEY, write_artifact())
    os.chmod(entry.path / "kernel.so", 0o666)
    with pytest.raises(CacheError, match="kernel.so.*writable by group or others"):
        cache.get_or_build("kernel", KEY, write_artifact())


@pytest.mark.parametrize("how", ["writable by others", "owned by another user"])
@pytest.mark.parametrize("level", ["schema", "kind"])
def test_every_directory_down_to_the_entry_is_checked(cache: ArtifactCache, cache_dir: Path,
                                                      level: str, how: str) -> None:
    """Whoever can write ``root/<schema>`` or ``root/<schema>/<kind>`` can swap the entry."""
    if how == "owned by another user" and os.geteuid() != 0:
        pytest.skip("giving a directory away needs root")
    entry = cache.get_or_build("kernel", KEY, write_artifact())
    directory = entry.path.parent if level == "kind" else entry.path.parent.parent
    if how == "writable by others":
        os.chmod(directory, 0o777)
    else:
        os.chown(directory, 65534, 65534)
    with pytest.raises(CacheUnsafeError, match="refusing") as caught:
        cache.get_or_build("kernel", KEY, write_artifact())
    assert str(directory) in str(caught.value)


def test_a_symlinked_intermediate_directory_is_refused(cache: ArtifactCache, cache_dir: Path,
                                                       tmp_path: Path) -> None:
    entry = cache.get_or_build("kernel", KEY, write_artifact())
    elsewhere = tmp_path / "elsewhere"
    shutil.move(entry.path.parent, elsewhere)
    entry.path.parent.symlink_to(elsewhere)
    with pytest.raises(CacheUnsafeError, match="not a directory"):
        cache.get_or_build("kernel", KEY, write_artifact())


def test_a_symlinked_lock_is_unsafe_and_its_target_untouched(cache: ArtifactCache,
                                                            tmp_path: Path) -> None:
    target = tmp_path / "someone-elses-file"
    target.write_text("untouched")
    cache.lock_path(KEY).symlink_to(target)
    with pytest.raises(CacheUnsafeError, match="lock file.*symlink"):
        cache.get_or_build("kernel", KEY, write_artifact())
    assert target.read_text() == "untouched"


# -- read-only caches ---------------------------------------------------------------------------
@pytest.fixture
def read_only(cache: ArtifactCache, cache_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """A cache holding one entry, reopened as if on a read-only mount. Simulated at the one
    boundary the cache asks (``why_not_writable``); ``test_kernel_store.py`` mounts a real one. The
    locks and tmp directories are removed: a shipped read-only image need not have them."""
    cache.get_or_build("kernel", KEY, write_artifact())
    shutil.rmtree(cache_dir / "locks")
    shutil.rmtree(cache_dir / "tmp")
    monkeypatch.setattr(cache_module, "why_not_writable",
                        lambda path: "it is on a read-only file system")
    return ArtifactCache(cache_dir, allow_read_only=True)


def test_a_read_only_cache_serves_hits_without_locking(read_only: ArtifactCache,
                                                      cache_dir: Path) -> None:
    assert read_only.read_only == "it is on a read-only file system"
    assert "read-only" in repr(read_only)
    hit = read_only.get_or_build("kernel", KEY, write_artifact())
    assert not hit.built and hit.path == cache_dir / str(SCHEMA) / "kernel" / KEY
    assert not (cache_dir / "locks").exists() and not (cache_dir / "tmp").exists()


def test_a_read_only_cache_refuses_to_build_remove_or_clear(read_only: ArtifactCache,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    other = cache_key({"other": "kernel"})
    with pytest.raises(CacheReadOnlyError, match="read-only file system.*lacks kernel"):
        read_only.get_or_build("kernel", other, write_artifact())
    monkeypatch.setenv("ADAMGEN_REQUIRE_CACHE_HIT", "1")
    refresh_environment()
    with pytest.raises(CacheMissError):
        read_only.get_or_build("kernel", other, write_artifact())
    monkeypatch.delenv("ADAMGEN_REQUIRE_CACHE_HIT")
    refresh_environment()
    read_only.invalidate("kernel", KEY)  # an entry that failed to load: a miss from now on
    assert read_only.entry_path("kernel", KEY).is_dir()
    with pytest.raises(CacheReadOnlyError):
        read_only.get_or_build("kernel", KEY, write_artifact())
    with pytest.raises(CacheReadOnlyError, match="cannot clear"):
        read_only.clear()


def test_a_read_only_cache_still_obeys_the_ownership_rule(read_only: ArtifactCache,
                                                         cache_dir: Path) -> None:
    os.chmod(cache_dir / str(SCHEMA), 0o777)
    with pytest.raises(CacheUnsafeError):
        read_only.get_or_build("kernel", KEY, write_artifact())
    os.chmod(cache_dir, 0o777)
    with pytest.raises(CacheUnsafeError):
        ArtifactCache(cache_dir, allow_read_only=True)


def test_builder_umask_does_not_make_entries_unloadable(cache: ArtifactCache) -> None:
    def build(workdir: Path) -> dict[str, str]:
        (workdir / "sub").mkdir(mode=0o777)
        for name in ("kernel.so", "sub/kernel.c"):
            fd = os.open(workdir / name, os.O_WRONLY | os.O_CREAT, 0o666)
            os.write(fd, b"x")
            os.close(fd)
            os.chmod(workdir / name, 0o666)
        return {}

    entry = cache.get_or_build("kernel", KEY, build)
    assert set(entry.manifest["files"]) == {"kernel.so", "sub/kernel.c"}
    assert not cache.get_or_build("kernel", KEY, build).built


def test_unusable_default_dir_warns_once(cache_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("ADAMGEN_CACHE_DIR", str(blocker / "adamgen"))
    with pytest.warns(RuntimeWarning, match="not-a-dir"):
        assert open_default_cache() is None
    fallback = private_temp_cache()
    assert fallback is private_temp_cache()
    assert fallback.root.name.startswith("adamgen-")
    assert (fallback.root.stat().st_mode & 0o777) == 0o700
    assert fallback.get_or_build("kernel", KEY, write_artifact()).built


def test_open_default_cache_works_normally(cache_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opened = open_default_cache()
    assert opened is not None and opened.root == cache_dir


# -- maintenance -----------------------------------------------------------------------------------
def test_info_and_clear(cache: ArtifactCache, cache_dir: Path) -> None:
    assert cache.info()["count"] == 0
    for n in range(2):
        cache.get_or_build("kernel", cache_key({"n": str(n)}), write_artifact())
    cache.get_or_build("tuning", KEY, write_artifact(b"{}"))
    info = cache.info()
    assert info["root"] == str(cache_dir) and info["schema"] == SCHEMA
    assert info["per_kind"] == {"kernel": 2, "tuning": 1} and info["count"] == 3
    assert info["size_bytes"] > 2 * 64 * 25
    assert cache.clear() == 3
    assert cache.info()["count"] == 0 and cache.clear() == 0
    assert cache.get_or_build("tuning", KEY, write_artifact()).built


def test_clear_during_reads_is_at_worst_a_miss(cache: ArtifactCache) -> None:
    cache.get_or_build("kernel", KEY, write_artifact())
    held = cache.get_or_build("kernel", KEY, write_artifact())
    cache.clear()
    assert not held.path.exists()  # removed whole, by one rename: never half an entry
    assert cache.get_or_build("kernel", KEY, write_artifact()).built


def test_clear_waits_for_a_builder_holding_the_key(cache: ArtifactCache) -> None:
    cache.get_or_build("kernel", KEY, write_artifact())
    holder = os.open(cache.lock_path(KEY), os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    removed: list[int] = []
    clearer = threading.Thread(target=lambda: removed.append(cache.clear()))
    try:
        clearer.start()
        clearer.join(0.3)
        assert clearer.is_alive() and cache.entry_path("kernel", KEY).is_dir()
    finally:
        os.close(holder)
    clearer.join(10)
    assert removed == [1] and not cache.entry_path("kernel", KEY).exists()


def test_cache_module_imports_only_the_stdlib() -> None:
    for name in ("cache.py", "cache_safety.py", "cache_location.py", "_warnings.py"):
        tree = ast.parse((REPO / "adamgen" / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        assert imported <= set(sys.stdlib_module_names) | {"__future__"}, name
    code = ("import sys, adamgen.cache, adamgen.cache_location; "
            "print(sorted(m for m in ('sympy', 'jinja2') if m in sys.modules))")
    probe = subprocess.run(
        [sys.executable, "-c", code], check=False,
        env=child_env(Path("/nonexistent")), capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"
