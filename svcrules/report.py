"""Words and numbers about a change: the ``diff`` summary and the sync metrics."""

from __future__ import annotations

from dataclasses import dataclass

from svcrules.compiler import Ruleset
from svcrules.incremental import parse_script
from svcrules.reconcile import Change


@dataclass(frozen=True)
class Stats:
    services: int
    service_ports: int
    endpoints: int
    chains: int
    rules: int
    elements: int


def stats(ruleset: Ruleset) -> Stats:
    ports = [p for f in ruleset.plan.families for p in f.ports]
    chains = rules = elements = 0
    for table in parse_script(ruleset.nft).values():
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


def summary(change: Change) -> str:
    """What changes, for people: Service ports first, then the kernel objects."""
    old, new = change.old_meta.ports, change.new_meta.ports
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    lines = []
    if change.mode == "full" and not old:
        lines.append(f"Service ports: {len(new)} to program")
    else:
        lines.append(
            f"Service ports: {len(added)} added, {len(removed)} removed, {len(changed)} changed"
        )
        lines += [f"  + {k}" for k in added]
        lines += [f"  - {k}" for k in removed]
        lines += [f"  ~ {k}" for k in changed]
    if change.mode == "noop":
        lines.append("Kernel: no change (0 operations)")
    elif change.mode == "full":
        lines.append(f"Kernel: full replacement ({change.reason}), {change.operations} operations")
    else:
        tx = change.tx
        assert tx is not None
        lines.append(f"Kernel: incremental update, {change.operations} operations")
        lines.append(
            f"  chains +{tx.chains_added} ~{tx.chains_changed} -{tx.chains_removed}; "
            f"sets +{tx.sets_added} -{tx.sets_removed}; "
            f"elements +{tx.elements_added} -{tx.elements_removed}"
        )
    return "\n".join(lines) + "\n"
