"""The ``svcrules`` command: a thin shell over the library.

Exit codes: 0 success, 1 a difference (``check``), 2 bad input or usage.
Errors go to stderr, one line per problem; stdout only ever holds results.
"""

from __future__ import annotations

import gc
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from svcrules.compiler import Ruleset, compile_paths
from svcrules.config import Overrides
from svcrules.errors import SvcrulesError

app = typer.Typer(
    name="svcrules",
    help=(
        "Compile Kubernetes Services and EndpointSlices into nftables rules.\n\n"
        "Inputs are YAML or JSON files, directories (searched for *.yaml, *.yml, *.json) "
        "or '-' for stdin; 'kubectl get services,endpointslices -A -o yaml' output works "
        "as it is. The node is described by a NodeConfig (--config, a document among the "
        "inputs, or --node-name/--node-ip).\n\n"
        "Example: svcrules compile fixtures/demo/ | nft -f -"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Format(StrEnum):
    nft = "nft"
    json = "json"


Paths = Annotated[
    list[str] | None,
    typer.Argument(
        help="Files, directories or '-' (stdin) holding the objects.", show_default=False
    ),
]
ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="File holding the NodeConfig.")
]
NodeName = Annotated[
    str | None, typer.Option("--node-name", help="Override metadata.name of the NodeConfig.")
]
NodeIP = Annotated[
    list[str] | None,
    typer.Option("--node-ip", help="Override spec.nodeIPs (repeat for dual stack)."),
]
ClusterCIDR = Annotated[
    list[str] | None,
    typer.Option("--cluster-cidr", help="Override spec.clusterCIDRs (pod sources; repeatable)."),
]
ServiceCIDR = Annotated[
    list[str] | None,
    typer.Option("--service-cidr", help="Override spec.serviceCIDRs (repeatable)."),
]
NodePortAddr = Annotated[
    list[str] | None,
    typer.Option(
        "--nodeport-address",
        help="Override spec.nodePortAddresses: 'primary' or CIDRs; 0.0.0.0/0 = all local.",
    ),
]
MasqAll = Annotated[
    bool | None,
    typer.Option("--masquerade-all/--no-masquerade-all", help="Override spec.masqueradeAll."),
]
Zone = Annotated[str | None, typer.Option("--zone", help="Override spec.zone (topology hints).")]
TableName = Annotated[
    str | None, typer.Option("--table-name", help="Override spec.tableName (owned tables).")
]


def _fail(exc: SvcrulesError) -> NoReturn:
    for line in str(exc).splitlines():
        print(f"svcrules: error: {line}", file=sys.stderr)
    raise typer.Exit(2)


def _compile(
    paths: list[str] | None,
    config: str | None,
    overrides: Overrides,
) -> Ruleset:
    if not paths:
        print("svcrules: error: no input given (a file, a directory or '-')", file=sys.stderr)
        raise typer.Exit(2)
    try:
        ruleset = compile_paths(paths, config, overrides)
        # Render inside the try: rendering problems are reported like input problems.
        _ = ruleset.nft
        return ruleset
    except SvcrulesError as exc:
        _fail(exc)


def _overrides(
    node_name: str | None,
    node_ip: list[str] | None,
    cluster_cidr: list[str] | None,
    service_cidr: list[str] | None,
    nodeport_address: list[str] | None,
    masquerade_all: bool | None,
    zone: str | None,
    table_name: str | None,
) -> Overrides:
    return Overrides(
        node_name=node_name,
        node_ips=node_ip or [],
        cluster_cidrs=cluster_cidr or [],
        service_cidrs=service_cidr or [],
        node_port_addresses=nodeport_address or [],
        masquerade_all=masquerade_all,
        zone=zone,
        table_name=table_name,
    )


