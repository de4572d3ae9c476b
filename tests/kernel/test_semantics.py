"""SEMANTICS.md, packet by packet: compiled rules loaded into the lab's node,
real TCP/UDP connections from the outside client, pods and the node itself.

Every test runs once per backend (nftables, iptables-nft, iptables-legacy): the
same objects must give the same outcome whichever backend renders them.

Lab (see lab.py): node 192.0.2.1 / 2001:db8:1::1 (second local address
198.18.0.1 on dummy0), client 192.0.2.100 / 2001:db8:1::100, pods pod1..pod4 =
198.51.100.11..14 / 2001:db8:2::11..14, each serving TCP+UDP on 8080, 8081,
9090 and 5353 and answering with its name and the source address it saw.
Endpoints on "node-a" are local; "node-b" endpoints live on the same lab
(routing does not care), which is enough to tell local from remote.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.k8s import Obj, compile_objs, endpoint, endpoint_slice, node_config, service

from . import backends
from .lab import Lab, Result

CIP = "203.0.113.10"
CIP6 = "2001:db8:3::10"
LB = "203.0.113.200"
EXT = "203.0.113.210"
NODE = "192.0.2.1"
# Masquerade picks an address of the node by its own rules (here the dummy's),
# so "masqueraded" means: the backend saw one of the node's addresses.
NODE_ADDRS = {"192.0.2.1", "198.18.0.1"}
NODE_ADDRS6 = {"2001:db8:1::1", "2001:db8:18::1"}
CLIENT = "192.0.2.100"
POD = {f"pod{i}": f"198.51.100.{10 + i}" for i in range(1, 5)}
POD6 = {f"pod{i}": f"2001:db8:2::{10 + i}" for i in range(1, 5)}

N = 24  # connections per probe: P(one of 3 backends never chosen) < 1e-3


def cfg(**spec: Any) -> Obj:
    base: dict[str, Any] = {
        "clusterCIDRs": ["198.51.100.0/24", "2001:db8:2::/64"],
        "serviceCIDRs": ["203.0.113.0/25", "2001:db8:3::/112"],
    }
    base.update(spec)
    return node_config(**base)


@pytest.fixture(params=backends.BACKENDS)
def lab(kernel_lab: Lab, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The shared lab, emptied, with ``lab.backend`` naming the backend under test."""
    backend = request.param
    backends.require(backend)
    kernel_lab.reset()
    kernel_lab.backend = backend  # type: ignore[attr-defined]
    yield kernel_lab
    if backend == "iptables-legacy":
        backends.reset_legacy(kernel_lab)


def backend_of(lab: Lab) -> str:
    return str(getattr(lab, "backend", "nftables"))


def load(lab: Lab, *objs: Obj, node: Obj | None = None) -> str:
    ruleset = compile_objs([node or cfg(), *objs])
    return backends.install(lab, ruleset, backend_of(lab))


def eps(*pods: str, node: str = "node-a", **kw: Any) -> list[Obj]:
    return [endpoint(POD[p], node=node, **kw) for p in pods]


def web(type: str = "ClusterIP", port: int = 80, node_port: int | None = None, **spec: Any) -> Obj:
    p: Obj = {"name": "http", "port": port, "protocol": "TCP"}
    if node_port:
        p["nodePort"] = node_port
    return service("web", spec.pop("cluster_ip", CIP), ports=[p], type=type, **spec)


def web_slice(endpoints: list[Obj], port: int = 8080) -> Obj:
    return endpoint_slice("web", endpoints, ports=[{"name": "http", "port": port}])


def ok(results: list[Result]) -> list[Result]:
    bad = [r for r in results if r.outcome != "ok"]
    assert not bad, f"{len(bad)} of {len(results)} failed: {bad[:3]}"
    return results


def refused(results: list[Result]) -> None:
    assert {r.outcome for r in results} == {"refused"}, results[:3]
    assert max(r.elapsed for r in results) < 0.5, "REJECT must answer at once"


def dropped(results: list[Result]) -> None:
    assert {r.outcome for r in results} == {"timeout"}, results[:3]


def sources(results: list[Result]) -> set[str | None]:
    return {r.seen_src for r in results}


# --- 3. choosing an endpoint; 5. ClusterIP; 6. masquerade ---------------------------


