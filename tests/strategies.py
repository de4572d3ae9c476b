"""Hypothesis strategies: random but valid clusters (Services, slices, a node)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tests.k8s import Obj, endpoint, endpoint_slice, node_config, service

PROTOCOLS = ["TCP", "UDP", "SCTP"]


@st.composite
def clusters(
    draw: st.DrawFn, max_services: int = 6, maglev: bool = True, split: bool = False
) -> list[Obj]:
    """A NodeConfig plus Services and EndpointSlices that compile without error; with
    ``maglev``, some Services use Maglev (the iptables backend refuses it). Slices carry
    weights either way; with ``split``, a family's endpoints are sometimes in two slices
    of different weights, so that one pick gives endpoints unequal shares."""
    n = draw(st.integers(min_value=0, max_value=max_services))
    cluster_ips = draw(st.lists(st.integers(2, 120), min_size=n, max_size=n, unique=True))
    node_ports = iter(
        draw(st.lists(st.integers(30000, 32767), min_size=3 * n, max_size=3 * n, unique=True))
    )
    extra_ips = iter(range(130, 250))
    objs: list[Obj] = [
        node_config(
            clusterCIDRs=draw(st.sampled_from([[], ["198.51.100.0/24", "2001:db8:2::/64"]])),
            serviceCIDRs=draw(st.sampled_from([[], ["203.0.113.0/25"]])),
            nodePortAddresses=draw(st.sampled_from([["primary"], ["0.0.0.0/0"], ["192.0.2.0/24"]])),
            masqueradeAll=draw(st.booleans()),
            zone=draw(st.sampled_from(["", "z1"])),
            **draw(balancing(maglev)),
        )
    ]
    for i, last in enumerate(cluster_ips):
        name = f"s{i}"
        dual = draw(st.booleans())
        ips = [f"203.0.113.{last}"] + ([f"2001:db8:3::{last:x}"] if dual else [])
        kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
        nports = draw(st.integers(1, 3))
        keys = draw(
            st.lists(
                st.tuples(st.sampled_from([53, 80, 443, 8080]), st.sampled_from(PROTOCOLS)),
                min_size=nports,
                max_size=nports,
                unique=True,
            )
        )
        ports: list[Obj] = []
        for j, (port, proto) in enumerate(keys):
            p: Obj = {"name": f"p{j}", "port": port, "protocol": proto}
            if kind != "ClusterIP":
                p["nodePort"] = next(node_ports)
            ports.append(p)
        spec: dict[str, Any] = {
            "externalTrafficPolicy": draw(st.sampled_from(["Cluster", "Local"])),
            "internalTrafficPolicy": draw(st.sampled_from(["Cluster", "Local"])),
        }
        if draw(st.booleans()):
            spec["sessionAffinity"] = "ClientIP"
        if draw(st.booleans()):
            spec["externalIPs"] = [f"198.18.0.{next(extra_ips)}"]
        lb = None
        if kind == "LoadBalancer":
            lb = [f"198.18.1.{next(extra_ips)}"]
            if draw(st.booleans()):
                spec["loadBalancerSourceRanges"] = draw(
                    st.sampled_from([["192.0.2.0/24"], ["10.0.0.0/8", "2001:db8::/32"]])
                )
        svc = service(name, ips, ports=ports, type=kind, lb_ips=lb, **spec)
        algorithms = [None, "random", "maglev"] if maglev else [None, "random"]
        algorithm = draw(st.sampled_from(algorithms))
        if algorithm:
            svc["metadata"]["annotations"] = {"svcrules.io/load-balancing": algorithm}
        objs.append(svc)
        for fam, prefix in (("IPv4", "198.51.100."), ("IPv6", "2001:db8:2::")):
            if fam == "IPv6" and not dual:
                continue
            hosts = draw(st.lists(st.integers(10, 40), max_size=5, unique=True))
            eps = []
            for h in hosts:
                state = draw(st.sampled_from(["ready", "unset", "terminating", "gone"]))
                eps.append(
                    endpoint(
                        f"{prefix}{h}" if fam == "IPv4" else f"{prefix}{h:x}",
                        node=draw(st.sampled_from(["node-a", "node-b", None])),
                        ready={"ready": True, "unset": None}.get(state, False),
                        serving=state == "terminating",
                        terminating=state in ("terminating", "gone"),
                    )
                )
            ep_ports = [
                {"name": p["name"], "port": 9000 + k, "protocol": p["protocol"]}
                for k, p in enumerate(ports)
            ]
            # Sometimes two slices, each with its own weight: unequal shares in one pick.
            cut = draw(st.integers(0, len(eps))) if split else 0
            groups = [eps[cut:], eps[:cut]] if cut else [eps]
            for k, group in enumerate(groups):
                sl_name = f"{name}-{fam.lower()}" + ("-b" if k else "")
                sl = endpoint_slice(name, group, ports=ep_ports, family=fam, name=sl_name)
                weight = draw(WEIGHTS)
                if weight:
                    sl["metadata"]["annotations"] = dict([weight])
                objs.append(sl)
    return objs


# A slice's weight annotation, or none (weight 100): 0 drains its endpoints.
WEIGHTS = st.sampled_from(
    [
        None,
        None,
        ("svcrules.io/weight", "0"),
        ("svcrules.io/weight", "1"),
        ("svcrules.io/weight", "300"),
        ("service.cilium.io/weight", "50"),
    ]
)


@st.composite
def balancing(draw: st.DrawFn, maglev: bool) -> dict[str, Any]:
    """NodeConfig fields choosing the default algorithm and Maglev's table (kept small,
    251 slots instead of the default 4,093, so that random clusters stay quick)."""
    if not maglev:
        return {}
    seed = draw(st.integers(0, 2**32 - 1))
    out: dict[str, Any] = {"maglev": {"tableSize": 251, "seed": f"0x{seed:x}"}}
    default = draw(st.sampled_from([None, "random", "maglev"]))
    if default:
        out["loadBalancing"] = default
    return out


@st.composite
def endpoint_changes(draw: st.DrawFn, objs: list[Obj]) -> list[Obj]:
    """``objs`` with the endpoints of each EndpointSlice changed as a cluster changes them
    between two runs: some stay, some go, some new ones come (on this node or another)."""
    out: list[Obj] = []
    for obj in objs:
        if obj["kind"] != "EndpointSlice":
            out.append(obj)
            continue
        v4 = obj["addressType"] == "IPv4"
        old = obj["endpoints"]
        kept = [e for e in old if draw(st.booleans())]
        have = {e["addresses"][0] for e in old}
        new = []
        for h in draw(st.lists(st.integers(10, 60), max_size=3, unique=True)):
            ip = f"198.51.100.{h}" if v4 else f"2001:db8:2::{h:x}"
            if ip not in have:
                new.append(endpoint(ip, node=draw(st.sampled_from(["node-a", "node-b"]))))
        out.append({**obj, "endpoints": kept + new})
    return out
