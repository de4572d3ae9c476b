"""The golden form against the compiled text: the same rules and elements."""

from __future__ import annotations

from svcrules.render.golden import normalize


def canonical(text: str) -> str:
    """An nft script without fingerprints and group comments, with the elements of
    each set and map sorted: two scripts that load the same rules read the same."""
    out: list[str] = []
    block: list[str] | None = None
    for line in normalize(text).splitlines():
        if block is not None:
            if line == "\t\t}":
                out += sorted(block)
                out.append(line)
                block = None
            elif not line.startswith("\t\t\t# "):
                block.append(line)
            continue
        out.append(line)
        if line == "\t\telements = {":
            block = []
    return "\n".join(out) + "\n"


_KEPT = ("# jump ", "# family ", "# Generated ", "# Apply ")


def canonical_iptables(text: str) -> str:
    """An iptables-restore text without fingerprints, group comments and blank lines,
    with each table's chain declarations sorted."""
    out: list[str] = []
    declared: list[str] = []
    for line in normalize(text).splitlines():
        if not line or (line.startswith("# ") and not line.startswith(_KEPT)):
            continue
        if line.startswith(":"):
            declared.append(line)
            continue
        out += sorted(declared)
        declared = []
        out.append(line)
    return "\n".join(out) + "\n"
