"""Generated NumPy kernels for the runtime: fetched from the kernel cache, rendered on a miss.

A call served from the cache imports neither SymPy nor Jinja: the key is computed from the
configuration and :func:`adamgen._resources.generator_fingerprint` (a hash of the generation
files, read as bytes), and only a miss imports :mod:`adamgen.codegen.driver` to render. Loaded
modules are memoised per process by configuration, so the cache is touched once per kernel per
process. Which cache serves, and what happens when none can, is :mod:`adamgen.runtime.kernel_store`'s
policy; a NumPy kernel's last resort is rendering in memory.

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
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import cache as artifact_cache
from .._resources import generator_fingerprint
from ..config import KernelConfig
from ..errors import CacheError, CacheMissError
from .forksafe import ForkSafeLock
from .kernel_store import load_entry

log = logging.getLogger("adamgen.numpy_kernels")

_lock = ForkSafeLock()
_modules: dict[KernelConfig, ModuleType] = {}
#: What happened to each NumPy kernel this process asked for: shown by ``adamgen info``.
EVENTS: list[dict[str, Any]] = []


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
