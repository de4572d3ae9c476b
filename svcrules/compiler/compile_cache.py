"""The compile cache: what the last compile learnt, so that the next one re-plans only
the Services whose objects changed.

A cron run on a large node reads every Service and EndpointSlice of the cluster, and
usually one of them changed. The cache keeps, from the last compile, each input's pieces
with their digests (inputs/split.py), what each valid object is (``Info``), and each
Service's plan (``PlannedService``) under the digest of its objects. A compile with the
cache validates only new objects, plans only Services whose objects changed, and
assembles the node plan from all of them (plan/resolve.py ``assemble``), the same
function a compile without cache ends with: the result is the same plan, object for
object (tests/unit/test_compile_cache.py checks it over random sequences of changes).

Trust: the cache is used only with the code that wrote it (``code_digest``) and the
same ``on_invalid``; Service plans only with the same NodeConfig. Anything unusual (an
input that fails, a limit reached, no Service at all) compiles without the cache, so
that errors read exactly as they always did. The file is checksummed, written atomically
by its owner, and any file that does not read back whole is ignored.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from svcrules.compiler.memory import no_cyclic_gc
from svcrules.errors import InputError, OnInvalid, Origin, Problem
from svcrules.inputs.config import Overrides, node_config
from svcrules.inputs.load import Inputs, load_piece, load_sources, split_text
from svcrules.inputs.model import EndpointSlice, NodeConfig, Service
from svcrules.inputs.read import Limits, Source
from svcrules.inputs.split import UNPARSED, Piece, Split
from svcrules.plan.node import IgnoredSlice, NodePlan, PlannedService, PortPlan, port_digest
from svcrules.plan.resolve import (
    assemble,
    foreign_by_family,
    foreign_ips,
    ignored_slice,
    is_programmed,
    plan_service,
    slice_service,
    slices_by_service,
)

MAGIC = b"svcrules-compile-cache"
FORMAT = 1

Key = tuple[str, str]  # namespace, Service name


class Info(NamedTuple):
    """What one valid object is, all a compile needs of an unchanged one."""

    kind: str  # "Service", "EndpointSlice", or "" for kinds svcrules leaves alone
    key: Key | None  # the Service it is or belongs to (None: no Service's)
    ref: str  # namespace/name, for error messages
    programmed: bool = False  # a Service that gets rules (resolve.is_programmed)
    foreign: tuple[str, ...] = ()  # ClusterIPs it leaves to another proxy (labels)
    ignored: IgnoredSlice | None = None  # an EndpointSlice hidden by a label
    trigger: str = ""  # an EndpointSlice's last-change-trigger-time annotation


@dataclass
class Cache:
    code: str  # compiler.code_digest(): another version trusts nothing here
    on_invalid: str
    node: str  # digest of the NodeConfig the Service plans were made for
    splits: dict[str, Split] = field(default_factory=dict)  # by input path
    infos: dict[str, Info] = field(default_factory=dict)  # by object digest
    # By Service: the digest of its objects, its plans (one per copy of the Service), and
    # the port_digest of each of their ports in order.
    plans: dict[Key, Entry] = field(default_factory=dict)
    # The plans as read, by batch: (its pickle, its entries). A batch none of whose
    # Services changed is written back as it was read, not pickled again.
    read: dict[int, tuple[bytes, dict[Key, Entry]]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __getstate__(self) -> dict[str, object]:
        """Infos as two lists of plain tuples (pickle reads those several times faster
        than one NamedTuple per object); plans in BATCHES pickles, each written again
        only when one of its Services changed."""
        state = dict(self.__dict__)
        state["infos"] = (list(self.infos), [tuple(i) for i in self.infos.values()])
        batches: dict[int, dict[Key, Entry]] = defaultdict(dict)
        for key, entry in self.plans.items():
            batches[_batch(key)][key] = entry
        state["plans"] = {b: self._pickled(b, entries) for b, entries in batches.items()}
        del state["read"]
        return state

    def _pickled(self, batch: int, entries: dict[Key, Entry]) -> bytes:
        blob, was = self.read.get(batch, (b"", {}))
        if blob and was.keys() == entries.keys() and all(was[k] is e for k, e in entries.items()):
            return blob
        return pickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL)

    def __setstate__(self, state: dict[str, Any]) -> None:
        digests, infos = state["infos"]
        state["infos"] = dict(zip(digests, map(Info._make, infos), strict=True))
        state["read"] = {b: (blob, pickle.loads(blob)) for b, blob in state["plans"].items()}
        state["plans"] = {k: e for _, entries in state["read"].values() for k, e in entries.items()}
        self.__dict__.update(state)


BATCHES = 256  # pickles of Service plans: few enough to read fast, small to write again
Entry = tuple[str, tuple[PlannedService, ...], tuple[str, ...]]


def _batch(key: Key) -> int:
    return zlib.crc32(f"{key[0]}/{key[1]}".encode()) % BATCHES


class _Object(NamedTuple):
    """One object of this run's inputs, in input order."""

    split: Split
    piece: int  # its index among the pieces of its input
    digest: str | None  # None: its piece held several objects (a nested List)
    info: Info
    model: Service | EndpointSlice | None  # None until validated (unchanged objects)
    origin: Origin


