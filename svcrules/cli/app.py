"""The ``svcrules`` Typer application, before any command is registered.

``commands.py`` (compile, explain, check) and ``kernel_commands.py`` (diff, apply,
sync, cleanup) add their commands to it; ``svcrules.cli`` imports both. Every
command gets svcrules' plain help (``help.py``), ``-h`` as well as ``--help``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from svcrules.cli.help import Command, Group


class App(typer.Typer):
    """A Typer whose commands print plain help (svcrules.cli.help) by default."""

    def command(  # type: ignore[override]
        self,
        name: str | None = None,
        *,
        cls: type[typer.core.TyperCommand] | None = None,
        **kw: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return super().command(name, cls=cls or Command, **kw)


app = App(
    name="svcrules",
    help=(
        "Compile Kubernetes Services and EndpointSlices into nftables rules "
        "(or iptables rules: -o iptables, or --backend iptables).\n\n"
        "Inputs are YAML or JSON files, directories (searched recursively for *.yaml, "
        "*.yml, *.json) or '-' for stdin, given as arguments or with -f as in kubectl; "
        "'kubectl get services,endpointslices -A -o yaml' output works as it is. The "
        "node is described by a NodeConfig (--config, a document among the inputs, or "
        "--node-name and --node-ip).\n\n"
        "Examples:\n\n"
        "  svcrules compile fixtures/demo/ | nft -f -\n"
        "  svcrules compile -o iptables fixtures/demo/\n"
        "  set -o pipefail\n"
        "  kubectl get services,endpointslices -A -o json |\n"
        "    svcrules sync --config node.yaml -f -\n\n"
        "On a node, an empty input or a large removal is refused, and rules svcrules did "
        "not create are never touched: see docs/operations.md. 'svcrules COMMAND -h' "
        "describes a command."
    ),
    cls=Group,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("svcrules")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from svcrules import __version__ as number
        sys.stdout.write(f"svcrules {number}\n")
        raise typer.Exit()


@app.callback()
def _root(
    _version_flag: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_version,
            help="Print svcrules' version and exit.",
        ),
    ] = False,
) -> None:
    pass
