"""End to end: the ``adamgen`` command line in fresh processes, every subcommand with ``--help`` and
with each documented option; mistakes end with one line on stderr and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adamgen.rules import BUILTINS

REPO = Path(__file__).resolve().parents[1]
#: Every subcommand and the options its ``--help`` must list.
OPTIONS = {
    "info": ["--rule", "--build", "--all"],
    "cache": ["{info,clear}"],
    "bench": ["--quick", "--out", "--sizes", "--dtypes", "--threads", "--rounds",
              "--wait-quiet", "--no-forced", "--render", "--rule", "--rule-sizes"],
    "demo": ["--epochs", "--no-verify"],
    "verify": ["--rule", "--option", "--only", "--const", "--strict", "--quiet"],
    "generate": ["--rule", "--option", "--out", "--name", "--dtype", "--const", "--mode",
                 "--portable", "--numpy-only"],
}


def adamgen_cli(*args: str, cache: Path | None = None, cwd: Path | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m adamgen ARGS`` with this checkout's adamgen, in ``cwd``; ``cache`` replaces
    the session's cache directory."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if cache is not None:
        env["ADAMGEN_CACHE_DIR"] = str(cache)
    env.pop("ADAMGEN_VARIANT", None)
    return subprocess.run([sys.executable, "-m", "adamgen", *args], env=env, cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def assert_usage_error(run: subprocess.CompletedProcess, *expected: str) -> None:
    """Status 2, no traceback, and an error line naming what was wrong."""
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    error = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert len(error) == 1, run.stderr
    for text in expected:
        assert text in error[0], (text, error[0])


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_every_subcommand_explains_its_options(command):
    run = adamgen_cli(command, "--help")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: adamgen {command}"), run.stdout[:200]
    for option in OPTIONS[command]:
        assert option in run.stdout, (option, run.stdout)


def test_top_level_help_and_version():
    run = adamgen_cli("--help")
    assert run.returncode == 0 and all(command in run.stdout for command in OPTIONS)
    version = adamgen_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("adamgen ")


def test_unknown_option_of_a_subcommand_is_a_usage_error():
    assert_usage_error(adamgen_cli("info", "--bogus"), "unrecognized arguments: --bogus")
    assert_usage_error(adamgen_cli("bench", "--bogus"), "adamgen bench: error:", "--bogus")
    assert_usage_error(adamgen_cli("verify", "--bogus"), "unrecognized arguments: --bogus")


def test_demo_builds_verifies_measures_and_trains(tmp_path):
    pytest.importorskip("sklearn")
    run = adamgen_cli("demo", "--epochs", "2", cache=tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for expected in ("1. kernels", "numpy float32 functional", "c float32", "compiled",
                     "PROVED", "winner", "multi-tensor", "epoch   2/2", "test accuracy",
                     "demo finished"):
        assert expected in out, (expected, out)
    again = adamgen_cli("demo", "--epochs", "1", "--no-verify", cache=tmp_path / "cache")
    assert again.returncode == 0 and "fetched from the cache" in again.stdout
    assert "PROVED" not in again.stdout


@pytest.mark.parametrize("epochs", ["-3", "0", "two"])
def test_demo_rejects_epochs_below_one(epochs):
    assert_usage_error(adamgen_cli("demo", "--epochs", epochs), "argument --epochs",
                       "expected an integer >= 1")


def test_verify_exit_status_and_table():
    """With no --rule, every built-in rule is verified: the generic IR == spec theorems and
    each rule's own."""
    run = adamgen_cli("verify")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failed" in run.stdout and "moment recurrences" in run.stdout
    assert any(line.startswith("    ") for line in run.stdout.splitlines())  # the details
    for rule in BUILTINS:
        assert f"{rule}: IR == spec [{rule}" in run.stdout, rule
        assert any(line.startswith(f"{rule}: ") and "IR == spec" not in line
                   for line in run.stdout.splitlines()), f"{rule}: no theorem of its own"


def test_verify_a_rule_with_options():
    run = adamgen_cli("verify", "--rule", "torch_adamw", "--option", "amsgrad=1",
                      "--option", "maximize=yes", "--quiet", "--strict")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "amsgrad: max_exp_avg_sq never decreases" in run.stdout
    assert "torch_adamw(amsgrad=True, maximize=True" in run.stdout
    assert "0 failed, 0 unproven" in run.stdout
    assert_usage_error(adamgen_cli("verify", "--option", "amsgrad=1"),
                       "--option", "--rule", "ivy_adam, torch_adam, torch_adamw, lion")
    assert_usage_error(adamgen_cli("verify", "--rule", "lion", "--option", "amsgrad=1"),
                       "rule 'lion' has no option 'amsgrad'; its options: none")
    assert_usage_error(adamgen_cli("verify", "--rule", "torch_adam", "--option",
                                   "lr_dtype=float16"),
                       "lr_dtype", "must be one of 'float64', 'float32'")
    assert_usage_error(adamgen_cli("verify", "--rule", "adam"),
                       "no built-in rule 'adam'", "ivy_adam, torch_adam, torch_adamw, lion")


