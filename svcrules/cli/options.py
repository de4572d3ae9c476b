"""Options shared by several commands, declared once.

``@node_options`` adds the NodeConfig override flags (``--node-name``,
``--node-ip``, ...) to a command and hands it one ``overrides: Overrides`` instead,
so every command that compiles accepts exactly the same flags.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import typer

from svcrules.inputs.overrides import Overrides

Paths = Annotated[
    list[str] | None,
    typer.Argument(
        help="Files, directories or '-' (stdin) holding the objects.", show_default=False
    ),
]
ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="File holding the NodeConfig.")
]


class BackendChoice(StrEnum):
    nftables = "nftables"
    iptables = "iptables"


BackendOpt = Annotated[
    BackendChoice,
    typer.Option(
        "--backend",
        "-b",
        help="Rule backend: nftables (owned tables ip/ip6 NAME) or iptables "
        "(owned chains NAME-* in the nat and filter tables, iptables-restore input).",
    ),
]
TableName = Annotated[
    str | None, typer.Option("--table-name", help="Override spec.tableName (owned tables).")
]

# name, type, option declaration, help: the flags that override NodeConfig fields.
_NODE_FLAGS: list[tuple[str, Any, tuple[str, ...], str]] = [
    ("node_name", str | None, ("--node-name",), "Override metadata.name of the NodeConfig."),
    ("node_ip", list[str] | None, ("--node-ip",), "Override spec.nodeIPs (repeat for dual stack)."),
    (
        "cluster_cidr",
        list[str] | None,
        ("--cluster-cidr",),
        "Override spec.clusterCIDRs (pod sources; repeatable).",
    ),
    (
        "service_cidr",
        list[str] | None,
        ("--service-cidr",),
        "Override spec.serviceCIDRs (repeatable).",
    ),
    (
        "nodeport_address",
        list[str] | None,
        ("--nodeport-address",),
        "Override spec.nodePortAddresses: 'primary' or CIDRs; 0.0.0.0/0 = all local.",
    ),
    (
        "masquerade_all",
        bool | None,
        ("--masquerade-all/--no-masquerade-all",),
        "Override spec.masqueradeAll.",
    ),
    ("zone", str | None, ("--zone",), "Override spec.zone (topology hints)."),
    ("table_name", str | None, ("--table-name",), "Override spec.tableName (owned tables)."),
]

_METAVARS = {
    "node_name": "NAME",
    "node_ip": "IP",
    "cluster_cidr": "CIDR",
    "service_cidr": "CIDR",
    "nodeport_address": "CIDR|primary",
    "zone": "ZONE",
    "table_name": "NAME",
}
F = TypeVar("F", bound=Callable[..., Any])
NO_OVERRIDES = Overrides()  # the signature's default; @node_options always passes one


def node_options(fn: F) -> F:
    """Replace the command's ``overrides`` parameter by the override flags."""
    sig = inspect.signature(fn, eval_str=True)  # typer reads __signature__ as it is
    params = [p for p in sig.parameters.values() if p.name != "overrides"]
    for name, typ, decls, help_ in _NODE_FLAGS:
        metavar = _METAVARS.get(name)
        option = typer.Option(*decls, help=help_, metavar=metavar)
        annotation = Annotated[typ, option]  # type: ignore[valid-type]
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
            )
        )

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flags = {name: kwargs.pop(name, None) for name, *_ in _NODE_FLAGS}
        overrides = Overrides(
            node_name=flags["node_name"],
            node_ips=flags["node_ip"] or [],
            cluster_cidrs=flags["cluster_cidr"] or [],
            service_cidrs=flags["service_cidr"] or [],
            node_port_addresses=flags["nodeport_address"] or [],
            masquerade_all=flags["masquerade_all"],
            zone=flags["zone"],
            table_name=flags["table_name"],
        )
        return fn(*args, overrides=overrides, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
