"""The nftables backend's side of a run: fingerprints, diffs, sending, cleanup.

svcrules owns two whole tables (``ip`` and ``ip6`` NAME); each holds a ``state`` set
whose one element carries the fingerprint of the last script. That element is also the
proof of ownership: a table of the owned name without it is another program's, and is
neither replaced nor deleted (svcrules.inputs.owned).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from svcrules.compiler import Ruleset
from svcrules.errors import KernelError
from svcrules.inputs.owned import MARK, TABLE_COMMENT, check_name, not_ours
from svcrules.kernel.nft.diff import Tables, Transaction, command, diff_scripts, parse_script
from svcrules.kernel.nft.netlink import ElementChange, split_elements
from svcrules.kernel.nft.slots import keep_slots
from svcrules.kernel.nft.transport import Backend, list_json
from svcrules.kernel.transaction import Kind
from svcrules.render.nftables.fingerprint import (
    fingerprint_of,
    state_fingerprint,
    table_fingerprints,
)

FAMILIES = ("ip", "ip6")
AFFINITY = "affinity"  # the dynamic set of pinned clients, one per table
AFFINITY_CHUNK = 1000  # carried-over affinity entries per add command
BUSY_SEARCHES = 8  # objects still in use looked for one by one; beyond, all deletions wait


@dataclass
class Replacement:
    """A full replacement: the rendered script (with the deletions of retired tables)."""

    text: str
    operations: int
    deleted: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    carried: int = 0  # ClientIP affinity entries carried over from the replaced tables
    applied: str | None = None  # the compiled script is what the kernel holds afterwards
    empty = False

    def script(self) -> str:
        return self.text

    def describe(self) -> str:
        carried = f"; {self.carried} ClientIP affinity entries kept" if self.carried else ""
        return f"  {self.operations} objects, rules and elements written anew{carried}"


class NftDriver:
    backend = "nftables"

    def __init__(self, kernel: Backend) -> None:
        self.kernel = kernel
        self.name = kernel.name
        self._parsed: tuple[Ruleset, Tables] | None = None

    def tables(self, ruleset: Ruleset) -> Tables:
        """The ruleset's script cut into objects (for diffs and counts), parsed once."""
        if self._parsed is None or self._parsed[0] is not ruleset:
            self._parsed = (ruleset, parse_script(ruleset.nft))
        return self._parsed[1]

    def text(self, ruleset: Ruleset) -> str:
        return ruleset.text(self.backend)

    @property
    def tool(self) -> str:
        """libnftables and nft see the same rules: nothing to tell apart."""
        return ""

    def sizes(self, ruleset: Ruleset) -> tuple[int, int, int]:
        """Chains, rules and set or map elements of the ruleset."""
        chains = rules = elements = 0
        for table in self.tables(ruleset).values():
            for name in table.objects:
                kind, size = table.objects.size(name)
                if kind == "chain":
                    chains += 1
                    rules += size
                else:
                    elements += size
        return chains, rules, elements

    def fingerprint_of(self, text: str) -> str | None:
        return fingerprint_of(text)

    def expected(self, text: str) -> dict[str, str | None]:
        """Each table carries the fingerprint of its own text, so that a change to one
        table leaves the other alone."""
        return table_fingerprints(text)

    def fingerprints(self, table: str) -> dict[str, str | None]:
        """The fingerprint in each owned table's state set (None: absent)."""
        out: dict[str, str | None] = {}
        for fam in FAMILIES:
            comments = self._state_comments(fam, table)
            out[fam] = state_fingerprint(" ".join(f'comment "{c}"' for c in comments))
        return out

    def explain_drift(
        self, table: str, kernel: dict[str, str | None], expected: dict[str, str | None]
    ) -> list[str]:
        """Which tables' state sets do not hold the expected fingerprint, and why."""
        gone = [f"{f} {table}" for f, want in sorted(expected.items()) if not kernel.get(f)]
        other = [
            f"{f} {table}"
            for f, want in sorted(expected.items())
            if kernel.get(f) and kernel.get(f) != want
        ]
        out = []
        if gone:
            out.append(
                f"{_tables_named(gone)}: missing, or no svcrules fingerprint in the state "
                "set (deleted or emptied behind svcrules' back)"
            )
        if other:
            out.append(
                f"{_tables_named(other)}: another fingerprint than svcrules last wrote "
                "(changed behind svcrules' back, or by another svcrules with the same "
                "table name)"
            )
        return out

    def _state_comments(self, fam: str, table: str) -> list[str]:
        """The element comments of ``set FAM TABLE state`` ([] when there is none)."""
        return [
            str(e["elem"].get("comment", ""))
            for o in list_json(self.kernel, f"set {fam} {table} state")
            if "set" in o
            for e in o["set"].get("elem", [])
            if isinstance(e, dict) and "elem" in e
        ]

    def _tables(self) -> set[tuple[str, str]]:
        """(family, name) of every table of the families svcrules uses: names only."""
        return {
            (o["table"]["family"], o["table"]["name"])
            for o in list_json(self.kernel, "tables")
            if "table" in o and o["table"]["family"] in FAMILIES
        }

    def _ours(self, fam: str, table: str, deep: bool = True) -> bool:
        """Whether an existing table was made by svcrules: its state set carries the
        svcrules comment, or (the set deleted by hand; only when ``deep``) its own comment
        says so. Only that table is read: the tiny set first, the whole table only
        without it."""
        if any(c.startswith(MARK) for c in self._state_comments(fam, table)):
            return True
        if not deep:
            return False
        try:
            listing = self.kernel.run(f"list table {fam} {table}")
        except KernelError:
            return False
        head = listing.lstrip().splitlines()[1:2]
        return any(ln.strip().startswith(f'comment "{TABLE_COMMENT}') for ln in head)

    def owned_tables(
        self, names: Sequence[str], tables: set[tuple[str, str]] | None = None, deep: bool = True
    ) -> list[str]:
        """Of the tables ``FAMILY NAME`` for each name, those that exist and svcrules made."""
        present = self._tables() if tables is None else tables
        return [
            f"{fam} {name}"
            for name in dict.fromkeys(names)
            for fam in FAMILIES
            if (fam, name) in present and self._ours(fam, name, deep)
        ]

    def _check_ours(self, table: str, present: set[tuple[str, str]]) -> None:
        """Refuse (before anything is sent) when a table of the owned name is foreign."""
        for fam in FAMILIES:
            if (fam, table) in present and not self._ours(fam, table):
                raise not_ours(f"{fam} {table}", "no svcrules state set")

    def incremental(self, old: str, ruleset: Ruleset, stale: set[str]) -> Transaction:
        """The difference from the last script applied, with the new pick maps permuted so
        that every endpoint that stays keeps its slot (slots.py); ``applied`` is then the
        script the kernel holds afterwards."""
        before = parse_script(old)
        placed = keep_slots(before, self.tables(ruleset), ruleset.nft)
        tx = diff_scripts(before, placed.tables, stale)
        tx.applied = placed.applied
        return tx

    def full(
        self, ruleset: Ruleset, table: str, previous: str | None, retire: Sequence[str] = ()
    ) -> Replacement:
        """The rendered script replaces both tables whole (create, delete, recreate), and
        deletes the tables of earlier names (``retire``) that svcrules made, all in one
        transaction. A table of the owned name that svcrules did not make is refused."""
        present = self._tables()
        self._check_ours(table, present)
        gone = [t for t in self.owned_tables(list(retire), present) if t.split()[1] != table]
        tables = self.tables(ruleset).values()
        ops = sum(1 + t.objects.size(name)[1] for t in tables for name in t.objects)
        script = ruleset.nft
        if gone:
            at = script.find("\ntable ") + 1
            deletes = "".join(f"delete table {t}\n" for t in gone)
            script = script[:at] + deletes + script[at:]
        carry, carried, problems = self._carried_affinity(ruleset, table, previous, present)
        return Replacement(
            script + "".join(carry), ops + len(gone), problems=problems, carried=carried
        )

    def _carried_affinity(
        self, ruleset: Ruleset, table: str, previous: str | None, present: set[tuple[str, str]]
    ) -> tuple[list[str], int, list[str]]:
        """``add element`` commands that put the live ClientIP affinity entries of the
        tables being replaced back into the new ones (same transaction: no client is
        ever unpinned), how many entries they hold, and what went wrong reading them.

        An entry is ``client . id``; it is kept when the new ruleset still remembers that
        id in the same endpoint chain as the previous script did (without a previous
        script: when the id still exists; ids derive from the (Service port, endpoint)
        pair, so only a digest collision moves one). Each keeps its timeout and its
        remaining time. Only the affinity set of svcrules' own tables is read, at most as
        many entries as clients; when reading fails, the replacement goes on without."""
        new_ids = _affinity_ids(self.tables(ruleset))
        old_ids = _affinity_ids(parse_script(previous)) if previous else None
        lines: list[str] = []
        carried = 0
        problems: list[str] = []
        for fam in FAMILIES:
            wanted = new_ids.get((fam, table), {})
            if (fam, table) not in present or not wanted:
                continue
            before = None if old_ids is None else old_ids.get((fam, table), {})
            try:
                listing = list_json(self.kernel, f"set {fam} {table} {AFFINITY}")
                entries = [
                    e
                    for o in listing
                    if "set" in o
                    for item in o["set"].get("elem", [])
                    if (e := _affinity_entry(item)) is not None
                ]
            except (KernelError, ValueError, KeyError, TypeError) as exc:
                problems.append(
                    f"ClientIP affinity of {fam} {table} not carried over (reading it "
                    f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__});"
                    " pinned clients of that table may move"
                )
                continue
            kept = [
                text
                for ident, text in entries
                if ident in wanted and (before is None or before.get(ident) == wanted[ident])
            ]
            carried += len(kept)
            for i in range(0, len(kept), AFFINITY_CHUNK):
                chunk = ", ".join(kept[i : i + AFFINITY_CHUNK])
                lines.append(f"add element {fam} {table} {AFFINITY} {{ {chunk} }}\n")
        return lines, carried, problems

    def send(self, script: str, tx: Transaction | Replacement) -> tuple[str, list[str]]:
        """Run the transaction; return what was sent and the objects left for later.

        Deletions come in dependency order, so a kernel refuses one (EBUSY) only while
        something svcrules does not know of still uses the object. Which one is found
        with dry runs (nft's message may name another command of the batch); it is left
        out, emptied, for a later run to delete, and the rest is sent again.

        A transaction of set and map elements only (a changed endpoint: its slots and
        the fingerprints) goes as element changes when the transport can send them
        (libnftables: straight over netlink), since nft 1.0.6 first reads every chain
        of every table for such commands; see svcrules.kernel.nft.netlink."""
        changes = self.element_changes(tx)
        if changes is not None and self.kernel.run_elements(changes):
            return script, []
        left: set[str] = set()
        while True:
            try:
                self.kernel.run(script)
            except KernelError as exc:
                if (
                    isinstance(tx, Replacement)
                    or not tx.deletions
                    or "busy" not in str(exc).lower()
                ):
                    raise
                pending = [name for name in tx.deleted if name not in left]
                if not pending:
                    raise
                if len(left) < BUSY_SEARCHES:
                    left.add(self._first_busy(tx, left, pending))
                else:
                    left.update(pending)
                script = tx.without(left)
                continue
            return script, sorted(left)

    def element_changes(self, tx: Transaction | Replacement) -> list[ElementChange] | None:
        """The transaction as element changes with their sets' declarations; None
        unless it only adds and deletes elements of sets and maps of the ruleset last
        diffed (whose declarations the kernel holds: a changed one is a full
        replacement)."""
        if not isinstance(tx, Transaction) or tx.deletes or self._parsed is None:
            return None
        tables = self._parsed[1]
        out: list[ElementChange] = []
        for op in tx.ops:
            table = tables.get((op.family, op.table))
            obj = table.objects.get(op.name) if table is not None else None
            if op.kind is not Kind.ELEMENT or obj is None or obj.kind == "chain":
                return None
            elements = split_elements(op.detail)
            out.append(
                ElementChange(
                    str(op.verb), op.family, op.table, op.name, obj.header, elements, command(op)
                )
            )
        return out

    def _first_busy(self, tx: Transaction, left: set[str], pending: list[str]) -> str:
        """The first deletion of ``pending`` the kernel refuses: the shortest prefix of
        them whose dry run fails ends with it."""
        lo, hi = 0, len(pending)  # a dry run with lo deletions passes; with hi it fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                self.kernel.run(tx.without(left | set(pending[mid:])), check_only=True)
            except KernelError:
                hi = mid
            else:
                lo = mid
        return pending[hi - 1]

    def check(self, script: str) -> None:
        self.kernel.run(script, check_only=True)

    def verify(self, table: str, script: str, stale: list[str]) -> list[str]:
        """Differences between the kernel's tables and a script: every rule and every
        element (of sets svcrules fills), as nft lists them. nft itself turns the script
        into that form, by loading it into an empty network namespace of its own; where
        that cannot be done (no ``nft`` command or ``unshare``), names and counts only."""
        lingering = {" ".join((s.split(" ")[0], s.split(" ")[2])) for s in stale}
        loaded = self.kernel.load_elsewhere(script, table)
        if loaded is None:
            want, have = _structure_of_script(script), self._structure_of_kernel(table)
            return _compare(want, have, lingering)
        kernel = [o for fam in FAMILIES for o in list_json(self.kernel, f"table {fam} {table}")]
        return _compare(listed_content(loaded), listed_content(kernel), lingering)

    def _structure_of_kernel(self, table: str) -> dict[str, Any]:
        """Object name -> (kind, rule or element count), read from the kernel."""
        out: dict[str, tuple[str, int]] = {}
        for fam in FAMILIES:
            for o in list_json(self.kernel, f"table {fam} {table}"):
                kind = next(iter(o))
                body = o[kind]
                if kind in ("set", "map"):
                    flags = body.get("flags", [])
                    dynamic = "dynamic" in flags or "timeout" in flags
                    out[f"{fam} {body['name']}"] = (
                        kind,
                        0 if dynamic else len(body.get("elem", [])),
                    )
                elif kind == "chain":
                    out.setdefault(f"{fam} {body['name']}", ("chain", 0))
                elif kind == "rule":
                    key = f"{fam} {body['chain']}"
                    out[key] = ("chain", out.get(key, ("chain", 0))[1] + 1)
        return out

    def cleanup(self, table: str | None, known: Sequence[str] = ()) -> list[str]:
        """Delete svcrules' tables, nothing else: with ``table``, that name's (refused when
        it is another program's); without, every name in ``known`` (the state's) and every
        table that carries svcrules' mark. All in one transaction."""
        present = self._tables()
        if table is not None:
            check_name(table)
            self._check_ours(table, present)
            gone = self.owned_tables([table], present)
        else:
            gone = self.owned_tables(known, present)
            # Every other table is asked for its state set only: other programs' tables
            # are never listed whole.
            others = sorted({n for _, n in present} - set(known))
            gone += self.owned_tables(others, present, deep=False)
        if gone:
            self.kernel.run("".join(f"delete table {t}\n" for t in gone))
        return gone


