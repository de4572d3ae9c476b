"""``diff`` as a change review: per Service port, the endpoints, frontends and policies
that change, computed from the summary the state directory keeps and the new plan;
``diff -o json``; drift in words. Against the shipped fake kernels."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from svcrules.cli.report import as_json, document, review, summary
from svcrules.compiler import Job, prepare
from svcrules.kernel.nft.fake import FakeNft
from svcrules.kernel.reconcile import Change, Driver, execute, plan_change
from svcrules.kernel.registry import open_fake
from svcrules.kernel.state import Meta, StateStore
from svcrules.plan import review as review_mod
from svcrules.plan.review import Summary, compare, summarize
from tests.k8s import Obj, compile_objs, dump, endpoint, endpoint_slice, node_config, service

KERNELS = ["nftables", "iptables-legacy", "iptables-nft"]
WEB_CIP = "203.0.113.10"


def web(*eps: Obj, **spec: Any) -> list[Obj]:
    return [
        service("web", WEB_CIP, namespace="shop", **spec),
        endpoint_slice("web", list(eps), namespace="shop"),
    ]


def dns() -> list[Obj]:
    return [
        service("dns", "203.0.113.53", ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]),
        endpoint_slice(
            "dns",
            [endpoint("198.51.100.53")],
            ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}],
        ),
    ]


def job(*objs: Obj, **node: Any) -> Job:
    return prepare(["-"], stdin=io.StringIO(dump([node_config(**node), *objs])))


def run(j: Job, driver: Driver, store: StateStore) -> Change:
    change = plan_change(j, driver, store)
    execute(change, driver, store)
    return change


def ports_of(*objs: Obj, **node: Any) -> dict[str, Any]:
    """Service port key (IPv4) -> its plan."""
    plan = compile_objs([node_config(**node), *objs]).plan
    return {p.key: p for f in plan.families for p in f.ports if f.family == 4}


def change_of(
    old: list[Obj], new: list[Obj], node: dict[str, Any] | None = None, **new_node: Any
) -> list[str]:
    """The review lines of shop/web:http/TCP from ``old`` to ``new`` (with the
    NodeConfig spec ``node``, and ``new_node`` for the new one)."""
    a = ports_of(*old, **(node or {}))["shop/web:http/TCP"]
    b = ports_of(*new, **(new_node or node or {}))["shop/web:http/TCP"]
    return compare(
        "shop/web:http/TCP", 4, Summary.parse(summarize(a)), Summary.parse(summarize(b))
    ).lines()


# -- what a change of one port reads like ---------------------------------------


def test_endpoints_replaced() -> None:
    old = web(endpoint("198.51.100.11"), endpoint("198.51.100.12", node="node-b"))
    new = web(endpoint("198.51.100.11"), endpoint("198.51.100.99", node="node-b"))
    assert change_of(old, new) == [
        "endpoint 198.51.100.12:8080 removed",
        "endpoint 198.51.100.99:8080 added",
    ]


def test_frontends_and_policies() -> None:
    old = web(endpoint("198.51.100.11", node="node-b"))
    lb = {"type": "LoadBalancer", "lb_ips": ["203.0.113.200"]}
    ports = [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]
    new = web(
        endpoint("198.51.100.11", node="node-b"),
        ports=ports,
        externalIPs=["192.0.2.80"],
        externalTrafficPolicy="Local",
        sessionAffinity="ClientIP",
        loadBalancerSourceRanges=["192.0.2.0/24"],
        **lb,
    )
    lines = change_of(old, new)
    assert lines[:3] == [
        "frontend nodePort 30080 added",
        "frontend loadBalancer 203.0.113.200:80 added",
        "frontend externalIP 192.0.2.80:80 added",
    ]
    assert "external traffic: none (no external frontend) -> DROP (no local endpoint)" in lines
    assert (
        "external masquerade: none (no external frontend) -> client IP kept; "
        "the node's own sources are masqueraded"
    ) in lines
    assert "eTP Local short-circuit: none (no external frontend) -> the node goes to " in "\n".join(
        lines
    )
    assert (
        "source ranges: none (LB IPs take every source) -> 192.0.2.0/24 "
        "(+ every LB IP of the Service)"  # a range holds the node IP
    ) in lines
    assert "session affinity: none -> ClientIP, 10800s" in lines


def test_routes_masquerade_local_and_terminating() -> None:
    old = web(endpoint("198.51.100.11", node="node-b"))
    new = web(endpoint("198.51.100.11", node="node-b", ready=False, serving=True, terminating=True))
    assert change_of(old, new) == ["endpoint 198.51.100.11:8080: cluster -> terminating"]
    gone = change_of(old, web())
    assert gone == [
        "endpoint 198.51.100.11:8080 removed",
        "clusterIP traffic: to cluster endpoints -> REJECT (no usable endpoint)",
    ]
    local = web(endpoint("198.51.100.11"), internalTrafficPolicy="Local")
    assert change_of(old, local) == [
        "endpoint 198.51.100.11:8080: cluster -> local",
        "clusterIP traffic: to cluster endpoints -> to local endpoints",
    ]
    masq = change_of(old, old, clusterCIDRs=["198.51.100.0/24"])
    assert masq == [
        "clusterIP masquerade: no masquerade (clusterCIDRs unset) -> "
        "masquerade sources outside clusterCIDRs"
    ]
    masq = change_of(old, old, {}, masqueradeAll=True)
    assert masq == [
        "clusterIP masquerade: no masquerade (clusterCIDRs unset) -> masquerade every source"
    ]


def test_weights_drains_and_load_balancing() -> None:
    old = web(endpoint("198.51.100.11"), endpoint("198.51.100.12", node="node-b"))
    canary = web(endpoint("198.51.100.11"), endpoint("198.51.100.12", node="node-b"))
    canary[1]["metadata"]["annotations"] = {"svcrules.io/weight": "10"}
    assert change_of(old, canary) == [
        "endpoint 198.51.100.11:8080: local -> local, weight 10",
        "endpoint 198.51.100.12:8080: cluster -> weight 10",
    ]
    drained = web(endpoint("198.51.100.11"))
    drained[1]["metadata"]["annotations"] = {"service.cilium.io/weight": "0"}
    assert change_of(web(endpoint("198.51.100.11")), drained) == [
        "endpoint 198.51.100.11:8080: local -> drained: weight 0, no new connections",
        "clusterIP traffic: to cluster endpoints -> REJECT (no usable endpoint)",
    ]
    maglev = web(endpoint("198.51.100.11"), endpoint("198.51.100.12", node="node-b"))
    maglev[0]["metadata"]["annotations"] = {"svcrules.io/load-balancing": "maglev"}
    assert change_of(old, maglev, {}, maglev={"seed": "0x5eed"}) == [
        "load balancing: random -> maglev, seed 0x5eed, 4093 slots"
    ]


def test_many_endpoints_are_cut_in_text_not_in_json() -> None:
    new = web(*(endpoint(f"198.51.100.{i}") for i in range(1, 31)))
    p = ports_of(*new)["shop/web:http/TCP"]
    added = compare("shop/web:http/TCP", 4, None, Summary.parse(summarize(p)))
    assert added.lines()[-1] == "... and 10 more endpoints added"
    assert len(added.json()["endpoints"]["added"]) == 30


# -- through the reconciler, on every backend ----------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_diff_reviews_each_service_port(kernel: str, tmp_path: Path) -> None:
    _fake, driver = open_fake(kernel)
    store = StateStore(tmp_path)
    first = run(
        job(*web(endpoint("198.51.100.11"), endpoint("198.51.100.12")), *dns()), driver, store
    )
    assert summary(first).startswith("Service ports: 2 to program\n")
    new = job(
        *web(endpoint("198.51.100.11"), endpoint("198.51.100.99"), externalIPs=["192.0.2.80"]),
        service("api", "203.0.113.20", namespace="shop"),
        endpoint_slice("api", [endpoint("198.51.100.21")], namespace="shop"),
    )
    change = plan_change(new, driver, store)
    text = summary(change)
    assert text.startswith("Service ports: 1 added, 1 removed, 1 changed\n"), text
    assert (
        "  + shop/api:http/TCP IPv4\n"
        "      frontend clusterIP 203.0.113.20:80 added\n"
        "      endpoint 198.51.100.21:8080 added (local)\n"
    ) in text
    assert (
        "  - default/dns:dns/UDP IPv4\n"
        "      frontend clusterIP 203.0.113.53:53 removed\n"
        "      endpoint 198.51.100.53:5353 removed\n"
    ) in text
    assert (
        "  ~ shop/web:http/TCP IPv4\n"
        "      frontend externalIP 192.0.2.80:80 added\n"
        "      endpoint 198.51.100.12:8080 removed\n"
        "      endpoint 198.51.100.99:8080 added (local)\n"
        "      external traffic: none (no external frontend) -> to cluster endpoints\n"
    ) in text
    assert "Kernel: incremental update" in text
    doc = json.loads(as_json(change))
    assert doc["service_ports"] == {"total": 2, "added": 1, "removed": 1, "changed": 1}
    web_change = next(c for c in doc["changes"] if c["port"] == "shop/web:http/TCP")
    assert web_change["endpoints"]["removed"] == [
        {
            "endpoint": "198.51.100.12:8080",
            "cluster": True,
            "local": True,
            "terminating": False,
            "weight": 100,
        }
    ]
    assert web_change["frontends"]["added"] == [
        {"type": "externalIP", "address": "192.0.2.80", "port": 80}
    ]
    assert doc["kernel"]["counts"]["operations"] == doc["kernel"]["operations"] > 0


def test_json_document_shape(tmp_path: Path) -> None:
    """The keys docs/operations.md documents, and nothing Python-specific."""
    _fake, driver = open_fake("nftables")
    store = StateStore(tmp_path)
    run(job(*web(endpoint("198.51.100.11"))), driver, store)
    v6 = "2001:db8:3::10"
    families = {"ipFamilies": ["IPv4", "IPv6"], "clusterIPs": [WEB_CIP, v6]}
    dual = job(*web(endpoint("198.51.100.12"), **families))
    change = plan_change(dual, driver, store)
    doc = document(change)
    assert list(doc) == [
        "version",
        "changed",
        "mode",
        "reason",
        "backend",
        "table",
        "service_ports",
        "changes",
        "kernel",
        "invalid",
        "warnings",
    ]
    assert doc["version"] == 1 and doc["mode"] == "incremental" and doc["changed"] is True
    v6_change = next(c for c in doc["changes"] if c["family"] == "IPv6")
    assert v6_change["change"] == "added" and v6_change["service"] == "shop/web"
    assert v6_change["frontends"]["added"] == [{"type": "clusterIP", "address": v6, "port": 80}]
    assert list(v6_change) == [
        "port",
        "service",
        "family",
        "change",
        "detailed",
        "frontends",
        "endpoints",
        "policies",
    ]
    execute(change, driver, store)
    again = document(plan_change(dual, driver, store))
    assert again["changed"] is False and again["mode"] == "noop"
    assert again["changes"] == [] and again["kernel"] == {"operations": 0, "counts": None}


@pytest.mark.parametrize("how", ["missing", "damaged", "another script's"])
def test_without_details_the_review_is_coarse(tmp_path: Path, how: str) -> None:
    """A state directory of an earlier svcrules has no details file; a damaged one, or
    one of another script (a kill between writing it and the state), is not used."""
    _fake, driver = open_fake("nftables")
    store = StateStore(tmp_path)
    run(job(*web(endpoint("198.51.100.11")), *dns()), driver, store)
    assert store.details_path.is_file() and len(store.load()[1].details) == 2
    if how == "missing":
        store.details_path.unlink()
    elif how == "damaged":
        store.details_path.write_bytes(store.details_path.read_bytes()[:-9])
    else:
        head, _, body = store.details_path.read_text().partition("\n")
        store.details_path.write_text(f"{head[:-32]}{'0' * 32}\n{body}")
    change = plan_change(job(*web(endpoint("198.51.100.12"))), driver, store)
    text = summary(change)
    assert (
        "  ~ shop/web:http/TCP IPv4\n"
        "      (no details: the saved state was written by an earlier svcrules)\n"
    ) in text
    assert "  - default/dns:dns/UDP IPv4\n      (no details" in text
    doc = document(change)
    assert [c["detailed"] for c in doc["changes"]] == [False, False]
    # Once applied, the details are there again.
    execute(change, driver, store)
    assert set(store.load()[1].details) == {"shop/web:http/TCP IPv4"}


def test_details_live_beside_the_state(tmp_path: Path) -> None:
    """Not in the state file (a run that changes nothing does not read them; an
    earlier svcrules reads the state as before), and cleanup removes them."""
    _fake, driver = open_fake("nftables")
    store = StateStore(tmp_path)
    run(job(*web(endpoint("198.51.100.11"))), driver, store)
    raw = json.loads(store.path.read_text().split("\n")[1])
    assert "details" not in raw
    head = store.details_path.read_text().split("\n", 1)[0].split(" ")
    assert head[:2] == ["svcrules-details", "1"] and head[3] == store.load()[1].fingerprint
    assert set(Meta.from_json(raw).ports) == {"shop/web:http/TCP IPv4"}
    store.clear()
    assert not store.details_path.exists()


def test_only_changed_ports_are_summarized_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake, driver = open_fake("nftables")
    store = StateStore(tmp_path)
    run(job(*web(endpoint("198.51.100.11")), *dns()), driver, store)
    calls: list[str] = []
    real = review_mod.summarize

    def counted(p: Any) -> str:
        calls.append(p.key)
        return real(p)

    monkeypatch.setattr(review_mod, "summarize", counted)
    change = plan_change(job(*web(endpoint("198.51.100.12")), *dns()), driver, store)
    assert calls == ["shop/web:http/TCP"]
    assert [c.port for c in review(change)] == ["shop/web:http/TCP"]


# -- drift, in words -------------------------------------------------------------

PYTHON = re.compile(r"\(\s*'|\[\s*'|\{\s*'|\bNone\b|\('[a-z]+', \d+\)")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("can_load", [True, False])
def test_drift_is_explained_in_words(kernel: str, can_load: bool, tmp_path: Path) -> None:
    fake, driver = open_fake(kernel)
    fake.can_load_elsewhere = can_load
    store = StateStore(tmp_path)
    j = job(*web(endpoint("198.51.100.11")))
    run(j, driver, store)
    if isinstance(fake, FakeNft):
        fake.run("add element ip svcrules cluster-ips { 203.0.113.99 }")
        fake.run("flush chain ip svcrules services")
        fake.run("add set ip svcrules extra { type ipv4_addr; }")
        words = [
            "set ip cluster-ips: ",
            "chain ip services: ",
            "set ip extra: in the kernel, but svcrules did not write it",
        ]
        if can_load:
            words += ["1 element svcrules did not write (203.0.113.99)"]
    else:
        chain = next(c for c in fake.tables[("ipv4", "nat")].chains if "-SVC-" in c)
        fake.tables[("ipv4", "nat")].chains[chain].append("-j ACCEPT")
        words = [f"ipv4 nat {chain}: "]
    reason = plan_change(j, driver, store, verify=True).reason
    assert reason.startswith("verification found drift: "), reason
    for w in words:
        assert w in reason, reason
    assert not PYTHON.search(reason), reason


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_changed_fingerprint_is_explained_in_words(kernel: str, tmp_path: Path) -> None:
    fake, driver = open_fake(kernel)
    store = StateStore(tmp_path)
    j = job(*web(endpoint("198.51.100.11")))
    run(j, driver, store)
    if isinstance(fake, FakeNft):
        fake.run("delete table ip6 svcrules")
        want = "table ip6 svcrules: missing, or no svcrules fingerprint in the state set"
    else:
        for table in fake.tables.values():
            if "SVCRULES-STATE" in table.chains:
                mark = f'-m comment --comment "svcrules {"0" * 32}" -j RETURN'
                table.chains["SVCRULES-STATE"] = [mark]
        want = (
            "ipv4 filter, ipv4 nat, ipv6 filter, ipv6 nat: SVCRULES-STATE holds another "
            "fingerprint than svcrules last wrote"
        )
    change = plan_change(j, driver, store)
    assert change.mode == "full" and want in change.reason, change.reason
    assert not PYTHON.search(change.reason)
    assert want in summary(change) and want in document(change)["reason"]
