"""Incremental updates: the smallest nft transaction from one script to another.

Both sides are scripts rendered by svcrules (the last one applied is kept in
the state directory), parsed back into objects: sets and maps with their
elements, chains with their rules. The template stays the only writer of nft
syntax; this module only cuts its output into objects and recombines lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from functools import partial

from svcrules.errors import NeedsFullReplacement
from svcrules.kernel.transaction import Counts, Kind, Operation, Verb, count

_TABLE = re.compile(r"^table (ip6?) (\S+) \{$")
_HEADER = ("type ", "typeof ", "flags ", "timeout ", "size ", "comment ", "policy ")
ELEMENT_CHUNK = 5000  # elements per add/delete command; keeps lines reasonable


@dataclass(frozen=True)
class NftObject:
    kind: str  # "set", "map" or "chain"
    name: str
    header: tuple[str, ...]  # type/flags/timeout/comment lines, or a chain's hook line
    items: tuple[str, ...]  # elements (sets, maps) or rules (chains)

    def keys(self) -> dict[str, str]:
        """Element key -> whole element (``key : value`` in maps, ``key comment "…"``)."""
        return {item.split(" : ", 1)[0].split(" comment ", 1)[0]: item for item in self.items}

    @property
    def is_base_chain(self) -> bool:
        return self.kind == "chain" and any(h.startswith("type ") for h in self.header)


class Objects(MutableMapping[str, NftObject]):
    """A table's objects by name, in the order of the text. A script's objects are cut
    from it as blocks of text and parsed only when asked for: a diff compares the
    blocks first (``same``), and from one run to the next nearly all are equal (at
    50,000 Services, parsing them all took most of a diff's time)."""

    def __init__(self, items: Mapping[str, NftObject] | None = None) -> None:
        self._items: dict[str, NftObject | tuple[str, str]] = dict(items or {})
        self._text: dict[str, str] = {}  # name -> the block it was cut from

    def add_block(self, kind: str, name: str, block: str) -> None:
        """An object as its block of text (header line to closing brace)."""
        self._items[name] = (kind, block)
        self._text[name] = block

    def same(self, other: Objects, name: str) -> bool:
        """Whether both hold ``name`` cut from identical text (so, identical objects)."""
        mine = self._text.get(name)
        return mine is not None and mine == other._text.get(name)

    def size(self, name: str) -> tuple[str, int]:
        """The kind of ``name`` and how many elements or rules it holds, parsing it only
        when it is not a block as rendered."""
        item = self._items[name]
        if isinstance(item, NftObject):
            return item.kind, len(item.items)
        kind, block = item
        if kind != "chain":
            return kind, block.count("\n\t\t\t")  # one element a line, inside elements
        lines = block.count("\n") - 1  # the lines between the header and the brace
        return kind, lines - sum(block.count(f"\n\t\t{h}") for h in _HEADER)

    def replaced(self, objects: Mapping[str, NftObject]) -> Objects:
        """A copy with ``objects`` put in place of (or after) those of the same names."""
        out = Objects()
        out._items = {**self._items, **objects}
        out._text = {k: v for k, v in self._text.items() if k not in objects}
        return out

    def __getitem__(self, name: str) -> NftObject:
        item = self._items[name]
        if isinstance(item, NftObject):
            return item
        kind, block = item
        obj = _parse_object(kind, name, iter(block.split("\n")[1:]))
        self._items[name] = obj
        return obj

    def __setitem__(self, name: str, obj: NftObject) -> None:
        self._items[name] = obj
        self._text.pop(name, None)

    def __delitem__(self, name: str) -> None:
        del self._items[name]
        self._text.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


@dataclass
class TableText:
    family: str
    name: str
    comment: str
    objects: Objects = field(default_factory=Objects)


_TABLE_BLOCK = re.compile(r"^table (ip6?) (\S+) \{$", re.M)
_TABLE_COMMENT = re.compile(r"^\tcomment .*$", re.M)


def parse_script(text: str) -> dict[tuple[str, str], TableText]:
    """Cut a script rendered by svcrules into tables and objects (blocks of text, parsed
    when first used: see Objects). Only string searches run over the whole text: each
    object ends at the first line that is a lone tab-indented closing brace."""
    tables: dict[tuple[str, str], TableText] = {}
    pos = 0
    while m := _TABLE_BLOCK.search(text, pos):
        end = text.find("\n}\n", m.end())
        end = len(text) if end < 0 else end + 1
        table = TableText(m.group(1), m.group(2), "")
        at = m.end()
        first = text.find(" {\n", at, end)  # the first object's header, if any
        before = text.rfind("\n", at, first) + 1 if first >= 0 else end
        if comment := _TABLE_COMMENT.search(text, at, before):
            table.comment = comment.group(0).strip()
        while (close := text.find("\n\t}\n", at, end)) >= 0:
            brace = text.find(" {\n", at, close)
            start = text.rfind("\n", at, brace) + 1
            head = text[start:brace].split(" ")
            if len(head) != 2 or head[0] not in ("\tset", "\tmap", "\tchain"):
                raise ValueError(f"not an object: {text[start:brace]!r}")
            table.objects.add_block(head[0][1:], head[1], text[start : close + 3])
            at = close + 3
        tables[(table.family, table.name)] = table
        pos = end
    return tables


def parse_table(family: str, name: str, lines: Iterator[str]) -> TableText:
    """One table from its lines after ``table FAMILY NAME {``, up to its closing brace
    (read as parse_script reads a script)."""
    body = [f"table {family} {name} {{"]
    for line in lines:
        body.append(line)
        if line == "}":
            return parse_script("\n".join(body) + "\n")[(family, name)]
    raise ValueError(f"unterminated table {family} {name}")


def _parse_object(kind: str, name: str, lines: Iterator[str]) -> NftObject:
    header: list[str] = []
    items: list[str] = []
    in_elements = False
    for line in lines:
        stripped = line.strip()
        if line == "\t}":
            return NftObject(kind, name, tuple(header), tuple(items))
        if in_elements:
            if stripped == "}":
                in_elements = False
            else:
                items.append(stripped.rstrip(","))
        elif stripped == "elements = {":
            in_elements = True
        elif kind != "chain" or stripped.startswith(_HEADER):
            header.append(stripped)
        else:
            items.append(stripped)
    raise ValueError(f"unterminated {kind} {name}")


def command(op: Operation) -> str:
    """An operation as an nft command."""
    where = f"{op.family} {op.table}"
    if op.kind is Kind.RULE:
        return f"add rule {where} {op.name} {op.detail}"
    if op.kind is Kind.ELEMENT or op.verb is Verb.ADD:
        return f"{op.verb} {op.kind} {where} {op.name} {{ {op.detail} }}"
    return f"{op.verb} {op.kind} {where} {op.name}"


@dataclass
class Transaction:
    """nft operations in a safe order: ``ops``, then ``deletes`` (run last, in
    dependency order); what it changes is counted from them."""

    ops: list[Operation] = field(default_factory=list)
    deletes: list[Operation] = field(default_factory=list)
    # The script the kernel holds once this is sent, when it is not the compiled one
    # (stable slots permuted its pick maps: slots.py); None: the compiled one.
    applied: str | None = None

    @property
    def commands(self) -> list[str]:
        return [command(op) for op in self.ops]

    @property
    def deletions(self) -> list[str]:
        return [command(op) for op in self.deletes]

    @property
    def deleted(self) -> list[str]:
        """ "family kind name", one per deletion."""
        return [f"{op.family} {op.kind} {op.name}" for op in self.deletes]

    @property
    def counts(self) -> Counts:
        return count([*self.ops, *self.deletes])

    @property
    def operations(self) -> int:
        return self.counts.operations

    def script(self) -> str:
        return "".join(f"{c}\n" for c in self.commands + self.deletions)

    def without(self, kept: set[str]) -> str:
        """The script without the deletions of ``kept`` ("family kind name" entries)."""
        cmds = [d for d, name in zip(self.deletions, self.deleted, strict=True) if name not in kept]
        return "".join(f"{c}\n" for c in self.commands + cmds)

    @property
    def empty(self) -> bool:
        return not self.ops and not self.deletes

    def describe(self) -> str:
        c = self.counts
        return (
            f"  chains +{c.chains_added} ~{c.chains_changed} -{c.chains_removed}; "
            f"sets +{c.sets_added} -{c.sets_removed}; "
            f"elements +{c.elements_added} -{c.elements_removed}"
        )


def _decl(obj: NftObject) -> str:
    return " ".join(f"{h}" if h.endswith(";") else f"{h};" for h in obj.header)


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(items), ELEMENT_CHUNK):
        yield items[i : i + ELEMENT_CHUNK]


