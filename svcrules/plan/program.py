"""The rule program: the node plan as chains, steps, sets and dispatch entries.

Between the node plan (what each Service port becomes) and the backends (how nft
or iptables spell it) sits one backend-neutral program per family: which frontend
goes where (``dispatch``, ``nodeports``), which chains exist by role and what each
does, step by step, and what the shared sets hold. Every packet decision the
backends need is made here or in the plan before it, once; a layout only names
the chains and spells the steps (nft maps and slot buckets, or iptables chains and
``statistic`` cascades, are spelling).

Two roles the backends have chains for are not chains here, because what they do
is already said: an endpoint chain (nft ``aep-``, iptables ``-SEP-``) is how a
layout spells one endpoint of a Pick (with ClientIP affinity: remember the client,
then DNAT), and ``no-endpoints`` is how nft spells the Terminal REJECT (iptables
leaves the connection untranslated in nat and rejects it in filter).

Everything is NamedTuples and tuples: at 10,000 Services this runs for tens of
thousands of chains on the hot path of every compile.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

from svcrules.inputs.addr import Family, ip_sort_key, packed
from svcrules.plan.node import (
    Backend,
    FamilyPlan,
    Masquerade,
    NodePlan,
    PortPlan,
    Route,
)


class Role(StrEnum):
    """What a chain is for; with a Service port key it names the chain."""

    SERVICE = "service"  # ClusterIP traffic of one Service port
    EXTERNAL = "external"  # NodePort, LB ingress IP and externalIP traffic
    CLUSTER_SHORTCUT = "cluster-shortcut"  # eTP Local: pods and the node to cluster endpoints


class ChainId(NamedTuple):
    role: Role
    key: str  # the Service port's key (PortPlan.key)


class Terminal(StrEnum):
    """A frontend's verdict when no chain serves it."""

    REJECT = "reject"  # no usable endpoint anywhere (SEMANTICS 4)
    DROP = "drop"  # iTP Local without a local endpoint (SEMANTICS 3)


Target = ChainId | Terminal


class Sources(StrEnum):
    ALL = "all"
    NON_POD = "non-pod"  # outside clusterCIDRs
    PODS = "pods"  # inside clusterCIDRs
    NODE = "node"  # one of the node's own addresses (decided in the kernel)


# -- steps of a chain, in order ------------------------------------------------


class MarkMasquerade(NamedTuple):
    """Mark the connection for masquerading when its source is one of ``sources``."""

    sources: Sources  # ALL or NON_POD


class Shortcut(NamedTuple):
    """Send ``sources`` to another chain (eTP Local's short-circuit), first marking
    them for masquerading when ``masquerade``."""

    sources: Sources  # PODS or NODE
    target: ChainId
    masquerade: bool


class Hash(StrEnum):
    """What a Maglev pick hashes (svcrules/plan/balancing.py)."""

    FLOW = "flow"  # source and destination address and port (the protocol is the port's)
    CLIENT = "client"  # the source address only: with ClientIP affinity


class Selection(NamedTuple):
    """A set of endpoints a chain picks from by a table of slots: a uniformly random
    slot, or the slot a hash names (Maglev); with ClientIP affinity, first the endpoint
    the client is pinned to."""

    key: str  # Service port key + "#cluster" or "#local": stable identity
    port_key: str
    protocol: str  # tcp / udp / sctp
    endpoints: tuple[Backend, ...]
    hairpin: tuple[bool, ...]  # per endpoint: may be its own client through this node
    affinity: int | None  # ClientIP affinity timeout in seconds
    slots: tuple[int, ...]  # per slot, the index of its endpoint (weights decide how many)
    hash: Hash | None = None  # None: a random slot; else what the Maglev hash covers
    seed: int = 0  # the hash's seed


class Pick(NamedTuple):
    selection: Selection


class Drop(NamedTuple):
    """Nothing to pick: the connection is dropped."""


DROP = Drop()
Step = MarkMasquerade | Shortcut | Pick | Drop


class Chain(NamedTuple):
    id: ChainId
    protocol: str
    steps: tuple[Step, ...]

    @property
    def drops(self) -> bool:
        """Ends in Drop: nothing this chain does translates the connection."""
        return self.steps[-1] is DROP


# -- frontends, sets -----------------------------------------------------------


class FrontendKind(StrEnum):
    CLUSTER_IP = "cluster-ip"
    LOAD_BALANCER = "load-balancer"
    EXTERNAL_IP = "external-ip"
    NODE_PORT = "node-port"


