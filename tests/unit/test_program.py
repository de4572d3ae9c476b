"""The rule program (svcrules/plan/program.py): every packet decision the backends
need, made once; the nftables and iptables layouts only name and spell it."""

from __future__ import annotations

import ast
import re
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
from svcrules.render.iptables import layout as iptables
from svcrules.render.names import chain_name
from svcrules.render.nftables import layout as nftables
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


def test_both_layouts_spell_the_program_they_are_given() -> None:
    """Change one step of the program: both backends follow, neither re-decides."""
    svc = service("a", "203.0.113.1", NODEPORT, type="NodePort")
    eps = endpoint_slice("a", [endpoint("198.51.100.11"), endpoint("198.51.100.12")])
    fp = one_family([NODE, svc, eps])
    ext = next(c for c in fp.chains if c.id.role is Role.EXTERNAL)
    dropped = fp._replace(
        chains=tuple(c._replace(steps=(DROP,)) if c is ext else c for c in fp.chains)
    )
    name = chain_name("ext", ext.id.key)
    body = dict(nftables.layout_family(fp, "node-a").chain_text)[name]
    assert "dnat" in body and "drop" not in body
    body = dict(nftables.layout_family(dropped, "node-a").chain_text)[name]
    assert body.splitlines()[-1].strip() == "drop" and "dnat" not in body

    def ext_rules(fp: FamilyProgram) -> list[str]:
        chains = iptables.layout_family(fp, "node-a").chains
        return next(["".join(r) for r in c.rules] for c in chains if "-EXT-" in c.name)

    assert any("-SEP-" in r for r in ext_rules(fp))
    assert ext_rules(dropped) == ["-j ACCEPT"]  # left untranslated: filter drops it
    assert [f.filter for f in iptables.layout_family(dropped, "node-a").refused_nodeports] == [
        "DROP"
    ]


def test_nodeport_scope_per_mode() -> None:
    svc = service("a", "203.0.113.1")
    for addresses, scope in [
        (["primary"], (False, False, ("192.0.2.1",))),
        (["192.0.2.0/24"], (True, True, ("192.0.2.0/24",))),
        (["0.0.0.0/0"], (True, True, None)),
    ]:
        fp = one_family([node_config(nodePortAddresses=addresses), svc])
        assert tuple(fp.nodeport_scope) == scope, addresses


def _imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "svcrules.plan.node"
        for alias in node.names
    }


def test_layouts_do_not_read_the_plans_decisions() -> None:
    """The render package reads the program, never the plan's routes, masquerade
    modes or per-port decisions: each decision is made once, before it."""
    decisions = {"Route", "Masquerade", "PortPlan", "FamilyPlan"}
    for path in (ROOT / "svcrules" / "render").rglob("*.py"):
        assert not _imported_names(path) & decisions, path


def test_templates_make_no_decisions() -> None:
    """Templates loop over prepared values: no comparisons, arithmetic, formatting or
    branches; the only condition left is whether a set has elements to list."""
    for path in (ROOT / "templates").rglob("*.j2"):
        for tag in re.findall(r"\{[{%](.*?)[%}]\}", path.read_text(), flags=re.S):
            code = re.sub(r'"[^"]*"', '""', tag.strip("-+ \n"))  # strings are text
            assert not re.search(r"==|!=|\bformat\b|\belif\b|\belse\b|[*/%]| [+-] ", code), (
                path,
                tag,
            )
            if code.startswith("if "):
                assert re.fullmatch(r"if [\w.]+", code), (path, tag)
