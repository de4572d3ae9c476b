"""``svcrules serve`` on the lab's node, asked over the network as a load balancer and a
monitoring system would: real HTTP requests from the client namespace to the node's
healthCheckNodePorts and to /healthz, /livez and /metrics, while ``sync`` runs in the
node namespace with its own state directory.

The waits below are for conditions (serve reads the state directory once a second, and
/healthz turns 503 once the sync period has passed twice), each with a deadline; none
measures how long anything took.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.k8s import Obj, endpoint, endpoint_slice, service

from .lab import Lab
from .nodes import Node
from .test_semantics import CIP, CIP6, NODE, POD, POD6, cfg

NODE6 = "2001:db8:1::1"
SYNC_PERIOD = 3  # seconds: /healthz turns 503 six seconds after the last sync

# Run in the client namespace: one HTTP GET, printed as JSON (no proxy from the
# environment; an error that is not an HTTP status is printed as such).
FETCH = """
import json, sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    r = opener.open(sys.argv[1], timeout=5)
    status, headers, body = r.status, dict(r.headers), r.read()
except urllib.error.HTTPError as e:
    status, headers, body = e.code, dict(e.headers), e.read()
except OSError as e:
    print(json.dumps({"error": str(e)}))
    raise SystemExit(0)
print(json.dumps({"status": status, "headers": headers, "body": body.decode()}))
"""

# Run in the node namespace: n ports no program listens on there.
FREE_PORTS = """
import socket, sys
socks = [socket.socket(socket.AF_INET6) for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("::", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
"""


def fetch(lab: Lab, url: str) -> dict[str, Any]:
    proc = lab.exec("client", sys.executable, "-c", FETCH, url, timeout=30)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def until(
    lab: Lab, url: str, want: Callable[[dict[str, Any]], bool], seconds: float = 20
) -> dict[str, Any]:
    """GET ``url`` until the answer is what ``want`` says, at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        got = fetch(lab, url)
        if want(got):
            return got
        assert time.monotonic() < deadline, f"gave up waiting on {url}: last {got}"
        time.sleep(0.2)


def status(code: int) -> Callable[[dict[str, Any]], bool]:
    return lambda got: got.get("status") == code


def answered(got: dict[str, Any]) -> bool:
    return "status" in got


def refused(got: dict[str, Any]) -> bool:
    return "refused" in got.get("error", "")


def lb_local(name: str, cip: list[str], hcnp: int, n: int) -> Obj:
    return service(
        name,
        cip,
        type="LoadBalancer",
        externalTrafficPolicy="Local",
        healthCheckNodePort=hcnp,
        ipFamilies=["IPv4", "IPv6"][: len(cip)],
        ports=[{"name": "http", "port": 80, "nodePort": 30080 + n}],
        lb_ips=[f"203.0.113.{200 + n}"],
    )


def slices(name: str, pod: str, node: str) -> list[Obj]:
    return [
        endpoint_slice(name, [endpoint(POD[pod], node=node)]),
        endpoint_slice(name, [endpoint(POD6[pod], node=node)], family="IPv6"),
    ]


class Serve:
    """``svcrules serve`` running in the node namespace."""

    def __init__(self, lab: Lab, node: Node, healthz: int) -> None:
        self.log = node.tmp / "serve.log"
        cmd = [
            *node.cmd("serve"),
            *("--healthz-bind-address", f"0.0.0.0:{healthz}"),
            *("--sync-period", f"{SYNC_PERIOD}s"),
        ]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", lab.netns("node"), *cmd],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )

    def logs(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return self.proc.returncode


@pytest.fixture
def node(lab: Lab, tmp_path: Path) -> Node:
    return Node(lab, tmp_path)


@pytest.fixture
def ports(lab: Lab) -> list[int]:
    out = lab.exec("node", sys.executable, "-c", FREE_PORTS, "3").stdout
    return [int(p) for p in out.split()]


@pytest.fixture
def serve(lab: Lab, node: Node, ports: list[int]) -> Iterator[Serve]:
    server = Serve(lab, node, ports[0])
    try:
        yield server
    finally:
        rc = server.stop()
        assert rc == 0, f"serve exited {rc}:\n{server.logs()}"


def sync(node: Node, *objs: Obj) -> None:
    node.write(*objs, node=cfg())
    proc = node.run("sync")
    assert proc.returncode == 0, proc.stderr


def test_health_checks_follow_the_local_endpoints(
    lab: Lab, node: Node, ports: list[int], serve: Serve
) -> None:
    _, hc_a, hc_b = ports
    a = [lb_local("a", [CIP, CIP6], hc_a, 0)]
    b = [lb_local("b", ["203.0.113.20"], hc_b, 1), *slices("b", "pod2", "node-b")[:1]]
    sync(node, *a, *slices("a", "pod1", "node-a"), *b)
    until(lab, f"http://{NODE}:{hc_a}/healthz", answered)
    assert serve.proc.poll() is None, serve.logs()
    sync(node, *a, *slices("a", "pod1", "node-a"), *b)  # a fresh success, for what follows

    # a node with a ready local endpoint: 200, in each family
    for url in (f"http://{NODE}:{hc_a}/healthz", f"http://[{NODE6}]:{hc_a}/"):
        got = fetch(lab, url)
        assert got["status"] == 200, (url, got, serve.logs())
        assert json.loads(got["body"]) == {
            "service": {"namespace": "default", "name": "a"},
            "localEndpoints": 1,
            "serviceProxyHealthy": True,
        }
        assert got["headers"]["X-Content-Type-Options"] == "nosniff"
        assert got["headers"]["Content-Type"] == "application/json"
    # none: 503
    got = fetch(lab, f"http://{NODE}:{hc_b}/healthz")
    assert got["status"] == 503 and json.loads(got["body"])["localEndpoints"] == 0

    # a sync moves a's last local endpoint to another node: 503 in both families
    sync(node, *a, *slices("a", "pod1", "node-b"), *b)
    for url in (f"http://{NODE}:{hc_a}/", f"http://[{NODE6}]:{hc_a}/"):
        got = until(lab, url, status(503))
        assert json.loads(got["body"])["localEndpoints"] == 0

    # a Service that goes closes its port
    sync(node, *a, *slices("a", "pod1", "node-b"))
    until(lab, f"http://{NODE}:{hc_b}/", refused)


def test_healthz_livez_and_metrics(lab: Lab, node: Node, ports: list[int], serve: Serve) -> None:
    healthz, hc_a, _ = ports
    objs = [lb_local("a", [CIP], hc_a, 0), *slices("a", "pod1", "node-a")[:1]]
    sync(node, *objs)
    url = f"http://{NODE}:{healthz}"
    until(lab, url + "/livez", answered)
    sync(node, *objs)  # unchanged inputs: still a successful sync

    def syncs_seen(got: dict[str, Any]) -> bool:
        """serve has read the counters of both syncs (it looks once a second)."""
        if got.get("status") != 200:
            return False
        families = {f.name: f for f in text_string_to_metric_families(got["body"])}
        hist = families["kubeproxy_sync_proxy_rules_duration_seconds"]
        assert hist.type == "histogram"
        return next(s.value for s in hist.samples if s.name.endswith("_count")) == 2

    metrics = until(lab, url + "/metrics", syncs_seen)
    assert metrics["headers"]["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(metrics["body"])}
    assert families["svcrules_last_sync_success"].samples[0].value == 1
    assert families["kubeproxy_proxy_healthz"].type == "counter"
    got = fetch(lab, url + "/healthz")
    assert got["status"] == 200, (got, serve.logs())
    body = json.loads(got["body"])
    assert body["nodeEligible"] is True and body["lastUpdated"] == body["currentTime"]

    # no successful sync within twice the sync period: 503, and back after a sync
    stale = until(lab, url + "/healthz", status(503), seconds=6 * SYNC_PERIOD)
    body = json.loads(stale["body"])
    assert body["lastUpdated"] != body["currentTime"]
    assert fetch(lab, url + "/livez")["status"] == 503
    # kube-proxy's health checks of Services fail too while the proxy is unhealthy
    got = fetch(lab, f"http://{NODE}:{hc_a}/")
    assert got["status"] == 503 and json.loads(got["body"])["serviceProxyHealthy"] is False
    sync(node, *objs)
    until(lab, url + "/healthz", status(200))
