"""C kernels for the runtime: built once through the artifact cache, called with NumPy arrays.

:func:`c_kernel` returns a :class:`CKernel` for a configuration, or ``None`` when C cannot serve
it (then the NumPy backend does). Like :mod:`adamgen.runtime.kernel_store`, a cache hit imports
neither SymPy nor Jinja: the key is computed from the configuration, the generator fingerprint
and :func:`adamgen.codegen.build.key_fields`; the entry points' signatures come from the
cache manifest. Only a miss imports :mod:`adamgen.codegen.driver` to render the C file.

**What the caller guarantees** (the functional API validates before calling): every array
is C-contiguous (``ffi.from_buffer`` refuses anything else, so a non-contiguous input is never
read wrongly; the API passes a contiguous copy instead), has the kernel's dtype and the size of
the first output; in-place forms get arrays that are either the same array or disjoint
(partially overlapping inputs must be copied first); multi-tensor tensors do not overlap one
another. The per-call ``scalars`` are the NumPy module's ``prelude(...)`` result, the single
definition of those values, from the NumPy module of the *same* configuration
(``numpy_kernel(kernel.config)``: in fast mode the scalars differ with ``scalar_tensors``; see
:attr:`CKernel.kernel_scalars`); cffi rounds each Python float once to the element type, exactly
as NumPy rounds a weak Python float. A scalar tensor (``KernelConfig.scalar_tensors``: a Python
float ``lr``, state of shape ``(1,)``) is passed as a Python number.

**No compiler, or a failed build**: one ``RuntimeWarning`` per process carrying the first real
compiler error line, and ``None``; with ``ADAMGEN_STRICT=1``, :class:`CompileError` instead.
"""

from __future__ import annotations

import functools
import keyword
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import cache as artifact_cache
from .._warnings import warn
from ..codegen import artifact, build
from ..config import C_DTYPES, KernelConfig, environment
from ..errors import BackendUnsupportedError, CacheError, CacheMissError, CompileError
from .forksafe import ForkSafeLock
from .kernel_store import load_entry

log = logging.getLogger("adamgen.c_kernels")

KIND = artifact.KIND
#: Elements below which the threaded entry points run serially. Measured at 2 threads (float32,
#: in place): 0.76x at 8e3 elements, 1.22x at 1.6e4, 1.47x at 3.2e4. The loader may tune
#: ``CKernel.threshold`` per machine.
DEFAULT_THRESHOLD = 16_384
_CTYPES = {"float32": "float", "float64": "double"}

_lock = ForkSafeLock()
_kernels: dict[tuple[KernelConfig, bool], CKernel | None] = {}
_warned = False
_forked_child = False
#: What happened to each C kernel this process asked for (built, fetched, failed): for ``info``.
EVENTS: list[dict[str, Any]] = []


def _after_fork_in_child() -> None:
    """libgomp is not fork-safe: a child that starts a parallel region may hang. Stay serial."""
    global _forked_child
    _forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.cache
def default_threads() -> int:
    """``ADAMGEN_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the cores this process may use.

    Memoised: the environment is read once per process (``default_threads.cache_clear()``).
    """
    configured = environment().num_threads
    if configured:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_threads(threads: int | None) -> int:
    """The thread count a call uses: 1 in a forked child, else ``threads`` or the default."""
    if _forked_child:
        return 1
    return default_threads() if threads is None else max(1, int(threads))


class PointerList:
    """Pointers to many arrays, gathered once, for the multi-tensor entry points.

    Gathering pointers costs about 0.1 us per array: an optimizer builds one list per owned
    buffer (parameters, m, v, gradients) once and passes the same lists at every step. The list
    keeps its arrays alive. Made by :meth:`CKernel.pointers`; valid for that kernel only.
    """

    __slots__ = ("arrays", "buffers", "cdata", "count", "signature", "sizes", "sizes_cdata")

    def __init__(self, ffi: Any, ctype: str, arrays: Sequence[Any], writable: bool) -> None:
        self.arrays = tuple(arrays)
        array_type = ffi.typeof(f"{ctype}[]")
        self.buffers = [ffi.from_buffer(array_type, a, writable) for a in self.arrays]
        self.cdata = ffi.new(f"{ctype} *[]", self.buffers)
        self.sizes = tuple(len(b) for b in self.buffers)
        self.sizes_cdata = ffi.new("int64_t[]", self.sizes)
        self.count = len(self.sizes)
        self.signature = hash(self.sizes)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"PointerList({self.count} arrays, {sum(self.sizes)} elements)"


