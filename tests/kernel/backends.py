"""Loading a compiled ruleset into the lab's node with either backend.

``nftables`` loads the script with ``nft -f`` (one transaction); the iptables
variants replace svcrules' chains the way ``svcrules apply`` does on its first
run: read what the node holds with iptables-save, then one ``iptables-restore
--noflush`` per table (svcrules.kernel.iptables.restore.full_restore).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

import svcrules
from svcrules.kernel.iptables.restore import (
    FAMILIES,
    TABLES,
    full_restore,
    parse_restore,
    parsed_from_save,
    split_sections,
)

from .lab import Lab

BACKENDS = ("nftables", "iptables-nft", "iptables-legacy")
LOAD_TIMEOUT = 900.0  # bench/ loads 10,000 Services: iptables-nft-restore takes minutes
_PREFIX = re.compile(r"^:(\S+)-STATE ", re.M)


def tool(variant: str, family: str, role: str = "") -> str:
    """iptables-nft-restore, ip6tables-legacy-save, ... (variant "nft" or "legacy")."""
    base = "iptables" if family == "ipv4" else "ip6tables"
    return f"{base}-{variant}{role}"


def available(backend: str) -> bool:
    if backend == "nftables":
        return True
    return shutil.which(tool(backend.split("-", 1)[1], "ipv4", "-restore")) is not None


def require(backend: str) -> None:
    """Skip a test whose backend is not installed; with SVCRULES_REQUIRE_KERNEL=1 (CI),
    fail instead, so that a missing iptables cannot pass silently."""
    if available(backend):
        return
    why = f"{backend} is not installed (Debian: apt-get install iptables)"
    if os.environ.get("SVCRULES_REQUIRE_KERNEL") == "1":
        pytest.fail(f"SVCRULES_REQUIRE_KERNEL=1 but {why}", pytrace=False)
    pytest.skip(why)


def install(lab: Lab, ruleset: svcrules.Ruleset, backend: str) -> str:
    """Replace svcrules' rules in the node with ``ruleset``; return the loaded text."""
    if backend == "nftables":
        lab.load(ruleset.nft)
        return ruleset.nft
    variant = backend.split("-", 1)[1]
    text = ruleset.iptables
    m = _PREFIX.search(text)
    assert m, "no STATE chain in the iptables text"
    existing = {
        (fam, tbl): parsed_from_save(
            lab.exec("node", tool(variant, fam, "-save"), "-t", tbl, timeout=LOAD_TIMEOUT).stdout,
            m.group(1),
        )
        for fam in FAMILIES
        for tbl in TABLES
    }
    tx = full_restore(parse_restore(text), existing)
    for (fam, _), part in split_sections(tx.script()):
        lab.exec(
            "node", tool(variant, fam, "-restore"), "--noflush", input=part, timeout=LOAD_TIMEOUT
        )
    return text


def reset_legacy(lab: Lab) -> None:
    """iptables-legacy tables live outside nft: empty them too (``nft flush ruleset``
    in Lab.reset() takes care of iptables-nft)."""
    for fam in FAMILIES:
        for tbl in TABLES:
            for flag in ("-F", "-X"):
                lab.exec("node", tool("legacy", fam), "-t", tbl, flag)


def save(lab: Lab, backend: str) -> str:
    """Both families' iptables-save output (for comparisons)."""
    variant = backend.split("-", 1)[1]
    return "".join(lab.exec("node", tool(variant, fam, "-save")).stdout for fam in FAMILIES)


def rules_only(save_text: str) -> list[str]:
    """iptables-save output without its timestamps and counters."""
    return [
        re.sub(r" \[\d+:\d+\]$", "", ln)
        for ln in save_text.splitlines()
        if ln and not ln.startswith("#")
    ]
