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
    import numpy as np

    from .config import environment
    from .runtime import kernels

    env = environment()
    from .spec import adam_spec  # info is not the hot path; the spec hash needs SymPy

    print(f"adamgen {__version__}")
    print(f"spec:        adam, hash {adam_spec().spec_hash}")
    print(f"python:      {sys.version.split()[0]}   numpy: {np.__version__}")
    print(f"mode:        {env.mode} (ADAMGEN_MODE)")
    print("backends:    numpy (float16, float32, float64, mixed dtypes)")
    cache = kernels.kernel_cache()
    print(f"cache:       {cache.root}")
    summary = cache.info()
    print(f"             {summary.get('count', 0)} entries, {summary.get('size_bytes', 0)} bytes")
    return 0


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


def _verify(args: argparse.Namespace) -> int:
    from .theorems import run_cli

    return run_cli(args.verify_args)


def _generate(args: argparse.Namespace) -> int:
    from .codegen.package import generate

    def progress(message: str) -> None:
        print(f"adamgen generate: {message}", file=sys.stderr, flush=True)

    generate(args.out, args.name, dtypes=args.dtype, constants=args.const, mode=args.mode,
             progress=progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamgen", description="Generate, verify and load Adam update kernels.")
    parser.add_argument("--version", action="version", version=f"adamgen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="version, spec hash, backends and cache")
    info.set_defaults(run=_info)

    cache = commands.add_parser("cache", help="show or clear the kernel cache")
    cache.add_argument("action", choices=("info", "clear"))
    cache.set_defaults(run=_cache)

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
