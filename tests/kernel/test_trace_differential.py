"""``svcrules trace`` against the kernel: for random clusters and random packets, what
the interpreter reads from the compiled text must be what a real kernel does with it.

Per (cluster, packet, backend): the same verdict; every endpoint a connection reached
is a predicted one and, with enough connections, every predicted one is reached (with
ClientIP affinity: every connection from the client reaches the same one); and each
connection is masqueraded exactly when ``Trace.masqueraded_to`` says. observe.py says
how the lab tells these apart; the first tests below prove it on hand-written
expectations.

``SVCRULES_TRACE_EXAMPLES`` sets the number of random clusters per backend (default
small, for CI) and then draws new ones on every run; the default run is derandomized
so CI always checks the same examples. The number of (cluster, packet) pairs checked
per backend is printed in the terminal summary. Every disagreement of a run is
collected and reported at once, with the cluster's YAML, the packet, the trace and
what each connection did.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from svcrules.trace import Packet, TraceError, trace
from svcrules.trace.model import Affinity, Trace, Verdict
from tests.k8s import Obj, compile_objs, dump, endpoint, endpoint_slice, service

from . import backends
from .lab import CLIENT_IP4, Lab, Server
from .observe import CHECKED, PICKS, Observation, disagreements, observe, report
from .scenarios import NODE_ADDRESSES, NODE_SERVER_PORTS, Case, Probe, lab_cases, pod_ip
from .test_semantics import cfg

EXAMPLES = int(os.environ.get("SVCRULES_TRACE_EXAMPLES", "32"))
RANDOM = "SVCRULES_TRACE_EXAMPLES" in os.environ

CIP = "203.0.113.10"


@pytest.fixture(scope="module")
def node_server(kernel_lab: Lab) -> Iterator[Server]:
    """The node answers on every port a packet to one of its addresses may use, so a
    packet the rules leave alone there is answered instead of reset (see observe.py)."""
    server = kernel_lab.serve("node", ports=NODE_SERVER_PORTS)
    yield server
    server.stop()


def fresh(lab: Lab, backend: str) -> None:
    """No ruleset, no conntrack entries, no affinity state (xt_recent lists and nft
    sets survive a reload that keeps them)."""
    lab.reset()
    if backend == "iptables-legacy":
        backends.reset_legacy(lab)


def rules_of(backend: str) -> str:
    """The text backend ``trace`` reads for a lab backend."""
    return "nftables" if backend == "nftables" else "iptables"


# --- the observation itself, on known outcomes ------------------------------------------


@pytest.fixture(params=["nftables", "iptables-nft"])
def known(kernel_lab: Lab, node_server: Server, request: pytest.FixtureRequest) -> Iterator[str]:
    backend: str = request.param
    backends.require(backend)
    fresh(kernel_lab, backend)
    yield backend
    fresh(kernel_lab, backend)


def expect(
    probe: Probe,
    verdict: Verdict,
    endpoints: tuple[str, ...] = (),
    masquerade: bool = False,
    affinity: Affinity | None = None,
) -> Trace:
    """A hand-written trace."""
    share = 1 / len(endpoints) if endpoints else 0.0
    return Trace(
        packet=probe.packet(),
        backend="hand",
        verdict=verdict,
        endpoints=endpoints,
        probabilities=dict.fromkeys(endpoints, share),
        masquerade=masquerade,
        affinity=affinity,
    )


def run_known(lab: Lab, backend: str, objs: list[Obj], probe: Probe, want: Trace) -> Observation:
    backends.install(lab, compile_objs([cfg(), *objs]), backend)
    lab.exec("node", "conntrack", "-F")
    obs = observe(lab, probe, want)
    problems = disagreements(want, obs)
    assert not problems, report("hand-written", dump(objs), probe, want, obs, problems)
    return obs


def two_pods(affinity: bool = False) -> list[Obj]:
    spec: dict[str, Any] = {"sessionAffinity": "ClientIP"} if affinity else {}
    ports = [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]
    return [
        service("web", CIP, ports=ports, **spec),
        endpoint_slice(
            "web",
            [endpoint(pod_ip("pod2", 4)), endpoint(pod_ip("pod3", 4), node="node-b")],
            ports=[
                {"name": "http", "port": 8080},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
            ],
        ),
    ]


PODS_2_3 = ("198.51.100.12:8080", "198.51.100.13:8080")
DNS_2_3 = ("198.51.100.12:5353", "198.51.100.13:5353")


def test_known_cluster_ip_from_a_pod(kernel_lab: Lab, known: str) -> None:
    probe = Probe("pod1", pod_ip("pod1", 4), CIP, 80, "tcp", "ClusterIP")
    obs = run_known(kernel_lab, known, two_pods(), probe, expect(probe, "dnat", PODS_2_3))
    assert set(obs.endpoints) == set(PODS_2_3)
    assert {c.masqueraded for c in obs.connections} == {False}


def test_known_cluster_ip_from_outside_and_from_the_node(kernel_lab: Lab, known: str) -> None:
    for probe, endpoints in (
        (Probe("client", CLIENT_IP4, CIP, 53, "udp", "ClusterIP"), DNS_2_3),
        (Probe("node", "198.18.0.1", CIP, 80, "tcp", "ClusterIP"), PODS_2_3),
    ):
        want = expect(probe, "dnat", endpoints, masquerade=True)
        obs = run_known(kernel_lab, known, two_pods(), probe, want)
        assert {c.masqueraded for c in obs.connections} == {True}


def test_known_affinity_sticks(kernel_lab: Lab, known: str) -> None:
    probe = Probe("client", CLIENT_IP4, CIP, 80, "tcp", "ClusterIP")
    want = expect(probe, "dnat", PODS_2_3, masquerade=True, affinity=Affinity(10800, True))
    obs = run_known(kernel_lab, known, two_pods(affinity=True), probe, want)
    assert len(obs.endpoints) == 1 and sum(obs.endpoints.values()) > 1


def test_known_reject_drop_untouched(kernel_lab: Lab, known: str) -> None:
    no_endpoints = [service("web", CIP, ports=[{"name": "http", "port": 80}])]
    cases: list[tuple[Probe, Verdict]] = [
        (Probe("client", CLIENT_IP4, CIP, 80, "tcp", "no endpoints"), "reject"),
        (Probe("pod1", pod_ip("pod1", 4), CIP, 80, "udp", "no endpoints"), "reject"),
        (Probe("client", CLIENT_IP4, "203.0.113.11", 80, "tcp", "unused"), "drop"),
        (Probe("node", "192.0.2.1", "203.0.113.11", 80, "udp", "unused"), "drop"),
        (Probe("client", CLIENT_IP4, pod_ip("pod2", 4), 8080, "tcp", "pod"), "untouched"),
        (Probe("pod1", "2001:db8:2::11", "2001:db8:2::12", 9090, "udp", "pod"), "untouched"),
        (Probe("node", "192.0.2.1", pod_ip("pod3", 4), 5353, "tcp", "pod"), "untouched"),
        (Probe("client", CLIENT_IP4, "203.0.113.150", 80, "tcp", "outside"), "untouched"),
        (Probe("client", CLIENT_IP4, NODE_ADDRESSES[1], 30001, "tcp", "node"), "untouched"),
        (Probe("pod2", "2001:db8:2::12", NODE_ADDRESSES[2], 80, "udp", "node"), "untouched"),
    ]
    for probe, verdict in cases:
        obs = run_known(kernel_lab, known, no_endpoints, probe, expect(probe, verdict))
        assert obs.verdicts == {verdict}, obs.describe()
        if verdict == "untouched":
            assert {c.masqueraded for c in obs.connections} == {False}


def test_wrong_predictions_are_caught(kernel_lab: Lab, known: str) -> None:
    """Each kind of disagreement is reported: the harness can fail."""
    backends.install(kernel_lab, compile_objs([cfg(), *two_pods()]), known)
    probe = Probe("client", CLIENT_IP4, CIP, 80, "tcp", "ClusterIP")
    wrong = [
        (expect(probe, "drop"), "verdict: predicted drop"),
        (expect(probe, "dnat", PODS_2_3[:1], True), "endpoints: observed"),
        (expect(probe, "dnat", (*PODS_2_3, "198.51.100.14:8080"), True), "never reached"),
        (expect(probe, "dnat", PODS_2_3, False), "masquerade: "),
        (expect(probe, "dnat", PODS_2_3, True, Affinity(10800, True)), "affinity: "),
    ]
    for want, message in wrong:
        kernel_lab.exec("node", "conntrack", "-F")
        problems = disagreements(want, observe(kernel_lab, probe, want))
        assert any(message in p for p in problems), (message, problems)


# --- the differential test ------------------------------------------------------------


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_trace_agrees_with_the_kernel(kernel_lab: Lab, node_server: Server, backend: str) -> None:
    backends.require(backend)
    lab = kernel_lab
    failures: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        # Shrinking would replay random connections dozens of times; every
        # disagreement is reported whole instead.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
        ],
    )
    @given(case=lab_cases())
    def check(case: Case) -> None:
        if backend != "nftables":  # the same cluster, random where it said Maglev
            case = case.without_maglev()
        ruleset = compile_objs(case.objs)
        text = ruleset.text(rules_of(backend))
        fresh(lab, backend)
        backends.install(lab, ruleset, backend)
        for probe in case.probes:
            if case.has_affinity():
                fresh(lab, backend)
                backends.install(lab, ruleset, backend)
            else:
                lab.exec("node", "conntrack", "-F")
            packet: Packet = probe.packet()
            try:
                expected = trace(text, rules_of(backend), packet)
            except TraceError as exc:
                failures.append(f"=== trace refused {probe}: {exc}\n--- cluster\n{dump(case.objs)}")
                continue
            obs = observe(lab, probe, expected)
            CHECKED[backend, expected.verdict] += 1
            if any(p.algorithm == "maglev" for p in expected.balancing):
                PICKS[backend, "maglev"] += 1
            if len({round(p, 4) for p in expected.probabilities.values()}) > 1:
                PICKS[backend, "unequal shares"] += 1
            problems = disagreements(expected, obs)
            if problems:
                failures.append(report(backend, dump(case.objs), probe, expected, obs, problems))

    try:
        check()
    finally:
        fresh(lab, backend)
    assert not failures, f"{len(failures)} disagreement(s) on {backend}:\n\n" + "\n\n".join(
        failures
    )
