"""Bring the kernel to a compiled ruleset: plan the change, send it, verify it.

A run reads one element per owned table (the ``state`` set's fingerprint) and
compares it with the state directory. When they agree, it sends only the
difference between the last script and the new one; when they do not (first
run, lost state, someone changed the tables), it replaces the tables whole.
Either way the change is one nft transaction.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from svcrules.backends.nftables import fingerprint_of
from svcrules.compiler import Job
from svcrules.conntrack import cleanup_commands, run_cleanup
from svcrules.incremental import (
    NeedsFullReplacement,
    Tables,
    Transaction,
    diff_scripts,
    parse_script,
)
from svcrules.kernel import Backend, KernelError, list_json
from svcrules.state import Meta, StateStore
from svcrules.stats import stats

FAMILIES = ("ip", "ip6")


@dataclass
class Change:
    """What a run would do (``diff``) or did (``apply``)."""

    mode: str  # "noop", "incremental" or "full"
    reason: str
    script: str  # the exact nft transaction
    operations: int
    tx: Transaction | None
    new_script: str
    new_meta: Meta
    old_meta: Meta
    stale_after: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    kernel_seconds: float = 0.0  # reading the fingerprints, sending, verifying

    @property
    def changed(self) -> bool:
        return self.mode != "noop"


def kernel_fingerprints(backend: Backend, table: str) -> dict[str, str | None]:
    """The fingerprint in each owned table's state set (None: absent)."""
    out: dict[str, str | None] = {}
    for fam in FAMILIES:
        comments = [
            e["elem"].get("comment", "")
            for o in list_json(backend, f"set {fam} {table} state")
            if "set" in o
            for e in o["set"].get("elem", [])
            if isinstance(e, dict) and "elem" in e
        ]
        out[fam] = fingerprint_of(" ".join(f'comment "{c}"' for c in comments))
    return out


def structure_of_kernel(backend: Backend, table: str) -> dict[str, tuple[str, int]]:
    """Object name -> (kind, rule or element count), read from the kernel."""
    out: dict[str, tuple[str, int]] = {}
    for fam in FAMILIES:
        for o in list_json(backend, f"table {fam} {table}"):
            kind = next(iter(o))
            body = o[kind]
            if kind in ("set", "map"):
                dynamic = "dynamic" in body.get("flags", []) or "timeout" in body.get("flags", [])
                out[f"{fam} {body['name']}"] = (kind, 0 if dynamic else len(body.get("elem", [])))
            elif kind == "chain":
                key = f"{fam} {body['name']}"
                out.setdefault(key, ("chain", 0))
            elif kind == "rule":
                key = f"{fam} {body['chain']}"
                out[key] = ("chain", out.get(key, ("chain", 0))[1] + 1)
    return out


def structure_of_script(script: str) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for (fam, _), tbl in parse_script(script).items():
        for name, obj in tbl.objects.items():
            dynamic = any("dynamic" in h for h in obj.header)
            out[f"{fam} {name}"] = (obj.kind, 0 if dynamic else len(obj.items))
    return out


def verify_structure(backend: Backend, table: str, script: str, stale: list[str]) -> list[str]:
    """Differences between the kernel's tables and a script: names and counts."""
    want = structure_of_script(script)
    have = structure_of_kernel(backend, table)
    lingering = {" ".join((s.split(" ")[0], s.split(" ")[2])) for s in stale}
    problems = []
    for name in sorted(set(want) | set(have)):
        if name in lingering and name not in want:
            continue
        if want.get(name) != have.get(name):
            problems.append(f"{name}: expected {want.get(name)}, kernel has {have.get(name)}")
    return problems


def _full_operations(tables: Tables) -> int:
    return sum(1 + len(obj.items) for t in tables.values() for obj in t.objects.values())


