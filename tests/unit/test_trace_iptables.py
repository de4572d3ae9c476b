"""svcrules.trace reading iptables-restore input: each match and target of the emitted
subset on small hand-written inputs, and a clear TraceError (with the line) for
anything else."""

from __future__ import annotations

import pytest

from svcrules.trace import Packet, Step, Trace, TraceError, trace
from svcrules.trace.model import Affinity, Pick

CIP = "203.0.113.10"
OUTSIDE = "192.0.2.100"
NODE = "192.0.2.1"
POD = "198.51.100.12"

NAT_JUMPS = (
    "# jump PREROUTING -j SVC",
    "# jump OUTPUT -j SVC",
    "# jump POSTROUTING -j POST",
)
FILTER_JUMPS = (
    "# jump INPUT -m conntrack --ctstate NEW -j FSVC",
    "# jump FORWARD -m conntrack --ctstate NEW -j FSVC",
    "# jump OUTPUT -m conntrack --ctstate NEW -j FSVC",
)


def section(
    name: str, rules: tuple[str, ...], jumps: tuple[str, ...], chains: tuple[str, ...] = ()
) -> str:
    """One table: its ``# jump`` lines, a declaration for every chain the rules append
    to (and those named in ``chains``), the rules, COMMIT."""
    names = dict.fromkeys([*chains, *(r.split()[1] for r in rules if r.startswith("-A "))])
    lines = [f"*{name}", *jumps, *(f":{c} - [0:0]" for c in names), *rules, "COMMIT"]
    return "\n".join(lines) + "\n"


def ipt(
    *nat: str,
    filt: tuple[str, ...] = (),
    family: str = "ipv4",
    chains: tuple[str, ...] = ("SVC", "POST"),
    nat_jumps: tuple[str, ...] = NAT_JUMPS,
) -> str:
    """One family's input; the nat chains SVC (from PREROUTING and OUTPUT) and POST
    (from POSTROUTING) always exist, the filter chain FSVC when it has rules."""
    text = f"# family {family}\n" + section("nat", nat, nat_jumps, chains)
    if filt:
        text += section("filter", filt, FILTER_JUMPS, ("FSVC",))
    return text


def run(
    text: str,
    dst: str = CIP,
    port: int = 80,
    src: str = OUTSIDE,
    proto: str = "tcp",
    from_node: bool = False,
    local: tuple[str, ...] = (),
) -> Trace:
    return trace(text, "iptables", Packet(src, dst, port, proto, from_node, local))


def nat(chain: str, rule: str, *when: str) -> Step:
    return Step("ipv4 nat", chain, rule, tuple(when))


def line_of(text: str, fragment: str) -> tuple[int, str]:
    for n, line in enumerate(text.splitlines(), 1):
        if fragment in line:
            return n, line.strip()
    raise AssertionError(f"{fragment!r} not in the input")


def assert_names_line(exc: TraceError, text: str, fragment: str) -> None:
    n, line = line_of(text, fragment)
    message = str(exc)
    assert f"line {n}:" in message, message
    assert repr(line) in message, message


