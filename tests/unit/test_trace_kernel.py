"""``svcrules trace --kernel`` without a kernel: what the kernel reported in recorded
traces (tests/unit/kernel_trace/, made in the lab of tests/kernel with the rules of
tests/kernel/test_trace_kernel.py: web at 203.0.113.10 on pod2 and pod3, empty at
203.0.113.11, serviceCIDR 203.0.113.0/25), read back into the same answers.

- ``nftables-*``: ``nft monitor`` lines; ``xtables-*``: ``xtables-monitor --trace``
  lines (iptables-nft); ``nft-monitor-iptables-ipv6-*``: ``nft monitor`` lines of a
  trace through iptables-nft's IPv6 tables;
- ``legacy-*.hex``: what each read of the nfnetlink_log socket returned
  (iptables-legacy), one read a line, with ``legacy-save.txt`` the rules they
  refer to by number.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from pathlib import Path

import pytest

from svcrules.errors import SvcrulesError
from svcrules.kernel.iptables.trace import (
    LegacyParser,
    XtablesParser,
    as_iptables_writes,
    iptables_nft_parser,
    parse_payload,
    parse_save,
    verdict_of,
)
from svcrules.kernel.nft.trace import nft_parser
from svcrules.kernel.nftrace import parse_packet
from svcrules.kernel.trace import Collector, decide, parse_conntrack, trace_kernel
from svcrules.kernel.trace_events import Event
from svcrules.trace.model import Packet, Step, Trace

DATA = Path(__file__).with_name("kernel_trace")
CLIENT, NODE, CIP, EMPTY, UNUSED = (
    "192.0.2.100",
    "192.0.2.1",
    "203.0.113.10",
    "203.0.113.11",
    "203.0.113.50",
)
FROM_CLIENT = Packet(CLIENT, CIP, 80)
FROM_NODE = Packet(NODE, CIP, 80, from_node=True)


def lines(name: str) -> list[str]:
    return (DATA / name).read_text().splitlines()


def first_trace(events: list[Event], packet: Packet, sport: int | None = None) -> list[Event]:
    collector = Collector(packet, sport)
    collector.add(events, now=0.0)
    assert collector.chosen is not None, "no trace of the packet"
    return collector.chosen


def nft_trace(name: str, packet: Packet) -> Trace:
    events = first_trace(nft_parser("ip", "svcrules", "tcp").feed(lines(name)), packet)
    return decide(packet, events, "nftables (kernel)", None)


def xtables_trace(name: str, packet: Packet) -> Trace:
    parser = XtablesParser("SVCRULES-TRACE", "SVCRULES", "tcp")
    events = first_trace(parser.feed(lines(name)), packet)
    return decide(packet, events, "iptables-nft (kernel)", None)


def legacy_trace(name: str, packet: Packet) -> Trace:
    parser = LegacyParser("SVCRULES-TRACE", "SVCRULES", "ipv4")
    events = [ev for ln in lines(name) for ev in parser.messages(bytes.fromhex(ln))]
    rules, policies = parse_save((DATA / "legacy-save.txt").read_text())
    chosen = parser.resolve(first_trace(events, packet), rules, policies)
    return decide(packet, chosen, "iptables-legacy (kernel)", None)


def rules(trace: Trace) -> list[str]:
    return [f"{s.chain}: {s.rule}" for s in trace.chains]


# --- nftables ----------------------------------------------------------------------


NFT_DNAT = [
    "nat-prerouting: jump services",
    "services: ip daddr . meta l4proto . th dport vmap @service-ips",
    "svc-7abb66a466fc-default-web-http-tcp: ip saddr != @pod-cidrs jump mark-for-masquerade",
    "mark-for-masquerade: meta mark set meta mark | 0x00004000",
    "svc-7abb66a466fc-default-web-http-tcp: meta l4proto tcp dnat ip to numgen random mod 2 "
    "offset 1766518784 map @backends-tcp-0175",
    "nat-postrouting: meta mark & 0x00004000 == 0x00004000 meta mark set meta mark & "
    "0xffffbfff masquerade fully-random",
]


def test_nftables_dnat_from_the_trace_alone() -> None:
    trace = nft_trace("nftables-client-dnat.txt", FROM_CLIENT)
    assert rules(trace) == NFT_DNAT
    assert {s.table for s in trace.chains} == {"ip svcrules"}
    # Without conntrack, the packet as postrouting saw it names the endpoint.
    assert (trace.verdict, trace.endpoints, trace.probabilities) == (
        "dnat",
        ("198.51.100.13:8080",),
        {"198.51.100.13:8080": 1.0},
    )
    assert trace.masquerade and trace.masqueraded == ("198.51.100.13:8080",)
    assert [s.chain for s in trace.masquerade_reason] == [
        "svc-7abb66a466fc-default-web-http-tcp",
        "mark-for-masquerade",
        "nat-postrouting",
    ]


def test_a_reused_trace_id_starts_the_next_packets_trace() -> None:
    # The connection's FIN carries the SYN's trace id: it is a trace of its own.
    events = nft_parser("ip", "svcrules", "tcp").feed(lines("nftables-client-dnat.txt"))
    chosen = first_trace(events, FROM_CLIENT)
    assert {ev.key for ev in chosen} == {"a45f48d1"}
    assert all(ev.packet is not None and ev.packet.sport == 39454 for ev in chosen)
    assert [ev.packet.syn for ev in chosen if ev.tracer and ev.packet] == [True, True]
    assert len([ev for ev in events if ev.key == "a45f48d1"]) == len(chosen) + 2


def test_a_trace_of_another_source_port_is_not_the_packet() -> None:
    events = nft_parser("ip", "svcrules", "tcp").feed(lines("nftables-client-dnat.txt"))
    collector = Collector(FROM_CLIENT, sport=1)
    collector.add(events, now=0.0)
    assert collector.chosen is None
    collector = Collector(FROM_CLIENT, sport=39454)
    collector.add(events, now=0.0)
    assert collector.chosen is not None


def test_nftables_reject_drop_and_untouched() -> None:
    reject = nft_trace("nftables-node-reject.txt", Packet(NODE, EMPTY, 80, from_node=True))
    assert (reject.verdict, reject.endpoints, reject.masquerade) == ("reject", (), False)
    assert rules(reject)[-1] == "no-endpoints: reject"
    assert rules(reject)[0] == "nat-output: jump services"
    drop = nft_trace("nftables-client-drop.txt", Packet(CLIENT, UNUSED, 80))
    assert drop.verdict == "drop"
    assert rules(drop) == [
        "nat-prerouting: jump services",
        "services: ip daddr @service-cidrs drop",
    ]
    untouched = nft_trace("nftables-client-untouched.txt", Packet(CLIENT, "198.51.100.11", 8080))
    assert (untouched.verdict, untouched.endpoints, untouched.masquerade) == (
        "untouched",
        (),
        False,
    )
    assert rules(untouched) == ["nat-prerouting: jump services"]


def test_nft_packet_lines() -> None:
    seen = parse_packet(
        ' iif "eth0" ip saddr 192.0.2.100 ip daddr 203.0.113.10 ip id 1 tcp sport 5 '
        "tcp dport 80 tcp flags == syn tcp window 64240",
        "tcp",
    )
    assert (seen.src, seen.dst, seen.sport, seen.dport, seen.inbound, seen.syn) == (
        CLIENT,
        CIP,
        5,
        80,
        True,
        True,
    )
    ack = parse_packet(' oif "lo" ip6 saddr ::1 ip6 daddr ::2 tcp flags == 0x12', "tcp")
    assert (ack.src, ack.inbound, ack.syn) == ("::1", False, False)
    ecn = parse_packet(" tcp flags == syn | ecn | cwr", "tcp")
    assert ecn.syn is True
    assert parse_packet(" udp sport 1 udp dport 53 udp length 9", "udp").syn is None


# --- iptables-nft ------------------------------------------------------------------


IPT_DNAT = [
    '-A PREROUTING -m comment --comment "SVCRULES service portals" -j SVCRULES-SERVICES',
    "-A SVCRULES-SERVICES -d 203.0.113.10/32 -p tcp -m tcp --dport 80 -m comment --comment "
    '"default/web:http/TCP" -g SVCRULES-SVC-PK5WNJDG7Q',
    "-A SVCRULES-SVC-PK5WNJDG7Q -j SVCRULES-MASQ-NON-POD",
    "-A SVCRULES-MASQ-NON-POD -j SVCRULES-MARK-MASQ",
    "-A SVCRULES-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
    "-A SVCRULES-SVC-PK5WNJDG7Q -g SVCRULES-SEP-EVZVL7IQ46",
    '-A SVCRULES-SEP-EVZVL7IQ46 -p tcp -m comment --comment "default/web:http/TCP '
    '198.51.100.13 8080" -j DNAT --to-destination 198.51.100.13:8080',
    '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "SVCRULES service portals" '
    "-j SVCRULES-SERVICES",
    "-A SVCRULES-SERVICES -m conntrack --ctstate DNAT -j RETURN",
    '-A POSTROUTING -m comment --comment "SVCRULES masquerade" -j SVCRULES-POSTROUTING',
    "-A SVCRULES-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
    "-A SVCRULES-POSTROUTING -j MASQUERADE --random-fully",
]
IPT_TABLES = ["nat"] * 7 + ["filter"] * 2 + ["nat"] * 3


def written(lines: list[str]) -> list[str]:
    """Rules as svcrules writes them in a chain: without iptables-save's "-A CHAIN "."""
    return [line.split(" ", 2)[2] for line in lines]


