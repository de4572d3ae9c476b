"""The iptables layout: which chains in the ``nat`` and ``filter`` tables hold the program.

The shape is kube-proxy's iptables mode, spelling the same rule program as the
nftables backend (see docs/backends.md):

- nat: ``<P>-SERVICES`` (jumped to from PREROUTING and OUTPUT) sends each frontend
  to a per-Service chain; ``-SVC-`` (ClusterIP), ``-EXT-`` (external frontends) and
  ``-CLU-`` (eTP Local's short-circuit) pick an endpoint with a cascade of
  ``statistic`` matches, ``recent`` lists remember ClientIP affinity, and one
  ``-SEP-`` chain per endpoint DNATs. Masquerading is a mark that
  ``<P>-POSTROUTING`` turns into MASQUERADE.
- filter: iptables refuses DROP and REJECT in nat, so what is refused or dropped is
  left untranslated in nat and caught by its unchanged destination in
  ``<P>-SERVICES`` of the filter table (jumped to from INPUT, FORWARD and OUTPUT
  for new connections). Source ranges match the original destination through
  conntrack, so they hold whether or not nat translated the packet.

``<P>`` is the owned table name in capitals: every chain svcrules owns starts with
``<P>-``, and nothing else is ever touched but the jumps in the built-in chains.
It names and spells the rule program (svcrules/plan/program.py), deciding nothing a
packet experiences; every rule is prepared here as text after ``-A <chain>``, and
templates/iptables/ only lays them out. Only these two know iptables syntax.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cache
from typing import NamedTuple

from svcrules.errors import InputError, Problem, SvcrulesError
from svcrules.inputs.addr import ip_in_cidr
from svcrules.inputs.owned import RESERVED, reserved_message
from svcrules.plan.node import Algorithm, Backend, NodePlan
from svcrules.plan.program import Chain as ProgramChain
from svcrules.plan.program import (
    ChainId,
    FamilyProgram,
    MarkMasquerade,
    NodePortScope,
    Role,
    Selection,
    Shortcut,
    Sources,
    Target,
    Terminal,
    program,
)
from svcrules.plan.program import Pick as ProgramPick
from svcrules.render.golden import FINGERPRINT as GOLDEN_FINGERPRINT
from svcrules.render.names import comment, digest32
from svcrules.render.templates import render

CHAIN_MAX = 28  # iptables chain names: 28 characters (XT_EXTENSION_MAXNAMELEN - 1)
DIGEST = 10  # base32 characters (50 bits) in per-Service and per-endpoint chain names
PREFIX_MAX = CHAIN_MAX - len("-SEP-") - DIGEST


# A rule after "-A <chain> ": (matches, each followed by a space, or ""; "-j " or
# "-g "; target). Kept in parts, not joined: at 10,000 Services there are hundreds of
# thousands, and the parts are shared strings (chain names, probabilities).
Rule = tuple[str, str, str]


class Endpoint(NamedTuple):
    """One ``-SEP-`` chain: a Service port's endpoint (hairpin mark, affinity, DNAT)."""

    chain: str
    rules: tuple[Rule, ...]  # before the DNAT: hairpin mark, remember the client
    protocol: str
    comment: str
    destination: str  # address:port as --to-destination spells it


class Chain(NamedTuple):
    name: str
    rules: tuple[Rule, ...]


class Frontend(NamedTuple):
    ip: str  # "" for NodePorts
    protocol: str
    port: int
    comment: str
    nat: str  # "-g <chain>", or "-j ACCEPT": leave untranslated, and no other nat rule
    filter: str  # "", or REJECT / DROP for what nat left untranslated


class Firewall(NamedTuple):
    ip: str
    protocol: str
    port: int
    chain: str
    comment: str
    allowed: tuple[str, ...]


