"""Health checks as kube-proxy answers them: which Services get a healthCheckNodePort,
how local endpoints are counted, what sync saves for ``serve``, the exact answers, the
staleness rule, and the server itself on the loopback address (no root)."""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import svcrules
from svcrules.cli import app
from svcrules.cli import run as cli_run
from svcrules.cli.logs import setup
from svcrules.cli.serve_commands import parse_duration
from svcrules.errors import ListenError, UsageError
from svcrules.inputs.overrides import Overrides
from svcrules.kernel import registry
from svcrules.kernel.health import (
    Health,
    Staleness,
    go_time,
    healthz_answer,
    read_view,
    service_answer,
)
from svcrules.kernel.serve import Server, parse_bind, show
from svcrules.kernel.state import COUNTERS, Meta, StateStore
from svcrules.plan.node import HealthCheck
from tests.k8s import Obj, compile_objs, dump, endpoint, endpoint_slice, node_config, service

runner = CliRunner()
NODE = node_config()
CIP, CIP6 = "203.0.113.10", "2001:db8:3::10"


def lb(
    name: str = "web", hcnp: int | None = 32000, cip: str | list[str] = CIP, n: int = 0, **spec: Any
) -> Obj:
    """A LoadBalancer Service with externalTrafficPolicy Local; ``n`` shifts its LB IP
    and NodePort, so that several do not claim the same."""
    spec.setdefault("externalTrafficPolicy", "Local")
    if hcnp is not None:
        spec["healthCheckNodePort"] = hcnp
    ports = spec.pop("ports", [{"name": "http", "port": 80, "nodePort": 30080 + n}])
    spec.setdefault("type", "LoadBalancer")
    return service(name, cip, ports=ports, lb_ips=[f"203.0.113.{200 + n}"], **spec)


def checks(objs: list[Obj], node: Obj = NODE) -> tuple[HealthCheck, ...]:
    return compile_objs([node, *objs]).plan.health_checks


# Which Services, and how local endpoints count ----------------------------------------


def test_ready_local_endpoints_count_terminating_ones_do_not() -> None:
    eps = [
        endpoint("198.51.100.11"),  # ready, local
        endpoint("198.51.100.12"),  # ready, local
        endpoint("198.51.100.13", ready=False),  # not ready
        endpoint("198.51.100.14", ready=False, serving=True, terminating=True),
        endpoint("198.51.100.15", node="node-b"),  # ready, elsewhere
    ]
    (check,) = checks([lb(), endpoint_slice("web", eps)])
    assert check == HealthCheck("default", "web", 4, 32000, 2)


def test_only_serving_terminating_local_endpoints_answer_503_but_still_get_traffic() -> None:
    """kube-proxy counts ready endpoints only (LocalReadyEndpoints): a node whose pods
    are all terminating fails its health check so that the load balancer drains it,
    while the connections that still arrive go to those pods."""
    eps = [endpoint("198.51.100.14", ready=False, serving=True, terminating=True)]
    ruleset = compile_objs([NODE, lb(), endpoint_slice("web", eps)])
    (check,) = ruleset.plan.health_checks
    assert check.local_endpoints == 0
    (port,) = ruleset.plan.families[0].ports
    assert [b.ip for b in port.local_backends] == ["198.51.100.14"]
    assert service_answer("default", "web", check.local_endpoints, True).status == 503


def test_an_address_counts_once_over_all_ports() -> None:
    ports = [
        {"name": "http", "port": 80, "nodePort": 30080},
        {"name": "https", "port": 443, "nodePort": 30443},
    ]
    slice_ports = [
        {"name": "http", "port": 8080, "protocol": "TCP"},
        {"name": "https", "port": 8443, "protocol": "TCP"},
    ]
    eps = [endpoint("198.51.100.11"), endpoint("198.51.100.12")]
    (check,) = checks([lb(ports=ports), endpoint_slice("web", eps, ports=slice_ports)])
    assert check.local_endpoints == 2


