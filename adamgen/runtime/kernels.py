"""Kernel modules for the runtime: fetched from the cache, generated only on a miss.

A call served from the cache imports neither SymPy nor Jinja: the key is computed from the
configuration and :func:`adamgen._resources.generator_fingerprint` (a hash of the generation
files, read as bytes), and only a miss imports :mod:`adamgen.codegen.driver` to render.

Loaded modules are memoised per process by configuration, so the cache is touched once per
kernel per process.

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

A NumPy kernel runs the bytes the manifest hashed: the source is read once, checked against the
manifest and executed with ``compile``/``exec``, never imported through a ``__pycache__``
(a planted ``.pyc`` would otherwise run instead of the hashed source).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from .. import cache as artifact_cache
from .. import cache_location
from .._resources import generator_fingerprint
from ..config import KernelConfig
from ..errors import CacheError, CacheMissError, CacheReadOnlyError, CacheUnsafeError
from .forksafe import ForkSafeLock

log = logging.getLogger("adamgen.kernels")

_lock = ForkSafeLock()
_modules: dict[tuple[str, KernelConfig], ModuleType] = {}
#: What happened to each kernel this process asked for: shown by ``adamgen info``.
EVENTS: list[dict[str, object]] = []

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


def _forget_cache() -> None:
    global _cache, _opened
    with _open_lock:
        _cache, _opened = None, False


kernel_cache.cache_clear = _forget_cache  # type: ignore[attr-defined]


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


def numpy_cache_key(config: KernelConfig) -> str:
    return artifact_cache.cache_key({
        "kind": "numpy", "generator": generator_fingerprint(),
        "config": config.key(), "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
    })


def _variant(config: KernelConfig) -> str:
    """How ``adamgen info`` names a NumPy kernel."""
    return f"numpy {config.describe()}"


def _write_numpy_module(config: KernelConfig, directory: Path) -> dict[str, str]:
    from ..codegen.driver import numpy_source  # generation time: SymPy and Jinja load here

    source = numpy_source(config)
    (directory / "kernel.py").write_text(source)
    return {"source_sha256": hashlib.sha256(source.encode()).hexdigest(),
            "variant": _variant(config)}


def _exec_verified(entry: artifact_cache.Entry, name: str, module_name: str) -> ModuleType:
    """Execute the entry's source file ``name`` as a new module: the bytes read are the bytes
    checked against the manifest and the bytes run (no bytecode cache is read or written)."""
    path = entry.path / name
    source = path.read_bytes()
    if hashlib.sha256(source).hexdigest() != entry.manifest["files"][name]["sha256"]:
        raise CacheError(f"{path} changed after it was validated: its sha256 is not the one "
                         "in the manifest")
    module = ModuleType(module_name)
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 (verified above)
    return module


def numpy_kernel(config: KernelConfig) -> ModuleType:
    """The generated NumPy module for ``config`` (``prelude``, ``update``, ``DEPENDS``, ...)."""
    memo_key = config
    module = _modules.get(memo_key)
    if module is not None:
        return module
    with _lock:
        module = _modules.get(memo_key)
        if module is None:
            module = _load_numpy_kernel(config)
            _modules[memo_key] = module
    return module


def _in_memory(config: KernelConfig, reason: str) -> ModuleType:
    """Render and execute a kernel without any file: the path of last resort."""
    from ..codegen.driver import numpy_source

    log.info("numpy kernel %s is rendered in memory: %s", config.describe(), reason)
    module = ModuleType(f"adamgen_numpy_in_memory_{config.spec.name}")
    exec(compile(numpy_source(config), module.__name__, "exec"),  # noqa: S102
         module.__dict__)
    EVENTS.append({"kernel": _variant(config), "built": True, "seconds": 0.0,
                   "path": f"(memory: {reason})"})
    return module


def _load_numpy_kernel(config: KernelConfig) -> ModuleType:
    key = numpy_cache_key(config)
    start = time.perf_counter()
    builder = functools.partial(_write_numpy_module, config)
    try:
        entry, module = load_entry(
            "numpy", key, builder,
            lambda entry: _exec_verified(entry, "kernel.py", f"adamgen_numpy_{key[:16]}"),
            (Exception,))
    except CacheMissError:
        raise
    except (CacheError, OSError) as exc:  # no directory, or a failed write (EFBIG, ENOSPC)
        return _in_memory(config, str(exc).splitlines()[0])
    seconds = time.perf_counter() - start
    EVENTS.append({"kernel": _variant(config), "built": entry.built,
                   "seconds": seconds, "path": str(entry.path)})
    log.debug("numpy kernel %s %s in %.3f s (%s)", config.describe(),
              "built" if entry.built else "fetched from cache", seconds, entry.path)
    return module
