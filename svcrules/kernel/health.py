"""What ``svcrules serve`` answers, decided from the state directory alone.

The health of a node for an externalTrafficPolicy Local Service, and of svcrules
itself, follow kube-proxy (pkg/proxy/healthcheck): the answers here are its answers,
byte for byte where a client could tell (status, headers, JSON bodies), computed from
what the last successful sync applied (the summary saved with the script, and
counters.json). This module decides; serve.py only listens and writes.

- A healthCheckNodePort (``service_answer``): 200 when the Service has a ready local
  endpoint in the family and svcrules is healthy, else 503, with the JSON body of
  kube-proxy's ``hcHandler`` and the headers ``Content-Type: application/json``,
  ``X-Content-Type-Options: nosniff`` and ``X-Load-Balancing-Endpoint-Weight`` (the local
  endpoint count, as recent kube-proxy versions send it). Any path is answered alike.
- ``/healthz`` and ``/livez`` (``healthz_answer``): 503 when no sync succeeded within
  twice the sync period (kube-proxy's ``healthTimeout``: 2 x ``--sync-period``), else
  200; bodies as kube-proxy's ``healthzHandler`` and ``livezHandler``. svcrules does not
  watch the Node object, so ``nodeEligible`` is always true.

kube-proxy is healthy while it starts up, until an update it queued is late. A sync run
by cron has no queue to watch, so the rule is the one the sync period gives: healthy
when the last success is younger than 2 x the period; with no success since the
machine booted, healthy for 2 x the period after ``serve`` starts, then not.

A machine that rebooted lost the rules the state directory describes (nftables and
iptables rules live in memory): a state saved before the boot is not served, so no
healthCheckNodePort answers until the first sync after boot has put the rules back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from svcrules.kernel.state import COUNTERS, Meta, StateStore

JSON_HEADERS = (("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff"))
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Answer(NamedTuple):
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class ServiceHealth(NamedTuple):
    """One healthCheckNodePort of the state summary (state.health_entries)."""

    namespace: str
    name: str
    family: int
    port: int
    local_endpoints: int
    address: str  # where to listen: the node's IP of the family, or "" for every address

    @classmethod
    def of(cls, raw: Any) -> ServiceHealth | None:
        """An entry of the summary; None for one of the wrong shape."""
        try:
            item = cls(
                str(raw["namespace"]),
                str(raw["name"]),
                int(raw["family"]),
                int(raw["port"]),
                int(raw["localEndpoints"]),
                str(raw.get("address", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        return item if item.family in (4, 6) and 0 < item.port < 65536 else None

    @property
    def bind(self) -> tuple[int, str, int]:
        """(family, address, port) of its listener; "" is every address of the family."""
        return self.family, self.address, self.port


@dataclass(frozen=True)
class View:
    """The state directory at one moment, as serve answers from it."""

    services: tuple[ServiceHealth, ...] = ()
    meta: Meta = field(default_factory=Meta)  # summary and counters (for /metrics)
    table: str = "svcrules"
    last_success: float = 0.0  # 0: no success since boot (or ever)
    note: str = ""  # why the saved state is not served, if it is not

    def service(self, namespace: str, name: str, family: int) -> ServiceHealth | None:
        for s in self.services:
            if (s.namespace, s.name, s.family) == (namespace, name, family):
                return s
        return None


def boot_time() -> float:
    """When the machine booted (Unix seconds); 0 where /proc cannot tell."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def read_summary(store: StateStore, booted: float) -> tuple[Meta | None, str]:
    """The summary of the rules the last successful sync applied, or None and why not
    (nothing synced yet, synced before the machine booted, damaged)."""
    try:
        saved_at = os.stat(store.path).st_mtime
    except OSError:
        return None, "no saved state: nothing synced yet"
    if saved_at < booted:
        return None, "the saved state is from before the machine booted: not served until a sync"
    summary = store.load_summary()
    if summary is None:
        return None, "the saved state cannot be read or is damaged: not served until a sync"
    return summary, ""


def make_view(summary: Meta | None, note: str, counters: Meta, booted: float) -> View:
    """The view of a summary (read_summary) and counters.json (StateStore.load_counters)."""
    meta = dataclasses.replace(summary) if summary is not None else Meta()
    for name in COUNTERS:
        setattr(meta, name, getattr(counters, name))
    last_success = counters.last_success if counters.last_success >= booted else 0.0
    services = [s for s in map(ServiceHealth.of, meta.health if summary else []) if s]
    services.sort(key=lambda s: (s.namespace, s.name, s.family))
    return View(tuple(services), meta, meta.table or "svcrules", last_success, note)


def read_view(store: StateStore, booted: float | None = None) -> View:
    """What the last successful sync applied, and what the runs added up."""
    booted = boot_time() if booted is None else booted
    summary, note = read_summary(store, booted)
    return make_view(summary, note, store.load_counters(), booted)