def test_clusterip_spreads_over_every_ready_endpoint(lab: Lab) -> None:
    load(lab, web(), web_slice(eps("pod2", "pod3") + eps("pod4", node="node-b")))
    res = ok(lab.probe("pod1", CIP, 80, count=N))
    assert lab.backends(res) == {"pod2", "pod3", "pod4"}
    assert sources(res) == {POD["pod1"]}, "pod sources are not masqueraded"
    assert {r.port for r in res} == {8080}


def test_clusterip_from_outside_and_from_node_is_masqueraded(lab: Lab) -> None:
    load(lab, web(), web_slice(eps("pod2", "pod3")))
    res = ok(lab.probe("client", CIP, 80, count=N))
    assert lab.backends(res) == {"pod2", "pod3"}
    assert sources(res) <= NODE_ADDRS
    res = ok(lab.probe("node", CIP, 80, count=N))
    assert lab.backends(res) == {"pod2", "pod3"}


def test_without_cluster_cidrs_internal_traffic_is_not_masqueraded(lab: Lab) -> None:
    load(lab, web(), web_slice(eps("pod2")), node=node_config())
    assert sources(ok(lab.probe("client", CIP, 80, count=4))) == {CLIENT}


def test_masquerade_all(lab: Lab) -> None:
    load(lab, web(), web_slice(eps("pod2")), node=cfg(masqueradeAll=True))
    assert sources(ok(lab.probe("pod1", CIP, 80, count=4))) <= NODE_ADDRS


def test_hairpin_is_always_masqueraded(lab: Lab) -> None:
    load(lab, web(), web_slice(eps("pod1")))
    res = ok(lab.probe("pod1", CIP, 80, count=6))
    assert lab.backends(res) == {"pod1"}
    assert sources(res) <= NODE_ADDRS


def test_udp_and_tcp_on_one_port_number_are_independent(lab: Lab) -> None:
    svc = service(
        "dns",
        CIP,
        ports=[
            {"name": "tcp", "port": 53, "protocol": "TCP"},
            {"name": "udp", "port": 53, "protocol": "UDP"},
        ],
    )
    sl1 = endpoint_slice("dns", eps("pod2"), ports=[{"name": "tcp", "port": 8080}], name="a")
    sl2 = endpoint_slice(
        "dns", eps("pod3"), ports=[{"name": "udp", "port": 5353, "protocol": "UDP"}], name="b"
    )
    load(lab, svc, sl1, sl2)
    tcp = ok(lab.probe("client", CIP, 53, "tcp", count=6))
    udp = ok(lab.probe("client", CIP, 53, "udp", count=6))
    assert (lab.backends(tcp), {r.port for r in tcp}) == ({"pod2"}, {8080})
    assert (lab.backends(udp), {r.port for r in udp}) == ({"pod3"}, {5353})


def test_multi_port_and_named_target_port_per_endpoint(lab: Lab) -> None:
    svc = service(
        "web",
        CIP,
        ports=[
            {"name": "http", "port": 80, "targetPort": "http"},
            {"name": "metrics", "port": 81, "targetPort": 9090},
        ],
    )
    a = endpoint_slice(
        "web",
        eps("pod1"),
        ports=[{"name": "http", "port": 8080}, {"name": "metrics", "port": 9090}],
        name="a",
    )
    b = endpoint_slice(
        "web",
        eps("pod2"),
        ports=[{"name": "http", "port": 8081}, {"name": "metrics", "port": 9090}],
        name="b",
    )
    load(lab, svc, a, b)
    res = ok(lab.probe("client", CIP, 80, count=N))
    assert {(r.backend, r.port) for r in res} == {("pod1", 8080), ("pod2", 8081)}
    res = ok(lab.probe("client", CIP, 81, count=N))
    assert {(r.backend, r.port) for r in res} == {("pod1", 9090), ("pod2", 9090)}


def test_terminating_fallback_and_never_unserving(lab: Lab) -> None:
    term = eps("pod2", ready=False, serving=True, terminating=True)
    gone = eps("pod3", ready=False, serving=False, terminating=True)
    load(lab, web(), web_slice(eps("pod1") + term + gone))
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=10))) == {"pod1"}
    load(lab, web(), web_slice(term + gone))
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=10))) == {"pod2"}
    load(lab, web(), web_slice(gone))
    refused(lab.probe("client", CIP, 80, count=4))


