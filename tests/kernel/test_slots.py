"""Stable slots against a real kernel: a one-endpoint change sends at most 4 operations,
and everything else in svcrules' tables, rule handles included, stays as it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.k8s import Obj, endpoint, endpoint_slice, service

from .lab import Lab
from .nodes import CIP_B, Node, ops, svc_b
from .test_semantics import CIP, CIP6, POD, POD6, ok

Listing = dict[str, Any]  # "family kind name" -> handle and content


@pytest.fixture
def node(lab: Lab, tmp_path: Path) -> Node:
    return Node(lab, tmp_path)


def dual(*pods: str, v6: tuple[str, ...] = ("pod1", "pod2", "pod3"), **spec: Any) -> list[Obj]:
    """Service a in both families, its endpoints on another node (so that no hairpin
    element follows them), and an unchanging Service b."""
    return [
        service("a", [CIP, CIP6], **spec),
        endpoint_slice("a", [endpoint(POD[p], node="node-b") for p in pods]),
        endpoint_slice("a", [endpoint(POD6[p], node="node-b") for p in v6], family="IPv6"),
        *svc_b("pod4"),
    ]


def listing(lab: Lab) -> Listing:
    """Every set, map, chain and rule of both tables with its handle; elements by value."""
    out: Listing = {}
    for fam in ("ip", "ip6"):
        for o in json.loads(lab.nft("-j", "-a", "list", "table", fam, "svcrules"))["nftables"]:
            kind = next(iter(o))
            body = o[kind]
            if kind in ("set", "map"):
                elems = sorted(json.dumps(e, sort_keys=True) for e in body.get("elem", []))
                out[f"{fam} {kind} {body['name']}"] = (body["handle"], elems)
            elif kind == "chain":
                out[f"{fam} chain {body['name']}"] = body["handle"]
            elif kind == "rule":
                expr = json.dumps(body["expr"], sort_keys=True)
                out[f"{fam} rule {body['chain']} {body['handle']}"] = expr
    return out


def changed(before: Listing, after: Listing) -> dict[str, tuple[set[str], set[str]]]:
    """What differs: per object, (gone, new) elements, or its old and new listing."""
    out: dict[str, tuple[set[str], set[str]]] = {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if key.split()[1] in ("set", "map") and a and b and a[0] == b[0]:
            out[key] = (set(a[1]) - set(b[1]), set(b[1]) - set(a[1]))
        else:
            out[key] = ({str(a)}, {str(b)})
    return out


def test_one_endpoint_change_is_four_operations_and_keeps_all_else(lab: Lab, node: Node) -> None:
    node.apply(*dual("pod1", "pod2", "pod3"))
    before = listing(lab)
    summary = node.apply(*dual("pod1", "pod4", "pod3"))
    assert "incremental update" in summary and ops(summary) <= 4, summary
    diff = changed(before, listing(lab))
    # The IPv4 state element and one backend element: pod2's slot now holds pod4. No
    # rule, chain or other element changed, nothing in the ip6 table.
    assert set(diff) - {"ip set state"} == {k for k in diff if "map backends-tcp-" in k}
    ((key, (gone, new)),) = [(k, v) for k, v in diff.items() if "backends" in k]
    assert key.startswith("ip map") and len(gone) == len(new) == 1, diff
    (gone_elem,), (new_elem,) = [json.loads(e) for e in gone], [json.loads(e) for e in new]
    assert gone_elem[0] == new_elem[0]  # the same slot
    assert POD["pod2"] in json.dumps(gone_elem) and POD["pod4"] in json.dumps(new_elem)
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=24))) == {"pod1", "pod3", "pod4"}
    assert lab.backends(ok(lab.probe("client", CIP6, 80, count=24))) == {"pod1", "pod2", "pod3"}
    assert lab.backends(ok(lab.probe("client", CIP_B, 80, count=3))) == {"pod4"}


def test_a_sequence_of_changes_leaves_no_drift(lab: Lab, node: Node) -> None:
    steps = [
        ("pod1", "pod2", "pod3"),
        ("pod1", "pod4", "pod3"),
        ("pod2", "pod4", "pod3"),  # another one replaced
        ("pod2", "pod4"),  # one gone: the last slot goes, its endpoint moves
        ("pod1", "pod2", "pod3", "pod4"),  # two come
        ("pod4", "pod3", "pod1"),
    ]
    node.apply(*dual(*steps[0]))
    for pods in steps[1:]:
        summary = node.apply(*dual(*pods))
        assert "incremental update" in summary, summary
        assert lab.backends(ok(lab.probe("client", CIP, 80, count=24))) == set(pods)
    proc = node.run("sync", "--verify")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # quiet: nothing to repair
    assert node.run("diff", "--verify").returncode == 0


def test_affinity_endpoint_change_keeps_the_other_slots_and_pinned_clients(
    lab: Lab, node: Node
) -> None:
    affinity: dict[str, Any] = {"sessionAffinity": "ClientIP"}
    node.apply(*dual("pod1", "pod2", "pod3", **affinity))
    (pinned,) = lab.backends(ok(lab.probe("client", CIP, 80, count=8)))
    other = next(p for p in ("pod1", "pod2", "pod3") if p != pinned)
    pods = tuple("pod4" if p == other else p for p in ("pod1", "pod2", "pod3"))
    before = listing(lab)
    assert "incremental update" in node.apply(*dual(*pods, **affinity))
    diff = changed(before, listing(lab))
    maps = [(k, v) for k, v in diff.items() if "map affinity-endpoints-" in k]
    assert [(len(gone), len(new)) for _, (gone, new) in maps] == [(1, 1)], diff
    assert not [k for k in diff if k.startswith("ip6")], diff
    assert lab.backends(ok(lab.probe("client", CIP, 80, count=8))) == {pinned}
