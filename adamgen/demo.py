"""``adamgen demo``: the whole pipeline on this machine, in about a minute, with visible progress.

1. build (or fetch from the cache) the float32 and float64 kernels, NumPy and C, timed;
2. prove the kernels equal the spec, and Adam's properties (``adamgen verify``);
3. let the loader measure its variants at a few sizes, and print what it chose;
4. train the MLP example (``examples/train_mlp.py``) on scikit-learn's bundled digits.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import time
from collections.abc import Callable

import numpy as np

from ._resources import example_path


def _section(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def _timed(label: str, work: Callable[[], object]) -> object:
    print(f"  {label} ...", end="", flush=True)
    start = time.perf_counter()
    result = work()
    print(f" {time.perf_counter() - start:.2f} s", flush=True)
    return result


def build_kernels() -> None:
    from .runtime import c_kernels, numpy_kernels
    from .runtime.ivy import ivy_source

    source = ivy_source()
    for dtype in ("float32", "float64"):
        for aliases, form in ((frozenset(), "functional"),
                              (frozenset({("w_new", "w")}), "in place")):
            _timed(f"numpy {dtype} {form}",
                   functools.partial(source.numpy_module, dtype, aliases=aliases))
        for scalars in (frozenset({"lr"}), frozenset()):
            label = f"c {dtype} ({'scalar' if scalars else 'array'} lr)"
            kernel = _timed(label, functools.partial(source.c_kernel, dtype, scalars))
            if kernel is None:
                print("  C is unavailable here: NumPy serves every call")
                return
    for event in numpy_kernels.EVENTS + c_kernels.EVENTS:
        how = "compiled" if event.get("built") else "fetched from the cache"
        print(f"  {event.get('kernel')}: {how}")


def measure_variants() -> None:
    import adamgen

    from .runtime import variant_choice

    rng = np.random.default_rng(0)
    for n in (1_000, 100_000, 3_000_000):
        w, g, m = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
        _timed(f"adam_update on {n:>9,} float32 elements (first call measures)",
               functools.partial(adamgen.adam_update, w, g, 1e-3, m, np.abs(g), 1))
    params = [rng.standard_normal(4096).astype(np.float32) for _ in range(500)]
    opt = adamgen.Adam(params)
    _timed("Adam.step over 500 tensors x 4096 (first step measures)", opt.step)
    print(f"\n  {'problem':<44} {'size':>9} {'winner':>7}  median per variant")
    for d in variant_choice.decisions():
        times = ", ".join(f"{k} {v * 1e6:,.0f} us" for k, v in sorted(d.seconds.items()))
        print(f"  {d.problem:<44} {'<2^' + str(d.bucket):>9} {d.winner:>7}  {times}")


def train(epochs: int) -> float:
    path = example_path("train_mlp.py")
    spec = importlib.util.spec_from_file_location("adamgen_example_train_mlp", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return float(module.train(epochs=epochs, log=lambda line: print(f"  {line}", flush=True)))


def main(epochs: int = 20, with_verify: bool = True) -> int:
    start = time.perf_counter()
    _section("1. kernels: spec -> IR -> NumPy and C (compiled once, then cached)")
    build_kernels()
    status = 0
    if with_verify:
        _section("2. adamgen verify: the kernels equal the spec; Adam's properties hold")
        from .theorems import print_report, verify

        status = print_report(verify(), verbose=False)
    _section("3. the loader measures its variants (exact variants agree to the last bit)")
    measure_variants()
    _section("4. training an MLP on the digits with adamgen.Adam")
    try:
        accuracy = train(epochs)
    except SystemExit as missing:  # the example explains what to install
        print(f"  skipped: {missing}")
    else:
        print(f"  test accuracy {accuracy:.2%}")
    print(f"\ndemo finished in {time.perf_counter() - start:.1f} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