def test_topology_hints_narrow_to_this_zone(lab: Lab) -> None:
    hinted = [
        endpoint(POD["pod1"], for_zones=["z1"]),
        endpoint(POD["pod2"], for_zones=["z2"]),
        endpoint(POD["pod3"], for_zones=["z1"]),
    ]
    load(lab, web(), web_slice(hinted), node=cfg(zone="z1"))
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=N))) == {"pod1", "pod3"}
    load(lab, web(), web_slice(hinted), node=cfg(zone="z9"))
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=N))) == {"pod1", "pod2", "pod3"}


# --- 4. no endpoints, wrong ports, unallocated addresses ---------------------------


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_no_endpoints_rejects_on_every_frontend(lab: Lab, proto: str) -> None:
    svc = service(
        "web",
        CIP,
        type="LoadBalancer",
        lb_ips=[LB],
        externalIPs=[EXT],
        ports=[{"name": "p", "port": 80, "protocol": proto.upper(), "nodePort": 30080}],
    )
    load(lab, svc)
    for dst, port in ((CIP, 80), (LB, 80), (EXT, 80), (NODE, 30080)):
        refused(lab.probe("client", dst, port, proto, count=3))
    refused(lab.probe("pod1", CIP, 80, proto, count=3))
    refused(lab.probe("node", CIP, 80, proto, count=3))


def test_wrong_port_rejects_and_unallocated_service_ip_drops(lab: Lab) -> None:
    load(lab, web(), web_slice(eps("pod2")))
    refused(lab.probe("client", CIP, 81, count=3))
    refused(lab.probe("pod1", CIP, 81, "udp", count=3))
    dropped(lab.probe("client", "203.0.113.11", 80, count=3, timeout=0.5, concurrency=3))
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod2"}


# --- 5. NodePort, LoadBalancer, externalIPs ----------------------------------------


def test_nodeport_on_primary_address_only_by_default(lab: Lab) -> None:
    load(lab, web("NodePort", node_port=30080), web_slice(eps("pod2", "pod3")))
    res = ok(lab.probe("client", NODE, 30080, count=N))
    assert lab.backends(res) == {"pod2", "pod3"} and sources(res) <= NODE_ADDRS
    # 198.18.0.1 is local but not primary: the node's own stack answers (no listener).
    refused(lab.probe("client", lab.node_dummy_ip4, 30080, count=3))
    # An unused NodePort is not touched either.
    refused(lab.probe("client", NODE, 30081, count=3))
    # From a pod and from the node itself.
    assert lab.backends(ok(lab.probe("pod1", NODE, 30080, count=6))) <= {"pod2", "pod3"}
    assert lab.backends(ok(lab.probe("node", NODE, 30080, count=6))) <= {"pod2", "pod3"}


def test_nodeport_on_all_local_addresses(lab: Lab) -> None:
    load(
        lab,
        web("NodePort", node_port=30080),
        web_slice(eps("pod2")),
        node=cfg(nodePortAddresses=["0.0.0.0/0", "::/0"]),
    )
    for addr in (NODE, lab.node_dummy_ip4):
        assert lab.backends(ok(lab.probe("client", addr, 30080, count=3))) == {"pod2"}


def test_nodeport_on_cidr_selected_addresses(lab: Lab) -> None:
    load(
        lab,
        web("NodePort", node_port=30080),
        web_slice(eps("pod2")),
        node=cfg(nodePortAddresses=["198.18.0.0/15"]),
    )
    assert lab.backends(ok(lab.probe("client", lab.node_dummy_ip4, 30080, count=3))) == {"pod2"}
    refused(lab.probe("client", NODE, 30080, count=3))


