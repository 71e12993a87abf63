"""What the differential tests of the built-in rules share (not a test module).

``test_torch_adam.py`` and ``test_lion.py`` run a rule through every exact variant, the
functional form and the in-place optimizer, step after step, against a reference trajectory
computed with the peer's own code (:mod:`peers`), from the same start with the same gradients:

* :func:`make_trajectory`: starting parameters of every size in :data:`SIZES` and
  :data:`STEPS` steps of gradients, with NaN (random payload and sign), +-inf, +-0, subnormals
  and extremes on a few steps;
* :func:`check_functional` / :func:`check_optimizer`: one variant's trajectory, each step
  compared with the reference bit for bit (:func:`assert_state_equal`), returning which
  variants the loader actually picked (:func:`forced`) so a test can prove the threaded
  kernel ran;
* :func:`two_threads`: ``c-omp`` at 2 threads.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import assert_bitwise_equal

import adamgen
from adamgen.config import refresh_environment
from adamgen.runtime import c_kernels, dispatch, variant_choice

STEPS = 50
#: Not multiples of 16 (one AVX-512 vector of float32) except where none is possible; 4099 is
#: past ``dispatch.THREADING_THRESHOLD`` (4096, where ``c-omp`` becomes a candidate) and 16411
#: past the C kernel's own default threshold (16384, below which a threaded entry point called
#: without one runs serially).
SIZES = (1, 15, 17, 1000, 4099, 16_411)
#: The size ``c-omp`` runs in the functional form: past both thresholds, so it is a candidate
#: and its two threads split the work (8192 + 8219 elements: the split falls on a cache line,
#: the second share ends in a partial vector); below, it would run serial C, as under ``c``. The optimizer's ``c-omp`` threads
#: over all its parameters at once (21560 elements). One size only: a threaded call after a
#: pause costs milliseconds on this shared machine (its second thread waits for a busy core).
THREADED_SIZE = SIZES[-1]
assert THREADED_SIZE >= max(dispatch.THREADING_THRESHOLD, c_kernels.DEFAULT_THRESHOLD)
THREADS = 2
BITS = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}

#: Per step, per size: a rule's new state (its outputs, in order).
Reference = list[list[tuple[np.ndarray, ...]]]


def assert_state_equal(actual: tuple, expected: tuple, names: tuple[str, ...],
                       where: str) -> None:
    """Every output bit for bit, under the suite's NaN rule (:func:`conftest.assert_bitwise_equal`):
    a NaN must be a NaN exactly where the reference has one, and every other element, zeros'
    signs and infinities included, has the reference's bits.

    A NaN's sign and payload are not compared: IEEE 754 leaves them unspecified, and here they
    do differ without any arithmetic difference (measured, torch_adam over 50 steps):

    * GCC folds ``maximize``'s negation into its neighbours (``(a*(-g))*(-g)`` becomes
      ``(a*g)*g``, ``fma(a, b, -g)`` a fused multiply-subtract), so the C kernels keep the sign
      of a NaN gradient that torch flips: with ``maximize``, most NaNs differ in sign;
    * ``torch.maximum`` (amsgrad) returns an all-ones NaN in its vector lanes and the default
      NaN in its scalar tail, whatever NaN came in: most of ``max_exp_avg_sq``'s NaNs;
    * NumPy picks between two NaN operands by SIMD position (body or tail).

    Without ``maximize`` and amsgrad the C and NumPy kernels gave torch's NaN bits exactly.
    """
    assert len(actual) == len(expected), (where, len(actual), len(expected))
    for got, want, name in zip(actual, expected, names):
        if (got.dtype == want.dtype and got.shape == want.shape
                and got.tobytes() == want.tobytes()):
            continue  # identical bits, NaN payloads too: the common case, decided fast
        assert_bitwise_equal(got, want, f"{where}: {name}")


# -- inputs -------------------------------------------------------------------------------------

def special_values(dtype: np.dtype, rng: np.random.Generator, count: int) -> np.ndarray:
    """NaNs of random payload and sign (quiet ones), infinities, signed zeros, subnormals,
    the largest finite values and the smallest normal one."""
    bits = BITS[dtype]
    info = np.finfo(dtype)
    width = 8 * dtype.itemsize
    quiet = 1 << (info.nmant - 1)
    exponent = ((1 << (width - 1)) - 1) >> info.nmant << info.nmant
    payloads = rng.integers(0, quiet, count, dtype=np.int64).astype(bits)
    signs = rng.integers(0, 2, count).astype(bits) << bits(width - 1)
    nans = (payloads | bits(exponent) | bits(quiet) | signs).view(dtype)
    pool = np.array([np.inf, -np.inf, 0.0, -0.0, info.smallest_subnormal,
                     -3 * info.smallest_subnormal, info.max, -info.max, info.tiny], dtype)
    values = rng.choice(pool, count)
    is_nan = rng.random(count) < 0.4
    values[is_nan] = nans[is_nan]
    return values


@dataclass
class Trajectory:
    """The starting parameters and every step's gradients, one array per size."""

    params: list[np.ndarray]
    grads: list[list[np.ndarray]]


