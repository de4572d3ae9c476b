"""iptables-restore texts: cut a rendered ruleset into chains, and diff two of them.

The rendered text (backends/iptables.py) holds one section per family and, in each,
one ``*nat`` and one ``*filter`` part. A change is sent as ``iptables-restore
--noflush`` input naming only the chains that change: declaring a chain
(``:NAME - [0:0]``) creates or empties it, ``-X`` deletes it, and chains not named
stay exactly as they are. Built-in chains are only ever touched by inserting or
deleting svcrules' own jump rules.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import partial

from svcrules.errors import JumpsChanged
from svcrules.kernel.transaction import Counts, Kind, Operation, Verb, count

_FAMILY = re.compile(r"^# family (ipv[46])\b")
_JUMP = re.compile(r"^# jump (\S+) (.*)$")
FAMILIES = ("ipv4", "ipv6")
TABLES = ("nat", "filter")
Part = tuple[str, str]  # (family, table)


@dataclass
class RestoreTable:
    """One table of one family: svcrules' chains and the jumps it keeps in built-ins."""

    chains: dict[str, list[str]] = field(default_factory=dict)  # name -> rule specs
    jumps: list[tuple[str, str]] = field(default_factory=list)  # (built-in chain, spec)
    complete: bool = True  # False: chain names only, their rules were not read


Parsed = dict[Part, RestoreTable]


def parse_restore(text: str) -> Parsed:
    """Cut a text rendered by svcrules (or a transaction) into tables and chains."""
    out: Parsed = {}
    family = ""
    table: RestoreTable | None = None
    for line in text.splitlines():
        if m := _FAMILY.match(line):
            family = m.group(1)
        elif line.startswith("*"):
            table = out.setdefault((family, line[1:]), RestoreTable())
        elif table is None or line == "COMMIT":
            continue
        elif m := _JUMP.match(line):
            table.jumps.append((m.group(1), m.group(2)))
        elif line.startswith(":"):
            table.chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("-A "):
            name, _, spec = line[3:].partition(" ")
            table.chains.setdefault(name, []).append(spec)
    return out


def section(family: str, table: str, lines: list[str]) -> str:
    """One ``iptables-restore --noflush`` input."""
    body = "".join(f"{ln}\n" for ln in lines)
    return f"# family {family}\n*{table}\n{body}COMMIT\n"


def split_sections(script: str) -> list[tuple[Part, str]]:
    """A transaction script back into its per-(family, table) restore inputs."""
    out: list[tuple[Part, str]] = []
    family, table = "", ""
    lines: list[str] = []
    for line in script.splitlines():
        if m := _FAMILY.match(line):
            family = m.group(1)
        elif line.startswith("*"):
            table, lines = line[1:], []
        elif line == "COMMIT":
            body = "".join(f"{x}\n" for x in lines)
            out.append(((family, table), f"*{table}\n{body}COMMIT\n"))
        elif table and not line.startswith("#"):
            lines.append(line)
    return out


def restore_line(op: Operation) -> str:
    """An operation as an iptables-restore line."""
    if op.kind is Kind.CHAIN:
        return f"-X {op.name}" if op.verb is Verb.DELETE else f":{op.name} - [0:0]"
    flag = {Verb.ADD: "-A", Verb.INSERT: "-I", Verb.DELETE: "-D"}[op.verb]
    return f"{flag} {op.name} {op.detail}"


@dataclass
class RestoreTransaction:
    """Per (family, table), the restore operations that bring the kernel to the new
    text; what it changes is counted from them."""

    ops: list[Operation] = field(default_factory=list)
    # What the kernel held before and is to hold after, per table: what a refused table
    # puts back into those already sent (a table whose rules were not read stays new).
    before: Parsed = field(default_factory=dict)
    after: Parsed = field(default_factory=dict)
    applied: str | None = None  # the kernel holds the compiled text afterwards

    @property
    def parts(self) -> dict[Part, list[str]]:
        out: dict[Part, list[str]] = {}
        for op in self.ops:
            out.setdefault((op.family, op.table), []).append(restore_line(op))
        return out

    @property
    def counts(self) -> Counts:
        return count(self.ops)

    @property
    def operations(self) -> int:
        return len(self.ops)

    @property
    def chains_added(self) -> int:
        return self.counts.chains_added

    @property
    def chains_removed(self) -> int:
        return self.counts.chains_removed

    @property
    def deleted(self) -> list[str]:
        """Objects a refused deletion may leave for later: none, restore is atomic."""
        return []

    def script(self) -> str:
        parts = self.parts
        return "".join(
            section(fam, tbl, lines)
            for (fam, tbl) in ((f, t) for f in FAMILIES for t in TABLES)
            if (lines := parts.get((fam, tbl)))
        )

    @property
    def empty(self) -> bool:
        return not self.ops

    def describe(self) -> str:
        c = self.counts
        return (
            f"  chains +{c.chains_added} ~{c.chains_changed} -{c.chains_removed}; "
            f"built-in jumps +{c.jumps_added} -{c.jumps_removed}"
        )


def _edits(name: str, before: list[str], after: list[str]) -> list[tuple[Verb, str]] | None:
    """Rule deletions and insertions (verb, ``spec`` or ``N spec``) that turn a chain's
    rules from ``before`` into ``after`` in place, or None when refilling the whole chain
    is shorter. Deleting by rule spec and inserting at each new rule's final position
    (in ascending order) is exact because svcrules never repeats a rule within a chain."""
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    deletes: list[tuple[Verb, str]] = []
    inserts: list[tuple[Verb, str]] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("delete", "replace"):
            deletes += [(Verb.DELETE, spec) for spec in before[i1:i2]]
        if tag in ("insert", "replace"):
            inserts += [(Verb.INSERT, f"{j + 1} {after[j]}") for j in range(j1, j2)]
    if len(deletes) + len(inserts) >= len(after) + 1:
        return None
    return deletes + inserts


