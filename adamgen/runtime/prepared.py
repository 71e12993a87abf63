"""A validated functional call, ready to run: nothing is written before it.

:meth:`adamgen.runtime.functional.Updater.prepare` makes one after every check has passed
(arguments converted, per-call scalars computed, the kernel form chosen); :meth:`PreparedCall.run`
writes the outputs: into fresh buffers (the buffered single-dtype form, run by the Updater's
runner), or through NumPy's promotion (the ``mixed`` form), then into ``out`` when one was given.

``out`` receives the rule's first output. When ``out`` is exactly the input that output replaces
in the rule's in-place form (``adam_update(..., out=w)``), the in-place kernel writes it directly.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from .outputs import empty_outputs

if TYPE_CHECKING:
    from .functional import Updater


def _copy_into_out(out: np.ndarray, first: np.ndarray) -> None:
    """The first output into a caller's ``out`` of the same or a narrower float kind. Values
    beyond the narrower type become inf, as the cast defines; like the update itself, this
    raises no floating-point warning."""
    with np.errstate(over="ignore"):
        np.copyto(out, first, casting="same_kind")


class PreparedCall:
    """A validated call: arguments converted, scalars computed, kernel chosen; nothing written."""

    def __init__(self, module: ModuleType, tensors: dict[str, Any], scalars: tuple[float, ...],
                 hyper: dict[str, float], output_shapes: tuple[tuple[int, ...], ...],
                 dtypes: tuple[np.dtype, ...], buffered: bool, out: np.ndarray | None,
                 updater: Updater) -> None:
        self.module = module
        self.tensors = tensors
        self.scalars = scalars
        self.hyper = hyper
        self.updater = updater
        self.output_shapes = output_shapes
        self.dtypes = dtypes
        self.buffered = buffered
        self.out = out

    def run(self) -> tuple[Any, ...]:
        arrays = tuple(self.tensors.values())
        if self.buffered:
            results = self._run_buffered(arrays)
        else:
            with np.errstate(all="ignore"):
                results = self.module.update(*arrays, self.scalars)
            results = tuple(np.asarray(r) for r in results)
            if self.out is not None:
                _copy_into_out(self.out, results[0])
                results = (self.out,) + results[1:]
        return self._wrap(results)

    def _replaced_input(self) -> str | None:
        """The input the first output replaces in place, if the rule has such a pair."""
        interface = self.updater.interface
        first = interface.outputs[0]
        return next((p.input for p in interface.state if p.output == first), None)

    def _run_buffered(self, arrays: tuple[Any, ...]) -> tuple:
        module, out = self.module, self.out
        source_name = self._replaced_input() if out is not None else None
        source = self.tensors.get(source_name) if source_name is not None else None
        in_place = out is not None and source is not None and _same_view(out, source)
        # out may be written directly only when no input it is not exactly (the replaced one,
        # for out=w) shares its memory: a partial overlap would be read after being written
        direct = out is not None and out.dtype == self.dtypes[0] and out.flags.c_contiguous and \
            not any(isinstance(a, np.ndarray) and not (in_place and a is source)
                    and np.shares_memory(out, a) for a in arrays)
        if in_place and direct:
            aliases = frozenset({(self.updater.interface.outputs[0], source_name)})
            in_place_module = self.updater.module(module.DTYPE, aliases)
            if in_place_module is not None:
                module = in_place_module
            else:  # no in-place kernel: compute into a fresh buffer, then copy into out
                direct = False
        # the buffered form's outputs share one shape and dtype: one recycled block holds them
        fresh = empty_outputs(len(self.output_shapes) - direct, self.output_shapes[0],
                              self.dtypes[0])
        buffers = [out, *fresh] if out is not None and direct else fresh
        self.updater.runner(module, self.tensors, self.scalars, self.hyper, buffers,
                            in_place and direct)
        if out is not None and not direct:
            _copy_into_out(out, buffers[0])
            buffers[0] = out
        return tuple(buffers)

    def _wrap(self, results: tuple) -> tuple:
        """Outputs come back in the class of an input they depend on (an ``adamgen.Array`` in,
        an ``adamgen.Array`` out), except ``out``, which is the caller's own."""
        kinds = {type(v) for v in self.tensors.values()
                 if isinstance(v, np.ndarray) and type(v) is not np.ndarray}
        if not kinds:
            return results
        depends = self.module.DEPENDS
        wrapped = []
        for name, result in zip(self.module.OUTPUTS, results):
            if result is not self.out:
                for dep in depends[name]:
                    kind = type(self.tensors.get(dep))
                    if kind in kinds:
                        result = result.view(kind)
                        break
            wrapped.append(result)
        return tuple(wrapped)


def _same_view(a: np.ndarray, b: Any) -> bool:
    """True when ``a`` and ``b`` are the same elements in the same layout (``out=w``)."""
    return (isinstance(b, np.ndarray) and a.shape == b.shape and a.strides == b.strides
            and a.dtype == b.dtype
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])
