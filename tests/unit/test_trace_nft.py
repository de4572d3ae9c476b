"""svcrules.trace reading nft scripts: each construct of the emitted subset on small
hand-written rulesets, and a clear TraceError (with the line) for anything else."""

from __future__ import annotations

import ipaddress

import pytest

from svcrules.trace import Packet, Step, Trace, TraceError, trace
from svcrules.trace.jhash import jhash, jhash_slot
from svcrules.trace.model import Affinity, Pick

CIP = "203.0.113.10"  # a ClusterIP
OUTSIDE = "192.0.2.100"  # a client outside the cluster
NODE = "192.0.2.1"  # the node's own address
POD = "198.51.100.12"
TABLE = "ip t"


# -- building small scripts --------------------------------------------------------


def chain(name: str, *rules: str, hook: str = "", priority: str = "dstnat") -> str:
    lines = [f"chain {name} {{"]
    if hook:
        lines.append(f"type nat hook {hook} priority {priority}; policy accept;")
    return "\n".join([*lines, *rules, "}"]) + "\n"


def prerouting(*rules: str, priority: str = "dstnat", name: str = "pre") -> str:
    return chain(name, *rules, hook="prerouting", priority=priority)


def output(*rules: str, priority: str = "-100", name: str = "out") -> str:
    return chain(name, *rules, hook="output", priority=priority)


def postrouting(*rules: str, priority: str = "srcnat", name: str = "post") -> str:
    return chain(name, *rules, hook="postrouting", priority=priority)


def collection(kind: str, name: str, typ: str, *elements: str, flags: str = "") -> str:
    lines = [f"{kind} {name} {{", typ]
    if flags:
        lines.append(f"flags {flags}")
    if elements:
        lines += ["elements = {", *(f"{e}," for e in elements), "}"]
    return "\n".join([*lines, "}"]) + "\n"


def nset(name: str, typ: str, *elements: str, flags: str = "") -> str:
    return collection("set", name, typ, *elements, flags=flags)


def nmap(name: str, typ: str, *elements: str, flags: str = "") -> str:
    return collection("map", name, typ, *elements, flags=flags)


def table(*parts: str, family: str = "ip", name: str = "t") -> str:
    return f"table {family} {name} {{\n" + "".join(parts) + "}\n"


def run(
    text: str,
    dst: str = CIP,
    port: int = 80,
    src: str = OUTSIDE,
    proto: str = "tcp",
    from_node: bool = False,
    local: tuple[str, ...] = (),
) -> Trace:
    return trace(text, "nftables", Packet(src, dst, port, proto, from_node, local))


def line_of(text: str, fragment: str) -> tuple[int, str]:
    """The number and stripped text of the first line holding ``fragment``."""
    for n, line in enumerate(text.splitlines(), 1):
        if fragment in line:
            return n, line.strip()
    raise AssertionError(f"{fragment!r} not in the script")


def assert_names_line(exc: TraceError, text: str, fragment: str) -> None:
    n, line = line_of(text, fragment)
    message = str(exc)
    assert f"line {n}:" in message, message
    assert repr(line) in message, message


def step(chain_name: str, rule: str, *when: str) -> Step:
    return Step(TABLE, chain_name, rule, tuple(when))


# -- matches -----------------------------------------------------------------------


INTERVALS = table(
    nset("s", "type ipv4_addr", "10.0.0.0/8", "203.0.113.10", flags="interval"),
    prerouting("ip daddr @s drop"),
)


@pytest.mark.parametrize(
    ("dst", "verdict"),
    [
        ("10.0.0.1", "drop"),  # inside the prefix
        ("10.255.255.255", "drop"),  # its last address
        ("11.0.0.0", "untouched"),  # just past it
        (CIP, "drop"),  # a single address
        ("203.0.113.11", "untouched"),  # its neighbour
    ],
)
def test_interval_set_prefixes_and_single_addresses(dst: str, verdict: str) -> None:
    t = run(INTERVALS, dst=dst)
    assert t.verdict == verdict
    assert t.backend == "nftables"
    if verdict == "drop":
        assert t.chains == (step("pre", "ip daddr @s drop"),)
    else:
        assert t.chains == ()


def test_saddr_lookup_and_negated_set() -> None:
    text = table(
        nset("pods", "type ipv4_addr", "198.51.100.0/24", flags="interval"),
        prerouting("ip saddr != @pods reject", "ip saddr @pods drop"),
    )
    assert run(text, src=POD).verdict == "drop"
    assert run(text, src=OUTSIDE).verdict == "reject"


CONCAT = table(
    nset("frontends", "type ipv4_addr . inet_proto . inet_service", f"{CIP} . tcp . 80"),
    prerouting("ip daddr . meta l4proto . th dport @frontends reject"),
)


@pytest.mark.parametrize(
    ("dst", "proto", "port", "verdict"),
    [
        (CIP, "tcp", 80, "reject"),
        (CIP, "udp", 80, "untouched"),  # the protocol is part of the key
        (CIP, "sctp", 80, "untouched"),
        (CIP, "tcp", 81, "untouched"),  # and so is the port
        ("203.0.113.11", "tcp", 80, "untouched"),  # and the address
    ],
)
def test_concatenated_key_with_a_set(dst: str, proto: str, port: int, verdict: str) -> None:
    assert run(CONCAT, dst=dst, proto=proto, port=port).verdict == verdict


def test_concatenation_with_an_interval_component_negated() -> None:
    """loadBalancerSourceRanges: frontend . source range, refused outside the range."""
    lb = "203.0.113.200"
    text = table(
        nset("fw", "type ipv4_addr . inet_proto . inet_service", f"{lb} . tcp . 80"),
        nset(
            "allow",
            "type ipv4_addr . inet_proto . inet_service . ipv4_addr",
            f"{lb} . tcp . 80 . 192.0.2.0/24",
            flags="interval",
        ),
        prerouting(
            "ip daddr . meta l4proto . th dport @fw "
            "ip daddr . meta l4proto . th dport . ip saddr != @allow drop"
        ),
    )
    assert run(text, dst=lb, src="192.0.2.77").verdict == "untouched"
    assert run(text, dst=lb, src="198.18.0.7").verdict == "drop"
    assert run(text, dst=lb, src="198.18.0.7", port=443).verdict == "untouched"


