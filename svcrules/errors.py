"""Errors that carry where in the input they come from.

Every problem a user can fix is an ``InputError`` holding all the problems
found, each pointing at a file, a document and a field, so that one run
reports everything at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Origin:
    """Where an object was read: file (or ``<stdin>``), document and list item."""

    path: str
    document: int
    item: int | None = None
    kind: str = ""
    ref: str = ""

    def __str__(self) -> str:
        where = f"{self.path}: document {self.document}"
        if self.item is not None:
            where += f" items[{self.item}]"
        label = " ".join(p for p in (self.kind, self.ref) if p)
        return f"{where} ({label})" if label else where


@dataclass(frozen=True)
class Problem:
    origin: Origin | None
    field: str
    message: str

    def __str__(self) -> str:
        parts = [str(self.origin)] if self.origin else []
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


class SvcrulesError(Exception):
    """Base of every error svcrules raises on purpose."""


class InputError(SvcrulesError):
    """The input cannot be programmed; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# What compiling does with an invalid Service or EndpointSlice, or with Services whose
# frontends conflict: "fail" the whole run (the default), or "skip" those objects,
# report them (``Ruleset.skipped``) and compile the rest.
OnInvalid = Literal["fail", "skip"]