@functools.lru_cache(maxsize=10)
def make_trajectory(dtype: np.dtype, seed: int) -> Trajectory:
    """Gradients over six decades; specials on steps 5, 20 and 35 in ~0.2 % of the elements
    (at least one), and in the one-element tensor on step 45 only: a NaN or an inf stays in the
    state for good, so they are kept rare and most elements stay finite to the end.

    Remembered for the next test of the same dtype and seed: nothing writes into a trajectory
    (the references and the variants start from copies)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    grads = []
    for step in range(1, STEPS + 1):
        this_step = []
        for n in SIZES:
            g = (rng.standard_normal(n) * np.exp(rng.uniform(-4, 2, n))).astype(dtype)
            if (n > 1 and step in (5, 20, 35)) or (n == 1 and step == 45):
                where = rng.choice(n, max(1, n // 500), replace=False)
                g[where] = special_values(dtype, rng, where.size)
            this_step.append(g)
        grads.append(this_step)
    return Trajectory(params, grads)


def reference_trajectory(trajectory: Trajectory, state_count: int,
                         step_of: Callable[..., tuple[np.ndarray, ...]]) -> Reference:
    """The peer's trajectory: ``step_of(param, grad, *state, step=k)`` returns the new
    ``(param, *state)``; the state starts at zero (``state_count`` tensors)."""
    states = [(p, *([np.zeros_like(p)] * state_count)) for p in trajectory.params]
    found = []
    for step, grads in enumerate(trajectory.grads, 1):
        states = [step_of(state[0], g, *state[1:], step=step) for state, g in zip(states, grads)]
        found.append(states)
    return found


# -- variants -----------------------------------------------------------------------------------

def require_c(rule: str, openmp: bool = False) -> None:
    """Skip the calling test, saying why, unless this machine builds ``rule``'s C kernels (with
    OpenMP, if asked).

    Call it in the test's body, never in a ``skipif`` condition: pytest evaluates those before
    the session's cache fixture (``conftest._session_cache_dir``) is set up, so the probe's
    build would land in the user's own kernel cache.
    """
    kernel = adamgen.rule(rule).source.c_kernel("float32", frozenset())
    if kernel is None:
        pytest.skip("no C compiler here: the C variants cannot be compared")
    if openmp and not kernel.openmp:
        pytest.skip("the C compiler here has no OpenMP: the threaded variant cannot be compared")


def exact_variants(dtype: np.dtype) -> tuple[str, ...]:
    """The variants that compute a rule with fused multiply-adds exactly: NumPy in float32
    only (it rounds a float32 fma once through float64; it has no wider type for float64),
    serial C and OpenMP C."""
    return (("numpy",) if dtype == np.float32 else ()) + ("c", "c-omp")


@contextmanager
def two_threads() -> Iterator[None]:
    """``ADAMGEN_NUM_THREADS=2`` (the default is the usable cores), then the old setting."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAMGEN_NUM_THREADS", str(THREADS))
        c_kernels.default_threads.cache_clear()
        refresh_environment()
        try:
            yield
        finally:
            patch.undo()
            c_kernels.default_threads.cache_clear()
            refresh_environment()


