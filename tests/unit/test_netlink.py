"""Element changes encoded for nf_tables netlink (svcrules.kernel.nft.netlink), and the
driver sending element-only transactions that way. The kernel tests check that the kernel
takes the messages and lists what nft would have written."""

from __future__ import annotations

import io
import socket
import struct
from pathlib import Path

import pytest

from svcrules.compiler import Job, prepare
from svcrules.kernel.nft import netlink
from svcrules.kernel.nft.fake import FakeNft
from svcrules.kernel.reconcile import execute, plan_change
from svcrules.kernel.registry import open_fake
from svcrules.kernel.state import StateStore
from tests.k8s import dump, endpoint, endpoint_slice, node_config, service

BACKENDS = ("typeof numgen random mod 1 : ip daddr . tcp dport", 'comment "slot : endpoint"')
STATE = ("type mark", 'comment "what svcrules last wrote"')


def change(verb: str, declaration: tuple[str, ...], *elements: str) -> netlink.ElementChange:
    return netlink.ElementChange(verb, "ip", "t", "s", declaration, elements, f"{verb} element")


def attrs(data: bytes) -> list[tuple[int, bytes]]:
    """(type without NLA_F_NESTED, payload) of each attribute in ``data``."""
    out, at = [], 0
    while at < len(data):
        length, kind = struct.unpack_from("=HH", data, at)
        out.append((kind & ~netlink.NLA_F_NESTED, data[at + 4 : at + length]))
        at += (length + 3) // 4 * 4
    return out


def elements_of(message: bytes) -> list[dict[int, bytes]]:
    """Each element's attributes (key, data, user data) of one NEWSETELEM/DELSETELEM."""
    listed = dict(attrs(message[20:]))[netlink.NFTA_SET_ELEM_LIST_ELEMENTS]
    return [dict(attrs(elem)) for _, elem in attrs(listed)]


def value(attribute: bytes) -> bytes:
    return dict(attrs(attribute))[netlink.NFTA_DATA_VALUE]


def test_map_element_is_linearised_as_nft_does() -> None:
    batch = netlink.encode([change("add", BACKENDS, "690675712 : 10.128.0.2 . 8080")])
    (message,) = batch.messages
    length, kind, flags = struct.unpack_from("=IHH", message)
    assert length == len(message)
    assert kind == (netlink.NFNL_SUBSYS_NFTABLES << 8) | netlink.NFT_MSG_NEWSETELEM
    assert flags & netlink.NLM_F_CREATE and flags & netlink.NLM_F_ACK
    assert message[16] == socket.AF_INET  # NFPROTO_IPV4
    (elem,) = elements_of(message)
    # numgen's integer in host order; the address and port in network order, each
    # field of the concatenation padded to 4 bytes.
    assert value(elem[netlink.NFTA_SET_ELEM_KEY]) == struct.pack("=I", 690675712)
    data = value(elem[netlink.NFTA_SET_ELEM_DATA])
    assert data == socket.inet_aton("10.128.0.2") + struct.pack(">H", 8080) + b"\0\0"


def test_deletion_carries_keys_only_and_comments_go_to_user_data() -> None:
    batch = netlink.encode(
        [change("delete", STATE, "1"), change("add", STATE, '1 comment "svcrules ab, cd"')]
    )
    removed, added = batch.messages
    assert struct.unpack_from("=H", removed, 4)[0] & 0xFF == netlink.NFT_MSG_DELSETELEM
    assert list(elements_of(removed)[0]) == [netlink.NFTA_SET_ELEM_KEY]
    elem = elements_of(added)[0]
    assert value(elem[netlink.NFTA_SET_ELEM_KEY]) == struct.pack("=I", 1)
    text = b"svcrules ab, cd\0"
    assert elem[netlink.NFTA_SET_ELEM_USERDATA] == bytes([0, len(text)]) + text


