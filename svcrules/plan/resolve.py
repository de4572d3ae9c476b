"""Turn loaded objects into the node plan (see plan.py for why it exists).

Every rule of SEMANTICS.md sections 2-8 that decides what a connection
experiences is made here, once, for all backends.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace

from svcrules.errors import Origin, Problem
from svcrules.inputs.addr import (
    Family,
    canonical_ip,
    collapse_cidrs,
    family_of,
    ip_in_cidr,
    ip_sort_key,
    packed,
    parse_cidr,
)
from svcrules.inputs.load import Inputs
from svcrules.inputs.model import (
    MAGLEV_SIZES,
    Endpoint,
    EndpointConditions,
    EndpointSlice,
    NodeConfig,
    Service,
    ServicePort,
)
from svcrules.plan.balancing import default_table_size, maglev_table, random_slots
from svcrules.plan.claims import check_claims
from svcrules.plan.node import (
    RANDOM,
    Algorithm,
    Backend,
    Balancing,
    FamilyPlan,
    HealthCheck,
    IgnoredSlice,
    Masquerade,
    NodePlan,
    PlannedService,
    PortPlan,
    Route,
    picks_local,
)


def foreign_ips(svc: Service) -> tuple[str, ...]:
    """The ClusterIPs a Service leaves to another proxy (labels): never dropped as
    unallocated, never rejected, never touched."""
    if svc.spec.type == "ExternalName" or not svc.is_skipped_by_label():
        return ()
    return tuple(svc.spec.all_cluster_ips())


def foreign_by_family(ips: Iterable[str]) -> dict[int, tuple[str, ...]]:
    """Family -> those ClusterIPs, once each, in address order."""
    unique = set(ips)
    return {
        fam: tuple(sorted((ip for ip in unique if family_of(ip) == fam), key=ip_sort_key))
        for fam in (4, 6)
    }


def programmed_services(services: Iterable[Service]) -> list[Service]:
    """Services that get rules at all (section 2), in canonical order."""
    out = [s for s in services if is_programmed(s)]
    return sorted(out, key=lambda s: (s.metadata.namespace, s.metadata.name))


def is_programmed(svc: Service) -> bool:
    """Whether a Service gets rules at all (section 2)."""
    return (
        svc.spec.type != "ExternalName"
        and not svc.spec.is_headless()
        and not svc.is_skipped_by_label()
        and bool(svc.spec.all_cluster_ips())
    )


SliceKey = tuple[str, str, int]  # namespace, Service name, family


def slices_by_service(
    slices: Iterable[EndpointSlice],
) -> tuple[dict[SliceKey, list[EndpointSlice]], dict[SliceKey, list[IgnoredSlice]]]:
    """The slices of each Service per family, and those hidden by a label (section 2:
    kube-proxy's label selector leaves them out, so they count as absent)."""
    out: dict[SliceKey, list[EndpointSlice]] = defaultdict(list)
    ignored: dict[SliceKey, list[IgnoredSlice]] = defaultdict(list)
    for sl in slices:
        svc = slice_service(sl)
        if svc is None:
            continue
        key = (*svc, 4 if sl.address_type == "IPv4" else 6)
        hidden = ignored_slice(sl)
        if hidden is None:
            out[key].append(sl)
        else:
            ignored[key].append(hidden)
    return out, ignored


def slice_service(sl: EndpointSlice) -> tuple[str, str] | None:
    """The Service (namespace, name) whose endpoints an EndpointSlice lists; None for one
    without the service-name label, or of FQDN addresses (never programmed)."""
    svc = sl.service_name()
    if svc is None or sl.address_type == "FQDN":
        return None
    return sl.metadata.namespace, svc


def ignored_slice(sl: EndpointSlice) -> IgnoredSlice | None:
    """The slice as kube-proxy's label selector leaves it out, or None when it counts."""
    svc, label = sl.service_name(), sl.metadata.skip_label()
    if svc is None or label is None:
        return None
    return IgnoredSlice(sl.metadata.namespace, sl.metadata.name, svc, label)


def _conditions(ep: Endpoint) -> EndpointConditions:
    return ep.get("conditions") or {}


def _is_ready(ep: Endpoint) -> bool:
    """``ready`` unset means ready (the API's reading), unless the endpoint is
    terminating: a terminating endpoint is only ever used while it is serving."""
    c = _conditions(ep)
    ready = c.get("ready")
    return (c.get("terminating") is not True) if ready is None else ready


def _is_serving(ep: Endpoint) -> bool:
    """Ready, or serving while terminating: what a route could use."""
    return _is_ready(ep) or _is_serving_terminating(ep)


def _is_serving_terminating(ep: Endpoint) -> bool:
    c = _conditions(ep)
    serving = c.get("serving")
    if serving is None:
        serving = _is_ready(ep)
    return bool(serving) and c.get("terminating") is True


def _hinted(ep: Endpoint, key: str) -> list[str]:
    hints = ep.get("hints") or {}
    return [h["name"] for h in (hints.get(key) or [])]  # type: ignore[attr-defined]


def _merge_endpoints(
    slices: list[EndpointSlice], port: ServicePort
) -> list[tuple[Backend, Endpoint]]:
    """Endpoints of all slices for one Service port; a duplicate ip:port appears once,
    preferring the copy that is not terminating."""
    chosen: dict[tuple[str, int], tuple[Backend, Endpoint]] = {}
    ordered = sorted(slices, key=lambda s: s.metadata.name)
    for sl in ordered:
        weight = sl.metadata.endpoint_weight
        ep_port = next(
            (p.port for p in sl.ports if p.name == port.name and p.protocol == port.protocol),
            None,
        )
        if ep_port is None:
            continue
        for ep in sl.endpoints:
            ip = canonical_ip(ep["addresses"][0])
            backend = Backend(
                ip=ip,
                port=ep_port,
                node=ep.get("nodeName") or "",
                terminating=_conditions(ep).get("terminating") is True,
                weight=weight,
            )
            key = (ip, ep_port)
            old = chosen.get(key)
            if old is None or (old[0].terminating and not backend.terminating):
                chosen[key] = (backend, ep)
    # One family per slice set, so the binary address orders them numerically.
    return [chosen[k] for k in sorted(chosen, key=lambda k: (packed(k[0]), k[1]))]


def _usable(pairs: list[tuple[Backend, Endpoint]]) -> list[tuple[Backend, Endpoint]]:
    """Ready endpoints, or if none, the serving-and-terminating ones (section 3)."""
    ready = [p for p in pairs if _is_ready(p[1])]
    return ready if ready else [p for p in pairs if _is_serving_terminating(p[1])]


def _apply_hints(
    ready: list[tuple[Backend, Endpoint]], node: str, zone: str
) -> list[tuple[Backend, Endpoint]]:
    """Narrow to endpoints hinted for this node or zone, when every one carries hints."""
    if not ready:
        return ready
    for key, want in (("forNodes", node), ("forZones", zone)):
        if not want or not all(_hinted(ep, key) for _, ep in ready):
            continue
        mine = [p for p in ready if want in _hinted(p[1], key)]
        if mine:
            return mine
    return ready


def _cluster_backends(
    pairs: list[tuple[Backend, Endpoint]], node: str, zone: str
) -> tuple[Backend, ...]:
    ready = [p for p in pairs if _is_ready(p[1])]
    if ready:
        return tuple(b for b, _ in _apply_hints(ready, node, zone))
    return tuple(b for b, _ in pairs if _is_serving_terminating(_))


def _local_backends(pairs: list[tuple[Backend, Endpoint]], node: str) -> tuple[Backend, ...]:
    local = [p for p in pairs if p[1].get("nodeName") == node]
    return tuple(b for b, _ in _usable(local))


def _in_family(items: Iterable[str], family: Family) -> tuple[str, ...]:
    return tuple(sorted({i for i in items if family_of(i) == family}, key=ip_sort_key))


def _cidrs_in_family(items: Iterable[str], family: Family) -> tuple[str, ...]:
    return collapse_cidrs(_in_family(items, family))


def _plan_port(
    svc: Service,
    port: ServicePort,
    family: Family,
    cluster_ip: str,
    pairs: list[tuple[Backend, Endpoint]],
    node: NodeConfig,
    pod_cidrs: tuple[str, ...],
    notes: list[str],
) -> PortPlan:
    spec = svc.spec
    # Drained endpoints (weight 0) take no new connection: they are left out before
    # hints and the ready/terminating fallback, as if they were not listed, and kept
    # apart (explain lists them; their UDP conntrack entries stay).
    live = [p for p in pairs if p[0].weight]
    drained: tuple[Backend, ...] = ()
    if len(live) < len(pairs):
        drained = tuple(b for b, ep in pairs if not b.weight and _is_serving(ep))
    cluster = _cluster_backends(live, node.metadata.name, node.spec.zone)
    local = _local_backends(live, node.metadata.name)
    if drained and not cluster:
        notes.append("every usable endpoint has weight 0 (drained): no new connections")
    external_ips = _in_family(spec.external_ips, family)
    lb_ips: tuple[str, ...] = ()
    if spec.type == "LoadBalancer":
        lb_ips = _in_family(
            (i.ip for i in svc.status.load_balancer.ingress if i.ip and i.ip_mode != "Proxy"),
            family,
        )
    node_port = port.node_port if spec.type in ("NodePort", "LoadBalancer") else None
    node_port = node_port or None
    firewall = bool(spec.load_balancer_source_ranges) and bool(lb_ips)
    ranges = _cidrs_in_family(spec.load_balancer_source_ranges, family)
    node_ip = node.node_ip(family)
    allow_self = firewall and bool(node_ip and any(ip_in_cidr(node_ip, r) for r in ranges))
    allowed: tuple[str, ...] = ranges if firewall else ()
    if allow_self:
        # The node may reach one LB IP with another as source (kube-proxy allows every
        # LB IP of the Service, for each of its LB frontends).
        host = 32 if family == 4 else 128
        allowed = tuple(dict.fromkeys((*ranges, *(f"{ip}/{host}" for ip in lb_ips))))

    if not cluster:
        internal_route = external_route = Route.REJECT
        notes.append("no usable endpoint: every frontend rejects")
    else:
        if spec.internal_traffic_policy == "Local":
            internal_route = Route.LOCAL if local else Route.DROP
            if not local:
                notes.append("internalTrafficPolicy Local and no local endpoint: ClusterIP drops")
        else:
            internal_route = Route.CLUSTER
        if spec.external_traffic_policy == "Local":
            external_route = Route.LOCAL if local else Route.DROP
            if not local:
                notes.append(
                    "externalTrafficPolicy Local and no local endpoint: outside traffic drops"
                )
        else:
            external_route = Route.CLUSTER

    if node.spec.masquerade_all:
        internal_masq = Masquerade.ALWAYS
    elif pod_cidrs:
        internal_masq = Masquerade.NON_POD
    else:
        internal_masq = Masquerade.NEVER
    etp_local = spec.external_traffic_policy == "Local"
    external_masq = Masquerade.NODE_ONLY if etp_local else Masquerade.ALWAYS
    if not picks_local(internal_route, external_route):
        local_picked: tuple[Backend, ...] = ()  # no selection picks from them
    else:
        local_picked = local
    balancing = _balancing(svc, node, len(pairs), cluster, local_picked, notes)
    if balancing.algorithm is Algorithm.MAGLEV and node.spec.maglev.seed is None:
        notes.append(
            "Maglev seed not set (NodeConfig spec.maglev.seed): the default 0x0 is public; "
            "set one, the same on every node"
        )

    return PortPlan(
        namespace=svc.metadata.namespace,
        name=svc.metadata.name,
        port_name=port.name,
        protocol=port.protocol,
        port=port.port,
        family=family,
        cluster_ip=cluster_ip,
        node_port=node_port,
        external_ips=external_ips,
        lb_ips=lb_ips,
        firewall=firewall,
        source_ranges=ranges if firewall else (),
        allow_lb_self=allow_self,
        allowed_sources=allowed,
        cluster_backends=cluster,
        local_backends=local,
        internal_route=internal_route,
        internal_masquerade=internal_masq,
        external_route=external_route,
        external_masquerade=external_masq,
        pod_shortcut=etp_local and bool(pod_cidrs),
        affinity_timeout=spec.affinity_timeout(),
        notes=tuple(notes),
        balancing=balancing,
        drained=drained,
    )


def _balancing(
    svc: Service,
    node: NodeConfig,
    listed: int,
    cluster: tuple[Backend, ...],
    local: tuple[Backend, ...],
    notes: list[str],
) -> Balancing:
    """How the port's selections pick: the Service's annotation, else the NodeConfig's
    default; Maglev's table is as large as spec.maglev.tableSize or, by default, from
    the number of endpoints the slices list (whatever their state, so that every node
    and every readiness change keep one size). ``local`` is empty when no route picks
    from the local endpoints: their table would go unused."""
    algorithm = Algorithm(svc.metadata.load_balancing or node.spec.load_balancing)
    if algorithm is Algorithm.RANDOM:
        if len({b.weight for b in (*cluster, *local)}) <= 1:
            return RANDOM
        return Balancing(
            algorithm,
            0,
            random_slots([b.weight for b in cluster]),
            random_slots([b.weight for b in local]),
        )
    maglev = node.spec.maglev
    seed = maglev.seed_value
    size = maglev.table_size or default_table_size(listed)
    most = max(len(cluster), len(local))
    if most > size:
        # A Service that outgrew spec.maglev.tableSize must not stop the node's updates:
        # it gets the smallest size that holds its endpoints, and explain says so.
        size = next(m for m in MAGLEV_SIZES if m >= most)
        notes.append(
            f"{most} endpoints do not fit spec.maglev.tableSize {maglev.table_size}: "
            f"this port's table has {size} slots"
        )

    def table(backends: tuple[Backend, ...]) -> tuple[int, ...]:
        names = [f"{b.ip},{b.port}" for b in backends]
        return maglev_table(names, [b.weight for b in backends], size, seed)

    cluster_slots = table(cluster)
    local_slots = cluster_slots if local == cluster else table(local)
    return Balancing(algorithm, seed, cluster_slots, local_slots)


def needs_health_check(svc: Service) -> int:
    """The healthCheckNodePort to serve for ``svc``, or 0: kube-proxy's rule
    (``NeedsHealthCheck``: type LoadBalancer, externalTrafficPolicy Local; a port of 0
    is logged and served nowhere)."""
    spec = svc.spec
    if spec.type != "LoadBalancer" or spec.external_traffic_policy != "Local":
        return 0
    return spec.health_check_node_port or 0


def local_ready_endpoints(
    per_port: Iterable[list[tuple[Backend, Endpoint]]], node: NodeConfig
) -> int:
    """Local endpoints as kube-proxy's health check counts them: ready ones only (a
    serving-terminating one does not count, see ``HealthCheck``), each address once
    over all of the Service's ports."""
    me = node.metadata.name
    # A drained endpoint (weight 0) takes no new connection: it does not count either,
    # or a load balancer would send connections that this node drops.
    ready = {b.ip for pairs in per_port for b, ep in pairs if b.node == me and _is_ready(ep)}
    drained = {b.ip for pairs in per_port for b, _ in pairs if b.node == me and not b.weight}
    return len(ready - drained)


def pod_cidrs(node: NodeConfig, family: Family) -> tuple[str, ...]:
    return _cidrs_in_family(node.spec.cluster_cidrs, family)


def plan_service(
    svc: Service,
    slices: dict[SliceKey, list[EndpointSlice]],
    ignored: dict[SliceKey, list[IgnoredSlice]],
    node: NodeConfig,
    origin: Origin | None = None,
) -> PlannedService:
    """Plan every port of one programmed Service (see ``programmed_services``), in
    both families, from its EndpointSlices (as ``slices_by_service`` groups them)."""
    planned: list[tuple[tuple[int, PortPlan], ...]] = []
    health: list[HealthCheck] = []
    health_port = needs_health_check(svc)
    for fam in (4, 6):
        family: Family = 4 if fam == 4 else 6
        cluster_ip = next(
            (ip for ip in svc.spec.all_cluster_ips() if family_of(ip) == family), None
        )
        if cluster_ip is None:
            planned.append(())
            continue
        key = (svc.metadata.namespace, svc.metadata.name, family)
        svc_slices = slices.get(key, [])
        hidden = sorted({i.text for i in ignored.get(key, [])})
        cidrs = pod_cidrs(node, family)
        merged = [_merge_endpoints(svc_slices, port) for port in svc.spec.ports]
        planned.append(
            tuple(
                (idx, _plan_port(svc, port, family, cluster_ip, pairs, node, cidrs, hidden[:]))
                for idx, (port, pairs) in enumerate(zip(svc.spec.ports, merged, strict=True))
            )
        )
        if health_port and svc.spec.ports:
            count = local_ready_endpoints(merged, node)
            health.append(HealthCheck(*key[:2], family, health_port, count))
    ts = svc.metadata.creation_timestamp
    return PlannedService(
        svc.metadata.namespace,
        svc.metadata.name,
        ts.timestamp() if ts else None,
        origin,
        (planned[0], planned[1]),
        tuple(health),
    )


def resolve(inputs: Inputs, node: NodeConfig, skipped: list[Problem] | None = None) -> NodePlan:
    """Build the node plan; raise InputError for conflicts between objects, or, given
    ``skipped``, leave out the Services that lose a conflict and report them there
    (see ``claims.check_claims``)."""
    slices, ignored = slices_by_service(inputs.slices)
    planned = [
        plan_service(svc, slices, ignored, node, inputs.origin(svc))
        for svc in programmed_services(inputs.services)
    ]
    foreign = foreign_by_family(ip for svc in inputs.services for ip in foreign_ips(svc))
    hidden = {i for group in ignored.values() for i in group}
    return assemble(planned, foreign, hidden, node, skipped)


def assemble(
    planned: list[PlannedService],
    foreign: dict[int, tuple[str, ...]],
    ignored: Iterable[IgnoredSlice],
    node: NodeConfig,
    skipped: list[Problem] | None = None,
) -> NodePlan:
    """The node plan from every programmed Service's own plan (in ``programmed_services``
    order): settle claims, then add what belongs to the node (section 2's scopes)."""
    families: list[FamilyPlan] = []
    for family in (4, 6):
        fam: Family = 4 if family == 4 else 6
        ports = [p for s in planned for _, p in s.family_ports(fam)]
        ports.sort(key=lambda p: (p.namespace, p.name, p.port_name, p.protocol, p.port))
        mode, cidrs, fam_notes = _nodeport_scope(node, fam)
        families.append(
            FamilyPlan(
                family=fam,
                table=node.spec.table_name,
                node_ip=node.node_ip(fam),
                pod_cidrs=pod_cidrs(node, fam),
                service_cidrs=_cidrs_in_family(node.spec.service_cidrs, fam),
                foreign_ips=foreign[fam],
                nodeport_mode=mode,
                nodeport_cidrs=cidrs,
                masquerade_bit=node.spec.masquerade_bit,
                ports=tuple(ports),
                notes=tuple(fam_notes),
            )
        )
    losers = check_claims(planned, skipped)
    health = sorted(
        (h for s in planned if id(s) not in losers for h in s.health),
        key=lambda h: (h.namespace, h.name, h.family),
    )
    if losers:
        dropped = {id(p) for s in planned if id(s) in losers for fp in s.ports for _, p in fp}
        families = [
            replace(f, ports=tuple(p for p in f.ports if id(p) not in dropped)) for f in families
        ]
    return NodePlan(
        node_name=node.metadata.name,
        zone=node.spec.zone,
        table=node.spec.table_name,
        families=tuple(families),
        ignored_slices=tuple(sorted(set(ignored), key=lambda i: (i.namespace, i.name, i.label))),
        health_checks=tuple(health),
    )


def _nodeport_scope(node: NodeConfig, fam: Family) -> tuple[str, tuple[str, ...], list[str]]:
    """Which addresses serve NodePorts in ``fam`` (nodePortAddresses), and a note when
    kube-proxy's fallback applies."""
    npa = node.spec.node_port_addresses
    if npa == ["primary"]:
        return "primary", (), []
    fam_cidrs = _cidrs_in_family(npa, fam)
    if not fam_cidrs:
        # kube-proxy falls back to the zero CIDR of a family the list leaves out.
        name = "IPv4" if fam == 4 else "IPv6"
        note = (
            f"nodePortAddresses has no {name} CIDR: "
            f"NodePorts on every local {name} address except loopback"
        )
        return "all", (), [note]
    if any(parse_cidr(c).prefixlen == 0 for c in fam_cidrs):
        return "all", (), []
    return "cidrs", fam_cidrs, []
