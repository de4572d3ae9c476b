"""Cut each input into its objects, each with a digest, parsing as little as possible.

A cron run on a large cluster reads a kubectl JSON List of about 100 MB in which one
object changed since the last run. Parsing all of it takes seconds; comparing it with
the last run's copy takes tens of milliseconds. So a JSON List is cut into its items by
scanning its top level only, and an item whose text repeats the previous copy's item
at the same place is known without being parsed (``previous``). Only new items are
decoded, held to what orjson (``parse.documents``) accepts.

Every other input (YAML, a single JSON object, JSON that does not decode with orjson)
goes through ``parse.documents`` as before; its objects are digested from their
canonical JSON. Either way the pieces, their origins and the object count are those
``load.py`` sees, so loading from pieces and loading the whole text agree.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import replace
from typing import Any, NamedTuple

import orjson

from svcrules.errors import Origin
from svcrules.inputs.parse import documents

_WS = " \t\n\r"
MAX_INT_CHARS = 20  # orjson's limit: 64-bit integers


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _int(digits: str) -> int:
    if len(digits) > MAX_INT_CHARS:
        raise ValueError("integer beyond 64 bits")
    return int(digits)


# Python's decoder finds where each item ends; it is held to what orjson accepts
# (no NaN or Infinity, 64-bit integers), so that any text it takes reads as orjson
# reads it, and any other goes to parse.documents.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_int=_int)
UNPARSED: Any = object()  # a piece whose value was not needed yet


class Piece(NamedTuple):
    """One object of an input: a List item, or a whole document."""

    origin: Origin
    digest: str | None  # None: cannot be digested (never taken from a cache)
    value: Any  # the decoded object, or UNPARSED
    span: tuple[int, int] | None  # where its text is in the input (JSON Lists)


class Split:
    """An input cut into pieces; ``objects`` counts documents and List items as
    ``load.py`` limits them.

    Pickled (the compile cache keeps the last run's) as its text, a few integers per
    piece, the digests and the values of pieces without a span: a few large objects
    instead of two small ones per piece, and pieces are made again only when asked
    for (``known`` is all a next run needs of them when the input changed)."""

    def __init__(self, path: str, text: str, pieces: list[Piece], objects: int) -> None:
        self.path = path
        self.text = text
        self._pieces: list[Piece] | None = pieces
        self._packed: tuple[array[int], list[str | None], dict[int, Any]] | None = None
        self.objects = objects

    @property
    def pieces(self) -> list[Piece]:
        if self._pieces is None:
            self._pieces = self._unpack()
        return self._pieces

    def known(self) -> list[tuple[int, int, str]]:
        """(start, end, digest) of each piece with a span and a digest, in order."""
        if self._pieces is None and self._packed is not None:
            numbers, digests, _ = self._packed
            return [
                (numbers[4 * i + 2], numbers[4 * i + 3], d)
                for i, d in enumerate(digests)
                if d is not None and numbers[4 * i + 2] >= 0
            ]
        return [(p.span[0], p.span[1], p.digest) for p in self.pieces if p.span and p.digest]

    def renamed(self, path: str) -> Split:
        """The same pieces as read from ``path``."""
        out = Split(path, self.text, [], self.objects)
        out._pieces, out._packed = self._pieces, self._packed
        if out._pieces is not None:
            out._pieces = [p._replace(origin=replace(p.origin, path=path)) for p in out._pieces]
        return out

    def value(self, i: int) -> Any:
        """The decoded object of piece ``i`` (decoded now if it was not yet)."""
        piece = self.pieces[i]
        if piece.value is UNPARSED:
            assert piece.span is not None
            piece = piece._replace(value=_DECODER.raw_decode(self.text, piece.span[0])[0])
            self.pieces[i] = piece
        return piece.value

    def __getstate__(self) -> dict[str, Any]:
        if self._pieces is None:
            packed = self._packed
        else:
            numbers = array("q")
            values: dict[int, Any] = {}
            for i, p in enumerate(self._pieces):
                start, end = p.span if p.span is not None else (-1, -1)
                item = -1 if p.origin.item is None else p.origin.item
                numbers.extend((p.origin.document, item, start, end))
                if p.span is None:
                    values[i] = p.value
            packed = (numbers, [p.digest for p in self._pieces], values)
        return {"path": self.path, "text": self.text, "objects": self.objects, "packed": packed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.text, self.objects = state["path"], state["text"], state["objects"]
        self._pieces, self._packed = None, state["packed"]

    def _unpack(self) -> list[Piece]:
        assert self._packed is not None
        numbers, digests, values = self._packed
        pieces = []
        for i, digest in enumerate(digests):
            doc, item, start, end = numbers[4 * i : 4 * i + 4]
            origin = Origin(self.path, doc, None if item < 0 else item)
            span = None if start < 0 else (start, end)
            pieces.append(Piece(origin, digest, values.get(i, UNPARSED), span))
        return pieces


def digest_text(text: str) -> str:
    return "t" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def digest_value(value: Any) -> str | None:
    """A digest of a decoded object (YAML inputs): None for values JSON cannot hold."""
    try:
        data = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return None
    return "v" + hashlib.blake2b(data, digest_size=16).hexdigest()


def split(path: str, text: str, previous: Split | None = None, digests: bool = True) -> Split:
    """Cut ``text`` into pieces, reusing what ``previous`` (the last run's split of the
    same input) already knows; raise what ``parse.documents`` raises. Without
    ``digests`` (a compile that keeps no cache), JSON is decoded whole by orjson, which
    is faster than finding where each item's text lies, and nothing is digested."""
    if previous is not None and previous.text == text:
        same = previous if previous.path == path else previous.renamed(path)
        return Split(path, text, list(same.pieces), same.objects)
    if digests and text.lstrip().startswith("{"):
        found = _json_list(path, text, previous)
        if found is not None:
            return found
    pieces: list[Piece] = []
    objects = 0
    for n, doc in enumerate(documents(text), start=1):
        objects += 1
        kind = doc.get("kind") if isinstance(doc, dict) else None
        items = doc.get("items") if isinstance(doc, dict) else None
        if isinstance(kind, str) and kind.endswith("List") and isinstance(items, list):
            objects += len(items)
            pieces += [
                Piece(Origin(path, n, i), digest_value(item) if digests else None, item, None)
                for i, item in enumerate(items)
            ]
            items.clear()  # the pieces hold them now: each can be freed once loaded
        else:
            pieces.append(Piece(Origin(path, n), digest_value(doc) if digests else None, doc, None))
    return Split(path, text, pieces, objects)


def _json_list(path: str, text: str, previous: Split | None) -> Split | None:
    """A JSON List cut at its top level, or None for anything else (another shape, or
    text orjson would refuse: ``documents`` then decides, as it always did)."""
    old = _Previous(previous)
    try:
        found = _scan(text, old)
    except (ValueError, RecursionError):
        return None
    if found is None:
        return None
    items, others = found
    kind = others.get("kind")
    if not (isinstance(kind, str) and kind.endswith("List")):
        return None
    pieces = [
        Piece(Origin(path, 1, i), known or digest_text(text[start:end]), value, (start, end))
        for i, (start, end, known, value) in enumerate(items)
    ]
    return Split(path, text, pieces, 1 + len(items))


class _Previous:
    """The last run's items of the same input, to recognise unchanged ones by comparing
    the text at the same place in order (no parsing). An item that moved elsewhere is
    decoded, and then recognised by its digest (compile_cache's ``infos``)."""

    LOOKAHEAD = 4  # items removed in one place that are still matched in order

    def __init__(self, previous: Split | None) -> None:
        self.text = previous.text if previous else ""
        self.items = previous.known() if previous else []
        self.next = 0  # the old item expected at the current place

    def match(self, text: str, i: int) -> tuple[int, str] | None:
        """The end and digest of an old item whose text starts at ``i``, trying the
        expected one and the few after it (items removed)."""
        for j in range(self.next, min(self.next + self.LOOKAHEAD, len(self.items))):
            start, end, digest = self.items[j]
            if text.startswith(self.text[start:end], i):
                self.next = j + 1
                return i + end - start, digest
        return None


# start, end, the digest when the text is an old item's, the value (when decoded)
Item = tuple[int, int, str | None, Any]


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _scan(text: str, old: _Previous) -> tuple[list[Item], dict[str, Any]] | None:
    """The items of the top-level object's ``items`` array and its other members
    (decoded), or None when the text is not one JSON object with an ``items`` array."""
    i = _skip(text, 0)
    if text[i] != "{":
        return None
    i = _skip(text, i + 1)
    items: list[Item] | None = None
    others: dict[str, Any] = {}
    while text[i] != "}":
        key, i = _DECODER.raw_decode(text, i)
        i = _skip(text, i)
        if not isinstance(key, str) or text[i] != ":" or key in others:
            return None
        i = _skip(text, i + 1)
        if key == "items":
            if items is not None or text[i] != "[":
                return None
            items, i = _items(text, i + 1, old)
        else:
            others[key], i = _DECODER.raw_decode(text, i)
        i = _skip(text, i)
        if text[i] == ",":
            i = _skip(text, i + 1)
        elif text[i] != "}":
            return None
    if items is None or _skip(text, i + 1) != len(text):
        return None
    return items, others


def _items(text: str, i: int, old: _Previous) -> tuple[list[Item], int]:
    """The items of an array, from just after its ``[``; and the index after its ``]``."""
    items: list[Item] = []
    i = _skip(text, i)
    if text[i] == "]":
        return items, i + 1
    while True:
        found = old.match(text, i)
        if found is not None:
            end, digest = found
            items.append((i, end, digest, UNPARSED))
        else:
            value, end = _DECODER.raw_decode(text, i)
            items.append((i, end, None, value))
        i = _skip(text, end)
        if text[i] == "]":
            return items, i + 1
        if text[i] != ",":
            raise ValueError("expected , or ]")
        i = _skip(text, i + 1)
