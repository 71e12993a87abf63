"""``adamgen info``: what this installation has, and what the loader chose on this machine.

The report has one section per rule: what it is (summary, peer, options), its kernels (built or
fetched by this process, and in the cache) and the loader's choices for them; every built-in rule,
then every other rule (a user's ``adamgen.Rule(spec)``) the cache or this process has kernels of.

The loader remembers one choice per kernel and size bucket, so after a test suite or a long
training run the cache holds hundreds. By default each kernel gets one line, its choices merged
into size ranges; ``--all`` lists every choice with the timings it was made from.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

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


#: The line that says how to see every choice.
HINT = "(adamgen info --all lists every choice with its timings)"
#: How a choice's ``source`` reads in the summary line.
SOURCES = {"cache dir": "read from the cache dir", "measured": "measured by this process",
           "forced": "forced"}  # other sources (measured, not remembered) read as they are


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
        lines.append(f"  {HINT}")
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


def rule_of(text: str, known: Iterable[str] = ()) -> str:
    """The rule a kernel's label or a loader problem names: its first word up to ``(`` or ``.``
    (``numpy torch_adam(amsgrad=True, ...) float32 exact`` -> ``torch_adam``; the leading
    ``numpy``/``c`` of a kernel label is skipped). A VJP (``ivy_adam_vjp``, ``ivy_adam.vjp``)
    belongs to its rule when that rule is ``known``."""
    words = text.split()
    if len(words) > 1 and words[0] in ("numpy", "c"):
        words = words[1:]
    if not words:
        return "?"
    name = re.split(r"[(.\[]", words[0], maxsplit=1)[0]
    if name.endswith("_vjp") and name[:-len("_vjp")] in set(known):
        return name[:-len("_vjp")]
    return name if name.isidentifier() else "?"


def cached_kernels(root: Path) -> list[tuple[str, str]]:
    """``(kind, label)`` of every kernel in the cache at ``root``, from the entries' manifests
    (read only; an entry being written or removed meanwhile is skipped)."""
    from .cache import MANIFEST, SCHEMA

    found = []
    for kind in ("numpy", "c-kernel"):
        directory = root / str(SCHEMA) / kind
        if not directory.is_dir():
            continue
        for entry in sorted(directory.iterdir()):
            try:
                manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(manifest, dict) and isinstance(manifest.get("variant"), str):
                found.append((kind, manifest["variant"]))
    return found


def option_text(option: Any) -> str:
    """``amsgrad=False (or True)``: an option's default first, then its other choices."""
    others = [repr(c) for c in option.choices if c != option.default]
    return f"{option.name}={option.default!r}" + (f" (or {', '.join(others)})" if others else "")


def rule_lines(name: str, *, summary: str = "", peer: str = "", options: Sequence[Any] = (),
               spec_hash: str = "", process: Sequence[str] = (), cached: Sequence[str] = (),
               choices: Sequence[Choice] = (), every: bool = False) -> list[str]:
    """One rule's section: what it is, its kernels (this process, the cache), the loader's
    choices for them."""
    if name == "?":
        lines = ["choices of kernels whose rule was not recorded (by an older adamgen):"]
        return lines + [f"  {line}" for line in choice_lines(choices, every=every)[1:]
                        if not line.lstrip().startswith(HINT)]
    lines = [f"rule {name}: " + (summary or "a user's rule (adamgen.Rule(spec))")]
    if peer:
        lines.append(f"  peer:     {peer}")
    if summary or peer:
        lines.append(f"  options:  {', '.join(option_text(o) for o in options) or 'none'}")
    if spec_hash:
        lines.append(f"  spec:     hash {spec_hash} (default options)")
    kinds = Counter("c" if label.startswith("c ") else "numpy" for label in cached)
    lines.append(f"  kernels:  {len(cached)} in the cache"
                 + (f" ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})"
                    if cached else "")
                 + f"; {len(process)} built or fetched by this process")
    lines += [f"    {line}" for line in process]
    if choices:
        lines += [f"  {line}" for line in choice_lines(choices, every=every)
                  if not line.lstrip().startswith(HINT)]
    else:
        lines.append("  variants: none yet (the loader measures on first use of each size "
                     "bucket)")
    return lines


