"""Where adamgen's generation-time files live, and their fingerprint (stdlib only).

The fingerprint (a hash of the spec, the code generators and the templates) goes into every
cache key, so editing a template or a pass can never serve a stale kernel. Computing it must not
import SymPy or Jinja: a cache hit is decided before anything is rendered.

Templates live at the repository's top level (``templates/``) and ship inside the wheel as the
package ``adamgen.templates`` (``pyproject.toml`` maps one onto the other).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from ._version import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.cache
def templates_dir() -> Path:
    """The templates of an installed wheel, else of a source checkout."""
    installed = PACKAGE_DIR / "templates"
    if (installed / "numpy_kernel.py.j2").is_file():
        return installed
    try:  # an editable install maps the package elsewhere
        import importlib.util

        found = importlib.util.find_spec("adamgen.templates")
        if found is not None and found.submodule_search_locations:
            for location in found.submodule_search_locations:
                if (Path(location) / "numpy_kernel.py.j2").is_file():
                    return Path(location)
    except ImportError:
        pass
    checkout = PACKAGE_DIR.parent / "templates"
    if (checkout / "numpy_kernel.py.j2").is_file():
        return checkout
    raise FileNotFoundError(f"adamgen's templates are missing (looked in {installed} and "
                            f"{checkout}); reinstall adamgen")


def generation_files() -> list[Path]:
    """Every file whose content changes generated code."""
    files = [PACKAGE_DIR / name for name in ("spec.py", "language.py", "interface.py",
                                             "derivatives.py", "mixed.py", "config.py",
                                             "ieee.py", "_version.py")]
    files += sorted((PACKAGE_DIR / "codegen").glob("*.py"))
    files += sorted((PACKAGE_DIR / "rules").glob("*.py"))  # the built-in rules' graphs
    files += sorted(templates_dir().glob("*.j2"))
    return files


@functools.cache
def generator_fingerprint() -> str:
    """adamgen's version and a hash of its generation-time files."""
    digest = hashlib.sha256(__version__.encode())
    for path in generation_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"{__version__}-{digest.hexdigest()[:16]}"


def example_path(name: str) -> Path:
    """An example script: shipped in the wheel as ``adamgen/examples``, else the checkout's."""
    for candidate in (PACKAGE_DIR / "examples" / name, PACKAGE_DIR.parent / "examples" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"the example {name} is missing; reinstall adamgen")
