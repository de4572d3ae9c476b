"""``svcrules explain``: the node plan in words, one block per Service port."""

from __future__ import annotations

from svcrules.plan.balancing import shares
from svcrules.plan.node import Algorithm, Backend, Masquerade, NodePlan, PortPlan, Route

MASQUERADE: dict[str, str] = {
    Masquerade.ALWAYS: "masquerade every source",
    Masquerade.NON_POD: "masquerade sources outside clusterCIDRs",
    Masquerade.NEVER: "no masquerade (clusterCIDRs unset)",
    Masquerade.NODE_ONLY: "client IP kept; the node's own sources are masqueraded",
}


def hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _backends(backends: tuple[Backend, ...]) -> str:
    if not backends:
        return "none"
    return ", ".join(
        hostport(b.ip, b.port) + (" (terminating)" if b.terminating else "") for b in backends
    )


def _route(route: Route, masq: Masquerade) -> str:
    if route is Route.REJECT:
        return "REJECT (no usable endpoint)"
    if route is Route.DROP:
        return "DROP (no local endpoint)"
    return f"-> {route.value} endpoints; {MASQUERADE[masq]}"


def _block(p: PortPlan) -> list[str]:
    fam = "IPv4" if p.family == 4 else "IPv6"
    front = [f"clusterIP {hostport(p.cluster_ip, p.port)}"]
    if p.node_port:
        front.append(f"nodePort {p.node_port}")
    front += [f"loadBalancer {hostport(ip, p.port)}" for ip in p.lb_ips]
    front += [f"externalIP {hostport(ip, p.port)}" for ip in p.external_ips]
    lines = [
        f"{p.key} ({fam})",
        f"  frontends  {', '.join(front)}",
        f"  endpoints  cluster: {_backends(p.cluster_backends)}",
        f"             local:   {_backends(p.local_backends)}",
        f"  clusterIP  {_route(p.internal_route, p.internal_masquerade)}",
    ]
    if p.has_external:
        ext = _route(p.external_route, p.external_masquerade)
        if p.external_masquerade is Masquerade.NODE_ONLY and p.external_route is not Route.REJECT:
            who = "pods and the node" if p.pod_shortcut else "the node"
            ext += f"; {who} go to cluster endpoints"
        lines.append(f"  external   {ext}")
    if p.firewall:
        allowed = ", ".join(p.source_ranges) or "nothing in this family"
        self_ok = ""
        if p.allow_lb_self:
            self_ok = " (+ every LB IP of the Service: a range holds the node IP)"
        lines.append(f"  sources    LB IPs allow {allowed}{self_ok}; others DROP")
    if p.affinity_timeout is not None:
        lines.append(f"  affinity   ClientIP, {p.affinity_timeout}s")
    lines += _balancing(p)
    lines += [f"  note       {n}" for n in p.notes]
    return lines


def _shares(backends: tuple[Backend, ...], slots: tuple[int, ...]) -> str:
    """Each endpoint's share of new connections, with its weight."""
    return ", ".join(
        f"{hostport(b.ip, b.port)} {share:.1%} (weight {b.weight})"
        for b, share in zip(backends, shares(slots, len(backends)), strict=True)
    )


def _balancing(p: PortPlan) -> list[str]:
    """How endpoints are chosen, when it is not a uniform random pick: the algorithm,
    Maglev's table and seed, and every endpoint's share."""
    lb = p.balancing
    lines = []
    if lb.algorithm is Algorithm.MAGLEV:
        size = len(lb.cluster_slots or lb.local_slots)
        what = "client address" if p.maglev_hash == "client" else "flow"
        lines.append(
            f"  balancing  maglev: hash of the {what}, seed 0x{lb.seed:x}"
            + (f", {size} slots per table" if size else "")
        )
    elif lb.cluster_slots or lb.local_slots:
        lines.append("  balancing  random, by weight")
    if lines:
        used = (
            ("cluster", p.cluster_backends, p.uses_cluster_backends()),
            ("local", p.local_backends, p.uses_local_backends()),
        )
        for which, backends, picked in used:
            if backends and picked:
                table = lb.slots(which, len(backends))
                lines.append(f"  shares     {which}: {_shares(backends, table)}")
    if p.drained:
        eps = ", ".join(hostport(b.ip, b.port) for b in p.drained)
        lines.append(f"  drained    {eps} (weight 0: no new connections)")
    return lines


def explain_text(plan: NodePlan) -> str:
    out = [f"node {plan.node_name}" + (f" (zone {plan.zone})" if plan.zone else "")]
    for fam in plan.families:
        name = "IPv4" if fam.family == 4 else "IPv6"
        out += [f"  {name}  {n}" for n in fam.notes]
    out += [
        f"  EndpointSlice {i.namespace}/{i.name} (Service {i.namespace}/{i.service}) "
        f"ignored: labelled {i.label}"
        for i in plan.ignored_slices
    ]
    for fam in plan.families:
        for p in fam.ports:
            out.append("")
            out.extend(_block(p))
    return "\n".join(out) + "\n"
