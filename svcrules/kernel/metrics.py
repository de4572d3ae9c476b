"""Prometheus text-format metrics, written atomically for node_exporter's
textfile collector (``--metrics-file``), and served by ``svcrules serve`` on /metrics.

Both render the same from the state directory (the summary of the rules in place and
counters.json), so the file and /metrics agree: svcrules' own series, then kube-proxy's
where the meaning is the same (names, types and buckets of pkg/proxy/metrics; see
history.py). Every series carries ``table="<tableName>"``."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svcrules.errors import MetricsError
from svcrules.kernel.history import HISTOGRAMS, LastRun, histograms, render_histogram
from svcrules.kernel.state import Meta
from svcrules.kernel.stats import Stats

# name (after svcrules_), type, help, attribute of SyncMetrics or of its sizes (Stats):
# in the file's order.
_ROWS = (
    (
        "last_success_timestamp_seconds",
        "gauge",
        "Unix time of the last successful sync.",
        "last_success",
    ),
    ("last_sync_success", "gauge", "1 if the last sync succeeded, else 0.", "success"),
    ("sync_duration_seconds", "gauge", "Wall time of the last sync.", "duration"),
    (
        "sync_operations",
        "gauge",
        "Operations sent to the kernel by the last sync (elements, rules, objects).",
        "operations",
    ),
    ("sync_failures_total", "counter", "Failed syncs since the state was created.", "failures"),
    ("services", "gauge", "Services programmed on this node.", "services"),
    ("service_ports", "gauge", "Service ports programmed (per family).", "service_ports"),
    ("endpoints", "gauge", "Distinct endpoints (address, port) in use.", "endpoints"),
    (
        "service_ports_without_endpoints",
        "gauge",
        "Service ports (per family) with no usable endpoint: every frontend rejects.",
        "no_endpoints",
    ),
    ("chains", "gauge", "Chains in the owned tables.", "chains"),
    ("rules", "gauge", "Rules in the owned tables.", "rules"),
    ("elements", "gauge", "Set and map elements in the owned tables.", "elements"),
    (
        "invalid_objects",
        "gauge",
        "Objects the last sync left out as invalid or conflicting (--on-invalid skip).",
        "invalid_objects",
    ),
)


@dataclass
class SyncMetrics:
    table: str
    success: bool
    last_success: float
    duration: float
    operations: int
    mode: str
    sizes: Stats  # of the rules the node holds
    failures: int
    invalid_objects: int = 0
    histograms: dict[str, Any] = field(default_factory=dict)  # Meta.histograms

    @classmethod
    def of(cls, meta: Meta, table: str) -> SyncMetrics:
        """The metrics of what the state directory holds: the rules in place (``meta``'s
        summary) and what runs added up (its counters, ``last_run`` included)."""
        last = LastRun.load(meta.last_run)
        return cls(
            table=table,
            success=last.success,
            last_success=meta.last_success,
            duration=last.seconds,
            operations=last.operations,
            mode=last.mode,
            sizes=Stats.of(meta.counts),
            failures=meta.failures,
            invalid_objects=last.invalid,
            histograms=meta.histograms,
        )

    def render(self) -> str:
        label = f'{{table="{self.table}"}}'
        out = []
        for name, kind, help_, attr in _ROWS:
            value = getattr(self.sizes if hasattr(self.sizes, attr) else self, attr)
            value = int(value) if isinstance(value, bool) else value
            out += [
                f"# HELP svcrules_{name} {help_}",
                f"# TYPE svcrules_{name} {kind}",
                f"svcrules_{name}{label} {value:.6f}"
                if isinstance(value, float)
                else f"svcrules_{name}{label} {value}",
            ]
        modes = ("noop", "incremental", "full")
        out += [
            "# HELP svcrules_sync_mode How the last sync changed the kernel.",
            "# TYPE svcrules_sync_mode gauge",
        ]
        out += [
            f'svcrules_sync_mode{{table="{self.table}",mode="{m}"}} {int(m == self.mode)}'
            for m in modes
        ]
        out += self._kube_proxy()
        return "\n".join(out) + "\n"

    def _kube_proxy(self) -> list[str]:
        """kube-proxy's series where svcrules means the same."""
        table = f'table="{self.table}"'
        name = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
        out = [
            f"# HELP {name} The last time proxy rules were successfully synced",
            f"# TYPE {name} gauge",
            f"{name}{{{table}}} {self.last_success:.6f}",
        ]
        name = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
        out += [
            f"# HELP {name} Number of services with a Local traffic policy and no endpoints",
            f"# TYPE {name} gauge",
            f'{name}{{{table},traffic_policy="internal"}} {self.sizes.no_local_internal}',
            f'{name}{{{table},traffic_policy="external"}} {self.sizes.no_local_external}',
        ]
        found = histograms(Meta(histograms=self.histograms))
        for hist_name, (_, help_) in HISTOGRAMS.items():
            out += render_histogram(hist_name, help_, found[hist_name], table)
        return out


def write_metrics(path: str | Path, metrics: SyncMetrics) -> None:
    """Temporary file and rename: the collector never reads half a file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        tmp.write_text(metrics.render(), encoding="utf-8")
        tmp.replace(target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise MetricsError(f"cannot write metrics file {target}: {exc.strerror}") from None


_FAILURES = re.compile(r"^svcrules_sync_failures_total\{[^}]*\} (\d+)$", re.MULTILINE)


def previous_failures(path: str | Path | None) -> int:
    """The failure counter of an earlier metrics file: where the state directory cannot
    keep the counter, the metrics file still counts up."""
    if path is None:
        return 0
    try:
        found = _FAILURES.search(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return 0
    return int(found.group(1)) if found else 0