# -- matches ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "src", "dst", "verdict"),
    [
        ("-d 203.0.113.10/32 -j DROP", OUTSIDE, CIP, "drop"),
        ("-d 203.0.113.10/32 -j DROP", OUTSIDE, "203.0.113.11", "untouched"),
        ("-d 203.0.113.0/25 -j DROP", OUTSIDE, "203.0.113.127", "drop"),
        ("-d 203.0.113.0/25 -j DROP", OUTSIDE, "203.0.113.128", "untouched"),
        ("-d 203.0.113.10 -j DROP", OUTSIDE, CIP, "drop"),  # a bare address is a /32
        ("! -d 203.0.113.10/32 -j DROP", OUTSIDE, CIP, "untouched"),
        ("! -d 203.0.113.10/32 -j DROP", OUTSIDE, "203.0.113.11", "drop"),
        ("-s 198.51.100.0/24 -j DROP", POD, CIP, "drop"),
        ("-s 198.51.100.0/24 -j DROP", OUTSIDE, CIP, "untouched"),
        ("! -s 198.51.100.0/24 -j DROP", POD, CIP, "untouched"),
        ("! -s 198.51.100.0/24 -j DROP", OUTSIDE, CIP, "drop"),
        ("-s 192.0.2.0/24 ! -d 203.0.113.0/25 -j DROP", OUTSIDE, CIP, "untouched"),
        ("-s 192.0.2.0/24 ! -d 203.0.113.0/25 -j DROP", OUTSIDE, "10.0.0.1", "drop"),
    ],
)
def test_addresses_with_and_without_negation(rule: str, src: str, dst: str, verdict: str) -> None:
    t = run(ipt(f"-A SVC {rule}"), src=src, dst=dst)
    assert t.verdict == verdict
    assert t.backend == "iptables"


@pytest.mark.parametrize(
    ("rule", "proto", "port", "verdict"),
    [
        ("-p tcp -m tcp --dport 80 -j DROP", "tcp", 80, "drop"),
        ("-p tcp -m tcp --dport 80 -j DROP", "tcp", 81, "untouched"),
        ("-p tcp -m tcp --dport 80 -j DROP", "udp", 80, "untouched"),
        ("-p udp -m udp --dport 53 -j DROP", "udp", 53, "drop"),
        ("-p udp -m udp --dport 53 -j DROP", "tcp", 53, "untouched"),
        ("-p sctp -m sctp --dport 80 -j DROP", "sctp", 80, "drop"),
        ("-p sctp -m sctp --dport 80 -j DROP", "tcp", 80, "untouched"),
        ("-p udp -j DROP", "udp", 9, "drop"),
        ("! -p udp -j DROP", "udp", 9, "untouched"),
        ("! -p udp -j DROP", "sctp", 9, "drop"),
    ],
)
def test_protocol_and_port(rule: str, proto: str, port: int, verdict: str) -> None:
    assert run(ipt(f"-A SVC {rule}"), proto=proto, port=port).verdict == verdict


def cascade(*probabilities: str) -> str:
    """One statistic rule per probability, then a last endpoint for the rest."""
    rules = [
        f"-A SVC -m statistic --mode random --probability {p} -g SEP{n}"
        for n, p in enumerate(probabilities)
    ]
    rules.append(f"-A SVC -g SEP{len(probabilities)}")
    for n in range(len(probabilities) + 1):
        rules.append(f"-A SEP{n} -p tcp -j DNAT --to-destination 10.0.0.{n + 1}:8080")
    return ipt(*rules)


def test_statistic_cascade_of_three_endpoints() -> None:
    t = run(cascade("0.3333333333", "0.5000000000"))
    assert t.verdict == "dnat"
    assert t.endpoints == ("10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080")
    assert t.probabilities == pytest.approx({ep: 1 / 3 for ep in t.endpoints}, abs=1e-6)
    first = "-m statistic --mode random --probability 0.3333333333 -g SEP0"
    second = "-m statistic --mode random --probability 0.5000000000 -g SEP1"
    assert nat("SVC", first, "10.0.0.1:8080") in t.chains
    assert nat("SVC", second, "10.0.0.2:8080") in t.chains
    assert nat("SVC", "-g SEP2", "10.0.0.3:8080") in t.chains
    assert t.chains[0] == nat("PREROUTING", "-j SVC")


def test_statistic_uneven_split() -> None:
    t = run(cascade("0.2500000000"))
    assert t.probabilities == {"10.0.0.1:8080": 0.25, "10.0.0.2:8080": 0.75}