@dataclass
class FamilyRules:
    """One family's chains (one ``iptables-restore`` input), every value prepared:
    the template only lays them out."""

    family: int
    name: str  # "ipv4" / "ipv6"
    restore: str  # the command that loads it
    prefix: str
    mark: str  # the masquerade mark, spelled
    host: str  # "/32" or "/128"
    foreign_ips: tuple[str, ...]
    service_cidrs: tuple[str, ...]
    # What follows "-A <P>-SERVICES" in each jump to <P>-NODEPORTS (nat and filter),
    # and the destinations <P>-NODEPORTS returns early (loopback).
    nodeport_jumps: list[str] = field(default_factory=list)
    nodeport_skips: list[str] = field(default_factory=list)
    masq_non_pod: list[str] = field(default_factory=list)  # rules of <P>-MASQ-NON-POD
    unallocated: list[str] = field(default_factory=list)  # the end of <P>-CLUSTER-IPS
    frontends: list[Frontend] = field(default_factory=list)
    nodeports: list[Frontend] = field(default_factory=list)
    # What nat leaves untranslated, refused again in filter by its destination
    refused: list[Frontend] = field(default_factory=list)
    refused_nodeports: list[Frontend] = field(default_factory=list)
    firewalls: list[Firewall] = field(default_factory=list)
    chains: list[Chain] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)
    cluster_ips: list[str] = field(default_factory=list)  # outside every serviceCIDR
    cidr_cluster_ips: list[str] = field(default_factory=list)  # inside one
    # The golden form only (layout_family(owners=True)): chain -> the Service port it
    # belongs to. Its declarations are then grouped by owner, and each chain's rules
    # printed as a block, under a comment line naming the owner and ended by a blank
    # line (iptables-restore skips both).
    owners: dict[str, str] | None = None

    def chain(self, kind: str) -> str:
        return f"{self.prefix}-{kind}"

    def declared(self, names: list[str]) -> list[tuple[str, list[str]]]:
        """(owner, chains) to declare: the node's own chains first (owner ""), then, in
        the golden form, each owner's in owner order."""
        owners = self.owners or {}
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(owners.get(name, ""), []).append(name)
        return sorted(groups.items())

    @property
    def nat_chains(self) -> list[str]:
        fixed = ["STATE", "SERVICES", "NODEPORTS", "POSTROUTING", "MARK-MASQ"]
        if self.masq_non_pod:
            fixed.append("MASQ-NON-POD")
        own = [c.name for c in self.chains] + [e.chain for e in self.endpoints]
        return sorted([self.chain(k) for k in fixed] + own)

    @property
    def filter_chains(self) -> list[str]:
        kinds = ["STATE", "SERVICES", "NODEPORTS"]
        if self.unallocated:
            kinds.append("CLUSTER-IPS")
        return sorted([self.chain(k) for k in kinds] + [f.chain for f in self.firewalls])

    def jumps(self, table: str) -> list[tuple[str, str]]:
        return jumps(self.prefix, table)


def jumps(prefix: str, table: str) -> list[tuple[str, str]]:
    """(built-in chain, rule) that send packets to svcrules' chains: installed once at
    the top of the built-in chain, removed by cleanup. The comment marks them as ours."""
    portals = f'-m comment --comment "{prefix} service portals" -j {prefix}-SERVICES'
    if table == "nat":
        masq = f'-m comment --comment "{prefix} masquerade" -j {prefix}-POSTROUTING'
        return [("PREROUTING", portals), ("OUTPUT", portals), ("POSTROUTING", masq)]
    new = f"-m conntrack --ctstate NEW {portals}"
    return [("INPUT", new), ("FORWARD", new), ("OUTPUT", new)]


# Other software's chain prefixes (and table names) come from the list both backends
# refuse: svcrules.inputs.owned.RESERVED.
TAKEN = RESERVED


def chain_prefix(table_name: str) -> str:
    """Owned chains start with the table name in capitals (SVCRULES-...)."""
    prefix = table_name.upper()
    if why := reserved_message(table_name):
        raise SvcrulesError(
            f"NodeConfig spec.tableName (or --table-name): {why} (for the iptables "
            f"backend: {prefix}-* may be another program's chains)"
        )
    if len(prefix) > PREFIX_MAX:
        raise SvcrulesError(
            f"NodeConfig spec.tableName (or --table-name): {table_name!r} is too long for "
            f"the iptables backend, which prefixes every chain name with it (at most "
            f"{PREFIX_MAX} characters: iptables chain names are limited to {CHAIN_MAX})"
        )
    return prefix


@cache
def _cascade(slots: int, left: int) -> str:
    """The match of a cascade rule whose endpoint has ``slots`` of the ``left`` slots not
    taken by the rules before it: each endpoint ends up with its share of the selection's
    slot table (kube-proxy's formatting: ten decimals); the last takes what is left."""
    if slots == left:
        return ""
    return f"-m statistic --mode random --probability {slots / left:0.10f} "


