"""An nftables kernel in memory, for tests without root: the transport protocol
(``run``) over a model of tables, sets, maps and chains.

It understands what svcrules sends (table blocks as rendered, ``add``/``delete``/``flush``
of tables, chains, sets, maps, elements and rules) and lists what the driver reads
(``list tables``, ``list set``, ``list table`` in text or JSON). Like the kernel, it runs
a script as one transaction (all or nothing), refuses to delete a chain or set still in
use (EBUSY) or an object that does not exist, and refuses an element whose key exists
with another value ("File exists"). Rules are kept as svcrules wrote them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from svcrules.errors import KernelError
from svcrules.kernel.nft import netlink
from svcrules.kernel.nft.diff import NftObject, parse_table
from svcrules.kernel.nft.transport import refused

_TARGET = re.compile(r"\b(?:jump|goto) ([A-Za-z0-9_.-]+)")
_SET_REF = re.compile(r"@([A-Za-z0-9_.-]+)")
_DECL_SPLIT = re.compile(r';\s*(?=(?:[^"]*"[^"]*")*[^"]*$)')
BUSY = "Could not process rule: Device or resource busy"
MISSING = "Could not process rule: No such file or directory"
EXISTS = "Could not process rule: File exists"


@dataclass
class FakeObject:
    kind: str  # "set", "map" or "chain"
    header: list[str]
    items: list[str] = field(default_factory=list)  # elements or rules

    def keys(self) -> dict[str, str]:
        return NftObject(self.kind, "", (), tuple(self.items)).keys()


@dataclass
class FakeTable:
    comment: str = ""
    objects: dict[str, FakeObject] = field(default_factory=dict)


class _Refused(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


class FakeNft:
    """The transport protocol of svcrules.kernel.nft.transport, against memory.

    ``scripts`` holds every transaction the kernel took (not dry runs or listings),
    ``element_runs`` the ones that came as element changes (``run_elements``);
    ``refuse`` may be set to a function of a script that returns an error message to
    refuse it with (as a kernel would for reasons the model does not know)."""

    name = "fake-nft"

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], FakeTable] = {}
        self.scripts: list[str] = []
        self.runs: list[str] = []
        self.element_runs: list[list[netlink.ElementChange]] = []
        self.refuse: Any = None
        self.can_load_elsewhere = True  # False: as without ``unshare`` or ``nft``

    def run(self, script: str, *, check_only: bool = False, json_output: bool = False) -> str:
        self.runs.append(script)
        words = script.split()
        if words[:1] == ["list"]:
            return self._list(words[1:], json_output)
        work = copy.deepcopy(self.tables)
        try:
            if self.refuse is not None and (why := self.refuse(script)):
                raise _Refused(why)
            _Transaction(work).run(script)
        except _Refused as exc:
            raise refused(exc.message) from None
        if not check_only:
            self.tables = work
            self.scripts.append(script)
        return ""

    def run_elements(self, changes: Sequence[netlink.ElementChange]) -> bool:
        """As the libnftables transport: changes it can encode for netlink are taken
        (as their nft commands, in one transaction), others left to a script."""
        try:
            netlink.encode(changes)
        except netlink.Unsupported:
            return False
        self.run("".join(f"{change.command}\n" for change in changes))
        self.element_runs.append(list(changes))
        return True

    def load_elsewhere(self, script: str, table: str) -> list[dict[str, Any]] | None:
        """The script loaded into an empty fake and listed, as the real transport does
        in a network namespace of its own."""
        if not self.can_load_elsewhere:
            return None
        other = FakeNft()
        try:
            other.run(script)
        except KernelError:
            return None
        out: list[dict[str, Any]] = []
        for fam in ("ip", "ip6"):
            if (fam, table) in other.tables:
                listing = json.loads(other.run(f"list table {fam} {table}", json_output=True))
                out += listing["nftables"]
        return out

    # Listings -----------------------------------------------------------------------

    def _list(self, words: list[str], json_output: bool) -> str:
        if words == ["tables"]:
            objs = [{"table": {"family": f, "name": n}} for f, n in sorted(self.tables)]
            return json.dumps({"nftables": [{"metainfo": {}}, *objs]})
        kind, fam, name = words[0], words[1], words[2]
        table = self.tables.get((fam, name))
        if table is None or (kind in ("set", "map", "chain") and words[3] not in table.objects):
            raise refused(f"Error: {MISSING}\nlist {' '.join(words)}")
        if kind in ("set", "map", "chain"):
            obj = table.objects[words[3]]
            return json.dumps({"nftables": [_json_object(fam, name, words[3], obj)]})
        if json_output:
            listing = [{"table": {"family": fam, "name": name}}]
            for obj_name, obj in table.objects.items():
                listing += _json_object(fam, name, obj_name, obj, with_rules=True)
            return json.dumps({"nftables": listing})
        return _text_table(fam, name, table)


def _json_object(fam: str, table: str, name: str, obj: FakeObject, with_rules: bool = False) -> Any:
    body: dict[str, Any] = {"family": fam, "name": name, "table": table}
    if obj.kind == "chain":
        rules = [
            {"rule": {"family": fam, "table": table, "chain": name, "expr": [{"text": r}]}}
            for r in obj.items
        ]
        return [{"chain": body}, *rules] if with_rules else {"chain": body}
    flags = [f for h in obj.header if h.startswith("flags ") for f in h[6:].split(",")]
    if flags:
        body["flags"] = flags
    if obj.items:
        body["elem"] = [_json_element(e) for e in obj.items]
    return [{obj.kind: body}] if with_rules else {obj.kind: body}


def _json_element(item: str) -> Any:
    key, _, comment = item.partition(' comment "')
    if comment:
        return {"elem": {"val": key, "comment": comment.rstrip('"')}}
    key, _, timed = item.partition(" timeout ")
    if timed:  # as nft lists an element of a set with timeouts (seconds, no units)
        timeout, _, expires = timed.partition(" expires ")
        parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split(" . ")]
        elem: dict[str, Any] = {"val": {"concat": parts} if len(parts) > 1 else parts[0]}
        elem["timeout"] = int(timeout.rstrip("s"))
        if expires:
            elem["expires"] = int(expires.rstrip("s"))
        return {"elem": elem}
    return item


def _text_table(fam: str, name: str, table: FakeTable) -> str:
    lines = [f"table {fam} {name} {{"]
    if table.comment:
        lines.append(f"\t{table.comment}")
    for obj_name, obj in table.objects.items():
        lines.append(f"\t{obj.kind} {obj_name} {{")
        lines += [f"\t\t{h}" for h in obj.header]
        lines += [f"\t\t{i}" for i in obj.items]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


class _Transaction:
    """One script applied to a copy of the tables; raises _Refused on the first error."""

    def __init__(self, tables: dict[tuple[str, str], FakeTable]) -> None:
        self.tables = tables

    def run(self, script: str) -> None:
        lines = iter(enumerate(script.splitlines(), 1))
        for number, line in lines:
            if not line.strip() or line.startswith("#"):
                continue
            try:
                self._command(line, lines)
            except _Refused as exc:
                raise _Refused(
                    f"/dev/stdin:{number}:1-{len(line)}: Error: {exc.message}\n"
                    f"{line}\n{'^' * len(line)}"
                ) from None

    def _command(self, line: str, lines: Iterator[tuple[int, str]]) -> None:
        words = line.split()
        if words[0] == "table" and line.endswith("{}"):
            self.tables.setdefault((words[1], words[2]), FakeTable())
        elif words[0] == "table" and line.endswith("{"):
            self._block(words[1], words[2], (text for _, text in lines))
        elif words[:2] == ["delete", "table"]:
            if self.tables.pop((words[2], words[3]), None) is None:
                raise _Refused(MISSING)
        elif words[0] in ("add", "delete", "flush"):
            self._object_command(words[0], words[1], line)
        else:
            raise _Refused(f"syntax error, unexpected {words[0]}")

    def _table(self, fam: str, name: str) -> FakeTable:
        table = self.tables.get((fam, name))
        if table is None:
            raise _Refused(MISSING)
        return table

    def _block(self, fam: str, name: str, lines: Iterator[str]) -> None:
        parsed = parse_table(fam, name, lines)
        table = self.tables.setdefault((fam, name), FakeTable())
        table.comment = parsed.comment or table.comment
        for obj in parsed.objects.values():
            self._declare(table, obj.kind, obj.name, list(obj.header))
            if obj.kind == "chain":
                table.objects[obj.name].items += obj.items
            else:
                self._add_elements(table.objects[obj.name], list(obj.items))

    def _declare(self, table: FakeTable, kind: str, name: str, header: list[str]) -> None:
        have = table.objects.get(name)
        if have is None:
            table.objects[name] = FakeObject(kind, header)
        elif have.kind != kind or (kind != "chain" and header and have.header != header):
            raise _Refused(EXISTS)

    def _object_command(self, verb: str, kind: str, line: str) -> None:
        head, brace, rest = line.partition(" {")
        words = head.split()
        fam, tname = words[2], words[3]
        table = self._table(fam, tname)
        if kind == "rule":
            chain = self._get(table, "chain", words[4])
            chain.items.append(line.split(None, 5)[5])
            return
        name = words[4]
        body = rest.strip().removesuffix("}").strip() if brace else ""
        if kind in ("chain", "set", "map") and verb == "add":
            header = [h.strip() for h in _DECL_SPLIT.split(body) if h.strip()]
            self._declare(table, kind, name, header)
        elif verb == "flush" and kind in ("chain", "set", "map"):
            self._get(table, kind, name).items.clear()
        elif kind in ("chain", "set", "map") and verb == "delete":
            self._get(table, kind, name)
            self._check_unused(table, kind, name)
            del table.objects[name]
        elif kind == "element":
            obj = self._get(table, "", name)
            elements = [e.strip() for e in body.split(", ") if e.strip()]
            if verb == "add":
                self._add_elements(obj, elements)
            else:
                self._delete_elements(obj, elements)
        else:
            raise _Refused(f"syntax error, unexpected {kind}")

    @staticmethod
    def _get(table: FakeTable, kind: str, name: str) -> FakeObject:
        obj = table.objects.get(name)
        if obj is None or (kind and obj.kind != kind):
            raise _Refused(MISSING)
        return obj

    @staticmethod
    def _check_unused(table: FakeTable, kind: str, name: str) -> None:
        """A chain with rules, or one that a rule or verdict-map element jumps to, and a
        set or map a rule names, are busy."""
        obj = table.objects[name]
        if kind == "chain" and obj.items:
            raise _Refused(BUSY)
        pattern = _TARGET if kind == "chain" else _SET_REF
        for other_name, other in table.objects.items():
            if other_name == name or (kind != "chain" and other.kind != "chain"):
                continue
            if any(name in pattern.findall(item) for item in other.items):
                raise _Refused(BUSY)

    @staticmethod
    def _add_elements(obj: FakeObject, elements: list[str]) -> None:
        have = obj.keys()
        for element in elements:
            [(k, v)] = NftObject("set", "", (), (element,)).keys().items()
            if k in have and have[k] != v and obj.kind == "map":
                raise _Refused(EXISTS)
            if k not in have:
                obj.items.append(v)
                have[k] = v

    @staticmethod
    def _delete_elements(obj: FakeObject, elements: list[str]) -> None:
        for element in elements:
            key = element.split(" : ", 1)[0].split(" comment ", 1)[0]
            keys = obj.keys()
            if key not in keys:
                raise _Refused(MISSING)
            obj.items.remove(keys[key])