@contextmanager
def forced(variant: str | None) -> Iterator[Counter[str]]:
    """``ADAMGEN_VARIANT=variant`` (None: unset) for the duration; yields a tally of the
    variants the loader picked."""
    tally: Counter[str] = Counter()
    original = variant_choice.choose

    def spy(*args: Any, **kwargs: Any) -> str:
        chosen = original(*args, **kwargs)
        tally[chosen] += 1
        return chosen

    with pytest.MonkeyPatch.context() as patch:
        if variant is None:
            patch.delenv("ADAMGEN_VARIANT", raising=False)
        else:
            patch.setenv("ADAMGEN_VARIANT", variant)
        patch.setattr(variant_choice, "choose", spy)
        refresh_environment()
        try:
            yield tally
        finally:
            patch.undo()
            refresh_environment()


def assert_variant_ran(tally: Counter[str], variant: str, what: str) -> None:
    """The forced variant served the calls it fits (``c-omp`` fits the sizes >= 4096; the
    others yield to serial C, as ``ADAMGEN_VARIANT`` documents)."""
    assert tally[variant] > 0, f"{what}: {variant} never ran; the loader picked {dict(tally)}"
    assert set(tally) <= {variant, "c"}, f"{what}: forced {variant}, ran {dict(tally)}"


def check_functional(rule: adamgen.Rule, trajectory: Trajectory, reference: Reference,
                     names: tuple[str, ...], hyper: dict[str, float], variant: str | None,
                     label: str) -> Counter[str]:
    """``rule.update`` over every step and size under ``variant`` (``c-omp``: the size it
    threads, :data:`THREADED_SIZE`), each step against the reference, compared once the
    trajectory is done (OpenMP's second thread stays awake between calls close together)."""
    sizes = (THREADED_SIZE,) if variant == "c-omp" else SIZES
    chosen = [SIZES.index(n) for n in sizes]
    states = [(p, *([np.zeros_like(p)] * (len(names) - 1)))
              for p in (trajectory.params[i] for i in chosen)]
    has_step = "step" in rule.interface.hyperparameter_names
    found = []
    with forced(variant) as tally:
        for step, grads in enumerate(trajectory.grads, 1):
            steps = {"step": step} if has_step else {}
            states = [rule.update(state[0], grads[i], *state[1:], **steps, **hyper)
                      for state, i in zip(states, chosen)]
            found.append(states)
    for step, (states, expected) in enumerate(zip(found, reference), 1):
        for n, got, i in zip(sizes, states, chosen):
            assert_state_equal(got, expected[i], names,
                               f"{label} update[{variant}] n={n} step {step}")
    return tally


def check_optimizer(rule: adamgen.Rule, trajectory: Trajectory, reference: Reference,
                    names: tuple[str, ...], hyper: dict[str, float], variant: str | None,
                    label: str) -> Counter[str]:
    """One optimizer over a parameter of every size under ``variant``: odd steps write the
    gradients into ``opt.grads`` and call ``step()``, even steps call ``step(grads)``; the
    state after each step is copied and compared at the end, as in :func:`check_functional`."""
    params = [p.copy() for p in trajectory.params]
    found = []
    with forced(variant) as tally:
        opt = rule.optimizer(params, **hyper)
        for step, grads in enumerate(trajectory.grads, 1):
            if step % 2:
                for owned, g in zip(opt.grads, grads):
                    owned[...] = g
                opt.step()
            else:
                opt.step(grads)
            found.append([(p.copy(), *(opt.state[name][i].copy() for name in names[1:]))
                          for i, p in enumerate(params)])
    assert opt.step_count == STEPS
    for step, (states, expected) in enumerate(zip(found, reference), 1):
        for n, got, want in zip(SIZES, states, expected):
            assert_state_equal(got, want, names, f"{label} optimizer[{variant}] n={n} "
                                                 f"step {step}")
    return tally


def check_every_variant(rule: adamgen.Rule, trajectory: Trajectory, reference: Reference,
                        names: tuple[str, ...], hyper: dict[str, float],
                        variants: tuple[str, ...], label: str) -> None:
    """:func:`check_functional` and :func:`check_optimizer` under each of ``variants``, each
    proven to have run."""
    for variant in variants:
        for check, form in ((check_functional, "update"), (check_optimizer, "optimizer")):
            tally = check(rule, trajectory, reference, names, hyper, variant, label)
            assert_variant_ran(tally, variant, f"{label} {form}")
