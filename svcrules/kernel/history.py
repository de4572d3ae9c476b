"""What runs add up between them: kube-proxy's histograms, how the last run went, and
the EndpointSlice trigger times already observed.

kube-proxy is one long-running process and keeps its histograms in memory. A svcrules
sync is one short process a minute (cron, a timer), so what a histogram has counted
lives in the state directory instead (``counters.json``, next to the failure counter),
read and written back by every successful run under the lock. Names, types and
buckets are kube-proxy's (pkg/proxy/metrics/metrics.go):

- ``kubeproxy_sync_proxy_rules_duration_seconds``: every successful sync, buckets
  ``ExponentialBuckets(0.001, 2, 15)`` (1 ms to 16.384 s);
- ``kubeproxy_sync_full_proxy_rules_duration_seconds`` and
  ``kubeproxy_sync_partial_proxy_rules_duration_seconds``: the same time, split by
  kind: a full replacement is "full"; an incremental change, and a run with nothing to
  change, are "partial" (kube-proxy's iptables mode counts a sync that is not a full
  resync, changes or not, as partial). Same buckets;
- ``kubeproxy_network_programming_duration_seconds``: for each EndpointSlice whose
  ``endpoints.kubernetes.io/last-change-trigger-time`` differs from the last run's, the
  time from that moment to the end of the run that put its rules in the kernel. Buckets
  ``MergeBuckets(LinearBuckets(0.25, 0.25, 2), LinearBuckets(1, 1, 59),
  LinearBuckets(60, 5, 12), LinearBuckets(120, 30, 7))``, where component-base's
  ``MergeBuckets`` starts with a 0 bucket. As kube-proxy ignores trigger times from
  before it started (``trackerStartTime``), the first run of a state directory observes
  none. The node's clock against the control plane's: skew shows here, as in kube-proxy.

Failed runs observe nothing (they count in ``svcrules_sync_failures_total``).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from svcrules.errors import StateError
from svcrules.kernel.state import Meta, StateStore

if TYPE_CHECKING:
    from svcrules.kernel.reconcile import Change

SYNC = "kubeproxy_sync_proxy_rules_duration_seconds"
FULL = "kubeproxy_sync_full_proxy_rules_duration_seconds"
PARTIAL = "kubeproxy_sync_partial_proxy_rules_duration_seconds"
PROGRAMMING = "kubeproxy_network_programming_duration_seconds"

SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
PROGRAMMING_BUCKETS = (
    0.0,
    0.25,
    0.5,
    *(float(s) for s in range(1, 60)),
    *(float(s) for s in range(60, 120, 5)),
    *(float(s) for s in range(120, 301, 30)),
)
# name -> (buckets, help), in the order they are written
HISTOGRAMS: dict[str, tuple[tuple[float, ...], str]] = {
    SYNC: (SYNC_BUCKETS, "SyncProxyRules latency in seconds"),
    FULL: (SYNC_BUCKETS, "SyncProxyRules latency in seconds for full resyncs"),
    PARTIAL: (SYNC_BUCKETS, "SyncProxyRules latency in seconds for partial resyncs"),
    PROGRAMMING: (PROGRAMMING_BUCKETS, "In Cluster Network Programming Latency in seconds"),
}


@dataclass
class Histogram:
    """A Prometheus histogram's counts: per bucket (not cumulative), the last one for
    values above every bound (+Inf)."""

    bounds: tuple[float, ...]
    counts: list[int]
    sum: float = 0.0
    count: int = 0

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> Histogram:
        return cls(bounds, [0] * (len(bounds) + 1))

    @classmethod
    def load(cls, raw: Any, bounds: tuple[float, ...]) -> Histogram:
        """What counters.json holds; one of other buckets (another version) or of the
        wrong shape starts over, as a restarted kube-proxy does."""
        try:
            counts = [int(c) for c in raw["counts"]]
            if tuple(float(b) for b in raw["le"]) != bounds or len(counts) != len(bounds) + 1:
                raise ValueError("other buckets")
            total, count = float(raw["sum"]), int(raw["count"])
            if min(counts) < 0 or count != sum(counts) or not math.isfinite(total):
                raise ValueError("inconsistent")
        except (KeyError, TypeError, ValueError):
            return cls.empty(bounds)
        return cls(bounds, counts, total, count)

    def observe(self, value: float) -> None:
        # A bucket counts the values at most its bound: the first bound >= value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def dump(self) -> dict[str, Any]:
        return {
            "le": list(self.bounds),
            "counts": self.counts,
            "sum": self.sum,
            "count": self.count,
        }

    def cumulative(self) -> list[tuple[float, int]]:
        """(bound, observations at most bound) for every bound, then (inf, count)."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


