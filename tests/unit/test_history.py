"""kube-proxy's metrics across cron runs: histograms kept in counters.json, the network
programming latency from EndpointSlice trigger times, and the text both the metrics file
and serve's /metrics hold, read back with Prometheus' own parser."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from svcrules.cli import app
from svcrules.cli import run as cli_run
from svcrules.kernel import registry
from svcrules.kernel.health import Health, Probes, Staleness, read_view
from svcrules.kernel.history import (
    FULL,
    PARTIAL,
    PROGRAMMING,
    PROGRAMMING_BUCKETS,
    SYNC,
    SYNC_BUCKETS,
    Histogram,
    histograms,
    parse_trigger_time,
    programming_latencies,
)
from svcrules.kernel.metrics import SyncMetrics
from svcrules.kernel.state import Meta, StateStore
from tests.k8s import Obj, dump, endpoint, endpoint_slice, node_config, service

runner = CliRunner()
TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"


def test_buckets_are_kube_proxys() -> None:
    # ExponentialBuckets(0.001, 2, 15)
    assert SYNC_BUCKETS[0] == 0.001 and SYNC_BUCKETS[-1] == 16.384 and len(SYNC_BUCKETS) == 15
    assert all(b == a * 2 for a, b in itertools.pairwise(SYNC_BUCKETS))
    # MergeBuckets (a leading 0) of LinearBuckets(0.25, 0.25, 2), (1, 1, 59), (60, 5, 12),
    # (120, 30, 7)
    want = [0, 0.25, 0.5, *range(1, 60), *range(60, 116, 5), *range(120, 301, 30)]
    assert list(PROGRAMMING_BUCKETS) == want and len(want) == 81


def test_a_histogram_counts_as_prometheus_does() -> None:
    h = Histogram.empty((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(v)
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (math.inf, 5)]
    assert h.count == 5 and h.sum == pytest.approx(8.65)
    assert Histogram.load(json.loads(json.dumps(h.dump())), (0.1, 1.0)) == h
    # other buckets (another version) or a damaged entry: start over
    assert Histogram.load(h.dump(), (0.2, 1.0)).count == 0
    assert Histogram.load({**h.dump(), "count": 4}, (0.1, 1.0)).count == 0
    assert Histogram.load("nonsense", (0.1, 1.0)).count == 0


def test_trigger_times() -> None:
    assert parse_trigger_time("2024-05-01T10:00:00Z") == 1714557600.0
    assert parse_trigger_time("2024-05-01T10:00:00.5+00:00") == 1714557600.5
    assert parse_trigger_time("2024-05-01T10:00:00.123456789Z") == pytest.approx(1714557600.123)
    for bad in ("", "yesterday", "2024-05-01T10:00:00"):  # no zone: not RFC 3339
        assert parse_trigger_time(bad) is None
    before = {"ns/a": "2024-05-01T10:00:00Z", "ns/b": "2024-05-01T10:00:00Z"}
    now_triggers = {
        "ns/a": "2024-05-01T10:00:00Z",  # unchanged: not observed again
        "ns/b": "2024-05-01T10:00:30Z",  # changed
        "ns/c": "2024-05-01T10:00:50Z",  # new
        "ns/d": "garbage",
    }
    now = 1714557600.0 + 60
    assert programming_latencies(before, now_triggers, now) == [30.0, 10.0]
    assert programming_latencies(None, now_triggers, now) == []  # nothing seen before


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_run, "net_admin_problem", lambda: None)
    row = registry.BACKENDS["nftables"]
    made: list[Any] = []

    def open_fake(tool: str) -> Any:
        if not made:
            made.append(row.fake(""))
        return made[0][1]

    monkeypatch.setitem(registry.BACKENDS, "nftables", dataclasses.replace(row, open=open_fake))


def objs(pods: list[str], trigger: str, policy: str = "Cluster") -> list[Obj]:
    svc = service(
        "web",
        "203.0.113.10",
        type="LoadBalancer",
        externalTrafficPolicy=policy,
        healthCheckNodePort=32000,
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
        lb_ips=["203.0.113.200"],
    )
    sl = endpoint_slice("web", [endpoint(f"198.51.100.{p}", node="node-b") for p in pods])
    sl["metadata"]["annotations"] = {TRIGGER: trigger}
    return [node_config(), svc, sl]


def sync(tmp_path: Path, objects: list[Obj]) -> Path:
    path, prom = tmp_path / "in.yaml", tmp_path / "m.prom"
    path.write_text(dump(objects))
    state = ["--state-dir", str(tmp_path / "state")]
    res = runner.invoke(app, ["sync", str(path), *state, "--metrics-file", str(prom)])
    assert res.exit_code == 0, res.stderr
    return prom


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_histograms_accumulate_across_runs(tmp_path: Path, fake_kernel: None) -> None:
    sync(tmp_path, objs(["11"], "2024-05-01T10:00:00Z"))  # first: full; no latency yet
    sync(tmp_path, objs(["11"], "2024-05-01T10:00:00Z"))  # nothing changed: partial
    sync(tmp_path, objs(["11", "12"], "2024-05-01T10:01:00Z"))  # incremental: partial
    prom = sync(tmp_path, objs(["12"], "2024-05-01T10:02:00Z"))
    store = StateStore(tmp_path / "state")
    found = histograms(store.load_counters())
    assert (found[SYNC].count, found[FULL].count, found[PARTIAL].count) == (4, 1, 3)
    assert found[PROGRAMMING].count == 2  # the two changes of the slice
    assert found[SYNC].sum == pytest.approx(found[FULL].sum + found[PARTIAL].sum)
    # a failed run observes nothing, and keeps what was counted
    (tmp_path / "in.yaml").write_text("kind: [")
    bad = runner.invoke(app, ["sync", str(tmp_path / "in.yaml"), "--state-dir", str(store.dir)])
    assert bad.exit_code == 2
    assert histograms(store.load_counters())[SYNC].count == 4

    got = families(prom.read_text())
    hist = got["kubeproxy_sync_proxy_rules_duration_seconds"]
    assert hist.type == "histogram"
    count = next(s for s in hist.samples if s.name.endswith("_count"))
    assert count.value == 4 and count.labels == {"table": "svcrules"}
    les = [s.labels["le"] for s in hist.samples if s.name.endswith("_bucket")]
    assert les[0] == "0.001" and les[-2] == "16.384" and les[-1] == "+Inf"
    programming = got["kubeproxy_network_programming_duration_seconds"]
    les = [s.labels["le"] for s in programming.samples if s.name.endswith("_bucket")]
    assert les[:4] == ["0", "0.25", "0.5", "1"] and les[-2:] == ["300", "+Inf"]
    assert got["kubeproxy_sync_proxy_rules_last_timestamp_seconds"].type == "gauge"


def test_no_local_endpoints_as_kube_proxy_counts_them(tmp_path: Path, fake_kernel: None) -> None:
    prom = sync(tmp_path, objs(["11"], "2024-05-01T10:00:00Z", policy="Local"))
    got = families(prom.read_text())["kubeproxy_sync_proxy_rules_no_local_endpoints_total"]
    assert got.type == "gauge"
    values = {s.labels["traffic_policy"]: s.value for s in got.samples}
    assert values == {"internal": 0, "external": 1}


def test_the_metrics_file_and_serves_metrics_agree(tmp_path: Path, fake_kernel: None) -> None:
    prom = sync(tmp_path, objs(["11"], "2024-05-01T10:00:00Z"))
    view = read_view(StateStore(tmp_path / "state"), booted=0)
    served = Health(Staleness(60, 0), view).for_path("/metrics")
    assert served.status == 200 and served.headers[0][1].startswith("text/plain; version=0.0.4")
    text = served.body.decode()
    assert text.startswith(prom.read_text())  # then serve's own probe counters
    probes = families(text)["kubeproxy_proxy_healthz"]
    assert probes.type == "counter"
    # every family of the file, parsed: names unique, HELP and TYPE for each
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))


def test_metrics_of_a_state_directory_with_nothing() -> None:
    text = SyncMetrics.of(Meta(), "svcrules").render() + Probes().render("svcrules")
    got = families(text)
    assert got["svcrules_last_sync_success"].samples[0].value == 0
    assert got["kubeproxy_sync_proxy_rules_duration_seconds"].samples[-1].value == 0
