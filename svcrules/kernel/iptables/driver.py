"""The iptables backend's side of a run: fingerprints, diffs, sending, cleanup.

svcrules owns the chains named ``<P>-…`` in the ``nat`` and ``filter`` tables of
both families, plus one jump per built-in chain it hooks. Each table's
``<P>-STATE`` chain carries the fingerprint of the last text in a comment.

A change is up to four ``iptables-restore`` inputs (two families, two tables),
each atomic on its own. If one is refused, those already sent are put back, so
that a refused change leaves the previous rules in place.

A prefix is svcrules' only when a ``<P>-STATE`` chain carrying svcrules' comment proves
it (svcrules.inputs.owned): chains of svcrules' shapes without that proof are another
program's, and are neither replaced nor deleted.
"""

from __future__ import annotations

from collections.abc import Sequence

from svcrules.compiler import Ruleset
from svcrules.errors import KernelError
from svcrules.inputs.owned import not_ours
from svcrules.kernel.iptables.restore import (
    FAMILIES,
    TABLES,
    Parsed,
    RestoreTable,
    RestoreTransaction,
    diff_restore,
    full_restore,
    has_jump,
    parse_restore,
    parsed_from_save,
    split_sections,
)
from svcrules.kernel.iptables.transport import Transport, chain_names, owned, read_chains
from svcrules.render.iptables.layout import (
    chain_prefix,
    fingerprint_of,
    jumps,
    part_fingerprints,
    state_fingerprint,
)