class Frontend(NamedTuple):
    """One dispatch entry: a destination and where connections to it go."""

    kind: FrontendKind
    address: str  # "" for NodePorts: see FamilyProgram.nodeport_scope
    protocol: str
    port: int
    key: str  # the Service port's key
    target: Target


class Firewall(NamedTuple):
    """loadBalancerSourceRanges of one LB frontend: other sources are dropped."""

    address: str
    protocol: str
    port: int
    key: str
    allowed: tuple[str, ...]  # CIDRs, possibly overlapping


class NodePortScope(NamedTuple):
    """Which destinations serve NodePorts, decided at packet time in the kernel."""

    local: bool  # only the node's own addresses (whatever they are at packet time)
    except_loopback: bool
    within: tuple[str, ...] | None  # and only inside these CIDRs/addresses; None: any


class FamilyProgram(NamedTuple):
    family: Family
    table: str
    masquerade_mark: int
    pod_cidrs: tuple[str, ...]
    service_cidrs: tuple[str, ...]  # unallocated addresses inside are dropped
    foreign_ips: tuple[str, ...]  # ClusterIPs another proxy handles: left alone
    cluster_ips: tuple[str, ...]  # sorted, unique: ports no Service defines are rejected
    nodeport_scope: NodePortScope
    dispatch: tuple[Frontend, ...]  # address frontends, sorted; one per destination
    nodeports: tuple[Frontend, ...]  # sorted by protocol and port
    chains: tuple[Chain, ...]  # in Service port order: svc, ext, clu
    firewalls: tuple[Firewall, ...]  # sorted by frontend
    # Every endpoint set the plan names, in Service port order. A chain picks from
    # some; all of them get a place, so that places do not move when a route changes.
    selections: tuple[Selection, ...]
    # (Service port key, address, port) of every endpoint of a port with ClientIP
    # affinity: the pairs a client may be pinned to, for stable ids.
    affinity_pairs: tuple[tuple[str, str, int], ...]
    hairpin: tuple[str, ...]  # endpoint addresses that may reach themselves, sorted


class Program(NamedTuple):
    node_name: str
    table: str
    families: tuple[FamilyProgram, ...]


def _masquerade_step(m: Masquerade) -> tuple[Step, ...]:
    if m is Masquerade.ALWAYS:
        return (MarkMasquerade(Sources.ALL),)
    if m is Masquerade.NON_POD:
        return (MarkMasquerade(Sources.NON_POD),)
    return ()