_ARRAY_ROLES = {"in": "", "inout": ", True", "out": ", True"}  # role -> from_buffer's writable
_LIST_ROLES = {"in_list": "False", "inout_list": "True"}
#: the random stream's roles -> which item of the Python argument ``rng`` they take
_RNG_ROLES = {"rng_seed": 0, "rng_step": 1, "rng_key": 2, "rng_key_list": 2}


def element_ctype(ctype: str) -> str:
    """The element type of a C parameter type: ``uint16_t`` for ``const uint16_t *const *``."""
    words = ctype.replace("*", " ").replace("restrict", " ").split()
    return " ".join(word for word in words if word != "const")


def _keys(ffi: Any, value: Any) -> Any:
    """Per-tensor stream keys as a C ``uint32_t`` array (cdata passes through)."""
    if isinstance(value, ffi.CData):
        return value
    return ffi.new("uint32_t[]", [int(key) & 0xFFFFFFFF for key in value])


class KernelFunction:
    """One C entry point, called with NumPy arrays in the order of its C parameters.

    Python arguments: the tensors (arrays; a scalar tensor as a number; for multi-tensor
    entry points, sequences of arrays or :class:`PointerList`), the ``scalars`` tuple, for a
    kernel that rounds stochastically ``rng = (seed, step, key)`` (multi-tensor: one key per
    tensor), then the outputs that overwrite nothing. Each array has its parameter's element
    type (a narrow storage dtype's: ``uint16`` bits for bfloat16). ``n`` (or ``sizes,
    count``) is taken from the first written array; threaded entry points also take
    ``threads`` and ``threshold`` (keywords).

    The call is a small Python function generated from the signature (kept as
    :attr:`python_source`): one ``from_buffer`` per array and the C call, with no per-argument
    dispatch (measured: 0.9 us for four arrays against 1.5 us for a generic loop).
    """

    def __init__(self, ffi: Any, lib: Any, ctype: str, description: dict[str, Any],
                 threshold: int) -> None:
        self.symbol: str = description["symbol"]
        self.form: str = description["form"]
        self.threaded: bool = bool(description["threaded"])
        self.parameters: tuple[tuple[str, str, str], ...] = tuple(
            (str(name), str(ct), str(role)) for name, ct, role in description["parameters"])
        self.threshold = threshold
        self.python_names = tuple(self._python_names())
        namespace: dict[str, Any] = {
            "from_buffer": ffi.from_buffer, "array_type": ffi.typeof(f"{ctype}[]"),
            "keys": functools.partial(_keys, ffi),
            "same_sizes": functools.partial(_same_sizes, self.symbol),
            "c_function": getattr(lib, self.symbol), "resolve_threads": resolve_threads,
            "owner": self}
        #: the cffi function itself, for callers that hold its C arguments already (pointer
        #: tables gathered once): no conversion, no check
        self.c_function: Callable[..., None] = namespace["c_function"]
        for name, ct, role in self.parameters:
            if role in _ARRAY_ROLES:
                namespace[f"array_type_{name}"] = ffi.typeof(f"{element_ctype(ct)}[]")
            elif role in _LIST_ROLES:
                namespace[f"pointers_{name}"] = functools.partial(_pointer_list, ffi,
                                                                  element_ctype(ct))
        self.python_source = self._generate()
        exec(compile(self.python_source, f"<adamgen {self.symbol}>", "exec"),  # noqa: S102
             namespace)
        #: the call itself, without ``__call__``'s extra frame (hot paths bind this)
        self.call: Callable[..., None] = namespace[self.symbol]

    def __call__(self, *args: Any, **options: Any) -> None:
        self.call(*args, **options)

    @property
    def declaration(self) -> str:
        """The C declaration."""
        params = ", ".join(f"{ct}{'' if ct.endswith('*') else ' '}{name}"
                           for name, ct, _ in self.parameters)
        return f"void {self.symbol}({params})"

    def __repr__(self) -> str:
        return f"<KernelFunction {self.declaration}>"

    def _python_names(self) -> list[str]:
        """Tensors, then ``scalars`` (always, even when empty), then the outputs."""
        names: list[str] = []
        for name, _, role in self.parameters:
            if role in ("in", "inout", "value", *_LIST_ROLES):
                names.append(name)
            elif role in _RNG_ROLES:
                if "scalars" not in names:
                    names.append("scalars")
                if "rng" not in names:
                    names.append("rng")
            elif "scalars" not in names:
                names.append("scalars")
            if role == "out":
                names.append(name)
        for name in names:
            if not name.isidentifier() or keyword.iskeyword(name):
                raise ValueError(f"{self.symbol}: parameter {name!r} is not an identifier")
        return names

    def _generate(self) -> str:
        """The source of the specialised call (see the class docstring)."""
        lines, c_args, lists = [], [], []
        for name, _, role in self.parameters:
            if role in _ARRAY_ROLES:
                lines.append(f"    p_{name} = from_buffer(array_type_{name}, a_{name}"
                             f"{_ARRAY_ROLES[role]})")
                c_args.append(f"p_{name}")
            elif role in _LIST_ROLES:
                lines.append(f"    p_{name} = pointers_{name}(a_{name}, {_LIST_ROLES[role]})")
                c_args.append(f"p_{name}.cdata")
                lists.append(f"p_{name}")
            elif role == "rng_key_list":
                lines.append(f"    p_{name} = keys(a_rng[2])")
                c_args.append(f"p_{name}")
            elif role in _RNG_ROLES:
                c_args.append(f"a_rng[{_RNG_ROLES[role]}]")
            elif role == "value":
                c_args.append(f"a_{name}")
            elif role == "scalar" and "*a_scalars" not in c_args:
                c_args.append("*a_scalars")
        if lists:
            lines.append(f"    same_sizes({', '.join(lists)})")
            c_args += [f"{lists[0]}.sizes_cdata", f"{lists[0]}.count"]
        else:
            written = next(n for n, _, role in self.parameters if role in ("inout", "out"))
            c_args.append(f"len(p_{written})")
        if self.threaded:
            c_args += ["resolve_threads(threads)",
                       "owner.threshold if threshold is None else threshold"]
        head = (f"def {self.symbol}({', '.join(f'a_{n}' for n in self.python_names)}, *, "
                "threads=None, threshold=None):")
        return "\n".join([head, *lines, f"    c_function({', '.join(c_args)})", ""])


