"""Each owned table's fingerprint: a digest of that table's own text.

The ``state`` set of each table carries it as an element comment, so that a later run
learns what the kernel holds by listing one tiny set (in nft 1.0.6 listing a set is
fast, while listing a chain fetches the whole table). One per table, not one for the
script: a change to the IPv4 table leaves the ip6 table, its state element included,
untouched. The digest is taken from text, not from the layout, because the reconciler
restamps a script whose pick maps it permuted (svcrules/kernel/nft/slots.py).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

PLACEHOLDER = "@@fingerprint@@"
_STATE = re.compile(r'comment "svcrules ([0-9a-f]{32}|' + PLACEHOLDER + r')"')
_TABLE = re.compile(r"^table (ip6?) \S+ \{$", re.M)


def _tables(text: str) -> Iterator[tuple[str, int, int]]:
    """(family, start, end) of each table block; a block ends at the first unindented
    closing brace (everything inside is indented)."""
    pos = 0
    while m := _TABLE.search(text, pos):
        end = text.find("\n}\n", m.end())
        pos = len(text) if end < 0 else end + 3
        yield m.group(1), m.start(), pos


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def stamp(text: str) -> str:
    """``text`` with each table's state element carrying the digest of that table's block,
    taken with the placeholder in the fingerprint's place (so a stamped text stamps to
    itself)."""
    out: list[str] = []
    pos = 0
    for _, start, end in _tables(text):
        block = _STATE.sub(f'comment "svcrules {PLACEHOLDER}"', text[start:end], count=1)
        out += [text[pos:start], block.replace(PLACEHOLDER, _digest(block), 1)]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def table_fingerprints(text: str) -> dict[str, str | None]:
    """Family -> the fingerprint that family's table carries in ``text``."""
    out: dict[str, str | None] = {}
    for family, start, end in _tables(text):
        m = _STATE.search(text, start, end)
        out[family] = m.group(1) if m and m.group(1) != PLACEHOLDER else None
    return out


def fingerprint_of(text: str) -> str | None:
    """One digest naming a whole script, from its tables' fingerprints (the state
    directory keeps it)."""
    parts = table_fingerprints(text)
    if not parts or None in parts.values():
        return None
    return _digest(" ".join(f"{k}={v}" for k, v in sorted(parts.items())))


def state_fingerprint(listing: str) -> str | None:
    """The fingerprint in a listing of a state set's element comments."""
    m = _STATE.search(listing)
    return m.group(1) if m and m.group(1) != PLACEHOLDER else None