class _Builder:
    """One pass over a family's Service ports."""

    def __init__(self, plan: FamilyPlan, node_name: str) -> None:
        self.plan = plan
        self.here = ("", node_name)
        self.selections: dict[str, Selection] = {}
        self.used: dict[str, Selection] = {}
        self.chains: list[Chain] = []
        self.dispatch: list[Frontend] = []
        self.claimed: set[tuple[str, str, int]] = set()
        self.nodeports: list[Frontend] = []
        self.firewalls: list[Firewall] = []
        self.key = self.proto = ""  # of the port being built

    def selection(self, p: PortPlan, which: str) -> Selection:
        key = f"{self.key}#{which}"
        sel = self.selections.get(key)
        if sel is None:
            backends = p.cluster_backends if which == "cluster" else p.local_backends
            # A pod's traffic to its own Service passes its own node's rules only, so
            # only this node's endpoints (or those of unknown node) can hairpin here.
            here = self.here
            hairpin = tuple([b.node in here for b in backends])
            lb = p.balancing
            slots = lb.slots(which, len(backends))
            affinity = p.affinity_timeout
            sel = Selection(key, self.key, self.proto, backends, hairpin, affinity, slots)
            if p.maglev_hash is not None:
                sel = sel._replace(hash=Hash(p.maglev_hash), seed=lb.seed)
            self.selections[key] = sel
        return sel

    def pick(self, p: PortPlan, which: str) -> Pick:
        sel = self.selection(p, which)
        self.used[sel.key] = sel
        return Pick(sel)

    def claim(self, f: Frontend) -> None:
        """A Service may list its own ClusterIP among its externalIPs (the API allows
        it): the first claim of an address, protocol and port wins."""
        dest = (f.address, f.protocol, f.port)
        if dest not in self.claimed:
            self.claimed.add(dest)
            self.dispatch.append(f)

    def port(self, p: PortPlan) -> None:
        # The port's key and protocol, spelled once: they name everything below.
        self.key = p.key
        self.proto = proto = p.protocol.lower()
        # Endpoint sets get their place in the order the plan names them.
        if p.uses_cluster_backends():
            self.selection(p, "cluster")
        if p.uses_local_backends():
            self.selection(p, "local")
        self.internal(p, proto)
        if p.has_external:
            self.external(p, proto)

    def internal(self, p: PortPlan, proto: str) -> None:
        target: Target
        if p.internal_route is Route.REJECT:
            target = Terminal.REJECT
        elif p.internal_route is Route.DROP:
            target = Terminal.DROP
        else:
            target = ChainId(Role.SERVICE, self.key)
            which = "local" if p.internal_route is Route.LOCAL else "cluster"
            steps = (*_masquerade_step(p.internal_masquerade), self.pick(p, which))
            self.chains.append(Chain(target, proto, steps))
        self.claim(Frontend(FrontendKind.CLUSTER_IP, p.cluster_ip, proto, p.port, self.key, target))

    def external(self, p: PortPlan, proto: str) -> None:
        target: Target
        if p.external_route is Route.REJECT:
            target = Terminal.REJECT
        elif p.external_route is Route.CLUSTER:
            target = ChainId(Role.EXTERNAL, self.key)
            steps: tuple[Step, ...] = (MarkMasquerade(Sources.ALL), self.pick(p, "cluster"))
            self.chains.append(Chain(target, proto, steps))
        else:  # eTP Local: local endpoints or drop, pods and the node short-circuited
            target = ChainId(Role.EXTERNAL, self.key)
            clu = ChainId(Role.CLUSTER_SHORTCUT, self.key)
            last: Step = self.pick(p, "local") if p.external_route is Route.LOCAL else DROP
            steps = (
                *((Shortcut(Sources.PODS, clu, False),) if p.pod_shortcut else ()),
                Shortcut(Sources.NODE, clu, True),
                last,
            )
            self.chains.append(Chain(target, proto, steps))
            self.chains.append(Chain(clu, proto, (self.pick(p, "cluster"),)))
        for kind, ips in (
            (FrontendKind.LOAD_BALANCER, p.lb_ips),
            (FrontendKind.EXTERNAL_IP, p.external_ips),
        ):
            for ip in ips:
                self.claim(Frontend(kind, ip, proto, p.port, self.key, target))
        if p.node_port:
            self.nodeports.append(
                Frontend(FrontendKind.NODE_PORT, "", proto, p.node_port, self.key, target)
            )
        if p.firewall:
            for ip in p.lb_ips:
                self.firewalls.append(Firewall(ip, proto, p.port, self.key, p.allowed_sources))

    def nodeport_scope(self) -> NodePortScope:
        plan = self.plan
        if plan.nodeport_mode == "primary":
            return NodePortScope(False, False, (plan.node_ip,) if plan.node_ip else ())
        if plan.nodeport_mode == "cidrs":
            return NodePortScope(True, True, plan.nodeport_cidrs)
        return NodePortScope(True, True, None)

    def build(self) -> FamilyProgram:
        plan = self.plan
        for p in plan.ports:
            self.port(p)
        hairpin = {
            b.ip
            for sel in self.used.values()
            for b, may in zip(sel.endpoints, sel.hairpin, strict=True)
            if may
        }
        affinity_pairs = [
            (p.key, b.ip, b.port)
            for p in plan.ports
            if p.affinity_timeout is not None
            for b in {*p.cluster_backends, *p.local_backends}
        ]
        return FamilyProgram(
            family=plan.family,
            table=plan.table,
            masquerade_mark=plan.masquerade_mark,
            pod_cidrs=plan.pod_cidrs,
            service_cidrs=plan.service_cidrs,
            foreign_ips=plan.foreign_ips,
            cluster_ips=tuple(sorted({p.cluster_ip for p in plan.ports}, key=ip_sort_key)),
            nodeport_scope=self.nodeport_scope(),
            dispatch=tuple(
                sorted(self.dispatch, key=lambda f: (ip_sort_key(f.address), f.protocol, f.port))
            ),
            nodeports=tuple(sorted(self.nodeports, key=lambda f: (f.protocol, f.port))),
            chains=tuple(self.chains),
            firewalls=tuple(
                sorted(self.firewalls, key=lambda f: (ip_sort_key(f.address), f.protocol, f.port))
            ),
            selections=tuple(self.selections.values()),
            affinity_pairs=tuple(sorted(affinity_pairs)),
            hairpin=tuple(sorted(hairpin, key=packed)),  # one family per program
        )


def family_program(plan: FamilyPlan, node_name: str) -> FamilyProgram:
    return _Builder(plan, node_name).build()


def program(plan: NodePlan) -> Program:
    """The rule program of a node plan, both families."""
    families = tuple(family_program(f, plan.node_name) for f in plan.families)
    return Program(plan.node_name, plan.table, families)
