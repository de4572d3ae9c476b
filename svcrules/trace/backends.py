"""Which interpreter reads which backend's text."""

from __future__ import annotations

from svcrules.trace.model import Packet, Trace, TraceError


def trace(text: str, backend: str, packet: Packet) -> Trace:
    """Follow ``packet`` through ``text``, a ruleset as ``backend`` ("nftables" or
    "iptables") would load it (what ``svcrules compile`` prints)."""
    if backend == "nftables":
        from svcrules.trace.nft import trace_nft

        return trace_nft(text, packet)
    if backend == "iptables":
        from svcrules.trace.iptables import trace_iptables

        return trace_iptables(text, packet)
    raise TraceError(f"unknown backend {backend!r}: nftables or iptables")