def histograms(meta: Meta) -> dict[str, Histogram]:
    """Every kube-proxy histogram as counters.json holds it (empty where it holds none)."""
    saved = meta.histograms if isinstance(meta.histograms, Mapping) else {}
    return {
        name: Histogram.load(saved[name], bounds) if name in saved else Histogram.empty(bounds)
        for name, (bounds, _) in HISTOGRAMS.items()
    }


@dataclass
class LastRun:
    """How the last run went, for the metrics (``svcrules_last_sync_success``, ...)."""

    success: bool = False
    seconds: float = 0.0
    mode: str = "none"  # noop, incremental, full; none: it failed (or there was none)
    operations: int = 0
    invalid: int = 0  # objects --on-invalid skip left out

    @classmethod
    def load(cls, raw: Any) -> LastRun:
        if not isinstance(raw, Mapping):
            return cls()
        try:
            return cls(
                bool(raw.get("success", False)),
                float(raw.get("seconds", 0.0)),
                str(raw.get("mode", "none")),
                int(raw.get("operations", 0)),
                int(raw.get("invalid", 0)),
            )
        except (TypeError, ValueError):
            return cls()

    def dump(self) -> dict[str, Any]:
        return dict(vars(self))


def parse_trigger_time(value: str) -> float | None:
    """An RFC 3339 time (as the EndpointSlice controller writes it) in Unix seconds;
    None for anything else (kube-proxy ignores what it cannot parse)."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo is not None else None


def programming_latencies(
    before: Mapping[str, str] | None, now_triggers: Mapping[str, str], now: float
) -> list[float]:
    """The network programming latency of each EndpointSlice whose trigger time differs
    from ``before`` (None: nothing was seen before, so nothing is new), in slice order."""
    if before is None:
        return []
    out = []
    for ref in sorted(now_triggers):
        value = now_triggers[ref]
        if before.get(ref) == value:
            continue
        when = parse_trigger_time(value)
        if when is not None:
            out.append(now - when)
    return out


@dataclass
class Recorded:
    """What ``record_success`` observed (for tests and logs)."""

    durations: list[str] = field(default_factory=list)  # histograms the duration went to
    latencies: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def record_success(
    store: StateStore, change: Change, seconds: float, now: float | None = None
) -> Recorded:
    """Count a successful apply or sync in the state directory (under the lock): the
    time of success (no-op runs too: the node is in sync), the run's duration in the
    sync histograms, the network programming latency of changed EndpointSlices, how the
    run went. Never raises: the rules are in place; what cannot be kept is reported."""
    now = time.time() if now is None else now
    meta = change.new_meta
    meta.last_success = now
    found = histograms(meta)
    done = Recorded(durations=[SYNC, FULL if change.mode == "full" else PARTIAL])
    for name in done.durations:
        found[name].observe(seconds)
    if change.triggers is not None:
        try:
            before = store.load_triggers()
            done.latencies = programming_latencies(before, change.triggers, now)
            if before != change.triggers:
                store.save_triggers(change.triggers)
        except StateError as exc:
            done.problems.append(f"EndpointSlice trigger times not kept: {exc}")
    for latency in done.latencies:
        found[PROGRAMMING].observe(latency)
    meta.histograms = {name: h.dump() for name, h in found.items()}
    last = LastRun(True, seconds, change.mode, change.operations, len(meta.invalid))
    meta.last_run = last.dump()
    try:
        store.save_counters(meta)
    except StateError as exc:
        done.problems.append(f"counters not kept: {exc}")
    return done


def record_failure(meta: Meta, seconds: float) -> None:
    """How a failed run went (its caller counts it and saves the counters)."""
    meta.last_run = LastRun(False, seconds).dump()


def format_bound(value: float) -> str:
    """A bucket bound as Prometheus' Go client writes ``le`` (strconv 'g', shortest)."""
    if math.isinf(value):
        return "+Inf"
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


def render_histogram(name: str, help_: str, hist: Histogram, labels: str) -> Iterable[str]:
    """Prometheus text lines of one histogram; ``labels``: 'k="v"' pairs, or ""."""
    sep = "," if labels else ""
    yield f"# HELP {name} {help_}"
    yield f"# TYPE {name} histogram"
    for bound, n in hist.cumulative():
        yield f'{name}_bucket{{{labels}{sep}le="{format_bound(bound)}"}} {n}'
    braces = f"{{{labels}}}" if labels else ""
    yield f"{name}_sum{braces} {hist.sum!r}"
    yield f"{name}_count{braces} {hist.count}"
