"""Sizes of a compiled ruleset, for metrics and the saved state."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from svcrules.compiler import Ruleset


@dataclass(frozen=True)
class Stats:
    services: int
    service_ports: int
    endpoints: int
    chains: int
    rules: int
    elements: int
    # Service ports (per family) with no usable endpoint anywhere (every frontend
    # rejects), and with a Local traffic policy but no local endpoint while the cluster
    # has some, counted as kube-proxy counts kubeproxy_sync_proxy_rules_no_local_endpoints_total
    # (internal: internalTrafficPolicy Local, ClusterIP traffic drops; external:
    # externalTrafficPolicy Local on a port with external frontends, outside traffic drops).
    no_endpoints: int = 0
    no_local_internal: int = 0
    no_local_external: int = 0

    @classmethod
    def of(cls, counts: dict[str, int]) -> Stats:
        """The sizes a state summary recorded (0 for any it lacks)."""
        return cls(**{f.name: int(counts.get(f.name, 0)) for f in fields(cls)})


def stats(ruleset: Ruleset, sizes: tuple[int, int, int]) -> Stats:
    """The plan's sizes, and the backend's chains, rules and elements (Driver.sizes)."""
    from svcrules.plan.node import Route

    ports = [p for f in ruleset.plan.families for p in f.ports]
    chains, rules, elements = sizes
    return Stats(
        services=len({p.service for p in ports}),
        service_ports=len(ports),
        endpoints=len(
            {(b.ip, b.port) for p in ports for b in (*p.cluster_backends, *p.local_backends)}
        ),
        chains=chains,
        rules=rules,
        elements=elements,
        no_endpoints=sum(p.internal_route is Route.REJECT for p in ports),
        no_local_internal=sum(p.internal_route is Route.DROP for p in ports),
        no_local_external=sum(p.has_external and p.external_route is Route.DROP for p in ports),
    )
