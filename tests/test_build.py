"""Compiling C into cffi extensions: the probe, flags, keys, errors, loading and caching.

Each compile here takes about half a second, so the C sources are tiny; every test has its own
cache directory (``ADAMGEN_CACHE_DIR`` under ``tmp_path``).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from adamgen.cache import ArtifactCache, cache_key
from adamgen.cache_location import default_cache_dir
from adamgen.codegen import build
from adamgen.codegen.build import (
    CompilerInfo,
    compile_extension,
    compile_flags,
    cpu_features,
    extension_module_name,
    first_error_line,
    key_fields,
    load_extension,
    probe_compiler,
    python_abi_tag,
)
from adamgen.errors import ArgumentValueError, CacheError, CompileError, ConfigError

REPO = Path(__file__).resolve().parents[1]
ADD_SOURCE = "static double add(double a, double b) { return a + b; }\n"
ADD_CDEF = "double add(double a, double b);"
OMP_SOURCE = textwrap.dedent("""
    #include <stdint.h>
    static void scale(double *restrict x, int64_t n, double factor) {
    #pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) x[i] *= factor;
    }
""")
OMP_CDEF = "void scale(double *x, int64_t n, double factor);"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("ADAMGEN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ADAMGEN_CACHE_DIR", str(tmp_path / "cache"))
    yield
    probe_compiler.cache_clear()  # a test may have probed under a fake $CC
    cpu_features.cache_clear()


def have_compiler() -> bool:
    return probe_compiler().available


needs_cc = pytest.mark.skipif(not have_compiler(), reason="no C compiler on this machine")


def strict_flags(openmp: bool = False) -> list[str]:
    return compile_flags("exact", openmp=openmp, portable=False) + ["-Werror"]


# -- flags, probe and keys -------------------------------------------------------------------------
def test_compile_flags_per_mode() -> None:
    exact = compile_flags("exact", openmp=False, portable=False)
    assert exact == ["-O3", "-std=c99", "-fPIC", "-ffp-contract=off", "-fno-math-errno",
                     "-march=native", "-Wall", "-Wextra"]
    fast = compile_flags("fast", openmp=True, portable=True)
    assert "-ffp-contract=fast" in fast and "-fopenmp" in fast and "-march=native" not in fast
    for flags in (exact, fast):
        assert not any("fast-math" in f or f == "-Ofast" for f in flags)
    with pytest.raises(ConfigError, match="exact"):
        compile_flags("turbo", openmp=False, portable=False)


@needs_cc
def test_probe_finds_a_working_compiler_once() -> None:
    info = probe_compiler()
    assert info.available and info.reason == ""
    assert os.path.isabs(info.path) and info.argv[0] == info.path
    assert info.version and info.family in ("gcc", "clang", "unknown")
    assert isinstance(info.openmp, bool)
    assert probe_compiler() is info  # memoised: one probe per process


def test_missing_cc_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    probe_compiler.cache_clear()
    info = probe_compiler()
    assert isinstance(info, CompilerInfo)
    assert not info.available and not info.openmp
    assert "/nonexistent/cc" in info.reason and "does not exist" in info.reason
    with pytest.raises(CompileError, match="no usable C compiler.*nonexistent"):
        key_fields("generator", compile_flags("exact", openmp=False, portable=True))


def test_unparsable_cc_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "gcc 'unterminated")
    probe_compiler.cache_clear()
    info = probe_compiler()
    assert not info.available and "cannot be parsed" in info.reason


@needs_cc
def test_cc_with_arguments_is_split_like_a_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    compiler = probe_compiler().path
    monkeypatch.setenv("CC", f"{compiler} -DADAMGEN_FROM_CC=1")
    probe_compiler.cache_clear()
    info = probe_compiler()
    assert info.available and info.argv == (compiler, "-DADAMGEN_FROM_CC=1")


@needs_cc
def test_cpu_features_are_resolved_and_stable() -> None:
    features = cpu_features()
    assert features.startswith(platform.machine())
    assert "native" not in features  # the resolved CPU, never the literal word
    cpu_features.cache_clear()
    assert cpu_features() == features


def test_python_abi_tag_matches_the_extension_suffix() -> None:
    tag = python_abi_tag()
    assert tag and tag in sysconfig.get_config_var("EXT_SUFFIX")


@needs_cc
def test_key_fields_cover_everything_that_changes_the_binary() -> None:
    native = compile_flags("exact", openmp=False, portable=False)
    portable = compile_flags("exact", openmp=False, portable=True)
    fields = key_fields("gen-hash", native, {"dtype": "float32"}, extra_link=["-lm"])
    assert fields["generator_hash"] == "gen-hash" and fields["dtype"] == "float32"
    assert fields["compiler"] == probe_compiler().path
    assert fields["compiler_version"] == probe_compiler().version
    assert "-ffp-contract=off" in fields["flags"] and fields["link_flags"] == "-lm"
    assert fields["cpu_features"] == cpu_features()
    assert fields["python_abi"] == python_abi_tag() and fields["cffi_version"]
    assert key_fields("gen-hash", portable)["cpu_features"] == "portable"
    keys = {cache_key(key_fields(g, f)) for g in ("a", "b") for f in (native, portable)}
    assert len(keys) == 4
    with pytest.raises(ArgumentValueError, match="clashes"):
        key_fields("gen-hash", native, {"flags": "-O0"})


def test_extension_module_name_carries_the_key() -> None:
    key = cache_key({"x": "1"})
    name = extension_module_name(key)
    assert name.isidentifier() and key[:24] in name
    assert name != extension_module_name(cache_key({"x": "2"}))


def test_first_error_line_prefers_the_cause() -> None:
    gcc = ("k.c: In function 'f':\nk.c:3:5: warning: unused variable 'y'\n"
           "k.c:4:1: error: expected ';' before '}' token\ncollect2: error: ld returned 1\n")
    assert first_error_line(gcc) == "k.c:4:1: error: expected ';' before '}' token"
    link = ("/usr/bin/ld: k.o: in function `f':\nk.c:(.text+0x5): undefined reference to `g'\n"
            "collect2: error: ld returned 1 exit status\n")
    assert "undefined reference to `g'" in first_error_line(link)
    assembler = "/tmp/ccX.s: Assembler messages:\n/tmp/ccX.s:12: Error: no such instruction\n"
    assert first_error_line(assembler) == "/tmp/ccX.s:12: Error: no such instruction"
    assert first_error_line("") == "(the compiler printed nothing)"


# -- compiling and loading -------------------------------------------------------------------------
@needs_cc
def test_compile_and_load_a_tiny_function(tmp_path: Path) -> None:
    name = extension_module_name(cache_key({"test": "add"}))
    so_path = compile_extension(name, ADD_SOURCE, ADD_CDEF, tmp_path, strict_flags())
    assert so_path == tmp_path / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    assert (tmp_path / f"{name}.c").is_file()  # the wrapper is kept beside the binary
    module = load_extension(so_path, name)
    assert module.lib.add(1.5, 2.25) == 3.75
    assert module.__name__ == name


@needs_cc
def test_openmp_kernel_compiles_warning_free(tmp_path: Path) -> None:
    if not probe_compiler().openmp:
        pytest.skip("this compiler has no OpenMP")
    name = extension_module_name(cache_key({"test": "omp"}))
    module = load_extension(compile_extension(name, OMP_SOURCE, OMP_CDEF, tmp_path,
                                              strict_flags(openmp=True)), name)
    buffer = module.ffi.new("double[]", [1.0, 2.0, 3.0])
    module.lib.scale(buffer, 3, 2.0)
    assert list(buffer) == [2.0, 4.0, 6.0]


@needs_cc
def test_syntax_error_raises_compile_error_with_everything_needed(tmp_path: Path) -> None:
    name = extension_module_name(cache_key({"test": "broken"}))
    broken = "static double add(double a, double b) { return a + b }\n"
    with pytest.raises(CompileError) as caught:
        compile_extension(name, broken, ADD_CDEF, tmp_path, strict_flags())
    error = caught.value
    assert error.argv[0] == probe_compiler().path and "-Werror" in error.argv
    assert error.c_path == tmp_path / f"{name}.c" and error.c_path.is_file()
    assert "error:" in error.stderr
    headline = str(error).splitlines()[0]
    assert "error:" in headline and headline.endswith(first_error_line(error.stderr))


@needs_cc
def test_warning_is_an_error_under_werror(tmp_path: Path) -> None:
    name = extension_module_name(cache_key({"test": "warning"}))
    unused = "static double add(double a, double b) { int unused; return a + b; }\n"
    with pytest.raises(CompileError, match="unused"):
        compile_extension(name, unused, ADD_CDEF, tmp_path, strict_flags())


def test_missing_compiler_raises_compile_error_and_keeps_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    probe_compiler.cache_clear()
    with pytest.raises(CompileError, match="no usable C compiler") as caught:
        compile_extension("_adamgen_nocc", ADD_SOURCE, ADD_CDEF, tmp_path, strict_flags())
    assert caught.value.c_path is not None and caught.value.c_path.is_file()


def test_bad_cdef_and_bad_names_are_adamgen_errors(tmp_path: Path) -> None:
    with pytest.raises(CompileError, match="cffi could not generate"):
        compile_extension("_adamgen_badcdef", ADD_SOURCE, "double add(double a,", tmp_path,
                          strict_flags())
    with pytest.raises(ArgumentValueError):
        compile_extension("not-an-identifier", ADD_SOURCE, ADD_CDEF, tmp_path, strict_flags())


def test_loading_a_broken_shared_object_is_a_cache_error(tmp_path: Path) -> None:
    fake = tmp_path / f"_adamgen_fake{sysconfig.get_config_var('EXT_SUFFIX')}"
    fake.write_bytes(b"\x7fELF truncated")
    with pytest.raises(CacheError, match="cannot load extension _adamgen_fake"):
        load_extension(fake, "_adamgen_fake")


# -- with the cache --------------------------------------------------------------------------------
CACHED_BUILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from adamgen.cache import ArtifactCache, cache_key
    from adamgen.cache_location import default_cache_dir
    from adamgen.codegen.build import (compile_extension, compile_flags,
                                       extension_module_name, key_fields, load_extension)
    SOURCE = "static double add(double a, double b) { return a + b; }\\n"
    flags = compile_flags("exact", openmp=False, portable=False) + ["-Werror"]
    key = cache_key(key_fields("test-generator", flags, {"kernel": "add"}))
    name = extension_module_name(key)
    def build(workdir):
        so = compile_extension(name, SOURCE, "double add(double a, double b);", workdir, flags)
        return {"module_name": name, "shared_object": so.name}
    entry = ArtifactCache(default_cache_dir()).get_or_build("c-kernel", key, build)
    module = load_extension(entry.path / entry.manifest["shared_object"], name)
    print(entry.built, module.lib.add(2.0, 0.5), "sympy" in sys.modules, "jinja2" in sys.modules)
""")