KIND = {Role.SERVICE: "SVC", Role.EXTERNAL: "EXT", Role.CLUSTER_SHORTCUT: "CLU"}
LOCAL_SOURCE = "-m addrtype --src-type LOCAL "


class _Speller:
    """Names and rules of one family's chains, and the -SEP- chains of the endpoints
    picked."""

    def __init__(self, fp: FamilyProgram, prefix: str, host: str) -> None:
        self.fp = fp
        self.prefix = prefix
        self.host = host
        self.mark_masq = ("", "-j ", f"{prefix}-MARK-MASQ")
        self.seps: dict[str, Endpoint] = {}
        self.picks: dict[str, tuple[Rule, ...]] = {}

    def chain(self, cid: ChainId) -> str:
        return f"{self.prefix}-{KIND[cid.role]}-{digest32(cid.key)}"

    def pick(self, sel: Selection) -> tuple[Rule, ...]:
        rules = self.picks.get(sel.key)
        if rules is None:
            rules = self.picks[sel.key] = self._pick(sel)
        return rules

    def _pick(self, sel: Selection) -> tuple[Rule, ...]:
        """Affinity checks, then a random cascade of -SEP- chains."""
        seps = []
        for b, hairpin in zip(sel.endpoints, sel.hairpin, strict=True):
            name = f"{self.prefix}-SEP-{digest32(sel.port_key, b.ip, str(b.port))}"
            seps.append(name)
            if name not in self.seps:
                self.seps[name] = self._endpoint(name, sel, b, hairpin)
        rules: list[Rule] = []
        if sel.affinity is not None:
            check = f" --rcheck --seconds {sel.affinity} --reap "
            rules.extend((f"-m recent --name {sep}{check}", "-g ", sep) for sep in seps)
        counts = [0] * len(seps)
        for i in sel.slots:
            counts[i] += 1
        left = len(sel.slots)
        for sep, count in zip(seps, counts, strict=True):
            if count:  # a weight too small for one slot of the table gets none
                rules.append((_cascade(count, left), "-g ", sep))
                left -= count
        return tuple(rules)

    def _endpoint(self, name: str, sel: Selection, b: Backend, hairpin: bool) -> Endpoint:
        rules: tuple[Rule, ...] = ()
        if hairpin:
            rules = ((f"-s {b.ip}{self.host} ", *self.mark_masq[1:]),)
        if sel.affinity is not None:
            rules = (*rules, (f"-m recent --name {name} ", "--set", ""))
        dest = f"{b.ip}:{b.port}" if self.fp.family == 4 else f"[{b.ip}]:{b.port}"
        label = comment(f"{sel.port_key} {b.ip} {b.port}")
        return Endpoint(name, rules, sel.protocol, label, dest)

    def spell(self, c: ProgramChain) -> Chain:
        rules: list[Rule] = []
        for step in c.steps:
            if isinstance(step, MarkMasquerade):
                if step.sources is Sources.NON_POD:
                    rules.append(("", "-j ", f"{self.prefix}-MASQ-NON-POD"))
                else:
                    rules.append(self.mark_masq)
            elif isinstance(step, Shortcut):
                target = self.chain(step.target)
                if step.sources is Sources.PODS:
                    rules.extend((f"-s {cidr} ", "-g ", target) for cidr in self.fp.pod_cidrs)
                else:
                    if step.masquerade:
                        rules.append((LOCAL_SOURCE, *self.mark_masq[1:]))
                    rules.append((LOCAL_SOURCE, "-g ", target))
            elif isinstance(step, ProgramPick):
                rules.extend(self.pick(step.selection))
            else:  # Drop: leave untranslated, the filter table drops it
                rules.append(("", "-j ", "ACCEPT"))
        return Chain(self.chain(c.id), tuple(rules))


def _nodeport_jumps(scope: NodePortScope, host: str) -> list[str]:
    """What follows "-A <P>-SERVICES" in each jump to <P>-NODEPORTS."""
    local = " -m addrtype --dst-type LOCAL" if scope.local else ""
    if scope.within is None:
        return [local]
    dests = (d if "/" in d else f"{d}{host}" for d in scope.within)
    return [f" -d {d}{local}" for d in dests]


