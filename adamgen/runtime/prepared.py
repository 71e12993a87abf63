"""A validated call of the public ``adam_update``, ready to run: nothing is written before it.

:meth:`adamgen.runtime.api.Updater.prepare` makes one after every check has passed (arguments
converted, per-call scalars computed, the kernel form chosen); :meth:`PreparedCall.run` writes
the outputs: into fresh buffers (the buffered single-dtype form, run by the Updater's runner),
or through NumPy's promotion (the ``mixed`` form), then into ``out`` when one was given. Split
from :mod:`adamgen.runtime.api` to keep each module readable.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from .array import Array
from .outputs import empty_outputs

if TYPE_CHECKING:
    from .api import Updater

OUT_IS_W = frozenset({("w_new", "w")})


def _copy_into_out(out: np.ndarray, w_new: np.ndarray) -> None:
    """``w_new`` into a caller's ``out`` of the same or a narrower float kind. Values beyond the
    narrower type become inf, as the cast defines; like the update itself, this raises no
    floating-point warning."""
    with np.errstate(over="ignore"):
        np.copyto(out, w_new, casting="same_kind")


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

    def run(self) -> tuple[Any, Any, Any]:
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

    def _run_buffered(self, arrays: tuple[Any, ...]) -> tuple:
        module, out = self.module, self.out
        w = self.tensors["w"]
        in_place = out is not None and _same_view(out, w)
        # out may be written directly only when no input it is not exactly (w, for out=w)
        # shares its memory: a partial overlap would be read after being written
        direct = out is not None and out.dtype == self.dtypes[0] and out.flags.c_contiguous and \
            not any(isinstance(a, np.ndarray) and not (in_place and a is w)
                    and np.shares_memory(out, a) for a in arrays)
        if in_place and direct:
            in_place_module = self.updater.module(module.DTYPE, OUT_IS_W)
            if in_place_module is not None:
                module = in_place_module
            else:  # no in-place kernel: compute into a fresh buffer, then copy into out
                direct = False
        # the buffered form's outputs share one shape and dtype: one recycled block holds them
        fresh = empty_outputs(len(self.output_shapes) - direct, self.output_shapes[0],
                              self.dtypes[0])
        buffers = [out] + fresh if direct else fresh
        self.updater.runner(module, self.tensors, self.scalars, self.hyper, buffers,
                            in_place and direct)
        if out is not None and not direct:
            _copy_into_out(out, buffers[0])
            buffers[0] = out
        return tuple(buffers)

    def _wrap(self, results: tuple) -> tuple:
        """Outputs come back as ``adamgen.Array`` when an input they depend on is one."""
        if not any(type(value) is Array for value in self.tensors.values()):
            return results
        depends = self.module.DEPENDS
        wrapped = []
        for name, result in zip(self.module.OUTPUTS, results):
            if result is not self.out and any(
                    isinstance(self.tensors.get(dep), Array) for dep in depends[name]):
                result = result.view(Array)
            wrapped.append(result)
        return tuple(wrapped)


def _same_view(a: np.ndarray, b: Any) -> bool:
    """True when ``a`` and ``b`` are the same elements in the same layout (``out=w``)."""
    return (isinstance(b, np.ndarray) and a.shape == b.shape and a.strides == b.strides
            and a.dtype == b.dtype
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])
