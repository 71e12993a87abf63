"""A rule's functional update, served by its generated kernels, for any rule.

A call goes: validate everything (nothing is written before every check has passed) -> pick the
kernel form -> compute the per-call scalars with the kernel's own prelude -> run the kernel into
fresh buffers (or into ``out``) -> return the outputs, in the rule's order. That whole way costs
far more than the kernel on small arrays, so a call whose signature was seen before takes a
remembered shortcut (:mod:`adamgen.runtime.hotpath`) after a few compares proving it would go
the same way.

Everything rule-specific comes from the rule's interface (its names, its ranges, which tensors may
be scalars, what each output depends on), read from its NumPy module: public names such as
:func:`adamgen.adam_update` are thin bindings (:mod:`adamgen.runtime.ivy`).

Arguments follow Ivy's array conventions (the first rule's contract): lists and Python scalars
become arrays as ``ivy.array`` makes them (Python floats give float32), arrays broadcast
together, a tensor the rule lets be a scalar stays a weak Python number, and any argument may be
a Container (the update then runs leaf by leaf).

Which kernel form: when every array has one float dtype D and each scalar tensor is a Python
number or an array of D, every step of the rule computes in D, so the buffered single-dtype
kernel gives the reference's bits. Anything else (integer arrays, mixed dtypes) goes to the
``mixed`` form, which lets NumPy promote each step as the reference does; that also fixes the
result dtypes. A rule whose mixed form declines (a fused multiply-add, which NumPy cannot round
once in float64) refuses such arguments with an error naming their dtypes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..config import DTYPES, current_environment
from ..errors import ArgumentTypeError, ArgumentValueError, StepZeroDivisionError
from ..interface import Interface
from . import validate
from .hotpath import HotPath, Router
from .prepared import PreparedCall
from .source import KernelSource
from .tree import Tree, key_mismatch

#: Argument types that are never Containers (the common case skips the isinstance walk).
_PLAIN_TYPES = frozenset({np.ndarray, float, int, bool, type(None)})
#: The floating dtypes kernels are generated for, by NumPy dtype.
FLOAT_DTYPES = {np.dtype(name): name for name in DTYPES}

#: Runs one buffered update: (module, tensors, scalars, hyperparameters, buffers, in_place).
BufferedRunner = Callable[..., None]
#: (kernel module, output shapes, output dtypes, buffered): what the arguments' dtypes and
#: shapes decide, memoised per signature by :meth:`Updater.prepare`.
CallPlan = tuple[ModuleType, tuple[tuple[int, ...], ...], tuple[np.dtype, ...], bool]


def prelude_scalars(module: ModuleType, hyper: Mapping[str, float]) -> tuple[float, ...]:
    """The kernel's per-call scalars from its own prelude, with a clear division-by-zero error."""
    try:
        return module.prelude(*(hyper[name] for name in module.HYPERPARAMETERS))
    except ZeroDivisionError:
        shown = ", ".join(f"{name}={hyper[name]!r}" for name in module.HYPERPARAMETERS)
        raise StepZeroDivisionError(
            f"{shown} divide by zero in the rule's per-call scalars (for Adam's bias correction "
            "1 - beta1**step + epsilon: use step >= 1 or epsilon > 0)") from None


def run_numpy(module: ModuleType, tensors: Mapping[str, Any], scalars: tuple[float, ...],
              hyper: Mapping[str, float], buffers: Sequence[np.ndarray], in_place: bool) -> None:
    """The buffered update on the NumPy module alone (a generated package without C).

    A runner silences NumPy's floating-point warnings where NumPy computes: inf and NaN are
    values of the update, as in the reference, not errors (C raises no warnings at all)."""
    with np.errstate(all="ignore"):
        module.update(*tensors.values(), scalars, *buffers)


