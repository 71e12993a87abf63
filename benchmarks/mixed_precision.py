"""bfloat16 parameters in adamgen.torch's mixed-precision modes, side by side in one run.

    python -m benchmarks.mixed_precision [--quick] [--rounds 9] [--size 1e7] [--json out.json]

One bfloat16 parameter of ``--size`` elements (1e7 by default), at 1 and 2 threads
(``torch.set_num_threads``, which adamgen follows), interleaved (medians of undisturbed samples,
see :mod:`benchmarks.timing`):

* ``adamgen master``: ``adamgen.torch.AdamW(master_weights=True)``: float32 master and state;
* ``adamgen stochastic``: ``stochastic_rounding=True``, the same with the parameter rounded
  stochastically (ARS-7 bits for every element);
* ``adamgen torch-compatible``: the default mode, bfloat16 state and torch's per-op rounding;
* ``torch AdamW fused``: ``torch.optim.AdamW(fused=True)`` on the same bfloat16 parameter
  (its state is bfloat16);
* ``probe``: a plain C loop with the master-weight mode's traffic, on the optimizer's own
  memory: read the bfloat16 gradient and the float32 master, m and v; write master, m, v and
  the bfloat16 parameter (26 bytes an element, plus the parameter's write-allocate read, which
  adamgen's kernel pays alike).

The figures that matter (docs/mixed-precision.md): probe / master (target >= 0.9), fused /
master (target >= 1.3) and stochastic / master (the cost of stochastic rounding, target
<= 1.15).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import adamgen.torch as agt
from adamgen import cache as artifact_cache
from adamgen.codegen import build

from .load import CapacityCheck, wait_until_quiet
from .probe import build_probe
from .timing import Contender, measure

KIND = "bench-mixed-probe"
_SOURCE = """
/* adamgen benchmark: the master-weight mode's traffic (bf16 grad, f32 master/m/v in; f32
 * master/m/v, bf16 param out). */
#include <stdint.h>
#include <string.h>

static inline float load_bf16(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static inline uint16_t store_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (uint16_t)(bits >> 16);
}

static void chunk(uint16_t *restrict p, const uint16_t *restrict g, float *restrict w,
                  float *restrict m, float *restrict v, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
        const float gi = load_bf16(g[i]);
        m[i] = 0.5f * m[i] + gi;
        v[i] = 0.5f * v[i] + gi * gi;
        const float wi = w[i] - 0.001f * gi;
        w[i] = wi;
        p[i] = store_bf16(wi);
    }
}

