"""render_json without a kernel: valid, deterministic, self-consistent, and in step
with the text ruleset. Equivalence with what the kernel holds is proven in
tests/kernel/test_json_equivalence.py."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings

import svcrules
from svcrules.render.nftables.json_form import render_json
from tests.k8s import Obj, compile_objs
from tests.strategies import clusters

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("table", "set", "map", "chain", "rule")


def demo() -> svcrules.Ruleset:
    return svcrules.compile_paths([str(ROOT / "fixtures" / "demo")])


def walk(value: Any) -> Iterator[Any]:
    """Every value nested in a JSON document, the document included."""
    yield value
    if isinstance(value, dict):
        for v in value.values():
            yield from walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk(v)


def tables(doc: Obj) -> dict[tuple[str, str], list[tuple[str, Obj]]]:
    """(family, table) -> its objects as (kind, body), in document order."""
    out: dict[tuple[str, str], list[tuple[str, Obj]]] = {}
    for obj in doc["nftables"][1:]:
        ((kind, body),) = obj.items()
        assert kind in KINDS, f"unexpected object {kind}"
        name = body["name"] if kind == "table" else body["table"]
        out.setdefault((body["family"], name), []).append((kind, body))
    return out


def check_references(doc: Obj) -> None:
    for (family, table), objs in tables(doc).items():
        chains = {b["name"] for k, b in objs if k == "chain"}
        sets = {b["name"] for k, b in objs if k in ("set", "map")}
        where = f"table {family} {table}"
        for kind, body in objs:
            if kind == "rule":
                assert body["chain"] in chains, f"{where}: rule in missing chain {body['chain']}"
            searched = body.get("expr", []) if kind == "rule" else body.get("elem", [])
            for v in walk(searched):
                if isinstance(v, dict):
                    for verdict in ("goto", "jump"):
                        if verdict in v:
                            target = v[verdict]["target"]
                            assert target in chains, f"{where}: {verdict} to missing {target}"
                elif isinstance(v, str) and v.startswith("@"):
                    assert v[1:] in sets, f"{where}: reference to missing set {v}"


def check_order(doc: Obj) -> None:
    """Per table: the table, sets and maps, chains, then rules grouped by chain."""
    for key, objs in tables(doc).items():
        rank = {"table": 0, "set": 1, "map": 1, "chain": 2, "rule": 3}
        ranks = [rank[k] for k, _ in objs]
        assert ranks == sorted(ranks), f"{key}: objects out of listing order"
        assert ranks.count(0) == 1
        chains = [b["name"] for k, b in objs if k == "chain"]
        assert len(chains) == len(set(chains)), f"{key}: duplicate chain"
        order = [chains.index(b["chain"]) for k, b in objs if k == "rule"]
        assert order == sorted(order), f"{key}: rules not grouped in chain order"


def text_objects(nft: str) -> dict[tuple[str, str], dict[str, Any]]:
    """From the text ruleset: per table, its set names and each chain's rule count."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    blocks = re.findall(r"^table (ip6?) (\S+) \{\n(.*?)^\}", nft, flags=re.S | re.M)
    for family, table, body in blocks:
        sets = set(re.findall(r"^\t(?:set|map) (\S+) \{", body, flags=re.M))
        chains: dict[str, int] = {}
        for name, chain_body in re.findall(r"^\tchain (\S+) \{\n(.*?)^\t\}", body, re.S | re.M):
            lines = [ln.strip() for ln in chain_body.splitlines()]
            rules = [ln for ln in lines if ln and not ln.startswith(("comment ", "type "))]
            chains[name] = len(rules)
        out[(family, table)] = {"sets": sets, "chains": chains}
    return out


def check_matches_text(ruleset: svcrules.Ruleset, doc: Obj) -> None:
    """Same tables, sets, chains and rule counts as the text template rendered."""
    want = text_objects(ruleset.nft)
    got: dict[tuple[str, str], dict[str, Any]] = {}
    for key, objs in tables(doc).items():
        chains = {b["name"]: 0 for k, b in objs if k == "chain"}
        for k, b in objs:
            if k == "rule":
                chains[b["chain"]] += 1
        got[key] = {"sets": {b["name"] for k, b in objs if k in ("set", "map")}, "chains": chains}
    assert got == want


def check_all(ruleset: svcrules.Ruleset) -> None:
    text = render_json(ruleset.plan)
    doc = json.loads(text)
    check_references(doc)
    check_order(doc)
    check_matches_text(ruleset, doc)


def test_demo_is_libnftables_json_without_version_or_handles() -> None:
    text = render_json(demo().plan)
    doc = json.loads(text)
    assert list(doc) == ["nftables"]
    assert doc["nftables"][0] == {"metainfo": {"json_schema_version": 1}}
    assert text == json.dumps(doc, indent=2) + "\n"
    for v in walk(doc):
        if isinstance(v, dict):
            assert not {"handle", "version", "release_name"} & set(v), v
    families = [b["family"] for k, b in (next(iter(o.items())) for o in doc["nftables"][1:])]
    assert families == sorted(families, key=["ip", "ip6"].index), "ip table first, then ip6"


def test_demo_is_deterministic_and_is_ruleset_json() -> None:
    first, second = demo(), demo()
    assert render_json(first.plan) == render_json(second.plan)
    assert first.json == render_json(first.plan)


def test_demo_references_order_and_text() -> None:
    check_all(demo())


def test_base_chains() -> None:
    doc = json.loads(render_json(demo().plan))
    base = [
        b
        for k, b in (next(iter(o.items())) for o in doc["nftables"][1:])
        if k == "chain" and "hook" in b
    ]
    assert [(b["family"], b["hook"], b["prio"]) for b in base] == [
        (fam, hook, prio)
        for fam in ("ip", "ip6")
        for hook, prio in (("prerouting", -100), ("output", -100), ("postrouting", 100))
    ]
    assert all(b["type"] == "nat" and b["policy"] == "accept" for b in base)


@SETTINGS
@given(clusters())
def test_random_clusters(objs: list[Obj]) -> None:
    ruleset = compile_objs(objs)
    check_all(ruleset)
    shuffled = list(objs)
    random.Random(0).shuffle(shuffled)
    assert render_json(compile_objs(shuffled).plan) == ruleset.json
