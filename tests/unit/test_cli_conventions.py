"""The command line follows kubectl's and nft's habits: -o is the output format, -f an
input, -h help; -v on every command; help that reads well at 80 columns and in a
pipe; old spellings refused with a word on the new ones."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import svcrules
from svcrules.cli import app
from svcrules.cli.help import Command, Group

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "fixtures" / "demo")
GOLDEN = ROOT / "tests" / "golden"
COMPILED = svcrules.compile_paths([DEMO])
NFT, IPTABLES = COMPILED.nft, COMPILED.iptables
runner = CliRunner()
SVCRULES = str(Path(sys.executable).parent / "svcrules")  # the installed command
COMMANDS = [
    "compile",
    "explain",
    "check",
    "diff",
    "apply",
    "sync",
    "cleanup",
    "serve",
    "trace",
]


def run(*args: str, input: str | None = None) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args), input=input)
    return res.exit_code, res.stdout, res.stderr


def _click_command() -> Group:
    group = typer.main.get_command(app)
    assert isinstance(group, Group)
    return group


def test_every_command_is_listed_here() -> None:
    assert list(_click_command().commands) == COMMANDS


# -o/--output: the output format


def test_compile_formats() -> None:
    nft = NFT
    assert run("compile", DEMO) == (0, nft, "")
    assert run("compile", "-o", "nft", DEMO) == (0, nft, "")
    assert run("compile", "--output", "nft", DEMO)[1] == nft
    iptables = IPTABLES
    assert run("compile", "-o", "iptables", DEMO) == (0, iptables, "")
    assert run("compile", "-b", "iptables", DEMO)[1] == iptables
    assert run("compile", "-o", "iptables", "--backend", "iptables", DEMO)[1] == iptables
    code, out, _ = run("compile", "-o", "json", DEMO)
    assert code == 0 and json.loads(out) == json.loads(COMPILED.json)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-o", "rules.nft"],
            "-o is the output format (nft, json, iptables); to write a file use "
            "--output-file rules.nft or redirect",
        ),
        (["-o", "yaml"], "-o yaml: unknown output format (one of nft, json, iptables)"),
        (["-o", "iptables", "-b", "nftables"], "--backend nftables contradicts it"),
        (["-o", "nft", "--backend", "iptables"], "--backend iptables contradicts it"),
        (["-o", "json", "-b", "iptables"], "-o json is libnftables JSON"),
        (["-o", "json", "--family", "ipv4"], "not for -o json"),
        (["--explain", "-o", "json"], "--explain prints the explain table, -o json the rules"),
    ],
)
def test_compile_output_mistakes_fail_loudly(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a file named after -o's value would be a silent mistake
    code, out, err = run("compile", *args, DEMO)
    assert (code, out) == (2, "")
    assert err.startswith("svcrules: error: ") and message in err
    assert list(tmp_path.iterdir()) == []


def test_output_file_is_written_atomically(tmp_path: Path) -> None:
    out = tmp_path / "rules.nft"
    assert run("compile", "--output-file", str(out), DEMO) == (0, "", "")
    assert out.read_text() == NFT
    assert run("compile", "-o", "iptables", "--output-file", str(out), DEMO)[0] == 0
    assert out.read_text() == IPTABLES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rules.nft"]  # no temporary left


def test_format_is_a_deprecated_spelling_of_output() -> None:
    code, out, err = run("compile", "--format", "json", DEMO)
    assert code == 0 and out == run("compile", "-o", "json", DEMO)[1]
    assert "--format is now -o/--output" in err
    code, _, err = run("compile", "--format", "json", "-o", "nft", DEMO)
    assert code == 2 and "disagree" in err


def test_check_golden_format_is_o(tmp_path: Path) -> None:
    golden = tmp_path / "g.iptables"
    assert run("check", "-g", str(golden), "-o", "iptables", "--update", DEMO)[0] == 0
    assert golden.read_text() == (GOLDEN / "demo.iptables").read_text()
    assert run("check", "--golden", str(golden), "-o", "iptables", DEMO)[0] == 0
    assert run("check", "--golden", str(golden), "-b", "iptables", DEMO)[0] == 0
    assert run("check", "--golden", str(golden), DEMO)[0] == 1  # nft text differs
    code, _, err = run("check", "--golden", str(golden), "-o", str(golden), DEMO)
    assert code == 2 and "-o is the output format" in err
    assert f"the golden file itself is --golden {golden}" in err
    explain = tmp_path / "g.explain"  # the decisions: any backend's
    for backend in ("nftables", "iptables"):
        args = ["check", "-g", str(explain), "-o", "explain", "-b", backend, DEMO]
        assert run(*args, "--update")[0] == 0 and run(*args)[0] == 0
    assert explain.read_text() == run("explain", DEMO)[1]


PACKET = ["--dst", "203.0.113.10", "--port", "80"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trace", "-o", "t.json", *PACKET], "to write a file, redirect stdout (> t.json)"),
        (["trace", "-o", "yaml", *PACKET], "-o yaml: unknown output format (one of text, json)"),
        (["diff", "-o", "out/diff.txt"], "-o is the output format (text, json, nft); to write"),
    ],
)
def test_other_commands_output_mistakes(args: list[str], message: str) -> None:
    code, out, err = run(*args, DEMO)
    assert (code, out) == (2, "") and message in err


# -f/--filename: inputs, as in kubectl


def test_filename_takes_files_directories_and_stdin() -> None:
    nft = NFT
    assert run("compile", "-f", DEMO)[1] == nft
    files = [str(ROOT / "fixtures/demo" / n) for n in ("services.yaml", "endpointslices.yaml")]
    config = str(ROOT / "fixtures/demo/node.yaml")
    assert run("compile", "-f", files[0], "--filename", files[1], "--config", config)[1] == nft
    assert run("compile", "-f", files[0], files[1], "--config", config)[1] == nft  # and PATHS
    text = (ROOT / "fixtures/kubectl-list/all.yaml").read_text()
    from_stdin = svcrules.compile_paths(["-"], stdin=io.StringIO(text)).nft
    assert run("compile", "-f", "-", input=text)[1] == from_stdin
    assert run("explain", "-f", DEMO)[1] == run("explain", DEMO)[1]


def test_f_is_no_longer_the_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run("compile", "-f", "json", DEMO)
    assert (code, out) == (2, "")
    assert "-f is --filename" in err and "the output format is -o json" in err
    (tmp_path / "json").mkdir()  # ... unless there is such an input
    code, _, err = run("compile", "-f", "json", DEMO)
    assert code == 0, err


def test_c_is_no_longer_config() -> None:
    code, out, err = run("compile", "-c", str(ROOT / "fixtures/demo/node.yaml"), DEMO)
    assert (code, out) == (2, "") and "write --config FILE" in err
    assert run("compile", "--config", str(ROOT / "fixtures/demo/node.yaml"), DEMO)[0] == 0


# -h, --version, completion, -v


@pytest.mark.parametrize("cmd", [[], *([c] for c in COMMANDS)])
def test_h_is_help(cmd: list[str]) -> None:
    short = runner.invoke(app, [*cmd, "-h"])
    assert short.exit_code == 0 and short.stdout.startswith("Usage: ")
    assert short.stdout == runner.invoke(app, [*cmd, "--help"]).stdout


def test_version_from_the_package_metadata() -> None:
    assert run("--version") == (0, f"svcrules {version('svcrules')}\n", "")


def test_shell_completion() -> None:
    assert run("--show-completion", "bash")[1].startswith("_svcrules_completion()")
    env = {
        **os.environ,
        "_SVCRULES_COMPLETE": "complete_bash",
        "COMP_WORDS": "svcrules compile -o ",
        "COMP_CWORD": "3",
    }
    done = subprocess.run([SVCRULES], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["nft", "json", "iptables"]


def test_every_command_has_verbose() -> None:
    for name, command in _click_command().commands.items():
        opts = {o for p in command.params for o in getattr(p, "opts", [])}
        assert {"-v", "--verbose"} <= opts, name


def test_verbose_says_what_each_phase_did() -> None:
    code, out, err = run("compile", "-v", DEMO)
    assert code == 0 and out == NFT
    lines = err.splitlines()
    assert [re.sub(r".*svcrules: info: ([A-Za-z ]+):.*", r"\1", ln) for ln in lines] == [
        "reading inputs",
        "validating objects",
        "planning Services",
        "rendering nftables rules",
    ]
    assert "4 Services, 4 EndpointSlices" in err and re.search(r"\(\d+\.\d\d s\)$", lines[-1])
    assert run("compile", DEMO)[2] == ""


# Short flags: none that means something else in kubectl or nft


# (command, short flag) -> long flag; docs/operations.md, "Flags", explains each.
SHORT_FLAGS = {
    "-f": "--filename",  # kubectl -f, nft -f: an input file
    "-o": "--output",  # kubectl -o: the output format
    "-v": "--verbose",  # kubectl -v: verbosity
    "-h": "--help",  # kubectl, nft
    "-b": "--backend",  # in neither
    "-g": "--golden",  # in neither
}


def test_short_flags_are_the_agreed_ones() -> None:
    group = _click_command()
    root = typer.Context(group, info_name="svcrules", **group.context_settings)
    seen: dict[str, set[str]] = {}
    for command in [group, *group.commands.values()]:
        ctx = typer.Context(command, info_name=command.name, parent=root)
        for param in command.get_params(ctx):
            if getattr(param, "hidden", False) or param.param_type_name != "option":
                continue
            opts = list(param.opts)
            long_ = [o for o in opts if o.startswith("--")]
            for opt in opts:
                if not opt.startswith("--"):
                    seen.setdefault(opt, set()).update(long_)
    assert {k: sorted(v) for k, v in seen.items()} == {k: [v] for k, v in SHORT_FLAGS.items()}


# Help: plain text that reads well at 80 columns and in a pipe

BOX = re.compile("[\u2500-\u257f]")


@pytest.fixture(autouse=True)
def _columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Help as a terminal of 80 columns, or a pipe, gets it."""
    monkeypatch.setenv("COLUMNS", "80")