class Updater:
    """A rule's functional update, bound to its kernels (the JIT cache, or a generated package).

    Args:
        source: the rule's kernels (and the constants a package was specialised for).
        runner: runs a buffered update (NumPy alone by default; the dispatcher, which picks
            NumPy or C as the loader measured).
        router: the dispatcher's route for the same kernels as ``runner``: with it, a call whose
            signature was seen before takes a remembered shortcut (:mod:`hotpath`).
    """

    def __init__(self, source: KernelSource, runner: BufferedRunner | None = None,
                 router: Router | None = None) -> None:
        self.source = source
        self.runner = runner or run_numpy
        self._router = router
        self._hotpath: HotPath | None = None
        self._interface: Interface | None = None
        self._modules: dict[tuple[str, frozenset, str], ModuleType | None] = {}
        self._result_dtypes: dict[tuple, tuple[np.dtype, ...]] = {}
        self._plans: dict[tuple, CallPlan] = {}

    @property
    def interface(self) -> Interface:
        """The rule's interface (read on first use: building it may load a kernel module)."""
        if self._interface is None:
            self._interface = self.source.interface
        return self._interface

    @property
    def hotpath(self) -> HotPath | None:
        """The remembered shortcuts (made on first use), or None without a router."""
        if self._hotpath is None and self._router is not None:
            self._hotpath = HotPath(self._router, self.interface, self.source.constants)
        return self._hotpath

    def module(self, dtype: str, aliases: frozenset = frozenset()) -> ModuleType | None:
        """The kernel module for ``dtype`` and ``aliases``, memoised (the provider may be slow)."""
        key = (dtype, aliases, current_environment().mode)  # the JIT follows ADAMGEN_MODE
        try:
            return self._modules[key]
        except KeyError:
            found = self._modules[key] = self.source.numpy_module(dtype, aliases=aliases)
            return found

    def _mixed_module(self) -> ModuleType:
        """The dtype-generic module (arrays of different dtypes or shapes), built on first need."""
        module = self.module("mixed")
        if module is None:
            raise LookupError(f"rule {self.interface.rule} has no mixed-dtype NumPy module")
        return module

    # -- validation ---------------------------------------------------------------------------

    def hyperparameters(self, given: Mapping[str, Any]) -> dict[str, float]:
        """Every hyperparameter as a Python float, checked against the rule's range (a step as
        ``float(step)``), and against the constants the kernels were specialised for."""
        values = {}
        for declaration in self.interface.hyperparameters:
            values[declaration.name] = declaration.check(given[declaration.name])
        for name, baked in self.source.constants:
            if values[name] != baked:
                raise ArgumentValueError(f"{name}={values[name]!r}, but these kernels were "
                                         f"generated with {name} fixed to {baked!r}")
        return values

    def tensor(self, name: str, value: Any, tensors: Mapping[str, Any]) -> Any:
        """One tensor argument converted as ``ivy.asarray`` would; a tensor the rule lets be a
        scalar stays a weak Python number, and its values are checked against its range
        (without copying an array). ``tensors``: the ones converted so far (every tensor that may
        not be a scalar comes first: a binding may convert by them, as Ivy's list ``lr`` takes
        its gradient's dtype)."""
        declaration = self.interface.tensor(name)
        converted = validate.as_tensor(name, value, weak_scalars=declaration.scalar)
        if declaration.range is not None:
            validate.check_range(converted, declaration.range, name)
        return converted

    def prepare(self, tensors: Mapping[str, Any], hyper: Mapping[str, Any],
                out: Any) -> PreparedCall:
        """Every check of one call, before anything is written."""
        values = self.hyperparameters(hyper)
        declared = self.interface.tensors
        converted: dict[str, Any] = {}
        for group in ([t for t in declared if not t.scalar], [t for t in declared if t.scalar]):
            for declaration in group:  # scalar tensors last: a binding may convert by the others
                converted[declaration.name] = self.tensor(declaration.name,
                                                          tensors[declaration.name], converted)
        converted = {name: converted[name] for name in self.interface.tensor_names}
        signature = (current_environment().mode, *(
            (value.dtype, value.shape) if isinstance(value, np.ndarray) else type(value)
            for value in converted.values()))
        plan = self._plans.get(signature)
        if plan is None:
            plan = self._plan(converted)
            if len(self._plans) > 4096:  # bounded: shapes vary without end in some programs
                self._plans.clear()
            self._plans[signature] = plan
        module, output_shapes, dtypes, buffered = plan
        if out is not None:
            validate.check_out(out, output_shapes[0], dtypes[0], self.interface.outputs[0])
        scalars = prelude_scalars(module, values)
        return PreparedCall(module, converted, scalars, values, output_shapes, dtypes, buffered,
                            out, self)

    def _plan(self, tensors: dict[str, Any]) -> CallPlan:
        """What a call's arguments' dtypes and shapes decide: the kernel module, the output
        shapes and dtypes, and whether the buffered single-dtype form serves. Memoised by
        :meth:`prepare` on exactly those (a training loop asks the same question every call);
        a shape or dtype error raises here, every time, as nothing is memoised then."""
        shapes = {name: value.shape if isinstance(value, np.ndarray) else ()
                  for name, value in tensors.items()}
        dtype = _common_float_dtype(tensors)
        buffered_module = self.module(dtype) if dtype else None
        module = buffered_module or self._mixed_module()
        full_shape, output_shapes = self.output_shapes(module, shapes)
        buffered = buffered_module is not None and all(s == full_shape for s in output_shapes)
        if not buffered:
            module = self._mixed_module()
            if not module.EXACT:
                listed = ", ".join(f"{n} {v.dtype} {v.shape}" if isinstance(v, np.ndarray)
                                   else f"{n} {type(v).__name__}" for n, v in tensors.items())
                # one float dtype: the shapes are what is wrong (a ValueError, as NumPy's)
                error = ArgumentValueError if dtype else ArgumentTypeError
                raise error(
                    f"rule {self.interface.rule} computes in one float dtype: its arrays must "
                    f"share float16, float32 or float64 and give every output one shape; "
                    f"{_odd_ones_out(tensors)} (got {listed}); {module.INEXACT}")
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

    def __call__(self, *tensors: Any, out: Any = None, **hyper: Any) -> tuple[Any, ...]:
        """The update: the rule's tensors positionally (in its order), its hyperparameters by
        keyword (omitted ones take their defaults), ``out`` receiving the first output."""
        interface = self.interface
        names = interface.tensor_names
        if len(tensors) != len(names):
            raise TypeError(f"rule {interface.rule} takes {len(names)} tensors "
                            f"({', '.join(names)}), got {len(tensors)}")
        return self.whole_way(dict(zip(names, tensors)), self.complete(hyper), out)

    def complete(self, hyper: Mapping[str, Any]) -> dict[str, Any]:
        """The hyperparameters given, with every omitted one at its default (a generated
        package's baked constant, else the rule's); an unknown or a missing required one is a
        ``TypeError`` naming it."""
        interface = self.interface
        unknown = sorted(set(hyper) - set(interface.hyperparameter_names))
        if unknown:
            raise TypeError(f"rule {interface.rule} has no hyperparameter "
                            f"{', '.join(unknown)}; it takes "
                            f"{', '.join(interface.hyperparameter_names)}")
        complete = {}
        baked = dict(self.source.constants)  # a package's constants are its defaults
        for declaration in interface.hyperparameters:
            if declaration.name in hyper:
                complete[declaration.name] = hyper[declaration.name]
            elif declaration.name in baked:
                complete[declaration.name] = baked[declaration.name]
            elif declaration.default is not None:
                complete[declaration.name] = declaration.default
            else:
                raise TypeError(f"rule {interface.rule} needs the hyperparameter "
                                f"{declaration.name}")
        return complete

    def whole_way(self, tensors: dict[str, Any], hyper: dict[str, Any],
                  out: Any) -> tuple[Any, ...]:
        """Every check, every decision, then the update; the route is remembered as a shortcut
        when the arguments have the hot path's common form (:mod:`adamgen.runtime.hotpath`)."""
        for value in (*tensors.values(), *hyper.values(), out):
            if type(value) not in _PLAIN_TYPES and isinstance(value, Tree):
                return self.update_trees(tensors, hyper, out)
        call = self.prepare(tensors, hyper, out)
        results = call.run()
        hotpath = self.hotpath
        if hotpath is not None and out is None:  # remember the route for the next such call
            hotpath.learn(call, tensors, hyper)
        return results

    def update_trees(self, tensors: dict[str, Any], hyper: dict[str, Any],
                     out: Any) -> tuple[Any, ...]:
        """Leaf by leaf, with plain arguments broadcast to every leaf.

        Every leaf is prepared (validated) before any runs, so a bad leaf writes nothing. An
        output is a Container exactly when an input it depends on is one (the rule's dependency
        record says which); the other outputs are the same for every leaf.
        """
        arguments = {**tensors, **hyper}
        trees = {n: v for n, v in arguments.items() if isinstance(v, Tree)}
        first_name, first = next(iter(trees.items()))
        for name, other in trees.items():
            mismatch = key_mismatch(first, other, names=(first_name, name))
            if mismatch:
                raise ArgumentValueError(mismatch)
        paths = first.leaf_paths()
        interface = self.interface
        is_tree = {output: any(d in trees for d in deps) for output, deps in interface.depends}
        first_output = interface.outputs[0]
        if out is not None and is_tree[first_output] != isinstance(out, Tree):
            expected = f"a Container like {first_output}" if is_tree[first_output] \
                else "an array"
            raise ArgumentTypeError(f"out must be {expected}, got {type(out).__name__}")
        leaves = {n: dict(t.leaves()) for n, t in trees.items()}
        out_leaves = dict(out.leaves()) if isinstance(out, Tree) else None

        def leaf(values: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
            return {n: leaves[n][path] if n in trees else v for n, v in values.items()}

        calls = [self.prepare(leaf(tensors, path), leaf(hyper, path),
                              out_leaves[path] if out_leaves is not None else out)
                 for path in paths]
        per_leaf = [call.run() for call in calls]
        kind = type(first)
        results = []
        for index, output in enumerate(interface.outputs):
            if is_tree[output]:
                results.append(kind.from_leaves(
                    (path, found[index]) for path, found in zip(paths, per_leaf)))
            else:
                results.append(per_leaf[0][index])
        return tuple(results)


def _odd_ones_out(tensors: dict[str, Any]) -> str:
    """Which arrays differ in dtype or shape from the first array (the parameter, in the
    built-in rules), named for an error message."""
    arrays = {name: v for name, v in tensors.items() if isinstance(v, np.ndarray)}
    if not arrays:
        return "no argument is an array"
    first, value = next(iter(arrays.items()))
    odd = [name for name, v in arrays.items() if (v.dtype, v.shape) != (value.dtype, value.shape)]
    if not odd:
        return f"every array is {value.dtype} {value.shape}"
    return (f"{', '.join(odd)} {'differs' if len(odd) == 1 else 'differ'} from {first} "
            f"({value.dtype} {value.shape})")


def _common_float_dtype(tensors: dict[str, Any]) -> str | None:
    """The one float dtype of every array argument, if there is one (Python scalars are weak)."""
    dtypes = {v.dtype for v in tensors.values() if isinstance(v, np.ndarray)}
    if len(dtypes) == 1:
        return FLOAT_DTYPES.get(dtypes.pop())
    return None


def jit_updater(source: KernelSource, kind: type[Updater] = Updater) -> Updater:
    """An updater (of class ``kind``) whose dispatcher runs each call on NumPy or C, as the
    loader measured, and whose seen signatures take shortcuts."""
    from .dispatch import route, run_update

    def runner(*args: Any) -> None:
        run_update(*args, source=source)

    def router(*args: Any) -> Any:
        return route(*args, source=source)

    return kind(source, runner=runner, router=router)
