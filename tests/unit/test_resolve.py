"""The node plan: every decision of SEMANTICS.md sections 2-8, without a kernel."""

from __future__ import annotations

from typing import Any

import pytest

from svcrules.errors import InputError
from svcrules.plan.explain import explain_text
from svcrules.plan.node import Masquerade, PortPlan, Route
from svcrules.render.nftables import layout as nftables
from tests.k8s import compile_objs, endpoint, endpoint_slice, node_config, service

NODE = node_config(clusterCIDRs=["198.51.100.0/24", "2001:db8:2::/64"])


def plan_of(objs: list[dict[str, Any]], family: int = 4, **ov: Any) -> list[PortPlan]:
    r = compile_objs([NODE, *objs], **ov)
    return list(r.plan.families[0 if family == 4 else 1].ports)


def one(objs: list[dict[str, Any]], **ov: Any) -> PortPlan:
    ports = plan_of(objs, **ov)
    assert len(ports) == 1
    return ports[0]


def ips(p: PortPlan, local: bool = False) -> list[str]:
    return [b.ip for b in (p.local_backends if local else p.cluster_backends)]


def test_skipped_services() -> None:
    objs = [
        service("ext", "203.0.113.1", type="ExternalName", externalName="example.com"),
        service("headless", "None"),
        service("lbl", "203.0.113.2", labels={"service.kubernetes.io/headless": ""}),
        service("other", "203.0.113.3", labels={"service.kubernetes.io/service-proxy-name": "x"}),
        service("unallocated", ""),
        service("kept", "203.0.113.4"),
    ]
    assert [p.name for p in plan_of(objs)] == ["kept"]


def test_ready_then_serving_terminating_fallback() -> None:
    eps = [
        endpoint("198.51.100.11", ready=True),
        endpoint("198.51.100.12", ready=False, serving=True, terminating=True),
        endpoint("198.51.100.13", ready=False, serving=False, terminating=True),
    ]
    p = one([service("a", "203.0.113.1"), endpoint_slice("a", eps)])
    assert ips(p) == ["198.51.100.11"]
    p = one([service("a", "203.0.113.1"), endpoint_slice("a", eps[1:])])
    assert ips(p) == ["198.51.100.12"]
    p = one([service("a", "203.0.113.1"), endpoint_slice("a", eps[2:])])
    assert ips(p) == [] and p.internal_route is Route.REJECT and p.external_route is Route.REJECT


def test_unset_ready_counts_as_ready_and_duplicates_prefer_non_terminating() -> None:
    s1 = endpoint_slice(
        "a",
        [
            endpoint("198.51.100.11", ready=None),
            endpoint("198.51.100.12", ready=False, serving=True, terminating=True),
        ],
        name="a-1",
    )
    s2 = endpoint_slice("a", [endpoint("198.51.100.12", ready=True)], name="a-2")
    p = one([service("a", "203.0.113.1"), s1, s2])
    assert ips(p) == ["198.51.100.11", "198.51.100.12"]
    assert not any(b.terminating for b in p.cluster_backends)


def test_named_target_port_resolves_per_endpoint() -> None:
    svc = service("a", "203.0.113.1", ports=[{"name": "web", "port": 80, "targetPort": "http"}])
    s1 = endpoint_slice(
        "a", [endpoint("198.51.100.11")], ports=[{"name": "web", "port": 8080}], name="a-1"
    )
    s2 = endpoint_slice(
        "a", [endpoint("198.51.100.12")], ports=[{"name": "web", "port": 9090}], name="a-2"
    )
    s3 = endpoint_slice(
        "a",
        [endpoint("198.51.100.13")],
        ports=[{"name": "web", "port": 7070, "protocol": "UDP"}],
        name="a-3",
    )
    p = one([svc, s1, s2, s3])
    assert [(b.ip, b.port) for b in p.cluster_backends] == [
        ("198.51.100.11", 8080),
        ("198.51.100.12", 9090),
    ]


def test_topology_hints() -> None:
    eps = [
        endpoint("198.51.100.11", for_zones=["z1"]),
        endpoint("198.51.100.12", for_zones=["z2"]),
    ]
    objs = [service("a", "203.0.113.1"), endpoint_slice("a", eps)]
    assert ips(one(objs, zone="z1")) == ["198.51.100.11"]
    assert ips(one(objs, zone="z3")) == ["198.51.100.11", "198.51.100.12"]  # no match
    partial = [endpoint("198.51.100.11", for_zones=["z1"]), endpoint("198.51.100.12")]
    objs = [service("a", "203.0.113.1"), endpoint_slice("a", partial)]
    assert ips(one(objs, zone="z1")) == ["198.51.100.11", "198.51.100.12"]  # not all hinted
    by_node = [
        endpoint("198.51.100.11", for_nodes=["node-b"]),
        endpoint("198.51.100.12", for_nodes=["node-a"]),
    ]
    objs = [service("a", "203.0.113.1"), endpoint_slice("a", by_node)]
    assert ips(one(objs)) == ["198.51.100.12"]


