"""``svcrules trace --kernel`` (svcrules.kernel.trace.trace_kernel) asked in the lab's
node, once per backend (nftables, iptables-nft, iptables-legacy): the answer must be
what the packet really met, down to the pod that answered the connection.

Each trace runs in the node namespace (tests/kernel/trace_run.py). Where the packet
comes from the client, the trace waits for it and the test sends it once the trace
says "send it now"; from the node, the function sends it itself. After every test
the node holds nothing of the trace (no table, chain or jump; nf_log as it was).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s import endpoint, endpoint_slice, service

from . import backends
from .lab import Lab, Result
from .test_semantics import CIP, CIP6, CLIENT, NODE, POD, POD6, eps, load, ok, web, web_slice

RUN = Path(__file__).with_name("trace_run.py")
EMPTY = "203.0.113.11"  # a Service without endpoints
UNUSED = "203.0.113.50"  # in serviceCIDRs, no Service
NF_LOG = ("/proc/sys/net/netfilter/nf_log/2", "/proc/sys/net/netfilter/nf_log/10")

Answer = dict[str, Any]


@pytest.fixture(params=backends.BACKENDS)
def backend(lab: Lab, request: pytest.FixtureRequest) -> Iterator[str]:
    """The backend under test, with the lab's node holding its rules for ``web``
    (pod2, pod3) and ``empty``; afterwards, nothing of the trace may be left."""
    name = request.param
    backends.require(name)
    lab.backend = name  # type: ignore[attr-defined]
    before = snapshot(lab, name)
    load(
        lab,
        web(),
        web_slice(eps("pod2", "pod3")),
        service("empty", EMPTY),
        endpoint_slice("empty", []),
    )
    yield name
    try:
        assert "-trace" not in lab.nft("list", "tables")
        if name != "nftables":
            variant = name.split("-", 1)[1]
            raw = lab.exec("node", backends.tool(variant, "ipv4"), "-t", "raw", "-S").stdout
            assert "TRACE" not in raw
        assert snapshot(lab, name)["nf_log"] == before["nf_log"]
        host = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        assert "-trace" not in host
    finally:
        if name == "iptables-legacy":
            backends.reset_legacy(lab)


def snapshot(lab: Lab, backend: str) -> dict[str, Any]:
    """What the trace may change in the node, without counters."""
    rules = re.sub(r"counter packets \d+ bytes \d+", "counter", lab.nft("list", "ruleset"))
    out: dict[str, Any] = {
        "nft": rules,
        "nf_log": [lab.exec("node", "cat", path).stdout for path in NF_LOG],
    }
    if backend == "iptables-legacy":
        out["legacy"] = [
            backends.rules_only(lab.exec("node", "iptables-legacy-save", "-t", t).stdout)
            for t in ("raw", "nat", "filter")
        ]
    return out


def argv(lab: Lab, backend: str, packet: dict[str, Any], **kw: Any) -> list[str]:
    name, _, variant = backend.partition("-")
    args: dict[str, Any] = {"packet": packet, "backend": name, **kw}
    if variant:
        args["iptables_variant"] = variant
    return ["ip", "netns", "exec", lab.netns("node"), sys.executable, str(RUN), json.dumps(args)]


def answer(stdout: str, stderr: str) -> Answer:
    try:
        out: Answer = json.loads(stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"no answer:\n{stdout}\n{stderr}") from None
    return out


def sent(lab: Lab, backend: str, **packet: Any) -> Answer:
    """The trace of a packet the function sends itself."""
    proc = subprocess.run(
        argv(lab, backend, packet), capture_output=True, text=True, timeout=60, check=False
    )
    return answer(proc.stdout, proc.stderr)


def awaited(
    lab: Lab, backend: str, send: Callable[[], list[Result]], **packet: Any
) -> tuple[Answer, list[Result]]:
    """The trace of a packet the client sends once the trace waits for it."""
    proc = subprocess.Popen(
        argv(lab, backend, packet), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    try:
        said = proc.stderr.readline()
        assert said.endswith("; send it now\n"), said + proc.stderr.read()
        results = send()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return answer(out, said + err), results


def own_steps(backend: str, got: Answer) -> list[dict[str, str]]:
    """The steps, each checked to be in svcrules' own table or chains."""
    steps: list[dict[str, str]] = got["chains"]
    for step in steps:
        if backend == "nftables":
            assert step["table"] == "ip svcrules", step
        else:
            assert step["table"] in ("ipv4 nat", "ipv4 filter"), step
            builtin = ("PREROUTING", "OUTPUT", "POSTROUTING", "INPUT", "FORWARD")
            assert step["chain"].startswith("SVCRULES-") or step["chain"] in builtin, step
    return steps


