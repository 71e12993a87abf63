"""The public ``adam_update``: Ivy's signature and semantics, served by generated kernels.

A call goes: validate everything (nothing is written before every check has passed) -> pick the
kernel form -> compute the per-call scalars with the kernel's own prelude -> run the kernel into
fresh buffers (or into ``out``) -> return ``(w_new, mw, vw)``. That whole way costs far more
than the kernel on small arrays, so a call whose signature was seen before takes a remembered
shortcut (:mod:`adamgen.runtime.hotpath`) after a few compares proving it would go the same way.

Which kernel form: when every array has one float dtype D and ``lr`` is a Python number or an
array of D, every step of the reference computes in D, so the buffered single-dtype kernel gives
the reference's bits. Anything else (integer arrays, a float64 0-d ``lr`` with float32 arrays,
mixed dtypes) goes to the ``mixed`` form, which lets NumPy promote each step as the reference
does; that also fixes the result dtypes, which follow the reference expression's promotion.

The API knows the spec's interface (names, defaults, dependency record) only through the kernel
module it loads, except for the public signature itself, which is Ivy's contract.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, cast

import numpy as np

from ..config import KernelConfig, current_environment
from ..errors import ArgumentTypeError, ArgumentValueError, StepZeroDivisionError
from . import validate
from .array import Array
from .container import Container, key_mismatch
from .hotpath import HotPath, Router
from .prepared import PreparedCall

TENSORS = ("w", "dcdw", "lr", "mw_tm1", "vw_tm1")
#: Argument types that are never Containers (the common case skips the isinstance walk).
_PLAIN_TYPES = frozenset({np.ndarray, Array, float, int, bool, type(None)})
FLOAT_DTYPES = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32",
                np.dtype(np.float64): "float64"}

#: Returns the NumPy kernel module for a configuration, or None when it has none (a generated
#: package holds only the dtypes it was generated for; the ``mixed`` form is always there).
KernelProvider = Callable[[KernelConfig], "ModuleType | None"]
#: Runs one buffered update: (module, tensors, scalars, hyperparameters, buffers, in_place).
BufferedRunner = Callable[..., None]
#: (kernel module, output shapes, output dtypes, buffered): what the arguments' dtypes and
#: shapes decide, memoised per signature by :meth:`Updater.prepare`.
CallPlan = tuple[ModuleType, tuple[tuple[int, ...], ...], tuple[np.dtype, ...], bool]


def prelude_scalars(module: ModuleType, hyper: dict[str, float], step: Any,
                    epsilon: Any) -> tuple[float, ...]:
    """The kernel's per-call scalars from its own prelude, with a clear division-by-zero error."""
    try:
        return module.prelude(*(hyper[name] for name in module.HYPERPARAMETERS))
    except ZeroDivisionError:
        raise StepZeroDivisionError(
            f"step={step!r} with epsilon={epsilon!r} divides by zero in the bias correction "
            "(1 - beta1**step + epsilon); use step >= 1 or epsilon > 0") from None


def run_numpy(module: ModuleType, tensors: dict[str, Any], scalars: tuple[float, ...],
              hyper: dict[str, float], buffers: list[np.ndarray], in_place: bool) -> None:
    """The buffered update on the NumPy module alone (generated packages without C).

    A runner silences NumPy's floating-point warnings where NumPy computes: inf and NaN are
    values of the update, as in the reference, not errors (C raises no warnings at all)."""
    with np.errstate(all="ignore"):
        module.update(*tensors.values(), scalars, *buffers)


