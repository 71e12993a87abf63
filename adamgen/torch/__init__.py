"""Drop-in ``torch.optim`` optimizers with adamgen's kernels: ``Adam``, ``AdamW``, ``Lion``.

Change one import::

    optimizer = adamgen.torch.AdamW(model.parameters(), lr=1e-3)   # was torch.optim.AdamW

Everything a ``torch.optim.Optimizer`` offers works as torch's does (param groups, LR
schedulers, hooks, ``state_dict`` in torch's format, ``GradScaler``, pickling); each step is one
C call per (group, dtype) computing torch's arithmetic with an IEEE square root. See
:class:`Adam` for what differs from torch.optim itself, and docs/torch.md.

This subpackage imports torch; ``import adamgen`` never does.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised without torch installed
    raise ImportError("adamgen.torch needs torch: pip install 'adamgen[torch]' (the CPU wheel: "
                      "pip install torch==2.13.0 --index-url "
                      "https://download.pytorch.org/whl/cpu)") from error

from .adam import Adam, AdamW
from .lion import Lion

__all__ = ["Adam", "AdamW", "Lion"]