def test_which_services_get_a_health_check() -> None:
    none = [
        lb("cluster", cip="203.0.113.1", n=1, externalTrafficPolicy="Cluster"),
        lb("nodeport", cip="203.0.113.2", n=2, type="NodePort"),  # Local, not a LoadBalancer
        lb("no-port", cip="203.0.113.3", n=3, hcnp=None),
        lb("zero", cip="203.0.113.4", n=4, hcnp=0),
        lb("headless", cip="None", n=5),
        lb(
            "other", cip="203.0.113.6", n=6, labels={"service.kubernetes.io/service-proxy-name": ""}
        ),
    ]
    yes = [lb("yes", cip="203.0.113.7", n=7), endpoint_slice("yes", [endpoint("198.51.100.11")])]
    objs = [
        *none,
        *yes,
        *(endpoint_slice(s["metadata"]["name"], [endpoint("198.51.100.12")]) for s in none),
    ]
    assert [(c.name, c.local_endpoints) for c in checks(objs)] == [("yes", 1)]


def test_no_endpoints_at_all_is_a_health_check_with_zero() -> None:
    (check,) = checks([lb()])
    assert check.local_endpoints == 0


def test_dual_stack_counts_per_family() -> None:
    svc = lb(cip=[CIP, CIP6], ipFamilies=["IPv4", "IPv6"])
    v4 = endpoint_slice("web", [endpoint("198.51.100.11"), endpoint("198.51.100.12")])
    v6 = endpoint_slice("web", [endpoint("2001:db8:2::11")], family="IPv6")
    got = checks([svc, v4, v6])
    assert [(c.family, c.local_endpoints) for c in got] == [(4, 2), (6, 1)]


