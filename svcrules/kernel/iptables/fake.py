"""The iptables tools in memory, for tests without root: the transport protocol of
svcrules.kernel.iptables.transport over a model of chains and rules per family and table.

``restore`` has ``iptables-restore --noflush`` semantics: each input is one table, all or
nothing; declaring a chain creates or empties it, chains not named stay as they are;
``-A``, ``-I N``, ``-D`` (by rule spec) and ``-X`` change them. Like the kernel, it refuses
to delete a chain that still has rules or that a rule jumps to, a rule that jumps to a
chain that does not exist, and deleting a rule that is not there, naming the input line
("line N failed"). ``save`` and ``list_chain`` print iptables-save and ``-S`` forms.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from svcrules.errors import KernelError
from svcrules.kernel.iptables.restore import target_of
from svcrules.kernel.iptables.transport import with_line

BUILTINS = {
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
}
TARGETS = {"ACCEPT", "DROP", "REJECT", "RETURN", "DNAT", "SNAT", "MASQUERADE", "MARK", "LOG"}


@dataclass
class FakeTable:
    chains: dict[str, list[str]] = field(default_factory=dict)  # name -> rule specs

    @classmethod
    def empty(cls, table: str) -> FakeTable:
        return cls({name: [] for name in BUILTINS[table]})


class _Failed(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


class FakeIptables:
    """The transport protocol against memory, as ``variant`` (iptables-nft or
    iptables-legacy) behaves towards the driver: with iptables-nft, chain names are
    read from "nft" and a table holding only empty built-in chains can be dropped.

    ``sent`` holds every restore input taken (family, text); ``refuse`` may be set to a
    function of (family, text) that returns True to refuse an input the model would
    take (as the kernel does for reasons the model does not know)."""

    def __init__(self, variant: str = "legacy") -> None:
        self.name = f"iptables-{variant}"
        self.tables: dict[tuple[str, str], FakeTable] = {}
        self.sent: list[tuple[str, str]] = []
        self.refuse: Callable[[str, str], bool] | None = None
        self.can_load_elsewhere = True  # False: as without ``unshare``

    def _table(self, family: str, table: str) -> FakeTable:
        return self.tables.setdefault((family, table), FakeTable.empty(table))

    def restore(self, family: str, text: str, *, check_only: bool = False) -> None:
        tool = f"{'ip6' if family == 'ipv6' else 'ip'}tables-restore"
        try:
            if self.refuse is not None and self.refuse(family, text):
                raise _Failed(1)
            changed = _restore(self, family, text)
        except _Failed as exc:
            err = f"{tool}: line {exc.line} failed"
            raise KernelError(f"{tool} refused the change: {with_line(err, text)}") from None
        if not check_only:
            self.tables.update(changed)
            self.sent.append((family, text))

    def save(self, family: str, table: str) -> str:
        tbl = self._table(family, table)
        # Built-in chains first, then the others by name, as iptables-legacy-save lists.
        order = [*BUILTINS[table], *sorted(set(tbl.chains) - set(BUILTINS[table]))]
        lines = [f"*{table}"]
        for name in order:
            policy = "ACCEPT" if name in BUILTINS[table] else "-"
            lines.append(f":{name} {policy} [0:0]")
        lines += [f"-A {name} {spec}" for name in order for spec in tbl.chains[name]]
        lines.append("COMMIT")
        return "".join(f"{ln}\n" for ln in lines)

    def list_chain(self, family: str, table: str, chain: str) -> str | None:
        specs = self._table(family, table).chains.get(chain)
        if specs is None:
            return None
        head = f"-P {chain} ACCEPT" if chain in BUILTINS[table] else f"-N {chain}"
        return "".join(f"{ln}\n" for ln in [head, *(f"-A {chain} {s}" for s in specs)])

    def nft_chain_names(self, family: str, table: str) -> list[str] | None:
        if self.name != "iptables-nft" or (family, table) not in self.tables:
            return None if self.name != "iptables-nft" else []
        return list(self.tables[(family, table)].chains)

    def load_elsewhere(self, sections: list[tuple[tuple[str, str], str]]) -> dict[str, str] | None:
        if not self.can_load_elsewhere:
            return None
        other = FakeIptables(self.name.removeprefix("iptables-"))
        try:
            for (family, _), text in sections:
                other.restore(family, text)
        except KernelError:
            return None
        return {
            f"{fam} {tbl}": other.save(fam, tbl) for fam in ("ipv4", "ipv6") for tbl in BUILTINS
        }

    def drop_if_empty(self, family: str, table: str) -> bool:
        tbl = self.tables.get((family, table))
        if self.name != "iptables-nft" or tbl is None:
            return False
        if any(specs or name not in BUILTINS[table] for name, specs in tbl.chains.items()):
            return False
        del self.tables[(family, table)]
        return True


def _restore(fake: FakeIptables, family: str, text: str) -> dict[tuple[str, str], FakeTable]:
    """The tables an input leaves (copies; the fake's own are untouched)."""
    changed: dict[tuple[str, str], FakeTable] = {}
    tbl: FakeTable | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name = line[1:]
            if name not in BUILTINS:
                raise _Failed(number)
            tbl = copy.deepcopy(fake._table(family, name))
            changed[(family, name)] = tbl
        elif line == "COMMIT" or tbl is None:
            if tbl is None:
                raise _Failed(number)
            tbl = None
        elif not _apply(tbl, line):
            raise _Failed(number)
    return changed


def _apply(tbl: FakeTable, line: str) -> bool:
    """One restore line; False when iptables would refuse it."""
    if line.startswith(":"):
        name = line[1:].split(" ", 1)[0]
        tbl.chains[name] = []
        return True
    op, _, rest = line.partition(" ")
    chain, _, spec = rest.partition(" ")
    if chain not in tbl.chains:
        return False
    specs = tbl.chains[chain]
    if op == "-X":
        used = any(target_of(s) == chain for c, ss in tbl.chains.items() for s in ss if c != chain)
        if specs or used:
            return False
        del tbl.chains[chain]
        return True
    if op == "-D":
        if spec not in specs:
            return False
        specs.remove(spec)
        return True
    position = len(specs)
    if op == "-I":
        at, _, spec = spec.partition(" ")
        if not at.isdigit() or not 0 < int(at) <= len(specs) + 1:
            return False
        position = int(at) - 1
    elif op != "-A":
        return False
    target = target_of(spec)
    if target and target not in TARGETS and target not in tbl.chains:
        return False
    specs.insert(position, spec)
    return True
