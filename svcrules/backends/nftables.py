"""The nftables layout: which tables, sets, maps and chains hold the node plan.

Layout (see docs/design.md for the measurements behind it): a handful of
named maps hold the data that grows with the cluster (frontends, backends),
and each Service port adds only one or two short chains without anonymous
sets, because the number of sets drives nft's load time, not the number of
elements. Backend choice is ``numgen random mod N offset BASE`` into one
shared ``backends-<protocol>`` map; each endpoint selection owns a block of slots.
Only this module and templates/nftables/ know nft.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from svcrules.addr import collapse_cidrs, ip_sort_key
from svcrules.names import chain_name, comment, digest
from svcrules.plan import Backend, FamilyPlan, Masquerade, NodePlan, PortPlan, Route
from svcrules.render import render

PROTOCOLS = ("tcp", "udp", "sctp")
SLOT_BITS = 12  # endpoints per slot block; larger selections take several blocks
BLOCK_BITS = 19  # slots stay below 2**31: nft -j prints offsets as signed 32-bit


@dataclass(frozen=True)
class Selection:
    """How a chain picks a backend: one dnat through the backends map, or, with
    session affinity, a check of each backend's affinity set first."""

    count: int
    base: int
    backends: tuple[Backend, ...]
    affinity: tuple[str, ...]  # per backend: the "aep" chain and "aff" set suffix


@dataclass(frozen=True)
class Chain:
    name: str
    comment: str
    protocol: str  # tcp / udp / sctp: dnat needs the match
    masquerade: str  # "all", "non-pod", "node" or "none"
    pod_shortcut: str  # chain to goto for pod sources (eTP Local), or ""
    node_shortcut: str  # chain to goto for node sources (eTP Local), or ""
    selection: Selection | None  # None: drop


@dataclass(frozen=True)
class AffinityEndpoint:
    name: str  # suffix of aep-/aff- objects
    comment: str
    protocol: str
    backend: Backend
    timeout: int


@dataclass
class Table:
    family: str  # "ip" or "ip6"
    name: str
    plan: FamilyPlan
    mark: int
    chains: list[Chain] = field(default_factory=list)
    affinity: list[AffinityEndpoint] = field(default_factory=list)
    service_ips: list[tuple[str, str, int, str]] = field(default_factory=list)
    nodeports: list[tuple[str, int, str]] = field(default_factory=list)
    cluster_ips: list[str] = field(default_factory=list)
    fw_frontends: list[tuple[str, str, int]] = field(default_factory=list)
    fw_allow: list[tuple[str, str, int, str]] = field(default_factory=list)
    # protocol -> (slot, endpoint); one map per protocol: nft 1.0.6 refuses an
    # incremental "meta l4proto udp dnat ... map @m" when m's data is typed "th dport".
    backends: dict[str, list[tuple[int, Backend]]] = field(
        default_factory=lambda: {p: [] for p in PROTOCOLS}
    )
    affinity_slots: list[tuple[int, str]] = field(default_factory=list)
    hairpin: list[str] = field(default_factory=list)