@pytest.mark.parametrize(
    ("family", "rule", "dst", "verdict"),
    [
        ("ip", "ip daddr != 127.0.0.0/8 drop", "127.0.0.1", "untouched"),
        ("ip", "ip daddr != 127.0.0.0/8 drop", "127.255.0.9", "untouched"),
        ("ip", "ip daddr != 127.0.0.0/8 drop", CIP, "drop"),
        ("ip", f"ip daddr {CIP} drop", CIP, "drop"),
        ("ip", f"ip daddr == {CIP} drop", "203.0.113.11", "untouched"),
        ("ip6", "ip6 daddr != ::1 drop", "::1", "untouched"),
        ("ip6", "ip6 daddr != ::1 drop", "2001:db8:3::10", "drop"),
        ("ip6", "ip6 daddr 2001:db8:3::/112 drop", "2001:db8:3::10", "drop"),
        ("ip6", "ip6 daddr 2001:db8:3::/112 drop", "2001:db8:4::10", "untouched"),
    ],
)
def test_comparison_with_a_constant(family: str, rule: str, dst: str, verdict: str) -> None:
    src = "2001:db8:1::100" if family == "ip6" else OUTSIDE
    text = table(prerouting(rule), family=family)
    assert run(text, dst=dst, src=src).verdict == verdict


@pytest.mark.parametrize(
    ("rule", "proto", "port", "verdict"),
    [
        ("meta l4proto udp drop", "udp", 53, "drop"),
        ("meta l4proto udp drop", "tcp", 53, "untouched"),
        ("th dport 53 drop", "sctp", 53, "drop"),
        ("th dport != 53 drop", "udp", 53, "untouched"),
        ("th dport != 53 drop", "udp", 54, "drop"),
    ],
)
def test_protocol_and_port(rule: str, proto: str, port: int, verdict: str) -> None:
    assert run(table(prerouting(rule)), proto=proto, port=port).verdict == verdict


# -- verdict maps, random choice, dnat -------------------------------------------------


VMAP = table(
    nmap(
        "frontends",
        "type ipv4_addr . inet_proto . inet_service : verdict",
        f"{CIP} . tcp . 80 : goto svc",
        f"{CIP} . tcp . 8443 : accept",
        f"{CIP} . udp . 53 : drop",
    ),
    prerouting("ip daddr . meta l4proto . th dport vmap @frontends", "reject"),
    chain("svc", "dnat ip to 10.0.0.1:8080"),
)


def test_vmap_hit_goes_where_the_element_says() -> None:
    t = run(VMAP)
    assert (t.verdict, t.endpoints, t.probabilities) == (
        "dnat",
        ("10.0.0.1:8080",),
        {"10.0.0.1:8080": 1.0},
    )
    assert t.chains == (
        step("pre", "ip daddr . meta l4proto . th dport vmap @frontends"),
        step("svc", "dnat ip to 10.0.0.1:8080"),
    )
    assert run(VMAP, proto="udp", port=53).verdict == "drop"


def test_vmap_miss_goes_on_with_the_next_rule() -> None:
    t = run(VMAP, port=81)
    assert t.verdict == "reject"
    assert t.chains == (step("pre", "reject"),)  # the vmap rule did not match


def test_vmap_accept_ends_the_base_chain() -> None:
    t = run(VMAP, port=8443)
    assert t.verdict == "untouched"  # accepted before the reject rule
    assert t.chains == (step("pre", "ip daddr . meta l4proto . th dport vmap @frontends"),)


def three_way(modulus: int) -> str:
    return table(
        nmap(
            "eps",
            "typeof numgen random mod 1 : verdict",
            "100 : goto a",
            "101 : goto b",
            "102 : goto c",
        ),
        prerouting(f"numgen random mod {modulus} offset 100 vmap @eps", "dnat ip to 10.0.0.9:80"),
        chain("a", "dnat ip to 10.0.0.1:80"),
        chain("b", "dnat ip to 10.0.0.2:80"),
        chain("c", "dnat ip to 10.0.0.3:80"),
    )


