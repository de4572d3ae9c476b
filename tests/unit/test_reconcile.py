"""Deciding and sending what a run changes, against the shipped fake kernels (the kernel
tests send it for real)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest

from svcrules.compiler import Job, prepare
from svcrules.errors import KernelError, NeedsFullReplacement, SvcrulesError
from svcrules.kernel.iptables.restore import split_sections
from svcrules.kernel.nft.driver import NftDriver
from svcrules.kernel.nft.fake import FakeNft
from svcrules.kernel.nft.transport import first_error
from svcrules.kernel.nft.transport import refused as refused_error
from svcrules.kernel.reconcile import Change, Driver, cleanup, execute, plan_change
from svcrules.kernel.registry import BACKENDS, open_fake
from svcrules.kernel.state import StateStore
from tests.k8s import dump, endpoint, endpoint_slice, node_config, service

# Every backend, and both iptables variants (they read the kernel differently).
KERNELS = ["nftables", "iptables-legacy", "iptables-nft"]


def job(*pods: str, **spec: Any) -> Job:
    objs = [
        node_config(**spec),
        service("a", "203.0.113.10"),
        endpoint_slice("a", [endpoint(f"198.51.100.{p}") for p in pods]),
    ]
    return prepare(["-"], stdin=io.StringIO(dump(objs)))


def affinity_job(*names: str) -> Job:
    items = [node_config()]
    for i, name in enumerate(names):
        items += [
            service(name, f"203.0.113.{10 + i}", sessionAffinity="ClientIP"),
            endpoint_slice(
                name, [endpoint(f"198.51.100.{11 + i}"), endpoint(f"198.51.100.{61 + i}")]
            ),
        ]
    return prepare(["-"], stdin=io.StringIO(dump(items)))


def run(job: Job, driver: Driver, store: StateStore, verify: bool = False) -> Change:
    change = plan_change(job, driver, store, verify)
    execute(change, driver, store)
    return change


@pytest.mark.parametrize("kernel", KERNELS)
def test_first_run_full_then_noop_without_compiling(
    kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake, driver = open_fake(kernel)
    store = StateStore(tmp_path)
    first = run(job("11"), driver, store)
    assert first.mode == "full" and "first run" in first.reason
    # Same bytes in, same fingerprint in the kernel: nothing is even compiled.
    monkeypatch.setattr(Job, "compile", lambda self, backend: pytest.fail("compiled"))
    again = plan_change(job("11"), driver, store)
    assert again.mode == "noop" and again.operations == 0 and again.script == ""
    execute(again, driver, store)
    monkeypatch.undo()
    # --verify compiles and reads everything back: no drift, nothing to send.
    verified = plan_change(job("11"), driver, store, verify=True)
    assert verified.mode == "noop", verified.reason


@pytest.mark.parametrize("kernel", KERNELS)
def test_endpoint_change_is_incremental_and_drift_is_full(kernel: str, tmp_path: Path) -> None:
    fake, driver = open_fake(kernel)
    store = StateStore(tmp_path)
    run(job("11"), driver, store)
    change = run(job("12"), driver, store)
    assert change.mode == "incremental" and change.tx is not None
    assert "198.51.100.12" in change.script
    assert "table ip" not in change.script and "*filter" not in change.script
    assert change.operations == change.tx.operations > 0
    assert change.tx.describe().startswith("  chains +")
    # Someone changed the fingerprint behind svcrules' back: everything is replaced.
    _tamper_fingerprint(fake)
    drift = plan_change(job("13"), driver, store)
    assert drift.mode == "full" and "differ from what svcrules last wrote" in drift.reason
    execute(drift, driver, store)
    assert plan_change(job("13"), driver, store).mode == "noop"


def _tamper_fingerprint(fake: Any) -> None:
    if isinstance(fake, FakeNft):
        fake.run('flush set ip svcrules state\nadd element ip svcrules state { 1 comment "x" }')
        return
    for table in fake.tables.values():
        if "SVCRULES-STATE" in table.chains:
            mark = f'-m comment --comment "svcrules {"0" * 32}" -j RETURN'
            table.chains["SVCRULES-STATE"] = [mark]


@pytest.mark.parametrize("kernel", KERNELS)
def test_verify_finds_rules_changed_behind_svcrules_back(kernel: str, tmp_path: Path) -> None:
    for can_load in (True, False):  # nft/iptables in a namespace of its own, or counts only
        fake, driver = open_fake(kernel)
        fake.can_load_elsewhere = can_load
        store = StateStore(tmp_path / str(can_load))
        run(job("11"), driver, store)
        if isinstance(fake, FakeNft):
            fake.run("add element ip svcrules cluster-ips { 203.0.113.99 }")
        else:
            chain = next(c for c in fake.tables[("ipv4", "nat")].chains if "-SVC-" in c)
            fake.tables[("ipv4", "nat")].chains[chain].append("-j ACCEPT")
        assert plan_change(job("11"), driver, store).mode == "noop"  # the fingerprint agrees
        change = run(job("11"), driver, store, verify=True)
        assert change.mode == "full" and "verification found drift" in change.reason
        assert plan_change(job("11"), driver, store, verify=True).mode == "noop"


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_table_name_change_replaces_and_retires_the_old_name(kernel: str, tmp_path: Path) -> None:
    fake, driver = open_fake(kernel)
    store = StateStore(tmp_path)
    run(job("11"), driver, store)
    renamed = run(job("11", tableName="edge"), driver, store)
    assert renamed.mode == "full" and "owned table changed" in renamed.reason
    assert store.load()[1].owned == ["edge"]
    assert _names(fake) == _names_after_fresh_apply(kernel, job("11", tableName="edge"), tmp_path)


def _names(fake: Any) -> set[str]:
    if isinstance(fake, FakeNft):
        return {
            f"{fam} {name} {obj}" for (fam, name), t in fake.tables.items() for obj in t.objects
        }
    return {f"{part} {chain}" for part, t in fake.tables.items() for chain in t.chains}


def _names_after_fresh_apply(kernel: str, job: Job, tmp_path: Path) -> set[str]:
    fake, driver = open_fake(kernel)
    run(job, driver, StateStore(tmp_path / "fresh"))
    return _names(fake)


@pytest.mark.parametrize("kernel", KERNELS)
def test_cleanup_removes_svcrules_rules_and_state_only(kernel: str, tmp_path: Path) -> None:
    fake, driver = open_fake(kernel)
    store = StateStore(tmp_path)
    _other_owner(fake)
    before = _names(fake)
    run(affinity_job("a", "b"), driver, store)
    run(affinity_job("a"), driver, store)
    gone = cleanup(driver, store, None)
    assert gone and not store.has_state()
    assert _names(fake) <= before | {f"{p} {c}" for p in _parts() for c in _builtins(p)}
    assert _names(fake) >= before
    assert cleanup(driver, store, None) == []  # nothing left: nothing to do
    with pytest.raises(SvcrulesError, match="another program"):
        cleanup(driver, store, "kube")


def _parts() -> list[tuple[str, str]]:
    return [(f, t) for f in ("ipv4", "ipv6") for t in ("nat", "filter")]


def _builtins(part: tuple[str, str]) -> tuple[str, ...]:
    from svcrules.kernel.iptables.fake import BUILTINS

    return BUILTINS[part[1]]


def _other_owner(fake: Any) -> None:
    """Another program's table or chains, some of which look like svcrules'."""
    if isinstance(fake, FakeNft):
        fake.run("table ip other {\n\tchain c {\n\t\taccept\n\t}\n}\n")
        return
    fake.restore(
        "ipv4", "*nat\n:OTHER - [0:0]\n-A PREROUTING -j OTHER\n-A OTHER -j ACCEPT\nCOMMIT\n"
    )


@pytest.mark.parametrize("kernel", KERNELS)
def test_rules_of_the_owned_name_that_svcrules_did_not_make_are_refused(
    kernel: str, tmp_path: Path
) -> None:
    fake, driver = open_fake(kernel)
    if isinstance(fake, FakeNft):
        fake.run("table ip svcrules {\n\tchain mine {\n\t\taccept\n\t}\n}\n")
    else:
        fake.restore("ipv4", "*nat\n:SVCRULES-SERVICES - [0:0]\nCOMMIT\n")
    store = StateStore(tmp_path)
    with pytest.raises(SvcrulesError, match="not created by svcrules"):
        plan_change(job("11"), driver, store)
    with pytest.raises(SvcrulesError, match="not created by svcrules"):
        cleanup(driver, store, "svcrules")
    assert _names(fake) and not store.has_state()


def test_one_backend_at_a_time(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    run(job("11"), open_fake("nftables")[1], store)
    with pytest.raises(SvcrulesError, match="cleanup --backend nftables"):
        plan_change(job("11"), open_fake("iptables-legacy")[1], store)
    cleanup(open_fake("iptables-legacy")[1], store, None)
    assert store.has_state(), "another backend's cleanup keeps the state"
    store.clear()
    run(job("11"), open_fake("iptables-legacy")[1], store)
    with pytest.raises(SvcrulesError, match="--iptables legacy"):
        plan_change(job("11"), open_fake("iptables-nft")[1], store)


def test_ebusy_leaves_only_the_chain_in_use_and_the_next_run_deletes_it(tmp_path: Path) -> None:
    """A rule svcrules does not know of jumps to a chain the change deletes: the kernel
    refuses (EBUSY); that one deletion waits for a later run, the rest goes through."""
    fake, driver = open_fake("nftables")
    store = StateStore(tmp_path)
    run(affinity_job("a", "b"), driver, store)
    svc = next(n for n in fake.tables[("ip", "svcrules")].objects if "-default-b-" in n)
    fake.run(f"add chain ip svcrules intruder\nadd rule ip svcrules intruder jump {svc}")
    removal = plan_change(affinity_job("a"), driver, store)
    assert removal.mode == "incremental" and removal.tx and len(removal.tx.deleted) == 4
    execute(removal, driver, store)
    _, meta = store.load()
    assert meta.stale == [f"ip chain {svc}"]
    assert "delete map" in fake.scripts[-1] and "delete chain ip svcrules aep-" in fake.scripts[-1]
    assert svc in fake.tables[("ip", "svcrules")].objects
    # Once free, the next run deletes it, though the inputs did not change.
    fake.run("flush chain ip svcrules intruder\ndelete chain ip svcrules intruder")
    later = plan_change(affinity_job("a"), driver, store)
    assert later.mode == "incremental"
    assert later.script.splitlines()[-1] == f"delete chain ip svcrules {svc}"
    execute(later, driver, store)
    assert store.load()[1].stale == []
    assert svc not in fake.tables[("ip", "svcrules")].objects


def test_ebusy_on_everything_leaves_every_deletion_for_later(tmp_path: Path) -> None:
    fake, driver = open_fake("nftables")
    store = StateStore(tmp_path)
    run(affinity_job("a", "b", "c"), driver, store)
    fake.refuse = lambda script: (
        "Error: Could not process rule: Device or resource busy" if "delete" in script else ""
    )
    with pytest.raises(KernelError, match="busy"):
        run(affinity_job("a"), driver, store)


def test_deletions_come_in_dependency_order(tmp_path: Path) -> None:
    """A ClientIP Service's verdict map points at its endpoint chains, and its Service
    chain jumps to them: the map goes first, the chains that jump before their targets."""
    _fake, driver = open_fake("nftables")
    store = StateStore(tmp_path)
    run(affinity_job("a", "b"), driver, store)
    tx = plan_change(affinity_job("a"), driver, store).tx
    assert tx is not None
    order = [d.split()[1] + " " + d.split()[4].split("-")[0] for d in tx.deletions]  # type: ignore[attr-defined]
    assert order[0].startswith("map ") and set(order[-2:]) == {"chain aep"}, order
    assert order.index("chain svc") < order.index("chain aep")
    assert len(tx.deletions) == len(tx.deleted)  # type: ignore[attr-defined]


def _affinity_id(fake: FakeNft, endpoint: str) -> int:
    """The affinity id the ip table remembers for the endpoint at ``endpoint``."""
    for obj in fake.tables[("ip", "svcrules")].objects.values():
        if any(f"to {endpoint}:" in rule for rule in obj.items):
            for rule in obj.items:
                if m := re.search(r"update @affinity .* offset (\d+)", rule):
                    return int(m.group(1))
    raise AssertionError(endpoint)


def test_a_full_replacement_carries_affinity_over(tmp_path: Path) -> None:
    """The live affinity entries of endpoints still there go into the new tables, in the
    replacement's own transaction, with their timeout and remaining time; entries of
    endpoints gone do not."""
    fake, driver = open_fake("nftables")
    assert isinstance(fake, FakeNft)
    store = StateStore(tmp_path)
    run(affinity_job("a", "b"), driver, store)
    kept, gone = _affinity_id(fake, "198.51.100.11"), _affinity_id(fake, "198.51.100.12")
    fake.run(
        f"add element ip svcrules affinity {{ 192.0.2.100 . {kept} timeout 600s expires 300s, "
        f"192.0.2.101 . {gone} timeout 600s expires 200s }}"
    )
    fake.run("delete table ip6 svcrules")  # drift: b goes in a full replacement
    change = run(affinity_job("a"), driver, store)
    assert change.mode == "full" and change.problems == []
    carried = [ln for ln in change.script.splitlines() if "add element ip svcrules affinity" in ln]
    assert carried == [
        f"add element ip svcrules affinity {{ 192.0.2.100 . {kept} timeout 600s expires 300s }}"
    ]
    assert "delete table ip svcrules" in change.script
    listed = fake.run("list set ip svcrules affinity")
    assert "192.0.2.100" in listed and "192.0.2.101" not in listed


def test_unreadable_affinity_is_not_carried_and_the_replacement_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, driver = open_fake("nftables")
    assert isinstance(fake, FakeNft)
    store = StateStore(tmp_path)
    run(affinity_job("a"), driver, store)
    kept = _affinity_id(fake, "198.51.100.11")
    fake.run(f"add element ip svcrules affinity {{ 192.0.2.100 . {kept} timeout 600s }}")
    fake.run("delete table ip6 svcrules")
    real = fake.run

    def failing(script: str, **kw: Any) -> str:
        if script.startswith("list set ip svcrules affinity"):
            raise refused_error("Error: out of memory")
        return real(script, **kw)

    monkeypatch.setattr(fake, "run", failing)
    change = run(affinity_job("a"), driver, store)
    assert change.mode == "full"
    assert not any("add element ip svcrules affinity" in ln for ln in change.script.splitlines())
    assert change.problems == [
        "ClientIP affinity of ip svcrules not carried over (reading it failed: Error: out of "
        "memory); pinned clients of that table may move"
    ]
    assert "192.0.2.100" not in real("list set ip svcrules affinity")


def test_a_refused_incremental_change_falls_back_to_full_replacement(tmp_path: Path) -> None:
    """An element the saved script names was deleted behind svcrules' back: nft refuses
    the incremental change, and the same run replaces everything instead."""
    fake, driver = open_fake("nftables")
    store = StateStore(tmp_path)
    run(affinity_job("a", "b"), driver, store)
    fake.run("delete element ip svcrules service-ips { 203.0.113.11 . tcp . 80 }")
    change = plan_change(affinity_job("a"), driver, store)
    assert change.mode == "incremental"
    execute(change, driver, store)
    assert change.mode == "full" and change.tx is not None
    assert change.reason == (
        "incremental refused: Error: Could not process rule: No such file or directory: "
        "delete element ip svcrules service-ips { 203.0.113.11 . tcp . 80 }; "
        "fell back to full replacement"
    )
    assert "delete table ip svcrules" in fake.scripts[-1]
    assert any("refused the incremental change" in p for p in change.problems)
    assert plan_change(affinity_job("a"), driver, store, verify=True).mode == "noop"


def test_a_refused_full_replacement_after_a_refused_incremental_says_both(tmp_path: Path) -> None:
    fake, driver = open_fake("nftables")
    store = StateStore(tmp_path)
    run(affinity_job("a", "b"), driver, store)
    fake.refuse = lambda script: "Error: Could not process rule: Operation not supported"
    with pytest.raises(KernelError, match="and the full replacement too"):
        run(affinity_job("a"), driver, store)


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_a_refused_iptables_table_puts_back_the_tables_already_sent(
    variant: str, tmp_path: Path
) -> None:
    fake, driver = open_fake(f"iptables-{variant}")
    store = StateStore(tmp_path)
    run(affinity_job("a", "b"), driver, store)
    saved = {part: fake.save(*part) for part in _parts()}
    fake.refuse = lambda fam, text: text.startswith("*filter")  # after nat went through
    change = plan_change(affinity_job("a"), driver, store)
    assert change.mode == "incremental"
    assert [p for p, _ in split_sections(change.script)][:2] == [
        ("ipv4", "nat"),
        ("ipv4", "filter"),
    ]
    with pytest.raises(KernelError, match="refused the change"):
        execute(change, driver, store)
    assert {part: fake.save(*part) for part in _parts()} == saved
    fake.refuse = None
    assert run(affinity_job("a"), driver, store).mode == "incremental"


def test_iptables_refusal_names_the_line_and_a_likely_cause(tmp_path: Path) -> None:
    """Another owner's rule jumps to a chain the change deletes: iptables refuses it."""
    fake, driver = open_fake("iptables-legacy")
    store = StateStore(tmp_path)
    run(affinity_job("a", "b"), driver, store)
    svc = [c for c in fake.tables[("ipv4", "nat")].chains if "-SVC-" in c]
    fake.restore(
        "ipv4", "*nat\n:OTHER - [0:0]\n" + "".join(f"-A OTHER -j {c}\n" for c in svc) + "COMMIT\n"
    )
    with pytest.raises(KernelError, match=r"-X SVCRULES-SVC-\w+ \(a rule svcrules does not own"):
        run(affinity_job("a"), driver, store)


