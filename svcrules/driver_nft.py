"""The nftables backend's side of a run: fingerprints, diffs, sending, cleanup.

svcrules owns two whole tables (``ip`` and ``ip6`` NAME); each holds a ``state`` set
whose one element carries the fingerprint of the last script. That element is also the
proof of ownership: a table of the owned name without it is another program's, and is
neither replaced nor deleted (svcrules.owned).
"""

from __future__ import annotations

from collections.abc import Sequence

from svcrules.backends.nftables import fingerprint_of
from svcrules.compiler import Ruleset
from svcrules.incremental import Transaction, diff_scripts, parse_script
from svcrules.kernel import Backend, KernelError, list_json
from svcrules.owned import MARK, TABLE_COMMENT, check_name, not_ours

FAMILIES = ("ip", "ip6")


class NftDriver:
    backend = "nftables"

    def __init__(self, kernel: Backend) -> None:
        self.kernel = kernel
        self.name = kernel.name

    def text(self, ruleset: Ruleset) -> str:
        return ruleset.nft

    def fingerprint_of(self, text: str) -> str | None:
        return fingerprint_of(text)

    def expected(self, text: str) -> dict[str, str | None]:
        """Both tables carry the fingerprint of the whole script."""
        return dict.fromkeys(FAMILIES, fingerprint_of(text))

    def fingerprints(self, table: str) -> dict[str, str | None]:
        """The fingerprint in each owned table's state set (None: absent)."""
        out: dict[str, str | None] = {}
        for fam in FAMILIES:
            comments = self._state_comments(fam, table)
            out[fam] = fingerprint_of(" ".join(f'comment "{c}"' for c in comments))
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
        return diff_scripts(old, ruleset.tables, stale)

    def full(
        self, ruleset: Ruleset, table: str, previous: str | None, retire: Sequence[str] = ()
    ) -> tuple[str, int]:
        """The rendered script replaces both tables whole (create, delete, recreate), and
        deletes the tables of earlier names (``retire``) that svcrules made, all in one
        transaction. A table of the owned name that svcrules did not make is refused."""
        present = self._tables()
        self._check_ours(table, present)
        gone = [t for t in self.owned_tables(list(retire), present) if t.split()[1] != table]
        ops = sum(1 + len(obj.items) for t in ruleset.tables.values() for obj in t.objects.values())
        script = ruleset.nft
        if gone:
            at = script.find("\ntable ") + 1
            deletes = "".join(f"delete table {t}\n" for t in gone)
            script = script[:at] + deletes + script[at:]
        return script, ops + len(gone)

    def send(self, script: str, tx: Transaction | None) -> tuple[str, list[str]]:
        """Run the transaction; return what was sent and the objects left for later."""
        try:
            self.kernel.run(script)
        except KernelError as exc:
            if tx is None or not tx.deletions or "busy" not in str(exc).lower():
                raise
            # Older kernels refuse to delete a chain in the transaction that drops its
            # last reference (EBUSY). Send the rest now; delete the objects on a later run.
            script = tx.script(with_deletions=False)
            self.kernel.run(script)
            return script, list(tx.deleted)
        return script, []

    def check(self, script: str) -> None:
        self.kernel.run(script, check_only=True)

    def verify(self, table: str, script: str, stale: list[str]) -> list[str]:
        """Differences between the kernel's tables and a script: names and counts."""
        want = _structure_of_script(script)
        have = self._structure_of_kernel(table)
        lingering = {" ".join((s.split(" ")[0], s.split(" ")[2])) for s in stale}
        problems = []
        for name in sorted(set(want) | set(have)):
            if name in lingering and name not in want:
                continue
            if want.get(name) != have.get(name):
                problems.append(f"{name}: expected {want.get(name)}, kernel has {have.get(name)}")
        return problems

    def _structure_of_kernel(self, table: str) -> dict[str, tuple[str, int]]:
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


def _structure_of_script(script: str) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for (fam, _), tbl in parse_script(script).items():
        for name, obj in tbl.objects.items():
            dynamic = any("dynamic" in h for h in obj.header)
            out[f"{fam} {name}"] = (obj.kind, 0 if dynamic else len(obj.items))
    return out
