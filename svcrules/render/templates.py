"""The Jinja2 environment shared by every backend.

Templates live in the top-level ``templates/`` folder of the source tree and
inside the installed package (the wheel copies them to ``svcrules/templates``).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jinja2


def template_dir() -> Path:
    """The installed copy if there is one, else the source tree's."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "templates", package.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("svcrules templates not found (broken installation?)")


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, **context: object) -> str:
    return environment().get_template(template).render(**context)
