"""Running svcrules in the lab's node the way a timer does, and comparing what the node
holds with a clean apply of the same input, on any backend.

The comparison is of content, not counts: every rule and every element (nft: as
``nft -j`` lists them, without handles, counters and the entries packets put in
affinity sets; iptables: svcrules' lines of iptables-save, without counters). One
freedom is allowed, the only one packets cannot see: the order of a selection's
endpoints among its slots, which incremental runs keep stable (kernel/nft/slots.py)
where a clean apply writes them sorted; so the fingerprints that name that text are
left out too. The
clean apply runs in a network namespace made for it inside the node namespace, with
its own state directory, so the node under test is not touched.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from svcrules.kernel.nft.driver import Content, listed_content
from svcrules.kernel.state import StateStore
from svcrules.render.nftables.layout import PICK_MAPS, SLOT_BITS
from tests.k8s import Obj, dump

from . import backends
from .lab import Lab
from .test_semantics import cfg

TABLE = "svcrules"


class Runner:
    """svcrules in the node namespace, one backend, a private state directory."""

    def __init__(self, lab: Lab, tmp: Path, backend: str) -> None:
        self.lab, self.tmp, self.backend = lab, tmp, backend
        self.state = tmp / "state"
        self.inputs = tmp / "inputs.yaml"
        self.extra: list[str] = []  # options every run gets (a table name, ...)

    @property
    def variant(self) -> str:
        return self.backend.split("-", 1)[1] if self.backend != "nftables" else ""

    def flags(self) -> list[str]:
        if self.backend == "nftables":
            return [*self.extra]
        return ["--backend", "iptables", "--iptables", self.variant, *self.extra]

    def write(self, objs: list[Obj]) -> None:
        self.inputs.write_text(dump([cfg(), *objs]))

    def run(
        self, verb: str, *args: str, state: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "svcrules", verb, str(self.inputs), *args, *self.flags()]
        cmd += ["--state-dir", str(state or self.state)]
        return self.lab.exec("node", *cmd, check=False, timeout=120)

    def sync(self, objs: list[Obj], *args: str) -> subprocess.CompletedProcess[str]:
        self.write(objs)
        return self.run("sync", *args)

    def content(self) -> Any:
        """What the node holds of svcrules' rules."""
        return self._parse(self.lab.exec("node", "sh", "-c", self._lister()).stdout)

    def clean(self, objs: list[Obj]) -> Any:
        """What a first apply of ``objs`` makes, in a fresh network namespace."""
        self.write(objs)
        scratch = self.tmp / "clean-state"
        apply = [sys.executable, "-m", "svcrules", "apply", str(self.inputs), *self.flags()]
        apply += ["--state-dir", str(scratch)]
        script = f"{' '.join(apply)} >/dev/null && {self._lister()}"
        proc = self.lab.exec("node", "unshare", "--net", "sh", "-c", script, timeout=120)
        subprocess.run(["rm", "-rf", str(scratch)], check=True)
        return self._parse(proc.stdout)

    def stale(self) -> list[str]:
        """The objects a refused delete left, per the state directory."""
        return list(StateStore(self.state).load()[1].stale)

    def alter_saved(self, old: str, new: str) -> None:
        """Replace text in the saved script, as a bug or a bad restore of the state
        directory would: the kernel's fingerprint still matches the state's."""
        store = StateStore(self.state)
        script, meta = store.load()
        assert script is not None and old in script
        store.save(script.replace(old, new), meta)

    def table(self) -> str:
        for i, arg in enumerate(self.extra):
            if arg == "--table-name":
                return self.extra[i + 1]
        return TABLE

    def _lister(self) -> str:
        if self.backend == "nftables":
            # The whole ruleset: the lab's node holds nothing else, and tables left under
            # an earlier table name must show.
            return "nft -j list ruleset"
        return " && ".join(backends.tool(self.variant, fam, "-save") for fam in ("ipv4", "ipv6"))

    def _parse(self, out: str) -> Any:
        if self.backend == "nftables":
            listing = [
                o
                for chunk in out.splitlines()
                if chunk.strip()
                for o in json.loads(chunk)["nftables"]
                if "metainfo" not in o
            ]
            return {k: str(_slot_order_free(k, v)) for k, v in listed_content(listing).items()}
        # Every rule and chain of any prefix: chains left under an earlier table name
        # must show (the lab's node holds no other rules).
        return sorted(ln for ln in backends.rules_only(out) if not ln.startswith(("*", "COMMIT")))


def _slot_order_free(name: str, content: Content) -> Content:
    """``content`` with each slot block's endpoints sorted (pick maps), or without the
    fingerprint (the state set)."""
    obj = name.split(" ", 1)[1]
    if obj == "state":
        return dataclasses.replace(content, items=())
    if not obj.startswith(PICK_MAPS):
        return content
    blocks: dict[int, list[tuple[int, Any]]] = {}
    for slot, value in (json.loads(item) for item in content.items):
        blocks.setdefault(slot >> SLOT_BITS, []).append((slot, value))
    items = []
    for block in blocks.values():
        slots = sorted(slot for slot, _ in block)
        values = sorted((value for _, value in block), key=json.dumps)
        items += [json.dumps([s, v], sort_keys=True) for s, v in zip(slots, values, strict=True)]
    return dataclasses.replace(content, items=tuple(sorted(items)))


def runner_for(lab: Lab, tmp: Path, backend: str) -> Iterator[Runner]:
    """A runner for ``backend``, for a fixture to yield; skips (or fails, in CI) when the
    backend is not installed, and leaves iptables-legacy's tables empty afterwards."""
    backends.require(backend)
    yield Runner(lab, tmp, backend)
    if backend == "iptables-legacy":
        backends.reset_legacy(lab)


def differences(have: Any, want: Any) -> str:
    """A readable account of how two contents differ (for assertion messages)."""
    if isinstance(have, dict):
        keys = sorted(set(have) | set(want))
        return "\n".join(
            f"{k}:\n  node:  {have.get(k)}\n  clean: {want.get(k)}"
            for k in keys
            if have.get(k) != want.get(k)
        )[:6000]
    extra = [ln for ln in have if ln not in want]
    missing = [ln for ln in want if ln not in have]
    return f"in the node only: {extra[:20]}\nin a clean apply only: {missing[:20]}"
