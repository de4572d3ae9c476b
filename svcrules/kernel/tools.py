"""Finding the OS tools svcrules runs (nft, iptables-*, conntrack).

cron runs jobs with ``PATH=/usr/bin:/bin``, and systemd units may have a short
PATH too, while Debian installs these tools in ``/usr/sbin`` and ``/sbin``. Like a
system daemon, svcrules looks in the sbin directories as well, so the same command
works from a shell, a timer and a cron line.
"""

from __future__ import annotations

import os
import shutil

SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def search_path() -> str:
    """$PATH first (a user's choice wins), then the system directories.
    ``SVCRULES_TOOL_PATH``, when set, is searched instead of both."""
    forced = os.environ.get("SVCRULES_TOOL_PATH")
    if forced is not None:
        return forced
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    parts += [d for d in SYSTEM_DIRS if d not in parts]
    return os.pathsep.join(parts)


def find_tool(name: str) -> str | None:
    """The full path of an executable ``name``, or None."""
    return shutil.which(name, path=search_path())
