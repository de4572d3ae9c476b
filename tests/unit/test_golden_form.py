"""Golden files as reviewers keep them: no fingerprints, the elements of shared sets and
maps under a comment naming their Service, and changes to different Services that merge
without conflict (``git merge-file``)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import svcrules
from svcrules.cli import app
from svcrules.cli.golden import golden_text
from svcrules.render.iptables.layout import render_iptables_golden
from svcrules.render.nftables.layout import render_nft_golden
from tests.golden.forms import canonical, canonical_iptables
from tests.golden.test_golden import REFUSED_BY_IPTABLES

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "fixtures" / "demo"
CASES = sorted(p for p in (ROOT / "fixtures").iterdir() if p.is_dir())
FINGERPRINT = re.compile(r"svcrules [0-9a-f]{32}")
runner = CliRunner()

Docs = list[dict[str, Any]]


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_the_golden_form_holds_the_compiled_rules(case: Path) -> None:
    ruleset = svcrules.compile_paths([str(case)])
    golden = render_nft_golden(ruleset.plan)
    assert canonical(golden) == canonical(ruleset.nft)
    assert not FINGERPRINT.search(golden) and FINGERPRINT.search(ruleset.nft)
    assert "# " not in ruleset.nft.split("\n", 2)[2]  # the loadable form has no groups
    assert not FINGERPRINT.search(golden_text(ruleset, "nftables", "json"))
    if case.name in REFUSED_BY_IPTABLES:  # Maglev: tests/golden checks the refusal
        return
    for backend in ("nftables", "iptables"):
        for form in ("nft", "json"):
            if (backend, form) != ("iptables", "json"):
                assert not FINGERPRINT.search(golden_text(ruleset, backend, form))
    ipt = svcrules.compile_paths([str(case)], backend="iptables").iptables
    golden = render_iptables_golden(ruleset.plan)
    assert canonical_iptables(golden) == canonical_iptables(ipt)
    assert not FINGERPRINT.search(golden) and FINGERPRINT.search(ipt)


def test_elements_of_shared_maps_are_grouped_under_their_service() -> None:
    golden = render_nft_golden(svcrules.compile_paths([str(DEMO)]).plan)
    blocks = re.findall(r"\n\t(?:set|map) (\S+) \{\n(.*?)\n\t\}", golden, re.S)
    grouped = {
        name
        for name, body in blocks
        if "elements = {\n\t\t\t# " in body  # the first element has a group
    }
    assert {"service-ips", "service-nodeports", "firewall-ips", "firewall-allow"} <= grouped
    assert {"cluster-ips", "hairpin"} <= grouped
    assert all(n in grouped for n, _ in blocks if n.startswith(("backends-", "affinity-end")))
    assert "pod-cidrs" not in grouped and "state" not in grouped  # the node's, not a Service's
    body = dict(blocks[: len(blocks) // 2 + 1])["service-ips"]  # the ip table's
    assert "\t\t\t# shop/web:http/TCP\n\t\t\t203.0.113.10 . tcp . 80 : goto svc-" in body
    # Each Service port once, its ClusterIP and load-balancer IP together.
    assert body.count("# shop/web:http/TCP\n") == 1
    assert (
        "203.0.113.10 . tcp . 80 : goto svc-f49b7503027b-shop-web-http-tcp,\n\t\t\t203.0.113.200"
        in body
    )
    assert "# shop/api:grpc/TCP (local endpoints)" in golden


# -- merging two changes -------------------------------------------------------


def _docs() -> Docs:
    docs: Docs = []
    for f in sorted(DEMO.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def _find(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def replace_a_web_endpoint(docs: Docs) -> Docs:
    """shop/web: endpoint 198.51.100.12 replaced by 198.51.100.99."""
    docs = copy.deepcopy(docs)
    for ep in _find(docs, "EndpointSlice", "web-abc12")["endpoints"]:
        ep["addresses"] = ["198.51.100.99" if a == "198.51.100.12" else a for a in ep["addresses"]]
    return docs


def grow_dns(docs: Docs) -> Docs:
    """kube-system/dns: a third endpoint (on this node) and an externalIP."""
    docs = copy.deepcopy(docs)
    _find(docs, "EndpointSlice", "dns-v4")["endpoints"].append(
        {"addresses": ["198.51.100.15"], "nodeName": "node-a"}
    )
    _find(docs, "Service", "dns")["spec"]["externalIPs"] = ["192.0.2.53"]
    return docs


def _golden(docs: Docs, tmp: Path, backend: str, form: str) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "all.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return golden_text(svcrules.compile_paths([str(path)], backend=backend), backend, form)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize(
    ("backend", "form"), [("nftables", "nft"), ("nftables", "explain"), ("iptables", "nft")]
)
def test_changes_to_different_services_merge_without_conflict(
    tmp_path: Path, backend: str, form: str
) -> None:
    """Two pull requests, one per Service, each with its golden updated: git merges the
    goldens without a conflict, into the golden of both changes."""

    def unchanged(docs: Docs) -> Docs:
        return docs

    def both(docs: Docs) -> Docs:
        return grow_dns(replace_a_web_endpoint(docs))

    changes: dict[str, Callable[[Docs], Docs]] = {
        "base": unchanged,
        "ours": replace_a_web_endpoint,
        "theirs": grow_dns,
        "both": both,
    }
    texts = {}
    for name, change in changes.items():
        texts[name] = _golden(change(_docs()), tmp_path / name, backend, form)
        (tmp_path / f"{name}.golden").write_text(texts[name])
    assert len(set(texts.values())) == 4  # every change shows in the golden
    merge = subprocess.run(
        ["git", "merge-file", "-p", "ours.golden", "base.golden", "theirs.golden"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert merge.returncode == 0, f"conflicts:\n{merge.stdout}"
    assert merge.stdout == texts["both"]


# -- the command ---------------------------------------------------------------


def test_check_writes_and_compares_goldens_without_fingerprints(tmp_path: Path) -> None:
    golden = tmp_path / "g.nft"
    res = runner.invoke(app, ["check", "--golden", str(golden), "--update", str(DEMO)])
    assert res.exit_code == 0, res.stderr
    text = golden.read_text()
    assert '1 comment "svcrules <fingerprint>"' in text and not FINGERPRINT.search(text)
    assert "\t\t\t# shop/web:http/TCP\n" in text
    assert runner.invoke(app, ["check", "--golden", str(golden), str(DEMO)]).exit_code == 0
    # A golden that still carries fingerprints (compile output) compares without them.
    js = tmp_path / "g.json"
    js.write_text(svcrules.compile_paths([str(DEMO)]).json)
    assert FINGERPRINT.search(js.read_text())
    res = runner.invoke(app, ["check", "--golden", str(js), "-o", "json", str(DEMO)])
    assert res.exit_code == 0, res.stdout
    # The iptables golden: grouped too, no fingerprints.
    ipt = tmp_path / "g.iptables"
    res = runner.invoke(app, ["check", "-g", str(ipt), "-b", "iptables", "--update", str(DEMO)])
    assert res.exit_code == 0 and "\n# shop/web:http/TCP\n-A SVCRULES-SVC-" in ipt.read_text()
    assert not FINGERPRINT.search(ipt.read_text())
    for fmt in ("json", "nft"):
        res = runner.invoke(
            app, ["check", "-g", str(tmp_path / fmt), "--update", "-o", fmt, str(DEMO)]
        )
        assert res.exit_code == 0 and not FINGERPRINT.search((tmp_path / fmt).read_text())


def test_check_format_explain(tmp_path: Path) -> None:
    golden = tmp_path / "g.explain"
    args = ["check", "--golden", str(golden), "-o", "explain", str(DEMO)]
    assert runner.invoke(app, [*args, "--update"]).exit_code == 0
    assert golden.read_text() == runner.invoke(app, ["explain", str(DEMO)]).stdout
    assert runner.invoke(app, args).exit_code == 0
    golden.write_text(golden.read_text().replace("198.51.100.12:8080", "198.51.100.99:8080"))
    res = runner.invoke(app, args)
    assert res.exit_code == 1
    assert "-  endpoints  cluster: 198.51.100.11:8080, 198.51.100.99:8080" in res.stdout
    assert "+  endpoints  cluster: 198.51.100.11:8080, 198.51.100.12:8080" in res.stdout
    res = runner.invoke(app, [*args, "--family", "ipv4", "-b", "iptables"])
    assert res.exit_code == 2 and "--family" in res.stderr


def test_check_family_section_of_the_golden_form(tmp_path: Path) -> None:
    golden = tmp_path / "g.ipv6"
    args = ["check", "-g", str(golden), "-b", "iptables", "--family", "ipv6", str(DEMO)]
    assert runner.invoke(app, [*args, "--update"]).exit_code == 0
    text = golden.read_text()
    assert "# family ipv6" in text and "# family ipv4" not in text
    assert "\n# kube-system/dns:dns/UDP\n-A SVCRULES-SVC-" in text
    assert not FINGERPRINT.search(text)
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, ["check", "-g", str(golden), "--family", "ipv6", str(DEMO)])
    assert res.exit_code == 2 and "--family" in res.stderr  # nftables has no sections