def test_iptables_jumps_changed_means_a_full_replacement() -> None:
    """Only a full replacement changes the jumps from built-in chains (an older version
    of svcrules may have hooked other chains)."""
    _fake, driver = open_fake("iptables-legacy")
    ruleset = job("11").compile("iptables")
    old = "".join(ln for ln in ruleset.iptables.splitlines(True) if "# jump OUTPUT" not in ln)
    with pytest.raises(NeedsFullReplacement, match="jumps from built-in chains changed"):
        driver.incremental(old, ruleset, set())


def test_a_missing_jump_is_drift(tmp_path: Path) -> None:
    fake, driver = open_fake("iptables-legacy")
    store = StateStore(tmp_path)
    run(job("11"), driver, store)
    fake.tables[("ipv4", "nat")].chains["PREROUTING"].clear()
    change = run(job("11"), driver, store)
    assert change.mode == "full" and "differ" in change.reason
    assert fake.tables[("ipv4", "nat")].chains["PREROUTING"]


def test_verification_after_sending_catches_a_kernel_that_lost_the_change(tmp_path: Path) -> None:
    fake, driver = open_fake("nftables")
    store = StateStore(tmp_path)
    original = fake.run

    def forgetful(script: str, **kw: Any) -> str:
        return "" if "\ntable ip " in script else original(script, **kw)

    fake.run = forgetful
    with pytest.raises(KernelError, match="verification failed"):
        run(job("11"), driver, store)
    assert not store.has_state()


