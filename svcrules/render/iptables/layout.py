"""The iptables layout: which chains in the ``nat`` and ``filter`` tables hold the plan.

The shape is kube-proxy's iptables mode, rendered from the same node plan as the
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
Only this module and templates/iptables/ know iptables syntax.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from svcrules.errors import SvcrulesError
from svcrules.inputs.addr import ip_in_cidr, ip_sort_key
from svcrules.inputs.owned import RESERVED, reserved_message
from svcrules.plan.node import Backend, FamilyPlan, Masquerade, NodePlan, PortPlan, Route
from svcrules.render.names import comment, digest32
from svcrules.render.templates import render

CHAIN_MAX = 28  # iptables chain names: 28 characters (XT_EXTENSION_MAXNAMELEN - 1)
DIGEST = 10  # base32 characters (50 bits) in per-Service and per-endpoint chain names
PREFIX_MAX = CHAIN_MAX - len("-SEP-") - DIGEST


class Endpoint(NamedTuple):
    """One ``-SEP-`` chain: a Service port's endpoint (DNAT, hairpin, affinity)."""

    chain: str
    comment: str
    protocol: str
    backend: Backend
    hairpin: bool  # this node's (or an unknown node's) endpoint: may be its own client
    affinity: int | None  # ClientIP timeout: remember the client in the chain's recent list


class Pick(NamedTuple):
    """How a chain chooses among endpoints: affinity checks, then a random cascade."""

    endpoints: tuple[tuple[str, str], ...]  # (-SEP- chain, probability; "" for the last)
    affinity: int | None


class Chain(NamedTuple):
    name: str
    comment: str
    masquerade: str  # "all", "non-pod" or "none"
    pod_shortcut: str  # chain to go to for pod sources (eTP Local), or ""
    node_shortcut: str  # chain to go to for the node's own sources (eTP Local), or ""
    pick: Pick | None  # None: leave untranslated (the filter table drops it)


class Frontend(NamedTuple):
    ip: str  # "" for NodePorts
    protocol: str
    port: int
    comment: str
    nat: str  # the chain to go to, or ACCEPT: leave untranslated, and no other nat rule
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
    """One family's chains (one ``iptables-restore`` input)."""

    family: int
    name: str  # "ipv4" / "ipv6"
    prefix: str
    plan: FamilyPlan
    mark: int
    host: str  # "/32" or "/128"
    loopback: str
    frontends: list[Frontend] = field(default_factory=list)
    nodeports: list[Frontend] = field(default_factory=list)
    firewalls: list[Firewall] = field(default_factory=list)
    chains: list[Chain] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)
    cluster_ips: list[str] = field(default_factory=list)  # outside every serviceCIDR
    cidr_cluster_ips: list[str] = field(default_factory=list)  # inside one

    def chain(self, kind: str) -> str:
        return f"{self.prefix}-{kind}"

    @property
    def nodeport_dests(self) -> list[str]:
        """Destinations (CIDRs) that serve NodePorts; [""] means every local address."""
        p = self.plan
        if p.nodeport_mode == "primary":
            return [f"{p.node_ip}{self.host}"] if p.node_ip else []
        if p.nodeport_mode == "cidrs":
            return list(p.nodeport_cidrs)
        return [""]

    @property
    def nat_chains(self) -> list[str]:
        fixed = ["STATE", "SERVICES", "NODEPORTS", "POSTROUTING", "MARK-MASQ"]
        if self.plan.pod_cidrs:
            fixed.append("MASQ-NON-POD")
        own = [c.name for c in self.chains] + [e.chain for e in self.endpoints]
        return sorted([self.chain(k) for k in fixed] + own)

    @property
    def filter_chains(self) -> list[str]:
        kinds = ["STATE", "SERVICES", "NODEPORTS"]
        if self.plan.service_cidrs:
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


def _probability(i: int, n: int) -> str:
    """Chance that the i-th of n cascade rules takes the packet: each endpoint ends up
    with 1/n (kube-proxy's formatting: ten decimals)."""
    return "" if i == n - 1 else f"{1.0 / (n - i):0.10f}"