def test_a_service_left_out_for_a_conflict_serves_no_health_check() -> None:
    older = lb("a", cip=CIP)
    older["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z"
    newer = lb("b", cip=CIP, hcnp=32001)  # the same ClusterIP and port: left out
    newer["metadata"]["creationTimestamp"] = "2021-01-01T00:00:00Z"
    ruleset = svcrules.compile_paths(
        ["-"], stdin=io.StringIO(dump([NODE, older, newer])), on_invalid="skip"
    )
    assert [c.name for c in ruleset.plan.health_checks] == ["a"]


def test_the_compile_cache_gives_the_same_health_checks_and_trigger_times() -> None:
    objs = [NODE, lb(), endpoint_slice("web", [endpoint("198.51.100.11")])]
    objs[-1]["metadata"]["annotations"] = {TRIGGER: "2024-05-01T10:00:00Z"}
    job = svcrules.compiler.prepare(["-"], stdin=io.StringIO(dump(objs)), overrides=Overrides())
    plain = job.compile()
    first = job.compile(keep=True)
    again = job.compile(cache=first.next_cache)
    assert plain.plan.health_checks == first.plan.health_checks == again.plan.health_checks
    assert plain.triggers == again.triggers == {"default/web-ipv4": "2024-05-01T10:00:00Z"}


TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"


# What sync saves, and reads back ------------------------------------------------------


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """sync and apply over the shipped fake nftables kernel (one for the whole test)."""
    monkeypatch.setattr(cli_run, "net_admin_problem", lambda: None)
    row = registry.BACKENDS["nftables"]
    made: list[Any] = []

    def open_fake(tool: str) -> Any:
        if not made:
            made.append(row.fake(""))
        return made[0][1]

    monkeypatch.setitem(registry.BACKENDS, "nftables", dataclasses.replace(row, open=open_fake))


def sync(tmp_path: Path, *objs: Obj, node: Obj = NODE, expect: int = 0) -> str:
    path = tmp_path / "in.yaml"
    path.write_text(dump([node, *objs]))
    res = runner.invoke(app, ["sync", str(path), "--state-dir", str(tmp_path / "state")])
    setup()  # the command logged to the runner's stream, which is closed now
    assert res.exit_code == expect, res.stderr
    return res.stderr


def test_sync_saves_the_health_checks_with_the_script(tmp_path: Path, fake_kernel: None) -> None:
    svc = lb(cip=[CIP, CIP6], ipFamilies=["IPv4", "IPv6"])
    sync(tmp_path, svc, endpoint_slice("web", [endpoint("198.51.100.11")]))
    store = StateStore(tmp_path / "state")
    _, meta = store.load()
    assert meta.health == [
        {"address": "192.0.2.1", "family": 4, "localEndpoints": 1, "name": "web"}
        | {"namespace": "default", "port": 32000},
        {"address": "2001:db8:1::1", "family": 6, "localEndpoints": 0, "name": "web"}
        | {"namespace": "default", "port": 32000},
    ]
    empty = Meta()
    counters = {k: getattr(empty, k) for k in COUNTERS}
    assert store.load_summary() == dataclasses.replace(meta, **counters)
    # nodePortAddresses other than primary: every address of the family, as kube-proxy
    sync(tmp_path, svc, node=node_config(nodePortAddresses=["0.0.0.0/0", "::/0"]))
    view = read_view(store, booted=0)
    assert [(s.family, s.address, s.local_endpoints) for s in view.services] == [
        (4, "", 0),
        (6, "", 0),
    ]


def test_the_summary_is_not_served_when_damaged_or_older_than_the_boot(
    tmp_path: Path, fake_kernel: None
) -> None:
    sync(tmp_path, lb(), endpoint_slice("web", [endpoint("198.51.100.11")]))
    store = StateStore(tmp_path / "state")
    assert [s.local_endpoints for s in read_view(store, booted=0).services] == [1]
    later = time.time() + 3600
    view = read_view(store, booted=later)
    assert view.services == () and view.last_success == 0 and "booted" in view.note
    data = bytearray(store.path.read_bytes())
    data[-2] ^= 1
    store.path.write_bytes(bytes(data))
    assert store.load_summary() is None
    assert read_view(store, booted=0).services == ()


# The answers ----------------------------------------------------------------------------


def test_service_answers_are_kube_proxys() -> None:
    ok = service_answer("shop", "web", 2, True)
    assert ok.status == 200
    assert ok.body == (
        b'{\n\t"service": {\n\t\t"namespace": "shop",\n\t\t"name": "web"\n\t},\n'
        b'\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}'
    )
    assert json.loads(ok.body) == {
        "service": {"namespace": "shop", "name": "web"},
        "localEndpoints": 2,
        "serviceProxyHealthy": True,
    }
    assert dict(ok.headers) == {
        "Content-Type": "application/json",
        "X-Content-Type-Options": "nosniff",
        "X-Load-Balancing-Endpoint-Weight": "2",
    }
    assert service_answer("shop", "web", 0, True).status == 503
    stale = service_answer("shop", "web", 2, False)
    assert stale.status == 503 and json.loads(stale.body)["serviceProxyHealthy"] is False


def test_healthz_and_livez_answers_are_kube_proxys() -> None:
    now, last = 1_700_000_100.5, 1_700_000_000.0
    ok = healthz_answer(True, last, now)
    assert ok.status == 200 and ok.body == (
        b'{"lastUpdated": "2023-11-14 22:15:00.5 +0000 UTC",'
        b'"currentTime": "2023-11-14 22:15:00.5 +0000 UTC", "nodeEligible": true}'
    )
    bad = healthz_answer(False, last, now, livez=True)
    assert bad.status == 503 and bad.body == (
        b'{"lastUpdated": "2023-11-14 22:13:20 +0000 UTC",'
        b'"currentTime": "2023-11-14 22:15:00.5 +0000 UTC"}'
    )
    assert ("X-Content-Type-Options", "nosniff") in bad.headers
    assert go_time(0) == "0001-01-01 00:00:00 +0000 UTC"
    assert go_time(1_700_000_000.000123) == "2023-11-14 22:13:20.000123 +0000 UTC"


def test_staleness_is_twice_the_sync_period() -> None:
    rule = Staleness(sync_period=60, started=1000.0)
    assert rule.healthy(last_success=5000.0, now=5119.0)
    assert not rule.healthy(last_success=5000.0, now=5120.0)
    # nothing synced since boot: healthy while starting up, for as long
    assert rule.healthy(last_success=0, now=1119.0)
    assert not rule.healthy(last_success=0, now=1120.0)


def test_durations_and_addresses() -> None:
    assert [parse_duration(t) for t in ("60", "60s", "1m30s", "500ms", "1.5h")] == [
        60,
        60,
        90,
        0.5,
        5400,
    ]
    for bad in ("", "0", "-1", "1d", "s", "1m 30s"):
        with pytest.raises(UsageError):
            parse_duration(bad)
    assert parse_bind("0.0.0.0:10256") == (4, "", 10256)
    assert parse_bind("[::]:10256") == (6, "", 10256)
    assert parse_bind("[2001:db8::1]:80") == (6, "2001:db8::1", 80)
    assert show(parse_bind("192.0.2.1:10256")) == "192.0.2.1:10256"
    assert show((6, "", 31000)) == "[::]:31000"
    for bad in ("10256", "localhost:10256", "[::]:", "1.2.3.4:70000", "::1:80"):
        with pytest.raises(ValueError):
            parse_bind(bad)


# The server, on the loopback address ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str = "/", method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


LOOPBACK = node_config(nodeIPs=["127.0.0.1"])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Server]:
    health = Health(Staleness(60, time.time()))
    server = Server(health, StateStore(tmp_path / "state"), (4, "127.0.0.1", 0), booted=0)
    server.start()
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(10)
        assert not thread.is_alive()


