"""The Ivy rule's public bindings: Ivy's signatures over the generic runtime.

``adamgen.adam_update``, ``adamgen.adam_update_vjp`` and ``adamgen.Adam`` are the generic
functional update, VJP and in-place optimizer bound to the built-in ``ivy_adam`` rule, with
Ivy's signatures: positional-only tensors, keyword-only hyperparameters with Ivy's defaults,
``stop_gradients`` and ``out``. Two conversions are Ivy's own and live here: a list ``lr`` takes
the dtype of the effective gradient it multiplies (Ivy's ``promote_types_of_inputs``), and
``stop_gradients`` must be a bool (NumPy has no autograd, so it changes nothing). Nothing here
computes: the rule's spec says what the kernels do, the generic runtime runs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, overload

import numpy as np

from ..interface import SpecRef
from . import validate
from .functional import Updater, jit_updater
from .optimizer import Optimizer
from .source import KernelSource, cached_jit_source
from .tree import Tree
from .vjp import VJP

#: The Ivy rule (a built-in: its kernels are keyed by name).
IVY_ADAM = SpecRef("ivy_adam")

#: Ivy's signature defaults. A Python signature needs them at import time, before any kernel
#: (and so the spec's interface) is loaded; ``tests/test_rule.py`` checks they are the spec's.
BETA1, BETA2, EPSILON = 0.9, 0.999, 1e-07


def ivy_source() -> KernelSource:
    return cached_jit_source(IVY_ADAM)


class IvyUpdater(Updater):
    """The generic functional update with Ivy's conversion of a list ``lr``."""

    def tensor(self, name: str, value: Any, tensors: Mapping[str, Any]) -> Any:
        """``lr`` as the reference's ``effective_grad * lr`` sees it: something without a dtype
        of its own (a list, a tuple, an ``__array__`` object without ``dtype``) takes the
        effective gradient's dtype, as Ivy's ``promote_types_of_inputs`` converts it; the
        values as given must be finite and ``>= 0`` (adamgen's rule, not Ivy's)."""
        if name == "lr" and (isinstance(value, (list, tuple)) or (
                hasattr(value, "__array__") and not hasattr(value, "dtype"))):
            gradient_dtype = np.result_type(tensors["dcdw"], tensors["mw_tm1"],
                                            tensors["vw_tm1"], 1.0)
            validate.check_lr(validate.as_tensor("lr", value))
            return np.asarray(value, dtype=gradient_dtype)
        return super().tensor(name, value, tensors)


_JIT = jit_updater(ivy_source(), IvyUpdater)


def check_stop_gradients(value: Any) -> None:
    """Ivy's flag: a bool (or a Container of bools); NumPy has no autograd to stop."""
    if isinstance(value, Tree):
        for _, leaf in value.leaves():
            validate.as_flag("stop_gradients", leaf)
    else:
        validate.as_flag("stop_gradients", value)


#: What the functional forms take as a plain tensor, for typing: arrays, NumPy scalars, Python
#: numbers and (nested) lists. Anything else ``np.asarray`` takes (a torch tensor) is accepted
#: too, typed by the second overload. Nominal types only: a Container, whose ``__getattr__``
#: answers any attribute, would match a protocol such as ``numpy.typing.ArrayLike``.
ArrayLike = np.ndarray | np.generic | float | Sequence[Any]


class AdamUpdate(Protocol):
    """The type of :func:`adamgen.adam_update` (and of a generated package's): plain arrays give
    arrays; a Container anywhere gives a Container for each output that depends on it (and
    anything else ``np.asarray`` takes, a torch tensor, is typed as either)."""

    @overload
    def __call__(self, w: ArrayLike, dcdw: ArrayLike, lr: ArrayLike, mw_tm1: ArrayLike,
                 vw_tm1: ArrayLike, step: ArrayLike, /, *, beta1: float = ..., beta2: float = ...,
                 epsilon: float = ..., stop_gradients: bool = ...,
                 out: np.ndarray | None = ...) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    @overload
    def __call__(self, w: Any, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any, /,
                 *, beta1: float | Tree = ..., beta2: float | Tree = ...,
                 epsilon: float | Tree = ..., stop_gradients: bool | Tree = ...,
                 out: np.ndarray | Tree | None = ...
                 ) -> tuple[np.ndarray | Tree, np.ndarray | Tree, np.ndarray | Tree]: ...


