"""``diff``, ``apply``, ``sync`` and ``cleanup``: the commands that touch the kernel.

Exit codes follow ``kubectl diff``: 0 no change, 1 changes (``diff`` only),
2 nothing applied (bad input, a refused transaction, a safety limit, the
environment); see cli_run.py for how every failure is reported.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from svcrules.cli.app import app
from svcrules.cli.logs import LOG, setup
from svcrules.cli.options import (
    NO_OVERRIDES,
    BackendChoice,
    BackendOpt,
    ConfigOpt,
    Formats,
    Paths,
    TableName,
    node_options,
    output_option,
    verbosity,
)
from svcrules.cli.run import EXIT_SKIPPED, Run, log_fields, reporting, require_net_admin
from svcrules.errors import LockBusy, UsageError
from svcrules.inputs.overrides import Overrides
from svcrules.kernel.lock import DEFAULT_TIMEOUT, exclusive
from svcrules.kernel.safety import DEFAULT_MAX_REMOVALS, Policy, check_removals
from svcrules.kernel.state import DEFAULT_STATE_DIR, StateStore
from svcrules.progress import phase

if TYPE_CHECKING:
    # Imported where used: the compiler (pydantic, PyYAML, orjson, Jinja2), reconcile
    # and the drivers (libnftables) are not needed for 'svcrules --help'
    # (tests/unit/test_startup.py).
    from svcrules.compiler import Job
    from svcrules.kernel.reconcile import Change, Driver


class NftChoice(StrEnum):
    auto = "auto"
    libnftables = "libnftables"
    nft = "nft"


class IptablesChoice(StrEnum):
    auto = "auto"
    nft = "nft"
    legacy = "legacy"


# diff -o: text for people, json for scripts (docs/operations.md), nft the exact
# transaction ("nft" also for the iptables backend, whose transaction is
# iptables-restore input). "summary" and "script" are the names of an earlier release.
DIFF_FORMATS = Formats(("text", "json", "nft"), aliases=(("summary", "text"), ("script", "nft")))


class LogFormat(StrEnum):
    text = "text"
    json = "json"


StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        metavar="DIR",
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


MetricsFile = Annotated[
    Path | None,
    typer.Option(
        "--metrics-file",
        metavar="FILE",
        help="Write Prometheus text-format metrics here (atomically), on success and on "
        "failure alike.",
    ),
]
LogFormatOpt = Annotated[
    LogFormat,
    typer.Option("--log-format", help="stderr logs as text or JSON lines (both timestamped)."),
]
LockTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--lock-timeout", metavar="SECONDS", help="Seconds to wait for another run's lock."
    ),
]
AllowEmpty = Annotated[
    bool,
    typer.Option(
        "--allow-empty",
        help="Accept inputs without a single Service (removes every Service). Without it "
        "an empty input, such as a failed command before a pipe, is an error.",
    ),
]
MaxRemovals = Annotated[
    float,
    typer.Option(
        "--max-removals",
        min=0.0,
        max=100.0,
        metavar="PERCENT",
        help="Refuse a run that removes more than this share of the programmed Service "
        "ports; removing all of them is always refused without --force.",
    ),
]
Force = Annotated[bool, typer.Option("--force", help="No removal limit (see --max-removals).")]


class InvalidChoice(StrEnum):
    fail = "fail"
    skip = "skip"


OnInvalidOpt = Annotated[
    InvalidChoice,
    typer.Option(
        "--on-invalid",
        show_default=False,
        help="An invalid Service or EndpointSlice, or two Services claiming the same "
        "address and port: fail the run (nothing applied), or skip them, program "
        "everything else and exit 3 (the oldest Service keeps a contested claim; see "
        "docs/operations.md). Default: fail, but skip for sync.",
    ),
]


def open_driver(
    backend: BackendChoice, nft: NftChoice, iptables: IptablesChoice, saved_tool: str = ""
) -> Driver:
    """The chosen backend with its kernel interface."""
    from svcrules.kernel import registry

    return registry.open_driver(
        backend.value, {"nft": nft.value, "iptables": iptables.value}, saved_tool
    )


def _prepare(
    paths: list[str] | None,
    config: str | None,
    ov: Overrides,
    driver: tuple[BackendChoice, NftChoice, IptablesChoice],
    policy: Policy,
) -> tuple[Job, Driver]:
    """Read the inputs (compiling waits: an unchanged input may need none) and open
    the kernel interface."""
    if not paths:
        raise UsageError("no input given (PATHS or -f: a file, a directory or '-')")
    from svcrules.compiler import prepare

    job = prepare(paths, config, ov, allow_empty=policy.allow_empty, on_invalid=policy.on_invalid)
    return job, open_driver(*driver)


def _report_invalid(change: Change) -> int:
    """Log what --on-invalid skip left out; return the exit code that says so."""
    for line in change.new_meta.invalid:
        LOG.warning("%s", line, extra={"fields": {"event": "invalid"}})
    return EXIT_SKIPPED if change.new_meta.invalid else 0


@app.command("diff", short_help="Show what 'apply' would change (exit 1 when something would).")
@verbosity
@node_options
def diff_cmd(
    paths: Paths = None,
    config: ConfigOpt = None,
    output: Annotated[
        str,
        output_option(
            DIFF_FORMATS,
            "text: what changes per Service port (endpoints, frontends, policies) and "
            "in the kernel; json: the same for scripts (docs/operations.md); nft: the "
            "exact transaction apply would send (an nft script, or iptables-restore "
            "input with --backend iptables).",
        ),
    ] = "text",
    backend: BackendOpt = BackendChoice.nftables,
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
    nft: NftOpt = NftChoice.auto,
    iptables: IptablesOpt = IptablesChoice.auto,
    verify: Verify = False,
    allow_empty: AllowEmpty = False,
    on_invalid: OnInvalidOpt = InvalidChoice.fail,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Show what 'apply' would change. Exit 0: nothing; 1: changes; 2: error.

    Examples:

      svcrules diff --config node.yaml manifests/
      svcrules diff -o json --config node.yaml manifests/ | jq .changes
      svcrules diff -o nft --config node.yaml manifests/ > transaction.nft
    """
    from svcrules.cli.report import as_json, summary
    from svcrules.kernel.reconcile import plan_change

    fmt = DIFF_FORMATS.parse(output)
    setup("text")
    policy = Policy(allow_empty=allow_empty, on_invalid=on_invalid.value)
    with reporting(None):
        require_net_admin()
        job, driver = _prepare(paths, config, overrides, (backend, nft, iptables), policy)
        change = plan_change(job, driver, StateStore(state_dir), verify)
    _report_invalid(change)
    if fmt == "nft":
        sys.stdout.write(change.script)
    elif fmt == "json":
        sys.stdout.write(as_json(change))
    else:
        sys.stdout.write(summary(change))
    raise typer.Exit(1 if change.changed else 0)


