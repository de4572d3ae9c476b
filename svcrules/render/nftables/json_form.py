"""The nftables layout as libnftables JSON, in the shape ``nft -j list table`` prints.

Built from :func:`svcrules.render.nftables.layout.layout`, the same prepared Table
the text template renders; every rule is spelled in both forms side by side
(rules.py), so the two formats cannot disagree on a decision. The shape is nft
1.0.6's listing (``typeof`` maps print as ``"type": "integer"`` with a dotted
``"map"`` string, a lone NAT flag prints as a string) without handles and without
the nft version, so the output does not depend on the installed nft. Three things
the kernel holds but nft 1.0.6's JSON printer leaves out are included, as later nft
prints them: table and chain comments, and the ``dynamic`` set flag.

nft 1.0.6 cannot read this JSON back (``integer`` keys, concatenated map
data), so it is proven by equivalence with the kernel's listing of the text
ruleset instead (tests/kernel/test_json_equivalence.py).
"""

from __future__ import annotations

import json

from svcrules.plan.node import NodePlan
from svcrules.render.nftables.layout import Table, fingerprint_of, layout, render_tables
from svcrules.render.nftables.rules import Json, NftChain, Obj, concat, prefix, verdict

STATE_COMMENT = "what svcrules last wrote: a fingerprint of the whole script"
AFFINITY_SET_SIZE = 1048576  # as the template declares it


def _set(
    t: Table,
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
    body: Obj = {"family": t.family, "name": name, "table": t.name, "type": key, "comment": comment}
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


def _sets(t: Table) -> list[Obj]:
    a = t.fam.addr_type
    out: list[Obj] = []
    for name, comment, cidrs in t.interval_sets:
        elems: list[Json] = [prefix(c) for c in cidrs]
        out.append(_set(t, name, a, comment, elems, flags=("interval",)))
    out.append(
        _set(
            t,
            "foreign-cluster-ips",
            a,
            "ClusterIPs of Services another proxy handles: left alone",
            list(t.foreign_ips),
        )
    )
    out.append(
        _set(
            t,
            "cluster-ips",
            a,
            "ClusterIPs: ports no Service defines are rejected",
            list(t.cluster_ips),
        )
    )
    out.append(
        _set(
            t,
            "service-ips",
            [a, "inet_proto", "inet_service"],
            "ClusterIP, LoadBalancer and external IP frontends",
            [[concat(ip, proto, port), verdict(v)] for ip, proto, port, v in t.service_ips],
            data="verdict",
        )
    )
    out.append(
        _set(
            t,
            "service-nodeports",
            ["inet_proto", "inet_service"],
            "NodePort frontends",
            [[concat(proto, port), verdict(v)] for proto, port, v in t.nodeports],
            data="verdict",
        )
    )
    out.append(
        _set(
            t,
            "firewall-ips",
            [a, "inet_proto", "inet_service"],
            "LoadBalancer frontends with loadBalancerSourceRanges",
            [concat(ip, proto, port) for ip, proto, port in t.fw_frontends],
        )
    )
    out.append(
        _set(
            t,
            "firewall-allow",
            [a, "inet_proto", "inet_service", a],
            "frontend . allowed source range",
            [concat(ip, proto, port, prefix(cidr)) for ip, proto, port, cidr in t.fw_allow],
            flags=("interval",),
        )
    )
    # typeof numgen ... : lists as an integer key (nft 1.0.6).
    for name, (_, entries) in t.backends.items():
        out.append(
            _set(
                t,
                name,
                "integer",
                "slot : endpoint address . port",
                [[slot, concat(ip, port)] for slot, ip, port in entries],
                data=f"{a} . inet_service",
            )
        )
    for name, slots in t.affinity_slots.items():
        out.append(
            _set(
                t,
                name,
                "integer",
                "slot : endpoint chain, for Services with ClientIP affinity",
                [[slot, verdict(f"goto {aep}")] for slot, aep in slots],
                data="verdict",
            )
        )
    out.append(
        _set(
            t,
            "hairpin",
            [a, a],
            "endpoint . itself: a pod reaching itself is masqueraded",
            [concat(ip, ip) for ip in t.hairpin],
        )
    )
    out.append(
        _set(
            t,
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


def _chain(t: Table, c: NftChain) -> Obj:
    body: Obj = {"family": t.family, "table": t.name, "name": c.name}
    if c.comment:
        body["comment"] = c.comment
    if c.hook is not None:
        body.update({"type": "nat", "hook": c.hook.hook, "prio": c.hook.prio, "policy": "accept"})
    return {"chain": body}


def table_objects(t: Table, fingerprint: str) -> list[Obj]:
    """One table in listing order: the table, its sets and maps, chains, rules."""
    table: Obj = {
        "family": t.family,
        "name": t.name,
        "comment": f"svcrules: Services of node {t.node_label}",
    }
    state = _set(
        t,
        "state",
        "mark",
        STATE_COMMENT,
        [{"elem": {"val": 1, "comment": f"svcrules {fingerprint}"}}],
    )
    out: list[Obj] = [{"table": table}, state, *_sets(t)]
    out.extend(_chain(t, c) for c in t.chains)
    f = t.fam
    for c in t.chains:
        for r in c.rules:
            rule: Obj = {"family": t.family, "table": t.name, "chain": c.name, "expr": r.json(f)}
            out.append({"rule": rule})
    return out


def ruleset_objects(plan: NodePlan) -> Obj:
    """The whole document as Python objects (what :func:`render_json` serialises)."""
    tables = layout(plan)
    fingerprint = fingerprint_of(render_tables(tables)) or ""
    objects: list[Json] = [{"metainfo": {"json_schema_version": 1}}]
    for t in tables:
        objects.extend(table_objects(t, fingerprint))
    return {"nftables": objects}


def render_json(plan: NodePlan) -> str:
    """The ruleset as libnftables JSON: stable bytes for the same plan."""
    return json.dumps(ruleset_objects(plan), indent=2, sort_keys=False) + "\n"
