"""An interpreter of the iptables-restore input svcrules writes (``--backend iptables``).

It reads each family's ``*nat`` and ``*filter`` sections, the owned chains and their
``-A`` rules, and the ``# jump`` lines that say which rules ``apply`` puts at the top
of the built-in chains; other software's rules in those built-in chains are not
there, so the built-in chains end in their ACCEPT policy. It understands exactly
the matches and targets svcrules emits (``_Rule._match`` and ``_Rule._target``) and
refuses anything else with the line it could not read.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from svcrules.trace.flow import ENDPOINT, Flow, IPAddress, Outcome, Walker, follow, start, summarize
from svcrules.trace.model import Packet, Pick, Trace, TraceError

# Built-in chains svcrules jumps from: (table, chain) -> (hook, priority)
BUILTIN = {
    ("nat", "PREROUTING"): ("prerouting", -100),
    ("nat", "OUTPUT"): ("output", -100),
    ("nat", "POSTROUTING"): ("postrouting", 100),
    ("nat", "INPUT"): ("input", 100),
    ("filter", "INPUT"): ("input", 0),
    ("filter", "FORWARD"): ("forward", 0),
    ("filter", "OUTPUT"): ("output", 0),
}
_WORD = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')


class _Where:
    def __init__(self, line: int, text: str) -> None:
        self.line = line
        self.text = text

    def error(self, why: str) -> TraceError:
        return TraceError(f"iptables input line {self.line}: {why}: {self.text.strip()!r}")


def _network(
    text: str, where: _Where, family: int
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise where.error(f"{text!r} is not an address or CIDR") from None
    if net.version != family:
        raise where.error(f"{text} in the ipv{family} section")
    return net


def _mark(text: str, where: _Where) -> tuple[int, int]:
    """``VALUE[/MASK]`` as --mark writes it."""
    value, _slash, mask = text.partition("/")
    try:
        return int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF
    except ValueError:
        raise where.error(f"{text!r} is not a mark") from None


class _Rule:
    """One ``-A`` rule (or a ``# jump`` line): matches, then one target or none."""

    def __init__(self, text: str, where: _Where, family: int) -> None:
        self.text = text
        self.where = where
        self.family = family
        self.matches: list[Callable[[Flow], bool]] = []
        self.branch: float | None = None  # -m statistic: matches with this probability
        self.pick: Pick | None = None  # -m statistic: the cascade of its chain
        self.affinity: int | None = None  # -m recent --rcheck --seconds N
        self.target: Callable[[Flow], list[Outcome]] | None = None
        self.sets_mark = False
        self.chain: str | None = None  # the chain -j / -g names
        # iptables-save quoting: "..." with \" and \\ escaped inside
        words = []
        for quoted, bare in _WORD.findall(text):
            if '"' in bare:
                raise where.error("a quote does not close")
            words.append(re.sub(r"\\(.)", r"\1", quoted) if quoted else bare)
        try:
            self._read(words)
        except (IndexError, ValueError) as exc:
            why = f" ({exc})" if isinstance(exc, ValueError) else ""
            raise where.error(f"not a rule svcrules writes{why}") from None

    def _read(self, words: list[str]) -> None:
        i = 0
        negate = False
        while i < len(words):
            w = words[i]
            if w == "!":
                if negate or i + 1 == len(words) or words[i + 1] in ("-j", "-g", "!"):
                    raise self.where.error("'!' negates a match, not a target")
                negate = True
                i += 1
                continue
            if w in ("-j", "-g"):
                i = self._target(words, i)
            elif w in ("-s", "-d", "-p"):
                i = self._address_or_proto(words, i, negate)
            elif w == "-m":
                i = self._match(words, i + 1, negate)
            else:
                raise self.where.error(f"unknown option {w!r}")
            negate = False

    def _add(self, test: Callable[[Flow], bool], negate: bool) -> None:
        self.matches.append((lambda f: not test(f)) if negate else test)

    def _address_or_proto(self, words: list[str], i: int, negate: bool) -> int:
        w, arg = words[i], words[i + 1]
        if w == "-p":
            if arg not in ("tcp", "udp", "sctp"):
                raise self.where.error(f"unknown protocol {arg!r}")
            self._add(lambda f: f.proto == arg, negate)
        else:
            net = _network(arg, self.where, self.family)
            src = w == "-s"
            self._add(lambda f: (f.src if src else f.dst) in net, negate)
        return i + 2

    def _match(self, words: list[str], i: int, negate: bool) -> int:
        module = words[i]
        i += 1
        opts: list[str] = []
        while i < len(words) and words[i] not in ("-m", "-j", "-g", "-s", "-d", "-p", "!"):
            opts.append(words[i])
            i += 1
        if i < len(words) and words[i] == "!" and words[i + 1 : i + 2] == ["--mark"]:
            opts += words[i : i + 3]
            i += 3
        if negate:
            raise self.where.error(f"'!' before -m {module}")
        if module in ("tcp", "udp", "sctp") and len(opts) == 2 and opts[0] == "--dport":
            port = int(opts[1])
            self.matches.append(lambda f: f.proto == module and f.port == port)
        elif module == "comment" and len(opts) == 2 and opts[0] == "--comment":
            pass
        elif module == "statistic" and opts[:3] == ["--mode", "random", "--probability"]:
            self.branch = float(opts[3])
        elif module == "recent":
            self._recent(opts)
        elif module == "addrtype" and opts in (["--src-type", "LOCAL"], ["--dst-type", "LOCAL"]):
            src = opts[0] == "--src-type"
            self.matches.append(lambda f: f.is_local(f.src if src else f.dst))
        elif module == "conntrack":
            self._conntrack(opts)
        elif module == "mark" and len(opts) in (2, 3) and opts[-2] == "--mark":
            value, mask = _mark(opts[-1], self.where)
            neg = opts[0] == "!"
            self.matches.append(lambda f: ((f.mark & mask) == value) != neg)
        else:
            raise self.where.error(f"unknown match -m {module} {' '.join(opts)}")
        return i

    def _recent(self, opts: list[str]) -> None:
        if len(opts) < 3 or opts[0] != "--name":
            raise self.where.error("-m recent --name NAME ...")
        name = opts[1]
        if opts[2:] == ["--set"]:

            def record(f: Flow) -> bool:
                f.recorded = (*f.recorded, ("recent", name, f.src))
                return True

            self.matches.append(record)
        elif opts[2:4] == ["--rcheck", "--seconds"] and opts[5:] == ["--reap"]:
            self.affinity = int(opts[4])
            self.matches.append(lambda f: ("recent", name, f.src) in f.pins)
        else:
            raise self.where.error("-m recent: only --set or --rcheck --seconds N --reap")

    def _conntrack(self, opts: list[str]) -> None:
        if opts == ["--ctstate", "NEW"]:
            return  # a trace follows the first packet of a connection
        if opts == ["--ctstate", "DNAT"]:
            self.matches.append(lambda f: f.endpoint is not None)
            return
        if len(opts) == 4 and opts[0] == "--ctorigdst" and opts[2] == "--ctorigdstport":
            net = _network(opts[1], self.where, self.family)
            port = int(opts[3])
            self.matches.append(lambda f: f.orig_dst in net and f.orig_port == port)
            return
        raise self.where.error(f"unknown conntrack match {' '.join(opts)}")

    def _target(self, words: list[str], i: int) -> int:
        if self.target is not None:
            raise self.where.error("two targets")
        kind, name = words[i], words[i + 1]
        args = words[i + 2 :]
        end = len(words)
        if name not in _TARGETS:  # a chain (parse checks that it exists)
            if args:
                raise self.where.error(f"unknown target {' '.join(words[i:])}")
            verb = "goto" if kind == "-g" else "jump"
            self.chain = name
            self.target = lambda f: [(f, f"{verb} {name}")]
            return i + 2
        if kind == "-g":
            raise self.where.error(f"-g {name}: goto needs a chain")
        if name in ("RETURN", "ACCEPT", "DROP", "REJECT") and not args:
            verdict = name.lower()
            self.target = lambda f: [(f, verdict)]
        elif name == "MARK" and len(args) == 2 and args[0] in ("--or-mark", "--xor-mark"):
            value = int(args[1], 0)
            if args[0] == "--or-mark":
                self.sets_mark = True
                self.target = lambda f: _set_mark(f, f.mark | value)
            else:
                self.target = lambda f: _set_mark(f, f.mark ^ value)
        elif name == "MASQUERADE" and args in ([], ["--random-fully"]):
            self.target = _masquerade
        elif name == "DNAT" and len(args) == 2 and args[0] == "--to-destination":
            m = ENDPOINT.match(args[1])
            if not m:
                raise self.where.error(f"--to-destination {args[1]!r}")
            addr = ipaddress.ip_address(m.group("v4") or m.group("v6"))
            port = int(m.group("port"))
            self.target = lambda f: _dnat(f, addr, port, self.where)
        else:
            raise self.where.error(f"unknown target {' '.join(words[i:])}")
        return end

    def run(self, f: Flow) -> list[Outcome] | None:
        if self.affinity is not None:
            f.affinity_timeout = self.affinity
        if not all(m(f) for m in self.matches):
            return None
        if self.branch is None:
            return self.target(f) if self.target else [(f, None)]
        taken = f.fork(self.branch)
        skipped = f.fork(1.0 - self.branch)
        if self.pick is not None:  # the cascade's last rule has no statistic: no need
            taken.picked(self.pick)
            skipped.picked(self.pick)
        outcomes = self.target(taken) if self.target else [(taken, None)]
        return [*outcomes, (skipped, "miss")]


_TARGETS = {"RETURN", "ACCEPT", "DROP", "REJECT", "MARK", "MASQUERADE", "DNAT"}


def _set_mark(f: Flow, mark: int) -> list[Outcome]:
    f.mark = mark
    return [(f, None)]


def _masquerade(f: Flow) -> list[Outcome]:
    f.masquerade = True
    return [(f, "accept")]


def _dnat(f: Flow, addr: IPAddress, port: int, where: _Where) -> list[Outcome]:
    if addr.version != f.family:
        raise where.error("DNAT to an address of the other family")
    f.dnat(addr, port)
    return [(f, "accept")]


@dataclass
class IptChain:
    name: str
    rules: list[_Rule] = field(default_factory=list)


@dataclass
class IptTable:
    """One family's nat or filter section."""

    family: str  # ipv4 / ipv6
    name: str  # nat / filter
    chains: dict[str, IptChain] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.family} {self.name}"

    @property
    def version(self) -> int:
        return 4 if self.family == "ipv4" else 6