def test_node_port_cidrs_of_one_family_leave_the_other_on_every_local_address(
    lab: Lab,
) -> None:
    """kube-proxy reads a family without a CIDR in nodePortAddresses as its zero CIDR."""
    svc = service("web", [CIP, CIP6], ports=[{"name": "http", "port": 80}], type="NodePort")
    svc["spec"]["ports"][0]["nodePort"] = 30080
    v4 = endpoint_slice("web", eps("pod2"), ports=[{"name": "http", "port": 8080}])
    v6 = endpoint_slice(
        "web", [endpoint(POD6["pod3"])], ports=[{"name": "http", "port": 8080}], family="IPv6"
    )
    load(lab, svc, v4, v6, node=cfg(nodePortAddresses=["198.18.0.0/15"]))
    assert lab.backends(ok(lab.probe("client", lab.node_dummy_ip4, 30080, count=3))) == {"pod2"}
    refused(lab.probe("client", NODE, 30080, count=3))
    for addr in (lab.node_ip6, lab.node_dummy_ip6):
        assert lab.backends(ok(lab.probe("client", addr, 30080, count=3))) == {"pod3"}
    refused(lab.probe("node", "::1", 30080, count=2))  # never loopback
    load(lab, svc, v4, v6, node=cfg(nodePortAddresses=["2001:db8:18::/64"]))
    for addr in (NODE, lab.node_dummy_ip4):
        assert lab.backends(ok(lab.probe("client", addr, 30080, count=3))) == {"pod2"}
    assert lab.backends(ok(lab.probe("client", lab.node_dummy_ip6, 30080, count=3))) == {"pod3"}
    refused(lab.probe("client", lab.node_ip6, 30080, count=3))


def test_load_balancer_and_external_ips(lab: Lab) -> None:
    svc = web("LoadBalancer", node_port=30080, lb_ips=[LB], externalIPs=[EXT])
    svc["status"]["loadBalancer"]["ingress"].append({"ip": "203.0.113.201", "ipMode": "Proxy"})
    load(lab, svc, web_slice(eps("pod2", "pod3")))
    for dst in (LB, EXT):
        res = ok(lab.probe("client", dst, 80, count=N))
        assert lab.backends(res) == {"pod2", "pod3"} and sources(res) <= NODE_ADDRS
        assert lab.backends(ok(lab.probe("pod1", dst, 80, count=6))) <= {"pod2", "pod3"}
    dropped(lab.probe("client", "203.0.113.201", 80, count=2, timeout=0.5, concurrency=2))


def test_load_balancer_without_node_port(lab: Lab) -> None:
    svc = web("LoadBalancer", lb_ips=[LB], allocateLoadBalancerNodePorts=False)
    load(lab, svc, web_slice(eps("pod2")))
    assert lab.backends(ok(lab.probe("client", LB, 80, count=3))) == {"pod2"}


# --- 7. loadBalancerSourceRanges -----------------------------------------------------


def test_source_ranges_filter_lb_ips_only(lab: Lab) -> None:
    svc = web(
        "LoadBalancer",
        node_port=30080,
        lb_ips=[LB],
        externalIPs=[EXT],
        loadBalancerSourceRanges=["192.0.2.96/28"],
    )
    load(lab, svc, web_slice(eps("pod2")))
    assert lab.backends(ok(lab.probe("client", LB, 80, count=3))) == {"pod2"}
    dropped(lab.probe("pod1", LB, 80, count=2, timeout=0.5, concurrency=2))
    # Not NodePorts, not externalIPs.
    assert lab.backends(ok(lab.probe("pod1", NODE, 30080, count=3))) == {"pod2"}
    assert lab.backends(ok(lab.probe("pod1", EXT, 80, count=3))) == {"pod2"}


def test_source_range_outside_drops_client(lab: Lab) -> None:
    svc = web("LoadBalancer", lb_ips=[LB], loadBalancerSourceRanges=["10.0.0.0/8"])
    load(lab, svc, web_slice(eps("pod2")))
    dropped(lab.probe("client", LB, 80, count=2, timeout=0.5, concurrency=2))
    dropped(lab.probe("node", LB, 80, count=2, timeout=0.5, concurrency=2))


def test_range_holding_a_node_ip_allows_the_lb_ip_as_source(lab: Lab) -> None:
    svc = web("LoadBalancer", lb_ips=[LB], loadBalancerSourceRanges=["192.0.2.0/30"])
    load(lab, svc, web_slice(eps("pod2")))
    dropped(lab.probe("client", LB, 80, count=2, timeout=0.5, concurrency=2))
    assert lab.backends(ok(lab.probe("node", LB, 80, count=3, bind=NODE))) == {"pod2"}
    # The node reaching its own LB IP uses that IP as source (as when the LB IP is
    # assigned to a local interface).
    lab.exec("node", "ip", "addr", "add", f"{LB}/32", "dev", "dummy0")
    try:
        res = ok(lab.probe("node", LB, 80, count=3, bind=LB))
        assert lab.backends(res) == {"pod2"}
    finally:
        lab.exec("node", "ip", "addr", "del", f"{LB}/32", "dev", "dummy0")


