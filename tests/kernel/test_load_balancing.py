"""Maglev consistent hashing and endpoint weights, with real packets.

A private lab with ten pods (pod1..pod10 = 198.51.100.11..20). The Service under test
is a LoadBalancer at 203.0.113.200, reached from the client as an outside load balancer
would deliver it: UDP port 80 to the pods' 8080 (the lab's servers), TCP port 80 to
7000 (flow_agent.py's echo servers, where a connection must be held open).

Thousands of flows are UDP datagrams from fixed source ports (flows.udp_flows): each is
a new flow for the node, and the node's conntrack table tells where it went. Between
rounds that must be decided by the rules alone, the conntrack table is flushed. The
figures measured are printed in the terminal summary ("load balancing: ...").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s import Obj, compile_objs, endpoint, endpoint_slice, node_config, service

from . import backends
from .conftest import require_kernel
from .flows import Flow, NsProcess, echo_servers, moved, report, udp_flows
from .lab import Lab
from .nodes import IptablesNode, Node, node_for

LB = "203.0.113.200"
CIP = "203.0.113.10"
PODS = [f"pod{i}" for i in range(1, 11)]
POD_IP = {pod: f"198.51.100.{10 + i}" for i, pod in enumerate(PODS, start=1)}
POD_OF = {ip: pod for pod, ip in POD_IP.items()}
ECHO_PORT = 7000
# More clients for ClientIP affinity: extra addresses on the client (this lab only).
CLIENTS = [f"192.0.2.{i}" for i in range(101, 165)]

LOAD_BALANCING = "svcrules.io/load-balancing"
WEIGHT = "svcrules.io/weight"
CILIUM_WEIGHT = "service.cilium.io/weight"

# (backend, selection) pairs that must honour weights; Maglev is nftables only.
WEIGHTED = [
    ("nftables", "random"),
    ("nftables", "maglev"),
    ("iptables-nft", "random"),
    ("iptables-legacy", "random"),
]


@pytest.fixture(scope="module")
def lab10() -> Iterator[Lab]:
    require_kernel()
    Lab.cleanup_stale()
    with Lab(pods=len(PODS)) as lab:
        lines = "".join(f"addr add {ip}/32 dev eth0\n" for ip in CLIENTS)
        lab.exec("client", "ip", "-batch", "-", input=lines)
        yield lab


@pytest.fixture
def lab(lab10: Lab) -> Lab:
    """The ten-pod lab with an empty ruleset and conntrack table."""
    lab10.reset()
    return lab10


@pytest.fixture(params=WEIGHTED, ids=[f"{b}-{m}" for b, m in WEIGHTED])
def driven(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Node, str]]:
    """svcrules apply on the lab's node with a backend, and the selection to ask for."""
    backend, mode = request.param
    for node in node_for(lab, tmp_path, backend):
        yield node, mode


def cfg(
    name: str = "node-a", ips: tuple[str, ...] = ("192.0.2.1", "2001:db8:1::1"), **spec: Any
) -> Obj:
    return node_config(
        name,
        nodeIPs=list(ips),
        clusterCIDRs=["198.51.100.0/24", "2001:db8:2::/64"],
        serviceCIDRs=["203.0.113.0/25", "2001:db8:3::/112"],
        **spec,
    )


def web(mode: str | None) -> Obj:
    """The Service; ``mode`` is its load-balancing annotation (None: none at all)."""
    ports = [
        {"name": "udp", "port": 80, "protocol": "UDP", "nodePort": 30080},
        {"name": "tcp", "port": 80, "protocol": "TCP", "nodePort": 30080},
    ]
    svc = service("web", CIP, ports=ports, type="LoadBalancer", lb_ips=[LB])
    if mode is not None:
        svc["metadata"]["annotations"] = {LOAD_BALANCING: mode}
    return svc


def web_slice(name: str, pods: list[str], weight: int | None = None, key: str = WEIGHT) -> Obj:
    ports = [
        {"name": "udp", "port": 8080, "protocol": "UDP"},
        {"name": "tcp", "port": ECHO_PORT, "protocol": "TCP"},
    ]
    eps = [endpoint(POD_IP[p]) for p in pods]
    obj = endpoint_slice("web", eps, ports=ports, name=name)
    if weight is not None:
        obj["metadata"]["annotations"] = {key: str(weight)}
    return obj