def _pointer_list(ffi: Any, ctype: str, value: Any, writable: bool) -> PointerList:
    return value if isinstance(value, PointerList) else PointerList(ffi, ctype, value, writable)


def _same_sizes(symbol: str, first: PointerList, *others: PointerList) -> None:
    """The multi-tensor lists must describe the same tensors (cheap: hashes compared)."""
    for other in others:
        if other.signature != first.signature or other.count != first.count:
            raise ValueError(f"{symbol}: the array lists differ in count or sizes "
                             f"({first.count} vs {other.count} arrays)")


class CKernel:
    """The compiled C kernels of one configuration: every form, serial and threaded.

    Call methods take NumPy arrays (see :class:`KernelFunction` for the argument order and the
    module docstring for what the caller guarantees) and pick the threaded entry point when
    OpenMP was available and more than one thread is asked for (``threads=None``: the default
    from :func:`default_threads`). Entry points by C name: :meth:`function`.
    """

    def __init__(self, config: KernelConfig, module: ModuleType,
                 entry: artifact_cache.Entry, key: str, seconds: float) -> None:
        manifest = entry.manifest
        self.config = config
        self.module, self.ffi, self.lib = module, module.ffi, module.lib
        self.cache_key, self.cache_path = key, entry.path
        self.built, self.build_seconds, self.seconds = entry.built, entry.build_seconds, seconds
        self.variant: str = manifest["variant"]
        self.openmp: bool = bool(manifest["openmp"])
        self.flags: tuple[str, ...] = tuple(manifest["flags"])
        self.ctype = _CTYPES[config.dtype]
        self.threshold = DEFAULT_THRESHOLD
        self.functions = {d["symbol"]: KernelFunction(self.ffi, self.lib, self.ctype, d,
                                                      DEFAULT_THRESHOLD)
                          for d in manifest["functions"]}
        self._forms: dict[str, tuple[Callable[..., None], Callable[..., None] | None]] = {}
        for function in self.functions.values():
            serial, threaded = self._forms.get(function.form, (None, None))
            if function.threaded:
                threaded = function.call
            else:
                serial = function.call
            self._forms[function.form] = (serial, threaded)  # type: ignore[assignment]

    # -- introspection -------------------------------------------------------------------------
    @property
    def forms(self) -> tuple[str, ...]:
        """The forms compiled here, e.g. ``functional``, ``inplace_parameter``, ``multi_inplace``."""
        return tuple(self._forms)

    @property
    def kernel_scalars(self) -> tuple[str, ...]:
        """The names of the per-call scalars, in order: ``numpy_kernel(self.config).prelude``
        returns exactly these (the order depends on the whole config, scalar tensors too)."""
        first = next(iter(self.functions.values()))
        return tuple(name for name, _, role in first.parameters if role == "scalar")

    @property
    def source(self) -> str:
        """The generated C file (as rendered; the cffi wrapper around it sits beside it)."""
        return (self.cache_path / "kernel.c").read_text(encoding="utf-8")

    def function(self, symbol: str) -> KernelFunction:
        """One entry point by C name (``adam_inplace_all_omp``...); its ``threshold`` is its own."""
        try:
            return self.functions[symbol]
        except KeyError:
            raise KeyError(f"{symbol!r} is not in this kernel; it has "
                           f"{', '.join(self.functions)}") from None

    def __repr__(self) -> str:
        how = "built" if self.built else "fetched"
        return (f"<CKernel {self.variant} forms={','.join(self.forms)} "
                f"key={self.cache_key[:12]} {how} in {self.seconds:.3f} s at {self.cache_path}>")

    # -- calls ---------------------------------------------------------------------------------
    def call(self, form: str, *args: Any, threads: int | None = None,
             threshold: int | None = None) -> None:
        """Run ``form``: serial for one thread (or without OpenMP), else threaded (which runs
        serially below ``threshold`` elements; default :attr:`threshold`)."""
        serial, threaded = self._forms[form]
        if threaded is None or threads == 1 or _forked_child:
            serial(*args)
        else:
            threaded(*args, threads=threads,
                     threshold=self.threshold if threshold is None else threshold)

    def functional(self, *args: Any, threads: int | None = None,
                   threshold: int | None = None) -> None:
        """``(w, dcdw, lr, mw_tm1, vw_tm1, scalars, w_new, mw, vw)``: fresh, distinct outputs."""
        self.call("functional", *args, threads=threads, threshold=threshold)

    def inplace_parameter(self, *args: Any, threads: int | None = None,
                          threshold: int | None = None) -> None:
        """``(w, dcdw, lr, mw_tm1, vw_tm1, scalars, mw, vw)``: ``w`` is overwritten (``out=w``)."""
        self.call("inplace_parameter", *args, threads=threads, threshold=threshold)

    def inplace_all(self, *args: Any, threads: int | None = None,
                    threshold: int | None = None) -> None:
        """``(w, dcdw, lr, mw_tm1, vw_tm1, scalars)``: w, m and v are overwritten (optimizer)."""
        self.call("inplace_all", *args, threads=threads, threshold=threshold)

    def multi_inplace(self, *args: Any, threads: int | None = None,
                      threshold: int | None = None) -> None:
        """``inplace_all`` over many tensors in one C call: each array argument a sequence of
        arrays or a :class:`PointerList` (cache those), scalar tensors one number for all."""
        self.call("multi_inplace", *args, threads=threads, threshold=threshold)

    def pointers(self, arrays: Sequence[Any], *, writable: bool = False,
                 ctype: str | None = None) -> PointerList:
        """Gather the pointers of ``arrays`` once, for repeated :meth:`multi_inplace` calls
        (``ctype``: their element type, when a tensor is stored narrower than the kernel's)."""
        return PointerList(self.ffi, ctype or self.ctype, arrays, writable)

    def element_ctypes(self, form: str = "multi_inplace") -> dict[str, str]:
        """Each array parameter's element type in ``form`` (``uint16_t`` for bfloat16)."""
        function = next(f for f in self.functions.values() if f.form == form)
        return {name: element_ctype(ct) for name, ct, role in function.parameters
                if role in (*_ARRAY_ROLES, *_LIST_ROLES)}

    @property
    def random(self) -> bool:
        """Whether the kernel rounds stochastically (its calls take ``rng``)."""
        first = next(iter(self.functions.values()))
        return any(role in _RNG_ROLES for _, _, role in first.parameters)