def test_iptables_nft_dnat() -> None:
    trace = xtables_trace("xtables-client-dnat.txt", FROM_CLIENT)
    assert [s.rule for s in trace.chains] == written(IPT_DNAT)
    assert [s.table for s in trace.chains] == [f"ipv4 {t}" for t in IPT_TABLES]
    assert trace.chains[0] == Step("ipv4 nat", "PREROUTING", written(IPT_DNAT)[0])
    assert (trace.verdict, trace.endpoints, trace.masquerade) == (
        "dnat",
        ("198.51.100.13:8080",),
        True,
    )


def test_iptables_nft_reject_drop_and_from_the_node() -> None:
    reject = xtables_trace("xtables-client-reject.txt", Packet(CLIENT, EMPTY, 80))
    assert reject.verdict == "reject"
    assert reject.chains[-1].rule.endswith("-j REJECT --reject-with icmp-port-unreachable")
    drop = xtables_trace("xtables-client-drop.txt", Packet(CLIENT, UNUSED, 80))
    assert drop.verdict == "drop"
    assert drop.chains[-1] == Step("ipv4 filter", "SVCRULES-CLUSTER-IPS", "-j DROP")
    node = xtables_trace("xtables-node-dnat.txt", FROM_NODE)
    assert node.verdict == "dnat" and node.masquerade
    assert node.chains[0].chain == "OUTPUT"


