"""``adamgen generate``: write an importable package of ahead-of-time kernels, for any rule.

The package holds the rule's NumPy modules (the mixed-dtype form; per requested dtype the
functional form, the in-place form ``out=`` uses, and the optimizer's all-in-place form), its
compiled C kernels (per dtype, with and without its scalar tensors as values) and an
``__init__.py`` binding adamgen's generic runtime to them: ``update`` (the functional form),
``optimizer`` (the in-place multi-tensor optimizer), ``INTERFACE``, and the rule's own bindings
(Ivy's ``adam_update``). It is written into a private temporary directory beside the target and
moved into place with one rename, so a failure leaves nothing half-written.

Constants given with ``--const`` are baked in by the lowering's constant folding (IEEE double,
the spec's order); before writing, :func:`check_specialisation` runs each specialised prelude
against the general one, so a folding bug cannot ship.
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..config import C_DTYPES, DTYPES, MODES, KernelConfig
from ..errors import ArgumentValueError
from ..interface import SpecRef
from ..spec import UpdateSpec
from . import artifact
from .driver import kernel_ir
from .numpy_backend import render_numpy_module
from .templating import render

MARKER = ".adamgen-package"


@dataclass(frozen=True)
class GeneratedModule:
    """One NumPy module of the package: its file name and the configuration it renders."""

    name: str
    config: KernelConfig

    @property
    def key(self) -> str:
        """``(dtype, aliases, scalar tensors)`` as Python source, for the package's table."""
        config = self.config
        return (f"({config.dtype!r}, frozenset({sorted(config.aliases)!r}), "
                f"frozenset({sorted(config.scalar_tensors)!r}))")