@dataclass(frozen=True)
class Request:
    """What apply and sync were asked to do, as one value."""

    paths: list[str] | None
    config: str | None
    overrides: Overrides
    driver: tuple[BackendChoice, NftChoice, IptablesChoice]
    verify: bool
    policy: Policy
    lock: tuple[bool, float]  # wait for another run's lock, and for how long


def _plan(req: Request, store: StateStore) -> tuple[Change, Driver]:
    """Read, decide what to send, and hold it to the removal limits."""
    from svcrules.kernel.reconcile import plan_change

    job, driver = _prepare(req.paths, req.config, req.overrides, req.driver, req.policy)
    change = plan_change(job, driver, store, req.verify)
    if change.changed:
        check_removals(change.old_meta, change.new_meta, req.policy)
    return change, driver


def _apply(req: Request, run: Run, dry_run: bool) -> Change | None:
    """The work shared by apply and sync, under the lock. None: skipped (lock busy)."""
    from svcrules.kernel.history import record_success
    from svcrules.kernel.reconcile import execute

    require_net_admin()
    store = StateStore(run.state_dir)
    if dry_run:
        change, driver = _plan(req, store)
        if change.changed:
            with phase("checking the transaction (nothing is applied)"):
                driver.check(change.script)
        return change
    store.check_dir()
    try:
        with exclusive(run.state_dir / "lock", *req.lock):
            change, driver = _plan(req, store)
            run.table = change.new_meta.table
            execute(change, driver, store)
            change.problems += record_success(store, change, run.seconds()).problems
    except LockBusy as exc:
        LOG.info("skipped: %s", exc, extra={"fields": {"event": "skipped"}})
        return None
    return change


def _apply_reported(req: Request, run: Run, dry_run: bool = False) -> Change | None:
    """``_apply`` with every failure reported (logs, metrics, exit 2) and a success
    recorded in the metrics."""
    with reporting(run):
        change = _apply(req, run, dry_run)
        if change is not None and not dry_run:
            run.succeeded(change)
    return change