def layout_family(plan: FamilyPlan, node_name: str) -> FamilyRules:
    """Decide every chain and rule of one family."""
    prefix = chain_prefix(plan.table)
    fam = FamilyRules(
        family=plan.family,
        name=f"ipv{plan.family}",
        prefix=prefix,
        plan=plan,
        mark=plan.masquerade_mark,
        host="/32" if plan.family == 4 else "/128",
        loopback="127.0.0.0/8" if plan.family == 4 else "::1/128",
    )
    seps: dict[str, Endpoint] = {}

    def pick(p: PortPlan, backends: tuple[Backend, ...]) -> Pick:
        names = []
        for i, b in enumerate(backends):
            name = f"{prefix}-SEP-{digest32(p.key, b.ip, str(b.port))}"
            if name not in seps:
                seps[name] = Endpoint(
                    name,
                    comment(f"{p.key} {b.ip} {b.port}"),
                    p.protocol.lower(),
                    b,
                    b.node in ("", node_name),
                    p.affinity_timeout,
                )
            names.append((name, _probability(i, len(backends))))
        return Pick(tuple(names), p.affinity_timeout)

    claimed: set[tuple[str, str, int]] = set()

    def claim(f: Frontend) -> None:
        """A Service may list its own ClusterIP among its externalIPs (the API allows it):
        the first claim of an address, protocol and port wins, in nat and filter alike."""
        if f[:3] not in claimed:
            claimed.add(f[:3])
            fam.frontends.append(f)

    for p in plan.ports:
        proto = p.protocol.lower()
        label = comment(p.key)
        key = digest32(p.key)
        svc, ext, clu = f"{prefix}-SVC-{key}", f"{prefix}-EXT-{key}", f"{prefix}-CLU-{key}"
        fam.cluster_ips.append(p.cluster_ip)

        # ClusterIP frontend
        if p.internal_route in (Route.REJECT, Route.DROP):
            target = "REJECT" if p.internal_route is Route.REJECT else "DROP"
            claim(Frontend(p.cluster_ip, proto, p.port, label, "ACCEPT", target))
        else:
            masq = {Masquerade.ALWAYS: "all", Masquerade.NON_POD: "non-pod"}.get(
                p.internal_masquerade, "none"
            )
            local = p.internal_route is Route.LOCAL
            backends = p.local_backends if local else p.cluster_backends
            fam.chains.append(Chain(svc, label, masq, "", "", pick(p, backends)))
            claim(Frontend(p.cluster_ip, proto, p.port, label, svc, ""))

        # external frontends: LB ingress IPs, externalIPs, NodePort
        if not p.has_external:
            continue
        if p.external_route is Route.CLUSTER:
            fam.chains.append(Chain(ext, label, "all", "", "", pick(p, p.cluster_backends)))
        elif p.external_route in (Route.LOCAL, Route.DROP):
            fam.chains.append(
                Chain(
                    ext,
                    label,
                    "none",
                    clu if p.pod_shortcut else "",
                    clu,
                    pick(p, p.local_backends) if p.external_route is Route.LOCAL else None,
                )
            )
            fam.chains.append(Chain(clu, label, "none", "", "", pick(p, p.cluster_backends)))
        # What nat leaves untranslated: rejected (no endpoint) or dropped (eTP Local
        # without a local endpoint: only outside sources get that far in the -EXT- chain).
        refused = {Route.REJECT: "REJECT", Route.DROP: "DROP"}.get(p.external_route, "")
        target = "ACCEPT" if p.external_route is Route.REJECT else ext
        for ip in (*p.lb_ips, *p.external_ips):
            claim(Frontend(ip, proto, p.port, label, target, refused))
        if p.node_port:
            fam.nodeports.append(Frontend("", proto, p.node_port, label, target, refused))
        if p.firewall:
            for ip in p.lb_ips:
                fw = f"{prefix}-FW-{digest32(p.key, ip)}"
                fam.firewalls.append(
                    Firewall(ip, proto, p.port, fw, comment(f"{p.key} {ip}"), p.allowed_sources)
                )

    fam.frontends.sort(key=lambda f: (ip_sort_key(f.ip), f.protocol, f.port))
    fam.nodeports.sort(key=lambda f: (f.protocol, f.port))
    fam.firewalls.sort(key=lambda f: (ip_sort_key(f.ip), f.protocol, f.port))
    fam.chains.sort(key=lambda c: c.name)
    fam.endpoints = sorted(seps.values(), key=lambda e: e.chain)
    # Addresses inside serviceCIDRs are refused behind one jump per CIDR, so that the
    # node's other traffic does not walk a rule per ClusterIP.
    ips = sorted(set(fam.cluster_ips), key=ip_sort_key)
    inside = {ip for ip in ips if any(ip_in_cidr(ip, c) for c in plan.service_cidrs)}
    fam.cidr_cluster_ips = [ip for ip in ips if ip in inside]
    fam.cluster_ips = [ip for ip in ips if ip not in inside]
    return fam


def layout(plan: NodePlan) -> list[FamilyRules]:
    return [layout_family(f, plan.node_name) for f in plan.families]


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
