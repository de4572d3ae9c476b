"""``diff``, ``apply``, ``sync`` and ``cleanup``: the commands that touch the kernel.

Exit codes follow ``kubectl diff``: 0 no change, 1 changes (``diff`` only),
2 bad input or a refused transaction.
"""

from __future__ import annotations

import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from svcrules.cli import app
from svcrules.cli_options import (
    NO_OVERRIDES,
    BackendChoice,
    BackendOpt,
    ConfigOpt,
    Paths,
    TableName,
    node_options,
)
from svcrules.compiler import Job, prepare
from svcrules.config import Overrides
from svcrules.errors import SvcrulesError
from svcrules.lock import LockBusy, exclusive
from svcrules.logs import LOG, setup
from svcrules.metrics import SyncMetrics, write_metrics
from svcrules.reconcile import Change, Driver, cleanup, execute, plan_change
from svcrules.report import summary
from svcrules.state import DEFAULT_STATE_DIR, Meta, StateStore


class NftChoice(StrEnum):
    auto = "auto"
    libnftables = "libnftables"
    nft = "nft"


class IptablesChoice(StrEnum):
    auto = "auto"
    nft = "nft"
    legacy = "legacy"


class DiffOutput(StrEnum):
    summary = "summary"
    script = "script"
    nft = "nft"  # the same as script (the name from before the iptables backend)


class LogFormat(StrEnum):
    text = "text"
    json = "json"


StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        envvar="SVCRULES_STATE_DIR",
        help="Where the last applied script and its fingerprint are kept.",
    ),
]
NftOpt = Annotated[
    NftChoice,
    typer.Option(
        "--nft",
        help="Kernel interface: libnftables, the nft command, or auto (libnftables, else nft).",
    ),
]
IptablesOpt = Annotated[
    IptablesChoice,
    typer.Option(
        "--iptables",
        help="iptables backend: which tools to use, iptables-nft, iptables-legacy, or "
        "auto (whatever 'iptables' is on this system).",
    ),
]
Verify = Annotated[
    bool,
    typer.Option(
        "--verify",
        help="Read the owned tables back in full and compare, "
        "instead of trusting the fingerprint alone.",
    ),
]


def _die(exc: SvcrulesError) -> NoReturn:
    for line in str(exc).splitlines():
        print(f"svcrules: error: {line}", file=sys.stderr)
    raise typer.Exit(2)


def open_driver(backend: BackendChoice, nft: NftChoice, iptables: IptablesChoice) -> Driver:
    """The chosen backend with its kernel interface."""
    if backend is BackendChoice.iptables:
        from svcrules.driver_iptables import IptablesDriver
        from svcrules.iptables_kernel import Iptables

        return IptablesDriver(Iptables(iptables.value))
    from svcrules.driver_nft import NftDriver
    from svcrules.kernel import open_backend

    return NftDriver(open_backend(nft.value))


def _prepare(
    paths: list[str] | None,
    config: str | None,
    ov: Overrides,
    state_dir: Path,
    driver: tuple[BackendChoice, NftChoice, IptablesChoice],
) -> tuple[Job, Driver, StateStore]:
    """Read the inputs (compiling waits: an unchanged input may need none) and open
    the kernel interface."""
    if not paths:
        print("svcrules: error: no input given (a file, a directory or '-')", file=sys.stderr)
        raise typer.Exit(2)
    try:
        job = prepare(paths, config, ov)
        opened = open_driver(*driver)
    except SvcrulesError as exc:
        _die(exc)
    return job, opened, StateStore(state_dir)


