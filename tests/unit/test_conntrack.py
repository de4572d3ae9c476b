"""Which conntrack deletions an update calls for (the kernel test proves the effect)."""

from __future__ import annotations

from svcrules.kernel.conntrack import cleanup_commands
from svcrules.kernel.state import UdpPort


def test_removed_endpoint_is_cleared_on_every_frontend() -> None:
    old = {"a": UdpPort(["203.0.113.10", "203.0.113.200"], 53, 30053, ["10.0.0.1", "10.0.0.2"])}
    new = {"a": UdpPort(["203.0.113.10", "203.0.113.200"], 53, 30053, ["10.0.0.2"])}
    assert cleanup_commands(old, new) == [
        ["-D", "-p", "udp", "--orig-dst", "203.0.113.10", "--dst-nat", "10.0.0.1"],
        ["-D", "-p", "udp", "--orig-dst", "203.0.113.200", "--dst-nat", "10.0.0.1"],
        ["-D", "-p", "udp", "--orig-port-dst", "30053", "--dst-nat", "10.0.0.1"],
    ]


def test_service_gaining_its_first_endpoint_is_flushed() -> None:
    old = {"a": UdpPort(["203.0.113.10"], 53, None, [])}
    new = {"a": UdpPort(["203.0.113.10"], 53, None, ["10.0.0.1"])}
    assert cleanup_commands(old, new) == [
        ["-D", "-p", "udp", "--orig-dst", "203.0.113.10", "--orig-port-dst", "53"],
    ]


def test_unchanged_and_removed_services() -> None:
    same = {"a": UdpPort(["203.0.113.10"], 53, None, ["10.0.0.1"])}
    assert cleanup_commands(same, same) == []
    assert cleanup_commands(same, {}) == [
        ["-D", "-p", "udp", "--orig-dst", "203.0.113.10", "--dst-nat", "10.0.0.1"],
    ]


def test_new_port_needs_no_flush() -> None:
    new = {"a": UdpPort(["203.0.113.10"], 53, None, ["10.0.0.1"])}
    assert cleanup_commands({}, new) == []