def plan_change(job: Job, backend: Backend, store: StateStore, verify: bool = False) -> Change:
    """Decide between no-op, incremental update and full replacement.

    When the inputs (and svcrules itself) are byte-for-byte those of the last apply and
    the kernel still holds its fingerprint, nothing is compiled at all."""
    old_script, old_meta = store.load()
    table = job.overrides.table_name or old_meta.table
    started = time.monotonic()
    kernel = kernel_fingerprints(backend, table) if table else {}
    kernel_seconds = time.monotonic() - started
    in_kernel = bool(table) and all(kernel[f] == old_meta.fingerprint for f in FAMILIES)
    if (
        old_script is not None
        and in_kernel
        and not verify
        and old_meta.input_digest == job.digest
        and old_meta.table == table
    ):
        return Change(
            "noop",
            "",
            "",
            0,
            None,
            old_script,
            old_meta,
            old_meta,
            list(old_meta.stale),
            kernel_seconds=kernel_seconds,
        )

    ruleset = job.compile()
    new_script = ruleset.nft
    fingerprint = fingerprint_of(new_script) or ""
    new_meta = Meta.of_plan(ruleset.plan, fingerprint)
    new_meta.failures, new_meta.last_success = old_meta.failures, old_meta.last_success
    new_meta.input_digest = job.digest
    new_meta.table = ruleset.plan.table
    new_meta.counts = dataclasses.asdict(stats(ruleset))
    if ruleset.plan.table != table:
        table = ruleset.plan.table
        started = time.monotonic()
        kernel = kernel_fingerprints(backend, table)
        kernel_seconds += time.monotonic() - started

    reason = ""
    if old_script is None:
        reason = "no saved state (first run)"
    elif old_meta.table != table:
        reason = f"the owned table changed from {old_meta.table!r} to {table!r}"
    elif any(kernel[f] != old_meta.fingerprint for f in FAMILIES):
        reason = "the kernel's tables differ from what svcrules last wrote"
    elif verify:
        drift = verify_structure(backend, table, old_script, old_meta.stale)
        if drift:
            reason = "verification found drift: " + "; ".join(drift[:3])
    if not reason and old_script is not None:
        try:
            tx = diff_scripts(old_script, ruleset.tables, set(old_meta.stale))
        except NeedsFullReplacement as exc:
            reason = str(exc)
        else:
            mode = "noop" if tx.empty else "incremental"
            stale_after = [s for s in old_meta.stale if s not in tx.deleted]
            return Change(
                mode,
                "",
                tx.script(),
                tx.operations,
                tx,
                new_script,
                new_meta,
                old_meta,
                stale_after,
                kernel_seconds=kernel_seconds,
            )
    return Change(
        "full",
        reason,
        new_script,
        _full_operations(ruleset.tables),
        None,
        new_script,
        new_meta,
        old_meta,
        kernel_seconds=kernel_seconds,
    )


def execute(change: Change, backend: Backend, store: StateStore) -> None:
    """Send the change as one transaction, verify it, remember it, clean conntrack."""
    if change.mode == "noop":
        return
    table = change.new_meta.table
    started = time.monotonic()
    try:
        backend.run(change.script)
    except KernelError as exc:
        tx = change.tx
        if tx is None or not tx.deletions or "busy" not in str(exc).lower():
            raise
        # Older kernels refuse to delete a chain in the transaction that drops its last
        # reference (EBUSY). Send the rest now; the objects are deleted on a later run.
        backend.run(tx.script(with_deletions=False))
        change.script = tx.script(with_deletions=False)
        change.stale_after = sorted(set(change.stale_after) | set(tx.deleted))
    kernel = kernel_fingerprints(backend, table)
    change.kernel_seconds += time.monotonic() - started
    if any(kernel[f] != change.new_meta.fingerprint for f in FAMILIES):
        raise KernelError(
            f"verification failed: the kernel holds {kernel}, "
            f"expected {change.new_meta.fingerprint}"
        )
    change.new_meta.stale = change.stale_after
    change.new_meta.last_success = time.time()
    store.save(change.new_script, change.new_meta)
    change.problems = run_cleanup(cleanup_commands(change.old_meta.udp, change.new_meta.udp))


def cleanup(backend: Backend, store: StateStore, table: str | None) -> list[str]:
    """Delete the owned tables (nothing else) and the saved state; return what went.
    Without a table name, the one svcrules last wrote (or the default) is meant."""
    _, meta = store.load()
    name = table or meta.table or "svcrules"
    present = [
        f
        for f in FAMILIES
        if any(
            "table" in o and o["table"]["name"] == name and o["table"]["family"] == f
            for o in list_json(backend, "tables")
        )
    ]
    if present:
        backend.run("".join(f"delete table {f} {name}\n" for f in present))
    store.clear()
    return [f"{f} {name}" for f in present]