def parse(text: str) -> dict[str, IptTable]:
    """The tables of an iptables text, by "family table"."""
    tables: dict[str, IptTable] = {}
    family = ""
    table: IptTable | None = None
    opened = _Where(0, "")
    for n, line in enumerate(text.splitlines(), 1):
        where = _Where(n, line)
        s = line.strip()
        if not s:
            continue
        if m := re.match(r"# family (ipv[46])\b", s):
            family = m.group(1)
        elif m := re.fullmatch(r"# jump (\S+) (.*)", s):
            if table is None or (table.name, m.group(1)) not in BUILTIN:
                raise where.error("a jump from a chain that is not a built-in chain")
            chain = table.chains.setdefault(m.group(1), IptChain(m.group(1)))
            chain.rules.append(_Rule(m.group(2), where, table.version))
        elif s.startswith("#"):
            continue
        elif m := re.fullmatch(r"\*(nat|filter)", s):
            if not family:
                raise where.error("a table before any '# family' line")
            table = tables.setdefault(f"{family} {m.group(1)}", IptTable(family, m.group(1)))
            opened = where
        elif s == "COMMIT":
            table = None
        elif table is None:
            raise where.error("outside a table")
        elif m := re.fullmatch(r":(\S+) (-|ACCEPT) \[\d+:\d+\]", s):
            table.chains.setdefault(m.group(1), IptChain(m.group(1)))
        elif m := re.fullmatch(r"-A (\S+) (.*)", s):
            if m.group(1) not in table.chains:
                raise where.error(f"chain {m.group(1)} is not declared")
            rule = _Rule(m.group(2), where, table.version)
            if rule.branch is not None:  # a random pick: a cascade of these
                rule.pick = Pick("random", table.label, m.group(1), "")
            table.chains[m.group(1)].rules.append(rule)
        else:
            raise where.error("unknown line")
    if table is not None:
        raise opened.error(f"table {table.label} has no COMMIT")
    for t in tables.values():
        for chain in t.chains.values():
            for rule in chain.rules:
                if rule.chain is not None and rule.chain not in t.chains:
                    why = f"no chain {rule.chain!r} in {t.label}, and not a target svcrules uses"
                    raise rule.where.error(why)
    return tables


