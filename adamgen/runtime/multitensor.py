"""One optimizer step over every parameter of one dtype: a single C call where C is built.

The group is built once, when the optimizer is constructed: the pointers of the parameters and of
the optimizer-owned ``m``, ``v`` and gradient buffers are gathered then and reused every step.
Gradients handed to ``step(grads)`` are the only pointers gathered per step.

Variants (the loader measures them per size bucket and dispatches to the winner): the C
multi-tensor kernel, serial or threaded across and within tensors, and the NumPy in-place module
applied tensor by tensor (always available, and the winner wherever C is not faster).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..config import KernelConfig
from .kernels import numpy_kernel

ALL_IN_PLACE = frozenset({("w_new", "w"), ("mw", "mw_tm1"), ("vw", "vw_tm1")})
DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


class MultiTensorGroup:
    """The parameters of one dtype and their optimizer-owned state."""

    def __init__(self, dtype: np.dtype, params: Sequence[np.ndarray],
                 grads: Sequence[np.ndarray], ms: Sequence[np.ndarray],
                 vs: Sequence[np.ndarray], indices: Sequence[int]) -> None:
        self.dtype = np.dtype(dtype)
        self.params, self.grads, self.ms, self.vs = list(params), list(grads), list(ms), list(vs)
        self.indices = list(indices)
        self.size = sum(p.size for p in self.params)
        self.numpy_module = numpy_kernel(KernelConfig(dtype=DTYPE_NAMES[self.dtype],
                                                      aliases=ALL_IN_PLACE))

    def describe(self) -> str:
        return f"{self.dtype} x{len(self.params)}: numpy"

    def run(self, lr: float, hyper: tuple[float, ...],
            external_grads: Sequence[np.ndarray] | None) -> None:
        """Update every parameter of the group once; ``hyper`` is (beta1, beta2, epsilon, t)."""
        module = self.numpy_module
        scalars = module.prelude(*hyper)
        grads = self.grads if external_grads is None else \
            [external_grads[i] for i in self.indices]
        update = module.update
        with np.errstate(all="ignore"):
            for w, g, m, v in zip(self.params, grads, self.ms, self.vs):
                update(w, g, lr, m, v, scalars, w, m, v)
