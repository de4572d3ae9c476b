"""The nftables layout as libnftables JSON, in the shape ``nft -j list table`` prints.

Built from :func:`svcrules.render.nftables.layout.layout`, the same Table objects the
text template renders, so the two formats cannot disagree on a decision; only
the spelling is repeated here. The shape is nft 1.0.6's listing (``typeof``
maps print as ``"type": "integer"`` with a dotted ``"map"`` string, a lone NAT
flag prints as a string) without handles and without the nft version, so the
output does not depend on the installed nft. Three things the kernel holds but
nft 1.0.6's JSON printer leaves out are included, as later nft prints them:
table and chain comments, and the ``dynamic`` set flag.

nft 1.0.6 cannot read this JSON back (``integer`` keys, concatenated map
data), so it is proven by equivalence with the kernel's listing of the text
ruleset instead (tests/kernel/test_json_equivalence.py).
"""

from __future__ import annotations

import ipaddress
import json
from typing import TypeAlias

from svcrules.plan.node import NodePlan
from svcrules.render.nftables.layout import Chain, Table, fingerprint_of, layout, render_nft

Json: TypeAlias = bool | int | str | list["Json"] | dict[str, "Json"] | None
Obj: TypeAlias = dict[str, Json]

# Base chains: (name, hook, priority as nft lists it: dstnat = -100, srcnat = 100).
BASE_CHAINS = (
    ("nat-prerouting", "prerouting", -100),
    ("nat-output", "output", -100),
    ("nat-postrouting", "postrouting", 100),
)
STATE_COMMENT = "what svcrules last wrote: a fingerprint of the whole script"
AFFINITY_SET_SIZE = 1048576  # as the template declares it


# -- expressions ---------------------------------------------------------------


def _payload(protocol: str, field: str) -> Obj:
    return {"payload": {"protocol": protocol, "field": field}}


def _meta(key: str) -> Obj:
    return {"meta": {"key": key}}


def _match(left: Json, right: Json, op: str = "==") -> Obj:
    return {"match": {"op": op, "left": left, "right": right}}


def _concat(*items: Json) -> Obj:
    return {"concat": list(items)}


def _ref(name: str) -> str:
    return f"@{name}"


def _vmap(key: Json, name: str) -> Obj:
    return {"vmap": {"key": key, "data": _ref(name)}}


def _numgen(count: int, base: int) -> Obj:
    return {"numgen": {"mode": "random", "mod": count, "offset": base}}


def _numgen_inc(key: int) -> Obj:
    """``numgen inc mod 1 offset KEY``: always KEY (a constant inside a concatenation)."""
    return {"numgen": {"mode": "inc", "mod": 1, "offset": key}}


def _prefix(cidr: str) -> Json:
    """An interval element: a full-length prefix lists as a plain address."""
    net = ipaddress.ip_network(cidr, strict=False)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _verdict(text: str) -> Obj:
    """A verdict from the layout's nft spelling: "drop", "goto X" or "jump X"."""
    kind, _, target = text.partition(" ")
    if kind in ("goto", "jump") and target:
        return {kind: {"target": target}}
    if kind in ("drop", "accept", "return", "continue") and not target:
        return {kind: None}
    raise ValueError(f"unknown verdict {text!r}")


def _masquerade() -> Obj:
    return {"masquerade": {"flags": "fully-random"}}


# -- objects -------------------------------------------------------------------


class _Family:
    """Per-table spellings that differ between ip and ip6."""

    def __init__(self, t: Table) -> None:
        self.t = t
        self.fam = t.family
        self.addr_type = "ipv4_addr" if t.family == "ip" else "ipv6_addr"
        self.reject: Obj = {
            "reject": {"type": "icmp" if t.family == "ip" else "icmpv6", "expr": "port-unreachable"}
        }
        self.loopback: Json = _prefix("127.0.0.0/8") if t.family == "ip" else "::1"

    def saddr(self) -> Obj:
        return _payload(self.fam, "saddr")

    def daddr(self) -> Obj:
        return _payload(self.fam, "daddr")

    def frontend_key(self) -> list[Json]:
        return [self.daddr(), _meta("l4proto"), _payload("th", "dport")]


