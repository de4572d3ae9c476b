"""render_json() equals what the kernel holds after loading the text ruleset.

nft 1.0.6 cannot load the JSON (it refuses the ``integer`` keys of the typeof
maps and concatenated map data), so the JSON is proven the other way round:
load ``r.nft`` with ``nft -f`` into a private network namespace, list the
tables with ``nft -j``, drop handles and metainfo, and compare with
``render_json(plan)`` object by object, in order, key order included. Only
``elem`` lists are sorted on both sides: the kernel lists hash sets in its own
order.

nft 1.0.6's JSON printer leaves out three things the kernel holds: table and
chain comments and the ``dynamic`` set flag. render_json writes them (as later
nft prints them), and :func:`complete_listing` takes them from the kernel's
text listing (``nft list table``), so they are proven too, not ignored.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings

import svcrules
from svcrules.render.nftables.json_form import render_json
from tests.k8s import Obj, compile_objs, endpoint, endpoint_slice, node_config, service
from tests.strategies import clusters

from .conftest import require_kernel

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
CIDRS: dict[str, Any] = {"clusterCIDRs": ["198.51.100.0/24", "2001:db8:2::/64"]}
SERVICE_CIDRS: dict[str, Any] = {"serviceCIDRs": ["203.0.113.0/25", "2001:db8:3::/112"]}
DUAL: dict[str, Any] = {"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"]}


# -- the kernel side -------------------------------------------------------------


def _run(ns: str, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


NETNS_PREFIX = "svjson-"


def _delete_stale_namespaces() -> None:
    """Remove namespaces of earlier runs of this module that were killed mid-way."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    for name in re.findall(rf"^({NETNS_PREFIX}(\d+))\b", listed.stdout, flags=re.M):
        ns, pid = name
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        except PermissionError:
            pass  # alive, someone else's


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """One throw-away namespace for the module; each check flushes its ruleset first."""
    require_kernel()
    _delete_stale_namespaces()
    name = f"{NETNS_PREFIX}{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _insert(body: dict[str, Any], key: str, value: Any, before: tuple[str, ...]) -> dict[str, Any]:
    """``body`` with ``key`` added in front of the first of ``before`` present (else last)."""
    out: dict[str, Any] = {}
    for k, v in body.items():
        if k in before and key not in out:
            out[key] = value
        out[k] = v
    out.setdefault(key, value)
    return out


def complete_listing(objects: list[Obj], text: str) -> list[Obj]:
    """Add what the kernel holds but nft 1.0.6's JSON printer omits, read from the
    text listing of the same table, where nft later prints it (newer nft prints
    them itself; then nothing is added)."""
    table_comment = re.search(r'^table \S+ \S+ \{\n\tcomment "([^"\n]*)"$', text, re.M)
    chain_comments = dict(re.findall(r'^\tchain (\S+) \{\n\t\tcomment "([^"\n]*)"$', text, re.M))
    set_flags = {
        name: flags.split(",")
        for name, flags in re.findall(
            r"^\t(?:set|map) (\S+) \{\n(?:\t\t(?!flags ).*\n)*?\t\tflags (\S+)$", text, re.M
        )
    }
    out: list[Obj] = []
    for obj in objects:
        ((kind, body),) = obj.items()
        if kind == "table" and table_comment and "comment" not in body:
            body = {**body, "comment": table_comment.group(1)}
        elif kind == "chain" and body["name"] in chain_comments and "comment" not in body:
            comment = chain_comments[body["name"]]
            body = _insert(body, "comment", comment, ("type", "hook", "prio", "policy"))
        elif kind in ("set", "map") and "dynamic" in set_flags.get(body["name"], []):
            flags = list(body.get("flags", []))
            if "dynamic" not in flags:
                # nft's order: constant, interval, timeout, dynamic
                body = {**body, "flags": [*flags, "dynamic"]}
        out.append({kind: body})
    return out


def kernel_listing(ns: str, nft_script: str, table: str) -> list[Obj]:
    """Load the script into an empty ruleset and list both families' tables."""
    _run(ns, "nft", "flush", "ruleset")
    _run(ns, "nft", "-f", "-", stdin=nft_script)
    objects: list[Obj] = []
    for family in ("ip", "ip6"):
        listed = json.loads(_run(ns, "nft", "-j", "list", "table", family, table))["nftables"]
        text = _run(ns, "nft", "list", "table", family, table)
        objects.extend(complete_listing(listed, text))
    return objects


# -- comparison --------------------------------------------------------------------