_REMEMBER = re.compile(r"update @" + AFFINITY + r" \{ .* offset (\d+)")


def _affinity_ids(tables: Tables) -> dict[tuple[str, str], dict[int, str]]:
    """(family, table) -> affinity id -> the endpoint chain that remembers it."""
    out: dict[tuple[str, str], dict[int, str]] = {}
    for key, tbl in tables.items():
        if AFFINITY not in tbl.objects:
            continue
        ids = out.setdefault(key, {})
        for name, obj in tbl.objects.items():
            if obj.kind != "chain":
                continue
            for rule in obj.items:
                if m := _REMEMBER.search(rule):
                    ids[int(m.group(1))] = name
    return out


def _affinity_entry(item: Any) -> tuple[int, str] | None:
    """(id, element text with timeout and remaining time) of one listed
    affinity element; None for one that cannot be carried (expired, unexpected form)."""
    body = item.get("elem", item) if isinstance(item, dict) else None
    if not isinstance(body, dict):
        return None
    val = body.get("val", body)
    key = val.get("concat") if isinstance(val, dict) else None
    if not isinstance(key, list) or len(key) != 2:
        return None
    client, ident = key
    if not isinstance(client, str) or not isinstance(ident, int) or isinstance(ident, bool):
        return None
    if not re.fullmatch(r"[0-9A-Fa-f.:]+", client):
        return None
    text = f"{client} . {ident}"
    timeout, expires = body.get("timeout"), body.get("expires")
    if isinstance(timeout, int) and timeout > 0:
        text += f" timeout {timeout}s"
        if isinstance(expires, int):
            if expires <= 0:
                return None
            text += f" expires {min(expires, timeout)}s"
    return ident, text


