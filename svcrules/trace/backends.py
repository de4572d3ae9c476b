"""Which interpreter reads which backend's text."""

from __future__ import annotations

from collections.abc import Callable

from svcrules.trace.model import Packet, Trace, TraceError


def tracer(text: str, backend: str) -> Callable[[Packet], Trace]:
    """Read ``text``, a ruleset as ``backend`` ("nftables" or "iptables") would load
    it (what ``svcrules compile`` prints), once: the function follows one packet
    through it per call."""
    if backend == "nftables":
        from svcrules.trace.nft import nft_tracer

        return nft_tracer(text)
    if backend == "iptables":
        from svcrules.trace.iptables import iptables_tracer

        return iptables_tracer(text)
    raise TraceError(f"unknown backend {backend!r}: nftables or iptables")


def trace(text: str, backend: str, packet: Packet) -> Trace:
    """Follow ``packet`` through ``text`` (see ``tracer``)."""
    return tracer(text, backend)(packet)