def _exercise(rule: Any) -> None:
    """One functional call and one optimizer step per dtype: builds (or fetches) the rule's
    kernels and lets the loader choose, as a first real call would."""
    import numpy as np

    interface = rule.interface
    values = {}
    for hyper in interface.hyperparameters:
        if hyper.default is None:
            candidates = [1.0, 0.5, 0.0] + [b for b in (hyper.range.low, hyper.range.high)
                                            if b is not None]
            values[hyper.name] = next((c for c in candidates if hyper.range.contains(c)), 1.0)
    scalars = {t.name: 0.1 for t in interface.tensors if t.scalar}
    for dtype in ("float32", "float64"):
        x = np.ones(1024, dtype)
        tensors = [scalars.get(t.name, x) for t in interface.tensors]
        rule.update(*tensors, **values)
        settable = {k: v for k, v in values.items() if interface.hyperparameter(k).kind != "step"}
        rule.optimizer([x.copy()], **settable, **scalars).step([x])


def main(*, build: bool = False, every: bool = False, rules: Sequence[str] = ()) -> int:
    """Print the report: the installation, then one section per rule (``rules``: those only;
    default: every built-in rule, and every other rule the cache or this process has kernels
    of). ``build``: build (or fetch) the float32 and float64 kernels of ``rules`` (default:
    ``ivy_adam``) first; ``every``: list every measured choice."""
    import numpy as np

    from .codegen import build as c_build
    from .config import current_environment
    from .rules import BUILTINS, builtin  # info is not the hot path; the spec hash needs SymPy
    from .runtime import c_kernels, kernel_store, numpy_kernels, variant_choice
    from .runtime.rule import rule as builtin_rule

    for name in rules:
        builtin(name)  # an unknown name is an error listing the rules, before any output
    env = current_environment()
    compiler = c_build.probe_compiler()
    print(f"adamgen {__version__}")
    print(f"python:    {sys.version.split()[0]}   numpy {np.__version__}")
    print(f"mode:      {env.mode} (ADAMGEN_MODE; exact is bit-identical to each rule's peer)")
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
    cached: list[tuple[str, str]] = []
    try:
        cache = kernel_store.kernel_cache()
    except CacheError as error:
        print(f"cache:     none: {error}")
    else:
        summary = cache.info()
        print(f"cache:     {cache.root} ({summary['count']} entries, "
              f"{summary['size_bytes'] / 1e6:.2f} MB)")
        cached = cached_kernels(cache.root)
    if build:
        for name in rules or ("ivy_adam",):
            _exercise(builtin_rule(name))
    events = numpy_kernels.EVENTS + c_kernels.EVENTS
    choices = {(d.problem, d.bucket): d for d in variant_choice.persisted_decisions()}
    choices.update({(d.problem, d.bucket): d for d in variant_choice.decisions()})
    if not choices:  # the whole machine's state, in one line
        print("variants:  none yet: the loader measures on first use of each size bucket "
              "(ADAMGEN_VARIANT forces one)")

    processed = [(str(e.get("kernel", e.get("variant", "?"))),
                  f"{e.get('kernel', e.get('variant', '?'))}: "
                  + (f"failed ({e['error']})" if e.get("error") else
                     f"{'compiled' if e.get('built') else 'fetched from cache'} in "
                     f"{float(e.get('seconds', 0.0)):.3f} s")) for e in events]
    names = list(rules or BUILTINS)
    known = set(BUILTINS) | {rule_of(label) for _, label in cached} | \
        {rule_of(label) for label, _ in processed}
    if not rules:  # every other rule seen, by name; unrecorded ones last
        seen = {rule_of(label, known) for _, label in cached} | \
            {rule_of(label, known) for label, _ in processed} | \
            {rule_of(c.problem, known) for c in choices.values()}
        names += sorted(seen - set(names), key=lambda n: (n == "?", n))
    for name in names:
        print()
        own = BUILTINS.get(name)
        lines = rule_lines(
            name,
            summary=own.summary if own else "", peer=own.peer if own else "",
            options=own.options if own else (),
            spec_hash=builtin(name).build().spec_hash if own else "",
            process=[text for label, text in processed if rule_of(label, known) == name],
            cached=[label for _, label in cached if rule_of(label, known) == name],
            choices=[c for c in choices.values() if rule_of(c.problem, known) == name],
            every=every)
        for line in lines:
            print(line)
    if choices and not every:
        print(f"\n{HINT}")
    return 0