def test_every_option_of_every_builtin_rule_verifies():
    """What ``adamgen verify --rule NAME --option ...`` runs, for every combination (in
    process: one SymPy import for all)."""
    import itertools

    from adamgen.theorems import FAILED, UNPROVEN, verify_rules

    for rule in BUILTINS.values():
        for values in itertools.product(*(o.choices for o in rule.options)):
            options = {o.name: v for o, v in zip(rule.options, values)}
            results = verify_rules([rule.name], options=options)
            assert results, (rule.name, options)
            bad = [r for r in results if r.status in (FAILED, UNPROVEN)]
            assert not bad, (rule.name, options, bad)


def test_verify_options():
    quiet = adamgen_cli("verify", "--quiet", "--strict")
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert "0 failed, 0 unproven" in quiet.stdout
    assert not any(line.startswith("    ") for line in quiet.stdout.splitlines())
    only = adamgen_cli("verify", "--only", "moment", "--only", "bias")
    assert only.returncode == 0 and "2 proved, 0 failed" in only.stdout
    assert "moment recurrences" in only.stdout
    const = adamgen_cli("verify", "--only", "const", "--const", "beta1=0.5",
                        "--const", "epsilon=0", "--quiet")
    assert const.returncode == 0 and "const(beta1=0.5,epsilon=0.0)" in const.stdout
    listed = adamgen_cli("verify", "--only", "const", "--const", "beta1=0.5,epsilon=0")
    assert listed.returncode == 0 and "const(beta1=0.5,epsilon=0.0)" in listed.stdout
    assert_usage_error(adamgen_cli("verify", "--const", "beta1"), "argument --const",
                       "NAME=VALUE", "'beta1'")


def test_info_and_cache(tmp_path):
    cache = tmp_path / "cache"
    empty = adamgen_cli("info", cache=cache)
    assert empty.returncode == 0 and "none yet" in empty.stdout
    built = adamgen_cli("info", "--build", cache=cache)
    assert built.returncode == 0, built.stderr
    assert "built or fetched by this process" in built.stdout and "compiled in" in built.stdout
    assert "winner by size" in built.stdout
    every = adamgen_cli("info", "--all", cache=cache)
    assert every.returncode == 0 and " us (cache dir)" in every.stdout
    info = adamgen_cli("cache", "info", cache=cache)
    assert info.returncode == 0 and "entries:" in info.stdout and "c-kernel" in info.stdout
    cleared = adamgen_cli("cache", "clear", cache=cache)
    assert cleared.returncode == 0 and "removed" in cleared.stdout
    assert "entries:  0" in adamgen_cli("cache", "info", cache=cache).stdout


def test_bad_environment_is_a_clear_error_not_a_traceback(tmp_path):
    env = {**os.environ, "ADAMGEN_CACHE_DIR": str(tmp_path), "ADAMGEN_MODE": "slow"}
    run = subprocess.run([sys.executable, "-m", "adamgen", "info"], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 2
    assert "ADAMGEN_MODE" in run.stderr and "exact, fast" in run.stderr
    assert "Traceback" not in run.stderr


def test_generate_with_every_option(tmp_path):
    run = adamgen_cli("generate", "--out", str(tmp_path / "out"), "--name", "adam_fast",
                      "--dtype", "float32", "--const", "beta1=0.9,epsilon=1e-7",
                      "--mode", "fast", "--numpy-only")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "adam_fast" / "__init__.py").is_file()
    portable = adamgen_cli("generate", "--out", str(tmp_path / "out"), "--name", "adam64",
                           "--dtype", "float64", "--portable")
    assert portable.returncode == 0, portable.stderr
    script = ("import adam_fast, adam64, numpy as np; x = np.ones(3); f = x.astype('f4'); "
              "print(adam_fast.adam_update(f, f, 0.1, f, f, 1)[0].dtype, "
              "adam64.adam_update(x, x, 0.1, x, x, 1)[0].dtype)")
    check = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path / "out", capture_output=True, text=True,
        timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "out"), str(REPO)])})
    assert check.returncode == 0 and check.stdout.split() == ["float32", "float64"], check.stderr