def test_kernel_errors_are_trimmed_to_the_first_error() -> None:
    message = "\n".join(["Error: busy", "delete chain ip t x", "^^^"] * 7000)
    exc = refused_error(message)
    assert str(exc).splitlines() == [
        "Error: busy",
        "delete chain ip t x",
        "^^^",
        "(and 20997 more lines)",
    ]
    assert exc.details == message
    assert first_error(exc) == "Error: busy: delete chain ip t x"


def test_the_registry_names_every_backend() -> None:
    assert sorted(BACKENDS) == ["iptables", "nftables"]
    assert isinstance(open_fake("nftables")[1], NftDriver)


@pytest.mark.parametrize("kernel", KERNELS)
def test_runs_keep_a_compile_cache_and_a_damaged_one_is_only_a_warning(
    kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from svcrules.compiler import compile_cache

    _fake, driver = open_fake(kernel)
    store = StateStore(tmp_path)
    run(job("11", "12"), driver, store)
    assert store.cache_path.is_file() and store.cache_path.stat().st_mode & 0o777 == 0o600
    planned: list[str] = []
    real = compile_cache._plan_group

    def spy(group: Any, *args: Any) -> Any:
        planned.append(group[0].info.ref)
        return real(group, *args)

    monkeypatch.setattr(compile_cache, "_plan_group", spy)
    change = run(job("11", "13"), driver, store)
    assert change.mode == "incremental" and planned == ["default/a"]
    assert not change.problems
    store.cache_path.write_bytes(b"svcrules-compile-cache 1 0\ngarbage")
    store.cache_path.chmod(0o600)
    change = run(job("11", "14"), driver, store)
    assert change.mode == "incremental"
    assert [p for p in change.problems if "compile cache" in p] == [
        f"compile cache {store.cache_path} ignored: checksum mismatch: truncated or modified"
    ]
    expected = job("11", "14").compile(driver.backend)
    assert store.load()[0] == driver.text(expected)
    assert store.load_cache([]) is not None  # rewritten whole
