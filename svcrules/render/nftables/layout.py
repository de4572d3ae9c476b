"""The nftables layout: which tables, sets, maps and chains hold the node plan.

Layout (see docs/design.md for the measurements behind it): a handful of
named maps hold the data that grows with the cluster (frontends, backends),
and each Service port adds only one or two short chains without anonymous
sets, because the number of sets drives nft's load time, not the number of
elements. Backend choice is ``numgen random mod N offset BASE`` into one
shared ``backends-<protocol>-<bucket>`` map; each endpoint selection owns a block of slots.
Only this module and templates/nftables/ know nft.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from svcrules.inputs.addr import collapse_cidrs, ip_sort_key, packed
from svcrules.plan.node import Backend, FamilyPlan, Masquerade, NodePlan, PortPlan, Route
from svcrules.render.names import chain_name, comment, digest
from svcrules.render.templates import render_fingerprinted

PROTOCOLS = ("tcp", "udp", "sctp")
# Backend maps are split into buckets by slot block. The kernel walks every element of
# a map each time a new chain binds to it (nf_tables_bind_set), so one map of 100,000
# endpoints referenced from 13,000 chains cost 105 s to load; but every named map costs
# too (set names are looked up by a linear scan). Measured kernel load of the whole
# ruleset, 10k / 50k Services: 128 buckets 2.8 s / -, 256: 2.9 s / 22.6 s,
# 512: 3.0 s / 19.3 s, 1024: 3.4 s / 22.0 s, 4096: - / 32.0 s.
BUCKETS = 512
SLOT_BITS = 12  # endpoints per slot block; larger selections take several blocks
BLOCK_BITS = 19  # slots stay below 2**31: nft -j prints offsets as signed 32-bit


class Selection(NamedTuple):
    """How a chain picks a backend: one dnat through the backends map, or, with
    session affinity, a check of each backend's affinity set first."""

    size: int  # endpoints to choose from (numgen mod)
    base: int
    backends: tuple[Backend, ...]
    affinity: tuple[tuple[str, int], ...]  # per backend: "aep" chain suffix, affinity id
    map: str  # the backends (or affinity-endpoints) map holding this selection's slots


class Chain(NamedTuple):
    name: str
    comment: str
    protocol: str  # tcp / udp / sctp: dnat needs the match
    masquerade: str  # "all", "non-pod", "node" or "none"
    pod_shortcut: str  # chain to goto for pod sources (eTP Local), or ""
    node_shortcut: str  # chain to goto for node sources (eTP Local), or ""
    selection: Selection | None  # None: drop


class AffinityEndpoint(NamedTuple):
    name: str  # suffix of the aep- chain
    key: int  # this (Service port, endpoint)'s id in the shared affinity set
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
    node_label: str  # the node's name, cleaned and short enough for a comment
    chains: list[Chain] = field(default_factory=list)
    affinity: list[AffinityEndpoint] = field(default_factory=list)
    service_ips: list[tuple[str, str, int, str]] = field(default_factory=list)
    nodeports: list[tuple[str, int, str]] = field(default_factory=list)
    cluster_ips: list[str] = field(default_factory=list)
    fw_frontends: list[tuple[str, str, int]] = field(default_factory=list)
    fw_allow: list[tuple[str, str, int, str]] = field(default_factory=list)
    # map name -> (protocol, [(slot, endpoint)]). Maps are per protocol: nft 1.0.6
    # refuses an incremental "meta l4proto udp dnat ... map @m" when m's data is
    # typed "th dport"; and per bucket (see BUCKETS).
    backends: dict[str, tuple[str, list[tuple[int, str, int]]]] = field(default_factory=dict)
    # map name -> [(slot, aep name)]
    affinity_slots: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    hairpin: list[str] = field(default_factory=list)