def test_statistic_cascade_is_a_random_pick_of_its_chain() -> None:
    """Weights 2, 1, 3 as the renderer spells them (slots / slots left)."""
    t = run(cascade("0.3333333333", "0.2500000000"))
    assert t.probabilities == pytest.approx(
        {"10.0.0.1:8080": 2 / 6, "10.0.0.2:8080": 1 / 6, "10.0.0.3:8080": 3 / 6}, abs=1e-6
    )
    assert t.balancing == (Pick("random", "ipv4 nat", "SVC", ""),)
    assert t.as_json()["balancing"] == [
        {"algorithm": "random", "table": "ipv4 nat", "chain": "SVC"}
    ]


def test_statistic_rule_with_other_matches_that_fail_does_not_fork() -> None:
    text = ipt(
        "-A SVC -s 10.0.0.0/8 -m statistic --mode random --probability 0.5000000000 -g SEP0",
        "-A SVC -g SEP1",
        "-A SEP0 -j DNAT --to-destination 10.0.0.1:80",
        "-A SEP1 -j DNAT --to-destination 10.0.0.2:80",
    )
    assert run(text).probabilities == {"10.0.0.2:80": 1.0}
    assert run(text, src="10.9.9.9").probabilities == {"10.0.0.1:80": 0.5, "10.0.0.2:80": 0.5}


def affinity(set_name_b: str = "SEPB") -> str:
    return ipt(
        "-A SVC -m recent --name SEPA --rcheck --seconds 600 --reap -g SEPA",
        "-A SVC -m recent --name SEPB --rcheck --seconds 600 --reap -g SEPB",
        "-A SVC -m statistic --mode random --probability 0.5000000000 -g SEPA",
        "-A SVC -g SEPB",
        "-A SEPA -m recent --name SEPA --set",
        "-A SEPA -p tcp -j DNAT --to-destination 10.0.0.1:80",
        f"-A SEPB -m recent --name {set_name_b} --set",
        "-A SEPB -p tcp -j DNAT --to-destination 10.0.0.2:80",
    )


def test_recent_affinity_is_sticky() -> None:
    t = run(affinity())
    assert t.affinity == Affinity(timeout=600, sticky=True)
    assert t.probabilities == {"10.0.0.1:80": 0.5, "10.0.0.2:80": 0.5}
    assert nat("SEPA", "-m recent --name SEPA --set", "10.0.0.1:80") in t.chains


def test_recent_affinity_not_sticky_when_set_and_rcheck_differ() -> None:
    t = run(affinity(set_name_b="SEPX"))  # SEPB records under another name
    assert t.affinity == Affinity(timeout=600, sticky=False)


def test_no_affinity_without_rcheck() -> None:
    assert run(cascade("0.5000000000")).affinity is None


ADDRTYPE = ipt(
    "-A SVC -m addrtype --dst-type LOCAL -j DROP",
    "-A SVC -m addrtype --src-type LOCAL -j REJECT",
)


@pytest.mark.parametrize(
    ("src", "dst", "local", "verdict"),
    [
        (OUTSIDE, "198.18.0.1", ("198.18.0.1",), "drop"),
        (OUTSIDE, "198.18.0.1", (), "untouched"),
        (OUTSIDE, "127.0.0.1", (), "drop"),  # loopback is always local
        ("198.18.0.1", CIP, ("198.18.0.1",), "reject"),
        ("198.18.0.2", CIP, ("198.18.0.1",), "untouched"),
    ],
)
def test_addrtype_local(src: str, dst: str, local: tuple[str, ...], verdict: str) -> None:
    assert run(ADDRTYPE, src=src, dst=dst, local=local).verdict == verdict


def test_addrtype_src_local_from_the_node() -> None:
    t = run(ADDRTYPE, src=NODE, from_node=True)
    assert (t.verdict, t.source) == ("reject", "node")


