"""``svcrules trace --kernel``: what the live kernel does with one packet.

``svcrules trace`` predicts the fate of a packet from the compiled rules; this asks
the kernel the same question, so that prediction and reality can be compared:

1. A temporary trace rule marks the packet (source, destination, protocol and
   destination port; any source port) as it enters the prerouting and output hooks,
   before NAT: nftables, a table ``<table>-trace`` of its own at priority raw
   (``meta nftrace set 1``); iptables, a chain ``<P>-TRACE`` in the raw table
   (``-j TRACE``) with a jump from PREROUTING and OUTPUT.
2. The kernel reports every rule the marked packet matches. nftables: read with
   ``nft monitor``; iptables-nft: with ``xtables-monitor --trace`` (IPv6: with
   ``nft monitor``); iptables-legacy logs them through nf_log, which svcrules points
   at nfnetlink_log for the duration and reads itself.
3. The packet is sent by the function itself (a TCP connect or a UDP datagram from
   the node), or the function waits for it to arrive from a client.
4. The events of that packet's first trace decide: a drop or reject is read from the
   trace; otherwise the connection's conntrack entry tells whether it was DNATed,
   to which endpoint, and whether it was masqueraded (without ``conntrack``, the
   trace's own packets and NAT rules tell).

Whatever was installed is removed afterwards, on success, error, timeout, Ctrl-C and
SIGTERM alike; a monitor process ends with svcrules even when it is killed, and what
a killed run left is cleared by the next one. The backend modules
(svcrules.kernel.nft.trace, svcrules.kernel.iptables.trace) install the trace rule
and turn what the kernel reports into ``Event``s (svcrules.kernel.trace_events);
the rest is here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType

from svcrules.errors import NotPermitted
from svcrules.inputs.owned import check_name
from svcrules.kernel.caps import net_admin_problem
from svcrules.kernel.tools import find_tool
from svcrules.kernel.trace_events import POLL, Event, Seen, Tracer, family_of
from svcrules.progress import phase
from svcrules.trace.model import Packet, Step, Trace, TraceError, Verdict

SETTLE = 0.3  # seconds without a new event of the packet: its trace is complete
SETTLE_MAX = 3.0  # and at the latest this long after its first event
CONNECT_TIMEOUT = 1.0  # the packet is traced when it is sent: no need to wait longer
READY_TIMEOUT = 20.0  # for a monitor to start listening (nft reads the ruleset first)

_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Flow:
    """A conntrack entry: the original direction and the reply it expects."""

    src: str
    dst: str
    sport: int | None
    dport: int | None
    reply_src: str
    reply_dst: str
    reply_sport: int | None
    reply_dport: int | None


# ------------------------------------------------------------------ the function


def trace_kernel(
    packet: Packet,
    backend: str,
    *,
    table: str = "svcrules",
    timeout: float = 10.0,
    send: bool | None = None,
    iptables_variant: str | None = None,
) -> Trace:
    """What the kernel does with ``packet``: the rules of svcrules' own tables or
    chains it matched (``chains``), the verdict, the one endpoint it was DNATed to
    (probability 1.0), whether it was masqueraded.

    ``backend``: "nftables" or "iptables" (``iptables_variant`` "nft", "legacy", or
    None for whichever ``iptables`` is). ``table``: svcrules' table name (nftables)
    or the name its chain prefix comes from (iptables). With ``send`` (default:
    ``packet.from_node``) the function sends the packet itself from the node's own
    stack, bound to ``packet.src``, and the Trace's packet says ``from_node``;
    otherwise it waits up to ``timeout`` seconds for the packet to arrive (from a
    client, or from another program on the node when ``from_node``) and says so on
    stderr. Needs CAP_NET_ADMIN. TraceError when no such packet was seen.
    """
    packet = packet.checked()
    sending = packet.from_node if send is None else send
    if not timeout > 0:
        raise TraceError(f"timeout must be more than 0 seconds, not {timeout}")
    if sending and packet.proto == "sctp":
        raise TraceError(
            "svcrules cannot send an SCTP packet itself; send it from a client (without --send)"
        )
    if backend not in ("nftables", "iptables"):
        raise TraceError(f"unknown backend {backend!r}: nftables or iptables")
    if not _TABLE_NAME.match(table):
        raise TraceError(
            f"{table!r} is not a valid table name (a letter, then letters, digits, '_' or '-')"
        )
    check_name(table)
    if problem := net_admin_problem():
        raise NotPermitted(problem)
    tracer = _tracer(packet, backend, table, iptables_variant)
    collector = Collector(packet, packet.sport)
    with _terminate_as_interrupt():
        try:
            tracer.start(time.monotonic() + READY_TIMEOUT)
            if sending:
                collector.sport = send_packet(packet, timeout)
            else:
                print(
                    f"waiting up to {timeout:g} s for {describe(packet)}; send it now",
                    file=sys.stderr,
                    flush=True,
                )
            with phase(f"waiting for the kernel's trace of {describe(packet)}"):
                _collect(tracer, collector, time.monotonic() + timeout)
            events = collector.chosen
            if events is None:
                how = "was sent" if sending else f"arrived within {timeout:g} s"
                raise TraceError(
                    f"no {describe(packet)} {how}: nothing was traced"
                    + ("" if sending else " (is it sent to this node, from that address?)")
                )
            events = tracer.resolve(events)
        finally:
            tracer.close()
    if sending:
        packet = packet._replace(from_node=True)
    first = next((ev.packet for ev in events if ev.packet is not None), None)
    sport = collector.sport or (first.sport if first else None)
    return decide(packet, events, tracer.name, find_flow(packet, sport))


def _tracer(packet: Packet, backend: str, table: str, variant: str | None) -> Tracer:
    if backend == "nftables":
        from svcrules.kernel.nft.trace import NftTracer

        return NftTracer(packet, table)
    if backend == "iptables":
        from svcrules.kernel.iptables.trace import iptables_tracer

        return iptables_tracer(packet, table, variant)
    raise AssertionError(backend)


def hostport(ip: str, port: int | None) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return host if port is None else f"{host}:{port}"


def describe(packet: Packet) -> str:
    return f"{packet.proto} {packet.src} -> {hostport(packet.dst, packet.port)}"


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so that the trace rule is removed
    (only from the main thread, and only where nobody else handles SIGTERM)."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ------------------------------------------------------------ sending, waiting


def send_packet(packet: Packet, timeout: float) -> int:
    """Send the first packet of a connection from ``packet.src`` (and ``packet.sport``,
    if given); return its source port. What happens to it is the trace's to tell, not
    the socket's."""
    family = socket.AF_INET if family_of(packet) == 4 else socket.AF_INET6
    kind = socket.SOCK_STREAM if packet.proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        try:
            if packet.sport is not None:  # the same port again soon: TIME_WAIT allows it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((packet.src, packet.sport or 0))
        except OSError as exc:
            raise TraceError(
                f"cannot send from {packet.src}: {exc.strerror or exc}; with --send the "
                "source must be an address of this node (or send from a client instead)"
            ) from None
        sport = int(sock.getsockname()[1])
        sock.settimeout(min(timeout, CONNECT_TIMEOUT))
        try:
            if packet.proto == "tcp":
                sock.connect_ex((packet.dst, packet.port))
            else:
                sock.sendto(b"svcrules trace\n", (packet.dst, packet.port))
        except OSError:
            pass  # refused, unreachable, timed out: the trace says why
    return sport


