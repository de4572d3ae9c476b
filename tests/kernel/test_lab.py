"""Tests of the kernel lab itself: if these fail, ruleset tests mean nothing."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

from .lab import Lab, LabError, Result, list_netns

PROTOS = ("tcp", "udp")
FAMILIES = (4, 6)

LABTEST_RULESET = """
table ip labtest {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 203.0.113.10 jump services
    }
    chain output {
        type nat hook output priority -100; policy accept;
        ip daddr 203.0.113.10 jump services
    }
    chain services {
        meta l4proto { tcp, udp } th dport 80 dnat to 198.51.100.11:8080
    }
    chain filter_input_fwd {
        type filter hook forward priority filter; policy accept;
        ip daddr 203.0.113.10 th dport 81 reject
        ip daddr 203.0.113.10 th dport 82 drop
    }
    chain filter_output {
        type filter hook output priority filter; policy accept;
        ip daddr 203.0.113.10 th dport 81 reject
        ip daddr 203.0.113.10 th dport 82 drop
    }
}
"""

LABTEST6_RULESET = """
table ip6 labtest6 {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        ip6 daddr 2001:db8:3::10 meta l4proto { tcp, udp } th dport 80 dnat to [2001:db8:2::12]:8080
    }
    chain output {
        type nat hook output priority -100; policy accept;
        ip6 daddr 2001:db8:3::10 meta l4proto { tcp, udp } th dport 80 dnat to [2001:db8:2::12]:8080
    }
}
"""


def _all_ok(results: list[Result], backend: str, seen_src: str, port: int) -> None:
    assert results, "no results"
    for r in results:
        assert r.outcome == "ok", r
        assert (r.backend, r.seen_src, r.port) == (backend, seen_src, port), r


def _expect(
    lab: Lab,
    src: str,
    dst: str,
    port: int,
    proto: str,
    backend: str,
    *,
    answer_port: int | None = None,
    seen_src: str | None = None,
    count: int = 3,
) -> None:
    """Probe and require every attempt to reach ``backend`` from src's own address."""
    family = 6 if ":" in dst else 4
    res = lab.probe(src, dst, port, proto, count=count)
    _all_ok(res, backend, seen_src or lab.ip(src, family), answer_port or port)


# ------------------------------------------------------------ plain routing


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("family", FAMILIES)
def test_pods_reach_each_other_directly(lab: Lab, family: int, proto: str) -> None:
    for src, dst in (("pod1", "pod2"), ("pod2", "pod1"), ("pod3", "pod4"), ("pod4", "pod3")):
        _expect(lab, src, lab.ip(dst, family), 8080, proto, dst, count=5)


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("family", FAMILIES)
def test_client_and_node_reach_pods_directly(lab: Lab, family: int, proto: str) -> None:
    for pod in lab.pod_names:
        _expect(lab, "client", lab.ip(pod, family), 9090, proto, pod)
        _expect(lab, "node", lab.ip(pod, family), 5353, proto, pod)


def test_every_configured_port_answers(lab: Lab) -> None:
    for port in lab.ports:
        for proto in PROTOS:
            _expect(lab, "client", lab.pod_ip4("pod1"), port, proto, "pod1", count=2)


def test_server_handles_many_quick_connections(lab: Lab) -> None:
    res = lab.probe("client", lab.pod_ip4("pod1"), 8080, "tcp", count=300, concurrency=8)
    _all_ok(res, "pod1", lab.client_ip4, 8080)
    # Fresh source port for every connection (conntrack must see new flows).
    assert len({r.sport for r in res}) == len(res)