def test_the_server_follows_the_state_directory(
    tmp_path: Path, fake_kernel: None, served: Server
) -> None:
    hcnp = free_port()
    assert served.healthz_listener is not None
    healthz = served.healthz_listener.port()
    status, _, body = get(healthz, "/healthz")
    assert status == 200 and b'"nodeEligible": true' in body  # starting up
    assert served.listeners == {}

    local = endpoint_slice("web", [endpoint("198.51.100.11")])
    sync(tmp_path, lb(hcnp=hcnp), local, node=LOOPBACK)
    served.refresh()
    status, headers, body = get(hcnp, "/healthz")
    assert status == 200 and json.loads(body)["localEndpoints"] == 1
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert get(hcnp, "/anything", method="HEAD")[0] == 200  # any path, as kube-proxy

    moved = endpoint_slice("web", [endpoint("198.51.100.11", node="node-b")])
    sync(tmp_path, lb(hcnp=hcnp), moved, node=LOOPBACK)
    served.refresh()
    status, _, body = get(hcnp)
    assert status == 503 and json.loads(body)["localEndpoints"] == 0

    other = free_port()
    sync(tmp_path, lb(hcnp=other), moved, node=LOOPBACK)  # the port moved
    served.refresh()
    assert [b[2] for b in served.listeners] == [other]
    with pytest.raises(ConnectionRefusedError):
        get(hcnp)
    assert get(other)[0] == 503
    assert get(healthz, "/nothing")[0] == 404


def test_a_port_another_program_holds_is_retried(
    tmp_path: Path, fake_kernel: None, served: Server
) -> None:
    served.retry = 0
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        hcnp = holder.getsockname()[1]
        sync(tmp_path, lb(hcnp=hcnp), node=LOOPBACK)
        served.refresh()
        assert served.listeners == {}
    served.refresh()
    assert [b[2] for b in served.listeners] == [hcnp]


def test_the_healthz_address_in_use_is_an_error_naming_it(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = Server(
            Health(Staleness(60, time.time())), StateStore(tmp_path), (4, "127.0.0.1", port)
        )
        with pytest.raises(ListenError, match=f"127.0.0.1:{port}"):
            server.start()
        res = runner.invoke(
            app,
            ["serve", "--state-dir", str(tmp_path), "--healthz-bind-address", f"127.0.0.1:{port}"],
        )
    assert res.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port} (--healthz-bind-address)" in res.stderr
    res = runner.invoke(app, ["serve", "--healthz-bind-address", "nowhere"])
    assert res.exit_code == 2 and "--healthz-bind-address" in res.stderr
    res = runner.invoke(app, ["serve", "--sync-period", "0s"])
    assert res.exit_code == 2 and "--sync-period" in res.stderr


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "svcrules", "serve"),
            *("--state-dir", str(tmp_path / "none"), "--healthz-bind-address", f"127.0.0.1:{port}"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _, _ = get(port, "/livez")
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "no saved state" in err and "stopped" in err


def test_a_health_change_without_a_rule_change_is_saved(tmp_path: Path, fake_kernel: None) -> None:
    """The last ready local endpoint turns serving-terminating: the rules keep sending
    to it (nothing to change in the kernel), but the health check must fail now."""
    ready = endpoint_slice("web", [endpoint("198.51.100.11")])
    going = endpoint_slice(
        "web", [endpoint("198.51.100.11", ready=False, serving=True, terminating=True)]
    )
    store = StateStore(tmp_path / "state")
    sync(tmp_path, lb(), ready)
    script, meta = store.load()
    assert meta.health[0]["localEndpoints"] == 1
    sync(tmp_path, lb(), going)
    again, meta = store.load()
    assert again == script and meta.health[0]["localEndpoints"] == 0
    assert [s.local_endpoints for s in read_view(store, booted=0).services] == [0]
