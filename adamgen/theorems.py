"""``adamgen verify``: every rule's theorems, proven by SymPy (see :mod:`adamgen.proofs`).

Each rule gets the generic theorem "the lowered kernel equals the spec", for exact and fast
mode, with its scalar-capable tensors passed as scalars, and with its defaults baked in as
constants; plus the rule's own theorems, listed beside its spec (a built-in rule's module
:func:`theorems`). The IR under test comes from ``ir_factory(spec, config)`` (default:
:func:`~adamgen.codegen.lower.lower`), so a test can hand in a deliberately wrong IR and see
``FAILED``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .codegen.lower import lower
from .config import KernelConfig
from .proofs import (
    FAILED,
    PROVED,
    UNPROVEN,
    IRFactory,
    TheoremResult,
    Undecided,
    ir_equals_spec,
)
from .rules import BUILTINS, builtin
from .spec import UpdateSpec

__all__ = ["FAILED", "PROVED", "UNPROVEN", "TheoremResult", "print_report", "theorems",
           "verify", "verify_rules"]

Theorem = tuple[str, Callable[[], tuple[str, str]]]
#: A rule's own theorems: given its spec and the IR factory, ``(name, prove)`` pairs.
RuleTheorems = Callable[[UpdateSpec, IRFactory], Iterable[Theorem]]


def default_constants(spec: UpdateSpec) -> tuple[tuple[str, float], ...]:
    """The hyperparameters a ``--const`` specialisation bakes by default: those with a default."""
    return tuple((h.name, float(h.default)) for h in spec.interface.hyperparameters
                 if h.default is not None and h.kind != "step")


def ir_configs(spec: UpdateSpec,
               constants: Sequence[tuple[str, float]] | None) -> list[KernelConfig]:
    """The configurations whose IR is proven equal to the spec."""
    ref = spec.ref()
    scalar = frozenset(t.name for t in spec.interface.tensors if t.scalar)
    configs = [KernelConfig(spec=ref, dtype="float64", mode="exact"),
               KernelConfig(spec=ref, dtype="float64", mode="fast")]
    if scalar:
        configs.append(KernelConfig(spec=ref, dtype="float64", mode="fast",
                                    scalar_tensors=scalar))
    names = set(spec.interface.hyperparameter_names)
    baked = (default_constants(spec) if constants is None
             else tuple((name, value) for name, value in constants if name in names))
    if baked:
        configs += [KernelConfig(spec=ref, dtype="float64", mode=mode, constants=baked)
                    for mode in ("exact", "fast")]
    return configs


def theorems(spec: UpdateSpec, ir_factory: IRFactory | None = None,
             constants: Sequence[tuple[str, float]] | None = None,
             own: RuleTheorems | None = None) -> list[Theorem]:
    """One rule's theorem table, in report order: ``(name, prove)``.

    Args:
        spec: the rule.
        ir_factory: lowers the spec (default: :func:`lower`).
        constants: the ``--const`` specialisation (default: the hyperparameters' defaults);
            names the rule does not have are left out.
        own: the rule's own theorems (default: a built-in rule's, none for other rules).
    """
    factory: IRFactory = ir_factory or lower
    table: list[Theorem] = [
        (f"IR == spec [{c.describe()}]", functools.partial(ir_equals_spec, spec, factory, c))
        for c in ir_configs(spec, constants)]
    if own is None and spec.name in BUILTINS:
        own = builtin(spec.name).theorems
    if own is not None:
        table += list(own(spec, factory))
    return table


def prove(name: str, run: Callable[[], tuple[str, str]]) -> TheoremResult:
    """Run one theorem, timed; SymPy's indecision is UNPROVEN, a crash is FAILED."""
    start = time.perf_counter()
    try:
        status, detail = run()
    except Undecided as reason:
        status, detail = UNPROVEN, str(reason)
    except Exception as error:  # noqa: BLE001 - a broken IR or pass must show, not crash
        status, detail = FAILED, f"error: {type(error).__name__}: {error}"
    return TheoremResult(name, status, time.perf_counter() - start, detail)


def verify(specs: Sequence[UpdateSpec] | None = None, *, ir_factory: IRFactory | None = None,
           constants: Sequence[tuple[str, float]] | None = None,
           only: Sequence[str] = ()) -> list[TheoremResult]:
    """Prove every theorem of every rule (default: the built-in rules with default options),
    or those whose name contains one of ``only``. Names are prefixed with the rule when more
    than one rule is verified."""
    specs = list(specs) if specs is not None else [r.build() for r in BUILTINS.values()]
    results = []
    for spec in specs:
        for name, run in theorems(spec, ir_factory, constants):
            label = f"{spec.name}: {name}" if len(specs) > 1 else name
            if only and not any(part.lower() in label.lower() for part in only):
                continue
            results.append(prove(label, run))
    return results


def print_report(results: Sequence[TheoremResult], *, verbose: bool = True,
                 strict: bool = False) -> int:
    """Print the table; return 1 if any theorem FAILED (or, with ``strict``, is UNPROVEN)."""
    width = max([len(r.name) for r in results] + [7])
    print(f"{'theorem':<{width}}  {'status':<8}  {'seconds':>7}")
    for r in results:
        print(f"{r.name:<{width}}  {r.status:<8}  {r.seconds:7.2f}")
        if verbose or r.status != PROVED:
            print(f"    {r.detail}")
    counts = {s: sum(r.status == s for r in results) for s in (PROVED, FAILED, UNPROVEN)}
    total = sum(r.seconds for r in results)
    print(f"{counts[PROVED]} proved, {counts[FAILED]} failed, {counts[UNPROVEN]} unproven "
          f"in {total:.1f} s")
    return 1 if counts[FAILED] or (strict and counts[UNPROVEN]) else 0


def verify_rules(names: Sequence[str] = (), *,
                 constants: Sequence[tuple[str, float]] | None = None,
                 only: Sequence[str] = (),
                 options: Mapping[str, Any] | None = None) -> list[TheoremResult]:
    """``adamgen verify``: the named built-in rules (default: all of them, with their default
    options), each built with ``options`` (``{"amsgrad": True}``; every named rule must have
    them).

    Raises:
        ValueError: an unknown rule or option, or a ``constants`` name no verified rule has.
    """
    specs = [builtin(name).build(**dict(options or {})) for name in (names or BUILTINS)]
    if constants is not None:
        known = {n for spec in specs for n in spec.interface.hyperparameter_names}
        unknown = [name for name, _ in constants if name not in known]
        if unknown:
            raise ValueError(f"--const {', '.join(unknown)}: no verified rule has such a "
                             f"hyperparameter (they have {', '.join(sorted(known))})")
    return verify(specs, constants=constants, only=only)
