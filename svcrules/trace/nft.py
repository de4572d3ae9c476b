"""An interpreter of the nft scripts svcrules writes (``svcrules compile``).

It reads the script the way ``nft -f`` would: tables, typed sets and maps with
their elements, chains with hooks and priorities, and rules made of matches and
statements. It understands exactly the expressions and statements svcrules emits
(listed in ``_selector`` and ``_Rule.parse``) and refuses anything else with the
line it could not read, so a change to the templates that it does not follow shows
up as an error in the tests, never as a wrong answer.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from svcrules.trace.flow import ENDPOINT, Flow, IPAddress, Outcome, Walker, follow, start, summarize
from svcrules.trace.jhash import jhash_slot
from svcrules.trace.model import PROTOCOLS, Packet, Pick, Trace, TraceError

Value = Any  # an address, a network, an int, a protocol name or a tuple of them
Element = tuple[Value, ...]

PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "srcnat": 100}
_TOKEN = re.compile(r'"[^"]*"|[{}]|[^\s{}]+')


class _Where:
    """Where a line is, for error messages."""

    def __init__(self, line: int, text: str) -> None:
        self.line = line
        self.text = text

    def error(self, why: str) -> TraceError:
        return TraceError(f"nft script line {self.line}: {why}: {self.text.strip()!r}")


def _value(token: str) -> Value:
    """An element or constant as nft writes it."""
    if token.isdigit():
        return int(token)
    if token.startswith("0x"):
        return int(token, 16)
    if token in ("tcp", "udp", "sctp", "local", "dnat"):
        return token
    try:
        if "/" in token:
            return ipaddress.ip_network(token, strict=False)
        return ipaddress.ip_address(token)
    except ValueError:
        raise ValueError(f"unknown value {token!r}") from None


def _component_matches(element: Value, value: Value) -> bool:
    if isinstance(element, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return (
            isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address)
            and value.version == element.version
            and value in element
        )
    return bool(element == value)


@dataclass
class NftSet:
    """A set or map: its elements and, for a map, each element's data."""

    name: str
    is_map: bool = False
    dynamic: bool = False
    width: int = 0  # parts of a key (a . b . c: 3), from its type
    data: str = ""  # a map's data: "verdict" or "value"; "" for a set
    elements: list[tuple[Element, str]] = field(default_factory=list)  # (key, data)

    def lookup(self, key: Element) -> str | None:
        """The data of the element that matches ``key`` (a set: "" when present)."""
        for element, data in self.elements:
            if len(element) == len(key) and all(map(_component_matches, element, key)):
                return data
        return None


@dataclass
class NftChain:
    name: str
    hook: str | None = None
    priority: int = 0
    rules: list[_Rule] = field(default_factory=list)


# -- expressions ---------------------------------------------------------------

Getter = Callable[[Flow], Value]


def _selector(tokens: list[str], i: int, family: str, where: _Where) -> tuple[Getter, int, str]:
    """One selector at tokens[i]: (getter, next index, kind). Kinds "random"
    (``numgen random``) and "hash" (``jhash``) are drawn: their getter is a ``_Draw``,
    and only map lookups may use them."""
    t = tokens[i : i + 6]
    if t[:1] == [family] and t[1:2] in (["saddr"], ["daddr"]):
        which = t[1]
        return (lambda f: f.src) if which == "saddr" else (lambda f: f.dst), i + 2, "addr"
    if t[:1] in (["ip"], ["ip6"]) and t[1:2] in (["saddr"], ["daddr"]):
        raise where.error(f"{t[0]} {t[1]} in a {family} table")
    if t[:2] == ["meta", "l4proto"]:
        return (lambda f: f.proto), i + 2, "proto"
    if t[:2] == ["meta", "mark"]:
        return (lambda f: f.mark), i + 2, "mark"
    if t[:2] == ["th", "dport"]:
        return (lambda f: f.port), i + 2, "port"
    if t[:2] == ["ct", "status"]:
        return (lambda f: "dnat" if f.endpoint else ""), i + 2, "ct"
    if t[:1] == ["fib"] and t[1:2] in (["saddr"], ["daddr"]) and t[2:3] == ["type"]:
        src = t[1] == "saddr"
        return (lambda f: "local" if f.is_local(f.src if src else f.dst) else ""), i + 3, "fib"
    if t[:4] == ["numgen", "inc", "mod", "1"] and t[4:5] == ["offset"] and t[5].isdigit():
        key = int(t[5])
        return (lambda f: key), i + 6, "const"
    if t[:3] == ["numgen", "random", "mod"] and t[4:5] == ["offset"]:
        if not (t[3].isdigit() and t[5].isdigit()) or int(t[3]) < 1:
            raise where.error("numgen random needs a positive modulus and an offset")
        return _Draw(int(t[3]), int(t[5])), i + 6, "random"
    if t[:1] == ["jhash"]:
        draw, i = _jhash(tokens, i + 1, family, where)
        return draw, i, "hash"
    raise where.error(f"unknown expression at {' '.join(t[:3])!r}")


