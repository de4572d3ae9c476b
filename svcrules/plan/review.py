"""What changed for each Service port, for people and scripts: the change review that
``svcrules diff`` and ``apply`` print.

Each run keeps a compact summary of every Service port's plan (``summarize``) in the
state directory; the next run compares the saved summary with the new plan's
(``compare``): endpoints added and removed (and those that became local, terminating
or unused by cluster routes), frontends added and removed, and every policy decision
that differs (traffic routes, masquerade, the eTP Local short-circuit, source ranges,
session affinity, load balancing); an endpoint's weight is one of its qualities. Words
come from here, at the time of the review, so the saved summary holds codes, not
sentences.

A summary is a short JSON text (see ``summarize``); a missing one (a state written by
an earlier svcrules) gives a review without details.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from svcrules.inputs.model import DEFAULT_WEIGHT
from svcrules.plan.explain import MASQUERADE, hostport
from svcrules.plan.node import Algorithm, Masquerade, PortPlan, Route

# Flags of an endpoint in a summary: picked by cluster routes, by local routes (on
# this node), terminating, drained (weight 0: no new connections). A weight other than
# the default follows the flags after a "/".
CLUSTER, LOCAL, TERMINATING, DRAINED = "c", "l", "t", "d"

ROUTE = {
    Route.CLUSTER.value: "to cluster endpoints",
    Route.LOCAL.value: "to local endpoints",
    Route.REJECT.value: "REJECT (no usable endpoint)",
    Route.DROP.value: "DROP (no local endpoint)",
}
NO_EXTERNAL = "none (no external frontend)"


def frontends(p: PortPlan) -> list[str]:
    """Every frontend of the port, spelled as explain spells it."""
    out = [f"clusterIP {hostport(p.cluster_ip, p.port)}"]
    if p.node_port:
        out.append(f"nodePort {p.node_port}")
    out += [f"loadBalancer {hostport(ip, p.port)}" for ip in p.lb_ips]
    out += [f"externalIP {hostport(ip, p.port)}" for ip in p.external_ips]
    return out


def summarize(p: PortPlan) -> str:
    """The port's summary as the state keeps it: a JSON object with short keys, the
    defaults left out.

    ``f`` frontends; ``e`` endpoints, each ``ADDRESS:PORT FLAGS`` (flags: c cluster,
    l local, t terminating); ``i`` and ``x`` the internal and external route and
    masquerade (``x`` only with external frontends); ``s`` the eTP Local short-circuit
    for pods; ``w`` the source ranges when loadBalancerSourceRanges filter the LB IPs,
    ``ws`` when the LB IPs are allowed as sources too; ``a`` the ClientIP affinity
    timeout; ``b`` Maglev's seed and table size (random: left out)."""
    flags: dict[tuple[str, int], str] = {}
    terminating: dict[tuple[str, int], bool] = {}
    weight: dict[tuple[str, int], int] = {}
    drained = ((DRAINED, p.drained),)
    for which, backends in ((CLUSTER, p.cluster_backends), (LOCAL, p.local_backends), *drained):
        for b in backends:
            key = (b.ip, b.port)
            flags[key] = flags.get(key, "") + which
            terminating[key] = terminating.get(key, False) or b.terminating
            weight[key] = b.weight
    endpoints = [
        f"{hostport(ip, port)} {flags[(ip, port)]}{TERMINATING if terminating[(ip, port)] else ''}"
        + ("" if weight[(ip, port)] in (DEFAULT_WEIGHT, 0) else f"/{weight[(ip, port)]}")
        for ip, port in flags
    ]
    out: dict[str, Any] = {
        "f": frontends(p),
        "e": endpoints,
        "i": f"{p.internal_route.value} {p.internal_masquerade.value}",
    }
    if p.has_external:
        out["x"] = f"{p.external_route.value} {p.external_masquerade.value}"
    if p.pod_shortcut:
        out["s"] = 1
    if p.firewall:
        out["w"] = list(p.source_ranges)
        if p.allow_lb_self:
            out["ws"] = 1
    if p.affinity_timeout is not None:
        out["a"] = p.affinity_timeout
    lb = p.balancing
    if lb.algorithm is Algorithm.MAGLEV:
        out["b"] = [lb.seed, len(lb.cluster_slots or lb.local_slots)]
    return json.dumps(out, separators=(",", ":"))


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of a Service port, and how this node uses it."""

    endpoint: str  # address:port ([address]:port for IPv6)
    cluster: bool  # picked by cluster routes
    local: bool  # on this node, picked by local routes
    terminating: bool
    weight: int = DEFAULT_WEIGHT  # 0: drained

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        where, _, flags = text.rpartition(" ")
        flags, _, weight = flags.partition("/")
        if DRAINED in flags:
            return cls(where, False, False, TERMINATING in flags, 0)
        w = int(weight) if weight.isdigit() else DEFAULT_WEIGHT
        return cls(where, CLUSTER in flags, LOCAL in flags, TERMINATING in flags, w)

    @property
    def qualities(self) -> str:
        """How it is used, in words ("" for a ready cluster endpoint elsewhere)."""
        if not self.weight:
            return "drained: weight 0, no new connections"
        words = []
        if self.local:
            words.append("local")
        if not self.cluster:
            words.append("local routes only")
        if self.terminating:
            words.append("terminating")
        if self.weight != DEFAULT_WEIGHT:
            words.append(f"weight {self.weight}")
        return ", ".join(words)

    def json(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "cluster": self.cluster,
            "local": self.local,
            "terminating": self.terminating,
            "weight": self.weight,
        }


@dataclass(frozen=True)
class Summary:
    """A summary read back (see ``summarize``)."""

    frontends: tuple[str, ...]
    endpoints: dict[str, Endpoint]  # by address:port
    policies: dict[str, str]  # policy name -> its value in words

    @classmethod
    def parse(cls, text: str) -> Summary:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("a Service port summary is not an object")
        eps = [Endpoint.parse(str(e)) for e in raw.get("e", [])]
        return cls(
            tuple(str(f) for f in raw.get("f", [])),
            {e.endpoint: e for e in eps},
            _policies(raw),
        )


def _route_words(code: str) -> tuple[str, str]:
    """A saved ``ROUTE MASQUERADE`` pair, in words (codes this svcrules does not know
    as they are)."""
    route, _, masq = code.partition(" ")
    return ROUTE.get(route, route), MASQUERADE.get(masq, masq)


def _policies(raw: dict[str, Any]) -> dict[str, str]:
    """Every policy decision of a summary, named and in words, in a fixed order."""
    internal, internal_masq = _route_words(str(raw.get("i", "")))
    out = {"clusterIP traffic": internal, "clusterIP masquerade": internal_masq}
    if "x" in raw:
        external, external_masq = _route_words(str(raw["x"]))
        shortcut = "none"
        if str(raw["x"]).endswith(Masquerade.NODE_ONLY.value):
            shortcut = "pods and the node go" if raw.get("s") else "the node goes"
            shortcut += " to cluster endpoints"
    else:
        external = external_masq = shortcut = NO_EXTERNAL
    out.update(
        {
            "external traffic": external,
            "external masquerade": external_masq,
            "eTP Local short-circuit": shortcut,
        }
    )
    ranges = raw.get("w")
    if ranges is None:
        out["source ranges"] = "none (LB IPs take every source)"
    else:
        allowed = ", ".join(str(r) for r in ranges) or "nothing in this family"
        if raw.get("ws"):
            allowed += " (+ every LB IP of the Service)"
        out["source ranges"] = allowed
    timeout = raw.get("a")
    out["session affinity"] = "none" if timeout is None else f"ClientIP, {timeout}s"
    maglev = raw.get("b")
    out["load balancing"] = "random"
    if isinstance(maglev, list) and len(maglev) == 2:
        out["load balancing"] = f"maglev, seed 0x{int(maglev[0]):x}, {maglev[1]} slots"
    return out


@dataclass(frozen=True)
class Policy:
    """One decision that differs."""

    policy: str
    old: str
    new: str


@dataclass
class PortChange:
    """What changed for one Service port in one family."""

    port: str  # namespace/name:port/PROTOCOL
    family: int
    change: str  # added, removed or changed
    detailed: bool = True  # False: a summary was missing (an older state)
    frontends_added: list[str] = field(default_factory=list)
    frontends_removed: list[str] = field(default_factory=list)
    endpoints_added: list[Endpoint] = field(default_factory=list)
    endpoints_removed: list[Endpoint] = field(default_factory=list)
    endpoints_changed: list[tuple[Endpoint, Endpoint]] = field(default_factory=list)
    policies: list[Policy] = field(default_factory=list)

    @property
    def service(self) -> str:
        return self.port.split(":", 1)[0]

    @property
    def family_name(self) -> str:
        return f"IPv{self.family}"

    def lines(self, limit: int = 20) -> list[str]:
        """The change in words, one line each, without its heading; at most ``limit``
        endpoint lines of each kind (the JSON form lists them all)."""
        if not self.detailed:
            return ["(no details: the saved state was written by an earlier svcrules)"]
        out = [f"frontend {f} removed" for f in self.frontends_removed]
        out += [f"frontend {f} added" for f in self.frontends_added]
        for verb, eps in (("removed", self.endpoints_removed), ("added", self.endpoints_added)):
            for e in eps[:limit]:
                how = f" ({e.qualities})" if e.qualities and verb == "added" else ""
                out.append(f"endpoint {e.endpoint} {verb}{how}")
            if len(eps) > limit:
                out.append(f"... and {len(eps) - limit} more endpoints {verb}")
        for old, new in self.endpoints_changed[:limit]:
            out.append(
                f"endpoint {new.endpoint}: {old.qualities or 'cluster'} -> "
                f"{new.qualities or 'cluster'}"
            )
        if len(self.endpoints_changed) > limit:
            out.append(f"... and {len(self.endpoints_changed) - limit} more endpoints changed")
        out += [f"{p.policy}: {p.old} -> {p.new}" for p in self.policies]
        return out

    def json(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "service": self.service,
            "family": self.family_name,
            "change": self.change,
            "detailed": self.detailed,
            "frontends": {
                "added": [_frontend_json(f) for f in self.frontends_added],
                "removed": [_frontend_json(f) for f in self.frontends_removed],
            },
            "endpoints": {
                "added": [e.json() for e in self.endpoints_added],
                "removed": [e.json() for e in self.endpoints_removed],
                "changed": [
                    {"endpoint": new.endpoint, "old": old.json(), "new": new.json()}
                    for old, new in self.endpoints_changed
                ],
            },
            "policies": [{"policy": p.policy, "old": p.old, "new": p.new} for p in self.policies],
        }


def _frontend_json(text: str) -> dict[str, Any]:
    """``clusterIP 203.0.113.10:80`` as {"type", "address", "port"} (a NodePort has no
    address)."""
    kind, _, where = text.partition(" ")
    if kind == "nodePort":
        return {"type": kind, "address": None, "port": int(where)}
    address, _, port = where.rpartition(":")
    return {"type": kind, "address": address.strip("[]"), "port": int(port)}


def compare(
    port: str,
    family: int,
    old: Summary | None,
    new: Summary | None,
    change: str = "",
) -> PortChange:
    """The change from ``old`` to ``new`` (None: the port did not exist, or does not any
    more). ``change`` (added, removed, changed) when it is known otherwise: a summary
    that should exist and is missing (an older state) gives a change without details."""
    change = change or ("added" if old is None else "removed" if new is None else "changed")
    missing = (old is None and change != "added") or (new is None and change != "removed")
    out = PortChange(port, family, change, not missing)
    if missing:
        return out
    before = old or Summary((), {}, {})
    after = new or Summary((), {}, {})
    out.frontends_added = [f for f in after.frontends if f not in before.frontends]
    out.frontends_removed = [f for f in before.frontends if f not in after.frontends]
    out.endpoints_added = [e for k, e in after.endpoints.items() if k not in before.endpoints]
    out.endpoints_removed = [e for k, e in before.endpoints.items() if k not in after.endpoints]
    out.endpoints_changed = [
        (before.endpoints[k], e)
        for k, e in after.endpoints.items()
        if k in before.endpoints and before.endpoints[k] != e
    ]
    if old is not None and new is not None:
        out.policies = [
            Policy(name, before.policies.get(name, ""), value)
            for name, value in after.policies.items()
            if before.policies.get(name) != value
        ]
    return out
