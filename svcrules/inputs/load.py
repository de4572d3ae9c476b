"""Read Kubernetes objects from files, directories and stdin.

Documents are dispatched on ``(apiVersion, kind)``; ``List`` and ``*List``
kinds are flattened, so ``kubectl get ... -o yaml`` output loads as it is, and
kinds svcrules does not program are skipped silently. svcrules' own kind
(NodeConfig) is strict: an unknown field, or an apiVersion or kind close to its
own, is an error that names the closest spelling.

Reading is bounded (read.py: only regular files and stdin, at most
``SVCRULES_MAX_INPUT_BYTES`` in all, UTF-8 only; parse.py: depth, aliases, integers).
"""

from __future__ import annotations

import difflib
import functools
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

import yaml
from pydantic import BaseModel, ValidationError

from svcrules.errors import InputError, OnInvalid, Origin, Problem
from svcrules.inputs.model import EndpointSlice, NodeConfig, Service
from svcrules.inputs.parse import Refused
from svcrules.inputs.read import Limits, Source, read_sources
from svcrules.inputs.split import UNPARSED, Split, split

KINDS: dict[tuple[str, str], type[BaseModel]] = {
    ("v1", "Service"): Service,
    ("discovery.k8s.io/v1", "EndpointSlice"): EndpointSlice,
    ("svcrules.io/v1alpha1", "NodeConfig"): NodeConfig,
}

# svcrules' own kinds: strict, and near misses of their names are errors.
OWN_KINDS = {kind: api for (api, kind), model in KINDS.items() if model is NodeConfig}
OWN_GROUP = "svcrules.io"


@dataclass
class Inputs:
    """Everything read, with where each object came from (for error messages)."""

    services: list[Service] = field(default_factory=list)
    slices: list[EndpointSlice] = field(default_factory=list)
    node_configs: list[NodeConfig] = field(default_factory=list)
    origins: dict[int, Origin] = field(default_factory=dict)
    # Invalid Services and EndpointSlices left out (``on_invalid="skip"``), one per object.
    skipped: list[Problem] = field(default_factory=list)
    objects: int = 0  # documents and List items seen, for Limits.max_objects

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


def validation_problems(
    exc: ValidationError, origin: Origin, model: type[BaseModel] | None = None
) -> list[Problem]:
    """One line per field, with the Kubernetes field path. With ``model``, an unknown
    field (models that forbid them) names the closest known one."""
    problems = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        loc = _field_path(tuple(err["loc"]))
        if err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field" + _did_you_mean(
                str(err["loc"][-1]), _known_fields(model, tuple(err["loc"][:-1]))
            )
        elif (
            "input" in err
            and isinstance(err["input"], str | int | float | bool)
            and (repr(err["input"]) not in msg)
        ):
            msg = f"{err['input']!r}: {msg[:1].lower()}{msg[1:]}"
        problems.append(Problem(origin, loc, msg))
    return problems


