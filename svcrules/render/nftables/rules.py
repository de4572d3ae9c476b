"""nft rules as typed values, each spelled as nft text and as libnftables JSON side by side.

The layout decides which rules each chain holds (from the rule program); the types
here only spell them, in both forms, so that the text script and the JSON document
cannot disagree. The JSON is the shape ``nft -j list`` prints with nft 1.0.6 (see
json_form.py): where the listing differs from what one writes (``reject`` lists its
ICMP type, ``priority dstnat`` lists as -100), that quirk is known here and nowhere
else.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple, TypeAlias

Json: TypeAlias = bool | int | str | list["Json"] | dict[str, "Json"] | None
Obj: TypeAlias = dict[str, Json]
Exprs: TypeAlias = list[Json]

MARK_FOR_MASQUERADE = "mark-for-masquerade"


class Fam(NamedTuple):
    """What differs between the ip and ip6 tables' spelling."""

    name: str  # "ip" or "ip6"
    addr_type: str
    loopback: str
    reject: Obj  # how the listing spells a plain "reject"

    @classmethod
    def of(cls, family: int) -> Fam:
        if family == 4:
            return cls("ip", "ipv4_addr", "127.0.0.0/8", _reject("icmp"))
        return cls("ip6", "ipv6_addr", "::1", _reject("icmpv6"))

    def endpoint(self, ip: str, port: int) -> str:
        return f"{ip}:{port}" if self.name == "ip" else f"[{ip}]:{port}"


def _reject(kind: str) -> Obj:
    return {"reject": {"type": kind, "expr": "port-unreachable"}}


# -- JSON expressions ----------------------------------------------------------


def payload(protocol: str, field: str) -> Obj:
    return {"payload": {"protocol": protocol, "field": field}}


def meta(key: str) -> Obj:
    return {"meta": {"key": key}}


def match(left: Json, right: Json, op: str = "==") -> Obj:
    return {"match": {"op": op, "left": left, "right": right}}


def concat(*items: Json) -> Obj:
    return {"concat": list(items)}


def ref(name: str) -> str:
    return f"@{name}"


def vmap(key: Json, name: str) -> Obj:
    return {"vmap": {"key": key, "data": ref(name)}}


def numgen(count: int, base: int) -> Obj:
    return {"numgen": {"mode": "random", "mod": count, "offset": base}}


def numgen_inc(key: int) -> Obj:
    """``numgen inc mod 1 offset KEY``: always KEY (a constant inside a concatenation)."""
    return {"numgen": {"mode": "inc", "mod": 1, "offset": key}}


def prefix(cidr: str) -> Json:
    """An interval element: a full-length prefix lists as a plain address."""
    net = ipaddress.ip_network(cidr, strict=False)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def verdict(text: str) -> Obj:
    """A verdict from its nft spelling: "drop", "goto X" or "jump X"."""
    kind, _, target = text.partition(" ")
    if kind in ("goto", "jump") and target:
        return {kind: {"target": target}}
    if kind in ("drop", "accept", "return", "continue") and not target:
        return {kind: None}
    raise ValueError(f"unknown verdict {text!r}")


def masquerade() -> Obj:
    return {"masquerade": {"flags": "fully-random"}}


def _saddr(f: Fam) -> Obj:
    return payload(f.name, "saddr")


def _daddr(f: Fam) -> Obj:
    return payload(f.name, "daddr")


def _frontend_key(f: Fam) -> list[Json]:
    return [_daddr(f), meta("l4proto"), payload("th", "dport")]


def _fib_local(which: str) -> Obj:
    return match({"fib": {"result": "type", "flags": [which]}}, "local")


def _hex(mark: int) -> str:
    return f"0x{mark:08x}"


# -- rules ---------------------------------------------------------------------


class Verdict(NamedTuple):
    """A lone verdict: "jump services", "drop", "reject"."""

    word: str

    def text(self, f: Fam) -> str:
        return self.word

    def json(self, f: Fam) -> Exprs:
        return [f.reject if self.word == "reject" else verdict(self.word)]


class MasqueradeMarked(NamedTuple):
    """Masquerade what carries the mark, clearing the mark."""

    mark: int

    def text(self, f: Fam) -> str:
        m = _hex(self.mark)
        keep = _hex(0xFFFFFFFF ^ self.mark)
        return f"meta mark & {m} == {m} meta mark set meta mark & {keep} masquerade fully-random"

    def json(self, f: Fam) -> Exprs:
        mark = meta("mark")
        clear: Obj = {"&": [mark, 0xFFFFFFFF ^ self.mark]}
        return [
            match({"&": [mark, self.mark]}, self.mark),
            {"mangle": {"key": mark, "value": clear}},
            masquerade(),
        ]


