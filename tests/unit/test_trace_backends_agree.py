"""The two backends spell one rule program: traced packet by packet, their texts must
give every packet the same fate. The tracer shares no code with the renderers (an
import-linter contract), so this checks both renderers against each other through an
independent reading of what they wrote."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svcrules.trace import Packet, Trace, trace
from tests.k8s import Obj, compile_objs
from tests.strategies import clusters

LOCAL = ("192.0.2.1", "2001:db8:1::1")
SOURCES4 = ["192.0.2.100", "10.9.9.9", "198.51.100.10", "198.51.100.20", "198.51.100.33"]
SOURCES6 = ["2001:db8:1::100", "2001:db8:9::9", "2001:db8:2::a", "2001:db8:2::14"]


def destinations(objs: list[Obj]) -> list[tuple[str, int, str]]:
    """Every frontend of the cluster, plus near misses: wrong ports, unused addresses."""
    out: list[tuple[str, int, str]] = [
        ("203.0.113.121", 80, "tcp"),  # inside serviceCIDRs (when set), never allocated
        ("198.51.100.10", 9000, "tcp"),  # a pod, directly
        ("2001:db8:3::ffff", 53, "udp"),
    ]
    for obj in objs:
        if obj["kind"] != "Service":
            continue
        spec = obj["spec"]
        addrs = list(spec.get("clusterIPs", []))
        addrs += spec.get("externalIPs", [])
        addrs += [i["ip"] for i in obj.get("status", {}).get("loadBalancer", {}).get("ingress", [])]
        for p in spec["ports"]:
            proto = p["protocol"].lower()
            for a in addrs:
                out.append((a, p["port"], proto))
                out.append((a, p["port"] + 1, proto))
            if "nodePort" in p:
                out.append(("192.0.2.1", p["nodePort"], proto))
                out.append(("2001:db8:1::1", p["nodePort"], proto))
                out.append(("127.0.0.1", p["nodePort"], proto))
    return out


@st.composite
def cluster_and_packets(draw: st.DrawFn) -> tuple[list[Obj], list[Packet]]:
    objs = draw(clusters(max_services=4, maglev=False))
    dests = destinations(objs)
    packets = []
    for _ in range(draw(st.integers(4, 12))):
        dst, port, proto = draw(st.sampled_from(dests))
        v6 = ":" in dst
        from_node = draw(st.booleans()) if draw(st.booleans()) else False
        if from_node:
            src = "2001:db8:1::1" if v6 else "192.0.2.1"
        else:
            src = draw(st.sampled_from(SOURCES6 if v6 else SOURCES4))
        packets.append(Packet(src, dst, port, proto, from_node, LOCAL))
    return objs, packets


def fate(t: Trace) -> tuple[object, ...]:
    probs = {ep: round(p, 4) for ep, p in t.probabilities.items()}
    return (t.verdict, t.endpoints, probs, t.masquerade, t.masqueraded, t.affinity, t.source)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_and_packets())
def test_nftables_and_iptables_give_every_packet_the_same_fate(
    case: tuple[list[Obj], list[Packet]],
) -> None:
    objs, packets = case
    ruleset = compile_objs(objs)
    nft, ipt = ruleset.text("nftables"), ruleset.text("iptables")
    for packet in packets:
        a, b = trace(nft, "nftables", packet), trace(ipt, "iptables", packet)
        assert fate(a) == fate(b), (packet, a.as_json(), b.as_json())
        if a.verdict == "dnat":
            assert abs(sum(a.probabilities.values()) - 1) < 1e-5
            assert all(p > 0 for p in a.probabilities.values())
