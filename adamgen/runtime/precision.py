"""Which spec updates low-precision parameters: the three mixed-precision modes, by reference.

A float32/float64 parameter runs its rule as it is. A bfloat16 or float16 parameter runs one of
three variants of it, each a spec of its own with its own kernels (so every key and memo below is
keyed by it), computing in float32:

* **the rule's own low-precision arithmetic** (the default): the rule's ``precision`` option,
  for a rule that models how its peer rounds in that dtype (``torch_adam``/``torch_adamw``:
  torch's per-op rounding, state in the parameter's dtype). A rule without one has no such mode;
* **master weights** (``master_weights=True``): the rule's master-weight form
  (:mod:`adamgen.mixed`): float32 master and state, the parameter the master rounded to nearest;
* **stochastic rounding** (``stochastic_rounding=True``, which implies master weights): the same,
  the parameter rounded stochastically with the random stream of ``seed``.

This module picks the reference (no SymPy); the specs are built on a kernel-cache miss.
"""

from __future__ import annotations

from ..errors import ArgumentTypeError, ArgumentValueError
from ..interface import SpecRef, master_form
from ..rules import BUILTINS, builtin

#: Parameter dtypes with mixed-precision modes.
LOW_PRECISION = ("bfloat16", "float16")
#: The modes: the rule's own arithmetic, master weights, stochastic rounding.
MODES = ("rule", "master", "stochastic")


def mode_of(master_weights: bool, stochastic_rounding: bool) -> str:
    """The mode the constructor arguments choose (stochastic rounding implies master weights)."""
    if stochastic_rounding:
        return "stochastic"
    return "master" if master_weights else "rule"


def check_arguments(master_weights: object, stochastic_rounding: object, seed: object) -> int:
    """The public constructor arguments, checked; returns the seed."""
    for name, value in (("master_weights", master_weights),
                        ("stochastic_rounding", stochastic_rounding)):
        if not isinstance(value, bool):
            raise ArgumentTypeError(f"{name} must be a bool, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ArgumentValueError(f"seed must be an int from 0 to 2**64 - 1, got {seed!r}")
    return seed


def variant_ref(ref: SpecRef, dtype: str, mode: str) -> SpecRef:
    """The spec that updates parameters of ``dtype`` with rule ``ref`` in ``mode``.

    Raises:
        ArgumentTypeError: the rule has no low-precision arithmetic of its own (mode ``rule``).
        ArgumentValueError: no master-weight form for ``dtype`` (a mode it does not have).
    """
    if dtype not in LOW_PRECISION:
        return ref
    if mode == "rule":
        options = dict(ref.options)
        known = BUILTINS.get(ref.name)
        choices = next((o.choices for o in known.options if o.name == "precision"), ()) \
            if known is not None and not ref.digest and not ref.derivative else ()
        if dtype not in choices:
            raise ArgumentTypeError(
                f"rule {ref.name} has no {dtype} arithmetic of its own (no precision option "
                f"for {dtype}); use master_weights=True: float32 master weights and state")
        options["precision"] = dtype
        return builtin(ref.name).ref(**options)
    try:
        return ref.derived(master_form(dtype, mode == "stochastic"))
    except ValueError as error:
        raise ArgumentValueError(str(error)) from None