def _pages() -> dict[str, str]:
    return {
        " ".join(cmd) or "svcrules": runner.invoke(app, [*cmd, "--help"]).stdout
        for cmd in [[], *([c] for c in COMMANDS)]
    }


def test_help_is_plain_text_within_80_columns() -> None:
    for name, page in _pages().items():
        assert "\x1b" not in page and not BOX.search(page), name
        assert max(len(line) for line in page.splitlines()) <= 80, name
        assert not re.search(r"<[a-z][a-z|\[\]]*>", page), name  # no <bool>, <list[str]>


def test_help_names_every_option_whole() -> None:
    group = _click_command()
    pages = _pages()
    for name, command in group.commands.items():
        assert isinstance(command, Command)
        for param in command.params:
            if getattr(param, "hidden", False) or param.param_type_name != "option":
                continue
            for opt in [*param.opts, *getattr(param, "secondary_opts", [])]:
                assert re.search(rf"(^|[ ,/]){re.escape(opt)}\b", pages[name], re.M), (name, opt)


def test_help_sentences_are_not_broken_by_a_table() -> None:
    """Each option's help reads as one paragraph in its column: joined back, it is the
    declared help text."""
    page = _pages()["compile"]
    block = page.split("  --output-file FILE", 1)[1].split("\n  --explain", 1)[0]
    joined = " ".join(block.split())
    assert joined == (
        "Write the output to FILE (atomically: a temporary file renamed into place) "
        "instead of stdout."
    )


def test_help_in_a_pipe_is_the_same_plain_text() -> None:
    """A real process whose stdout is a pipe, with a wide terminal claimed: still 80
    columns at most, no colour, and the same text as above."""
    env = {**os.environ, "COLUMNS": "200", "FORCE_COLOR": "1", "TERM": "xterm-256color"}
    done = subprocess.run(
        [SVCRULES, "compile", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert done.stderr == ""
    assert done.stdout == _pages()["compile"]