@dataclass(frozen=True)
class Staleness:
    """kube-proxy's rule, for a sync that runs every ``sync_period`` seconds."""

    sync_period: float
    started: float  # when serve started (Unix seconds)

    @property
    def timeout(self) -> float:
        return 2 * self.sync_period

    def healthy(self, last_success: float, now: float) -> bool:
        since = last_success if last_success > 0 else self.started
        return now - since < self.timeout


def go_time(ts: float) -> str:
    """A time as Go's ``time.Time.String()`` prints it (kube-proxy's bodies use ``%q``
    of one), in UTC, without the monotonic clock reading; 0 is Go's zero time."""
    if ts <= 0:
        return "0001-01-01 00:00:00 +0000 UTC"
    dt = datetime.fromtimestamp(ts, UTC)
    frac = f"{dt.microsecond:06d}".rstrip("0")
    return dt.strftime("%Y-%m-%d %H:%M:%S") + (f".{frac}" if frac else "") + " +0000 UTC"


def service_answer(namespace: str, name: str, local_endpoints: int, proxy_healthy: bool) -> Answer:
    """kube-proxy's answer on a healthCheckNodePort (``hcHandler.ServeHTTP``): its body
    is a dedented, trimmed template, indented with tabs."""
    ok = local_endpoints != 0 and proxy_healthy
    body = (
        "{\n"
        '\t"service": {\n'
        f'\t\t"namespace": {json.dumps(namespace)},\n'
        f'\t\t"name": {json.dumps(name)}\n'
        "\t},\n"
        f'\t"localEndpoints": {local_endpoints},\n'
        f'\t"serviceProxyHealthy": {json.dumps(proxy_healthy)}\n'
        "}"
    )
    headers = (*JSON_HEADERS, ("X-Load-Balancing-Endpoint-Weight", str(local_endpoints)))
    return Answer(200 if ok else 503, headers, body.encode())


def healthz_answer(healthy: bool, last_success: float, now: float, livez: bool = False) -> Answer:
    """kube-proxy's ``/healthz`` (``livez``: ``/livez``, without nodeEligible). When
    healthy, lastUpdated is the current time, as kube-proxy keeps it for old clients."""
    updated = go_time(now if healthy else last_success)
    body = f'{{"lastUpdated": {json.dumps(updated)},"currentTime": {json.dumps(go_time(now))}'
    body += "}" if livez else ', "nodeEligible": true}'
    return Answer(200 if healthy else 503, JSON_HEADERS, body.encode())


def not_found() -> Answer:
    """Go's ``http.NotFound``."""
    headers = (("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff"))
    return Answer(404, headers, b"404 page not found\n")


@dataclass
class Probes:
    """kube-proxy's own counters of its probes: kubeproxy_proxy_healthz_total and
    kubeproxy_proxy_livez_total, by HTTP status (serve's /metrics only)."""

    healthz: dict[str, int] = field(default_factory=dict)
    livez: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, livez: bool, status: int) -> None:
        table = self.livez if livez else self.healthz
        with self.lock:
            table[str(status)] = table.get(str(status), 0) + 1

    def render(self, table: str) -> str:
        out = []
        for name, counts, what in (
            ("kubeproxy_proxy_healthz_total", self.healthz, "healthz"),
            ("kubeproxy_proxy_livez_total", self.livez, "livez"),
        ):
            out += [
                f"# HELP {name} Cumulative proxy {what} HTTP status",
                f"# TYPE {name} counter",
            ]
            out += [
                f'{name}{{table="{table}",code="{code}"}} {counts.get(code, 0)}'
                for code in sorted({"200", "503", *counts})
            ]
        return "\n".join(out) + "\n"


def metrics_answer(view: View, probes: Probes) -> Answer:
    """The metrics of the sync (as ``--metrics-file`` writes them) and serve's own."""
    from svcrules.kernel.metrics import SyncMetrics

    text = SyncMetrics.of(view.meta, view.table).render() + probes.render(view.table)
    return Answer(200, (("Content-Type", METRICS_TYPE),), text.encode())


@dataclass
class Health:
    """Every answer of serve, from the current view (swapped whole on a change)."""

    staleness: Staleness
    view: View = field(default_factory=View)
    clock: Callable[[], float] = time.time
    probes: Probes = field(default_factory=Probes)

    def healthy(self) -> bool:
        return self.staleness.healthy(self.view.last_success, self.clock())

    def for_service(self, namespace: str, name: str, family: int) -> Answer:
        view = self.view
        found = view.service(namespace, name, family)
        count = found.local_endpoints if found else 0
        return service_answer(namespace, name, count, self.healthy())

    def for_path(self, path: str) -> Answer:
        """The healthz address: /healthz, /livez, /metrics (the query string ignored)."""
        view, now = self.view, self.clock()
        path = path.split("?", 1)[0]
        if path in ("/healthz", "/livez"):
            livez = path == "/livez"
            healthy = self.staleness.healthy(view.last_success, now)
            answer = healthz_answer(healthy, view.last_success, now, livez)
            self.probes.count(livez, answer.status)
            return answer
        if path == "/metrics":
            return metrics_answer(view, self.probes)
        return not_found()
