"""Converging under churn and faults: after every sync the node holds exactly what a
clean apply of the same input makes, whatever happened before (removals with ClientIP
affinity, objects a refused delete left, elements and rules changed behind svcrules'
back, a saved script that does not match the kernel).

The random sequence runs ``CHURN_STEPS`` steps x ``CHURN_EXAMPLES`` sequences per backend
(environment variables of those names make it longer; ``CHURN_SHRINK=1`` shrinks a
failing sequence to a minimal one, which takes minutes).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.k8s import Obj, endpoint, endpoint_slice, service

from . import backends
from .converge import Runner, differences, runner_for
from .lab import Lab

STEPS = int(os.environ.get("CHURN_STEPS", "12"))
EXAMPLES = int(os.environ.get("CHURN_EXAMPLES", "2"))
# Shrinking a failing sequence replays it dozens of times (minutes): on request only.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + (
    [Phase.shrink] if os.environ.get("CHURN_SHRINK") == "1" else []
)


@pytest.fixture(params=backends.BACKENDS)
def runner(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    yield from runner_for(lab, tmp_path, request.param)


@pytest.fixture(params=["iptables-nft", "iptables-legacy"])
def ipt_runner(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    yield from runner_for(lab, tmp_path, request.param)


@pytest.fixture
def nft_runner(lab: Lab, tmp_path: Path) -> Runner:
    return Runner(lab, tmp_path, "nftables")


def svc(i: int, hosts: tuple[int, ...], affinity: bool = False, port: int = 80) -> list[Obj]:
    spec: dict[str, Any] = {"sessionAffinity": "ClientIP"} if affinity else {}
    ports = [{"name": "http", "port": port, "protocol": "TCP"}]
    return [
        service(f"s{i}", f"203.0.113.{20 + i}", ports=ports, **spec),
        endpoint_slice(f"s{i}", [endpoint(f"198.51.100.{h}") for h in hosts]),
    ]


def cluster(n: int, affinity: bool = True, moved: int | None = None) -> list[Obj]:
    """``n`` Services with two endpoints each (every other one with ClientIP affinity);
    Service ``moved`` has all its endpoints at new addresses."""
    out: list[Obj] = []
    for i in range(n):
        base = 150 if i == moved else 10
        out += svc(i, (base + i, base + 50 + i), affinity=affinity and i % 2 == 0)
    return out


def without(objs: list[Obj], *names: str) -> list[Obj]:
    return [o for o in objs if o["metadata"]["name"].split("-")[0] not in names]


def synced(r: Runner, objs: list[Obj], *args: str) -> str:
    proc = r.sync(objs, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def assert_clean(r: Runner, objs: list[Obj]) -> None:
    have, want = r.content(), r.clean(objs)
    assert have == want, differences(have, want)


# --- 1. removals with ClientIP affinity -------------------------------------------------


def test_removing_affinity_services_deletes_everything_at_once(runner: Runner) -> None:
    """The endpoint chains of a ClientIP Service are deleted in the transaction that
    deletes the verdict map pointing at them; nothing is left for later, and the next
    changes (endpoints all moved) go through."""
    synced(runner, cluster(8))
    second = without(cluster(8), "s0", "s2")
    synced(runner, second)
    assert runner.stale() == []
    assert_clean(runner, second)
    third = without(cluster(8, moved=4), "s0", "s2")
    synced(runner, third)
    assert_clean(runner, third)
    synced(runner, cluster(8, moved=4))  # the removed Services come back
    assert_clean(runner, cluster(8, moved=4))


def test_a_chain_still_in_use_is_left_and_deleted_on_the_next_run(nft_runner: Runner) -> None:
    """Only what the kernel really still uses stays behind (a rule svcrules does not
    know of jumps to it), the rest of the removal goes through, and the next run
    deletes the leftover once it is free, even with unchanged inputs."""
    r = nft_runner
    synced(r, cluster(4))
    chain = next(
        ln.split()[1]
        for ln in r.lab.nft("list", "table", "ip", "svcrules").splitlines()
        if ln.strip().startswith("chain svc-") and "-default-s1-" in ln
    )
    r.lab.nft(
        "add", "rule", "ip", "svcrules", "no-endpoints", "ip", "daddr", "1.2.3.4", "jump", chain
    )
    smaller = without(cluster(4), "s1", "s2")
    synced(r, smaller)
    assert r.stale() == [f"ip chain {chain}"]
    listed = r.lab.nft("list", "table", "ip", "svcrules")
    assert "-default-s2-" not in listed and "affinity-endpoints" in listed
    handle = re.search(
        rf"jump {chain} # handle (\d+)",
        r.lab.nft("-a", "list", "chain", "ip", "svcrules", "no-endpoints"),
    )
    assert handle
    r.lab.nft("delete", "rule", "ip", "svcrules", "no-endpoints", "handle", handle.group(1))
    log = synced(r, smaller)  # same inputs: still a run that deletes the leftover
    assert "incremental" in log and r.stale() == []
    assert_clean(r, smaller)


# --- 5. a refused incremental change falls back to a full replacement -------------------


def test_element_deleted_behind_svcrules_back_falls_back_at_once(nft_runner: Runner) -> None:
    r = nft_runner
    synced(r, cluster(4))
    r.lab.nft("delete", "element", "ip", "svcrules", "service-ips", "{ 203.0.113.20 . tcp . 80 }")
    smaller = without(cluster(4), "s0")  # deletes that element
    log = synced(r, smaller)
    assert re.search(
        r"applied: full, \d+ operations \(incremental refused: Error: .*No such file or "
        r"directory.*; fell back to full replacement\)",
        log,
    ), log
    assert len(log.splitlines()) < 10, log
    assert_clean(r, smaller)


def test_altered_saved_script_converges(runner: Runner) -> None:
    """The saved script says one thing, the kernel holds another (same fingerprint)."""
    synced(runner, cluster(4))
    runner.alter_saved("198.51.100.11", "198.51.100.99")
    moved = cluster(4, moved=1)  # changes what the altered lines describe
    synced(runner, moved)
    assert_clean(runner, moved)
    runner.alter_saved("198.51.100.13", "198.51.100.98")
    synced(runner, moved, "--verify")
    assert_clean(runner, moved)


def test_a_refused_transaction_reports_one_error_not_thousands(nft_runner: Runner) -> None:
    """The saved script names 720 endpoint addresses the kernel does not hold: each
    element the change deletes is refused, and nft says so for each of them."""
    r = nft_runner
    synced(r, [o for i in range(3) for o in svc(i, tuple(range(10, 250)))])
    r.alter_saved("198.51.100.", "198.51.101.")
    smaller = [o for i in range(3) for o in svc(i, tuple(range(130, 250)))]
    proc = r.sync(smaller)
    assert proc.returncode == 0, proc.stderr[:3000]
    assert "fell back to full replacement" in proc.stderr
    assert len(proc.stderr.splitlines()) < 10, proc.stderr[:3000]
    assert_clean(r, smaller)


def test_iptables_foreign_jump_to_a_chain_being_deleted(ipt_runner: Runner) -> None:
    """Another owner's rule jumps to a chain svcrules wants to delete: the kernel
    refuses the deletion in either form (incremental, full). The error names the
    chain and why; the previous rules stay in place."""
    runner = ipt_runner
    synced(runner, cluster(3, affinity=False))
    save = runner.lab.exec(
        "node", backends.tool(runner.variant, "ipv4", "-save"), "-t", "nat"
    ).stdout
    chain = next(
        ln.split("-g ")[-1]
        for ln in save.splitlines()
        if '"default/s1:http/TCP"' in ln and "-g SVCRULES-SVC-" in ln
    )
    ipt = backends.tool(runner.variant, "ipv4")
    runner.lab.exec("node", ipt, "-t", "nat", "-A", "OUTPUT", "-d", "192.0.2.99", "-j", chain)
    before = runner.content()
    proc = runner.sync(without(cluster(3, affinity=False), "s1"))
    assert proc.returncode == 2
    assert chain in proc.stderr and "jump to this chain" in proc.stderr, proc.stderr
    assert runner.content() == before
    runner.lab.exec("node", ipt, "-t", "nat", "-D", "OUTPUT", "-d", "192.0.2.99", "-j", chain)
    synced(runner, without(cluster(3, affinity=False), "s1"))
    assert_clean(runner, without(cluster(3, affinity=False), "s1"))


# --- 6. --verify compares content ------------------------------------------------------


def test_verify_finds_a_swapped_element_or_rule_and_repairs_it(runner: Runner) -> None:
    objs = cluster(3, affinity=False)
    synced(runner, objs)
    lab = runner.lab
    if runner.backend == "nftables":
        m = re.search(
            r"map (backends-tcp-\w+) \{[^}]*elements = \{ (\d+) : ([\d.]+) \. 8080",
            lab.nft("list", "table", "ip", "svcrules"),
        )
        assert m
        name, slot, _ = m.groups()
        lab.nft("delete", "element", "ip", "svcrules", name, f"{{ {slot} }}")
        lab.nft("add", "element", "ip", "svcrules", name, f"{{ {slot} : 198.51.100.77 . 8080 }}")
    else:
        save = lab.exec("node", backends.tool(runner.variant, "ipv4", "-save"), "-t", "nat").stdout
        m = re.search(
            r"^-A (SVCRULES-SEP-\w+) (.*-j DNAT --to-destination ([\d.]+):8080)$", save, re.M
        )
        assert m
        chain, spec, address = m.groups()
        rules = [ln for ln in save.splitlines() if ln.startswith(f"-A {chain} ")]
        swapped = spec.replace(address, "198.51.100.77")
        ipt = backends.tool(runner.variant, "ipv4")
        lab.exec("node", "sh", "-c", f"{ipt} -t nat -R {chain} {len(rules)} {swapped}")
    assert runner.content() != runner.clean(objs)
    log = synced(runner, objs, "--verify")
    assert "verification found drift" in log, log
    assert_clean(runner, objs)


# --- a long random sequence --------------------------------------------------------------

HOSTS = st.sets(st.integers(10, 16), min_size=1, max_size=3).map(lambda s: tuple(sorted(s)))


class Churn(RuleBasedStateMachine):
    """Services and endpoints added, removed and changed, ClientIP affinity on and off,
    each step applied with ``sync``; after every step the node must hold what a clean
    apply of the same input makes. A rule that changes what every run is given (a
    table name, say) appends to ``self.runner.extra``: ``sync`` and the clean apply
    both get it."""

    runner: Runner

    def __init__(self) -> None:
        super().__init__()
        self.services: dict[int, tuple[tuple[int, ...], bool, int]] = {}
        self.log = ""

    def objs(self) -> list[Obj]:
        return [o for i, (h, a, p) in sorted(self.services.items()) for o in svc(i, h, a, p)]

    def sync(self) -> None:
        proc = self.runner.sync(self.objs())
        assert proc.returncode == 0, proc.stderr
        self.log = proc.stderr

    # Even the simplest sequence (the first rule, the smallest data, again and again)
    # starts from four Services, half with affinity, and turns affinity on and off.
    @initialize(hosts=st.lists(HOSTS, min_size=4, max_size=4), flip=st.booleans())
    def start(self, hosts: list[tuple[int, ...]], flip: bool) -> None:
        for i, h in enumerate(hosts):
            self.services[i] = (h, (i % 2 == 0) != flip, 80)
        self.sync()

    @rule(i=st.integers(0, 5), hosts=HOSTS, affinity=st.booleans())
    def add_service(self, i: int, hosts: tuple[int, ...], affinity: bool) -> None:
        self.services[i] = (hosts, affinity, 80)
        self.sync()

    @precondition(lambda self: len(self.services) > 1)
    @rule(data=st.data())
    def remove_service(self, data: st.DataObject) -> None:
        del self.services[data.draw(st.sampled_from(sorted(self.services)))]
        self.sync()

    @rule(data=st.data(), hosts=HOSTS)
    def change_endpoints(self, data: st.DataObject, hosts: tuple[int, ...]) -> None:
        i = data.draw(st.sampled_from(sorted(self.services)))
        _, affinity, port = self.services[i]
        self.services[i] = (hosts, affinity, port)
        self.sync()

    @rule(data=st.data(), port=st.sampled_from([80, 81, 443]))
    def change_port(self, data: st.DataObject, port: int) -> None:
        i = data.draw(st.sampled_from(sorted(self.services)))
        hosts, affinity, _ = self.services[i]
        self.services[i] = (hosts, affinity, port)
        self.sync()

    @rule(name=st.sampled_from(["svcrules", "svcalt"]))
    def change_table_name(self, name: str) -> None:
        """The rules move to another owned name; the old one's must go in the same run."""
        self.runner.extra = ["--table-name", name]
        self.sync()

    @invariant()
    def node_holds_a_clean_apply(self) -> None:
        if not self.services:
            return
        have, want = self.runner.content(), self.runner.clean(self.objs())
        assert have == want, f"{differences(have, want)}\nlast sync: {self.log}"
        assert "fell back" not in self.log, self.log  # nothing is refused along the way


def test_random_churn_converges(runner: Runner) -> None:
    runner.lab.reset()

    class Machine(Churn):
        pass

    Machine.runner = runner

    def fresh() -> Churn:
        runner.lab.reset()
        runner.extra = []
        if runner.backend == "iptables-legacy":
            backends.reset_legacy(runner.lab)
        for path in runner.state.glob("*"):
            path.unlink()
        return Machine()

    run_state_machine_as_test(
        fresh,  # type: ignore[arg-type]  # hypothesis takes any factory of machines
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            phases=PHASES,
            suppress_health_check=list(HealthCheck),
        ),
    )
