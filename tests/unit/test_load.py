"""Loading: file shapes, kinds, and errors that name file, document and field."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from svcrules.errors import InputError
from svcrules.inputs.load import load_paths
from tests.k8s import dump, endpoint, endpoint_slice, node_config, service


def _write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


def test_multi_document_yaml_json_lists_and_directories(tmp_path: Path) -> None:
    _write(tmp_path, "a/svc.yaml", dump([service("web", "203.0.113.10")]))
    items = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [endpoint_slice("web", [endpoint("198.51.100.11")])],
    }
    _write(tmp_path, "b/slices.json", json.dumps(items))
    _write(tmp_path, "b/ignored.txt", "not read")
    _write(tmp_path, "c/node.yml", dump([node_config()]))
    got = load_paths([str(tmp_path)])
    assert [s.metadata.name for s in got.services] == ["web"]
    assert [s.metadata.name for s in got.slices] == ["web-ipv4"]
    assert got.node_configs[0].metadata.name == "node-a"


def test_other_kinds_are_ignored_and_stdin_works() -> None:
    text = dump(
        [
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
            {"apiVersion": "v1", "kind": "ServiceList", "items": [service("a", "203.0.113.1")]},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}},
        ]
    )
    got = load_paths(["-"], stdin=io.StringIO(text))
    assert [s.metadata.name for s in got.services] == ["a"]


def test_leading_zeros_and_whitespace_are_canonicalised() -> None:
    svc = service(
        "a",
        "172.30.0.041",
        type="LoadBalancer",
        loadBalancerSourceRanges=[" 10.0.0.0/8 "],
        externalIPs=["192.000.002.010"],
    )
    got = load_paths(["-"], stdin=io.StringIO(dump([svc])))
    spec = got.services[0].spec
    assert spec.all_cluster_ips() == ["172.30.0.41"]
    assert spec.load_balancer_source_ranges == ["10.0.0.0/8"]
    assert spec.external_ips == ["192.0.2.10"]


def test_all_errors_reported_with_file_document_and_field(tmp_path: Path) -> None:
    bad_port = service(
        "web",
        "203.0.113.10",
        namespace="shop",
        ports=[{"name": "a", "port": 0}, {"name": "b", "port": 81, "protocol": "ICMP"}],
    )
    bad_ip = service("db", "203.0.113.300", namespace="shop")
    path = _write(tmp_path, "in.yaml", dump([bad_port, bad_ip]))
    with pytest.raises(InputError) as exc:
        load_paths([path])
    lines = str(exc.value).splitlines()
    assert f"{path}: document 1 (Service shop/web): spec.ports[0].port:" in lines[0]
    assert "spec.ports[1].protocol: 'ICMP'" in lines[1]
    assert lines[2].startswith(f"{path}: document 2 (Service shop/db): spec.clusterIP:")
    assert "not a valid IP address" in lines[2]


def test_list_items_are_named_in_errors(tmp_path: Path) -> None:
    lst = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [service("ok", "203.0.113.1"), endpoint_slice("x", [{"addresses": ["nope"]}])],
    }
    path = _write(tmp_path, "l.json", json.dumps(lst))
    with pytest.raises(InputError) as exc:
        load_paths([path])
    assert str(exc.value).startswith(
        f"{path}: document 1 items[1] (EndpointSlice default/x-ipv4): "
    )


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "x.yaml", "apiVersion: v1\nkind: [Service\n")
    with pytest.raises(InputError, match=r"x.yaml: document 0: cannot parse: line \d+"):
        load_paths([path])


def test_missing_file() -> None:
    with pytest.raises(InputError, match=r"nope\.yaml: cannot read"):
        load_paths(["/nonexistent/nope.yaml"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"nodeIPs": []}, "at least one node IP"),
        ({"nodeIPs": ["192.0.2.1", "192.0.2.2"]}, "at most one node IP per family"),
        ({"clusterCIDRs": ["10.0.0.1/8"]}, "host bits set"),
        ({"tableName": "bad name;"}, "not a valid table name"),
        ({"masqueradeBit": 40}, "less than or equal to 31"),
        ({"nodePortAddresses": ["primary", "10.0.0.0/8"]}, "cannot be combined"),
    ],
)
def test_node_config_validation(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_paths(["-"], stdin=io.StringIO(dump([node_config(**spec)])))