def test_clusterip_from_the_client_is_dnatted_to_the_pod_that_answered(
    lab: Lab, backend: str
) -> None:
    got, results = awaited(
        lab,
        backend,
        lambda: lab.probe("client", CIP, 80, count=1),
        src=CLIENT,
        dst=CIP,
        port=80,
    )
    pod = ok(results)[0].backend
    assert pod is not None
    endpoint = f"{POD[pod]}:8080"
    assert got["backend"] == f"{backend} (kernel)"
    assert (got["verdict"], got["endpoints"], got["probabilities"]) == (
        "dnat",
        [endpoint],
        {endpoint: 1.0},
    )
    # The client is outside clusterCIDRs: masqueraded (SEMANTICS 6).
    assert got["masquerade"] is True and got["masqueraded"] == [endpoint]
    assert got["masquerade_reason"] and set(map(str, got["masquerade_reason"])) <= set(
        map(str, got["chains"])
    )
    steps = own_steps(backend, got)
    if backend == "nftables":
        assert steps[0] == {
            "table": "ip svcrules",
            "chain": "nat-prerouting",
            "rule": "jump services",
        }
        assert any(s["rule"].startswith("meta l4proto tcp dnat ip to") for s in steps)
    else:
        assert steps[0]["chain"] == "PREROUTING"
        assert any(f"--to-destination {endpoint}" in s["rule"] for s in steps)


def test_from_the_node_the_function_sends_the_packet(lab: Lab, backend: str) -> None:
    got = sent(lab, backend, src=NODE, dst=CIP, port=80, from_node=True)
    assert got["packet"]["from_node"] is True
    assert got["verdict"] == "dnat"
    assert got["endpoints"] in ([f"{POD['pod2']}:8080"], [f"{POD['pod3']}:8080"])
    assert got["masquerade"] is True
    first = own_steps(backend, got)[0]
    assert first["chain"] == ("nat-output" if backend == "nftables" else "OUTPUT")


def test_a_service_without_endpoints_rejects(lab: Lab, backend: str) -> None:
    got, results = awaited(
        lab,
        backend,
        lambda: lab.probe("client", EMPTY, 80, count=1),
        src=CLIENT,
        dst=EMPTY,
        port=80,
    )
    assert [r.outcome for r in results] == ["refused"]
    assert (got["verdict"], got["endpoints"], got["masquerade"]) == ("reject", [], False)
    assert "reject" in own_steps(backend, got)[-1]["rule"].lower()
    # UDP, sent from the node, to a port the ClusterIP does not serve: rejected too.
    udp = sent(lab, backend, src=NODE, dst=EMPTY, port=53, proto="udp", from_node=True)
    assert udp["verdict"] == "reject"


def test_an_unused_service_cidr_address_drops(lab: Lab, backend: str) -> None:
    got, results = awaited(
        lab,
        backend,
        lambda: lab.probe("client", UNUSED, 80, count=1, timeout=0.5),
        src=CLIENT,
        dst=UNUSED,
        port=80,
    )
    assert [r.outcome for r in results] == ["timeout"]
    assert (got["verdict"], got["endpoints"]) == ("drop", [])
    assert "drop" in own_steps(backend, got)[-1]["rule"].lower()


def test_a_pod_ip_is_untouched(lab: Lab, backend: str) -> None:
    got, results = awaited(
        lab,
        backend,
        lambda: lab.probe("client", POD["pod1"], 8080, count=1),
        src=CLIENT,
        dst=POD["pod1"],
        port=8080,
    )
    assert ok(results)[0].seen_src == CLIENT
    assert (got["verdict"], got["endpoints"], got["masquerade"]) == ("untouched", [], False)
    assert not any("dnat" in s["rule"].lower() for s in own_steps(backend, got))


def test_ipv6(lab: Lab, backend: str) -> None:
    svc = service("web6", [CIP, CIP6], ports=[{"name": "http", "port": 80}])
    v6 = endpoint_slice(
        "web6", [endpoint(POD6["pod3"])], ports=[{"name": "http", "port": 8080}], family="IPv6"
    )
    load(lab, svc, v6)
    got, results = awaited(
        lab,
        backend,
        lambda: lab.probe("client", CIP6, 80, count=1),
        src=lab.client_ip6,
        dst=CIP6,
        port=80,
    )
    assert ok(results)[0].backend == "pod3"
    endpoint6 = f"[{POD6['pod3']}]:8080"
    assert (got["verdict"], got["endpoints"], got["masquerade"]) == ("dnat", [endpoint6], True)
    steps = got["chains"]
    if backend == "nftables":
        assert {s["table"] for s in steps} == {"ip6 svcrules"}
    else:
        # iptables-nft's IPv6 events come from nft monitor: the rules are still shown
        # as ip6tables writes them.
        assert {s["table"] for s in steps} == {"ipv6 nat", "ipv6 filter"}
        assert not any(s["rule"].startswith("-A ") for s in steps), steps
        assert any(f"--to-destination {endpoint6}" in s["rule"] for s in steps)