class Collector:
    """Sorts events into the traces of single packets and keeps the first trace of
    the packet asked about.

    A trace starts where the packet passes the temporary trace rule. The kernel
    reuses trace ids (a connection's later packets may carry its first one's), so
    the same key passing the trace rule again in a hook it already passed starts the
    next packet's trace; passing it in the other hook (a packet the node sends to
    itself comes back in through prerouting) continues the same one.
    """

    def __init__(self, packet: Packet, sport: int | None = None) -> None:
        self.packet = packet
        self.sport = sport
        self.chosen: list[Event] | None = None
        self.first_at = 0.0
        self.last_at = 0.0
        self._current: dict[str, list[Event]] = {}
        self._hooks: dict[str, set[bool | None]] = {}

    def add(self, events: Sequence[Event], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for ev in events:
            group = self._current.get(ev.key)
            if ev.tracer and ev.start:
                hook = ev.packet.inbound if ev.packet else None
                hooks = self._hooks.setdefault(ev.key, set())
                if group is None or hook in hooks:
                    group = self._current[ev.key] = []
                    hooks.clear()
                    if self.chosen is None and self.matches(ev.packet):
                        self.chosen = group
                        self.first_at = now
                hooks.add(hook)
            elif group is None:
                continue  # a packet that passed the trace rule before we listened
            group.append(ev)
            if group is self.chosen:
                self.last_at = now

    def matches(self, seen: Seen | None) -> bool:
        """Whether a packet at the trace rule is the first packet asked about (the
        rule already matched addresses, protocol and port)."""
        if seen is None:
            return True
        p = self.packet
        if not (_same_ip(seen.src, p.src) and _same_ip(seen.dst, p.dst)):
            return False
        if seen.dport is not None and seen.dport != p.port:
            return False
        if self.sport is not None and seen.sport is not None and seen.sport != self.sport:
            return False
        return not (p.proto == "tcp" and seen.syn is False)

    def done(self, now: float) -> bool:
        if self.chosen is None:
            return False
        return now - self.last_at >= SETTLE or now - self.first_at >= SETTLE_MAX


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _collect(tracer: Tracer, collector: Collector, until: float) -> None:
    """Read events until the packet's trace is complete or ``until`` passes without it."""
    while True:
        now = time.monotonic()
        if collector.done(now) or (collector.chosen is None and now >= until):
            return
        wait = POLL if collector.chosen is not None else min(POLL * 4, max(0.0, until - now))
        ready, _, _ = select.select([tracer.fileno()], [], [], wait)
        if ready:
            collector.add(tracer.read())


# ------------------------------------------------------------------- deciding


def decide(packet: Packet, events: Sequence[Event], backend: str, flow: Flow | None) -> Trace:
    """The answer from one packet's events and its conntrack entry."""
    steps = tuple(
        # as svcrules writes a rule: iptables' "-A CHAIN " is already in the chain
        Step(ev.table, ev.chain, ev.rule.removeprefix(f"-A {ev.chain} "))
        for ev in events
        if ev.own and ev.kind == "rule"
    )
    verdict: Verdict | None = None
    for ev in events:
        if ev.verdict == "drop":
            verdict = "reject" if ev.rejects else "drop"
            break
    endpoint = ""
    masquerade = False
    if verdict is None:
        if flow is not None:
            if (flow.reply_src, flow.reply_sport) != (flow.dst, flow.dport):
                endpoint = hostport(flow.reply_src, flow.reply_sport)
            # Masquerading to the address the packet already had changes nothing
            # conntrack shows: the masquerade rule the trace passed tells.
            masquerade = flow.reply_dst != flow.src or any(ev.masquerades for ev in events)
        else:
            last = next((ev.packet for ev in reversed(events) if ev.packet is not None), None)
            if last is not None and (last.dst, last.dport) != (packet.dst, packet.port):
                endpoint = hostport(last.dst, last.dport)
            masquerade = any(ev.masquerades for ev in events)
        verdict = "dnat" if endpoint else "untouched"
    reason: tuple[Step, ...] = ()
    if masquerade:
        reason = tuple(s for s in steps if "masq" in f"{s.chain} {s.rule}".lower())
    return Trace(
        packet=packet,
        backend=backend,
        verdict=verdict,
        endpoints=(endpoint,) if endpoint else (),
        probabilities={endpoint: 1.0} if endpoint else {},
        masquerade=masquerade,
        masqueraded=(endpoint,) if masquerade and endpoint else (),
        masquerade_reason=reason,
        chains=steps,
    )


# ------------------------------------------------------------------ conntrack


_KV = re.compile(r"\b(src|dst|sport|dport)=(\S+)")


def parse_conntrack(text: str) -> list[Flow]:
    """``conntrack -L`` lines: the first src/dst/sport/dport of each are the original
    direction, the second the reply."""
    flows = []
    for line in text.splitlines():
        orig: dict[str, str] = {}
        reply: dict[str, str] = {}
        for key, value in _KV.findall(line):
            (reply if key in orig else orig)[key] = value
        if "src" in orig and "dst" in orig and "src" in reply and "dst" in reply:
            flows.append(
                Flow(
                    orig["src"],
                    orig["dst"],
                    _int(orig.get("sport")),
                    _int(orig.get("dport")),
                    reply["src"],
                    reply["dst"],
                    _int(reply.get("sport")),
                    _int(reply.get("dport")),
                )
            )
    return flows


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def find_flow(packet: Packet, sport: int | None) -> Flow | None:
    """The conntrack entry of the traced connection; None without one (a dropped
    packet has none) or without the conntrack tool."""
    tool = find_tool("conntrack")
    if tool is None:
        return None
    family = "ipv4" if family_of(packet) == 4 else "ipv6"
    cmd = [tool, "-L", "-f", family, "-p", packet.proto, "-s", packet.src, "-d", packet.dst]
    cmd += ["--dport", str(packet.port)]
    if sport is not None:
        cmd += ["--sport", str(sport)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    flows = parse_conntrack(proc.stdout)
    return flows[0] if flows else None
