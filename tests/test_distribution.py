"""The distribution (``pyproject.toml``, LICENSE, CHANGELOG): what the wheel ships and declares,
read from a wheel built from this checkout."""

from __future__ import annotations

import email
import re
import zipfile
from email.message import Message
from pathlib import Path

from adamgen._version import __version__

REPO = Path(__file__).resolve().parents[1]


def metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        return email.message_from_bytes(
            archive.read(f"adamgen-{__version__}.dist-info/METADATA"))


def test_wheel_ships_types_license_templates_examples_and_benchmarks(installed_wheel):
    with zipfile.ZipFile(installed_wheel.wheel) as archive:
        names = set(archive.namelist())
    for required in ("adamgen/py.typed", "adamgen/benchmarks/__init__.py",
                     "adamgen/benchmarks/run.py", "adamgen/benchmarks/worker.py",
                     "adamgen/templates/numpy_kernel.py.j2", "adamgen/examples/train_mlp.py",
                     "adamgen/torch/_native.cpp",  # adamgen.torch's step helper, built on use
                     f"adamgen-{__version__}.dist-info/licenses/LICENSE"):
        assert required in names, required


def test_metadata_declares_license_pythons_os_topics_and_the_bench_extra(installed_wheel):
    declared = metadata(installed_wheel.wheel)
    assert declared["License-Expression"] == "Apache-2.0"
    classifiers = declared.get_all("Classifier")
    for minor in (10, 11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    for classifier in ("Operating System :: POSIX :: Linux", "Typing :: Typed",
                       "Topic :: Software Development :: Code Generators"):
        assert classifier in classifiers
    bench = [r for r in declared.get_all("Requires-Dist") if 'extra == "bench"' in r]
    assert {re.match(r"[\w-]+", r).group() for r in bench} == {
        "matplotlib", "numexpr", "numba", "torch", "lion-pytorch"}
    torch = next(r for r in bench if r.startswith("torch"))
    assert ">=2.4" in torch and "<2.14" in torch, torch  # 2.13.0, not a multi-GB newer build


def test_license_is_the_full_apache_2_text():
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, "
                                    "January 2004")
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX" in text


def test_changelog_starts_with_this_release():
    headings = [line for line in (REPO / "CHANGELOG.md").read_text().splitlines()
                if line.startswith("## ")]
    assert headings and headings[0].startswith(f"## {__version__} "), headings[:1]
