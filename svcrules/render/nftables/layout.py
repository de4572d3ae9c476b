"""The nftables layout: which tables, sets, maps and chains hold the rule program.

It names and spells the program (svcrules/plan/program.py), deciding nothing a
packet experiences: chains by role become ``svc-``/``ext-``/``clu-`` chains, a pick
becomes a slot block in a bucket map, the NodePort scope becomes ``fib`` and set
matches. Every value the templates and the JSON form print is prepared here.

Layout (see docs/design.md for the measurements behind it): a handful of
named maps hold the data that grows with the cluster (frontends, backends),
and each Service port adds only one or two short chains without anonymous
sets, because the number of sets drives nft's load time, not the number of
elements. Backend choice is ``numgen random mod N offset BASE`` into one
shared ``backends-<protocol>-<bucket>`` map; each endpoint selection owns a block of slots.
Only this package (rules.py spells each rule as text and JSON side by side) and
templates/nftables/ know nft.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from svcrules.inputs.addr import collapse_cidrs, ip_sort_key
from svcrules.plan import program as prog
from svcrules.plan.node import NodePlan
from svcrules.plan.program import FamilyProgram, Program, Role, Selection, Terminal
from svcrules.render.golden import FINGERPRINT as GOLDEN_FINGERPRINT
from svcrules.render.names import chain_name, comment, digest
from svcrules.render.nftables.fingerprint import PLACEHOLDER, stamp
from svcrules.render.nftables.rules import (
    MARK_FOR_MASQUERADE,
    DaddrIn,
    DispatchFrontends,
    DispatchNodePorts,
    Dnat,
    Fam,
    FirewallDrop,
    Hook,
    MarkMasquerade,
    MasqueradeHairpin,
    MasqueradeMarked,
    NftChain,
    NodeSource,
    PickChain,
    PickDnat,
    Pinned,
    PodsGoto,
    Remember,
    Rule,
    SetMark,
    Slot,
    Verdict,
)
from svcrules.render.nftables.sets import SetDecl, affinity_map, backends_map, fixed_sets
from svcrules.render.templates import render

# Backend maps are split into buckets by slot block. The kernel walks every element of
# a map each time a new chain binds to it (nf_tables_bind_set), so one map of 100,000
# endpoints referenced from 13,000 chains cost 105 s to load; but every named map costs
# too (set names are looked up by a linear scan). Measured kernel load of the whole
# ruleset, 10k / 50k Services: 128 buckets 2.8 s / -, 256: 2.9 s / 22.6 s,
# 512: 3.0 s / 19.3 s, 1024: 3.4 s / 22.0 s, 4096: - / 32.0 s.
BUCKETS = 512
SLOT_BITS = 12  # endpoints per slot block; larger selections take several blocks
BLOCK_BITS = 19  # slots stay below 2**31: nft -j prints offsets as signed 32-bit
# The maps picks draw from (slot -> endpoint). Any order of a selection's endpoints in
# its slots picks the same way, which lets the reconciler keep an endpoint that stays
# at its slot (svcrules/kernel/nft/slots.py); the compiled order stays canonical.
BACKENDS_MAP, AFFINITY_MAP = "backends-", "affinity-endpoints-"
PICK_MAPS = (BACKENDS_MAP, AFFINITY_MAP)
# Maglev's maps: which slot holds which endpoint is the decision itself (the same flow
# must find the same endpoint on every node), so these are never permuted.
MAGLEV_MAP, MAGLEV_AFFINITY_MAP = "maglev-", "maglev-affinity-"
CHAIN_PREFIX = {Role.SERVICE: "svc", Role.EXTERNAL: "ext", Role.CLUSTER_SHORTCUT: "clu"}
TERMINAL_VERDICT = {Terminal.REJECT: "goto no-endpoints", Terminal.DROP: "drop"}


@dataclass
class Table:
    """One family's table, every value prepared: the template and the JSON form
    only spell it."""

    family: str  # "ip" or "ip6"
    name: str
    fam: Fam
    node_label: str  # the node's name, cleaned and short enough for a comment
    decls: dict[str, SetDecl] = field(default_factory=dict)  # every set and map, by name
    # The sets of plain addresses or CIDRs, as (declaration, elements): those of
    # pod-cidrs, service-cidrs and nodeport-ips that exist, foreign-cluster-ips and
    # cluster-ips
    plain_sets: list[tuple[SetDecl, tuple[str, ...]]] = field(default_factory=list)
    service_ips: list[tuple[str, str, int, str]] = field(default_factory=list)
    nodeports: list[tuple[str, int, str]] = field(default_factory=list)
    fw_frontends: list[tuple[str, str, int]] = field(default_factory=list)
    fw_allow: list[tuple[str, str, int, str]] = field(default_factory=list)
    # map name -> (protocol, [(slot, endpoint)]). Maps are per protocol: nft 1.0.6
    # refuses an incremental "meta l4proto udp dnat ... map @m" when m's data is
    # typed "th dport"; and per bucket (see BUCKETS).
    backends: dict[str, tuple[str, list[tuple[int, str, int]]]] = field(default_factory=dict)
    # map name -> [(slot, endpoint chain)]
    affinity_slots: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    hairpin: tuple[str, ...] = ()
    chains: list[NftChain] = field(default_factory=list)  # in listing order
    # The golden form only (layout_family(owners=True)): set or map name -> the Service
    # (port) each element belongs to, in the order of its elements above. The elements
    # are then printed grouped under a comment line naming it (see _grouped).
    owners: dict[str, list[str]] | None = None

    # Elements spelled as the template prints them, one string each: the template joins
    # them (printing field by field made it yield several pieces per element, most of
    # the time of rendering a large ruleset).

    @property
    def service_ip_elements(self) -> list[str]:
        return self._grouped(
            "service-ips",
            [
                f"{ip} . {proto} . {port} : {verdict}"
                for ip, proto, port, verdict in self.service_ips
            ],
        )

    @property
    def nodeport_elements(self) -> list[str]:
        return self._grouped(
            "service-nodeports",
            [f"{proto} . {port} : {verdict}" for proto, port, verdict in self.nodeports],
        )

    @property
    def firewall_elements(self) -> list[str]:
        return self._grouped(
            "firewall-ips", [f"{ip} . {proto} . {port}" for ip, proto, port in self.fw_frontends]
        )

    @property
    def allow_elements(self) -> list[str]:
        return self._grouped(
            "firewall-allow",
            [f"{ip} . {proto} . {port} . {cidr}" for ip, proto, port, cidr in self.fw_allow],
        )

    @property
    def backend_elements(self) -> list[tuple[str, list[str]]]:
        return [
            (name, self._grouped(name, [f"{slot} : {ip} . {port}" for slot, ip, port in entries]))
            for name, (_, entries) in self.backends.items()
        ]

    @property
    def affinity_elements(self) -> list[tuple[str, list[str]]]:
        return [
            (name, self._grouped(name, [f"{slot} : goto {aep}" for slot, aep in entries]))
            for name, entries in self.affinity_slots.items()
        ]

    @property
    def hairpin_elements(self) -> list[str]:
        return self._grouped("hairpin", [f"{ip} . {ip}" for ip in self.hairpin])

    @property
    def plain_set_elements(self) -> list[tuple[SetDecl, list[str]]]:
        return [(d, self._grouped(d.name, list(items))) for d, items in self.plain_sets]

    def _grouped(self, name: str, items: list[str]) -> list[str]:
        """``items`` as printed: in the golden form, grouped by owner (owners in sorted
        order, each group's elements in their own order) with a comment line before each
        group, carried by the group's first element so that the template's join leaves
        the comment without a comma. nft reads comments inside an element block."""
        labels = self.owners.get(name) if self.owners is not None else None
        if labels is None:
            return items
        out: list[str] = []
        last = None
        for i in sorted(range(len(items)), key=lambda i: labels[i]):
            if labels[i] != last:
                last = labels[i]
                out.append(f"# {last}\n\t\t\t{items[i]}")
            else:
                out.append(items[i])
        return out

    @property
    def chain_text(self) -> list[tuple[str, str]]:
        """(name, body) of every chain, the body's lines already spelled."""
        f = self.fam
        return [(c.name, c.body(f)) for c in self.chains]


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


class _Names:
    """Each chain's name, computed once: dispatch entries and shortcuts name them too."""

    def __init__(self, fp: FamilyProgram) -> None:
        self.names = {c.id: chain_name(CHAIN_PREFIX[c.id.role], c.id.key) for c in fp.chains}

    def __getitem__(self, cid: prog.ChainId) -> str:
        return self.names[cid]

    def verdict(self, target: prog.Target) -> str:
        if isinstance(target, Terminal):
            return TERMINAL_VERDICT[target]
        return f"goto {self.names[target]}"


def _plain_sets(
    fp: FamilyProgram, decls: dict[str, SetDecl]
) -> list[tuple[SetDecl, tuple[str, ...]]]:
    elements: list[tuple[str, tuple[str, ...] | None]] = [
        ("pod-cidrs", fp.pod_cidrs or None),  # no clusterCIDRs: no set, nothing refers to it
        ("service-cidrs", fp.service_cidrs or None),
        ("nodeport-ips", fp.nodeport_scope.within),
        ("foreign-cluster-ips", fp.foreign_ips),
        ("cluster-ips", fp.cluster_ips),
    ]
    return [(decls[name], elems) for name, elems in elements if elems is not None]


def _fixed_chains(fp: FamilyProgram) -> list[NftChain]:
    """The base chains, the dispatcher and the shared helpers."""
    scope = fp.nodeport_scope
    services: list[Rule] = [
        FirewallDrop(),
        DispatchFrontends(),
        DispatchNodePorts(scope.local, scope.except_loopback, scope.within is not None),
        DaddrIn("foreign-cluster-ips", "return"),
        DaddrIn("cluster-ips", "reject"),
    ]
    if fp.service_cidrs:
        services.append(DaddrIn("service-cidrs", "drop"))
    jump = (Verdict("jump services"),)
    mark = fp.masquerade_mark
    return [
        NftChain("nat-prerouting", "", Hook("prerouting", "dstnat", -100), jump),
        NftChain("nat-output", "", Hook("output", "-100", -100), jump),
        NftChain(
            "nat-postrouting",
            "",
            Hook("postrouting", "srcnat", 100),
            (MasqueradeMarked(mark), MasqueradeHairpin()),
        ),
        NftChain("services", "", None, tuple(services)),
        NftChain(MARK_FOR_MASQUERADE, "", None, (SetMark(mark),)),
        NftChain("no-endpoints", "", None, (Verdict("reject"),)),
    ]


class _Picks:
    """Slots for every selection, and the maps and endpoint chains of those picked."""

    def __init__(self, table: Table, fp: FamilyProgram) -> None:
        self.table = table
        # The golden form: the selection whose endpoint each slot holds.
        self.slot_owners: dict[int, str] | None = None
        self.bases = _allocate(
            [(s.key, len(s.slots)) for s in fp.selections], SLOT_BITS, 1 << BLOCK_BITS
        )
        self.affinity_ids = _allocate(
            [(f"{key}|{ip}|{port}", 1) for key, ip, port in fp.affinity_pairs], 0, 1 << 31
        )
        self.made: dict[str, tuple[Rule, ...]] = {}
        self.endpoint_chains: dict[str, NftChain] = {}

    def rules(self, sel: Selection) -> tuple[Rule, ...]:
        rules = self.made.get(sel.key)
        if rules is None:
            rules = self.made[sel.key] = self._spell(sel)
        return rules

    def _spell(self, sel: Selection) -> tuple[Rule, ...]:
        base = self.bases[sel.key]
        bucket = (base >> SLOT_BITS) % BUCKETS
        size = len(sel.slots)
        if self.slot_owners is not None:
            label = _label(sel.port_key)
            if sel.key.endswith("#local"):
                label += " (local endpoints)"
            self.slot_owners.update(dict.fromkeys(range(base, base + size), label))
        hashed = sel.hash is not None
        slot = Slot(size, base, sel.hash or "", sel.protocol, sel.seed)
        if sel.affinity is None:
            prefix = MAGLEV_MAP if hashed else BACKENDS_MAP
            name = f"{prefix}{sel.protocol}-{bucket:04d}"
            entries = self.table.backends.setdefault(name, (sel.protocol, []))[1]
            eps = sel.endpoints
            entries.extend((base + j, eps[i].ip, eps[i].port) for j, i in enumerate(sel.slots))
            return (PickDnat(sel.protocol, slot, name),)
        name = f"{MAGLEV_AFFINITY_MAP if hashed else AFFINITY_MAP}{bucket:04d}"
        slots = self.table.affinity_slots.setdefault(name, [])
        rules: list[Rule] = []
        aeps: list[str] = []
        for b in sel.endpoints:
            aep = "aep-" + digest(sel.port_key, b.ip, str(b.port))
            key = self.affinity_ids[f"{sel.port_key}|{b.ip}|{b.port}"]
            rules.append(Pinned(key, aep))
            aeps.append(aep)
            if aep not in self.endpoint_chains:
                self.endpoint_chains[aep] = NftChain(
                    aep,
                    comment(f"{sel.port_key} {b.ip} {b.port}"),
                    None,
                    (Remember(key, sel.affinity), Dnat(sel.protocol, b.ip, b.port)),
                )
        slots.extend((base + j, aeps[i]) for j, i in enumerate(sel.slots))
        rules.append(PickChain(slot, name))
        return tuple(rules)


def _chain(c: prog.Chain, picks: _Picks, names: _Names) -> NftChain:
    rules: list[Rule] = []
    for step in c.steps:
        if isinstance(step, prog.Pick):
            rules.extend(picks.rules(step.selection))
        elif isinstance(step, prog.MarkMasquerade):
            rules.append(MarkMasquerade(step.sources is prog.Sources.NON_POD))
        elif isinstance(step, prog.Shortcut):
            goto = f"goto {names[step.target]}"
            if step.sources is prog.Sources.PODS:
                rules.append(PodsGoto(goto))
            else:
                if step.masquerade:
                    rules.append(NodeSource(f"jump {MARK_FOR_MASQUERADE}"))
                rules.append(NodeSource(goto))
        else:
            rules.append(Verdict("drop"))
    return NftChain(names[c.id], comment(c.id.key), None, tuple(rules))


def _label(key: str) -> str:
    """An owner as the golden form's comment lines name it: nothing a user writes
    reaches the text unfiltered (the keys are validated names anyway)."""
    return comment(key, 512)


def _owners(table: Table, fp: FamilyProgram, slots: dict[int, str]) -> dict[str, list[str]]:
    """Set or map name -> the owner of each element, in the table's element order: the
    Service port of a frontend or endpoint slot; the Service of a ClusterIP; for the
    hairpin set, the first Service (by name) with that endpoint on this node."""
    frontends = {(f.address, f.protocol, f.port): f.key for f in fp.dispatch}
    services: dict[str, str] = {}
    for f in sorted(fp.dispatch, key=lambda f: f.kind is not prog.FrontendKind.CLUSTER_IP):
        services.setdefault(f.address, f.key.split(":", 1)[0])
    hairpin: dict[str, str] = {}
    for sel in sorted(fp.selections, key=lambda s: s.key):
        for b, may in zip(sel.endpoints, sel.hairpin, strict=True):
            if may:
                hairpin.setdefault(b.ip, sel.port_key.split(":", 1)[0])
    out = {
        "service-ips": [_label(frontends[(ip, p, n)]) for ip, p, n, _ in table.service_ips],
        "service-nodeports": [_label(f.key) for f in fp.nodeports],
        "firewall-ips": [_label(w.key) for w in fp.firewalls],
        "firewall-allow": [_label(frontends[(ip, p, n)]) for ip, p, n, _ in table.fw_allow],
        "cluster-ips": [_label(services.get(ip, "")) for ip in fp.cluster_ips],
        "hairpin": [_label(hairpin.get(ip, "")) for ip in table.hairpin],
    }
    for name, (_, entries) in table.backends.items():
        out[name] = [slots[slot] for slot, _, _ in entries]
    for name, aeps in table.affinity_slots.items():
        out[name] = [slots[slot] for slot, _ in aeps]
    return out


def layout_family(fp: FamilyProgram, node_name: str, owners: bool = False) -> Table:
    """Name and spell one family's program as nft objects; with ``owners``, for the
    golden form, also whose each element of the shared sets and maps is."""
    fam = Fam.of(fp.family)
    table = Table(
        family=fam.name,
        name=fp.table,
        fam=fam,
        node_label=comment(node_name, 90),
        decls=fixed_sets(fam),
        hairpin=fp.hairpin,
    )
    picks = _Picks(table, fp)
    if owners:
        picks.slot_owners = {}
    names = _Names(fp)
    chains = sorted((_chain(c, picks, names) for c in fp.chains), key=lambda c: c.name)
    aeps = sorted(picks.endpoint_chains.values(), key=lambda c: c.name)
    table.chains = [*_fixed_chains(fp), *aeps, *chains]
    table.service_ips = [
        (f.address, f.protocol, f.port, names.verdict(f.target)) for f in fp.dispatch
    ]
    table.nodeports = [(f.protocol, f.port, names.verdict(f.target)) for f in fp.nodeports]
    table.fw_frontends = [(w.address, w.protocol, w.port) for w in fp.firewalls]
    allow = set()
    for w in fp.firewalls:
        # Interval sets refuse overlapping elements: merge them.
        for cidr in collapse_cidrs(w.allowed):
            allow.add((w.address, w.protocol, w.port, cidr))
    table.fw_allow = sorted(allow, key=lambda e: (ip_sort_key(e[0]), e[1], e[2], ip_sort_key(e[3])))
    table.plain_sets = _plain_sets(fp, table.decls)
    table.backends = {k: (v[0], sorted(v[1])) for k, v in sorted(table.backends.items())}
    table.affinity_slots = {k: sorted(v) for k, v in sorted(table.affinity_slots.items())}
    for name, (protocol, _) in table.backends.items():
        table.decls[name] = backends_map(fam, name, protocol, name.startswith(MAGLEV_MAP))
    for name in table.affinity_slots:
        table.decls[name] = affinity_map(name, name.startswith(MAGLEV_AFFINITY_MAP))
    if picks.slot_owners is not None:
        table.owners = _owners(table, fp, picks.slot_owners)
    return table


def layout_program(program: Program, owners: bool = False) -> list[Table]:
    return [layout_family(f, program.node_name, owners) for f in program.families]


def layout(plan: NodePlan, owners: bool = False) -> list[Table]:
    return layout_program(prog.program(plan), owners)


def render_nft(plan: NodePlan) -> str:
    """The nft script that atomically creates or replaces svcrules' own tables; each
    table's ``state`` set carries a digest of that table's text (fingerprint.py)."""
    return render_tables(layout(plan))


def render_tables(tables: list[Table]) -> str:
    return stamp(render("nftables/ruleset.nft.j2", tables=tables, fingerprint=PLACEHOLDER))


def render_nft_golden(plan: NodePlan) -> str:
    """The golden form of the nft script (``svcrules check --golden``): the same tables
    and elements, with each element of the shared sets and maps grouped under a comment
    line naming its Service port, and the fingerprints (which change with any change)
    left as ``<fingerprint>``. It still loads with ``nft -f``; only the order of
    elements inside a set or map differs from the compiled script, which nft does not
    keep anyway."""
    tables = layout(plan, owners=True)
    return render("nftables/ruleset.nft.j2", tables=tables, fingerprint=GOLDEN_FINGERPRINT)