def test_generate_into_an_unwritable_place_is_one_line_and_status_2(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    assert_usage_error(adamgen_cli("generate", "--out", "/proc/nope", "--name", "x"),
                       "--out /proc/nope", "cannot write the package there")
    assert_usage_error(adamgen_cli("generate", "--out", str(a_file), "--name", "x"),
                       f"--out {a_file} is a file")
    assert_usage_error(adamgen_cli("generate", "--out", str(a_file / "sub"), "--name", "x"),
                       f"--out {a_file / 'sub'}", "Not a directory")
    assert a_file.read_text() == "not a directory"


def test_bench_options_from_a_checkout(tmp_path):
    """Every option of ``adamgen bench`` on the smallest run (the suite comes from this checkout;
    tests/test_benchmarks.py runs ``--quick`` whole from an installed wheel)."""
    out, again = tmp_path / "run", tmp_path / "rendered"
    run = adamgen_cli("bench", "--quick", "--sizes", "16", "--dtypes", "float32",
                      "--threads", "1", "--rounds", "1", "--wait-quiet", "0", "--no-forced",
                      "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    plan = results["plan"]
    assert (plan["sizes"], plan["dtypes"], plan["threads"], plan["rounds"], plan["forced"]) == (
        [16], ["float32"], [1], 1, False)
    assert results["command"].startswith("adamgen bench --quick --sizes 16")
    assert "threads" in run.stdout and str(out / "report.md") in run.stdout
    rendered = adamgen_cli("bench", "--", "--render", str(out / "results.json"),
                           "--out", str(again), cwd=tmp_path)
    assert rendered.returncode == 0, rendered.stderr
    assert (again / "report.md").read_text() == (out / "report.md").read_text()
    assert_usage_error(adamgen_cli("bench", "--sizes", "0", cwd=tmp_path), "--sizes")


def test_bench_rule_options_select_the_rule_and_its_sizes(tmp_path):
    """``--rule`` and ``--rule-sizes`` on the smallest run: only that rule's in-place rows, at
    those sizes, against its probe and its peer (lion-pytorch when installed)."""
    out = tmp_path / "run"
    run = adamgen_cli("bench", "--quick", "--threads", "1", "--rounds", "1", "--wait-quiet", "0",
                      "--no-forced", "--rule", "lion", "--rule-sizes", "1e3", "--out", str(out),
                      cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    plan = json.loads((out / "results.json").read_text())["plan"]
    assert (plan["rules"], plan["rule_sizes"]) == (["lion"], [1000])
    rows = [line.split() for line in run.stdout.splitlines() if line.strip().startswith("lion")]
    assert rows and all(row[1] == "1" for row in rows) and ["1e+03"] in [row[2:3] for row in rows]
    assert not any(line.strip().startswith(("ivy_adam", "torch_adam")) for line in
                   run.stdout.splitlines())
    assert_usage_error(adamgen_cli("bench", "--rule", "nope", cwd=tmp_path), "nope")


#: One generation per built-in rule, with options and constants of its own.
GENERATED = {
    "ivy_rule": ("ivy_adam", [], "beta1=0.9,epsilon=1e-7"),
    "tadam": ("torch_adam", ["amsgrad=1"], "beta1=0.9,weight_decay=0"),
    "tadamw": ("torch_adamw", ["amsgrad=1", "maximize=true", "lr_dtype=float32"], "beta2=0.99"),
    "lion_rule": ("lion", [], "beta1=0.9,beta2=0.99"),
}


def test_generate_works_for_every_builtin_rule_and_imports_without_sympy(tmp_path):
    """``adamgen generate --rule NAME --option ... --const ...`` for each built-in rule; each
    package imports in a fresh process without SymPy or Jinja, updates and steps, and says
    which rule (and options) it computes."""
    out = tmp_path / "out"
    for package, (rule, options, const) in GENERATED.items():
        arguments = ["generate", "--rule", rule, "--out", str(out), "--name", package,
                     "--dtype", "float32", "--const", const]
        for option in options:
            arguments += ["--option", option]
        run = adamgen_cli(*arguments)
        assert run.returncode == 0, (rule, run.stderr[-3000:])
    script = f"""
import json, sys
import numpy as np
import {", ".join(GENERATED)}
found = {{}}
for package in {list(GENERATED)!r}:
    module = sys.modules[package]
    interface = module.INTERFACE
    x = np.full(8, 0.5, np.float32)
    tensors = [0.1 if t["scalar"] else x for t in interface["tensors"]]
    required = {{h["name"]: 1.0 for h in interface["hyperparameters"]
                if h["default"] is None and h["name"] not in module.CONSTANTS}}
    outputs = module.update(*tensors, **required)
    opt = module.optimizer([x.copy()], **{{k: v for k, v in required.items() if k != "step"}},
                           **{{t["name"]: 0.1 for t in interface["tensors"] if t["scalar"]}})
    opt.step([x])
    found[package] = [module.RULE, dict(interface["options"]), len(outputs),
                      bool(np.isfinite(outputs[0]).all()), module.C_KERNELS.reason or "c"]
found["loaded"] = [m for m in ("sympy", "jinja2") if m in sys.modules]
print(json.dumps(found))
"""
    check = subprocess.run([sys.executable, "-c", script], cwd=out, capture_output=True,
                           text=True, timeout=300, check=False,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join([str(out), str(REPO)])})
    assert check.returncode == 0, check.stderr[-3000:]
    found = json.loads(check.stdout.strip().splitlines()[-1])
    assert found.pop("loaded") == []
    for package, (rule, options, _) in GENERATED.items():
        name, chosen, count, finite, _c = found[package]
        assert name == rule and finite and count >= 2, (package, found[package])
        if "amsgrad=1" in options:
            assert chosen["amsgrad"] is True, (package, chosen)
    assert found["tadamw"][1] == {"amsgrad": True, "maximize": True, "lr_dtype": "float32"}


def test_generate_names_the_valid_rules_options_and_constants(tmp_path):
    out = str(tmp_path / "out")
    assert_usage_error(adamgen_cli("generate", "--rule", "adam", "--out", out, "--name", "x"),
                       "no built-in rule 'adam'", "ivy_adam, torch_adam, torch_adamw, lion")
    assert_usage_error(adamgen_cli("generate", "--rule", "torch_adam", "--option", "amsgard=1",
                                   "--out", out, "--name", "x"),
                       "no option 'amsgard'", "its options: amsgrad, maximize, lr_dtype")
    assert_usage_error(adamgen_cli("generate", "--rule", "lion", "--option", "amsgrad=1",
                                   "--out", out, "--name", "x"),
                       "rule 'lion' has no option 'amsgrad'; its options: none")
    assert_usage_error(adamgen_cli("generate", "--rule", "lion", "--const", "epsilon=0",
                                   "--out", out, "--name", "x"),
                       "--const epsilon", "lr, beta1, beta2, weight_decay")
    assert not (tmp_path / "out" / "x").exists()


def test_info_shows_each_rule_its_kernels_and_the_loaders_choices(tmp_path):
    """Every built-in rule with its summary, peer and options; per rule, the kernels this
    process built and those in the cache, and the loader's choices; a user's rule appears once
    it has kernels in the cache."""
    cache = tmp_path / "cache"
    listed = adamgen_cli("info", cache=cache)
    assert listed.returncode == 0, listed.stderr
    for rule in BUILTINS.values():
        assert f"rule {rule.name}: {rule.summary}" in listed.stdout
        assert f"peer:     {rule.peer}" in listed.stdout
    assert ("options:  amsgrad=False (or True), maximize=False (or True), "
            "lr_dtype='float64' (or 'float32')") in listed.stdout
    assert "none yet" in listed.stdout
    built = adamgen_cli("info", "--rule", "lion", "--build", cache=cache)
    assert built.returncode == 0, built.stderr
    assert "rule ivy_adam" not in built.stdout  # --rule: that rule only
    section = built.stdout.split("rule lion:")[1]
    assert "built or fetched by this process" in section
    assert "c lion float32 exact" in section and "compiled in" in section
    assert "lion functional float32 exact" in section and "winner by size" in section
    assert "lion multi-tensor param:" in section
    user = ("import numpy as np, adamgen\n"
            "from adamgen.spec import UpdateSpec, symbols, unevaluated\n"
            "p, g, lr = symbols('p g lr')\n"
            "with unevaluated():\n"
            "    new = p - lr * g\n"
            "rule = adamgen.Rule(UpdateSpec('plain_sgd', ['p', 'g'], ['lr'], {'p_new': new},"
            " state={'p_new': 'p'}, parameter='p', gradient='g'))\n"
            "x = np.ones(64, np.float32)\n"
            "rule.update(x, x, lr=0.1)\n")
    subprocess.run([sys.executable, "-c", user], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(REPO), "ADAMGEN_CACHE_DIR": str(cache)})
    again = adamgen_cli("info", "--all", cache=cache)
    assert again.returncode == 0, again.stderr
    assert "rule plain_sgd: a user's rule (adamgen.Rule(spec))" in again.stdout
    user_section = again.stdout.split("rule plain_sgd:")[1]
    assert "in the cache (" in user_section and "plain_sgd functional float32" in user_section
    lion_section = again.stdout.split("rule lion:")[1].split("\nrule ")[0]
    assert "0 built or fetched by this process" in lion_section
    assert " us (cache dir)" in lion_section
    assert_usage_error(adamgen_cli("info", "--rule", "adam", cache=cache),
                       "no built-in rule 'adam'", "ivy_adam, torch_adam, torch_adamw, lion")
