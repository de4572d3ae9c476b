"""The lab's node as a user drives it: the svcrules command run in the node namespace,
with its state directory in a temporary folder, for one backend (``node_for``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.k8s import Obj, dump, endpoint_slice, service

from . import backends
from .lab import Lab
from .test_semantics import CIP, cfg, eps

CIP_B = "203.0.113.20"
VARIANTS = ("nft", "legacy")


class Node:
    """Runs the svcrules command in the lab's node namespace."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.state = tmp / "state"
        self.inputs = tmp / "inputs.yaml"

    def write(self, *objs: Obj, node: Obj | None = None) -> None:
        self.inputs.write_text(dump([node or cfg(), *objs]))

    def cmd(self, verb: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "svcrules", verb, *args, "--state-dir", str(self.state)]

    def run(
        self, verb: str, *args: str, with_inputs: bool = True
    ) -> subprocess.CompletedProcess[str]:
        extra = ["-f", str(self.inputs)] if with_inputs else []
        return self.lab.exec("node", *self.cmd(verb, *extra, *args), check=False, timeout=120)

    def apply(self, *objs: Obj, node: Obj | None = None, expect: int = 0) -> str:
        self.write(*objs, node=node)
        proc = self.run("apply")
        assert proc.returncode == expect, proc.stderr
        return proc.stdout

    def transaction(self, *objs: Obj) -> str:
        self.write(*objs)
        proc = self.run("diff", "-o", "nft")
        assert proc.returncode in (0, 1), proc.stderr
        return proc.stdout


class IptablesNode(Node):
    """Node that runs every command with --backend iptables --iptables VARIANT."""

    def __init__(self, lab: Lab, tmp: Path, variant: str) -> None:
        super().__init__(lab, tmp)
        self.variant = variant

    def cmd(self, verb: str, *args: str) -> list[str]:
        flags = ["--backend", "iptables", "--iptables", self.variant]
        return [*super().cmd(verb, *args), *flags]

    def transaction(self, *objs: Obj) -> str:
        self.write(*objs)
        proc = self.run("diff", "-o", "nft")
        assert proc.returncode in (0, 1), proc.stderr
        return proc.stdout

    def save(self, family: str = "ipv4") -> str:
        return self.lab.exec("node", backends.tool(self.variant, family, "-save")).stdout

    def ipt(self, *args: str, family: str = "ipv4") -> str:
        return self.lab.exec("node", backends.tool(self.variant, family), *args).stdout

    def own(self) -> list[str]:
        """svcrules' chains and rules in both families, without counters."""
        text = self.save("ipv4") + self.save("ipv6")
        return [ln for ln in backends.rules_only(text) if "SVCRULES" in ln]

    def others(self) -> list[str]:
        """IPv4 (where the other owners' rules are) rules that are not svcrules'."""
        return [ln for ln in backends.rules_only(self.save()) if "SVCRULES" not in ln]


def node_for(lab: Lab, tmp: Path, backend: str) -> Iterator[Node]:
    """A node driven with ``backend`` (nftables, iptables-nft, iptables-legacy), for a
    fixture to yield; skips (or fails, in CI) when the backend is not installed."""
    backends.require(backend)
    if backend == "nftables":
        yield Node(lab, tmp)
        return
    variant = backend.split("-", 1)[1]
    yield IptablesNode(lab, tmp, variant)
    if variant == "legacy":
        backends.reset_legacy(lab)


def svc_a(*pods: str, **spec: Any) -> list[Obj]:
    return [
        service("a", CIP, **spec),
        endpoint_slice("a", eps(*pods)),
    ]


def svc_b(*pods: str, port: int = 80) -> list[Obj]:
    return [
        service("b", CIP_B, ports=[{"name": "http", "port": port}]),
        endpoint_slice("b", eps(*pods)),
    ]


def ops(summary: str) -> int:
    line = next(ln for ln in summary.splitlines() if ln.startswith("Kernel:"))
    return int(line.split(" operations")[0].split()[-1])


def chains_named(tx: str) -> set[str]:
    """Kinds of chains a transaction declares or edits: SVC, SEP, STATE, SERVICES, ...
    (and the names of built-in chains it touches)."""
    names = {ln[1:].split()[0] for ln in tx.splitlines() if ln.startswith(":")}
    names |= {ln.split()[1] for ln in tx.splitlines() if ln.startswith(("-D ", "-I "))}
    return {n.removeprefix("SVCRULES-").split("-")[0] for n in names}
