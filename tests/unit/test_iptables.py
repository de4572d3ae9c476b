"""The iptables backend without a kernel: layout, texts, diffs (kernel tests send them)."""

from __future__ import annotations

import io
import re
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import svcrules
from svcrules.errors import KernelError
from svcrules.kernel.iptables.restore import (
    diff_restore,
    full_restore,
    parse_restore,
    parsed_from_save,
    split_sections,
)
from svcrules.render.iptables.layout import CHAIN_MAX, PREFIX_MAX, family_section
from tests.k8s import Obj, compile_objs, dump, endpoint, endpoint_slice, node_config, service
from tests.strategies import clusters

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def text(*objs: Obj, **spec: Any) -> str:
    return compile_objs([node_config(**spec), *objs], backend="iptables").iptables


def web(*ips: str, **spec: Any) -> list[Obj]:
    return [
        service("web", "203.0.113.10", **spec),
        endpoint_slice("web", [endpoint(ip) for ip in ips]),
    ]


@SETTINGS
@given(clusters(maglev=False), st.randoms(use_true_random=False))
def test_order_does_not_matter_and_every_target_exists(objs: list[Obj], rnd: object) -> None:
    base = compile_objs(objs, backend="iptables").iptables
    shuffled = list(objs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert compile_objs(shuffled, backend="iptables").iptables == base
    builtin = {"RETURN", "DROP", "REJECT", "DNAT", "MARK", "MASQUERADE", "ACCEPT"}
    for part, table in parse_restore(base).items():
        for name, specs in table.chains.items():
            assert len(name) <= CHAIN_MAX, name
            for spec in specs:
                for target in re.findall(r"-[jg] (\S+)", spec):
                    assert target in builtin or target in table.chains, (part, target)
                # ACCEPT in nat only ends nat ("leave untranslated"); in filter it would
                # open the node, which svcrules never does.
                assert part[1] == "nat" or "ACCEPT" not in spec, spec
        for chain, spec in table.jumps:
            assert spec.split()[-1] in table.chains, (part, chain)


def test_random_cascade_gives_every_endpoint_the_same_chance() -> None:
    ips = [f"198.51.100.{i}" for i in range(11, 18)]
    out = text(*web(*ips))
    svc = next(n for n in parse_restore(out)[("ipv4", "nat")].chains if "-SVC-" in n)
    specs = parse_restore(out)[("ipv4", "nat")].chains[svc]
    left, chances = Fraction(1), []
    for spec in specs:
        m = re.search(r"--probability (\S+)", spec)
        p = Fraction(m.group(1)).limit_denominator(1000) if m else Fraction(1)
        chances.append(left * p)
        left -= left * p
    assert chances == [Fraction(1, len(ips))] * len(ips)


def test_long_table_names_fit_and_longer_ones_are_refused(tmp_path: object) -> None:
    name = "t" * PREFIX_MAX
    out = text(*web("198.51.100.11", sessionAffinity="ClientIP"), tableName=name)
    for table in parse_restore(out).values():
        assert all(len(c) <= CHAIN_MAX for c in table.chains)
    with pytest.raises(svcrules.SvcrulesError, match=r"spec\.tableName"):
        text(*web("198.51.100.11"), tableName=name + "x")


def test_an_endpoint_change_names_only_its_chains() -> None:
    other = [
        service("b", "203.0.113.20"),
        endpoint_slice("b", [endpoint("198.51.100.14")]),
    ]
    old = parse_restore(text(*web("198.51.100.11"), *other))
    new = parse_restore(text(*web("198.51.100.12"), *other))
    tx = diff_restore(old, new)
    script = tx.script()
    declared = {ln[1:].split()[0].split("-")[1] for ln in script.splitlines() if ln[:1] == ":"}
    assert declared == {"SVC", "SEP", "STATE"}, script
    assert "198.51.100.14" not in script and "-X SVCRULES-SEP-" in script
    assert tx.chains_added == 1 and tx.chains_removed == 1
    assert diff_restore(new, new).empty


def test_full_replacement_keeps_other_owners_and_fixes_jumps() -> None:
    new = parse_restore(text(*web("198.51.100.11")))
    save = """*nat
:PREROUTING ACCEPT [0:0]
:SVCRULES-SERVICES - [0:0]
:SVCRULES-SEP-AAAAAAAAAA - [0:0]
:OTHER - [0:0]
:SVCRULES-SIDECAR - [0:0]
-A PREROUTING -m comment --comment "SVCRULES service portals" -j SVCRULES-SERVICES
-A PREROUTING -m comment --comment "SVCRULES service portals" -j SVCRULES-SERVICES
-A PREROUTING -j OTHER
-A OTHER -j SVCRULES-SEP-AAAAAAAAAA
-A SVCRULES-SEP-AAAAAAAAAA -j DNAT --to-destination 198.51.100.99:80
COMMIT
"""
    have = {("ipv4", "nat"): parsed_from_save(save, "SVCRULES")}
    assert (
        have[("ipv4", "nat")].jumps
        == [("PREROUTING", '-m comment --comment "SVCRULES service portals" -j SVCRULES-SERVICES')]
        * 2
    ), "the other owner's rules are not svcrules' to delete"
    tx = full_restore(new, have)
    lines = tx.parts[("ipv4", "nat")]
    assert "-X SVCRULES-SEP-AAAAAAAAAA" in lines and ":SVCRULES-SEP-AAAAAAAAAA - [0:0]" in lines
    assert sum(ln.startswith("-D PREROUTING") for ln in lines) == 1  # the duplicate
    assert not any(ln.startswith("-I PREROUTING") for ln in lines)
    assert any(ln.startswith("-I OUTPUT 1 ") for ln in lines)
    assert not any("OTHER" in ln or "SIDECAR" in ln for ln in lines), "not svcrules' shapes"
    # Sections come back in a fixed order, one restore input each.
    parts = [p for p, _ in split_sections(tx.script())]
    assert parts == [("ipv4", "nat"), ("ipv4", "filter"), ("ipv6", "nat"), ("ipv6", "filter")]


def test_family_section_is_one_restore_input() -> None:
    full = text(*web("198.51.100.11"))
    v6 = family_section(full, "ipv6")
    assert v6.startswith("# Generated by svcrules") and "ip6tables-restore" in v6
    assert "iptables-restore --noflush\n" not in v6 and v6.count("COMMIT") == 2
    assert family_section(full, "ipv4") + v6.split("\n", 2)[2] == full


def test_compile_cli_backend_and_family(tmp_path: object) -> None:
    from typer.testing import CliRunner

    from svcrules.cli import app

    inputs = dump([node_config(), *web("198.51.100.11")])
    run = CliRunner().invoke
    res = run(app, ["compile", "-b", "iptables", "--family", "ipv4", "-"], input=inputs)
    assert res.exit_code == 0 and "*nat" in res.stdout and "ipv6" not in res.stdout
    res = run(app, ["compile", "-b", "iptables", "-o", "json", "-"], input=inputs)
    assert res.exit_code == 2 and res.stdout == "" and "-o json is libnftables JSON" in res.stderr
    res = run(app, ["compile", "--family", "ipv4", "-"], input=inputs)
    assert res.exit_code == 2 and "--backend iptables" in res.stderr
    same = svcrules.compile_paths(["-"], stdin=io.StringIO(inputs), backend="iptables")
    res = run(app, ["compile", "-b", "iptables", "-"], input=inputs)
    assert res.stdout == same.iptables


def test_a_new_service_is_inserted_in_place_into_long_chains() -> None:
    def many(n: int) -> list[Obj]:
        out: list[Obj] = []
        for i in range(n):
            out += [
                service(f"s{i}", f"203.0.113.{10 + i}"),
                endpoint_slice(f"s{i}", [endpoint("198.51.100.11")]),
            ]
        return out

    old, new = parse_restore(text(*many(40))), parse_restore(text(*many(41)))
    tx = diff_restore(old, new)
    nat = tx.parts[("ipv4", "nat")]
    chain = new[("ipv4", "nat")].chains["SVCRULES-SERVICES"]
    inserts = [ln.split(" ", 3)[2:] for ln in nat if ln.startswith("-I SVCRULES-SERVICES ")]
    # The frontend and the ClusterIP's catch-all, each at its final position.
    assert len(inserts) == 2 and all(chain[int(pos) - 1] == spec for pos, spec in inserts)
    assert all("203.0.113.50/32" in spec for _, spec in inserts)
    assert ":SVCRULES-SERVICES - [0:0]" not in nat
    assert tx.operations < 20
    # And back: the rules go by -D, the Service's chains by -X.
    back = diff_restore(new, old).parts[("ipv4", "nat")]
    assert sum(ln.startswith("-D SVCRULES-SERVICES ") for ln in back) == 2
    assert sum(ln.startswith("-X ") for ln in back) == 2


def test_check_against_an_iptables_golden() -> None:
    from pathlib import Path

    from typer.testing import CliRunner

    from svcrules.cli import app

    root = Path(__file__).resolve().parents[2]
    golden = str(root / "tests" / "golden" / "demo.iptables")
    demo = str(root / "fixtures" / "demo")
    res = CliRunner().invoke(app, ["check", "-b", "iptables", "-g", golden, demo])
    assert res.exit_code == 0, res.stdout
    res = CliRunner().invoke(app, ["check", "-g", golden, demo])  # the nft text differs
    assert res.exit_code == 1 and res.stdout.startswith("---")


def test_a_refused_table_puts_back_what_it_can_and_says_what_it_could_not() -> None:
    """iptables-nft: only chain names are read, so a full replacement can put back only
    what the last text applied says; without it, the tables already sent stay new."""
    from svcrules.kernel.iptables.driver import IptablesDriver
    from svcrules.kernel.iptables.fake import FakeIptables

    ruleset = compile_objs([node_config(), *web("198.51.100.11")], backend="iptables")
    old = compile_objs([node_config(), *web("198.51.100.12")], backend="iptables").iptables
    for previous, known in ((old, True), (None, False)):
        kernel = FakeIptables("nft")
        for (fam, _), part in split_sections(full_restore(parse_restore(old), {}).script()):
            kernel.restore(fam, part)
        kernel.sent.clear()
        kernel.refuse = lambda fam, part: fam == "ipv4" and part.startswith("*filter")
        driver = IptablesDriver(kernel)
        tx = driver.full(ruleset, "svcrules", previous)
        with pytest.raises(KernelError) as err:
            driver.send(tx.script(), tx)
        first, *back = kernel.sent
        assert first[0] == "ipv4" and first[1].startswith("*nat")
        if known:  # the last text svcrules applied goes back into IPv4 nat
            assert len(back) == 1 and "198.51.100.12" in back[0][1]
            assert "keep the new rules" not in str(err.value)
            assert "198.51.100.12" in kernel.save("ipv4", "nat")
        else:  # nothing known to put back: say so; the next run replaces everything
            assert back == [] and "ipv4 nat" in str(err.value)
            assert "keep the new rules" in str(err.value)


def test_table_names_that_are_other_programs_prefixes_are_refused() -> None:
    with pytest.raises(svcrules.SvcrulesError, match="another program"):
        text(*web("198.51.100.11"), tableName="kube")
