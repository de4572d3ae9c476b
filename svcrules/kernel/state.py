"""What svcrules last wrote, kept on disk between runs.

The kernel holds a fingerprint of the last script (in each table's ``state`` set
or ``<P>-STATE`` chain); the state directory holds that script and a summary of
the plan. When both agree, the next run diffs scripts instead of reading the
tables back.

Files in the state directory:

- ``state``: the summary and the script in one file, written to a temporary file,
  synced and renamed, so that a kill at any moment leaves either the old or the new
  state, never half of each. Its first line carries a SHA-256 of the rest; a file
  that does not match (truncated, edited, damaged disk) is ignored, and the next run
  replaces the rules whole, which is always safe.
- ``counters.json``: what runs add up (for metrics and ``svcrules serve``): failures,
  the time of the last success, how the last run went, and the kube-proxy histograms
  (history.py); small, rewritten after every run without touching ``state``.
- ``triggers.json``: the last-change-trigger-time of each EndpointSlice as the last
  successful run saw them (history.py: network programming latency).
- ``details``: what each Service port of the script is (svcrules.plan.review), for the
  next run's change review; written before ``state`` and naming the fingerprint of the
  script it belongs to, read only when a review is printed or a change summarized. A
  missing, damaged or mismatched one only makes the review coarse (no details).
- ``compile-cache``: what the last compile can lend the next one (the inputs' pieces
  and each Service's plan; svcrules/compiler/compile_cache.py). Only a speed-up:
  checksummed, and a missing or unusable one means a compile from scratch.
- ``lock``: taken by every command that writes (see lock.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svcrules.errors import StateError

if TYPE_CHECKING:
    # Annotations only: the CLI imports this module at start (DEFAULT_STATE_DIR).
    from svcrules.compiler.compile_cache import Cache
    from svcrules.plan.node import NodePlan, PortPlan

FORMAT_VERSION = 2
# The details file: its form (svcrules.plan.review.summarize); details of another form
# are not read.
DETAILS_MAGIC = "svcrules-details"
DETAILS_VERSION = 1
MAGIC = "svcrules-state"
DEFAULT_STATE_DIR = "/var/lib/svcrules"
LEGACY_FILES = ("last.json", "last.nft", "last.iptables")  # format 1: two files, not atomic


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
        # Drained endpoints (weight 0) keep their connections: their entries stay.
        eps = sorted({b.ip for b in (*p.cluster_backends, *p.local_backends, *p.drained)})
        return cls([p.cluster_ip, *p.lb_ips, *p.external_ips], p.port, p.node_port, eps)


class Details(Mapping[str, str]):
    """Port id -> what the port is (svcrules.plan.review.summarize): given, or read from
    the state directory's ``details`` file the first time it is asked for (a run that
    changes nothing never reads it)."""

    def __init__(
        self, items: dict[str, str] | None = None, load: Callable[[], dict[str, str]] | None = None
    ) -> None:
        self._items = items
        self._load = load

    def _map(self) -> dict[str, str]:
        if self._items is None:
            self._items = self._load() if self._load is not None else {}
        return self._items

    def __getitem__(self, key: str) -> str:
        return self._map()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map())

    def __len__(self) -> int:
        return len(self._map())


@dataclass
class Meta:
    fingerprint: str = ""
    ports: dict[str, str] = field(default_factory=dict)  # port id -> digest
    udp: dict[str, UdpPort] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)  # objects whose delete the kernel refused
    failures: int = 0  # kept in counters.json
    last_success: float = 0.0  # kept in counters.json
    input_digest: str = ""  # of the inputs and svcrules' code: same digest, same script
    table: str = ""  # the owned table's name
    backend: str = "nftables"  # which backend wrote the script
    tool: str = ""  # iptables backend: iptables-nft or iptables-legacy (they do not mix)
    counts: dict[str, int] = field(default_factory=dict)  # stats.Stats of that script
    # Every table name whose objects svcrules made with this state and may still hold:
    # the current one and earlier ones not yet proven gone (a tableName change).
    owned: list[str] = field(default_factory=list)
    # What --on-invalid skip left out of this script (one line per object): a run that
    # compiles nothing (same inputs) still reports them.
    invalid: list[str] = field(default_factory=list)
    # The healthCheckNodePorts this script's node serves (``svcrules serve``), saved with
    # the script so that the answers always match the rules in the kernel: one dict per
    # Service and family (see health_entries).
    health: list[dict[str, Any]] = field(default_factory=list)
    # Kept in counters.json: histogram name -> its buckets (history.Histogram), and how the
    # last run went (history.LastRun).
    histograms: dict[str, Any] = field(default_factory=dict)
    last_run: dict[str, Any] = field(default_factory=dict)
    # port id -> what the port is (svcrules.plan.review.summarize), for the next run's
    # change review: kept in the details file, not in the state file (see Details).
    details: Details = field(default_factory=Details, compare=False, repr=False)

    @classmethod
    def of_plan(
        cls,
        plan: NodePlan,
        fingerprint: str,
        digests: Mapping[int, str] | None = None,
        previous: Meta | None = None,
    ) -> Meta:
        """The summary of ``plan``; ``digests``: the port_digest of ports by id(), as a
        compile with its cache knows them without computing them again. A port whose
        digest ``previous`` holds too keeps the details ``previous`` has for it, so that
        a run summarizes only the ports that changed."""
        from svcrules.plan.node import port_digest
        from svcrules.plan.review import summarize

        known = digests or {}
        ports = [p for f in plan.families for p in f.ports]
        ids = {port_id(p): (p, known.get(id(p)) or port_digest(p)) for p in ports}
        kept: Mapping[str, str] = {}
        if previous is not None and previous.ports:
            old, saved = previous.ports, previous.details
            kept = {k: saved[k] for k, (_, d) in ids.items() if old.get(k) == d and k in saved}
        return cls(
            fingerprint=fingerprint,
            ports={k: d for k, (_, d) in ids.items()},
            udp={port_id(p): UdpPort.of(p) for p in ports if p.protocol == "UDP"},
            health=health_entries(plan),
            details=Details({k: kept.get(k) or summarize(p) for k, (p, _) in ids.items()}),
        )

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Meta:
        """Only known fields; a value of the wrong shape raises (TypeError, ValueError,
        KeyError, AttributeError), which the loader reads as damaged state."""
        names = {f.name for f in dataclasses.fields(cls)} - {"details"}
        values = {k: v for k, v in raw.items() if k in names}
        values["udp"] = {k: UdpPort(**v) for k, v in dict(values.get("udp", {})).items()}
        meta = cls(**values)
        if not isinstance(meta.ports, dict) or not isinstance(meta.stale, list):
            raise ValueError("ports or stale of the wrong type")
        if not isinstance(meta.health, list):
            raise ValueError("health of the wrong type")
        return meta


def health_entries(plan: NodePlan) -> list[dict[str, Any]]:
    """The plan's healthCheckNodePorts as the state summary keeps them. ``address``: where
    to listen, as kube-proxy does: on the node's primary IP of the family when
    nodePortAddresses is ``primary`` (kube-proxy's nftables default), else on every
    address of the family ("")."""
    where = {
        f.family: (f.node_ip or "") if f.nodeport_mode == "primary" else "" for f in plan.families
    }
    return [
        {
            "namespace": h.namespace,
            "name": h.name,
            "family": h.family,
            "port": h.port,
            "localEndpoints": h.local_endpoints,
            "address": where.get(h.family, ""),
        }
        for h in plan.health_checks
    ]


COUNTERS = ("failures", "last_success", "histograms", "last_run")


class StateStore:
    """One state directory: one svcrules instance (one owned table name, one backend
    at a time)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.path = self.dir / "state"
        self.counters_path = self.dir / "counters.json"
        self.cache_path = self.dir / "compile-cache"
        self.details_path = self.dir / "details"
        self.triggers_path = self.dir / "triggers.json"
        self.damaged = ""  # why the saved state was ignored, for the run's reason

    # Reading

    def load(self) -> tuple[str | None, Meta]:
        """The last script and its summary; (None, counters only) when there is none or
        it cannot be trusted (``damaged`` then says why)."""
        self.damaged = ""
        meta = self.load_counters()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None, self._load_legacy(meta)
        except IsADirectoryError:
            self.damaged = f"{self.path} is a directory"
            return None, meta
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            script, saved = _decode(data)
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
            self.damaged = f"the saved state was damaged ({exc})"
            return None, meta
        for name in COUNTERS:
            setattr(saved, name, getattr(meta, name))
        saved.details = Details(load=lambda: self._load_details(saved.fingerprint))
        return script, saved

    def _load_details(self, fingerprint: str) -> dict[str, str]:
        """The details of the script with ``fingerprint``; {} when there are none that
        can be trusted for it (the review is then coarse)."""
        try:
            data = self.details_path.read_bytes()
            head, _, body = data.partition(b"\n")
            magic, version, digest, of = head.decode("ascii").split(" ")
            if (magic, version, of) != (DETAILS_MAGIC, str(DETAILS_VERSION), fingerprint):
                return {}
            if hashlib.sha256(body).hexdigest() != digest:
                return {}
            lines = body.decode("utf-8").splitlines()
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        return dict(line.split("\t", 1) for line in lines if "\t" in line)

    def load_counters(self) -> Meta:
        """counters.json alone (a Meta holding only the counters): what runs added up.
        A damaged file reads as nothing counted yet; a damaged part of it as that part
        missing."""
        try:
            raw = json.loads(self.counters_path.read_text(encoding="utf-8"))
            meta = Meta(failures=int(raw["failures"]), last_success=float(raw["last_success"]))
        except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError):
            return Meta()
        for name in ("histograms", "last_run"):
            value = raw.get(name)
            if isinstance(value, dict):
                setattr(meta, name, value)
        return meta

    def load_summary(self) -> Meta | None:
        """The saved summary without the script, its checksum verified as ``load`` does,
        reading the file in pieces (``svcrules serve`` reads it on every change and never
        needs the script); None when there is none or it cannot be trusted."""
        try:
            with self.path.open("rb") as fh:
                head = fh.readline(200)
                parts = head.decode("ascii").split(" ")
                if len(parts) != 3 or parts[0] != MAGIC or parts[1] != str(FORMAT_VERSION):
                    return None
                digest = hashlib.sha256()
                meta_line = fh.readline()
                digest.update(meta_line)
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            if digest.hexdigest() != parts[2].strip():
                return None
            raw = json.loads(meta_line)
            return Meta.from_json(raw) if isinstance(raw, dict) else None
        except (OSError, ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            return None

    def _load_legacy(self, counters: Meta) -> Meta:
        """Format 1 (last.json + last.nft, written one after the other) cannot prove its
        two files belong together: keep only which rules it names, so that the next run
        replaces them whole and cleanup still knows the table."""
        try:
            raw = json.loads((self.dir / "last.json").read_text(encoding="utf-8"))
            meta = Meta(
                table=str(raw.get("table", "")),
                backend=str(raw.get("backend", "nftables")),
                tool=str(raw.get("tool", "")),
            )
            meta.owned = [meta.table] if meta.table else []
        except (OSError, ValueError, TypeError, AttributeError):
            return counters
        meta.failures = counters.failures or int(raw.get("failures", 0) or 0)
        meta.last_success = counters.last_success or float(raw.get("last_success", 0) or 0)
        meta.histograms, meta.last_run = counters.histograms, counters.last_run
        return meta

    def load_cache(self, warnings: list[str]) -> Cache | None:
        """The compile cache, or None; why an existing one is unusable goes to
        ``warnings``."""
        from svcrules.compiler.compile_cache import load

        return load(self.cache_path, warnings.append)

    def has_state(self) -> bool:
        return self.path.is_file() or any((self.dir / n).is_file() for n in LEGACY_FILES)

    # Writing (under the lock)

    def check_dir(self) -> None:
        """Fail early, before the kernel is touched, when the state cannot be written."""
        if self.dir.is_symlink() and not self.dir.exists():
            raise StateError(f"state directory {self.dir} is a dangling symbolic link")
        if self.dir.exists() and not self.dir.is_dir():
            raise StateError(f"state directory {self.dir} exists and is not a directory")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.dir}: {exc.strerror}") from None
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise StateError(f"state directory {self.dir} is not writable")
        if self.path.is_dir():
            raise StateError(f"{self.path} is a directory; remove it")

    def _remove_temp_files(self) -> None:
        """Temporary files of runs that died before their rename. Only ``save`` calls
        this, under the lock; a run without the lock (a failure being counted) may still
        be writing its own, so those younger than a minute stay."""
        now = time.time()
        for tmp in self.dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.name.endswith(f".{os.getpid()}.tmp") or now - tmp.stat().st_mtime < 60:
                    continue
            with contextlib.suppress(OSError):
                tmp.unlink()

    def save(self, script: str, meta: Meta) -> None:
        """Replace the state and the counters (the state first: it is what matters),
        after the details (which name the state they belong to)."""
        self.check_dir()
        self._remove_temp_files()
        self._save_details(meta)
        try:
            _atomic_write(self.path, _encode(script, meta))
        except StateError:
            with contextlib.suppress(OSError):  # they describe a state not saved
                self.details_path.unlink(missing_ok=True)
            raise
        self.save_counters(meta)
        for name in LEGACY_FILES:
            (self.dir / name).unlink(missing_ok=True)

    def _save_details(self, meta: Meta) -> None:
        """Not synced, and a failure is no error: details only make the review finer."""
        body = "".join(f"{k}\t{v}\n" for k, v in meta.details.items()).encode("utf-8")
        head = f"{DETAILS_MAGIC} {DETAILS_VERSION} {hashlib.sha256(body).hexdigest()}"
        try:
            _atomic_write(self.details_path, f"{head} {meta.fingerprint}\n".encode() + body, False)
        except StateError:
            with contextlib.suppress(OSError):
                self.details_path.unlink(missing_ok=True)

    def save_cache(self, cache: Cache) -> None:
        """Replace the compile cache. Not synced to disk: a copy torn by a power cut fails
        its checksum and is ignored, which costs one compile from scratch."""
        from svcrules.compiler.compile_cache import dump

        _atomic_write(self.cache_path, dump(cache), sync=False, mode=0o600)

    def save_counters(self, meta: Meta) -> None:
        data = {k: getattr(meta, k) for k in COUNTERS}
        _atomic_write(self.counters_path, (json.dumps(data, sort_keys=True) + "\n").encode())

    def load_triggers(self) -> dict[str, str] | None:
        """triggers.json: EndpointSlice namespace/name -> last-change-trigger-time as the
        last successful run saw them; None when there is none (nothing seen yet)."""
        try:
            raw = json.loads(self.triggers_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("slices"), dict):
            return None
        return {str(k): str(v) for k, v in raw["slices"].items()}

    def save_triggers(self, triggers: dict[str, str]) -> None:
        """Not synced to disk: a copy lost in a power cut costs the latency of the
        changes of one run (observed again, or not at all)."""
        data = json.dumps({"slices": triggers}, sort_keys=True) + "\n"
        _atomic_write(self.triggers_path, data.encode(), sync=False)

    def clear(self) -> None:
        """Forget the rules (cleanup removed them); the counters stay."""
        files = (self.path, self.cache_path, self.triggers_path, self.details_path)
        for p in (*files, *(self.dir / n for n in LEGACY_FILES)):
            try:
                p.unlink(missing_ok=True)
            except IsADirectoryError:
                raise StateError(f"{p} is a directory; remove it") from None
            except OSError as exc:
                raise StateError(f"cannot remove {p}: {exc.strerror}") from None


