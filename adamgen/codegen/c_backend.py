"""C renderer: kernel IR -> one C99 file holding every variant, through ``c_kernel.c.j2``.

Templates hold the file's structure; the math is printed by :class:`KernelCPrinter`, a subclass
of SymPy's ``C99CodePrinter``: each IR step becomes an unevaluated SymPy expression over
``Symbol``/``Indexed`` leaves, printed as one ``const`` declaration. Because every step has two
atomic operands, the printed C performs exactly the IR's operations in the IR's order, each
rounded once in the element type (``-ffp-contract=off`` keeps the compiler from fusing them).

One file per (dtype, mode, constants, scalar tensors) holds, for each alias *form* (the
functional form and the in-place forms the caller names), a vectorisable ``static`` chunk
function over ``[begin, end)``, a serial entry point and, with OpenMP, a threaded one; plus a
multi-tensor entry point for the form whose outputs all overwrite their inputs.

Parameter order of every entry point (the runtime relies on it, via :class:`CFunction`): the
tensors in the IR's order (a scalar tensor as a value, an input its output overwrites as one
read-write pointer), the kernel scalars, the random stream's ``adamgen_seed, adamgen_step,
adamgen_key`` (only in a kernel that rounds stochastically; ``adamgen_key`` is one key per
tensor in multi-tensor forms), the outputs that overwrite nothing, then ``n`` (or ``sizes,
count``), then ``nthreads, threshold`` for threaded forms.

**Storage dtypes.** A tensor declared with a narrower ``storage`` than the kernel computes in
(bfloat16 or float16 in a float32 kernel) is passed as ``uint16_t`` bits; the body widens each
element exactly where it reads it (``adamgen_load_<dtype>``), and an output replacing it is
stored with ``adamgen_store_<dtype>``, which is exact because the spec rounded the value to that
dtype last (lowering checks it).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import sympy
from sympy.codegen.ast import Assignment, Declaration, Variable, float32, float64, real, value_const
from sympy.printing.c import C99CodePrinter

from .. import language
from .._version import __version__
from ..config import KernelConfig
from ..errors import BackendUnsupportedError
from ..spec import RESERVED_NAMES
from .c_literals import c_literal
from .ir import KernelIR, Step, rounding, stochastic
from .steps import step_expression
from .templating import render

#: dtype -> (C element type, SymPy type the printer maps ``real`` to)
ELEMENT_TYPES = {"float32": ("float", float32), "float64": ("double", float64)}
#: Roundings a kernel can do, per element dtype (to bfloat16/float16 from float32 compute;
#: to float32 from float64).
ROUNDINGS = {"float32": ("bfloat16", "float16", "float32"), "float64": ("float32", "float64")}
#: Storage dtype -> the C type of its elements (bfloat16 and float16 as their bits).
STORAGE_CTYPES = {"bfloat16": "uint16_t", "float16": "uint16_t", "float32": "float",
                  "float64": "double"}
#: Storage dtypes a kernel can widen from and store to, per compute dtype.
STORAGE = {"float32": ("bfloat16", "float16", "float32"),
           "float64": ("float32", "float64")}
#: Multi-tensor chunks start on multiples of this many elements (whole cache lines).
CHUNK_ALIGN = 64


class WidenStored(sympy.Function):
    """``WidenStored(dtype, element)``: an element stored as ``dtype`` (a Symbol naming it),
    widened exactly to the compute type. Printing only: it never evaluates."""

    nargs = 2

    @classmethod
    def eval(cls, *args: object) -> None:
        return None


class NarrowStored(sympy.Function):
    """``NarrowStored(dtype, value)``: a value already rounded to ``dtype``, as stored bits."""

    nargs = 2

    @classmethod
    def eval(cls, *args: object) -> None:
        return None


class KernelCPrinter(C99CodePrinter):
    """C99 printer for one element dtype: ``sqrtf``/``fmaf`` and ``f``-suffixed literals for
    float32, and the spec language's nodes as exactly their IEEE operation.

    No node is printed through a libm function whose vector form might differ: ``maximum`` is a
    comparison (the vector ``vmaxps`` picks an operand by position when one is NaN), ``sign`` two
    comparisons, ``where`` a conditional expression; ``fma`` is C's ``fma``/``fmaf`` (correctly
    rounded by definition, so every vectorisation of it gives the same bits).
    """

    def __init__(self, dtype: str) -> None:
        super().__init__({"type_aliases": {real: ELEMENT_TYPES[dtype][1]}, "order": "none",
                          "contract": False})
        self.dtype = dtype
        self.suffix = "f" if dtype == "float32" else ""

    def _print_Float(self, expr: sympy.Float) -> str:
        return c_literal(float(expr), self.dtype)

    def _print_Integer(self, expr: sympy.Integer) -> str:
        return c_literal(float(expr), self.dtype)

    def _print_Fma(self, expr: language.Fma) -> str:
        return f"fma{self.suffix}({', '.join(self._print(a) for a in expr.args)})"

    def _print_Sqrt(self, expr: language.Sqrt) -> str:
        return f"sqrt{self.suffix}({self._print(expr.args[0])})"

    def _print_Sign(self, expr: language.Sign) -> str:
        x = self._print(expr.args[0])
        one, zero = c_literal(1.0, self.dtype), c_literal(0.0, self.dtype)
        return f"({x} > 0 ? {one} : ({x} < 0 ? -{one} : {zero}))"

    def _print_Maximum(self, expr: language.Maximum) -> str:
        a, b = (self._print(x) for x in expr.args)
        return f"(({a} >= {b} || {a} != {a}) ? {a} : {b})"

    def _print_Minimum(self, expr: language.Minimum) -> str:
        a, b = (self._print(x) for x in expr.args)
        return f"(({a} <= {b} || {a} != {a}) ? {a} : {b})"

    def _print_RoundToBase(self, expr: language.RoundToBase) -> str:
        x = self._print(expr.args[0])
        if expr.dtype == self.dtype:
            return x
        if expr.dtype == "float32":
            return f"(double)(float)({x})"
        return f"adamgen_round_{expr.dtype}({x})"

    def _print_StochasticRoundBase(self, expr: language.StochasticRoundBase) -> str:
        x, stream = self._print(expr.args[0]), int(expr.args[1])
        return (f"adamgen_round_stochastic_{expr.dtype}({x}, "
                f"adamgen_bits{stream}[i - adamgen_base])")

    def _print_WidenStored(self, expr: WidenStored) -> str:
        return f"adamgen_load_{expr.args[0]}({self._print(expr.args[1])})"

    def _print_NarrowStored(self, expr: NarrowStored) -> str:
        return f"adamgen_store_{expr.args[0]}({self._print(expr.args[1])})"

    def _print_Piecewise(self, expr: sympy.Piecewise) -> str:
        (value, condition), (otherwise, _) = expr.args
        return f"({self._print(condition)} ? {self._print(value)} : {self._print(otherwise)})"


@dataclass(frozen=True)
class CParameter:
    """One C parameter. ``role`` tells the runtime what to pass (see :data:`ROLES`)."""

    name: str
    ctype: str
    role: str

    def declaration(self, *, abi_only: bool = False) -> str:
        """``const float *restrict w``; ``abi_only`` drops ``restrict`` (for cffi's cdef)."""
        ctype = self.ctype.replace("*restrict", "*") if abi_only else self.ctype
        return f"{ctype}{'' if ctype.endswith('*') else ' '}{self.name}"


#: in/inout/out: one array; *_list: an array of pointers (multi-tensor); value: a scalar tensor;
#: scalar: a kernel scalar; rng_seed, rng_step, rng_key (rng_key_list: one per tensor): the
#: random stream of stochastic rounding; n, sizes, count, nthreads, threshold: sizes and
#: threading.
ROLES = ("in", "inout", "out", "in_list", "inout_list", "value", "scalar", "rng_seed",
         "rng_step", "rng_key", "rng_key_list", "n", "sizes", "count", "nthreads", "threshold")
#: The random stream's parameters (see the module docstring), single-tensor and multi-tensor.
RNG_PARAMETERS = (("adamgen_seed", "uint64_t", "rng_seed"), ("adamgen_step", "uint32_t", "rng_step"),
                  ("adamgen_key", "uint32_t", "rng_key"))
RNG_LIST_PARAMETERS = (("adamgen_seed", "uint64_t", "rng_seed"),
                       ("adamgen_step", "uint32_t", "rng_step"),
                       ("adamgen_key", "const uint32_t *", "rng_key_list"))


@dataclass(frozen=True)
class CFunction:
    """One exported entry point: its form, C name, whether it is threaded, its parameters."""

    form: str
    symbol: str
    threaded: bool
    parameters: tuple[CParameter, ...]

    def declaration(self, *, abi_only: bool = False) -> str:
        params = ", ".join(p.declaration(abi_only=abi_only) for p in self.parameters)
        return f"void {self.symbol}({params})"

    def describe(self) -> dict[str, object]:
        """JSON-ready, for the cache manifest: the runtime reads signatures without SymPy."""
        return {"form": self.form, "symbol": self.symbol, "threaded": self.threaded,
                "parameters": [[p.name, p.ctype, p.role] for p in self.parameters]}


@dataclass(frozen=True)
class CKernelSource:
    """A rendered C file, its cffi declarations and the entry points they declare."""

    config: KernelConfig
    source: str
    cdef: str
    functions: tuple[CFunction, ...]
    openmp: bool
    variant: str


def _symbol_map(ir: KernelIR, aliases: Mapping[str, str], scalar_tensors: frozenset[str],
                element_index: sympy.Symbol) -> dict[str, sympy.Basic]:
    """IR name -> SymPy leaf: ``name[i]`` for per-element tensors, ``name`` otherwise."""
    length = sympy.Symbol("n", integer=True)
    leaves: dict[str, sympy.Basic] = {}
    for name in ir.tensors:
        if name in scalar_tensors:
            leaves[name] = sympy.Symbol(name, real=True)
        else:
            leaves[name] = sympy.IndexedBase(name, shape=(length,))[element_index]
            storage = ir.storage(name)
            if storage != ir.config.dtype:
                leaves[name] = WidenStored(sympy.Symbol(storage), leaves[name])
    for name in ir.kernel_scalars:
        leaves[name] = sympy.Symbol(name, real=True)
    for step in ir.body:
        leaves[step.target] = sympy.Symbol(step.target, real=True)
    buffers = ir.buffer_names()
    for output in ir.output_names:
        target = aliases.get(output, buffers[output])
        leaves[f"out:{output}"] = sympy.IndexedBase(target, shape=(length,))[element_index]
    return leaves


@dataclass(frozen=True)
class FormPlan:
    """What the template needs for one form: parameters, and the printed statements."""

    name: str
    summary: str
    chunk: str
    parameters: tuple[CParameter, ...]
    list_parameters: tuple[CParameter, ...]
    uniform_lines: tuple[str, ...]
    body_lines: tuple[str, ...]
    store_lines: tuple[str, ...]
    in_place: bool
    multi: bool
    outputs: tuple[str, ...]
    streamed: str | None  # the functional form's streaming-store wrapper around ``chunk``
    streams: tuple[int, ...] = ()  # the random streams the body draws from

    @property
    def entry(self) -> str:
        """What the entry points call for a range: the streaming wrapper where there is one."""
        return self.streamed or self.chunk


def plan_form(name: str, ir: KernelIR, ctype: str, *, multi: bool = True) -> FormPlan:
    """Print one form's statements and lay out its parameters (see the module docstring);
    ``multi``: this form may carry the multi-tensor entry point (one form per file does)."""
    config = ir.config
    aliases = dict(config.aliases)  # output -> the input it overwrites
    overwritten = set(aliases.values())
    scalar_tensors = frozenset(config.scalar_tensors)
    clash = (set(ir.tensors) | set(ir.kernel_scalars) | set(ir.buffer_names().values())
             | {s.target for s in ir.body}) & RESERVED_NAMES
    if clash:
        raise ValueError(f"IR names {sorted(clash)} clash with names the C template uses")
    for step in ir.body:
        target = rounding(step.op)
        if target is not None and target not in ROUNDINGS[config.dtype]:
            raise BackendUnsupportedError(
                f"{step}: a {config.dtype} C kernel cannot round to {target} "
                f"(it rounds to {', '.join(ROUNDINGS[config.dtype])}); NumPy serves it")
        if stochastic(step.op) is not None and config.dtype != "float32":
            raise ValueError(f"{step}: stochastic rounding to {stochastic(step.op)} needs a "
                             f"float32 kernel, not {config.dtype}")
    for tensor in ir.tensors:
        if ir.storage(tensor) not in STORAGE[config.dtype]:
            raise ValueError(f"tensor {tensor} is stored as {ir.storage(tensor)}; a "
                             f"{config.dtype} kernel reads {', '.join(STORAGE[config.dtype])}")
    for output, source in aliases.items():
        if source in scalar_tensors:
            raise ValueError(f"{output} cannot overwrite {source}: it is a scalar tensor")
    in_place = bool(aliases)
    restrict = "" if in_place else "restrict"
    parameters: list[CParameter] = []
    list_parameters: list[CParameter] = []
    for tensor in ir.tensors:
        stored = STORAGE_CTYPES[ir.storage(tensor)]
        if tensor in scalar_tensors:
            parameters.append(CParameter(tensor, ctype, "value"))
            list_parameters.append(CParameter(tensor, ctype, "value"))
        elif tensor in overwritten:
            parameters.append(CParameter(tensor, f"{stored} *{restrict}", "inout"))
            list_parameters.append(CParameter(tensor, f"{stored} *const *", "inout_list"))
        else:
            parameters.append(CParameter(tensor, f"const {stored} *{restrict}", "in"))
            list_parameters.append(CParameter(tensor, f"const {stored} *const *", "in_list"))
    scalars = [CParameter(s, ctype, "scalar") for s in ir.kernel_scalars]
    parameters += scalars
    list_parameters += scalars
    streams = ir.streams
    if streams:
        parameters += [CParameter(*p) for p in RNG_PARAMETERS]
        list_parameters += [CParameter(*p) for p in RNG_LIST_PARAMETERS]
    buffers = ir.buffer_names()
    for output in ir.output_names:
        if output not in aliases:
            stored = STORAGE_CTYPES[ir.output_storage(output)]
            parameters.append(CParameter(buffers[output], f"{stored} *{restrict}", "out"))
    printer = KernelCPrinter(config.dtype)
    sympy_type = ELEMENT_TYPES[config.dtype][1]
    leaves = _symbol_map(ir, aliases, scalar_tensors, sympy.Symbol("i", integer=True))
    hoisted = set(ir.uniform_steps())

    def declare(step: Step) -> str:
        variable = Variable(sympy.Symbol(step.target, real=True), type=sympy_type,
                            attrs={value_const}, value=step_expression(step, leaves))
        return f"{printer.doprint(Declaration(variable))};  /* {step} */"

    uniform = tuple(declare(s) for s in ir.body if s.target in hoisted)
    body = tuple(declare(s) for s in ir.body if s.target not in hoisted)
    def store(output: str, value: str) -> str:
        storage = ir.output_storage(output)
        stored = leaves[value] if storage == config.dtype else \
            NarrowStored(sympy.Symbol(storage), leaves[value])
        return printer.doprint(Assignment(leaves[f"out:{output}"], stored))

    stores = tuple(store(o, v) for o, v in ir.outputs)
    multi = multi and in_place and set(aliases) == set(ir.output_names)
    overwrites = [(o, aliases[o]) for o in ir.output_names if o in aliases]
    summary = (f"{', '.join(o for o, _ in overwrites)} overwrite{'s' * (len(overwrites) == 1)} "
               f"{', '.join(i for _, i in overwrites)} (may alias)" if in_place
               else "inputs and outputs distinct (restrict)")
    outputs = tuple(p.name for p in parameters if p.role == "out")
    # streaming stores copy blocks of the compute type, and restart the element index at each
    # block: not for narrow outputs or random streams (whose bits follow the element index)
    plain = not streams and all(ir.output_storage(o) == config.dtype for o in ir.output_names)
    streamed = None if in_place or not plain else f"{ir.spec_name}_{name}_streamed"
    return FormPlan(name, summary, f"{ir.spec_name}_{name}_chunk", tuple(parameters),
                    tuple(list_parameters), uniform, body, stores, in_place, multi, outputs,
                    streamed, streams)


def entry_points(spec_name: str, plan: FormPlan, openmp: bool) -> list[CFunction]:
    """The exported functions of one form (serial, threaded, multi-tensor)."""
    n = CParameter("n", "int64_t", "n")
    threading = (CParameter("nthreads", "int", "nthreads"),
                 CParameter("threshold", "int64_t", "threshold"))
    symbol = f"{spec_name}_{plan.name}"
    functions = [CFunction(plan.name, symbol, False, plan.parameters + (n,))]
    if openmp:
        functions.append(CFunction(plan.name, f"{symbol}_omp", True,
                                   plan.parameters + (n,) + threading))
    if plan.multi:
        sizes = (CParameter("sizes", "const int64_t *", "sizes"),
                 CParameter("count", "int64_t", "count"))
        multi = f"{spec_name}_multi_inplace"
        functions.append(CFunction("multi_inplace", multi, False, plan.list_parameters + sizes))
        if openmp:
            functions.append(CFunction("multi_inplace", f"{multi}_omp", True,
                                       plan.list_parameters + sizes + threading))
    return functions


def wrap_signature(symbol: str, parameters: Sequence[CParameter], *, storage: str = "",
                   width: int = 100) -> str:
    """``void symbol(params)`` with the parameters wrapped at ``width`` columns, for readability."""
    head = f"{storage}void {symbol}("
    lines, line = [], head
    declarations = [p.declaration() for p in parameters]
    for index, text in enumerate(declarations):
        text += ")" if index == len(declarations) - 1 else ","
        if line != head and len(line) + 1 + len(text) > width:
            lines.append(line.rstrip())
            line = "    "
        line += ("" if line in (head, "    ") else " ") + text
    lines.append(line)
    return "\n".join(lines)


def wrap_call(symbol: str, parameters: Sequence[CParameter], extra: Sequence[str] = (), *,
              index: str | None = None, block_at: str | None = None, indent: int = 4,
              width: int = 100) -> str:
    """``symbol(args);`` forwarding ``parameters`` (``*_list`` ones as ``name[index]``) and then
    ``extra``, wrapped at ``width`` columns; the first line is not indented (the template is).

    ``block_at``: a block of the range starting there, written to the local ``<output>_block``
    arrays (inputs advance by ``block_at``, outputs go to the blocks).
    """
    def word(p: CParameter) -> str:
        if index and p.role.endswith("_list"):
            return f"{p.name}[{index}]"
        if block_at and p.role == "in":
            return f"{p.name} + {block_at}"
        if block_at and p.role == "out":
            return f"{p.name}_block"
        return p.name

    words = [word(p) for p in parameters] + list(extra)
    lines, line = [], f"{symbol}("
    for position, text in enumerate(words):
        text += ");" if position == len(words) - 1 else ","
        if len(line) + 1 + len(text) + indent > width:
            lines.append(line.rstrip())
            line = " " * (indent + 4)
        line += ("" if line.endswith("(") or not line.strip() else " ") + text
    lines.append(line)
    return "\n".join(lines)


def variant_name(config: KernelConfig) -> str:
    """The variant a C file covers (its alias forms are all inside it)."""
    return "c " + config.describe()


def render_c_module(irs: Mapping[str, KernelIR], *, openmp: bool,
                    flags: Sequence[str] = ()) -> CKernelSource:
    """Render one C file with every form in ``irs`` (form name -> IR lowered with its aliases).

    Args:
        irs: the forms, e.g. ``{"functional": ir, "inplace_parameter": ir_p, "inplace_all": ir_all}``;
            all lowered from one spec for one configuration, differing only in ``aliases``.
        openmp: also emit the threaded ``*_omp`` entry points (only where OpenMP builds).
        flags: the compiler flags, named in the header so the file says how it was built.
    """
    first = next(iter(irs.values()))
    base = replace(first.config, aliases=frozenset())
    if base.dtype not in ELEMENT_TYPES:
        raise ValueError(f"the C backend renders {tuple(ELEMENT_TYPES)}, not {base.dtype!r}")
    ctype = ELEMENT_TYPES[base.dtype][0]
    # the multi-tensor entry point goes with the last form that overwrites every input (a rule
    # whose only state is its parameter has two such forms; one entry point of that name)
    everything = [name for name, ir in irs.items()
                  if set(dict(ir.config.aliases)) == set(ir.output_names)]
    plans = [plan_form(name, ir, ctype, multi=bool(everything) and name == everything[-1])
             for name, ir in irs.items()]
    entries = {plan.name: entry_points(first.spec_name, plan, openmp) for plan in plans}
    functions = [f for plan in plans for f in entries[plan.name]]
    variant = variant_name(base)
    roundings = sorted({r for ir in irs.values() for step in ir.body
                        if (r := rounding(step.op)) is not None and r != base.dtype})
    stochastic_roundings = sorted({r for ir in irs.values() for step in ir.body
                                   if (r := stochastic(step.op)) is not None})
    storages = sorted({ir.storage(t) for ir in irs.values() for t in ir.tensors} - {base.dtype})
    context = {
        "version": __version__, "ir": first, "config": base, "variant": variant,
        "ctype": ctype, "openmp": openmp,
        "flag_lines": textwrap.wrap(" ".join(flags) or "(not recorded)", 86,
                                    break_long_words=False, break_on_hyphens=False),
        "plans": plans, "functions": functions, "entries": entries, "align": CHUNK_ALIGN,
        "streaming": any(plan.streamed for plan in plans),
        "vector_suffix": "ps" if ctype == "float" else "pd",  # the intrinsics' element suffix
        "spec": first.spec_name, "signature": wrap_signature, "call": wrap_call,
        "range": (CParameter("begin", "int64_t", "n"), CParameter("end", "int64_t", "n")),
        "roundings": roundings, "stochastic_roundings": stochastic_roundings,
        "storages": storages, "random": any(plan.streams for plan in plans),
    }
    source = render("c_kernel.c.j2", **context)
    cdef = render("cffi_cdef.h.j2", **context)
    return CKernelSource(base, source, cdef, tuple(functions), openmp, variant)
