"""Set and map element changes sent to nf_tables over netlink, as one batch.

Why not through nft: nft 1.0.6 fills a cache from the kernel before it evaluates a
script, and an ``add element`` or any ``delete`` command makes that cache hold every
chain of every table (src/cache.c, ``evaluate_cache_add`` for ``CMD_OBJ_ELEMENTS`` and
``CMD_DELETE`` set ``NFT_CACHE_CHAIN``; the chain dump is not filtered by table). The
kernel answers a chain dump in pieces of one receive buffer (about 200 chains each) and
starts every piece by walking the chain list from its beginning
(``nf_tables_dump_chains``), so the dump costs the square of the number of chains. At
50,000 Services (88,229 chains) a 6-command element transaction (one changed endpoint:
its bucket map's slots and the fingerprint of each table) took 0.30-0.36 s with
``nft -f``, 70 % of it in ``nf_tables_dump_chains`` (``perf record``); the same commands
sent here take about 1 ms at 1k, 10k and 50k Services, since nothing is read first.

The messages are those nft would send for the same commands (``add element`` is
NEWSETELEM with NLM_F_CREATE, ``delete element`` is DELSETELEM carrying the keys; keys
and data linearised as nft's ``netlink_gen_key``/``__netlink_gen_data`` do: each field of
a concatenation padded to 4 bytes, addresses and ports in network order, integers and
marks in host order; a comment as nftnl user data), in one batch: the kernel applies all
of them or none. Only what svcrules' sets hold is encoded: plain (not interval, not
timeout) sets and maps of the types below. Anything else raises :class:`Unsupported` and
the caller sends the script through nft instead.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # an acknowledgement does not echo the (large) request
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLMSG_ERROR = 0x2
NLA_F_NESTED = 0x8000

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14

NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_USERDATA = 6
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NFTNL_UDATA_SET_ELEM_COMMENT = 0

FAMILIES = {"ip": 2, "ip6": 10, "inet": 1}  # NFPROTO_*
VERDICTS = {"accept": 1, "drop": 0, "continue": -1, "return": -5}
CHAIN_VERDICTS = {"jump": -3, "goto": -4}
PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
ELEMENTS_BYTES = 60000  # per message: the elements' nested attribute length is 16 bits


class Unsupported(ValueError):
    """A change this module does not encode: send it through nft."""


class Unavailable(OSError):
    """No netfilter netlink socket here: send the change through nft."""


@dataclass(frozen=True)
class ElementChange:
    """``add element`` or ``delete element`` of one set or map, as the nft command says
    it (``command``, for error messages) and as its parts: the set's declaration lines
    (``type``/``typeof``, ``flags``, ``comment``...) and the elements' text."""

    verb: str  # "add" or "delete"
    family: str
    table: str
    set: str
    declaration: Sequence[str]
    elements: Sequence[str]
    command: str


# Field types: name -> (length in bytes, encoder of one value's text).
def _uint(size: int, order: str) -> Callable[[str], bytes]:
    def encode(text: str) -> bytes:
        try:
            value = int(text, 0)
        except ValueError:
            raise Unsupported(f"not a number: {text!r}") from None
        if not 0 <= value < 1 << (8 * size):
            raise Unsupported(f"out of range: {text!r}")
        return value.to_bytes(size, order)  # type: ignore[arg-type]

    return encode


def _address(family: socket.AddressFamily) -> Callable[[str], bytes]:
    def encode(text: str) -> bytes:
        try:
            return socket.inet_pton(family, text)
        except OSError:
            raise Unsupported(f"not an address: {text!r}") from None

    return encode


def _protocol(text: str) -> bytes:
    return bytes([PROTOCOLS[text]]) if text in PROTOCOLS else _uint(1, "big")(text)


HOST = "little" if struct.pack("=I", 1) == b"\x01\x00\x00\x00" else "big"
TYPES: dict[str, tuple[int, Callable[[str], bytes]]] = {
    "ipv4_addr": (4, _address(socket.AF_INET)),
    "ipv6_addr": (16, _address(socket.AF_INET6)),
    "inet_service": (2, _uint(2, "big")),
    "inet_proto": (1, _protocol),
    "mark": (4, _uint(4, HOST)),
    "integer": (4, _uint(4, HOST)),  # only as the type of a 32-bit typeof (numgen)
}


def _typeof(expr: str) -> str:
    """The type of one ``typeof`` expression svcrules writes."""
    words = expr.split()
    if words[:1] == ["numgen"]:
        return "integer"
    if words == ["verdict"]:
        return "verdict"
    if len(words) == 2:
        proto, field = words
        if proto == "ip" and field in ("saddr", "daddr"):
            return "ipv4_addr"
        if proto == "ip6" and field in ("saddr", "daddr"):
            return "ipv6_addr"
        if proto in ("tcp", "udp", "sctp") and field in ("sport", "dport"):
            return "inet_service"
        if (proto, field) in (("meta", "l4proto"), ("ip", "protocol"), ("ip6", "nexthdr")):
            return "inet_proto"
        if field == "mark" and proto in ("meta", "ct"):
            return "mark"
    raise Unsupported(f"typeof {expr}")


