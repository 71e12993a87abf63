"""The ``adamgen`` command line: one subcommand per job, each a thin call into the package.

Generation-time imports (SymPy, Jinja) happen inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._version import __version__


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamgen", description="Generate, verify and load Adam update kernels.")
    parser.add_argument("--version", action="version", version=f"adamgen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="version, spec hash, backends and cache")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
