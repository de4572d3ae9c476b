"""Golden files: fixtures/<case>/ compiles to tests/golden/<case>.nft (nftables) and
tests/golden/<case>.iptables (iptables), byte for byte.

Goldens pin the text; the kernel tests prove the behaviour. Regenerate with
``scripts/test tests/golden --update-golden`` and review the diff like code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import svcrules
from svcrules.cli.golden import compare

ROOT = Path(__file__).resolve().parents[2]
CASES = sorted(p.name for p in (ROOT / "fixtures").iterdir() if p.is_dir())
GOLDEN = Path(__file__).resolve().parent


SUFFIX = {"nftables": "nft", "iptables": "iptables"}


@pytest.mark.parametrize("backend", sorted(SUFFIX))
@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, backend: str, request: pytest.FixtureRequest) -> None:
    ruleset = svcrules.compile_paths([str(ROOT / "fixtures" / case)], backend=backend)
    text = ruleset.text(backend)
    golden = GOLDEN / f"{case}.{SUFFIX[backend]}"
    if request.config.getoption("--update-golden"):
        golden.write_text(text, encoding="utf-8")
        return
    assert golden.is_file(), f"no golden for {case}: run with --update-golden and review it"
    diff = compare(golden, text)
    assert diff is None, f"compiled output differs from {golden}:\n{diff}"


def test_every_golden_has_a_fixture() -> None:
    stale = sorted(
        p.name for s in SUFFIX.values() for p in GOLDEN.glob(f"*.{s}") if p.stem not in CASES
    )
    assert not stale, f"goldens without a fixtures/ case: {stale}"
