"""Who owns a frontend: two Services cannot claim the same IP:port/protocol or
NodePort. Failing names both; skipping keeps the oldest claim (see docs/operations.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from svcrules.errors import InputError, Problem
from svcrules.inputs.load import Inputs
from svcrules.inputs.model import Service
from svcrules.plan.node import PortPlan

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


def _conflict(inputs: Inputs, svc: Service, other: Service, what: str, field: str) -> Problem:
    where = inputs.origin(other)
    return Problem(
        inputs.origin(svc),
        field,
        f"{what} is already claimed by Service "
        f"{other.metadata.namespace}/{other.metadata.name}" + (f" ({where})" if where else ""),
    )


def _same_owner(key: tuple[str, ...], old: str, new: str) -> bool:
    """One Service may name a frontend twice (its ClusterIP among its externalIPs, one
    port in both families), but not give one NodePort to two of its ports."""
    return key[0] != "nodePort" or old == new


def check_claims(
    inputs: Inputs,
    ports: list[tuple[Service, int, PortPlan]],
    skipped: list[Problem] | None = None,
) -> set[int]:
    """Two Services cannot own the same IP:port/protocol or NodePort (say which two).

    Without ``skipped``, every conflict is an InputError. With it, the Service created
    first (metadata.creationTimestamp; then without one, in namespace/name order)
    keeps its claims; a Service that conflicts with one kept, or with itself, is left
    out whole, reported in ``skipped``, and its ``id()`` returned."""
    if skipped is not None:
        return _skip_conflicts(inputs, ports, skipped)
    problems: list[Problem] = []
    owners: dict[tuple[str, ...], tuple[Service, str]] = {}
    for svc, idx, p in ports:
        for key, what, field in _claims(idx, p):
            old = owners.get(key)
            if old is None:
                owners[key] = (svc, what + field)
            elif not (old[0] is svc and _same_owner(key, old[1], what + field)):
                problems.append(_conflict(inputs, svc, old[0], what, field))
    if problems:
        raise InputError(problems)
    return set()


def _age(svc: Service) -> tuple[bool, float, str, str]:
    ts = svc.metadata.creation_timestamp
    return (ts is None, ts.timestamp() if ts else 0.0, svc.metadata.namespace, svc.metadata.name)


def _skip_conflicts(
    inputs: Inputs, ports: list[tuple[Service, int, PortPlan]], skipped: list[Problem]
) -> set[int]:
    by_service: dict[int, list[tuple[int, PortPlan]]] = defaultdict(list)
    services: dict[int, Service] = {}
    for svc, idx, p in ports:
        by_service[id(svc)].append((idx, p))
        services[id(svc)] = svc
    owners: dict[tuple[str, ...], Service] = {}
    losers: set[int] = set()
    # Input order breaks the last tie (two copies of one Service): sorted() is stable.
    for svc in sorted(services.values(), key=_age):
        mine: dict[tuple[str, ...], str] = {}
        problem = None
        for idx, p in by_service[id(svc)]:
            for key, what, field in _claims(idx, p):
                other = owners.get(key)
                if other is not None:
                    problem = _conflict(inputs, svc, other, what, field)
                elif key in mine and not _same_owner(key, mine[key], what + field):
                    problem = _conflict(inputs, svc, svc, what, field)
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
