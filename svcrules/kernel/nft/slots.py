"""Stable slots: an endpoint that stays keeps its slot.

The compiled script puts a selection's endpoints into its block of slots in sorted
order, so one changed address would shift every slot after it, and an update would
rewrite them all. But any order of a selection's endpoints among its slots picks the
same way (``numgen random mod N offset BASE``: uniform over the same slots, which hold
the same endpoints). So before diffing, the new script's pick maps are permuted towards
what the kernel holds (the last script applied): within each slot block, every value
that stays keeps its old slot, and the others fill the freed slots in the compiled
order. One replaced endpoint is then one element deleted and one added.

Compiled output stays canonical (it depends on the inputs only); the permuted script,
restamped with its tables' fingerprints, is what is sent and saved as state. A full
replacement writes the compiled order again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import groupby

from svcrules.errors import NeedsFullReplacement
from svcrules.kernel.nft.diff import NftObject, Tables, TableText
from svcrules.render.nftables.fingerprint import restamp, state_fingerprint
from svcrules.render.nftables.layout import PICK_MAPS, SLOT_BITS

Moved = dict[tuple[str, str], dict[str, NftObject]]  # (family, table) -> map name -> map


@dataclass(frozen=True)
class Placement:
    applied: str | None  # the script to send and save; None: the compiled one
    tables: Tables  # that script, parsed


def permute(old: Iterable[str], new: tuple[str, ...]) -> tuple[str, ...]:
    """The elements ``new`` (``slot : value``, in slot order) with their values moved so
    that, per slot block (``slot >> SLOT_BITS``: one selection's), a value that ``old``
    holds at a slot of ``new`` stays there while the block still has it: the same slots,
    the same values per block, in the same slot order."""
    old = tuple(old)
    if set(old).issuperset(new):  # every slot already holds its value
        return new
    held = dict(item.split(" : ", 1) for item in old)
    pairs = [item.split(" : ", 1) for item in new]
    out: list[str] = []
    for _, block in groupby(pairs, key=lambda p: int(p[0]) >> SLOT_BITS):
        slots, values = zip(*block, strict=True)
        out += (f"{s} : {v}" for s, v in zip(slots, _place(slots, values, held), strict=True))
    return tuple(out)


def _place(slots: Sequence[str], values: Sequence[str], held: Mapping[str, str]) -> list[str]:
    """One block's values, slot by slot: what ``held`` has there where the block still
    has that value; the other values fill the other slots, both in the compiled order."""
    kept = [held.get(slot, "") for slot in slots]  # "": nothing there (no value is empty)
    if sorted(kept) == sorted(values):
        return kept  # the same values in another order: all stay
    wanted = Counter(values)
    for i, value in enumerate(kept):
        if wanted[value] > 0:
            wanted[value] -= 1
        else:
            kept[i] = ""
    rest: list[str] = []
    for value in values:
        if wanted[value] > 0:
            rest.append(value)
            wanted[value] -= 1
    fill = iter(rest)
    return [value or next(fill) for value in kept]


def keep_slots(old: Tables, new: Tables, text: str) -> Placement:
    """``text`` (the compiled script, parsed as ``new``) with the pick maps permuted
    towards ``old`` (what the kernel holds) and its fingerprints restamped."""
    moved: Moved = {}
    for key, table in new.items():
        before = old.get(key)
        for name in table.objects:
            if not name.startswith(PICK_MAPS) or before is None or name not in before.objects:
                continue
            if table.objects.same(before.objects, name):
                continue  # the same text: nothing to move (and nothing to parse)
            obj, prev = table.objects[name], before.objects[name]
            if prev.items == obj.items:
                continue
            items = permute(prev.items, obj.items)
            if items != obj.items:
                moved.setdefault(key, {})[name] = replace(obj, items=items)
    if not moved:
        return Placement(None, new)
    applied, prints = restamp(_rewrite(text, new, moved), {family for family, _ in moved})
    tables = dict(new)
    for key, maps in moved.items():
        table = new[key]
        state = table.objects["state"]
        was = state_fingerprint(" ".join(state.items)) or ""
        items = tuple(item.replace(was, prints[key[0]]) for item in state.items)
        maps["state"] = replace(state, items=items)
        tables[key] = TableText(
            table.family, table.name, table.comment, table.objects.replaced(maps)
        )
    return Placement(applied, tables)


def _rewrite(text: str, new: Tables, moved: Moved) -> str:
    """``text`` with the moved maps' elements in their new places, in one pass."""
    spans: list[tuple[int, int, str]] = []
    for (family, name), maps in moved.items():
        pos = text.index(f"\ntable {family} {name} {{\n")
        objects = new[(family, name)].objects
        for map_name in [n for n in objects if n in maps]:  # in the order of the text
            start = text.index(f"\n\tmap {map_name} {{\n", pos)
            pos = text.index("\n\t}\n", start)
            block = _elements(text[start:pos], objects[map_name].items, maps[map_name].items)
            spans.append((start, pos, block))
    out: list[str] = []
    pos = 0
    for start, end, block in spans:
        out += [text[pos:start], block]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _elements(block: str, before: tuple[str, ...], after: tuple[str, ...]) -> str:
    """A map's text with its element lines holding ``after`` instead of ``before``; each
    line keeps the spelling around its element (the template stays the only writer)."""
    at = block.index(before[0], block.index("elements = {"))
    start = block.rindex("\n", 0, at) + 1
    prefix = block[start:at]
    suffix = block[at + len(before[0]) : block.index("\n", at)]
    old = "\n".join(f"{prefix}{item}{suffix}" for item in before)
    if block[start : start + len(old)] != old:
        raise NeedsFullReplacement("a map's elements are not one a line as rendered")
    lines = "\n".join(f"{prefix}{item}{suffix}" for item in after)
    return block[:start] + lines + block[start + len(old) :]
