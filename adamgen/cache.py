"""The artifact cache: compiled kernels (and other build products) stored once, shared safely.

Why it looks like this (STYLE.md items 6-8, DESIGN.md "Build and cache"):

* **Stdlib only.** Deciding that a kernel is a hit must not import SymPy, Jinja or cffi.
* **One lock per key**, taken with ``fcntl.flock`` so the kernel releases it when its holder dies
  (a ``kill -9`` mid-build never blocks the next run), with a bounded wait. Never one lock for the
  whole cache: unrelated kernels build in parallel.
* **Private build, atomic publish.** A builder writes into a fresh directory under ``root/tmp``;
  a manifest listing every file's size and sha256 is written beside the artifacts, and the whole
  directory is moved into place with one ``os.replace``. Readers therefore see either nothing or
  a complete entry, and a truncated or corrupted file fails validation and is rebuilt.
* **Ownership** (:mod:`adamgen.cache_safety`). A directory another user can write could hand us
  a shared object to ``dlopen``: nothing is loaded from a root, intermediate directory, entry or
  file that another uid owns or that is group/other writable; such a path raises
  :class:`CacheUnsafeError` naming it.
* **Read-only caches** (opened with ``allow_read_only``: a pre-built cache on a read-only image or
  mount) serve their valid entries without taking a lock; a miss raises
  :class:`CacheReadOnlyError` and the caller builds elsewhere.

Layout: ``root/<SCHEMA>/<kind>/<key>/{artifacts..., manifest.json}``, ``root/locks/<key>.lock``,
``root/tmp/`` (private build directories, and the sources of the last failed build, swept when
older than an hour).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__
from .cache_safety import (
    SAFE_NAME,
    check_name,
    file_sha256,
    make_private_dir,
    require_safe,
    require_safe_chain,
    unsafe_reason,
    why_not_writable,
)
from .config import environment
from .errors import CacheError, CacheMissError, CacheReadOnlyError, CacheUnsafeError

#: Bumped whenever the layout or the manifest format changes; old entries then live in their own
#: ``root/<old schema>/`` tree, are never read, and ``clear()`` removes them.
SCHEMA = 1
MANIFEST = "manifest.json"
STALE_TMP_SECONDS = 3600.0
_RESERVED_FIELDS = frozenset({"schema", "key", "kind", "adamgen_version", "files", "created",
                              "build_seconds"})
FAILED_BUILD_PREFIX = "failed-build-"

logger = logging.getLogger("adamgen.cache")


@dataclass(frozen=True)
class Entry:
    """One published cache entry.

    Attributes:
        path: the entry directory holding the artifact files and ``manifest.json``.
        manifest: the parsed manifest (file hashes plus the builder's extra fields).
        built: True if this call built the entry, False if it was fetched.
        build_seconds: how long this call's build took (0.0 when fetched).
    """

    path: Path
    manifest: dict[str, Any]
    built: bool
    build_seconds: float


def cache_key(fields: Mapping[str, str]) -> str:
    """The hex sha256 of ``fields`` as canonical JSON (sorted keys): same fields, same key."""
    text = json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ArtifactCache:
    """A directory of build products, each published atomically under a content key.

    Args:
        root: the cache directory; created 0700 if missing. An existing one is refused (with
            :class:`CacheUnsafeError`) if another uid owns it or group/others can write it.
        allow_read_only: open an existing, safe root that this process cannot write as a
            read-only cache (:attr:`read_only` says why) instead of raising.
    """

    def __init__(self, root: Path | str, *, allow_read_only: bool = False) -> None:
        self.root = Path(root).expanduser().absolute()
        #: why this cache cannot be written ("" when it can): then misses raise
        #: :class:`CacheReadOnlyError` and nothing is locked, built or removed
        self.read_only = ""
        self._refused: set[tuple[str, str]] = set()  # entries that failed to load, read-only
        self._swept = False
        if allow_read_only and self.root.is_dir():
            require_safe(self.root, directory=True)
            self.read_only = why_not_writable(self.root)
            if self.read_only:
                return
        self._ensure_layout()

    def _ensure_layout(self) -> None:
        """Create (or re-create, if someone deleted them) the root, ``locks`` and ``tmp``."""
        make_private_dir(self.root)
        for sub in (self.root / "locks", self.root / "tmp"):
            make_private_dir(sub)
            problem = why_not_writable(sub)
            if problem:
                raise CacheError(f"cache directory {sub} is not writable: {problem}")

    def __repr__(self) -> str:
        return f"ArtifactCache({str(self.root)!r}{', read-only' if self.read_only else ''})"

    # -- paths ---------------------------------------------------------------------------------
    def entry_path(self, kind: str, key: str) -> Path:
        """Where the entry for (kind, key) lives once published."""
        check_name("kind", kind)
        check_name("key", key)
        return self.root / str(SCHEMA) / kind / key

    def lock_path(self, key: str) -> Path:
        """The per-key lock file (kept forever: deleting it would race with waiters)."""
        check_name("key", key)
        return self.root / "locks" / f"{key}.lock"

    # -- the main operation --------------------------------------------------------------------
    def get_or_build(self, kind: str, key: str, build: Callable[[Path], Mapping[str, Any]], *,
                     lock_timeout: float = 300.0) -> Entry:
        """Return the valid entry for (kind, key), building it under the key's lock on a miss.

        Args:
            kind: namespace of the artifact (e.g. ``"c-kernel"``).
            key: usually :func:`cache_key` of everything that changes the artifact.
            build: called with a fresh private directory; writes the artifact files there and
                returns extra manifest fields (e.g. the rendered source's hash).
            lock_timeout: seconds to wait for another process building the same key.

        Raises:
            CacheMissError: on a miss when ``ADAMGEN_REQUIRE_CACHE_HIT=1``.
            CacheReadOnlyError: on a miss in a read-only cache.
            CacheUnsafeError: a path on the way to the entry another user could have written.
            CacheError: lock timeout, or an entry still invalid after a build.
            OSError: writing the entry failed (a full disk, a file size limit).
        """
        final = self.entry_path(kind, key)
        manifest = None if (kind, key) in self._refused else self._load_valid(final, kind, key)
        if manifest is not None:
            logger.debug("cache hit: fetched %s %s from %s", kind, key, final)
            return Entry(final, manifest, built=False, build_seconds=0.0)
        if self.read_only:
            self._forbid_building(kind, key)
            raise CacheReadOnlyError(f"the kernel cache at {self.root} is read-only "
                                     f"({self.read_only}) and lacks {kind} {key}")
        self._ensure_layout()  # cheap, and survives an ``rm -rf`` of the cache mid-process
        with self._key_lock(key, lock_timeout):
            manifest = self._load_valid(final, kind, key)  # someone may have built it meanwhile
            if manifest is not None:
                logger.debug("cache hit after waiting: fetched %s %s from %s", kind, key, final)
                return Entry(final, manifest, built=False, build_seconds=0.0)
            self._forbid_building(kind, key)
            self._sweep_stale_tmp()
            if os.path.lexists(final):
                logger.debug("removing invalid cache entry %s", final)
                self._remove_entry(final)
            started = time.perf_counter()
            self._build_and_publish(final, kind, key, build)
            seconds = time.perf_counter() - started
            manifest = self._load_valid(final, kind, key)
            if manifest is None:
                raise CacheError(f"cache entry {final} is invalid right after building it "
                                 "(is something else modifying the cache directory?)")
        logger.debug("cache miss: built %s %s in %.3f s into %s", kind, key, seconds, final)
        return Entry(final, manifest, built=True, build_seconds=seconds)

    def invalidate(self, kind: str, key: str) -> None:
        """Remove an entry whose artifact failed to load (e.g. ``dlopen``): the next call rebuilds.

        Taken under the key's lock so it never removes an entry another process is publishing.
        A read-only cache removes nothing: it treats the entry as missing from now on.
        """
        final = self.entry_path(kind, key)
        if self.read_only:
            self._refused.add((kind, key))
            return
        with self._key_lock(key, 300.0):
            if os.path.lexists(final):
                logger.debug("invalidating cache entry %s", final)
                self._remove_entry(final)

    # -- maintenance -----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What is in the cache: root, schema, size in bytes, entries per kind and their count."""
        per_kind: dict[str, int] = {}
        schema_dir = self.root / str(SCHEMA)
        if schema_dir.is_dir():
            for kind_dir in sorted(schema_dir.iterdir()):
                if kind_dir.is_dir():
                    per_kind[kind_dir.name] = sum(1 for p in kind_dir.iterdir() if p.is_dir())
        size = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                with suppress(OSError):  # removed concurrently
                    size += os.lstat(os.path.join(dirpath, name)).st_size
        return {"root": str(self.root), "schema": SCHEMA, "size_bytes": size,
                "per_kind": per_kind, "count": sum(per_kind.values())}

    def clear(self) -> int:
        """Remove every entry (of every schema) and stale temp dirs; return how many entries.

        Each entry is renamed aside atomically before being deleted, so a concurrent reader sees
        either a complete entry or none (a miss), never a half-deleted one; and it is removed
        under its key's lock, so a builder never loses the entry it is publishing.
        """
        if self.read_only:
            raise CacheReadOnlyError(f"cannot clear the kernel cache at {self.root}: "
                                     f"{self.read_only}")
        removed = 0
        for schema_dir in self.root.iterdir():
            if not (schema_dir.name.isdigit() and schema_dir.is_dir()):
                continue
            for kind_dir in list(schema_dir.iterdir()):
                if not kind_dir.is_dir():
                    continue
                for entry in list(kind_dir.iterdir()):
                    if SAFE_NAME.match(entry.name):
                        with self._key_lock(entry.name, 300.0):
                            removed += self._remove_entry(entry)
                    else:  # not a name adamgen writes: no lock to respect
                        removed += self._remove_entry(entry)
        self._swept = False
        self._sweep_stale_tmp()
        return removed

    # -- internals -------------------------------------------------------------------------------
    def _forbid_building(self, kind: str, key: str) -> None:
        if environment().require_cache_hit:
            raise CacheMissError(f"cache miss for kind {kind!r} key {key} in {self.root} "
                                 "(ADAMGEN_REQUIRE_CACHE_HIT=1 forbids building)")

    @contextmanager
    def _key_lock(self, key: str, timeout: float) -> Iterator[None]:
        """Hold ``flock`` on the key's lock file; the OS drops it if this process dies."""
        path = self.lock_path(key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CacheUnsafeError(f"refusing to use lock file {path}: it is a symlink, "
                                       "expected a regular file") from exc
            raise CacheError(f"cannot open lock file {path}: {exc.strerror or exc}") from exc
        try:
            reason = unsafe_reason(os.fstat(fd))
            if reason is not None:
                raise CacheUnsafeError(f"refusing to use lock file {path}: {reason}")
            deadline = time.monotonic() + timeout
            pause = 0.005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                if time.monotonic() >= deadline:
                    raise CacheError(f"timed out after {timeout:g} s waiting for lock {path}: "
                                     "another process is still building this key")
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _load_valid(self, final: Path, kind: str, key: str) -> dict[str, Any] | None:
        """The manifest if the entry is complete and untampered, else None (a miss).

        Ownership problems are not a miss: they raise :class:`CacheUnsafeError`, because
        silently rebuilding would hide that someone else wrote into this user's cache. Every
        directory from the root down is checked, not only the entry: whoever can write
        ``root/<schema>`` or ``root/<schema>/<kind>`` can swap the entry below it.
        """
        try:
            if not require_safe_chain(self.root, final.parent):
                return None
            if not stat.S_ISDIR(os.lstat(final).st_mode):
                return None
            require_safe(final, follow_symlinks=False)
            manifest_path = final / MANIFEST
            require_safe(manifest_path, follow_symlinks=False)
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if not (isinstance(manifest, dict) and manifest.get("key") == key
                    and manifest.get("kind") == kind and manifest.get("schema") == SCHEMA
                    and isinstance(manifest.get("files"), dict)):
                return None
            for name, expected in manifest["files"].items():
                path = final / name
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):
                    return None
                reason = unsafe_reason(st)
                if reason is not None:
                    raise CacheUnsafeError(f"refusing to use cache file {path}: {reason}")
                if st.st_size != expected.get("size"):
                    return None
                if file_sha256(path, st) != expected.get("sha256"):
                    return None
        except CacheError:
            raise
        except (OSError, ValueError, TypeError, AttributeError):
            return None  # missing or unreadable file, bad JSON, wrong manifest types
        return manifest

    def _build_and_publish(self, final: Path, kind: str, key: str,
                           build: Callable[[Path], Mapping[str, Any]]) -> None:
        make_private_dir(final.parent.parent)
        make_private_dir(final.parent)
        workdir = Path(tempfile.mkdtemp(prefix=f"build-{key[:16]}-", dir=self.root / "tmp"))
        try:
            started = time.perf_counter()
            extra = dict(build(workdir))
            build_seconds = round(time.perf_counter() - started, 6)
            clashes = sorted(_RESERVED_FIELDS & extra.keys())
            if clashes:
                raise CacheError(f"builder for {kind} returned reserved manifest fields {clashes}")
            files: dict[str, dict[str, Any]] = {}
            for dirpath, dirnames, filenames in os.walk(workdir):
                for name in dirnames:
                    os.chmod(os.path.join(dirpath, name), 0o700)
                for name in filenames:
                    path = Path(dirpath, name)
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode):
                        raise CacheError(f"builder for {kind} left a non-regular file {path}")
                    # The builder's umask may leave group-write bits, which loading would refuse.
                    os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o022)
                    files[path.relative_to(workdir).as_posix()] = {
                        "sha256": file_sha256(path, os.lstat(path)), "size": st.st_size}
            if MANIFEST in files:
                raise CacheError(f"builder for {kind} wrote a file named {MANIFEST}")
            manifest = {"schema": SCHEMA, "key": key, "kind": kind,
                        "adamgen_version": __version__, "files": files, "created": time.time(),
                        "build_seconds": build_seconds, **extra}
            manifest_tmp = workdir / (MANIFEST + ".tmp")
            manifest_tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n",
                                    encoding="utf-8")
            os.chmod(manifest_tmp, 0o600)
            os.replace(manifest_tmp, workdir / MANIFEST)
            os.chmod(workdir, 0o700)
            try:
                os.replace(workdir, final)
            except OSError as exc:  # a leftover appeared at ``final`` (not via this lock)
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                self._remove_entry(final)
                os.replace(workdir, final)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    def _remove_entry(self, path: Path) -> bool:
        """Rename ``path`` aside into ``tmp`` (atomic for readers), then delete it."""
        aside = Path(tempfile.mkdtemp(prefix="trash-", dir=self.root / "tmp")) / "entry"
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            shutil.rmtree(aside.parent, ignore_errors=True)
            return False
        shutil.rmtree(aside.parent, ignore_errors=True)
        return True

    def _sweep_stale_tmp(self) -> None:
        """Delete build dirs abandoned (e.g. by a killed builder) more than an hour ago."""
        if self._swept:
            return
        self._swept = True
        cutoff = time.time() - STALE_TMP_SECONDS
        try:
            children = list((self.root / "tmp").iterdir())
        except OSError:
            return
        for child in children:
            with suppress(OSError):
                if child.lstat().st_mtime < cutoff:
                    shutil.rmtree(child, ignore_errors=True)


def keep_failed_build(workdir: Path, pattern: str = "*.c") -> Path:
    """Keep the sources of a failed build for the user (the cache deletes ``workdir``).

    ``workdir`` is a private build directory under a cache's ``tmp``; the files matching
    ``pattern`` are copied to ``tmp/failed-build-*`` beside it, after removing older ones: at
    most the last failed build is kept, and the stale-tmp sweep removes it after an hour.
    """
    tmp = workdir.parent
    for old in tmp.glob(FAILED_BUILD_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    kept = Path(tempfile.mkdtemp(prefix=FAILED_BUILD_PREFIX, dir=tmp))
    for path in workdir.glob(pattern):
        shutil.copy2(path, kept / path.name)
    return kept