def test_numgen_random_vmap_forks_n_ways() -> None:
    t = run(three_way(3))
    assert t.verdict == "dnat"
    assert t.endpoints == ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
    assert t.probabilities == pytest.approx({ep: 1 / 3 for ep in t.endpoints}, abs=1e-6)
    assert sum(t.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    # the choice is on every path, each endpoint's dnat only on its own
    assert t.chains[0] == step("pre", "numgen random mod 3 offset 100 vmap @eps")
    assert step("a", "dnat ip to 10.0.0.1:80", "10.0.0.1:80") in t.chains
    assert step("c", "dnat ip to 10.0.0.3:80", "10.0.0.3:80") in t.chains
    assert step("pre", "dnat ip to 10.0.0.9:80") not in t.chains


def test_numgen_random_vmap_holes_are_misses() -> None:
    t = run(three_way(4))  # slot 103 has no element: the next rule decides
    assert t.endpoints == ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.9:80")
    assert t.probabilities == {ep: 0.25 for ep in t.endpoints}
    assert step("pre", "dnat ip to 10.0.0.9:80", "10.0.0.9:80") in t.chains


def backends(modulus: int, *rest: str) -> str:
    return table(
        nmap(
            "b",
            "typeof numgen random mod 1 : ip daddr . tcp dport",
            "7 : 10.0.0.1 . 8080",
            "8 : 10.0.0.2 . 9090",
        ),
        prerouting(
            f"meta l4proto tcp dnat ip to numgen random mod {modulus} offset 7 map @b", *rest
        ),
    )


def test_dnat_map_with_address_and_port() -> None:
    t = run(backends(2))
    assert t.endpoints == ("10.0.0.1:8080", "10.0.0.2:9090")
    assert t.probabilities == {"10.0.0.1:8080": 0.5, "10.0.0.2:9090": 0.5}
    assert run(backends(2), proto="udp").verdict == "untouched"  # meta l4proto tcp


def test_dnat_map_hole_is_a_miss() -> None:
    t = run(backends(3, "dnat ip to 10.0.0.3:80"))
    assert t.probabilities == pytest.approx(
        {"10.0.0.1:8080": 1 / 3, "10.0.0.2:9090": 1 / 3, "10.0.0.3:80": 1 / 3}, abs=1e-6
    )


def test_paths_with_different_verdicts_are_refused() -> None:
    with pytest.raises(TraceError, match="different verdicts at random"):
        run(backends(3, "reject"))


def test_dnat_map_keyed_by_the_packet() -> None:
    text = table(
        nmap(
            "m",
            "type ipv4_addr . inet_service : ipv4_addr . inet_service",
            f"{CIP} . 80 : 10.0.0.5 . 8080",
        ),
        prerouting("dnat ip to ip daddr . th dport map @m"),
    )
    assert run(text).endpoints == ("10.0.0.5:8080",)
    assert run(text, port=81).verdict == "untouched"


def test_dnat_to_a_constant_ipv4_and_ipv6() -> None:
    t4 = run(table(prerouting("dnat ip to 10.0.0.1:8080")))
    assert (t4.verdict, t4.endpoints) == ("dnat", ("10.0.0.1:8080",))
    v6 = table(prerouting("dnat ip6 to [2001:db8:2::13]:5353"), family="ip6")
    t6 = run(v6, src="2001:db8:1::100", dst="2001:db8:3::53", port=53, proto="udp")
    assert (t6.verdict, t6.endpoints) == ("dnat", ("[2001:db8:2::13]:5353",))
    assert t6.probabilities == {"[2001:db8:2::13]:5353": 1.0}
    assert t6.chains == (Step("ip6 t", "pre", "dnat ip6 to [2001:db8:2::13]:5353"),)


def test_only_the_tables_of_the_packets_family_apply() -> None:
    text = table(prerouting("drop"), family="ip6") + table(prerouting("reject"))
    assert run(text).verdict == "reject"
    assert run(text, src="2001:db8:1::100", dst="2001:db8:3::1").verdict == "drop"


def test_delete_table_removes_what_came_before() -> None:
    text = table(prerouting("drop")) + "delete table ip t\n" + table(prerouting("reject"))
    assert run(text).verdict == "reject"


# -- fib, marks, masquerade ----------------------------------------------------------


FIB = table(prerouting("fib daddr type local drop", "fib saddr type local reject"))


@pytest.mark.parametrize(
    ("src", "dst", "local", "verdict"),
    [
        (OUTSIDE, "198.18.0.1", ("198.18.0.1",), "drop"),  # one of Packet.local
        (OUTSIDE, "198.18.0.1", (), "untouched"),
        (OUTSIDE, "198.18.0.2", ("198.18.0.1",), "untouched"),
        (OUTSIDE, "127.0.0.1", (), "drop"),  # loopback is always local
        (OUTSIDE, "127.1.2.3", (), "drop"),
        ("198.18.0.1", CIP, ("198.18.0.1",), "reject"),  # fib saddr
        ("127.0.0.1", CIP, (), "reject"),
    ],
)
def test_fib_type_local(src: str, dst: str, local: tuple[str, ...], verdict: str) -> None:
    assert run(FIB, src=src, dst=dst, local=local).verdict == verdict


def test_fib_type_local_ipv6_loopback() -> None:
    text = table(prerouting("fib daddr type local drop"), family="ip6")
    assert run(text, src="2001:db8:1::100", dst="::1").verdict == "drop"
    assert run(text, src="2001:db8:1::100", dst="2001:db8:1::1").verdict == "untouched"
    local = ("2001:db8:1::1",)
    assert run(text, src="2001:db8:1::100", dst="2001:db8:1::1", local=local).verdict == "drop"


MASQ_RULE = (
    "meta mark & 0x00004000 == 0x00004000 meta mark set meta mark & 0xffffbfff "
    "masquerade fully-random"
)


def marking(*pre: str) -> str:
    return table(
        prerouting(*pre, "dnat ip to 10.0.0.1:80"),
        chain("mark-for-masquerade", "meta mark set meta mark | 0x00004000"),
        chain("other-mark", "meta mark set meta mark | 0x00000001"),
        postrouting(MASQ_RULE),
    )


def test_mark_then_masquerade_and_why() -> None:
    t = run(marking("jump mark-for-masquerade"))
    assert t.masquerade is True
    assert t.masqueraded == ("10.0.0.1:80",)
    assert t.masqueraded_to("10.0.0.1:80")
    assert t.masquerade_reason == (
        step("pre", "jump mark-for-masquerade"),
        step("mark-for-masquerade", "meta mark set meta mark | 0x00004000"),
        step("post", MASQ_RULE),
    )
    assert t.chains[-1] == step("post", MASQ_RULE)


def test_no_mark_no_masquerade() -> None:
    t = run(marking())
    assert (t.verdict, t.masquerade, t.masqueraded, t.masquerade_reason) == ("dnat", False, (), ())
    assert step("post", MASQ_RULE) not in t.chains


def test_masquerade_tests_the_masked_bit() -> None:
    t = run(marking("jump other-mark"))  # another bit of the mark: not for masquerading
    assert t.masquerade is False


def test_mark_cleared_before_a_later_check() -> None:
    text = table(
        prerouting(
            "meta mark set meta mark | 0x00004000",
            "meta mark set meta mark & 0xffffbfff",
            "dnat ip to 10.0.0.1:80",
        ),
        postrouting(MASQ_RULE),
    )
    assert run(text).masquerade is False


HAIRPIN = table(
    nset("hairpin", "type ipv4_addr . ipv4_addr", "10.0.0.1 . 10.0.0.1"),
    nmap("eps", "typeof numgen random mod 1 : verdict", "0 : goto a", "1 : goto b"),
    prerouting("numgen random mod 2 offset 0 vmap @eps"),
    chain("a", "dnat ip to 10.0.0.1:80"),
    chain("b", "dnat ip to 10.0.0.2:80"),
    postrouting("ct status dnat ip saddr . ip daddr @hairpin masquerade fully-random"),
)


def test_hairpin_masquerades_only_the_client_reaching_itself() -> None:
    rule = "ct status dnat ip saddr . ip daddr @hairpin masquerade fully-random"
    t = run(HAIRPIN, src="10.0.0.1")
    assert t.masquerade is False
    assert t.masqueraded == ("10.0.0.1:80",)
    assert t.masqueraded_to("10.0.0.1:80") and not t.masqueraded_to("10.0.0.2:80")
    assert t.masquerade_reason == (step("post", rule),)
    assert step("post", rule, "10.0.0.1:80") in t.chains  # on that endpoint's path only
    other = run(HAIRPIN, src="10.0.0.3")
    assert (other.masquerade, other.masqueraded, other.masquerade_reason) == (False, (), ())


def test_ct_status_dnat_needs_a_translation() -> None:
    text = table(
        nset("hairpin", "type ipv4_addr . ipv4_addr", "10.0.0.1 . 10.0.0.1"),
        prerouting("ip daddr 10.0.0.5 dnat ip to 10.0.0.1:80"),
        postrouting("ct status dnat ip saddr . ip daddr @hairpin masquerade"),
    )
    translated = run(text, src="10.0.0.1", dst="10.0.0.5")
    assert translated.masquerade is True
    # the same addresses without a dnat: the hairpin rule does not match
    direct = run(text, src="10.0.0.1", dst="10.0.0.1")
    assert direct.verdict == "untouched"
    assert direct.chains == ()


# -- ClientIP affinity -----------------------------------------------------------------


def affinity(update_b: str = "11") -> str:
    return table(
        nset(
            "affinity",
            "typeof ip saddr . numgen inc mod 1",
            flags="dynamic,timeout",
        ),
        nmap("eps", "typeof numgen random mod 1 : verdict", "0 : goto aep-a", "1 : goto aep-b"),
        prerouting("goto svc"),
        chain(
            "svc",
            "ip saddr . numgen inc mod 1 offset 10 @affinity goto aep-a",
            "ip saddr . numgen inc mod 1 offset 11 @affinity goto aep-b",
            "numgen random mod 2 offset 0 vmap @eps",
        ),
        chain(
            "aep-a",
            "update @affinity { ip saddr . numgen inc mod 1 offset 10 timeout 600s }",
            "dnat ip to 10.0.0.1:80",
        ),
        chain(
            "aep-b",
            f"update @affinity {{ ip saddr . numgen inc mod 1 offset {update_b} timeout 600s }}",
            "dnat ip to 10.0.0.2:80",
        ),
    )


def test_affinity_is_sticky_when_the_lookup_finds_the_update() -> None:
    t = run(affinity())
    assert t.affinity == Affinity(timeout=600, sticky=True)
    assert t.probabilities == {"10.0.0.1:80": 0.5, "10.0.0.2:80": 0.5}


def test_affinity_is_not_sticky_when_the_update_records_another_key() -> None:
    t = run(affinity(update_b="12"))  # aep-b records offset 12, svc looks up 11
    assert t.affinity == Affinity(timeout=600, sticky=False)
    assert t.endpoints == ("10.0.0.1:80", "10.0.0.2:80")


def test_no_affinity_without_an_update() -> None:
    assert run(three_way(3)).affinity is None


# -- walking chains ----------------------------------------------------------------


def calls(verb: str) -> str:
    return table(
        prerouting("jump a", "dnat ip to 10.0.0.9:80"),
        chain("a", f"{verb} b", "drop"),
        chain("b", "meta mark set meta mark | 0x00000001"),
    )


def test_goto_returns_to_the_callers_caller() -> None:
    t = run(calls("goto"))
    assert t.verdict == "dnat" and t.endpoints == ("10.0.0.9:80",)
    assert t.chains == (
        step("pre", "jump a"),
        step("a", "goto b"),
        step("b", "meta mark set meta mark | 0x00000001"),
        step("pre", "dnat ip to 10.0.0.9:80"),
    )


def test_jump_returns_to_the_next_rule() -> None:
    t = run(calls("jump"))
    assert t.verdict == "drop"
    assert t.chains[-1] == step("a", "drop")


def test_return_ends_a_chain_and_a_base_chain() -> None:
    text = table(
        prerouting("jump a", "return", "drop"),
        chain("a", "return", "reject"),
        prerouting("dnat ip to 10.0.0.9:80", priority="0", name="later"),
    )
    t = run(text)
    assert t.verdict == "dnat"  # neither reject nor drop: the next base chain decides
    assert t.chains == (
        step("pre", "jump a"),
        step("a", "return"),
        step("pre", "return"),
        step("later", "dnat ip to 10.0.0.9:80"),
    )


@pytest.mark.parametrize("verdict", ["drop", "reject"])
def test_drop_and_reject_end_the_packet(verdict: str) -> None:
    text = table(
        prerouting(f"jump {verdict}-it", "dnat ip to 10.0.0.9:80"),
        chain(f"{verdict}-it", verdict),
        prerouting("dnat ip to 10.0.0.8:80", priority="0", name="later"),
    )
    t = run(text)
    assert t.verdict == verdict
    assert t.endpoints == ()
    assert t.chains[-1] == step(f"{verdict}-it", verdict)


def test_accept_ends_only_its_base_chain() -> None:
    text = table(
        prerouting("jump a", "drop"),
        chain("a", "accept"),
        prerouting("reject", priority="0", name="later"),
    )
    assert run(text).verdict == "reject"


@pytest.mark.parametrize(
    ("setter", "checker", "verdict"),
    [
        ("dstnat", "0", "drop"),  # -100 sets the mark before 0 checks it
        ("-100", "dstnat", "drop"),  # same priority: by name, "a-set" before "b-check"
        ("dstnat", "-150", "untouched"),  # -150 checks before the mark is set
        ("-99", "-100", "untouched"),
        ("srcnat", "dstnat", "untouched"),  # srcnat is 100
    ],
)
def test_base_chains_run_in_priority_order(setter: str, checker: str, verdict: str) -> None:
    text = table(  # the checker first in the text
        prerouting("meta mark & 0x1 == 0x1 drop", priority=checker, name="b-check"),
        prerouting("meta mark set meta mark | 0x1", priority=setter, name="a-set"),
    )
    assert run(text).verdict == verdict


HOOKS = table(
    prerouting("dnat ip to 10.0.0.1:80"),
    output("dnat ip to 10.0.0.2:80"),
    postrouting("masquerade"),
)


def test_from_node_uses_output_and_postrouting() -> None:
    t = run(HOOKS, src=NODE, from_node=True)
    assert t.endpoints == ("10.0.0.2:80",)
    assert t.masquerade is True
    assert t.source == "node"
    assert t.chains == (step("out", "dnat ip to 10.0.0.2:80"), step("post", "masquerade"))


def test_arriving_uses_prerouting_then_postrouting() -> None:
    t = run(HOOKS)
    assert t.endpoints == ("10.0.0.1:80",)
    assert t.masquerade is True
    assert t.chains == (step("pre", "dnat ip to 10.0.0.1:80"), step("post", "masquerade"))


def test_arriving_dnat_to_a_local_address_skips_postrouting() -> None:
    text = table(prerouting("dnat ip to 198.18.0.1:8080"), postrouting("masquerade"))
    t = run(text, local=("198.18.0.1",))
    assert (t.verdict, t.endpoints, t.masquerade) == ("dnat", ("198.18.0.1:8080",), False)
    assert t.chains == (step("pre", "dnat ip to 198.18.0.1:8080"),)
    assert run(text).masquerade is True  # not local: forwarded, postrouting runs
    # sent by the node itself, postrouting runs even to its own address
    out = table(output("dnat ip to 198.18.0.1:8080"), postrouting("masquerade"))
    assert run(out, src=NODE, from_node=True, local=("198.18.0.1",)).masquerade is True


@pytest.mark.parametrize(
    ("src", "from_node", "local", "source"),
    [
        (POD, False, (), "pod"),
        (OUTSIDE, False, (), "outside"),
        (NODE, True, (), "node"),
        ("198.18.0.1", False, ("198.18.0.1",), "node"),
    ],
)
def test_source_as_the_rules_classify_it(
    src: str, from_node: bool, local: tuple[str, ...], source: str
) -> None:
    text = table(nset("pod-cidrs", "type ipv4_addr", "198.51.100.0/24", flags="interval"))
    assert run(text, src=src, from_node=from_node, local=local).source == source


def test_untouched_when_nothing_matches() -> None:
    t = run(table(prerouting("ip daddr 10.9.9.9 drop")))
    assert (t.verdict, t.endpoints, t.probabilities, t.chains) == ("untouched", (), {}, ())
    assert t.affinity is None and t.masquerade is False


def test_jump_loop_is_refused() -> None:
    with pytest.raises(TraceError, match="nest more than"):
        run(table(prerouting("jump a"), chain("a", "jump a")))


# -- what the interpreter refuses -----------------------------------------------------


REFUSED = [
    pytest.param(table(prerouting("ip daddr 10.0.0.1 counter drop")), "counter", id="counter"),
    pytest.param(table(prerouting("counter")), "counter", id="counter-alone"),
    pytest.param(table(prerouting("ip daddr 10.0.0.1 log")), "log", id="log"),
    pytest.param(table(prerouting("tcp flags syn drop")), "tcp flags", id="tcp-flags"),
    pytest.param(table(prerouting("tcp dport 80 drop")), "tcp dport", id="tcp-dport"),
    pytest.param(table(prerouting("ct state new accept")), "ct state", id="ct-state"),
    pytest.param(table(prerouting("meta l4proto { tcp, udp } drop")), "l4proto", id="anon-set"),
    pytest.param(
        table(chain("fw", "drop", hook="forward", priority="0").replace("type nat", "type filter")),
        "type filter",
        id="filter-base-chain",
    ),
    pytest.param(
        table(chain("pre", "drop", hook="prerouting").replace("policy accept", "policy drop")),
        "policy drop",
        id="policy-drop",
    ),
    pytest.param(table(prerouting("ip daddr @nope drop")), "@nope", id="unknown-set"),
    pytest.param(table(prerouting("ip daddr vmap @nope")), "@nope", id="unknown-vmap"),
    pytest.param(table(prerouting("goto nowhere")), "goto nowhere", id="goto-missing-chain"),
    pytest.param(table(prerouting("jump nowhere")), "jump nowhere", id="jump-missing-chain"),
    pytest.param(table(prerouting("ip6 daddr ::1 drop")), "ip6 daddr", id="ip6-in-ip-table"),
    pytest.param(table(prerouting("dnat to 10.0.0.1:80")), "dnat to", id="dnat-without-family"),
    pytest.param(table(prerouting("dnat ip to 10.0.0.1")), "dnat ip to", id="dnat-without-port"),
    pytest.param(table(prerouting("reject with tcp reset")), "reject with", id="reject-with"),
    pytest.param(table(prerouting("masquerade random")), "masquerade", id="masquerade-random"),
    pytest.param(table(prerouting("meta mark set 0x1")), "meta mark set", id="mark-set-constant"),
    pytest.param(
        table(prerouting("meta mark set meta mark ^ 0x1")), "meta mark set", id="mark-set-xor"
    ),
    pytest.param(table(prerouting("meta mark & 0x1 != 0x1 drop")), "meta mark &", id="mask-ne"),
    pytest.param(table(prerouting("th dport http drop")), "http", id="service-name"),
    pytest.param(table(prerouting("fib daddr type unicast drop")), "unicast", id="fib-unicast"),
    pytest.param(
        table(nset("s", "type ipv4_addr", "10.0.0.1"), prerouting("ip daddr @s drop")).replace(
            "type nat hook prerouting priority dstnat", "type nat hook prerouting priority"
        ),
        "priority;",
        id="priority-missing",
    ),
    pytest.param(
        table(
            nmap("m", "typeof numgen random mod 1 : verdict", "0 : drop"),
            prerouting("numgen random mod 2 offset 0 @m drop"),
        ),
        "offset 0 @m drop",
        id="numgen-outside-map",
    ),
    pytest.param(
        table(
            nmap("m", "typeof numgen random mod 1 : verdict", "0 : drop"),
            prerouting("numgen random mod 0 offset 0 vmap @m"),
        ),
        "mod 0",
        id="numgen-modulus-0",
    ),
    pytest.param(
        table(nset("s", "type ipv4_addr"), prerouting("update @s { ip saddr }")),
        "update @s",
        id="update-static-set",
    ),
    pytest.param(
        table(nset("s", "type inet_service", "80-90"), prerouting("th dport @s drop")),
        "80-90",
        id="element-range",
    ),
    pytest.param(
        table(nset("s", "type ipv4_addr", "10.0.0.1").replace("type ipv4_addr", "policy memory")),
        "policy memory",
        id="unknown-set-property",
    ),
    pytest.param(
        table(prerouting("drop")).replace("table ip t", "table inet t"), "inet", id="inet"
    ),
    pytest.param("add rule ip t pre drop\n", "add rule", id="add-rule"),
    pytest.param(table(prerouting("drop")) + "}\n", "}", id="stray-brace"),
    pytest.param(table("flowtable f {\n}\n"), "flowtable", id="flowtable"),
    pytest.param(
        table(prerouting("dnat ip to [2001:db8::1]:80")), "dnat ip to [", id="dnat-other-family"
    ),
]


@pytest.mark.parametrize(("text", "fragment"), REFUSED)
def test_refused_with_the_line(text: str, fragment: str) -> None:
    with pytest.raises(TraceError) as info:
        run(text)
    if fragment == "}":  # the stray brace: the last line
        n = len(text.splitlines())
        assert f"line {n}:" in str(info.value) and "'}'" in str(info.value)
    else:
        assert_names_line(info.value, text, fragment)


# Refused where the problem spans lines: (id, script, the line the message names).
WITHOUT_LINE = [
    (
        "unterminated-table",
        "table ip t {\n" + prerouting("drop"),
        "table ip t {",
    ),
    (
        "unterminated-elements",
        "table ip t {\nset s {\ntype ipv4_addr\nelements = {\n10.0.0.1,\n",
        "elements = {",
    ),
    (
        "map-element-goto-missing-chain",
        table(
            nmap("m", "type ipv4_addr : verdict", f"{CIP} : goto nowhere"),
            prerouting("ip daddr vmap @m"),
        ),
        "goto nowhere",
    ),
    (
        "numgen-in-concatenation",
        table(
            nmap("m", "type mark . ipv4_addr : verdict"),
            prerouting("numgen random mod 2 offset 0 . ip daddr vmap @m"),
        ),
        "offset 0 . ip daddr",
    ),
]


@pytest.mark.parametrize(
    ("text", "fragment"), [pytest.param(text, frag, id=i) for i, text, frag in WITHOUT_LINE]
)
def test_refused_names_the_line(text: str, fragment: str) -> None:
    with pytest.raises(TraceError) as info:
        run(text)
    assert_names_line(info.value, text, fragment)


def test_unknown_backend_and_bad_packets_are_trace_errors() -> None:
    text = table(prerouting("drop"))
    with pytest.raises(TraceError, match="unknown backend 'pf'"):
        trace(text, "pf", Packet(OUTSIDE, CIP, 80))
    with pytest.raises(TraceError, match="same IP family"):
        run(text, src="2001:db8::1")
    with pytest.raises(TraceError, match="not an IP address"):
        run(text, dst="203.0.113.300")
    with pytest.raises(TraceError, match="--port 0"):
        run(text, port=0)
    with pytest.raises(TraceError, match="--proto 'icmp'"):
        run(text, proto="icmp")
    with pytest.raises(TraceError, match="--node-address"):
        run(text, local=("nope",))


# -- malformed input and constructs once answered wrongly ---------------------------------

AFFINITY_SET = nset("a", "typeof ip saddr", flags="dynamic,timeout")


CRASHES = [
    pytest.param(
        table(prerouting("numgen random mod 2 offset")),
        "numgen random",
        id="numgen-random-without-offset-value",
    ),
    pytest.param(
        table(prerouting("ip saddr . numgen inc mod 1 offset")),
        "numgen inc",
        id="numgen-inc-without-offset-value",
    ),
    pytest.param(
        table(prerouting("meta mark & 0x4000 accept")),
        "meta mark &",
        id="mask-without-comparison",
    ),
    pytest.param(
        table(prerouting("meta mark & foo == 0x1 drop")),
        "meta mark &",
        id="mask-not-a-number",
    ),
    pytest.param(
        table(chain("pre", "drop", hook="prerouting", priority="first")),
        "priority first",
        id="priority-unknown-name",
    ),
    pytest.param(
        table(prerouting("dnat ip to 999.1.1.1:80")),
        "dnat ip to",
        id="dnat-bad-ipv4",
    ),
    pytest.param(
        table(prerouting("dnat ip to [1:2:3]:80")),
        "dnat ip to",
        id="dnat-bad-ipv6",
    ),
    pytest.param(
        table(prerouting("dnat ip to")),
        "dnat ip to",
        id="dnat-to-nothing",
    ),
    pytest.param(
        table(prerouting("meta mark set meta mark")),
        "meta mark set",
        id="mark-set-without-operator",
    ),
    pytest.param(
        table(prerouting("meta mark set meta mark |")),
        "meta mark set",
        id="mark-set-without-operand",
    ),
    pytest.param(
        table(prerouting("meta mark set meta mark | foo")),
        "meta mark set",
        id="mark-set-not-a-number",
    ),
    pytest.param(
        table(AFFINITY_SET, prerouting("update @a { ip saddr timeout 3h }")),
        "update @a",
        id="update-timeout-hours",
    ),
    pytest.param(
        table(AFFINITY_SET, prerouting("update @a { ip saddr timeout }")),
        "update @a",
        id="update-timeout-without-value",
    ),
    pytest.param(
        table(AFFINITY_SET, prerouting("update @a")),
        "update @a",
        id="update-without-element",
    ),
]


@pytest.mark.parametrize(("text", "fragment"), CRASHES)
def test_malformed_rule_is_a_trace_error_not_a_crash(text: str, fragment: str) -> None:
    with pytest.raises(TraceError) as info:
        run(text)
    assert_names_line(info.value, text, fragment)


VERDICT_MAP = "type ipv4_addr : verdict"


def test_vmap_continue_goes_on_with_the_next_rule() -> None:
    text = table(
        nmap("m", VERDICT_MAP, f"{CIP} : continue"), prerouting("ip daddr vmap @m", "drop")
    )
    assert run(text).verdict == "drop"


@pytest.mark.parametrize(
    ("collection_text", "fragment"),
    [
        pytest.param(nmap("m", VERDICT_MAP, f"{CIP} : bogus"), "bogus", id="unknown-verdict"),
        pytest.param(nset("m", "type ipv4_addr", CIP), "vmap @m", id="a-set-not-a-map"),
        pytest.param(
            nmap("m", "type ipv4_addr : ipv4_addr . inet_service", f"{CIP} : 10.0.0.1 . 80"),
            "vmap @m",
            id="a-dnat-map",
        ),
    ],
)
def test_vmap_over_data_that_is_not_a_verdict_is_refused(
    collection_text: str, fragment: str
) -> None:
    text = table(collection_text, prerouting("ip daddr vmap @m", "drop"))
    try:
        t = run(text)
    except TraceError as exc:
        assert_names_line(exc, text, fragment)
    else:
        raise AssertionError(f"answered {t.verdict} (the next rule would drop)")


def test_key_shorter_than_the_set_is_refused() -> None:
    text = table(
        nset("s", "type ipv4_addr . inet_service", f"{CIP} . 80"),
        prerouting("ip daddr @s drop"),
    )
    try:
        t = run(text)
    except TraceError as exc:
        assert_names_line(exc, text, "ip daddr @s")
    else:
        raise AssertionError(f"answered {t.verdict}")


def test_protocol_by_number() -> None:
    assert run(table(prerouting("meta l4proto 6 drop"))).verdict == "drop"


def test_a_table_declared_twice_keeps_both_blocks() -> None:
    text = table(prerouting("drop")) + table(nset("s", "type ipv4_addr"))
    assert run(text).verdict == "drop"


# -- Maglev (jhash) and weighted picks -------------------------------------------------

FLOW_HASH = "jhash ip saddr . tcp sport . ip daddr . tcp dport mod 5 seed 0x5eed offset 7"


def maglev(pick: str = FLOW_HASH, *rest: str) -> str:
    """Five slots of three endpoints: two, two and one (weights, or Maglev's table)."""
    return table(
        nmap(
            "m",
            "typeof numgen random mod 1 : ip daddr . tcp dport",
            "7 : 10.0.0.1 . 80",
            "8 : 10.0.0.2 . 80",
            "9 : 10.0.0.1 . 80",
            "10 : 10.0.0.3 . 80",
            "11 : 10.0.0.2 . 80",
        ),
        prerouting(f"dnat ip to {pick} map @m", *rest),
    )


def test_jhash_of_the_flow_weighs_every_slot_alike() -> None:
    t = run(maglev())
    assert t.probabilities == {"10.0.0.1:80": 0.4, "10.0.0.2:80": 0.4, "10.0.0.3:80": 0.2}
    rule = f"dnat ip to {FLOW_HASH} map @m"
    assert t.chains == (step("pre", rule),)
    assert t.balancing == (
        Pick(
            "maglev",
            TABLE,
            "pre",
            rule,
            size=5,
            seed=0x5EED,
            hash="flow",
            fields=("ip saddr", "tcp sport", "ip daddr", "tcp dport"),
            slots=(("10.0.0.1:80", 2), ("10.0.0.2:80", 2), ("10.0.0.3:80", 1)),
        ),
    )
    assert t.as_json()["balancing"] == [
        {
            "algorithm": "maglev",
            "table": TABLE,
            "chain": "pre",
            "rule": rule,
            "table_size": 5,
            "slots": {"10.0.0.1:80": 2, "10.0.0.2:80": 2, "10.0.0.3:80": 1},
            "seed": "0x5eed",
            "hash": "flow",
            "fields": ["ip saddr", "tcp sport", "ip daddr", "tcp dport"],
            "slot": None,
        }
    ]


def test_jhash_of_tcp_ports_matches_only_tcp() -> None:
    """nft folds the ``meta l4proto tcp`` a ``tcp sport`` payload needs into it."""
    text = maglev(FLOW_HASH, "dnat ip to 10.0.0.9:53")
    assert run(text, proto="udp").endpoints == ("10.0.0.9:53",)
    assert len(run(text, proto="tcp").endpoints) == 3


def test_jhash_without_offset_starts_at_slot_0() -> None:
    text = table(
        nmap("m", "typeof numgen random mod 1 : ip daddr . tcp dport", "0 : 10.0.0.1 . 80"),
        prerouting(
            "dnat ip to jhash ip saddr . tcp sport . ip daddr . tcp dport mod 1 seed 0x1 map @m"
        ),
    )
    assert run(text).probabilities == {"10.0.0.1:80": 1.0}


def test_jhash_of_the_client_address_in_a_verdict_map() -> None:
    text = table(
        nmap(
            "m",
            "typeof numgen random mod 1 : verdict",
            "0 : goto a",
            "1 : goto b",
            "2 : goto a",
        ),
        prerouting("jhash ip saddr mod 3 seed 0xffffffff vmap @m"),
        chain("a", "dnat ip to 10.0.0.1:80"),
        chain("b", "dnat ip to 10.0.0.2:80"),
    )
    t = run(text, proto="udp")  # no ports hashed: any protocol
    assert t.probabilities == pytest.approx({"10.0.0.1:80": 2 / 3, "10.0.0.2:80": 1 / 3}, abs=1e-6)
    (pick,) = t.balancing
    assert (pick.algorithm, pick.hash, pick.fields, pick.seed, pick.size) == (
        "maglev",
        "client",
        ("ip saddr",),
        0xFFFFFFFF,
        3,
    )
    assert pick.slots == (("10.0.0.1:80", 2), ("10.0.0.2:80", 1))


def test_jhash_over_ipv6_reads_ip6_fields() -> None:
    text = table(
        nmap("m", "typeof numgen random mod 1 : ip6 daddr . udp dport", "0 : 2001:db8::1 . 53"),
        prerouting(
            "dnat ip6 to jhash ip6 saddr . udp sport . ip6 daddr . udp dport mod 1 seed 0x0 map @m"
        ),
        family="ip6",
    )
    t = run(text, src="2001:db8:9::1", dst="2001:db8:3::10", port=53, proto="udp")
    assert t.endpoints == ("[2001:db8::1]:53",)
    assert t.balancing[0].fields == ("ip6 saddr", "udp sport", "ip6 daddr", "udp dport")


def test_weighted_numgen_random_sums_the_slots_of_each_endpoint() -> None:
    text = maglev("numgen random mod 5 offset 7")
    t = run(text)
    assert t.probabilities == {"10.0.0.1:80": 0.4, "10.0.0.2:80": 0.4, "10.0.0.3:80": 0.2}
    (pick,) = t.balancing
    assert (pick.algorithm, pick.size, pick.seed, pick.hash, pick.fields) == (
        "random",
        5,
        None,
        "",
        (),
    )
    assert dict(pick.slots) == {"10.0.0.1:80": 2, "10.0.0.2:80": 2, "10.0.0.3:80": 1}
    assert "seed" not in t.as_json()["balancing"][0]


def test_no_pick_no_balancing() -> None:
    assert run(table(prerouting("dnat ip to 10.0.0.1:80"))).balancing == ()
    assert run(table(prerouting("drop"))).as_json()["balancing"] == []


# The kernel's answers, read from conntrack (tests/kernel/test_trace_maglev.py checks
# the same computation against a live kernel): the slot of a flow with its source port.
def test_jhash_with_the_source_port_takes_one_slot() -> None:
    text = maglev(
        "jhash ip saddr . tcp sport . ip daddr . tcp dport mod 5 seed 0x5eed1234 offset 7"
    )
    slots = set()
    for sport in range(40000, 40020):
        t = trace(text, "nftables", Packet(POD, CIP, 80, "tcp", sport=sport))
        (pick,) = t.balancing
        assert pick.slot is not None and 0 <= pick.slot < 5
        assert len(t.endpoints) == 1 and t.probabilities == {t.endpoints[0]: 1.0}
        assert pick.slots == ()
        slots.add(pick.slot)
    assert len(slots) > 2  # the port moves the flow


def test_jhash_is_lookup3() -> None:
    """Bob Jenkins' own test vectors of hashlittle (lookup3.c, driver5), which the
    kernel's jhash is on a little-endian machine."""
    assert jhash(b"", 0) == 0xDEADBEEF
    assert jhash(b"", 0xDEADBEEF) == 0xBD5B7DDE
    assert jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert jhash(b"Four score and seven years ago", 1) == 0xCD628161


@pytest.mark.parametrize(
    ("src", "sport", "dst", "dport", "slot"),
    [
        # mod 251, seed 0x5eed1234: regression values of the computation that
        # tests/kernel/test_trace_maglev.py checks against a live kernel's picks.
        ("198.51.100.12", 40000, "203.0.113.10", 80, 192),
        ("192.0.2.100", 20011, "203.0.113.10", 80, 89),
        ("2001:db8:1::100", 20048, "2001:db8:3::10", 80, 63),
    ],
)
def test_jhash_slot_of_a_flow(src: str, sport: int, dst: str, dport: int, slot: int) -> None:
    data = b"".join(
        [
            ipaddress.ip_address(src).packed,
            sport.to_bytes(2, "big") + bytes(2),
            ipaddress.ip_address(dst).packed,
            dport.to_bytes(2, "big") + bytes(2),
        ]
    )
    assert jhash_slot(data, 0x5EED1234, 251) == slot


def test_jhash_slot_of_a_client_address() -> None:
    assert jhash_slot(ipaddress.ip_address("192.0.2.100").packed, 0x5EED1234, 251) == 187


JHASH_MAP = nmap("m", "typeof numgen random mod 1 : ip daddr . tcp dport", "0 : 10.0.0.1 . 80")
JHASH_VMAP = nmap("v", "typeof numgen random mod 1 : verdict", "0 : drop")
FLOW = "ip saddr . tcp sport . ip daddr . tcp dport"


def jhash_rule(rule: str, pick_map: str = JHASH_MAP) -> str:
    return table(pick_map, prerouting(rule))


@pytest.mark.parametrize(
    ("text", "fragment", "why"),
    [
        pytest.param(
            jhash_rule(f"dnat ip to jhash {FLOW} mod 3 map @m"),
            "jhash",
            "mod M seed S",
            id="no-seed",
        ),
        pytest.param(
            jhash_rule(f"dnat ip to jhash {FLOW} mod 0 seed 0x1 map @m"),
            "mod 0",
            "positive modulus",
            id="modulus-0",
        ),
        pytest.param(
            jhash_rule(f"dnat ip to jhash {FLOW} mod 3 seed 0x100000000 map @m"),
            "seed 0x1000",
            "32-bit seed",
            id="seed-too-wide",
        ),
        pytest.param(
            jhash_rule(f"dnat ip to jhash {FLOW} mod 3 seed zz map @m"),
            "seed zz",
            "not a rule svcrules writes",
            id="seed-not-a-number",
        ),
        pytest.param(
            jhash_rule(f"dnat ip to jhash {FLOW} mod 3 seed 0x1 offset map @m"),
            "offset map",
            "not a rule svcrules writes",
            id="offset-without-value",
        ),
        pytest.param(
            jhash_rule("dnat ip to jhash ip daddr . tcp dport mod 3 seed 0x1 map @m"),
            "jhash ip daddr",
            "client address or the flow",
            id="other-fields",
        ),
        pytest.param(
            jhash_rule(
                "dnat ip to jhash ip saddr . tcp sport . ip daddr . udp dport mod 3 seed 0x1 map @m"
            ),
            "udp dport",
            "client address or the flow",
            id="two-protocols",
        ),
        pytest.param(
            jhash_rule("dnat ip to jhash ip saddr . th sport mod 3 seed 0x1 map @m"),
            "th sport",
            "jhash of th sport",
            id="unknown-field",
        ),
        pytest.param(
            jhash_rule("dnat ip to jhash ip6 saddr mod 3 seed 0x1 map @m"),
            "ip6 saddr",
            "jhash of ip6 saddr",
            id="other-family",
        ),
        pytest.param(
            jhash_rule("jhash ip saddr mod 1 seed 0x1 @v drop", JHASH_VMAP),
            "@v drop",
            "jhash outside a map lookup",
            id="outside-a-map",
        ),
        pytest.param(
            jhash_rule("jhash ip saddr mod 1 seed 0x1 . ip daddr vmap @v", JHASH_VMAP),
            ". ip daddr vmap",
            "jhash inside a concatenation",
            id="in-a-concatenation",
        ),
        pytest.param(
            jhash_rule("dnat ip to jhash ip saddr mod", JHASH_MAP),
            "jhash ip saddr mod",
            "not a rule svcrules writes",
            id="truncated",
        ),
    ],
)
def test_malformed_jhash_is_refused_with_the_line(text: str, fragment: str, why: str) -> None:
    with pytest.raises(TraceError, match=why) as info:
        run(text)
    assert_names_line(info.value, text, fragment)