def test_a_timeout_or_sigterm_leaves_the_node_as_it_was(lab: Lab, backend: str) -> None:
    before = snapshot(lab, backend)
    packet = {"src": CLIENT, "dst": CIP, "port": 80}
    proc = subprocess.run(
        argv(lab, backend, packet, timeout=0.5), capture_output=True, text=True, check=False
    )
    assert proc.stderr == f"waiting up to 0.5 s for tcp {CLIENT} -> {CIP}:80; send it now\n"
    got = answer(proc.stdout, proc.stderr)
    assert got["type"] == "TraceError" and "arrived within 0.5 s" in got["error"], got
    assert snapshot(lab, backend) == before

    waiting = subprocess.Popen(
        argv(lab, backend, packet, timeout=30), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert waiting.stderr is not None
    assert waiting.stderr.readline().endswith(b"send it now\n")
    assert snapshot(lab, backend) != before, "the trace rule is in place while it waits"
    waiting.send_signal(signal.SIGTERM)
    waiting.communicate(timeout=30)
    assert waiting.returncode != 0
    assert snapshot(lab, backend) == before


def test_what_a_killed_trace_left_is_cleared_by_the_next(lab: Lab, backend: str) -> None:
    before = snapshot(lab, backend)
    packet = {"src": CLIENT, "dst": CIP, "port": 80}
    killed = subprocess.Popen(
        argv(lab, backend, packet, timeout=30), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert killed.stderr is not None
    assert killed.stderr.readline().endswith(b"send it now\n")
    killed.kill()
    killed.communicate(timeout=30)
    assert snapshot(lab, backend) != before
    got = sent(lab, backend, src=NODE, dst=CIP, port=80, from_node=True)
    assert got["verdict"] == "dnat"
    assert snapshot(lab, backend) == before


def test_a_table_of_the_trace_name_that_svcrules_did_not_make_is_left_alone(lab: Lab) -> None:
    lab.load("table ip svcrules-trace {\n\tchain c {\n\t}\n}\n")
    before = lab.nft("list", "ruleset")
    got = sent(lab, "nftables", src=NODE, dst=CIP, port=80, from_node=True)
    assert got["type"] == "KernelError"
    assert "table ip svcrules-trace exists and was not made by svcrules trace" in got["error"]
    assert lab.nft("list", "ruleset") == before


def cli(lab: Lab, backend: str, inputs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``svcrules trace --kernel INPUTS ...`` in the node, for the backend under test."""
    name, _, variant = backend.partition("-")
    flags = ["--backend", name] + (["--iptables", variant] if variant else [])
    cmd = [sys.executable, "-m", "svcrules", "trace", "--kernel", str(inputs), *flags, *args]
    return lab.exec("node", *cmd, check=False, timeout=60)


def test_the_command_prints_prediction_and_kernel_and_whether_they_agree(
    lab: Lab, backend: str, tmp_path: Path
) -> None:
    """With the inputs the node's rules came from, the kernel's endpoint is one the
    rules predict (exit 0); with inputs that name another endpoint, the two disagree
    and the command says so with exit code 1."""
    from tests.k8s import dump

    from .test_semantics import cfg

    same = tmp_path / "same.yaml"
    same.write_text(dump([cfg(), web(), web_slice(eps("pod2", "pod3"))]))
    packet = ["--from-node", "--dst", CIP, "--port", "80", "-o", "json"]
    proc = cli(lab, backend, same, *packet)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["agree"] is True
    assert doc["predicted"]["endpoints"] == [f"{POD['pod2']}:8080", f"{POD['pod3']}:8080"]
    assert doc["kernel"]["endpoints"][0] in doc["predicted"]["endpoints"]
    other = tmp_path / "other.yaml"
    other.write_text(dump([cfg(), web(), web_slice(eps("pod1"))]))
    proc = cli(lab, backend, other, *packet[:-2])
    assert proc.returncode == 1, proc.stderr
    assert "agree: NO" in proc.stdout
    assert "predicted from the rules:" in proc.stdout and "seen in the kernel:" in proc.stdout