def test_iptables_nft_ipv6_through_nft_monitor() -> None:
    packet = Packet("2001:db8:1::100", "2001:db8:3::10", 80)
    parser = iptables_nft_parser("SVCRULES-TRACE", "SVCRULES", "tcp")
    events = first_trace(parser.feed(lines("nft-monitor-iptables-ipv6-dnat.txt")), packet)
    own = [ev for ev in events if ev.own]
    assert [ev.chain for ev in own][:2] == ["PREROUTING", "SVCRULES-SERVICES"]
    # The chain as nft lists it and as ip6tables writes it, rule by rule.
    listings = {
        ("nat", "SVCRULES-SERVICES"): (
            [
                ("ip6 daddr 2001:db8:3::10 tcp dport 80 counter goto SVCRULES-SVC-PK5WNJDG7Q", 21),
                ("ip6 daddr 2001:db8:3::10 udp dport 53 counter goto SVCRULES-SVC-TZVDRAGU6A", 22),
            ],
            [
                "-A SVCRULES-SERVICES -d 2001:db8:3::10/128 -p tcp -m tcp --dport 80 -g "
                "SVCRULES-SVC-PK5WNJDG7Q",
                "-A SVCRULES-SERVICES -d 2001:db8:3::10/128 -p udp -m udp --dport 53 -g "
                "SVCRULES-SVC-TZVDRAGU6A",
            ],
        )
    }
    written = as_iptables_writes(
        events, "ipv6", "SVCRULES", lambda t, c: listings.get((t, c), ([], []))
    )
    services = next(ev for ev in written if ev.chain == "SVCRULES-SERVICES")
    assert services.table == "ipv6 nat"
    assert services.rule == listings[("nat", "SVCRULES-SERVICES")][1][0]
    trace = decide(packet, written, "iptables-nft (kernel)", None)
    assert (trace.verdict, trace.endpoints, trace.masquerade) == (
        "dnat",
        ("[2001:db8:2::13]:8080",),
        True,
    )
    # A chain not listed keeps nft's text.
    assert any(s.rule.startswith("counter packets") for s in trace.chains)


