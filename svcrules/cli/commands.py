"""The ``svcrules`` command: a thin shell over the library.

Exit codes: 0 success, 1 a difference (``check``), 2 bad input or usage.
Errors go to stderr, one line per problem; stdout only ever holds results.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from svcrules.cli.app import app
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

if TYPE_CHECKING:
    # Imported where used: the compiler pulls in pydantic, PyYAML, orjson and Jinja2,
    # which 'svcrules --help' does not need (tests/unit/test_startup.py).
    from svcrules.compiler import Ruleset


class Format(StrEnum):
    nft = "nft"
    json = "json"


class CheckFormat(StrEnum):
    """What a golden file holds: the backend's rules (nft: the backend's text), their
    JSON form, or the explain table (the decisions, for people)."""

    nft = "nft"
    json = "json"
    explain = "explain"


class FamilyChoice(StrEnum):
    both = "both"
    ipv4 = "ipv4"
    ipv6 = "ipv6"


def _fail(exc: SvcrulesError) -> NoReturn:
    for line in str(exc).splitlines():
        print(f"svcrules: error: {line}", file=sys.stderr)
    raise typer.Exit(2)


def _compile(
    paths: list[str] | None,
    config: str | None,
    overrides: Overrides,
    backend: BackendChoice = BackendChoice.nftables,
    allow_empty: bool = True,
) -> Ruleset:
    if not paths:
        print("svcrules: error: no input given (a file, a directory or '-')", file=sys.stderr)
        raise typer.Exit(2)
    from svcrules.compiler import compile_paths

    try:
        # Rendering happens inside: its problems are reported like input problems.
        return compile_paths(
            paths, config, overrides, backend=backend.value, allow_empty=allow_empty
        )
    except SvcrulesError as exc:
        _fail(exc)


def _text(ruleset: Ruleset, backend: BackendChoice, fmt: Format, family: FamilyChoice) -> str:
    """What compile and check print: the backend's text, in the asked format."""
    from svcrules.render.backends import RENDERERS

    row = RENDERERS[backend.value]
    if fmt is Format.json:
        if row.json is None:
            with_json = " or ".join(n for n, r in RENDERERS.items() if r.json)
            _usage(f"--format json is only for --backend {with_json}")
        return row.json(ruleset.plan)
    if family is FamilyChoice.both:
        return ruleset.text(backend.value)
    if row.family_section is None:
        with_sections = [n for n, r in RENDERERS.items() if r.family_section]
        _usage(
            f"--family selects one family's input: only for --backend {' or '.join(with_sections)}"
        )
    return row.family_section(ruleset.text(backend.value), family.value)


def node_ips(ruleset: Ruleset) -> list[str]:
    """The NodeConfig's nodeIPs (one per family), which trace takes as the node's own
    addresses."""
    return [f.node_ip for f in ruleset.plan.families if f.node_ip]


def _usage(message: str) -> NoReturn:
    print(f"svcrules: error: {message}", file=sys.stderr)
    raise typer.Exit(2)


FamilyOpt = Annotated[
    FamilyChoice,
    typer.Option(
        "--family",
        help="iptables backend: print only one family's input, ready for "
        "'iptables-restore --noflush' (ipv4) or 'ip6tables-restore --noflush' (ipv6).",
    ),
]