# What a Maglev hash reads, as svcrules writes it: the client's address (ClientIP
# affinity), or the flow's addresses and ports (the payload's protocol: "p").
HASHED = {
    ("saddr",): "client",
    ("saddr", "p sport", "daddr", "p dport"): "flow",
}


def _jhash(tokens: list[str], i: int, family: str, where: _Where) -> tuple[_Draw, int]:
    """``jhash FIELD[ . FIELD...] mod M seed S [offset B]`` from tokens[i] (after
    ``jhash``): the fields svcrules hashes (HASHED), in this order."""
    fields: list[tuple[str, str]] = []
    while True:
        what, which = tokens[i], tokens[i + 1]
        address = what == family and which in ("saddr", "daddr")
        port = what in PROTOCOLS and which in ("sport", "dport")
        if address or port:
            fields.append((what, which))
        else:
            raise where.error(f"jhash of {what} {which}: not a field svcrules hashes")
        i += 2
        if tokens[i] != ".":
            break
        i += 1
    protocols = {what for what, _ in fields if what in PROTOCOLS}
    shape = tuple(which if what == family else f"p {which}" for what, which in fields)
    if shape not in HASHED or len(protocols) > 1:
        written = " . ".join(f"{a} {b}" for a, b in fields)
        raise where.error(f"jhash of {written}: svcrules hashes the client address or the flow")
    if tokens[i] != "mod" or tokens[i + 2] != "seed":
        raise where.error("jhash needs 'mod M seed S'")
    size, seed = _number(tokens[i + 1]), _number(tokens[i + 3])
    i += 4
    base = 0
    if i < len(tokens) and tokens[i] == "offset":
        base = _number(tokens[i + 1])
        i += 2
    if size < 1 or seed >= 1 << 32 or base + size > 1 << 32:
        raise where.error("jhash needs a positive modulus and a 32-bit seed and offset")
    texts = tuple(f"{a} {b}" for a, b in fields)
    protocol = protocols.pop() if protocols else ""
    return _Draw(size, base, seed, HASHED[shape], tuple(fields), texts, protocol), i


def _number(token: str) -> int:
    """A decimal or 0x-hexadecimal number; ValueError otherwise."""
    value = _value(token)
    if not isinstance(value, int):
        raise ValueError(f"{token!r} is not a number")
    return value


