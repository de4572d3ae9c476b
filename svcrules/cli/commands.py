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
    ConfigOpt,
    FormatAlias,
    Formats,
    OutputBackendOpt,
    Paths,
    format_alias,
    node_options,
    output_option,
    usage,
    verbosity,
)
from svcrules.errors import InputError, SvcrulesError
from svcrules.inputs.overrides import Overrides

if TYPE_CHECKING:
    # Imported where used: the compiler pulls in pydantic, PyYAML, orjson and Jinja2,
    # which 'svcrules --help' does not need (tests/unit/test_startup.py).
    from svcrules.compiler import Ruleset


# -o of compile and check: each names the backend whose text it is.
RULE_FORMATS = Formats(
    ("nft", "json", "iptables"),
    file_hint="to write a file use --output-file {value} or redirect",
)
# check -o: the same, and the explain table (the decisions, for people), which any
# backend's rules come from.
CHECK_FORMATS = Formats(
    (*RULE_FORMATS.choices, "explain"),
    file_hint="the golden file itself is --golden {value}",
)
_FORMAT_BACKEND: dict[str, BackendChoice | None] = {
    "nft": BackendChoice.nftables,
    "json": BackendChoice.nftables,
    "iptables": BackendChoice.iptables,
    "explain": None,
}


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
        usage("no input given (PATHS or -f: a file, a directory or '-')")
    from svcrules.compiler import compile_paths

    try:
        # Rendering happens inside: its problems are reported like input problems.
        return compile_paths(
            paths, config, overrides, backend=backend.value, allow_empty=allow_empty
        )
    except SvcrulesError as exc:
        _fail(exc)


def rule_format(
    output: str | None, backend: BackendChoice | None, formats: Formats = RULE_FORMATS
) -> tuple[BackendChoice, str | None]:
    """The backend and format of compile's and check's ``-o``: ``-o iptables`` is the
    iptables backend's text and implies it; a backend that contradicts ``-o`` is a
    usage error. Format None: the backend's own text."""
    if output is None:
        return backend or BackendChoice.nftables, None
    fmt = formats.parse(output)
    implied = _FORMAT_BACKEND[fmt]
    if implied is None:
        return backend or BackendChoice.nftables, fmt
    if backend is not None and backend is not implied:
        what = "libnftables JSON" if fmt == "json" else f"the {implied.value} backend's text"
        usage(f"-o {fmt} is {what}, and --backend {backend.value} contradicts it: give one of them")
    return implied, fmt


def _text(ruleset: Ruleset, backend: BackendChoice, fmt: str | None, family: FamilyChoice) -> str:
    """What compile and check print: the backend's text, in the asked format."""
    from svcrules.render.backends import RENDERERS

    row = RENDERERS[backend.value]
    if fmt == "json":
        assert row.json is not None  # rule_format: json is the nftables backend's
        if family is not FamilyChoice.both:
            usage("--family selects one family's iptables-restore input: not for -o json")
        return row.json(ruleset.plan)
    if family is FamilyChoice.both:
        return ruleset.text(backend.value)
    if row.family_section is None:
        with_sections = [n for n, r in RENDERERS.items() if r.family_section]
        usage(
            f"--family selects one family's input: only for -o iptables "
            f"(--backend {' or '.join(with_sections)})"
        )
    return row.family_section(ruleset.text(backend.value), family.value)


def node_ips(ruleset: Ruleset) -> list[str]:
    """The NodeConfig's nodeIPs (one per family), which trace takes as the node's own
    addresses."""
    return [f.node_ip for f in ruleset.plan.families if f.node_ip]