def _did_you_mean(word: str, known: Iterable[str]) -> str:
    known = list(known)
    folded = {k.lower(): k for k in known}
    close = [folded[word.lower()]] if word.lower() in folded else []
    close = close or difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _known_fields(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> list[str]:
    """The spellings a model accepts at ``loc`` (walking nested models)."""
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        fields = {(f.alias or name): f for name, f in model.model_fields.items()}
        found = fields.get(part)
        model = _model_in(found.annotation) if found else None
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _own_kind_problem(doc: dict[str, Any], origin: Origin) -> Problem | None:
    """A document that looks meant for svcrules but names no kind it knows."""
    api, kind = doc.get("apiVersion"), doc.get("kind")
    api_s = api if isinstance(api, str) else ""
    kind_s = kind if isinstance(kind, str) else ""
    if not _looks_own(api_s, kind_s):
        return None  # someone else's kind: skipped like every kind svcrules ignores
    kinds = list(OWN_KINDS)
    where = Origin(origin.path, origin.document, origin.item, kind_s, _ref(doc))
    if kind_s not in OWN_KINDS:
        return Problem(
            where, "kind", f"{kind!r} is not a svcrules kind" + _did_you_mean(kind_s, kinds)
        )
    return Problem(
        where,
        "apiVersion",
        f"{api!r} is not the apiVersion of {kind_s}" + f" (did you mean {OWN_KINDS[kind_s]}?)",
    )


@functools.lru_cache(maxsize=256)  # inputs hold few kinds, each many times
def _looks_own(api: str, kind: str) -> bool:
    """svcrules' API group or one close to its apiVersion; a kind named like its
    own in any group; or a kind close to its own with no apiVersion."""
    if api.split("/")[0] == OWN_GROUP:
        return True
    if difflib.get_close_matches(api, sorted(set(OWN_KINDS.values())), n=1, cutoff=0.8):
        return True
    if kind.lower() in (k.lower() for k in OWN_KINDS):
        return True
    return not api and bool(difflib.get_close_matches(kind, list(OWN_KINDS), n=1, cutoff=0.8))


class _TooMany(Exception):
    pass


def _load_doc(
    doc: Any,
    origin: Origin,
    out: Inputs,
    problems: list[Problem],
    limits: Limits,
    skip: bool = False,
) -> None:
    out.objects += 1
    if out.objects > limits.max_objects:
        raise _TooMany
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
            # Recursion is bounded: documents are at most parse.MAX_DEPTH deep.
            _load_doc(item, Origin(origin.path, origin.document, i), out, problems, limits, skip)
        return
    model = KINDS.get((str(api), str(kind)))
    if model is None:
        own = _own_kind_problem(doc, origin)
        if own is not None:
            problems.append(own)
        return
    where = Origin(origin.path, origin.document, origin.item, str(kind), _ref(doc))
    try:
        obj = model.model_validate(doc)
    except ValidationError as exc:
        found = validation_problems(exc, where, model)
        if skip and model is not NodeConfig:
            why = "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in found)
            out.skipped.append(Problem(where, "", f"left out: {why}"))
        else:
            problems.extend(found)
        return
    out.add(obj, where)


def load_text(
    text: str,
    path: str,
    out: Inputs,
    problems: list[Problem],
    on_invalid: OnInvalid = "fail",
    limits: Limits | None = None,
) -> None:
    """Parse one input into ``out``. With ``on_invalid="skip"``, Services and
    EndpointSlices that fail validation go to ``out.skipped`` instead of
    ``problems``; a document that cannot be parsed is always a problem (which
    objects it held, and so which to keep, cannot be known)."""
    pieces = split_text(text, path, problems, digests=False)
    if pieces is not None:
        load_pieces(pieces, range(len(pieces.pieces)), out, problems, on_invalid, limits)


def split_text(
    text: str,
    path: str,
    problems: list[Problem],
    previous: Split | None = None,
    digests: bool = True,
) -> Split | None:
    """``split.split``, with a text that cannot be parsed reported in ``problems``."""
    try:
        return split(path, text, previous, digests)
    except yaml.YAMLError as exc:
        problems.append(Problem(Origin(path, 0), "", f"cannot parse: {_yaml_error(exc)}"))
    except Refused as exc:
        problems.append(Problem(Origin(path, exc.document), "", f"refused: {exc}"))
    return None


def load_pieces(
    pieces: Split,
    which: Iterable[int],
    out: Inputs,
    problems: list[Problem],
    on_invalid: OnInvalid = "fail",
    limits: Limits | None = None,
) -> None:
    """Validate the pieces ``which`` (indices, in input order) of one input into
    ``out``; the List documents holding them count once as objects."""
    limits = limits or Limits()
    out.objects += pieces.objects - len(pieces.pieces)
    for i in which:
        if not load_piece(pieces, i, out, problems, on_invalid, limits):
            return
        # Free the decoded object as soon as it is validated: at 50,000 Services the
        # decoded input is larger than the validated one.
        pieces.pieces[i] = pieces.pieces[i]._replace(value=UNPARSED)


def load_piece(
    pieces: Split,
    i: int,
    out: Inputs,
    problems: list[Problem],
    on_invalid: OnInvalid = "fail",
    limits: Limits | None = None,
) -> bool:
    """Validate piece ``i`` of one input into ``out``; False once the objects of all
    inputs are beyond ``limits`` (said in ``problems``)."""
    limits = limits or Limits()
    origin = pieces.pieces[i].origin
    try:
        _load_doc(pieces.value(i), origin, out, problems, limits, on_invalid == "skip")
    except _TooMany:
        problems.append(
            Problem(
                Origin(origin.path, origin.document),
                "",
                f"refused: more than {limits.max_objects} objects in all inputs "
                "(SVCRULES_MAX_OBJECTS)",
            )
        )
        return False
    return True


def _yaml_error(exc: yaml.YAMLError) -> str:
    """One line: where, then what (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
    if isinstance(exc, yaml.MarkedYAMLError):
        what = " ".join(p for p in (exc.context, exc.problem) if p)
    else:
        what = str(exc)
    return where + " ".join(what.split())


def load_sources(
    sources: Iterable[Source], on_invalid: OnInvalid = "fail", limits: Limits | None = None
) -> Inputs:
    """Parse and validate; raise InputError listing all problems. With
    ``on_invalid="skip"`` invalid Services and EndpointSlices are left out and listed
    in ``Inputs.skipped`` (see ``load_text``)."""
    limits = limits or Limits.from_env()
    out = Inputs()
    problems: list[Problem] = []
    for source in sources:
        load_text(source.text, source.path, out, problems, on_invalid, limits)
        if out.objects > limits.max_objects:
            break
    if problems:
        raise InputError(problems)
    return out


def load_paths(paths: Iterable[str], stdin: TextIO | None = None) -> Inputs:
    """Load every object under ``paths``; raise InputError listing all problems."""
    return load_sources(read_sources(paths, stdin))
