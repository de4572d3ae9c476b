"""What really happens to a packet in the lab, and whether a trace predicted it.

A packet is sent as real connections (``Lab.probe``) and each connection is read
back from the node's conntrack table, matched by its source port:

- an entry whose reply comes from another address or port than the original
  destination: **dnat**, to the endpoint the reply comes from; **masqueraded** when
  the reply goes to another address or port than the original source (masquerade
  is ``fully-random``: the port changes even where the address would not, as for
  the node's own connections);
- an entry without translation: **untouched** (the packet went where it was sent: a
  pod, the node's own server, or the dummy interface where it dies);
- no entry: the packet never got past the node's hooks. **reject** when the client
  was told at once (refused / unreachable), **drop** when it timed out. Netfilter
  confirms an entry only after the last hook, so a dropped or rejected packet
  leaves none, while every packet that went on does.

One trap: a TCP connection whose only answer is a reset has its entry deleted at
once, so a packet the node's stack refuses would look rejected. A packet to one of
the node's addresses must therefore find a listener there (the differential test
runs one on every port such a packet uses, scenarios.NODE_SERVER_PORTS).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections import Counter
from dataclasses import dataclass, field

from svcrules.trace.model import Trace

from .lab import Lab, Result
from .scenarios import PODS, Probe, family_of, pod_ip

# Long enough that a refusal or an answer is never mistaken for a timeout.
TIMEOUT = 0.5
# Where a drop, a reject or an untouched packet is predicted, the wait for a timeout is
# most of the test's time; a refusal still comes a thousand times sooner than this.
NOT_DNAT_TIMEOUT = 0.3
ROUND = 8  # connections per round while predicted endpoints are still unseen
MAX_CONNECTIONS = 64
STICKY_CONNECTIONS = 8  # ClientIP affinity: all of these must reach one endpoint
NOT_DNAT_CONNECTIONS = 2  # dropped, rejected, untouched: sent at once

# (cluster, packet) pairs compared, per (backend, predicted verdict); printed in the
# terminal summary (conftest.py).
CHECKED: Counter[tuple[str, str]] = Counter()
# Of the dnat pairs, per backend: how many a Maglev pick decided, how many had endpoints
# of unequal shares (weights, Maglev's table).
PICKS: Counter[tuple[str, str]] = Counter()

_KV = re.compile(r"(src|dst|sport|dport)=(\S+)")


def endpoint_name(ip: str, port: int) -> str:
    """As a trace names endpoints: ``198.51.100.11:8080``, ``[2001:db8:2::11]:8080``."""
    addr = ipaddress.ip_address(ip)
    return f"[{addr.compressed}]:{port}" if addr.version == 6 else f"{addr}:{port}"


@dataclass(frozen=True)
class Entry:
    """One conntrack entry: the original tuple and the reply tuple."""

    src: str
    dst: str
    sport: int
    dport: int
    reply_src: str
    reply_dst: str
    reply_sport: int
    reply_dport: int
    line: str

    @classmethod
    def parse(cls, line: str) -> Entry | None:
        pairs = _KV.findall(line)
        if len(pairs) < 8:
            return None
        v = [val for _key, val in pairs[:8]]
        canon = [ipaddress.ip_address(a).compressed for a in (v[0], v[1], v[4], v[5])]
        return cls(
            canon[0], canon[1], int(v[2]), int(v[3]), canon[2], canon[3], int(v[6]), int(v[7]), line
        )


def conntrack(lab: Lab, family: int, proto: str) -> list[Entry]:
    """The node's conntrack entries of one family and protocol."""
    out = lab.exec("node", "conntrack", "-L", "-f", f"ipv{family}", "-p", proto, check=False).stdout
    return [e for line in out.splitlines() if (e := Entry.parse(line)) is not None]