@needs_cc
def test_second_process_loads_the_cached_extension(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAMGEN_")}
    env.update(ADAMGEN_CACHE_DIR=str(tmp_path / "shared-cache"), PYTHONPATH=str(REPO))
    first = subprocess.run([sys.executable, "-c", CACHED_BUILD], check=False, env=env,
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["True", "2.5", "False", "False"]
    second = subprocess.run([sys.executable, "-c", CACHED_BUILD], check=False,
                            env={**env, "ADAMGEN_REQUIRE_CACHE_HIT": "1"},
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["False", "2.5", "False", "False"]


@needs_cc
def test_unloadable_cached_extension_is_invalidated_and_rebuilt_once() -> None:
    cache = ArtifactCache(default_cache_dir())
    flags = strict_flags()
    key = cache_key(key_fields("test-generator", flags, {"kernel": "add-reload"}))
    name = extension_module_name(key)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    builds: list[str] = []

    def build_once_broken(workdir: Path) -> dict[str, str]:
        builds.append(name)
        if len(builds) == 1:  # a "successful" build whose binary cannot be loaded
            (workdir / f"{name}{suffix}").write_bytes(b"not an ELF file")
        else:
            compile_extension(name, ADD_SOURCE, ADD_CDEF, workdir, flags)
        return {"shared_object": f"{name}{suffix}"}

    def load() -> object:
        entry = cache.get_or_build("c-kernel", key, build_once_broken)
        return load_extension(entry.path / entry.manifest["shared_object"], name)

    try:
        module = load()
    except CacheError:
        cache.invalidate("c-kernel", key)  # what the loader does: a bad artifact is a miss
        module = load()
    assert module.lib.add(1.0, 1.0) == 2.0  # type: ignore[attr-defined]
    assert len(builds) == 2


def test_build_module_does_not_import_cffi_until_a_build() -> None:
    code = ("import sys, adamgen.codegen.build as b; b.python_abi_tag(); "
            "b.compile_flags('exact', openmp=False, portable=True); b._cffi_version(); "
            "print('cffi' in sys.modules, 'sympy' in sys.modules, 'jinja2' in sys.modules)")
    probe = subprocess.run(
        [sys.executable, "-c", code], check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["False", "False", "False"]
    assert build.__name__ == "adamgen.codegen.build"
