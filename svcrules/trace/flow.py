"""One path of a packet through the node, and how all its paths add up to a Trace.

A packet's path forks where the rules draw at random (``numgen random``,
``statistic --probability``); each fork is a ``Flow`` that carries its own
probability, its own translation and the rules it matched. ``follow`` walks the
hooks in the order the kernel does for a new connection, asking a ``Walker`` over
the backend's parsed chains to run each; ``summarize`` turns the finished flows into
one answer, and refuses (``TraceError``) when they disagree in a way no answer
could say.
"""

from __future__ import annotations

import heapq
import ipaddress
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from svcrules.trace.model import Affinity, Packet, Pick, Step, Trace, TraceError, Verdict

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
# An endpoint as both backends write it in a DNAT: "ip:port" or "[ip6]:port".
ENDPOINT = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>\d+)$")
MAX_DEPTH = 64  # jumps and gotos in a row: svcrules' rules nest at most four deep


@dataclass
class Flow:
    """The state of one path: the packet as the rules have changed it so far."""

    src: IPAddress
    dst: IPAddress
    port: int
    proto: str
    from_node: bool
    local: frozenset[IPAddress]
    orig_dst: IPAddress
    orig_port: int
    prob: float = 1.0
    mark: int = 0
    endpoint: str | None = None  # set by DNAT, as "ip:port" or "[ip]:port"
    masquerade: bool = False
    marked_by: tuple[Step, ...] = ()  # the rules that set the masquerade mark
    masqueraded_by: tuple[Step, ...] = ()  # the rules that masqueraded
    verdict: Verdict | None = None  # drop or reject once decided
    path: list[Step] = field(default_factory=list)
    # ClientIP affinity: what the rules find (pins) and what this path recorded.
    pins: frozenset[Hashable] = frozenset()
    recorded: tuple[Hashable, ...] = ()
    affinity_timeout: int | None = None
    sport: int | None = None  # the source port, when the question gives it
    picks: tuple[Pick, ...] = ()  # the rules that drew a slot on this path

    @property
    def family(self) -> int:
        return self.src.version

    def fork(self, prob: float) -> Flow:
        """A copy that takes this path with probability ``prob`` of the current one."""
        return replace(self, prob=self.prob * prob, path=list(self.path))

    def picked(self, pick: Pick) -> Flow:
        """This flow, having passed ``pick`` (once, however many of its rules ran)."""
        if pick not in self.picks:
            self.picks = (*self.picks, pick)
        return self

    def is_local(self, addr: IPAddress) -> bool:
        """``fib ... type local`` / ``addrtype LOCAL``: one of the node's addresses."""
        return addr in self.local or any(addr in net for net in LOOPBACK)

    def dnat(self, addr: IPAddress, port: int) -> None:
        self.dst, self.port = addr, port
        self.endpoint = f"{addr}:{port}" if addr.version == 4 else f"[{addr}]:{port}"


# (flow, verdict): None to go on with the next rule; "miss" when a map lookup found
# nothing (the rule did not match); "accept", "drop", "reject", "return",
# "jump CHAIN" or "goto CHAIN"; "end" when a chain ran out or returned.
Outcome = tuple["Flow", str | None]


class Rule(Protocol):
    @property
    def text(self) -> str: ...

    @property
    def sets_mark(self) -> bool:
        """Marks the connection for masquerading."""
        ...

    def run(self, flow: Flow) -> list[Outcome] | None:
        """The flows after this rule, or None when its matches do not hold."""
        ...


