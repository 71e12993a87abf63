"""Kernel modules for the runtime: fetched from the cache, generated only on a miss.

A call served from the cache imports neither SymPy nor Jinja: the key is computed from the
configuration and :func:`adamgen._resources.generator_fingerprint` (a hash of the generation
files, read as bytes), and only a miss imports :mod:`adamgen.codegen.driver` to render.

Loaded modules are memoised per process by configuration, so the cache is touched once per
kernel per process.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import sys
import time
from pathlib import Path
from types import ModuleType

from .. import cache as artifact_cache
from .._resources import generator_fingerprint
from ..config import KernelConfig
from ..errors import CacheError
from .forksafe import ForkSafeLock

log = logging.getLogger("adamgen.kernels")

_lock = ForkSafeLock()
_modules: dict[KernelConfig, ModuleType] = {}
#: What happened to each kernel this process asked for: shown by ``adamgen info``.
EVENTS: list[dict[str, object]] = []


@functools.cache
def _open_cache() -> artifact_cache.ArtifactCache | None:
    try:
        return artifact_cache.open_default_cache() or artifact_cache.private_temp_cache()
    except CacheError:  # not even a private temporary directory: kernels live in memory
        return None


def kernel_cache() -> artifact_cache.ArtifactCache:
    """The user's cache, or a private temporary one (with one warning) when it is unusable.

    Raises :class:`CacheError` when no directory at all is writable; NumPy kernels are then
    generated in memory (:func:`numpy_kernel`) and C is unavailable (compiling needs a file).
    """
    cache = _open_cache()
    if cache is None:
        raise CacheError("no writable directory for adamgen's kernel cache (the cache "
                         "directory and the temporary directory are both unusable)")
    return cache


kernel_cache.cache_clear = _open_cache.cache_clear  # type: ignore[attr-defined]


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


def _import_file(path: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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


def _in_memory(config: KernelConfig) -> ModuleType:
    """Render and execute a kernel without any file: the path of last resort."""
    from ..codegen.driver import numpy_source

    module = ModuleType(f"adamgen_numpy_in_memory_{config.spec.name}")
    exec(compile(numpy_source(config), module.__name__, "exec"),  # noqa: S102
         module.__dict__)
    EVENTS.append({"kernel": _variant(config), "built": True, "seconds": 0.0,
                   "path": "(memory: no writable directory)"})
    return module


def _load_numpy_kernel(config: KernelConfig) -> ModuleType:
    try:
        cache = kernel_cache()
    except CacheError:
        return _in_memory(config)
    key = numpy_cache_key(config)
    start = time.perf_counter()
    for attempt in (1, 2):
        entry = cache.get_or_build(
            "numpy", key, functools.partial(_write_numpy_module, config))
        try:
            module = _import_file(entry.path / "kernel.py", f"adamgen_numpy_{key[:16]}")
            break
        except Exception:  # a damaged artifact is a miss: remove it and rebuild once
            if attempt == 2:
                raise
            log.warning("cached NumPy kernel %s failed to import; rebuilding", entry.path)
            cache.invalidate("numpy", key)
    seconds = time.perf_counter() - start
    EVENTS.append({"kernel": _variant(config), "built": entry.built,
                   "seconds": seconds, "path": str(entry.path)})
    log.debug("numpy kernel %s %s in %.3f s (%s)", config.describe(),
              "built" if entry.built else "fetched from cache", seconds, entry.path)
    return module