class MasqueradeHairpin(NamedTuple):
    """Masquerade a translated connection whose source is its own destination."""

    def text(self, f: Fam) -> str:
        return f"ct status dnat {f.name} saddr . {f.name} daddr @hairpin masquerade fully-random"

    def json(self, f: Fam) -> Exprs:
        return [
            match({"ct": {"key": "status"}}, "dnat", "in"),
            match(concat(_saddr(f), _daddr(f)), ref("hairpin")),
            masquerade(),
        ]


class SetMark(NamedTuple):
    mark: int

    def text(self, f: Fam) -> str:
        return f"meta mark set meta mark | {_hex(self.mark)}"

    def json(self, f: Fam) -> Exprs:
        mark = meta("mark")
        return [{"mangle": {"key": mark, "value": {"|": [mark, self.mark]}}}]


class FirewallDrop(NamedTuple):
    """Drop sources outside the allowed ranges of a source-filtered frontend."""

    def text(self, f: Fam) -> str:
        key = f"{f.name} daddr . meta l4proto . th dport"
        return f"{key} @firewall-ips {key} . {f.name} saddr != @firewall-allow drop"

    def json(self, f: Fam) -> Exprs:
        key = _frontend_key(f)
        return [
            match(concat(*key), ref("firewall-ips")),
            match(concat(*key, _saddr(f)), ref("firewall-allow"), "!="),
            verdict("drop"),
        ]


class DispatchFrontends(NamedTuple):
    def text(self, f: Fam) -> str:
        return f"{f.name} daddr . meta l4proto . th dport vmap @service-ips"

    def json(self, f: Fam) -> Exprs:
        return [vmap(concat(*_frontend_key(f)), "service-ips")]


class DispatchNodePorts(NamedTuple):
    """NodePorts, on the destinations the program's NodePortScope names."""

    local: bool  # fib daddr type local
    except_loopback: bool
    in_set: bool  # daddr @nodeport-ips

    def text(self, f: Fam) -> str:
        parts = ["fib daddr type local"] if self.local else []
        if self.except_loopback:
            parts.append(f"{f.name} daddr != {f.loopback}")
        if self.in_set:
            parts.append(f"{f.name} daddr @nodeport-ips")
        parts.append("meta l4proto . th dport vmap @service-nodeports")
        return " ".join(parts)

    def json(self, f: Fam) -> Exprs:
        out: Exprs = [_fib_local("daddr")] if self.local else []
        if self.except_loopback:
            out.append(match(_daddr(f), prefix(f.loopback), "!="))
        if self.in_set:
            out.append(match(_daddr(f), ref("nodeport-ips")))
        out.append(vmap(concat(meta("l4proto"), payload("th", "dport")), "service-nodeports"))
        return out


class DaddrIn(NamedTuple):
    """A verdict for destinations in a set: "return", "reject" or "drop"."""

    set: str
    verdict: str

    def text(self, f: Fam) -> str:
        return f"{f.name} daddr @{self.set} {self.verdict}"

    def json(self, f: Fam) -> Exprs:
        v = f.reject if self.verdict == "reject" else verdict(self.verdict)
        return [match(_daddr(f), ref(self.set)), v]


class MarkMasquerade(NamedTuple):
    non_pod: bool  # only sources outside pod-cidrs

    def text(self, f: Fam) -> str:
        if self.non_pod:
            return f"{f.name} saddr != @pod-cidrs jump {MARK_FOR_MASQUERADE}"
        return f"jump {MARK_FOR_MASQUERADE}"

    def json(self, f: Fam) -> Exprs:
        jump = verdict(f"jump {MARK_FOR_MASQUERADE}")
        return [match(_saddr(f), ref("pod-cidrs"), "!="), jump] if self.non_pod else [jump]


class PodsGoto(NamedTuple):
    verdict: str  # "goto CHAIN"

    def text(self, f: Fam) -> str:
        return f"{f.name} saddr @pod-cidrs {self.verdict}"

    def json(self, f: Fam) -> Exprs:
        return [match(_saddr(f), ref("pod-cidrs")), verdict(self.verdict)]


class NodeSource(NamedTuple):
    """A verdict for connections from the node's own addresses (fib at packet time)."""

    verdict: str  # "jump mark-for-masquerade" or "goto CHAIN"

    def text(self, f: Fam) -> str:
        return f"fib saddr type local {self.verdict}"

    def json(self, f: Fam) -> Exprs:
        return [_fib_local("saddr"), verdict(self.verdict)]


class Pinned(NamedTuple):
    """A client pinned to an endpoint (ClientIP affinity) goes to its endpoint chain."""

    key: int
    chain: str

    def text(self, f: Fam) -> str:
        return f"{f.name} saddr . numgen inc mod 1 offset {self.key} @affinity goto {self.chain}"

    def json(self, f: Fam) -> Exprs:
        pinned = match(concat(_saddr(f), numgen_inc(self.key)), ref("affinity"))
        return [pinned, verdict(f"goto {self.chain}")]