def _write(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(output)


@app.command("compile")
@node_options
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
    backend: BackendOpt = BackendChoice.nftables,
    family: FamilyOpt = FamilyChoice.both,
    allow_empty: Annotated[
        bool,
        typer.Option(
            "--allow-empty",
            help="Accept inputs without a single Service. Without it an empty input (a "
            "failed command before a pipe) is an error: its rules would remove every Service.",
        ),
    ] = False,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Print the ruleset. With nftables, loading it with 'nft -f' creates or replaces
    the owned tables (ip/ip6 svcrules) in one transaction and touches nothing else.
    With iptables, it is one iptables-restore input per family ('apply' sends it and
    also installs the jumps from the built-in chains)."""
    ruleset = _compile(paths, config, overrides, backend, allow_empty)
    if explain:
        from svcrules.plan.explain import explain_text

        _write(explain_text(ruleset.plan), output)
        return
    _write(_text(ruleset, backend, fmt, family), output)


@app.command("explain")
@node_options
def explain_cmd(
    paths: Paths = None,
    config: ConfigOpt = None,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Show what each Service port became on this node: frontends, the endpoints
    chosen, masquerading, and why a frontend rejects or drops."""
    from svcrules.plan.explain import explain_text

    sys.stdout.write(explain_text(_compile(paths, config, overrides).plan))


@app.command("check")
@node_options
def check_cmd(
    paths: Paths = None,
    golden: Annotated[
        Path | None,
        typer.Option("--golden", "-g", help="The reviewed ruleset file to compare with."),
    ] = None,
    packets: Annotated[
        Path | None,
        typer.Option(
            "--packets",
            help="A file of packet expectations (src, dst, port, proto, fromNode -> "
            "verdict, endpoints, masquerade) to check against the rules of both backends.",
        ),
    ] = None,
    config: ConfigOpt = None,
    update: Annotated[
        bool, typer.Option("--update", help="Rewrite the golden file instead of comparing.")
    ] = False,
    fmt: Annotated[
        CheckFormat,
        typer.Option(
            "--format",
            "-f",
            help="What the golden file holds: the backend's rules ('nft', also for "
            "--backend iptables), their JSON form, or the explain table ('explain').",
        ),
    ] = CheckFormat.nft,
    backend: BackendOpt = BackendChoice.nftables,
    family: FamilyOpt = FamilyChoice.both,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Check the compiled rules in CI: exit 0 when everything holds, 1 when not, 2 on
    bad input. No root, no kernel, no nft needed.

    --golden compares with a reviewed ruleset file and prints a unified diff. Goldens
    leave out what changes with every change (the fingerprints) and name the Service
    of each element of the shared sets and maps, so that changes to different Services
    touch different lines; --format explain keeps the decisions instead of the rules.
    --packets traces every packet of a cases file through the rules of both backends
    (as 'svcrules trace' does) and prints a table of what does not hold.

    Example: svcrules check --packets fixtures/demo-packets.yaml fixtures/demo
    """
    if (golden is None) == (packets is None):
        _usage("give one of --golden FILE or --packets FILE")
    if packets is not None:
        _check_packets(packets, paths, config, overrides)
        return
    assert golden is not None
    from svcrules.cli.golden import compare

    ruleset = _compile(paths, config, overrides, backend)
    text = _golden_text(ruleset, backend, fmt, family)
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


def _golden_text(
    ruleset: Ruleset, backend: BackendChoice, fmt: CheckFormat, family: FamilyChoice
) -> str:
    """What a golden file holds (svcrules.cli.golden): no volatile lines; with
    --family, that family's section of the golden form."""
    from svcrules.cli.golden import golden_text
    from svcrules.render.backends import RENDERERS
    from svcrules.render.golden import normalize

    if fmt is CheckFormat.explain:
        if family is not FamilyChoice.both:
            _usage("--family selects rules: not for --format explain")
        return golden_text(ruleset, backend.value, fmt.value)
    text = _text(ruleset, backend, Format(fmt.value), family)  # refuses what cannot be
    if fmt is CheckFormat.json:
        return normalize(text)
    golden = golden_text(ruleset, backend.value, fmt.value)
    section = RENDERERS[backend.value].family_section
    if family is FamilyChoice.both or section is None:
        return golden
    return section(golden, family.value)


def _check_packets(
    packets: Path, paths: list[str] | None, config: str | None, overrides: Overrides
) -> None:
    from svcrules.trace import cases

    try:
        expected = cases.load(str(packets))
    except SvcrulesError as exc:
        _fail(exc)
    ruleset = _compile(paths, config, overrides)
    texts = {b: ruleset.text(b) for b in ("nftables", "iptables")}
    try:
        failures = cases.check(expected, texts, node_ips(ruleset), str(packets))
    except SvcrulesError as exc:
        _fail(exc)
    total = len(expected.cases)
    if failures:
        sys.stdout.write(cases.table(failures))
        broken = len({f.case for f in failures})
        print(f"svcrules: {broken} of {total} packet cases do not hold", file=sys.stderr)
        raise typer.Exit(1)
    print(f"svcrules: all {total} packet cases hold on nftables and iptables", file=sys.stderr)
