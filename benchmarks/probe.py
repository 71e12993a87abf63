"""The bandwidth probe: a plain C loop with the memory traffic of one in-place step, as the roofline.

An in-place step reads some arrays and writes some of them back: Adam reads ``w, g, m, v`` and
writes ``w, m, v`` (4 reads, 3 writes: 28 bytes per float32 element, 56 per float64), Lion reads
``p, g, m`` and writes ``p, m`` (3, 2), AMSGrad keeps one more state array (5, 4). A
:class:`Traffic` names such a pattern, and the probe for it does exactly that traffic with
trivial arithmetic (chosen to keep every value finite and normal, so no denormal slows it down
after many calls), serial and with OpenMP: its throughput is what the memory system gives a
one-pass loop with that traffic here. The written arrays come first and are read too (an
in-place step reads every array it writes); the read-only ones follow.

It is built with adamgen's own build machinery (:mod:`adamgen.codegen.build`) and cached in
adamgen's artifact cache (:class:`adamgen.cache.ArtifactCache`), with the same flags as an exact
kernel (``-O3 -march=native -fno-math-errno``), so the yardstick and adamgen are compiled alike.
Its serial Adam entry point, called with cached pointers, is also the "bare cffi call" of the
per-call overhead table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from adamgen import cache as artifact_cache
from adamgen.codegen import build
from adamgen.errors import CacheError

KIND = "bench-probe"
CTYPES = {"float32": "float", "float64": "double"}


@dataclass(frozen=True, order=True)
class Traffic:
    """One in-place pass's memory traffic: ``reads`` arrays read, the first ``writes`` of them
    written back (``1 <= writes <= reads``)."""

    reads: int
    writes: int

    def __post_init__(self) -> None:
        if not 1 <= self.writes <= self.reads:
            raise ValueError(f"a probe reads at least as many arrays as it writes, and writes "
                             f"at least one: got {self.reads} read, {self.writes} written")

    @property
    def name(self) -> str:
        return f"r{self.reads}w{self.writes}"

    def bytes_per_element(self, dtype: str) -> int:
        """Bytes moved per element: every read and every write, once."""
        return (self.reads + self.writes) * np.dtype(dtype).itemsize

    def describe(self) -> str:
        return f"{self.reads} read, {self.writes} written"


#: Adam's traffic (Ivy's and torch's rules): w, g, m, v read; w, m, v written.
ADAM = Traffic(4, 3)

_SPIN = """
/* A fixed amount of work touching no memory: the CPU-capacity check of benchmarks.load. */
int64_t bench_spin(int64_t n) {
    volatile int64_t x = 0;
    for (int64_t i = 0; i < n; ++i) x += i;
    return x;
}
"""


def _parameters(traffic: Traffic, c: str) -> list[str]:
    written = [f"{c} *restrict out{k}" for k in range(traffic.writes)]
    read = [f"const {c} *restrict in{k}" for k in range(traffic.reads - traffic.writes)]
    return written + read


def _body(traffic: Traffic, c: str) -> str:
    """The loop body: ``x`` is the sum of the read-only arrays (a constant if there are none);
    the first written array moves by a small step against it, the others decay towards it (or
    its square), as a parameter and its moments do."""
    inputs = [f"in{k}[i]" for k in range(traffic.reads - traffic.writes)]
    lines = [f"const {c} x = {' + '.join(inputs) if inputs else f'({c})0.01'};",
             f"out0[i] = out0[i] - ({c})0.001 * x;"]
    for k in range(1, traffic.writes):
        lines.append(f"out{k}[i] = ({c})0.5 * out{k}[i] + {'x * x' if k % 2 == 0 else 'x'};")
    return "\n".join(f"        {line}" for line in lines)


def symbol(traffic: Traffic, dtype: str, *, openmp: bool) -> str:
    """The C name of one entry point."""
    return f"bench_probe_{traffic.name}_{dtype}{'_omp' if openmp else ''}"


def probe_source(openmp: bool, traffics: Iterable[Traffic] = (ADAM,)) -> tuple[str, str]:
    """The probe's C source and cffi declarations: for every traffic and dtype a serial entry
    point and, with OpenMP, a threaded one (``nthreads`` last)."""
    chosen = sorted(set(traffics))
    source = ("/* adamgen benchmark: bandwidth probes ("
              + "; ".join(t.describe() for t in chosen) + "). */\n#include <stdint.h>\n" + _SPIN)
    cdef = "int64_t bench_spin(int64_t n);\n"
    for traffic in chosen:
        for dtype, c in CTYPES.items():
            params = _parameters(traffic, c)
            for threaded in (False, True) if openmp else (False,):
                extra = ", int nthreads" if threaded else ""
                name = symbol(traffic, dtype, openmp=threaded)
                pragma = ("#pragma omp parallel for simd schedule(static) num_threads(nthreads)\n"
                          if threaded else "")
                source += (f"\nvoid {name}({', '.join(params)}, int64_t n{extra}) {{\n{pragma}"
                           f"    for (int64_t i = 0; i < n; ++i) {{\n{_body(traffic, c)}\n    }}\n}}\n")
                declared = ", ".join(p.replace("*restrict ", "*") for p in params)
                cdef += f"void {name}({declared}, int64_t n{extra});\n"
    return source, cdef


@dataclass(frozen=True)
class Probe:
    """The loaded probe extension.

    Attributes:
        module: the cffi extension (``.ffi``, ``.lib``).
        openmp: whether the ``_omp`` entry points exist.
        compiled: True if this run compiled it, False if it came from the cache.
        flags: the compiler flags it was built with.
        traffics: the traffic patterns it has entry points for.
    """

    module: ModuleType
    openmp: bool
    compiled: bool
    flags: tuple[str, ...]
    traffics: tuple[Traffic, ...] = (ADAM,)

    def pointer(self, array: np.ndarray) -> Any:
        c = CTYPES[array.dtype.name]
        return self.module.ffi.cast(f"{c} *", array.ctypes.data)

    def spin(self, iterations: int) -> None:
        """Busy work without the GIL (cffi releases it around every call)."""
        self.module.lib.bench_spin(iterations)

    def bind_traffic(self, written: Sequence[np.ndarray], read: Sequence[np.ndarray], *,
                     threads: int | None) -> Callable[[], None]:
        """A zero-argument call of the probe that reads ``written`` and ``read`` and writes
        ``written`` back (all of one size and dtype), with their pointers cached.

        ``threads=None`` is the serial loop; a number runs the OpenMP loop with that many.
        """
        arrays = [*written, *read]
        n, dtype = arrays[0].size, arrays[0].dtype.name
        if any(a.size != n or a.dtype.name != dtype or not a.flags.c_contiguous
               for a in arrays):
            raise ValueError("the probe's arrays must be C-contiguous, of one size and dtype")
        traffic = Traffic(len(arrays), len(written))
        if traffic not in self.traffics:
            raise ValueError(f"this probe was built for {[t.name for t in self.traffics]}, "
                             f"not {traffic.name}")
        if threads is not None and not self.openmp:
            raise RuntimeError("the probe was built without OpenMP")
        function = getattr(self.module.lib, symbol(traffic, dtype, openmp=threads is not None))
        args = [self.pointer(a) for a in arrays] + [n] + ([] if threads is None else [threads])

        def call(keep: Sequence[np.ndarray] = arrays) -> None:  # the pointers' arrays live on
            function(*args)

        return call

    def bind(self, w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *,
             threads: int | None) -> Callable[[], None]:
        """Adam's traffic on Ivy's four arrays: reads ``w, g, m, v``, writes ``w, m, v``."""
        return self.bind_traffic([w, m, v], [g], threads=threads)


def build_probe(traffics: Iterable[Traffic] = ()) -> Probe:
    """Build (or fetch from adamgen's cache) and load the probe for Adam's traffic and
    ``traffics``.

    Raises:
        adamgen.CompileError: there is no usable C compiler, or the probe does not compile.
    """
    from adamgen.runtime.kernel_store import kernel_cache

    chosen = tuple(sorted({ADAM, *traffics}))
    info = build.probe_compiler()
    source, cdef = probe_source(info.openmp, chosen)
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
            return Probe(module, info.openmp, entry.built, tuple(flags), chosen)
        except (CacheError, KeyError):
            if attempt == 2:
                raise
            cache.invalidate(KIND, key)  # a damaged artifact is a miss: rebuild once
    raise AssertionError("unreachable")