def layout_family(fp: FamilyProgram, node_name: str, owners: bool = False) -> FamilyRules:
    """Name and spell one family's program as iptables chains; with ``owners``, for the
    golden form, also whose each per-Service chain is."""
    prefix = chain_prefix(fp.table)
    host = "/32" if fp.family == 4 else "/128"
    mark = f"0x{fp.masquerade_mark:08x}"
    fam = FamilyRules(
        family=fp.family,
        name=f"ipv{fp.family}",
        restore="iptables-restore" if fp.family == 4 else "ip6tables-restore",
        prefix=prefix,
        mark=mark,
        host=host,
        foreign_ips=fp.foreign_ips,
        service_cidrs=fp.service_cidrs,
        nodeport_jumps=_nodeport_jumps(fp.nodeport_scope, host),
        nodeport_skips=(
            ["127.0.0.0/8" if fp.family == 4 else "::1/128"]
            if fp.nodeport_scope.except_loopback
            else []
        ),
    )
    if fp.pod_cidrs:
        fam.masq_non_pod = [f"-s {cidr} -j RETURN" for cidr in fp.pod_cidrs]
        fam.masq_non_pod.append(f"-j {prefix}-MARK-MASQ")
    if fp.service_cidrs:
        fam.unallocated = ["-j DROP"]
    speller = _Speller(fp, prefix, host)
    chains = {c.id: c for c in fp.chains}

    def targets(target: Target) -> tuple[str, str]:
        """(nat, filter): nat cannot refuse, so what is refused is left untranslated
        (ACCEPT) and refused in filter by its unchanged destination; so is what a chain
        that only drops would leave untranslated."""
        if isinstance(target, Terminal):
            return "-j ACCEPT", "REJECT" if target is Terminal.REJECT else "DROP"
        return f"-g {speller.chain(target)}", "DROP" if chains[target].drops else ""

    for f in fp.dispatch:
        nat, filt = targets(f.target)
        fam.frontends.append(Frontend(f.address, f.protocol, f.port, comment(f.key), nat, filt))
    for f in fp.nodeports:
        nat, filt = targets(f.target)
        fam.nodeports.append(Frontend("", f.protocol, f.port, comment(f.key), nat, filt))
    fam.refused = [f for f in fam.frontends if f.filter]
    fam.refused_nodeports = [f for f in fam.nodeports if f.filter]
    for w in fp.firewalls:
        fw = f"{prefix}-FW-{digest32(w.key, w.address)}"
        label = comment(f"{w.key} {w.address}")
        fam.firewalls.append(Firewall(w.address, w.protocol, w.port, fw, label, w.allowed))
    fam.chains = sorted((speller.spell(c) for c in fp.chains), key=lambda c: c.name)
    fam.endpoints = sorted(speller.seps.values(), key=lambda e: e.chain)
    # Addresses inside serviceCIDRs are refused behind one jump per CIDR, so that the
    # node's other traffic does not walk a rule per ClusterIP.
    ips = fp.cluster_ips
    inside = {ip for ip in ips if any(ip_in_cidr(ip, c) for c in fp.service_cidrs)}
    fam.cidr_cluster_ips = [ip for ip in ips if ip in inside]
    fam.cluster_ips = [ip for ip in ips if ip not in inside]
    if owners:
        # An endpoint's and a firewall's comment start with their Service port's key.
        fam.owners = {speller.chain(c.id): comment(c.id.key, 512) for c in fp.chains}
        fam.owners.update({e.chain: e.comment.split(" ", 1)[0] for e in fam.endpoints})
        fam.owners.update({w.chain: w.comment.split(" ", 1)[0] for w in fam.firewalls})
    return fam


def layout(plan: NodePlan, owners: bool = False) -> list[FamilyRules]:
    refuse_maglev(plan)
    return [layout_family(f, plan.node_name, owners) for f in program(plan).families]


REFUSALS_SHOWN = 10  # Services named one by one; NodeConfig's default may ask for all


def maglev_services(plan: NodePlan) -> list[str]:
    """The Services (namespace/name) that ask for Maglev, whatever their endpoints."""
    return sorted(
        {
            p.service
            for f in plan.families
            for p in f.ports
            if p.balancing.algorithm is Algorithm.MAGLEV
        }
    )


