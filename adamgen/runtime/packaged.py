"""C kernels shipped inside a generated package: checked against this machine before use.

A generated package may be copied to another machine. Its extension was compiled for one CPU
(``-march=native`` unless ``--portable``) and one Python ABI, so before the first call this module
compares what the package recorded with what runs here: the Python ABI tag, the machine type and,
for native builds, the CPU's feature flags (this CPU must have every flag the build CPU had). On
a mismatch it warns once and every call runs on the package's NumPy modules: never an illegal
instruction.
"""

from __future__ import annotations

import importlib
import json
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import cache as artifact_cache
from ..codegen import build
from ..config import KernelConfig
from .c_kernels import CKernel

MANIFEST = "manifest.json"


class PackagedKernels:
    """The C kernels of one generated package, by (dtype, scalar tensors); None where absent."""

    def __init__(self, package: str, directory: Path, preludes: dict[str, ModuleType]) -> None:
        self.package = package
        self.directory = Path(directory)
        self.preludes = preludes
        self._kernels: dict[tuple[str, frozenset[str]], CKernel] | None = None
        self._lock = threading.Lock()
        self.reason = ""

    def __call__(self, dtype: str, scalar_tensors: frozenset[str]) -> CKernel | None:
        kernels = self._kernels if self._kernels is not None else self._load()
        return kernels.get((dtype, scalar_tensors))

    def _load(self) -> dict[tuple[str, frozenset[str]], CKernel]:
        with self._lock:
            if self._kernels is None:
                self._kernels = {}
                manifests = sorted(self.directory.glob(f"c_*/{MANIFEST}"))
                problem = next(filter(None, (self.mismatch(json.loads(path.read_text()))
                                             for path in manifests)), "")
                if problem:
                    self.reason = problem
                    warnings.warn(f"{self.package}: its C kernels do not fit this machine "
                                  f"({problem}); the NumPy kernels serve instead",
                                  RuntimeWarning, stacklevel=4)
                else:
                    for path in manifests:
                        self._add(path.parent, json.loads(path.read_text()))
            return self._kernels

    @staticmethod
    def mismatch(manifest: dict[str, Any]) -> str:
        """Why this package's binary cannot run here, or "" when it can."""
        if manifest["abi"] != build.python_abi_tag():
            return f"built for Python ABI {manifest['abi']}, this is {build.python_abi_tag()}"
        if manifest["machine"] != platform.machine():
            return f"built for {manifest['machine']}, this is {platform.machine()}"
        if not manifest["portable"]:
            missing = set(manifest["cpu_flags"]) - build.cpu_flags()
            if missing:
                return f"this CPU lacks {', '.join(sorted(missing)[:8])}"
        return ""

    def _add(self, directory: Path, manifest: dict[str, Any]) -> None:
        config = KernelConfig(dtype=manifest["dtype"], mode=manifest["mode"],
                              constants=tuple(manifest["constants"]),
                              scalar_tensors=frozenset(manifest["scalar_tensors"]))
        module = importlib.import_module(f"{self.package}.{directory.name}."
                                         f"{manifest['module']}")
        entry = artifact_cache.Entry(path=directory, manifest=manifest, built=False,
                                     build_seconds=0.0)
        kernel = CKernel(config, "adam", module, entry, manifest["module"], 0.0)
        kernel.prelude_module = self.preludes.get(directory.name)
        self._kernels[(config.dtype, config.scalar_tensors)] = kernel  # type: ignore[index]
