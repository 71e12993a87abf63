"""The peers adamgen is compared with, each at its best fair setting.

Every peer updates float32 arrays in float32 and float64 arrays in float64 (a float64 scalar
meeting float32 arrays would silently compute in float64: NumPy 2 array scalars, numexpr's
Python floats and numba's float64 arguments all do that, so scalars are cast on purpose).

* ``numpy naive``: Ivy's NumPy backend expression, with its temporaries (allocates 3 new arrays);
  in the in-place sweep the caller rebinds ``w, m, v`` to the results, as Ivy users do.
* ``numpy best``: hand-written NumPy with preallocated buffers and ``out=``; no clamp (a user
  would not write one), scalars folded in Python floats.
* ``numexpr``: three ``evaluate`` calls (one per output), scalars of the array's dtype.
* ``numba``: ``@njit(parallel=True, fastmath=False, error_model='numpy')`` with ``prange``; the
  default error model would keep a divide-by-zero check in the loop and stop it vectorising.
* ``torch fused`` / ``torch foreach``: ``torch.optim.Adam`` on tensors sharing the arrays'
  memory. torch uses the paper's formula (``eps`` added after the bias-corrected sqrt), a
  different rounding but the same traffic: fine for speed.

Optional peers are imported lazily; :func:`available` says which are missing, for the report.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .timing import Contender

LR, BETA1, BETA2, EPSILON = 1e-3, 0.9, 0.999, 1e-7
OPTIONAL = ("numexpr", "numba", "torch", "lion_pytorch", "matplotlib")


@functools.cache
def module(name: str) -> Any | None:
    """The optional module, or None if it is not installed (or fails to import)."""
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken install is as good as a missing one here
        return None


def version(name: str) -> str | None:
    """The optional module's version (its ``__version__``, else its distribution's), or None
    if it is missing."""
    found = module(name)
    if found is None:
        return None
    text = getattr(found, "__version__", None)
    if text is None:
        import importlib.metadata

        try:
            text = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            text = "?"
    return str(text)


def available() -> dict[str, str | None]:
    """Each optional package's version, or None when it is missing."""
    return {name: version(name) for name in OPTIONAL}


def prelude(t: float) -> tuple[float, float, float, float, float]:
    """The per-step scalars in Python floats, as Ivy computes them: c1, c2, alpha, eps, lr."""
    alpha = (1 - BETA2 ** t) ** 0.5 / (1 - BETA1 ** t + EPSILON)
    return 1 - BETA1, 1 - BETA2, alpha, EPSILON, LR


class Counter:
    """A step counter that starts at 1."""

    def __init__(self) -> None:
        self.t = 0

    def next(self) -> float:
        self.t += 1
        return float(self.t)


# -- NumPy ---------------------------------------------------------------------------------------