def diff_table(old: TableText, new: TableText, tx: Transaction, stale: set[str]) -> None:
    """Add to ``tx`` what turns ``old`` into ``new``; ``stale`` names objects known to
    linger in the kernel (a delete refused earlier), as "family kind name"."""
    if old.comment != new.comment:
        raise NeedsFullReplacement("table settings changed")
    op = partial(Operation, family=new.family, table=new.name)
    declare: list[Operation] = []
    del_elems: list[Operation] = []
    add_elems: list[Operation] = []
    rules: list[Operation] = []
    for name in new.objects:
        if new.objects.same(old.objects, name):
            continue
        obj = new.objects[name]
        before = old.objects.get(name)
        if before is not None and (before.kind != obj.kind or before.header != obj.header):
            raise NeedsFullReplacement(f"{obj.kind} {name} changed its declaration")
        if obj.kind == "chain":
            if before is None:
                if obj.is_base_chain:
                    raise NeedsFullReplacement(f"new base chain {name}")
                declare.append(op(Verb.ADD, Kind.CHAIN, name=name, detail=_decl(obj)))
            elif before.items == obj.items:
                continue
            else:
                rules.append(op(Verb.FLUSH, Kind.CHAIN, name=name))
            rules += [op(Verb.ADD, Kind.RULE, name=name, detail=rule) for rule in obj.items]
            continue
        old_keys = before.keys() if before else {}
        new_keys = obj.keys()
        if before is None:
            declare.insert(0, op(Verb.ADD, Kind(obj.kind), name=name, detail=_decl(obj)))
        gone = [k for k, v in old_keys.items() if new_keys.get(k) != v]
        fresh = [v for k, v in new_keys.items() if old_keys.get(k) != v]
        for verb, items, out in ((Verb.DELETE, gone, del_elems), (Verb.ADD, fresh, add_elems)):
            for chunk in _chunks(items):
                detail = ", ".join(chunk)
                out.append(op(verb, Kind.ELEMENT, name=name, detail=detail, count=len(chunk)))
    removed = _removed(old, new, stale)
    for obj in removed:
        if obj.kind == "chain":
            rules.append(op(Verb.FLUSH, Kind.CHAIN, name=obj.name))
    # Deletions in dependency order: sets and maps first (a verdict map's elements hold
    # references to chains; rules that use a set are flushed before any deletion), then
    # each chain before the chains it jumps to. A chain is then deleted only once
    # nothing in the transaction refers to it, which current kernels require (EBUSY).
    for obj in _deletion_order(removed):
        tx.deletes.append(op(Verb.DELETE, Kind(obj.kind), name=obj.name))
    tx.ops.extend([*declare, *del_elems, *add_elems, *rules])


