"""The compile cache gives what a compile without it gives, whatever came before.

Random clusters go through random sequences of changes (objects edited, added,
removed, duplicated, made invalid, reordered, the NodeConfig edited), each compiled
with the cache the previous step left and without any cache: plan, text, JSON and
what skip mode left out must be the same, and so must the error when there is one.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svcrules.compiler import Job, Ruleset, code_digest
from svcrules.compiler.compile_cache import Cache, compile_plan, dump, load
from svcrules.errors import InputError
from svcrules.inputs.config import Overrides
from svcrules.inputs.read import Source
from svcrules.kernel.state import Meta
from tests.k8s import Obj
from tests.k8s import dump as dump_yaml
from tests.strategies import clusters

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _sources(objs: list[Obj], form: str) -> tuple[Source, ...]:
    """The objects as kubectl prints them (an indented JSON List), compact JSON, YAML
    documents, or split over a JSON List and a YAML file."""
    items = {"apiVersion": "v1", "kind": "List", "items": objs}
    if form == "kubectl":
        return (Source("cluster.json", json.dumps(items, indent=4) + "\n"),)
    if form == "compact":
        return (Source("cluster.json", json.dumps(items)),)
    if form == "yaml":
        return (Source("cluster.yaml", dump_yaml(objs)),)
    half = len(objs) // 2
    rest = {"apiVersion": "v1", "kind": "List", "items": objs[half:]}
    return (Source("a.yaml", dump_yaml(objs[:half])), Source("b.json", json.dumps(rest)))


def _compile(job: Job, cache: Cache | None, keep: bool) -> tuple[str, Ruleset | None]:
    """("", ruleset), or the error's text and None. Without ``keep`` (nor a cache) the
    compile is the one that never saw a cache (load_sources, resolve)."""
    try:
        return "", job.compile(cache=cache, keep=keep)
    except InputError as exc:
        return str(exc), None


def _iptables(ruleset: Ruleset) -> str:
    """The iptables text, or the refusal (of Maglev) as text."""
    try:
        return ruleset.iptables
    except InputError as exc:
        return str(exc)


def _same(cached: tuple[str, Ruleset | None], cold: tuple[str, Ruleset | None]) -> None:
    assert cached[0] == cold[0]
    if cold[1] is None:
        return
    assert cached[1] is not None
    assert cached[1].plan == cold[1].plan
    assert cached[1].nft == cold[1].nft
    assert cached[1].json == cold[1].json
    assert _iptables(cached[1]) == _iptables(cold[1])
    assert [str(p) for p in cached[1].skipped] == [str(p) for p in cold[1].skipped]
    # The digests of Service ports a cached compile passes on are those of the ports.
    known = Meta.of_plan(cached[1].plan, "", cached[1].port_digests)
    assert known.ports == Meta.of_plan(cold[1].plan, "").ports


def _change(objs: list[Obj], other: list[Obj], rnd: random.Random) -> list[Obj]:
    """One step of churn: a few objects edited, added, removed, copied or broken."""
    out = copy.deepcopy(objs)
    for _ in range(rnd.randint(1, 3)):
        what = rnd.choice(["endpoint", "add", "remove", "copy", "invalid", "move", "node"])
        body = [o for o in out if o["kind"] != "NodeConfig"]
        if what == "endpoint":
            slices = [o for o in body if o["kind"] == "EndpointSlice" and o["endpoints"]]
            if slices:
                ep = rnd.choice(rnd.choice(slices)["endpoints"])
                ep["addresses"] = [ep["addresses"][0].replace(".1", ".2", 1).replace("::", "::9")]
        elif what == "add" and other:
            out.append(copy.deepcopy(rnd.choice(other)))
        elif what == "remove" and body:
            out.remove(rnd.choice(body))
        elif what == "copy" and body:
            out.insert(rnd.randrange(len(out) + 1), copy.deepcopy(rnd.choice(body)))
        elif what == "invalid" and body:
            victim = rnd.choice(body)
            if victim["kind"] == "Service":
                victim["spec"]["ports"][0]["port"] = "not-a-port"
            else:
                victim["addressType"] = "IPv5"
        elif what == "move" and out:
            out.insert(rnd.randrange(len(out)), out.pop(rnd.randrange(len(out))))
        elif what == "node":
            node = next(o for o in out if o["kind"] == "NodeConfig")
            node["spec"]["masqueradeAll"] = not node["spec"].get("masqueradeAll", False)
    return out


@SETTINGS
@given(
    clusters(),
    clusters(),
    st.sampled_from(["kubectl", "compact", "yaml", "mixed"]),
    st.sampled_from(["fail", "skip"]),
    st.randoms(use_true_random=False),
)
def test_cached_compile_is_the_cold_compile(
    objs: list[Obj], other: list[Obj], form: str, on_invalid: str, rnd: random.Random
) -> None:
    cache: Cache | None = None
    for _ in range(4):
        job = Job(_sources(objs, form), (), Overrides(), on_invalid=on_invalid)  # type: ignore[arg-type]
        cold = _compile(job, None, keep=False)
        cached = _compile(job, cache, keep=True)
        _same(cached, cold)
        if cached[1] is not None and cached[1].next_cache is not None:
            cache = cached[1].next_cache
        objs = _change(objs, [o for o in other if o["kind"] != "NodeConfig"], rnd)


def _poisoned(cache: Cache) -> Cache:
    """The cache with every Service plan emptied: a compile that trusted it would
    program no Service."""
    bad = copy.copy(cache)
    bad.plans = {
        k: (digest, tuple(p._replace(ports=((), ())) for p in plans), ())
        for k, (digest, plans, _) in cache.plans.items()
    }
    return bad


def _objs() -> list[Obj]:
    from tests.k8s import endpoint, endpoint_slice, node_config, service

    return [
        node_config(),
        service("web", "10.96.0.10"),
        endpoint_slice("web", [endpoint("10.1.0.1"), endpoint("10.1.0.2")]),
    ]


def test_plans_are_not_trusted_from_another_version() -> None:
    job = Job(_sources(_objs(), "kubectl"), (), Overrides())
    first = job.compile(keep=True)
    assert first.next_cache is not None
    trusted = _poisoned(first.next_cache)
    # The same version trusts it (this is what makes the check below meaningful) ...
    assert not job.compile(cache=trusted).plan.families[0].ports
    # ... another does not.
    trusted.code = "another version"
    assert job.compile(cache=trusted).plan == first.plan


def test_plans_are_not_trusted_for_another_node_config() -> None:
    objs = _objs()
    first = Job(_sources(objs, "kubectl"), (), Overrides()).compile(keep=True)
    assert first.next_cache is not None
    objs[0]["spec"]["masqueradeAll"] = True
    job = Job(_sources(objs, "kubectl"), (), Overrides())
    assert job.compile(cache=_poisoned(first.next_cache)).plan == job.compile().plan


def test_flags_that_change_the_node_config_count_as_a_change() -> None:
    job = Job(_sources(_objs(), "kubectl"), (), Overrides())
    first = job.compile(keep=True)
    assert first.next_cache is not None
    flagged = Job(job.sources, (), Overrides(table_name="other"))
    assert flagged.compile(cache=_poisoned(first.next_cache)).plan == flagged.compile().plan


def test_an_unchanged_service_is_not_planned_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from svcrules.compiler import compile_cache

    objs = _objs()
    job = Job(_sources(objs, "kubectl"), (), Overrides())
    first = compile_plan(job.sources, (), Overrides(), "fail", True, code_digest(), None)[2]
    planned: list[str] = []
    from svcrules.plan.resolve import plan_service as real

    def spy(svc: Any, *args: Any) -> Any:
        planned.append(svc.metadata.name)
        return real(svc, *args)

    monkeypatch.setattr(compile_cache, "plan_service", spy)
    from tests.k8s import endpoint, endpoint_slice, service

    objs += [service("api", "10.96.0.11"), endpoint_slice("api", [endpoint("10.1.0.9")])]
    job = Job(_sources(objs, "kubectl"), (), Overrides())
    compile_plan(job.sources, (), Overrides(), "fail", True, code_digest(), first)
    assert planned == ["api"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # torn write
        lambda b: b[:-10] + bytes(10),  # flipped bytes
        lambda b: b"",
        lambda b: b"svcrules-compile-cache 99 00\n" + b[b.index(b"\n") + 1 :],  # other format
    ],
)
def test_a_damaged_cache_is_ignored(tmp_path: Path, damage: Any) -> None:
    job = Job(_sources(_objs(), "kubectl"), (), Overrides())
    first = job.compile(keep=True)
    assert first.next_cache is not None
    path = tmp_path / "compile-cache"
    path.write_bytes(damage(dump(first.next_cache)))
    path.chmod(0o600)
    warnings: list[str] = []
    assert load(path, warnings.append) is None
    assert len(warnings) == 1 and "compile cache" in warnings[0]


def test_a_cache_others_may_write_is_ignored(tmp_path: Path) -> None:
    job = Job(_sources(_objs(), "kubectl"), (), Overrides())
    first = job.compile(keep=True)
    assert first.next_cache is not None
    path = tmp_path / "compile-cache"
    path.write_bytes(dump(first.next_cache))
    path.chmod(0o600)
    assert load(path, print) is not None
    path.chmod(0o666)
    warnings: list[str] = []
    assert load(path, warnings.append) is None
    assert "unwritable by others" in warnings[0]


def test_an_input_under_a_new_name_is_matched_with_the_last_one_in_its_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from svcrules.inputs import split

    digested: list[str] = []
    real = split.digest_text

    def spy(text: str) -> str:
        digested.append(text)
        return real(text)

    monkeypatch.setattr(split, "digest_text", spy)
    objs = _objs()
    first = Job((Source("monday.json", _sources(objs, "kubectl")[0].text),), (), Overrides())
    cache = first.compile(keep=True).next_cache
    assert cache is not None
    objs[2]["endpoints"][0]["addresses"] = ["10.1.0.7"]
    text = _sources(objs, "kubectl")[0].text
    job = Job((Source("tuesday.json", text),), (), Overrides())
    digested.clear()
    done = compile_plan(job.sources, (), Overrides(), "fail", True, code_digest(), cache)
    assert done.plan == job.compile().plan
    # Only the changed object was decoded and digested; the others were recognised.
    assert len(digested) == 1 and '"10.1.0.7"' in digested[0]
    assert {p.origin.path for p in done.cache.splits["tuesday.json"].pieces} == {"tuesday.json"}


def test_only_the_batch_of_a_changed_service_is_pickled_again(tmp_path: Path) -> None:
    from tests.k8s import endpoint, endpoint_slice, node_config, service

    objs: list[Obj] = [node_config()]
    for i in range(40):
        objs += [
            service(f"s{i}", f"10.96.0.{i + 10}"),
            endpoint_slice(f"s{i}", [endpoint(f"10.1.0.{i + 1}")]),
        ]
    job = Job(_sources(objs, "kubectl"), (), Overrides())
    path = tmp_path / "compile-cache"
    path.write_bytes(dump(job.compile(keep=True).next_cache))  # type: ignore[arg-type]
    path.chmod(0o600)
    read = load(path, print)
    assert read is not None
    objs[2]["endpoints"][0]["addresses"] = ["10.1.0.99"]  # s0's slice
    after = Job(_sources(objs, "kubectl"), (), Overrides()).compile(cache=read).next_cache
    assert after is not None
    written = after.__getstate__()["plans"]
    assert isinstance(written, dict)
    kept = [b for b, blob in written.items() if blob is read.read[b][0]]
    assert len(written) == len(read.read) > 1 and len(kept) == len(written) - 1
    path.write_bytes(dump(after))
    again = load(path, print)
    assert again is not None and again.plans.keys() == after.plans.keys()
