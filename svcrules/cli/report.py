"""Words about a change: the ``diff`` and ``apply`` summary, and ``diff -o json``.

Per Service port, what changed (svcrules.plan.review: endpoints, frontends, policies),
from the summary of each port the state directory kept and the new plan's; then what
the kernel receives.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from svcrules.kernel.reconcile import Change
    from svcrules.plan.review import PortChange

# The version of the JSON document (docs/operations.md, "diff -o json"): a key
# may be added within a version, never removed or changed in meaning.
JSON_VERSION = 1


def _split(port_id: str) -> tuple[str, int]:
    """``ns/name:port/PROTO IPv4`` -> (``ns/name:port/PROTO``, 4)."""
    key, _, family = port_id.rpartition(" ")
    return key, int(family.removeprefix("IPv"))


def review(change: Change) -> list[PortChange]:
    """What changed for each Service port, in port order (added, removed and changed
    ones together)."""
    from svcrules.plan.review import Summary, compare

    old, new = change.old_meta, change.new_meta

    def summary(details: Mapping[str, str], port_id: str) -> Summary | None:
        text = details.get(port_id)
        if text is None:
            return None
        try:
            return Summary.parse(text)
        except (ValueError, TypeError, AttributeError):
            return None

    out = []
    for port_id in sorted(set(old.ports) | set(new.ports)):
        before, after = old.ports.get(port_id), new.ports.get(port_id)
        if before == after:
            continue
        key, family = _split(port_id)
        a = summary(old.details, port_id) if before is not None else None
        b = summary(new.details, port_id) if after is not None else None
        kind = "added" if before is None else "removed" if after is None else "changed"
        out.append(compare(key, family, a, b, kind))
    return out


_MARK = {"added": "+", "removed": "-", "changed": "~"}


def summary(change: Change) -> str:
    """What changes, for people: each Service port's change, then the kernel's."""
    old, new = change.old_meta.ports, change.new_meta.ports
    lines = []
    if change.mode == "full" and not old:
        lines.append(f"Service ports: {len(new)} to program")
    else:
        changes = review(change)
        counts = {kind: sum(c.change == kind for c in changes) for kind in _MARK}
        lines.append(
            f"Service ports: {counts['added']} added, {counts['removed']} removed, "
            f"{counts['changed']} changed"
        )
        for c in changes:
            lines.append(f"  {_MARK[c.change]} {c.port} {c.family_name}")
            lines += [f"      {line}" for line in c.lines()]
    if change.mode == "noop":
        lines.append("Kernel: no change (0 operations)")
    elif change.mode == "full":
        lines.append(f"Kernel: full replacement ({change.reason}), {change.operations} operations")
    else:
        tx = change.tx
        assert tx is not None
        lines.append(f"Kernel: incremental update, {change.operations} operations")
        lines.append(tx.describe())
    return "\n".join(lines) + "\n"


def document(change: Change) -> dict[str, Any]:
    """``diff -o json``: the same as ``summary``, complete, for scripts."""
    changes = review(change)
    counts = getattr(change.tx, "counts", None)
    return {
        "version": JSON_VERSION,
        "changed": change.changed,
        "mode": change.mode,
        "reason": change.reason,
        "backend": change.new_meta.backend,
        "table": change.new_meta.table,
        "service_ports": {
            "total": len(change.new_meta.ports),
            **{kind: sum(c.change == kind for c in changes) for kind in _MARK},
        },
        "changes": [c.json() for c in changes],
        "kernel": {
            "operations": change.operations,
            "counts": dataclasses.asdict(counts) if counts is not None else None,
        },
        "invalid": list(change.new_meta.invalid),
        "warnings": list(change.problems),
    }


def as_json(change: Change) -> str:
    return json.dumps(document(change), indent=2) + "\n"
