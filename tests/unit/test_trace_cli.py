"""``svcrules trace`` and ``svcrules check --packets``: output forms, exit codes, and
stdout holding results only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from svcrules.cli import app
from tests.k8s import dump, endpoint, endpoint_slice, node_config, service

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "fixtures" / "demo")
POLICIES = str(ROOT / "fixtures" / "policies")
CASES = str(ROOT / "fixtures" / "demo-packets.yaml")
BACKENDS = ["nftables", "iptables"]
WEB = ["198.51.100.11:8080", "198.51.100.12:8080"]  # shop/web's endpoints in the demo
runner = CliRunner()


def trace_json(*args: str) -> dict[str, Any]:
    res = runner.invoke(app, ["trace", *args, "-o", "json"])
    assert res.exit_code == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


# -- trace -----------------------------------------------------------------------------


def test_trace_text_for_a_cluster_ip() -> None:
    res = runner.invoke(
        app, ["trace", DEMO, "--src", "198.51.100.12", "--dst", "203.0.113.10", "--port", "80"]
    )
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == (
        "packet:     tcp 198.51.100.12 -> 203.0.113.10:80, from a pod (inside clusterCIDRs) "
        "(nftables)"
    )
    assert lines[1] == "verdict:    dnat: translated to an endpoint"
    assert lines[2] == "endpoints:"
    assert lines[3].split() == ["198.51.100.11:8080", "50.00%"]
    assert lines[4].split() == ["198.51.100.12:8080", "50.00%"]
    assert lines[5] == (
        "picked:     at random: one of 2 slots, each as likely (svc-f49b7503027b-shop-web-http-tcp)"
    )
    assert lines[6] == "masquerade: no: the endpoint sees the client's address"
    assert lines[7] == "path (rules matched, in order):"
    assert lines[8].split() == ["ip", "svcrules", "nat-prerouting", "jump", "services"]
    assert res.stderr == ""


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_json_for_a_cluster_ip(backend: str) -> None:
    args = ["--src", "198.51.100.12", "--dst", "203.0.113.10", "--port", "80", "-b", backend]
    out = trace_json(DEMO, *args)
    assert out["backend"] == backend
    assert out["packet"] == {
        "src": "198.51.100.12",
        "dst": "203.0.113.10",
        "port": 80,
        "proto": "tcp",
        "from_node": False,
        "source": "pod",
        "sport": None,
    }
    assert out["verdict"] == "dnat"
    assert out["endpoints"] == WEB
    assert out["probabilities"] == {ep: 0.5 for ep in WEB}
    assert out["masquerade"] is False
    assert out["masqueraded"] == []
    assert out["masquerade_reason"] == []
    assert out["affinity"] is None
    chains = out["chains"]
    assert all({"table", "chain", "rule"} <= set(step) for step in chains)
    if backend == "nftables":  # one rule picks among both endpoints: on every path
        assert chains[0] == {
            "table": "ip svcrules",
            "chain": "nat-prerouting",
            "rule": "jump services",
        }
        assert chains[-1]["rule"].startswith("meta l4proto tcp dnat ip to numgen random mod 2")
        assert "when" not in chains[-1]
    else:  # one DNAT rule per endpoint, each on its own path
        assert chains[0]["table"] == "ipv4 nat" and chains[0]["chain"] == "PREROUTING"
        dnats = [s for s in chains if "-j DNAT" in s["rule"]]
        assert [s["when"] for s in dnats] == [[ep] for ep in WEB]


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_json_masquerade_and_affinity(backend: str) -> None:
    out = trace_json(
        DEMO, "-b", backend, "--src", "192.0.2.100", "--dst", "203.0.113.53", "--port", "53",
        "--proto", "udp",
    )  # fmt: skip
    assert out["packet"]["source"] == "outside"
    assert out["verdict"] == "dnat"
    assert out["endpoints"] == ["198.51.100.13:5353", "198.51.100.14:5353"]
    assert out["masquerade"] is True
    assert out["masqueraded"] == out["endpoints"]
    assert len(out["masquerade_reason"]) == 3  # the jump, the mark, the masquerade
    assert out["affinity"] == {"timeout": 10800, "sticky": True}


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_from_node_without_src(backend: str) -> None:
    out = trace_json(DEMO, "-b", backend, "--from-node", "--dst", "192.0.2.1", "--port", "30090")
    assert out["packet"]["src"] == "192.0.2.1"  # the nodeIP of the family
    assert out["packet"]["from_node"] is True
    assert out["packet"]["source"] == "node"
    assert out["endpoints"] == ["198.51.100.11:9090", "198.51.100.12:9090"]
    assert out["masquerade"] is True
    v6 = trace_json(
        DEMO, "-b", backend, "--from-node", "--dst", "2001:db8:3::53", "--port", "53",
        "--proto", "udp",
    )  # fmt: skip
    assert v6["packet"]["src"] == "2001:db8:1::1"
    assert v6["endpoints"] == ["[2001:db8:2::13]:5353"]


def test_trace_text_from_node() -> None:
    res = runner.invoke(
        app, ["trace", DEMO, "--from-node", "--dst", "192.0.2.1", "--port", "30090"]
    )
    assert res.exit_code == 0, res.stderr
    assert "sent by the node" in res.stdout.splitlines()[0]
    assert "masquerade: yes" in res.stdout
    assert "because   ip svcrules mark-for-masquerade: meta mark set" in res.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_node_address_reaches_a_nodeport_where_nodeportaddresses_allow(backend: str) -> None:
    """fixtures/policies serves NodePorts on every local address (0.0.0.0/0)."""
    args = [POLICIES, "-b", backend, "--src", "192.0.2.100", "--dst", "198.18.0.1"]
    extra = trace_json(*args, "--port", "30040", "--node-address", "198.18.0.1")
    assert extra["verdict"] == "dnat"
    assert extra["endpoints"] == ["198.51.100.32:8080"]
    assert extra["packet"]["source"] == "outside"
    assert trace_json(*args, "--port", "30040")["verdict"] == "untouched"  # not the node's


def weighted(tmp_path: Path, algorithm: str = "random") -> Path:
    """shop/web with three endpoints in slices of weights 1, 3 and 0 (drained)."""
    cluster = tmp_path / "cluster.yaml"
    web = service("web", "203.0.113.10", ports=[{"name": "http", "port": 80}])
    web["metadata"]["annotations"] = {"svcrules.io/load-balancing": algorithm}
    slices = []
    for n, weight in ((11, "1"), (12, "3"), (13, "0")):
        sl = endpoint_slice("web", [endpoint(f"198.51.100.{n}")], name=f"web-{n}")
        sl["metadata"]["annotations"] = {"svcrules.io/weight": weight}
        slices.append(sl)
    maglev = {"seed": "0x5eed", "tableSize": 251}
    cfg = node_config(clusterCIDRs=["198.51.100.0/24"], maglev=maglev)
    cluster.write_text(dump([cfg, web, *slices]))
    return cluster


ARGS = ["--src", "192.0.2.100", "--dst", "203.0.113.10", "--port", "80"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_shares_on_both_backends(backend: str, tmp_path: Path) -> None:
    out = trace_json(str(weighted(tmp_path)), *ARGS, "-b", backend)
    assert out["probabilities"] == {"198.51.100.11:8080": 0.25, "198.51.100.12:8080": 0.75}
    (pick,) = out["balancing"]
    assert pick["algorithm"] == "random"
    if backend == "nftables":
        assert pick["table_size"] == 4
        assert pick["slots"] == {"198.51.100.11:8080": 1, "198.51.100.12:8080": 3}
    else:
        assert "table_size" not in pick and "slots" not in pick


def test_trace_maglev_text_json_and_sport(tmp_path: Path) -> None:
    cluster = str(weighted(tmp_path, "maglev"))
    res = runner.invoke(app, ["trace", cluster, *ARGS])
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[3].split() == ["198.51.100.11:8080", "25.10%", "63", "of", "251", "slots"]
    assert lines[4].split() == ["198.51.100.12:8080", "74.90%", "188", "of", "251", "slots"]
    assert lines[5] == (
        "picked:     maglev: jhash of the flow (ip saddr . tcp sport . ip daddr . tcp dport), "
        "seed 0x5eed, 251 slots"
    )
    assert "every slot taken as equally likely" in lines[6]
    out = trace_json(cluster, *ARGS)
    (pick,) = out["balancing"]
    assert {k: pick[k] for k in ("algorithm", "table_size", "seed", "hash", "slot")} == {
        "algorithm": "maglev",
        "table_size": 251,
        "seed": "0x5eed",
        "hash": "flow",
        "slot": None,
    }
    assert pick["fields"] == ["ip saddr", "tcp sport", "ip daddr", "tcp dport"]
    assert pick["slots"] == {"198.51.100.11:8080": 63, "198.51.100.12:8080": 188}
    # With the source port, the one slot the kernel's jhash takes.
    seen = set()
    for sport in range(40000, 40012):
        one = trace_json(cluster, *ARGS, "--sport", str(sport))
        assert one["packet"]["sport"] == sport
        (ep,) = one["endpoints"]
        assert one["probabilities"] == {ep: 1.0}
        assert one["balancing"][0]["slot"] in range(251)
        seen.add(ep)
    assert seen == {"198.51.100.11:8080", "198.51.100.12:8080"}
    res = runner.invoke(app, ["trace", cluster, *ARGS, "--sport", "40000"])
    assert "for this source port" in res.stdout


def test_sport_out_of_range_is_a_usage_error() -> None:
    res = runner.invoke(app, ["trace", DEMO, *ARGS, "--sport", "0"])
    assert res.exit_code == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_node_address_outside_nodeportaddresses(backend: str, tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    web = {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}
    cluster.write_text(
        dump([
            node_config(nodePortAddresses=["198.18.0.0/24"], clusterCIDRs=["198.51.100.0/24"]),
            service("web", "203.0.113.10", ports=[web], type="NodePort"),
            endpoint_slice("web", [endpoint("198.51.100.11")]),
        ])
    )  # fmt: skip

    def verdict(dst: str, *extra: str) -> str:
        args = [str(cluster), "-b", backend, "--src", "192.0.2.100", "--dst", dst]
        return str(trace_json(*args, "--port", "30080", *extra)["verdict"])

    assert verdict("198.18.0.1", "--node-address", "198.18.0.1") == "dnat"
    assert verdict("198.18.0.1") == "untouched"
    assert verdict("198.19.0.1", "--node-address", "198.19.0.1") == "untouched"
    assert verdict("192.0.2.1") == "untouched"  # the nodeIP is outside 198.18.0.0/24


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--src", "2001:db8::1", "--dst", "203.0.113.10", "--port", "80"], "same IP family"),
        (["--src", "198.51.100.300", "--dst", "203.0.113.10", "--port", "80"], "--src"),
        (["--src", "198.51.100.12", "--dst", "shop-web", "--port", "80"], "--dst"),
        (
            [
                "--src",
                "198.51.100.12",
                "--dst",
                "203.0.113.10",
                "--port",
                "80",
                "--node-address",
                "node-a",
            ],
            "--node-address",
        ),
        (["--src", "198.51.100.12", "--port", "80"], "--dst and --port are required"),
        (["--src", "198.51.100.12", "--dst", "203.0.113.10"], "--port"),
        (["--dst", "203.0.113.10", "--port", "80"], "--src is required"),
        (["--src", "198.51.100.12", "--dst", "203.0.113.10", "--port", "80", "-b", "pf"], "pf"),
        (["--src", "198.51.100.12", "--dst", "203.0.113.10", "--port", "0"], "--port"),
        (["--src", "1.2.3.4", "--dst", "203.0.113.10", "--port", "80", "--proto", "icmp"], "icmp"),
    ],
)
def test_trace_errors_exit_2_with_nothing_on_stdout(args: list[str], message: str) -> None:
    res = runner.invoke(app, ["trace", DEMO, *args])
    assert res.exit_code == 2
    assert res.stdout == ""
    assert message in res.stderr


def test_trace_without_input_is_a_usage_error() -> None:
    res = runner.invoke(app, ["trace", "--src", "1.2.3.4", "--dst", "203.0.113.10", "--port", "80"])
    assert res.exit_code == 2 and res.stdout == ""


def test_trace_through_python_dash_m() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "svcrules",
            "trace",
            DEMO,
            "--src",
            "198.51.100.12",
            "--dst",
            "203.0.113.99",
            "--port",
            "80",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(run.stdout)
    assert out["verdict"] == "drop"  # unallocated in serviceCIDRs
    assert out["endpoints"] == [] and out["probabilities"] == {}


# -- check --packets -------------------------------------------------------------------


def write_cases(path: Path, doc: object) -> str:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


GOOD_CASE = {
    "name": "a pod reaches shop/web",
    "src": "198.51.100.12",
    "dst": "203.0.113.10",
    "port": 80,
    "verdict": "dnat",
    "endpoints": WEB,
    "masquerade": False,
}


def test_check_packets_on_the_demo_holds() -> None:
    res = runner.invoke(app, ["check", "--packets", CASES, DEMO])
    assert res.exit_code == 0, res.stdout + res.stderr
    assert res.stdout == ""
    assert "all 13 packet cases hold on nftables and iptables" in res.stderr


def test_check_packets_python_dash_m() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "svcrules", "check", "--packets", CASES, DEMO],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr


def test_check_packets_one_wrong_expectation(tmp_path: Path) -> None:
    wrong = {**GOOD_CASE, "name": "wrongly expected", "endpoints": ["198.51.100.11:8080"]}
    path = write_cases(tmp_path / "cases.yaml", {"cases": [GOOD_CASE, wrong]})
    res = runner.invoke(app, ["check", "--packets", path, DEMO])
    assert res.exit_code == 1
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["case", "backend", "field", "expected", "got"]
    assert len(lines) == 3  # one row per backend
    label = "wrongly expected (tcp 198.51.100.12 -> 203.0.113.10:80)"
    for line, backend in zip(lines[1:], BACKENDS, strict=True):
        assert line.startswith(label)
        rest = line[len(label) :].split(None, 3)
        assert rest[:3] == [backend, "endpoints", "198.51.100.11:8080"]
        assert rest[3] == "198.51.100.11:8080, 198.51.100.12:8080"
    assert "a pod reaches shop/web" not in res.stdout
    assert "1 of 2 packet cases do not hold" in res.stderr


def test_check_packets_wrong_verdict_and_masquerade(tmp_path: Path) -> None:
    case = {**GOOD_CASE, "name": "", "verdict": "reject", "masquerade": True}
    del case["endpoints"]
    path = write_cases(tmp_path / "cases.yaml", {"cases": [case]})
    res = runner.invoke(app, ["check", "--packets", path, DEMO])
    assert res.exit_code == 1
    rows = {tuple(line.split()[-4:]) for line in res.stdout.splitlines()[1:]}
    assert rows == {
        ("nftables", "verdict", "reject", "dnat"),
        ("iptables", "verdict", "reject", "dnat"),
        ("nftables", "masquerade", "true", "false"),
        ("iptables", "masquerade", "true", "false"),
    }


@pytest.mark.parametrize(
    ("doc", "field", "why"),
    [
        ({"cases": [{**GOOD_CASE, "colour": "red"}]}, "cases[0].colour", "unknown field"),
        ({"cases": [{**GOOD_CASE, "port": "80"}]}, "cases[0].port", "integer"),
        ({"cases": [{**GOOD_CASE, "port": 70000}]}, "cases[0].port", "65535"),
        ({"cases": [{**GOOD_CASE, "verdict": "accept"}]}, "cases[0].verdict", "'accept'"),
        ({"cases": [{**GOOD_CASE, "proto": "icmp"}]}, "cases[0].proto", "'icmp'"),
        ({"cases": [{**GOOD_CASE, "fromNode": "yes"}]}, "cases[0].fromNode", "bool"),
        ({"cases": {"first": GOOD_CASE}}, "cases", "list"),
        ({"cases": []}, "cases", "at least 1"),
        ({"cases": [GOOD_CASE], "nodeAddress": ["198.18.0.1"]}, "nodeAddress", "unknown"),
        ({"cases": [{k: v for k, v in GOOD_CASE.items() if k != "dst"}]}, "cases[0].dst", ""),
        ([GOOD_CASE], "document 1", "dictionary"),
    ],
)
def test_check_packets_malformed_file_exits_2(
    tmp_path: Path, doc: object, field: str, why: str
) -> None:
    path = write_cases(tmp_path / "cases.yaml", doc)
    res = runner.invoke(app, ["check", "--packets", path, DEMO])
    assert res.exit_code == 2
    assert res.stdout == ""
    assert f"svcrules: error: {path}: " in res.stderr
    assert field in res.stderr
    assert why.lower() in res.stderr.lower()


@pytest.mark.parametrize(
    ("text", "why"),
    [("cases: [\n", "not valid YAML"), ("", "one document expected, found 0")],
)
def test_check_packets_unreadable_file_exits_2(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "cases.yaml"
    path.write_text(text)
    res = runner.invoke(app, ["check", "--packets", str(path), DEMO])
    assert res.exit_code == 2 and res.stdout == ""
    assert str(path) in res.stderr and why in res.stderr


def test_check_packets_missing_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    res = runner.invoke(app, ["check", "--packets", str(path), DEMO])
    assert res.exit_code == 2 and res.stdout == ""
    assert str(path) in res.stderr


def test_check_packets_case_the_tracer_refuses_exits_2(tmp_path: Path) -> None:
    mixed = {**GOOD_CASE, "src": "2001:db8:2::12"}
    path = write_cases(tmp_path / "cases.yaml", {"cases": [GOOD_CASE, mixed]})
    res = runner.invoke(app, ["check", "--packets", path, DEMO])
    assert res.exit_code == 2 and res.stdout == ""
    assert path in res.stderr and "cases[1]" in res.stderr and "same IP family" in res.stderr


def test_check_packets_node_addresses(tmp_path: Path) -> None:
    case = {
        "src": "192.0.2.100",
        "dst": "198.18.0.1",
        "port": 30040,
        "verdict": "dnat",
        "endpoints": ["198.51.100.32:8080"],
    }
    without = write_cases(tmp_path / "without.yaml", {"cases": [case]})
    assert runner.invoke(app, ["check", "--packets", without, POLICIES]).exit_code == 1
    doc = {"nodeAddresses": ["198.18.0.1"], "cases": [case]}
    res = runner.invoke(
        app, ["check", "--packets", write_cases(tmp_path / "with.yaml", doc), POLICIES]
    )
    assert res.exit_code == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--packets", CASES, "--golden", str(ROOT / "tests" / "golden" / "demo.nft")],
    ],
    ids=["neither", "both"],
)
def test_check_needs_exactly_one_of_golden_and_packets(args: list[str]) -> None:
    res = runner.invoke(app, ["check", *args, DEMO])
    assert res.exit_code == 2
    assert res.stdout == ""
    assert "give one of --golden FILE or --packets FILE" in res.stderr


def test_trace_missing_port_says_it_is_required() -> None:
    res = runner.invoke(app, ["trace", DEMO, "--src", "198.51.100.12", "--dst", "203.0.113.10"])
    assert res.exit_code == 2 and res.stdout == ""
    assert "--dst and --port are required" in res.stderr


def test_check_packets_ipv6_case_label_brackets_the_address(tmp_path: Path) -> None:
    case = {"src": "2001:db8:2::12", "dst": "2001:db8:3::53", "port": 53, "proto": "udp"}
    path = write_cases(tmp_path / "cases.yaml", {"cases": [{**case, "verdict": "drop"}]})
    res = runner.invoke(app, ["check", "--packets", path, DEMO])
    assert res.exit_code == 1
    assert "udp 2001:db8:2::12 -> [2001:db8:3::53]:53" in res.stdout
