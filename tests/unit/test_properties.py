"""Properties of every compiled ruleset, over random valid clusters."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import svcrules
from svcrules.render.nftables.layout import layout
from tests.k8s import Obj, compile_objs, dump
from tests.strategies import clusters

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(clusters(), st.randoms(use_true_random=False))
def test_order_and_file_split_do_not_matter(
    objs: list[Obj],
    rnd: object,
) -> None:
    base = compile_objs(objs).nft
    shuffled = list(objs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert compile_objs(shuffled).nft == base
    # Split across two "files" read in sequence.
    half = len(shuffled) // 2
    text = dump(shuffled[:half]) + "---\n" + dump(shuffled[half:])
    again = svcrules.compile_paths(["-"], stdin=io.StringIO(text)).nft
    assert again == base


def _table_blocks(nft: str) -> list[str]:
    return re.findall(r"^table ip6? \S+ \{\n.*?^\}", nft, flags=re.S | re.M)


@SETTINGS
@given(clusters())
def test_every_reference_exists_and_no_element_repeats(objs: list[Obj]) -> None:
    ruleset = compile_objs(objs)
    for block in _table_blocks(ruleset.nft):
        chains = set(re.findall(r"^\tchain (\S+) \{", block, flags=re.M))
        sets = set(re.findall(r"^\t(?:set|map) (\S+) \{", block, flags=re.M))
        for target in re.findall(r"\b(?:goto|jump) ([^\s,}]+)", block):
            assert target in chains, f"goto/jump to missing chain {target}"
        for ref in re.findall(r"@([A-Za-z0-9_.-]+)", block):
            assert ref in sets, f"reference to missing set {ref}"
        for body in re.findall(r"elements = \{\n(.*?)\n\t\t\}", block, flags=re.S):
            keys = [line.strip().rstrip(",").split(" : ")[0] for line in body.splitlines()]
            assert len(keys) == len(set(keys)), f"duplicate element keys in {keys}"
    # Section 9: svcrules never opens the node; the admin's firewall decides.
    accepts = [
        ln for ln in ruleset.nft.splitlines() if "accept" in ln and "policy accept" not in ln
    ]
    assert not accepts, accepts
    for table in layout(ruleset.plan):
        slots = [s for _, e in table.backends.values() for s, _, _ in e]
        slots += [s for e in table.affinity_slots.values() for s, _ in e]
        assert len(slots) == len(set(slots)), "two endpoints share a backend slot"
        assert all(0 <= s < 2**31 for s in slots)


def test_output_does_not_depend_on_hash_seed(tmp_path: Path) -> None:
    fixtures = Path(__file__).resolve().parents[2] / "fixtures"
    outs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, svcrules; sys.stdout.write(svcrules.compile_paths(sys.argv[1:]).nft)",
                str(fixtures / "demo"),
                str(fixtures / "policies" / "services.yaml"),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        outs.add(run.stdout)
    assert len(outs) == 1


@SETTINGS
@given(clusters())
def test_scripts_cut_into_blocks_hold_what_the_json_form_lists(objs: list[Obj]) -> None:
    """The diff cuts a script into blocks and parses each only when it differs, and
    counts rules and elements without parsing. Each table, object, kind and count must
    be what the JSON form of the same ruleset (spelled from the layout, not from the
    text) lists, and the counts those of the parsed objects."""
    import json

    from svcrules.kernel.nft.diff import parse_script

    ruleset = compile_objs(objs)
    listed: dict[tuple[str, str], dict[str, tuple[str, int]]] = {}
    comments: dict[tuple[str, str], str] = {}
    for o in json.loads(ruleset.json)["nftables"]:
        (kind, body), *_ = o.items()
        if kind == "table":
            listed[(body["family"], body["name"])] = {}
            comments[(body["family"], body["name"])] = body.get("comment", "")
        elif kind in ("set", "map", "chain"):
            count = len(body.get("elem", []))
            listed[(body["family"], body["table"])][body["name"]] = (kind, count)
        elif kind == "rule":
            objects = listed[(body["family"], body["table"])]
            _, rules = objects[body["chain"]]
            objects[body["chain"]] = ("chain", rules + 1)
    cut = parse_script(ruleset.nft)
    assert list(cut) == list(listed)
    for key, table in cut.items():
        assert table.comment == f'comment "{comments[key]}"'
        assert {name: table.objects.size(name) for name in table.objects} == listed[key]
        for name in table.objects:
            assert len(table.objects[name].items) == listed[key][name][1]