class AdamUpdateVJP(Protocol):
    """The type of :func:`adamgen.adam_update_vjp`: ``(d_w, d_dcdw, d_lr, d_mw_tm1,
    d_vw_tm1)``."""

    def __call__(self, w: ArrayLike, dcdw: ArrayLike, lr: ArrayLike, mw_tm1: ArrayLike,
                 vw_tm1: ArrayLike, step: ArrayLike, cotangents: Sequence[ArrayLike], *,
                 beta1: float = ..., beta2: float = ..., epsilon: float = ...
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...


def bind_adam_update(updater: Updater,
                     defaults: Mapping[str, float] | None = None) -> AdamUpdate:
    """Ivy's ``adam_update`` signature over ``updater`` (the JIT's, or a generated package's,
    whose ``defaults`` are its baked constants)."""
    defaults = {"beta1": BETA1, "beta2": BETA2, "epsilon": EPSILON, **(defaults or {})}
    shortcut: list[Any] = [None]  # the hot path's generated function, once it exists

    def adam_update(w: Any, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any, /, *,
                    beta1: Any = defaults["beta1"], beta2: Any = defaults["beta2"],
                    epsilon: Any = defaults["epsilon"], stop_gradients: Any = True,
                    out: Any = None) -> tuple[Any, Any, Any]:
        run = shortcut[0]
        if run is not None and out is None and type(stop_gradients) is bool:
            done = run(w, dcdw, lr, mw_tm1, vw_tm1, beta1, beta2, epsilon, step)
            if done is not None:  # a seen signature took its shortcut
                return done
        check_stop_gradients(stop_gradients)
        result = updater.whole_way(
            {"w": w, "dcdw": dcdw, "lr": lr, "mw_tm1": mw_tm1, "vw_tm1": vw_tm1},
            {"beta1": beta1, "beta2": beta2, "epsilon": epsilon, "step": step}, out)
        if run is None and updater.hotpath is not None:
            shortcut[0] = updater.hotpath.shortcut
        return result

    adam_update.__doc__ = ADAM_UPDATE_DOC
    return adam_update


ADAM_UPDATE_DOC = """Ivy's ``adam_update``: return ``(w_new, mw, vw)``, bit-identical to Ivy's NumPy
    backend.

    ``mw = beta1*mw_tm1 + (1-beta1)*dcdw``, ``vw = beta2*vw_tm1 + (1-beta2)*dcdw**2``,
    ``alpha = (1 - beta2**step)**0.5 / (1 - beta1**step + epsilon)`` in Python floats, and
    ``w_new = w - ((alpha*mw) / (sqrt(where(vw >= 0, vw, 0)) + epsilon)) * lr``.

    Args:
        w, dcdw, mw_tm1, vw_tm1: arrays or array-likes (lists of Python floats become float32);
            they broadcast together. Never modified, except ``w`` when ``out is w``.
        lr: a Python number (rounded to the arrays' dtype, as NumPy does) or an array; finite
            and ``>= 0`` (every element of an array, checked without copying it). torch rejects
            a negative or NaN lr but accepts inf; adamgen rejects inf too: an infinite step
            turns every weight into inf or NaN, which no caller means.
        step: an int, a float or a 0-d array, used as ``float(step)``; ``step=0`` is no update.
        beta1, beta2: in ``[0, 1)``. epsilon: ``>= 0``.
        stop_gradients: must be a bool; NumPy has no autograd, so it changes nothing.
        out: receives ``w_new`` (same-kind casting); ``out=w`` updates ``w`` in place.

    Result dtypes follow the reference expression's promotion: float32 in gives float32 out,
    integer arrays give float64, and a float64 0-d ``lr`` makes ``w_new`` float64.
    """

adam_update = bind_adam_update(_JIT)


def bind_adam_update_vjp(backend: str = "auto") -> AdamUpdateVJP:
    """Ivy's ``adam_update_vjp`` signature over the VJP on one backend (``"auto"``: C where it
    builds, else NumPy; ``"numpy"`` and ``"c"`` force one, for tests and comparisons)."""
    vjp = VJP(ivy_source(), backend)

    def adam_update_vjp(w: Any, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any,
                        cotangents: Sequence[Any], *, beta1: Any = BETA1, beta2: Any = BETA2,
                        epsilon: Any = EPSILON
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        d_w, d_dcdw, d_lr, d_mw_tm1, d_vw_tm1 = vjp(
            {"w": w, "dcdw": dcdw, "lr": lr, "mw_tm1": mw_tm1, "vw_tm1": vw_tm1}, cotangents,
            {"beta1": beta1, "beta2": beta2, "epsilon": epsilon, "step": step})
        return d_w, d_dcdw, d_lr, d_mw_tm1, d_vw_tm1

    adam_update_vjp.__doc__ = ADAM_UPDATE_VJP_DOC
    return adam_update_vjp


ADAM_UPDATE_VJP_DOC = """Pull ``cotangents = (d_w_new, d_mw, d_vw)`` back through one ``adam_update``.

    Returns ``(d_w, d_dcdw, d_lr, d_mw_tm1, d_vw_tm1)``, each an array with its input's shape
    (a Python-number ``lr`` gets a 0-d array), summed over broadcast dimensions in the fixed
    order of :func:`adamgen.runtime.vjp.sum_to_shape`. Arguments are those of
    :func:`adamgen.adam_update`; each cotangent has its output's shape or broadcasts to it
    (``1.0`` is a cotangent of ones). Where ``v = beta2*vw_tm1 + (1-beta2)*dcdw**2 <= 0`` the
    path through ``sqrt`` contributes 0 (see :mod:`adamgen.derivatives`). The inputs are never
    written.
    """

adam_update_vjp = bind_adam_update_vjp()


class Adam(Optimizer):
    """Ivy's Adam over a list (or a Container) of float32/float64 arrays, updated in place.

    Args:
        params: the parameters; a list of arrays or CPU tensors, or a Container of them. No two
            may share memory.
        lr: the learning rate, finite and >= 0 (torch accepts inf; adamgen does not); may be
            changed between steps (``opt.lr = ...``, checked at the next step).
        beta1, beta2, epsilon: as in :func:`adamgen.adam_update`.
        master_weights, stochastic_rounding, seed: for float16 parameters (Ivy's rule has no
            float16 arithmetic of its own, so they need ``master_weights=True`` or
            ``stochastic_rounding=True``): see :class:`adamgen.runtime.optimizer.Optimizer`.
    """

    display_name = "Adam"

    def __init__(self, params: Sequence[Any] | Tree, lr: float = 1e-3, beta1: float = BETA1,
                 beta2: float = BETA2, epsilon: float = EPSILON, *,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 seed: int = 0) -> None:
        super().__init__(ivy_source(), params, lr=lr, beta1=beta1, beta2=beta2,
                         epsilon=epsilon, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, seed=seed)

    @property
    def lr(self) -> Any:
        return self.hyperparameters["lr"]

    @lr.setter
    def lr(self, value: Any) -> None:  # checked at the next step, with the others
        self.hyperparameters["lr"] = value

    @property
    def beta1(self) -> float:
        return self.hyperparameters["beta1"]

    @property
    def beta2(self) -> float:
        return self.hyperparameters["beta2"]

    @property
    def epsilon(self) -> float:
        return self.hyperparameters["epsilon"]