def _tables_named(tables: list[str]) -> str:
    """``table ip t`` / ``tables ip t and ip6 t``."""
    if len(tables) == 1:
        return f"table {tables[0]}"
    return f"tables {' and '.join(tables)}"


def _compare(want: dict[str, Any], have: dict[str, Any], lingering: set[str]) -> list[str]:
    """In words, each object whose content differs between ``want`` (the script, as nft
    lists it) and ``have`` (the kernel): Content, or (kind, count) when only names and
    counts could be compared."""
    problems = []
    for name in sorted(set(want) | set(have)):
        if name in lingering and name not in want:
            continue
        a, b = want.get(name), have.get(name)
        if a != b:
            problems.append(_difference(name, a, b))
    return problems


def _kind(value: Any) -> str:
    return str(value.kind if isinstance(value, Content) else value[0])


def _difference(name: str, want: Any, have: Any) -> str:
    family, _, obj = name.partition(" ")
    where = f"{_kind(want if want is not None else have)} {family} {obj}"
    if have is None:
        return f"{where}: missing from the kernel"
    if want is None:
        return f"{where}: in the kernel, but svcrules did not write it"
    if _kind(want) != _kind(have):
        return f"{family} {obj}: svcrules wrote a {_kind(want)}, the kernel holds a {_kind(have)}"
    if isinstance(want, Content) and isinstance(have, Content):
        return f"{where}: {want.differences(have)}"
    what = "rule" if _kind(want) == "chain" else "element"
    return f"{where}: {_plural(want[1], what)} expected, the kernel holds {have[1]}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass(frozen=True)