@app.command("diff")
@node_options
def diff_cmd(
    paths: Paths = None,
    config: ConfigOpt = None,
    output: Annotated[
        DiffOutput,
        typer.Option(
            "--output",
            help="A readable summary, or the exact transaction apply would send "
            "(an nft script, or iptables-restore inputs); 'nft' is the same as 'script'.",
        ),
    ] = DiffOutput.summary,
    backend: BackendOpt = BackendChoice.nftables,
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
    nft: NftOpt = NftChoice.auto,
    iptables: IptablesOpt = IptablesChoice.auto,
    verify: Verify = False,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Show what 'apply' would change. Exit 0: nothing; 1: changes; 2: error."""
    job, driver, store = _prepare(paths, config, overrides, state_dir, (backend, nft, iptables))
    try:
        change = plan_change(job, driver, store, verify)
    except SvcrulesError as exc:
        _die(exc)
    sys.stdout.write(change.script if output is not DiffOutput.summary else summary(change))
    raise typer.Exit(1 if change.changed else 0)


@app.command("apply")
@node_options
def apply_cmd(
    paths: Paths = None,
    config: ConfigOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the transaction with nft's check mode and print the plan; change nothing.",
        ),
    ] = False,
    backend: BackendOpt = BackendChoice.nftables,
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
    nft: NftOpt = NftChoice.auto,
    iptables: IptablesOpt = IptablesChoice.auto,
    verify: Verify = False,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Bring the kernel to the compiled ruleset with only what changed: one atomic nft
    transaction, or one iptables-restore --noflush per table naming only the chains
    that change. The first run, or rules changed behind svcrules' back, get a full
    replacement. A refused change leaves the previous rules in place."""
    job, driver, store = _prepare(paths, config, overrides, state_dir, (backend, nft, iptables))
    try:
        change = plan_change(job, driver, store, verify)
        if dry_run:
            if change.changed:
                driver.check(change.script)
            sys.stdout.write(summary(change))
            return
        execute(change, driver, store)
    except SvcrulesError as exc:
        _die(exc)
    sys.stdout.write(summary(change))
    for problem in change.problems:
        print(f"svcrules: warning: {problem}", file=sys.stderr)


def _sync_once(
    paths: list[str] | None,
    config: str | None,
    ov: Overrides,
    state_dir: Path,
    driver: tuple[BackendChoice, NftChoice, IptablesChoice],
    verify: bool,
    metrics_file: Path | None,
    started: float,
) -> Change:
    job, opened, store = _prepare(paths, config, ov, state_dir, driver)
    try:
        change = plan_change(job, opened, store, verify)
        execute(change, opened, store)
    except SvcrulesError:
        _, meta = store.load()
        meta.failures += 1
        store.save(None, meta)
        if metrics_file:
            _metrics(metrics_file, meta, None, started)
        raise
    if metrics_file:
        _metrics(metrics_file, change.new_meta, change, started)
    return change


def _metrics(path: Path, meta: Meta, change: Change | None, started: float) -> None:
    """``change`` None: the sync failed; ``meta`` then holds the previous success."""
    c = meta.counts
    write_metrics(
        path,
        SyncMetrics(
            table=meta.table or "svcrules",
            success=change is not None,
            last_success=meta.last_success,
            duration=time.monotonic() - started,
            operations=change.operations if change else 0,
            mode=change.mode if change else "none",
            services=c.get("services", 0),
            service_ports=c.get("service_ports", 0),
            endpoints=c.get("endpoints", 0),
            chains=c.get("chains", 0),
            rules=c.get("rules", 0),
            elements=c.get("elements", 0),
            failures=meta.failures,
        ),
    )


@app.command("sync")
@node_options
def sync_cmd(
    paths: Paths = None,
    config: ConfigOpt = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="When another run holds the lock: wait for it (default), or exit 0 at once.",
        ),
    ] = True,
    lock_timeout: Annotated[
        float, typer.Option("--lock-timeout", help="Seconds to wait for the lock.")
    ] = 60.0,
    metrics_file: Annotated[
        Path | None,
        typer.Option(
            "--metrics-file", help="Write Prometheus text-format metrics here (atomically)."
        ),
    ] = None,
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="stderr logs as text or JSON lines.")
    ] = LogFormat.text,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log runs that changed nothing too.")
    ] = False,
    backend: BackendOpt = BackendChoice.nftables,
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
    nft: NftOpt = NftChoice.auto,
    iptables: IptablesOpt = IptablesChoice.auto,
    verify: Verify = False,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """'apply' for cron and timers: an exclusive lock, silence when nothing changed,
    one log line when something did, optional metrics."""
    setup(log_format.value)
    started = time.monotonic()
    try:
        with exclusive(state_dir / "lock", wait, lock_timeout):
            change = _sync_once(
                paths,
                config,
                overrides,
                state_dir,
                (backend, nft, iptables),
                verify,
                metrics_file,
                started,
            )
    except LockBusy as exc:
        LOG.info("skipped: %s", exc, extra={"fields": {"event": "skipped"}})
        return
    except SvcrulesError as exc:
        LOG.error("sync failed: %s", exc, extra={"fields": {"event": "failed"}})
        raise typer.Exit(2) from None
    for problem in change.problems:
        LOG.warning("%s", problem)
    fields = {
        "event": "applied" if change.changed else "unchanged",
        "mode": change.mode,
        "operations": change.operations,
        "seconds": round(time.monotonic() - started, 4),
        "kernel_seconds": round(change.kernel_seconds, 4),
    }
    if change.changed:
        reason = f" ({change.reason})" if change.reason else ""
        LOG.info(
            "applied: %s, %d operations%s",
            change.mode,
            change.operations,
            reason,
            extra={"fields": fields},
        )
    elif verbose:
        LOG.info("unchanged: 0 operations", extra={"fields": fields})


@app.command("cleanup")
def cleanup_cmd(
    table_name: TableName = None,
    backend: Annotated[
        BackendChoice | None,
        typer.Option(
            "--backend",
            "-b",
            help="Whose rules to remove: nftables (the owned tables) or iptables (the "
            "owned chains and their jumps). Default: the backend (and iptables variant) "
            "the state directory names, else nftables.",
        ),
    ] = None,
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
    nft: NftOpt = NftChoice.auto,
    iptables: IptablesOpt = IptablesChoice.auto,
) -> None:
    """Delete svcrules' own rules (nftables: the ip and ip6 tables; iptables: its chains
    in nat and filter and its jumps from the built-in chains) and its saved state;
    nothing else."""
    store = StateStore(state_dir)
    meta = store.load()[1]
    chosen = backend or BackendChoice(meta.backend)
    if chosen is BackendChoice.iptables and iptables is IptablesChoice.auto and meta.tool:
        # The variant that applied them is the one that can see them.
        iptables = IptablesChoice(meta.tool.removeprefix("iptables-"))
    try:
        driver = open_driver(chosen, nft, iptables)
        with exclusive(state_dir / "lock", True, 60.0):
            gone = cleanup(driver, store, table_name)
    except SvcrulesError as exc:
        _die(exc)
    print(f"removed: {', '.join(gone)}" if gone else "nothing to remove")