def _encode(script: str, meta: Meta) -> bytes:
    # Field by field rather than dataclasses.asdict, which deep-copies every value (the
    # Service ports' dict: a third of a second at 50,000 Services).
    data = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}
    data["udp"] = {k: vars(v) for k, v in meta.udp.items()}
    for k in (*COUNTERS, "details"):
        data.pop(k)
    body = (json.dumps(data, sort_keys=True) + "\n" + script).encode("utf-8")
    return f"{MAGIC} {FORMAT_VERSION} {hashlib.sha256(body).hexdigest()}\n".encode() + body


def _decode(data: bytes) -> tuple[str, Meta]:
    head, sep, body = data.partition(b"\n")
    parts = head.decode("ascii").split(" ")
    if not sep or len(parts) != 3 or parts[0] != MAGIC:
        raise ValueError("not a svcrules state file")
    if parts[1] != str(FORMAT_VERSION):
        raise ValueError(f"format {parts[1]}, this svcrules reads {FORMAT_VERSION}")
    if hashlib.sha256(body).hexdigest() != parts[2]:
        raise ValueError("checksum mismatch: truncated or modified")
    meta_line, _, script = body.decode("utf-8").partition("\n")
    raw = json.loads(meta_line)
    if not isinstance(raw, dict):
        raise ValueError("summary is not an object")
    return script, Meta.from_json(raw)


def _atomic_write(path: Path, data: bytes, sync: bool = True, mode: int = 0o644) -> None:
    """Temporary file, fsync, rename, fsync of the directory: all or nothing, even
    across a power cut (without ``sync``: all or nothing while the machine runs). A
    failed write leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with open(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        tmp.replace(path)
        if sync:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
        raise StateError(f"cannot write {path}: {exc.strerror}{hint}") from None