@dataclass(frozen=True)
class Connection:
    """One connection of a probe as the client and the node's conntrack saw it."""

    result: Result
    entry: Entry | None
    verdict: str  # dnat | reject | drop | untouched | "?" (the lab cannot tell)
    endpoint: str | None = None  # dnat: where to
    masqueraded: bool | None = None  # dnat, untouched: was the source translated
    problem: str = ""  # the client and conntrack disagree (a lab problem)

    def describe(self) -> str:
        r = self.result
        answer = f"{r.outcome}" + (
            f" by {r.backend} on {r.port}, saw {r.seen_src}" if r.backend else ""
        )
        parts = [f"sport {r.sport}: {self.verdict}"]
        if self.endpoint:
            parts.append(f"-> {self.endpoint}")
        if self.masqueraded is not None:
            parts.append("masqueraded" if self.masqueraded else "not masqueraded")
        parts.append(f"[{answer}]")
        if self.problem:
            parts.append(f"LAB PROBLEM: {self.problem}")
        parts.append(f"conntrack: {self.entry.line.strip() if self.entry else 'none'}")
        if r.detail:
            parts.append(f"detail: {r.detail}")
        return " ".join(parts)


def _owner(ip: str) -> str:
    """Which lab member answers at ``ip``: a pod, or the node's server."""
    for pod in PODS:
        if ip == pod_ip(pod, family_of(ip)):
            return pod
    return "node"


def classify(result: Result, entry: Entry | None) -> Connection:
    """One connection, from what the client saw and the node's entry for it."""
    if entry is None:
        if result.outcome in ("refused", "unreachable"):
            return Connection(result, None, "reject")
        if result.outcome == "timeout":
            return Connection(result, None, "drop")
        return Connection(result, None, "?", problem="no conntrack entry for this connection")
    masq = (entry.reply_dst, entry.reply_dport) != (entry.src, entry.sport)
    translated = (entry.reply_src, entry.reply_sport) != (entry.dst, entry.dport)
    if translated:
        ep = endpoint_name(entry.reply_src, entry.reply_sport)
        conn = Connection(result, entry, "dnat", ep, masq)
    else:
        conn = Connection(result, entry, "untouched", None, masq)
    # The answer, where there is one, must come from where conntrack says it went.
    if result.outcome == "ok":
        want = (_owner(entry.reply_src), entry.reply_sport)
        got = (result.backend, result.port)
        if got != want:
            return _with_problem(conn, f"answered by {got}, conntrack says {want}")
        if _canonical(result.seen_src) != entry.reply_dst:
            return _with_problem(
                conn, f"backend saw {result.seen_src}, conntrack {entry.reply_dst}"
            )
    elif translated and not (entry.reply_src == entry.src and not masq):
        # (A pod sent to itself without masquerade cannot get an answer: it replies to
        # itself directly. The rules do that to a hairpin they take for another node's.)
        return _with_problem(conn, f"translated to {conn.endpoint} but not answered")
    return conn


def _canonical(ip: str | None) -> str | None:
    return None if ip is None else ipaddress.ip_address(ip).compressed


def _with_problem(conn: Connection, problem: str) -> Connection:
    return dataclasses.replace(conn, problem=problem)


def send(
    lab: Lab, probe: Probe, count: int, concurrency: int = 1, timeout: float = TIMEOUT
) -> list[Connection]:
    """``count`` new connections for ``probe``, each classified."""
    results = lab.probe(
        probe.member,
        probe.dst,
        probe.port,
        probe.proto,
        count=count,
        timeout=timeout,
        bind=probe.src,
        concurrency=concurrency,
    )
    entries = {
        (e.src, e.sport, e.dst, e.dport): e
        for e in conntrack(lab, family_of(probe.dst), probe.proto)
    }
    src, dst = (ipaddress.ip_address(a).compressed for a in (probe.src, probe.dst))
    return [classify(r, entries.get((src, r.sport or 0, dst, probe.port))) for r in results]


@dataclass
class Observation:
    """Every connection made for one packet."""

    probe: Probe
    connections: list[Connection] = field(default_factory=list)

    @property
    def verdicts(self) -> set[str]:
        return {c.verdict for c in self.connections}

    @property
    def endpoints(self) -> Counter[str]:
        return Counter(c.endpoint for c in self.connections if c.endpoint is not None)

    def describe(self) -> str:
        seen = ", ".join(f"{ep} x{n}" for ep, n in sorted(self.endpoints.items()))
        lines = [f"observed verdicts {sorted(self.verdicts)}; endpoints: {seen or 'none'}"]
        lines += [f"  {c.describe()}" for c in self.connections]
        return "\n".join(lines)


