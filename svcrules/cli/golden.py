"""Golden files for ``svcrules check --golden`` and the golden tests: what a golden
holds, and the comparison."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from svcrules.compiler import Ruleset

FORMS = ("nft", "json", "explain")


def golden_text(ruleset: Ruleset, backend: str, form: str) -> str:
    """What a golden file of ``ruleset`` holds (svcrules.render.golden): ``nft``, the
    backend's rules (nftables: the golden form, elements grouped by Service); ``json``,
    their JSON form; ``explain``, the explain table. Never a fingerprint."""
    from svcrules.render.backends import RENDERERS
    from svcrules.render.golden import normalize

    if form == "explain":
        from svcrules.plan.explain import explain_text

        return explain_text(ruleset.plan)
    row = RENDERERS[backend]
    if form == "json":
        if row.json is None:
            raise ValueError(f"no JSON form for backend {backend}")
        return normalize(row.json(ruleset.plan))
    return row.golden_text(ruleset.plan, ruleset.text(backend))


def compare(golden: Path, actual: str) -> str | None:
    """None when equal, else a unified diff (golden -> actual). Both sides are compared
    without their volatile parts (svcrules.render.golden.normalize), so a golden that
    still carries fingerprints compares as one without."""
    from svcrules.render.golden import normalize

    expected = normalize(golden.read_text(encoding="utf-8"))
    actual = normalize(actual)
    if expected == actual:
        return None
    return "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=str(golden),
            tofile="compiled",
        )
    )
