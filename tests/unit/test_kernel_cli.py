"""diff, apply, sync and cleanup from the command line, with the registry's drivers
opened over the shipped fakes: the whole path of a run, without root."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from svcrules.cli import app
from svcrules.cli import run as cli_run
from svcrules.kernel import registry
from svcrules.kernel.nft.fake import FakeNft
from tests.k8s import dump, endpoint, endpoint_slice, node_config, service

runner = CliRunner()


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """One fake kernel per backend for the whole test; ``opened`` records the tools
    the CLI asked for."""
    monkeypatch.setattr(cli_run, "net_admin_problem", lambda: None)
    fakes: dict[tuple[str, str], Any] = {}
    opened: list[tuple[str, str]] = []
    for name, row in list(registry.BACKENDS.items()):

        def open_fake(tool: str, name: str = name, row: registry.Backend = row) -> Any:
            opened.append((name, tool))
            variant = "" if tool == "auto" else tool
            if (name, variant) not in fakes:
                fakes[(name, variant)] = row.fake(variant)
            return fakes[(name, variant)][1]

        monkeypatch.setitem(registry.BACKENDS, name, dataclasses.replace(row, open=open_fake))
    return {"fakes": fakes, "opened": opened}


def write(tmp_path: Path, *pods: str) -> str:
    objs = [
        node_config(),
        service("web", "203.0.113.10"),
        endpoint_slice("web", [endpoint(f"198.51.100.{p}") for p in pods]),
    ]
    path = tmp_path / "in.yaml"
    path.write_text(dump(objs))
    return str(path)


@pytest.mark.parametrize("backend", [["-b", "nftables"], ["-b", "iptables", "--iptables", "nft"]])
def test_diff_apply_sync_cleanup(
    tmp_path: Path, kernels: dict[str, Any], backend: list[str]
) -> None:
    state = ["--state-dir", str(tmp_path / "state"), *backend]
    inputs = write(tmp_path, "11")
    res = runner.invoke(app, ["diff", inputs, *state])
    assert res.exit_code == 1 and "full replacement (no saved state" in res.stdout
    res = runner.invoke(app, ["apply", "--dry-run", inputs, *state])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(app, ["apply", inputs, *state])
    assert res.exit_code == 0 and "Kernel: full replacement" in res.stdout, res.stderr
    res = runner.invoke(app, ["diff", inputs, *state])
    assert res.exit_code == 0 and "no change" in res.stdout
    inputs = write(tmp_path, "12")
    res = runner.invoke(app, ["diff", "-o", "nft", inputs, *state])
    assert res.exit_code == 1 and "198.51.100.12" in res.stdout
    res = runner.invoke(app, ["diff", inputs, *state])
    assert (
        res.exit_code == 1
        and (
            "  ~ default/web:http/TCP IPv4\n"
            "      endpoint 198.51.100.11:8080 removed\n"
            "      endpoint 198.51.100.12:8080 added (local)\n"
        )
        in res.stdout
    )
    for same in ("text", "summary"):
        assert runner.invoke(app, ["diff", "--output", same, inputs, *state]).stdout == res.stdout
    res = runner.invoke(app, ["diff", "-o", "json", inputs, *state])
    doc = json.loads(res.stdout)
    assert res.exit_code == 1 and doc["mode"] == "incremental" and doc["changed"] is True
    (web,) = doc["changes"]
    assert [e["endpoint"] for e in web["endpoints"]["added"]] == ["198.51.100.12:8080"]
    prom = tmp_path / "m.prom"
    res = runner.invoke(app, ["sync", inputs, *state, "--metrics-file", str(prom)])
    assert res.exit_code == 0 and "incremental" in res.stderr, res.stderr
    assert 'svcrules_sync_mode{table="svcrules",mode="incremental"} 1' in prom.read_text()
    res = runner.invoke(app, ["cleanup", "--state-dir", str(tmp_path / "state")])
    assert res.exit_code == 0 and res.stdout.startswith("removed: "), res.stderr
    (fake, _driver), *_ = kernels["fakes"].values()
    assert not (fake.tables if isinstance(fake, FakeNft) else _svcrules_chains(fake))
    # cleanup without --backend used what the state named, with the tool that applied it
    assert kernels["opened"][-1] == (
        ("nftables", "auto") if backend[1] == "nftables" else ("iptables", "nft")
    )


def _svcrules_chains(fake: Any) -> list[str]:
    return [c for t in fake.tables.values() for c in t.chains if c.startswith("SVCRULES")]


def test_a_refused_transaction_is_exit_2_and_leaves_the_rules(
    tmp_path: Path, kernels: dict[str, Any]
) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    assert runner.invoke(app, ["apply", write(tmp_path, "11"), *state]).exit_code == 0
    ((fake, _driver),) = kernels["fakes"].values()
    before = copy.deepcopy(fake.tables)
    fake.refuse = lambda script: "Error: Could not process rule: Operation not permitted"
    res = runner.invoke(app, ["apply", write(tmp_path, "12"), *state])
    assert res.exit_code == 2 and "Operation not permitted" in res.stderr
    assert fake.tables == before


def test_diff_output_formats_and_their_old_names(tmp_path: Path, kernels: dict[str, Any]) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    inputs = write(tmp_path, "11")
    text = runner.invoke(app, ["diff", inputs, *state])
    nft = runner.invoke(app, ["diff", "-o", "nft", inputs, *state])
    assert (text.exit_code, nft.exit_code) == (1, 1)
    assert text.stdout.startswith("Service ports:") and "table ip svcrules" in nft.stdout
    doc = runner.invoke(app, ["diff", "-o", "json", inputs, *state]).stdout
    assert json.loads(doc)["mode"] == "full"
    for args, same in [
        (["-o", "text"], text),
        (["--output", "summary"], text),
        (["--output", "script"], nft),
        (["--output", "nft"], nft),
    ]:
        assert runner.invoke(app, ["diff", *args, inputs, *state]).stdout == same.stdout, args


def test_verbose_names_the_kernel_phases(tmp_path: Path, kernels: dict[str, Any]) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    res = runner.invoke(app, ["apply", "-v", "-f", write(tmp_path, "11"), *state])
    assert res.exit_code == 0, res.stderr
    assert "info: writing the full replacement:" in res.stderr
    assert "info: sending the transaction to the kernel: full, " in res.stderr
    assert "info: saving the state" in res.stderr
    assert "info: applied: full, " in res.stderr  # the result, as sync logs it
    res = runner.invoke(app, ["apply", write(tmp_path, "12"), *state])
    assert res.exit_code == 0 and res.stderr == ""  # quiet without -v
    res = runner.invoke(app, ["sync", "-v", "--log-format", "json", write(tmp_path, "13"), *state])
    assert res.exit_code == 0, res.stderr
    lines = [json.loads(line) for line in res.stderr.splitlines()]
    phases = [ln["phase"] for ln in lines if ln.get("event") == "phase"]
    assert "working out the incremental change" in phases
    assert "sending the transaction to the kernel" in phases
    assert lines[-1]["event"] == "applied"
    res = runner.invoke(app, ["cleanup", "-v", *state])
    assert res.exit_code == 0 and "info: removing svcrules' nftables rules: " in res.stderr


def test_sync_skip_leaves_out_maglev_services_on_iptables(
    tmp_path: Path, kernels: dict[str, Any]
) -> None:
    """A Maglev Service on a node with the iptables backend: with --on-invalid skip it is
    left out and reported (exit 3) while the other Services are kept in sync; without,
    nothing is applied (exit 2)."""
    maglev = service("lb", "203.0.113.20")
    maglev["metadata"]["annotations"] = {"svcrules.io/load-balancing": "maglev"}
    objs = [
        node_config(),
        service("web", "203.0.113.10"),
        endpoint_slice("web", [endpoint("198.51.100.11")]),
        maglev,
        endpoint_slice("lb", [endpoint("198.51.100.21")]),
    ]
    inputs = tmp_path / "in.yaml"
    inputs.write_text(dump(objs))
    state = ["--state-dir", str(tmp_path / "state"), "-b", "iptables", "--iptables", "nft"]
    res = runner.invoke(app, ["apply", str(inputs), *state])
    assert res.exit_code == 2 and res.stdout == ""
    assert "Service default/lb: Maglev load balancing" in res.stderr
    for _ in range(2):  # the first run applies, the second finds nothing to do
        res = runner.invoke(app, ["sync", str(inputs), *state, "--on-invalid", "skip"])
        assert res.exit_code == 3, res.stderr
        assert "Service default/lb: left out: Maglev load balancing" in res.stderr
    res = runner.invoke(app, ["diff", str(inputs), *state, "--on-invalid", "skip", "-o", "nft"])
    assert res.exit_code == 0, res.stdout + res.stderr
    ((fake, _),) = [v for k, v in kernels["fakes"].items() if k[0] == "iptables"]
    listing = fake.save("ipv4", "nat")
    assert "-d 203.0.113.10/32" in listing and "203.0.113.20" not in listing
