"""The ``adamgen`` command line: one subcommand per job, each a thin call into the package.

Generation-time imports (SymPy, Jinja) happen inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from ._version import __version__
from .errors import AdamgenError, ArgumentValueError


def _info(args: argparse.Namespace) -> int:
    from .info import main as info

    return info(build=args.build, every=args.all, rules=args.rule)


def _cache(args: argparse.Namespace) -> int:
    from .runtime.kernel_store import kernel_cache

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


def _benchmark_suite() -> ModuleType:
    """The benchmark suite's entry module: ``adamgen.benchmarks.run`` as installed with adamgen,
    else ``benchmarks/run.py`` of the source checkout this package was imported from."""
    import importlib

    from ._resources import PACKAGE_DIR

    try:
        return importlib.import_module("adamgen.benchmarks.run")
    except ModuleNotFoundError as error:
        if error.name not in ("adamgen.benchmarks", "adamgen.benchmarks.run"):
            raise  # the suite is there but one of its own imports is not
    checkout = PACKAGE_DIR.parent
    if not (checkout / "benchmarks" / "run.py").is_file():
        raise AdamgenError("the benchmark suite (adamgen.benchmarks) is missing from this "
                           "installation; reinstall adamgen")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))  # a checkout: the suite is its top-level package
    return importlib.import_module("benchmarks.run")


def _bench(args: argparse.Namespace) -> int:
    """The suite parses its own options (it also runs as ``python -m benchmarks.run``), so
    everything after ``bench`` is handed to it, ``--help`` included."""
    forwarded = list(args.forwarded)
    if forwarded[:1] == ["--"]:
        forwarded = forwarded[1:]
    return int(_benchmark_suite().main(forwarded, prog="adamgen bench"))


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo

    return demo(epochs=args.epochs, with_verify=not args.no_verify)


def _verify(args: argparse.Namespace) -> int:
    from .theorems import print_report, verify_rules

    constants = None if args.const is None else tuple(args.const)
    if args.option and not args.rule:
        from .rules import BUILTINS

        raise ArgumentValueError("--option selects a variant of the rules --rule names; name "
                                 f"one (the rules: {', '.join(BUILTINS)})")
    try:
        results = verify_rules(args.rule, constants=constants, only=args.only,
                               options=dict(args.option or ()))
    except ValueError as error:
        raise ArgumentValueError(str(error)) from None
    return print_report(results, verbose=not args.quiet, strict=args.strict)


def _rule(args: argparse.Namespace) -> Any:
    """The rule ``--rule`` and ``--option`` name (errors list the valid names and options)."""
    from .runtime.rule import rule

    return rule(args.rule, **dict(args.option or ()))


def _generate(args: argparse.Namespace) -> int:
    def progress(message: str) -> None:
        print(f"adamgen generate: {message}", file=sys.stderr, flush=True)

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ArgumentValueError(f"--out {args.out} is a file; expected a directory to write "
                                 "the package into")
    try:
        out.mkdir(parents=True, exist_ok=True)
        _rule(args).generate(out, args.name, dtypes=args.dtype, constants=args.const,
                             mode=args.mode, portable=args.portable,
                             with_c=not args.numpy_only, progress=progress)
    except OSError as error:
        written = Path(error.filename or "").absolute()
        if error.filename is None or not (written == out.absolute()
                                          or out.absolute() in written.parents):
            raise  # not about the output directory: a real bug, keep its traceback
        raise ArgumentValueError(f"--out {args.out}: cannot write the package there "
                                 f"({error.strerror}: {error.filename})") from None
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _option(text: str) -> tuple[str, Any]:
    """``amsgrad=1`` -> ``("amsgrad", True)``; ``lr_dtype=float32`` -> ``("lr_dtype", "float32")``
    (the rule checks the name and the value)."""
    name, equals, value = text.partition("=")
    if not (name.strip() and equals and value.strip()):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    return name.strip(), words.get(value.strip().lower(), value.strip())


def _constants(text: str) -> list[tuple[str, float]]:
    """``beta1=0.9,epsilon=0`` -> ``[("beta1", 0.9), ("epsilon", 0.0)]``."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        name, equals, value = item.partition("=")
        try:
            if not (name.strip() and equals):
                raise ValueError
            pairs.append((name.strip(), float(value)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected NAME=VALUE with a float VALUE, got {item!r}") from None
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamgen",
        description="Generate, verify and load optimizer update kernels (Adam, AdamW, Lion, "
                    "your own rules).")
    parser.add_argument("--version", action="version", version=f"adamgen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="version, spec hash, backends, cache and variants")
    info.add_argument("--rule", action="append", default=[], metavar="NAME",
                      help="report this built-in rule only (repeatable; default: every rule, "
                           "built-in or seen in the cache)")
    info.add_argument("--build", action="store_true",
                      help="build (or fetch) the float32 and float64 kernels first (of the "
                           "--rule rules; default: ivy_adam)")
    info.add_argument("--all", action="store_true",
                      help="list every variant the loader chose, with its timings (default: "
                           "one line per kernel)")
    info.set_defaults(run=_info)

    cache = commands.add_parser("cache", help="show or clear the kernel cache")
    cache.add_argument("action", choices=("info", "clear"))
    cache.set_defaults(run=_cache)

    bench = commands.add_parser(
        "bench", add_help=False,
        help="every built-in rule against its peer and the bandwidth roofline (--rule NAME: "
             "one rule; bench --help: options)")
    bench.set_defaults(run=_bench, forwards=True)

    demo = commands.add_parser("demo", help="build, verify, measure and train: the whole tour")
    demo.add_argument("--epochs", type=_positive_int, default=20,
                      help="training epochs, >= 1 (default 20)")
    demo.add_argument("--no-verify", action="store_true", help="skip the symbolic proofs")
    demo.set_defaults(run=_demo)

    verify = commands.add_parser(
        "verify", help="prove the kernels equal each rule's spec, and its properties (SymPy)",
        description="Prove the kernels equal each rule's spec, and the rule's own theorems, "
                    "with SymPy. Every built-in rule by default. Exit status 1 if a theorem "
                    "fails.")
    verify.add_argument("--rule", action="append", default=[], metavar="NAME",
                        help="verify this built-in rule (repeatable; default: every rule)")
    verify.add_argument("--option", action="append", type=_option, metavar="NAME=VALUE",
                        help="an option of the --rule rules, e.g. amsgrad=1 (repeatable; "
                             "default: each rule's defaults)")
    verify.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run the theorems whose name contains TEXT (repeatable)")
    verify.add_argument("--const", action="extend", type=_constants, default=None,
                        metavar="NAME=VALUE[,...]",
                        help="hyperparameters baked in for the --const check (repeatable; "
                             "default: each rule's defaults)")
    verify.add_argument("--strict", action="store_true", help="exit 1 on UNPROVEN too")
    verify.add_argument("--quiet", action="store_true",
                        help="print the details of theorems not proven only")
    verify.set_defaults(run=_verify)

    gen = commands.add_parser("generate", help="write an importable package of kernels")
    gen.add_argument("--rule", default="ivy_adam", metavar="NAME",
                     help="the built-in rule (default: ivy_adam; `adamgen info` lists them)")
    gen.add_argument("--option", action="append", type=_option, metavar="NAME=VALUE",
                     help="an option of the rule, e.g. amsgrad=1 (repeatable)")
    gen.add_argument("--out", required=True, help="directory to write the package into")
    gen.add_argument("--name", required=True, help="the package's name (a Python identifier)")
    gen.add_argument("--dtype", default="float32,float64",
                     help="comma-separated dtypes to specialise (default: float32,float64)")
    gen.add_argument("--const", default="",
                     help="hyperparameters to bake in, e.g. beta1=0.9,beta2=0.999,epsilon=1e-7")
    gen.add_argument("--mode", default="exact", choices=("exact", "fast"),
                     help="exact (bit-identical to the rule's reference, default) or fast")
    gen.add_argument("--portable", action="store_true",
                     help="compile without -march=native, for other machines of this kind")
    gen.add_argument("--numpy-only", action="store_true", help="generate no C kernels")
    gen.set_defaults(run=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; exit status 2 with one line on stderr for a user's mistake."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "forwards", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.forwarded = extra
    try:
        return int(args.run(args) or 0)
    except AdamgenError as error:  # our errors are messages for the user, not tracebacks
        print(f"adamgen {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
