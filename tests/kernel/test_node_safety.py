"""Safety on a node, with real rules: a failed source never wipes Services, a large
removal is refused, every failure is visible, a kill at any moment converges, the
lock covers apply, tools are found under cron's PATH, non-root is told so."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.k8s import Obj, dump, endpoint_slice, service

from . import backends
from .converge import Runner, runner_for
from .lab import Lab
from .nodes import CIP_B, Node, svc_a, svc_b
from .test_semantics import CIP, cfg, ok

CIP_C = "203.0.113.30"

# Runs the svcrules CLI, but SIGKILLs itself the moment the kernel has the new rules
# and the state is about to be written: the window a crash can hit.
KILL_BEFORE_STATE = (
    "import os, signal, sys\n"
    "from svcrules.kernel import state\n"
    "def die(*a, **k):\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "state.StateStore.save = die\n"
    "from svcrules.cli import main\n"
    "sys.argv = ['svcrules', *sys.argv[1:]]\n"
    "main()\n"
)


@pytest.fixture
def node(lab: Lab, tmp_path: Path) -> Node:
    return Node(lab, tmp_path)


def svc_c(*pods: str) -> list[Obj]:
    return [
        service("c", CIP_C, ports=[{"name": "http", "port": 80}]),
        endpoint_slice("c", [e for e in svc_a(*pods)[1]["endpoints"]]),
    ]


def ns_cmd(lab: Lab, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", lab.netns("node"), *cmd]


def test_failed_kubectl_pipe_keeps_every_service(lab: Lab, node: Node) -> None:
    node.apply(*svc_a("pod2"), *svc_b("pod3"))
    before = lab.nft("list", "ruleset")
    prom = node.tmp / "m.prom"
    pipe = "(echo 'error: You must be logged in to the server (Unauthorized)' >&2) | "
    config = node.tmp / "node.yaml"
    config.write_text(dump([cfg()]))
    for with_config in (["--config", str(config)], []):
        cmd = [*node.cmd("sync", "-f", "-"), *with_config, "--metrics-file", str(prom)]
        proc = subprocess.run(
            ns_cmd(lab, "bash", "-c", pipe + " ".join(cmd)),
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert "<stdin>: empty input" in proc.stderr and "pipefail" in proc.stderr
        assert lab.nft("list", "ruleset") == before
    assert lab.backends(ok(lab.probe("client", CIP_B, 80, count=3))) == {"pod3"}
    text = prom.read_text()
    assert 'svcrules_last_sync_success{table="svcrules"} 0' in text
    assert 'svcrules_sync_failures_total{table="svcrules"} 2' in text
    # A file holding only other kinds is just as empty.
    node.inputs.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n")
    proc = node.run("sync", "--config", str(node.tmp / "none.yaml"))
    assert proc.returncode == 2 and lab.nft("list", "ruleset") == before


def test_large_removal_is_refused_unless_forced(lab: Lab, node: Node) -> None:
    node.apply(*svc_a("pod2"), *svc_b("pod3"), *svc_c("pod4"))
    before = lab.nft("list", "ruleset")
    node.write(*svc_a("pod2"))
    proc = node.run("sync")
    assert proc.returncode == 2 and "refusing to remove 2 of 3" in proc.stderr, proc.stderr
    assert lab.nft("list", "ruleset") == before
    assert lab.backends(ok(lab.probe("client", CIP_C, 80, count=3))) == {"pod4"}
    assert node.run("sync", "--max-removals", "70").returncode == 0
    assert CIP_C not in lab.nft("list", "ruleset")


@pytest.fixture(params=backends.BACKENDS)
def runner(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Runner]:
    yield from runner_for(lab, tmp_path, request.param)


def _killed(r: Runner, objs: list[Obj], delay: float | None) -> None:
    """``apply`` of ``objs`` killed after ``delay`` seconds, or (None) the moment the
    kernel holds the new rules and the state is about to be written."""
    r.write(objs)
    args = ["apply", str(r.inputs), "--force", *r.flags(), "--state-dir", str(r.state)]
    if delay is None:
        cmd = ns_cmd(r.lab, sys.executable, "-c", KILL_BEFORE_STATE, *args)
        assert subprocess.run(cmd, check=False).returncode == -signal.SIGKILL
        return
    proc = subprocess.Popen(
        ns_cmd(r.lab, sys.executable, "-m", "svcrules", *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_kill_after_the_kernel_commit_converges(runner: Runner) -> None:
    """The kernel holds v2 but the state still v1; the input goes back to v1: the next
    run must see the difference (it used to say "no change")."""
    r, lab = runner, runner.lab
    v1 = [*svc_a("pod2"), *svc_b("pod3")]
    assert r.sync(v1).returncode == 0
    _killed(r, [*svc_a("pod4"), *svc_b("pod3")], None)
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=4))) == {"pod4"}
    r.write(v1)
    proc = r.run("diff")
    assert proc.returncode == 1 and "full replacement" in proc.stdout, proc.stdout
    proc = r.sync(v1)
    assert proc.returncode == 0 and "applied: full" in proc.stderr, proc.stderr
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=4))) == {"pod2"}
    assert r.content() == r.clean(v1)


def test_kills_at_random_moments_converge(runner: Runner) -> None:
    r = runner
    rng = random.Random(1)
    versions = [
        [*svc_a("pod2"), *svc_b("pod3")],
        [*svc_a("pod1", "pod4", sessionAffinity="ClientIP"), *svc_b("pod3"), *svc_c("pod2")],
        [*svc_a("pod3"), *svc_c("pod2", "pod4")],
    ]
    for i in range(6):
        objs = versions[i % len(versions)]
        _killed(r, objs, rng.uniform(0.05, 0.8) if i % 3 else None)
        synced = r.sync(objs, "--force")
        assert synced.returncode == 0, synced.stderr
        assert r.content() == r.clean(objs), f"after kill {i}: {synced.stderr}"


def test_apply_waits_for_the_lock(lab: Lab, node: Node) -> None:
    node.apply(*svc_a("pod2"))
    before = lab.nft("list", "ruleset")
    node.write(*svc_a("pod3"))
    fd = os.open(node.state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = node.run("apply", "--lock-timeout", "0.5")
        assert proc.returncode == 2 and "gave up after 0.5s" in proc.stderr, proc.stderr
        assert lab.nft("list", "ruleset") == before
        proc = node.run("cleanup", "--lock-timeout", "0.5", with_inputs=False)
        assert proc.returncode == 2 and lab.nft("list", "ruleset") == before
    finally:
        os.close(fd)
    assert "incremental" in node.apply(*svc_a("pod3"))


def test_cron_path_finds_iptables_and_conntrack(lab: Lab, node: Node) -> None:
    udp = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    objs = [service("a", CIP, ports=udp), endpoint_slice("a", svc_a("pod2")[1]["endpoints"])]
    objs[1]["ports"] = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    cron = ["env", "-i", "PATH=/usr/bin:/bin"]
    for backend in ("iptables", "nftables"):
        node.state = node.tmp / f"state-{backend}"
        node.write(*objs)
        proc = lab.exec(
            "node",
            *cron,
            *node.cmd("sync", str(node.inputs), "--backend", backend),
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        lab.exec(
            "node",
            "conntrack",
            "-I",
            "-p",
            "udp",
            "-s",
            "192.0.2.100",
            "-d",
            CIP,
            "--sport",
            "4000",
            "--dport",
            "53",
            "--timeout",
            "100",
            check=False,
        )
        objs[1]["endpoints"] = svc_a("pod3")[1]["endpoints"]
        node.write(*objs)
        proc = lab.exec(
            "node",
            *cron,
            *node.cmd("sync", str(node.inputs), "--backend", backend),
            check=False,
        )
        assert proc.returncode == 0 and "not found" not in proc.stderr, proc.stderr
        proc = lab.exec("node", *cron, *node.cmd("cleanup", "--backend", backend), check=False)
        assert proc.returncode == 0, proc.stderr
        objs[1]["endpoints"] = svc_a("pod2")[1]["endpoints"]


def test_non_root_is_told_it_needs_cap_net_admin(lab: Lab, node: Node) -> None:
    node.apply(*svc_a("pod2"))
    before = lab.nft("list", "ruleset")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    for verb in ("diff", "sync", "apply", "cleanup"):
        args = [] if verb == "cleanup" else [str(node.inputs)]
        proc = lab.exec("node", *nobody, *node.cmd(verb, *args), check=False)
        assert proc.returncode == 2 and proc.stdout == "", (verb, proc.stdout, proc.stderr)
        assert "CAP_NET_ADMIN" in proc.stderr and "Traceback" not in proc.stderr
    assert lab.nft("list", "ruleset") == before


def test_one_invalid_service_does_not_block_the_others(lab: Lab, node: Node) -> None:
    """sync skips what it cannot program (a ClusterIP claimed twice, a bad port) and
    programs the rest; apply, by default, refuses the whole input."""
    node.apply(*svc_a("pod2"))
    older = service("b", CIP_B, ports=[{"name": "http", "port": 80}])
    older["metadata"]["creationTimestamp"] = "2024-01-01T00:00:00Z"
    newer = service("dup", CIP_B, ports=[{"name": "http", "port": 80}])
    newer["metadata"]["creationTimestamp"] = "2025-01-01T00:00:00Z"
    broken = service("broken", CIP_C, ports=[{"name": "http", "port": 70000}])
    objs = [*svc_a("pod2"), older, svc_b("pod3")[1], newer, broken]
    node.write(*objs)
    assert node.run("apply").returncode == 2
    assert lab.outcomes(lab.probe("client", CIP_B, 80, count=2))["ok"] == 0
    prom = node.tmp / "m.prom"
    for _ in range(2):  # the second run compiles nothing and still reports them
        proc = node.run("sync", "--metrics-file", str(prom))
        assert proc.returncode == 3, proc.stderr
        assert proc.stderr.count("left out: ") == 2, proc.stderr
        assert "default/dup" in proc.stderr and "default/broken" in proc.stderr
        assert 'svcrules_invalid_objects{table="svcrules"} 2' in prom.read_text()
    assert lab.backends(ok(lab.probe("client", CIP_B, 80, count=3))) == {"pod3"}
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod2"}
    node.write(*svc_a("pod2"), older, svc_b("pod3")[1])
    proc = node.run("sync", "--metrics-file", str(prom))
    assert proc.returncode == 0 and "left out" not in proc.stderr, proc.stderr
    assert 'svcrules_invalid_objects{table="svcrules"} 0' in prom.read_text()
