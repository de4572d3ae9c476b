"""Golden files: fixtures/<case>/ compiles to tests/golden/<case>.nft (nftables),
tests/golden/<case>.iptables (iptables) and tests/golden/<case>.explain (the explain
table), in the form ``svcrules check --golden`` writes (svcrules.cli.golden): no
fingerprints, and the nftables elements grouped under the Service they belong to.

Goldens pin the text; the kernel tests prove the behaviour. Regenerate with
``scripts/test tests/golden --update-golden`` and review the diff like code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import svcrules
from svcrules.cli.golden import compare, golden_text

ROOT = Path(__file__).resolve().parents[2]
CASES = sorted(p.name for p in (ROOT / "fixtures").iterdir() if p.is_dir())
GOLDEN = Path(__file__).resolve().parent

# (backend, form) -> the golden's suffix
SUFFIX = {
    ("nftables", "nft"): "nft",
    ("iptables", "nft"): "iptables",
    ("nftables", "explain"): "explain",
}


# Cases the iptables backend refuses (Maglev), and the Services it names.
REFUSED_BY_IPTABLES = {"balancing": ["shop/checkout"]}


def _cases(backend: str) -> list[str]:
    return [c for c in CASES if backend == "nftables" or c not in REFUSED_BY_IPTABLES]


@pytest.mark.parametrize(("backend", "form"), sorted(SUFFIX))
@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, backend: str, form: str, request: pytest.FixtureRequest) -> None:
    if case not in _cases(backend):
        with pytest.raises(svcrules.InputError) as err:
            svcrules.compile_paths([str(ROOT / "fixtures" / case)], backend=backend)
        named = [p.message.split(":", 1)[0] for p in err.value.problems]
        assert named == [f"Service {svc}" for svc in REFUSED_BY_IPTABLES[case]]
        assert not (GOLDEN / f"{case}.{SUFFIX[(backend, form)]}").exists()
        return
    ruleset = svcrules.compile_paths([str(ROOT / "fixtures" / case)], backend=backend)
    text = golden_text(ruleset, backend, form)
    golden = GOLDEN / f"{case}.{SUFFIX[(backend, form)]}"
    if request.config.getoption("--update-golden"):
        golden.write_text(text, encoding="utf-8")
        return
    assert golden.is_file(), f"no golden for {case}: run with --update-golden and review it"
    diff = compare(golden, text)
    assert diff is None, f"compiled output differs from {golden}:\n{diff}"


def test_every_golden_has_a_fixture() -> None:
    stale = sorted(
        p.name
        for (backend, _), s in SUFFIX.items()
        for p in GOLDEN.glob(f"*.{s}")
        if p.stem not in _cases(backend)
    )
    assert not stale, f"goldens without a fixtures/ case: {stale}"
