"""Turn the text of one input into documents, within limits.

Inputs come from files on the node and from the API server through a pipe; neither
their size nor their shape can be trusted. A few hundred bytes of YAML aliases can
stand for billions of nodes, JSON nested 30,000 deep used to overflow the C stack
of the YAML composer, and a 5,000-digit integer makes ``int()`` raise. Everything
here is bounded and every refusal is a ``Refused`` naming the document and line.

JSON goes to orjson (fast, depth-limited to 1024 by itself). YAML is built straight
from libyaml's event stream without recursion: no node tree is composed, which is
also faster than ``yaml.load_all`` with ``CSafeLoader``. Anchors share the object
they name, as PyYAML does, but the nodes aliases stand for are counted.
"""

from __future__ import annotations

from typing import Any

import orjson
import yaml
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import ScalarNode

MAX_DEPTH = 1024  # nested mappings and sequences (orjson's own limit for JSON)
MAX_INT_CHARS = 32  # Kubernetes integers are 64-bit: 20 characters at most
ALIAS_NODES = 10_000  # nodes aliases may stand for, beyond the nodes written out

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_MERGE = "tag:yaml.org,2002:merge"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_NO_KEY = object()


class Refused(Exception):
    """An input that is too large or too deep to be read; ``document`` counts from 1."""

    def __init__(self, document: int, message: str, mark: Any = None) -> None:
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        super().__init__(f"{where}{message}")
        self.document = document


def documents(text: str) -> list[Any]:
    """The documents of one input (empty ones dropped); raise ``Refused`` or
    ``yaml.YAMLError``."""
    if text.lstrip().startswith(("{", "[")):
        try:
            return [orjson.loads(text)]  # several times faster than json on large inputs
        except orjson.JSONDecodeError as exc:
            if str(exc).startswith("depth limit exceeded"):
                raise Refused(1, f"nested deeper than {MAX_DEPTH} levels") from None
            # YAML is a superset of JSON; let the YAML reader decide.
    return [d for d in _yaml_documents(text) if d is not None]


class _Open:
    """A mapping or sequence being built."""

    __slots__ = ("anchor", "key", "merges", "nodes", "value")

    def __init__(self, value: Any, anchor: str | None) -> None:
        self.value = value
        self.anchor = anchor
        self.key: Any = _NO_KEY
        self.nodes = 1  # this node and everything inside, aliases expanded
        self.merges: list[Any] | None = None


def _yaml_documents(text: str) -> list[Any]:
    loader = _LOADER(text)
    try:
        return _build(loader)
    finally:
        loader.dispose()


def _build(loader: Any) -> list[Any]:
    """All documents of the stream; one flat loop over events, for speed."""
    get = loader.get_event
    resolve = loader.resolve
    constructors = loader.yaml_constructors
    out: list[Any] = []
    stack: list[_Open] = []
    top: _Open | None = None
    anchors: dict[str, tuple[Any, int]] = {}
    written = 0  # nodes written out in this input
    aliased = 0  # nodes that aliases stand for
    document = 0
    root: Any = None
    while True:
        event = get()
        kind = type(event)
        nodes = 1
        if kind is ScalarEvent:
            written += 1
            value: Any = event.value
            tag = event.tag
            if tag is None and not event.implicit[0]:
                pass  # quoted: a string
            else:
                if tag is None or tag == "!":
                    tag = resolve(ScalarNode, value, event.implicit)
                if tag != _STR:
                    if tag == _INT and len(value) > MAX_INT_CHARS:
                        raise Refused(
                            document,
                            f"integer of {len(value)} characters (at most {MAX_INT_CHARS})",
                            event.start_mark,
                        )
                    if tag == _MERGE:
                        value = _MERGE_KEY
                    else:
                        ctor = constructors.get(tag) or constructors[None]
                        value = ctor(loader, ScalarNode(tag, value, event.start_mark))
            if event.anchor is not None:
                anchors[event.anchor] = (value, 1)
        elif kind is MappingStartEvent or kind is SequenceStartEvent:
            written += 1
            if event.tag not in (None, "!", _MAP, _SEQ):
                raise Refused(document, f"unsupported tag {event.tag}", event.start_mark)
            if len(stack) >= MAX_DEPTH:
                raise Refused(document, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
            if top is not None:
                stack.append(top)
            top = _Open({} if kind is MappingStartEvent else [], event.anchor)
            continue
        elif kind is MappingEndEvent or kind is SequenceEndEvent:
            assert top is not None
            done = top
            top = stack.pop() if stack else None
            value = done.value
            nodes = done.nodes
            if done.merges:
                for merged in done.merges:
                    for k, v in merged.items():
                        value.setdefault(k, v)
            if done.anchor is not None:
                anchors[done.anchor] = (value, nodes)
        elif kind is AliasEvent:
            found = anchors.get(event.anchor)
            if found is None:
                raise Refused(document, f"unknown alias *{event.anchor}", event.start_mark)
            value, nodes = found
            aliased += nodes
            if aliased > max(ALIAS_NODES, written):
                raise Refused(
                    document,
                    f"aliases stand for more than {max(ALIAS_NODES, written)} nodes",
                    event.start_mark,
                )
        elif kind is DocumentStartEvent:
            document += 1
            root = None
            continue
        elif kind is DocumentEndEvent:
            out.append(root)
            anchors.clear()
            continue
        elif kind is StreamEndEvent:
            return out
        else:
            continue
        # Attach the finished node to the collection it belongs to.
        if top is None:
            root = value
            continue
        top.nodes += nodes
        if type(top.value) is list:
            top.value.append(value)
        elif top.key is _NO_KEY:
            top.key = value
        else:
            key = top.key
            top.key = _NO_KEY
            if key is _MERGE_KEY:
                top.merges = top.merges or []
                merged = value if isinstance(value, list) else [value]
                if not all(isinstance(m, dict) for m in merged):
                    raise Refused(
                        document, "a merge key needs a mapping or a list of mappings", None
                    )
                top.merges.extend(merged)
                continue
            try:
                top.value[key] = value
            except TypeError:
                raise Refused(
                    document, f"a {type(key).__name__} cannot be a mapping key", None
                ) from None


class _MergeKey:
    """The ``<<`` key: the mapping (or mappings) it names fill in missing keys."""


_MERGE_KEY = _MergeKey()
