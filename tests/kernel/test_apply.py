"""diff / apply / sync / cleanup against a real kernel (the lab's node namespace).

svcrules runs inside the node namespace as a user would run it there, with its
state directory in a temporary folder.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s import Obj, dump, endpoint_slice, service

from .backends import BACKENDS
from .lab import Lab
from .nodes import CIP_B, IptablesNode, Node, node_for, ops, svc_a, svc_b
from .test_semantics import CIP, CLIENT, FOREIGN, NODE, dropped, eps, ok, refused


@pytest.fixture
def node(lab: Lab, tmp_path: Path) -> Node:
    return Node(lab, tmp_path)


@pytest.fixture(params=BACKENDS)
def any_node(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Node]:
    """The node with each backend in turn: for what must hold whichever is used."""
    yield from node_for(lab, tmp_path, request.param)


def test_apply_noop_and_one_endpoint_change(lab: Lab, node: Node) -> None:
    first = node.apply(*svc_a("pod2"), *svc_b("pod3"))
    assert "full replacement (no saved state" in first
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=4))) == {"pod2"}
    again = node.apply(*svc_a("pod2"), *svc_b("pod3"))
    assert "Kernel: no change (0 operations)" in again
    assert node.transaction(*svc_a("pod2"), *svc_b("pod3")) == ""
    tx = node.transaction(*svc_a("pod4"), *svc_b("pod3"))
    touched = {line.split()[4].rsplit("-", 1)[0] for line in tx.splitlines()}
    assert touched == {"backends-tcp", "hairpin", "state"}, tx
    summary = node.apply(*svc_a("pod4"), *svc_b("pod3"))
    assert "incremental update" in summary and ops(summary) <= 8
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=6))) == {"pod4"}
    assert lab.backends(ok(lab.probe("client", CIP_B, 80, count=3))) == {"pod3"}
    proc = node.run("diff")
    assert proc.returncode == 0 and "no change" in proc.stdout


def test_element_changes_sent_without_nft_list_as_nft_writes_them(lab: Lab, node: Node) -> None:
    """An endpoint change touches only set and map elements, and goes straight over
    netlink (svcrules.kernel.nft.netlink): what the kernel then lists (the backend map,
    the hairpin set, the fingerprint comments) is what nft lists for the same script
    loaded by nft itself (--verify compares every element), and packets follow it."""
    affinity = svc_a("pod2", "pod3", sessionAffinity="ClientIP")
    node.apply(*affinity, *svc_b("pod3"))
    tx = node.transaction(*affinity, *svc_b("pod2"))
    assert tx and all(
        line.startswith(("add element", "delete element")) for line in tx.splitlines()
    )
    summary = node.apply(*affinity, *svc_b("pod2"))
    assert "incremental update" in summary, summary
    verified = node.run("apply", "--verify")
    assert verified.returncode == 0 and "no change" in verified.stdout, verified.stdout
    assert lab.backends(ok(lab.probe("client", CIP_B, 80, count=3))) == {"pod2"}
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=4))) <= {"pod2", "pod3"}


def test_add_remove_service_and_change_port(lab: Lab, node: Node) -> None:
    node.apply(*svc_a("pod2"))
    summary = node.apply(*svc_a("pod2"), *svc_b("pod3"))
    assert "1 added" in summary and "incremental" in summary
    assert lab.backends(ok(lab.probe("client", CIP_B, 80, count=3))) == {"pod3"}
    summary = node.apply(*svc_a("pod2"), *svc_b("pod3", port=81))
    assert "incremental" in summary
    refused(lab.probe("client", CIP_B, 80, count=2))
    assert lab.backends(ok(lab.probe("client", CIP_B, 81, count=3))) == {"pod3"}
    summary = node.apply(*svc_a("pod2"))
    assert "1 removed" in summary and "chains +0 ~0 -1" in summary
    dropped(lab.probe("client", CIP_B, 81, count=2, timeout=0.5, concurrency=2))
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod2"}
    listed = lab.nft("list", "table", "ip", "svcrules")
    assert "default/b" not in listed


def test_flip_traffic_policies(lab: Lab, node: Node) -> None:
    def objs(**spec: Any) -> list[Obj]:
        return [
            service(
                "a",
                CIP,
                type="NodePort",
                ports=[{"name": "http", "port": 80, "nodePort": 30080}],
                **spec,
            ),
            endpoint_slice("a", eps("pod2") + eps("pod3", node="node-b")),
        ]

    node.apply(*objs())
    res = ok(lab.probe("client", NODE, 30080, count=24))
    assert lab.backends(res) == {"pod2", "pod3"}
    assert "incremental" in node.apply(*objs(externalTrafficPolicy="Local"))
    res = ok(lab.probe("client", NODE, 30080, count=10))
    assert lab.backends(res) == {"pod2"} and {r.seen_src for r in res} == {CLIENT}
    assert "incremental" in node.apply(*objs(internalTrafficPolicy="Local"))
    assert lab.backends(ok(lab.probe("pod1", CIP, 80, count=10))) == {"pod2"}
    assert lab.backends(ok(lab.probe("client", NODE, 30080, count=24))) == {"pod2", "pod3"}


def test_applies_to_b_never_disturb_a(lab: Lab, node: Node) -> None:
    node.apply(*svc_a("pod2", "pod3"), *svc_b("pod4"))
    failures: list[object] = []
    done = threading.Event()
    count = 0

    def loop() -> None:
        nonlocal count
        while not done.is_set():
            time.sleep(0.01)
            for r in lab.probe("client", CIP, 80, count=5, timeout=2.0):
                count += 1
                if r.outcome != "ok" or r.backend not in ("pod2", "pod3"):
                    failures.append(r)

    t = threading.Thread(target=loop)
    t.start()
    try:
        for i in range(50):
            pods = ("pod4",) if i % 2 else ("pod1", "pod4")
            summary = node.apply(*svc_a("pod2", "pod3"), *svc_b(*pods))
            assert "incremental" in summary
    finally:
        done.set()
        t.join()
    assert count > 50 and not failures, failures[:3]


def test_refused_incremental_change_falls_back_to_full_replacement(lab: Lab, node: Node) -> None:
    node.apply(*svc_a("pod2"))
    tx = node.transaction(*svc_a("pod2", "pod3"))
    add = next(ln for ln in tx.splitlines() if ln.startswith("add element ip svcrules backends"))
    map_name, key = add.split()[4], add.split("{ ")[1].split(" :")[0]
    # Someone else put another value at the slot the update adds: the kernel refuses
    # the incremental transaction (EEXIST), and the same run replaces the tables whole.
    lab.nft(
        "add", "element", "ip", "svcrules", map_name, "{", key, ":", "192.0.2.77", ".", "1", "}"
    )
    node.write(*svc_a("pod2", "pod3"))
    proc = node.run("apply")
    assert proc.returncode == 0, proc.stderr
    assert "full replacement (incremental refused: Error: " in proc.stdout
    assert "File exists" in proc.stdout and "fell back to full replacement)" in proc.stdout
    assert "refused the incremental change" in proc.stderr
    assert "192.0.2.77" not in lab.nft("list", "map", "ip", "svcrules", map_name)
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=24))) == {"pod2", "pod3"}
    assert node.run("diff", "--verify").returncode == 0


def test_diff_reviews_what_changes_on_the_node(lab: Lab, any_node: Node) -> None:
    """diff against the live node: what each Service port gains and loses, as text and
    JSON; and drift, in words."""
    node = any_node
    node.apply(*svc_a("pod2", "pod3"), *svc_b("pod4"))
    node.write(*svc_a("pod2", "pod4"), *svc_b("pod4", port=81))
    proc = node.run("diff")
    assert proc.returncode == 1, proc.stderr
    assert (
        "Service ports: 0 added, 0 removed, 2 changed\n"
        "  ~ default/a:http/TCP IPv4\n"
        "      endpoint 198.51.100.13:8080 removed\n"
        "      endpoint 198.51.100.14:8080 added (local)\n"
        "  ~ default/b:http/TCP IPv4\n"
        "      frontend clusterIP 203.0.113.20:80 removed\n"
        "      frontend clusterIP 203.0.113.20:81 added\n"
        "Kernel: incremental update, "
    ) in proc.stdout, proc.stdout
    proc = node.run("diff", "-o", "json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and doc["mode"] == "incremental"
    a, b = doc["changes"]
    assert [e["endpoint"] for e in a["endpoints"]["removed"]] == ["198.51.100.13:8080"]
    assert b["frontends"]["added"] == [{"type": "clusterIP", "address": CIP_B, "port": 81}]
    node.apply(*svc_a("pod2", "pod4"), *svc_b("pod4", port=81))
    proc = node.run("diff", "-o", "json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["changes"] == []
    # Someone empties the fingerprint behind svcrules' back.
    if isinstance(node, IptablesNode):
        node.ipt("-t", "nat", "-F", "SVCRULES-STATE")
        drift = (
            "ipv4 nat: SVCRULES-STATE, or a jump from a built-in chain to svcrules' chains, missing"
        )
    else:
        lab.nft("flush", "set", "ip", "svcrules", "state")
        drift = "table ip svcrules: missing, or no svcrules fingerprint in the state set"
    proc = node.run("diff")
    assert proc.returncode == 1 and "Kernel: full replacement (the kernel's" in proc.stdout
    assert drift in proc.stdout and "('" not in proc.stdout, proc.stdout
    assert drift in json.loads(node.run("diff", "-o", "json").stdout)["reason"]


def test_drift_and_cleanup_leave_other_tables_alone(lab: Lab, node: Node) -> None:
    lab.load(FOREIGN)
    foreign = lab.nft("list", "table", "inet", "filter") + lab.nft("list", "table", "ip", "nat")
    node.apply(*svc_a("pod2"))
    lab.nft("delete", "table", "ip6", "svcrules")  # someone removed a table
    summary = node.apply(*svc_a("pod2"))
    assert "full replacement (the kernel's nftables rules differ" in summary
    assert "table ip6 svcrules" in lab.nft("list", "tables")
    node.write(*svc_a("pod3"))
    assert node.lab.exec("node", *node.cmd("sync", str(node.inputs))).returncode == 0
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod3"}
    proc = node.run("cleanup", with_inputs=False)
    assert proc.returncode == 0 and "ip svcrules, ip6 svcrules" in proc.stdout
    tables = lab.nft("list", "tables")
    assert "svcrules" not in tables
    after = lab.nft("list", "table", "inet", "filter") + lab.nft("list", "table", "ip", "nat")
    assert after == foreign
    assert not (node.state / "last.nft").exists()
    assert "first run" in node.apply(*svc_a("pod2"))


def test_dry_run_changes_nothing(lab: Lab, node: Node) -> None:
    node.apply(*svc_a("pod2"))
    before = lab.nft("list", "ruleset")
    node.write(*svc_a("pod3"))
    proc = node.run("apply", "--dry-run")
    assert proc.returncode == 0 and "incremental update" in proc.stdout
    assert lab.nft("list", "ruleset") == before


def test_two_syncs_at_once(lab: Lab, node: Node) -> None:
    node.write(*svc_a("pod2", "pod3"), *svc_b("pod4"))
    procs = [
        subprocess.Popen(
            ["ip", "netns", "exec", lab.netns("node"), *node.cmd("sync", str(node.inputs))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("Traceback" not in err for _, err in outs)
    assert sum("applied: full" in err for _, err in outs) == 1, outs
    proc = node.run("diff")
    assert proc.returncode == 0, proc.stdout
    tables = lab.nft("list", "tables")
    assert tables.count("table ip svcrules") == 1


def test_sync_is_quiet_and_writes_metrics(lab: Lab, node: Node) -> None:
    metrics = node.tmp / "svcrules.prom"
    node.write(*svc_a("pod2"))
    proc = node.run("sync", "--metrics-file", str(metrics), "--log-format", "json")
    assert proc.returncode == 0 and '"event": "applied"' in proc.stderr
    text = metrics.read_text()
    assert 'svcrules_service_ports{table="svcrules"} 1' in text
    assert 'svcrules_sync_mode{table="svcrules",mode="full"} 1' in text
    proc = node.run("sync", "--metrics-file", str(metrics))
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == ""
    text = metrics.read_text()
    assert 'svcrules_sync_operations{table="svcrules"} 0' in text
    assert 'svcrules_last_sync_success{table="svcrules"} 1' in text


def test_affinity_survives_an_apply_that_changes_another_service(lab: Lab, any_node: Node) -> None:
    node = any_node
    a = svc_a("pod1", "pod2", "pod3", sessionAffinity="ClientIP")
    node.apply(*a, *svc_b("pod4"))
    pinned = lab.backends(ok(lab.probe("client", CIP, 80, count=8)))
    assert len(pinned) == 1
    for pods in (("pod1",), ("pod2", "pod4")):
        assert "incremental" in node.apply(*a, *svc_b(*pods))
        assert lab.backends(ok(lab.probe("client", CIP, 80, count=8))) == pinned


def test_affinity_survives_a_drift_repair(lab: Lab, node: Node) -> None:
    # A full replacement carries the live affinity entries into the new tables, in the
    # same transaction: pinned clients stay where they were.
    a = svc_a("pod1", "pod2", "pod3", sessionAffinity="ClientIP")
    node.apply(*a)
    pinned = lab.backends(ok(lab.probe("client", CIP, 80, count=8)))
    assert len(pinned) == 1
    before = lab.nft("list", "set", "ip", "svcrules", "affinity")
    assert CLIENT in before
    for _ in range(3):
        lab.nft("delete", "table", "ip6", "svcrules")  # drift: the next apply replaces all
        summary = node.apply(*a)
        assert "full replacement (the kernel's nftables rules differ" in summary
        assert CLIENT in lab.nft("list", "set", "ip", "svcrules", "affinity")
        assert lab.backends(ok(lab.probe("client", CIP, 80, count=8))) == pinned
    # --verify repairs an element someone added by hand: also a full replacement.
    lab.nft("add", "element", "ip", "svcrules", "cluster-ips", "{", "192.0.2.77", "}")
    node.write(*a)
    proc = node.run("apply", "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "full replacement" in proc.stdout
    assert "192.0.2.77" not in lab.nft("list", "set", "ip", "svcrules", "cluster-ips")
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=8))) == pinned


def test_udp_client_moves_off_a_removed_backend(lab: Lab, any_node: Node) -> None:
    node = any_node
    udp = [service("dns", CIP, ports=[{"name": "dns", "port": 53, "protocol": "UDP"}])]

    def dns(*pods: str) -> list[Obj]:
        return [
            *udp,
            endpoint_slice(
                "dns", eps(*pods), ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}]
            ),
        ]

    node.apply(*dns("pod2", "pod3"))
    # One long-lived UDP flow: a fixed source port keeps one conntrack entry.
    first = ok(lab.probe("client", CIP, 53, "udp", count=3, sport=41053))
    (backend,) = lab.backends(first)
    other = ({"pod2", "pod3"} - {backend}).pop()
    node.apply(*dns(other))
    again = ok(lab.probe("client", CIP, 53, "udp", count=3, sport=41053))
    assert lab.backends(again) == {other}


def test_udp_client_rejected_before_endpoints_reaches_them_after(lab: Lab, node: Node) -> None:
    """The same UDP flow, refused while the Service had no endpoint, is served after."""
    udp = service("dns", CIP, ports=[{"name": "dns", "port": 53, "protocol": "UDP"}])
    node.apply(udp)
    refused(lab.probe("client", CIP, 53, "udp", count=2, sport=41054))
    node.apply(
        udp,
        endpoint_slice(
            "dns", eps("pod2"), ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}]
        ),
    )
    res = ok(lab.probe("client", CIP, 53, "udp", count=2, sport=41054))
    assert lab.backends(res) == {"pod2"}


def test_missing_node_config_is_exit_2_and_touches_nothing(lab: Lab, node: Node) -> None:
    node.inputs.write_text(dump([service("a", CIP)]))
    proc = node.run("apply")
    assert proc.returncode == 2 and proc.stdout == "" and "NodeConfig" in proc.stderr
    assert "svcrules" not in lab.nft("list", "tables")