class Content:
    """One object as nft lists it: declaration, and rules or elements, normalised."""

    kind: str
    declaration: str
    items: tuple[str, ...]

    def differences(self, have: Content) -> str:
        """What differs, in words (the objects are of the same kind)."""
        if self.declaration != have.declaration:
            mine, theirs = json.loads(self.declaration), json.loads(have.declaration)
            keys = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k))
            return f"declared differently (its {', '.join(keys)})"
        if self.kind == "chain":
            apart = len(set(self.items) ^ set(have.items))
            order = f", {apart} not in both" if apart else ", in another order"
            return (
                f"rules differ: {len(self.items)} expected, the kernel holds "
                f"{len(have.items)}{order}"
            )
        missing = sorted(set(self.items) - set(have.items))
        extra = sorted(set(have.items) - set(self.items))
        parts = []
        for items, what in ((missing, "missing"), (extra, "svcrules did not write")):
            if items:
                more = ", ..." if len(items) > 1 else ""
                parts.append(
                    f"{_plural(len(items), 'element')} {what} ({_element(items[0])}{more})"
                )
        return "; ".join(parts) or "elements differ"


def _element(listed: str) -> str:
    """An element of nft's JSON listing as nft writes it (``a . b : goto c``)."""
    return _spell(json.loads(listed))[:200]