def shares(flows: dict[Flow, str]) -> dict[str, float]:
    """Each pod's share of the flows."""
    counts = Counter(flows.values())
    return {POD_OF[ip]: n / len(flows) for ip, n in sorted(counts.items())}


def pct(shares: dict[str, float]) -> str:
    return " ".join(f"{pod} {share:.1%}" for pod, share in shares.items())


def assert_spread(flows: dict[Flow, str], pods: list[str], low: float, high: float) -> None:
    """Every pod got between ``low`` and ``high`` of the flows, and no one else got any."""
    got = shares(flows)
    assert set(got) == set(pods), f"flows reached {sorted(got)}, expected {pods}"
    bad = {pod: s for pod, s in got.items() if not low <= s <= high}
    assert not bad, f"shares outside [{low:.0%}, {high:.0%}]: {pct(got)}"


# --- consistency: every node, same flow, same endpoint -------------------------------


@pytest.mark.parametrize("mode", ["maglev", "random"])
def test_every_node_sends_a_flow_to_the_same_endpoint(lab: Lab, tmp_path: Path, mode: str) -> None:
    """Node A reaches its rules incrementally (svcrules apply, one endpoint added); node B
    (another name and address) loads them fresh, from the same endpoints in another order
    and other slices, with Maglev as its NodeConfig default instead of the annotation.
    The same 1,000 5-tuples must reach the same endpoints on both; random selection
    cannot (the control that shows the comparison can fail)."""
    sports = range(20000, 21000)
    node_a = Node(lab, tmp_path)
    node_a.apply(web(mode), web_slice("web-a", PODS[:9]))
    node_a.apply(web(mode), web_slice("web-a", PODS[:9]), web_slice("web-b", PODS[9:]))
    on_a = udp_flows(lab, LB, 80, sports)
    assert_spread(on_a, PODS, 0.04, 0.17)

    lab.reset()  # the other node: nothing of node A's rules or connections
    others = list(reversed(PODS))
    b_cfg = cfg("node-b", ("192.0.2.2", "2001:db8:1::2"))
    b_objs = [web_slice("web-x", others[:4]), web_slice("web-y", others[4:])]
    if mode == "maglev":
        b_cfg["spec"]["loadBalancing"] = "maglev"
        b_objs.insert(1, web(None))
    else:
        b_objs.insert(1, web(mode))
    backends.install(lab, compile_objs([b_cfg, *b_objs]), "nftables")
    on_b = udp_flows(lab, LB, 80, sports)
    assert_spread(on_b, PODS, 0.04, 0.17)

    same = 1 - moved(on_a, on_b)
    report(f"{mode}: {same:.1%} of {len(sports):,} flows reached the same endpoint on two nodes")
    if mode == "maglev":
        differ = [(f[1], POD_OF[on_a[f]], POD_OF[on_b[f]]) for f in on_a if on_a[f] != on_b[f]]
        assert not differ, f"{len(differ)} flows differ (sport, node A, node B): {differ[:5]}"
    else:
        assert same < 0.5, "random selection agreed between nodes: the comparison proves nothing"


def test_maglev_client_ip_affinity_hashes_the_client_address(lab: Lab, tmp_path: Path) -> None:
    """Maglev with ClientIP affinity: 16 flows of each of 64 clients all reach one
    endpoint per client, the clients spread over the endpoints, and node B (fresh,
    other order) sends every client to the same endpoint as node A."""
    svc = web("maglev")
    svc["spec"]["sessionAffinity"] = "ClientIP"
    Node(lab, tmp_path).apply(svc, web_slice("web", PODS))
    sports = range(20000, 20016)
    on_a = udp_flows(lab, LB, 80, sports, sources=CLIENTS)

    lab.reset()
    others = list(reversed(PODS))
    b_objs = [cfg("node-b", ("192.0.2.2", "2001:db8:1::2")), svc, web_slice("web-x", others)]
    backends.install(lab, compile_objs(b_objs), "nftables")
    on_b = udp_flows(lab, LB, 80, sports, sources=CLIENTS)

    per_client = {c: {POD_OF[on_a[c, p]] for p in sports} for c in CLIENTS}
    split = {c: pods for c, pods in per_client.items() if len(pods) > 1}
    assert not split, f"clients sent to more than one endpoint: {list(split.items())[:3]}"
    chosen = Counter(next(iter(pods)) for pods in per_client.values())
    report(
        f"maglev ClientIP: {len(CLIENTS)} clients x {len(sports)} flows, one endpoint each,"
        f" {len(chosen)} endpoints used; node B agrees on {1 - moved(on_a, on_b):.0%}"
    )
    assert len(chosen) >= 6, f"64 clients reached only {dict(chosen)}"
    differ = [(f, POD_OF[on_a[f]], POD_OF[on_b[f]]) for f in on_a if on_a[f] != on_b[f]]
    assert not differ, f"{len(differ)} flows differ (flow, node A, node B): {differ[:5]}"