@dataclass(frozen=True)
class Layout:
    """Key field types, and the data's (None: a set; ("verdict",): a verdict map)."""

    key: tuple[str, ...]
    data: tuple[str, ...] | None

    @classmethod
    def of(cls, declaration: Sequence[str]) -> Layout:
        spec = ""
        for raw in declaration:
            line = raw.strip().rstrip(";").strip()
            word = line.split(" ", 1)[0]
            if word in ("type", "typeof"):
                spec = line
            elif word not in ("comment", "size", "policy"):
                # flags (interval, timeout, dynamic, constant), timeout, auto-merge...
                raise Unsupported(f"set declaration: {line}")
        word, _, rest = spec.partition(" ")
        if not rest:
            raise Unsupported("set declaration without a type")
        key_text, _, data_text = rest.partition(" : ")

        def fields(text: str) -> tuple[str, ...]:
            parts = [p.strip() for p in text.split(" . ")]
            return tuple(_typeof(p) if word == "typeof" else p for p in parts)

        key = fields(key_text)
        data = fields(data_text) if data_text else None
        for name in (*key, *(data or ())):
            if name not in TYPES and not (name == "verdict" and data == ("verdict",)):
                raise Unsupported(f"type {name}")
        if "verdict" in key:
            raise Unsupported("verdict key")
        return cls(key, data)


def _value(types: tuple[str, ...], text: str) -> bytes:
    """A key or data value as nft linearises it."""
    parts = [p.strip() for p in text.split(" . ")]
    if len(parts) != len(types):
        raise Unsupported(f"{text!r} does not have {len(types)} fields")
    if len(types) == 1:
        return TYPES[types[0]][1](parts[0])
    out = b""
    for name, part in zip(types, parts, strict=True):
        size, encode = TYPES[name]
        out += encode(part).ljust((size + 3) // 4 * 4, b"\0")
    return out


def split_elements(detail: str) -> list[str]:
    """A comma-separated element list cut into elements (commas in quotes kept)."""
    out: list[str] = []
    current = ""
    for i, piece in enumerate(detail.split('"')):
        if i % 2:  # inside quotes
            current += f'"{piece}"'
            continue
        cuts = piece.split(", ")
        current += cuts[0]
        for cut in cuts[1:]:
            out.append(current.strip())
            current = cut
    if current.strip():
        out.append(current.strip())
    return out


def _attr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def _nest(kind: int, *parts: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def _strz(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def element(layout: Layout, text: str, with_data: bool) -> bytes:
    """One NFTA_LIST_ELEM: key, and (``with_data``) data or verdict and comment."""
    comment = None
    if '"' in text:
        head, sep, rest = text.partition(' comment "')
        body, quote, tail = rest.rpartition('"')
        if not sep or not quote or '"' in head or '"' in body or tail.strip():
            raise Unsupported(f"element {text!r}")
        text, comment = f"{head}{tail}", body
        if "\\" in comment or len(comment.encode()) + 1 > 255:
            raise Unsupported(f"comment {comment!r}")
    key_text, sep, data_text = text.partition(" : ")
    if len(key_text.split()) != len(layout.key) * 2 - 1:
        raise Unsupported(f"element {text!r}")  # timeouts, ranges, counters...
    parts = [_nest(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, _value(layout.key, key_text)))]
    if with_data:
        if (layout.data is None) != (not sep):
            raise Unsupported(f"element {text!r}")
        if layout.data == ("verdict",):
            parts.append(_nest(NFTA_SET_ELEM_DATA, _verdict(data_text.strip())))
        elif layout.data is not None:
            value = _value(layout.data, data_text)
            parts.append(_nest(NFTA_SET_ELEM_DATA, _attr(NFTA_DATA_VALUE, value)))
        if comment is not None:
            udata = bytes([NFTNL_UDATA_SET_ELEM_COMMENT, len(comment.encode()) + 1])
            parts.append(_attr(NFTA_SET_ELEM_USERDATA, udata + comment.encode() + b"\0"))
    return _nest(NFTA_LIST_ELEM, *parts)


def _verdict(text: str) -> bytes:
    words = text.split()
    if len(words) == 1 and words[0] in VERDICTS:
        return _nest(
            NFTA_DATA_VERDICT, _attr(NFTA_VERDICT_CODE, struct.pack(">i", VERDICTS[words[0]]))
        )
    if len(words) == 2 and words[0] in CHAIN_VERDICTS:
        code = _attr(NFTA_VERDICT_CODE, struct.pack(">i", CHAIN_VERDICTS[words[0]]))
        return _nest(NFTA_DATA_VERDICT, code, _strz(NFTA_VERDICT_CHAIN, words[1]))
    raise Unsupported(f"verdict {text!r}")


def _message(kind: int, flags: int, seq: int, family: int, payload: bytes, res: int = 0) -> bytes:
    header = struct.pack("=IHHII", 16 + 4 + len(payload), kind, flags, seq, 0)
    return header + struct.pack("=BBH", family, 0, socket.htons(res)) + payload


@dataclass(frozen=True)
class Batch:
    """The encoded messages, and for each the command it comes from."""

    messages: list[bytes]
    commands: list[str]

    def frame(self, first_seq: int) -> bytes:
        """BEGIN, the messages numbered from ``first_seq`` + 1, END."""
        res = NFNL_SUBSYS_NFTABLES
        out = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first_seq, 0, b"", res)]
        for i, msg in enumerate(self.messages, start=first_seq + 1):
            out.append(msg[:8] + struct.pack("=I", i) + msg[12:])
        end = first_seq + len(self.messages) + 1
        out.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end, 0, b"", res))
        return b"".join(out)


