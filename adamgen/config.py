"""Configuration: one frozen dataclass per concern, and the one place ``ADAMGEN_*`` is read.

Why one place: an environment variable read ad hoc deep in the code is a setting nobody can find,
and one parsed with ``eval`` or ``int()`` without a message is a crash instead of an error.
:func:`environment` parses every variable explicitly and rejects unknown values with the
accepted list, naming the variable.

:class:`KernelConfig` describes one generated kernel; every field changes the generated code, so
all of them go into cache keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .interface import SpecRef

DTYPES = ("float16", "float32", "float64")
#: Element types the C backend compiles (float16 runs on NumPy).
C_DTYPES = ("float32", "float64")
MODES = ("exact", "fast")
BACKENDS = ("numpy", "c")
#: Kernel variants the loader chooses between (``ADAMGEN_VARIANT`` forces one).
VARIANTS = ("numpy", "c", "c-omp")


@dataclass(frozen=True)
class KernelConfig:
    """What one generated kernel is specialised for. Every field changes the generated code.

    Attributes:
        spec: the rule the kernel computes (its name, options and, for a rule defined outside
            adamgen, its graph's hash): every key built from the config is keyed by the rule.
        dtype: element type of every array; ``"mixed"`` renders the dtype-generic NumPy form
            that leaves promotion to NumPy (used when the arrays' dtypes differ).
        mode: ``"exact"`` follows the spec's evaluation order operation by operation;
            ``"fast"`` allows the rewrites :mod:`adamgen.codegen.lower` lists.
        constants: hyperparameters baked in at generation time, as ``(name, value)`` pairs
            sorted by name.
        scalar_tensors: tensor arguments passed as one value broadcast to every element
            (a Python float ``lr``, state of shape ``(1,)``) rather than as arrays.
        aliases: ``(output, input)`` pairs that share memory (``out=w`` is ``("w_new", "w")``).
    """

    spec: SpecRef
    dtype: str = "float32"
    mode: str = "exact"
    constants: tuple[tuple[str, float], ...] = ()
    scalar_tensors: frozenset[str] = field(default_factory=frozenset)
    aliases: frozenset[tuple[str, str]] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES + ("mixed",):
            raise ConfigError(f"dtype must be one of {DTYPES + ('mixed',)}, got {self.dtype!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "constants", tuple(sorted(
            (str(name), float(value)) for name, value in self.constants)))

    @property
    def constants_dict(self) -> dict[str, float]:
        return dict(self.constants)

    def key(self) -> str:
        """A canonical text of every field, for cache keys: the same in every process
        (``repr`` of a frozenset depends on the hash seed, so it is not used)."""
        return json.dumps({
            "spec": self.spec.key(), "dtype": self.dtype, "mode": self.mode, "constants": self.constants,
            "scalar_tensors": sorted(self.scalar_tensors),
            "aliases": sorted(self.aliases),
        }, sort_keys=True)

    def describe(self) -> str:
        """A short, stable, human-readable name used in headers and variant tables."""
        parts = [self.spec.label, self.dtype, self.mode]
        if self.constants:
            parts.append("const(" + ",".join(f"{k}={v!r}" for k, v in self.constants) + ")")
        if self.scalar_tensors:
            parts.append("scalar(" + ",".join(sorted(self.scalar_tensors)) + ")")
        if self.aliases:
            parts.append("alias(" + ",".join(f"{o}={i}" for o, i in sorted(self.aliases)) + ")")
        return " ".join(parts)


@dataclass(frozen=True)
class Environment:
    """Every ``ADAMGEN_*`` setting, parsed. ``None`` means "not set: use the default"."""

    cache_dir: Path | None = None
    strict: bool = False
    require_cache_hit: bool = False
    backend: str | None = None
    mode: str = "exact"
    variant: str | None = None
    num_threads: int | None = None


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; accepted: 1, 0, true, false, yes, no, "
                      "on, off")


def _parse_choice(name: str, raw: str, accepted: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in accepted:
        raise ConfigError(f"{name}={raw!r} is not valid; accepted: {', '.join(accepted)}")
    return value


def _is_ascii_digits(text: str) -> bool:
    """``str.isdigit()`` alone accepts ``'²'`` (which ``int()`` rejects) and ``'١٢'`` (which it
    reads as 12): a thread count is ASCII digits only."""
    return text.isascii() and text.isdigit()


def _parse_positive_int(name: str, raw: str) -> int:
    text = raw.strip()
    if not _is_ascii_digits(text) or int(text) < 1:
        raise ConfigError(f"{name}={raw!r} is not valid; accepted: a whole number >= 1")
    return int(text)


def environment(env: Mapping[str, str] | None = None) -> Environment:
    """Parse every ``ADAMGEN_*`` variable adamgen reads (``OMP_NUM_THREADS`` is the fallback
    thread count). Variables adamgen does not read are left alone: tests and tools may use the
    prefix too.

    Args:
        env: the mapping to read; ``os.environ`` by default. Read anew on every call so tests
            and long-lived processes see changes; callers on the hot path memoise the result.
    """
    env = os.environ if env is None else env
    cache_dir = env.get("ADAMGEN_CACHE_DIR") or None
    threads = None
    for name in ("ADAMGEN_NUM_THREADS", "OMP_NUM_THREADS"):
        raw = env.get(name)
        if raw:
            if name == "OMP_NUM_THREADS" and not _is_ascii_digits(raw.strip()):
                continue  # OMP_NUM_THREADS may be a list ("4,2"); it is OpenMP's, not ours.
            threads = _parse_positive_int(name, raw)
            break
    return Environment(
        cache_dir=Path(cache_dir).expanduser() if cache_dir else None,
        strict=_parse_bool("ADAMGEN_STRICT", env.get("ADAMGEN_STRICT", "0")),
        require_cache_hit=_parse_bool("ADAMGEN_REQUIRE_CACHE_HIT",
                                      env.get("ADAMGEN_REQUIRE_CACHE_HIT", "0")),
        backend=(_parse_choice("ADAMGEN_BACKEND", env["ADAMGEN_BACKEND"], BACKENDS)
                 if env.get("ADAMGEN_BACKEND") else None),
        mode=_parse_choice("ADAMGEN_MODE", env.get("ADAMGEN_MODE") or "exact", MODES),
        variant=(_parse_choice("ADAMGEN_VARIANT", env["ADAMGEN_VARIANT"], VARIANTS)
                 if env.get("ADAMGEN_VARIANT") else None),
        num_threads=threads,
    )



_current: list[Environment] = []


def current_environment() -> Environment:
    """:func:`environment`, parsed once per process for the hot path.

    Like ``OMP_NUM_THREADS`` for OpenMP, the variables are read at first use; a process that
    changes them afterwards calls :func:`refresh_environment`.
    """
    if not _current:
        _current.append(environment())
    return _current[0]


def refresh_environment() -> Environment:
    """Re-read the environment (tests and tools that change ``ADAMGEN_*`` at run time)."""
    _current.clear()
    return current_environment()
