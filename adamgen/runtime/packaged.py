"""C kernels shipped inside a generated package: checked before use, all or none.

A generated package may be copied to another machine, and its files may be damaged on the way.
Before the first call this module checks every kernel directory (``c_*``) of the package:

* **fit**: the Python ABI tag, the machine type and, for native builds (``-march=native``), the
  CPU's feature flags (this CPU must have every flag the build CPU had). Where either machine's
  flags are unknown (no ``flags``/``Features`` line in ``/proc/cpuinfo``, not Linux), nothing
  proves the binary runs here, so native kernels are refused; ``--portable`` ones are used;
* **integrity**: the shared object's size and sha256 against the hashes its manifest records.
  A truncated ``.so`` must never reach ``dlopen``: mapping it kills the process with SIGBUS;
* **loading**: every extension is loaded by path. One that will not load (a missing libgomp or
  an older glibc looks exactly like this) is a failure like the others.

Any failure, in any directory: one warning naming it, and the package's NumPy modules serve every
call. Never a partial set of C kernels, never an illegal instruction, never a bare ImportError.
"""

from __future__ import annotations

import hashlib
import json
import platform
import threading
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import cache as artifact_cache
from .._warnings import warn
from ..codegen import artifact, build
from ..config import KernelConfig
from ..interface import SpecRef
from .c_kernels import CKernel
from .source import KernelSource

MANIFEST = "manifest.json"
_UNKNOWN_FLAGS = "no flags or Features line in /proc/cpuinfo, or not Linux"


class UnusableKernels(Exception):
    """Why a package's C kernels cannot serve here (internal: becomes the one warning)."""


def package_source(package: str, directory: Path, spec: SpecRef,
                   modules: Mapping[tuple[str, frozenset, frozenset], ModuleType],
                   constants: Mapping[str, float], mode: str) -> KernelSource:
    """A generated package's kernels as a :class:`KernelSource`: its NumPy modules by
    (dtype, aliases, scalar tensors), its C kernels (:class:`PackagedKernels`), its constants
    and the mode it was generated in."""
    def numpy(config: KernelConfig) -> ModuleType | None:
        return modules.get((config.dtype, config.aliases, config.scalar_tensors))

    return KernelSource(spec, numpy, PackagedKernels(package, directory),
                        tuple(sorted((str(k), float(v)) for k, v in constants.items())), mode)


class PackagedKernels:
    """The C kernels of one generated package, by (dtype, scalar tensors); None where absent."""

    def __init__(self, package: str, directory: Path) -> None:
        self.package = package
        self.directory = Path(directory)
        self._kernels: dict[tuple[str, frozenset[str]], CKernel] | None = None
        self._lock = threading.Lock()
        #: why the C kernels are not used ("" when they are)
        self.reason = ""

    def __call__(self, config: KernelConfig) -> CKernel | None:
        return self.kernel(config.dtype, config.scalar_tensors)

    def kernel(self, dtype: str, scalar_tensors: frozenset[str]) -> CKernel | None:
        """The kernel for ``dtype`` with these scalar tensors (all checked on first use)."""
        kernels = self._kernels if self._kernels is not None else self._load()
        return kernels.get((dtype, scalar_tensors))

    def _load(self) -> dict[tuple[str, frozenset[str]], CKernel]:
        with self._lock:
            if self._kernels is None:
                try:
                    self._kernels = self._load_all()
                except Exception as exc:  # noqa: BLE001 - any failure: NumPy serves every call
                    self.reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
                    self._kernels = {}
                    warn(f"{self.package}: its C kernels cannot be used here ({self.reason}); "
                         "the NumPy kernels serve every call instead", skip=[self.directory])
            return self._kernels

    def _load_all(self) -> dict[tuple[str, frozenset[str]], CKernel]:
        """Every kernel, after every directory passed every check; raises on the first failure."""
        found = []
        for path in sorted(self.directory.glob(f"c_*/{MANIFEST}")):
            manifest = json.loads(path.read_text(encoding="utf-8"))
            problem = self.mismatch(manifest) or self.damage(path.parent, manifest)
            if problem:
                raise UnusableKernels(f"{path.parent.name}: {problem}")
            found.append((path.parent, manifest))
        kernels = {}
        for directory, manifest in found:
            kernel = self._kernel(directory, manifest)
            kernels[(kernel.config.dtype, kernel.config.scalar_tensors)] = kernel
        return kernels

    @staticmethod
    def mismatch(manifest: dict[str, Any]) -> str:
        """Why this package's binary cannot run here, or "" when it can."""
        if manifest["abi"] != build.python_abi_tag():
            return f"built for Python ABI {manifest['abi']}, this is {build.python_abi_tag()}"
        if manifest["machine"] != platform.machine():
            return f"built for {manifest['machine']}, this is {platform.machine()}"
        if manifest["portable"]:
            return ""
        built_for = manifest.get("cpu_flags")
        if not built_for or built_for == ["unknown"]:
            return (f"native kernels, and the build machine's CPU features are unknown "
                    f"({_UNKNOWN_FLAGS}): regenerate with --portable")
        here = build.cpu_flags()
        if here is None:
            return (f"native kernels, and this machine's CPU features are unknown "
                    f"({_UNKNOWN_FLAGS}): regenerate with --portable")
        missing = set(built_for) - here
        if missing:
            return f"this CPU lacks {', '.join(sorted(missing)[:8])}"
        return ""

    @staticmethod
    def damage(directory: Path, manifest: dict[str, Any]) -> str:
        """Why the files of ``directory`` are not the ones the package was built with, or ""."""
        files = manifest.get("files")
        if not isinstance(files, dict) or manifest.get("so_file") not in files:
            return ("its manifest records no hash of its shared object (generated by an older "
                    "adamgen?): regenerate the package")
        for name, expected in files.items():
            try:
                data = (directory / name).read_bytes()
            except OSError as exc:
                return f"cannot read {name}: {exc.strerror or exc}"
            if (len(data) != expected.get("size")
                    or hashlib.sha256(data).hexdigest() != expected.get("sha256")):
                return (f"{name} is not the file the package was built with ({len(data)} bytes,"
                        f" its manifest says {expected.get('size')}; truncated or altered)")
        return ""

    def _kernel(self, directory: Path, manifest: dict[str, Any]) -> CKernel:
        config = artifact.config_from_fields(manifest["config"])
        module = build.load_extension(
            directory / manifest["so_file"],
            f"{self.package}.{directory.name}.{manifest['module']}")
        entry = artifact_cache.Entry(path=directory, manifest=manifest, built=False,
                                     build_seconds=0.0)
        return CKernel(config, module, entry, manifest["module"], 0.0)