@dataclass(frozen=True)
class _Draw:
    """A key drawn per packet: ``numgen random`` (a uniformly random slot of ``size``
    from ``base``), or ``jhash`` (Maglev: a hash of the flow or of the client's
    address, with ``seed``). A hash's slot is computed where the packet is fully known
    (its source port given), else every slot is taken to be equally likely."""

    size: int
    base: int
    seed: int | None = None  # jhash only, from here on
    hash: str = ""  # "flow" or "client"
    fields: tuple[tuple[str, str], ...] = ()  # ("ip", "saddr"), ("tcp", "sport"), ...
    texts: tuple[str, ...] = ()
    protocol: str = ""  # a flow hash's payload protocol: the rule matches only it

    def __call__(self, f: Flow) -> list[tuple[float, int]]:
        """The slots (0 .. size-1) the flow may take, with their probabilities."""
        if self.seed is not None and self.computed(f):
            return [(1.0, jhash_slot(self._data(f), self.seed, self.size))]
        return [(1.0 / self.size, n) for n in range(self.size)]

    def _data(self, f: Flow) -> bytes:
        """The hash's input as the kernel's registers hold it: each field in network
        order, padded with zeros to a multiple of 4 bytes."""
        out = b""
        for _what, which in self.fields:
            if which in ("saddr", "daddr"):
                out += (f.src if which == "saddr" else f.dst).packed
            else:
                port = f.sport if which == "sport" else f.port
                out += (port or 0).to_bytes(2, "big") + bytes(2)
        return out

    def computed(self, f: Flow) -> bool:
        """Whether the slot is computed for ``f`` (a hash, with the source port known)."""
        return self.seed is not None and f.sport is not None

    def pick(self, rule: _Rule, slot: int | None) -> Pick:
        """The record of this draw in ``rule``; ``slot``: the one computed, if it was."""
        if self.seed is None:
            return Pick("random", rule.table, rule.chain, rule.text, self.size)
        return Pick(
            "maglev",
            rule.table,
            rule.chain,
            rule.text,
            self.size,
            self.seed,
            self.hash,
            self.texts,
            slot,
        )


def _key(
    tokens: list[str], i: int, family: str, where: _Where
) -> tuple[list[Getter], int, _Draw | None, str]:
    """A selector or a concatenation (``a . b . c``): getters, next index, the drawn
    key (``numgen random``, ``jhash``) when it is one, and the kind of its first
    selector."""
    getters: list[Getter] = []
    kinds: list[str] = []
    while True:
        g, i, kind = _selector(tokens, i, family, where)
        getters.append(g)
        kinds.append(kind)
        if i < len(tokens) and tokens[i] == ".":
            i += 1
            continue
        drawn = [k for k in kinds if k in ("random", "hash")]
        if drawn and len(getters) > 1:
            what = "numgen random" if drawn[0] == "random" else "jhash"
            raise where.error(f"{what} inside a concatenation")
        draw = getters[0] if drawn else None
        assert draw is None or isinstance(draw, _Draw)
        return getters, i, draw, kinds[0]


def _keys(
    rule: _Rule, getters: list[Getter], flow: Flow, draw: _Draw | None
) -> list[tuple[float, Element, Pick | None]]:
    """The key a flow presents, with its probability; a drawn key is every slot it
    may take, each with the pick that drew it."""
    if draw is None:
        return [(1.0, tuple(g(flow) for g in getters), None)]
    exact = draw.computed(flow)
    return [(p, (draw.base + n,), draw.pick(rule, n if exact else None)) for p, n in draw(flow)]


def _set_name(token: str, sets: dict[str, NftSet], where: _Where, width: int, data: str) -> NftSet:
    """The set or map ``token`` names, checked to fit a lookup with a key of ``width``
    parts and, for a map, ``data`` ("verdict" or "value"; "" for a set)."""
    if not token.startswith("@") or token[1:] not in sets:
        raise where.error(f"{token!r} is not a set or map of this table")
    found = sets[token[1:]]
    if found.data != data:
        want = {"verdict": "a verdict map", "value": "a map of values", "": "a set"}[data]
        raise where.error(f"{token} is not {want}")
    if found.width != width:
        raise where.error(f"{token} holds keys of {found.width} parts, not {width}")
    return found


PROTOCOL_NUMBERS = {6: "tcp", 17: "udp", 132: "sctp"}
VERDICT_DATA = re.compile(r"(?:goto|jump) \S+|accept|drop|return|continue")


# -- rules ---------------------------------------------------------------------


