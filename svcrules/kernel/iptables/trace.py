"""``trace --kernel`` with iptables: a chain ``<P>-TRACE`` in the raw table holds one
``-j TRACE`` rule for the packet, and PREROUTING and OUTPUT jump to it (first rule)
for the duration. Where the kernel reports the rules the packet matches depends on
the variant:

- iptables-nft: TRACE is nftables' ``meta nftrace set 1``, and ``xtables-monitor
  --trace`` prints the events with each rule as iptables writes it::

      PACKET: 2 c6d7acb3 IN=eth0 ... SRC=192.0.2.100 DST=203.0.113.10 ... SPORT=43632 DPORT=80 SYN
       TRACE: 2 c6d7acb3 nat:SVCRULES-SERVICES:rule:0x14:GOTO:SVCRULES-SVC-PK5W…  -4 -t nat -A …

  For IPv6 the events come from ``nft monitor`` when nft is at hand: xtables-monitor
  1.8.9 stops at the first IPv6 rule that matches a protocol ("unsupported layer 4
  protocol value"). nft prints the rules in its own syntax; each is then found by
  its position in its chain and shown as ip6tables writes it.

- iptables-legacy: TRACE logs through the network namespace's nf_log logger for the
  family. The kernel log is out of reach outside the host's own namespace (unless
  ``nf_log_all_netns``, a host-wide switch, is on), so the logger is switched to
  nfnetlink_log for the duration (``net.netfilter.nf_log.2``, ``.10``; put back
  afterwards) and svcrules reads group 0 itself. Each message carries the packet and
  a prefix ``TRACE: nat:SVCRULES-SERVICES:rule:1``: the rules are looked up by number
  in ``iptables-legacy-save`` afterwards, and their verdicts read from their targets.
  iptables-legacy reports an unconditional ``-j DROP`` / ``ACCEPT`` / ``RETURN`` that
  ends a chain as that chain's ``return``: a ``return`` numbered within the chain's
  rules is that rule. Another program that listens on nfnetlink_log group 0 (ulogd)
  makes the trace impossible: that is an error.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import replace

from svcrules.errors import KernelError
from svcrules.kernel.iptables.restore import BUILTIN, is_own_chain
from svcrules.kernel.iptables.transport import Iptables
from svcrules.kernel.nftrace import NftParser
from svcrules.kernel.tools import find_tool
from svcrules.kernel.trace_events import (
    Event,
    Monitor,
    MonitorEvents,
    Seen,
    family_of,
    removal_failed,
    require_tool,
    run_tool,
)
from svcrules.render.iptables.layout import chain_prefix
from svcrules.trace.model import Packet, TraceError

LOCK_WAIT = "5"
JUMP_COMMENT = "svcrules trace"
HOOKS = ("PREROUTING", "OUTPUT")
_TARGET = re.compile(r"\s-([jg]) (\S+)")
_ACCEPTING = {"ACCEPT", "DNAT", "SNAT", "MASQUERADE", "REDIRECT", "NETMAP"}


def iptables_tracer(
    packet: Packet, table: str, variant: str | None
) -> XtablesTracer | LegacyTracer:
    """The tracer of the variant asked for (None or "auto": what ``iptables`` is)."""
    variant = variant or "auto"
    if variant not in ("auto", "nft", "legacy"):
        raise TraceError(f"unknown iptables variant {variant!r}: nft, legacy or auto")
    if variant == "auto":
        variant = Iptables("auto").name.removeprefix("iptables-")
    if variant == "nft":
        return XtablesTracer(packet, table)
    return LegacyTracer(packet, table)


def rule_target(rule: str) -> tuple[str, str]:
    """("j" or "g", target) of an iptables rule; ("", "") without one."""
    found = _TARGET.findall(rule)
    return found[-1] if found else ("", "")


def verdict_of(rule: str, chains: set[str]) -> tuple[str, str]:
    """(verdict, target chain) that a matched rule gives, from its target (``chains``:
    the names of the table's chains)."""
    how, target = rule_target(rule)
    if not target:
        return "continue", ""
    if target in ("DROP", "REJECT"):
        return "drop", ""
    if target in _ACCEPTING:
        return "accept", ""
    if target == "RETURN":
        return "return", ""
    if how == "g":
        return "goto", target
    if target in chains:
        return "jump", target
    return "continue", ""  # MARK, CONNMARK, LOG, TRACE, CT, ...


def _rule_event(ev: Event, rule: str, prefix: str) -> Event:
    """``ev`` with its rule text and what follows from it."""
    _, target = rule_target(rule)
    return replace(
        ev,
        rule=rule,
        own=ev.kind == "rule" and _is_own(ev, target, prefix),
        rejects="-j REJECT" in rule,
        masquerades="-j MASQUERADE" in rule and ev.verdict != "drop",
    )


def _is_own(ev: Event, target: str, prefix: str) -> bool:
    """A rule of svcrules' chains, or one of its jumps from a built-in chain."""
    if ev.table.endswith(" raw"):
        return False
    return is_own_chain(ev.chain, prefix) or (ev.chain in BUILTIN and is_own_chain(target, prefix))


class _TraceChain:
    """The raw table's trace chain and the jumps to it, with one variant's tool."""

    def __init__(self, packet: Packet, table: str, variant: str) -> None:
        self.packet = packet
        self.prefix = chain_prefix(table)
        self.chain = f"{self.prefix}-TRACE"
        self.family = "ipv4" if family_of(packet) == 4 else "ipv6"
        base = "iptables" if self.family == "ipv4" else "ip6tables"
        name = f"{base}-{variant}"
        self.tool = require_tool(name, "iptables")
        self.save_tool = require_tool(f"{name}-save", "iptables")
        self._installed = False

    def ipt(self, *args: str) -> tuple[int, str]:
        """Run the tool on the raw table: (exit code, stderr)."""
        proc = run_tool([self.tool, "-w", LOCK_WAIT, "-t", "raw", *args])
        return proc.returncode, " ".join(proc.stderr.split())

    def listed(self, table: str, chain: str) -> list[str]:
        """The rules of one chain as iptables writes them ("-A CHAIN …"), in order."""
        proc = run_tool([self.tool, "-w", LOCK_WAIT, "-t", table, "-S", chain])
        return [ln for ln in proc.stdout.splitlines() if ln.startswith("-A ")]

    def _jump(self) -> list[str]:
        return ["-m", "comment", "--comment", JUMP_COMMENT, "-j", self.chain]

    def install(self, note: str = "") -> None:
        """The chain, its rule (commented ``svcrules trace: <note>``) and the jumps."""
        self._installed = True
        self.remove()  # what a killed run left behind
        self._installed = True
        p = self.packet
        match = ["-s", p.src, "-d", p.dst, "-p", p.proto, "--dport", str(p.port)]
        comment = ["-m", "comment", "--comment", f"{JUMP_COMMENT}: {note or 'temporary'}"]
        steps = [["-N", self.chain], ["-A", self.chain, *match, *comment, "-j", "TRACE"]]
        steps += [["-I", hook, "1", *self._jump()] for hook in HOOKS]
        for args in steps:
            rc, err = self.ipt(*args)
            if rc != 0:
                raise KernelError(f"{self.tool} -t raw {' '.join(args)} failed: {err}")

    def exists(self) -> bool:
        return self.ipt("-S", self.chain)[0] == 0

    def left_behind(self) -> str | None:
        """The rule of a trace chain a killed run left behind ("" without a note in
        its comment), or None when there is none."""
        proc = run_tool([self.tool, "-w", LOCK_WAIT, "-t", "raw", "-S", self.chain])
        if proc.returncode != 0:
            return None
        return "".join(ln for ln in proc.stdout.splitlines() if ln.startswith("-A "))

    def remove(self) -> None:
        if not self._installed:
            return
        self._installed = False
        for hook in HOOKS:
            for _ in range(16):  # one each, unless runs were killed
                if self.ipt("-D", hook, *self._jump())[0] != 0:
                    break
        if self.exists():
            self.ipt("-F", self.chain)
            rc, err = self.ipt("-X", self.chain)
            if rc != 0 and self.exists():
                raise removal_failed(
                    f"chain {self.chain} of the raw table",
                    f"{self.tool} -t raw -F {self.chain}; {self.tool} -t raw -X {self.chain}",
                    err,
                )

    def saved(self, tables: set[str]) -> tuple[Chains, Policies]:
        """The rules and policies of ``tables`` as they are now (``parse_save``)."""
        text = "".join(run_tool([self.save_tool, "-t", t]).stdout for t in sorted(tables))
        return parse_save(text)


Chains = dict[tuple[str, str], list[str]]  # (table, chain): its rules, "-A CHAIN …", in order
Policies = dict[tuple[str, str], str]  # (table, chain): its policy ("-" for a user chain)


def parse_save(text: str) -> tuple[Chains, Policies]:
    """The rules and policies of every chain in iptables-save output."""
    rules: Chains = {}
    policies: Policies = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            name, policy = [*line[1:].split(), "", ""][:2]
            policies[(table, name)] = policy
        elif line.startswith("-A "):
            rules.setdefault((table, line.split()[1]), []).append(line)
    return rules, policies


# ------------------------------------------------------------------ iptables-nft


class XtablesParser:
    """Turns ``xtables-monitor --trace`` lines into Events."""

    def __init__(self, trace_chain: str, prefix: str, proto: str) -> None:
        self.trace_chain = trace_chain
        self.prefix = prefix
        self.proto = proto
        self._packets: dict[str, Seen] = {}
        self._fresh: set[str] = set()

    def feed(self, lines: list[str]) -> list[Event]:
        return [ev for line in lines if (ev := self.line(line)) is not None]

    def line(self, line: str) -> Event | None:
        words = line.split()
        if len(words) < 4 or words[0] not in ("PACKET:", "TRACE:"):
            return None
        family = "ipv6" if words[1] == str(socket.AF_INET6) else "ipv4"
        key = words[2]
        if words[0] == "PACKET:":
            self._packets[key] = parse_fields(words[3:], self.proto)
            self._fresh.add(key)
            return None
        spec, _, rule = line.strip().split(None, 3)[3].partition("  ")
        parts = spec.split(":")
        if len(parts) < 4:
            return None
        table, chain, kind = parts[0], parts[1], parts[2]
        target = ""
        if kind == "rule":
            verdict = parts[4] if len(parts) > 4 else ""
            target = ":".join(parts[5:])
        elif kind == "policy":
            verdict = parts[3]
        elif kind == "return":
            verdict = "RETURN"
        else:
            return None
        rule = re.sub(r"^-[46] -t \S+ ", "", rule.strip())
        start = key in self._fresh
        self._fresh.discard(key)
        ev = Event(
            key=key,
            table=f"{family} {table}",
            chain=chain,
            kind=kind,
            verdict=_XT_VERDICTS.get(verdict, verdict.lower()),
            target=target,
            packet=self._packets.get(key),
            tracer=table == "raw" and chain == self.trace_chain,
            start=start,
        )
        return _rule_event(ev, rule, self.prefix)


_XT_VERDICTS = {
    "ACCEPT": "accept",
    "DROP": "drop",
    "CONTINUE": "continue",
    "BREAK": "continue",
    "JUMP": "jump",
    "GOTO": "goto",
    "RETURN": "return",
    "0xfffffffb": "return",  # NFT_RETURN, which xtables-monitor prints as a number
}


def parse_fields(words: list[str], proto: str) -> Seen:
    """The packet of a ``PACKET:`` line (``IN=eth0 … SRC=… DST=… SPORT=… DPORT=… SYN``)."""
    fields: dict[str, str] = {}
    flags: set[str] = set()
    for word in words:
        name, eq, value = word.partition("=")
        if eq:
            fields.setdefault(name, value)
        else:
            flags.add(word)
    return Seen(
        src=fields.get("SRC", ""),
        dst=fields.get("DST", ""),
        sport=int(fields["SPORT"]) if fields.get("SPORT", "").isdigit() else None,
        dport=int(fields["DPORT"]) if fields.get("DPORT", "").isdigit() else None,
        inbound=bool(fields.get("IN")),
        syn=("SYN" in flags and "ACK" not in flags) if proto == "tcp" else None,
    )


class XtablesTracer(MonitorEvents):
    """iptables-nft: the trace chain; the events from ``xtables-monitor --trace``, or
    for IPv6 from ``nft monitor`` when nft is at hand (see the module's text)."""

    def __init__(self, packet: Packet, table: str) -> None:
        self.name = "iptables-nft (kernel)"
        self.rules = _TraceChain(packet, table, "nft")
        self.nft = find_tool("nft")
        self.by_nft = self.rules.family == "ipv6" and self.nft is not None
        self.parser: XtablesParser | NftParser
        if self.by_nft:
            self.parser = iptables_nft_parser(self.rules.chain, self.rules.prefix, packet.proto)
        else:
            self.monitor_tool = require_tool("xtables-monitor", "iptables")
            self.parser = XtablesParser(self.rules.chain, self.rules.prefix, packet.proto)
        self._monitor: Monitor | None = None
        self._early: list[str] = []
        self._raw_existed = True

    def start(self, deadline: float) -> None:
        nft_family = "ip" if self.rules.family == "ipv4" else "ip6"
        if self.nft is not None:
            listed = run_tool([self.nft, "list", "table", nft_family, "raw"])
            # A raw table that holds only what a killed trace left was made by it.
            self._raw_existed = listed.returncode == 0 and self.rules.left_behind() is None
        if self.by_nft:
            assert self.nft is not None
            argv = [self.nft, "monitor"]
        else:
            flag = "-4" if self.rules.family == "ipv4" else "-6"
            argv = [self.monitor_tool, "--trace", "--event", flag]
        self._monitor = Monitor(argv)
        self.rules.install()
        # A monitor prints nothing until it listens: a chain made and deleted until
        # its event shows proves it does.
        sync = f"{self.rules.chain}-SYNC"
        while True:
            self.rules.ipt("-N", sync)
            self.rules.ipt("-X", sync)
            step = min(deadline, time.monotonic() + 0.5)
            if self._monitor.wait_for(sync, step, self._early):
                return
            if time.monotonic() >= deadline:
                name = os.path.basename(argv[0])
                raise KernelError(f"{name} did not start listening: {self._monitor.stderr()}")

    def resolve(self, events: list[Event]) -> list[Event]:
        if not self.by_nft:
            return events
        return as_iptables_writes(events, self.rules.family, self.rules.prefix, self._listings)

    def _listings(self, table: str, chain: str) -> tuple[list[tuple[str, int]], list[str]]:
        return self._nft_rules(table, chain), self.rules.listed(table, chain)

    def _nft_rules(self, table: str, chain: str) -> list[tuple[str, int]]:
        """(rule as nft prints it, without counters; handle) of one chain, in order."""
        assert self.nft is not None
        nft_family = "ip" if self.rules.family == "ipv4" else "ip6"
        proc = run_tool([self.nft, "-a", "list", "chain", nft_family, table, chain])
        out = []
        for line in proc.stdout.splitlines():
            m = re.match(r"^\s*(.*?)\s*# handle (\d+)$", line)
            if m and not line.lstrip().startswith(("chain ", "table ")):
                out.append((_plain(m[1]), int(m[2])))
        return out

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        self.rules.remove()
        if not self._raw_existed:
            # iptables-nft made the raw table for the trace: leave none behind.
            Iptables("nft").drop_if_empty(self.rules.family, "raw")
            self._raw_existed = True


def _plain(rule: str) -> str:
    """An nft rule without its counter values and extra spaces."""
    return " ".join(re.sub(r"\bcounter packets \d+ bytes \d+", "counter", rule).split())


def _position(rules: list[tuple[str, int]], ev: Event) -> int | None:
    """Where in its chain the rule of ``ev`` is: by handle, else by its text."""
    if ev.handle is not None:
        found = [i for i, (_, handle) in enumerate(rules) if handle == ev.handle]
    else:
        found = [i for i, (text, _) in enumerate(rules) if text == _plain(ev.rule)]
    return found[0] if found else None


def iptables_nft_parser(chain: str, prefix: str, proto: str) -> NftParser:
    """The parser of ``nft monitor`` lines of a trace through iptables-nft's tables
    (``chain``: the trace chain in raw; ``prefix``: svcrules' chain prefix)."""
    return NftParser(
        proto,
        tracer=lambda t, c: t.endswith(" raw") and c == chain,
        own=lambda t, c, target: (
            not t.endswith(" raw")
            and (is_own_chain(c, prefix) or (c in BUILTIN and is_own_chain(target, prefix)))
        ),
    )


Listing = Callable[[str, str], tuple[list[tuple[str, int]], list[str]]]


def as_iptables_writes(
    events: list[Event], family: str, prefix: str, listing: Listing
) -> list[Event]:
    """Events parsed from ``nft monitor`` with each table named as iptables does
    ("ipv6 nat") and each rule as iptables writes it. ``listing(table, chain)``: the
    chain's rules as nft lists them (``_plain`` text, handle) and as iptables writes
    them, both in order."""
    chains: dict[tuple[str, str], tuple[list[tuple[str, int]], list[str]]] = {}
    out = []
    for ev in events:
        table = ev.table.split()[-1]
        ev = replace(ev, table=f"{family} {table}")
        if ev.kind == "rule" and table != "raw":
            if (table, ev.chain) not in chains:
                chains[(table, ev.chain)] = listing(table, ev.chain)
            nft_rules, written = chains[(table, ev.chain)]
            at = _position(nft_rules, ev)
            if at is not None and len(written) == len(nft_rules):
                ev = _rule_event(ev, written[at], prefix)
        out.append(ev)
    return out


# --------------------------------------------------------------- iptables-legacy

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_PACKET_HDR = 1
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
HOOK_PREROUTING = 0
COPY_BYTES = 256  # enough for the IP and transport headers
_PREFIX = re.compile(
    r"^TRACE: (?P<table>[^:]+):(?P<chain>.+):(?P<kind>rule|return|policy):(?P<num>\d+)\s*$"
)


def parse_payload(data: bytes, family: int) -> tuple[Seen, str]:
    """The packet of a logged payload (from its IP header) and what tells it apart
    from its connection's other packets all the way through NAT: the source port
    and the IPv4 identification, or for IPv6 the TCP sequence number. (The hook it
    was seen in is in the message, not in the payload: ``inbound`` is left False.)"""
    if family == socket.AF_INET and len(data) >= 20:
        ihl = (data[0] & 0x0F) * 4
        proto = data[9]
        src, dst = str(ipaddress.IPv4Address(data[12:16])), str(ipaddress.IPv4Address(data[16:20]))
        ident = str(struct.unpack_from("!H", data, 4)[0])
        l4 = ihl
    elif family == socket.AF_INET6 and len(data) >= 40:
        proto = data[6]
        src, dst = str(ipaddress.IPv6Address(data[8:24])), str(ipaddress.IPv6Address(data[24:40]))
        ident = ""
        l4 = 40
        while proto in (0, 43, 60, 44) and len(data) >= l4 + 8:  # extension headers
            proto, size = data[l4], 8 if proto == 44 else (data[l4 + 1] + 1) * 8
            l4 += size
    else:
        return Seen("", "", None, None, False), ""
    sport = dport = None
    syn: bool | None = None
    if proto in (6, 17, 132, 136, 33) and len(data) >= l4 + 4:
        sport, dport = struct.unpack_from("!HH", data, l4)
    if proto == 6 and len(data) >= l4 + 14:
        flags = data[l4 + 13]
        syn = bool(flags & 0x02) and not flags & 0x10
        if not ident:
            ident = str(struct.unpack_from("!I", data, l4 + 4)[0])
    return Seen(src, dst, sport, dport, False, syn), f"{sport}/{ident}"


def _attr(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


def _attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + 4 <= end:
        size, kind = struct.unpack_from("=HH", data, offset)
        if size < 4:
            break
        out[kind & 0x7FFF] = data[offset + 4 : offset + size]
        offset += (size + 3) & ~3
    return out


class LegacyParser:
    """Turns nfnetlink_log messages of TRACE into Events (rules resolved later)."""

    def __init__(self, trace_chain: str, prefix: str, family: str) -> None:
        self.trace_chain = trace_chain
        self.prefix = prefix
        self.family = family

    def message(self, family: int, attrs: dict[int, bytes]) -> Event | None:
        prefix = attrs.get(NFULA_PREFIX, b"").rstrip(b"\0").decode(errors="replace")
        m = _PREFIX.match(prefix)
        if m is None:
            return None
        seen, key = parse_payload(attrs.get(NFULA_PAYLOAD, b""), family)
        hdr = attrs.get(NFULA_PACKET_HDR, b"")
        hook = hdr[2] if len(hdr) >= 3 else -1
        seen = replace(seen, inbound=hook == HOOK_PREROUTING)
        table, chain = m["table"], m["chain"]
        tracer = table == "raw" and chain == self.trace_chain
        return Event(
            key=key,
            table=f"{self.family} {table}",
            chain=chain,
            kind=m["kind"],
            handle=int(m["num"]),
            packet=seen,
            tracer=tracer,
            start=tracer,
            verdict="return" if m["kind"] == "return" else "continue",
        )

    def messages(self, data: bytes) -> list[Event]:
        out = []
        offset = 0
        while offset + 16 <= len(data):
            size, kind = struct.unpack_from("=IH", data, offset)
            if size < 16:
                break
            if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET and size >= 20:
                family = data[offset + 16]
                ev = self.message(family, _attrs(data, offset + 20, offset + size))
                if ev is not None:
                    out.append(ev)
            offset += (size + 3) & ~3
        return out

    def resolve(self, events: list[Event], rules: Chains, policies: Policies) -> list[Event]:
        """Each event with its rule (by number) and the verdict its target gives."""
        out = []
        for ev in events:
            table = ev.table.split()[1]
            chain_rules = rules.get((table, ev.chain), [])
            num = ev.handle or 0
            if ev.kind == "policy":
                policy = policies.get((table, ev.chain), "ACCEPT")
                out.append(replace(ev, verdict="drop" if policy == "DROP" else "accept"))
            elif 0 < num <= len(chain_rules):
                rule = chain_rules[num - 1]
                chains = {c for (t, c) in policies if t == table}
                verdict, target = verdict_of(rule, chains)
                ev = replace(ev, kind="rule", verdict=verdict, target=target)
                out.append(_rule_event(ev, rule, self.prefix))
            else:
                out.append(ev)  # the end of a chain
        return out


class LegacyTracer:
    """iptables-legacy: the trace chain, nf_log pointed at nfnetlink_log, group 0."""

    def __init__(self, packet: Packet, table: str) -> None:
        self.name = "iptables-legacy (kernel)"
        self.rules = _TraceChain(packet, table, "legacy")
        self.parser = LegacyParser(self.rules.chain, self.rules.prefix, self.rules.family)
        pf = socket.AF_INET if self.rules.family == "ipv4" else socket.AF_INET6
        self.sysctl = f"/proc/sys/net/netfilter/nf_log/{pf}"
        self._previous: str | None = None
        self._sock: socket.socket | None = None

    def start(self, deadline: float) -> None:
        try:
            with open(self.sysctl, encoding="ascii") as fh:
                previous = fh.read().strip()
        except OSError as exc:
            raise KernelError(f"cannot read {self.sysctl} (nf_log): {exc.strerror}") from None
        # A run killed before it could put nf_log back left its logger in the note
        # of its trace rule.
        left = self.rules.left_behind() or ""
        if previous == "nfnetlink_log" and (m := re.search(r'nf_log was ([^"\s]+)', left)):
            previous = m[1]
        self._listen()
        if previous != "nfnetlink_log":
            self._write_sysctl("nfnetlink_log")
            self._previous = previous
        self.rules.install(note=f"nf_log was {previous}")

    def _write_sysctl(self, value: str) -> None:
        try:
            with open(self.sysctl, "w", encoding="ascii") as fh:
                fh.write(value)
        except OSError as exc:
            raise KernelError(
                f"cannot set {self.sysctl} to {value} ({exc.strerror}): iptables-legacy's "
                "TRACE needs nf_log and nfnetlink_log"
            ) from None

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
        self._config(
            socket.AF_UNSPEC, [_attr(NFULA_CFG_CMD, struct.pack("=B", NFULNL_CFG_CMD_BIND))], 1
        )
        mode = struct.pack("!IBB", COPY_BYTES, NFULNL_COPY_PACKET, 0)
        self._config(socket.AF_UNSPEC, [_attr(NFULA_CFG_MODE, mode)], 2)
        self._config(socket.AF_UNSPEC, [_attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1))], 3)
        sock.setblocking(False)

    def _config(self, family: int, attrs: list[bytes], seq: int) -> None:
        assert self._sock is not None
        body = struct.pack("!BBH", family, 0, 0) + b"".join(attrs)
        kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
        header = struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
        self._sock.send(header + body)
        self._sock.settimeout(5)
        try:
            reply = self._sock.recv(65536)
        except OSError as exc:
            raise KernelError(f"nfnetlink_log did not answer: {exc}") from None
        if len(reply) >= 20 and struct.unpack_from("=H", reply, 4)[0] == NLMSG_ERROR:
            code = -struct.unpack_from("=i", reply, 16)[0]
            if code == errno.EBUSY:
                raise KernelError(
                    "nfnetlink_log group 0 is taken by another program (ulogd?): "
                    "iptables-legacy's TRACE cannot be read while it listens"
                )
            if code:
                raise KernelError(
                    f"nfnetlink_log refused its configuration: {errno.errorcode.get(code, code)}"
                )

    def fileno(self) -> int:
        assert self._sock is not None
        return self._sock.fileno()

    def read(self) -> list[Event]:
        assert self._sock is not None
        out: list[Event] = []
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # events were lost; the rest still count
                    continue
                raise KernelError(f"reading nfnetlink_log: {exc}") from None
            out += self.parser.messages(data)

    def resolve(self, events: list[Event]) -> list[Event]:
        rules, policies = self.rules.saved({ev.table.split()[1] for ev in events})
        return self.parser.resolve(events, rules, policies)

    def close(self) -> None:
        problems = []
        try:
            self.rules.remove()
        except KernelError as exc:
            problems.append(str(exc))
        if self._previous is not None:
            try:
                self._write_sysctl(self._previous)
            except KernelError as exc:
                problems.append(str(exc))
            self._previous = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if problems:
            raise KernelError("; ".join(problems))