def _removed(old: TableText, new: TableText, stale: set[str]) -> list[NftObject]:
    """The objects of ``old`` that ``new`` no longer has, and those a refused delete left
    in the kernel earlier (``stale``)."""
    removed = [old.objects[n] for n in old.objects if n not in new.objects]
    for entry in sorted(stale):
        fam, kind, name = entry.split(" ")
        if fam != new.family or name in old.objects:
            continue
        if name in new.objects:
            # The kernel still holds the old object (a delete refused earlier): adding to
            # it would mix its old rules or elements with the new ones.
            raise NeedsFullReplacement(f"{kind} {name} lingers from an earlier run")
        removed.append(NftObject(kind, name, (), ()))
    for obj in removed:
        if obj.is_base_chain:
            raise NeedsFullReplacement(f"base chain {obj.name} removed")
    return removed


_TARGET = re.compile(r"\b(?:jump|goto) ([A-Za-z0-9_.-]+)")


def _targets(obj: NftObject) -> set[str]:
    """The chains an object's rules or verdict-map elements jump or go to."""
    return {m.group(1) for item in obj.items for m in _TARGET.finditer(item)}


def _deletion_order(removed: list[NftObject]) -> list[NftObject]:
    """Sets and maps (by name), then chains with every referrer before its targets."""
    sets = sorted((o for o in removed if o.kind != "chain"), key=lambda o: o.name)
    chains = {o.name: o for o in removed if o.kind == "chain"}
    referrers = {name: 0 for name in chains}
    for obj in chains.values():
        for target in _targets(obj) & set(chains) - {obj.name}:
            referrers[target] += 1
    order: list[NftObject] = []
    ready = sorted(n for n, count in referrers.items() if count == 0)
    while ready:
        name = ready.pop(0)
        order.append(chains[name])
        for target in sorted(_targets(chains[name]) & set(chains) - {name}):
            referrers[target] -= 1
            if referrers[target] == 0:
                ready.append(target)
        ready.sort()
    # A cycle cannot be rendered, but never lose a deletion over it.
    order += [chains[n] for n in sorted(chains) if chains[n] not in order]
    return sets + order


Tables = dict[tuple[str, str], TableText]


def diff_scripts(
    old: str | Tables, new: str | Tables, stale: set[str] | None = None
) -> Transaction:
    """The incremental transaction from script ``old`` to script ``new`` (either may be
    given as its already parsed tables)."""
    old_tables = parse_script(old) if isinstance(old, str) else old
    new_tables = parse_script(new) if isinstance(new, str) else new
    if set(old_tables) != set(new_tables):
        raise NeedsFullReplacement("the set of owned tables changed")
    tx = Transaction()
    for key, table in new_tables.items():
        diff_table(old_tables[key], table, tx, stale or set())
    return tx