def test_range_holding_a_node_ip_allows_every_lb_ip_for_every_lb_frontend(lab: Lab) -> None:
    """A node process bound to one LB IP of the Service reaches its other LB IP."""
    lb2 = "203.0.113.201"
    svc = web("LoadBalancer", lb_ips=[LB, lb2], loadBalancerSourceRanges=["192.0.2.0/30"])
    load(lab, svc, web_slice(eps("pod2")))
    dropped(lab.probe("client", lb2, 80, count=2, timeout=0.5, concurrency=2))
    lab.exec("node", "ip", "addr", "add", f"{LB}/32", "dev", "dummy0")
    try:
        assert lab.backends(ok(lab.probe("node", lb2, 80, count=3, bind=LB))) == {"pod2"}
    finally:
        lab.exec("node", "ip", "addr", "del", f"{LB}/32", "dev", "dummy0")
    lab.exec("node", "ip", "addr", "add", f"{lb2}/32", "dev", "dummy0")
    try:
        assert lab.backends(ok(lab.probe("node", LB, 80, count=3, bind=lb2))) == {"pod2"}
    finally:
        lab.exec("node", "ip", "addr", "del", f"{lb2}/32", "dev", "dummy0")


# --- 3. traffic policies ---------------------------------------------------------------


def test_external_traffic_policy_local(lab: Lab) -> None:
    svc = web("LoadBalancer", node_port=30080, lb_ips=[LB], externalTrafficPolicy="Local")
    load(lab, svc, web_slice(eps("pod2") + eps("pod3", "pod4", node="node-b")))
    for dst, port in ((NODE, 30080), (LB, 80)):
        res = ok(lab.probe("client", dst, port, count=10))
        assert lab.backends(res) == {"pod2"}, "outside traffic uses local endpoints only"
        assert sources(res) == {CLIENT}, "and keeps the client IP"
    # Pods short-circuit to every endpoint, unmasqueraded.
    res = ok(lab.probe("pod1", LB, 80, count=N))
    assert lab.backends(res) == {"pod2", "pod3", "pod4"} and sources(res) == {POD["pod1"]}
    # The node itself short-circuits too, masqueraded.
    res = ok(lab.probe("node", NODE, 30080, count=N))
    assert lab.backends(res) == {"pod2", "pod3", "pod4"}
    # ClusterIP traffic is untouched by eTP.
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=N))) == {"pod2", "pod3", "pod4"}


def test_external_traffic_policy_local_without_local_endpoints_drops(lab: Lab) -> None:
    svc = web("LoadBalancer", node_port=30080, lb_ips=[LB], externalTrafficPolicy="Local")
    load(lab, svc, web_slice(eps("pod3", node="node-b")))
    dropped(lab.probe("client", NODE, 30080, count=2, timeout=0.5, concurrency=2))
    dropped(lab.probe("client", LB, 80, count=2, timeout=0.5, concurrency=2))
    assert lab.backends(ok(lab.probe("pod1", LB, 80, count=3))) == {"pod3"}
    assert lab.backends(ok(lab.probe("node", NODE, 30080, count=3))) == {"pod3"}


def test_etp_local_without_cluster_cidrs_treats_pods_as_outside(lab: Lab) -> None:
    svc = web("NodePort", node_port=30080, externalTrafficPolicy="Local")
    load(lab, svc, web_slice(eps("pod2") + eps("pod3", node="node-b")), node=node_config())
    res = ok(lab.probe("pod1", NODE, 30080, count=10))
    assert lab.backends(res) == {"pod2"} and sources(res) == {POD["pod1"]}


def test_internal_traffic_policy_local(lab: Lab) -> None:
    svc = web("NodePort", node_port=30080, internalTrafficPolicy="Local")
    load(lab, svc, web_slice(eps("pod2") + eps("pod3", node="node-b")))
    assert lab.backends(ok(lab.probe("pod1", CIP, 80, count=10))) == {"pod2"}
    # iTP never affects external traffic.
    assert lab.backends(ok(lab.probe("client", NODE, 30080, count=N))) == {"pod2", "pod3"}
    load(lab, svc, web_slice(eps("pod3", node="node-b")))
    dropped(lab.probe("pod1", CIP, 80, count=2, timeout=0.5, concurrency=2))
    assert lab.backends(ok(lab.probe("client", NODE, 30080, count=3))) == {"pod3"}


