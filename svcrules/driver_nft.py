"""The nftables backend's side of a run: fingerprints, diffs, sending, cleanup.

svcrules owns two whole tables (``ip`` and ``ip6`` NAME); each holds a ``state`` set
whose one element carries the fingerprint of the last script.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from svcrules.backends.nftables import fingerprint_of
from svcrules.compiler import Ruleset
from svcrules.incremental import Transaction, diff_scripts, parse_script
from svcrules.kernel import Backend, KernelError, list_json

FAMILIES = ("ip", "ip6")
BUSY_SEARCHES = 8  # objects still in use looked for one by one; beyond, all deletions wait


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
        """Run the transaction; return what was sent and the objects left for later.

        Deletions come in dependency order, so a kernel refuses one (EBUSY) only while
        something svcrules does not know of still uses the object. Which one is found
        with dry runs (nft's message may name another command of the batch); it is left
        out, emptied, for a later run to delete, and the rest is sent again."""
        left: set[str] = set()
        while True:
            try:
                self.kernel.run(script)
            except KernelError as exc:
                if tx is None or not tx.deletions or "busy" not in str(exc).lower():
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
        loaded = _load_elsewhere(script, table)
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


def _compare(want: dict[str, Any], have: dict[str, Any], lingering: set[str]) -> list[str]:
    problems = []
    for name in sorted(set(want) | set(have)):
        if name in lingering and name not in want:
            continue
        a, b = want.get(name), have.get(name)
        if a == b:
            continue
        if isinstance(a, Content) and isinstance(b, Content):
            problems.append(f"{name}: {a.differences(b)}")
        else:
            problems.append(f"{name}: expected {_short(a)}, kernel has {_short(b)}")
    return problems


def _short(value: Any) -> str:
    if value is None:
        return "none"
    return value.kind if isinstance(value, Content) else str(value)


@dataclass(frozen=True)
class Content:
    """One object as nft lists it: declaration, and rules or elements, normalised."""

    kind: str
    declaration: str
    items: tuple[str, ...]

    def differences(self, have: Content) -> str:
        if self.kind != have.kind or self.declaration != have.declaration:
            return f"declared differently ({self.declaration} / {have.declaration})"
        if self.kind == "chain":
            return f"rules differ ({len(self.items)} expected, {len(have.items)} in the kernel)"
        missing = sorted(set(self.items) - set(have.items))
        extra = sorted(set(have.items) - set(self.items))
        shown = f"; e.g. {(missing or extra)[0][:200]}" if missing or extra else ""
        return f"{len(missing)} elements missing, {len(extra)} unexpected{shown}"


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


def _load_elsewhere(script: str, table: str) -> list[dict[str, Any]] | None:
    """The objects of ``script`` as nft lists them once loaded, in a network namespace
    made for the purpose and gone when nft exits (nothing of the node's is touched);
    None when that is not possible here."""
    nft, unshare = shutil.which("nft"), shutil.which("unshare")
    if nft is None or unshare is None:
        return None
    lister = " && ".join(f'"$0" -j list table {fam} {table}' for fam in FAMILIES)
    proc = subprocess.run(
        [unshare, "--net", "sh", "-c", f'"$0" -f - && {lister}', nft],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    out: list[dict[str, Any]] = []
    for chunk in proc.stdout.splitlines():
        if chunk.strip():
            out += [o for o in json.loads(chunk).get("nftables", []) if "metainfo" not in o]
    return out


def _structure_of_script(script: str) -> dict[str, Any]:
    out: dict[str, tuple[str, int]] = {}
    for (fam, _), tbl in parse_script(script).items():
        for name, obj in tbl.objects.items():
            dynamic = any("dynamic" in h for h in obj.header)
            out[f"{fam} {name}"] = (obj.kind, 0 if dynamic else len(obj.items))
    return out
