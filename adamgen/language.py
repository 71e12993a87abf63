"""The spec language's nodes beyond SymPy's ``+ - * /``: each says exactly how a peer rounds.

Real optimizers round in ways plain arithmetic cannot describe: torch's ``lerp_`` and
``addcmul_`` are one fused multiply-add each, ``torch.sign`` maps NaN to 0, ``torch.maximum``
propagates NaN, mixed precision rounds intermediates to bfloat16. Each such operation is one
SymPy ``Function`` here with an exact IEEE meaning (its docstring), and the code generators print
each as exactly that operation. None of them ever evaluates on its own, so a spec built from
them keeps its structure (and its rounding order) whether or not SymPy's evaluation is on.
Import them from :mod:`adamgen.spec`, the one public place of the spec language (it re-exports
``fma``, ``sqrt``, ``sign``, ``maximum``, ``minimum``, ``where``, ``round_to`` and ``element``).

For proofs, :func:`exact` replaces every node by its value in exact arithmetic (``fma(a, b, c)``
is ``a*b + c``, ``element(x)`` is ``x``); rounding to a named narrower dtype has no
exact-arithmetic value and stays as it is (so does stochastic rounding), so a proof that the kernel
equals the spec treats it as the same uninterpreted function on both sides.

How the two square roots differ: ``sqrt`` here is IEEE's correctly rounded square root, in the
per-call prelude (``math.sqrt``) and on tensors alike. ``x ** Rational(1, 2)`` (what SymPy's own
``sqrt`` builds) keeps Python's and NumPy's meaning of ``x ** 0.5``: C's ``pow`` on a Python
float, the square root on an array. The two differ in the last bit for about one value in a
hundred, and a reference that writes ``** 0.5`` means ``pow``.
"""

from __future__ import annotations

from typing import Any

import sympy
from sympy import Piecewise, S

#: Dtypes a value can be rounded to with :func:`round_to` (narrower than the kernel's compute
#: type, or equal to it, which is then no operation).
ROUNDING_DTYPES = ("bfloat16", "float16", "float32")
#: Dtypes a value can be rounded to stochastically (``round_to(x, dtype, stochastic=True)``).
STOCHASTIC_DTYPES = ("bfloat16", "float16")


class Node(sympy.Function):
    """A node that never evaluates: the spec's structure is its rounding order."""

    @classmethod
    def eval(cls, *args: Any) -> None:
        return None

    def _eval_is_real(self) -> bool | None:
        return all(arg.is_real for arg in self.args) or None


class Fma(Node):
    """``fma(a, b, c)``: ``a*b + c`` rounded once (C's ``fma``/``fmaf``)."""

    nargs = 3

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        a, b, _ = self.args
        return (b, a, S.One)[argindex - 1]


