"""``serve``: the long-running companion of ``sync``: kube-proxy's health checks for
externalTrafficPolicy Local Services, /healthz, /livez and /metrics.

A process of its own rather than a loop inside ``sync`` (``sync --interval``): the sync
stays a short run that cron or a timer starts, holds the lock only while it works and
may fail, be killed or take a minute on a large cluster, while load balancers probe
every few seconds and must get an answer all the while; and the staleness rule of
/healthz needs an observer that is not the thing observed (a hung sync loop cannot
report itself late). ``serve`` changes nothing: it only reads what the last successful
sync saved in the state directory, so its answers match the rules in the kernel.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from svcrules.cli.app import app
from svcrules.cli.kernel_commands import LogFormat, LogFormatOpt, StateDir
from svcrules.cli.logs import LOG, setup
from svcrules.cli.run import reporting
from svcrules.errors import UsageError
from svcrules.kernel.state import DEFAULT_STATE_DIR

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds of ``60``, ``60s``, ``1m30s``, ``500ms`` (Go's spelling, as kube-proxy's
    flags take it); raise UsageError for anything else or for 0."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        parts = list(_DURATION.finditer(value))
        if not parts or "".join(m.group(0) for m in parts) != value:
            raise UsageError(
                f"--sync-period: {text!r} is not a duration (60, 60s, 1m30s, 500ms)"
            ) from None
        seconds = sum(float(m.group(1)) * _UNITS[m.group(2)] for m in parts)
    if not seconds > 0:
        raise UsageError(f"--sync-period: {text!r} must be more than 0")
    return seconds


@app.command("serve")
def serve_cmd(
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
    healthz_bind_address: Annotated[
        str,
        typer.Option(
            "--healthz-bind-address",
            metavar="IP:PORT",
            help="Where to answer /healthz, /livez and /metrics: IP:PORT, or [IPv6]:PORT "
            "([::] is every address of both families); empty: nowhere.",
        ),
    ] = "0.0.0.0:10256",
    sync_period: Annotated[
        str,
        typer.Option(
            "--sync-period",
            metavar="DURATION",
            help="How often sync runs (60, 60s, 1m): /healthz answers 503 when no sync "
            "succeeded within twice this.",
        ),
    ] = "60s",
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Answer load balancers' health checks and monitoring, as kube-proxy does: every
    healthCheckNodePort of the node's LoadBalancer Services with externalTrafficPolicy
    Local (200 with the local endpoint count while the node has a ready one, else 503),
    and /healthz, /livez (503 once no sync succeeded within twice the sync period) and
    /metrics on --healthz-bind-address. Reads only what the last successful sync saved
    in the state directory, and follows it. Runs until SIGTERM or SIGINT (exit 0); exit
    2 when it cannot start (an address in use, a bad flag)."""
    import time

    from svcrules.kernel.health import Health, Staleness
    from svcrules.kernel.serve import Server, parse_bind, show
    from svcrules.kernel.state import StateStore

    setup(log_format.value)
    with reporting(None):
        period = parse_duration(sync_period)
        try:
            bind = parse_bind(healthz_bind_address) if healthz_bind_address.strip() else None
        except ValueError as exc:
            raise UsageError(f"--healthz-bind-address: {exc}") from None
        health = Health(Staleness(period, time.time()))
        server = Server(health, StateStore(state_dir), bind)
        server.start()

    def stop(signum: int, frame: FrameType | None) -> None:
        server.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    where = show(bind) if bind is not None else "nowhere (--healthz-bind-address '')"
    if server.healthz_listener is not None and bind is not None and bind[2] == 0:
        where = show((bind[0], bind[1], server.healthz_listener.port()))
    LOG.info(
        "serving /healthz, /livez and /metrics on %s; %d healthCheckNodePorts from %s "
        "(sync period %gs)",
        where,
        len(server.listeners),
        state_dir,
        period,
        extra={"fields": {"event": "serving"}},
    )
    with reporting(None):
        server.run()
    LOG.info("stopped", extra={"fields": {"event": "stopped"}})
