"""diff / apply / sync / cleanup with ``--backend iptables``, on iptables-nft and
iptables-legacy, in the lab's node namespace.

What matters here beyond packets: a change names only the chains it must, other
owners' chains and rules are never touched, a refused change leaves the previous
rules in place, and switching backends with cleanup in between leaves no trace.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.k8s import endpoint_slice

from . import backends
from .lab import Lab
from .nodes import (
    CIP_B,
    VARIANTS,
    IptablesNode,
    Node,
    chains_named,
    node_for,
    ops,
    svc_a,
    svc_b,
)
from .test_semantics import CIP, CLIENT, FOREIGN_IPTABLES, LB, NODE, dropped, eps, ok, refused, web


@pytest.fixture(params=VARIANTS)
def node(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    yield from node_for(lab, tmp_path, f"iptables-{request.param}")


def test_noop_and_one_endpoint_change_name_only_their_chains(lab: Lab, node: IptablesNode) -> None:
    first = node.apply(*svc_a("pod2"), *svc_b("pod3"))
    assert "full replacement (no saved state" in first
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=4))) == {"pod2"}
    assert "Kernel: no change (0 operations)" in node.apply(*svc_a("pod2"), *svc_b("pod3"))
    assert node.transaction(*svc_a("pod2"), *svc_b("pod3")) == ""
    tx = node.transaction(*svc_a("pod4"), *svc_b("pod3"))
    # a's endpoint chains and its Service chain, and the fingerprint: nothing of b, no
    # frontend dispatch, no built-in chain.
    assert chains_named(tx) == {"SVC", "SEP", "STATE"}, tx
    assert tx.count("COMMIT") == 1 and "*nat" in tx, "one table: IPv4 nat"
    assert "203.0.113.20" not in tx
    b_chains = [ln for ln in node.own() if "default/b" in ln]
    summary = node.apply(*svc_a("pod4"), *svc_b("pod3"))
    assert "incremental update" in summary and ops(summary) <= 16, summary
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=6))) == {"pod4"}
    assert lab.backends(ok(lab.probe("client", CIP_B, 80, count=3))) == {"pod3"}
    assert [ln for ln in node.own() if "default/b" in ln] == b_chains
    proc = node.run("diff")
    assert proc.returncode == 0 and "no change" in proc.stdout


def test_add_remove_service_and_change_port(lab: Lab, node: IptablesNode) -> None:
    node.apply(*svc_a("pod2"))
    summary = node.apply(*svc_a("pod2"), *svc_b("pod3"))
    assert "1 added" in summary and "incremental" in summary
    assert lab.backends(ok(lab.probe("client", CIP_B, 80, count=3))) == {"pod3"}
    assert "incremental" in node.apply(*svc_a("pod2"), *svc_b("pod3", port=81))
    refused(lab.probe("client", CIP_B, 80, count=2))
    assert lab.backends(ok(lab.probe("client", CIP_B, 81, count=3))) == {"pod3"}
    summary = node.apply(*svc_a("pod2"))
    assert "1 removed" in summary and "chains +0 ~4 -2" in summary, (
        summary
    )  # IPv4 only: STATE, SERVICES
    dropped(lab.probe("client", CIP_B, 81, count=2, timeout=0.5, concurrency=2))
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod2"}
    assert not [ln for ln in node.own() if "default/b" in ln]


def test_other_owners_are_untouched_and_cleanup_leaves_no_trace(
    lab: Lab, node: IptablesNode
) -> None:
    lab.exec(
        "node",
        backends.tool(node.variant, "ipv4", "-restore"),
        "--noflush",
        input=FOREIGN_IPTABLES,
    )
    foreign = node.others()
    node.apply(*svc_a("pod2"), *svc_b("pod3"))
    assert node.others() == foreign
    node.write(*svc_a("pod3"))
    assert lab.exec("node", *node.cmd("sync", str(node.inputs))).returncode == 0
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod3"}
    assert node.others() == foreign
    # The other owner's jump still works: its DNAT of 100.64.0.250 is in place.
    assert lab.backends(ok(lab.probe("client", "100.64.0.250", 80, count=2))) == {"pod4"}
    proc = node.run("cleanup", with_inputs=False)
    assert proc.returncode == 0 and "ipv4 nat" in proc.stdout, proc.stdout + proc.stderr
    assert node.own() == [] and node.others() == foreign
    assert not (node.state / "last.iptables").exists()


def test_refused_change_puts_back_what_was_sent(lab: Lab, node: IptablesNode) -> None:
    lb = web(
        "LoadBalancer",
        cluster_ip="203.0.113.30",
        lb_ips=[LB],
        loadBalancerSourceRanges=["192.0.2.0/24"],
    )
    node.apply(lb, endpoint_slice("web", eps("pod2")), *svc_a("pod3"))
    fw = next(ln.split()[0][1:] for ln in node.own() if ln.startswith(":SVCRULES-FW-"))
    # Another owner jumps to svcrules' firewall chain: removing the Service then fails
    # in the filter table, after the nat table of the same family went through.
    node.ipt("-A", "FORWARD", "-s", "192.0.2.251/32", "-j", fw)
    before = node.own()
    node.write(*svc_a("pod3"))
    proc = node.run("apply")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert "refused the change" in proc.stderr, proc.stderr
    assert node.own() == before
    assert lab.backends(ok(lab.probe("client", LB, 80, count=3))) == {"pod2"}
    node.ipt("-D", "FORWARD", "-s", "192.0.2.251/32", "-j", fw)
    assert "incremental" in node.apply(*svc_a("pod3"))
    dropped(lab.probe("client", LB, 80, count=2, timeout=0.5, concurrency=2))


def test_a_lost_jump_is_drift_and_comes_back_once(lab: Lab, node: IptablesNode) -> None:
    node.apply(*svc_a("pod2"))
    jump = next(ln for ln in node.own() if ln.startswith("-A PREROUTING"))
    node.ipt("-t", "nat", "-D", *shlex.split(jump)[1:])
    assert lab.outcomes(lab.probe("client", CIP, 80, count=2, timeout=0.5)) != {"ok": 2}
    summary = node.apply(*svc_a("pod2"))
    assert "full replacement (the kernel's iptables rules differ" in summary
    assert sum(ln.startswith("-A PREROUTING") for ln in node.own()) == 2  # one a family
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod2"}
    assert "no change" in node.apply(*svc_a("pod2"))


def test_dry_run_and_verify(lab: Lab, node: IptablesNode) -> None:
    node.apply(*svc_a("pod2"))
    before = node.own()
    node.write(*svc_a("pod3"))
    proc = node.run("apply", "--dry-run")
    assert proc.returncode == 0 and "incremental update" in proc.stdout
    assert node.own() == before
    # A rule added to an owned chain is found by --verify only (the fingerprint holds).
    node.ipt("-t", "nat", "-A", "SVCRULES-SERVICES", "-d", "192.0.2.252/32", "-j", "RETURN")
    assert "no change" in node.apply(*svc_a("pod2"))
    proc = node.run("apply", "--verify")
    assert "full replacement (verification found drift" in proc.stdout, proc.stdout
    assert not [ln for ln in node.own() if "192.0.2.252" in ln]


def test_affinity_survives_a_full_replacement(lab: Lab, node: IptablesNode) -> None:
    # The recent lists live in the kernel by name, and iptables-restore checks the new
    # rules (taking a reference to each list) before it frees the old ones: a full
    # replacement keeps every pinned client.
    a = svc_a("pod1", "pod2", "pod3", sessionAffinity="ClientIP")
    node.apply(*a)
    pinned = lab.backends(ok(lab.probe("client", CIP, 80, count=8)))
    assert len(pinned) == 1
    for i in range(4):
        extra = f"192.0.2.{240 + i}/32"
        node.ipt("-t", "nat", "-A", "SVCRULES-SERVICES", "-d", extra, "-j", "RETURN")
        node.write(*a)
        proc = node.run("apply", "--verify")
        assert "full replacement (verification found drift" in proc.stdout, proc.stdout
        lists = lab.exec("node", "sh", "-c", "cat /proc/net/xt_recent/*").stdout
        assert f"src={CLIENT} " in lists
        assert lab.backends(ok(lab.probe("client", CIP, 80, count=8))) == pinned


def test_switching_backends_with_cleanup_leaves_no_trace(lab: Lab, node: IptablesNode) -> None:
    nft = Node(lab, node.tmp)  # the same state directory, default backend
    empty_ruleset = lab.nft("list", "ruleset")
    nft.apply(*svc_a("pod2"), web("NodePort", node_port=30080, cluster_ip="203.0.113.30"))
    # One backend at a time: the iptables backend refuses while nftables rules are in.
    node.write(*svc_a("pod2"))
    proc = node.run("apply")
    assert proc.returncode == 2 and "cleanup --backend nftables" in proc.stderr
    assert node.own() == []
    assert nft.run("cleanup", with_inputs=False).returncode == 0
    assert lab.nft("list", "ruleset") == empty_ruleset
    node.apply(*svc_a("pod3"), web("NodePort", node_port=30080, cluster_ip="203.0.113.30"))
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod3"}
    assert "svcrules" not in lab.nft("list", "tables")
    # The other iptables variant does not see these rules: it refuses to take over.
    other = IptablesNode(lab, node.tmp, "legacy" if node.variant == "nft" else "nft")
    other.write(*svc_a("pod3"))
    proc = other.run("apply")
    assert proc.returncode == 2 and f"--iptables {node.variant}" in proc.stderr, proc.stderr
    # A plain cleanup finds backend and variant in the state directory.
    assert nft.run("cleanup", with_inputs=False).returncode == 0
    assert node.own() == []
    assert lab.nft("list", "ruleset") == empty_ruleset, "iptables-nft tables left behind"
    nft.apply(*svc_a("pod2"))
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod2"}
    assert node.own() == []
    refused(lab.probe("client", NODE, 30080, count=2))


def test_missing_iptables_variant_is_a_clear_error(lab: Lab, node: IptablesNode) -> None:
    node.write(*svc_a("pod2"))
    env_cmd = ["env", "SVCRULES_TOOL_PATH=/nonexistent", *Node.cmd(node, "apply", str(node.inputs))]
    proc = subprocess.run(
        ["ip", "netns", "exec", lab.netns("node"), *env_cmd, "--backend", "iptables"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "apt-get install iptables" in proc.stderr, proc.stderr


def test_cleanup_keeps_native_nft_chains_in_the_iptables_nft_tables(
    lab: Lab, tmp_path: Path
) -> None:
    """iptables-nft-save does not show nft chains it cannot express, so "empty" is
    decided by nft itself before a table goes."""
    backends.require("iptables-nft")
    node = IptablesNode(lab, tmp_path, "nft")
    node.apply(*svc_a("pod2"))
    lab.nft("add", "chain", "ip", "nat", "mine", "{ type nat hook postrouting priority 200; }")
    lab.nft("add", "rule", "ip", "nat", "mine", "oifname", "nonexistent0", "masquerade")
    assert node.run("cleanup", with_inputs=False).returncode == 0
    assert "oifname" in lab.nft("list", "chain", "ip", "nat", "mine")
    assert "table ip filter" not in lab.nft("list", "tables"), "the empty one goes"
