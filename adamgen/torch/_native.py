"""The step helper: a step's per-tensor checks in C++, built once against the running torch.

Why C++ and not the cffi C of the kernels: the checks read torch's tensors themselves (each
parameter's ``.grad``, data pointer, element count, layout, version counter), and only torch's
C++ API reaches them without a Python call per tensor. Right after a backward pass those
Python calls cost about 1.5 us a tensor (caches hold the activations, not the interpreter's
code), 120 us for a small model's 78 tensors: more than its kernel. The helper does the same
reads in about 0.15 us a tensor (``_native.cpp`` says what it checks).

It is an accelerator only: every function answers "not the common case" rather than raise,
and the Python path (:mod:`adamgen.torch._bucket`, :mod:`adamgen.torch._plan`) then takes the
step with the same checks and the precise errors, so a step's result never depends on whether
the helper is there.

**Building.** On first use (about 15 s, announced on stderr) ``_native.cpp`` is compiled with
the C++ compiler (``$CXX``, else ``c++``, ``g++``, ``clang++``) against the headers and
libraries of the torch that is running, into the kernel cache (kind ``torch-helper``, keyed by
the source, torch's version and C++ ABI, the compiler and Python's ABI); later processes load
it from there. Without a C++ compiler or torch's headers, or when the build fails, steps take
the Python path after one ``RuntimeWarning`` (``ADAMGEN_STRICT=1``: an error). Under
``ADAMGEN_BACKEND=numpy`` (no compiling at all) it is not built.
"""

from __future__ import annotations

import functools
import hashlib
import shlex
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .._version import __version__
from .._warnings import warn
from ..cache import cache_key
from ..codegen import build
from ..config import environment
from ..errors import CacheError, CacheMissError, CompileError
from ..runtime.forksafe import ForkSafeLock
from ..runtime.kernel_store import load_entry

KIND = "torch-helper"
SOURCE = Path(__file__).with_name("_native.cpp")
#: what happened to the helper in this process, for ``adamgen info`` and tests
EVENTS: list[dict[str, Any]] = []

_lock = ForkSafeLock()
_helper: ModuleType | None = None
_tried = False


def helper() -> ModuleType | None:
    """The loaded helper module, or None when steps take the Python path (see the module
    docstring). Memoised per process; :func:`forget` drops it (tests)."""
    global _helper, _tried
    if _tried:
        return _helper
    with _lock:
        if not _tried:
            _helper = _load_or_none()
            _tried = True
    return _helper


def forget() -> None:
    """Forget the loaded helper and any failure: the next :func:`helper` tries again."""
    global _helper, _tried
    with _lock:
        _helper, _tried = None, False


def _load_or_none() -> ModuleType | None:
    if environment().backend == "numpy":
        EVENTS.append({"helper": KIND, "built": False, "error": "ADAMGEN_BACKEND=numpy"})
        return None
    try:
        return _load()
    except CacheMissError:  # ADAMGEN_REQUIRE_CACHE_HIT: a miss must be seen
        raise
    except (CompileError, CacheError, OSError) as exc:
        EVENTS.append({"helper": KIND, "built": False, "error": str(exc).splitlines()[0]})
        if environment().strict:
            raise
        warn(f"adamgen.torch: its step helper is unavailable, so each step checks its tensors "
             f"in Python (about 1.5 us more per tensor right after backward; the results are "
             f"the same): {str(exc).splitlines()[0]}")
        return None


@functools.cache
def _torch_dir() -> Path:
    return Path(torch.__file__).resolve().parent


def _compiler() -> list[str]:
    """The C++ compiler's argv (``$CXX``, else the first of c++, g++, clang++ on PATH)."""
    command = build.compiler_command("CXX", ("c++", "g++", "clang++"), "C++")
    if isinstance(command, str):
        raise CompileError(command)
    return command


def _key(compiler: list[str]) -> str:
    source = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    return cache_key({
        "adamgen_version": __version__, "source": source, "compiler": shlex.join(compiler),
        "torch": torch.__version__, "torch_git": str(getattr(torch.version, "git_version", "")),
        "torch_dir": str(_torch_dir()),
        "cxx11_abi": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
        "python_abi": build.python_abi_tag()})


def _load() -> ModuleType:
    compiler = _compiler()
    key = _key(compiler)
    name = build.extension_module_name(key, prefix="_adamgen_torch_")

    def load(entry: Any) -> ModuleType:
        module = build.load_extension_module(entry.path / f"{name}{build.extension_suffix()}",
                                             name)
        if not (hasattr(module, "same_params") and hasattr(module, "take_grads")):
            raise CacheError(f"{entry.path} loaded but is not adamgen.torch's step helper")
        return module

    started = time.perf_counter()
    entry, module = load_entry(KIND, key, lambda directory: _build(compiler, name, directory),
                               load, (CacheError,))
    EVENTS.append({"helper": KIND, "built": entry.built, "path": str(entry.path),
                   "seconds": time.perf_counter() - started})
    return module


def _build(compiler: list[str], name: str, directory: Path) -> dict[str, str]:
    """Compile ``_native.cpp`` into ``directory`` (the cache's private build directory)."""
    include = _torch_dir() / "include"
    library = _torch_dir() / "lib"
    if not (include / "torch" / "csrc" / "autograd" / "python_variable.h").is_file():
        raise CompileError(f"torch's C++ headers are not in {include} (this torch was "
                           "installed without them)")
    paths = sysconfig.get_paths()
    so_path = directory / f"{name}{build.extension_suffix()}"
    argv = [*compiler, "-O2", "-std=c++20", "-fPIC", "-shared", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DADAMGEN_MODULE={name}",
            f"-I{paths['include']}", f"-I{include}",
            f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
            "-o", str(so_path), str(SOURCE),
            f"-L{library}", "-lc10", "-ltorch_cpu", "-ltorch_python", f"-Wl,-rpath,{library}"]
    print(f"adamgen.torch: compiling its step helper against torch {torch.__version__} "
          "(once per torch install, about 15 s)...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    rc, _, stderr = build.run_command(argv, build.COMPILE_TIMEOUT_SECONDS)
    if rc != 0 or not so_path.is_file():
        raise CompileError(f"compiling adamgen.torch's step helper failed: "
                           f"{build.first_error_line(stderr)}", argv=argv, stderr=stderr)
    print(f"adamgen.torch: step helper compiled in {time.perf_counter() - started:.1f} s",
          file=sys.stderr, flush=True)
    return {"torch": torch.__version__}