def test_verdict_map_and_frontend_keys() -> None:
    frontend = ("type ipv4_addr . inet_proto . inet_service : verdict",)
    batch = netlink.encode([change("add", frontend, "203.0.113.10 . udp . 53 : goto svc-a")])
    elem = elements_of(batch.messages[0])[0]
    key = value(elem[netlink.NFTA_SET_ELEM_KEY])
    assert key == socket.inet_aton("203.0.113.10") + b"\x11\0\0\0" + b"\0\x35\0\0"
    verdict = dict(attrs(dict(attrs(elem[netlink.NFTA_SET_ELEM_DATA]))[netlink.NFTA_DATA_VERDICT]))
    assert verdict[netlink.NFTA_VERDICT_CODE] == struct.pack(">i", -4)
    assert verdict[netlink.NFTA_VERDICT_CHAIN] == b"svc-a\0"


@pytest.mark.parametrize(
    ("declaration", "element"),
    [
        (("type ipv4_addr", "flags interval"), "10.0.0.0/8"),  # ranges: nft merges them
        (("type ipv4_addr . ipv4_addr", "flags dynamic,timeout"), "1.2.3.4 . 5.6.7.8"),
        (("type ipv4_addr",), "10.0.0.1 timeout 5s"),
        (("type ether_addr",), "00:11:22:33:44:55"),
        (("typeof ip dscp",), "1"),
        (("type ipv4_addr",), "10.0.0.1/32"),
    ],
)
def test_what_it_does_not_encode_is_left_to_nft(declaration: tuple[str, ...], element: str) -> None:
    with pytest.raises(netlink.Unsupported):
        netlink.encode([change("add", declaration, element)])


def test_large_changes_are_cut_into_messages_the_kernel_can_parse() -> None:
    many = [f"{i} : 10.0.{i // 256}.{i % 256} . 80" for i in range(5000)]
    batch = netlink.encode([change("add", BACKENDS, *many)])
    assert len(batch.messages) > 1
    assert sum(len(elements_of(m)) for m in batch.messages) == 5000
    framed = batch.frame(first_seq=7)
    seqs, at = [], 0
    while at < len(framed):
        length, _kind, _flags, seq = struct.unpack_from("=IHHI", framed, at)
        seqs.append(seq)
        at += length
    assert seqs == list(range(7, 7 + len(batch.messages) + 2))


def test_split_elements_keeps_commas_in_comments() -> None:
    assert netlink.split_elements('1 comment "a, b", 2, 3 : 4') == [
        '1 comment "a, b"',
        "2",
        "3 : 4",
    ]


def _job(*pods: str, services: int = 1) -> Job:
    objs = [node_config()]
    for i in range(services):
        name = f"s{i}"
        objs += [
            service(name, f"203.0.113.{10 + i}"),
            endpoint_slice(name, [endpoint(f"198.51.100.{p}") for p in pods]),
        ]
    return prepare(["-"], stdin=io.StringIO(dump(objs)))


def test_element_only_change_is_sent_as_element_changes(tmp_path: Path) -> None:
    """One changed endpoint touches set and map elements only: the driver hands it to
    the transport as element changes (libnftables sends those without nft and its
    cache of every chain); a change that adds a Service's chains goes as a script."""
    fake, driver = open_fake("nftables")
    assert isinstance(fake, FakeNft)
    store = StateStore(tmp_path)
    execute(plan_change(_job("11", "12"), driver, store), driver, store)
    endpoint_change = plan_change(_job("11", "13"), driver, store)
    assert endpoint_change.mode == "incremental"
    execute(endpoint_change, driver, store)
    (sent,) = fake.element_runs
    assert {c.verb for c in sent} == {"add", "delete"}
    assert {c.set.rsplit("-", 1)[0] for c in sent} >= {"state", "backends-tcp"}
    assert all(not c.command.startswith(("add rule", "flush chain", "add chain")) for c in sent)
    netlink.encode(sent)  # every set it touches is one netlink encodes
    assert plan_change(_job("11", "13"), driver, store).mode == "noop"

    new_service = plan_change(_job("11", "13", services=2), driver, store)
    assert new_service.mode == "incremental" and "add chain" in new_service.script
    execute(new_service, driver, store)
    assert len(fake.element_runs) == 1 and fake.scripts[-1] == new_service.script
