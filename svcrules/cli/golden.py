"""Golden-file comparison for ``svcrules check`` and the golden tests."""

from __future__ import annotations

import difflib
from pathlib import Path


def compare(golden: Path, actual: str) -> str | None:
    """None when equal, else a unified diff (golden -> actual)."""
    expected = golden.read_text(encoding="utf-8")
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
