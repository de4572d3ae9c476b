"""Stable slots (svcrules/kernel/nft/slots.py): an endpoint that stays keeps its slot, and
the script sent and saved stays equivalent to the compiled one."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svcrules.compiler import Job, Ruleset, prepare
from svcrules.kernel.nft.diff import Tables, Transaction, parse_script
from svcrules.kernel.nft.driver import NftDriver
from svcrules.kernel.nft.fake import FakeNft
from svcrules.kernel.nft.slots import permute
from svcrules.kernel.reconcile import execute, plan_change
from svcrules.kernel.state import StateStore
from svcrules.kernel.transaction import Kind, Verb
from svcrules.render.nftables.fingerprint import fingerprint_of, stamp
from svcrules.render.nftables.layout import PICK_MAPS, SLOT_BITS
from tests.k8s import Obj, compile_objs, dump, endpoint, endpoint_slice, node_config, service
from tests.strategies import clusters, endpoint_changes

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def objs(*hosts: int, affinity: bool = False) -> list[Obj]:
    """Service a (IPv4, endpoints 198.51.100.HOST on another node, so that no hairpin
    element changes with them) and an unchanging dual-stack b."""
    spec: dict[str, Any] = {"sessionAffinity": "ClientIP"} if affinity else {}
    return [
        node_config(),
        service("a", "203.0.113.10", **spec),
        endpoint_slice("a", [endpoint(f"198.51.100.{h}", node="node-b") for h in hosts]),
        service("b", ["203.0.113.20", "2001:db8:3::14"]),
        endpoint_slice("b", [endpoint("198.51.100.90"), endpoint("198.51.100.91")]),
        endpoint_slice("b", [endpoint("2001:db8:2::90")], family="IPv6"),
    ]


def job(*hosts: int) -> Job:
    return prepare(["-"], stdin=io.StringIO(dump(objs(*hosts))))


def incremental(old: str, new: Ruleset) -> tuple[Transaction, str]:
    """The transaction from script ``old`` to ``new``, and the script it leaves."""
    tx = NftDriver(FakeNft()).incremental(old, new, set())
    return tx, tx.applied or new.nft


def element_ops(tx: Transaction, prefix: str = "backends-") -> Counter[Verb]:
    """Elements deleted and added in maps named ``prefix``…."""
    out: Counter[Verb] = Counter()
    for op in tx.ops:
        if op.kind is Kind.ELEMENT and op.name.startswith(prefix):
            out[op.verb] += op.count
    return out


def picks(tables: Tables) -> dict[tuple[str, str, int], tuple[list[int], Counter[str]]]:
    """(family, map, block) -> the block's slots and the multiset of their values: what a
    pick draws from."""
    out: dict[tuple[str, str, int], tuple[list[int], Counter[str]]] = {}
    for (family, _), table in tables.items():
        for name, obj in table.objects.items():
            if not name.startswith(PICK_MAPS):
                continue
            for item in obj.items:
                slot, value = item.split(" : ", 1)
                slots, values = out.setdefault(
                    (family, name, int(slot) >> SLOT_BITS), ([], Counter())
                )
                slots.append(int(slot))
                values[value] += 1
    return out


def slot_of(script: str, address: str) -> str:
    return next(ln.split(":")[0].strip() for ln in script.splitlines() if f"{address} . " in ln)


def test_one_changed_endpoint_is_one_element_out_and_one_in() -> None:
    old = compile_objs(objs(11, 12, 13, 14, 15)).nft
    new = compile_objs(objs(11, 12, 20, 14, 15))
    tx, applied = incremental(old, new)
    assert element_ops(tx) == {Verb.DELETE: 1, Verb.ADD: 1}
    # ... and the state element of the IPv4 table: the ip6 table is not touched.
    assert tx.operations == 4 and {op.family for op in tx.ops + tx.deletes} == {"ip"}
    assert slot_of(applied, "198.51.100.20") == slot_of(old, "198.51.100.13")
    for host in (11, 12, 14, 15):
        assert slot_of(applied, f"198.51.100.{host}") == slot_of(old, f"198.51.100.{host}")
    assert picks(parse_script(applied)) == picks(parse_script(new.nft))
    # Onwards from the permuted script, and back to where it started: 4 each time.
    tx, again = incremental(applied, compile_objs(objs(11, 12, 21, 14, 15)))
    assert tx.operations == 4
    tx, back = incremental(again, compile_objs(objs(11, 12, 13, 14, 15)))
    assert tx.operations == 4 and back == old  # the compiled order, so no permutation left


def test_added_and_removed_endpoints_move_only_what_the_block_size_forces() -> None:
    old = compile_objs(objs(11, 12, 13, 14, 15)).nft
    grown = compile_objs(objs(11, 12, 13, 14, 15, 16))
    tx, _ = incremental(old, grown)
    assert element_ops(tx) == {Verb.ADD: 1}  # the new last slot; the chain's mod grows
    # .12 goes: the last slot goes with it, its endpoint takes .12's slot.
    shrunk = compile_objs(objs(11, 13, 14, 15))
    tx, applied = incremental(old, shrunk)
    assert element_ops(tx) == {Verb.DELETE: 2, Verb.ADD: 1}
    assert slot_of(applied, "198.51.100.15") == slot_of(old, "198.51.100.12")
    assert picks(parse_script(applied)) == picks(parse_script(shrunk.nft))
    # One out, two in: one takes the freed slot, the other a new one.
    tx, applied = incremental(old, compile_objs(objs(11, 13, 14, 15, 30, 31)))
    assert element_ops(tx) == {Verb.DELETE: 1, Verb.ADD: 2}
    assert slot_of(applied, "198.51.100.30") == slot_of(old, "198.51.100.12")


def test_all_endpoints_replaced_is_the_compiled_order() -> None:
    old = compile_objs(objs(11, 12, 13)).nft
    new = compile_objs(objs(31, 32, 33))
    tx, applied = incremental(old, new)
    assert tx.applied is None and applied == new.nft
    assert element_ops(tx) == {Verb.DELETE: 3, Verb.ADD: 3}


def test_affinity_endpoints_keep_their_slots_too() -> None:
    old = compile_objs(objs(11, 12, 13, 14, affinity=True)).nft
    new = compile_objs(objs(11, 20, 13, 14, affinity=True))
    tx, applied = incremental(old, new)
    assert element_ops(tx, "affinity-endpoints-") == {Verb.DELETE: 1, Verb.ADD: 1}
    assert element_ops(tx) == {}  # no backends map for an affinity Service
    # The endpoint chain of .12 goes, that of .20 comes; the others stay as they are.
    assert tx.counts.chains_added == 1 and tx.counts.chains_removed == 1
    assert picks(parse_script(applied)) == picks(parse_script(new.nft))


def test_permute_keeps_slots_per_block_and_fills_freed_slots_in_order() -> None:
    block = 1 << SLOT_BITS
    old = ["0 : x", "1 : y", "2 : z", f"{block} : x"]
    new = ("0 : a", "1 : x", "2 : z", f"{block} : b", f"{block + 1} : x")
    # x stays at 0 (its block still wants it), z at 2; a takes the freed slot 1. In the
    # next block x keeps its slot, b takes the other one.
    assert permute(old, new) == ("0 : x", "1 : a", "2 : z", f"{block} : x", f"{block + 1} : b")
    assert permute([], new) == new


def test_reconcile_saves_what_it_sent_and_a_fallback_resets_it(tmp_path: Path) -> None:
    fake = FakeNft()
    driver = NftDriver(fake)
    store = StateStore(tmp_path)
    execute(plan_change(job(11, 12, 13), driver, store), driver, store)
    change = plan_change(job(11, 20, 13), driver, store)
    assert change.mode == "incremental" and change.operations == 4
    assert change.tx is not None and change.new_script == change.tx.applied
    execute(change, driver, store)
    saved, meta = store.load()
    assert saved == change.new_script and meta.fingerprint == fingerprint_of(saved)
    assert stamp(saved) == saved
    assert driver.verify("svcrules", saved, []) == []
    assert plan_change(job(11, 20, 13), driver, store, verify=True).mode == "noop"
    # The kernel refuses the next incremental change: the full replacement writes the
    # compiled order, and the state says so.
    fake.refuse = lambda script: "" if script.startswith("#!") else "Error: refused"
    change = plan_change(job(11, 21, 13), driver, store)
    execute(change, driver, store)
    fake.refuse = None
    compiled = job(11, 21, 13).compile("nftables").nft
    assert change.mode == "full" and store.load()[0] == compiled
    assert store.load()[1].fingerprint == fingerprint_of(compiled)
    assert plan_change(job(11, 21, 13), driver, store, verify=True).mode == "noop"


def _kernel_holds(fake: FakeNft, script: str) -> bool:
    want = parse_script(script)
    if set(want) != set(fake.tables):
        return False
    for key, table in want.items():
        have = fake.tables[key].objects
        if set(have) != set(table.objects):
            return False
        for name, obj in table.objects.items():
            items = list(have[name].items)
            if (items if obj.kind == "chain" else sorted(items)) != (
                list(obj.items) if obj.kind == "chain" else sorted(obj.items)
            ):
                return False
    return True


@SETTINGS
@given(clusters(split=True), st.data())
def test_incremental_runs_pick_like_a_cold_compile(objs: list[Obj], data: st.DataObject) -> None:
    fake = FakeNft()
    driver = NftDriver(fake)
    state = compile_objs(objs).nft
    fake.run(state)
    for _ in range(3):
        objs = data.draw(endpoint_changes(objs))
        new = compile_objs(objs)
        before = parse_script(state)
        tx = driver.incremental(state, new, set())
        applied = tx.applied or new.nft
        fake.run(tx.script())
        # What was sent leaves the kernel holding exactly the script to be saved...
        assert _kernel_holds(fake, applied)
        assert driver.fingerprints("svcrules") == driver.expected(applied)
        assert stamp(applied) == applied
        # ... which picks from the same endpoints as the compiled script, block by block,
        have, want = parse_script(applied), parse_script(new.nft)
        assert picks(have) == picks(want)
        # ... differs from it in nothing else ...
        for key, table in want.items():
            for name, obj in table.objects.items():
                if name != "state" and not name.startswith(PICK_MAPS):
                    assert have[key].objects[name] == obj
        # ... and keeps every endpoint that stays at its slots: as many of them as the
        # block still gives it (weights repeat an endpoint over several slots).
        for key, table in have.items():
            for name, obj in table.objects.items():
                prev = before.get(key)
                if not name.startswith(PICK_MAPS) or prev is None or name not in prev.objects:
                    continue
                old = dict(i.split(" : ", 1) for i in prev.objects[name].items)
                wanted = picks({key: want[key]})
                could: Counter[tuple[int, str]] = Counter()  # (block, value): old slots
                kept: Counter[tuple[int, str]] = Counter()
                for item in obj.items:
                    slot, value = item.split(" : ", 1)
                    block, was = int(slot) >> SLOT_BITS, old.get(slot)
                    if was is not None:
                        could[(block, was)] += 1
                        kept[(block, was)] += was == value
                for (block, was), n in could.items():
                    wants = wanted[(key[0], name, block)][1][was]
                    assert kept[(block, was)] == min(n, wants), (name, block, was)
        state = applied