def encode(changes: Sequence[ElementChange]) -> Batch:
    """The NEWSETELEM and DELSETELEM messages of ``changes``, in their order."""
    messages: list[bytes] = []
    commands: list[str] = []
    for change in changes:
        if change.verb not in ("add", "delete") or change.family not in FAMILIES:
            raise Unsupported(change.command[:80])
        layout = Layout.of(change.declaration)
        adding = change.verb == "add"
        kind = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if adding else NFT_MSG_DELSETELEM)
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if adding else 0)
        head = _strz(NFTA_SET_ELEM_LIST_TABLE, change.table) + _strz(
            NFTA_SET_ELEM_LIST_SET, change.set
        )
        for chunk in _chunks(element(layout, e, adding) for e in change.elements):
            payload = head + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, *chunk)
            messages.append(_message(kind, flags, 0, FAMILIES[change.family], payload))
            commands.append(change.command)
    return Batch(messages, commands)


def _chunks(elements: Iterator[bytes]) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    size = 0
    for elem in elements:
        if chunk and size + len(elem) > ELEMENTS_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(elem)
        size += len(elem)
    if chunk:
        yield chunk


class Failed(Exception):
    """The kernel refused the batch (nothing of it was applied)."""

    def __init__(self, code: int, command: str) -> None:
        super().__init__(f"Error: Could not process rule: {os.strerror(code)}\n{command}")
        self.code = code


class _Socket:
    """One netfilter netlink socket for the process, opened on first use.

    Kept open on purpose: closing a netfilter socket right after a commit waits for the
    kernel to free the transaction (``nft_rcv_nl_event`` flushes the destroy work, an
    RCU grace period): 5-7 ms measured, as long as the commit itself. At exit it is
    closed with the process, after the change is in force."""

    sock: socket.socket | None = None
    seq = 0

    @classmethod
    def get(cls) -> socket.socket:
        if cls.sock is None:
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
                sock.bind((0, 0))
                sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            except OSError as exc:
                raise Unavailable(exc.errno, f"netfilter netlink socket: {exc.strerror}") from None
            cls.sock = sock
        return cls.sock

    @classmethod
    def drop(cls) -> None:
        if cls.sock is not None:
            cls.sock.close()
            cls.sock = None


def send(batch: Batch) -> None:
    """Send ``batch`` as one transaction; raise :class:`Failed` when the kernel refuses
    it (nothing of it applied), :class:`Unavailable` when there is no netfilter netlink
    socket here."""
    if not batch.messages:
        return
    sock = _Socket.get()
    first = _Socket.seq + 1
    _Socket.seq += len(batch.messages) + 2
    data = batch.frame(first_seq=first)
    try:
        list(_answers(sock))  # nothing should be queued; never mistake old answers
        _grow(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, len(data) + 4096)
        _grow(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, 64 * (len(batch.messages) + 8) + 65536)
        sock.sendto(data, (0, 0))
        # The kernel runs the batch inside sendto and queues every answer before
        # returning: read what is queued, no waiting.
        answers = list(_answers(sock))
    except OSError:
        _Socket.drop()
        raise
    acked: set[int] = set()
    failure: Failed | None = None
    for seq, code in answers:
        if code == 0:
            acked.add(seq)
        elif failure is None:
            i = seq - first - 1
            command = batch.commands[i] if 0 <= i < len(batch.commands) else "(batch)"
            failure = Failed(code, command)
    if failure is not None:
        raise failure
    if len(acked) != len(batch.messages):
        raise Failed(errno.EPROTO, f"({len(acked)} of {len(batch.messages)} acknowledged)")


def _grow(sock: socket.socket, option: int, forced: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, forced, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, option, size)


def _answers(sock: socket.socket) -> Iterator[tuple[int, int]]:
    """(sequence number, -error) of each acknowledgement or error queued."""
    buffer = bytearray(65536)
    while True:
        try:
            size = sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        data = bytes(buffer[:size])
        at = 0
        while at + 16 <= len(data):
            length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, at)
            if length < 16:
                return
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, at + 16)
                yield seq, -code
            at += (length + 3) // 4 * 4