class Chain(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def rules(self) -> Sequence[Rule]: ...


class Table(Protocol):
    @property
    def label(self) -> str: ...

    @property
    def chains(self) -> Mapping[str, Chain]: ...


class Walker:
    """Runs rules the way both nftables and iptables do: jump returns, goto does not,
    a base chain's end or return falls through to its policy (accept: svcrules never
    writes another), accept ends one base chain, drop and reject end the packet."""

    def __init__(self, base: Iterable[tuple[str, int, Table, Chain]]) -> None:
        self.base: dict[str, list[tuple[int, str, Table, Chain]]] = {}
        for hook, prio, table, chain in base:
            self.base.setdefault(hook, []).append(
                (prio, f"{table.label} {chain.name}", table, chain)
            )
        for chains in self.base.values():
            chains.sort(key=lambda x: x[:2])

    def run(self, flow: Flow, hook: str) -> list[Flow]:
        flows = [flow]
        for _prio, _name, table, chain in self.base.get(hook, []):
            nxt: list[Flow] = []
            for f in flows:
                if f.verdict is not None:
                    nxt.append(f)
                    continue
                for g, verdict in self._chain(f, table, chain, 0):
                    if verdict == "drop":
                        g.verdict = "drop"
                    elif verdict == "reject":
                        g.verdict = "reject"
                    nxt.append(g)
            flows = nxt
        return flows

    def _chain(self, f: Flow, t: Table, chain: Chain, depth: int) -> list[Outcome]:
        if depth > MAX_DEPTH:
            raise TraceError(f"chain {chain.name}: jumps nest more than {MAX_DEPTH} deep")
        return self._rules(f, t, chain, 0, depth)

    def _rules(self, f: Flow, t: Table, chain: Chain, i: int, depth: int) -> list[Outcome]:
        while i < len(chain.rules):
            rule = chain.rules[i]
            results = rule.run(f)
            if results is None:
                i += 1
                continue
            out: list[Outcome] = []
            for g, verdict in results:
                if verdict == "miss":
                    out.extend(self._rules(g, t, chain, i + 1, depth))
                    continue
                g.path.append(Step(t.label, chain.name, rule.text))
                if rule.sets_mark and not g.marked_by:
                    g.marked_by = tuple(g.path[-2:])
                if g.masquerade and not g.masqueraded_by:
                    g.masqueraded_by = (g.path[-1],)
                out.extend(self._after(g, t, chain, i, depth, verdict))
            return out
        return [(f, "end")]

    def _after(
        self, g: Flow, t: Table, chain: Chain, i: int, depth: int, verdict: str | None
    ) -> list[Outcome]:
        """Where a flow goes after a matching rule."""
        if verdict is None:
            return self._rules(g, t, chain, i + 1, depth)
        if verdict == "return":
            return [(g, "end")]
        kind, _sp, target = verdict.partition(" ")
        if kind not in ("jump", "goto"):
            return [(g, verdict)]
        if target not in t.chains:
            raise TraceError(f"{t.label} {chain.name}: no chain {target!r} to {kind} to")
        out: list[Outcome] = []
        for h, v in self._chain(g, t, t.chains[target], depth + 1):
            if v != "end":
                out.append((h, v))
            elif kind == "jump":
                out.extend(self._rules(h, t, chain, i + 1, depth))
            else:  # goto: the chain's end returns to the caller of this chain
                out.append((h, "end"))
        return out


def endpoint_key(ep: str) -> tuple[int, bytes, int]:
    """Endpoints in address order, IPv4 first."""
    m = ENDPOINT.match(ep)
    if m is None:
        return (0, ep.encode(), 0)
    addr = ipaddress.ip_address(m.group("v4") or m.group("v6"))
    return addr.version, addr.packed, int(m.group("port"))


def parse_address(text: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise TraceError(f"{what}: {text!r} is not an IP address") from None


def start(packet: Packet) -> Flow:
    """The first flow of a packet, its addresses checked."""
    packet = packet.checked()
    src, dst = ipaddress.ip_address(packet.src), ipaddress.ip_address(packet.dst)
    local = frozenset(parse_address(a, "--node-address") for a in packet.local)
    if packet.from_node:
        local |= {src}  # the node sends only from its own addresses
    return Flow(
        src,
        dst,
        packet.port,
        packet.proto,
        packet.from_node,
        local,
        dst,
        packet.port,
        sport=packet.sport,
    )


def follow(flow: Flow, hooks: Walker) -> list[Flow]:
    """Every path of a new connection through the hooks: output then postrouting for
    the node's own packets; prerouting, then input (to the node itself) or forward and
    postrouting, for arriving ones (the route follows the address DNAT chose)."""
    first = "output" if flow.from_node else "prerouting"
    done: list[Flow] = []
    for f in hooks.run(flow, first):
        if f.verdict is not None:
            done.append(f)
            continue
        if f.from_node:
            rest = ["postrouting"]
        elif f.is_local(f.dst):
            rest = ["input"]
        else:
            rest = ["forward", "postrouting"]
        flows = [f]
        for hook in rest:
            flows = [g for h in flows for g in ([h] if h.verdict else hooks.run(h, hook))]
        done.extend(flows)
    return done


def second_packet(leaf: Flow, packet: Packet, hooks: Walker) -> set[str | None]:
    """Where a second connection from the same client goes, given what the first
    one recorded for ClientIP affinity (the endpoints it can reach)."""
    again = start(packet)
    again.pins = frozenset(leaf.recorded)
    return {f.endpoint for f in follow(again, hooks)}


def _merge_paths(flows: Sequence[Flow]) -> tuple[Step, ...]:
    """Every rule matched on any path, once, in an order every path agrees with (the
    rules before a fork, each branch in turn, then what the branches share again). A
    rule only some paths pass names where those paths end."""
    labels: dict[Step, set[str]] = {}
    first: dict[Step, tuple[int, int]] = {}
    after: dict[Step, set[Step]] = {}
    before: dict[Step, int] = {}
    for n, f in enumerate(flows):
        label = f.endpoint or f.verdict or "untouched"
        for k, s in enumerate(f.path):
            labels.setdefault(s, set()).add(label)
            if s not in first:
                first[s] = (n, k)
                before[s] = 0
                after[s] = set()
        for a, b in zip(f.path, f.path[1:], strict=False):
            if b not in after[a] and a != b:
                after[a].add(b)
                before[b] += 1
    ready = [(first[s], s) for s, count in before.items() if count == 0]
    heapq.heapify(ready)
    order: list[Step] = []
    while ready:
        _key, s = heapq.heappop(ready)
        order.append(s)
        for b in after[s]:
            before[b] -= 1
            if before[b] == 0:
                heapq.heappush(ready, (first[b], b))
    if len(order) != len(first):  # paths disagree on the order: first appearance
        order = sorted(first, key=first.__getitem__)
    everywhere = {f.endpoint or f.verdict or "untouched" for f in flows}
    return tuple(
        s if labels[s] == everywhere else s._replace(when=tuple(sorted(labels[s]))) for s in order
    )


def _balancing(flows: Sequence[Flow], endpoints: Sequence[str]) -> tuple[Pick, ...]:
    """The picks on the paths, in path order, each with how many of its slots lead to
    each endpoint: its table's size times the endpoint's share of the paths through it
    (none where the slot was computed: only that one was followed)."""
    out: list[Pick] = []
    for pick in dict.fromkeys(p for f in flows for p in f.picks):
        through = [f for f in flows if pick in f.picks]
        if pick.size is None or pick.slot is not None:
            out.append(pick)
            continue
        total = sum(f.prob for f in through)
        share = {ep: sum(f.prob for f in through if f.endpoint == ep) / total for ep in endpoints}
        slots = tuple((ep, round(share[ep] * pick.size)) for ep in endpoints if share[ep] > 0)
        out.append(pick._replace(slots=slots))
    return tuple(out)


def summarize(
    packet: Packet,
    backend: str,
    flows: Sequence[Flow],
    hooks: Walker,
    source: str,
) -> Trace:
    """One answer from every path of the packet."""
    verdicts: set[Verdict] = {f.verdict or ("dnat" if f.endpoint else "untouched") for f in flows}
    if len(verdicts) != 1:
        raise TraceError(
            "the rules give this packet different verdicts at random "
            f"({', '.join(sorted(verdicts))}): svcrules never writes such rules"
        )
    verdict = verdicts.pop()
    chains = _merge_paths(flows)
    if verdict != "dnat":
        return Trace(packet, backend, verdict, chains=chains, source=source)
    probs: dict[str, float] = {}
    masq: dict[str, set[bool]] = {}
    reasons: dict[str, tuple[Step, ...]] = {}
    for f in flows:
        assert f.endpoint is not None
        probs[f.endpoint] = probs.get(f.endpoint, 0.0) + f.prob
        masq.setdefault(f.endpoint, set()).add(f.masquerade)
        if f.masquerade:
            reasons.setdefault(f.endpoint, f.marked_by + f.masqueraded_by)
    mixed = [ep for ep, values in masq.items() if len(values) > 1]
    if mixed:
        raise TraceError(
            f"connections to {', '.join(mixed)} are masqueraded on some paths only: "
            "svcrules never writes such rules"
        )
    endpoints = tuple(sorted(probs, key=endpoint_key))
    masqueraded = tuple(ep for ep in endpoints if True in masq[ep])
    everywhere = len(masqueraded) == len(endpoints)
    reason = reasons[masqueraded[0]] if masqueraded else ()
    affinity = None
    timeouts = {f.affinity_timeout for f in flows if f.affinity_timeout is not None}
    if timeouts:
        if len(timeouts) > 1:
            seconds = ", ".join(f"{t}s" for t in sorted(timeouts))
            raise TraceError(f"one Service with several affinity timeouts: {seconds}")
        sticky = all(second_packet(f, packet, hooks) == {f.endpoint} for f in flows)
        affinity = Affinity(timeouts.pop(), sticky)
    return Trace(
        packet,
        backend,
        "dnat",
        endpoints=endpoints,
        balancing=_balancing(flows, endpoints),
        probabilities={ep: round(probs[ep], 6) for ep in endpoints},
        masquerade=everywhere,
        masqueraded=masqueraded,
        masquerade_reason=reason,
        affinity=affinity,
        chains=chains,
        source=source,
    )
