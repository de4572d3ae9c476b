"""Read Kubernetes objects from files, directories and stdin.

Documents are dispatched on ``(apiVersion, kind)``; ``List`` and ``*List``
kinds are flattened, so ``kubectl get ... -o yaml`` output loads as it is, and
kinds svcrules does not program are skipped silently.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson
import yaml
from pydantic import BaseModel, ValidationError

from svcrules.errors import InputError, Origin, Problem
from svcrules.model import EndpointSlice, NodeConfig, Service

KINDS: dict[tuple[str, str], type[BaseModel]] = {
    ("v1", "Service"): Service,
    ("discovery.k8s.io/v1", "EndpointSlice"): EndpointSlice,
    ("svcrules.io/v1alpha1", "NodeConfig"): NodeConfig,
}

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class Inputs:
    """Everything read, with where each object came from (for error messages)."""

    services: list[Service] = field(default_factory=list)
    slices: list[EndpointSlice] = field(default_factory=list)
    node_configs: list[NodeConfig] = field(default_factory=list)
    origins: dict[int, Origin] = field(default_factory=dict)

    def origin(self, obj: object) -> Origin | None:
        return self.origins.get(id(obj))

    def add(self, obj: BaseModel, origin: Origin) -> None:
        self.origins[id(obj)] = origin
        if isinstance(obj, Service):
            self.services.append(obj)
        elif isinstance(obj, EndpointSlice):
            self.slices.append(obj)
        elif isinstance(obj, NodeConfig):
            self.node_configs.append(obj)


def _expand(paths: Iterable[str]) -> Iterator[str]:
    for raw in paths:
        if raw == "-":
            yield raw
            continue
        p = Path(raw)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            yield from found
        else:
            yield raw


def _documents(text: str, path: str) -> list[Any]:
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            return [orjson.loads(text)]  # several times faster than json on large inputs
        except orjson.JSONDecodeError:
            pass  # YAML is a superset of JSON; let the YAML parser report the error.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(text, Loader=loader) if d is not None]


def _ref(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return ""
    name = meta.get("name", "")
    ns = meta.get("namespace")
    return f"{ns}/{name}" if ns else str(name)


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_problems(exc: ValidationError, origin: Origin) -> list[Problem]:
    """One line per field, with the Kubernetes field path."""
    problems = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        loc = _field_path(tuple(err["loc"]))
        if err["type"] == "missing":
            msg = "required field is missing"
        elif (
            "input" in err
            and isinstance(err["input"], str | int | float | bool)
            and (repr(err["input"]) not in msg)
        ):
            msg = f"{err['input']!r}: {msg[:1].lower()}{msg[1:]}"
        problems.append(Problem(origin, loc, msg))
    return problems


def _load_doc(doc: Any, origin: Origin, out: Inputs, problems: list[Problem]) -> None:
    if not isinstance(doc, dict):
        problems.append(Problem(origin, "", "not a Kubernetes object (expected a mapping)"))
        return
    kind = doc.get("kind")
    api = doc.get("apiVersion")
    if isinstance(kind, str) and (kind == "List" or kind.endswith("List")):
        items = doc.get("items") or []
        if not isinstance(items, list):
            problems.append(Problem(origin, "items", "expected a list"))
            return
        for i, item in enumerate(items):
            _load_doc(item, Origin(origin.path, origin.document, i), out, problems)
        return
    model = KINDS.get((str(api), str(kind)))
    if model is None:
        return
    where = Origin(origin.path, origin.document, origin.item, str(kind), _ref(doc))
    try:
        obj = model.model_validate(doc)
    except ValidationError as exc:
        problems.extend(validation_problems(exc, where))
        return
    out.add(obj, where)


def load_text(text: str, path: str, out: Inputs, problems: list[Problem]) -> None:
    try:
        docs = _documents(text, path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        problems.append(Problem(Origin(path, 0), "", f"cannot parse: {where}{exc}"))
        return
    for n, doc in enumerate(docs, start=1):
        _load_doc(doc, Origin(path, n), out, problems)


@dataclass(frozen=True)
class Source:
    """The text of one input, read once: hashed for the fast no-op path, then parsed."""

    path: str
    text: str


def read_sources(paths: Iterable[str], stdin: TextIO | None = None) -> list[Source]:
    """Read every input file (directories expanded, ``-`` for stdin)."""
    out: list[Source] = []
    problems: list[Problem] = []
    for path in _expand(paths):
        if path == "-":
            out.append(Source("<stdin>", (stdin or sys.stdin).read()))
            continue
        try:
            out.append(Source(path, Path(path).read_text(encoding="utf-8")))
        except OSError as exc:
            problems.append(Problem(None, "", f"{path}: cannot read: {exc.strerror}"))
        except UnicodeDecodeError:
            problems.append(Problem(None, "", f"{path}: not UTF-8 text"))
    if problems:
        raise InputError(problems)
    return out


def load_sources(sources: Iterable[Source]) -> Inputs:
    """Parse and validate; raise InputError listing all problems."""
    out = Inputs()
    problems: list[Problem] = []
    for source in sources:
        load_text(source.text, source.path, out, problems)
    if problems:
        raise InputError(problems)
    return out


def load_paths(paths: Iterable[str], stdin: TextIO | None = None) -> Inputs:
    """Load every object under ``paths``; raise InputError listing all problems."""
    return load_sources(read_sources(paths, stdin))
