"""The trace events of nftables as ``nft monitor`` prints them: those of svcrules'
nftables tables, and those of iptables-nft's, whose rules are nftables rules too.

``nft monitor`` prints them as text (``nft -j monitor trace`` prints the same text on
nft 1.0.6), one line each::

    trace id 1ac8368a ip svcrules nat-prerouting packet: iif "eth0" ... ip saddr ...
    trace id 1ac8368a ip svcrules services rule ip daddr . … vmap @service-ips (verdict goto svc-…)
    trace id 1ac8368a ip svcrules no-endpoints rule reject (verdict drop)
    trace id 1ac8368a ip svcrules nat-postrouting policy accept

The ``packet:`` line describes the packet as the base chain after it sees it. nft
names a rule it does not have in its cache (one added after the monitor started)
``unknown rule handle N``. A rule's verdict drop may be its reject.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from svcrules.kernel.trace_events import Event, Seen

_LINE = re.compile(
    r"^trace id (?P<id>[0-9a-f]+) (?P<family>\S+) (?P<table>\S+) (?P<chain>\S+) (?P<rest>.*?)\s*$"
)
_RULE = re.compile(
    r"^(?:rule (?P<rule>.*)|unknown rule handle (?P<handle>\d+)) "
    r"\(verdict (?P<verdict>[a-z]+)(?: (?P<target>[^)]*))?\)$"
)
_RETURN = re.compile(r"^\(verdict (?P<verdict>[a-z]+)(?: (?P<target>[^)]*))?\)$")
_WORD = r"(?:^|\s)%s(?:\s|$)"


class NftParser:
    """Turns ``nft monitor`` lines into Events. ``tracer(table, chain)``: whether a
    chain is the temporary trace rule's; ``own(table, chain, target)``: whether a
    rule there (going to ``target``) is svcrules'; tables as "ip NAME"."""

    def __init__(
        self,
        proto: str,
        tracer: Callable[[str, str], bool],
        own: Callable[[str, str, str], bool],
    ) -> None:
        self.tracer = tracer
        self.own = own
        self.proto = proto
        self._packets: dict[str, Seen] = {}
        self._fresh: set[str] = set()  # ids whose next event starts a base chain's pass

    def feed(self, lines: list[str]) -> list[Event]:
        out = []
        for line in lines:
            ev = self.line(line)
            if ev is not None:
                out.append(ev)
        return out

    def line(self, line: str) -> Event | None:
        m = _LINE.match(line)
        if m is None:
            return None
        key, rest = m["id"], m["rest"]
        table = f"{m['family']} {m['table']}"
        if rest.startswith("packet:"):
            self._packets[key] = parse_packet(rest[len("packet:") :], self.proto)
            self._fresh.add(key)
            return None
        if rest.startswith("policy "):
            kind, rule, verdict, target, handle = "policy", "", rest.split()[1], "", None
        elif r := _RULE.match(rest):
            kind, rule, verdict, target = "rule", r["rule"] or "", r["verdict"], r["target"] or ""
            handle = int(r["handle"]) if r["handle"] else None
        elif r := _RETURN.match(rest):
            kind, rule, verdict, target, handle = (
                "return",
                "",
                r["verdict"],
                r["target"] or "",
                None,
            )
        else:
            return None
        start = key in self._fresh
        self._fresh.discard(key)
        return Event(
            key=key,
            table=table,
            chain=m["chain"],
            kind=kind,
            rule=rule,
            verdict=verdict,
            target=target.strip(),
            packet=self._packets.get(key),
            handle=handle,
            tracer=self.tracer(table, m["chain"]),
            start=start,
            own=kind == "rule" and self.own(table, m["chain"], target.strip()),
            rejects=has_word(rule, "reject"),
            masquerades=has_word(rule, "masquerade") and verdict != "drop",
        )


def has_word(rule: str, word: str) -> bool:
    return re.search(_WORD % word, rule) is not None


def parse_packet(desc: str, proto: str) -> Seen:
    """The packet of a ``packet:`` line (``iif "eth0" ... ip saddr A ip daddr B ...
    tcp sport 1 tcp dport 2 tcp flags == syn ...``)."""
    src = re.search(r"\bip6? saddr (\S+)", desc)
    dst = re.search(r"\bip6? daddr (\S+)", desc)
    sport = re.search(r"\b(?:tcp|udp|sctp|udplite|dccp) sport (\d+)", desc)
    dport = re.search(r"\b(?:tcp|udp|sctp|udplite|dccp) dport (\d+)", desc)
    syn: bool | None = None
    if proto == "tcp" and (flags := re.search(r"\btcp flags == (\S+(?: \| \S+)*)", desc)):
        value = flags[1]
        if value.startswith("0x"):
            bits = int(value, 16)
            syn = bool(bits & 0x02) and not bits & 0x10
        else:
            names = {n.strip() for n in value.split("|")}
            syn = "syn" in names and "ack" not in names
    return Seen(
        src=src[1] if src else "",
        dst=dst[1] if dst else "",
        sport=int(sport[1]) if sport else None,
        dport=int(dport[1]) if dport else None,
        inbound=re.search(r'(?:^|\s)iif "', desc) is not None,
        syn=syn,
    )
