"""A compiled C kernel as an artifact: its key, its module name, and the one way it is built.

The JIT cache (:mod:`adamgen.runtime.c_kernels`) and generated packages
(:mod:`adamgen.codegen.package`) both hold compiled kernels; both build them here, so a kernel has
one key (everything that changes the binary), one extension-module name (derived from that key:
Python cannot load two different extensions under one name) and one manifest description, wherever
it lives.

Computing a key imports neither SymPy nor Jinja (a cache hit is decided with it); building does,
and only then.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .. import cache as artifact_cache
from .._resources import generator_fingerprint
from ..config import KernelConfig
from ..errors import CompileError
from . import build

#: The cache kind of compiled kernels.
KIND = "c-kernel"


def c_key(config: KernelConfig, portable: bool) -> tuple[str, list[str], bool]:
    """(key, flags, openmp) for ``config``: everything that changes the binary, no SymPy.

    Raises:
        CompileError: there is no usable compiler (nothing can be built, so there is no key).
    """
    info = build.probe_compiler()
    if not info.available:
        raise CompileError(f"no usable C compiler: {info.reason}", argv=info.argv)
    flags = build.compile_flags(config.mode, openmp=info.openmp, portable=portable)
    variant = {"kind": "c", "config": config.key()}  # not repr: hash seed
    key = artifact_cache.cache_key(build.key_fields(generator_fingerprint(), flags, variant))
    return key, flags, info.openmp


def build_c(config: KernelConfig, directory: Path, key: str, flags: list[str], openmp: bool,
            portable: bool) -> dict[str, Any]:
    """Render ``config``'s C file (every alias form), compile it into ``directory`` as the
    module :func:`build.extension_module_name` of ``key``, and describe it for a manifest.

    On a failed compile the sources are kept (the caller decides where: the cache keeps the last
    failed build under its own tmp) and :class:`CompileError` names them.
    """
    from .driver import c_source  # generation time: SymPy and Jinja load here

    module_name = build.extension_module_name(key)
    rendered = c_source(config, openmp=openmp, flags=tuple(flags))
    (directory / "kernel.c").write_text(rendered.source, encoding="utf-8")
    (directory / "kernel_cdef.h").write_text(rendered.cdef, encoding="utf-8")
    so_path = build.compile_extension(module_name, rendered.source, rendered.cdef, directory,
                                      flags)
    return {
        "variant": f"{rendered.variant} [{'portable' if portable else 'native'}"
                   f"{', openmp' if openmp else ''}]",
        "source_sha256": hashlib.sha256(rendered.source.encode()).hexdigest(),
        "functions": [f.describe() for f in rendered.functions],
        "openmp": openmp, "flags": flags, "module": module_name, "so_file": so_path.name,
        "config": config_fields(config),
    }


def config_fields(config: KernelConfig) -> dict[str, Any]:
    """``config`` as JSON-ready fields (a package's loader rebuilds it without the spec)."""
    return {"spec": config.spec.key(), "dtype": config.dtype, "mode": config.mode,
            "constants": [list(c) for c in config.constants],
            "scalar_tensors": sorted(config.scalar_tensors)}


def config_from_fields(fields: dict[str, Any]) -> KernelConfig:
    """The inverse of :func:`config_fields` (the spec as a reference, without its graph)."""
    from ..interface import SpecRef

    return KernelConfig(spec=SpecRef.from_key(fields["spec"]), dtype=fields["dtype"], mode=fields["mode"],
                        constants=tuple((str(n), float(v)) for n, v in fields["constants"]),
                        scalar_tensors=frozenset(fields["scalar_tensors"]))