@app.command(
    "apply", short_help="Bring the kernel to the compiled ruleset, changing only what differs."
)
@verbosity
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
    allow_empty: AllowEmpty = False,
    max_removals: MaxRemovals = DEFAULT_MAX_REMOVALS,
    force: Force = False,
    on_invalid: OnInvalidOpt = InvalidChoice.fail,
    lock_timeout: LockTimeoutOpt = DEFAULT_TIMEOUT,
    metrics_file: MetricsFile = None,
    log_format: LogFormatOpt = LogFormat.text,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Say more on stderr: each long phase with what it did and how long it "
            "took, and one line with the result (as sync logs it).",
        ),
    ] = False,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Bring the kernel to the compiled ruleset with only what changed: one atomic nft
    transaction, or one iptables-restore --noflush per table naming only the chains
    that change. The first run, or rules changed behind svcrules' back, get a full
    replacement. A refused change leaves the previous rules in place."""
    from svcrules.cli.report import summary

    setup(log_format.value)
    policy = Policy(max_removals, force, allow_empty, on_invalid.value)
    req = Request(
        paths, config, overrides, (backend, nft, iptables), verify, policy, (True, lock_timeout)
    )
    run = Run(state_dir, metrics_file, overrides.table_name or "")
    change = _apply_reported(req, run, dry_run)
    assert change is not None  # apply always waits for the lock
    sys.stdout.write(summary(change))
    for problem in change.problems:
        LOG.warning("%s", problem)
    if verbose and not dry_run:
        _log_result(change, run, quiet_when_unchanged=False)
    raise typer.Exit(_report_invalid(change))


def _log_result(change: Change, run: Run, quiet_when_unchanged: bool) -> None:
    """sync's one line about a run (and apply's, with -v)."""
    fields = log_fields(change, run)
    if change.changed:
        reason = f" ({change.reason})" if change.reason else ""
        LOG.info(
            "applied: %s, %d operations%s",
            change.mode,
            change.operations,
            reason,
            extra={"fields": fields},
        )
    elif not quiet_when_unchanged:
        LOG.info("unchanged: 0 operations", extra={"fields": fields})


@app.command("sync", short_help="'apply' for cron and timers: a lock, quiet, logs and metrics.")
@verbosity
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
    lock_timeout: LockTimeoutOpt = DEFAULT_TIMEOUT,
    metrics_file: MetricsFile = None,
    log_format: LogFormatOpt = LogFormat.text,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Say more on stderr: each long phase with what it did and how long it "
            "took, and a line for runs that changed nothing too.",
        ),
    ] = False,
    backend: BackendOpt = BackendChoice.nftables,
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
    nft: NftOpt = NftChoice.auto,
    iptables: IptablesOpt = IptablesChoice.auto,
    verify: Verify = False,
    allow_empty: AllowEmpty = False,
    max_removals: MaxRemovals = DEFAULT_MAX_REMOVALS,
    force: Force = False,
    on_invalid: OnInvalidOpt = InvalidChoice.skip,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """'apply' for cron and timers: an exclusive lock, silence when nothing changed,
    one log line when something did, optional metrics. Every failure is logged,
    counted in the metrics and exits 2."""
    setup(log_format.value)
    policy = Policy(max_removals, force, allow_empty, on_invalid.value)
    req = Request(
        paths, config, overrides, (backend, nft, iptables), verify, policy, (wait, lock_timeout)
    )
    run = Run(state_dir, metrics_file, overrides.table_name or "")
    change = _apply_reported(req, run)
    if change is None:
        return
    for problem in change.problems:
        LOG.warning("%s", problem)
    _log_result(change, run, quiet_when_unchanged=not verbose)
    raise typer.Exit(_report_invalid(change))


@app.command("cleanup", short_help="Delete svcrules' own rules and its saved state; nothing else.")
@verbosity
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
    lock_timeout: LockTimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Delete svcrules' own rules (nftables: the ip and ip6 tables; iptables: its chains
    in nat and filter and its jumps from the built-in chains) and its saved state;
    nothing else."""
    from svcrules.kernel.reconcile import cleanup

    setup("text")
    with reporting(None):
        require_net_admin()
        store = StateStore(state_dir)
        store.check_dir()
        with exclusive(state_dir / "lock", True, lock_timeout):
            meta = store.load()[1]
            chosen = backend or BackendChoice(meta.backend)
            driver = open_driver(chosen, nft, iptables, meta.tool)
            gone = cleanup(driver, store, table_name)
    print(f"removed: {', '.join(gone)}" if gone else "nothing to remove")
