"""Table names other programs use are refused, on both backends, from one list."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from typer.testing import CliRunner

import svcrules
from svcrules.cli import app
from svcrules.errors import InputError
from svcrules.inputs.load import load_paths
from svcrules.inputs.owned import RESERVED, check_name, reserved
from svcrules.kernel.reconcile import cleanup
from svcrules.kernel.state import StateStore
from svcrules.render.iptables.layout import TAKEN, chain_prefix
from tests.k8s import compile_objs, dump, endpoint, endpoint_slice, node_config, service

# Other programs' names: tables of iptables-nft, ebtables-nft, kube-proxy, firewalld,
# Docker, Cilium, Calico; iptables chain prefixes of kube-proxy, Calico, Docker.
THEIRS = [
    "nat",
    "filter",
    "mangle",
    "raw",
    "security",
    "broute",
    "kube-proxy",
    "KUBE",
    "kube_x",
    "firewalld",
    "docker",
    "DOCKER-USER",
    "cilium",
    "cilium_x",
    "calico",
    "calico-nat",
    "cali-fw",
    "flannel",
    "forward",
]
OURS = ["svcrules", "mytable", "svc", "natty", "kubelike", "calif", "t" * 13]


@pytest.mark.parametrize("name", THEIRS)
def test_other_programs_names_are_refused_at_validation(name: str) -> None:
    doc = dump([node_config(tableName=name)])
    with pytest.raises(InputError, match=r"spec\.tableName: .*another program's") as err:
        load_paths(["-"], stdin=io.StringIO(doc))
    assert name in str(err.value)
    assert reserved(name) is not None
    with pytest.raises(svcrules.SvcrulesError, match=r"spec\.tableName"):
        check_name(name)


@pytest.mark.parametrize("name", OURS)
def test_other_names_are_accepted_by_both_backends(name: str) -> None:
    assert reserved(name) is None
    objs = [
        node_config(tableName=name),
        service("web", "203.0.113.10"),
        endpoint_slice("web", [endpoint("198.51.100.11")]),
    ]
    assert f"table ip {name} {{" in compile_objs(objs).nft
    assert f":{name.upper()}-STATE " in compile_objs(objs, backend="iptables").iptables


def test_iptables_prefixes_come_from_the_same_list() -> None:
    assert TAKEN is RESERVED
    for name in THEIRS:
        with pytest.raises(svcrules.SvcrulesError, match="another program's"):
            chain_prefix(name)
    assert chain_prefix("svcrules") == "SVCRULES"


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_a_reserved_flag_is_exit_2(tmp_path: Path, backend: str) -> None:
    inputs = tmp_path / "in.yaml"
    inputs.write_text(dump([node_config()]))
    res = CliRunner().invoke(app, ["compile", "-b", backend, str(inputs), "--table-name", "nat"])
    assert res.exit_code == 2 and "spec.tableName" in res.stderr and res.stdout == ""


class Untouchable:
    """A driver that fails the test when it is asked to delete anything."""

    backend = "nftables"
    name = "nft"

    def cleanup(self, table: str | None, known: object = ()) -> list[str]:
        raise AssertionError(f"cleanup reached the kernel with {table!r}")


def test_cleanup_with_a_reserved_name_is_refused_before_the_kernel(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with pytest.raises(svcrules.SvcrulesError, match=r"spec\.tableName.*another program's"):
        cleanup(Untouchable(), store, "nat")  # type: ignore[arg-type]
