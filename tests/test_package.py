"""``adamgen generate``: the package imports without SymPy/Jinja and matches the JIT bits."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import adamgen
from adamgen.codegen.package import parse_constants
from adamgen.errors import ArgumentValueError
from adamgen.runtime.rule import rule

IVY_RULE = rule("ivy_adam")


def generate(out, name, **options):
    """``adamgen generate`` of the Ivy rule (the CLI's default rule)."""
    return IVY_RULE.generate(out, name, **options)

CONSTS = "beta1=0.9,beta2=0.999,epsilon=1e-7"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generated")
    generate(root, "adam_general", dtypes="float32,float64")
    generate(root, "adam_const", dtypes="float32,float64", constants=CONSTS)
    return root


def run_in_fresh_process(root: Path, code: str, prefix: tuple[str, ...] = ()) -> dict:
    """Run ``code`` in a new interpreter with ``root`` importable; it prints one JSON object.

    Without ``ADAMGEN_STRICT`` (which CI sets): these processes watch a package fall back to
    NumPy, and the reference they compute with adamgen itself must be allowed to fall back too
    (with libgomp hidden, its cached C kernels cannot load either)."""
    env = {key: value for key, value in os.environ.items() if key != "ADAMGEN_STRICT"}
    completed = subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(code)], cwd=root, capture_output=True,
        text=True, timeout=120, env={**env, "PYTHONPATH": f"{root}{os.pathsep}{REPO}"}, check=False)
    assert completed.returncode == 0, (completed.returncode, completed.stderr)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_generated_packages_import_without_generation_tools_and_match_bits(packages, dtype):
    # step 1270: there float64's pow(x, 0.5) and sqrt(x) differ in the prelude's last bit
    result = run_in_fresh_process(packages, f"""
        import json, sys
        import numpy as np
        import adam_general, adam_const
        loaded = [m for m in ("sympy", "jinja2") if m in sys.modules]
        rng = np.random.default_rng(7)
        w, g, m = (rng.standard_normal(1001).astype("{dtype}") for _ in range(3))
        v = np.abs(rng.standard_normal(1001)).astype("{dtype}")
        v[:4] = [np.nan, -1.0, np.inf, 0.0]
        general = adam_general.adam_update(w, g, 0.01, m, v, 1270)
        const = adam_const.adam_update(w, g, 0.01, m, v, 1270)
        ws = w.copy()
        adam_const.adam_update(ws, g, 0.01, m, v, 1270, out=ws)
        import adamgen
        jit = adamgen.adam_update(w, g, 0.01, m, v, 1270)
        print(json.dumps({{
            "loaded_before_jit": loaded,
            "general": [a.tobytes().hex() for a in general],
            "const": [a.tobytes().hex() for a in const],
            "inplace": ws.tobytes().hex(),
            "jit": [a.tobytes().hex() for a in jit],
        }}))
    """)
    assert result["loaded_before_jit"] == []
    assert result["general"] == result["jit"]
    assert result["const"] == result["jit"]
    assert result["inplace"] == result["jit"][0]


def test_prelude_pow_and_sqrt_really_differ_at_step_1270():
    x = 1 - 0.999 ** 1270.0
    assert x ** 0.5 != float(np.sqrt(x))


def test_specialised_package_rejects_other_hyperparameters(packages):
    result = run_in_fresh_process(packages, """
        import json
        import numpy as np
        import adam_const
        w = np.ones(3, np.float32)
        messages = []
        for kwargs in ({"beta1": 0.8}, {"beta2": 0.99}, {"epsilon": 1e-8}):
            try:
                adam_const.adam_update(w, w, 0.1, w, w, 1, **kwargs)
            except ValueError as error:
                messages.append(str(error))
        print(json.dumps(messages))
    """)
    assert len(result) == 3
    assert "beta1=0.8" in result[0] and "fixed to 0.9" in result[0]


def test_generated_package_serves_containers(packages):
    result = run_in_fresh_process(packages, """
        import json
        import numpy as np
        import adam_general
        w = adam_general.Container(a=adam_general.array([1., 2., 3.]),
                                   b=adam_general.array([4., 5., 6.]))
        new_w, mw, vw = adam_general.adam_update(w, adam_general.array([0.5, 0.2, 0.4]),
                                                 adam_general.array(0.01),
                                                 np.zeros(3, np.float32),
                                                 np.zeros(1, np.float32), 2)
        print(json.dumps([type(new_w).__name__, type(mw).__name__, new_w.a.tolist()]))
    """)
    assert result[0] == "Container" and result[1] == "Array"


def test_generate_rejects_bad_options(tmp_path):
    with pytest.raises(ArgumentValueError, match="gamma"):
        parse_constants("gamma=1", IVY_RULE.spec)
    with pytest.raises(ArgumentValueError, match="beta1"):
        parse_constants("beta1=1.5", IVY_RULE.spec)
    with pytest.raises(ArgumentValueError, match="not a number"):
        parse_constants("beta1=abc", IVY_RULE.spec)
    with pytest.raises(ArgumentValueError, match="float8"):
        generate(tmp_path, "pkg", dtypes="float8")
    with pytest.raises(ArgumentValueError, match="identifier|package name"):
        generate(tmp_path, "not-a-name")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ArgumentValueError, match="not generated by adamgen"):
        generate(tmp_path, "taken")
    assert not any(p.name.startswith(".pkg") for p in tmp_path.iterdir())