class Slot(NamedTuple):
    """The slot a pick takes: ``numgen random`` over the selection's block of slots, or
    (Maglev) ``jhash`` of the flow or of the client address, with the seed every node
    shares. nft lists a jhash offset of 0 as no offset, and folds ``meta l4proto`` into
    the ``tcp sport`` payloads the flow hash reads, so neither is written."""

    size: int
    base: int
    hash: str = ""  # "" (random), "flow" or "client"
    protocol: str = ""  # the flow hash's payload protocol
    seed: int = 0

    def text(self, f: Fam) -> str:
        if not self.hash:
            return f"numgen random mod {self.size} offset {self.base}"
        offset = f" offset {self.base}" if self.base else ""
        return f"jhash {self._fields_text(f)} mod {self.size} seed 0x{self.seed:x}{offset}"

    def _fields_text(self, f: Fam) -> str:
        if self.hash == "client":
            return f"{f.name} saddr"
        p = self.protocol
        return f"{f.name} saddr . {p} sport . {f.name} daddr . {p} dport"

    def json(self, f: Fam) -> Obj:
        if not self.hash:
            return numgen(self.size, self.base)
        expr: Obj = _saddr(f)
        if self.hash == "flow":
            p = self.protocol
            expr = concat(_saddr(f), payload(p, "sport"), _daddr(f), payload(p, "dport"))
        body: Obj = {"mod": self.size, "seed": self.seed}
        if self.base:
            body["offset"] = self.base
        body["expr"] = expr
        return {"jhash": body}


class PickChain(NamedTuple):
    """A slot of a verdict map: go to that endpoint's chain."""

    slot: Slot
    map: str

    def text(self, f: Fam) -> str:
        return f"{self.slot.text(f)} vmap @{self.map}"

    def json(self, f: Fam) -> Exprs:
        return [vmap(self.slot.json(f), self.map)]


class PickDnat(NamedTuple):
    """A slot of a backends map: DNAT to that address and port."""

    protocol: str
    slot: Slot
    map: str

    def text(self, f: Fam) -> str:
        pick = f"{self.slot.text(f)} map @{self.map}"
        if self.slot.hash == "flow":  # the hash's payloads imply the protocol
            return f"dnat {f.name} to {pick}"
        return f"meta l4proto {self.protocol} dnat {f.name} to {pick}"

    def json(self, f: Fam) -> Exprs:
        addr: Obj = {"map": {"key": self.slot.json(f), "data": ref(self.map)}}
        dnat: Obj = {"dnat": {"family": f.name, "addr": addr}}
        if self.slot.hash == "flow":
            return [dnat]
        return [match(meta("l4proto"), self.protocol), dnat]


class Remember(NamedTuple):
    """Pin the client to this endpoint for ``timeout`` seconds (or refresh the pin)."""

    key: int
    timeout: int

    def text(self, f: Fam) -> str:
        elem = f"{f.name} saddr . numgen inc mod 1 offset {self.key} timeout {self.timeout}s"
        return f"update @affinity {{ {elem} }}"

    def json(self, f: Fam) -> Exprs:
        elem: Obj = {
            "elem": {"val": concat(_saddr(f), numgen_inc(self.key)), "timeout": self.timeout}
        }
        return [{"set": {"op": "update", "elem": elem, "set": ref("affinity")}}]


class Dnat(NamedTuple):
    protocol: str
    ip: str
    port: int

    def text(self, f: Fam) -> str:
        return f"meta l4proto {self.protocol} dnat {f.name} to {f.endpoint(self.ip, self.port)}"

    def json(self, f: Fam) -> Exprs:
        return [
            match(meta("l4proto"), self.protocol),
            {"dnat": {"addr": self.ip, "port": self.port}},
        ]


Rule = (
    Verdict
    | MasqueradeMarked
    | MasqueradeHairpin
    | SetMark
    | FirewallDrop
    | DispatchFrontends
    | DispatchNodePorts
    | DaddrIn
    | MarkMasquerade
    | PodsGoto
    | NodeSource
    | Pinned
    | PickChain
    | PickDnat
    | Remember
    | Dnat
)


class Hook(NamedTuple):
    """A base chain's hook: nft 1.0.6 refuses ``priority dstnat`` on output, so the
    written priority and the listed number are both kept."""

    hook: str
    written: str  # "dstnat", "-100", "srcnat"
    prio: int  # as the listing prints it

    def text(self) -> str:
        return f"type nat hook {self.hook} priority {self.written}; policy accept;"


class NftChain(NamedTuple):
    name: str
    comment: str
    hook: Hook | None
    rules: tuple[Rule, ...]

    def body(self, f: Fam) -> str:
        """The chain's lines as the template prints them, joined with their indent."""
        lines = [f'comment "{self.comment}"'] if self.comment else []
        if self.hook is not None:
            lines.append(self.hook.text())
        lines.extend(r.text(f) for r in self.rules)
        return "\n\t\t".join(lines)