FILTERED = ipt(
    f"-A SVC -d {CIP}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.1:8080",
    f"-A SVC -d {CIP}/32 -p tcp -m tcp --dport 81 -j ACCEPT",
    f"-A SVC -d {CIP}/32 -p tcp -m tcp --dport 81 -j DNAT --to-destination 10.0.0.1:8081",
    filt=(
        f"-A FSVC -p tcp -m conntrack --ctorigdst {CIP}/32 --ctorigdstport 80 -j FW",
        "-A FSVC -m conntrack --ctstate DNAT -j RETURN",
        f"-A FSVC -d {CIP}/32 -p tcp -m tcp --dport 81 -j REJECT",
        "-A FSVC -d 203.0.113.0/25 -j DROP",
        "-A FW -s 192.0.2.0/24 -j RETURN",
        "-A FW -j DROP",
    ),
)


def test_ctorigdst_sees_the_address_before_dnat() -> None:
    admitted = run(FILTERED)  # 192.0.2.0/24 is allowed
    assert (admitted.verdict, admitted.endpoints) == ("dnat", ("10.0.0.1:8080",))
    assert Step("ipv4 filter", "FW", "-s 192.0.2.0/24 -j RETURN") in admitted.chains
    assert Step("ipv4 filter", "FSVC", "-m conntrack --ctstate DNAT -j RETURN") in admitted.chains
    refused = run(FILTERED, src="198.18.0.7")
    assert refused.verdict == "drop"
    assert refused.chains[-1] == Step("ipv4 filter", "FW", "-j DROP")


def test_accept_in_nat_then_reject_in_filter() -> None:
    t = run(FILTERED, port=81)
    assert t.verdict == "reject"  # the DNAT after the ACCEPT is never reached
    assert t.chains == (
        nat("PREROUTING", "-j SVC"),
        nat("SVC", f"-d {CIP}/32 -p tcp -m tcp --dport 81 -j ACCEPT"),
        Step("ipv4 filter", "FORWARD", "-m conntrack --ctstate NEW -j FSVC"),
        Step("ipv4 filter", "FSVC", f"-d {CIP}/32 -p tcp -m tcp --dport 81 -j REJECT"),
    )


def test_ctstate_dnat_only_after_a_translation() -> None:
    t = run(FILTERED, dst="203.0.113.11")  # no DNAT: the filter drops
    assert t.verdict == "drop"
    assert t.chains[-1] == Step("ipv4 filter", "FSVC", "-d 203.0.113.0/25 -j DROP")


POSTROUTING = (
    "-A POST -m mark ! --mark 0x00004000/0x00004000 -j RETURN",
    "-A POST -j MARK --xor-mark 0x00004000",
    "-A POST -j MASQUERADE --random-fully",
)


def marking(*svc: str) -> str:
    return ipt(
        *svc,
        "-A SVC -j DNAT --to-destination 10.0.0.1:80",
        "-A MARK-MASQ -j MARK --or-mark 0x00004000",
        "-A OTHER-MARK -j MARK --or-mark 0x00000001",
        *POSTROUTING,
        chains=("SVC", "POST", "MARK-MASQ", "OTHER-MARK"),
    )


def test_mark_then_masquerade_and_why() -> None:
    t = run(marking("-A SVC -j MARK-MASQ"))
    assert (t.masquerade, t.masqueraded) == (True, ("10.0.0.1:80",))
    assert t.masquerade_reason == (
        nat("SVC", "-j MARK-MASQ"),
        nat("MARK-MASQ", "-j MARK --or-mark 0x00004000"),
        nat("POST", "-j MASQUERADE --random-fully"),
    )
    assert t.chains[-2:] == (
        nat("POST", "-j MARK --xor-mark 0x00004000"),
        nat("POST", "-j MASQUERADE --random-fully"),
    )


def test_unmarked_returns_before_masquerade() -> None:
    t = run(marking())
    assert (t.masquerade, t.masquerade_reason) == (False, ())
    assert t.chains[-1] == nat("POST", "-m mark ! --mark 0x00004000/0x00004000 -j RETURN")


