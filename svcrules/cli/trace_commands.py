"""``svcrules trace``: what happens to one packet, from the compiled rules (no root).

The rules are compiled as ``compile`` would, then read back by the interpreter of
``svcrules.trace``: the answer comes from the text a backend loads, not from the
plan it was made from.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer

from svcrules.cli.app import app
from svcrules.cli.commands import _compile, _fail, node_ips
from svcrules.cli.kernel_commands import IptablesChoice, IptablesOpt
from svcrules.cli.options import (
    NO_OVERRIDES,
    BackendChoice,
    BackendOpt,
    ConfigOpt,
    Formats,
    Paths,
    node_options,
    output_option,
    usage,
    verbosity,
)
from svcrules.errors import SvcrulesError
from svcrules.inputs.overrides import Overrides

if TYPE_CHECKING:
    from svcrules.trace import Packet, Trace


TRACE_FORMATS = Formats(("text", "json"))


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


KernelOpt = Annotated[
    bool,
    typer.Option(
        "--kernel",
        help="Ask the live kernel instead (root): a temporary trace rule, the kernel's "
        "own trace events and its conntrack entry, all removed afterwards. With "
        "--from-node svcrules sends the packet itself; otherwise it waits --timeout "
        "seconds for it to arrive (send it from the client). With PATHS, the prediction "
        "is printed too, and the exit code is 1 when the two disagree.",
    ),
]


@app.command("trace", short_help="Show what the rules do with one packet, and why (no root).")
@verbosity
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
    port: Annotated[
        int | None,
        typer.Option("--port", min=1, max=65535, metavar="PORT", help="Destination port."),
    ] = None,
    proto: Annotated[Proto, typer.Option("--proto", help="Transport protocol.")] = Proto.tcp,
    sport: Annotated[
        int | None,
        typer.Option(
            "--sport",
            min=1,
            max=65535,
            metavar="PORT",
            help="Source port. Known, the slot a Maglev hash (jhash) gives the packet is "
            "computed as the kernel does, instead of every slot being taken as equally "
            "likely. With --kernel and --from-node, the packet is sent from it.",
        ),
    ] = None,
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
        str, output_option(TRACE_FORMATS, "text for people, json for scripts.")
    ] = "text",
    kernel: KernelOpt = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=0.1,
            metavar="SECONDS",
            help="--kernel: how long to wait for the packet.",
        ),
    ] = 10.0,
    iptables: IptablesOpt = IptablesChoice.auto,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Show what the compiled rules do with one packet: the verdict (dnat to which
    endpoints and how likely each, reject, drop, or untouched), whether it is
    masqueraded and by which rule, and every rule it matches on its way. Needs no
    root and no kernel: the backend's text is interpreted as the kernel would run it.

    Examples:

      svcrules trace fixtures/demo --src 198.51.100.12 \\
          --dst 203.0.113.10 --port 80
      svcrules trace fixtures/demo --from-node --dst 192.0.2.1 \\
          --port 30080 -o json
      svcrules trace fixtures/balancing --src 192.0.2.100 \\
          --dst 198.18.0.40 --port 443 --sport 40000   # a Maglev pick, exactly
      svcrules trace --kernel --src 192.0.2.100 \\
          --dst 203.0.113.10 --port 80          # as root, on the node
    """
    fmt = TRACE_FORMATS.parse(output)
    if not dst or port is None:
        usage("--dst and --port are required")
    from svcrules.trace import Packet, trace
    from svcrules.trace.model import local_addresses

    if kernel and not paths:
        if src is None:
            usage("--src is required (with --kernel and no inputs to take the nodeIP from)")
        table = overrides.table_name or "svcrules"
        packet = Packet(src, dst, port, proto.value, from_node, tuple(node_address or []), sport)
        _show(_kernel(packet, backend, table, timeout, iptables), None, fmt)
        return
    ruleset = _compile(paths, config, overrides, backend)
    ips = node_ips(ruleset)
    if src is None:
        same = [ip for ip in ips if (":" in ip) == (":" in dst)]
        if not from_node or not same:
            usage("--src is required (without --from-node)")
        src = same[0]
    local = local_addresses(ips, node_address or [])
    packet = Packet(src, dst, port, proto.value, from_node, local, sport)
    try:
        predicted = trace(ruleset.text(backend.value), backend.value, packet)
    except SvcrulesError as exc:
        _fail(exc)
    if not kernel:
        _show(predicted, None, fmt)
        return
    seen = _kernel(packet, backend, ruleset.plan.table, timeout, iptables)
    if not _show(seen, predicted, fmt):
        raise typer.Exit(1)


def _kernel(
    packet: Packet, backend: BackendChoice, table: str, timeout: float, iptables: IptablesChoice
) -> Trace:
    from svcrules.kernel.trace import trace_kernel

    try:
        return trace_kernel(
            packet, backend.value, table=table, timeout=timeout, iptables_variant=iptables.value
        )
    except SvcrulesError as exc:
        _fail(exc)


def agrees(seen: Trace, predicted: Trace) -> bool:
    """Whether what the kernel did is one of the things the rules predict."""
    if seen.verdict != predicted.verdict:
        return False
    if seen.verdict != "dnat":
        return True
    return all(
        ep in predicted.endpoints and seen.masqueraded_to(ep) == predicted.masqueraded_to(ep)
        for ep in seen.endpoints
    )


def _show(seen: Trace, predicted: Trace | None, fmt: str) -> bool:
    """Print one answer, or the kernel's beside the prediction; whether they agree."""
    ok = predicted is None or agrees(seen, predicted)
    if fmt == "json":
        doc: dict[str, object] = seen.as_json()
        if predicted is not None:
            doc = {"kernel": doc, "predicted": predicted.as_json(), "agree": ok}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return ok
    from svcrules.trace.report import text

    if predicted is None:
        sys.stdout.write(text(seen))
        return ok
    sys.stdout.write("predicted from the rules:\n" + text(predicted) + "\n")
    sys.stdout.write("seen in the kernel:\n" + text(seen) + "\n")
    word = "yes" if ok else "NO: the kernel did something the rules do not predict"
    sys.stdout.write(f"agree: {word}\n")
    return ok