# -- building and loading ------------------------------------------------------------------------
def c_kernel(config: KernelConfig, *, portable: bool = False) -> CKernel | None:
    """The compiled C kernels for ``config`` (its ``aliases`` are ignored: every form is in one
    file), or None when C cannot serve: a dtype without a C form (float16, mixed), no compiler,
    or a failed build (one warning per process; ``ADAMGEN_STRICT=1`` raises instead).

    Memoised per process; :func:`clear_memo` forgets (tests).
    """
    if config.dtype not in C_DTYPES:
        return None
    base = replace(config, aliases=frozenset())
    memo_key = (base, portable)
    if memo_key in _kernels:
        return _kernels[memo_key]
    with _lock:
        if memo_key not in _kernels:
            try:
                _kernels[memo_key] = _load(base, portable)
            except CacheMissError:  # ADAMGEN_REQUIRE_CACHE_HIT: a miss must be seen
                raise
            except BackendUnsupportedError as exc:  # C has no form for it: NumPy serves, quietly
                EVENTS.append({"kernel": f"c {base.describe()}", "built": False,
                               "error": str(exc).splitlines()[0]})
                _kernels[memo_key] = None
            except (CompileError, CacheError, OSError) as exc:
                # a failed build, an artifact that will not load even after one rebuild
                # (a noexec cache mount, a missing libgomp), a full disk: NumPy serves instead
                EVENTS.append({"kernel": f"c {base.describe()}", "built": False,
                               "error": str(exc).splitlines()[0]})
                if environment().strict:
                    raise
                warn_unavailable(exc)
                _kernels[memo_key] = None
    return _kernels[memo_key]