def test_mark_mask_and_xor() -> None:
    assert run(marking("-A SVC -j OTHER-MARK")).masquerade is False  # another bit
    # xor twice: set, then cleared again before POSTROUTING looks
    twice = run(marking("-A SVC -j MARK-MASQ", "-A SVC -j MARK --xor-mark 0x00004000"))
    assert twice.masquerade is False
    # --mark without '!' and a mask
    text = ipt(
        "-A SVC -j MARK --or-mark 0x00004001",
        "-A SVC -m mark --mark 0x1/0x1 -j DROP",
    )
    assert run(text).verdict == "drop"


def test_hairpin_masquerades_the_endpoint_reaching_itself() -> None:
    text = ipt(
        "-A SVC -m statistic --mode random --probability 0.5000000000 -g SEPA",
        "-A SVC -g SEPB",
        "-A SEPA -s 10.0.0.1/32 -j MARK-MASQ",
        "-A SEPA -j DNAT --to-destination 10.0.0.1:80",
        "-A SEPB -s 10.0.0.2/32 -j MARK-MASQ",
        "-A SEPB -j DNAT --to-destination 10.0.0.2:80",
        "-A MARK-MASQ -j MARK --or-mark 0x00004000",
        *POSTROUTING,
    )
    t = run(text, src="10.0.0.1")
    assert (t.masquerade, t.masqueraded) == (False, ("10.0.0.1:80",))
    assert t.masquerade_reason[0] == nat("SEPA", "-s 10.0.0.1/32 -j MARK-MASQ")


# -- chains, hooks, jumps ----------------------------------------------------------------


def test_without_the_jump_lines_nothing_runs() -> None:
    text = ipt("-A SVC -j DROP", nat_jumps=())
    assert run(text).verdict == "untouched"
    assert run(ipt("-A SVC -j DROP")).verdict == "drop"


def test_jump_line_with_matches() -> None:
    text = ipt("-A SVC -j DROP", nat_jumps=("# jump PREROUTING -d 10.0.0.0/8 -j SVC",))
    assert run(text).verdict == "untouched"
    t = run(text, dst="10.1.1.1")
    assert t.verdict == "drop"
    assert t.chains[0] == nat("PREROUTING", "-d 10.0.0.0/8 -j SVC")


def calls(flag: str) -> str:
    return ipt(
        "-A SVC -j A",
        "-A SVC -j DNAT --to-destination 10.0.0.9:80",
        f"-A A {flag} B",
        "-A A -j DROP",
        "-A B -j MARK --or-mark 0x1",
    )


def test_goto_returns_to_the_callers_caller() -> None:
    t = run(calls("-g"))
    assert t.endpoints == ("10.0.0.9:80",)
    assert t.chains == (
        nat("PREROUTING", "-j SVC"),
        nat("SVC", "-j A"),
        nat("A", "-g B"),
        nat("B", "-j MARK --or-mark 0x1"),
        nat("SVC", "-j DNAT --to-destination 10.0.0.9:80"),
        nat("POSTROUTING", "-j POST"),
    )


def test_jump_returns_to_the_next_rule() -> None:
    t = run(calls("-j"))
    assert t.verdict == "drop"
    assert t.chains[-1] == nat("A", "-j DROP")


def test_return_from_a_chain_and_from_a_builtin_chain() -> None:
    text = ipt(
        "-A SVC -j A",
        "-A SVC -j RETURN",
        "-A SVC -j DROP",
        "-A A -j RETURN",
        "-A A -j REJECT",
        filt=("-A FSVC -d 203.0.113.0/25 -j REJECT",),
    )
    t = run(text)
    assert t.verdict == "reject"  # from the filter table: nat's DROP never ran
    assert nat("SVC", "-j DROP") not in t.chains
    assert Step("ipv4 filter", "FSVC", "-d 203.0.113.0/25 -j REJECT") in t.chains


