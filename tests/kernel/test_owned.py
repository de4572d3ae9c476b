"""svcrules owns what it made, and only that: tables and chains of the owned name that
another program made are refused and stay byte for byte; a tableName change removes
the old name's rules; cleanup finds every name svcrules used, even without its state.

Both backends, in the lab's node namespace.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from . import backends
from .lab import Lab
from .nodes import VARIANTS, IptablesNode, Node, svc_a
from .test_semantics import CIP, cfg, ok

# What iptables-nft makes of a Docker-style masquerade rule: the nft table `ip nat`.
DOCKER_NAT = """*nat
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
COMMIT
"""

# Another program's table that happens to have svcrules' name and a set named state.
MYTABLE = """
table ip mytable {
	set state {
		type mark
		elements = { 1 comment "not svcrules" }
	}
	chain pre {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 100.64.0.250 tcp dport 80 dnat to 198.51.100.14:9090
	}
}
"""

# Another program's iptables chains with svcrules' shapes under the prefix MYTABLE.
MYTABLE_IPTABLES = """*nat
:MYTABLE-SERVICES - [0:0]
:MYTABLE-STATE - [0:0]
-A PREROUTING -m comment --comment "MYTABLE service portals" -j MYTABLE-SERVICES
-A MYTABLE-SERVICES -d 100.64.0.250/32 -p tcp -j DNAT --to-destination 198.51.100.14:9090
-A MYTABLE-STATE -m comment --comment "not svcrules" -j RETURN
COMMIT
"""


def refused(node: Node, verb: str, *args: str, with_inputs: bool = True) -> str:
    proc = node.run(verb, *args, with_inputs=with_inputs)
    assert proc.returncode == 2, (verb, proc.stdout, proc.stderr)
    return proc.stderr


# nftables backend


@pytest.fixture
def node(lab: Lab, tmp_path: Path) -> Node:
    return Node(lab, tmp_path)


def nft_tables(lab: Lab) -> set[str]:
    out = lab.nft("list", "tables")
    return {ln.removeprefix("table ").strip() for ln in out.splitlines() if ln.strip()}


def test_nft_never_replaces_iptables_nft_nat_table(lab: Lab, node: Node) -> None:
    backends.require("iptables-nft")
    lab.exec("node", "iptables-nft-restore", "--noflush", input=DOCKER_NAT)
    before = lab.nft("list", "table", "ip", "nat")
    saved = backends.rules_only(lab.exec("node", "iptables-nft-save", "-t", "nat").stdout)
    node.write(*svc_a("pod2"))
    for verb in ("diff", "apply", "sync"):
        assert "spec.tableName" in refused(node, verb, "--table-name", "nat")
    assert "spec.tableName" in refused(node, "cleanup", "--table-name", "nat", with_inputs=False)
    assert lab.nft("list", "table", "ip", "nat") == before
    after = lab.exec("node", "iptables-nft", "-t", "nat", "-S")  # still iptables-nft's
    assert "incompatible" not in after.stderr and "-j MASQUERADE" in after.stdout
    assert backends.rules_only(lab.exec("node", "iptables-nft-save", "-t", "nat").stdout) == saved


def test_nft_refuses_a_foreign_table_of_the_owned_name(lab: Lab, node: Node) -> None:
    lab.load(MYTABLE)
    before = lab.nft("list", "table", "ip", "mytable")
    node.write(*svc_a("pod2"))
    for verb in ("diff", "apply", "sync"):
        err = refused(node, verb, "--table-name", "mytable")
        assert "ip mytable exists and was not created by svcrules" in err, err
        assert "--table-name" in err
    for tool in ("libnftables", "nft"):  # the nft command sees the foreign table too
        err = refused(node, "cleanup", "--table-name", "mytable", "--nft", tool, with_inputs=False)
        assert "ip mytable exists and was not created by svcrules" in err
    err = refused(node, "apply", "--table-name", "mytable", "--nft", "nft")
    assert "ip mytable exists and was not created by svcrules" in err
    assert "ip6 mytable" not in lab.nft("list", "tables")  # nothing half-made either
    # A cleanup of everything svcrules made does not take it either.
    node.apply(*svc_a("pod2"))
    proc = node.run("cleanup", with_inputs=False)
    assert proc.returncode == 0 and "mytable" not in proc.stdout, proc.stdout
    assert nft_tables(lab) == {"ip mytable"}
    assert lab.nft("list", "table", "ip", "mytable") == before
    assert lab.backends(ok(lab.probe("client", "100.64.0.250", 80, count=2))) == {"pod4"}


def test_nft_table_name_change_removes_the_old_tables(lab: Lab, node: Node, tmp_path: Path) -> None:
    lab.load(MYTABLE)
    foreign = lab.nft("list", "table", "ip", "mytable")
    node.apply(*svc_a("pod2"), node=cfg(tableName="svca"))
    assert {"ip svca", "ip6 svca"} <= nft_tables(lab)
    node.write(*svc_a("pod3"), node=cfg(tableName="svcb"))
    proc = node.run("diff", "-o", "nft")
    assert "delete table ip svca" in proc.stdout and "delete table ip6 svca" in proc.stdout
    summary = node.apply(*svc_a("pod3"), node=cfg(tableName="svcb"))
    assert "owned table changed from 'svca' to 'svcb'" in summary, summary
    assert nft_tables(lab) == {"ip mytable", "ip svcb", "ip6 svcb"}
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod3"}
    # Both names at once (a second state directory, as after losing one), then the
    # state lost: cleanup still finds both by their mark, and only them.
    (tmp_path / "other").mkdir()
    other = Node(lab, tmp_path / "other")
    other.apply(*svc_a("pod2"), node=cfg(tableName="svca"))
    assert nft_tables(lab) == {"ip mytable", "ip svca", "ip6 svca", "ip svcb", "ip6 svcb"}
    shutil.rmtree(node.state)
    shutil.rmtree(other.state)
    proc = node.run("cleanup", with_inputs=False)
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.removeprefix("removed: ").strip().split(", ")) == {
        "ip svca",
        "ip6 svca",
        "ip svcb",
        "ip6 svcb",
    }
    assert nft_tables(lab) == {"ip mytable"}
    assert lab.nft("list", "table", "ip", "mytable") == foreign


# iptables backend


@pytest.fixture(params=VARIANTS)
def ipt(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> object:
    variant = request.param
    backends.require(f"iptables-{variant}")
    yield IptablesNode(lab, tmp_path, variant)
    if variant == "legacy":
        backends.reset_legacy(lab)


def everything(node: IptablesNode) -> list[str]:
    """Every rule and non-built-in chain in both families (the tables themselves may
    come and go: iptables-nft makes them on use, svcrules' cleanup drops them empty)."""
    lines = backends.rules_only(node.save("ipv4") + node.save("ipv6"))
    return [ln for ln in lines if ln.startswith(("-A ", ":")) and not ln.endswith(" ACCEPT")]


def test_iptables_refuses_reserved_names(lab: Lab, ipt: IptablesNode) -> None:
    restore = backends.tool(ipt.variant, "ipv4", "-restore")
    lab.exec("node", restore, "--noflush", input=DOCKER_NAT)
    before = everything(ipt)
    ipt.write(*svc_a("pod2"))
    for name in ("nat", "docker", "kube-proxy"):
        for verb in ("diff", "apply", "sync"):
            assert "spec.tableName" in refused(ipt, verb, "--table-name", name)
        err = refused(ipt, "cleanup", "--table-name", name, with_inputs=False)
        assert "spec.tableName" in err
    assert everything(ipt) == before


def test_iptables_refuses_foreign_chains_of_the_owned_prefix(lab: Lab, ipt: IptablesNode) -> None:
    restore = backends.tool(ipt.variant, "ipv4", "-restore")
    lab.exec("node", restore, "--noflush", input=MYTABLE_IPTABLES)
    before = everything(ipt)
    ipt.write(*svc_a("pod2"))
    for verb in ("diff", "apply", "sync"):
        err = refused(ipt, verb, "--table-name", "mytable")
        assert "exists and was not created by svcrules" in err and "MYTABLE-" in err, err
    err = refused(ipt, "cleanup", "--table-name", "mytable", with_inputs=False)
    assert "MYTABLE-STATE" in err
    assert everything(ipt) == before
    ipt.apply(*svc_a("pod2"))
    assert ipt.run("cleanup", with_inputs=False).returncode == 0
    assert everything(ipt) == before
    assert lab.backends(ok(lab.probe("client", "100.64.0.250", 80, count=2))) == {"pod4"}


def test_iptables_table_name_change_removes_the_old_chains(
    lab: Lab, ipt: IptablesNode, tmp_path: Path
) -> None:
    restore = backends.tool(ipt.variant, "ipv4", "-restore")
    lab.exec("node", restore, "--noflush", input=MYTABLE_IPTABLES)
    foreign = everything(ipt)
    ipt.apply(*svc_a("pod2"), node=cfg(tableName="svca"))
    assert any(ln.startswith(":SVCA-STATE") for ln in everything(ipt))
    summary = ipt.apply(*svc_a("pod3"), node=cfg(tableName="svcb"))
    assert "owned table changed from 'svca' to 'svcb'" in summary, summary
    rules = everything(ipt)
    assert not [ln for ln in rules if "SVCA" in ln], [ln for ln in rules if "SVCA" in ln]
    assert any(ln.startswith(":SVCB-STATE") for ln in rules)
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=3))) == {"pod3"}
    (tmp_path / "other").mkdir()
    other = IptablesNode(lab, tmp_path / "other", ipt.variant)
    other.apply(*svc_a("pod2"), node=cfg(tableName="svca"))
    assert any(ln.startswith(":SVCA-STATE") for ln in everything(ipt))
    shutil.rmtree(ipt.state)
    shutil.rmtree(other.state)
    proc = ipt.run("cleanup", with_inputs=False)
    assert proc.returncode == 0, proc.stderr
    assert everything(ipt) == foreign