def test_internal_traffic_policy_local() -> None:
    eps = [endpoint("198.51.100.11", node="node-b"), endpoint("198.51.100.12", node="node-a")]
    svc = service(
        "a",
        "203.0.113.1",
        type="NodePort",
        internalTrafficPolicy="Local",
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
    )
    p = one([svc, endpoint_slice("a", eps)])
    assert p.internal_route is Route.LOCAL and ips(p, local=True) == ["198.51.100.12"]
    assert p.external_route is Route.CLUSTER  # iTP never affects external traffic
    p = one([svc, endpoint_slice("a", eps[:1])])
    assert p.internal_route is Route.DROP and p.external_route is Route.CLUSTER


def test_external_traffic_policy_local() -> None:
    eps = [
        endpoint("198.51.100.11", node="node-b"),
        endpoint("198.51.100.12", node="node-a", ready=False, serving=True, terminating=True),
    ]
    svc = service(
        "a",
        "203.0.113.1",
        type="NodePort",
        externalTrafficPolicy="Local",
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
    )
    p = one([svc, endpoint_slice("a", eps)])
    assert p.external_route is Route.LOCAL and ips(p, local=True) == ["198.51.100.12"]
    assert p.external_masquerade is Masquerade.NODE_ONLY and p.pod_shortcut
    assert p.internal_route is Route.CLUSTER and ips(p) == ["198.51.100.11"]
    p = one([svc, endpoint_slice("a", eps[:1])])
    assert p.external_route is Route.DROP
    no_pods = one([svc, endpoint_slice("a", eps)], cluster_cidrs=["192.0.2.0/24"])
    assert no_pods.pod_shortcut is True  # clusterCIDRs given in this family
    plain = compile_objs([node_config(), svc, endpoint_slice("a", eps)]).plan.families[0].ports[0]
    assert plain.pod_shortcut is False and plain.internal_masquerade is Masquerade.NEVER


def test_masquerade_all() -> None:
    p = one(
        [service("a", "203.0.113.1"), endpoint_slice("a", [endpoint("198.51.100.11")])],
        masquerade_all=True,
    )
    assert p.internal_masquerade is Masquerade.ALWAYS


def test_load_balancer_frontends_and_source_ranges() -> None:
    svc = service(
        "a",
        "203.0.113.1",
        type="LoadBalancer",
        ports=[{"name": "http", "port": 80, "nodePort": 0}],
        loadBalancerSourceRanges=["192.0.2.0/24", "2001:db8:9::/48"],
        lb_ips=["203.0.113.200", "2001:db8:3::200"],
    )
    svc["status"]["loadBalancer"]["ingress"].append({"ip": "203.0.113.201", "ipMode": "Proxy"})
    p = one([svc, endpoint_slice("a", [endpoint("198.51.100.11")])])
    assert p.lb_ips == ("203.0.113.200",) and p.node_port is None
    assert p.firewall and p.source_ranges == ("192.0.2.0/24",)
    assert p.allow_lb_self  # 192.0.2.0/24 holds the node IP 192.0.2.1
    assert p.allowed_sources == ("192.0.2.0/24", "203.0.113.200/32")


def test_range_holding_a_node_ip_allows_every_lb_ip_for_every_lb_frontend() -> None:
    lbs = ["203.0.113.200", "203.0.113.201"]
    eps = endpoint_slice("a", [endpoint("198.51.100.11")])
    svc = service("a", "203.0.113.1", type="LoadBalancer", lb_ips=lbs)
    svc["spec"]["loadBalancerSourceRanges"] = ["192.0.2.0/30"]
    r = compile_objs([NODE, svc, eps])
    p = r.plan.families[0].ports[0]
    assert p.allowed_sources == ("192.0.2.0/30", "203.0.113.200/32", "203.0.113.201/32")
    # Each frontend allows both LB IPs, on both backends (nft merges them into one prefix).
    assert sorted(nftables.layout(r.plan)[0].fw_allow) == [
        (lb, "tcp", 80, src) for lb in lbs for src in ("192.0.2.0/30", "203.0.113.200/31")
    ]
    ipt = compile_objs([NODE, svc, eps], backend="iptables").iptables
    fw_chains = {ln.split()[-1] for ln in ipt.splitlines() if "--ctorigdst" in ln}
    assert len(fw_chains) == 2
    for chain in fw_chains:
        allowed = [ln.split()[3] for ln in ipt.splitlines() if ln.startswith(f"-A {chain} -s ")]
        assert allowed == ["192.0.2.0/30", "203.0.113.200/32", "203.0.113.201/32"]
    # Without a range holding the node IP, no LB IP is a source.
    svc["spec"]["loadBalancerSourceRanges"] = ["192.0.2.96/28"]
    p = compile_objs([NODE, svc, eps]).plan.families[0].ports[0]
    assert not p.allow_lb_self and p.allowed_sources == ("192.0.2.96/28",)


