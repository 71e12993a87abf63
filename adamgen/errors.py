"""Every error adamgen raises on purpose, under one base class.

Argument errors reuse the built-in types a NumPy user expects (``TypeError`` for a bad dtype,
``ValueError`` for a bad shape or value), but each also derives from :class:`AdamgenError`, so
``except adamgen.AdamgenError`` catches everything adamgen raised deliberately.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class AdamgenError(Exception):
    """Base class of every error adamgen raises deliberately."""


class ArgumentTypeError(AdamgenError, TypeError):
    """An argument has a type or dtype adamgen cannot update with."""


class ArgumentValueError(AdamgenError, ValueError):
    """An argument has a shape or value outside the contract."""


class StepZeroDivisionError(AdamgenError, ZeroDivisionError):
    """The bias correction divides by zero (``step == 0`` with ``epsilon == 0``)."""


class ConfigError(AdamgenError, ValueError):
    """An ``ADAMGEN_*`` environment variable or a configuration field has a bad value."""


class SpecError(AdamgenError, ValueError):
    """An update spec is malformed: names, declarations, or a construct no kernel can compute."""


class LoweringError(SpecError):
    """The spec uses a construct the kernel IR cannot express."""


class InexactVariantError(AdamgenError, ValueError):
    """A variant was forced that cannot compute a rule's every operation exactly (e.g. NumPy
    and a float64 fused multiply-add)."""


class BackendUnsupportedError(AdamgenError, ValueError):
    """A backend cannot render this kernel (the C backend and a float64 rounding to bfloat16):
    another backend serves it, as for a dtype the backend has no form for."""


class CompileError(AdamgenError):
    """The C compiler failed; carries what is needed to reproduce the failure by hand."""

    def __init__(self, message: str, argv: Sequence[str] = (), stderr: str = "",
                 c_path: Path | str | None = None) -> None:
        self.argv = list(argv)
        self.stderr = stderr
        self.c_path = Path(c_path) if c_path is not None else None
        details = [message]
        if self.argv:
            details.append("command: " + " ".join(self.argv))
        if self.c_path is not None:
            details.append(f"source kept at: {self.c_path}")
        if stderr:
            details.append("compiler output:\n" + stderr.rstrip())
        super().__init__("\n".join(details))


class CacheError(AdamgenError):
    """The kernel cache could not be used (lock timeout, unsafe ownership, ...)."""


class CacheUnsafeError(CacheError):
    """A cache path another user owns or can write (or a symlink where a directory or a lock
    belongs): nothing is loaded from that cache for the rest of the process."""


class CacheReadOnlyError(CacheError):
    """A read-only cache (a shared image, a read-only mount) cannot build a missing entry."""


class CacheMissError(CacheError):
    """Raised on a miss when ``ADAMGEN_REQUIRE_CACHE_HIT=1``: makes "this was a hit" provable."""
