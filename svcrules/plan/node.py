"""The node plan: what every Service port becomes on this node, per family.

This is where the decisions of SEMANTICS.md live, free of any rule syntax, so
that each backend renders the same decisions and ``explain`` can show them.
Everything is frozen and sorted; nothing here depends on input order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from svcrules.errors import Origin
from svcrules.inputs.addr import Family


class Route(StrEnum):
    """What a new connection to a frontend experiences."""

    CLUSTER = "cluster"  # DNAT to one of the cluster endpoints
    LOCAL = "local"  # DNAT to one of this node's endpoints
    REJECT = "reject"  # no usable endpoint anywhere
    DROP = "drop"  # policy Local and no local endpoint


class Masquerade(StrEnum):
    """When connections to a frontend are source-NATed to the node."""

    ALWAYS = "always"
    NON_POD = "non-pod"  # sources outside clusterCIDRs
    NEVER = "never"
    NODE_ONLY = "node-only"  # eTP Local: only the node's own addresses (short-circuit)


class Backend(NamedTuple):
    """One endpoint address and port. A NamedTuple, not a frozen dataclass: there are
    hundreds of thousands and a frozen dataclass is several times slower to create."""

    ip: str
    port: int
    node: str = ""
    terminating: bool = False
    weight: int = 100  # its EndpointSlice's svcrules.io/weight (balancing.py)


class Algorithm(StrEnum):
    """How a new connection's endpoint is chosen among a selection's (balancing.py)."""

    RANDOM = "random"  # a uniformly random slot of the selection's slot table
    MAGLEV = "maglev"  # the slot a hash of the flow names: the same on every node


class Balancing(NamedTuple):
    """How a port's selections pick. The slot tables hold, per slot, an index into
    cluster_backends / local_backends; an empty table is one slot per endpoint in order
    (random with equal weights: the common case, kept small)."""

    algorithm: Algorithm = Algorithm.RANDOM
    seed: int = 0  # Maglev's hash seed (NodeConfig spec.maglev.seed)
    cluster_slots: tuple[int, ...] = ()
    local_slots: tuple[int, ...] = ()

    def slots(self, which: str, endpoints: int) -> tuple[int, ...]:
        """The slot table of the "cluster" or "local" selection."""
        table = self.cluster_slots if which == "cluster" else self.local_slots
        return table or tuple(range(endpoints))


RANDOM = Balancing()


def picks_local(internal: Route, external: Route) -> bool:
    """Whether routes this port takes pick from its local endpoints (the selection, and
    its slot table, exist only then)."""
    return Route.LOCAL in (internal, external)


class PortPlan(NamedTuple):
    """One Service port in one family, with every decision made (a NamedTuple for the
    same reason as Backend: one per Service port, tens of thousands)."""

    namespace: str
    name: str
    port_name: str
    protocol: str  # TCP / UDP / SCTP
    port: int
    family: Family
    cluster_ip: str
    node_port: int | None
    external_ips: tuple[str, ...]
    lb_ips: tuple[str, ...]
    firewall: bool  # loadBalancerSourceRanges set: LB IPs are source-filtered
    source_ranges: tuple[str, ...]  # allowed sources in this family
    allow_lb_self: bool  # a range holds a node IP: LB IPs may be sources too
    # Every allowed source of every LB frontend: source_ranges, plus each LB IP as a host
    # prefix when allow_lb_self (the node may reach one LB IP from another)
    allowed_sources: tuple[str, ...]
    cluster_backends: tuple[Backend, ...]
    local_backends: tuple[Backend, ...]
    internal_route: Route
    internal_masquerade: Masquerade
    external_route: Route
    external_masquerade: Masquerade
    pod_shortcut: bool  # eTP Local: pod sources go to cluster endpoints unmasqueraded
    affinity_timeout: int | None
    notes: tuple[str, ...] = ()
    balancing: Balancing = RANDOM
    # Usable endpoints of weight 0: no new connections, but they still count as the
    # port's endpoints (their UDP conntrack entries are kept, explain lists them).
    drained: tuple[Backend, ...] = ()

    @property
    def service(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def key(self) -> str:
        """Unique, stable identity: namespace/name:port-name/protocol (per family)."""
        return f"{self.namespace}/{self.name}:{self.port_name or self.port}/{self.protocol}"

    @property
    def has_external(self) -> bool:
        return bool(self.node_port or self.external_ips or self.lb_ips)

    @property
    def maglev_hash(self) -> str | None:
        """What a Maglev pick hashes: "client" (the source address) with ClientIP affinity,
        so that the client sticks on every node, else "flow" (the 5-tuple); None when
        the port picks at random."""
        if self.balancing.algorithm is not Algorithm.MAGLEV:
            return None
        return "flow" if self.affinity_timeout is None else "client"

    def uses_local_backends(self) -> bool:
        """Whether a route picks from this node's endpoints (a Local traffic policy)."""
        return picks_local(self.internal_route, self.external_route)

    def uses_cluster_backends(self) -> bool:
        return (
            self.internal_route is Route.CLUSTER
            or self.external_route is Route.CLUSTER
            or (self.has_external and self.external_route in (Route.LOCAL, Route.DROP))
        )


