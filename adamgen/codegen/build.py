"""Compiling generated C into a cffi extension module, with every input to the binary known.

Why not ``FFI.compile()``: setuptools/distutils pick flags from Python's own build and hide the
exact command. adamgen uses cffi only to emit the wrapper C file, then runs the compiler itself,
so the full argv goes into the cache key and into :class:`CompileError` (STYLE.md items 5, 6, 9).

Why the probe never raises: "no compiler" is a designed path (the NumPy backend serves), so the
probe returns ``available=False`` with a reason the caller can put in its one warning.

cffi is imported only to emit a wrapper (on a build); deciding a cache hit needs only
:func:`key_fields`, which runs the compiler's ``--version`` but imports neither cffi nor SymPy.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .._version import __version__
from ..errors import ArgumentValueError, CacheError, CompileError, ConfigError

logger = logging.getLogger("adamgen.build")

PROBE_TIMEOUT_SECONDS = 60.0
COMPILE_TIMEOUT_SECONDS = 600.0

_BASE_FLAGS = {
    # Exact mode: no contraction into FMAs and no fast-math, so C rounds exactly like NumPy.
    # -fno-math-errno is IEEE-safe and lets GCC vectorise sqrt.
    "exact": ["-O3", "-std=c99", "-fPIC", "-ffp-contract=off", "-fno-math-errno"],
    "fast": ["-O3", "-std=c99", "-fPIC", "-ffp-contract=fast", "-fno-math-errno"],
}
_WARNING_FLAGS = ["-Wall", "-Wextra"]

_PROBE_C = "int adamgen_probe(int x) { return x + 1; }\n"
_PROBE_OPENMP_C = """#include <omp.h>
int adamgen_probe(int n) {
    int total = 0;
#pragma omp parallel for reduction(+:total)
    for (int i = 0; i < n; ++i) total += i;
    return total + omp_get_max_threads();
}
"""


@dataclass(frozen=True)
class CompilerInfo:
    """What the C compiler on this machine is, or why there is none.

    Attributes:
        available: True if a shared object was compiled successfully with it.
        argv: the command that runs the compiler (``$CC`` split like a shell would), with its
            first element resolved to an absolute path.
        path: ``argv[0]``, for display and cache keys.
        version: the first line of ``--version``.
        family: ``"gcc"``, ``"clang"`` or ``"unknown"`` (decides how ``-march=native`` is read).
        openmp: True if ``-fopenmp`` compiles and links a tiny OpenMP program.
        reason: why ``available`` is False (empty otherwise).
    """

    available: bool
    argv: tuple[str, ...] = ()
    path: str = ""
    version: str = ""
    family: str = "unknown"
    openmp: bool = False
    reason: str = ""


def run_command(argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
    """Run a command; any failure to start it becomes return code 127 with the reason."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, errors="replace",
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 124, "", f"{argv[0]} did not finish within {timeout:g} s"
    except OSError as exc:
        return 127, "", f"cannot run {argv[0]}: {exc.strerror or exc}"
    return proc.returncode, proc.stdout, proc.stderr


