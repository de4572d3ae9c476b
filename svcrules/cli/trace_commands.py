"""``svcrules trace``: what happens to one packet, from the compiled rules (no root).

The rules are compiled as ``compile`` would, then read back by the interpreter of
``svcrules.trace``: the answer comes from the text a backend loads, not from the
plan it was made from.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import Annotated

import typer

from svcrules.cli.app import app
from svcrules.cli.commands import _compile, _fail, node_ips
from svcrules.cli.options import (
    NO_OVERRIDES,
    BackendChoice,
    BackendOpt,
    ConfigOpt,
    Paths,
    node_options,
)
from svcrules.errors import SvcrulesError
from svcrules.inputs.overrides import Overrides


class TraceFormat(StrEnum):
    text = "text"
    json = "json"


class Proto(StrEnum):
    tcp = "tcp"
    udp = "udp"
    sctp = "sctp"


NodeAddressOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--node-address",
        metavar="IP",
        help="Another address of the node (repeatable). The rules ask the kernel whether "
        "an address is the node's own (fib ... type local, addrtype LOCAL); trace takes "
        "the node's own addresses to be its nodeIPs plus these.",
    ),
]


@app.command("trace")
@node_options
def trace_cmd(
    paths: Paths = None,
    src: Annotated[
        str | None,
        typer.Option(
            "--src",
            metavar="IP",
            help="Source address. With --from-node it defaults to the nodeIP of the "
            "destination's family.",
        ),
    ] = None,
    dst: Annotated[str, typer.Option("--dst", metavar="IP", help="Destination address.")] = "",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Destination port.")] = 0,
    proto: Annotated[Proto, typer.Option("--proto", help="Transport protocol.")] = Proto.tcp,
    from_node: Annotated[
        bool,
        typer.Option(
            "--from-node",
            help="The node's own stack sends the packet (output hook), instead of the "
            "packet arriving on one of its interfaces from --src.",
        ),
    ] = False,
    node_address: NodeAddressOpt = None,
    config: ConfigOpt = None,
    backend: BackendOpt = BackendChoice.nftables,
    output: Annotated[
        TraceFormat,
        typer.Option("--output", "-o", help="text for people, json for scripts."),
    ] = TraceFormat.text,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Show what the compiled rules do with one packet: the verdict (dnat to which
    endpoints and how likely each, reject, drop, or untouched), whether it is
    masqueraded and by which rule, and every rule it matches on its way. Needs no
    root and no kernel: the backend's text is interpreted as the kernel would run it.

    Examples:

      svcrules trace fixtures/demo --src 198.51.100.12 --dst 203.0.113.10 --port 80

      svcrules trace fixtures/demo --from-node --dst 192.0.2.1 --port 30080 -o json
    """
    if not dst or not port:
        print("svcrules: error: --dst and --port are required", file=sys.stderr)
        raise typer.Exit(2)
    from svcrules.trace import Packet, trace
    from svcrules.trace.model import local_addresses

    ruleset = _compile(paths, config, overrides, backend)
    ips = node_ips(ruleset)
    if src is None:
        family = 6 if ":" in dst else 4
        same = [ip for ip in ips if (":" in ip) == (family == 6)]
        if not from_node or not same:
            print("svcrules: error: --src is required (without --from-node)", file=sys.stderr)
            raise typer.Exit(2)
        src = same[0]
    local = local_addresses(ips, node_address or [])
    packet = Packet(src, dst, port, proto.value, from_node, local)
    try:
        result = trace(ruleset.text(backend.value), backend.value, packet)
    except SvcrulesError as exc:
        _fail(exc)
    if output is TraceFormat.json:
        sys.stdout.write(json.dumps(result.as_json(), indent=2) + "\n")
    else:
        from svcrules.trace.report import text

        sys.stdout.write(text(result))
