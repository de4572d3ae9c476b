"""Every generated ruleset loads into a real kernel, and reloading it is a no-op.

`nft -c` alone is not enough: it accepted a map whose data type conflicted
with UDP/SCTP rules that the kernel load then refused.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from tests.k8s import Obj, compile_objs
from tests.strategies import clusters

from . import backends
from .lab import Lab


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(objs=clusters())
def test_random_clusters_load_and_reload_to_the_same_state(lab: Lab, objs: list[Obj]) -> None:
    text = compile_objs(objs).nft
    lab.load(text)
    first = lab.nft("list", "ruleset")
    lab.load(text)
    assert lab.nft("list", "ruleset") == first
    lab.nft("flush", "ruleset")


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(objs=clusters(maglev=False))
def test_random_clusters_load_with_iptables_and_reload_to_the_same_state(
    lab: Lab, objs: list[Obj]
) -> None:
    """iptables-restore refuses what its parser or the kernel refuses (a chain name
    too long, an unknown match): every random cluster must load, with both variants."""
    ruleset = compile_objs(objs, backend="iptables")
    for backend in ("iptables-nft", "iptables-legacy"):
        backends.require(backend)
        backends.install(lab, ruleset, backend)
        first = backends.rules_only(backends.save(lab, backend))
        backends.install(lab, ruleset, backend)
        assert backends.rules_only(backends.save(lab, backend)) == first
    lab.reset()
    backends.reset_legacy(lab)