# --- 2. dual stack ---------------------------------------------------------------------


def test_dual_stack(lab: Lab) -> None:
    svc = service("web", [CIP, CIP6], ports=[{"name": "http", "port": 80}], type="NodePort")
    svc["spec"]["ports"][0]["nodePort"] = 30080
    v4 = endpoint_slice("web", eps("pod2"), ports=[{"name": "http", "port": 8080}])
    v6 = endpoint_slice(
        "web", [endpoint(POD6["pod3"])], ports=[{"name": "http", "port": 8080}], family="IPv6"
    )
    v4only = service("old", "203.0.113.20")
    load(lab, svc, v4, v6, v4only)
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod2"}
    res = ok(lab.probe("client", CIP6, 80, count=6))
    assert lab.backends(res) == {"pod3"} and sources(res) <= NODE_ADDRS6
    res = ok(lab.probe("pod1", CIP6, 80, count=3))
    assert sources(res) == {POD6["pod1"]}
    assert lab.backends(ok(lab.probe("client", lab.node_ip6, 30080, count=3))) == {"pod3"}
    refused(lab.probe("client", CIP6, 81, count=2))
    dropped(lab.probe("client", "2001:db8:3::11", 80, count=2, timeout=0.5, concurrency=2))


# --- 8. session affinity ---------------------------------------------------------------


def test_client_ip_affinity_sticks_across_frontends(lab: Lab) -> None:
    svc = web("NodePort", node_port=30080, sessionAffinity="ClientIP")
    load(lab, svc, web_slice(eps("pod2", "pod3", "pod4")))
    first = ok(lab.probe("client", CIP, 80, count=12))
    pinned = lab.backends(first)
    assert len(pinned) == 1
    assert lab.backends(ok(lab.probe("client", NODE, 30080, count=12))) == pinned
    # Another client is pinned independently but also to exactly one backend.
    assert len(lab.backends(ok(lab.probe("pod1", CIP, 80, count=12)))) == 1


def test_affinity_timeout_and_unusable_endpoint(lab: Lab) -> None:
    svc = web(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 1}})
    load(lab, svc, web_slice(eps("pod2", "pod3")))
    pinned = lab.backends(ok(lab.probe("client", CIP, 80, count=6)))
    assert len(pinned) == 1
    assert remembered(lab), "the choice is remembered in the kernel"
    import time

    time.sleep(2.2)
    assert not remembered(lab), "and forgotten after timeoutSeconds"
    # The remembered endpoint goes away: a new one is chosen.
    (gone,) = pinned
    rest = {"pod2", "pod3"} - {gone}
    svc2 = web(sessionAffinity="ClientIP")
    load(lab, svc2, web_slice(eps("pod2", "pod3")))
    pinned = lab.backends(ok(lab.probe("client", CIP, 80, count=6)))
    load(lab, svc2, web_slice(eps(*(rest or {"pod4"}))))
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=6))) == (rest or {"pod4"})


def remembered(lab: Lab) -> bool:
    """Whether the kernel would send the client's next connection to its pinned
    endpoint. nftables: the client is in the affinity set (entries expire). iptables:
    xt_recent keeps entries past their time, so probe once and see whether an affinity
    rule (``--rcheck --seconds``) matched, by its packet counter."""
    if backend_of(lab) == "nftables":
        return CLIENT in lab.nft("list", "set", "ip", "svcrules", "affinity")
    before = _affinity_hits(lab)
    ok(lab.probe("client", CIP, 80, count=1))
    return _affinity_hits(lab) > before


def _affinity_hits(lab: Lab) -> int:
    cmd = backends.tool(backend_of(lab).split("-", 1)[1], "ipv4")
    out = lab.exec("node", cmd, "-t", "nat", "-L", "-n", "-v", "-x").stdout
    return sum(
        int(ln.split()[0]) for ln in out.splitlines() if "--rcheck" in ln or "recent: CHECK" in ln
    )


# --- 9. ownership and atomic replacement -------------------------------------------------


