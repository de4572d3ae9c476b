"""Sizes of a compiled ruleset, for metrics and the saved state."""

from __future__ import annotations

from dataclasses import dataclass

from svcrules.compiler import Ruleset
from svcrules.kernel.iptables.restore import parse_restore


@dataclass(frozen=True)
class Stats:
    services: int
    service_ports: int
    endpoints: int
    chains: int
    rules: int
    elements: int


def stats(ruleset: Ruleset, backend: str = "nftables") -> Stats:
    ports = [p for f in ruleset.plan.families for p in f.ports]
    chains = rules = elements = 0
    if backend == "iptables":
        for part in parse_restore(ruleset.iptables).values():
            chains += len(part.chains)
            rules += sum(len(specs) for specs in part.chains.values())
    else:
        for table in ruleset.tables.values():
            for obj in table.objects.values():
                if obj.kind == "chain":
                    chains += 1
                    rules += len(obj.items)
                else:
                    elements += len(obj.items)
    return Stats(
        services=len({p.service for p in ports}),
        service_ports=len(ports),
        endpoints=len(
            {(b.ip, b.port) for p in ports for b in (*p.cluster_backends, *p.local_backends)}
        ),
        chains=chains,
        rules=rules,
        elements=elements,
    )