@pytest.mark.parametrize("family", FAMILIES)
def test_pods_reach_client_and_node_addresses(lab: Lab, family: int) -> None:
    client_srv = lab.serve("client", name="outside", ports=[7001])
    node_srv = lab.serve("node", name="nodehost", ports=[7002])
    dummy = lab.node_dummy_ip4 if family == 4 else lab.node_dummy_ip6
    try:
        for proto in PROTOS:
            _expect(lab, "pod1", lab.ip("client", family), 7001, proto, "outside")
            _expect(lab, "pod2", lab.ip("node", family), 7002, proto, "nodehost")
            # The node's second local address (dummy0), via the uplink and via a pod link.
            _expect(lab, "client", dummy, 7002, proto, "nodehost")
            _expect(lab, "pod3", dummy, 7002, proto, "nodehost")
    finally:
        client_srv.stop()
        node_srv.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_service_range_without_rules_is_a_black_hole(lab: Lab, family: int) -> None:
    dst = "203.0.113.77" if family == 4 else "2001:db8:3::77"
    for src in ("client", "pod1", "node"):
        res = lab.probe(src, dst, 80, "tcp", count=2, timeout=0.3, concurrency=2)
        assert Lab.outcomes(res) == {"timeout": 2}, res


def test_closed_port_is_refused_by_the_pod(lab: Lab) -> None:
    for proto in PROTOS:
        for family in FAMILIES:
            res = lab.probe("client", lab.ip("pod1", family), 7777, proto, count=3)
            assert Lab.outcomes(res) == {"refused": 3}, res
            assert max(r.elapsed for r in res) < 0.5


# ---------------------------------------------------------------- rulesets


def test_hand_written_ruleset(lab: Lab) -> None:
    lab.load(LABTEST_RULESET)
    assert "dnat to 198.51.100.11:8080" in lab.nft("list", "table", "ip", "labtest")

    for proto in PROTOS:
        _expect(lab, "client", "203.0.113.10", 80, proto, "pod1", answer_port=8080, count=10)

        refused = lab.probe("client", "203.0.113.10", 81, proto, count=5)
        assert Lab.outcomes(refused) == {"refused": 5}, refused
        assert max(r.elapsed for r in refused) < 0.5

        t0 = time.monotonic()
        dropped = lab.probe("client", "203.0.113.10", 82, proto, count=2, timeout=0.5)
        assert Lab.outcomes(dropped) == {"timeout": 2}, dropped
        assert time.monotonic() - t0 >= 0.9

    # The service address is reachable from pods too, with the pod's own source.
    _expect(lab, "pod2", "203.0.113.10", 80, "tcp", "pod1", answer_port=8080)
    # Unrelated destinations are untouched by the ruleset.
    _expect(lab, "client", lab.pod_ip4("pod1"), 8081, "tcp", "pod1")


@pytest.mark.parametrize("proto", PROTOS)
def test_node_originated_connection_uses_nat_output(lab: Lab, proto: str) -> None:
    lab.load(LABTEST_RULESET)
    # The node's own connections get the node IP as source (route src), like a real node.
    _expect(lab, "node", "203.0.113.10", 80, proto, "pod1", answer_port=8080, count=5)
    refused = lab.probe("node", "203.0.113.10", 81, proto, count=2)
    assert Lab.outcomes(refused) == {"refused": 2}, refused