class Compiled(NamedTuple):
    plan: NodePlan
    skipped: tuple[Problem, ...]  # what on_invalid="skip" left out
    cache: Cache  # for the next run
    port_digests: dict[int, str]  # plan.port_digest of each planned port, by id()
    triggers: dict[str, str]  # EndpointSlice namespace/name -> trigger time (see Ruleset)


class NotCacheable(Exception):
    """Compile without the cache (errors must read as they always did)."""


def compile_plan(
    sources: tuple[Source, ...],
    config: tuple[Source, ...],
    overrides: Overrides,
    on_invalid: OnInvalid,
    allow_empty: bool,
    code: str,
    cache: Cache | None,
) -> Compiled:
    """The node plan and what ``on_invalid="skip"`` left out, reusing ``cache``; and
    the cache for the next run. Raise NotCacheable when this run is one to compile
    without it."""
    usable = cache if cache and cache.code == code and cache.on_invalid == on_invalid else None
    limits = Limits.from_env()
    problems: list[Problem] = []
    splits: list[Split] = []
    for n, src in enumerate(sources):
        previous = _previous(usable, src.path, n) if usable else None
        sp = split_text(src.text, src.path, problems, previous)
        if sp is None:
            raise NotCacheable
        splits.append(sp)
    if sum(sp.objects for sp in splits) > limits.max_objects:
        raise NotCacheable
    fresh = Inputs()  # objects validated in this run, and what skip mode left out
    objects: list[_Object] = []
    for sp in splits:
        for i, piece in enumerate(sp.pieces):
            info = usable.infos.get(piece.digest) if usable and piece.digest else None
            if info is not None:
                objects.append(_Object(sp, i, piece.digest, info, None, _origin(piece, info)))
            else:
                objects += _validate(sp, i, fresh, problems, on_invalid, limits)
    if problems:
        raise NotCacheable
    config_inputs = load_sources(config) if config else None
    try:
        node = node_config(fresh, config_inputs, overrides)
    except InputError:
        raise NotCacheable from None
    if not allow_empty and not any(o.info.kind == "Service" for o in objects):
        raise NotCacheable
    node_digest = _node_digest(node)
    plans = usable.plans if usable and usable.node == node_digest else {}
    groups: dict[Key, list[_Object]] = defaultdict(list)
    for obj in objects:
        if obj.info.key is not None:
            groups[obj.info.key].append(obj)
    planned: list[PlannedService] = []
    kept: dict[Key, Entry] = {}
    port_digests: dict[int, str] = {}
    for key in sorted(groups):
        group = groups[key]
        digest = _group_digest(group)
        cached = plans.get(key)
        mine: tuple[PlannedService, ...]
        if cached is not None and digest is not None and cached[0] == digest:
            kept[key] = cached
            _, mine, digests = cached
        else:
            mine = _plan_group(group, node, fresh, on_invalid, limits)
            digests = tuple(port_digest(p) for p in _ports(mine))
            if digest is not None:
                kept[key] = (digest, mine, digests)
        port_digests.update(zip(map(id, _ports(mine)), digests, strict=True))
        services = [o for o in group if o.info.kind == "Service" and o.info.programmed]
        planned += [p._replace(origin=o.origin) for p, o in zip(mine, services, strict=True)]
    skipped: list[Problem] | None = [] if on_invalid == "skip" else None
    foreign = foreign_by_family(ip for o in objects for ip in o.info.foreign)
    plan = assemble(planned, foreign, _ignored(objects), node, skipped)
    # Kept as they are: a split pickles only its text, spans and digests (Split).
    new = Cache(code, on_invalid, node_digest, {sp.path: sp for sp in splits})
    new.infos = {o.digest: o.info for o in objects if o.digest is not None}
    new.plans = kept
    if usable is not None and plans is usable.plans:
        new.read = usable.read
    triggers = {
        o.info.ref: o.info.trigger
        for o in objects
        if o.info.trigger and o.info.key is not None and o.info.ignored is None
    }
    return Compiled(plan, (*fresh.skipped, *(skipped or ())), new, port_digests, triggers)


def _previous(cache: Cache, path: str, n: int) -> Split | None:
    """The last run's split of the input read from ``path``; or, when no input had that
    path, the one read in the same position (a file name with a date in it, say)."""
    found = cache.splits.get(path)
    if found is None and n < len(cache.splits):
        found = list(cache.splits.values())[n].renamed(path)
    return found


def _ports(planned: tuple[PlannedService, ...]) -> list[PortPlan]:
    return [p for svc in planned for family in svc.ports for _, p in family]


def _origin(piece: Piece, info: Info) -> Origin:
    o = piece.origin
    return Origin(o.path, o.document, o.item, info.kind, info.ref)


