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
* **Ownership.** A directory another user can write could hand us a shared object to ``dlopen``:
  nothing is loaded from a root, entry or file that another uid owns or that is group/other
  writable. Such a cache is refused with an error naming the path.

Layout: ``root/<SCHEMA>/<kind>/<key>/{artifacts..., manifest.json}``, ``root/locks/<key>.lock``,
``root/tmp/`` (private build directories, swept when older than an hour).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__
from .config import environment
from .errors import CacheError, CacheMissError

#: Bumped whenever the layout or the manifest format changes; old entries then live in their own
#: ``root/<old schema>/`` tree, are never read, and ``clear()`` removes them.
SCHEMA = 1
MANIFEST = "manifest.json"
STALE_TMP_SECONDS = 3600.0
_RESERVED_FIELDS = frozenset({"schema", "key", "kind", "adamgen_version", "files", "created",
                              "build_seconds"})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

logger = logging.getLogger("adamgen.cache")

# (device, inode, size, mtime_ns, ctime_ns) -> sha256: a hit re-hashes a file only if it changed.
_hash_memo: dict[tuple[int, int, int, int, int], str] = {}
_warned_unusable = False
_private_cache: ArtifactCache | None = None


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


def default_cache_dir() -> Path:
    """``ADAMGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/adamgen``, else ``~/.cache/adamgen``."""
    configured = environment().cache_dir
    if configured is not None:
        return configured.absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative values
        return Path(xdg) / "adamgen"
    return Path.home() / ".cache" / "adamgen"


def _unsafe_reason(st: os.stat_result) -> str | None:
    """Why a path with this stat must not be trusted, or None if it is ours alone."""
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _require_safe(path: Path, *, follow_symlinks: bool = True) -> os.stat_result:
    """Stat ``path`` and raise :class:`CacheError` if another user could have written it."""
    st = os.stat(path, follow_symlinks=follow_symlinks)
    reason = _unsafe_reason(st)
    if reason is not None:
        raise CacheError(f"refusing to use cache path {path}: {reason}")
    return st


def _make_private_dir(path: Path) -> None:
    """Create ``path`` (0700) if missing; an existing directory is checked, never loosened."""
    try:
        os.makedirs(path, mode=0o700)
        os.chmod(path, 0o700)  # makedirs' mode is filtered by the umask
    except FileExistsError:
        pass
    if not path.is_dir():
        raise CacheError(f"cache path {path} exists but is not a directory")
    _require_safe(path)


def _file_sha256(path: Path, st: os.stat_result) -> str:
    memo_key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _hash_memo.get(memo_key)
    if digest is None:
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digest = _hash_memo[memo_key] = sha.hexdigest()
    return digest


def _check_name(what: str, name: str) -> None:
    """Kinds and keys become path components: only plain names, never ``..`` or ``/``."""
    if not _SAFE_NAME.match(name):
        raise CacheError(f"invalid cache {what} {name!r}: use letters, digits, '_', '-', '.'")


