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
from collections.abc import Collection, Iterator

from svcrules.render.digest import hash_text

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


def stamp(text: str) -> str:
    """``text`` with each table's state element carrying the digest of that table's block,
    taken with the placeholder in the fingerprint's place (so a stamped text stamps to
    itself)."""
    return restamp(text)[0]


def restamp(text: str, families: Collection[str] | None = None) -> tuple[str, dict[str, str]]:
    """``text`` stamped anew in the tables of ``families`` (all by default), and the
    fingerprint each table then carries. The tables' text is read once, at most."""
    out: list[str] = []
    prints: dict[str, str] = {}
    pos = 0
    for family, start, end in _tables(text):
        m = _STATE.search(text, start, end)
        if m is None:
            continue
        if families is None or family in families:
            digest = hashlib.sha256()
            hash_text(digest, text, start, m.start(1))
            digest.update(PLACEHOLDER.encode())
            hash_text(digest, text, m.end(1), end)
            prints[family] = digest.hexdigest()[:32]
            out += [text[pos : m.start(1)], prints[family]]
            pos = m.end(1)
        else:
            prints[family] = m.group(1)
    out.append(text[pos:])
    return "".join(out), prints


def table_fingerprints(text: str) -> dict[str, str | None]:
    """Family -> the fingerprint that family's table carries in ``text``. A run asks it
    of the same saved script more than once, and each asking searches the whole text
    (about 40 ms at 50,000 Services): the last answer is kept for that very string."""
    global _last
    if _last is not None and _last[0] is text:
        return dict(_last[1])
    out: dict[str, str | None] = {}
    for family, start, end in _tables(text):
        m = _STATE.search(text, start, end)
        out[family] = m.group(1) if m and m.group(1) != PLACEHOLDER else None
    _last = (text, out)
    return dict(out)


_last: tuple[str, dict[str, str | None]] | None = None


def fingerprint_of(text: str) -> str | None:
    """One digest naming a whole script, from its tables' fingerprints (the state
    directory keeps it)."""
    parts = table_fingerprints(text)
    if not parts or None in parts.values():
        return None
    joined = " ".join(f"{k}={v}" for k, v in sorted(parts.items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


def state_fingerprint(listing: str) -> str | None:
    """The fingerprint in a listing of a state set's element comments."""
    m = _STATE.search(listing)
    return m.group(1) if m and m.group(1) != PLACEHOLDER else None
