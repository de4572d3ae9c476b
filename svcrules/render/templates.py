"""The Jinja2 environment shared by every backend.

Templates live in the top-level ``templates/`` folder of the source tree and
inside the installed package (the wheel copies them to ``svcrules/templates``).
"""

from __future__ import annotations

from functools import cache
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    import jinja2  # here: a run that renders nothing (no change) never loads it

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, **context: object) -> str:
    """The template's text, joined a batch of pieces at a time: Jinja yields millions of
    small strings for a large ruleset, and holding them all before the join was the
    peak of a 50,000-Service compile's memory."""
    pieces = environment().get_template(template).generate(**context)
    parts = []
    while batch := list(islice(pieces, 1 << 16)):
        parts.append("".join(batch))
    return "".join(parts)
