"""The nftables backend's side of a run: fingerprints, diffs, sending, cleanup.

svcrules owns two whole tables (``ip`` and ``ip6`` NAME); each holds a ``state`` set
whose one element carries the fingerprint of the last script.
"""

from __future__ import annotations

from svcrules.backends.nftables import fingerprint_of
from svcrules.compiler import Ruleset
from svcrules.incremental import Transaction, diff_scripts, parse_script
from svcrules.kernel import Backend, KernelError, list_json

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
            comments = [
                e["elem"].get("comment", "")
                for o in list_json(self.kernel, f"set {fam} {table} state")
                if "set" in o
                for e in o["set"].get("elem", [])
                if isinstance(e, dict) and "elem" in e
            ]
            out[fam] = fingerprint_of(" ".join(f'comment "{c}"' for c in comments))
        return out

    def incremental(self, old: str, ruleset: Ruleset, stale: set[str]) -> Transaction:
        return diff_scripts(old, ruleset.tables, stale)

    def full(self, ruleset: Ruleset, table: str, previous: str | None) -> tuple[str, int]:
        """The rendered script replaces both tables whole (create, delete, recreate)."""
        ops = sum(1 + len(obj.items) for t in ruleset.tables.values() for obj in t.objects.values())
        return ruleset.nft, ops

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

    def cleanup(self, table: str) -> list[str]:
        """Delete the owned tables, nothing else."""
        present = [
            f
            for f in FAMILIES
            if any(
                "table" in o and o["table"]["name"] == table and o["table"]["family"] == f
                for o in list_json(self.kernel, "tables")
            )
        ]
        if present:
            self.kernel.run("".join(f"delete table {f} {table}\n" for f in present))
        return [f"{f} {table}" for f in present]


def _structure_of_script(script: str) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for (fam, _), tbl in parse_script(script).items():
        for name, obj in tbl.objects.items():
            dynamic = any("dynamic" in h for h in obj.header)
            out[f"{fam} {name}"] = (obj.kind, 0 if dynamic else len(obj.items))
    return out