HOOKS = ipt(
    "-A SVC -j DNAT --to-destination 10.0.0.1:80",
    "-A OUT -j DNAT --to-destination 10.0.0.2:80",
    "-A POST -j MASQUERADE",
    nat_jumps=("# jump PREROUTING -j SVC", "# jump OUTPUT -j OUT", "# jump POSTROUTING -j POST"),
)


def test_from_node_uses_output_and_postrouting() -> None:
    t = run(HOOKS, src=NODE, from_node=True)
    assert (t.endpoints, t.masquerade, t.source) == (("10.0.0.2:80",), True, "node")
    assert t.chains == (
        nat("OUTPUT", "-j OUT"),
        nat("OUT", "-j DNAT --to-destination 10.0.0.2:80"),
        nat("POSTROUTING", "-j POST"),
        nat("POST", "-j MASQUERADE"),
    )


def test_filter_output_runs_after_nat_output_from_the_node() -> None:
    text = ipt(
        "-A SVC -j DNAT --to-destination 10.0.0.1:80",
        filt=("-A FSVC -d 10.0.0.1/32 -j REJECT",),
    )
    t = run(text, src=NODE, from_node=True)
    assert t.verdict == "reject"
    assert t.chains[2] == Step("ipv4 filter", "OUTPUT", "-m conntrack --ctstate NEW -j FSVC")


def test_arriving_dnat_to_a_local_address_skips_postrouting() -> None:
    text = ipt(
        "-A SVC -j DNAT --to-destination 198.18.0.1:8080",
        "-A POST -j MASQUERADE",
        filt=("-A FSVC -j RETURN",),
    )
    t = run(text, local=("198.18.0.1",))
    assert (t.verdict, t.masquerade) == ("dnat", False)
    assert Step("ipv4 filter", "INPUT", "-m conntrack --ctstate NEW -j FSVC") in t.chains
    assert nat("POSTROUTING", "-j POST") not in t.chains
    forwarded = run(text)
    assert forwarded.masquerade is True
    assert Step("ipv4 filter", "FORWARD", "-m conntrack --ctstate NEW -j FSVC") in forwarded.chains


def test_ipv6_dnat_and_family_sections() -> None:
    text = ipt("-A SVC -j DROP") + ipt(
        "-A SVC -p udp -m udp --dport 53 -j DNAT --to-destination [2001:db8:2::13]:5353",
        family="ipv6",
    )
    assert run(text).verdict == "drop"
    t = run(text, src="2001:db8:1::100", dst="2001:db8:3::53", port=53, proto="udp")
    assert t.endpoints == ("[2001:db8:2::13]:5353",)
    assert t.chains[0] == Step("ipv6 nat", "PREROUTING", "-j SVC")


@pytest.mark.parametrize(
    ("src", "from_node", "source"),
    [(POD, False, "pod"), (OUTSIDE, False, "outside"), (NODE, True, "node")],
)
def test_source_from_the_masq_non_pod_chain(src: str, from_node: bool, source: str) -> None:
    text = ipt(
        "-A X-MASQ-NON-POD -s 198.51.100.0/24 -j RETURN",
        "-A X-MASQ-NON-POD -j MARK --or-mark 0x4000",
    )
    assert run(text, src=src, from_node=from_node).source == source


def test_comments_and_quotes() -> None:
    text = ipt('-A SVC -m comment --comment "shop/web: http, \\"quoted\\"" -j DROP')
    assert run(text).verdict == "drop"


# -- what the interpreter refuses -----------------------------------------------------