class _Rule:
    """One rule: matches that must all hold, then statements in order."""

    def __init__(
        self,
        text: str,
        family: str,
        sets: dict[str, NftSet],
        where: _Where,
        table: str = "",
        chain: str = "",
    ) -> None:
        self.text = text
        self.family = family
        self.where = where
        self.table, self.chain = table, chain  # where it is, for the picks it makes
        self.matches: list[Callable[[Flow], bool]] = []
        self.sets_mark = False  # meta mark set meta mark | X: marks for masquerading
        self.statements: list[Callable[[Flow], list[Outcome]]] = []
        tokens = _TOKEN.findall(text)
        i = 0
        try:
            while i < len(tokens):
                step = self._statement if self.statements else self._part
                i = step(tokens, i, sets)
        except (IndexError, ValueError) as exc:
            why = f" ({exc})" if isinstance(exc, ValueError) else ""
            raise where.error(f"not a rule svcrules writes{why}") from None

    def _part(self, tokens: list[str], i: int, sets: dict[str, NftSet]) -> int:
        """A match, or the first statement."""
        t = tokens[i]
        if t in ("jump", "goto", "return", "drop", "reject", "accept", "masquerade", "dnat"):
            return self._statement(tokens, i, sets)
        if t == "update" or tokens[i : i + 3] == ["meta", "mark", "set"]:
            return self._statement(tokens, i, sets)
        getters, i, draw, kind = _key(tokens, i, self.family, self.where)
        op = tokens[i] if i < len(tokens) else ""
        if op == "vmap":
            width = 1 if draw else len(getters)
            vmap = _set_name(tokens[i + 1], sets, self.where, width, "verdict")
            self._implied(draw)
            self.statements.append(lambda f: self._vmap(f, getters, draw, vmap))
            return i + 2
        if draw:
            what = "numgen random" if draw.seed is None else "jhash"
            raise self.where.error(f"{what} outside a map lookup")
        negate = op == "!="
        if op in ("!=", "=="):
            i += 1
            op = tokens[i] if i < len(tokens) else ""
        if op.startswith("@"):
            s = _set_name(op, sets, self.where, len(getters), "")
            if s.dynamic:  # filled at packet time: what earlier packets recorded

                def pinned(f: Flow) -> bool:
                    return ((s.name, *(g(f) for g in getters)) in f.pins) != negate

                self.matches.append(pinned)
            else:
                self.matches.append(
                    lambda f: (s.lookup(tuple(g(f) for g in getters)) is not None) != negate
                )
            return i + 1
        if op == "&":
            mask, _eq, want = tokens[i + 1 : i + 4]
            if _eq != "==":
                raise self.where.error("a mask compares with ==")
            m, w = _value(mask), _value(want)
            self.matches.append(lambda f: ((getters[0](f) & m) == w) != negate)
            return i + 4
        try:
            want = _value(op)
        except ValueError:
            raise self.where.error(f"unknown comparison {op!r}") from None
        if len(getters) != 1:
            raise self.where.error("a concatenation compares with a set")
        if kind == "proto" and isinstance(want, int) and want in PROTOCOL_NUMBERS:
            want = PROTOCOL_NUMBERS[want]
        get = getters[0]
        self.matches.append(lambda f: _component_matches(want, get(f)) != negate)
        return i + 1

    def _statement(self, tokens: list[str], i: int, sets: dict[str, NftSet]) -> int:
        t = tokens[i]
        if t in ("jump", "goto"):
            target = tokens[i + 1]
            self.statements.append(lambda f: [(f, f"{t} {target}")])
            return i + 2
        if t in ("return", "drop", "reject", "accept"):
            self.statements.append(lambda f: [(f, t)])
            return i + 1
        if t == "masquerade":
            self.statements.append(self._masquerade)
            return i + (2 if tokens[i + 1 : i + 2] == ["fully-random"] else 1)
        if tokens[i : i + 3] == ["meta", "mark", "set"]:
            if tokens[i + 3 : i + 5] != ["meta", "mark"] or tokens[i + 5] not in ("|", "&"):
                raise self.where.error("meta mark set: only 'meta mark | X' or '& X'")
            op, operand = tokens[i + 5], _value(tokens[i + 6])
            self.sets_mark |= op == "|"
            self.statements.append(lambda f: self._set_mark(f, op, operand))
            return i + 7
        if t == "dnat":
            return self._dnat(tokens, i, sets)
        if t == "update":
            return self._update(tokens, i, sets)
        raise self.where.error(f"unknown statement {t!r}")

    def _dnat(self, tokens: list[str], i: int, sets: dict[str, NftSet]) -> int:
        if tokens[i + 1 : i + 3] != [self.family, "to"]:
            raise self.where.error(f"dnat needs '{self.family} to'")
        i += 3
        m = ENDPOINT.match(tokens[i])
        if m:
            addr = ipaddress.ip_address(m.group("v4") or m.group("v6"))
            port = int(m.group("port"))
            self.statements.append(lambda f: [(self._translate(f, addr, port), "accept")])
            return i + 1
        getters, i, draw, _kind = _key(tokens, i, self.family, self.where)
        if tokens[i] != "map":
            raise self.where.error("dnat to: an endpoint or a map lookup")
        width = 1 if draw else len(getters)
        backends = _set_name(tokens[i + 1], sets, self.where, width, "value")
        self._implied(draw)
        self.statements.append(lambda f: self._dnat_map(f, getters, draw, backends))
        return i + 2

    def _implied(self, draw: _Draw | None) -> None:
        """A hash of ``tcp sport`` (udp, sctp) makes the rule match that protocol only:
        nft adds the ``meta l4proto`` it lists folded into the payload."""
        if draw is not None and draw.protocol:
            protocol = draw.protocol
            self.matches.append(lambda f: f.proto == protocol)

    def _update(self, tokens: list[str], i: int, sets: dict[str, NftSet]) -> int:
        if tokens[i + 2] != "{" or "}" not in tokens[i:]:
            raise self.where.error("update @set { element }")
        end = tokens.index("}", i)
        getters, j, draw, _kind = _key(tokens, i + 3, self.family, self.where)
        target = _set_name(tokens[i + 1], sets, self.where, len(getters), "")
        timeout: int | None = None
        if tokens[j : j + 1] == ["timeout"]:
            if not re.fullmatch(r"\d+s", tokens[j + 1]):
                raise self.where.error("a timeout in seconds (Ns) is all svcrules writes")
            timeout = int(tokens[j + 1][:-1])
            j += 2
        if j != end or draw:
            raise self.where.error("update @set { key [timeout Ns] }")
        if not target.dynamic:
            raise self.where.error(f"update of @{target.name}, which is not a dynamic set")

        def record(f: Flow) -> list[Outcome]:
            f.recorded = (*f.recorded, (target.name, *(g(f) for g in getters)))
            if timeout is not None:
                f.affinity_timeout = timeout
            return [(f, None)]

        self.statements.append(record)
        return end + 1

    # -- statement effects -------------------------------------------------

    def _translate(self, f: Flow, addr: IPAddress, port: int) -> Flow:
        if addr.version != f.family:
            raise self.where.error("dnat to an address of the other family")
        f.dnat(addr, port)
        return f

    def _lookups(
        self, f: Flow, getters: list[Getter], draw: _Draw | None, found: NftSet
    ) -> list[tuple[Flow, str | None]]:
        """Each key the flow may present, looked up in ``found``: the flow forked with
        that key's probability (and the pick that drew it), and the data (None: a miss)."""
        out: list[tuple[Flow, str | None]] = []
        for prob, key, pick in _keys(self, getters, f, draw):
            g = f.fork(prob)
            data = found.lookup(key)
            if data is not None and pick is not None:
                g.picked(pick)
            out.append((g, data))
        return out

    def _vmap(
        self, f: Flow, getters: list[Getter], draw: _Draw | None, vmap: NftSet
    ) -> list[Outcome]:
        out: list[Outcome] = []
        for g, data in self._lookups(f, getters, draw, vmap):
            if data is None:
                out.append((g, "miss"))
            else:
                out.append((g, None if data == "continue" else data))  # continue: next rule
        return out

    def _dnat_map(
        self, f: Flow, getters: list[Getter], draw: _Draw | None, backends: NftSet
    ) -> list[Outcome]:
        out: list[Outcome] = []
        for g, data in self._lookups(f, getters, draw, backends):
            if data is None:
                out.append((g, "miss"))
                continue
            addr_text, _dot, port_text = data.partition(" . ")
            try:
                addr, port = ipaddress.ip_address(addr_text), int(port_text)
            except ValueError:
                why = f"@{backends.name} holds {data!r}, not address . port"
                raise self.where.error(why) from None
            out.append((self._translate(g, addr, port), "accept"))
        return out

    def _set_mark(self, f: Flow, op: str, operand: int) -> list[Outcome]:
        f.mark = (f.mark | operand) if op == "|" else (f.mark & operand)
        return [(f, None)]

    def _masquerade(self, f: Flow) -> list[Outcome]:
        f.masquerade = True
        return [(f, "accept")]

    # -- running -------------------------------------------------------------

    def run(self, f: Flow) -> list[Outcome] | None:
        """The flows after this rule (verdict None: the next rule follows), or None
        when its matches do not hold."""
        if not all(m(f) for m in self.matches):
            return None
        flows: list[Outcome] = [(f, None)]
        for statement in self.statements:
            nxt: list[Outcome] = []
            for g, verdict in flows:
                if verdict is not None:
                    nxt.append((g, verdict))
                else:
                    nxt.extend(statement(g))
            flows = nxt
        return flows


