"""Prometheus text-format metrics, written atomically for node_exporter's
textfile collector (``--metrics-file``)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from svcrules.errors import MetricsError
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
        return "\n".join(out) + "\n"


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
