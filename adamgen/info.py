"""``adamgen info``: what this installation has, and what the loader chose on this machine.

The loader remembers one choice per kernel and size bucket, so after a test suite or a long
training run the cache holds hundreds. By default each kernel gets one line, its choices merged
into size ranges; ``--all`` lists every choice with the timings it was made from.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Protocol

from ._version import __version__
from .errors import CacheError


class Choice(Protocol):
    """What :mod:`adamgen.runtime.variant_choice` remembers of one choice (its ``Decision``)."""

    @property
    def problem(self) -> str: ...
    @property
    def bucket(self) -> int: ...
    @property
    def winner(self) -> str: ...
    @property
    def seconds(self) -> dict[str, float]: ...
    @property
    def source(self) -> str: ...


#: How a choice's ``source`` reads in the summary line.
SOURCES = {"cache dir": "read from the cache dir", "measured": "measured by this process",
           "forced": "forced"}


def _bound(bucket: int) -> str:
    return f"2^{bucket}"


def size_ranges(choices: Sequence[Choice]) -> str:
    """One kernel's choices as ranges of N, e.g. ``c for 5 buckets within N < 2^13; c-omp for
    2^14 <= N < 2^15``.

    A size bucket ``b`` holds ``2^(b-1) <= N < 2^b`` (bucket 0 is N = 0). Consecutive choices
    (by size) with one winner merge into one range, which says how many buckets were measured
    in it: a bucket never measured is decided on its first use, not by this table.
    """
    runs: list[tuple[str, int, int, int]] = []  # (winner, first bucket, last bucket, count)
    for choice in sorted(choices, key=lambda c: c.bucket):
        if runs and runs[-1][0] == choice.winner:
            winner, first, _, count = runs[-1]
            runs[-1] = (winner, first, choice.bucket, count + 1)
        else:
            runs.append((choice.winner, choice.bucket, choice.bucket, 1))
    parts = []
    for winner, first, last, count in runs:
        if last == 0:
            span = "N = 0"
        elif first <= 1:
            span = f"N < {_bound(last)}"
        else:
            span = f"{_bound(first - 1)} <= N < {_bound(last)}"
        parts.append(f"{winner} for {count} buckets within {span}" if count > 1
                     else f"{winner} for {span}")
    return "; ".join(parts)


def choice_lines(choices: Iterable[Choice], *, every: bool = False) -> list[str]:
    """The loader's choices: one line per kernel (``every``: one per choice, with timings),
    columns as wide as the longest kernel name."""
    by_kernel: dict[str, list[Choice]] = {}
    for choice in sorted(choices, key=lambda c: (c.problem, c.bucket)):
        by_kernel.setdefault(choice.problem, []).append(choice)
    count = sum(len(group) for group in by_kernel.values())
    if not count:
        return ["variants chosen by measurement (ADAMGEN_VARIANT forces one):",
                "  none yet: the loader measures on first use of each size bucket"]
    sources = Counter(c.source for group in by_kernel.values() for c in group)
    lines = [f"variants chosen by measurement (ADAMGEN_VARIANT forces one): {count} choice"
             f"{'s' if count > 1 else ''} for {len(by_kernel)} kernel"
             f"{'s' if len(by_kernel) > 1 else ''}, "
             + ", ".join(f"{n} {SOURCES.get(source, source)}"
                         for source, n in sorted(sources.items()))]
    width = max(len("kernel"), *(len(name) for name in by_kernel))
    if not every:
        lines.append(f"  {'kernel':<{width}}  {'buckets':>7}  winner by size")
        lines += [f"  {name:<{width}}  {len(group):>7}  {size_ranges(group)}"
                  for name, group in by_kernel.items()]
        lines.append("  (adamgen info --all lists every choice with its timings)")
        return lines
    winner_width = max(len("winner"), *(len(c.winner) for g in by_kernel.values() for c in g))
    lines.append(f"  {'kernel':<{width}}  {'bucket':>9}  {'winner':<{winner_width}}  measured")
    for name, group in by_kernel.items():
        for choice in group:
            size = f"< {_bound(choice.bucket)}" if choice.bucket else "0"
            times = ", ".join(f"{variant} {seconds * 1e6:.1f} us"
                              for variant, seconds in sorted(choice.seconds.items()))
            lines.append(f"  {name:<{width}}  {size:>9}  {choice.winner:<{winner_width}}  "
                         f"{times} ({choice.source})")
    return lines


def main(*, build: bool = False, every: bool = False) -> int:
    """Print the report; with ``build``, build (or fetch) the float32 and float64 kernels
    first; with ``every``, list every measured choice."""
    import numpy as np

    from .codegen import build as c_build
    from .config import current_environment
    from .rules import BUILTINS  # info is not the hot path; the spec hash needs SymPy
    from .runtime import c_kernels, kernel_store, numpy_kernels, variant_choice

    env = current_environment()
    compiler = c_build.probe_compiler()
    print(f"adamgen {__version__}")
    for rule in BUILTINS.values():
        print(f"rule:      {rule.name}, spec hash {rule.build().spec_hash}")
    print(f"python:    {sys.version.split()[0]}   numpy {np.__version__}")
    print(f"mode:      {env.mode} (ADAMGEN_MODE; exact is bit-identical to Ivy)")
    print(f"threads:   {c_kernels.default_threads()} (ADAMGEN_NUM_THREADS, OMP_NUM_THREADS, "
          "usable cores)")
    print("backends:")
    print("  numpy    float16, float32, float64 and mixed dtypes (always available)")
    if env.backend == "numpy":
        print("  c        disabled by ADAMGEN_BACKEND=numpy")
    elif compiler.available:
        print(f"  c        float32, float64 with {compiler.version}; OpenMP "
              f"{'yes' if compiler.openmp else 'no (threaded variants absent)'}; "
              "float16 stays on numpy")
    else:
        print(f"  c        unavailable: {compiler.reason}; numpy serves every call")
    try:
        cache = kernel_store.kernel_cache()
    except CacheError as error:
        print(f"cache:     none: {error}")
    else:
        summary = cache.info()
        print(f"cache:     {cache.root} ({summary['count']} entries, "
              f"{summary['size_bytes'] / 1e6:.2f} MB)")
    if build:
        adam_update = __import__("adamgen").adam_update
        for dtype in ("float32", "float64"):
            x = np.ones(1024, dtype)
            adam_update(x, x, 0.1, x, x, 1)
    events = numpy_kernels.EVENTS + c_kernels.EVENTS
    if events:
        print("kernels this process:")
        for event in events:
            how = "compiled" if event.get("built") else "fetched from cache"
            print(f"  {event.get('kernel', event.get('variant', '?'))}: {how} in "
                  f"{float(event.get('seconds', 0.0)):.3f} s")
    choices = {(d.problem, d.bucket): d for d in variant_choice.persisted_decisions()}
    choices.update({(d.problem, d.bucket): d for d in variant_choice.decisions()})
    for line in choice_lines(choices.values(), every=every):
        print(line)
    return 0
