"""``adamgen/__init__.py``: its docstring names only what exists (issue 12 item 12)."""

from __future__ import annotations

import re

import adamgen


def test_every_function_the_package_docstring_names_exists():
    named = re.findall(r":(?:func|class):`(\w+)`", adamgen.__doc__)
    assert named, adamgen.__doc__
    assert [name for name in named if not hasattr(adamgen, name)] == []