def canonical(objects: list[Obj]) -> list[str]:
    """One JSON line per object, handles and metainfo dropped, elem lists sorted."""
    lines: list[str] = []
    for obj in objects:
        ((kind, body),) = obj.items()
        if kind == "metainfo":
            continue
        body = {k: v for k, v in body.items() if k != "handle"}
        if kind in ("set", "map") and "elem" in body:
            body["elem"] = sorted(body["elem"], key=lambda e: json.dumps(e, sort_keys=True))
        lines.append(json.dumps({kind: body}))
    return lines


def assert_equivalent(ns: str, ruleset: svcrules.Ruleset) -> None:
    text = render_json(ruleset.plan)
    assert ruleset.json == text
    rendered = json.loads(text)
    meta = rendered["nftables"][0]
    assert meta == {"metainfo": {"json_schema_version": 1}}
    want = canonical(rendered["nftables"])
    got = canonical(kernel_listing(ns, ruleset.nft, ruleset.plan.table))
    if want != got:
        diff = "\n".join(
            difflib.unified_diff(got, want, "kernel (nft -j list)", "render_json", lineterm="", n=1)
        )
        pytest.fail(f"render_json differs from the kernel's listing:\n{diff}", pytrace=False)


# -- cases -------------------------------------------------------------------------


def _slice(name: str, eps: list[Obj], port: int = 8080, family: str = "IPv4", **kw: Any) -> Obj:
    ports = kw.pop("ports", [{"name": "http", "port": port, "protocol": "TCP"}])
    return endpoint_slice(name, eps, ports=ports, family=family, **kw)


def _web(name: str = "web", last: int = 10, **spec: Any) -> list[Obj]:
    """A dual-stack NodePort Service with endpoints on this node and another."""
    svc = service(
        name,
        [f"203.0.113.{last}", f"2001:db8:3::{last:x}"],
        type="NodePort",
        ports=[{"name": "http", "port": 80, "nodePort": 30000 + last}],
        **DUAL,
        **spec,
    )
    v4 = _slice(name, [endpoint("198.51.100.11"), endpoint("198.51.100.12", node="node-b")])
    v6 = _slice(
        name,
        [endpoint("2001:db8:2::11"), endpoint("2001:db8:2::12", node="node-b")],
        family="IPv6",
    )
    return [svc, v4, v6]