class Sqrt(Node):
    """IEEE's correctly rounded square root (``math.sqrt`` on Python floats; ``sqrtf``/``sqrt``
    in C; ``np.sqrt``). NaN and negative values give NaN."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return S.One / (2 * Sqrt(self.args[0]))


class Sign(Node):
    """``torch.sign``: 1 where ``x > 0``, -1 where ``x < 0``, else 0 (so ``sign(NaN)`` is 0,
    where NumPy's ``np.sign`` gives NaN, and ``sign(-0.0)`` is ``+0.0``)."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return S.Zero


class Maximum(Node):
    """``torch.maximum(a, b)``: NaN if either is NaN, else ``a if a >= b else b`` (of two
    zeros, ``a``: ``maximum(-0.0, 0.0)`` is ``-0.0``, as torch gives)."""

    nargs = 2

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        a, b = self.args
        return Piecewise((S.One, a > b), (S.Zero, True)) if argindex == 1 else \
            Piecewise((S.Zero, a > b), (S.One, True))


class Minimum(Node):
    """``torch.minimum(a, b)``: NaN if either is NaN, else ``a if a <= b else b``."""

    nargs = 2

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        a, b = self.args
        return Piecewise((S.One, a < b), (S.Zero, True)) if argindex == 1 else \
            Piecewise((S.Zero, a < b), (S.One, True))


class RoundToBase(Node):
    """Round to nearest even into a narrower dtype (overflow gives inf, NaN stays NaN); the
    result is held in the kernel's compute type, exactly. Subclassed once per dtype."""

    nargs = 1
    dtype = ""

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        """1: a VJP differentiates the rule in exact arithmetic, where rounding is the
        identity (the straight-through convention); its kernels still round the primal
        values the derivative is evaluated at, as the update does."""
        return S.One


class RoundToBfloat16(RoundToBase):
    """``round_to(x, "bfloat16")``: 8 significand bits, float32's exponent range."""

    dtype = "bfloat16"


class RoundToFloat16(RoundToBase):
    """``round_to(x, "float16")``: IEEE half precision."""

    dtype = "float16"


class RoundToFloat32(RoundToBase):
    """``round_to(x, "float32")``: IEEE single precision (in a float64 kernel)."""

    dtype = "float32"


class RoundToElement(RoundToBase):
    """``element(x)``: a Python-float value rounded once to the kernel's element dtype, after
    which whatever uses it computes in that dtype (on a tensor value: no operation)."""

    dtype = "element"


class StochasticRoundBase(Node):
    """Stochastic rounding into a narrower dtype: ``x`` becomes one of the two values of the
    dtype around it, the one farther away from zero with probability (its distance from the
    one nearer zero) / (their distance), so that the expected result is ``x`` (NaN stays NaN,
    inf stays inf).

    The probability is drawn from 16 random bits of the element's *stream* (the second
    argument, a small integer): a counter-based generator keyed by the call's seed and step,
    the tensor's key and the element's index in its tensor (:func:`adamgen.ieee.stream_bits`
    defines the bits; the kernel's caller supplies seed, step and key), so the bits never
    depend on threads, chunking or which backend computes them. Two roundings with the same
    stream use the same bits. Subclassed once per dtype.
    """

    nargs = 2
    dtype = ""


class StochasticRoundBfloat16(StochasticRoundBase):
    """``round_to(x, "bfloat16", stochastic=True)``: float32 ``x`` rounded to bfloat16, up or
    down with probability proportional to its 16 dropped bits (exactly unbiased)."""

    dtype = "bfloat16"


class StochasticRoundFloat16(StochasticRoundBase):
    """``round_to(x, "float16", stochastic=True)``: float32 ``x`` rounded to float16. Where
    float16 is normal the 13 dropped bits meet 13 random bits (exactly unbiased); below
    ``2**-14`` the dropped part is cut to 16 bits (unbiased to ``2**-16`` of a unit in the last
    place); beyond float16's range the value above its largest is inf."""

    dtype = "float16"


_ROUNDING = {cls.dtype: cls for cls in (RoundToBfloat16, RoundToFloat16, RoundToFloat32)}
_STOCHASTIC = {cls.dtype: cls for cls in (StochasticRoundBfloat16, StochasticRoundFloat16)}


def element(x: Any) -> RoundToElement:
    """``x`` (hyperparameters only) rounded to the tensors' dtype, as a Python float is rounded
    where it meets a tensor; operations on the result are then the tensors' operations.

    Why: torch's ``exp_avg.lerp_(grad, w)`` rounds ``w`` to float32 and computes ``w - 1`` in
    float32 from it; ``element(1 - beta1) - 1`` says exactly that, where ``(1 - beta1) - 1``
    would be computed in Python floats and rounded once.
    """
    return RoundToElement(x)


def fma(a: Any, b: Any, c: Any) -> Fma:
    """``a*b + c`` rounded once."""
    return Fma(a, b, c)


def sqrt(x: Any) -> Sqrt:
    """The correctly rounded square root (see the module docstring for ``x ** 0.5``)."""
    return Sqrt(x)


def sign(x: Any) -> Sign:
    """``torch.sign``'s sign: 0 for 0, -0 and NaN."""
    return Sign(x)


def maximum(a: Any, b: Any) -> Maximum:
    """The larger of ``a`` and ``b``; NaN if either is NaN (``torch.maximum``)."""
    return Maximum(a, b)


def minimum(a: Any, b: Any) -> Minimum:
    """The smaller of ``a`` and ``b``; NaN if either is NaN (``torch.minimum``)."""
    return Minimum(a, b)


def where(condition: Any, a: Any, b: Any) -> Piecewise:
    """``a`` where ``condition`` holds, else ``b``; a comparison with NaN is false, as in IEEE.

    ``condition`` is one comparison (``x > y``, ``x >= y``, ``x < y``, ``x <= y``,
    ``Eq(x, y)``, ``Ne(x, y)``); nest ``where`` for more.
    """
    return Piecewise((a, condition), (b, True), evaluate=False)


def round_to(x: Any, dtype: str, *, stochastic: bool = False,
             stream: int = 0) -> RoundToBase | StochasticRoundBase:
    """``x`` rounded to nearest even into ``dtype`` (one of :data:`ROUNDING_DTYPES`), or with
    ``stochastic`` rounded stochastically (:class:`StochasticRoundBase`; ``dtype`` one of
    :data:`STOCHASTIC_DTYPES`) with the random bits of ``stream`` (0 to 255)."""
    if stochastic:
        if str(dtype) not in _STOCHASTIC:
            raise ValueError(f"round_to(stochastic=True): dtype must be one of "
                             f"{', '.join(STOCHASTIC_DTYPES)}, got {dtype!r}")
        if type(stream) is not int or not 0 <= stream < 256:
            raise ValueError(f"round_to: stream must be an int from 0 to 255, got {stream!r}")
        return _STOCHASTIC[str(dtype)](x, sympy.Integer(stream))
    try:
        return _ROUNDING[str(dtype)](x)
    except KeyError:
        raise ValueError(f"round_to: dtype must be one of {', '.join(ROUNDING_DTYPES)}, "
                         f"got {dtype!r}") from None


def exact(expr: sympy.Basic, *, drop_rounding: bool = False) -> sympy.Basic:
    """``expr`` with every node replaced by its value in exact arithmetic, SymPy's evaluation on.

    Rounding to a named dtype has no exact-arithmetic value: it stays (an uninterpreted function,
    for proofs that a kernel equals its spec), or with ``drop_rounding`` it is removed (for
    theorems about the rule's mathematics, which hold up to rounding).
    """
    memo: dict[sympy.Basic, sympy.Basic] = {}

    def walk(node: sympy.Basic) -> sympy.Basic:
        if node in memo:
            return memo[node]
        if not node.args or isinstance(node, sympy.Symbol):
            result = node
        else:
            args = [walk(a) for a in node.args]
            if isinstance(node, Fma):
                result = args[0] * args[1] + args[2]
            elif isinstance(node, Sqrt):
                result = sympy.sqrt(args[0])
            elif isinstance(node, Sign):
                result = sympy.sign(args[0])
            elif isinstance(node, RoundToElement) or (
                    drop_rounding and isinstance(node, (RoundToBase, StochasticRoundBase))):
                result = args[0]
            elif isinstance(node, Maximum):
                result = sympy.Max(*args)
            elif isinstance(node, Minimum):
                result = sympy.Min(*args)
            else:
                result = node.func(*args)
        memo[node] = result
        return result

    return walk(expr)


#: Every node of the language.
NODES: tuple[type[sympy.Function], ...] = (Fma, Sqrt, Sign, Maximum, Minimum, RoundToBfloat16,
                                           RoundToFloat16, RoundToFloat32, RoundToElement,
                                           StochasticRoundBfloat16, StochasticRoundFloat16)
