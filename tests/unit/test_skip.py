"""on_invalid="skip": a bad object is left out and reported, the rest is compiled.

With "fail" (the default) the same inputs raise InputError, exactly as before.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from svcrules.compiler import Ruleset, compile_paths, prepare
from svcrules.errors import InputError
from tests.k8s import dump, endpoint, endpoint_slice, node_config, service

NODE = node_config()
Obj = dict[str, Any]


def skip(objs: list[Obj]) -> Ruleset:
    return compile_paths(["-"], stdin=io.StringIO(dump(objs)), on_invalid="skip")


def names(r: Ruleset) -> list[str]:
    return sorted({f"{p.namespace}/{p.name}" for f in r.plan.families for p in f.ports})


def lines(r: Ruleset) -> list[str]:
    return [str(p) for p in r.skipped]


def created(obj: Obj, when: str) -> Obj:
    obj["metadata"]["creationTimestamp"] = when
    return obj


def test_fail_is_the_default_and_skip_reports_nothing_when_all_is_valid() -> None:
    objs = [NODE, service("a", "203.0.113.1")]
    r = skip(objs)
    assert r.skipped == () and names(r) == ["default/a"]
    plain = compile_paths(["-"], stdin=io.StringIO(dump(objs)))
    assert plain.nft == r.nft and plain.skipped == ()


def test_invalid_service_and_slice_are_left_out_the_rest_compiled() -> None:
    bad_svc = service("bad", "203.0.113.300", ports=[{"name": "a", "port": 0}])
    bad_slice = endpoint_slice("a", [endpoint("not-an-ip")], name="a-broken")
    good_slice = endpoint_slice("a", [endpoint("198.51.100.11")])
    objs = [NODE, service("a", "203.0.113.1"), bad_svc, bad_slice, good_slice]
    with pytest.raises(InputError):
        compile_paths(["-"], stdin=io.StringIO(dump(objs)))
    r = skip(objs)
    assert names(r) == ["default/a"]
    (port,) = r.plan.families[0].ports
    assert [b.ip for b in port.cluster_backends] == ["198.51.100.11"]
    assert lines(r) == [
        "<stdin>: document 3 (Service default/bad): left out: spec.clusterIP: "
        "'203.0.113.300' is not a valid IP address; spec.clusterIPs: '203.0.113.300' is not "
        "a valid IP address; spec.ports[0].port: 0: input should be greater than or equal to 1",
        "<stdin>: document 4 (EndpointSlice default/a-broken): left out: "
        "endpoints[0].addresses[0]: 'not-an-ip' is not a valid IP address",
    ]


def test_skip_matches_compiling_without_the_bad_objects() -> None:
    good = [NODE, service("a", "203.0.113.1"), endpoint_slice("a", [endpoint("198.51.100.11")])]
    bad = [service("b", "203.0.113.2", ports=[{"port": True}])]
    assert skip(good + bad).nft == compile_paths(["-"], stdin=io.StringIO(dump(good))).nft


@pytest.mark.parametrize("field", ["clusterIP", "externalIPs", "loadBalancer"])
def test_conflict_the_older_service_keeps_the_claim(field: str) -> None:
    old = created(service("old", "203.0.113.1", namespace="z"), "2024-01-01T00:00:00Z")
    new = created(service("new", "203.0.113.2", namespace="a"), "2025-01-01T00:00:00Z")
    if field == "clusterIP":
        new["spec"]["clusterIP"] = new["spec"]["clusterIPs"][0] = "203.0.113.1"
    elif field == "externalIPs":
        new["spec"]["externalIPs"] = ["203.0.113.1"]
    else:
        new["spec"]["type"] = "LoadBalancer"
        new["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}}
    objs = [NODE, new, old]  # input order does not matter, nor does namespace order
    with pytest.raises(InputError, match="already claimed"):
        compile_paths(["-"], stdin=io.StringIO(dump(objs)))
    r = skip(objs)
    assert names(r) == ["z/old"]
    assert lines(r) == [
        "<stdin>: document 2 (Service a/new): spec.ports[0]: left out: 203.0.113.1:80/TCP "
        "is already claimed by Service z/old (<stdin>: document 3 (Service z/old))"
    ]


def test_conflict_without_timestamps_goes_by_namespace_then_name() -> None:
    a = service("b", "203.0.113.1", namespace="x")
    b = service("a", "203.0.113.1", namespace="y")
    c = service("a", "203.0.113.1", namespace="x")
    r = skip([NODE, a, b, c])
    assert names(r) == ["x/a"]
    assert [p.origin.ref for p in r.skipped if p.origin] == ["x/b", "y/a"]


def test_a_timestamp_wins_over_none() -> None:
    stamped = created(service("z", "203.0.113.1", namespace="z"), "2030-01-01T00:00:00Z")
    plain = service("a", "203.0.113.1", namespace="a")
    assert names(skip([NODE, plain, stamped])) == ["z/z"]


def test_the_loser_is_left_out_whole_and_frees_its_other_claims() -> None:
    ports = [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]
    old = created(service("old", "203.0.113.1", namespace="n"), "2024-01-01T00:00:00Z")
    # Dual stack, two ports; only port 80 on IPv4 conflicts: every port of it goes.
    loser = created(
        service("loser", ["203.0.113.1", "2001:db8:3::1"], ports=ports, namespace="n"),
        "2024-06-01T00:00:00Z",
    )
    # Claims the loser's other frontend: it gets it, since the loser holds nothing.
    third = created(
        service("third", "2001:db8:3::1", ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]),
        "2025-01-01T00:00:00Z",
    )
    r = skip([NODE, old, loser, third])
    assert names(r) == ["default/third", "n/old"]
    assert len(r.skipped) == 1 and "n/loser" in lines(r)[0]
    assert all(p.name != "loser" for f in r.plan.families for p in f.ports)


def test_node_port_conflicts_and_a_service_conflicting_with_itself() -> None:
    np = [{"name": "http", "port": 80, "nodePort": 30080}]
    a = created(service("a", "203.0.113.1", type="NodePort", ports=np), "2024-01-01T00:00:00Z")
    b = created(service("b", "203.0.113.2", type="NodePort", ports=np), "2023-01-01T00:00:00Z")
    twice = [
        {"name": "a", "port": 80, "nodePort": 30001},
        {"name": "b", "port": 81, "nodePort": 30001},
    ]
    c = service("c", "203.0.113.3", type="NodePort", ports=twice)
    r = skip([NODE, a, b, c])
    assert names(r) == ["default/b"]
    assert lines(r) == [
        "<stdin>: document 2 (Service default/a): spec.ports[0].nodePort: left out: "
        "nodePort 30080/TCP is already claimed by Service default/b "
        "(<stdin>: document 3 (Service default/b))",
        "<stdin>: document 4 (Service default/c): spec.ports[1].nodePort: left out: "
        "nodePort 30001/TCP is already claimed by Service default/c "
        "(<stdin>: document 4 (Service default/c))",
    ]


def test_own_cluster_ip_among_external_ips_is_no_conflict_when_skipping() -> None:
    r = skip([NODE, service("a", "203.0.113.1", externalIPs=["203.0.113.1"])])
    assert r.skipped == () and names(r) == ["default/a"]


def test_skipped_invalid_services_are_reported_before_conflicts() -> None:
    objs = [
        NODE,
        service("a", "203.0.113.1"),
        service("b", "203.0.113.1"),
        service("c", "203.0.113.300"),
    ]
    got = [p.origin.ref for p in skip(objs).skipped if p.origin]
    assert got == ["default/c", "default/b"]


def test_what_still_fails_when_skipping(tmp_path: Path) -> None:
    good = dump([NODE, service("a", "203.0.113.1")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: Service\nmetadata: {name: [\n")
    ok = tmp_path / "ok.yaml"
    ok.write_text(good)
    # A file that cannot be parsed: which Services it held is unknown.
    with pytest.raises(InputError, match=r"broken\.yaml: document 0: cannot parse"):
        compile_paths([str(ok), str(broken)], on_invalid="skip")
    # A broken NodeConfig, or a near miss of one.
    for nc in (
        node_config(nodeIPs=["bad"]),
        node_config(clusterCIDR=[]),
        {**NODE, "kind": "Nodeconfig"},
    ):
        objs = [nc, service("a", "203.0.113.1")]
        with pytest.raises(InputError):
            skip(objs)
    # Limits.
    bomb = tmp_path / "deep.json"
    bomb.write_text("[" * 2000 + "]" * 2000)
    with pytest.raises(InputError, match="nested deeper"):
        compile_paths([str(ok), str(bomb)], on_invalid="skip")


def test_job_compile_takes_the_mode() -> None:
    objs = [NODE, service("a", "203.0.113.1"), service("b", "203.0.113.1")]
    job = prepare(["-"], stdin=io.StringIO(dump(objs)))
    with pytest.raises(InputError):
        job.compile("nftables")
    r = job.compile("iptables", on_invalid="skip")
    assert names(r) == ["default/a"] and len(r.skipped) == 1
    assert "default/b" not in r.iptables
    with pytest.raises(ValueError, match="on_invalid"):
        job.compile(on_invalid="ignore")  # type: ignore[arg-type]
