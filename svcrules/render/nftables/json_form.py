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
from svcrules.render.nftables.fingerprint import table_fingerprints
from svcrules.render.nftables.layout import Table, layout, render_tables
from svcrules.render.nftables.rules import Json, NftChain, Obj, concat, prefix, verdict


def _sets(t: Table) -> list[Obj]:
    """Every set and map but state, in the template's order, from the same
    declarations and elements."""
    f, d = t.fam, t.decls
    out: list[Obj] = []
    for decl, items in t.plain_sets:
        elems: list[Json] = [prefix(c) for c in items] if decl.interval else list(items)
        out.append(decl.json(f, t.name, elems))
    keyed: list[tuple[str, list[Json]]] = [
        ("service-ips", [[concat(i, p, n), verdict(v)] for i, p, n, v in t.service_ips]),
        ("service-nodeports", [[concat(p, n), verdict(v)] for p, n, v in t.nodeports]),
        ("firewall-ips", [concat(i, p, n) for i, p, n in t.fw_frontends]),
        ("firewall-allow", [concat(i, p, n, prefix(c)) for i, p, n, c in t.fw_allow]),
    ]
    for name, (_, entries) in t.backends.items():
        keyed.append((name, [[slot, concat(ip, port)] for slot, ip, port in entries]))
    for name, slots in t.affinity_slots.items():
        keyed.append((name, [[slot, verdict(f"goto {aep}")] for slot, aep in slots]))
    keyed.append(("hairpin", [concat(ip, ip) for ip in t.hairpin]))
    keyed.append(("affinity", []))
    out.extend(d[name].json(f, t.name, elems) for name, elems in keyed)
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
    state = t.decls["state"].json(
        t.fam, t.name, [{"elem": {"val": 1, "comment": f"svcrules {fingerprint}"}}]
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
    fingerprints = table_fingerprints(render_tables(tables))
    objects: list[Json] = [{"metainfo": {"json_schema_version": 1}}]
    for t in tables:
        objects.extend(table_objects(t, fingerprints.get(t.family) or ""))
    return {"nftables": objects}


def render_json(plan: NodePlan) -> str:
    """The ruleset as libnftables JSON: stable bytes for the same plan."""
    return json.dumps(ruleset_objects(plan), indent=2, sort_keys=False) + "\n"
