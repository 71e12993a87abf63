"""Where the runtime's kernels are kept: the kernel cache, and what happens when it cannot serve.

A call served from the cache imports neither SymPy nor Jinja: the key is computed from the
configuration and :func:`adamgen._resources.generator_fingerprint` (a hash of the generation
files, read as bytes), and only a miss imports :mod:`adamgen.codegen.driver` to render.

**Which cache serves, and what happens when it cannot** (the same for NumPy and C kernels, see
:func:`fetch`):

* the user's cache, else (unusable: cannot be created, unsafe owner or mode) a private
  temporary cache, after one ``RuntimeWarning`` naming the path;
* a read-only cache (a pre-built cache on a read-only image) serves the kernels it holds; a
  missing one is built into the private temporary cache, after the same one warning;
* an unsafe path found inside the cache (another user's entry or directory, a group-writable
  one, a symlinked lock): the same one warning, and nothing more is loaded from that cache in
  this process; the private temporary cache serves instead;
* a build whose files cannot be written (a full disk, a file size limit): the NumPy kernel is
  rendered in memory; C falls back to NumPy with its one warning
  (:func:`adamgen.runtime.c_kernels.c_kernel`);
* no writable directory at all: the same as a failed write.

The NumPy and C kernel loaders (:mod:`adamgen.runtime.numpy_kernels`,
:mod:`adamgen.runtime.c_kernels`) both fetch through :func:`load_entry`, so the policy lives here
once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .. import cache as artifact_cache
from .. import cache_location
from ..errors import CacheError, CacheMissError, CacheReadOnlyError, CacheUnsafeError
from .forksafe import ForkSafeLock

log = logging.getLogger("adamgen.kernel_store")

_open_lock = ForkSafeLock()
_cache: artifact_cache.ArtifactCache | None = None
_opened = False
Loaded = TypeVar("Loaded")


def kernel_cache() -> artifact_cache.ArtifactCache:
    """The cache kernels come from: the user's (maybe read-only), or a private temporary one
    (with one warning) when it is unusable.

    Raises :class:`CacheError` when no directory at all is usable; NumPy kernels are then
    generated in memory (:func:`numpy_kernel`) and C is unavailable (compiling needs a file).
    """
    global _cache, _opened
    if not _opened:
        with _open_lock:
            if not _opened:
                try:
                    _cache = (cache_location.open_default_cache()
                              or cache_location.private_temp_cache())
                except CacheError:  # not even a private temporary directory
                    _cache = None
                _opened = True
    if _cache is None:
        raise CacheError("no writable directory for adamgen's kernel cache (the cache "
                         "directory and the temporary directory are both unusable)")
    return _cache


def forget_cache() -> None:
    """Drop the cache handle: the next :func:`kernel_cache` reads ``ADAMGEN_CACHE_DIR`` again
    (tests and ``adamgen clear`` point the process at another cache)."""
    global _cache, _opened
    with _open_lock:
        _cache, _opened = None, False


def _fall_back(cache: artifact_cache.ArtifactCache,
               problem: CacheError) -> artifact_cache.ArtifactCache:
    """The private temporary cache, after the one warning; an unsafe cache is dropped for the
    rest of the process. Raises ``problem`` when ``cache`` is the private one already."""
    global _cache
    private = cache_location.private_temp_cache()
    if private is cache:
        raise problem
    if isinstance(problem, CacheReadOnlyError):
        cache_location.warn_once(f"adamgen: {problem}; the kernels it holds are used, missing "
                                 "ones are built into a private temporary directory")
    else:
        cache_location.warn_unusable(cache.root, problem)
        with _open_lock:
            _cache = private
    return private


def fetch(kind: str, key: str, builder: Callable[[Path], Mapping[str, Any]]
          ) -> tuple[artifact_cache.ArtifactCache, artifact_cache.Entry]:
    """The entry for (kind, key) and the cache holding it, under the policy above.

    Raises:
        CacheMissError: a miss under ``ADAMGEN_REQUIRE_CACHE_HIT=1``.
        CacheError, OSError: nothing could hold the entry (no directory, a failed write).
    """
    cache = kernel_cache()
    try:
        return cache, cache.get_or_build(kind, key, builder)
    except CacheMissError:
        raise
    except (CacheReadOnlyError, CacheUnsafeError) as exc:
        private = _fall_back(cache, exc)
    return private, private.get_or_build(kind, key, builder)


def load_entry(kind: str, key: str, builder: Callable[[Path], Mapping[str, Any]],
               load: Callable[[artifact_cache.Entry], Loaded],
               errors: tuple[type[Exception], ...]) -> tuple[artifact_cache.Entry, Loaded]:
    """Fetch (kind, key) and ``load`` it; an artifact that validates but fails to load
    (``load`` raises one of ``errors``) is a miss: invalidated and rebuilt once."""
    for attempt in (1, 2):
        cache, entry = fetch(kind, key, builder)
        try:
            return entry, load(entry)
        except errors as exc:
            if attempt == 2:
                raise
            log.warning("cached %s %s failed to load (%s); rebuilding", kind, entry.path, exc)
            try:
                cache.invalidate(kind, key)
            except CacheUnsafeError as unsafe:
                _fall_back(cache, unsafe)
    raise AssertionError("unreachable")
