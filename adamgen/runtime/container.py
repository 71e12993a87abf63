"""``adamgen.Container``: Ivy's nested mapping of arrays, with Ivy's methods.

The structure is :class:`~adamgen.runtime.tree.Tree`'s; this class adds what Ivy's
``ivy.Container`` has on top: ``adam_update``, ``static_adam_update``, and Ivy's dtype rules for
list leaves (Python floats give float32, as :func:`adamgen.array` makes them).
"""

from __future__ import annotations

from typing import Any

from . import ivy
from .array import array
from .tree import Path, Tree, format_path, key_mismatch

__all__ = ["Container", "Path", "format_path", "key_mismatch"]


class Container(Tree):
    """A nested, insertion-ordered, immutable mapping of arrays, as ``ivy.Container``.

    See :class:`~adamgen.runtime.tree.Tree` for construction, equality and structure.
    """

    __slots__ = ()

    @staticmethod
    def leaf_from_sequence(value: Any) -> Any:
        return array(value)

    # -- Ivy's methods ----------------------------------------------------------------------

    def adam_update(self, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any, /, *,
                    beta1: Any = ivy.BETA1, beta2: Any = ivy.BETA2, epsilon: Any = ivy.EPSILON,
                    stop_gradients: Any = True, out: Any = None) -> Any:
        """Ivy's ``Container.adam_update``: :func:`adamgen.adam_update` with ``self`` as ``w``."""
        return ivy.adam_update(self, dcdw, lr, mw_tm1, vw_tm1, step, beta1=beta1, beta2=beta2,
                                epsilon=epsilon, stop_gradients=stop_gradients, out=out)

    @staticmethod
    def static_adam_update(w: Any, dcdw: Any, lr: Any, mw_tm1: Any, vw_tm1: Any, step: Any, /,
                           *, beta1: Any = ivy.BETA1, beta2: Any = ivy.BETA2,
                           epsilon: Any = ivy.EPSILON, stop_gradients: Any = True, out: Any = None) -> Any:
        """Ivy's ``Container.static_adam_update``: the function itself, under the class."""
        return ivy.adam_update(w, dcdw, lr, mw_tm1, vw_tm1, step, beta1=beta1, beta2=beta2,
                                epsilon=epsilon, stop_gradients=stop_gradients, out=out)


