"""Warnings that point at the caller's line, not at adamgen's internals (stdlib only).

Why: a fallback warning ("C kernels are unavailable", "cannot use the kernel cache") is found
deep inside adamgen, at a depth that depends on the entry point (``adam_update``, ``Adam.step``,
``adam_update_vjp``, a generated package). A fixed ``stacklevel`` points somewhere inside the
library for most of them; the line a user can act on is the first frame outside adamgen.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from types import FrameType

_PACKAGE_PREFIX = os.path.dirname(os.path.realpath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = RuntimeWarning, *,
         skip: Iterable[str | Path] = ()) -> None:
    """``warnings.warn`` attributed to the first frame outside adamgen and outside ``skip``
    (directories, e.g. a generated package's, whose frames are not the user's either)."""
    prefixes = (_PACKAGE_PREFIX, *(os.path.realpath(p) + os.sep for p in skip))
    frame: FrameType | None = sys._getframe(1)
    level = 2  # warn()'s caller
    while frame is not None and os.path.realpath(frame.f_code.co_filename).startswith(prefixes):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