def _source(tables: list[IptTable], f: Flow) -> str:
    """Pods are what the owned ``-MASQ-NON-POD`` chain returns early for."""
    if f.from_node or f.is_local(f.src):
        return "node"
    for t in tables:
        for chain in t.chains.values():
            if chain.name.endswith("-MASQ-NON-POD"):
                for rule in chain.rules:
                    if rule.text.endswith("-j RETURN") and all(m(f) for m in rule.matches):
                        return "pod"
    return "outside"


def iptables_tracer(text: str) -> Callable[[Packet], Trace]:
    """Parse an iptables text once; trace packets through the section of their family."""
    tables = parse(text)
    walkers: dict[str, tuple[list[IptTable], Walker]] = {}

    def run(packet: Packet) -> Trace:
        flow = start(packet)
        family = f"ipv{flow.family}"
        if family not in walkers:
            mine = [t for t in tables.values() if t.family == family]
            base = [
                (*BUILTIN[(t.name, c.name)], t, c)
                for t in mine
                for c in t.chains.values()
                if (t.name, c.name) in BUILTIN
            ]
            walkers[family] = mine, Walker(base)
        mine, hooks = walkers[family]
        flows = follow(flow, hooks)
        return summarize(packet, "iptables", flows, hooks, _source(mine, flow))

    return run