MAGLEV_REFUSED = (
    "Maglev load balancing (annotation svcrules.io/load-balancing, or NodeConfig "
    "spec.loadBalancing) is not supported by the iptables backend: use the nftables "
    "backend, or load balancing 'random'"
)


def unsupported(plan: NodePlan) -> list[tuple[str, str]]:
    """(Service, why) for each Service this backend cannot program."""
    return [(svc, MAGLEV_REFUSED) for svc in maglev_services(plan)]


def refuse_maglev(plan: NodePlan) -> None:
    """Maglev needs a hash of the flow that selects a slot in one lookup; iptables has
    none (HMARK overwrites the whole packet mark and would need a rule per slot): refuse
    every Service that asks for it (docs/backends.md)."""
    services = maglev_services(plan)
    if not services:
        return
    problems = [
        Problem(None, "", f"Service {svc}: {MAGLEV_REFUSED}") for svc in services[:REFUSALS_SHOWN]
    ]
    if len(services) > REFUSALS_SHOWN:
        more = len(services) - REFUSALS_SHOWN
        problems.append(Problem(None, "", f"... and {more} more Services asking for Maglev"))
    raise InputError(problems)


_STATE = re.compile(r'--comment "svcrules ([0-9a-f]{32})"')
_PART = re.compile(r"^# family (ipv[46])\b.*?$|^\*(nat|filter)$|^COMMIT$", re.M)


def render_iptables(plan: NodePlan) -> str:
    """Both families' ``iptables-restore`` inputs, each headed by a ``# family`` line.

    Each table's ``<P>-STATE`` chain carries a digest of that table's part of the text,
    so that a later run learns what the kernel holds by listing one one-rule chain, and
    a change that leaves a table's part alone does not touch that table."""
    text = render(
        "iptables/ruleset.j2",
        families=layout(plan),
        node_label=comment(plan.node_name, 90),
        fingerprint="@@fingerprint@@",
    )
    out: list[str] = []
    pos = 0
    start = 0
    for m in _PART.finditer(text):
        if m.group(2):  # *nat / *filter: a part begins
            out.append(text[pos : m.start()])
            pos = start = m.start()
        elif m.group(0) == "COMMIT":
            part = text[start : m.end()]
            digest = hashlib.sha256(part.encode()).hexdigest()[:32]
            out.append(part.replace("@@fingerprint@@", digest))
            pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def render_iptables_golden(plan: NodePlan) -> str:
    """The golden form (``svcrules check --golden``): the same rules in the same
    order, each per-Service chain declared and filled under a comment naming its
    Service port, and no fingerprints (``<fingerprint>``). iptables-restore still
    loads it."""
    return render(
        "iptables/ruleset.j2",
        families=layout(plan, owners=True),
        node_label=comment(plan.node_name, 90),
        fingerprint=GOLDEN_FINGERPRINT,
    )


def part_fingerprints(text: str) -> dict[str, str | None]:
    """ "family table" -> the fingerprint that table's part of a rendered text carries."""
    out: dict[str, str | None] = {}
    family = ""
    table = ""
    for line in text.splitlines():
        if line.startswith("# family "):
            family = line.split()[2].rstrip(":")
        elif line.startswith("*"):
            table = line[1:]
        elif m := _STATE.search(line):
            out[f"{family} {table}"] = m.group(1)
    return out


def state_fingerprint(listing: str) -> str | None:
    """The fingerprint in a listing of a ``<P>-STATE`` chain."""
    m = _STATE.search(listing)
    return m.group(1) if m else None


def fingerprint_of(text: str) -> str | None:
    """One digest naming a whole text (for the state directory and logs)."""
    parts = part_fingerprints(text)
    if not parts:
        return None
    joined = " ".join(f"{k}={v}" for k, v in sorted(parts.items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


def family_section(text: str, family: str) -> str:
    """The header and one family's section of a rendered text: a valid input for
    ``iptables-restore --noflush`` (ipv4) or ``ip6tables-restore --noflush`` (ipv6)."""
    head, _, rest = text.partition("# family ")
    sections = {c.split(":", 1)[0]: "# family " + c for c in rest.split("# family ")}
    return head + sections[family]
