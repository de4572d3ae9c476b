"""Words about a change: the ``diff`` and ``apply`` summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from svcrules.kernel.reconcile import Change


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
        lines.append(tx.describe())
    return "\n".join(lines) + "\n"