def _set(
    f: _Family,
    name: str,
    key: Json,
    comment: str,
    elems: list[Json],
    *,
    data: str | None = None,
    flags: tuple[str, ...] = (),
    size: int | None = None,
    timeout: int | None = None,
) -> Obj:
    """A named set (or map when ``data`` is given), keys in nft's listing order."""
    body: Obj = {"family": f.fam, "name": name, "table": f.t.name, "type": key, "comment": comment}
    if data is not None:
        body["map"] = data
    if size is not None:
        body["size"] = size
    if flags:
        body["flags"] = list(flags)
    if timeout is not None:
        body["timeout"] = timeout
    if elems:
        body["elem"] = elems
    return {"map" if data is not None else "set": body}


def _sets(f: _Family) -> list[Obj]:
    t, p = f.t, f.t.plan
    a = f.addr_type
    out: list[Obj] = []
    if p.pod_cidrs:
        elems: list[Json] = [_prefix(c) for c in p.pod_cidrs]
        out.append(_set(f, "pod-cidrs", a, "clusterCIDRs: pod sources", elems, flags=("interval",)))
    if p.service_cidrs:
        elems = [_prefix(c) for c in p.service_cidrs]
        out.append(
            _set(
                f,
                "service-cidrs",
                a,
                "serviceCIDRs: unallocated addresses here are dropped",
                elems,
                flags=("interval",),
            )
        )
    if p.nodeport_mode != "all":
        if p.nodeport_mode == "primary":
            cidrs = [p.node_ip] if p.node_ip else []
        else:
            cidrs = list(p.nodeport_cidrs)
        elems = [_prefix(c) for c in cidrs]
        out.append(
            _set(f, "nodeport-ips", a, "addresses that serve NodePorts", elems, flags=("interval",))
        )
    out.append(
        _set(
            f,
            "foreign-cluster-ips",
            a,
            "ClusterIPs of Services another proxy handles: left alone",
            list(p.foreign_ips),
        )
    )
    out.append(
        _set(
            f,
            "cluster-ips",
            a,
            "ClusterIPs: ports no Service defines are rejected",
            list(t.cluster_ips),
        )
    )
    out.append(
        _set(
            f,
            "service-ips",
            [a, "inet_proto", "inet_service"],
            "ClusterIP, LoadBalancer and external IP frontends",
            [[_concat(ip, proto, port), _verdict(v)] for ip, proto, port, v in t.service_ips],
            data="verdict",
        )
    )
    out.append(
        _set(
            f,
            "service-nodeports",
            ["inet_proto", "inet_service"],
            "NodePort frontends",
            [[_concat(proto, port), _verdict(v)] for proto, port, v in t.nodeports],
            data="verdict",
        )
    )
    out.append(
        _set(
            f,
            "firewall-ips",
            [a, "inet_proto", "inet_service"],
            "LoadBalancer frontends with loadBalancerSourceRanges",
            [_concat(ip, proto, port) for ip, proto, port in t.fw_frontends],
        )
    )
    out.append(
        _set(
            f,
            "firewall-allow",
            [a, "inet_proto", "inet_service", a],
            "frontend . allowed source range",
            [_concat(ip, proto, port, _prefix(cidr)) for ip, proto, port, cidr in t.fw_allow],
            flags=("interval",),
        )
    )
    # typeof numgen ... : lists as an integer key (nft 1.0.6).
    for name, (_, entries) in t.backends.items():
        out.append(
            _set(
                f,
                name,
                "integer",
                "slot : endpoint address . port",
                [[slot, _concat(ip, port)] for slot, ip, port in entries],
                data=f"{a} . inet_service",
            )
        )
    for name, slots in t.affinity_slots.items():
        out.append(
            _set(
                f,
                name,
                "integer",
                "slot : endpoint chain, for Services with ClientIP affinity",
                [[slot, _verdict(f"goto aep-{aep}")] for slot, aep in slots],
                data="verdict",
            )
        )
    out.append(
        _set(
            f,
            "hairpin",
            [a, a],
            "endpoint . itself: a pod reaching itself is masqueraded",
            [_concat(ip, ip) for ip in t.hairpin],
        )
    )
    out.append(
        _set(
            f,
            "affinity",
            [a, "integer"],
            "client . Service-endpoint id, for ClientIP affinity",
            [],
            flags=("timeout", "dynamic"),
            size=AFFINITY_SET_SIZE,
            timeout=10800,
        )
    )
    return out


