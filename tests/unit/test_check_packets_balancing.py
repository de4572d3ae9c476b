"""``svcrules check --packets`` with weights and Maglev: endpoint shares in a cases file,
``--backend`` to choose the backends, and a backend that refuses the inputs (the
iptables backend and Maglev) named instead of crashing the check."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from svcrules.cli import app

ROOT = Path(__file__).resolve().parents[2]
BALANCING = str(ROOT / "fixtures" / "balancing")
CASES = str(ROOT / "fixtures" / "balancing-packets.yaml")
runner = CliRunner()


def test_the_balancing_cases_hold_on_nftables() -> None:
    res = runner.invoke(app, ["check", "--packets", CASES, BALANCING, "--backend", "nftables"])
    assert res.exit_code == 0, res.stdout + res.stderr
    assert res.stdout == ""
    assert "all 3 packet cases hold on nftables" in res.stderr


def test_a_backend_that_refuses_the_inputs_is_named_and_left_out() -> None:
    res = runner.invoke(app, ["check", "--packets", CASES, BALANCING])
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "iptables not checked: Service shop/checkout: Maglev" in res.stderr
    assert "all 3 packet cases hold on nftables\n" in res.stderr


def test_asking_for_the_refusing_backend_alone_is_an_error() -> None:
    res = runner.invoke(app, ["check", "--packets", CASES, BALANCING, "--backend", "iptables"])
    assert res.exit_code == 2
    assert res.stdout == ""
    assert "error: Service shop/checkout: Maglev load balancing" in res.stderr


def test_a_wrong_share_is_reported(tmp_path: Path) -> None:
    cases = {
        "cases": [
            {
                "src": "192.0.2.100",
                "dst": "203.0.113.10",
                "port": 80,
                "verdict": "dnat",
                "shares": {"198.51.100.21:8080": 0.2, "198.51.100.11:8080": 0.45},
            }
        ]
    }
    path = tmp_path / "cases.yaml"
    path.write_text(yaml.safe_dump(cases))
    res = runner.invoke(app, ["check", "--packets", str(path), BALANCING, "-b", "nftables"])
    assert res.exit_code == 1
    assert "share of 198.51.100.21:8080  20.0%     10.0%" in res.stdout
    assert "198.51.100.11" not in res.stdout  # within half a point: holds