FOREIGN = """
table inet filter {
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport 22 accept
	}
}
table ip nat {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "nonexistent0" masquerade
	}
}
"""


FOREIGN_IPTABLES = """*nat
:OTHER-NAT - [0:0]
-A PREROUTING -d 100.64.0.250/32 -j OTHER-NAT
-A POSTROUTING -o nonexistent0 -j MASQUERADE
-A OTHER-NAT -p tcp -j DNAT --to-destination 198.51.100.14:9090
COMMIT
*filter
:OTHER-FILTER - [0:0]
-A INPUT -p tcp --dport 22 -j ACCEPT
-A FORWARD -j OTHER-FILTER
-A OTHER-FILTER -s 192.0.2.250/32 -j DROP
COMMIT
"""


def make_foreign(lab: Lab) -> Any:
    """Rules of other owners (for the backend under test); returns a way to read them."""
    backend = backend_of(lab)
    if backend == "nftables":
        lab.load(FOREIGN)
        return lambda: (
            lab.nft("list", "table", "inet", "filter") + lab.nft("list", "table", "ip", "nat")
        )
    variant = backend.split("-", 1)[1]
    lab.exec(
        "node", backends.tool(variant, "ipv4", "-restore"), "--noflush", input=FOREIGN_IPTABLES
    )

    def foreign() -> list[str]:
        """IPv4 (the foreign rules' family) rules that are not svcrules'."""
        text = lab.exec("node", backends.tool(variant, "ipv4", "-save")).stdout
        return [ln for ln in backends.rules_only(text) if "SVCRULES" not in ln]

    return foreign


def owned(lab: Lab) -> int:
    """How many copies of svcrules' top-level objects the node holds."""
    backend = backend_of(lab)
    if backend == "nftables":
        tables = lab.nft("list", "tables")
        assert tables.count("table ip svcrules") == tables.count("table ip6 svcrules")
        return tables.count("table ip svcrules")
    text = backends.save(lab, backend)
    jumps = text.count('-A PREROUTING -m comment --comment "SVCRULES service portals"')
    assert text.count(":SVCRULES-SERVICES ") == 4  # nat and filter, both families
    return jumps // 2  # one per family


def test_reload_replaces_own_tables_and_touches_nothing_else(lab: Lab) -> None:
    read_foreign = make_foreign(lab)
    foreign = read_foreign()
    old = load(
        lab,
        service("old", "203.0.113.20"),
        endpoint_slice("old", eps("pod4")),
        web(),
        web_slice(eps("pod2")),
    )
    for _ in range(3):
        new = load(lab, web(), web_slice(eps("pod3")))
    assert owned(lab) == 1
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=6))) == {"pod3"}
    # Gone: no longer a ClusterIP, so an unallocated address of the service CIDR.
    dropped(lab.probe("client", "203.0.113.20", 80, count=2, timeout=0.5, concurrency=2))
    assert read_foreign() == foreign
    assert old != new


def test_sctp_rules_load(lab: Lab) -> None:
    """This kernel has no SCTP sockets, so SCTP is proven by loading and listing."""
    svc = service(
        "s",
        CIP,
        ports=[{"name": "s", "port": 80, "protocol": "SCTP", "nodePort": 30080}],
        type="NodePort",
    )
    load(
        lab,
        svc,
        endpoint_slice("s", eps("pod2"), ports=[{"name": "s", "port": 8080, "protocol": "SCTP"}]),
    )
    if backend_of(lab) == "nftables":
        listed = lab.nft("list", "table", "ip", "svcrules")
        assert f"{CIP} . sctp . 80" in listed and "sctp . 30080" in listed
        assert "meta l4proto sctp dnat ip to numgen random mod 1" in listed
        return
    listed = backends.save(lab, backend_of(lab))
    assert f"-d {CIP}/32 -p sctp -m sctp --dport 80" in listed
    assert "-p sctp -m sctp --dport 30080" in listed
    assert f'-p sctp -m comment --comment "default/s:s/SCTP {POD["pod2"]} 8080"' in listed


