"""Digests of large texts, without copying them whole."""

from __future__ import annotations

import hashlib


def hash_text(
    h: hashlib._Hash, text: str, start: int = 0, end: int | None = None, chunk: int = 1 << 20
) -> None:
    """Feed ``text[start:end]`` in UTF-8 to ``h`` a megabyte at a time: a 50 MB ruleset
    or input is not copied whole once more (at a large compile's peak of memory)."""
    stop = len(text) if end is None else end
    for i in range(start, stop, chunk):
        h.update(text[i : min(i + chunk, stop)].encode())