FamilyOpt = Annotated[
    FamilyChoice,
    typer.Option(
        "--family",
        help="With -o iptables: print only one family's input, ready for "
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


@app.command("compile", short_help="Print the ruleset (nft script, JSON or iptables input).")
@verbosity
@node_options
def compile_cmd(
    paths: Paths = None,
    config: ConfigOpt = None,
    output: Annotated[
        str | None,
        output_option(
            RULE_FORMATS,
            "Output format: nft (an nft script), json (libnftables JSON, as 'nft -j "
            "list' prints it) or iptables (iptables-restore input, both families; "
            "implies --backend iptables). Default: the backend's own text.",
        ),
    ] = None,
    output_file: Annotated[
        Path | None,
        typer.Option(
            "--output-file",
            metavar="FILE",
            help="Write the output to FILE (atomically: a temporary file renamed into "
            "place) instead of stdout.",
        ),
    ] = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Print the explain table instead of rules.")
    ] = False,
    backend: OutputBackendOpt = None,
    family: FamilyOpt = FamilyChoice.both,
    old_format: FormatAlias = None,
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
    With iptables (-o iptables), it is one iptables-restore input per family ('apply'
    sends it and also installs the jumps from the built-in chains).

    Examples:

      svcrules compile fixtures/demo | nft -f -
      svcrules compile -o json -f services/ -f node.yaml
      svcrules compile -o iptables --family ipv4 fixtures/demo
      svcrules compile --output-file rules.nft fixtures/demo
    """
    backend_, fmt = rule_format(format_alias(output, old_format), backend)
    if explain and fmt is not None:
        usage(f"--explain prints the explain table, -o {fmt} the rules: give one of them")
    ruleset = _compile(paths, config, overrides, backend_, allow_empty)
    if explain:
        from svcrules.plan.explain import explain_text

        _write(explain_text(ruleset.plan), output_file)
        return
    _write(_text(ruleset, backend_, fmt, family), output_file)


@app.command("explain", short_help="Show what each Service port became on this node, and why.")
@verbosity
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


@app.command(
    "check", short_help="Check the rules in CI against a golden file or packet expectations."
)
@verbosity
@node_options
def check_cmd(
    paths: Paths = None,
    golden: Annotated[
        Path | None,
        typer.Option(
            "--golden",
            "-g",
            metavar="FILE",
            help="The reviewed ruleset file to compare with (with --update: to write).",
        ),
    ] = None,
    packets: Annotated[
        Path | None,
        typer.Option(
            "--packets",
            metavar="FILE",
            help="A file of packet expectations (src, dst, port, proto, fromNode -> "
            "verdict, endpoints, shares, masquerade) to check against the rules of both "
            "backends, or of --backend's only.",
        ),
    ] = None,
    config: ConfigOpt = None,
    update: Annotated[
        bool, typer.Option("--update", help="Rewrite the golden file instead of comparing.")
    ] = False,
    output: Annotated[
        str | None,
        output_option(
            CHECK_FORMATS,
            "What the golden file holds: nft or iptables (the backend's rules, without "
            "fingerprints, elements grouped by Service; iptables implies --backend "
            "iptables), json (their JSON form) or explain (the decisions, for people). "
            "Default: the backend's rules.",
        ),
    ] = None,
    backend: OutputBackendOpt = None,
    family: FamilyOpt = FamilyChoice.both,
    old_format: FormatAlias = None,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Check the compiled rules in CI: exit 0 when everything holds, 1 when not, 2 on
    bad input. No root, no kernel, no nft needed.

    --golden compares with a reviewed ruleset file and prints a unified diff. Goldens
    leave out what changes with every change (the fingerprints) and name the Service
    of each element of the shared sets and maps, so that changes to different Services
    touch different lines; -o explain keeps the decisions instead of the rules.
    --packets traces every packet of a cases file through the rules of both backends
    (as 'svcrules trace' does) and prints a table of what does not hold; a backend
    that cannot program the inputs (iptables and Maglev) is named and left out.

    Examples:

      svcrules check --golden rules.golden.nft manifests/
      svcrules check --golden rules.golden.nft --update manifests/
      svcrules check --packets fixtures/demo-packets.yaml fixtures/demo
    """
    backend_, fmt = rule_format(format_alias(output, old_format), backend, CHECK_FORMATS)
    if (golden is None) == (packets is None):
        usage("give one of --golden FILE or --packets FILE")
    if packets is not None:
        chosen = (backend.value,) if backend is not None else ("nftables", "iptables")
        _check_packets(packets, paths, config, overrides, chosen)
        return
    assert golden is not None
    from svcrules.cli.golden import compare

    ruleset = _compile(paths, config, overrides, backend_)
    text = _golden_text(ruleset, backend_, fmt, family)
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
    ruleset: Ruleset, backend: BackendChoice, fmt: str | None, family: FamilyChoice
) -> str:
    """What a golden file holds (svcrules.cli.golden): no volatile lines; with
    --family, that family's section of the golden form."""
    from svcrules.cli.golden import golden_text
    from svcrules.render.backends import RENDERERS
    from svcrules.render.golden import normalize

    if fmt == "explain":
        if family is not FamilyChoice.both:
            usage("--family selects rules: not for -o explain")
        return golden_text(ruleset, backend.value, "explain")
    text = _text(ruleset, backend, fmt, family)  # refuses what cannot be
    if fmt == "json":
        return normalize(text)
    golden = golden_text(ruleset, backend.value, "nft")  # the backend's rules
    section = RENDERERS[backend.value].family_section
    if family is FamilyChoice.both or section is None:
        return golden
    return section(golden, family.value)


def _check_packets(
    packets: Path,
    paths: list[str] | None,
    config: str | None,
    overrides: Overrides,
    backends: tuple[str, ...],
) -> None:
    """The cases against each backend's rules; a backend that refuses the inputs (the
    iptables backend and Maglev) is named on stderr and left out, unless it is the only
    one asked for."""
    from svcrules.trace import cases

    try:
        expected = cases.load(str(packets))
    except SvcrulesError as exc:
        _fail(exc)
    ruleset = _compile(paths, config, overrides)
    texts: dict[str, str] = {}
    for b in backends:
        try:
            texts[b] = ruleset.text(b)
        except InputError as exc:
            if len(backends) == 1:
                _fail(exc)
            for problem in exc.problems:
                print(f"svcrules: {b} not checked: {problem}", file=sys.stderr)
    if not texts:
        _fail(SvcrulesError("no backend can program these inputs"))
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
    print(f"svcrules: all {total} packet cases hold on {' and '.join(texts)}", file=sys.stderr)