def test_overlapping_ranges_load(lab: Lab) -> None:
    """Overlapping CIDRs are merged: nft interval sets refuse overlapping elements."""
    svc = web(
        "LoadBalancer",
        node_port=30080,
        lb_ips=[LB],
        loadBalancerSourceRanges=["0.0.0.0/0", "192.0.2.0/24"],
    )
    node = cfg(
        nodePortAddresses=["198.18.0.0/15", "198.18.0.1/32"],
        clusterCIDRs=["198.51.100.0/24", "198.51.100.128/25"],
    )
    load(lab, svc, web_slice(eps("pod2")), node=node)
    assert lab.backends(ok(lab.probe("client", LB, 80, count=3))) == {"pod2"}
    assert lab.backends(ok(lab.probe("client", lab.node_dummy_ip4, 30080, count=3))) == {"pod2"}


def test_long_node_name_and_own_cluster_ip_as_external_ip_load(lab: Lab) -> None:
    svc = web(externalIPs=[CIP])
    load(lab, svc, web_slice(eps("pod2")), node=cfg(**{}) | {"metadata": {"name": "n" * 200}})
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod2"}


def test_cluster_ips_of_other_proxies_are_left_alone(lab: Lab) -> None:
    """A Service labelled for another proxy: that proxy's DNAT must work even though the
    address lies in serviceCIDRs and svcrules' chains see the packet first."""
    other = service("o", "203.0.113.9", labels={"service.kubernetes.io/service-proxy-name": "x"})
    lab.load(
        "table ip otherproxy {\n"
        "\tchain pre {\n"
        "\t\ttype nat hook prerouting priority dstnat; policy accept;\n"
        f"\t\tip daddr 203.0.113.9 tcp dport 80 dnat to {POD['pod3']}:8080\n"
        "\t}\n"
        "}\n"
    )
    # Loaded second, svcrules' prerouting chain runs first at the same priority.
    load(lab, other, web(), web_slice(eps("pod2")))
    assert lab.backends(ok(lab.probe("client", "203.0.113.9", 80, count=3))) == {"pod3"}


@pytest.mark.parametrize(
    "label", ["service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless"]
)
def test_endpoint_slices_labelled_for_another_proxy_or_headless_are_ignored(
    lab: Lab, label: str
) -> None:
    """kube-proxy selects EndpointSlices with the same labels as Services: such a slice
    does not exist for it, whatever the label's value."""
    theirs = endpoint_slice(
        "web", eps("pod3"), ports=[{"name": "http", "port": 8080}], name="web-theirs"
    )
    theirs["metadata"]["labels"][label] = "other"
    load(lab, web(), web_slice(eps("pod2")), theirs)
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=N))) == {"pod2"}
    # The only slice hidden: no usable endpoint, so REJECT.
    load(lab, web("NodePort", node_port=30080), theirs)
    refused(lab.probe("client", CIP, 80, count=3))
    refused(lab.probe("client", NODE, 30080, count=3))


def test_loopback_is_never_a_node_port_address(lab: Lab) -> None:
    load(
        lab,
        web("NodePort", node_port=30080),
        web_slice(eps("pod2")),
        node=cfg(nodePortAddresses=["127.0.0.0/8", "192.0.2.0/24"]),
    )
    assert lab.backends(ok(lab.probe("node", NODE, 30080, count=3))) == {"pod2"}
    refused(lab.probe("node", "127.0.0.1", 30080, count=2))  # the node's own stack answers


def test_own_cluster_ip_among_external_ips_keeps_the_cluster_ip_decision(lab: Lab) -> None:
    """The ClusterIP's claim comes first: with internalTrafficPolicy Local and no local
    endpoint it drops, even though the same address is also one of its externalIPs."""
    svc = web(externalIPs=[CIP], internalTrafficPolicy="Local")
    load(lab, svc, web_slice(eps("pod3", node="node-b")))
    dropped(lab.probe("client", CIP, 80, count=2, timeout=0.5, concurrency=2))
    dropped(lab.probe("pod1", CIP, 80, count=2, timeout=0.5, concurrency=2))


def test_a_refused_frontend_is_not_translated_by_a_later_rule(lab: Lab) -> None:
    """Service a (no endpoint) claims the node IP as an externalIP on port 30080; Service
    b's NodePort is 30080 too. The refusal wins, as the frontend comes first."""
    a = service("a", "203.0.113.20", externalIPs=[NODE], ports=[{"name": "p", "port": 30080}])
    load(lab, a, web("NodePort", node_port=30080), web_slice(eps("pod2")))
    refused(lab.probe("client", NODE, 30080, count=3))
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod2"}
