"""``trace --kernel`` with nftables: a temporary table marks the packet with
``meta nftrace set 1``, ``nft monitor`` reports the rules it matches.

The table is ``<family> <table>-trace`` (``ip svcrules-trace``), its two base chains
hook prerouting and output at priority raw (-300), before conntrack and NAT. A
table of that name is replaced only when its comment shows a trace made it (one
left behind by a killed run); any other is refused.

``nft monitor`` reports what the packet meets (svcrules.kernel.nftrace). Rules of
svcrules' table that nft named only by handle are looked up by handle afterwards.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

from svcrules.errors import KernelError
from svcrules.kernel.nftrace import NftParser, has_word
from svcrules.kernel.trace_events import (
    TRACE_COMMENT,
    Event,
    Monitor,
    MonitorEvents,
    family_of,
    removal_failed,
    require_tool,
    run_tool,
)
from svcrules.trace.model import Packet


def nft_parser(family: str, table: str, proto: str) -> NftParser:
    """The parser of a trace of svcrules' table ``family table`` ("ip", "svcrules")."""
    trace_table, own_table = f"{family} {table}-trace", f"{family} {table}"
    return NftParser(
        proto,
        tracer=lambda t, c: t == trace_table,
        own=lambda t, c, target: t == own_table,
    )


class NftTracer(MonitorEvents):
    """The temporary table, ``nft monitor``, and the rules of svcrules' table."""

    def __init__(self, packet: Packet, table: str) -> None:
        self.name = "nftables (kernel)"
        self.family = "ip" if family_of(packet) == 4 else "ip6"
        self.table = table
        self.trace_name = f"{table}-trace"
        self.packet = packet
        self.nft = require_tool("nft", "nftables")
        self.parser = nft_parser(self.family, table, packet.proto)
        self._monitor: Monitor | None = None
        self._installed = False
        self._early: list[str] = []

    # ------------------------------------------------------------ the table

    def script(self, replace: bool) -> str:
        fam, p = self.family, self.packet
        match = f"{fam} saddr {p.src} {fam} daddr {p.dst} meta l4proto {p.proto} th dport {p.port}"
        head = f"table {fam} {self.trace_name} {{}}\ndelete table {fam} {self.trace_name}\n"
        chains = "".join(
            f"\tchain {hook} {{\n"
            f"\t\ttype filter hook {hook} priority raw; policy accept;\n"
            f"\t\t{match} meta nftrace set 1\n"
            "\t}\n"
            for hook in ("prerouting", "output")
        )
        return (
            (head if replace else "")
            + f"table {fam} {self.trace_name} {{\n"
            + f'\tcomment "{TRACE_COMMENT}"\n'
            + chains
            + "}\n"
        )

    def _existing_comment(self) -> str | None:
        """The comment of a table of the trace table's name ("" without one), or None
        when there is none (nft's JSON leaves table comments out: the text has them)."""
        proc = run_tool([self.nft, "-t", "list", "table", self.family, self.trace_name])
        if proc.returncode != 0:
            return None
        for line in proc.stdout.splitlines()[1:2]:
            if m := re.match(r'^\s*comment "(.*)"$', line):
                return m[1]
        return ""

    def _nft(self, script: str) -> None:
        proc = run_tool([self.nft, "-f", "-"], script)
        if proc.returncode != 0:
            raise KernelError(f"nft refused the trace table: {proc.stderr.strip()}")

    # -------------------------------------------------------------- tracing

    def start(self, deadline: float) -> None:
        comment = self._existing_comment()
        if comment is not None and not comment.startswith("svcrules trace:"):
            raise KernelError(
                f"table {self.family} {self.trace_name} exists and was not made by svcrules "
                "trace; it is left alone (choose another --table-name, or delete it)"
            )
        self._monitor = Monitor([self.nft, "monitor"])
        self._installed = True
        self._nft(self.script(replace=comment is not None))
        # The monitor prints the table's events only once it listens; an empty chain
        # added until it does proves that trace events cannot be missed from then on.
        attempt = 0
        while True:
            attempt += 1
            sync = f"sync-{attempt}"
            self._nft(f"add chain {self.family} {self.trace_name} {sync}\n")
            event = f"add chain {self.family} {self.trace_name} {sync}"
            step = min(deadline, time.monotonic() + 0.5)
            if self._monitor.wait_for(event, step, self._early):
                return
            if time.monotonic() >= deadline:
                raise KernelError(f"nft monitor did not start listening: {self._monitor.stderr()}")

    def resolve(self, events: list[Event]) -> list[Event]:
        """Rules of svcrules' table that nft named only by handle, looked up now."""
        missing = {ev.chain for ev in events if ev.own and ev.kind == "rule" and not ev.rule}
        texts: dict[tuple[str, int], str] = {}
        for chain in sorted(missing):
            proc = run_tool([self.nft, "-a", "list", "chain", self.family, self.table, chain])
            for line in proc.stdout.splitlines():
                if m := re.match(r"^\s*(.*?) # handle (\d+)$", line):
                    texts[(chain, int(m[2]))] = m[1]
        out = []
        for ev in events:
            if ev.own and ev.kind == "rule" and not ev.rule and ev.handle is not None:
                rule = texts.get((ev.chain, ev.handle), f"unknown rule handle {ev.handle}")
                ev = _with_rule(ev, rule)
            out.append(ev)
        return out

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        if not self._installed:
            return
        self._installed = False
        proc = run_tool([self.nft, "delete", "table", self.family, self.trace_name])
        if proc.returncode != 0 and self._existing_comment() is not None:
            raise removal_failed(
                f"table {self.family} {self.trace_name}",
                f"nft delete table {self.family} {self.trace_name}",
                proc.stderr.strip(),
            )


def _with_rule(ev: Event, rule: str) -> Event:
    return replace(
        ev,
        rule=rule,
        rejects=has_word(rule, "reject"),
        masquerades=has_word(rule, "masquerade") and ev.verdict != "drop",
    )