CASES: dict[str, list[Obj]] = {
    "masquerade-all": [
        node_config(masqueradeAll=True, **CIDRS, **SERVICE_CIDRS),
        *_web(),
        *_web("local", 11, externalTrafficPolicy="Local"),
    ],
    "nodeport-addresses-all": [
        node_config(nodePortAddresses=["0.0.0.0/0", "::/0"], **CIDRS),
        *_web(),
    ],
    # No IPv6 CIDR: IPv6 NodePorts on every local address, IPv4 on the CIDR's.
    "nodeport-addresses-v4-cidrs-only": [
        node_config(nodePortAddresses=["192.0.2.0/24"], **CIDRS),
        *_web(),
    ],
    # Primary addresses without an IPv6 node IP: an empty IPv6 nodeport-ips set.
    "nodeport-primary-without-ipv6-node-ip": [
        node_config(nodeIPs=["192.0.2.1"], **CIDRS),
        *_web(),
    ],
    "nodeport-addresses-cidrs": [
        node_config(nodePortAddresses=["192.0.2.0/24", "10.1.2.3/32", "2001:db8:1::/64"], **CIDRS),
        *_web(),
    ],
    "etp-local-without-cluster-cidrs": [
        node_config(),
        *_web("local", 10, externalTrafficPolicy="Local", externalIPs=["198.18.0.10"]),
        # eTP Local with no endpoint on this node: outside traffic drops.
        service(
            "remote",
            "203.0.113.12",
            type="LoadBalancer",
            lb_ips=["198.18.1.12"],
            ports=[{"name": "http", "port": 80, "nodePort": 30012}],
            externalTrafficPolicy="Local",
        ),
        _slice("remote", [endpoint("198.51.100.13", node="node-b")]),
    ],
    "no-endpoints": [
        node_config(**CIDRS, **SERVICE_CIDRS),
        service("empty", "203.0.113.20"),
        service(
            "empty-lb",
            ["203.0.113.21", "2001:db8:3::21"],
            type="LoadBalancer",
            lb_ips=["198.18.1.21", "2001:db8:ff::21"],
            ports=[{"name": "http", "port": 80, "nodePort": 30021}],
            externalIPs=["198.18.0.21"],
            **DUAL,
        ),
        service("not-ready", "203.0.113.22"),
        _slice("not-ready", [endpoint("198.51.100.14", ready=False)]),
    ],
    "itp-local": [
        node_config(**CIDRS),
        service("remote-only", "203.0.113.30", internalTrafficPolicy="Local"),
        _slice("remote-only", [endpoint("198.51.100.31", node="node-b")]),
        *_web("here", 31, internalTrafficPolicy="Local"),
    ],
    "source-ranges": [
        node_config(**CIDRS),
        service(
            "fw",
            ["203.0.113.40", "2001:db8:3::40"],
            type="LoadBalancer",
            lb_ips=["198.18.1.40", "198.18.1.41", "2001:db8:ff::40"],
            ports=[
                {"name": "http", "port": 80, "nodePort": 30040},
                {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30041},
            ],
            # 192.0.2.0/24 and 2001:db8:1::/48 hold the node IPs: LB IPs may be sources.
            loadBalancerSourceRanges=["192.0.2.0/24", "10.0.0.0/8", "2001:db8:1::/48"],
            **DUAL,
        ),
        _slice(
            "fw",
            [endpoint("198.51.100.41")],
            ports=[
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
            ],
        ),
        _slice(
            "fw",
            [endpoint("2001:db8:2::41")],
            family="IPv6",
            ports=[
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
            ],
        ),
    ],
    "affinity": [
        node_config(**CIDRS),
        *_web(
            "sticky",
            50,
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
            externalTrafficPolicy="Local",
        ),
        service(
            "sticky-sctp",
            "203.0.113.51",
            ports=[{"name": "sig", "port": 3868, "protocol": "SCTP"}],
            sessionAffinity="ClientIP",
        ),
        _slice(
            "sticky-sctp",
            [endpoint(f"198.51.100.{h}") for h in (51, 52, 53)],
            ports=[{"name": "sig", "port": 3868, "protocol": "SCTP"}],
        ),
    ],
    "maglev-and-weights": [
        node_config(maglev={"tableSize": 251, "seed": "0x5eed1234"}),
        {
            **service(
                "lb",
                ["203.0.113.70", "2001:db8:3::70"],
                type="LoadBalancer",
                lb_ips=["198.18.1.70"],
                ports=[
                    {"name": "http", "port": 80, "nodePort": 30070},
                    {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30071},
                ],
                **DUAL,
            ),
            "metadata": {
                "name": "lb",
                "namespace": "default",
                "annotations": {"svcrules.io/load-balancing": "maglev"},
            },
        },
        _slice(
            "lb",
            [endpoint(f"198.51.100.{h}") for h in (70, 71)],
            ports=[
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
            ],
        ),
        _slice(
            "lb",
            [endpoint("2001:db8:2::70")],
            family="IPv6",
            ports=[
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
            ],
        ),
        {
            **service(
                "sticky-maglev",
                "203.0.113.71",
                ports=[{"name": "sig", "port": 3868, "protocol": "SCTP"}],
                sessionAffinity="ClientIP",
            ),
            "metadata": {
                "name": "sticky-maglev",
                "namespace": "default",
                "annotations": {"svcrules.io/load-balancing": "maglev"},
            },
        },
        _slice(
            "sticky-maglev",
            [endpoint(f"198.51.100.{h}") for h in (72, 73)],
            ports=[{"name": "sig", "port": 3868, "protocol": "SCTP"}],
        ),
        service("canary", "203.0.113.72", ports=[{"name": "http", "port": 80}]),
        {
            **_slice("canary", [endpoint("198.51.100.74"), endpoint("198.51.100.75")]),
            "metadata": {
                "name": "canary-v1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "canary"},
                "annotations": {"svcrules.io/weight": "90"},
            },
        },
        {
            **_slice("canary", [endpoint("198.51.100.76")]),
            "metadata": {
                "name": "canary-v2",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "canary"},
                "annotations": {"service.cilium.io/weight": "10"},
            },
        },
    ],
    "ipv6-only": [
        node_config(nodeIPs=["2001:db8:1::1"], clusterCIDRs=["2001:db8:2::/64"]),
        service(
            "v6",
            "2001:db8:3::60",
            type="LoadBalancer",
            lb_ips=["2001:db8:ff::60"],
            ports=[
                {"name": "http", "port": 80, "nodePort": 30060},
                {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30061},
            ],
            externalIPs=["2001:db8:fe::60"],
            ipFamilies=["IPv6"],
        ),
        _slice(
            "v6",
            [endpoint(f"2001:db8:2::{h:x}") for h in (0x60, 0x61, 0x62)],
            family="IPv6",
            ports=[
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
            ],
        ),
    ],
}