def _allocate(requests: list[tuple[str, int]], block_bits: int, nblocks: int) -> dict[str, int]:
    """Give each request a run of blocks at a spot derived from its key, so that it
    does not move when others come and go (only on a rare digest collision, resolved
    by probing in key order)."""
    used: set[int] = set()
    out: dict[str, int] = {}
    for key, size in sorted(requests):
        need = max(1, -(-size // (1 << block_bits)))
        start = int(digest(key, length=8), 16) % nblocks
        for probe in range(nblocks):
            first = (start + probe) % nblocks
            span = range(first, first + need)
            if first + need <= nblocks and not used.intersection(span):
                used.update(span)
                out[key] = first << block_bits
                break
        else:  # pragma: no cover - the spaces are far larger than any real input
            raise RuntimeError("slot space exhausted")
    return out


def _proto(p: PortPlan) -> str:
    return p.protocol.lower()


def layout_family(plan: FamilyPlan, node_name: str) -> Table:
    """Decide every nft object of one family's table."""
    table = Table(
        family="ip" if plan.family == 4 else "ip6",
        name=plan.table,
        plan=plan,
        mark=plan.masquerade_mark,
        node_label=comment(node_name, 90),
    )
    requests: list[tuple[str, int]] = []
    for p in plan.ports:
        if p.uses_cluster_backends():
            requests.append((f"{p.key}#cluster", len(p.cluster_backends)))
        if Route.LOCAL in (p.internal_route, p.external_route):
            requests.append((f"{p.key}#local", len(p.local_backends)))
    bases = _allocate(requests, SLOT_BITS, 1 << BLOCK_BITS)
    affinity_ids = _allocate(
        [
            (f"{p.key}|{b.ip}|{b.port}", 1)
            for p in plan.ports
            if p.affinity_timeout is not None
            for b in {*p.cluster_backends, *p.local_backends}
        ],
        0,
        1 << 31,
    )
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
        bucket = (base >> SLOT_BITS) % BUCKETS
        if p.affinity_timeout is None:
            map_name = f"backends-{_proto(p)}-{bucket:04d}"
            entries = table.backends.setdefault(map_name, (_proto(p), []))[1]
        else:
            map_name = f"affinity-endpoints-{bucket:04d}"
            slots = table.affinity_slots.setdefault(map_name, [])
        names: list[tuple[str, int]] = []
        for i, b in enumerate(backends):
            # A pod's traffic to its own Service passes its own node's rules only, so
            # only this node's endpoints (or those of unknown node) can hairpin here.
            if b.node in ("", node_name):
                hairpin.add(b.ip)
            if p.affinity_timeout is None:
                entries.append((base + i, b.ip, b.port))
                continue
            name = digest(p.key, b.ip, str(b.port))
            key = affinity_ids[f"{p.key}|{b.ip}|{b.port}"]
            names.append((name, key))
            slots.append((base + i, name))
            if name not in aff_done:
                aff_done.add(name)
                table.affinity.append(
                    AffinityEndpoint(
                        name,
                        key,
                        comment(f"{p.key} {b.ip} {b.port}"),
                        _proto(p),
                        b,
                        p.affinity_timeout,
                    )
                )
        return Selection(len(backends), base, backends, tuple(names), map_name)

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
            # Interval sets refuse overlapping elements: merge them.
            allowed = collapse_cidrs(p.allowed_sources)
            for ip in p.lb_ips:
                table.fw_frontends.append((ip, proto, p.port))
                for cidr in allowed:
                    table.fw_allow.append((ip, proto, p.port, cidr))

    table.chains.sort(key=lambda c: c.name)
    table.affinity.sort(key=lambda a: a.name)
    # A Service may list its own ClusterIP among its externalIPs (the API allows it):
    # the ClusterIP entry, added first, wins; nft refuses a key twice.
    seen: set[tuple[str, str, int]] = set()
    unique = []
    for entry in table.service_ips:
        if entry[:3] not in seen:
            seen.add(entry[:3])
            unique.append(entry)
    table.service_ips = unique
    table.service_ips.sort(key=lambda e: (ip_sort_key(e[0]), e[1], e[2]))
    table.nodeports.sort()
    table.cluster_ips = sorted(set(table.cluster_ips), key=ip_sort_key)
    table.fw_frontends.sort(key=lambda e: (ip_sort_key(e[0]), e[1], e[2]))
    table.fw_allow = sorted(
        set(table.fw_allow), key=lambda e: (ip_sort_key(e[0]), e[1], e[2], ip_sort_key(e[3]))
    )
    table.backends = {k: (v[0], sorted(v[1])) for k, v in sorted(table.backends.items())}
    table.affinity_slots = {k: sorted(v) for k, v in sorted(table.affinity_slots.items())}
    table.hairpin = sorted(hairpin, key=packed)  # one family per table
    return table


def layout(plan: NodePlan) -> list[Table]:
    return [layout_family(f, plan.node_name) for f in plan.families]


_FINGERPRINT = re.compile(r'comment "svcrules ([0-9a-f]{32})"')


def render_nft(plan: NodePlan) -> str:
    """The nft script that atomically creates or replaces svcrules' own tables.

    Each table's ``state`` set carries a digest of the whole script (as an element
    comment), so that a later run learns what the kernel holds by listing one tiny set:
    in nft 1.0.6 listing a set is fast, while listing a chain fetches the whole table."""
    return render_fingerprinted("nftables/ruleset.nft.j2", tables=layout(plan), plan=plan)


def fingerprint_of(text: str) -> str | None:
    """The fingerprint inside a rendered script or a listing of the state set."""
    m = _FINGERPRINT.search(text)
    return m.group(1) if m else None