# --- iptables-legacy ---------------------------------------------------------------


def test_iptables_legacy_dnat_from_nflog_messages() -> None:
    trace = legacy_trace("legacy-dnat.hex", FROM_CLIENT)
    endpoint = "198.51.100.12:8080"
    assert (trace.verdict, trace.endpoints, trace.masquerade) == ("dnat", (endpoint,), True)
    expected = [
        r.replace("EVZVL7IQ46", "76ZEOENBST").replace("198.51.100.13", "198.51.100.12")
        for r in IPT_DNAT
    ]
    expected[5] = (
        "-A SVCRULES-SVC-PK5WNJDG7Q -m statistic --mode random --probability 0.50000000000 "
        "-g SVCRULES-SEP-76ZEOENBST"
    )
    assert [s.rule for s in trace.chains] == written(expected)
    assert [s.table for s in trace.chains] == [f"ipv4 {t}" for t in IPT_TABLES]


def test_iptables_legacy_reject_drop_and_from_the_node() -> None:
    reject = legacy_trace("legacy-reject.hex", Packet(CLIENT, EMPTY, 80))
    assert reject.verdict == "reject"
    # An unconditional DROP that ends its chain is reported as the chain's "return".
    drop = legacy_trace("legacy-drop.hex", Packet(CLIENT, UNUSED, 80))
    assert drop.verdict == "drop"
    assert drop.chains[-1] == Step("ipv4 filter", "SVCRULES-CLUSTER-IPS", "-j DROP")
    node = legacy_trace("legacy-node.hex", FROM_NODE)
    assert (node.verdict, node.masquerade) == ("dnat", True)
    assert node.chains[0].chain == "OUTPUT"


def test_payloads_of_both_families() -> None:
    v4 = (
        bytes.fromhex("4500003c25b740004006")
        + b"\0\0"
        + socket.inet_aton(CLIENT)
        + socket.inet_aton(CIP)
    )
    tcp = struct.pack("!HHIIBBH", 40000, 80, 7, 0, 0x50, 0x02, 64240) + b"\0" * 6
    seen, key = parse_payload(v4 + tcp, socket.AF_INET)
    assert (seen.src, seen.dst, seen.sport, seen.dport, seen.syn) == (CLIENT, CIP, 40000, 80, True)
    assert key == f"40000/{0x25B7}"
    src, dst = ipaddress.IPv6Address("2001:db8:1::100"), ipaddress.IPv6Address("2001:db8:3::10")
    v6 = struct.pack("!IHBB", 6 << 28, 8, 17, 64) + src.packed + dst.packed
    seen, key = parse_payload(v6 + struct.pack("!HHHH", 5353, 53, 8, 0), socket.AF_INET6)
    assert (seen.src, seen.dst, seen.sport, seen.dport, seen.syn) == (
        str(src),
        str(dst),
        5353,
        53,
        None,
    )
    assert key == "5353/"


