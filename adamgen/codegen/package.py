"""``adamgen generate``: write an importable package of ahead-of-time kernels.

The package holds, per requested dtype, the buffered NumPy module and its in-place (``out=w``)
form, plus the mixed-dtype module, and an ``__init__.py`` binding adamgen's runtime
(:class:`adamgen.runtime.api.Updater`) to them. It is written into a private temporary directory
beside the target and moved into place with one rename, so a failure leaves nothing half-written.

Constants given with ``--const`` are baked in by the lowering's constant folding (IEEE double,
the spec's order); before writing, :func:`check_specialisation` runs each specialised prelude
against the general one at several steps, so a folding bug cannot ship.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .._version import __version__
from ..config import DTYPES, MODES, KernelConfig
from ..errors import ArgumentValueError
from .driver import kernel_ir
from .numpy_backend import render_numpy_module
from .templating import render

MARKER = ".adamgen-package"
SPECIALISABLE = {"beta1": (0.0, 1.0), "beta2": (0.0, 1.0), "epsilon": (0.0, math.inf)}
DEFAULTS = {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-07}
IN_PLACE = frozenset({("w_new", "w")})
C_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class GeneratedModule:
    name: str
    dtype: str
    aliases: str  # Python source of the frozenset, for the template
    config: KernelConfig


def parse_constants(text: str | dict[str, float] | None) -> dict[str, float]:
    """``"beta1=0.9,epsilon=1e-7"`` (or a dict) -> validated floats; never ``eval``."""
    if not text:
        return {}
    pairs = text.items() if isinstance(text, dict) else (
        item.split("=", 1) if "=" in item else (item, "")
        for item in text.split(",") if item.strip())
    constants: dict[str, float] = {}
    for name, raw in pairs:
        name = str(name).strip()
        if name not in SPECIALISABLE:
            raise ArgumentValueError(f"--const {name}: only {', '.join(SPECIALISABLE)} can be "
                                     "baked in")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ArgumentValueError(f"--const {name}={raw!r} is not a number") from None
        low, high = SPECIALISABLE[name]
        if not (low <= value < high):
            raise ArgumentValueError(f"--const {name}={value!r} is outside [{low}, {high})")
        constants[name] = value
    return constants


def parse_dtypes(text: str | Iterable[str]) -> tuple[str, ...]:
    names = [d.strip() for d in (text.split(",") if isinstance(text, str) else text) if d.strip()]
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise ArgumentValueError(f"--dtype {','.join(bad) or '(empty)'}: choose from "
                                 f"{', '.join(DTYPES)}")
    return tuple(dict.fromkeys(names))


def check_specialisation(constants: dict[str, float], mode: str) -> None:
    """The folded prelude must give the general prelude's floats, bit for bit."""
    if not constants:
        return
    general = _load_source(render_numpy_module(kernel_ir(KernelConfig(dtype="mixed", mode=mode))))
    special = _load_source(render_numpy_module(kernel_ir(
        KernelConfig(dtype="mixed", mode=mode, constants=tuple(constants.items())))))
    hyper = {**DEFAULTS, **constants}
    for step in (1.0, 2.0, 3.4, 1270.0, 10.0**4, 2.0**24 + 1):
        values = {**hyper, "step": step}
        full = general["prelude"](*(values[h] for h in general["HYPERPARAMETERS"]))
        folded = dict(zip(special["KERNEL_SCALARS"],
                          special["prelude"](*(values[h] for h in special["HYPERPARAMETERS"]))))
        for name, value in zip(general["KERNEL_SCALARS"], full):
            if name in folded and folded[name] != value and not math.isnan(value):
                raise AssertionError(f"constant folding changed {name} at step {step}: "
                                     f"{folded[name]!r} != {value!r}")


def _load_source(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, "<generated>", "exec"), namespace)  # noqa: S102 (our own output)
    return namespace