class Updater:
    """``adam_update`` bound to a source of kernel modules (the JIT cache, or a generated package).

    Args:
        kernels: returns the NumPy kernel module for a configuration.
        constants: hyperparameters the kernels were specialised for; any other value is an error.
        runner: runs a buffered update (NumPy alone by default; the JIT's dispatcher).
        router: the dispatcher's route (:func:`adamgen.runtime.dispatch.route`) for the same
            kernels as ``runner``: with it, a call whose signature was seen before takes a
            remembered shortcut (:mod:`adamgen.runtime.hotpath`). Not with ``constants``.
    """

    def __init__(self, kernels: KernelProvider, constants: dict[str, float] | None = None,
                 runner: BufferedRunner | None = None, router: Router | None = None):
        self.kernels = kernels
        self.constants = dict(constants or {})
        self.runner = runner or run_numpy
        self.hotpath = HotPath(router) if router is not None and not self.constants else None
        self._modules: dict[tuple[str, frozenset, str], ModuleType | None] = {}
        self._result_dtypes: dict[tuple, tuple[np.dtype, ...]] = {}
        self._plans: dict[tuple, CallPlan] = {}

    def module(self, dtype: str, aliases: frozenset = frozenset()) -> ModuleType | None:
        """The kernel module for ``dtype`` and ``aliases``, memoised (the provider may be slow)."""
        key = (dtype, aliases, current_environment().mode)  # the JIT follows ADAMGEN_MODE
        try:
            return self._modules[key]
        except KeyError:
            found = self._modules[key] = self.kernels(KernelConfig(dtype=dtype, aliases=aliases))
            return found

    # -- validation ---------------------------------------------------------------------------

    def hyperparameters(self, beta1: Any, beta2: Any, epsilon: Any,
                        step: Any) -> dict[str, float]:
        values = {
            "beta1": validate.as_hyperparameter("beta1", beta1, 0.0, 1.0),
            "beta2": validate.as_hyperparameter("beta2", beta2, 0.0, 1.0),
            "epsilon": validate.as_hyperparameter("epsilon", epsilon, 0.0, None),
            "step": validate.as_step(step),
        }
        for name, baked in self.constants.items():
            if values[name] != baked:
                raise ArgumentValueError(f"{name}={values[name]!r}, but these kernels were "
                                         f"generated with {name} fixed to {baked!r}")
        return values

    def prepare(self, *, w: Any, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any,
                beta1: Any, beta2: Any, epsilon: Any, stop_gradients: Any,
                out: Any) -> PreparedCall:
        """Every check of one call, before anything is written."""
        validate.as_flag("stop_gradients", stop_gradients)
        hyper = self.hyperparameters(beta1, beta2, epsilon, step)
        tensors = {
            "w": validate.as_tensor("w", w), "dcdw": validate.as_tensor("dcdw", dcdw),
            "lr": lr, "mw_tm1": validate.as_tensor("mw_tm1", mw_tm1),
            "vw_tm1": validate.as_tensor("vw_tm1", vw_tm1),
        }
        tensors["lr"] = self.learning_rate(lr, tensors)
        signature = (current_environment().mode, *(
            (value.dtype, value.shape) if isinstance(value, np.ndarray) else type(value)
            for value in tensors.values()))
        plan = self._plans.get(signature)
        if plan is None:
            plan = self._plan(tensors)
            if len(self._plans) > 4096:  # bounded: shapes vary without end in some programs
                self._plans.clear()
            self._plans[signature] = plan
        module, output_shapes, dtypes, buffered = plan
        if out is not None:
            validate.check_out(out, output_shapes[0], dtypes[0])
        scalars = prelude_scalars(module, hyper, step, epsilon)
        return PreparedCall(module, tensors, scalars, hyper, output_shapes, dtypes, buffered, out,
                            self)

    def _plan(self, tensors: dict[str, Any]) -> CallPlan:
        """What a call's arguments' dtypes and shapes decide: the kernel module, the output
        shapes and dtypes, and whether the buffered single-dtype form serves. Memoised by
        :meth:`prepare` on exactly those (a training loop asks the same question every call);
        a shape error raises here, every time, as nothing is memoised then."""
        shapes = {name: value.shape if isinstance(value, np.ndarray) else ()
                  for name, value in tensors.items()}
        dtype = _common_float_dtype(tensors)
        buffered_module = self.module(dtype) if dtype else None
        module = buffered_module or self.module("mixed")
        full_shape, output_shapes = self.output_shapes(module, shapes)
        buffered = buffered_module is not None and all(s == full_shape for s in output_shapes)
        if not buffered:
            module = self.module("mixed")
        dtypes = ((np.dtype(dtype),) * len(output_shapes) if buffered
                  else self.result_dtypes(module, tensors))
        return module, output_shapes, dtypes, buffered

    @staticmethod
    def output_shapes(module: ModuleType, shapes: dict[str, tuple[int, ...]],
                      ) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
        """The broadcast shape of all arguments and of each output (from the dependency
        record)."""
        full = validate.broadcast_shape(
            {name: shape for name, shape in shapes.items() if shape} or shapes)
        outputs = tuple(validate.broadcast_shape(
            {n: shapes[n] for n in module.DEPENDS[name] if n in shapes})
            for name in module.OUTPUTS)
        return full, outputs

    @staticmethod
    def learning_rate(lr: Any, tensors: dict[str, Any]) -> Any:
        """``lr`` as the reference's ``effective_grad * lr`` sees it.

        A Python number stays weak. Something without a dtype of its own (a list, a tuple, an
        ``__array__`` object without ``dtype``) takes the effective gradient's dtype, as Ivy's
        ``promote_types_of_inputs`` converts it; anything with a dtype keeps it. The value as
        given must be finite and ``>= 0`` (:func:`validate.check_lr`: adamgen's rule, not Ivy's).
        """
        if isinstance(lr, (list, tuple)) or (
                hasattr(lr, "__array__") and not hasattr(lr, "dtype")):
            gradient_dtype = np.result_type(tensors["dcdw"], tensors["mw_tm1"],
                                            tensors["vw_tm1"], 1.0)
            # the checks (numbers, rectangular, real dtype; the lr rule on the values as given)
            validate.check_lr(validate.as_tensor("lr", lr))
            return np.asarray(lr, dtype=gradient_dtype)
        return validate.check_lr(validate.as_tensor("lr", lr, weak_scalars=True))

    def result_dtypes(self, module: ModuleType,
                      tensors: dict[str, Any]) -> tuple[np.dtype, ...]:
        """Output dtypes under the reference's promotion: run the mixed kernel on empty arrays."""
        signature = tuple(v.dtype if isinstance(v, np.ndarray) else type(v)
                          for v in tensors.values())
        found = self._result_dtypes.get(signature)
        if found is None:
            probes = [np.empty(0, v.dtype) if isinstance(v, np.ndarray) else v
                      for v in tensors.values()]
            scalars = module.prelude(*(0.5 for _ in module.HYPERPARAMETERS))
            with np.errstate(all="ignore"):
                found = tuple(r.dtype for r in module.update(*probes, scalars))
            self._result_dtypes[signature] = found
        return found

    # -- execution ----------------------------------------------------------------------------

    def __call__(self, w: Any, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any, *,
                 beta1: Any = 0.9, beta2: Any = 0.999, epsilon: Any = 1e-07,
                 stop_gradients: Any = True, out: Any = None) -> tuple[Any, Any, Any]:
        hotpath = self.hotpath
        if hotpath is not None and out is None:
            done = hotpath.run(w, dcdw, lr, mw_tm1, vw_tm1, step, beta1, beta2, epsilon,
                               stop_gradients)
            if done is not None:
                return done
        return self.whole_way(w, dcdw, lr, mw_tm1, vw_tm1, step, beta1, beta2, epsilon,
                              stop_gradients, out)

    def whole_way(self, w: Any, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any,
                  beta1: Any, beta2: Any, epsilon: Any, stop_gradients: Any,
                  out: Any) -> tuple[Any, Any, Any]:
        """Every check, every decision, then the update; the route is remembered as a shortcut
        when the arguments have the hot path's common form (:mod:`adamgen.runtime.hotpath`)."""
        hotpath = self.hotpath
        for value in (w, dcdw, lr, mw_tm1, vw_tm1, step, beta1, beta2, epsilon, stop_gradients,
                      out):
            if type(value) not in _PLAIN_TYPES and isinstance(value, Container):
                return self.update_containers({
                    "w": w, "dcdw": dcdw, "lr": lr, "mw_tm1": mw_tm1, "vw_tm1": vw_tm1,
                    "step": step, "beta1": beta1, "beta2": beta2, "epsilon": epsilon,
                    "stop_gradients": stop_gradients, "out": out})
        call = self.prepare(w=w, dcdw=dcdw, lr=lr, mw_tm1=mw_tm1, vw_tm1=vw_tm1, step=step,
                            beta1=beta1, beta2=beta2, epsilon=epsilon,
                            stop_gradients=stop_gradients, out=out)
        results = call.run()
        if hotpath is not None and out is None:  # remember the route for the next such call
            hotpath.learn(call.module, call.tensors, call.scalars, call.hyper, call.buffered,
                        (w, dcdw, lr, mw_tm1, vw_tm1, step, beta1, beta2, epsilon,
                         stop_gradients))
        return results

    def update_containers(self, arguments: dict[str, Any]) -> tuple[Any, ...]:
        """Leaf by leaf, with plain arguments broadcast to every leaf.

        Every leaf is prepared (validated) before any runs, so a bad leaf writes nothing. An
        output is a Container exactly when an input it depends on is one (the kernel's
        dependency record says which); the other outputs are the same for every leaf.
        """
        containers = {n: v for n, v in arguments.items() if isinstance(v, Container)}
        first_name, first = next(iter(containers.items()))
        for name, other in containers.items():
            mismatch = key_mismatch(first, other, names=(first_name, name))
            if mismatch:
                raise ArgumentValueError(mismatch)
        paths = first.leaf_paths()
        module = self.module("mixed")
        is_container = {output: any(d in containers for d in deps)
                        for output, deps in module.DEPENDS.items()}
        out = arguments["out"]
        if out is not None and is_container["w_new"] != isinstance(out, Container):
            expected = "a Container like w_new" if is_container["w_new"] else "an array"
            raise ArgumentTypeError(f"out must be {expected}, got {type(out).__name__}")
        leaf_values = {n: dict(c.leaves()) for n, c in containers.items()}
        calls = [self.prepare(**{n: leaf_values[n][path] if n in containers else v
                                 for n, v in arguments.items()})
                 for path in paths]
        per_leaf = [call.run() for call in calls]
        results = []
        for index, output in enumerate(module.OUTPUTS):
            if is_container[output]:
                results.append(Container.from_leaves(
                    (path, leaf[index]) for path, leaf in zip(paths, per_leaf)))
            else:
                results.append(per_leaf[0][index])
        return tuple(results)