def _validate(
    sp: Split,
    i: int,
    out: Inputs,
    problems: list[Problem],
    on_invalid: OnInvalid,
    limits: Limits,
) -> list[_Object]:
    """Validate one piece into ``out``: the objects it holds (none when it was invalid,
    or is a NodeConfig; several for a nested List, which is never cached)."""
    counts = (len(out.services), len(out.slices), len(out.node_configs), len(out.skipped))
    load_piece(sp, i, out, problems, on_invalid, limits)
    if sp.pieces[i].span is not None:
        # The decoded object is several times the size of its text, which stays.
        sp.pieces[i] = sp.pieces[i]._replace(value=UNPARSED)
    made: list[Service | EndpointSlice] = [*out.services[counts[0] :], *out.slices[counts[1] :]]
    other = len(out.node_configs) > counts[2] or len(out.skipped) > counts[3]
    piece = sp.pieces[i]
    if not made and not other and piece.digest is not None:
        # A kind svcrules leaves alone: remembered so that it is not read again.
        return [_Object(sp, i, piece.digest, Info("", None, ""), None, piece.origin)]
    digest = piece.digest if len(made) == 1 and not other else None
    return [_Object(sp, i, digest, _info(m), m, out.origin(m) or piece.origin) for m in made]


def _info(obj: Service | EndpointSlice) -> Info:
    meta = obj.metadata
    ref = f"{meta.namespace}/{meta.name}"
    if isinstance(obj, Service):
        key = (meta.namespace, meta.name)
        return Info("Service", key, ref, is_programmed(obj), foreign_ips(obj))
    svc = slice_service(obj)
    if svc is None:
        return Info("EndpointSlice", None, ref)
    trigger = obj.metadata.trigger_time
    return Info("EndpointSlice", svc, ref, ignored=ignored_slice(obj), trigger=trigger)


def _group_digest(group: list[_Object]) -> str | None:
    """The digest of a Service's objects in input order (None: one cannot be digested)."""
    h = hashlib.blake2b(digest_size=16)
    for obj in group:
        if obj.digest is None:
            return None
        h.update(f"{obj.info.kind}\0{obj.digest}\0".encode())
    return h.hexdigest()


def _plan_group(
    group: list[_Object],
    node: NodeConfig,
    out: Inputs,
    on_invalid: OnInvalid,
    limits: Limits,
) -> tuple[PlannedService, ...]:
    """Plan a Service whose objects changed, validating the unchanged ones again."""
    models: list[Service | EndpointSlice] = []
    for obj in group:
        model = obj.model
        if model is None:
            again = Inputs()
            load_piece(obj.split, obj.piece, again, [], on_invalid, limits)
            model = (again.services or again.slices)[0]
        models.append(model)
    slices, ignored = slices_by_service(m for m in models if isinstance(m, EndpointSlice))
    return tuple(
        plan_service(m, slices, ignored, node)
        for m in models
        if isinstance(m, Service) and is_programmed(m)
    )


def _ignored(objects: list[_Object]) -> list[IgnoredSlice]:
    return [o.info.ignored for o in objects if o.info.ignored is not None]


def _node_digest(node: NodeConfig) -> str:
    return hashlib.sha256(node.model_dump_json().encode()).hexdigest()


# The file ---------------------------------------------------------------------------


def load(path: Path, warn: Callable[[str], None]) -> Cache | None:
    """The cache at ``path``, or None (absent; or unusable, said through ``warn``)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        warn(f"compile cache {path} ignored: {exc.strerror}")
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        # It is unpickled: only a file this user wrote, and nobody else may change.
        warn(f"compile cache {path} ignored: not a regular file of this user, unwritable by others")
        return None
    try:
        data = path.read_bytes()
        head, sep, _ = data[:200].partition(b"\n")
        body = memoryview(data)[len(head) + 1 :]  # no copy of the rest
        parts = head.split(b" ")
        if not sep or len(parts) != 3 or parts[0] != MAGIC or parts[1] != str(FORMAT).encode():
            raise ValueError("not a compile cache of this format")
        if hashlib.sha256(body).hexdigest().encode() != parts[2]:
            raise ValueError("checksum mismatch: truncated or modified")
        with no_cyclic_gc():
            cache = pickle.loads(body)
        if not isinstance(cache, Cache):
            raise ValueError("not a compile cache")
    except (OSError, ValueError, pickle.UnpicklingError, EOFError, AttributeError) as exc:
        warn(f"compile cache {path} ignored: {exc}")
        return None
    return cache


def dump(cache: Cache) -> bytes:
    """The cache as its file holds it: a header with a checksum, then the pickle."""
    with no_cyclic_gc():
        body = pickle.dumps(cache, protocol=pickle.HIGHEST_PROTOCOL)
    return b"%s %d %s\n" % (MAGIC, FORMAT, hashlib.sha256(body).hexdigest().encode()) + body