def clear_memo() -> None:
    """Forget loaded kernels, failures, the one-warning flag and the thread default (tests)."""
    global _warned
    with _lock:
        _kernels.clear()
        _warned = False
    default_threads.cache_clear()


def warn_unavailable(exc: Exception) -> None:
    """One warning per process that C is unavailable, whichever kernel found out first; it
    points at the caller's line (the first frame outside adamgen), whatever the entry point."""
    global _warned
    if not _warned:
        _warned = True
        warn(f"adamgen: C kernels are unavailable, the NumPy backend serves instead (set "
             f"ADAMGEN_STRICT=1 to make this an error): {str(exc).splitlines()[0]}")


def _load(config: KernelConfig, portable: bool) -> CKernel:
    start = time.perf_counter()
    key, flags, openmp = artifact.c_key(config, portable)
    module_name = build.extension_module_name(key)
    builder = functools.partial(_build, config, key, flags, openmp, portable)

    def load(entry: artifact_cache.Entry) -> CKernel:
        module = build.load_extension(
            entry.path / f"{module_name}{build.extension_suffix()}", module_name)
        return CKernel(config, module, entry, key, 0.0)

    entry, kernel = load_entry(KIND, key, builder, load,
                               (CacheError, KeyError, TypeError, AttributeError))
    kernel.seconds = seconds = time.perf_counter() - start
    EVENTS.append({"kernel": kernel.variant, "built": entry.built, "seconds": seconds,
                   "build_seconds": entry.build_seconds, "path": str(entry.path)})
    log.debug("c kernel %s %s in %.3f s (%s)", kernel.variant,
              "built" if entry.built else "fetched from cache", seconds, entry.path)
    return kernel


def _build(config: KernelConfig, key: str, flags: list[str], openmp: bool, portable: bool,
           directory: Path) -> dict[str, object]:
    """Build into the cache's private directory (SymPy and Jinja load here, on a miss only)."""
    try:
        return artifact.build_c(config, directory, key, flags, openmp, portable)
    except CompileError as exc:  # the cache deletes ``directory``: keep the sources beside it
        kept = artifact_cache.keep_failed_build(directory)
        c_path = kept / (exc.c_path.name if exc.c_path else "kernel.c")
        raise CompileError(str(exc).splitlines()[0], argv=exc.argv, stderr=exc.stderr,
                           c_path=c_path) from exc