def ivy_expression(w: np.ndarray, g: np.ndarray, lr: float, m: np.ndarray, v: np.ndarray,
                   t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ivy's NumPy backend, operation by operation (``maximum(v, 0)`` is ``where``)."""
    m = BETA1 * m + (1 - BETA1) * g
    v = BETA2 * v + (1 - BETA2) * g ** 2
    alpha = (1 - BETA2 ** t) ** 0.5 / (1 - BETA1 ** t + EPSILON)
    w_new = w - ((alpha * m) / (np.where(v >= 0, v, 0) ** 0.5 + EPSILON)) * lr
    return w_new, m, v


def numpy_best_into(w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray,
                    w_out: np.ndarray, m_out: np.ndarray, v_out: np.ndarray,
                    scratch: np.ndarray, t: float) -> None:
    """Adam with preallocated buffers and ``out=``: 12 passes, no temporaries."""
    c1, c2, alpha, eps, lr = prelude(t)
    np.multiply(m, BETA1, out=m_out)
    np.multiply(g, c1, out=scratch)
    np.add(m_out, scratch, out=m_out)
    np.multiply(g, g, out=scratch)
    np.multiply(scratch, c2, out=scratch)
    np.multiply(v, BETA2, out=v_out)
    np.add(v_out, scratch, out=v_out)
    np.sqrt(v_out, out=scratch)
    np.add(scratch, eps, out=scratch)
    np.divide(m_out, scratch, out=scratch)
    np.multiply(scratch, alpha * lr, out=scratch)
    np.subtract(w, scratch, out=w_out)


def numpy_contenders(w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *,
                     functional: bool) -> list[Contender]:
    counter_naive, counter_best = Counter(), Counter()
    if functional:
        def naive() -> object:
            return ivy_expression(w, g, LR, m, v, counter_naive.next())

        def best() -> object:
            w_out, m_out, v_out = (np.empty_like(w) for _ in range(3))
            scratch = np.empty_like(w)
            numpy_best_into(w, g, m, v, w_out, m_out, v_out, scratch, counter_best.next())
            return w_out, m_out, v_out
    else:
        state = [w, m, v]

        def naive() -> object:
            state[0], state[1], state[2] = ivy_expression(state[0], g, LR, state[1], state[2],
                                                          counter_naive.next())
            return None

        scratch_buffer = np.empty_like(w)

        def best() -> object:
            numpy_best_into(w, g, m, v, w, m, v, scratch_buffer, counter_best.next())
            return None
    return [Contender("numpy naive", "peer", naive), Contender("numpy best", "peer", best)]


# -- numexpr -------------------------------------------------------------------------------------

def numexpr_contenders(w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *,
                       functional: bool, threads: int) -> list[Contender]:
    ne = module("numexpr")
    if ne is None:
        return []
    ne.set_num_threads(threads)
    cast = w.dtype.type
    counter = Counter()

    def call() -> object:
        c1, c2, alpha, eps, lr = (cast(x) for x in prelude(counter.next()))
        b1, b2 = cast(BETA1), cast(BETA2)
        m_out = None if functional else m
        v_out = None if functional else v
        w_out = None if functional else w
        m_new = ne.evaluate("b1 * m + c1 * g", local_dict={"b1": b1, "m": m, "c1": c1, "g": g},
                            out=m_out)
        v_new = ne.evaluate("b2 * v + c2 * (g * g)",
                            local_dict={"b2": b2, "v": v, "c2": c2, "g": g}, out=v_out)
        w_new = ne.evaluate("w - ((alpha * m) / (sqrt(v) + eps)) * lr",
                            local_dict={"w": w, "alpha": alpha, "m": m_new, "v": v_new,
                                        "eps": eps, "lr": lr}, out=w_out)
        return w_new, m_new, v_new

    return [Contender("numexpr", "peer", call)]


# -- numba ---------------------------------------------------------------------------------------

@functools.cache
def _numba_kernels() -> tuple[Callable[..., None], Callable[..., Any]] | None:
    numba = module("numba")
    if numba is None:
        return None
    njit, prange = numba.njit, numba.prange

    @njit(parallel=True, fastmath=False, error_model="numpy", cache=False)
    def in_place(w, g, m, v, b1, c1, b2, c2, alpha, eps, lr):  # type: ignore[no-untyped-def]
        for i in prange(w.shape[0]):
            mi = b1 * m[i] + c1 * g[i]
            vi = b2 * v[i] + c2 * (g[i] * g[i])
            m[i] = mi
            v[i] = vi
            w[i] = w[i] - ((alpha * mi) / (np.sqrt(vi) + eps)) * lr

    @njit(parallel=True, fastmath=False, error_model="numpy", cache=False)
    def functional(w, g, m, v, b1, c1, b2, c2, alpha, eps, lr):  # type: ignore[no-untyped-def]
        w_new = np.empty_like(w)
        m_new = np.empty_like(m)
        v_new = np.empty_like(v)
        for i in prange(w.shape[0]):
            mi = b1 * m[i] + c1 * g[i]
            vi = b2 * v[i] + c2 * (g[i] * g[i])
            m_new[i] = mi
            v_new[i] = vi
            w_new[i] = w[i] - ((alpha * mi) / (np.sqrt(vi) + eps)) * lr
        return w_new, m_new, v_new

    return in_place, functional


@functools.cache
def numba_serial_kernel() -> Callable[..., None] | None:
    """The in-place loop under plain ``@njit`` (no ``nogil``): it holds the GIL while it runs.

    The control of the GIL case; the parallel kernel is not used there because numba's default
    threading layer does not support launches from two Python threads at once.
    """
    numba = module("numba")
    if numba is None:
        return None

    @numba.njit(fastmath=False, error_model="numpy")
    def in_place(w, g, m, v, b1, c1, b2, c2, alpha, eps, lr):  # type: ignore[no-untyped-def]
        for i in range(w.shape[0]):
            mi = b1 * m[i] + c1 * g[i]
            vi = b2 * v[i] + c2 * (g[i] * g[i])
            m[i] = mi
            v[i] = vi
            w[i] = w[i] - ((alpha * mi) / (np.sqrt(vi) + eps)) * lr

    return in_place


def numba_contenders(w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *,
                     functional: bool, threads: int) -> list[Contender]:
    kernels = _numba_kernels()
    if kernels is None:
        return []
    numba = module("numba")
    assert numba is not None  # _numba_kernels() returned kernels
    numba.set_num_threads(threads)
    kernel = kernels[1] if functional else kernels[0]
    cast = w.dtype.type
    counter = Counter()

    def call() -> object:
        c1, c2, alpha, eps, lr = prelude(counter.next())
        return kernel(w, g, m, v, cast(BETA1), cast(c1), cast(BETA2), cast(c2), cast(alpha),
                      cast(eps), cast(lr))

    return [Contender("numba", "peer", call)]


# -- torch ---------------------------------------------------------------------------------------

def torch_optimizer_contenders(params: Sequence[np.ndarray], grads: Sequence[np.ndarray], *,
                               threads: int) -> list[Contender]:
    """``torch.optim.Adam(fused=True)`` and ``(foreach=True)`` on tensors sharing the arrays."""
    torch = module("torch")
    if torch is None:
        return []
    torch.set_num_threads(threads)
    contenders = []
    for label, option in (("torch fused", "fused"), ("torch foreach", "foreach")):
        tensors = []
        for p, g in zip(params, grads):
            tensor = torch.from_numpy(p)
            tensor.grad = torch.from_numpy(g)
            tensors.append(tensor)
        optimizer = torch.optim.Adam(tensors, lr=LR, betas=(BETA1, BETA2), eps=EPSILON,
                                     **{option: True})
        contenders.append(Contender(label, "peer", optimizer.step))
    return contenders


def single_tensor_peers(w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *,
                        functional: bool, threads: int) -> list[Contender]:
    """Every installed peer for one tensor, in place (sharing ``w, m, v``) or functional."""
    peers = numpy_contenders(w, g, m, v, functional=functional)
    peers += numexpr_contenders(w, g, m, v, functional=functional, threads=threads)
    peers += numba_contenders(w, g, m, v, functional=functional, threads=threads)
    if not functional:  # torch's optimizer has no allocating form
        peers += torch_optimizer_contenders([w], [g], threads=threads)
    return peers