# --- disruption: removing one endpoint of ten -----------------------------------------


@pytest.mark.parametrize("mode", ["maglev", "random"])
def test_removing_one_of_ten_endpoints(lab: Lab, tmp_path: Path, mode: str) -> None:
    """10,000 flows before and after pod4 leaves (svcrules apply, incremental), conntrack
    flushed in between so that only the rules decide. With Maglev at most 1/10 + 3
    points of the flows move, and at most 3 points move between the endpoints that stay
    (the rest are pod4's own); random moves most.

    Maglev's extra moves are the slots other endpoints take over from each other while
    filling pod4's: about 1.3 % of the default 4,093 slots for ten endpoints, 2.5 % at
    1,021 (bench/maglev_tables.py)."""
    sports = range(20000, 30000)
    node = Node(lab, tmp_path)
    node.apply(web(mode), web_slice("web", PODS))
    before = udp_flows(lab, LB, 80, sports)
    assert_spread(before, PODS, 0.07, 0.13)

    rest = [p for p in PODS if p != "pod4"]
    node.apply(web(mode), web_slice("web", rest))
    after = udp_flows(lab, LB, 80, sports)
    assert_spread(after, rest, 0.08, 0.145)

    fraction = moved(before, after)
    on_pod4 = shares(before)["pod4"]
    stayed = [f for f in before if before[f] != POD_IP["pod4"]]
    needless = sum(before[f] != after[f] for f in stayed) / len(before)
    report(
        f"{mode}: removing 1 of 10 endpoints moved {fraction:.1%} of {len(sports):,} flows"
        f" ({on_pod4:.1%} were on the removed one; {needless:.1%} moved between the others)"
    )
    if mode == "maglev":
        assert fraction <= 1 / 10 + 0.03, pct(shares(after))
        assert needless <= 0.03, pct(shares(after))
    else:
        assert fraction > 0.5


def test_maglev_table_size_and_seed_from_the_node_config(lab: Lab, tmp_path: Path) -> None:
    """spec.maglev's tableSize and seed reach the kernel's rules. With the size fixed, a
    sixth endpoint takes its sixth of 10,000 flows and at most 3 points of the others move
    between the five (the default size would grow from 509 to 1,021 slots here, and
    every flow be hashed again: about 84% of them move)."""
    node_cfg = cfg(maglev={"tableSize": 2039, "seed": "0x5eed1234"})
    node = Node(lab, tmp_path)
    node.apply(web("maglev"), web_slice("web", PODS[:5]), node=node_cfg)
    listed = lab.nft("list", "table", "ip", "svcrules")
    assert "mod 2039 seed 0x5eed1234 " in listed, listed
    sports = range(20000, 30000)
    before = udp_flows(lab, LB, 80, sports)
    assert_spread(before, PODS[:5], 0.17, 0.23)

    node.apply(web("maglev"), web_slice("web", PODS[:6]), node=node_cfg)
    after = udp_flows(lab, LB, 80, sports)
    assert_spread(after, PODS[:6], 0.14, 0.195)
    to_new = shares(after)["pod6"]
    needless = sum(after[f] not in (before[f], POD_IP["pod6"]) for f in before) / len(before)
    report(
        f"maglev, tableSize 2039: adding a 6th endpoint moved {moved(before, after):.1%} of"
        f" {len(sports):,} flows ({to_new:.1%} to it, {needless:.1%} between the others)"
    )
    assert needless <= 0.03, pct(shares(after))


