"""The question ``svcrules trace`` answers (a Packet) and the answer (a Trace).

The JSON form (``Trace.as_json``) is stable and documented in docs/operations.md:
``check --packets`` and scripts compare against it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from svcrules.errors import SvcrulesError

Verdict = Literal["dnat", "reject", "drop", "untouched"]
VERDICTS: tuple[Verdict, ...] = ("dnat", "reject", "drop", "untouched")
PROTOCOLS = ("tcp", "udp", "sctp")


class TraceError(SvcrulesError):
    """The rules hold something the interpreter does not understand, or the packet
    is not one it can follow: a clear refusal instead of a wrong answer."""


class Packet(NamedTuple):
    """The first packet of a new connection.

    ``from_node``: sent by the node's own stack (the output hook), else arriving on
    one of its interfaces (prerouting). ``local``: the node's own addresses, which
    the rules ask about at packet time (``fib ... type local`` / ``addrtype LOCAL``).
    """

    src: str
    dst: str
    port: int
    proto: str = "tcp"
    from_node: bool = False
    local: tuple[str, ...] = ()
    sport: int | None = None  # the source port: known, a Maglev hash of the flow is computed

    def checked(self) -> Packet:
        """This packet with canonical addresses; TraceError for one no rule can meet."""
        src, dst = _address(self.src, "--src"), _address(self.dst, "--dst")
        if src.version != dst.version:
            raise TraceError(f"--src {src} and --dst {dst} are not of the same IP family")
        if self.proto not in PROTOCOLS:
            raise TraceError(f"--proto {self.proto!r}: one of {', '.join(PROTOCOLS)}")
        if not 0 < self.port < 65536:
            raise TraceError(f"--port {self.port}: between 1 and 65535")
        if self.sport is not None and not 0 < self.sport < 65536:
            raise TraceError(f"--sport {self.sport}: between 1 and 65535")
        return self._replace(src=str(src), dst=str(dst))


def _address(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise TraceError(f"{what}: {text!r} is not an IP address") from None


class Step(NamedTuple):
    """One rule a packet matched: where it is and what it says, as written.

    ``when`` names the endpoints whose paths pass here; empty when every path does.
    """

    table: str  # "ip svcrules" (nftables) or "ipv4 nat" (iptables)
    chain: str
    rule: str
    when: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"table": self.table, "chain": self.chain, "rule": self.rule}
        if self.when:
            out["when"] = list(self.when)
        return out


class Pick(NamedTuple):
    """How a rule on the path picks the endpoint: ``numgen random`` or a ``statistic``
    cascade (algorithm "random"), or ``jhash`` (algorithm "maglev").

    A slot is drawn from a table of ``size`` slots, each leading to one endpoint
    (``slots``: how many lead to each); ``size`` is None for iptables, whose cascade
    spells shares as probabilities. A Maglev hash's slot depends on the packet: unless
    it could be computed (``slot``, with the packet's source port), every slot is
    taken to be equally likely, as with random.
    """

    algorithm: Literal["random", "maglev"]
    table: str
    chain: str
    rule: str  # nft: the rule that picks; iptables: "" (the chain's statistic rules)
    size: int | None = None
    seed: int | None = None  # maglev: the hash's seed
    hash: str = ""  # maglev: "flow" (addresses and ports) or "client" (source address)
    fields: tuple[str, ...] = ()  # maglev: what the hash reads, as written
    slot: int | None = None  # the slot the hash gives this packet (0 .. size-1), if known
    slots: tuple[tuple[str, int], ...] = ()  # (endpoint, slots leading to it)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "algorithm": self.algorithm,
            "table": self.table,
            "chain": self.chain,
        }
        if self.rule:
            out["rule"] = self.rule
        if self.size is not None:
            out["table_size"] = self.size
            out["slots"] = dict(self.slots)
        if self.algorithm == "maglev":
            out["seed"] = f"0x{self.seed or 0:x}"
            out["hash"] = self.hash
            out["fields"] = list(self.fields)
            out["slot"] = self.slot
        return out


class Affinity(NamedTuple):
    """ClientIP affinity on the path: the first packet picks, and whether a second
    packet from the same client, evaluated with what the first one recorded,
    reaches the same endpoint on every path."""

    timeout: int
    sticky: bool


@dataclass(frozen=True)
class Trace:
    """What the rules do with a packet.

    ``endpoints``: where a ``dnat`` verdict may send it, each with its probability;
    ``balancing``: the rules that pick among them, and how.
    ``masquerade``: masqueraded whichever endpoint is picked; ``masqueraded``: the
    endpoints whose connections are (all of them when ``masquerade``; with a hairpin,
    the client's own address). ``masquerade_reason``: the rules that decided it.
    """

    packet: Packet
    backend: str
    verdict: Verdict
    endpoints: tuple[str, ...] = ()
    probabilities: dict[str, float] = field(default_factory=dict)
    masquerade: bool = False
    masqueraded: tuple[str, ...] = ()
    masquerade_reason: tuple[Step, ...] = ()
    affinity: Affinity | None = None
    chains: tuple[Step, ...] = ()
    source: str = ""  # "pod", "node" or "outside", as the rules classify it
    balancing: tuple[Pick, ...] = ()  # dnat: how the endpoint is picked, in path order

    def masqueraded_to(self, endpoint: str) -> bool:
        """Whether a connection that lands on ``endpoint`` is masqueraded."""
        return self.masquerade or endpoint in self.masqueraded

    def as_json(self) -> dict[str, Any]:
        p = self.packet
        return {
            "packet": {
                "src": p.src,
                "dst": p.dst,
                "port": p.port,
                "proto": p.proto,
                "from_node": p.from_node,
                "source": self.source,
                "sport": p.sport,
            },
            "backend": self.backend,
            "verdict": self.verdict,
            "endpoints": list(self.endpoints),
            "probabilities": dict(self.probabilities),
            "masquerade": self.masquerade,
            "masqueraded": list(self.masqueraded),
            "masquerade_reason": [s.as_json() for s in self.masquerade_reason],
            "affinity": (
                None
                if self.affinity is None
                else {"timeout": self.affinity.timeout, "sticky": self.affinity.sticky}
            ),
            "chains": [s.as_json() for s in self.chains],
            "balancing": [b.as_json() for b in self.balancing],
        }


def local_addresses(node_ips: Sequence[str], extra: Sequence[str]) -> tuple[str, ...]:
    """The node's own addresses as trace assumes them: its nodeIPs and every
    ``--node-address`` given."""
    return tuple(dict.fromkeys([*node_ips, *extra]))