def _common_float_dtype(tensors: dict[str, Any]) -> str | None:
    """The one float dtype of every array argument, if there is one (Python scalars are weak)."""
    dtypes = {v.dtype for v in tensors.values() if isinstance(v, np.ndarray)}
    if len(dtypes) == 1:
        return FLOAT_DTYPES.get(dtypes.pop())
    return None


def _jit_kernels(config: KernelConfig) -> ModuleType:
    from dataclasses import replace

    from ..config import current_environment
    from .kernels import numpy_kernel

    return numpy_kernel(replace(config, mode=current_environment().mode))


def _jit_runner(*args: Any) -> None:
    """NumPy or C, as the loader measured (imported on first use: it loads cffi's backend)."""
    global _jit_runner
    from .dispatch import run_update

    _jit_runner = run_update  # later calls go straight to the dispatcher
    _JIT.runner = run_update
    run_update(*args)


def _jit_router(*args: Any) -> Any:
    """The dispatcher's route for the JIT's kernels (see :func:`_jit_runner`)."""
    from .dispatch import route

    return route(*args)


_JIT = Updater(_jit_kernels, runner=_jit_runner, router=_jit_router)
_HOTPATH = cast(HotPath, _JIT.hotpath)


def adam_update(w: Any, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any, /, *,
                beta1: Any = 0.9, beta2: Any = 0.999, epsilon: Any = 1e-07,
                stop_gradients: Any = True, out: Any = None) -> tuple[Any, Any, Any]:
    """Ivy's ``adam_update``: return ``(w_new, mw, vw)``, bit-identical to Ivy's NumPy backend.

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
    if out is None:  # a signature seen before takes its shortcut (Updater.__call__, inlined)
        done = _HOTPATH.run(w, dcdw, lr, mw_tm1, vw_tm1, step, beta1, beta2, epsilon,
                          stop_gradients)
        if done is not None:
            return done
    return _JIT.whole_way(w, dcdw, lr, mw_tm1, vw_tm1, step, beta1, beta2, epsilon,
                          stop_gradients, out)
