"""The one Jinja environment: templates render a file's shell, printers render the math.

``StrictUndefined`` makes a missing template variable an error at render time instead of an
empty string in generated code.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2

from .._resources import templates_dir


@functools.cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template_name: str, **context: Any) -> str:
    """Render ``templates/<template_name>`` with ``context``."""
    return environment().get_template(template_name).render(**context)