class HealthCheck(NamedTuple):
    """A healthCheckNodePort to answer on this node, in one family, and the number of
    local endpoints its answer reports (``svcrules serve``).

    kube-proxy serves one for each LoadBalancer Service with externalTrafficPolicy Local
    and a healthCheckNodePort (``NeedsHealthCheck`` in pkg/api/v1/service/util.go), and
    counts its *ready* local endpoints, by address, over all of the Service's ports
    (``EndpointsMap.LocalReadyEndpoints`` in pkg/proxy/endpointschangetracker.go:
    "Terminating endpoints may still serve traffic but the health check signal should
    fail if there are only terminating endpoints on a node"). So a node whose only local
    endpoints are serving and terminating answers 503, and load balancers drain it, while
    its rules still send the connections that arrive there to those endpoints. Each
    family's proxier of kube-proxy keeps its own count, for its own family's endpoints."""

    namespace: str
    name: str
    family: Family
    port: int
    local_endpoints: int

    @property
    def service(self) -> str:
        return f"{self.namespace}/{self.name}"


class PlannedService(NamedTuple):
    """What one Service contributes to the node plan before claims are settled: its
    ports in each family, with everything needed to settle claims and report them.
    It depends only on the Service, its EndpointSlices and the NodeConfig, so a
    compile cache can keep it while those stay the same (svcrules.compiler.compile_cache)."""

    namespace: str
    name: str
    created: float | None  # metadata.creationTimestamp (seconds), for claims
    origin: Origin | None  # where the Service was read, for error messages
    ports: tuple[tuple[tuple[int, PortPlan], ...], tuple[tuple[int, PortPlan], ...]]
    health: tuple[HealthCheck, ...] = ()  # per family; none unless the Service needs one

    def family_ports(self, family: Family) -> tuple[tuple[int, PortPlan], ...]:
        """(index in spec.ports, plan) of each port in ``family``."""
        return self.ports[0 if family == 4 else 1]


@dataclass(frozen=True)
class FamilyPlan:
    family: Family
    table: str
    node_ip: str | None
    pod_cidrs: tuple[str, ...]
    service_cidrs: tuple[str, ...]
    foreign_ips: tuple[str, ...]  # ClusterIPs of Services another proxy handles
    nodeport_mode: str  # "primary", "cidrs" or "all"
    nodeport_cidrs: tuple[str, ...]
    masquerade_bit: int
    ports: tuple[PortPlan, ...]
    notes: tuple[str, ...] = ()  # decisions about the whole family, for explain

    @property
    def masquerade_mark(self) -> int:
        return 1 << self.masquerade_bit


def port_digest(p: PortPlan) -> str:
    """Changes whenever any decision about the port changes (the repr of a NamedTuple of
    strings, numbers, enums and tuples is stable)."""
    return hashlib.sha256(repr(p).encode()).hexdigest()[:16]


class IgnoredSlice(NamedTuple):
    """An EndpointSlice left out as if it did not exist, and the label that hides it."""

    namespace: str
    name: str
    service: str  # its kubernetes.io/service-name
    label: str

    @property
    def text(self) -> str:
        return (
            f"EndpointSlice {self.namespace}/{self.name} ignored: "
            f"labelled {self.label}, as kube-proxy ignores it"
        )


@dataclass(frozen=True)
class NodePlan:
    node_name: str
    zone: str
    table: str
    families: tuple[FamilyPlan, ...]  # IPv4 first, then IPv6
    ignored_slices: tuple[IgnoredSlice, ...] = ()  # sorted by namespace/name
    # The healthCheckNodePorts to serve, by namespace/name, then family
    health_checks: tuple[HealthCheck, ...] = ()
