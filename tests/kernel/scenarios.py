"""Random clusters that fit the kernel lab, and random packets to send through them.

Every address and port is one the lab can really answer or swallow (see lab.py):

- ClusterIPs inside the NodeConfig's serviceCIDRs (203.0.113.0/25, 2001:db8:3::/112),
  LB ingress IPs (203.0.113.200-250, 2001:db8:3::1:200-250) and externalIPs
  (203.0.113.130-199, 2001:db8:3::2:130-199) outside them but inside the ranges the
  node routes into its dummy interface, so an untranslated packet to them dies there;
- endpoints are the lab's pods (pod1..pod4) on the ports they serve (8080, 8081, 9090,
  5353), on node-a (local) or node-b (remote);
- NodePorts come from a small pool, and a packet to one of the node's own addresses
  only ever uses a port of :data:`NODE_SERVER_PORTS`, on which the differential test
  runs a server in the node: a packet the rules leave alone is answered by the node;
- a Service's slices sometimes carry small weights (:data:`WEIGHTS`: 0 drains, and a
  share stays large enough that a few dozen connections reach every endpoint), and
  Services use Maglev
  by annotation or by the NodeConfig's default, with a small table (iptables refuses
  Maglev: ``Case.without_maglev`` is the same cluster with random picks).
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from svcrules.trace import Packet
from tests.k8s import Obj, endpoint, endpoint_slice, service

from .lab import (
    CLIENT_IP4,
    CLIENT_IP6,
    DEFAULT_PORTS,
    NODE_DUMMY_IP4,
    NODE_DUMMY_IP6,
    NODE_IP4,
    NODE_IP6,
)
from .test_semantics import cfg

PODS = ("pod1", "pod2", "pod3", "pod4")
MEMBERS = ("client", *PODS, "node")
NODE_ADDRESSES = (NODE_IP4, NODE_DUMMY_IP4, NODE_IP6, NODE_DUMMY_IP6)
SERVICE_PORTS = (53, 80, 443, 8080)
TARGET_PORTS = DEFAULT_PORTS  # what every pod serves
NODE_PORTS = tuple(range(30000, 30008))
# The node's server listens on every port a packet to a node address may use.
NODE_SERVER_PORTS = (*SERVICE_PORTS, *NODE_PORTS)
PROTOCOLS = ("TCP", "UDP")  # the lab has no SCTP sockets
# A weighted Service's slices' svcrules.io/weight (0 drains their endpoints). Never
# mixed with unweighted slices (100): the smallest share, 1 of 1+2+2+2, is still
# reached in 64 connections but once in 20,000.
WEIGHTS = ("1", "2", "1", "2", "0")
LOAD_BALANCING = "svcrules.io/load-balancing"

SOURCE_RANGES: tuple[tuple[str, ...], ...] = (
    ("192.0.2.100/32",),  # the client only
    ("192.0.2.0/24",),  # the client and a node IP: LB IPs become allowed sources too
    ("10.0.0.0/8",),  # nobody in the lab
    ("198.51.100.0/24", "2001:db8:2::/64"),  # pods only
    ("2001:db8:1::/64",),  # IPv6 only: this Service's IPv4 LB IPs are closed to all
    ("192.0.2.100/32", "2001:db8:1::100/128", "198.51.100.12/32"),
)
NODE_PORT_ADDRESSES: tuple[tuple[str, ...] | None, ...] = (
    None,  # the default: the primary node IPs
    ("0.0.0.0/0", "::/0"),
    ("198.18.0.0/15",),  # IPv4: the dummy only; IPv6: every local address
    ("192.0.2.0/24", "2001:db8:18::/64"),
    ("2001:db8:1::/64",),
)


def rarely(draw: st.DrawFn, n: int) -> bool:
    """True once in n + 1 draws, and never for Hypothesis' simplest choice (it often
    draws zeros for whole parts of an example, which should then be the usual case)."""
    return draw(st.integers(0, n)) == n


def pod_ip(pod: str, family: int) -> str:
    i = 10 + int(pod[3:])
    return f"198.51.100.{i}" if family == 4 else f"2001:db8:2::{i}"


def member_ip(member: str, family: int) -> str:
    if member == "client":
        return CLIENT_IP4 if family == 4 else CLIENT_IP6
    if member == "node":
        return NODE_IP4 if family == 4 else NODE_IP6
    return pod_ip(member, family)


def family_of(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def cluster_ip(host: int, family: int) -> str:
    return f"203.0.113.{host}" if family == 4 else f"2001:db8:3::{host}"


def lb_ip(host: int, family: int) -> str:
    return f"203.0.113.{host}" if family == 4 else f"2001:db8:3::1:{host}"


def external_ip(host: int, family: int) -> str:
    return f"203.0.113.{host}" if family == 4 else f"2001:db8:3::2:{host}"


@dataclass(frozen=True)
class Probe:
    """A packet as the lab sends it: from lab member ``member``, bound to ``src``."""

    member: str
    src: str
    dst: str
    port: int
    proto: str  # "tcp" | "udp"
    why: str = ""  # which kind of destination the strategy chose, for reports

    def packet(self) -> Packet:
        """The same packet as ``svcrules trace`` is asked about it."""
        return Packet(
            src=self.src,
            dst=self.dst,
            port=self.port,
            proto=self.proto,
            from_node=self.member == "node",
            local=NODE_ADDRESSES,
        )

    def __str__(self) -> str:
        dst = f"[{self.dst}]" if ":" in self.dst else self.dst
        return f"{self.member} ({self.src}) -> {dst}:{self.port}/{self.proto} ({self.why})"


@dataclass(frozen=True)
class Case:
    """One random cluster (a NodeConfig first) and packets to send through it."""

    objs: list[Obj]
    probes: list[Probe]

    def without_maglev(self) -> Case:
        """The same cluster with random picks, for a backend that refuses Maglev."""
        objs: list[Obj] = []
        for o in self.objs:
            o = copy.deepcopy(o)
            if o["kind"] == "NodeConfig":
                o["spec"].pop("loadBalancing", None)
            o.get("metadata", {}).get("annotations", {}).pop(LOAD_BALANCING, None)
            objs.append(o)
        return Case(objs, self.probes)

    def has_affinity(self) -> bool:
        return any(o["spec"].get("sessionAffinity") == "ClientIP" for o in self.services())

    def services(self) -> Iterator[Obj]:
        return (o for o in self.objs if o["kind"] == "Service")


@st.composite
def lab_clusters(draw: st.DrawFn, max_services: int = 3) -> list[Obj]:
    """A NodeConfig (the lab's, masqueradeAll and nodePortAddresses varied) and 1-3
    Services of every type, with EndpointSlices of the lab's pods."""
    spec: dict[str, Any] = {"masqueradeAll": draw(st.booleans())}
    npa = draw(st.sampled_from(NODE_PORT_ADDRESSES))
    if npa is not None:
        spec["nodePortAddresses"] = list(npa)
    if rarely(draw, 5):
        spec["clusterCIDRs"] = []  # no way to tell pods apart
    # Maglev's table kept small (251 slots, not the default 4,093): quick to load and
    # to trace. Maglev is the default of some nodes, and some Services' by annotation.
    seed = draw(st.integers(0, 2**32 - 1))
    spec["maglev"] = {"tableSize": 251, "seed": f"0x{seed:x}"}
    if rarely(draw, 3):
        spec["loadBalancing"] = "maglev"
    objs: list[Obj] = [cfg(**spec)]
    n = draw(st.integers(1, max_services))

    def pool(lo: int, hi: int, size: int) -> Iterator[int]:
        """Distinct numbers, shared out among all Services."""
        return iter(draw(st.lists(st.integers(lo, hi), min_size=size, max_size=size, unique=True)))

    cips = pool(2, 120, n)
    # A NodePort number is unique per protocol: TCP and UDP may share one.
    node_ports = {proto: iter(draw(st.permutations(NODE_PORTS))) for proto in PROTOCOLS}
    lb_hosts = pool(200, 250, 3 * n)
    ext_hosts = pool(130, 199, n)
    for i in range(n):
        objs += draw(_service(f"s{i}", next(cips), node_ports, lb_hosts, ext_hosts))
    if rarely(draw, 5):
        # One Service claims a node address as an externalIP.
        svc = draw(st.sampled_from([o for o in objs if o["kind"] == "Service"]))
        svc["spec"].setdefault("externalIPs", []).append(draw(st.sampled_from(NODE_ADDRESSES)))
        svc["spec"].setdefault("externalTrafficPolicy", "Cluster")
    return objs


@st.composite
def _service(
    draw: st.DrawFn,
    name: str,
    host: int,
    node_ports: dict[str, Iterator[int]],
    lb_hosts: Iterator[int],
    ext_hosts: Iterator[int],
) -> list[Obj]:
    families = draw(st.sampled_from([(4,), (6,), (4, 6), (6, 4)]))
    kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
    keys = draw(
        st.lists(
            st.tuples(st.sampled_from(SERVICE_PORTS), st.sampled_from(PROTOCOLS)),
            min_size=1,
            max_size=2,
            unique=True,
        )
    )
    spec: dict[str, Any] = {}
    with_node_ports = kind == "NodePort"
    if kind == "LoadBalancer":
        with_node_ports = draw(st.booleans())
        if not with_node_ports:
            spec["allocateLoadBalancerNodePorts"] = False
    ports: list[Obj] = []
    for j, (port, proto) in enumerate(keys):
        p: Obj = {"name": f"p{j}", "port": port, "protocol": proto}
        if with_node_ports:
            p["nodePort"] = next(node_ports[proto])
        ports.append(p)
    # Mostly of the Service's families; an address of another one is filtered out.
    some_families = st.sampled_from([families, families, families, (4,), (6,), (4, 6)])
    if rarely(draw, 3):
        ext = next(ext_hosts)
        spec["externalIPs"] = [external_ip(ext, f) for f in draw(some_families)]
    lb: list[str] | None = None
    if kind == "LoadBalancer":
        lb = [lb_ip(next(lb_hosts), f) for f in draw(some_families)]
        if draw(st.booleans()):
            lb.append(lb_ip(next(lb_hosts), draw(st.sampled_from([4, 6]))))
        if rarely(draw, 2):
            spec["loadBalancerSourceRanges"] = list(draw(st.sampled_from(SOURCE_RANGES)))
    if kind != "ClusterIP" or "externalIPs" in spec:
        spec["externalTrafficPolicy"] = draw(st.sampled_from(["Cluster", "Local"]))
    spec["internalTrafficPolicy"] = draw(st.sampled_from(["Cluster", "Local"]))
    if rarely(draw, 3):
        spec["sessionAffinity"] = "ClientIP"
    svc = service(
        name, [cluster_ip(host, f) for f in families], ports=ports, type=kind, lb_ips=lb, **spec
    )
    algorithm = draw(st.sampled_from([None, "maglev", "maglev", "random"]))
    if algorithm:
        svc["metadata"]["annotations"] = {LOAD_BALANCING: algorithm}
    if lb and len(lb) > 1 and rarely(draw, 3):
        svc["status"]["loadBalancer"]["ingress"][-1]["ipMode"] = "Proxy"
    out = [svc]
    weighted = not rarely(draw, 2)
    # Slices per family, sometimes of a family the Service does not have (ignored).
    for fam in (4, 6):
        if fam not in families and not rarely(draw, 3):
            continue
        pods: list[str] = []
        if not rarely(draw, 5):
            count = draw(st.sampled_from([2, 3, 1, 4]))
            pods = list(draw(st.permutations(PODS))[:count])
        split = draw(st.integers(0, len(pods)))  # two slices, of their own weights
        for k, group in enumerate((pods[:split], pods[split:])):
            if not group and k == 1:
                continue
            out.append(_slice(draw, name, fam, k, group, ports, weighted))
    return out


def _slice(
    draw: st.DrawFn,
    name: str,
    fam: int,
    k: int,
    pods: list[str],
    ports: list[Obj],
    weighted: bool,
) -> Obj:
    eps: list[Obj] = []
    for pod in pods:
        state = draw(st.sampled_from(["ready"] * 4 + ["unset", "not-ready", "terminating", "gone"]))
        eps.append(
            endpoint(
                pod_ip(pod, fam),
                node=draw(st.sampled_from(["node-a", "node-a", "node-b", None])),
                ready={"ready": True, "unset": None}.get(state, False),
                serving=None if state in ("ready", "unset") else state == "terminating",
                terminating=None if state in ("ready", "unset") else state != "not-ready",
            )
        )
    slice_ports = [
        {"name": p["name"], "port": draw(st.sampled_from(TARGET_PORTS)), "protocol": p["protocol"]}
        for p in ports
        if not rarely(draw, 7)  # rarely, a slice without this port
    ]
    family = "IPv4" if fam == 4 else "IPv6"
    sl = endpoint_slice(name, eps, ports=slice_ports, name=f"{name}-{fam}-{k}", family=family)
    if weighted:
        sl["metadata"]["annotations"] = {"svcrules.io/weight": draw(st.sampled_from(WEIGHTS))}
    return sl


def _frontends(objs: list[Obj]) -> list[tuple[str, str, int, str]]:
    """(why, address, port, proto) of every frontend the Services name, whether or not
    the rules program it (an LB IP of a family without ClusterIP is one too)."""
    out: list[tuple[str, str, int, str]] = []
    for svc in (o for o in objs if o["kind"] == "Service"):
        spec = svc["spec"]
        name = svc["metadata"]["name"]
        lbs = [i["ip"] for i in svc.get("status", {}).get("loadBalancer", {}).get("ingress", [])]
        for p in spec["ports"]:
            proto = p["protocol"].lower()
            for ip in spec["clusterIPs"]:
                out.append((f"{name} ClusterIP", ip, p["port"], proto))
            for ip in lbs:
                out.append((f"{name} LB IP", ip, p["port"], proto))
            for ip in spec.get("externalIPs", []):
                out.append((f"{name} externalIP", ip, p["port"], proto))
            if "nodePort" in p:
                for ip in NODE_ADDRESSES:
                    out.append((f"{name} NodePort", ip, p["nodePort"], proto))
    return out


@st.composite
def lab_probes(draw: st.DrawFn, objs: list[Obj]) -> Probe:
    """A packet for the cluster ``objs``: to one of its frontends, to a frontend's
    address on a port or protocol it does not serve, to an unused address inside or
    outside the serviceCIDRs, or to a pod directly."""
    frontends = _frontends(objs)
    used = {addr for _why, addr, _port, _proto in frontends}
    kind = draw(
        st.sampled_from(["frontend"] * 6 + ["wrong port", "unused", "outside", "pod", "node"])
    )
    proto = draw(st.sampled_from(["tcp", "udp"]))
    if kind == "frontend":
        why, dst, port, proto = draw(st.sampled_from(frontends))
    elif kind == "wrong port":
        why, dst, port, proto = draw(st.sampled_from(frontends))
        why = f"{why}, another port or protocol"
        choices = NODE_SERVER_PORTS if dst in NODE_ADDRESSES else (*SERVICE_PORTS, 81)
        other = draw(st.sampled_from([p for p in choices if p != port] + [port]))
        if other == port:
            proto = "udp" if proto == "tcp" else "tcp"
        port = other
    elif kind in ("unused", "outside"):
        fam = draw(st.sampled_from([4, 6]))
        if kind == "unused":
            why = "unused address in the serviceCIDR"
            addrs = st.integers(1, 126).map(lambda h: cluster_ip(h, fam))
        else:
            why = "unused address outside the serviceCIDR"
            addrs = st.integers(128, 255).map(
                lambda h: f"203.0.113.{h}" if fam == 4 else f"2001:db8:3::3:{h}"
            )
        dst = draw(addrs.filter(lambda a: a not in used))
        port = draw(st.sampled_from(SERVICE_PORTS))
    elif kind == "pod":
        why = "a pod directly"
        dst = pod_ip(draw(st.sampled_from(PODS)), draw(st.sampled_from([4, 6])))
        port = draw(st.sampled_from(TARGET_PORTS))
    else:
        why = "a node address"
        dst = draw(st.sampled_from(NODE_ADDRESSES))
        port = draw(st.sampled_from(NODE_SERVER_PORTS))
    fam = family_of(dst)
    members = [m for m in MEMBERS if m == "client" or m == "node" or pod_ip(m, fam) != dst]
    member = draw(st.sampled_from(members))
    if member == "node":
        src = draw(st.sampled_from([a for a in NODE_ADDRESSES if family_of(a) == fam]))
    else:
        src = member_ip(member, fam)
    return Probe(member, src, dst, port, proto, why)


@st.composite
def lab_cases(draw: st.DrawFn, max_probes: int = 8) -> Case:
    objs = draw(lab_clusters())
    probes = draw(st.lists(lab_probes(objs), min_size=2, max_size=max_probes, unique=True))
    return Case(objs, probes)