def build_c_kernels(staging: Path, dtypes: tuple[str, ...], mode: str,
                    baked: tuple[tuple[str, float], ...], portable: bool,
                    say: Callable[[str], None]) -> list[str]:
    """Compile the C kernels into ``staging/c_*``; returns the directories that need a prelude
    module (fast mode). Without a compiler the package is NumPy-only (an error when strict)."""
    from ..config import environment
    from ..errors import CompileError
    from . import build
    from .driver import c_source

    compiler = build.probe_compiler()
    if not compiler.available:
        if environment().strict:
            raise CompileError(f"no usable C compiler: {compiler.reason}", argv=compiler.argv)
        say(f"no C compiler ({compiler.reason}): the package is NumPy-only")
        return []
    flags = build.compile_flags(mode, openmp=compiler.openmp, portable=portable)
    cpu_flags = build.cpu_flags()
    if cpu_flags is None and not portable:
        say("this CPU's feature flags are unknown (no flags or Features line in /proc/cpuinfo): "
            "the native kernels will be refused wherever the package runs; use --portable")
    directories = []
    for dtype in (d for d in dtypes if d in C_DTYPES):
        for scalars in (frozenset(), frozenset({"lr"})):
            start = time.perf_counter()
            config = KernelConfig(dtype=dtype, mode=mode, constants=baked, scalar_tensors=scalars)
            directory = staging / (f"c_{dtype}" + ("_scalar_lr" if scalars else ""))
            directory.mkdir()
            (directory / "__init__.py").write_text("")
            rendered = c_source(config, openmp=compiler.openmp, flags=tuple(flags))
            digest = hashlib.sha256((rendered.source + " ".join(flags)).encode()).hexdigest()
            module_name = build.extension_module_name(digest)
            (directory / "kernel.c").write_text(rendered.source)
            (directory / "kernel_cdef.h").write_text(rendered.cdef)
            so_path = build.compile_extension(module_name, rendered.source, rendered.cdef,
                                              directory, flags)
            so_bytes = so_path.read_bytes()
            manifest = {
                "variant": f"{rendered.variant} [{'portable' if portable else 'native'}"
                           f"{', openmp' if compiler.openmp else ''}]",
                "functions": [f.describe() for f in rendered.functions],
                "openmp": compiler.openmp, "flags": flags, "module": module_name,
                "dtype": dtype, "mode": mode, "constants": [list(c) for c in baked],
                "scalar_tensors": sorted(scalars), "abi": build.python_abi_tag(),
                "machine": platform.machine(), "portable": portable,
                "cpu_flags": None if cpu_flags is None else sorted(cpu_flags),
                "compiler": compiler.version,
                "source_sha256": hashlib.sha256(rendered.source.encode()).hexdigest(),
                # checked before loading: a truncated .so would SIGBUS, not fail to load
                "so_file": so_path.name,
                "files": {so_path.name: {"sha256": hashlib.sha256(so_bytes).hexdigest(),
                                         "size": len(so_bytes)}},
            }
            (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
            directories.append(directory.name)
            say(f"compiled {directory.name} ({time.perf_counter() - start:.2f} s)")
    return directories


def generate(out: str | Path, name: str, *, dtypes: str | Iterable[str] = ("float32", "float64"),
             constants: str | dict[str, float] | None = None, mode: str = "exact",
             portable: bool = False, with_c: bool = True,
             progress: Callable[[str], None] | None = None) -> Path:
    """Write the package ``out/name`` and return its path.

    With ``with_c`` (the default) the C kernels are compiled beside the NumPy modules
    (``-march=native`` unless ``portable``); the package checks on import-time use that they fit
    the machine it runs on, and falls back to NumPy with one warning when they do not.
    """
    if not name.isidentifier():
        raise ArgumentValueError(f"--name {name!r} is not a valid Python package name")
    if mode not in MODES:
        raise ArgumentValueError(f"--mode {mode!r}: choose from {', '.join(MODES)}")
    dtypes = parse_dtypes(dtypes)
    constants = parse_constants(constants)
    say = progress or (lambda message: None)
    target = Path(out) / name
    if target.exists() and not (target / MARKER).exists():
        raise ArgumentValueError(f"{target} exists and was not generated by adamgen; refusing "
                                 "to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    baked = tuple(sorted(constants.items()))
    modules = [GeneratedModule("numpy_mixed", "mixed", "frozenset()",
                               KernelConfig(dtype="mixed", mode=mode, constants=baked))]
    for dtype in dtypes:
        modules.append(GeneratedModule(f"numpy_{dtype}", dtype, "frozenset()",
                                       KernelConfig(dtype=dtype, mode=mode, constants=baked)))
        modules.append(GeneratedModule(
            f"numpy_{dtype}_inplace", dtype, "frozenset({('w_new', 'w')})",
            KernelConfig(dtype=dtype, mode=mode, constants=baked, aliases=IN_PLACE)))
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        say(f"checking constant folding against the general prelude ({len(constants)} baked)")
        check_specialisation(constants, mode)
        spec_hash = ""
        for module in modules:
            start = time.perf_counter()
            ir = kernel_ir(module.config)
            spec_hash = ir.spec_hash
            (staging / f"{module.name}.py").write_text(render_numpy_module(ir))
            say(f"rendered {module.name}.py ({time.perf_counter() - start:.2f} s)")
        c_directories = (build_c_kernels(staging, dtypes, mode, baked, portable, say)
                         if with_c else [])
        preludes = {}
        if mode != "exact":  # fast mode: the C kernels' scalars come from their own prelude
            for directory in c_directories:
                manifest = json.loads((staging / directory / "manifest.json").read_text())
                config = KernelConfig(dtype=manifest["dtype"], mode=mode, constants=baked,
                                      scalar_tensors=frozenset(manifest["scalar_tensors"]))
                (staging / f"numpy_{directory}.py").write_text(
                    render_numpy_module(kernel_ir(config)))
                preludes[directory] = f"numpy_{directory}"
        (staging / "__init__.py").write_text(render(
            "package_init.py.j2", version=__version__, spec_name="adam", spec_hash=spec_hash,
            dtypes=dtypes, mode=mode, constants=constants,
            constants_text=", ".join(f"{k}={v!r}" for k, v in constants.items()) or "none",
            command=" ".join(["adamgen", "generate"] + sys.argv[2:]) if sys.argv else "",
            modules=modules, defaults={k: repr(constants.get(k, v)) for k, v in DEFAULTS.items()},
            c_directories=c_directories, preludes=preludes, portable=portable))
        (staging / MARKER).write_text(f"adamgen {__version__}\n")
        if target.exists():
            old = target.with_name(f".{name}.old.{time.time_ns()}")
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"wrote {target}")
    return target
