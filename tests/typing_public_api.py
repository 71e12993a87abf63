"""Read by mypy (``[tool.mypy] files`` in pyproject.toml), never run: the public functions have
real types, not ``Any``. ``assert_type`` fails the mypy run in ``.ci/run`` if one regresses."""

from __future__ import annotations

import numpy as np
from typing_extensions import assert_type

import adamgen
from adamgen.runtime.tree import Tree
from adamgen.theorems import TheoremResult

w = np.zeros(3, np.float32)
container = adamgen.Container(a=w)
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]

assert_type(adamgen.adam_update(w, w, 0.1, w, w, 1), Arrays)
assert_type(adamgen.adam_update([1.0], w, np.asarray(0.1, np.float32), w, w, 3.0, beta1=0.8,
                                out=w), Arrays)
assert_type(adamgen.adam_update(container, w, 0.1, w, w, 1),
            tuple[np.ndarray | Tree, np.ndarray | Tree, np.ndarray | Tree])
assert_type(adamgen.adam_update_vjp(w, w, 0.1, w, w, 1, (w, w, w)),
            tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray])
assert_type(adamgen.verify(), list[TheoremResult])
