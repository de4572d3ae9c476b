"""Whether this process may read and change the kernel's packet filter.

Without CAP_NET_ADMIN, nft lists nothing and iptables fails; read naively, that
looks like "the kernel holds no rules" and a diff would propose a full replacement.
Checking the capability first turns it into a clear error instead.
"""

from __future__ import annotations

import os

CAP_NET_ADMIN = 12


def effective_caps() -> int | None:
    """The effective capability set of this process (None where /proc cannot tell)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def net_admin_problem() -> str | None:
    """A one-line explanation when the process lacks CAP_NET_ADMIN, else None."""
    caps = effective_caps()
    if caps is None or caps & (1 << CAP_NET_ADMIN):
        return None
    return (
        f"this command reads and changes the kernel's rules and needs root or "
        f"CAP_NET_ADMIN (running as uid {os.geteuid()} without it); run it with sudo, "
        f"or use 'svcrules compile' to only print the rules"
    )