REFUSED = [
    pytest.param(ipt("-A SVC -m set --match-set svc dst -j DROP"), "--match-set", id="match-set"),
    pytest.param(ipt("-A SVC -p tcp -m multiport --dports 80,443 -j DROP"), "multiport", id="mp"),
    pytest.param(
        ipt("-A OTHER -j DROP", chains=("SVC", "POST")).replace(":OTHER - [0:0]\n", ""),
        "-A OTHER",
        id="undeclared-chain",
    ),
    pytest.param("*nat\n:SVC - [0:0]\nCOMMIT\n", "*nat", id="table-before-family"),
    pytest.param("-A SVC -j DROP\n# family ipv4\n", "-A SVC", id="rule-before-family"),
    pytest.param(
        ipt("-A SVC -j DROP").replace(":SVC - [0:0]", ":FORWARD DROP [0:0]\n:SVC - [0:0]"),
        ":FORWARD DROP",
        id="policy-drop",
    ),
    pytest.param(
        ipt("-A SVC -j REJECT --reject-with tcp-reset"), "--reject-with", id="reject-with"
    ),
    pytest.param(ipt("-A SVC -p all -j DROP"), "-p all", id="proto-all"),
    pytest.param(ipt("-A SVC -p 6 -j DROP"), "-p 6", id="proto-number"),
    pytest.param(ipt("-A SVC ! -m addrtype --dst-type LOCAL -j DROP"), "! -m", id="negated-m"),
    pytest.param(ipt("-A SVC -m addrtype --dst-type UNICAST -j DROP"), "UNICAST", id="addrtype"),
    pytest.param(ipt("-A SVC -m conntrack --ctstate ESTABLISHED -j DROP"), "ESTAB", id="ctstate"),
    pytest.param(ipt("-A SVC -m recent --name X --update -j DROP"), "--update", id="recent-update"),
    pytest.param(ipt("-A SVC -m statistic --mode nth --every 2 -j DROP"), "nth", id="nth"),
    pytest.param(ipt("-A SVC -g DROP"), "-g DROP", id="goto-target"),
    pytest.param(ipt("-A SVC -j A -j DROP", chains=("SVC", "POST", "A")), "-j A -j", id="two"),
    pytest.param(ipt("-A SVC -i eth0 -j DROP"), "-i eth0", id="interface"),
    pytest.param(ipt('-A SVC -m comment --comment "open -j DROP'), "--comment", id="quote"),
    pytest.param(ipt("-I SVC -j DROP"), "-I SVC", id="insert"),
    pytest.param(ipt("-A SVC -j DNAT --to-destination 10.0.0.1"), "--to-destination", id="no-port"),
    pytest.param(ipt("-A SVC -j DNAT --to-destination [2001:db8::1]:80"), "[2001", id="v6-dnat"),
    pytest.param(ipt("-A SVC -j MARK --set-xmark 0x4000/0x4000"), "--set-xmark", id="set-xmark"),
    pytest.param(ipt("-A SVC -j MASQUERADE --to-ports 1000"), "--to-ports", id="masq-ports"),
    pytest.param(ipt("-A SVC -m mark --mark 0xzz -j DROP"), "0xzz", id="bad-mark"),
    pytest.param(ipt("-A SVC -d 203.0.113.0/33 -j DROP"), "/33", id="bad-prefix"),
    pytest.param(ipt("-A SVC -j DROP").replace("*nat", "*mangle"), "*mangle", id="mangle-table"),
    pytest.param(
        ipt("-A SVC -j DROP").replace("# jump PREROUTING -j SVC", "# jump SVC -j SVC"),
        "# jump SVC",
        id="jump-from-own-chain",
    ),
]


@pytest.mark.parametrize(("text", "fragment"), REFUSED)
def test_refused_with_the_line(text: str, fragment: str) -> None:
    with pytest.raises(TraceError) as info:
        run(text)
    assert_names_line(info.value, text, fragment)


def test_missing_commit_is_refused() -> None:
    with pytest.raises(TraceError, match="no COMMIT"):
        run("# family ipv4\n*nat\n:SVC - [0:0]\n-A SVC -j DROP\n")


@pytest.mark.parametrize("target", ["LOG", "NOPE"])
def test_jump_to_an_unknown_target_is_refused_when_reached(target: str) -> None:
    with pytest.raises(TraceError, match=f"no chain '{target}'"):
        run(ipt(f"-A SVC -j {target}"))