def parse_constants(text: str | Mapping[str, float] | None,
                    spec: UpdateSpec) -> dict[str, float]:
    """``"beta1=0.9,epsilon=1e-7"`` (or a dict) -> floats checked against the rule's ranges;
    never ``eval``. Only hyperparameters can be baked in (not the step counter)."""
    if not text:
        return {}
    pairs = text.items() if isinstance(text, Mapping) else (
        item.split("=", 1) if "=" in item else (item, "")
        for item in text.split(",") if item.strip())
    bakeable = {h.name: h for h in spec.interface.hyperparameters if h.kind != "step"}
    constants: dict[str, float] = {}
    for name, raw in pairs:
        name = str(name).strip()
        if name not in bakeable:
            raise ArgumentValueError(f"--const {name}: {spec.name} can bake in only "
                                     f"{', '.join(bakeable) or 'nothing'}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ArgumentValueError(f"--const {name}={raw!r} is not a number") from None
        constants[name] = bakeable[name].check(value)
    return constants


def parse_dtypes(text: str | Iterable[str]) -> tuple[str, ...]:
    names = [d.strip() for d in (text.split(",") if isinstance(text, str) else text) if d.strip()]
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise ArgumentValueError(f"--dtype {','.join(bad) or '(empty)'}: choose from "
                                 f"{', '.join(DTYPES)}")
    return tuple(dict.fromkeys(names))


def _sample_values(spec: UpdateSpec) -> list[dict[str, float]]:
    """Hyperparameter values to compare preludes at: defaults, and several steps (1270 is where
    ``pow`` and ``sqrt`` first differ for beta2 = 0.999; 2**24 + 1 is float32's first gap)."""
    base = {}
    for h in spec.interface.hyperparameters:
        if h.default is not None:
            base[h.name] = float(h.default)
        else:
            low = h.range.low if h.range.low is not None else 0.0
            base[h.name] = low + (0.5 if h.range.high is None else (h.range.high - low) / 2)
    steps = [h.name for h in spec.interface.hyperparameters if h.kind == "step"]
    return [{**base, **{s: value for s in steps}}
            for value in (1.0, 2.0, 3.4, 1270.0, 10.0**4, 2.0**24 + 1)] if steps else [base]


def check_specialisation(spec: UpdateSpec, ref: SpecRef, constants: dict[str, float],
                         mode: str, dtypes: tuple[str, ...]) -> None:
    """The folded prelude must give the general prelude's floats, bit for bit, in each dtype
    (a rule that rounds a scalar to the arrays' dtype folds differently per dtype)."""
    if not constants:
        return
    for dtype in dtypes:
        _check_folding(spec, ref, constants, mode, dtype)


def _check_folding(spec: UpdateSpec, ref: SpecRef, constants: dict[str, float], mode: str,
                   dtype: str) -> None:
    general = _load_source(render_numpy_module(kernel_ir(
        KernelConfig(spec=ref, dtype=dtype, mode=mode), spec)))
    special = _load_source(render_numpy_module(kernel_ir(
        KernelConfig(spec=ref, dtype=dtype, mode=mode, constants=tuple(constants.items())),
        spec)))
    for values in _sample_values(spec):
        values = {**values, **constants}
        full = general["prelude"](*(values[h] for h in general["HYPERPARAMETERS"]))
        folded = dict(zip(special["KERNEL_SCALARS"],
                          special["prelude"](*(values[h] for h in special["HYPERPARAMETERS"]))))
        for name, value in zip(general["KERNEL_SCALARS"], full):
            if name in folded and folded[name] != value and not math.isnan(value):
                raise AssertionError(f"constant folding changed {name} at {values}: "
                                     f"{folded[name]!r} != {value!r}")


def _load_source(source: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(source, "<generated>", "exec"), namespace)  # noqa: S102 (our own output)
    return namespace


def numpy_modules(spec: UpdateSpec, ref: SpecRef, dtypes: tuple[str, ...], mode: str,
                  baked: tuple[tuple[str, float], ...]) -> list[GeneratedModule]:
    """The NumPy modules a package holds (the module docstring lists them)."""
    interface = spec.interface

    def config(dtype: str, aliases: frozenset = frozenset(),
               scalars: frozenset = frozenset()) -> KernelConfig:
        return KernelConfig(spec=ref, dtype=dtype, mode=mode, constants=baked, aliases=aliases,
                            scalar_tensors=scalars)

    modules = [GeneratedModule("numpy_mixed", config("mixed"))]
    first = interface.outputs[0]
    replaced = next((p.input for p in interface.state if p.output == first), None)
    scalars = frozenset(t.name for t in interface.tensors if t.scalar)
    for dtype in dtypes:
        modules.append(GeneratedModule(f"numpy_{dtype}", config(dtype)))
        if replaced is not None:
            modules.append(GeneratedModule(f"numpy_{dtype}_inplace",
                                           config(dtype, frozenset({(first, replaced)}))))
        if interface.parameter is not None and interface.gradient is not None:
            modules.append(GeneratedModule(f"numpy_{dtype}_optimizer",
                                           config(dtype, interface.in_place, scalars)))
    return modules


def build_c_kernels(staging: Path, spec: UpdateSpec, ref: SpecRef, dtypes: tuple[str, ...],
                    mode: str, baked: tuple[tuple[str, float], ...], portable: bool,
                    say: Callable[[str], None]) -> list[KernelConfig]:
    """Compile the C kernels into ``staging/c_*``; returns their configurations. Without a
    compiler the package is NumPy-only (an error when strict)."""
    from ..config import environment
    from ..errors import CompileError
    from . import build

    compiler = build.probe_compiler()
    if not compiler.available:
        if environment().strict:
            raise CompileError(f"no usable C compiler: {compiler.reason}", argv=compiler.argv)
        say(f"no C compiler ({compiler.reason}): the package is NumPy-only")
        return []
    cpu_flags = build.cpu_flags()
    if cpu_flags is None and not portable:
        say("this CPU's feature flags are unknown (no flags or Features line in /proc/cpuinfo): "
            "the native kernels will be refused wherever the package runs; use --portable")
    scalar_sets: list[frozenset[str]] = [frozenset()]
    scalars = frozenset(t.name for t in spec.interface.tensors if t.scalar)
    if scalars:
        scalar_sets.append(scalars)
    built = []
    for dtype in (d for d in dtypes if d in C_DTYPES):
        for scalar_tensors in scalar_sets:
            start = time.perf_counter()
            config = KernelConfig(spec=ref, dtype=dtype, mode=mode, constants=baked,
                                  scalar_tensors=scalar_tensors)
            directory = staging / (f"c_{dtype}" + ("_scalars" if scalar_tensors else ""))
            directory.mkdir()
            (directory / "__init__.py").write_text("")
            key, flags, openmp = artifact.c_key(config, portable)
            manifest = artifact.build_c(config, directory, key, flags, openmp, portable)
            so_bytes = (directory / manifest["so_file"]).read_bytes()
            manifest.update({
                "abi": build.python_abi_tag(), "machine": platform.machine(),
                "portable": portable, "compiler": compiler.version,
                "cpu_flags": None if cpu_flags is None else sorted(cpu_flags),
                # checked before loading: a truncated .so would SIGBUS, not fail to load
                "files": {manifest["so_file"]: {"sha256": hashlib.sha256(so_bytes).hexdigest(),
                                                "size": len(so_bytes)}},
            })
            (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
            built.append(config)
            say(f"compiled {directory.name} ({time.perf_counter() - start:.2f} s)")
    return built


def generate(out: str | Path, name: str, spec: UpdateSpec, ref: SpecRef, *,
             dtypes: str | Iterable[str] = ("float32", "float64"),
             constants: str | Mapping[str, float] | None = None, mode: str = "exact",
             portable: bool = False, with_c: bool = True,
             progress: Callable[[str], None] | None = None) -> Path:
    """Write the package ``out/name`` for ``spec`` (kernels keyed by ``ref``) and return its path.

    With ``with_c`` (the default) the C kernels are compiled beside the NumPy modules
    (``-march=native`` unless ``portable``); the package checks on first use that they fit the
    machine it runs on, and falls back to NumPy with one warning when they do not.
    """
    from ..runtime.bindings import binding_names

    if not name.isidentifier():
        raise ArgumentValueError(f"--name {name!r} is not a valid Python package name")
    if mode not in MODES:
        raise ArgumentValueError(f"--mode {mode!r}: choose from {', '.join(MODES)}")
    dtypes = parse_dtypes(dtypes)
    constants = parse_constants(constants, spec)
    say = progress or (lambda message: None)
    target = Path(out) / name
    if target.exists() and not (target / MARKER).exists():
        raise ArgumentValueError(f"{target} exists and was not generated by adamgen; refusing "
                                 "to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    baked = tuple(sorted(constants.items()))
    modules = numpy_modules(spec, ref, dtypes, mode, baked)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        say(f"checking constant folding against the general prelude ({len(constants)} baked)")
        check_specialisation(spec, ref, constants, mode, dtypes)
        c_configs = (build_c_kernels(staging, spec, ref, dtypes, mode, baked, portable, say)
                     if with_c else [])
        if mode != "exact":  # fast mode: the C kernels' scalars come from their own prelude
            modules += [GeneratedModule(f"numpy_{c.dtype}_c{'_scalars' * bool(c.scalar_tensors)}",
                                        c) for c in c_configs]
        for module in modules:
            start = time.perf_counter()
            (staging / f"{module.name}.py").write_text(
                render_numpy_module(kernel_ir(module.config, spec)))
            say(f"rendered {module.name}.py ({time.perf_counter() - start:.2f} s)")
        (staging / "__init__.py").write_text(render(
            "package_init.py.j2", version=__version__, spec=spec, ref=ref, dtypes=dtypes,
            mode=mode, constants=constants,
            constants_text=", ".join(f"{k}={v!r}" for k, v in constants.items()) or "none",
            command=" ".join(["adamgen", "generate"] + sys.argv[2:]) if sys.argv else "",
            modules=modules, c_directories=sorted(p.name for p in staging.glob("c_*")),
            portable=portable, bindings=binding_names(spec.name),
            ref_source=repr(ref.key())))
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