def _spell(value: Any) -> str:
    if isinstance(value, list) and len(value) == 2:  # a map element: key, data
        return f"{_spell(value[0])} : {_spell(value[1])}"
    if isinstance(value, dict) and len(value) == 1:
        kind, body = next(iter(value.items()))
        if kind == "concat" and isinstance(body, list):
            return " . ".join(_spell(v) for v in body)
        if kind == "prefix" and isinstance(body, dict):
            return f"{_spell(body.get('addr'))}/{body.get('len')}"
        if kind == "range" and isinstance(body, list):
            return "-".join(_spell(v) for v in body)
        if kind == "elem" and isinstance(body, dict):
            note = body.get("comment")
            return _spell(body.get("val")) + (f' comment "{note}"' if note else "")
        if kind in ("goto", "jump") and isinstance(body, dict):
            return f"{kind} {body.get('target')}"
        if body is None:
            return str(kind)  # a verdict: accept, drop, ...
    if isinstance(value, str | int):
        return str(value)
    return json.dumps(value, sort_keys=True)


def _norm(value: Any) -> Any:
    """Without handles, counter values and element expiry: what svcrules decides."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in ("handle", "expires", "index"):
                continue
            out[k] = None if k == "counter" else _norm(v)
        return out
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def listed_content(listing: list[dict[str, Any]]) -> dict[str, Any]:
    """ "family name" -> Content of each set, map and chain in nft's JSON listing."""
    out: dict[str, Any] = {}
    rules: dict[str, list[str]] = {}
    for o in listing:
        kind = next(iter(o))
        body = _norm(o[kind])
        if kind in ("set", "map"):
            flags = body.get("flags", [])
            dynamic = "dynamic" in flags or "timeout" in flags  # filled by packets
            elems = [] if dynamic else body.pop("elem", [])
            body.pop("elem", None)
            items = tuple(sorted(json.dumps(e, sort_keys=True) for e in elems))
            decl = json.dumps(body, sort_keys=True)
            out[f"{body['family']} {body['name']}"] = Content(kind, decl, items)
        elif kind == "chain":
            out[f"{body['family']} {body['name']}"] = Content(
                "chain", json.dumps(body, sort_keys=True), ()
            )
        elif kind == "rule":
            rule = {k: v for k, v in body.items() if k not in ("family", "table", "chain")}
            key = f"{body['family']} {body['chain']}"
            rules.setdefault(key, []).append(json.dumps(rule, sort_keys=True))
    for key, listed in rules.items():
        chain = out.get(key)
        if isinstance(chain, Content):
            out[key] = Content("chain", chain.declaration, tuple(listed))
    return out


def _structure_of_script(script: str) -> dict[str, Any]:
    out: dict[str, tuple[str, int]] = {}
    for (fam, _), tbl in parse_script(script).items():
        for name, obj in tbl.objects.items():
            dynamic = any("dynamic" in h for h in obj.header)
            out[f"{fam} {name}"] = (obj.kind, 0 if dynamic else len(obj.items))
    return out