def observe(lab: Lab, probe: Probe, expected: Trace) -> Observation:
    """Send ``probe`` as often as comparing with ``expected`` needs: twice (at once)
    where no DNAT is predicted; with DNAT, in rounds until every predicted endpoint
    has answered (at most MAX_CONNECTIONS), or STICKY_CONNECTIONS one after another
    where ClientIP affinity is predicted. Stops early once anything unpredicted
    happened."""
    obs = Observation(probe)
    if expected.verdict != "dnat":
        n = NOT_DNAT_CONNECTIONS
        obs.connections += send(lab, probe, n, n, NOT_DNAT_TIMEOUT)
        return obs
    sticky = expected.affinity is not None and expected.affinity.sticky
    want = set(expected.endpoints)
    while len(obs.connections) < (STICKY_CONNECTIONS if sticky else MAX_CONNECTIONS):
        count = STICKY_CONNECTIONS if sticky else ROUND
        obs.connections += send(lab, probe, count)
        if disagreements(expected, obs, final=False):
            break
        if not sticky and want <= set(obs.endpoints):
            break
    return obs


def disagreements(expected: Trace, obs: Observation, final: bool = True) -> list[str]:
    """Where the kernel did something else than the trace says; empty if none.
    ``final=False``: only what more connections cannot fix (not: unseen endpoints)."""
    out: list[str] = []
    total = sum(expected.probabilities.values())  # each rounded to 6 digits
    if final and (
        set(expected.probabilities) != set(expected.endpoints)
        or (expected.endpoints and abs(total - 1) > 1e-4)
    ):
        out.append(f"trace: probabilities {expected.probabilities} do not cover the endpoints")
    lab = [c for c in obs.connections if c.problem]
    if lab:
        out.append(f"lab: {len(lab)} connection(s) the lab could not read: {lab[0].problem}")
    if obs.verdicts != {expected.verdict}:
        out.append(f"verdict: predicted {expected.verdict}, observed {sorted(obs.verdicts)}")
    seen = set(obs.endpoints)
    if expected.verdict == "dnat":
        extra = seen - set(expected.endpoints)
        if extra:
            out.append(f"endpoints: observed {sorted(extra)}, not predicted")
        sticky = expected.affinity is not None and expected.affinity.sticky
        if sticky and len(seen) > 1:
            out.append(f"affinity: one client reached {sorted(seen)}, predicted sticky")
        missing = set(expected.endpoints) - seen
        if final and not sticky and missing:
            n = len(obs.connections)
            out.append(f"endpoints: predicted {sorted(missing)}, never reached in {n} connections")
    wrong = Counter(
        (c.endpoint, c.masqueraded)
        for c in obs.connections
        if c.masqueraded is not None and c.masqueraded != _masquerade(expected, c)
    )
    for (ep, masq), n in sorted(wrong.items(), key=str):
        where = f"to {ep}" if ep else "untouched"
        predicted = "not masqueraded" if masq else "masqueraded"
        observed = "masqueraded" if masq else "not masqueraded"
        out.append(f"masquerade: {n} connection(s) {where} {observed}, predicted {predicted}")
    return out


def _masquerade(expected: Trace, conn: Connection) -> bool:
    if conn.endpoint is None:
        return expected.masquerade
    return expected.masqueraded_to(conn.endpoint)


def report(
    title: str, yaml_text: str, probe: Probe, expected: Trace, obs: Observation, problems: list[str]
) -> str:
    """Everything needed to replay a disagreement by hand."""
    return "\n".join(
        [
            f"=== {title}: {probe}",
            *(f"  ! {p}" for p in problems),
            "--- trace",
            json.dumps(expected.as_json(), indent=1),
            "--- observation",
            obs.describe(),
            "--- cluster",
            yaml_text,
        ]
    )