# --- weights ------------------------------------------------------------------------


def test_weights_split_new_connections(lab: Lab, driven: tuple[Node, str]) -> None:
    """Two slices of one Service, weighted 90 and 10 (the second with Cilium's annotation):
    of 10,000 new flows, 90% +-2 points reach the first slice's five endpoints, each of
    the ten endpoints its own share (18% or 2%) +-2 points."""
    node, mode = driven
    heavy, light = PODS[:5], PODS[5:]
    node.apply(
        web(mode),
        web_slice("web-heavy", heavy, weight=90),
        web_slice("web-light", light, weight=10, key=CILIUM_WEIGHT),
    )
    flows = udp_flows(lab, LB, 80, range(20000, 30000))
    got = shares(flows)
    to_heavy = sum(got.get(p, 0.0) for p in heavy)
    report(
        f"{driven_id(node, mode)}: weights 90/10 gave"
        f" {to_heavy:.1%}/{1 - to_heavy:.1%} ({pct(got)})"
    )
    assert abs(to_heavy - 0.90) <= 0.02, pct(got)
    assert set(got) == set(PODS), f"flows reached only {sorted(got)}"
    for pod in PODS:
        want = 0.18 if pod in heavy else 0.02
        assert abs(got[pod] - want) <= 0.02, f"{pod}: {got[pod]:.1%}, want {want:.0%}: {pct(got)}"


def test_weight_zero_drains_without_breaking_connections(
    lab: Lab, driven: tuple[Node, str]
) -> None:
    """pod3's slice goes to weight 0 while a TCP connection to pod3 is open: of 2,000 new
    flows (and 30 new TCP connections) none reaches pod3 after the change, though it got
    its share before, and the open connection still carries data."""
    node, mode = driven
    before_objs = [web(mode), web_slice("web-a", PODS[:2]), web_slice("web-b", ["pod3"])]
    drained = [web(mode), web_slice("web-a", PODS[:2]), web_slice("web-b", ["pod3"], weight=0)]
    servers = echo_servers(lab, PODS[:3], ECHO_PORT)
    try:
        node.apply(*before_objs)
        with NsProcess(lab, "client", "hold", LB, "80", "pod3", "60") as held:
            greeting = held.readline()
            assert greeting.startswith("held "), greeting
            assert held.ask("before") == "pod3 before"
            before = udp_flows(lab, LB, 80, range(20000, 22000), flush=False)
            assert_spread(before, PODS[:3], 0.25, 0.42)

            node.apply(*drained)
            after = udp_flows(lab, LB, 80, range(22000, 24000), flush=False)
            with NsProcess(lab, "client", "hold", LB, "80", "pod3", "30") as late:
                refused = late.readline()
            assert held.ask("after the change") == "pod3 after the change"
    finally:
        for server in servers:
            server.close()
    got = shares(after)
    report(
        f"{driven_id(node, mode)}: weight 0 on pod3: pod3 got {got.get('pod3', 0.0):.1%} of"
        f" 2,000 new flows (before: {shares(before)['pod3']:.1%}); held connection kept"
    )
    assert "pod3" not in got, pct(got)
    assert set(got) == {"pod1", "pod2"}, pct(got)
    assert refused.startswith("error: 30 connections, none greeted by pod3"), refused


@pytest.fixture(params=["iptables-nft", "iptables-legacy"])
def iptables_node(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Node]:
    yield from node_for(lab, tmp_path, request.param)


def test_iptables_refuses_maglev_and_keeps_its_rules(lab: Lab, iptables_node: Node) -> None:
    node = iptables_node
    assert isinstance(node, IptablesNode)
    node.apply(web(None), web_slice("web", PODS[:2]))
    rules = node.own()
    node.write(web("maglev"), web_slice("web", PODS[:3]))
    proc = node.run("apply")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "maglev" in proc.stderr.lower(), proc.stderr
    assert node.own() == rules, "a refused change must leave the rules as they were"
    assert_spread(udp_flows(lab, LB, 80, range(20000, 20100)), PODS[:2], 0.2, 0.8)


def driven_id(node: Node, mode: str) -> str:
    variant = getattr(node, "variant", None)
    return f"{'iptables-' + variant if variant else 'nftables'} {mode}"