class ArtifactCache:
    """A directory of build products, each published atomically under a content key.

    Args:
        root: the cache directory; created 0700 if missing. An existing one is refused (with
            :class:`CacheError`) if another uid owns it or group/others can write it.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self._ensure_layout()
        self._swept = False

    def _ensure_layout(self) -> None:
        """Create (or re-create, if someone deleted them) the root, ``locks`` and ``tmp``."""
        _make_private_dir(self.root)
        for sub in (self.root / "locks", self.root / "tmp"):
            _make_private_dir(sub)
            if not os.access(sub, os.W_OK | os.X_OK):
                raise CacheError(f"cache directory {sub} is not writable")

    def __repr__(self) -> str:
        return f"ArtifactCache({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------------------------
    def entry_path(self, kind: str, key: str) -> Path:
        """Where the entry for (kind, key) lives once published."""
        _check_name("kind", kind)
        _check_name("key", key)
        return self.root / str(SCHEMA) / kind / key

    def lock_path(self, key: str) -> Path:
        """The per-key lock file (kept forever: deleting it would race with waiters)."""
        _check_name("key", key)
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
            CacheError: lock timeout, unsafe ownership, or an entry still invalid after a build.
        """
        final = self.entry_path(kind, key)
        manifest = self._load_valid(final, kind, key)
        if manifest is not None:
            logger.debug("cache hit: fetched %s %s from %s", kind, key, final)
            return Entry(final, manifest, built=False, build_seconds=0.0)
        self._ensure_layout()  # cheap, and survives an ``rm -rf`` of the cache mid-process
        with self._key_lock(key, lock_timeout):
            manifest = self._load_valid(final, kind, key)  # someone may have built it meanwhile
            if manifest is not None:
                logger.debug("cache hit after waiting: fetched %s %s from %s", kind, key, final)
                return Entry(final, manifest, built=False, build_seconds=0.0)
            if environment().require_cache_hit:
                raise CacheMissError(f"cache miss for kind {kind!r} key {key} in {self.root} "
                                     "(ADAMGEN_REQUIRE_CACHE_HIT=1 forbids building)")
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
        """
        final = self.entry_path(kind, key)
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
        removed = 0
        for schema_dir in self.root.iterdir():
            if not (schema_dir.name.isdigit() and schema_dir.is_dir()):
                continue
            for kind_dir in list(schema_dir.iterdir()):
                if not kind_dir.is_dir():
                    continue
                for entry in list(kind_dir.iterdir()):
                    if _SAFE_NAME.match(entry.name):
                        with self._key_lock(entry.name, 300.0):
                            removed += self._remove_entry(entry)
                    else:  # not a name adamgen writes: no lock to respect
                        removed += self._remove_entry(entry)
        self._swept = False
        self._sweep_stale_tmp()
        return removed

    # -- internals -------------------------------------------------------------------------------
    @contextmanager
    def _key_lock(self, key: str, timeout: float) -> Iterator[None]:
        """Hold ``flock`` on the key's lock file; the OS drops it if this process dies."""
        path = self.lock_path(key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CacheError(f"cannot open lock file {path}: {exc.strerror or exc}") from exc
        try:
            reason = _unsafe_reason(os.fstat(fd))
            if reason is not None:
                raise CacheError(f"refusing to use lock file {path}: {reason}")
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

        Ownership problems are not a miss: they raise, because silently rebuilding would hide
        that someone else wrote into this user's cache.
        """
        try:
            if not stat.S_ISDIR(os.lstat(final).st_mode):
                return None
            _require_safe(final, follow_symlinks=False)
            manifest_path = final / MANIFEST
            _require_safe(manifest_path, follow_symlinks=False)
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
                reason = _unsafe_reason(st)
                if reason is not None:
                    raise CacheError(f"refusing to use cache file {path}: {reason}")
                if st.st_size != expected.get("size"):
                    return None
                if _file_sha256(path, st) != expected.get("sha256"):
                    return None
        except CacheError:
            raise
        except (OSError, ValueError, TypeError, AttributeError):
            return None  # missing or unreadable file, bad JSON, wrong manifest types
        return manifest

    def _build_and_publish(self, final: Path, kind: str, key: str,
                           build: Callable[[Path], Mapping[str, Any]]) -> None:
        _make_private_dir(final.parent.parent)
        _make_private_dir(final.parent)
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
                        "sha256": _file_sha256(path, os.lstat(path)), "size": st.st_size}
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


def open_default_cache() -> ArtifactCache | None:
    """The user's cache, or None (after one RuntimeWarning per process) if it is unusable.

    Why not raise: an unusable cache (read-only home, unsafe permissions) must not stop adamgen
    from returning correct results; the caller builds into :func:`private_temp_cache` instead.
    """
    global _warned_unusable
    root: Path | str = "the default cache directory"
    try:
        root = default_cache_dir()
        return ArtifactCache(root)
    except (CacheError, OSError, RuntimeError) as exc:
        if not _warned_unusable:
            _warned_unusable = True
            warnings.warn(f"adamgen cannot use the kernel cache at {root}: {exc}; building "
                          "into a private temporary directory instead (set ADAMGEN_CACHE_DIR "
                          "to a directory only you can write)", RuntimeWarning, stacklevel=2)
        return None


def private_temp_cache() -> ArtifactCache:
    """A per-process cache in a fresh ``mkdtemp`` directory (0700), removed at exit.

    Memoised so one process builds each kernel once even without a usable user cache.
    """
    global _private_cache
    if _private_cache is None or not _private_cache.root.is_dir():
        try:
            root = tempfile.mkdtemp(prefix="adamgen-")
        except OSError as exc:
            raise CacheError(f"cannot create a private temporary cache directory: {exc}") from exc
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _private_cache = ArtifactCache(root)
    return _private_cache
