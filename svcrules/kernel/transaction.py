"""Transactions as lists of typed operations, for both backends.

An operation is a verb on one kernel object (a chain, set, map, rule or element of a
table of one family); each backend writes it in its own syntax (nft commands,
iptables-restore lines) and a transaction's counts are derived from its list, never
kept alongside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Verb(StrEnum):
    ADD = "add"  # create (a chain, set, map), or append (rules, elements)
    REPLACE = "replace"  # declare an existing chain anew, emptied, to refill it
    INSERT = "insert"  # a rule at a position
    FLUSH = "flush"  # empty a chain before deleting it
    DELETE = "delete"


class Kind(StrEnum):
    TABLE = "table"
    CHAIN = "chain"
    SET = "set"
    MAP = "map"
    RULE = "rule"
    ELEMENT = "element"


@dataclass(frozen=True)
class Operation:
    verb: Verb
    kind: Kind
    family: str  # ip, ip6 (nft); ipv4, ipv6 (iptables)
    table: str  # the owned table (nft), nat or filter (iptables)
    name: str  # the object: a chain, set or map (the one a rule or element is in)
    detail: str = ""  # a declaration, a rule, a comma-separated list of elements
    count: int = 1  # kernel operations it stands for (elements of one add or delete)
    builtin: bool = False  # on a built-in chain (iptables: svcrules' jumps)


@dataclass(frozen=True)
class Counts:
    """What a list of operations changes, for the diff summary and the metrics."""

    operations: int = 0
    chains_added: int = 0
    chains_changed: int = 0
    chains_removed: int = 0
    sets_added: int = 0
    sets_removed: int = 0
    elements_added: int = 0
    elements_removed: int = 0
    jumps_added: int = 0
    jumps_removed: int = 0


def count(ops: Iterable[Operation]) -> Counts:
    """Counts of a transaction: a chain is changed when it is declared anew, flushed
    and refilled, or edited in place, and not deleted; rules on built-in chains are
    svcrules' jumps."""
    ops = list(ops)
    removed = {(o.family, o.table, o.name) for o in ops if _is(o, Verb.DELETE, Kind.CHAIN)}
    changed = {
        (o.family, o.table, o.name)
        for o in ops
        if _is(o, Verb.REPLACE, Kind.CHAIN)
        or _is(o, Verb.FLUSH, Kind.CHAIN)
        or (o.kind is Kind.RULE and o.verb in (Verb.INSERT, Verb.DELETE) and not o.builtin)
    } - removed
    sets = (Kind.SET, Kind.MAP)
    jumps = [o for o in ops if o.kind is Kind.RULE and o.builtin]
    return Counts(
        operations=sum(o.count for o in ops),
        chains_added=sum(_is(o, Verb.ADD, Kind.CHAIN) for o in ops),
        chains_changed=len(changed),
        chains_removed=len(removed),
        sets_added=sum(o.verb is Verb.ADD and o.kind in sets for o in ops),
        sets_removed=sum(o.verb is Verb.DELETE and o.kind in sets for o in ops),
        elements_added=sum(o.count for o in ops if _is(o, Verb.ADD, Kind.ELEMENT)),
        elements_removed=sum(o.count for o in ops if _is(o, Verb.DELETE, Kind.ELEMENT)),
        jumps_added=sum(o.verb is Verb.INSERT for o in jumps),
        jumps_removed=sum(o.verb is Verb.DELETE for o in jumps),
    )


def _is(op: Operation, verb: Verb, kind: Kind) -> bool:
    return op.verb is verb and op.kind is kind
