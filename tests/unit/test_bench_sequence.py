"""bench/'s change helpers and the sequence schedule: pure, deterministic, shaped as the
EndpointSlice controller writes changes, and every input compiles. No timing here."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import svcrules

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import generate  # noqa: E402
import sequence  # noqa: E402


def _cluster() -> list[dict[str, Any]]:
    return generate.cluster(12, 8)


def test_helpers_are_pure_and_share_unchanged_objects() -> None:
    objs = _cluster()
    before = copy.deepcopy(objs)
    ns, name = generate.service_names(objs)[3]
    old = generate.endpoint_addresses(objs, ns, name)
    new = [generate.endpoint("10.255.0.1", "node-1"), generate.endpoint("10.255.0.2", "node-2")]
    replaced = generate.with_endpoints_replaced(objs, ns, name, [old[0], old[5]], new)
    added = generate.with_service(objs, "ns-1", "svc-extra", "172.20.100.1", new)
    removed = generate.without_service(objs, ns, name)
    assert objs == before
    assert sum(a is not b for a, b in zip(objs, replaced, strict=True)) == 1
    # Those that stay keep their order; the new ones come last.
    assert generate.endpoint_addresses(replaced, ns, name) == [
        *(a for a in old if a not in (old[0], old[5])),
        "10.255.0.1",
        "10.255.0.2",
    ]
    assert len(added) == len(objs) + 2
    assert generate.endpoint_addresses(added, "ns-1", "svc-extra") == ["10.255.0.1", "10.255.0.2"]
    assert len(removed) == len(objs) - 2
    assert (ns, name) not in generate.service_names(removed)


def test_schedule_is_deterministic_and_mixes_every_change() -> None:
    objs = _cluster()
    first = list(sequence.schedule(objs, 30, seed=7))
    again = list(sequence.schedule(objs, 30, seed=7))
    other = list(sequence.schedule(objs, 30, seed=8))
    assert len(first) == 30
    assert [(s.label, s.objs) for s in first] == [(s.label, s.objs) for s in again]
    assert [s.label for s in first] != [s.label for s in other]
    # Every block of eight runs holds each kind of change.
    for start in (0, 8, 16):
        kinds = [s.change for s in first[start : start + 8]]
        assert sorted(kinds) == sorted(
            ["endpoint", "endpoint", "service_added", "service_removed", *["rollout"] * 4]
        )


def test_endpoint_changes_skip_services_whose_endpoints_may_not_count() -> None:
    objs = generate.cluster(60, 4)
    local = {
        f"{o['metadata']['namespace']}/{o['metadata']['name']}"
        for o in objs
        if o["kind"] == "Service" and o["spec"].get("internalTrafficPolicy") == "Local"
    }
    assert local
    for step in sequence.schedule(objs, 200, seed=5):
        if step.change in ("endpoint", "rollout"):
            assert step.label.split()[1] not in local


def test_rollout_replaces_every_endpoint_in_quarters() -> None:
    objs = _cluster()
    steps = list(sequence.schedule(objs, 8, seed=3))
    rollout = [s for s in steps if s.change == "rollout"]
    assert [s.label.rsplit(" ", 1)[1] for s in rollout] == ["1/4", "2/4", "3/4", "4/4"]
    ns, name = rollout[0].label.split()[1].split("/")
    index = steps.index(rollout[0])
    old = generate.endpoint_addresses(steps[index - 1].objs if index else objs, ns, name)
    seen = [generate.endpoint_addresses(s.objs, ns, name) for s in rollout]
    assert [len(set(old) & set(a)) for a in seen] == [6, 4, 2, 0]  # 8 endpoints, 2 per step
    assert all(len(a) == len(old) for a in seen)
    assert seen[0][:6] == old[2:]  # the old ones that stay keep their order


def test_every_input_of_the_schedule_compiles(tmp_path: Path) -> None:
    objs = _cluster()
    path = tmp_path / "input.json"
    for step in sequence.schedule(objs, 8, seed=1):
        generate.write(path, [generate.node_config(), *step.objs])
        ruleset = svcrules.compile_paths([str(path)])
        assert ruleset.skipped == ()
        for backend in ("nftables", "iptables"):
            assert ruleset.text(backend)
        if step.change == "service_added":
            assert "svc-new-0" in ruleset.text("nftables")
    assert json.loads(path.read_text())["kind"] == "List"


def test_nearest_rank() -> None:
    values = [float(v) for v in range(1, 31)]
    assert sequence.nearest_rank(values, 0.95) == 29.0
    assert sequence.nearest_rank(values, 1.0) == 30.0
    assert sequence.nearest_rank([5.0], 0.95) == 5.0
