"""The ``adamgen`` command line: one subcommand per job, each a thin call into the package.

Generation-time imports (SymPy, Jinja) happen inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._version import __version__
from .errors import AdamgenError


def _info(args: argparse.Namespace) -> int:
    from .info import main as info

    return info(build=args.build, every=args.all)


def _cache(args: argparse.Namespace) -> int:
    from .runtime.kernels import kernel_cache

    cache = kernel_cache()
    if args.action == "clear":
        removed = cache.clear()
        print(f"removed {removed} entries from {cache.root}")
        return 0
    summary = cache.info()
    print(f"cache:    {summary['root']} (schema {summary.get('schema')})")
    print(f"entries:  {summary['count']}, {summary['size_bytes'] / 1e6:.2f} MB")
    for kind, count in sorted(summary.get("per_kind", {}).items()):
        print(f"  {kind:<10} {count}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Run ``benchmarks/run.py`` of the source checkout (the suite and its peers are not part
    of the installed package): the one next to this package, else the one in the current
    directory."""
    import subprocess
    from pathlib import Path

    from ._resources import PACKAGE_DIR

    for root in (PACKAGE_DIR.parent, Path.cwd()):
        if (root / "benchmarks" / "run.py").is_file():
            return subprocess.call([sys.executable, "-m", "benchmarks.run", *args.bench_args],
                                   cwd=root)
    print("adamgen bench: error: the benchmark suite lives in the source checkout "
          "(benchmarks/); run this command from a clone of adamgen", file=sys.stderr)
    return 2


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo

    return demo(epochs=args.epochs, with_verify=not args.no_verify)


def _verify(args: argparse.Namespace) -> int:
    from .theorems import run_cli

    return run_cli(args.verify_args)


def _generate(args: argparse.Namespace) -> int:
    from .codegen.package import generate

    def progress(message: str) -> None:
        print(f"adamgen generate: {message}", file=sys.stderr, flush=True)

    generate(args.out, args.name, dtypes=args.dtype, constants=args.const, mode=args.mode,
             portable=args.portable, with_c=not args.numpy_only, progress=progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamgen", description="Generate, verify and load Adam update kernels.")
    parser.add_argument("--version", action="version", version=f"adamgen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="version, spec hash, backends, cache and variants")
    info.add_argument("--build", action="store_true",
                      help="build (or fetch) the float32 and float64 kernels first")
    info.add_argument("--all", action="store_true",
                      help="list every variant the loader chose, with its timings (default: "
                           "one line per kernel)")
    info.set_defaults(run=_info)

    cache = commands.add_parser("cache", help="show or clear the kernel cache")
    cache.add_argument("action", choices=("info", "clear"))
    cache.set_defaults(run=_cache)

    bench = commands.add_parser(
        "bench", help="benchmarks against the peers and the bandwidth roofline (--quick, ...)",
        add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)

    demo = commands.add_parser("demo", help="build, verify, measure and train: the whole tour")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    demo.add_argument("--no-verify", action="store_true", help="skip the symbolic proofs")
    demo.set_defaults(run=_demo)

    verify = commands.add_parser(
        "verify", help="prove the kernels equal the spec and Adam's properties (SymPy)",
        add_help=False)
    verify.add_argument("verify_args", nargs=argparse.REMAINDER)
    verify.set_defaults(run=_verify)

    gen = commands.add_parser("generate", help="write an importable package of kernels")
    gen.add_argument("--out", required=True, help="directory to write the package into")
    gen.add_argument("--name", required=True, help="the package's name (a Python identifier)")
    gen.add_argument("--dtype", default="float32,float64",
                     help="comma-separated dtypes to specialise (default: float32,float64)")
    gen.add_argument("--const", default="",
                     help="hyperparameters to bake in, e.g. beta1=0.9,beta2=0.999,epsilon=1e-7")
    gen.add_argument("--mode", default="exact", choices=("exact", "fast"),
                     help="exact (bit-identical to Ivy, default) or fast")
    gen.add_argument("--portable", action="store_true",
                     help="compile without -march=native, for other machines of this kind")
    gen.add_argument("--numpy-only", action="store_true", help="generate no C kernels")
    gen.set_defaults(run=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except AdamgenError as error:  # our errors are messages for the user, not tracebacks
        print(f"adamgen {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