def first_error_line(stderr: str) -> str:
    """The line of compiler output a human needs first: the first real ``error:`` line.

    The driver's summaries (``collect2: error: ld returned 1 exit status``) come after the cause,
    so they are used only when nothing better is there (e.g. the linker's own message).
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    summaries = ("collect2:", "clang: error: linker command failed")
    for line in lines:
        if re.search(r"\berror\b:", line, re.IGNORECASE) and not line.startswith(summaries):
            return line
    for line in lines:
        if "undefined reference" in line or "cannot find" in line:
            return line
    return lines[-1] if lines else "(the compiler printed nothing)"


def compiler_command(variable: str = "CC", names: Sequence[str] = ("cc", "gcc", "clang"),
                     language: str = "C") -> list[str] | str:
    """The compiler argv from ``$<variable>`` (split like a shell would, its program resolved)
    or the first of ``names`` on PATH, or the reason there is none."""
    raw = os.environ.get(variable, "").strip()
    if raw:
        try:
            argv = shlex.split(raw)
        except ValueError as exc:
            return f"{variable}={raw!r} cannot be parsed: {exc}"
        resolved = shutil.which(argv[0])
        if resolved is None:
            return f"{variable}={raw!r}: {argv[0]} does not exist or is not executable"
        return [resolved, *argv[1:]]
    for name in names:
        resolved = shutil.which(name)
        if resolved is not None:
            return [resolved]
    return (f"no {language} compiler found: {variable} is unset and none of "
            f"{', '.join(names)} is on PATH")


@functools.cache
def probe_compiler() -> CompilerInfo:
    """Find and test the C compiler, once per process (``probe_compiler.cache_clear()`` re-probes).

    Never raises: every failure becomes ``available=False`` with a reason.
    """
    try:
        return _probe()
    except Exception as exc:  # noqa: BLE001 - the probe's contract is to never raise
        return CompilerInfo(available=False, reason=f"probing the compiler failed: {exc!r}")


def _probe() -> CompilerInfo:
    command = compiler_command()
    if isinstance(command, str):
        return CompilerInfo(available=False, reason=command)
    rc, out, err = run_command([*command, "--version"], PROBE_TIMEOUT_SECONDS)
    if rc != 0:
        return CompilerInfo(available=False, argv=tuple(command), path=command[0],
                            reason=f"{shlex.join(command)} --version failed: "
                                   f"{first_error_line(err)}")
    version = next((line.strip() for line in out.splitlines() if line.strip()), "unknown")
    text = out.lower()
    family = "clang" if "clang" in text else "gcc" if ("gcc" in text or "free software" in text) \
        else "unknown"
    # One compile in the common case: an OpenMP shared object proves the compiler, omp.h and
    # libgomp at once; only if it fails is a plain shared object tried. (This runs once per
    # process, also on a cache hit, since the variants on offer depend on it.)
    with tempfile.TemporaryDirectory(prefix="adamgen-probe-") as scratch:
        attempts: tuple[tuple[bool, str, list[str]], ...] = (
            (True, _PROBE_OPENMP_C, ["-fopenmp"]), (False, _PROBE_C, []))
        for openmp, text, extra in attempts:
            source = Path(scratch, "probe.c")
            source.write_text(text, encoding="utf-8")
            rc, _, err = run_command([*command, *extra, "-fPIC", "-shared", "-o",
                                      str(Path(scratch, "probe.so")), str(source)],
                                     PROBE_TIMEOUT_SECONDS)
            if rc == 0:
                return CompilerInfo(available=True, argv=tuple(command), path=command[0],
                                    version=version, family=family, openmp=openmp)
    return CompilerInfo(available=False, argv=tuple(command), path=command[0], version=version,
                        family=family, reason=f"{command[0]} cannot build a shared object: "
                                              f"{first_error_line(err)}")


def _native_flags_from_compiler(info: CompilerInfo) -> list[str]:
    """What ``-march=native`` expands to, read from the driver's ``-v`` trace of the cc1 call.

    gcc passes ``-march=<cpu> -m<feature> ... --param l1-cache-size=...`` to cc1; clang passes
    ``-target-cpu <cpu> -target-feature +<feature>``. An empty list means "could not tell".
    """
    rc, _, err = run_command([*info.argv, "-march=native", "-E", "-v", "-x", "c",
                              os.devnull, "-o", os.devnull], PROBE_TIMEOUT_SECONDS)
    if rc != 0:
        return []
    for line in err.splitlines():
        if "cc1" not in line:
            continue
        tokens = line.replace('"', " ").split()
        if "-target-cpu" in tokens:  # clang
            found = [f"cpu={tokens[i + 1]}" for i, t in enumerate(tokens[:-1])
                     if t == "-target-cpu"]
            found += sorted(tokens[i + 1] for i, t in enumerate(tokens[:-1])
                            if t == "-target-feature")
            return found
        heads = [t for t in tokens if t.startswith(("-march=", "-mcpu=", "-mtune="))]
        if heads:  # gcc
            features = sorted(t for t in tokens if t.startswith("-m") and t not in heads)
            params = sorted(tokens[i + 1] for i, t in enumerate(tokens[:-1])
                            if t == "--param" and "cache" in tokens[i + 1])
            return heads + features + params
    return []


def _read_cpuinfo() -> str:
    return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")


def _cpuinfo_flags() -> list[str] | None:
    """The ``flags`` (x86) or ``Features`` (arm) line of ``/proc/cpuinfo``; None when there is
    none (not Linux, an emulator, a container hiding it)."""
    try:
        text = _read_cpuinfo()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features") and value.split():
            return sorted(set(value.split()))
    return None


def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags as the kernel reports them (``/proc/cpuinfo``), or None when
    they are unknown: then nobody can tell whether a native binary runs here. Needs no
    compiler, so a generated package can check them on a machine without one."""
    flags = _cpuinfo_flags()
    return None if flags is None else frozenset(flags)


