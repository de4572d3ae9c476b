"""nft set and map declarations, spelled as nft text and as libnftables JSON side by side.

One declaration per named set holds its type, flags, size, timeout and comment; the
template prints its head and json_form.py its listing, so neither copies the other's
literals. Elements are prepared by the layout and spelled by each form.
"""

from __future__ import annotations

from typing import NamedTuple

from svcrules.render.nftables.rules import Fam, Json, Obj

# nft lists set flags in this order, whatever order the script wrote them in.
FLAG_ORDER = ("constant", "interval", "timeout", "dynamic")
AFFINITY_SIZE = 1048576  # clients x endpoints pinned at once, per table
AFFINITY_TIMEOUT = 10800  # the set's default; each element carries its Service's own


class SetDecl(NamedTuple):
    name: str
    key: tuple[str, ...]  # key types as nft lists them ("integer" for a typeof numgen)
    comment: str
    data: str | None = None  # a map's data type as nft lists it; None for a set
    typeof: str = ""  # the typeof expression the script writes, or "" to write the types
    flags: tuple[str, ...] = ()  # as the script writes them
    size: int | None = None
    timeout: int | None = None

    @property
    def kind(self) -> str:
        return "set" if self.data is None else "map"

    @property
    def interval(self) -> bool:
        """Elements are ranges: nft lists a CIDR as a prefix, a host as an address."""
        return "interval" in self.flags

    @property
    def head(self) -> str:
        """The declaration's lines before any elements, joined with their indent."""
        if self.typeof:
            lines = [f"typeof {self.typeof}"]
        else:
            data = f" : {self.data}" if self.data is not None else ""
            lines = [f"type {' . '.join(self.key)}{data}"]
        if self.size is not None:
            lines.append(f"size {self.size}")
        if self.flags:
            lines.append(f"flags {','.join(self.flags)}")
        if self.timeout is not None:
            lines.append(f"timeout {self.timeout}s")
        lines.append(f'comment "{self.comment}"')
        return "\n\t\t".join(lines)

    def json(self, f: Fam, table: str, elems: list[Json]) -> Obj:
        """The set or map as ``nft -j list`` prints it, keys in its order."""
        key: Json = self.key[0] if len(self.key) == 1 else list(self.key)
        body: Obj = {"family": f.name, "name": self.name, "table": table, "type": key}
        body["comment"] = self.comment
        if self.data is not None:
            body["map"] = self.data
        if self.size is not None:
            body["size"] = self.size
        if self.flags:
            body["flags"] = [flag for flag in FLAG_ORDER if flag in self.flags]
        if self.timeout is not None:
            body["timeout"] = self.timeout
        if elems:
            body["elem"] = elems
        return {self.kind: body}


def fixed_sets(f: Fam) -> dict[str, SetDecl]:
    """Every table's sets and maps but the per-bucket ones."""
    a = f.addr_type
    frontend = (a, "inet_proto", "inet_service")
    interval = ("interval",)
    decls = [
        SetDecl("state", ("mark",), "what svcrules last wrote: a fingerprint of this table"),
        SetDecl("pod-cidrs", (a,), "clusterCIDRs: pod sources", flags=interval),
        SetDecl(
            "service-cidrs",
            (a,),
            "serviceCIDRs: unallocated addresses here are dropped",
            flags=interval,
        ),
        SetDecl("nodeport-ips", (a,), "addresses that serve NodePorts", flags=interval),
        SetDecl(
            "foreign-cluster-ips", (a,), "ClusterIPs of Services another proxy handles: left alone"
        ),
        SetDecl("cluster-ips", (a,), "ClusterIPs: ports no Service defines are rejected"),
        SetDecl(
            "service-ips", frontend, "ClusterIP, LoadBalancer and external IP frontends", "verdict"
        ),
        SetDecl("service-nodeports", frontend[1:], "NodePort frontends", "verdict"),
        SetDecl("firewall-ips", frontend, "LoadBalancer frontends with loadBalancerSourceRanges"),
        SetDecl(
            "firewall-allow", (*frontend, a), "frontend . allowed source range", flags=interval
        ),
        SetDecl("hairpin", (a, a), "endpoint . itself: a pod reaching itself is masqueraded"),
        SetDecl(
            "affinity",
            (a, "integer"),
            "client . Service-endpoint id, for ClientIP affinity",
            typeof=f"{f.name} saddr . numgen inc mod 1",
            flags=("dynamic", "timeout"),
            size=AFFINITY_SIZE,
            timeout=AFFINITY_TIMEOUT,
        ),
    ]
    return {d.name: d for d in decls}


def backends_map(f: Fam, name: str, protocol: str, maglev: bool = False) -> SetDecl:
    """A bucket of endpoint slots: slot -> address . port."""
    return SetDecl(
        name,
        ("integer",),
        "Maglev slot : endpoint address . port" if maglev else "slot : endpoint address . port",
        f"{f.addr_type} . inet_service",
        f"numgen random mod 1 : {f.name} daddr . {protocol} dport",
    )


def affinity_map(name: str, maglev: bool = False) -> SetDecl:
    """A bucket of endpoint slots of Services with ClientIP affinity: slot -> chain."""
    what = "Maglev slot" if maglev else "slot"
    return SetDecl(
        name,
        ("integer",),
        f"{what} : endpoint chain, for Services with ClientIP affinity",
        "verdict",
        "numgen random mod 1 : verdict",
    )
