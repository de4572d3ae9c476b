"""Stale UDP conntrack entries, removed after endpoints change.

UDP has no connection end: a client keeps sending to the backend its conntrack
entry points at, even after that backend is gone. As kube-proxy does, entries
that were DNATed to a removed endpoint are deleted, and so are entries to a
Service's frontends made while it had no endpoints. TCP entries are left alone.

The ``conntrack`` program (conntrack-tools) does the work: it is the
netfilter project's own tool, packaged everywhere nftables is; no Python
netlink library for conntrack is as well kept.
"""

from __future__ import annotations

import subprocess

from svcrules.kernel.state import UdpPort
from svcrules.kernel.tools import find_tool


def cleanup_commands(old: dict[str, UdpPort], new: dict[str, UdpPort]) -> list[list[str]]:
    """The conntrack deletions that an update from ``old`` to ``new`` calls for."""
    cmds: list[list[str]] = []
    for key in sorted(old):
        before = old[key]
        after = new.get(key)
        gone = sorted(set(before.endpoints) - set(after.endpoints if after else []))
        for ep in gone:
            for ip in before.frontends:
                cmds.append(["-D", "-p", "udp", "--orig-dst", ip, "--dst-nat", ep])
            if before.node_port:
                cmds.append(
                    ["-D", "-p", "udp", "--orig-port-dst", str(before.node_port), "--dst-nat", ep]
                )
    for key in sorted(new):
        after = new[key]
        previous = old.get(key)
        # Only a port that existed without endpoints: a port new to this node had no
        # frontend here, so no entry can point through it (and a first run would
        # otherwise call conntrack once per UDP port).
        if after.endpoints and previous is not None and not previous.endpoints:
            for ip in after.frontends:
                cmds.append(
                    ["-D", "-p", "udp", "--orig-dst", ip, "--orig-port-dst", str(after.port)]
                )
            if after.node_port:
                cmds.append(["-D", "-p", "udp", "--orig-port-dst", str(after.node_port)])
    return cmds


def run_cleanup(cmds: list[list[str]]) -> list[str]:
    """Run the deletions; return problems (a missing tool is one), never raise."""
    if not cmds:
        return []
    tool = find_tool("conntrack")
    if tool is None:
        return [
            "conntrack not found (install the OS package 'conntrack'): stale UDP "
            "entries were not removed"
        ]
    problems = []
    for args in cmds:
        proc = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
        # Exit 1 with "0 flow entries" just means nothing matched.
        if proc.returncode != 0 and "0 flow entries" not in proc.stderr:
            problems.append(f"conntrack {' '.join(args)}: {proc.stderr.strip()}")
    return problems