@pytest.mark.parametrize("src", ["client", "node", "pod3"])
@pytest.mark.parametrize("proto", PROTOS)
def test_ipv6_dnat(lab: Lab, src: str, proto: str) -> None:
    lab.load(LABTEST6_RULESET)
    _expect(lab, src, "2001:db8:3::10", 80, proto, "pod2", answer_port=8080, count=5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("proto", PROTOS)
def test_icmp_unreachable_is_reported(lab: Lab, family: int, proto: str) -> None:
    if family == 4:
        lab.load(
            "table ip t {\n chain filt {\n type filter hook forward priority 0;\n"
            " ip daddr 203.0.113.20 reject with icmp type host-unreachable\n }\n}\n"
        )
        dst = "203.0.113.20"
    else:
        lab.load(
            "table ip6 t {\n chain filt {\n type filter hook forward priority 0;\n"
            " ip6 daddr 2001:db8:3::20 reject with icmpv6 type addr-unreachable\n }\n}\n"
        )
        dst = "2001:db8:3::20"
    res = lab.probe("client", dst, 80, proto, count=3)
    assert Lab.outcomes(res) == {"unreachable": 3}, res


def test_tcp_reset_is_refused(lab: Lab) -> None:
    lab.load(
        """
        table inet t {
            chain filt {
                type filter hook forward priority 0;
                ip daddr 203.0.113.30 reject with tcp reset
                ip6 daddr 2001:db8:3::30 reject with tcp reset
            }
        }
        """
    )
    for dst in ("203.0.113.30", "2001:db8:3::30"):
        res = lab.probe("pod1", dst, 80, "tcp", count=3)
        assert Lab.outcomes(res) == {"refused": 3}, res


def test_bind_and_fixed_source_port(lab: Lab) -> None:
    lab.load(LABTEST_RULESET)
    res = lab.probe(
        "node", "203.0.113.10", 80, "udp", count=3, bind=lab.node_dummy_ip4, sport=45678
    )
    _all_ok(res, "pod1", lab.node_dummy_ip4, 8080)
    assert {r.sport for r in res} == {45678}


def test_load_error_carries_nft_message(lab: Lab) -> None:
    with pytest.raises(LabError, match="syntax error"):
        lab.load("table ip broken { chain c { nonsense } }")


def test_reset_clears_ruleset_and_conntrack(lab: Lab) -> None:
    lab.load(LABTEST_RULESET)
    lab.probe("client", "203.0.113.10", 80, "udp", count=3)
    assert "203.0.113.10" in lab.exec("node", "conntrack", "-L").stdout
    lab.reset()
    assert lab.nft("list", "ruleset").strip() == ""
    assert "203.0.113.10" not in lab.exec("node", "conntrack", "-L").stdout
    res = lab.probe("client", "203.0.113.10", 80, "tcp", count=1, timeout=0.3)
    assert res[0].outcome == "timeout"


# ------------------------------------------------------------- lab plumbing


def test_node_sysctls(lab: Lab) -> None:
    def get(key: str) -> str:
        return lab.exec("node", "sysctl", "-n", key).stdout.strip()

    assert get("net.ipv4.ip_forward") == "1"
    assert get("net.ipv6.conf.all.forwarding") == "1"
    for iface in ("all", "default", "eth0", "dummy0", "vpod1"):
        assert get(f"net.ipv4.conf.{iface}.rp_filter") == "0"
    assert get("net.ipv4.icmp_ratelimit") == "0"
    assert get("net.ipv6.icmp.ratelimit") == "0"


def test_dead_client_agent_is_respawned(lab: Lab) -> None:
    victim = lab._clients["pod4"].proc
    victim.kill()
    victim.wait()
    _expect(lab, "pod4", lab.pod_ip4("pod1"), 8080, "tcp", "pod1")
    assert lab._clients["pod4"].proc is not victim


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_close_removes_everything(lab_factory: Callable[..., Lab]) -> None:
    ours = {"eth0", "dummy0", "vpod1", "vpod2", "probe0", "probe1"}
    before = _host_links() & ours
    private = lab_factory(pods=2)
    prefix = private.prefix
    assert sorted(n for n in list_netns() if n.startswith(prefix)) == sorted(
        private.netns(m) for m in private.members
    )
    _expect(private, "pod1", private.pod_ip4("pod2"), 8080, "tcp", "pod2")
    agents = [a.proc for a in private._agents]
    private.close()
    private.close()  # idempotent
    assert [n for n in list_netns() if n.startswith(prefix)] == []
    assert all(p.poll() is not None for p in agents)
    with pytest.raises(LabError):
        private.probe("pod1", "198.51.100.12", 8080)
    # No lab interface ever showed up in the host namespace.
    assert _host_links() & ours == before


def test_failed_start_leaves_nothing(lab_factory: Callable[..., Lab]) -> None:
    broken = Lab(pods=1, ports=[8080, 8080])  # duplicate port: the server cannot bind
    with pytest.raises(LabError):
        broken.start()
    assert [n for n in list_netns() if n.startswith(broken.prefix)] == []
    assert broken.closed


def test_startup_is_fast(kernel_lab: Lab) -> None:
    assert kernel_lab.startup_seconds < 5, kernel_lab.startup_seconds