def _chain(f: _Family, name: str, comment: str = "", base: tuple[str, int] | None = None) -> Obj:
    body: Obj = {"family": f.fam, "table": f.t.name, "name": name}
    if comment:
        body["comment"] = comment
    if base is not None:
        hook, prio = base
        body.update({"type": "nat", "hook": hook, "prio": prio, "policy": "accept"})
    return {"chain": body}


def _service_chain_rules(f: _Family, c: Chain) -> list[list[Json]]:
    """The rules of an svc-/ext-/clu- chain, as table.nft.j2 writes them."""
    mark_jump = _verdict("jump mark-for-masquerade")
    rules: list[list[Json]] = []
    if c.masquerade == "all":
        rules.append([mark_jump])
    elif c.masquerade == "non-pod":
        rules.append([_match(f.saddr(), _ref("pod-cidrs"), "!="), mark_jump])
    if c.pod_shortcut:
        rules.append([_match(f.saddr(), _ref("pod-cidrs")), _verdict(f"goto {c.pod_shortcut}")])
    if c.node_shortcut:
        local_source = _match({"fib": {"result": "type", "flags": ["saddr"]}}, "local")
        rules.append([local_source, mark_jump])
        rules.append([local_source, _verdict(f"goto {c.node_shortcut}")])
    s = c.selection
    if s is None:
        rules.append([_verdict("drop")])
    elif s.affinity:
        for name, key in s.affinity:
            pinned = _match(_concat(f.saddr(), _numgen_inc(key)), _ref("affinity"))
            rules.append([pinned, _verdict(f"goto aep-{name}")])
        rules.append([_vmap(_numgen(s.size, s.base), s.map)])
    else:
        dnat: Obj = {
            "dnat": {
                "family": f.fam,
                "addr": {"map": {"key": _numgen(s.size, s.base), "data": _ref(s.map)}},
            }
        }
        rules.append([_match(_meta("l4proto"), c.protocol), dnat])
    return rules


