"""Who owns a frontend: two Services cannot claim the same IP:port/protocol or
NodePort. Failing names both; skipping keeps the oldest claim (see docs/operations.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from svcrules.errors import InputError, Problem
from svcrules.plan.node import PlannedService, PortPlan

Claim = tuple[tuple[str, ...], str, str]  # key, what is claimed, field


def _claims(idx: int, p: PortPlan) -> Iterator[Claim]:
    """What one Service port owns: each frontend IP:port/protocol, and its NodePort."""
    proto = p.protocol
    yield (
        (p.cluster_ip, str(p.port), proto),
        f"{p.cluster_ip}:{p.port}/{proto}",
        f"spec.ports[{idx}]",
    )
    for ip in (*p.external_ips, *p.lb_ips):
        yield (ip, str(p.port), proto), f"{ip}:{p.port}/{proto}", f"spec.ports[{idx}]"
    if p.node_port:
        yield (
            ("nodePort", str(p.node_port), proto),
            f"nodePort {p.node_port}/{proto}",
            f"spec.ports[{idx}].nodePort",
        )


def _conflict(svc: PlannedService, other: PlannedService, what: str, field: str) -> Problem:
    where = other.origin
    return Problem(
        svc.origin,
        field,
        f"{what} is already claimed by Service "
        f"{other.namespace}/{other.name}" + (f" ({where})" if where else ""),
    )


def _same_owner(key: tuple[str, ...], old: str, new: str) -> bool:
    """One Service may name a frontend twice (its ClusterIP among its externalIPs, one
    port in both families), but not give one NodePort to two of its ports."""
    return key[0] != "nodePort" or old == new


def _ports(planned: list[PlannedService]) -> Iterator[tuple[PlannedService, int, PortPlan]]:
    """Every port of every Service: all IPv4 ports first, then IPv6 (the order conflicts
    are reported in)."""
    for family in (4, 6):
        for svc in planned:
            for idx, p in svc.ports[0 if family == 4 else 1]:
                yield svc, idx, p


def check_claims(planned: list[PlannedService], skipped: list[Problem] | None = None) -> set[int]:
    """Two Services cannot own the same IP:port/protocol or NodePort (say which two).

    Without ``skipped``, every conflict is an InputError. With it, the Service created
    first (metadata.creationTimestamp; then without one, in namespace/name order)
    keeps its claims; a Service that conflicts with one kept, or with itself, is left
    out whole, reported in ``skipped``, and its ``id()`` returned."""
    if skipped is not None:
        return _skip_conflicts(planned, skipped)
    problems: list[Problem] = []
    owners: dict[tuple[str, ...], tuple[PlannedService, str]] = {}
    for svc, idx, p in _ports(planned):
        for key, what, field in _claims(idx, p):
            old = owners.get(key)
            if old is None:
                owners[key] = (svc, what + field)
            elif not (old[0] is svc and _same_owner(key, old[1], what + field)):
                problems.append(_conflict(svc, old[0], what, field))
    if problems:
        raise InputError(problems)
    return set()


def _age(svc: PlannedService) -> tuple[bool, float, str, str]:
    ts = svc.created
    return (ts is None, ts or 0.0, svc.namespace, svc.name)


def _skip_conflicts(planned: list[PlannedService], skipped: list[Problem]) -> set[int]:
    by_service: dict[int, list[tuple[int, PortPlan]]] = defaultdict(list)
    services: dict[int, PlannedService] = {}
    for svc, idx, p in _ports(planned):
        by_service[id(svc)].append((idx, p))
        services[id(svc)] = svc
    owners: dict[tuple[str, ...], PlannedService] = {}
    losers: set[int] = set()
    # Input order breaks the last tie (two copies of one Service): sorted() is stable.
    for svc in sorted(services.values(), key=_age):
        mine: dict[tuple[str, ...], str] = {}
        problem = None
        for idx, p in by_service[id(svc)]:
            for key, what, field in _claims(idx, p):
                other = owners.get(key)
                if other is not None:
                    problem = _conflict(svc, other, what, field)
                elif key in mine and not _same_owner(key, mine[key], what + field):
                    problem = _conflict(svc, svc, what, field)
                else:
                    mine.setdefault(key, what + field)
                    continue
                break
            if problem:
                break
        if problem:
            losers.add(id(svc))
            skipped.append(Problem(problem.origin, problem.field, f"left out: {problem.message}"))
            continue
        for key in mine:
            owners[key] = svc
    return losers
