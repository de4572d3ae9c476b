"""What every command that touches the kernel does around its work: check that it
may, log in the chosen format, count failures, write metrics, choose the exit code.

Every failure, whatever raised it, leaves the same three traces: an error line in
the chosen log format, ``svcrules_last_sync_success 0`` with the failure counter up
by one in the metrics file, and exit code 2. No traceback reaches the user (set
``SVCRULES_DEBUG=1`` to see one for an unexpected error).
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from svcrules.cli.logs import LOG
from svcrules.errors import NotPermitted, SvcrulesError
from svcrules.kernel.caps import net_admin_problem
from svcrules.kernel.history import record_failure
from svcrules.kernel.metrics import SyncMetrics, previous_failures, write_metrics
from svcrules.kernel.state import Meta, StateStore

if TYPE_CHECKING:
    from svcrules.kernel.reconcile import Change  # the compiler and nft transport

EXIT_OK = 0
EXIT_CHANGES = 1  # diff: something would change
EXIT_FAILED = 2  # nothing was applied (bad input, refusal, environment)
EXIT_SKIPPED = 3  # applied, but invalid objects were left out (--on-invalid skip)


def require_net_admin() -> None:
    problem = net_admin_problem()
    if problem:
        raise NotPermitted(problem)


@dataclass
class Run:
    """One run of a kernel command, for its failure and success bookkeeping."""

    state_dir: Path
    metrics_file: Path | None = None
    table: str = ""
    started: float = field(default_factory=time.monotonic)

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def succeeded(self, change: Change) -> None:
        """Write the metrics of a run whose success is already recorded in the state
        directory (history.record_success)."""
        if self.metrics_file:
            self._metrics(change.new_meta)

    def failed(self) -> None:
        """Count the failure in the state directory (or, where that cannot be written,
        in the metrics file alone) and write the metrics; never raise."""
        store = StateStore(self.state_dir)
        meta = Meta()
        with suppress(SvcrulesError, OSError):
            meta = store.load()[1]
        meta.failures = max(meta.failures, previous_failures(self.metrics_file)) + 1
        record_failure(meta, self.seconds())
        try:
            store.check_dir()
            store.save_counters(meta)
        except (SvcrulesError, OSError) as exc:
            LOG.warning("failure not recorded in the state directory: %s", exc)
        if self.metrics_file:
            try:
                self._metrics(meta)
            except SvcrulesError as exc:
                LOG.error("%s", exc, extra={"fields": {"event": "failed"}})

    def _metrics(self, meta: Meta) -> None:
        """The metrics of the state directory as ``meta`` holds it (after a failure:
        the rules still in place, and the failed run)."""
        assert self.metrics_file is not None
        table = meta.table or self.table or "svcrules"
        write_metrics(self.metrics_file, SyncMetrics.of(meta, table))


def describe(exc: BaseException) -> str:
    """One or more lines that say what went wrong, without a traceback."""
    if isinstance(exc, SvcrulesError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if os.environ.get("SVCRULES_DEBUG"):
        traceback.print_exception(exc)
    return (
        f"internal error: {type(exc).__name__}: {exc} (set SVCRULES_DEBUG=1 for the "
        f"traceback, and please report it)"
    )


def fail(exc: BaseException, run: Run | None) -> NoReturn:
    for line in describe(exc).splitlines():
        LOG.error("%s", line, extra={"fields": {"event": "failed"}})
    if run is not None:
        run.failed()
    raise typer.Exit(EXIT_FAILED)


@contextmanager
def reporting(run: Run | None) -> Iterator[None]:
    """Turn any exception in the block into a reported failure (exit 2)."""
    try:
        yield
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as exc:
        fail(exc, run)


def log_fields(change: Change, run: Run, **extra: Any) -> dict[str, Any]:
    return {
        "event": "applied" if change.changed else "unchanged",
        "mode": change.mode,
        "operations": change.operations,
        "seconds": round(run.seconds(), 4),
        "kernel_seconds": round(change.kernel_seconds, 4),
        **extra,
    }