# -- malformed input and constructs once answered wrongly ---------------------------------


def test_missing_commit_names_the_table_line() -> None:
    text = "# family ipv4\n*nat\n:SVC - [0:0]\n-A SVC -j DROP\n"
    with pytest.raises(TraceError) as info:
        run(text)
    assert_names_line(info.value, text, "*nat")


@pytest.mark.parametrize("target", ["LOG", "NOPE"])
def test_jump_to_an_unknown_target_names_the_line(target: str) -> None:
    text = ipt(f"-A SVC -j {target}")
    with pytest.raises(TraceError) as info:
        run(text)
    assert_names_line(info.value, text, f"-j {target}")


@pytest.mark.parametrize("target", ["LOG", "NOPE"])
def test_jump_to_an_unknown_target_is_refused_even_unreached(target: str) -> None:
    text = ipt(f"-A SVC -d 10.9.9.9/32 -j {target}")
    try:
        t = run(text)
    except TraceError as exc:
        assert_names_line(exc, text, f"-j {target}")
    else:
        raise AssertionError(f"answered {t.verdict}")


CRASHES = [
    pytest.param(
        ipt("-A SVC -p tcp -m tcp --dport 80:90 -j DROP"),
        "--dport 80:90",
        id="dport-range",
    ),
    pytest.param(
        ipt("-A SVC -m statistic --mode random --probability half -j DROP"),
        "--probability half",
        id="probability-not-a-number",
    ),
    pytest.param(
        ipt("-A SVC -m statistic --mode random --probability"),
        "--probability",
        id="probability-missing",
    ),
    pytest.param(
        ipt("-A SVC -m recent --name X --rcheck --seconds ten --reap -j DROP"),
        "--seconds ten",
        id="recent-seconds-not-a-number",
    ),
    pytest.param(
        ipt(f"-A SVC -m conntrack --ctorigdst {CIP}/32 --ctorigdstport http -j DROP"),
        "--ctorigdstport http",
        id="ctorigdstport-not-a-number",
    ),
    pytest.param(
        ipt("-A SVC -j MARK --or-mark masq"),
        "--or-mark masq",
        id="or-mark-not-a-number",
    ),
    pytest.param(
        ipt("-A SVC -j DNAT --to-destination 999.1.1.1:80"),
        "999.1.1.1",
        id="dnat-bad-address",
    ),
    pytest.param(
        ipt("-A SVC -s"),
        "-A SVC -s",
        id="s-without-address",
    ),
    pytest.param(
        ipt("-A SVC -j"),
        "-A SVC -j",
        id="j-without-target",
    ),
    pytest.param(
        ipt("-A SVC -m"),
        "-A SVC -m",
        id="m-without-module",
    ),
]


@pytest.mark.parametrize(("text", "fragment"), CRASHES)
def test_malformed_rule_is_a_trace_error_not_a_crash(text: str, fragment: str) -> None:
    with pytest.raises(TraceError) as info:
        run(text)
    assert_names_line(info.value, text, fragment)


@pytest.mark.parametrize(
    "rule", ["-A SVC ! -j DROP", f"-A SVC -d {CIP}/32 !", f"-A SVC -d {CIP}/32 ! -j DROP"]
)
def test_dangling_negation_is_refused(rule: str) -> None:
    text = ipt(rule)
    try:
        t = run(text)
    except TraceError as exc:
        assert_names_line(exc, text, rule[3:])
    else:
        raise AssertionError(f"answered {t.verdict}")


def test_address_of_the_other_family_is_refused() -> None:
    text = ipt("-A SVC ! -s 2001:db8::/64 -j DROP")
    try:
        t = run(text)
    except TraceError as exc:
        assert_names_line(exc, text, "2001:db8::/64")
    else:
        raise AssertionError(f"answered {t.verdict}")
