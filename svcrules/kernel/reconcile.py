"""Bring the kernel to a compiled ruleset: plan the change, send it, verify it.

A run reads the fingerprint svcrules left in the kernel (one tiny set or chain
per owned table) and compares it with the state directory. When they agree, it
sends only the difference between the last text and the new one; when they do
not (first run, lost state, someone changed the rules), it replaces everything
svcrules owns. Each backend's driver (nft/driver.py, iptables/driver.py; found by name in
registry.py) knows how; this module never asks which backend it has.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from svcrules.compiler import Job, Ruleset
from svcrules.errors import KernelError, NeedsFullReplacement, SvcrulesError
from svcrules.inputs.owned import check_name
from svcrules.kernel.conntrack import cleanup_commands, run_cleanup
from svcrules.kernel.nft.transport import first_error
from svcrules.kernel.state import COUNTERS, Meta, StateStore
from svcrules.kernel.stats import stats
from svcrules.progress import phase

if TYPE_CHECKING:
    from svcrules.compiler.compile_cache import Cache


class Tx(Protocol):
    """A transaction of either backend: incremental, or a full replacement."""

    @property
    def operations(self) -> int: ...

    @property
    def deleted(self) -> list[str]:
        """ "family kind name" of each object deleted, as a stale entry names it."""
        ...

    def script(self) -> str: ...

    @property
    def empty(self) -> bool: ...

    @property
    def applied(self) -> str | None:
        """The text the kernel holds once this is sent, when it is not the compiled text
        (nft: stable slots permute the pick maps); None: the compiled text."""
        ...

    def describe(self) -> str: ...


class Driver(Protocol):
    """One backend's dealings with the kernel (nft/driver.py, iptables/driver.py)."""

    backend: str  # its name in svcrules.kernel.registry
    name: str  # the kernel interface used (libnftables, nft, iptables-nft, ...)

    @property
    def tool(self) -> str:
        """The tools whose rules this run keeps, when another's cannot see them ("" when
        every interface of the backend sees the same rules)."""
        ...

    def text(self, ruleset: Ruleset) -> str: ...

    def sizes(self, ruleset: Ruleset) -> tuple[int, int, int]: ...

    def fingerprint_of(self, text: str) -> str | None: ...

    def expected(self, text: str) -> dict[str, str | None]: ...

    def fingerprints(self, table: str) -> dict[str, str | None]: ...

    def explain_drift(
        self, table: str, kernel: dict[str, str | None], expected: dict[str, str | None]
    ) -> list[str]:
        """In words, where the fingerprints the kernel holds (``fingerprints``) differ
        from those of a text (``expected``): one line per table or place."""
        ...

    def incremental(self, old: str, ruleset: Ruleset, stale: set[str]) -> Tx: ...

    def full(
        self, ruleset: Ruleset, table: str, previous: str | None, retire: Sequence[str] = ()
    ) -> Tx: ...

    def send(self, script: str, tx: Any) -> tuple[str, list[str]]:
        """Send ``script`` (``tx``'s script, or a part of it); return what was sent and
        the objects left in the kernel for a later run to delete."""
        ...

    def check(self, script: str) -> None: ...

    def verify(self, table: str, script: str, stale: list[str]) -> list[str]: ...

    def cleanup(self, table: str | None, known: Sequence[str] = ()) -> list[str]: ...


@dataclass
class Change:
    """What a run would do (``diff``) or did (``apply``)."""

    mode: str  # "noop", "incremental" or "full"
    reason: str
    script: str  # the exact transaction (nft script or iptables-restore inputs)
    operations: int
    tx: Tx | None  # None: nothing to send
    new_script: str
    new_meta: Meta
    old_meta: Meta
    stale_after: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    kernel_seconds: float = 0.0  # reading the fingerprints, sending, verifying
    # An incremental change: the full replacement to send instead if the kernel refuses it,
    # and the compiled text that replacement writes (new_script may be a permutation of it).
    fallback: Callable[[], Tx] | None = field(default=None, repr=False)
    compiled: str = field(default="", repr=False)
    # The compile cache to keep once the change is applied (None: keep the one there).
    cache: Cache | None = field(default=None, repr=False)
    # Ruleset.triggers of the compiled inputs (None: nothing was compiled).
    triggers: dict[str, str] | None = field(default=None, repr=False)

    @property
    def changed(self) -> bool:
        return self.mode != "noop"