class IptablesDriver:
    backend = "iptables"

    def __init__(self, kernel: Transport) -> None:
        self.kernel = kernel
        self.name = kernel.name

    def text(self, ruleset: Ruleset) -> str:
        return ruleset.text(self.backend)

    @property
    def tool(self) -> str:
        """iptables-nft and iptables-legacy cannot see each other's rules."""
        return self.name

    def sizes(self, ruleset: Ruleset) -> tuple[int, int, int]:
        """Chains, rules and (none here) elements of the ruleset."""
        parts = parse_restore(ruleset.iptables).values()
        return (
            sum(len(p.chains) for p in parts),
            sum(len(specs) for p in parts for specs in p.chains.values()),
            0,
        )

    def fingerprint_of(self, text: str) -> str | None:
        return fingerprint_of(text)

    def expected(self, text: str) -> dict[str, str | None]:
        """Each table carries the fingerprint of its own part of the text, so that a change
        to one table leaves the others alone (iptables-legacy copies a whole table for any
        change to it)."""
        return part_fingerprints(text)

    def fingerprints(self, table: str) -> dict[str, str | None]:
        """Per family and table, the fingerprint in ``<P>-STATE``; None when that chain
        or one of the jumps from the built-in chains is missing."""
        prefix = chain_prefix(table)
        out: dict[str, str | None] = {}
        for fam in FAMILIES:
            for tbl in TABLES:
                wanted = jumps(prefix, tbl)
                listing = read_chains(
                    self.kernel, fam, tbl, [f"{prefix}-STATE", *sorted({c for c, _ in wanted})]
                )
                found = state_fingerprint(listing)
                if not all(has_jump(listing, c, spec, prefix) for c, spec in wanted):
                    found = None
                out[f"{fam} {tbl}"] = found
        return out

    def explain_drift(
        self, table: str, kernel: dict[str, str | None], expected: dict[str, str | None]
    ) -> list[str]:
        """Which tables' ``<P>-STATE`` chains do not hold the expected fingerprint, and
        why."""
        state = f"{chain_prefix(table)}-STATE"
        gone = [p for p in sorted(expected) if not kernel.get(p)]
        other = [p for p, want in sorted(expected.items()) if kernel.get(p) not in (None, want)]
        out = []
        if gone:
            out.append(
                f"{', '.join(gone)}: {state}, or a jump from a built-in chain to svcrules' "
                "chains, missing (deleted or flushed behind svcrules' back)"
            )
        if other:
            out.append(
                f"{', '.join(other)}: {state} holds another fingerprint than svcrules last "
                "wrote (changed behind svcrules' back, or by another svcrules with the same "
                "table name)"
            )
        return out

    def incremental(self, old: str, ruleset: Ruleset, stale: set[str]) -> RestoreTransaction:
        before, after = parse_restore(old), parse_restore(ruleset.iptables)
        tx = diff_restore(before, after)
        tx.before, tx.after = before, after
        return tx

    def full(
        self, ruleset: Ruleset, table: str, previous: str | None, retire: Sequence[str] = ()
    ) -> RestoreTransaction:
        """Whatever the kernel holds of svcrules' chains is replaced: declared anew, and
        deleted when the new text has no such chain. The chains and jumps of earlier
        names (``retire``) that svcrules made go in the same per-table restores. Chains
        of the owned prefix that svcrules did not make are refused. ``previous`` (the
        last text applied) is what a refused change puts back where the kernel's rules
        were not read."""
        prefix = chain_prefix(table)
        existing = self._existing(prefix)
        self._check_ours(prefix, existing)
        for name in dict.fromkeys(retire):
            other = name.upper()
            if other != prefix and _holds(found := self._existing(other)) and self._proven(other):
                existing = _merge(existing, found)
        after = parse_restore(ruleset.iptables)
        old = parse_restore(previous) if previous else {}
        tx = full_restore(after, existing)
        tx.before = {
            part: have if have.complete else old.get(part, have) for part, have in existing.items()
        }
        tx.after = after
        return tx

    def _existing(self, prefix: str) -> Parsed:
        return {
            (fam, tbl): owned(self.kernel, fam, tbl, prefix) for fam in FAMILIES for tbl in TABLES
        }

    def _proven(self, prefix: str) -> bool:
        """Whether a ``<P>-STATE`` chain with svcrules' comment exists in any table."""
        return any(
            state_fingerprint(read_chains(self.kernel, fam, tbl, [f"{prefix}-STATE"]))
            for fam in FAMILIES
            for tbl in TABLES
        )

    def _check_ours(self, prefix: str, existing: Parsed) -> None:
        """Refuse (before anything is sent) chains of the owned prefix svcrules did not
        make: replacing them would flush another program's chains."""
        if _holds(existing) and not self._proven(prefix):
            names = sorted({c for t in existing.values() for c in t.chains})
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise not_ours(
                f"the iptables chain prefix {prefix}- ({shown or 'jumps'})",
                f"no {prefix}-STATE chain with svcrules' comment",
            )

    def owned_prefixes(self, names: Sequence[str]) -> list[str]:
        """Of the prefixes of ``names``, and of every ``<P>-STATE`` chain in the kernel,
        those whose chains svcrules made (proven by their ``<P>-STATE`` chain)."""
        found = [n.upper() for n in names]
        for fam in FAMILIES:
            for tbl in TABLES:
                found += [
                    c.removesuffix("-STATE")
                    for c in chain_names(self.kernel, fam, tbl)
                    if c.endswith("-STATE")
                ]
        return [p for p in dict.fromkeys(found) if self._proven(p)]

    def send(self, script: str, tx: RestoreTransaction) -> tuple[str, list[str]]:
        """Send each table's input in turn; if one is refused, put back those sent
        (``tx.before``, where it is known)."""
        sent: list[tuple[str, str]] = []
        for (fam, tbl), text in split_sections(script):
            try:
                self.kernel.restore(fam, text)
            except KernelError as exc:
                self._roll_back(tx, sent, exc)
                raise
            sent.append((fam, tbl))
        return script, []

    def _roll_back(
        self, tx: RestoreTransaction, sent: list[tuple[str, str]], exc: KernelError
    ) -> None:
        """Bring the tables already sent back to what they held. Where that is unknown
        (iptables-nft, a full replacement without saved state: reading the rules back
        would take minutes at scale), they keep the new rules, and the fingerprint
        mismatch makes the next run replace everything."""
        known = [p for p in sent if tx.before.get(p, RestoreTable()).complete]
        unknown = [f"{fam} {tbl}" for fam, tbl in sent if (fam, tbl) not in known]
        back = full_restore(
            {p: tx.before.get(p, RestoreTable()) for p in known},
            {p: tx.after.get(p, RestoreTable()) for p in known},
        )
        try:
            for (fam, _), text in split_sections(back.script()):
                self.kernel.restore(fam, text)
        except KernelError as again:
            raise KernelError(
                f"{exc}; putting back the tables already changed failed too: {again}"
            ) from None
        if unknown:
            raise KernelError(
                f"{exc}; the tables already changed ({', '.join(unknown)}) keep the new "
                "rules, and the next run replaces all of svcrules' chains"
            ) from None

    def check(self, script: str) -> None:
        for (fam, _), text in split_sections(script):
            self.kernel.restore(fam, text, check_only=True)

    def verify(self, table: str, script: str, stale: list[str]) -> list[str]:
        """Differences between the kernel's chains and a text: every rule of every
        chain, and the jumps from built-in chains, as iptables-save shows them. The tool
        itself turns the text into that form, by loading it into an empty network
        namespace of its own; where that cannot be done, rule counts only."""
        want = parse_restore(script)
        prefix = chain_prefix(table)
        have = {
            (fam, tbl): parsed_from_save(self.kernel.save(fam, tbl), prefix)
            for fam in FAMILIES
            for tbl in TABLES
        }
        loaded = self.kernel.load_elsewhere(split_sections(full_restore(want, {}).script()))
        if loaded is None:
            return _count_differences(want, have)
        problems = []
        for fam, tbl in sorted(set(want) | set(have)):
            w = parsed_from_save(loaded.get(f"{fam} {tbl}", ""), prefix)
            h = have.get((fam, tbl), RestoreTable())
            for name in sorted(set(w.chains) | set(h.chains)):
                a, b = w.chains.get(name), h.chains.get(name)
                if a is None or b is None:
                    state = "missing" if b is None else "should not exist"
                    problems.append(f"{fam} {tbl} {name}: {state}")
                elif a != b:
                    diff = len(set(a) ^ set(b))
                    problems.append(
                        f"{fam} {tbl} {name}: rules differ: {len(a)} expected, the kernel "
                        f"holds {len(b)}, {diff} not in both"
                    )
            if sorted(w.jumps) != sorted(h.jumps):
                problems.append(
                    f"{fam} {tbl}: the jumps from built-in chains differ "
                    f"({len(w.jumps)} expected, {len(h.jumps)} in the kernel)"
                )
        return problems

    def cleanup(self, table: str | None, known: Sequence[str] = ()) -> list[str]:
        """Delete svcrules' jumps and chains in both families, nothing else: with
        ``table``, that prefix's (refused when another program's chains hold it);
        without, those of every name in ``known`` (the state's) and of every prefix a
        ``<P>-STATE`` chain with svcrules' comment proves."""
        if table is not None:
            prefix = chain_prefix(table)
            existing = self._existing(prefix)
            self._check_ours(prefix, existing)
        else:
            existing = {}
            for prefix in self.owned_prefixes(known):
                existing = _merge(existing, self._existing(prefix))
        tx = full_restore({}, existing)
        for (fam, _), text in split_sections(tx.script()):
            self.kernel.restore(fam, text)
        for fam, tbl in existing:
            if existing[(fam, tbl)].chains:
                self.kernel.drop_if_empty(fam, tbl)
        return [
            f"{fam} {tbl}: {len(t.chains)} chains, {len(t.jumps)} jumps"
            for (fam, tbl), t in sorted(existing.items())
            if t.chains or t.jumps
        ]