def diff_restore(old: Parsed, new: Parsed) -> RestoreTransaction:
    """The smallest restore input from ``old`` to ``new`` (both rendered by svcrules):
    new chains are declared and filled; a changed chain gets its rules deleted and
    inserted in place, or is declared anew and refilled when that is shorter; chains
    that went are emptied and deleted; the others are not named."""
    tx = RestoreTransaction()
    for part in sorted(set(old) | set(new)):
        before, after = old.get(part, RestoreTable()), new.get(part, RestoreTable())
        if before.jumps != after.jumps:
            raise JumpsChanged(f"{part[0]} {part[1]}: the jumps from built-in chains changed")
        op = partial(Operation, family=part[0], table=part[1])
        declare: list[Operation] = []
        rules: list[Operation] = []
        edits: list[Operation] = []
        delete: list[Operation] = []
        for name, specs in after.chains.items():
            if name in before.chains and before.chains[name] == specs:
                continue
            if name in before.chains:
                in_place = _edits(name, before.chains[name], specs)
                if in_place is not None:
                    edits += [op(verb, Kind.RULE, name=name, detail=d) for verb, d in in_place]
                    continue
                declare.append(op(Verb.REPLACE, Kind.CHAIN, name=name))
            else:
                declare.append(op(Verb.ADD, Kind.CHAIN, name=name))
            rules += [op(Verb.ADD, Kind.RULE, name=name, detail=spec) for spec in specs]
        for name in before.chains:
            if name not in after.chains:
                declare.append(op(Verb.FLUSH, Kind.CHAIN, name=name))
                delete.append(op(Verb.DELETE, Kind.CHAIN, name=name))
        tx.ops += declare + rules + edits + delete
    return tx


def full_restore(new: Parsed, existing: Parsed) -> RestoreTransaction:
    """Replace svcrules' chains whatever the kernel holds (``existing``, read with
    iptables-save): every chain of ``new`` is declared and filled, owned chains not in
    ``new`` are emptied and deleted, missing jumps are inserted at the top of their
    built-in chain and jumps no longer wanted are deleted."""
    tx = RestoreTransaction()
    for part in sorted(set(new) | set(existing)):
        want = new.get(part, RestoreTable())
        have = existing.get(part, RestoreTable())
        op = partial(Operation, family=part[0], table=part[1])
        removed = [name for name in have.chains if name not in want.chains]
        ops = [op(Verb.ADD, Kind.CHAIN, name=name) for name in want.chains]
        ops += [op(Verb.FLUSH, Kind.CHAIN, name=name) for name in removed]
        for name, specs in want.chains.items():
            ops += [op(Verb.ADD, Kind.RULE, name=name, detail=spec) for spec in specs]
        kept: set[tuple[str, str]] = set()
        wanted = {(chain, target_of(spec)): spec for chain, spec in want.jumps}
        for chain, spec in have.jumps:
            key = (chain, target_of(spec))
            if key in wanted and key not in kept:
                kept.add(key)
                continue
            ops.append(op(Verb.DELETE, Kind.RULE, name=chain, detail=spec, builtin=True))
        for (chain, target), spec in wanted.items():
            if (chain, target) not in kept:
                ops.append(op(Verb.INSERT, Kind.RULE, name=chain, detail=f"1 {spec}", builtin=True))
        ops += [op(Verb.DELETE, Kind.CHAIN, name=name) for name in removed]
        tx.ops += ops
    return tx


def target_of(spec: str) -> str:
    """The chain a rule jumps or goes to."""
    words = spec.split()
    for flag in ("-j", "-g", "--jump", "--goto"):
        if flag in words:
            i = words.index(flag)
            if i + 1 < len(words):
                return words[i + 1]
    return ""


BUILTIN = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
# The chains svcrules makes, after "<P>-": other owners' chains that merely share the
# prefix (KUBE-SVC-… for a table named "kube", SVC-B-… for "svc") are not svcrules'.
_OWN = re.compile(
    r"-(?:STATE|SERVICES|NODEPORTS|POSTROUTING|MARK-MASQ|MASQ-NON-POD|CLUSTER-IPS"
    r"|(?:SVC|EXT|CLU|SEP|FW)-[A-Z2-7]{10})$"
)


def is_own_chain(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and bool(_OWN.fullmatch(name[len(prefix) :]))


def parsed_from_save(save: str, prefix: str) -> RestoreTable:
    """From ``iptables-save -t TABLE`` (or ``iptables -S CHAIN``) output: svcrules'
    chains (named ``PREFIX-…``) with their rules, and its own jumps in built-in chains
    (they carry a ``PREFIX …`` comment). Rules of other owners are never returned, so
    never deleted, even when they point at svcrules' chains."""
    out = RestoreTable()
    marker = f'--comment "{prefix} '
    for line in save.splitlines():
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if is_own_chain(name, prefix):
                out.chains.setdefault(name, [])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            if is_own_chain(chain, prefix):
                out.chains.setdefault(chain, []).append(spec)
            elif chain in BUILTIN and marker in spec and is_own_chain(target_of(spec), prefix):
                out.jumps.append((chain, spec))
    return out


def has_jump(listing: str, chain: str, spec: str, prefix: str) -> bool:
    """Whether ``iptables -S CHAIN`` output holds svcrules' jump to ``spec``'s target."""
    found = parsed_from_save(listing, prefix).jumps
    return any(c == chain and target_of(s) == target_of(spec) for c, s in found)