def _allocate(requests: list[tuple[str, int]]) -> dict[str, int]:
    """Give each selection a block of slots at a spot derived from its key, so a
    Service's slots do not move when other Services come and go (only on a
    rare digest collision, resolved by probing in key order)."""
    used: set[int] = set()
    out: dict[str, int] = {}
    nblocks = 1 << BLOCK_BITS
    for key, size in sorted(requests):
        need = max(1, -(-size // (1 << SLOT_BITS)))
        start = int(digest(key, length=8), 16) % nblocks
        for probe in range(nblocks):
            first = (start + probe) % nblocks
            span = [(first + i) % nblocks for i in range(need)]
            if first + need <= nblocks and not used.intersection(span):
                used.update(span)
                out[key] = first << SLOT_BITS
                break
        else:  # pragma: no cover - 2**19 blocks cannot all be taken by real input
            raise RuntimeError("backend slot space exhausted")
    return out


def _proto(p: PortPlan) -> str:
    return p.protocol.lower()


def layout_family(plan: FamilyPlan) -> Table:
    """Decide every nft object of one family's table."""
    table = Table(
        family="ip" if plan.family == 4 else "ip6",
        name=plan.table,
        plan=plan,
        mark=plan.masquerade_mark,
    )
    requests: list[tuple[str, int]] = []
    for p in plan.ports:
        if p.uses_cluster_backends():
            requests.append((f"{p.key}#cluster", len(p.cluster_backends)))
        if Route.LOCAL in (p.internal_route, p.external_route):
            requests.append((f"{p.key}#local", len(p.local_backends)))
    bases = _allocate(requests)
    hairpin: set[str] = set()
    aff_done: set[str] = set()

    made: dict[str, Selection] = {}

    def selection(p: PortPlan, which: str) -> Selection:
        key = f"{p.key}#{which}"
        if key in made:
            return made[key]
        made[key] = sel = _select(p, which)
        return sel

    def _select(p: PortPlan, which: str) -> Selection:
        backends = p.cluster_backends if which == "cluster" else p.local_backends
        base = bases[f"{p.key}#{which}"]
        names: list[str] = []
        for i, b in enumerate(backends):
            hairpin.add(b.ip)
            if p.affinity_timeout is None:
                table.backends[_proto(p)].append((base + i, b))
                continue
            name = digest(p.key, b.ip, str(b.port))
            names.append(name)
            table.affinity_slots.append((base + i, name))
            if name not in aff_done:
                aff_done.add(name)
                table.affinity.append(
                    AffinityEndpoint(
                        name,
                        comment(f"{p.key} {b.ip} {b.port}"),
                        _proto(p),
                        b,
                        p.affinity_timeout,
                    )
                )
        return Selection(len(backends), base, backends, tuple(names))

    for p in plan.ports:
        proto = _proto(p)
        label = comment(p.key)
        svc = chain_name("svc", p.key)
        ext = chain_name("ext", p.key)
        clu = chain_name("clu", p.key)
        table.cluster_ips.append(p.cluster_ip)

        # ClusterIP frontend
        if p.internal_route is Route.REJECT:
            table.service_ips.append((p.cluster_ip, proto, p.port, "goto no-endpoints"))
        elif p.internal_route is Route.DROP:
            table.service_ips.append((p.cluster_ip, proto, p.port, "drop"))
        else:
            masq = {Masquerade.ALWAYS: "all", Masquerade.NON_POD: "non-pod"}.get(
                p.internal_masquerade, "none"
            )
            which = "local" if p.internal_route is Route.LOCAL else "cluster"
            table.chains.append(Chain(svc, label, proto, masq, "", "", selection(p, which)))
            table.service_ips.append((p.cluster_ip, proto, p.port, f"goto {svc}"))

        # external frontends: NodePort, LB ingress IPs, externalIPs
        if not p.has_external:
            continue
        if p.external_route is Route.REJECT:
            verdict = "goto no-endpoints"
        else:
            verdict = f"goto {ext}"
            if p.external_route is Route.CLUSTER:
                table.chains.append(
                    Chain(ext, label, proto, "all", "", "", selection(p, "cluster"))
                )
            else:
                table.chains.append(
                    Chain(
                        ext,
                        label,
                        proto,
                        "node",
                        clu if p.pod_shortcut else "",
                        clu,
                        selection(p, "local") if p.external_route is Route.LOCAL else None,
                    )
                )
                table.chains.append(
                    Chain(clu, label, proto, "none", "", "", selection(p, "cluster"))
                )
        for ip in (*p.lb_ips, *p.external_ips):
            table.service_ips.append((ip, proto, p.port, verdict))
        if p.node_port:
            table.nodeports.append((proto, p.node_port, verdict))
        if p.firewall:
            for ip in p.lb_ips:
                table.fw_frontends.append((ip, proto, p.port))
                allowed = list(p.source_ranges)
                if p.allow_lb_self:
                    allowed.append(f"{ip}/{32 if plan.family == 4 else 128}")
                for cidr in collapse_cidrs(allowed):
                    table.fw_allow.append((ip, proto, p.port, cidr))

    table.chains.sort(key=lambda c: c.name)
    table.affinity.sort(key=lambda a: a.name)
    table.service_ips.sort(key=lambda e: (ip_sort_key(e[0]), e[1], e[2]))
    table.nodeports.sort()
    table.cluster_ips = sorted(set(table.cluster_ips), key=ip_sort_key)
    table.fw_frontends.sort(key=lambda e: (ip_sort_key(e[0]), e[1], e[2]))
    table.fw_allow = sorted(
        set(table.fw_allow), key=lambda e: (ip_sort_key(e[0]), e[1], e[2], ip_sort_key(e[3]))
    )
    for entries in table.backends.values():
        entries.sort(key=lambda e: e[0])
    table.affinity_slots.sort()
    table.hairpin = sorted(hairpin, key=ip_sort_key)
    return table


def layout(plan: NodePlan) -> list[Table]:
    return [layout_family(f) for f in plan.families]


FINGERPRINT_PLACEHOLDER = "@@fingerprint@@"
_FINGERPRINT = re.compile(r'return comment "svcrules ([0-9a-f]{32})"')


def render_nft(plan: NodePlan) -> str:
    """The nft script that atomically creates or replaces svcrules' own tables.

    Each table's ``state`` chain carries a digest of the whole script, so that a
    later run learns what the kernel holds by reading one rule, not the tables."""
    text = render(
        "nftables/ruleset.nft.j2",
        tables=layout(plan),
        plan=plan,
        fingerprint=FINGERPRINT_PLACEHOLDER,
    )
    digest_ = hashlib.sha256(text.encode()).hexdigest()[:32]
    return text.replace(FINGERPRINT_PLACEHOLDER, digest_)


def fingerprint_of(text: str) -> str | None:
    """The fingerprint inside a rendered script or a listing of a state chain."""
    m = _FINGERPRINT.search(text)
    return m.group(1) if m else None