def _holds(parsed: Parsed) -> bool:
    return any(t.chains or t.jumps for t in parsed.values())


def _merge(a: Parsed, b: Parsed) -> Parsed:
    """Two prefixes' chains and jumps, per table."""
    out: Parsed = {}
    for part in sorted(set(a) | set(b)):
        x, y = a.get(part, RestoreTable()), b.get(part, RestoreTable())
        out[part] = RestoreTable(
            {**x.chains, **y.chains}, [*x.jumps, *y.jumps], x.complete and y.complete
        )
    return out


def _count_differences(want: Parsed, have: Parsed) -> list[str]:
    """Names and rule counts: the comparison when the text cannot be loaded elsewhere."""
    problems = []
    for part in sorted(set(want) | set(have)):
        w = want.get(part, RestoreTable())
        h = have.get(part, RestoreTable())
        for name in sorted(set(w.chains) | set(h.chains)):
            where = f"{part[0]} {part[1]} {name}"
            if name not in h.chains:
                problems.append(f"{where}: missing")
            elif name not in w.chains:
                problems.append(f"{where}: should not exist")
            elif len(w.chains[name]) != len(h.chains[name]):
                expected = len(w.chains[name])
                problems.append(
                    f"{where}: {expected} rule{'' if expected == 1 else 's'} expected, the "
                    f"kernel holds {len(h.chains[name])}"
                )
        if len(w.jumps) != len(h.jumps):
            problems.append(
                f"{part[0]} {part[1]}: expected {len(w.jumps)} jumps from built-in "
                f"chains, kernel has {len(h.jumps)}"
            )
    return problems


__all__ = ["IptablesDriver", "RestoreTransaction"]