# What each case must exercise, in the text ruleset ("!" = must be absent), so
# that a change in the builders or the plan cannot quietly empty a case.
FEATURES: dict[str, tuple[str, ...]] = {
    "masquerade-all": ("set pod-cidrs", "!saddr != @pod-cidrs jump", "set service-cidrs"),
    "nodeport-addresses-all": ("ip daddr != 127.0.0.0/8", "ip6 daddr != ::1", "!nodeport-ips"),
    "nodeport-addresses-v4-cidrs-only": (
        "fib daddr type local ip daddr != 127.0.0.0/8 ip daddr @nodeport-ips",
        "fib daddr type local ip6 daddr != ::1 meta l4proto",
    ),
    "nodeport-primary-without-ipv6-node-ip": (
        'comment "addresses that serve NodePorts"\n\t}',
        "ip6 daddr @nodeport-ips meta l4proto",
    ),
    "nodeport-addresses-cidrs": (
        "fib daddr type local ip daddr != 127.0.0.0/8 ip daddr @nodeport-ips",
        "10.1.2.3/32",
    ),
    "etp-local-without-cluster-cidrs": (
        "!set pod-cidrs",
        "fib saddr type local goto clu-",
        "\t\tdrop\n",
        "198.18.0.10 . tcp . 80 : goto ext-",
    ),
    "no-endpoints": ("tcp . 30021 : goto no-endpoints", "198.18.0.21 . tcp . 80 : goto no-end"),
    "itp-local": ("203.0.113.30 . tcp . 80 : drop", "2001:db8:3::1f . tcp . 80 : goto svc-"),
    # Every LB IP is a source for every LB frontend (merged: .40 and .41 make a /31).
    "source-ranges": (
        "udp . 53 . 10.0.0.0/8",
        "198.18.1.41 . tcp . 80 . 198.18.1.40/31",
        "2001:db8:ff::40/128",
    ),
    "affinity": ("timeout 60s", "meta l4proto sctp dnat ip to 198.51.100.5", "vmap @affinity-"),
    "maglev-and-weights": (
        "dnat ip to jhash ip saddr . tcp sport . ip daddr . tcp dport mod 251 seed 0x5eed1234",
        "dnat ip to jhash ip saddr . udp sport . ip daddr . udp dport mod 251",
        "dnat ip6 to jhash ip6 saddr . tcp sport . ip6 daddr . tcp dport mod 251",
        "jhash ip saddr mod 251 seed 0x5eed1234",
        "vmap @maglev-affinity-",
        "numgen random mod 19 offset",
    ),
    "ipv6-only": ("2001:db8:2::60 . 8080", "2001:db8:fe::60 . udp . 53", "tcp . 30060 : goto"),
}


def test_cases_exercise_what_they_claim() -> None:
    assert sorted(FEATURES) == sorted(CASES)
    for case, features in FEATURES.items():
        nft = compile_objs(CASES[case]).nft
        for feature in features:
            if feature.startswith("!"):
                assert feature[1:] not in nft, f"{case}: {feature[1:]!r} should be absent"
            else:
                assert feature in nft, f"{case}: {feature!r} missing"


def test_demo_fixture(netns: str) -> None:
    assert_equivalent(netns, svcrules.compile_paths([str(ROOT / "fixtures" / "demo")]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_case(netns: str, case: str) -> None:
    assert_equivalent(netns, compile_objs(CASES[case]))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(clusters())
def test_random_clusters(netns: str, objs: list[Obj]) -> None:
    ruleset = compile_objs(objs)
    note(ruleset.nft)
    assert_equivalent(netns, ruleset)


def test_complete_listing_only_adds_what_the_text_listing_shows() -> None:
    """The helper must not invent what the kernel does not hold (no kernel needed)."""
    listed: list[Obj] = [
        {"table": {"family": "ip", "name": "t", "handle": 1}},
        {"set": {"family": "ip", "name": "s", "table": "t", "type": "ipv4_addr", "handle": 2}},
        {"chain": {"family": "ip", "table": "t", "name": "c", "handle": 3}},
    ]
    text = "table ip t {\n\tset s {\n\t\ttype ipv4_addr\n\t}\n\n\tchain c {\n\t}\n}\n"
    assert complete_listing(listed, text) == listed

    text = (
        'table ip t {\n\tcomment "tc"\n\tset s {\n\t\ttype ipv4_addr\n\t\tsize 65535\n'
        '\t\tflags dynamic,timeout\n\t\ttimeout 1m\n\t}\n\n\tchain c {\n\t\tcomment "cc"\n'
        "\t}\n}\n"
    )
    listed[1]["set"]["flags"] = ["timeout"]
    done = complete_listing(listed, text)
    assert done[0]["table"]["comment"] == "tc"
    assert done[1]["set"]["flags"] == ["timeout", "dynamic"]
    assert list(done[2]["chain"]) == ["family", "table", "name", "handle", "comment"]
