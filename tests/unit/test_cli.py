"""The command line: exit codes, stdout/stderr discipline, check and explain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import svcrules
from svcrules.cli import app
from tests.golden.forms import canonical
from tests.k8s import dump, node_config, service

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "fixtures" / "demo")
runner = CliRunner()


def test_compile_demo_matches_library_and_golden() -> None:
    res = runner.invoke(app, ["compile", DEMO])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == svcrules.compile_paths([DEMO]).nft
    # The golden holds the same rules and elements (grouped, without fingerprints).
    golden = (ROOT / "tests" / "golden" / "demo.nft").read_text()
    assert canonical(res.stdout) == canonical(golden)
    assert "<fingerprint>" in golden and "<fingerprint>" not in res.stdout


def test_bad_input_exit_2_nothing_on_stdout(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(dump([node_config(), service("web", "203.0.113.300")]))
    res = runner.invoke(app, ["compile", str(bad)])
    assert res.exit_code == 2
    assert res.stdout == ""
    assert f"{bad}: document 2 (Service default/web): spec.clusterIP:" in res.stderr


def test_missing_node_config_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(dump([service("web", "203.0.113.10")]))
    res = runner.invoke(app, ["compile", str(f)])
    assert res.exit_code == 2 and "--node-name and --node-ip" in res.stderr
    res = runner.invoke(
        app,
        ["compile", str(f), "--node-name", "n", "--node-ip", "192.0.2.9", "--table-name", "mine"],
    )
    assert res.exit_code == 0 and "table ip mine {" in res.stdout


def test_config_option_and_output_file(tmp_path: Path) -> None:
    out = tmp_path / "rules.nft"
    res = runner.invoke(
        app,
        [
            "compile",
            str(ROOT / "fixtures/demo/services.yaml"),
            str(ROOT / "fixtures/demo/endpointslices.yaml"),
            "--config",
            str(ROOT / "fixtures/demo/node.yaml"),
            "--output-file",
            str(out),
        ],
    )
    assert res.exit_code == 0 and res.stdout == ""
    assert out.read_text() == svcrules.compile_paths([DEMO]).nft


def test_check_golden_equal_differs_update(tmp_path: Path) -> None:
    golden = tmp_path / "g.nft"
    res = runner.invoke(app, ["check", "--golden", str(golden), DEMO])
    assert res.exit_code == 2 and "--update" in res.stderr
    assert runner.invoke(app, ["check", "--golden", str(golden), "--update", DEMO]).exit_code == 0
    assert runner.invoke(app, ["check", "--golden", str(golden), DEMO]).exit_code == 0
    golden.write_text(golden.read_text().replace("198.51.100.12", "198.51.100.99"))
    res = runner.invoke(app, ["check", "--golden", str(golden), DEMO])
    assert res.exit_code == 1
    assert "-\t\t\t3708502017" not in res.stdout  # the diff is about what changed
    assert "+" in res.stdout and "198.51.100.12" in res.stdout and "198.51.100.99" in res.stdout


def test_explain() -> None:
    res = runner.invoke(app, ["explain", DEMO])
    assert res.exit_code == 0
    assert "shop/empty:80/TCP (IPv4)" in res.stdout
    assert "REJECT (no usable endpoint)" in res.stdout
    assert "shop/api:grpc/TCP (IPv4)" in res.stdout
    assert runner.invoke(app, ["compile", "--explain", DEMO]).stdout == res.stdout


def test_stdin_input() -> None:
    text = (ROOT / "fixtures/kubectl-list/all.yaml").read_text()
    res = runner.invoke(app, ["compile", "-"], input=text)
    assert res.exit_code == 0 and "table ip svcrules {" in res.stdout


@pytest.mark.parametrize("cmd", [[], ["compile", "--help"], ["check", "--help"]])
def test_help_teaches(cmd: list[str]) -> None:
    res = runner.invoke(app, cmd or ["--help"])
    assert res.exit_code == 0
    assert "NodeConfig" in res.stdout or "golden" in res.stdout


def test_no_input_is_a_usage_error() -> None:
    res = runner.invoke(app, ["compile"])
    assert res.exit_code == 2 and res.stdout == ""


def test_python_dash_m() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "svcrules", "compile", DEMO],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.startswith("#!/usr/sbin/nft -f")
