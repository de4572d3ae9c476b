"""What svcrules last wrote, kept on disk between runs.

The kernel holds a fingerprint of the last script (in each table's ``state``
chain); the state directory holds that script and a summary of the plan. When
both agree, the next run diffs scripts instead of reading the tables back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from svcrules.plan import NodePlan, PortPlan

FORMAT_VERSION = 1
DEFAULT_STATE_DIR = "/var/lib/svcrules"


def port_digest(p: PortPlan) -> str:
    """Changes whenever any decision about the port changes (the repr of a frozen
    dataclass of strings, numbers, enums and tuples is stable)."""
    return hashlib.sha256(repr(p).encode()).hexdigest()[:16]


def port_id(p: PortPlan) -> str:
    return f"{p.key} IPv{p.family}"


@dataclass
class UdpPort:
    """What conntrack cleanup needs to know about a UDP Service port."""

    frontends: list[str]
    port: int
    node_port: int | None
    endpoints: list[str]

    @classmethod
    def of(cls, p: PortPlan) -> UdpPort:
        eps = sorted({b.ip for b in (*p.cluster_backends, *p.local_backends)})
        return cls([p.cluster_ip, *p.lb_ips, *p.external_ips], p.port, p.node_port, eps)


@dataclass
class Meta:
    fingerprint: str = ""
    ports: dict[str, str] = field(default_factory=dict)  # port id -> digest
    udp: dict[str, UdpPort] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)  # objects whose delete the kernel refused
    failures: int = 0
    last_success: float = 0.0
    input_digest: str = ""  # of the inputs and svcrules' code: same digest, same script
    table: str = ""  # the owned table's name
    backend: str = "nftables"  # which backend wrote the script
    tool: str = ""  # iptables backend: iptables-nft or iptables-legacy (they do not mix)
    counts: dict[str, int] = field(default_factory=dict)  # stats.Stats of that script
    # Every table name whose objects svcrules made with this state and may still hold:
    # the current one and earlier ones not yet proven gone (a tableName change).
    owned: list[str] = field(default_factory=list)

    @classmethod
    def of_plan(cls, plan: NodePlan, fingerprint: str) -> Meta:
        ports = [p for f in plan.families for p in f.ports]
        return cls(
            fingerprint=fingerprint,
            ports={port_id(p): port_digest(p) for p in ports},
            udp={port_id(p): UdpPort.of(p) for p in ports if p.protocol == "UDP"},
        )


class StateStore:
    """``<dir>/last.json`` (Meta) and the last text: ``last.nft`` (nftables backend)
    or ``last.iptables`` (iptables backend).

    One state directory belongs to one svcrules instance (one owned table name, one
    backend at a time)."""

    SCRIPT_NAMES: ClassVar[dict[str, str]] = {"nftables": "last.nft", "iptables": "last.iptables"}

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.meta_path = self.dir / "last.json"

    def script_path(self, backend: str) -> Path:
        return self.dir / self.SCRIPT_NAMES[backend]

    def has_script(self) -> bool:
        return any(self.script_path(b).is_file() for b in self.SCRIPT_NAMES)

    def load(self) -> tuple[str | None, Meta]:
        try:
            raw: dict[str, Any] = json.loads(self.meta_path.read_text())
            script = self.script_path(raw.get("backend", "nftables")).read_text()
        except (OSError, ValueError, KeyError):
            return None, self._counters_only()
        if raw.get("version") != FORMAT_VERSION:
            return None, Meta(failures=raw.get("failures", 0))
        meta = Meta(
            fingerprint=raw["fingerprint"],
            ports=raw["ports"],
            udp={k: UdpPort(**v) for k, v in raw["udp"].items()},
            stale=raw.get("stale", []),
            failures=raw.get("failures", 0),
            last_success=raw.get("last_success", 0.0),
            input_digest=raw.get("input_digest", ""),
            table=raw.get("table", ""),
            counts=raw.get("counts", {}),
            backend=raw.get("backend", "nftables"),
            tool=raw.get("tool", ""),
            owned=raw.get("owned", [raw["table"]] if raw.get("table") else []),
        )
        return script, meta

    def _counters_only(self) -> Meta:
        try:
            raw = json.loads(self.meta_path.read_text())
            return Meta(failures=raw.get("failures", 0), last_success=raw.get("last_success", 0))
        except (OSError, ValueError, AttributeError):
            return Meta()

    def save(self, script: str | None, meta: Meta) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if script is not None:
            _atomic_write(self.script_path(meta.backend), script)
        data = {"version": FORMAT_VERSION, **dataclasses.asdict(meta)}
        _atomic_write(self.meta_path, json.dumps(data, sort_keys=True, indent=1) + "\n")

    def clear(self) -> None:
        for p in (*(self.script_path(b) for b in self.SCRIPT_NAMES), self.meta_path):
            p.unlink(missing_ok=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