# -- the script ------------------------------------------------------------------


@dataclass
class NftTable:
    family: str  # ip / ip6
    name: str
    sets: dict[str, NftSet] = field(default_factory=dict)
    chains: dict[str, NftChain] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.family} {self.name}"


def _elements(
    lines: list[tuple[int, str]], k: int, into: NftSet
) -> tuple[int, list[tuple[_Where, str]]]:
    """Read ``elements = { ... }`` (its first line is lines[k]) into a set; the index
    of its closing line, and the chains its verdicts name (checked once all are known)."""
    start = _Where(*lines[k])
    targets: list[tuple[_Where, str]] = []
    k += 1
    while k < len(lines):
        n, line = lines[k]
        where = _Where(n, line)
        text = line.strip()
        if text == "}":
            return k, targets
        text = re.sub(r'\s+comment\s+"[^"]*"', "", text).rstrip(",")
        key_text, _colon, data = text.partition(" : ")
        try:
            key = tuple(_value(part) for part in key_text.split(" . "))
        except ValueError as exc:
            raise where.error(str(exc)) from None
        if len(key) != into.width:
            raise where.error(f"@{into.name} holds keys of {into.width} parts")
        if bool(data) != bool(into.data):
            what = "a map element needs" if into.data else "a set element has no"
            raise where.error(f"@{into.name}: {what} data")
        if into.data == "verdict":
            if not VERDICT_DATA.fullmatch(data):
                raise where.error(f"{data!r} is not a verdict")
            if data.startswith(("goto ", "jump ")):
                targets.append((where, data.split()[1]))
        into.elements.append((key, data))
        k += 1
    raise start.error("the elements block does not end")