def _agree(kernel: dict[str, str | None], expected: dict[str, str | None]) -> bool:
    """Whether every place the kernel was read holds the fingerprint the text carries."""
    return bool(kernel) and all(kernel.get(k) == v is not None for k, v in expected.items())


def _check_backend(driver: Driver, old_script: str | None, old_meta: Meta) -> None:
    """One state directory, one backend at a time: both at once would fight over packets."""
    if old_script is None and not old_meta.table:
        return
    if old_meta.backend != driver.backend:
        raise SvcrulesError(
            f"the node holds svcrules' {old_meta.backend} rules (per the state directory); "
            f"remove them with 'svcrules cleanup --backend {old_meta.backend}' before "
            f"applying with --backend {driver.backend}"
        )
    if driver.tool and old_meta.tool and old_meta.tool != driver.tool:
        backend = driver.backend
        variant = old_meta.tool.removeprefix(f"{backend}-")
        raise SvcrulesError(
            f"svcrules' rules on this node were applied with {old_meta.tool}, and this run "
            f"would use {driver.tool}: pass --{backend} {variant}, or remove them first with "
            f"'svcrules cleanup --backend {backend} --{backend} {variant}'"
        )


def plan_change(job: Job, driver: Driver, store: StateStore, verify: bool = False) -> Change:
    """Decide between no-op, incremental update and full replacement.

    When the inputs (and svcrules itself) are byte-for-byte those of the last apply and
    the kernel still holds its fingerprint, nothing is compiled at all."""
    old_script, old_meta = store.load()
    if old_script is not None and driver.fingerprint_of(old_script) != old_meta.fingerprint:
        store.damaged = "the saved script does not carry the saved fingerprint"
        old_script = None
    _check_backend(driver, old_script, old_meta)
    table = job.overrides.table_name or old_meta.table
    kernel, kernel_seconds = _timed(lambda: driver.fingerprints(table) if table else {})
    old_expected = driver.expected(old_script) if old_script is not None else {}
    in_kernel = bool(table) and _agree(kernel, old_expected)
    if (
        old_script is not None
        and in_kernel
        and not verify
        and old_meta.input_digest == job.digest
        and old_meta.table == table
        and not old_meta.stale  # objects a refused delete left: delete them now
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

    warnings: list[str] = []
    ruleset = job.compile(driver.backend, cache=store.load_cache(warnings), keep=True)
    new_script = driver.text(ruleset)
    new_meta = _new_meta(job, ruleset, driver, new_script, old_meta)
    if ruleset.plan.table != table:
        table = ruleset.plan.table
        kernel, seconds = _timed(lambda: driver.fingerprints(table))
        kernel_seconds += seconds
    drift = (
        [] if _agree(kernel, old_expected) else driver.explain_drift(table, kernel, old_expected)
    )
    reason = _why_full(store, driver, table, drift, old_script, old_meta, verify)
    # A full replacement also removes what svcrules made under earlier table names
    # (proven its own; others' are left alone), in the same transaction: afterwards
    # only the current name holds svcrules' rules.
    retire = [n for n in old_meta.owned if n != table]
    if not reason and old_script is not None:
        try:
            with phase("working out the incremental change") as step:
                tx = driver.incremental(old_script, ruleset, set(old_meta.stale))
                step.detail = f"{tx.operations:,} operations"
        except NeedsFullReplacement as exc:
            reason = str(exc)
        else:
            mode = "noop" if tx.empty else "incremental"
            stale_after = [s for s in old_meta.stale if s not in tx.deleted]
            if tx.applied is not None:
                new_meta.fingerprint = driver.fingerprint_of(tx.applied) or ""
            return Change(
                mode,
                "",
                tx.script(),
                tx.operations,
                tx,
                new_script if tx.applied is None else tx.applied,
                new_meta,
                old_meta,
                stale_after,
                problems=warnings,
                kernel_seconds=kernel_seconds,
                fallback=lambda: driver.full(ruleset, table, old_script, retire),
                compiled=new_script,
                cache=ruleset.next_cache,
                triggers=ruleset.triggers,
            )
    with phase("writing the full replacement") as step:
        full, seconds = _timed(lambda: driver.full(ruleset, table, old_script, retire))
        step.detail = f"{full.operations:,} operations"
    new_meta.owned = [table]
    return Change(
        "full",
        reason,
        full.script(),
        full.operations,
        full,
        new_script,
        new_meta,
        old_meta,
        problems=warnings + _problems_of(full),
        kernel_seconds=kernel_seconds + seconds,
        cache=ruleset.next_cache,
        triggers=ruleset.triggers,
    )


def _problems_of(tx: Tx) -> list[str]:
    """What a driver noted while building a transaction (nft: affinity it could not
    carry over); nothing for drivers that note nothing."""
    return list(getattr(tx, "problems", []))


T = TypeVar("T")


def _timed(call: Callable[[], T]) -> tuple[T, float]:
    """The result of ``call`` and the seconds it took (time spent in the kernel)."""
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def _new_meta(job: Job, ruleset: Ruleset, driver: Driver, script: str, old: Meta) -> Meta:
    """What the state directory will say once ``script`` is applied."""
    meta = Meta.of_plan(
        ruleset.plan, driver.fingerprint_of(script) or "", ruleset.port_digests, previous=old
    )
    for name in COUNTERS:
        setattr(meta, name, getattr(old, name))
    meta.input_digest = job.digest
    meta.table = ruleset.plan.table
    meta.backend = driver.backend
    meta.tool = driver.tool
    meta.counts = dataclasses.asdict(stats(ruleset, driver.sizes(ruleset)))
    meta.owned = list(dict.fromkeys([*old.owned, ruleset.plan.table]))
    meta.invalid = [str(p) for p in ruleset.skipped]
    return meta


def _why_full(
    store: StateStore,
    driver: Driver,
    table: str,
    drift: list[str],
    old_script: str | None,
    old_meta: Meta,
    verify: bool,
) -> str:
    """Why the kernel must be replaced whole ("" when an incremental change may do);
    ``drift``: where the kernel does not hold the fingerprints of ``old_script``."""
    if old_script is None:
        return f"{store.damaged}: ignored it" if store.damaged else "no saved state (first run)"
    if old_meta.table != table:
        return f"the owned table changed from {old_meta.table!r} to {table!r}"
    if drift:
        return (
            f"the kernel's {driver.backend} rules differ from what svcrules last wrote: "
            + "; ".join(drift)
        )
    if verify:
        with phase(f"verifying the {driver.backend} rules in the kernel"):
            found = driver.verify(table, old_script, old_meta.stale)
        if found:
            more = f"; and {len(found) - 3} more differences" if len(found) > 3 else ""
            return "verification found drift: " + "; ".join(found[:3]) + more
    return ""


def execute(change: Change, driver: Driver, store: StateStore) -> None:
    """Send the change, verify it, remember it, clean conntrack."""
    if change.mode == "noop":
        _keep_summary(change, store)
        return
    table = change.new_meta.table
    started = time.monotonic()
    try:
        with phase("sending the transaction to the kernel") as step:
            step.detail = f"{change.mode}, {change.operations:,} operations"
            change.script, left = driver.send(change.script, change.tx)
    except KernelError as exc:
        if change.mode != "incremental" or change.fallback is None:
            raise
        with phase("sending a full replacement to the kernel"):
            _fall_back(change, driver, exc)
        left = []
    change.stale_after = sorted(set(change.stale_after) | set(left))
    kernel = driver.fingerprints(table)
    change.kernel_seconds += time.monotonic() - started
    expected = driver.expected(change.new_script)
    if not _agree(kernel, expected):
        drift = "; ".join(driver.explain_drift(table, kernel, expected))
        raise KernelError(f"verification failed: after sending, {drift}")
    change.new_meta.stale = change.stale_after
    change.new_meta.last_success = time.time()
    with phase("saving the state"):
        store.save(change.new_script, change.new_meta)
        if change.cache is not None:
            try:
                store.save_cache(change.cache)
            except SvcrulesError as exc:  # only a speed-up: the rules and state are in place
                change.problems.append(f"compile cache not kept: {exc}")
    commands = cleanup_commands(change.old_meta.udp, change.new_meta.udp)
    if commands:
        with phase("deleting stale UDP conntrack entries") as step:
            step.detail = f"{len(commands)} conntrack commands"
            change.problems += run_cleanup(commands)


def _keep_summary(change: Change, store: StateStore) -> None:
    """A compile that changes no rule may still change what ``svcrules serve`` answers:
    a node's last ready endpoint of an externalTrafficPolicy Local Service turning
    serving-terminating keeps the rules (they fall back to it) but fails the health
    check. Save the new summary with the unchanged script then, so that the answers
    follow (the kernel holds that script: same fingerprint)."""
    new, old = change.new_meta, change.old_meta
    if change.tx is None or new is old or new.health == old.health:
        return
    if new.fingerprint != old.fingerprint:
        return  # not the script the kernel holds: never record it
    new.stale = change.stale_after
    new.last_success = time.time()
    store.save(change.new_script, new)


def cleanup(driver: Driver, store: StateStore, table: str | None) -> list[str]:
    """Delete the backend's owned rules (nothing else) and the saved state; return what
    went. With a table name, only that name's rules, refused when another program owns
    it; without, every name the state directory recorded and every table or chain
    prefix that carries svcrules' mark (found even when the state was lost)."""
    _, meta = store.load()
    with phase(f"removing svcrules' {driver.backend} rules") as step:
        if table is not None:
            check_name(table)
            gone = driver.cleanup(table)
        else:
            gone = driver.cleanup(None, [*meta.owned, meta.table or "svcrules"])
        step.detail = ", ".join(gone) or "nothing to remove"
    same_tool = not driver.tool or not meta.tool or meta.tool == driver.tool
    if (meta.backend == driver.backend and same_tool) or not store.has_state():
        store.clear()
    return gone


def _fall_back(change: Change, driver: Driver, exc: KernelError) -> None:
    """The kernel refused the incremental change (and kept the previous rules): it does
    not hold what the saved script says. Replace everything svcrules owns in the same
    run, atomically, rather than fail the same way on every run until someone notices."""
    assert change.fallback is not None
    first = first_error(exc)
    change.tx = change.fallback()
    change.script, change.operations = change.tx.script(), change.tx.operations
    change.mode, change.stale_after = "full", []
    change.new_script = change.compiled or change.new_script
    change.new_meta.fingerprint = driver.fingerprint_of(change.new_script) or ""
    change.new_meta.owned = [change.new_meta.table]
    change.reason = f"incremental refused: {first}; fell back to full replacement"
    change.problems.append(
        f"the kernel refused the incremental change ({first}); all of svcrules' rules "
        "were replaced instead"
    )
    change.problems += _problems_of(change.tx)
    try:
        change.script, _ = driver.send(change.script, change.tx)
    except KernelError as again:
        raise KernelError(
            f"the kernel refused the incremental change ({first}), and the full "
            f"replacement too: {again}"
        ) from None