def test_regenerating_replaces_the_package_atomically(tmp_path):
    first = generate(tmp_path, "pkg", dtypes="float32")
    second = generate(tmp_path, "pkg", dtypes="float64")
    assert first == second
    assert (second / "numpy_float64.py").exists() and not (second / "numpy_float32.py").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_cli_generate_end_to_end(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "adamgen", "generate", "--out", str(tmp_path), "--name", "cli_pkg",
         "--dtype", "float32", "--const", "beta1=0.9"], capture_output=True, text=True,
        timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "wrote" in completed.stderr
    assert (tmp_path / "cli_pkg" / "__init__.py").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "adamgen", "generate", "--out", str(tmp_path), "--name", "x",
         "--const", "beta1=2"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "beta1" in bad.stderr and "Traceback" not in bad.stderr
    assert adamgen.__version__


def test_generated_package_carries_and_uses_its_c_kernels(packages):
    directory = packages / "adam_general"
    for name in ("c_float32", "c_float32_scalars", "c_float64", "c_float64_scalars"):
        manifest = json.loads((directory / name / "manifest.json").read_text())
        assert manifest["portable"] is False and "-march=native" in manifest["flags"]
        assert (directory / name / "kernel.c").read_text().startswith("/*")
        assert list((directory / name).glob("*.so"))
    result = run_in_fresh_process(packages, """
        import json, sys
        import numpy as np
        import adam_general
        x = np.linspace(-1, 1, 50_000, dtype=np.float32)
        adam_general.adam_update(x, x, 0.1, x, np.abs(x), 3)
        kernel = adam_general.C_KERNELS.kernel("float32", frozenset({"lr"}))
        print(json.dumps({"kernel": repr(kernel), "reason": adam_general.C_KERNELS.reason,
                          "loaded": [m for m in ("sympy", "jinja2") if m in sys.modules]}))
    """)
    assert result["loaded"] == [] and result["reason"] == ""
    assert "CKernel" in result["kernel"]


def test_package_built_for_other_cpu_features_warns_once_and_serves_numpy(tmp_path):
    package = generate(tmp_path, "adam_elsewhere", dtypes="float32")
    manifest_path = package / "c_float32" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["cpu_flags"].append("avx9000_imaginary")
    manifest_path.write_text(json.dumps(manifest))
    result = run_in_fresh_process(tmp_path, """
        import json, warnings
        import numpy as np
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import adam_elsewhere
            x = np.linspace(-1, 1, 1000, dtype=np.float32)
            first = adam_elsewhere.adam_update(x, x, 0.1, x, np.abs(x), 3)
            second = adam_elsewhere.adam_update(x, x, 0.1, x, np.abs(x), 3)
        import adamgen
        expected = adamgen.adam_update(x, x, 0.1, x, np.abs(x), 3)
        print(json.dumps({
            "warnings": [str(w.message) for w in caught if "adam_elsewhere" in str(w.message)],
            "same": all(a.tobytes() == b.tobytes() for a, b in zip(first, expected)),
            "kernel": repr(adam_elsewhere.C_KERNELS.kernel("float32", frozenset({"lr"})))}))
    """)
    assert len(result["warnings"]) == 1 and "avx9000_imaginary" in result["warnings"][0]
    assert result["same"] and result["kernel"] == "None"


def test_portable_package_is_built_without_march_native(tmp_path):
    package = generate(tmp_path, "adam_portable", dtypes="float64", portable=True)
    manifest = json.loads((package / "c_float64" / "manifest.json").read_text())
    assert manifest["portable"] is True
    assert not any(flag.startswith("-march") for flag in manifest["flags"])


# -- the package checks its kernels before loading them (issue 13, D4) -------------------------

#: Import a package, call it twice (C-sized arrays), and report its warnings, whether both calls
#: gave the JIT's bits, and which C kernels it holds. ``{setup}`` runs first.
CHECK_SCRIPT = """
    import json, warnings
    import numpy as np
    {setup}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import {name} as package
        x = np.linspace(-1, 1, 50_000, dtype=np.float32)
        calls = [package.adam_update(x, x, 0.1, x, np.abs(x), 3) for _ in range(2)]
    import adamgen
    expected = adamgen.adam_update(x, x, 0.1, x, np.abs(x), 3)
    print(json.dumps({{
        "warnings": [str(w.message) for w in caught if "{name}" in str(w.message)],
        "same": all(a.tobytes() == b.tobytes() for got in calls for a, b in zip(got, expected)),
        "kernels": [type(package.C_KERNELS.kernel("float32", s)).__name__
                    for s in (frozenset(), frozenset({{"lr"}}))],
        "reason": package.C_KERNELS.reason}}))
"""
#: /proc/cpuinfo without a flags line (an emulator, a container hiding it; elsewhere no file)
NO_FLAGS = "processor\t: 0\nmodel name\t: some CPU\n"
NO_FLAGS_HERE = f"import adamgen.codegen.build as b; b._read_cpuinfo = lambda: {NO_FLAGS!r}"


