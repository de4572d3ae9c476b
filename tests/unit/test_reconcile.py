"""Deciding what a run sends, with a fake kernel (the kernel tests send it for real)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from svcrules.compiler import Job, prepare
from svcrules.errors import KernelError
from svcrules.kernel.nft.driver import NftDriver
from svcrules.kernel.nft.transport import first_error
from svcrules.kernel.nft.transport import refused as refused_error
from svcrules.kernel.reconcile import execute, plan_change
from svcrules.kernel.state import StateStore
from tests.k8s import dump, endpoint, endpoint_slice, node_config, service


@dataclass
class FakeKernel:
    """Remembers the fingerprint the last script carried; answers state-set listings."""

    fingerprint: str | None = None
    scripts: list[str] = field(default_factory=list)
    name = "fake"

    def run(self, script: str, *, check_only: bool = False, json_output: bool = False) -> str:
        if script.startswith("list set"):
            if self.fingerprint is None:
                return json.dumps({"nftables": []})
            elem = [{"elem": {"val": 1, "comment": f"svcrules {self.fingerprint}"}}]
            return json.dumps({"nftables": [{"set": {"name": "state", "elem": elem}}]})
        self.scripts.append(script)
        for line in script.splitlines():
            if 'comment "svcrules ' in line:
                self.fingerprint = line.split('comment "svcrules ')[1][:32]
        return ""


def job(*pods: str) -> Job:
    objs = [
        node_config(),
        service("a", "203.0.113.10"),
        endpoint_slice("a", [endpoint(f"198.51.100.{p}") for p in pods]),
    ]
    return prepare(["-"], stdin=io.StringIO(dump(objs)))


def test_first_run_full_then_noop_without_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel, store = FakeKernel(), StateStore(tmp_path)
    first = plan_change(job("11"), NftDriver(kernel), store)
    assert first.mode == "full" and "first run" in first.reason
    execute(first, NftDriver(kernel), store)
    # Same bytes in, same fingerprint in the kernel: nothing is even compiled.
    monkeypatch.setattr(Job, "compile", lambda self: pytest.fail("compiled"))
    again = plan_change(job("11"), NftDriver(kernel), store)
    assert again.mode == "noop" and again.operations == 0
    monkeypatch.undo()
    # --verify compiles and reads the tables back; this fake kernel lists no tables.
    verified = plan_change(job("11"), NftDriver(kernel), store, verify=True)
    assert verified.mode == "full" and "verification found drift" in verified.reason


def test_endpoint_change_is_incremental_and_drift_is_full(tmp_path: Path) -> None:
    kernel, store = FakeKernel(), StateStore(tmp_path)
    execute(plan_change(job("11"), NftDriver(kernel), store), NftDriver(kernel), store)
    change = plan_change(job("12"), NftDriver(kernel), store)
    assert change.mode == "incremental"
    assert "198.51.100.12" in change.script and "table ip" not in change.script
    kernel.fingerprint = "0" * 32  # someone replaced the tables
    drift = plan_change(job("12"), NftDriver(kernel), store)
    assert drift.mode == "full" and "differ from what svcrules last wrote" in drift.reason


class BusyKernel(FakeKernel):
    """Refuses (EBUSY) every transaction, dry runs included, that deletes a chain whose
    name contains ``busy``, as the kernel does while a rule svcrules does not know of
    still jumps to it; nft's message names another command of the batch."""

    busy: str = "svc-"
    refused: int = 0

    def run(self, script: str, *, check_only: bool = False, json_output: bool = False) -> str:
        if self.busy and any(
            ln.startswith("delete chain") and self.busy in ln for ln in script.splitlines()
        ):
            self.refused += 1
            raise KernelError(
                "Error: Could not process rule: Device or resource busy\n"
                "delete element ip svcrules state { 1 }"
            )
        return super().run(script, check_only=check_only, json_output=json_output)


def test_ebusy_leaves_only_the_chain_in_use_and_the_next_run_deletes_it(tmp_path: Path) -> None:
    kernel, store = BusyKernel(), StateStore(tmp_path)
    execute(plan_change(affinity_job("a", "b"), NftDriver(kernel), store), NftDriver(kernel), store)
    removal = plan_change(affinity_job("a"), NftDriver(kernel), store)
    assert removal.mode == "incremental" and removal.tx and len(removal.tx.deleted) == 4
    execute(removal, NftDriver(kernel), store)
    _, meta = store.load()
    assert [s.split()[1] + " " + s.split()[2][:4] for s in meta.stale] == ["chain svc-"]
    assert (
        "delete map" in kernel.scripts[-1] and "delete chain ip svcrules aep-" in kernel.scripts[-1]
    )
    # Once free, the next run deletes it, though the inputs did not change.
    kernel.busy = ""
    later = plan_change(affinity_job("a"), NftDriver(kernel), store)
    assert later.mode == "incremental"
    assert later.script.splitlines()[-1] == f"delete chain ip svcrules {meta.stale[0].split()[2]}"
    execute(later, NftDriver(kernel), store)
    assert store.load()[1].stale == []


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


def test_deletions_come_in_dependency_order(tmp_path: Path) -> None:
    """A ClientIP Service's verdict map points at its endpoint chains, and its Service
    chain jumps to them: the map goes first, the chains that jump before their targets."""
    kernel, store = FakeKernel(), StateStore(tmp_path)
    execute(plan_change(affinity_job("a", "b"), NftDriver(kernel), store), NftDriver(kernel), store)
    tx = plan_change(affinity_job("a"), NftDriver(kernel), store).tx
    assert tx is not None
    order = [d.split()[1] + " " + d.split()[4].split("-")[0] for d in tx.deletions]
    assert order[0].startswith("map ") and set(order[-2:]) == {"chain aep"}, order
    assert order.index("chain svc") < order.index("chain aep")
    assert len(tx.deletions) == len(tx.deleted)


class RefusingKernel(FakeKernel):
    """Refuses the first incremental transaction, as the kernel does when an element
    the saved script names was deleted behind svcrules' back."""

    refused: int = 0

    def run(self, script: str, *, check_only: bool = False, json_output: bool = False) -> str:
        if "delete element" in script and not script.startswith("table") and not self.refused:
            self.refused += 1
            lines = [
                "Error: Could not process rule: No such file or directory",
                "delete element ip svcrules service-ips { 203.0.113.11 . tcp . 80 }",
                "^^^^^",
            ]
            raise refused_error("\n".join(lines * 5000))
        return super().run(script, check_only=check_only, json_output=json_output)


def test_a_refused_incremental_change_falls_back_to_full_replacement(tmp_path: Path) -> None:
    kernel, store = RefusingKernel(), StateStore(tmp_path)
    execute(plan_change(affinity_job("a", "b"), NftDriver(kernel), store), NftDriver(kernel), store)
    change = plan_change(affinity_job("a"), NftDriver(kernel), store)
    assert change.mode == "incremental"
    execute(change, NftDriver(kernel), store)
    assert kernel.refused == 1 and change.mode == "full" and change.tx is None
    assert change.reason == (
        "incremental refused: Error: Could not process rule: No such file or directory: "
        "delete element ip svcrules service-ips { 203.0.113.11 . tcp . 80 }; "
        "fell back to full replacement"
    )
    assert kernel.scripts[-1].startswith("#!") or "delete table ip svcrules" in kernel.scripts[-1]
    assert any("refused the incremental change" in p for p in change.problems)
    assert store.load()[1].fingerprint == kernel.fingerprint


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