def test_dual_stack_filters_every_address_by_family() -> None:
    svc = service(
        "a", ["203.0.113.1", "2001:db8:3::1"], externalIPs=["203.0.113.9", "2001:db8:3::9"]
    )
    objs = [
        svc,
        endpoint_slice("a", [endpoint("198.51.100.11")]),
        endpoint_slice("a", [endpoint("2001:db8:2::11")], family="IPv6"),
    ]
    v4, v6 = plan_of(objs)[0], plan_of(objs, family=6)[0]
    assert (v4.cluster_ip, v4.external_ips, ips(v4)) == (
        "203.0.113.1",
        ("203.0.113.9",),
        ["198.51.100.11"],
    )
    assert (v6.cluster_ip, v6.external_ips, ips(v6)) == (
        "2001:db8:3::1",
        ("2001:db8:3::9",),
        ["2001:db8:2::11"],
    )
    v4_only = service("b", "203.0.113.2")
    assert plan_of([v4_only], family=6) == []


def test_session_affinity_timeout() -> None:
    svc = service(
        "a",
        "203.0.113.1",
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
    )
    assert one([svc]).affinity_timeout == 60
    assert one([service("a", "203.0.113.1", sessionAffinity="ClientIP")]).affinity_timeout == 10800


def test_same_port_number_on_three_protocols_are_three_ports() -> None:
    ports = [{"name": n.lower(), "port": 53, "protocol": n} for n in ("TCP", "UDP", "SCTP")]
    assert len(plan_of([service("a", "203.0.113.1", ports=ports)])) == 3


@pytest.mark.parametrize("field", ["clusterIP", "externalIPs"])
def test_two_services_claiming_one_frontend(field: str) -> None:
    a = service("a", "203.0.113.1", namespace="x")
    b = service("b", "203.0.113.2", namespace="y")
    if field == "clusterIP":
        b = service("b", "203.0.113.1", namespace="y")
    else:
        b["spec"]["externalIPs"] = ["203.0.113.1"]
    with pytest.raises(
        InputError,
        match=r"Service y/b\): spec.ports\[0\]: 203.0.113.1:80/TCP is "
        r"already claimed by Service x/a",
    ):
        compile_objs([NODE, a, b])


def test_two_services_claiming_one_node_port() -> None:
    np = [{"name": "http", "port": 80, "nodePort": 30080}]
    a = service("a", "203.0.113.1", type="NodePort", ports=np)
    b = service("b", "203.0.113.2", type="NodePort", ports=np)
    with pytest.raises(
        InputError, match="nodePort 30080/TCP is already claimed by Service default/a"
    ):
        compile_objs([NODE, a, b])


def test_missing_node_config_says_what_is_needed() -> None:
    with pytest.raises(InputError, match=r"metadata\.name and spec\.nodeIPs"):
        compile_objs([service("a", "203.0.113.1")])
    r = compile_objs([service("a", "203.0.113.1")], node_name="n1", node_ips=["192.0.2.7"])
    assert r.plan.node_name == "n1" and r.plan.families[0].node_ip == "192.0.2.7"


def test_flags_override_node_config() -> None:
    r = compile_objs([NODE], table_name="other", node_port_addresses=["0.0.0.0/0"])
    assert r.plan.table == "other"
    assert r.plan.families[0].nodeport_mode == "all"


@pytest.mark.parametrize(
    ("cidrs", "modes"),
    [
        (["192.0.2.0/24"], [("cidrs", ("192.0.2.0/24",)), ("all", ())]),
        (["2001:db8:1::/64"], [("all", ()), ("cidrs", ("2001:db8:1::/64",))]),
        (
            ["192.0.2.0/24", "2001:db8:1::/64"],
            [("cidrs", ("192.0.2.0/24",)), ("cidrs", ("2001:db8:1::/64",))],
        ),
    ],
)
def test_node_port_cidrs_without_a_family_mean_every_local_address_of_it(
    cidrs: list[str], modes: list[tuple[str, tuple[str, ...]]]
) -> None:
    r = compile_objs([NODE], node_port_addresses=cidrs)
    assert [(f.nodeport_mode, f.nodeport_cidrs) for f in r.plan.families] == modes
    for fam, (mode, _) in zip(r.plan.families, modes, strict=True):
        name = "IPv4" if fam.family == 4 else "IPv6"
        said = f"nodePortAddresses has no {name} CIDR: NodePorts on every local {name} address"
        assert (said in explain_text(r.plan)) == (mode == "all")


