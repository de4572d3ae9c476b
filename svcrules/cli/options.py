"""Options shared by several commands, declared once.

``@node_options`` adds ``-f/--filename`` and the NodeConfig override flags
(``--node-name``, ``--node-ip``, ...) to a command and hands it one ``overrides:
Overrides`` instead, so every command that compiles accepts exactly the same
flags. ``@verbosity`` adds ``-v`` and the progress display to every command.
``-o/--output`` is the output format everywhere (``Formats``), as in kubectl.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from svcrules.inputs.overrides import Overrides

Paths = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="PATHS",
        help="Files, directories (searched recursively) or '-' (stdin) holding the objects.",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", metavar="FILE", help="File holding the NodeConfig."),
]


class BackendChoice(StrEnum):
    nftables = "nftables"
    iptables = "iptables"


_BACKEND_HELP = (
    "Rule backend: nftables (owned tables ip/ip6 NAME) or iptables (owned chains "
    "NAME-* in the nat and filter tables, iptables-restore input)."
)
BackendOpt = Annotated[BackendChoice, typer.Option("--backend", "-b", help=_BACKEND_HELP)]
# compile and check: -o iptables implies the iptables backend (svcrules.cli.commands).
OutputBackendOpt = Annotated[
    BackendChoice | None,
    typer.Option(
        "--backend",
        "-b",
        help=_BACKEND_HELP + " Default: the one -o names, else nftables.",
    ),
]
TableName = Annotated[
    str | None,
    typer.Option("--table-name", metavar="NAME", help="Override spec.tableName (owned tables)."),
]
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Say more on stderr: each long phase with what it did and how long it took.",
    ),
]


@dataclass(frozen=True)
class Formats:
    """What ``-o/--output`` takes on one command: the output format, as in kubectl."""

    choices: tuple[str, ...]
    # What to say to someone who passed a file name: where a file goes instead.
    file_hint: str = "to write a file, redirect stdout (> {value})"
    # Names from earlier releases, accepted without being shown.
    aliases: tuple[tuple[str, str], ...] = ()

    @property
    def metavar(self) -> str:
        return "|".join(self.choices)

    def complete(self, incomplete: str) -> list[str]:
        return [c for c in self.choices if c.startswith(incomplete)]

    def parse(self, value: str) -> str:
        """The chosen format; a usage error (exit 2) for anything else, one that says
        where files go when ``value`` looks like a file name."""
        if value in self.choices:
            return value
        if (alias := dict(self.aliases).get(value)) is not None:
            return alias
        names = ", ".join(self.choices)
        if any(c in value for c in "./") or os.path.exists(value):
            usage(f"-o is the output format ({names}); {self.file_hint.format(value=value)}")
        usage(f"-o {value}: unknown output format (one of {names})")


def output_option(formats: Formats, help_: str) -> Any:
    """The ``-o/--output FORMAT`` option of a command that takes ``formats``."""
    return typer.Option(
        "--output",
        "-o",
        metavar=formats.metavar,
        help=help_,
        autocompletion=formats.complete,
    )


# --format was the output format of compile and check before -o was: still accepted
# for a release, with a warning.
FormatAlias = Annotated[str | None, typer.Option("--format", hidden=True)]


def format_alias(output: str | None, old: str | None) -> str | None:
    """``-o``, or the deprecated ``--format`` where only that was given."""
    if old is None:
        return output
    print(
        "svcrules: warning: --format is now -o/--output (as in kubectl); "
        "--format will be removed in a later release",
        file=sys.stderr,
    )
    if output is not None and output != old:
        usage(f"-o {output} and --format {old} disagree: give -o alone")
    return old


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

Filenames = Annotated[
    list[str] | None,
    typer.Option(
        "--filename",
        "-f",
        metavar="PATH",
        help="An input, as with kubectl -f: a file, a directory or '-' (repeatable; "
        "read before PATHS).",
    ),
]
# Short flags of earlier releases that kubectl or nft spell differently: refused
# with a word on what to write, never taken for something else.
_RETIRED = {
    "retired_c": (
        "-c",
        "-c is not an option of svcrules (it was --config, and is nft's check mode): "
        "write --config FILE",
    ),
}
_FORMAT_WORDS = ("nft", "json", "iptables", "text", "explain")


def usage(message: str) -> NoReturn:
    """A mistake on the command line: one line on stderr, exit 2."""
    print(f"svcrules: error: {message}", file=sys.stderr)
    raise typer.Exit(2)


def _inputs(paths: list[str] | None, filenames: list[str] | None) -> list[str] | None:
    """The inputs of ``-f`` and PATHS, in that order; None when there are none."""
    for name in filenames or []:
        if name in _FORMAT_WORDS and not os.path.exists(name):
            usage(
                f"-f {name}: -f is --filename (an input, as in kubectl and nft -f); "
                f"the output format is -o {name}"
            )
    merged = [*(filenames or []), *(paths or [])]
    return merged or None


def node_options(fn: F) -> F:
    """Add the options of a command that compiles: ``-f/--filename`` (after PATHS,
    merged into ``paths``), and the NodeConfig override flags instead of the
    command's ``overrides`` parameter."""
    sig = inspect.signature(fn, eval_str=True)  # typer reads __signature__ as it is
    params: list[inspect.Parameter] = []
    for p in sig.parameters.values():
        if p.name == "overrides":
            continue
        params.append(p)
        if p.name == "paths":
            params.append(
                inspect.Parameter(
                    "filename",
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    default=None,
                    annotation=Filenames,
                )
            )
    for name, (flag, _) in _RETIRED.items():
        option = typer.Option(flag, hidden=True, metavar="X")
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[str | None, option],
            )
        )
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
        for name, (_, message) in _RETIRED.items():
            if kwargs.pop(name, None) is not None:
                usage(message)
        if "filename" in kwargs:
            kwargs["paths"] = _inputs(kwargs.get("paths"), kwargs.pop("filename"))
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


def verbosity(fn: F) -> F:
    """Add ``-v/--verbose`` (unless the command declares its own ``verbose``), log
    to stderr from the start, and watch the run's long phases: a spinner on a
    terminal, and with ``-v`` one line per phase (svcrules.cli.progress)."""
    sig = inspect.signature(fn, eval_str=True)
    own = "verbose" in sig.parameters
    params = list(sig.parameters.values())
    if not own:
        params.append(
            inspect.Parameter(
                "verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Verbose
            )
        )

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from svcrules.cli.logs import setup
        from svcrules.cli.progress import watching

        verbose = bool(kwargs["verbose"] if own else kwargs.pop("verbose", False))
        setup("text")
        with watching(verbose):
            return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
