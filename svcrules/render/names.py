"""Stable, safe names derived from user strings.

Names and comments end up inside rule text, so nothing a user writes may reach
it unfiltered: names are a digest plus a sanitised readable tail, comments keep
only a small safe alphabet.
"""

from __future__ import annotations

import base64
import hashlib
import re

_UNSAFE = re.compile(r"[^a-z0-9.-]+")
_UNSAFE_COMMENT = re.compile(r"[^A-Za-z0-9 ./:_\[\]-]+")


def digest(*parts: str, length: int = 12) -> str:
    """Hex digest of the parts; independent of PYTHONHASHSEED and platform."""
    h = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return h[:length]


def digest32(*parts: str, length: int = 10) -> str:
    """Upper-case base32 digest: 5 bits a character, for names with little room
    (iptables chain names have 28 characters)."""
    raw = hashlib.sha256("\x00".join(parts).encode()).digest()
    # Encode only the bytes the characters need: base64's base32 is pure Python and
    # slow (this runs once per endpoint).
    return base64.b32encode(raw[: -(-length * 5 // 8)]).decode()[:length]


def readable(text: str, limit: int = 80) -> str:
    """Lower-case, only [a-z0-9.-], no leading punctuation, at most ``limit`` chars."""
    out = _UNSAFE.sub("-", text.lower()).strip(".-")
    return out[:limit].rstrip(".-")


def chain_name(prefix: str, key: str) -> str:
    tail = readable(key.replace("/", "-").replace(":", "-"))
    return f"{prefix}-{digest(key)}" + (f"-{tail}" if tail else "")


def comment(text: str, limit: int = 120) -> str:
    return _UNSAFE_COMMENT.sub("_", text)[:limit]