def test_own_cluster_ip_among_external_ips_is_one_frontend() -> None:
    svc = service("a", "203.0.113.1", externalIPs=["203.0.113.1"])
    r = compile_objs([NODE, svc, endpoint_slice("a", [endpoint("198.51.100.11")])])
    assert r.nft.count("203.0.113.1 . tcp . 80 :") == 1
    assert "203.0.113.1 . tcp . 80 : goto svc-" in r.nft


def test_one_node_port_twice_in_a_service_is_an_error() -> None:
    ports = [
        {"name": "a", "port": 80, "nodePort": 30001},
        {"name": "b", "port": 81, "nodePort": 30001},
    ]
    with pytest.raises(InputError, match="nodePort 30001/TCP is already claimed"):
        compile_objs([NODE, service("a", "203.0.113.1", type="NodePort", ports=ports)])


def test_terminating_not_serving_is_never_used_even_without_ready() -> None:
    gone = endpoint("198.51.100.11", ready=None, serving=False, terminating=True)
    p = one([service("a", "203.0.113.1"), endpoint_slice("a", [gone])])
    assert ips(p) == [] and p.internal_route is Route.REJECT


@pytest.mark.parametrize(
    "label", ["service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless"]
)
def test_endpoint_slices_with_a_proxy_label_are_ignored(label: str) -> None:
    ours = endpoint_slice("a", [endpoint("198.51.100.11")], name="a-ours")
    theirs = endpoint_slice("a", [endpoint("198.51.100.12")], name="a-theirs")
    theirs["metadata"]["labels"][label] = ""  # any value, the empty one too
    svc = service("a", "203.0.113.1")
    assert ips(one([svc, ours, theirs])) == ["198.51.100.11"]
    r = compile_objs([NODE, svc, theirs])
    (p,) = r.plan.families[0].ports
    assert ips(p) == [] and p.internal_route is Route.REJECT
    said = f"EndpointSlice default/a-theirs ignored: labelled {label}"
    assert any(n.startswith(said) for n in p.notes)
    assert f"EndpointSlice default/a-theirs (Service default/a) ignored: labelled {label}" in (
        explain_text(r.plan)
    )
    assert [(i.name, i.label) for i in r.plan.ignored_slices] == [("a-theirs", label)]


def test_services_of_other_proxies_keep_their_cluster_ips() -> None:
    other = service("x", "203.0.113.9", labels={"service.kubernetes.io/service-proxy-name": "o"})
    fam = compile_objs([NODE, other, service("a", "203.0.113.1")]).plan.families[0]
    assert fam.foreign_ips == ("203.0.113.9",)
    assert [p.name for p in fam.ports] == ["a"]


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (service("a", "2001:db8::1%eth0"), "zone index"),
        (endpoint_slice("a", [endpoint("fe80::1%eth0")], family="IPv6"), "zone index"),
        (service("a/b", "203.0.113.1"), "metadata.name"),
        (service("a", "203.0.113.1", namespace="x y"), "metadata.namespace"),
        (service("a", "203.0.113.1", ports=[{"name": "a/b", "port": 80}]), "port name"),
    ],
)
def test_names_and_addresses_that_would_be_ambiguous_are_refused(
    obj: dict[str, Any], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        compile_objs([NODE, obj])


def test_long_node_name_is_shortened_in_comments() -> None:
    name = "n" + "-x" * 120
    r = compile_objs([node_config(name=name)])
    comments = [ln for ln in r.nft.splitlines() if "Services of node" in ln]
    assert comments and all(len(ln.split('"')[1]) <= 128 for ln in comments)


def test_hairpin_set_holds_only_endpoints_that_can_be_clients_here() -> None:
    eps = [
        endpoint("198.51.100.11", node="node-a"),
        endpoint("198.51.100.12", node="node-b"),
        endpoint("198.51.100.13", node=None),
    ]
    r = compile_objs([NODE, service("a", "203.0.113.1"), endpoint_slice("a", eps)])
    hairpin = r.nft.split("set hairpin {")[1].split("\n\t}")[0]
    assert "198.51.100.11 . 198.51.100.11" in hairpin
    assert "198.51.100.13 . 198.51.100.13" in hairpin
    assert "198.51.100.12" not in hairpin
