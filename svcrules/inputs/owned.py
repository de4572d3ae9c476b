"""What svcrules may call its own: the table names it refuses, and its ownership marks.

svcrules replaces and deletes only what it can prove it made. The proof is a mark it
writes itself: in an nftables table, a set ``state`` whose element comment starts with
``svcrules `` (or a table comment starting with ``svcrules:``); for the iptables
backend, a chain ``<P>-STATE`` whose rule carries the same ``svcrules `` comment. An
existing table or chain prefix without that mark belongs to someone else and is never
touched.

Names other programs use are refused outright, on both backends, from the one list
below: nftables tables of that name (``ip nat`` is iptables-nft's) and iptables chains
with that prefix (``KUBE-…`` are kube-proxy's) are theirs.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from svcrules.errors import SvcrulesError

# Case-insensitive shell patterns. A table name matching one is refused.
RESERVED: tuple[str, ...] = (
    # Tables of iptables-nft, ip6tables-nft, ebtables-nft and arptables-nft.
    "nat",
    "filter",
    "mangle",
    "raw",
    "security",
    "broute",
    # Built-in chain names (an iptables prefix FORWARD-… reads as the chain's own).
    "prerouting",
    "input",
    "forward",
    "output",
    "postrouting",
    # Other programs' tables (nftables) and chain prefixes (iptables).
    "kube",
    "kube[-_]*",  # kube-proxy, kube-router, KUBE-SVC-…
    "kubernetes*",
    "firewalld*",
    "docker*",  # DOCKER-…, docker-bridges
    "cali",
    "cali[-_]*",  # Calico's iptables chains
    "calico*",
    "cilium*",
    "flannel*",
    "weave*",
    "istio*",
    "libvirt*",
    "netavark*",  # podman
    "cni[-_]*",  # CNI plugins' CNI-…
    "antrea*",
    "tailscale*",
    "ts-*",  # tailscale's iptables chains
    "fw4",  # OpenWrt
    "incus",
    "lxd",
)

# The comment on the state set's element and on the <P>-STATE rule: "svcrules <digest>".
MARK = "svcrules "
TABLE_COMMENT = "svcrules:"  # nftables table comments


def reserved(name: str) -> str | None:
    """The pattern of RESERVED that ``name`` matches, or None."""
    low = name.lower()
    return next((p for p in RESERVED if fnmatchcase(low, p)), None)


def reserved_message(name: str) -> str | None:
    """Why ``name`` cannot be an owned table name, or None when it can."""
    pattern = reserved(name)
    if pattern is None:
        return None
    what = "the name" if pattern == name.lower() else f"names matching {pattern!r}"
    return (
        f"{name!r} may be another program's: {what} are used by other software "
        "(nftables tables, iptables chain prefixes); choose another name"
    )


def check_name(name: str) -> None:
    """Refuse a reserved name given outside a NodeConfig (``cleanup --table-name``)."""
    why = reserved_message(name)
    if why:
        raise SvcrulesError(f"NodeConfig spec.tableName (or --table-name): {why}")


def not_ours(what: str, how: str) -> SvcrulesError:
    """The refusal when an object of an owned name exists without svcrules' mark."""
    return SvcrulesError(
        f"{what} exists and was not created by svcrules ({how}); it is left alone: "
        "choose another spec.tableName / --table-name"
    )
