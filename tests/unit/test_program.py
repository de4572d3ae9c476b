"""The rule program (svcrules/plan/program.py): every packet decision the backends
need, made once."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings

from svcrules.plan.program import (
    DROP,
    ChainId,
    FamilyProgram,
    FrontendKind,
    MarkMasquerade,
    Pick,
    Program,
    Role,
    Shortcut,
    Sources,
    Terminal,
    program,
)
from tests.k8s import Obj, compile_objs, endpoint, endpoint_slice, node_config, service
from tests.strategies import clusters

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NODE = node_config(clusterCIDRs=["198.51.100.0/24"])
NODEPORT = [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]


def program_of(objs: list[Obj]) -> Program:
    return program(compile_objs(objs).plan)


def one_family(objs: list[Obj]) -> FamilyProgram:
    return program_of(objs).families[0]


@SETTINGS
@given(clusters())
def test_every_chain_referenced_exists_and_every_pick_has_a_place(objs: list[Obj]) -> None:
    for fp in program_of(objs).families:
        ids = [c.id for c in fp.chains]
        assert len(ids) == len(set(ids)), "two chains share a role and Service port"
        targets = [f.target for f in (*fp.dispatch, *fp.nodeports)]
        targets += [s.target for c in fp.chains for s in c.steps if isinstance(s, Shortcut)]
        for target in targets:
            assert isinstance(target, Terminal) or target in ids, target
        places = {s.key for s in fp.selections}
        for c in fp.chains:
            assert c.steps and isinstance(c.steps[-1], (Pick, type(DROP))), c
            for step in c.steps:
                if isinstance(step, Pick):
                    assert step.selection.key in places
                    assert len(step.selection.hairpin) == len(step.selection.endpoints)
        dests = [(f.address, f.protocol, f.port) for f in fp.dispatch]
        assert len(dests) == len(set(dests)), "one destination dispatched twice"
        assert len({(f.protocol, f.port) for f in fp.nodeports}) == len(fp.nodeports)


def test_etp_local_chain_steps() -> None:
    svc = service("a", "203.0.113.1", NODEPORT, type="NodePort", externalTrafficPolicy="Local")
    eps = endpoint_slice("a", [endpoint("198.51.100.11", node="node-a")])
    fp = one_family([NODE, svc, eps])
    chains = {c.id.role: c for c in fp.chains}
    assert set(chains) == {Role.SERVICE, Role.EXTERNAL, Role.CLUSTER_SHORTCUT}
    clu = chains[Role.CLUSTER_SHORTCUT].id
    ext = chains[Role.EXTERNAL].steps
    assert ext[:2] == (Shortcut(Sources.PODS, clu, False), Shortcut(Sources.NODE, clu, True))
    assert isinstance(ext[2], Pick) and ext[2].selection.key.endswith("#local")
    svc_steps = chains[Role.SERVICE].steps
    assert svc_steps[0] == MarkMasquerade(Sources.NON_POD)
    (nodeport,) = fp.nodeports
    assert nodeport.kind is FrontendKind.NODE_PORT and nodeport.target == chains[Role.EXTERNAL].id


def test_own_cluster_ip_among_external_ips_first_claim_wins() -> None:
    svc = service("a", "203.0.113.1", externalIPs=["203.0.113.1"])
    eps = endpoint_slice("a", [endpoint("198.51.100.11")])
    fp = one_family([NODE, svc, eps])
    (entry,) = [f for f in fp.dispatch if f.address == "203.0.113.1"]
    assert entry.kind is FrontendKind.CLUSTER_IP
    assert entry.target == ChainId(Role.SERVICE, "default/a:http/TCP")


def test_nodeport_scope_per_mode() -> None:
    svc = service("a", "203.0.113.1")
    for addresses, scope in [
        (["primary"], (False, False, ("192.0.2.1",))),
        (["192.0.2.0/24"], (True, True, ("192.0.2.0/24",))),
        (["0.0.0.0/0"], (True, True, None)),
    ]:
        fp = one_family([node_config(nodePortAddresses=addresses), svc])
        assert tuple(fp.nodeport_scope) == scope, addresses