def test_iptables_verdicts_from_targets() -> None:
    chains = {"SVCRULES-SERVICES", "MYCHAIN"}
    assert verdict_of("-A X -j REJECT --reject-with icmp-port-unreachable", chains) == ("drop", "")
    assert verdict_of("-A X -j DNAT --to-destination 1.2.3.4:80", chains) == ("accept", "")
    assert verdict_of("-A X -g SVCRULES-SERVICES", chains) == ("goto", "SVCRULES-SERVICES")
    assert verdict_of("-A X -j MYCHAIN", chains) == ("jump", "MYCHAIN")
    assert verdict_of("-A X -j MARK --set-xmark 0x4000/0x4000", chains) == ("continue", "")
    assert verdict_of("-A X -s 10.0.0.0/8 -j RETURN", chains) == ("return", "")


# --- conntrack and the answer ------------------------------------------------------


def test_conntrack_entries() -> None:
    [tcp, udp] = parse_conntrack(
        "tcp      6 119 TIME_WAIT src=192.0.2.100 dst=203.0.113.10 sport=39454 dport=80 "
        "src=198.51.100.13 dst=198.18.0.1 sport=8080 dport=30801 [ASSURED] mark=0 use=1\n"
        "udp      17 29 src=2001:db8:1::1 dst=2001:db8:3::10 sport=4000 dport=53 [UNREPLIED] "
        "src=2001:db8:2::13 dst=2001:db8:1::1 sport=5353 dport=4000 mark=0 use=1\n"
        "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been shown.\n"
    )
    assert (tcp.src, tcp.dst, tcp.sport, tcp.dport) == (CLIENT, CIP, 39454, 80)
    assert (tcp.reply_src, tcp.reply_dst, tcp.reply_sport) == ("198.51.100.13", "198.18.0.1", 8080)
    events = nft_parser("ip", "svcrules", "tcp").feed(lines("nftables-client-dnat.txt"))
    trace = decide(FROM_CLIENT, first_trace(events, FROM_CLIENT), "nftables (kernel)", tcp)
    assert (trace.verdict, trace.endpoints, trace.masquerade) == (
        "dnat",
        ("198.51.100.13:8080",),
        True,
    )
    # Masqueraded to the address it had: conntrack cannot tell, the trace's rule does.
    packet = Packet("2001:db8:1::1", "2001:db8:3::10", 53, "udp", from_node=True)
    assert decide(packet, [], "x", udp).endpoints == ("[2001:db8:2::13]:5353",)
    assert decide(packet, [], "x", udp).masquerade is False
    masq = Event(
        "k", "ip6 svcrules", "nat-postrouting", "rule", "masquerade", "accept", masquerades=True
    )
    assert decide(packet, [masq], "x", udp).masquerade is True


@pytest.mark.parametrize(
    ("packet", "options", "message"),
    [
        (Packet("192.0.2.300", CIP, 80), "", "--src: '192.0.2.300' is not an IP address"),
        (Packet(CLIENT, "2001:db8::1", 80), "", "not of the same IP family"),
        (Packet(CLIENT, CIP, 0), "", "--port 0: between 1 and 65535"),
        (Packet(CLIENT, CIP, 80, "icmp"), "", "--proto 'icmp': one of tcp, udp, sctp"),
        (Packet(NODE, CIP, 80, "sctp", from_node=True), "", "cannot send an SCTP packet"),
        (FROM_CLIENT, "backend=ipvs", "unknown backend 'ipvs'"),
        (FROM_CLIENT, "table=kube-proxy", "may be another program's"),
        (FROM_CLIENT, "table=x y", "not a valid table name"),
        (FROM_CLIENT, "timeout=0", "timeout must be more than 0 seconds"),
    ],
)
def test_what_cannot_be_traced_is_refused_before_anything_is_installed(
    packet: Packet, options: str, message: str
) -> None:
    opts = dict([options.split("=")]) if options else {}
    with pytest.raises(SvcrulesError, match=re.escape(message)):
        trace_kernel(
            packet,
            opts.get("backend", "nftables"),
            table=opts.get("table", "svcrules"),
            timeout=float(opts.get("timeout", 10)),
        )
