"""The golden form (``svcrules check --golden``) is still a ruleset the kernel takes:
loaded into a fresh network namespace, it gives the same tables as the compiled text
(nft: ``nft list ruleset``; iptables: every chain's rules as iptables-save prints
them), except for the fingerprint, which the golden form leaves out. So the comment
lines grouping elements by Service are accepted by nft 1.0.6 inside element blocks,
and by iptables-restore between rules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import svcrules
from svcrules.render.golden import normalize
from svcrules.render.iptables.layout import family_section, render_iptables_golden
from svcrules.render.nftables.layout import render_nft_golden
from tests.golden.test_golden import REFUSED_BY_IPTABLES

from . import backends
from .conftest import require_kernel

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
CASES = sorted(p for p in (ROOT / "fixtures").iterdir() if p.is_dir())


def _in_new_netns(script: str, stdin: str) -> str:
    """Run ``sh -c script`` in a network namespace of its own (gone when it ends)."""
    require_kernel()
    proc = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_the_nft_golden_loads_as_the_compiled_script(case: Path) -> None:
    ruleset = svcrules.compile_paths([str(case)])
    golden = render_nft_golden(ruleset.plan)
    assert "\t\t\t# " in golden  # it does group elements

    def listing(text: str) -> str:
        return normalize(_in_new_netns("nft -f - && nft list ruleset", text))

    assert listing(golden) == listing(ruleset.nft)


@pytest.mark.parametrize("variant", ["nft", "legacy"])
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name not in REFUSED_BY_IPTABLES], ids=lambda p: p.name
)
def test_the_iptables_golden_loads_as_the_compiled_text(case: Path, variant: str) -> None:
    backends.require(f"iptables-{variant}")
    ruleset = svcrules.compile_paths([str(case)], backend="iptables")
    golden = render_iptables_golden(ruleset.plan)

    def chains(text: str) -> dict[tuple[str, str, str], list[str]]:
        """(family, table, chain) -> its rules, as the kernel lists them."""
        out: dict[tuple[str, str, str], list[str]] = {}
        for family in ("ipv4", "ipv6"):
            restore = backends.tool(variant, family, "-restore")
            save = backends.tool(variant, family, "-save")
            listed = _in_new_netns(f"{restore} --noflush && {save}", family_section(text, family))
            table = ""
            for line in normalize(listed).splitlines():
                if line.startswith("*"):
                    table = line[1:]
                elif line.startswith(":"):
                    out.setdefault((family, table, line[1:].split()[0]), [])
                elif line.startswith("-A "):
                    out.setdefault((family, table, line.split()[1]), []).append(line)
        return out

    listed = chains(golden)
    assert listed == chains(ruleset.iptables)
    assert any("-SEP-" in chain for _, _, chain in listed)