def check(root: Path, name: str, setup: str = "", prefix: tuple[str, ...] = ()) -> dict:
    return run_in_fresh_process(root, CHECK_SCRIPT.format(name=name, setup=setup), prefix)


def served_by_numpy_after_one_warning(result: dict, mentions: str) -> None:
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "NumPy kernels serve every call" in result["warnings"][0]
    assert mentions in result["warnings"][0] and mentions in result["reason"], result
    assert result["same"] and result["kernels"] == ["NoneType", "NoneType"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    return generate(root, "adam_checked", dtypes="float32")


def copy_package(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / pristine.name))


def _so(package: Path, directory: str) -> Path:
    manifest = json.loads((package / directory / "manifest.json").read_text())
    return package / directory / manifest["so_file"]


def test_an_intact_package_loads_every_c_kernel_without_a_warning(pristine, tmp_path):
    copy_package(pristine, tmp_path)
    result = check(tmp_path, "adam_checked")
    assert result["warnings"] == [] and result["reason"] == "" and result["same"]
    assert result["kernels"] == ["CKernel", "CKernel"]


def test_a_truncated_shared_object_is_caught_before_it_is_mapped(pristine, tmp_path):
    """Mapping a truncated .so and calling into it killed the process with SIGBUS."""
    so = _so(copy_package(pristine, tmp_path), "c_float32_scalars")
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 3])
    served_by_numpy_after_one_warning(check(tmp_path, "adam_checked"),
                                      "not the file the package was built with")


def _unloadable(package: Path) -> None:
    """Garbage whose hash the manifest agrees with: only ``dlopen`` can tell."""
    so = _so(package, "c_float32_scalars")
    garbage = b"\x7fELF garbage" * 100
    so.write_bytes(garbage)
    manifest_path = package / "c_float32_scalars" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][so.name] = {"sha256": hashlib.sha256(garbage).hexdigest(),
                                  "size": len(garbage)}
    manifest_path.write_text(json.dumps(manifest))


def test_a_shared_object_that_will_not_load_refuses_every_kernel(pristine, tmp_path):
    """One directory fails to load, the other is fine: none is used (no partial set), and no
    call raises (the first call raised a bare ImportError, the second used the partial set)."""
    _unloadable(copy_package(pristine, tmp_path))
    served_by_numpy_after_one_warning(check(tmp_path, "adam_checked"),
                                      "cannot load extension")


def _libgomp(so: Path) -> str | None:
    if shutil.which("ldd") is None:
        return None
    listing = subprocess.run(["ldd", str(so)], capture_output=True, text=True,
                             check=False).stdout
    for line in listing.splitlines():
        if "libgomp" in line and "=>" in line:
            return os.path.realpath(line.split("=>")[1].split("(")[0].strip())
    return None


def test_a_missing_libgomp_refuses_every_kernel(pristine, tmp_path):
    """Real: libgomp hidden behind an empty file in a private mount namespace."""
    from hostile import private_mounts

    libgomp = _libgomp(_so(copy_package(pristine, tmp_path), "c_float32"))
    if libgomp is None:
        pytest.skip("the package's kernels do not link libgomp (no OpenMP)")
    hide = private_mounts(f"mount --bind /dev/null {shlex.quote(libgomp)}")
    served_by_numpy_after_one_warning(check(tmp_path, "adam_checked", prefix=hide),
                                      "cannot load extension")


def test_a_manifest_without_hashes_is_refused(pristine, tmp_path):
    package = copy_package(pristine, tmp_path)
    manifest_path = package / "c_float32" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"]
    manifest_path.write_text(json.dumps(manifest))
    served_by_numpy_after_one_warning(check(tmp_path, "adam_checked"), "regenerate")


@pytest.mark.parametrize("unknown_on", ["the build machine", "this machine", "both"])
def test_unknown_cpu_features_refuse_native_kernels(unknown_on, tmp_path, monkeypatch):
    from adamgen.codegen import build

    if unknown_on != "this machine":
        monkeypatch.setattr(build, "_read_cpuinfo", lambda: NO_FLAGS)
    generate(tmp_path, "adam_unknown_cpu", dtypes="float32")
    monkeypatch.undo()
    setup = NO_FLAGS_HERE if unknown_on != "the build machine" else ""
    result = check(tmp_path, "adam_unknown_cpu", setup)
    served_by_numpy_after_one_warning(result, "CPU features are unknown")
    assert "--portable" in result["reason"]


def test_unknown_cpu_features_keep_portable_kernels(tmp_path, monkeypatch):
    from adamgen.codegen import build

    monkeypatch.setattr(build, "_read_cpuinfo", lambda: NO_FLAGS)
    generate(tmp_path, "adam_portable_unknown", dtypes="float32", portable=True)
    monkeypatch.undo()
    result = check(tmp_path, "adam_portable_unknown", NO_FLAGS_HERE)
    assert result["warnings"] == [] and result["same"]
    assert result["kernels"] == ["CKernel", "CKernel"]
