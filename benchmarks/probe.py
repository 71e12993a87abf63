"""The bandwidth probe: a plain C loop with the memory traffic of one Adam step, as the roofline.

One in-place Adam step reads ``w, g, m, v`` and writes ``w, m, v``: 7 array passes, 28 bytes per
float32 element (56 for float64). The probe does exactly that traffic with trivial arithmetic
(chosen to keep every value finite and normal, so no denormal slows it down after many calls),
serial and with OpenMP, so its throughput is what the memory system gives a one-pass loop here.

It is built with adamgen's own build machinery (:mod:`adamgen.codegen.build`) and cached in
adamgen's artifact cache (:class:`adamgen.cache.ArtifactCache`), with the same flags as an exact
kernel (``-O3 -march=native -fno-math-errno``), so the yardstick and adamgen are compiled alike.
Its serial entry point, called with cached pointers, is also the "bare cffi call" of the
per-call overhead table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from adamgen import cache as artifact_cache
from adamgen.codegen import build
from adamgen.errors import CacheError

KIND = "bench-probe"
CTYPES = {"float32": "float", "float64": "double"}

_CHUNK = """
void bench_probe_{dtype}({c} *restrict w, const {c} *restrict g, {c} *restrict m,
                         {c} *restrict v, int64_t n) {{
    for (int64_t i = 0; i < n; ++i) {{
        const {c} gi = g[i];
        m[i] = ({c})0.5 * m[i] + gi;
        v[i] = ({c})0.5 * v[i] + gi * gi;
        w[i] = w[i] - ({c})0.001 * gi;
    }}
}}
"""
_OMP = """
void bench_probe_{dtype}_omp({c} *restrict w, const {c} *restrict g, {c} *restrict m,
                             {c} *restrict v, int64_t n, int nthreads) {{
#pragma omp parallel for simd schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; ++i) {{
        const {c} gi = g[i];
        m[i] = ({c})0.5 * m[i] + gi;
        v[i] = ({c})0.5 * v[i] + gi * gi;
        w[i] = w[i] - ({c})0.001 * gi;
    }}
}}
"""
_SPIN = """
/* A fixed amount of work touching no memory: the CPU-capacity check of benchmarks.load. */
int64_t bench_spin(int64_t n) {
    volatile int64_t x = 0;
    for (int64_t i = 0; i < n; ++i) x += i;
    return x;
}
"""
_DECL = "void bench_probe_{dtype}({c} *w, const {c} *g, {c} *m, {c} *v, int64_t n);\n"
_DECL_OMP = ("void bench_probe_{dtype}_omp({c} *w, const {c} *g, {c} *m, {c} *v, int64_t n, "
             "int nthreads);\n")


def probe_source(openmp: bool) -> tuple[str, str]:
    """The probe's C source and cffi declarations (the OpenMP entry points only with OpenMP)."""
    source = "/* adamgen benchmark: bandwidth probe (4 arrays read, 3 written). */\n"
    source += "#include <stdint.h>\n" + _SPIN
    cdef = "int64_t bench_spin(int64_t n);\n"
    for dtype, c in CTYPES.items():
        source += _CHUNK.format(dtype=dtype, c=c)
        cdef += _DECL.format(dtype=dtype, c=c)
        if openmp:
            source += _OMP.format(dtype=dtype, c=c)
            cdef += _DECL_OMP.format(dtype=dtype, c=c)
    return source, cdef


@dataclass(frozen=True)
class Probe:
    """The loaded probe extension.

    Attributes:
        module: the cffi extension (``.ffi``, ``.lib``).
        openmp: whether the ``_omp`` entry points exist.
        compiled: True if this run compiled it, False if it came from the cache.
        flags: the compiler flags it was built with.
    """

    module: ModuleType
    openmp: bool
    compiled: bool
    flags: tuple[str, ...]

    def pointer(self, array: np.ndarray) -> Any:
        c = CTYPES[array.dtype.name]
        return self.module.ffi.cast(f"{c} *", array.ctypes.data)

    def spin(self, iterations: int) -> None:
        """Busy work without the GIL (cffi releases it around every call)."""
        self.module.lib.bench_spin(iterations)

    def bind(self, w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *,
             threads: int | None) -> Callable[[], None]:
        """A zero-argument call of the probe on these arrays, with their pointers cached.

        ``threads=None`` is the serial loop; a number runs the OpenMP loop with that many.
        """
        n = w.size
        args = [self.pointer(a) for a in (w, g, m, v)]
        dtype = w.dtype.name
        if threads is None:
            function = getattr(self.module.lib, f"bench_probe_{dtype}")
            return lambda: function(*args, n)
        if not self.openmp:
            raise RuntimeError("the probe was built without OpenMP")
        function = getattr(self.module.lib, f"bench_probe_{dtype}_omp")
        return lambda: function(*args, n, threads)


def build_probe() -> Probe:
    """Build (or fetch from adamgen's cache) and load the probe.

    Raises:
        adamgen.CompileError: there is no usable C compiler, or the probe does not compile.
    """
    from adamgen.runtime.kernel_store import kernel_cache

    info = build.probe_compiler()
    source, cdef = probe_source(info.openmp)
    flags = build.compile_flags("exact", openmp=info.openmp, portable=False)
    digest = hashlib.sha256((source + "\0" + cdef).encode()).hexdigest()
    fields = build.key_fields(digest, flags, {"artifact": KIND})
    key = artifact_cache.cache_key(fields)
    name = build.extension_module_name(key, prefix="_adamgen_bench_probe_")
    cache = kernel_cache()

    def compile_into(directory: Any) -> dict[str, str]:
        so_path = build.compile_extension(name, source, cdef, directory, flags)
        return {"module": name, "so_file": so_path.name}

    for attempt in (1, 2):
        entry = cache.get_or_build(KIND, key, compile_into)
        try:
            module = build.load_extension(entry.path / entry.manifest["so_file"], name)
            return Probe(module, info.openmp, entry.built, tuple(flags))
        except (CacheError, KeyError):
            if attempt == 2:
                raise
            cache.invalidate(KIND, key)  # a damaged artifact is a miss: rebuild once
    raise AssertionError("unreachable")
