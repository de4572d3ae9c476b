"""Packet expectations for ``svcrules check --packets``: a reviewed list of statements
such as "a pod reaching shop/web's ClusterIP lands on one of its two endpoints without
masquerade", checked against the compiled rules of every backend.

The file is YAML (or JSON)::

    nodeAddresses: [198.18.0.1]      # optional: local addresses besides the nodeIPs
    cases:
    - name: a pod reaches shop/web without masquerade
      src: 198.51.100.12
      dst: 203.0.113.10
      port: 80
      proto: tcp                     # default tcp
      fromNode: false                # default false
      verdict: dnat                  # dnat | reject | drop | untouched
      endpoints: [198.51.100.11:8080, 198.51.100.12:8080]   # optional: exactly these
      shares: {198.51.100.12:8080: 0.1}   # optional: these endpoints' shares, +-0.005
      masquerade: false              # optional

The fields are the words of ``svcrules trace`` and of its JSON form.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from svcrules.errors import InputError, Origin, Problem
from svcrules.inputs.load import validation_problems
from svcrules.inputs.parse import documents
from svcrules.trace.backends import tracer
from svcrules.trace.model import Packet, Trace, TraceError

Backend = Literal["nftables", "iptables"]
SHARE_TOLERANCE = 0.005


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    name: str = ""
    src: str
    dst: str
    port: int = Field(ge=1, le=65535)
    proto: Literal["tcp", "udp", "sctp"] = "tcp"
    from_node: bool = Field(False, alias="fromNode")
    verdict: Literal["dnat", "reject", "drop", "untouched"]
    endpoints: list[str] | None = None
    # Each listed endpoint's share of new connections (weights, Maglev's table), as
    # trace reports it: within SHARE_TOLERANCE, so that a table's rounding passes.
    shares: dict[str, float] | None = Field(None, strict=False)
    masquerade: bool | None = None

    def label(self, index: int) -> str:
        flag = " from the node" if self.from_node else ""
        dst = f"[{self.dst}]" if ":" in self.dst else self.dst
        what = f"{self.proto} {self.src} -> {dst}:{self.port}{flag}"
        return f"{self.name} ({what})" if self.name else what


class CaseFile(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    node_addresses: list[str] = Field(default_factory=list, alias="nodeAddresses")
    cases: list[Case] = Field(min_length=1)


class Failure(NamedTuple):
    case: str
    backend: str
    field: str
    expected: str
    got: str


def load(path: str) -> CaseFile:
    """Read a cases file; every problem is an InputError naming the file and field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError([Problem(None, "", f"{path}: {exc.strerror or exc}")]) from None
    try:
        docs = documents(text)
    except Exception as exc:  # yaml.YAMLError or a refused construct
        raise InputError([Problem(Origin(path, 1), "", f"not valid YAML: {exc}")]) from None
    if len(docs) != 1:
        why = f"one document expected, found {len(docs)}"
        raise InputError([Problem(Origin(path, 1), "", why)])
    try:
        return CaseFile.model_validate(docs[0])
    except ValidationError as exc:
        raise InputError(validation_problems(exc, Origin(path, 1), CaseFile)) from None


def _compare(case: Case, t: Trace) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    if t.verdict != case.verdict:
        out.append(("verdict", case.verdict, t.verdict))
    if case.endpoints is not None and sorted(case.endpoints) != sorted(t.endpoints):
        out.append(("endpoints", ", ".join(case.endpoints), ", ".join(t.endpoints) or "none"))
    for endpoint, want in (case.shares or {}).items():
        got = t.probabilities.get(endpoint, 0.0)
        if abs(got - want) > SHARE_TOLERANCE:
            out.append((f"share of {endpoint}", f"{want:.1%}", f"{got:.1%}"))
    if case.masquerade is not None and case.masquerade != t.masquerade:
        out.append(("masquerade", str(case.masquerade).lower(), str(t.masquerade).lower()))
    return out


def check(
    cases: CaseFile, texts: dict[str, str], node_ips: Sequence[str], path: str = ""
) -> list[Failure]:
    """Every case against every backend's text; what does not hold."""
    local = tuple(dict.fromkeys([*node_ips, *cases.node_addresses]))
    tracers = {backend: tracer(text, backend) for backend, text in texts.items()}
    failures = []
    for i, case in enumerate(cases.cases):
        packet = Packet(case.src, case.dst, case.port, case.proto, case.from_node, local)
        for backend, follow in tracers.items():
            try:
                t = follow(packet)
            except TraceError as exc:
                where = Origin(path, 1) if path else None
                raise InputError([Problem(where, f"cases[{i}]", str(exc))]) from None
            for field, want, got in _compare(case, t):
                failures.append(Failure(case.label(i), backend, field, want, got))
    return failures


def table(failures: Sequence[Failure]) -> str:
    """The failures as a readable table, one line each."""
    head = Failure("case", "backend", "field", "expected", "got")
    rows = [head, *failures]
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    lines = ["  ".join(r[k].ljust(widths[k]) for k in range(4)) + "  " + r[4] for r in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"