@functools.cache
def cpu_features() -> str:
    """The CPU feature set that ``-march=native`` resolves to here: a stable string for keys.

    Why resolved, not the word "native": a cache shared between machines (NFS home, CI cache)
    would otherwise hand one CPU's binary to another and crash with SIGILL (ccache #824).
    Prefers the compiler's own expansion; falls back to ``/proc/cpuinfo`` flags.
    """
    machine = platform.machine() or "unknown"
    info = probe_compiler()
    if info.available:
        resolved = _native_flags_from_compiler(info)
        if resolved:
            return f"{machine} {info.family}: " + " ".join(resolved)
    flags = _cpuinfo_flags() or [platform.processor() or "unknown"]
    return f"{machine} cpuinfo: " + " ".join(flags)


def extension_suffix() -> str:
    """The file suffix this interpreter loads extension modules from (``EXT_SUFFIX``)."""
    return str(sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def python_abi_tag() -> str:
    """This interpreter's extension ABI (e.g. ``cpython-311-x86_64-linux-gnu``), for keys."""
    soabi = sysconfig.get_config_var("SOABI")
    if soabi:
        return str(soabi)
    return extension_suffix().strip(".").rsplit(".", 1)[0] or sys.implementation.cache_tag


def compile_flags(mode: str, *, openmp: bool, portable: bool) -> list[str]:
    """The full compiler flags for a kernel: mode, CPU target, OpenMP and warnings.

    Args:
        mode: ``"exact"`` (``-ffp-contract=off``, bit-identical to NumPy) or ``"fast"`` (allows
            FMA contraction). Neither uses fast-math: it would break NaN/inf handling.
        openmp: add ``-fopenmp`` (for the threaded variants).
        portable: omit ``-march=native`` so the binary runs on any CPU of the architecture.
    """
    if mode not in _BASE_FLAGS:
        raise ConfigError(f"mode must be one of {tuple(_BASE_FLAGS)}, got {mode!r}")
    flags = list(_BASE_FLAGS[mode])
    if not portable:
        flags.append("-march=native")
    if openmp:
        flags.append("-fopenmp")
    return flags + _WARNING_FLAGS


def _cffi_version() -> str:
    """cffi's version without importing the cffi package (a hit must not need it).

    ``_cffi_backend`` is what every compiled kernel imports when it loads anyway.
    """
    try:
        import _cffi_backend

        return str(_cffi_backend.__version__)
    except ImportError:
        return "missing"


def key_fields(generator_hash: str, flags: Sequence[str],
               variant: Mapping[str, str] | None = None, *,
               extra_link: Sequence[str] = ()) -> dict[str, str]:
    """Everything that changes the compiled binary, as strings ready for ``cache_key``.

    Args:
        generator_hash: hash of adamgen's generation-time files (spec, codegen, templates).
        flags: the full compile flags (as from :func:`compile_flags`).
        variant: the caller's variant configuration (dtype, mode, constants, ...).
        extra_link: link flags passed to :func:`compile_extension`.

    Raises:
        CompileError: there is no usable compiler (nothing can be built, so there is no key).
    """
    info = probe_compiler()
    if not info.available:
        raise CompileError(f"no usable C compiler: {info.reason}")
    native = any(flag.endswith("=native") for flag in flags)
    fields = {
        "adamgen_version": __version__,
        "generator_hash": generator_hash,
        "compiler": shlex.join(info.argv),
        "compiler_version": info.version,
        "flags": shlex.join(flags),
        "link_flags": shlex.join(extra_link),
        "cpu_features": cpu_features() if native else "portable",
        "cffi_version": _cffi_version(),
        "python_abi": python_abi_tag(),
    }
    for name, value in (variant or {}).items():
        if name in fields:
            raise ArgumentValueError(f"variant field {name!r} clashes with a build key field")
        fields[name] = str(value)
    return fields


def extension_module_name(key: str, prefix: str = "_adamgen_") -> str:
    """A module name carrying the key's hash: Python cannot load two extensions under one name."""
    digest = re.sub(r"[^0-9a-zA-Z]", "", key)[:24]
    if not digest:
        raise ArgumentValueError(f"cannot derive a module name from key {key!r}")
    return f"{prefix}{digest}"


def _emit_wrapper(module_name: str, c_source: str, cdef: str, c_path: Path) -> None:
    try:
        import cffi
    except ImportError as exc:
        raise CompileError(f"cffi is not installed, so {module_name} cannot be built: {exc}",
                           c_path=None) from exc
    try:
        ffi = cffi.FFI()
        ffi.cdef(cdef)
        ffi.set_source(module_name, c_source, compiler_verbose=False)
        ffi.emit_c_code(str(c_path))
    except Exception as exc:  # cffi and pycparser raise many types; all mean bad input
        raise CompileError(f"cffi could not generate the wrapper of {module_name}: {exc}",
                           c_path=c_path if c_path.exists() else None) from exc


def compile_extension(module_name: str, c_source: str, cdef: str, out_dir: Path,
                      flags: list[str], *, extra_link: Sequence[str] = ()) -> Path:
    """Build ``out_dir/<module_name><EXT_SUFFIX>`` from C source and its cffi declarations.

    Args:
        module_name: the extension's name; must contain the cache key's hash
            (see :func:`extension_module_name`).
        c_source: the kernel C code (becomes the preamble of cffi's wrapper).
        cdef: the declarations exposed on ``module.lib``.
        out_dir: where the wrapper ``.c`` (kept for debugging) and the ``.so`` are written.
        flags: compiler flags, e.g. from :func:`compile_flags`.
        extra_link: flags appended after the source file (libraries).

    Returns:
        The path of the built shared object.

    Raises:
        CompileError: no compiler, cffi failure or a failed compile, carrying the argv, the
            compiler's stderr and the kept ``.c`` path.
    """
    if not module_name.isidentifier():
        raise ArgumentValueError(f"extension module name {module_name!r} is not an identifier")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompileError(f"cannot create the build directory {out_dir}: {exc}") from exc
    c_path = out_dir / f"{module_name}.c"
    _emit_wrapper(module_name, c_source, cdef, c_path)
    info = probe_compiler()
    if not info.available:
        raise CompileError(f"no usable C compiler: {info.reason}", c_path=c_path)
    paths = sysconfig.get_paths()
    include = paths["include"]
    if not Path(include, "Python.h").is_file():
        raise CompileError(f"Python.h is not in {include}: install Python's development headers",
                           c_path=c_path)
    includes = [f"-I{d}" for d in dict.fromkeys([include, paths.get("platinclude", include)])]
    so_path = out_dir / f"{module_name}{extension_suffix()}"
    argv = [*info.argv, *flags, "-shared", *includes, "-o", str(so_path), str(c_path),
            *extra_link]
    started = time.perf_counter()
    rc, _, stderr = run_command(argv, COMPILE_TIMEOUT_SECONDS)
    if rc != 0:
        raise CompileError(f"compiling {module_name} failed: {first_error_line(stderr)}",
                           argv=argv, stderr=stderr, c_path=c_path)
    if not so_path.is_file():
        raise CompileError(f"the compiler succeeded but wrote no {so_path.name}", argv=argv,
                           stderr=stderr, c_path=c_path)
    logger.debug("compiled %s in %.3f s: %s", module_name, time.perf_counter() - started,
                  shlex.join(argv))
    if stderr.strip():
        logger.debug("compiler output for %s:\n%s", module_name, stderr.rstrip())
    return so_path


def load_extension(so_path: Path, module_name: str) -> ModuleType:
    """Load a built extension by path (never via ``sys.path``) and return it.

    The module has ``.ffi`` and ``.lib``. CPython registers single-phase extension modules in
    ``sys.modules`` under their name, which is why the name must carry the key's hash.

    Raises:
        CacheError: the file cannot be loaded (truncated, wrong ABI, missing symbol); the
            caller invalidates the cache entry and rebuilds once.
    """
    module = load_extension_module(so_path, module_name)
    if not (hasattr(module, "ffi") and hasattr(module, "lib")):
        raise CacheError(f"{so_path} loaded but is not a cffi extension (no ffi/lib)")
    return module


def load_extension_module(so_path: Path, module_name: str) -> ModuleType:
    """Load any extension module by path (never via ``sys.path``).

    Raises:
        CacheError: the file cannot be loaded (truncated, wrong ABI, missing symbol).
    """
    so_path = Path(so_path)
    try:
        spec = importlib.util.spec_from_file_location(module_name, so_path)
        if spec is None or spec.loader is None:
            raise ImportError(f"no loader for {so_path.name} (expected suffix "
                              f"{extension_suffix()})")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        raise CacheError(f"cannot load extension {module_name} from {so_path}: {exc}") from exc
    return module