def _chains_and_rules(f: _Family) -> tuple[list[Obj], list[tuple[str, list[Json]]]]:
    """Every chain object, and every rule as (chain, expr) in listing order."""
    t, p = f.t, f.t.plan
    chains: list[Obj] = []
    rules: list[tuple[str, list[Json]]] = []
    mark = _meta("mark")

    for name, hook, prio in BASE_CHAINS:
        chains.append(_chain(f, name, base=(hook, prio)))
    rules.append(("nat-prerouting", [_verdict("jump services")]))
    rules.append(("nat-output", [_verdict("jump services")]))
    rules.append(
        (
            "nat-postrouting",
            [
                _match({"&": [mark, t.mark]}, t.mark),
                {"mangle": {"key": mark, "value": {"&": [mark, 0xFFFFFFFF - t.mark]}}},
                _masquerade(),
            ],
        )
    )
    rules.append(
        (
            "nat-postrouting",
            [
                _match({"ct": {"key": "status"}}, "dnat", "in"),
                _match(_concat(f.saddr(), f.daddr()), _ref("hairpin")),
                _masquerade(),
            ],
        )
    )

    chains.append(_chain(f, "services"))
    key = f.frontend_key()
    rules.append(
        (
            "services",
            [
                _match(_concat(*key), _ref("firewall-ips")),
                _match(_concat(*key, f.saddr()), _ref("firewall-allow"), "!="),
                _verdict("drop"),
            ],
        )
    )
    rules.append(("services", [_vmap(_concat(*key), "service-ips")]))
    local_dest = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    nodeport_vmap = _vmap(_concat(_meta("l4proto"), _payload("th", "dport")), "service-nodeports")
    if p.nodeport_mode == "all":
        where = [local_dest, _match(f.daddr(), f.loopback, "!=")]
    elif p.nodeport_mode == "cidrs":
        where = [
            local_dest,
            _match(f.daddr(), f.loopback, "!="),
            _match(f.daddr(), _ref("nodeport-ips")),
        ]
    else:
        where = [_match(f.daddr(), _ref("nodeport-ips"))]
    rules.append(("services", [*where, nodeport_vmap]))
    rules.append(("services", [_match(f.daddr(), _ref("foreign-cluster-ips")), {"return": None}]))
    rules.append(("services", [_match(f.daddr(), _ref("cluster-ips")), f.reject]))
    if p.service_cidrs:
        rules.append(("services", [_match(f.daddr(), _ref("service-cidrs")), _verdict("drop")]))

    chains.append(_chain(f, "mark-for-masquerade"))
    rules.append(
        ("mark-for-masquerade", [{"mangle": {"key": mark, "value": {"|": [mark, t.mark]}}}])
    )
    chains.append(_chain(f, "no-endpoints"))
    rules.append(("no-endpoints", [f.reject]))

    for a in t.affinity:
        name = f"aep-{a.name}"
        chains.append(_chain(f, name, a.comment))
        elem: Obj = {"elem": {"val": _concat(f.saddr(), _numgen_inc(a.key)), "timeout": a.timeout}}
        update: Obj = {"set": {"op": "update", "elem": elem, "set": _ref("affinity")}}
        rules.append((name, [update]))
        dnat: Obj = {"dnat": {"addr": a.backend.ip, "port": a.backend.port}}
        rules.append((name, [_match(_meta("l4proto"), a.protocol), dnat]))

    for c in t.chains:
        chains.append(_chain(f, c.name, c.comment))
        rules.extend((c.name, expr) for expr in _service_chain_rules(f, c))
    return chains, rules


def table_objects(t: Table, plan: NodePlan, fingerprint: str) -> list[Obj]:
    """One table in listing order: the table, its sets and maps, chains, rules."""
    f = _Family(t)
    table: Obj = {
        "family": t.family,
        "name": t.name,
        "comment": f"svcrules: Services of node {t.node_label}",
    }
    chains, rules = _chains_and_rules(f)
    state = _set(
        f,
        "state",
        "mark",
        STATE_COMMENT,
        [{"elem": {"val": 1, "comment": f"svcrules {fingerprint}"}}],
    )
    out: list[Obj] = [{"table": table}, state, *_sets(f), *chains]
    for chain, expr in rules:
        out.append({"rule": {"family": t.family, "table": t.name, "chain": chain, "expr": expr}})
    return out


def ruleset_objects(plan: NodePlan) -> Obj:
    """The whole document as Python objects (what :func:`render_json` serialises)."""
    fingerprint = fingerprint_of(render_nft(plan)) or ""
    objects: list[Json] = [{"metainfo": {"json_schema_version": 1}}]
    for t in layout(plan):
        objects.extend(table_objects(t, plan, fingerprint))
    return {"nftables": objects}


def render_json(plan: NodePlan) -> str:
    """The ruleset as libnftables JSON: stable bytes for the same plan."""
    return json.dumps(ruleset_objects(plan), indent=2, sort_keys=False) + "\n"