def _set_type(s: NftSet, text: str, where: _Where) -> None:
    """Key width and data kind from ``type a . b : c`` or ``typeof x y . z : w``."""
    body = text.split(None, 1)[1] if " " in text else ""
    key, colon, data = body.partition(" : ")
    if not key or (s.is_map and not colon) or (colon and not s.is_map):
        raise where.error("a set has a key type; a map also a data type")
    s.width = key.count(" . ") + 1
    if s.is_map:
        s.data = "verdict" if data.strip() == "verdict" else "value"


def parse(text: str) -> dict[str, NftTable]:
    """The tables of an nft script, by "family name"."""
    tables: dict[str, NftTable] = {}
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1)]
    table: NftTable | None = None
    opened = _Where(0, "")
    block: NftSet | NftChain | None = None
    pending: list[tuple[_Where, str, NftChain, NftTable]] = []
    targets: list[tuple[_Where, str, NftTable]] = []
    k = 0
    while k < len(lines):
        n, line = lines[k]
        text_ = line.strip()
        where = _Where(n, line)
        k += 1
        if not text_ or text_.startswith("#"):
            continue
        words = text_.split()
        if table is None:
            if re.fullmatch(r"table (ip|ip6) \S+ \{\}", text_):
                continue  # "create if missing", before the delete that empties it
            if re.fullmatch(r"(delete|flush) table (ip|ip6) \S+", text_):
                tables.pop(f"{words[2]} {words[3]}", None)
                continue
            m = re.fullmatch(r"table (ip|ip6) (\S+) \{", text_)
            if not m:
                raise where.error("expected a table")
            label = f"{m.group(1)} {m.group(2)}"  # a second block adds to the table
            table = tables.setdefault(label, NftTable(m.group(1), m.group(2)))
            opened = where
            continue
        if block is None:
            if text_ == "}":
                table = None
            elif words[0] == "comment":
                pass
            elif re.fullmatch(r"(set|map|chain) \S+ \{", text_):
                if words[0] == "chain":
                    block = table.chains.setdefault(words[1], NftChain(words[1]))
                else:
                    block = NftSet(words[1], is_map=words[0] == "map")
                    table.sets[words[1]] = block
            else:
                raise where.error("expected a set, a map or a chain")
            continue
        if text_ == "}":
            if isinstance(block, NftSet) and not block.width:
                raise where.error(f"@{block.name} has no type")
            block = None
        elif isinstance(block, NftSet):
            if text_ == "elements = {":
                if not block.width:
                    raise where.error(f"@{block.name}: elements before the type")
                end, found = _elements(lines, k - 1, block)
                targets.extend((w, name, table) for w, name in found)
                k = end + 1
            elif words[0] in ("type", "typeof"):
                _set_type(block, text_, where)
            elif words[0] == "flags":
                block.dynamic = "dynamic" in text_
            elif words[0] not in ("comment", "size", "timeout"):
                raise where.error("unknown set property")
        elif words[0] == "comment":
            pass
        elif words[0] == "type":
            m = re.fullmatch(r"type nat hook (\w+) priority ([\w-]+); policy accept;", text_)
            if not m:
                raise where.error("only nat base chains with policy accept are understood")
            block.hook = m.group(1)
            prio = m.group(2)
            if prio not in PRIORITIES and not re.fullmatch(r"-?\d+", prio):
                raise where.error(f"unknown priority {prio!r}")
            block.priority = PRIORITIES[prio] if prio in PRIORITIES else int(prio)
        else:
            pending.append((where, text_, block, table))
    if table is not None:
        raise opened.error(f"table {table.label} does not end")
    for where, rule_text, chain, t in pending:  # after every set is known
        chain.rules.append(_Rule(rule_text, t.family, t.sets, where, t.label, chain.name))
    for t in tables.values():
        for chain in t.chains.values():
            for rule in chain.rules:
                for name in re.findall(r"(?:jump|goto) (\S+)", rule.text):
                    if name not in t.chains:
                        raise rule.where.error(f"no chain {name!r} in table {t.label}")
    for where, name, t in targets:
        if name not in t.chains:
            raise where.error(f"no chain {name!r} in table {t.label}")
    return tables


def _source(tables: list[NftTable], f: Flow) -> str:
    if f.from_node or f.is_local(f.src):
        return "node"
    for t in tables:
        cidrs = t.sets.get("pod-cidrs")
        if cidrs is not None and cidrs.lookup((f.src,)) is not None:
            return "pod"
    return "outside"


def nft_tracer(text: str) -> Callable[[Packet], Trace]:
    """Parse an nft script once; trace packets through the tables of their family."""
    tables = parse(text)
    walkers: dict[str, tuple[list[NftTable], Walker]] = {}

    def run(packet: Packet) -> Trace:
        flow = start(packet)
        family = "ip" if flow.family == 4 else "ip6"
        if family not in walkers:
            mine = [t for t in tables.values() if t.family == family]
            base = [(c.hook, c.priority, t, c) for t in mine for c in t.chains.values() if c.hook]
            walkers[family] = mine, Walker(base)
        mine, hooks = walkers[family]
        flows = follow(flow, hooks)
        return summarize(packet, "nftables", flows, hooks, _source(mine, flow))

    return run
