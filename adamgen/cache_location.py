"""Which cache a process uses: the user's, or a private temporary one, with one warning.

Stdlib only, like :mod:`adamgen.cache`. The user's cache is ``ADAMGEN_CACHE_DIR``, else
``$XDG_CACHE_HOME/adamgen``, else ``~/.cache/adamgen``. When it cannot be used (it cannot be
created, is not a directory, or fails the ownership rule of :mod:`adamgen.cache_safety`), or when
part of it turns out unusable later (a read-only cache missing a kernel, an unsafe path inside
it), the process warns once, naming the path and the reason, and builds into a private temporary
directory removed at exit. Why not raise: an unusable cache must not stop adamgen from returning
correct results.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from ._warnings import warn
from .cache import ArtifactCache
from .config import environment
from .errors import CacheError

_warned_unusable = False
_private_cache: ArtifactCache | None = None


def default_cache_dir() -> Path:
    """``ADAMGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/adamgen``, else ``~/.cache/adamgen``."""
    configured = environment().cache_dir
    if configured is not None:
        return configured.absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative values
        return Path(xdg) / "adamgen"
    return Path.home() / ".cache" / "adamgen"


def warn_once(message: str) -> None:
    """One warning per process about the cache, whichever problem is found first (the
    message says which; later problems are logged by their callers)."""
    global _warned_unusable
    if not _warned_unusable:
        _warned_unusable = True
        warn(message)


def warn_unusable(root: Path | str, problem: Exception | str) -> None:
    """The one warning that the cache at ``root`` is not used, and why."""
    warn_once(f"adamgen cannot use the kernel cache at {root}: {problem}; building into a "
              "private temporary directory instead (set ADAMGEN_CACHE_DIR to a directory only "
              "you can write)")


def open_default_cache() -> ArtifactCache | None:
    """The user's cache (maybe read-only), or None (after one RuntimeWarning per process) if
    it is unusable.

    Why not raise: an unusable cache (read-only home, unsafe permissions) must not stop adamgen
    from returning correct results; the caller builds into :func:`private_temp_cache` instead.
    """
    root: Path | str = "the default cache directory"
    try:
        root = default_cache_dir()
        return ArtifactCache(root, allow_read_only=True)
    except (CacheError, OSError, RuntimeError) as exc:
        warn_unusable(root, exc)
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
