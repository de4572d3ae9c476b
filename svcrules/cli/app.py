"""The ``svcrules`` Typer application, before any command is registered.

``commands.py`` (compile, explain, check) and ``kernel_commands.py`` (diff, apply,
sync, cleanup) add their commands to it; ``svcrules.cli`` imports both.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="svcrules",
    help=(
        "Compile Kubernetes Services and EndpointSlices into nftables rules "
        "(or iptables rules, with --backend iptables).\n\n"
        "Inputs are YAML or JSON files, directories (searched for *.yaml, *.yml, *.json) "
        "or '-' for stdin; 'kubectl get services,endpointslices -A -o yaml' output works "
        "as it is. The node is described by a NodeConfig (--config, a document among the "
        "inputs, or --node-name/--node-ip).\n\n"
        "Examples:\n\n"
        "  svcrules compile fixtures/demo/ | nft -f -\n\n"
        "  svcrules compile --backend iptables fixtures/demo/\n\n"
        "  set -o pipefail; kubectl get services,endpointslices -A -o json |\n"
        "  svcrules sync -c node.yaml -\n\n"
        "On a node, an empty input or a large removal is refused, and rules svcrules did "
        "not create are never touched: see docs/operations.md."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
