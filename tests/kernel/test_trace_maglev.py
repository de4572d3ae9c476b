"""``svcrules trace --sport``: the slot a Maglev pick (nft's ``jhash``) gives a flow,
computed by svcrules/trace/jhash.py, must be the one the kernel takes.

Connections from fixed source ports, over TCP and UDP, IPv4 and IPv6, from the client
outside and from a pod, each read back from the node's conntrack table; and ClientIP
affinity's hash of the client's address, over several clients. A mistake in the byte
layout (a port's padding, the word order), the seed or the scaling sends most flows
elsewhere, so the prediction must be exact for every one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest

from svcrules.trace import Packet, trace
from tests.k8s import Obj, compile_objs, endpoint, endpoint_slice, service

from .lab import CLIENT_IP4, CLIENT_IP6, Lab
from .observe import conntrack, endpoint_name
from .scenarios import NODE_ADDRESSES, PODS, pod_ip
from .test_semantics import cfg

CIP4, CIP6 = "203.0.113.10", "2001:db8:3::10"
AFFINITY4 = "203.0.113.11"
# Source ports far from the kernel's ephemeral range, a few hundred apart.
SPORTS = tuple(range(20011, 20011 + 37 * 16, 37))
SEED = "0x5eed1234"


def cluster() -> list[Obj]:
    ports = [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]
    slice_ports = [
        {"name": "http", "port": 8080},
        {"name": "dns", "port": 5353, "protocol": "UDP"},
    ]
    maglev: dict[str, Any] = {"annotations": {"svcrules.io/load-balancing": "maglev"}}
    objs: list[Obj] = [cfg(maglev={"seed": SEED, "tableSize": 251})]
    services: list[tuple[str, list[str], dict[str, Any]]] = [
        ("web", [CIP4, CIP6], {}),
        ("sticky", [AFFINITY4], {"sessionAffinity": "ClientIP"}),
    ]
    for name, ips, spec in services:
        svc = service(name, ips, ports=ports, **spec)
        svc["metadata"].update(maglev)
        objs.append(svc)
        for fam, family in ((4, "IPv4"), (6, "IPv6")):
            if fam == 6 and len(ips) == 1:
                continue
            eps = [endpoint(pod_ip(p, fam)) for p in PODS]
            objs.append(endpoint_slice(name, eps, ports=slice_ports, family=family))
    return objs


def reached(lab: Lab, member: str, src: str, dst: str, port: int, proto: str, sport: int) -> str:
    """The endpoint one connection from ``src``:``sport`` reached, from conntrack."""
    results = lab.probe(member, dst, port, proto, count=1, timeout=0.5, bind=src, sport=sport)
    assert results[0].sport == sport, results
    fam = ipaddress.ip_address(dst).version
    canon = ipaddress.ip_address(src).compressed
    for e in conntrack(lab, fam, proto):
        if (e.src, e.sport, e.dport) == (canon, sport, port):
            return endpoint_name(e.reply_src, e.reply_sport)
    raise AssertionError(f"no conntrack entry for {src}:{sport} -> {dst}:{port}/{proto}")


@pytest.fixture
def maglev_lab(kernel_lab: Lab) -> Iterator[tuple[Lab, str]]:
    kernel_lab.reset()
    text = compile_objs(cluster()).nft
    assert "jhash" in text
    kernel_lab.load(text)
    yield kernel_lab, text
    kernel_lab.reset()


@pytest.mark.parametrize(
    ("member", "src", "dst", "port", "proto"),
    [
        ("client", CLIENT_IP4, CIP4, 80, "tcp"),
        ("client", CLIENT_IP4, CIP4, 53, "udp"),
        ("pod1", pod_ip("pod1", 4), CIP4, 80, "tcp"),
        ("client", CLIENT_IP6, CIP6, 80, "tcp"),
        ("pod2", pod_ip("pod2", 6), CIP6, 53, "udp"),
    ],
)
def test_the_flow_hash_takes_the_predicted_slot(
    maglev_lab: tuple[Lab, str], member: str, src: str, dst: str, port: int, proto: str
) -> None:
    lab, text = maglev_lab
    seen: dict[int, str] = {}
    wrong = []
    for sport in SPORTS:
        packet = Packet(src, dst, port, proto, False, NODE_ADDRESSES, sport)
        predicted = trace(text, "nftables", packet)
        ep = reached(lab, member, src, dst, port, proto, sport)
        seen[sport] = ep
        if predicted.endpoints != (ep,):
            wrong.append((sport, predicted.endpoints, ep, predicted.balancing[0].slot))
    assert not wrong, wrong
    assert len(set(seen.values())) >= 3, seen  # the flows really spread out


def test_the_client_hash_takes_the_predicted_slot(maglev_lab: tuple[Lab, str]) -> None:
    """ClientIP affinity hashes the client's address only: every source port of one
    client reaches the predicted endpoint, and different clients different ones."""
    lab, text = maglev_lab
    seen = {}
    for member in ("client", *PODS):
        src = CLIENT_IP4 if member == "client" else pod_ip(member, 4)
        for sport in SPORTS[:3]:
            packet = Packet(src, AFFINITY4, 80, "tcp", False, NODE_ADDRESSES, sport)
            predicted = trace(text, "nftables", packet)
            ep = reached(lab, member, src, AFFINITY4, 80, "tcp", sport)
            assert predicted.endpoints == (ep,), (member, sport, predicted.as_json())
            seen[member] = ep
    assert len(set(seen.values())) >= 2, seen