def _write(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(output)


@app.command("compile")
def compile_cmd(
    paths: Paths = None,
    config: ConfigOpt = None,
    fmt: Annotated[
        Format, typer.Option("--format", "-f", help="nft script or libnftables JSON.")
    ] = Format.nft,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Print the explain table instead of rules.")
    ] = False,
    node_name: NodeName = None,
    node_ip: NodeIP = None,
    cluster_cidr: ClusterCIDR = None,
    service_cidr: ServiceCIDR = None,
    nodeport_address: NodePortAddr = None,
    masquerade_all: MasqAll = None,
    zone: Zone = None,
    table_name: TableName = None,
) -> None:
    """Print the ruleset. Loading it with 'nft -f' creates or replaces the owned
    tables (ip/ip6 svcrules) in one transaction and touches nothing else."""
    ov = _overrides(
        node_name,
        node_ip,
        cluster_cidr,
        service_cidr,
        nodeport_address,
        masquerade_all,
        zone,
        table_name,
    )
    ruleset = _compile(paths, config, ov)
    if explain:
        from svcrules.explain import explain_text

        _write(explain_text(ruleset.plan), output)
        return
    _write(ruleset.json if fmt is Format.json else ruleset.nft, output)


@app.command("explain")
def explain_cmd(
    paths: Paths = None,
    config: ConfigOpt = None,
    node_name: NodeName = None,
    node_ip: NodeIP = None,
    cluster_cidr: ClusterCIDR = None,
    service_cidr: ServiceCIDR = None,
    nodeport_address: NodePortAddr = None,
    masquerade_all: MasqAll = None,
    zone: Zone = None,
    table_name: TableName = None,
) -> None:
    """Show what each Service port became on this node: frontends, the endpoints
    chosen, masquerading, and why a frontend rejects or drops."""
    from svcrules.explain import explain_text

    ov = _overrides(
        node_name,
        node_ip,
        cluster_cidr,
        service_cidr,
        nodeport_address,
        masquerade_all,
        zone,
        table_name,
    )
    sys.stdout.write(explain_text(_compile(paths, config, ov).plan))


@app.command("check")
def check_cmd(
    golden: Annotated[
        Path, typer.Option("--golden", "-g", help="The reviewed ruleset file to compare with.")
    ],
    paths: Paths = None,
    config: ConfigOpt = None,
    update: Annotated[
        bool, typer.Option("--update", help="Rewrite the golden file instead of comparing.")
    ] = False,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Format of the golden file.")] = (
        Format.nft
    ),
    node_name: NodeName = None,
    node_ip: NodeIP = None,
    cluster_cidr: ClusterCIDR = None,
    service_cidr: ServiceCIDR = None,
    nodeport_address: NodePortAddr = None,
    masquerade_all: MasqAll = None,
    zone: Zone = None,
    table_name: TableName = None,
) -> None:
    """Compare the compiled ruleset with a golden file: exit 0 when equal, 1 with a
    unified diff when not. For CI pipelines that review generated rules."""
    from svcrules.golden import compare

    ov = _overrides(
        node_name,
        node_ip,
        cluster_cidr,
        service_cidr,
        nodeport_address,
        masquerade_all,
        zone,
        table_name,
    )
    ruleset = _compile(paths, config, ov)
    text = ruleset.json if fmt is Format.json else ruleset.nft
    if update:
        golden.parent.mkdir(parents=True, exist_ok=True)
        _write(text, golden)
        print(f"svcrules: wrote {golden}", file=sys.stderr)
        return
    if not golden.is_file():
        print(
            f"svcrules: error: {golden}: no such golden file (create it with --update)",
            file=sys.stderr,
        )
        raise typer.Exit(2)
    diff = compare(golden, text)
    if diff is None:
        return
    sys.stdout.write(diff)
    raise typer.Exit(1)


def main() -> None:
    # A command runs once and exits: leave memory to reference counting instead of
    # letting the cyclic collector rescan millions of live objects (see compiler.py).
    gc.disable()
    app()


# The commands that touch the kernel live in their own module; importing it registers them.
from svcrules import cli_kernel  # noqa: E402, F401
