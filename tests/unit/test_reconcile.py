"""Deciding what a run sends, with a fake kernel (the kernel tests send it for real)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from svcrules.compiler import Job, prepare
from svcrules.driver_nft import NftDriver
from svcrules.kernel import KernelError
from svcrules.reconcile import execute, plan_change
from svcrules.state import StateStore
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
    """Refuses deletions once with EBUSY, as older kernels do when the same transaction
    drops a chain's last reference."""

    refused: int = 0

    def run(self, script: str, *, check_only: bool = False, json_output: bool = False) -> str:
        if "delete chain" in script and not self.refused:
            self.refused += 1
            raise KernelError("Error: Could not process rule: Device or resource busy")
        return super().run(script, check_only=check_only, json_output=json_output)


def test_ebusy_on_delete_is_retried_without_deletions_and_converges(tmp_path: Path) -> None:
    def objs(*names: str) -> Job:
        items = [node_config()]
        for i, name in enumerate(names):
            items += [
                service(name, f"203.0.113.{10 + i}"),
                endpoint_slice(name, [endpoint(f"198.51.100.{11 + i}")]),
            ]
        return prepare(["-"], stdin=io.StringIO(dump(items)))

    kernel, store = BusyKernel(), StateStore(tmp_path)
    execute(plan_change(objs("a", "b"), NftDriver(kernel), store), NftDriver(kernel), store)
    removal = plan_change(objs("a"), NftDriver(kernel), store)
    assert removal.mode == "incremental" and removal.tx and removal.tx.deletions
    execute(removal, NftDriver(kernel), store)  # refused once, sent again without the deletions
    assert kernel.refused == 1 and "delete chain" not in kernel.scripts[-1]
    _, meta = store.load()
    assert sorted(s.split()[1] for s in meta.stale) == ["chain", "map"]
    # The next run deletes what was left, and then nothing is stale any more.
    kernel.fingerprint = meta.fingerprint
    later = plan_change(objs("a", "c"), NftDriver(kernel), store)
    for fam, kind, name in (s.split() for s in meta.stale):
        assert f"delete {kind} {fam} svcrules {name}" in later.script
    execute(later, NftDriver(kernel), store)
    assert store.load()[1].stale == []