void mixed_probe(uint16_t *p, const uint16_t *g, float *w, float *m, float *v, int64_t n,
                 int nthreads) {
    if (nthreads <= 1) {
        chunk(p, g, w, m, v, 0, n);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int part = 0; part < nthreads; ++part) {
        const int64_t begin = (n / nthreads) * part / 64 * 64;
        const int64_t end = part == nthreads - 1 ? n : (n / nthreads) * (part + 1) / 64 * 64;
        chunk(p, g, w, m, v, begin, end);
    }
}
"""
_CDEF = ("void mixed_probe(uint16_t *p, const uint16_t *g, float *w, float *m, float *v, "
         "int64_t n, int nthreads);\n")


@dataclass(frozen=True)
class MixedProbe:
    """The compiled probe (built and cached with adamgen's own machinery and flags)."""

    module: Any

    def bind(self, param: torch.Tensor, grad: torch.Tensor, master: torch.Tensor,
             exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, threads: int) -> Callable[[], None]:
        ffi, function = self.module.ffi, self.module.lib.mixed_probe
        args = [ffi.cast(f"{c} *", t.data_ptr()) for c, t in
                (("uint16_t", param), ("uint16_t", grad), ("float", master), ("float", exp_avg),
                 ("float", exp_avg_sq))]
        n = param.numel()
        return lambda: function(*args, n, threads)


def build_mixed_probe() -> MixedProbe:
    from adamgen.runtime.kernel_store import kernel_cache

    info = build.probe_compiler()
    flags = build.compile_flags("exact", openmp=info.openmp, portable=False)
    digest = hashlib.sha256((_SOURCE + "\0" + _CDEF).encode()).hexdigest()
    key = artifact_cache.cache_key(build.key_fields(digest, flags, {"artifact": KIND}))
    name = build.extension_module_name(key, prefix="_adamgen_bench_mixed_")

    def compile_into(directory: Any) -> dict[str, str]:
        so_path = build.compile_extension(name, _SOURCE, _CDEF, directory, flags)
        return {"module": name, "so_file": so_path.name}

    entry = kernel_cache().get_or_build(KIND, key, compile_into)
    module = build.load_extension(Path(entry.path) / entry.manifest["so_file"], name)
    return MixedProbe(module)


def parameter(size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    p = torch.randn(size, generator=generator).to(torch.bfloat16).requires_grad_()
    p.grad = (torch.randn(size, generator=generator) * 1e-2).to(torch.bfloat16)
    return p


def threaded(threads: int) -> Callable[[], None]:
    return lambda: torch.set_num_threads(threads)


def large(check: CapacityCheck, rounds: int, size: int) -> dict[str, Any]:
    probe = build_mixed_probe()
    master = parameter(size)
    optimizers = {
        "adamgen master": agt.AdamW([master], master_weights=True),
        "adamgen stochastic": agt.AdamW([parameter(size)], stochastic_rounding=True),
        "adamgen torch-compatible": agt.AdamW([parameter(size)]),
        "torch AdamW fused": torch.optim.AdamW([parameter(size)], fused=True),
    }
    for optimizer in optimizers.values():
        optimizer.step()
    state = optimizers["adamgen master"].state[master]
    grad = master.grad
    assert grad is not None
    found: dict[str, Any] = {}
    for threads in (1, 2):
        enter = threaded(threads)
        contenders = [Contender(name, "adamgen" if name.startswith("adamgen") else "peer",
                                optimizer.step, enter)
                      for name, optimizer in optimizers.items()]
        contenders.append(Contender("probe", "probe", probe.bind(
            master.detach(), grad, state["master_param"], state["exp_avg"], state["exp_avg_sq"],
            threads)))
        results = measure(contenders, rounds=rounds, target_seconds=0.1, warm_seconds=0.0,
                          check=check)
        seconds = {r.name: r.seconds for r in results}
        found[f"{size:.0e} elements, {threads} thread(s)"] = {
            "rows": [{"name": r.name, "seconds": r.seconds, "clean": r.clean,
                      "of": len(r.samples), "error": r.error} for r in results],
            "probe / master": seconds["probe"] / seconds["adamgen master"],
            "fused / master": seconds["torch AdamW fused"] / seconds["adamgen master"],
            "stochastic / master": seconds["adamgen stochastic"] / seconds["adamgen master"],
        }
    return found


def show(found: dict[str, Any]) -> None:
    for case, table in found.items():
        print(f"### {case}")
        for row in table["rows"]:
            print(f"  {row['name']:<26} {row['seconds'] * 1e3:9.3f} ms   ({row['clean']}/"
                  f"{row['of']} clean) {row['error']}")
        print(f"  probe / master {table['probe / master']:.3f} (target >= 0.9)   fused / master "
              f"{table['fused / master']:.2f} (target >= 1.3)   stochastic / master "
              f"{table['stochastic / master']:.3f} (target <= 1.15)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1e6 elements")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--size", type=float, default=None, help="elements (default 1e7)")
    parser.add_argument("--json", default=None, help="write the figures here ('-': stdout)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for a quiet machine")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 9)
    size = int(args.size or (1e6 if args.quick else 1e7))
    check = CapacityCheck(build_probe().spin, threads=2)
    results: dict[str, Any] = {"torch": torch.__version__, "cores": os.cpu_count()}
    if args.wait_quiet:
        waited, load = wait_until_quiet(args.wait_quiet)
        results["foreign load"] = {"waited": waited, "load": load}
    results["large"] = large(check, rounds, size)
    if args.json == "-":
        print("\n#json\n" + json.dumps(results))
    else:
        show(results["large"])
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
