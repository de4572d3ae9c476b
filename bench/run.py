"""svcrules benchmark: compile, full and incremental apply, and the data path, per backend.

    python bench/run.py            # 1k, 10k and 50k Services x 10 endpoints
    python bench/run.py --quick    # 1k only (CI runs this as a smoke test)
    python bench/run.py --backends nftables,iptables-legacy --sizes 1000,10000

Backends: nftables, iptables (whichever variant 'iptables' is here), iptables-nft,
iptables-legacy. The iptables ones stop at --iptables-max Services (default 10k).

Also the process start: `svcrules --help` against `python -c pass` and Typer's own
floor (bench/startup.py, median of --startup-runs fresh processes).

Prints a table and writes bench/results.json. Kernel measurements need root and
nft; they run in network namespaces this script creates and deletes, never in the
host's. Nothing here asserts a time: the numbers go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import generate  # noqa: E402
import kube_proxy_layout  # noqa: E402
import startup  # noqa: E402

PY = sys.executable
Row = dict[str, Any]


def sh(*cmd: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=input, capture_output=True, text=True, check=check)


class Netns:
    """A throw-away network namespace (deleted on exit, even after errors)."""

    def __init__(self, tag: str) -> None:
        self.name = f"svbench{os.getpid()}-{tag}"

    def __enter__(self) -> Netns:
        sh("ip", "netns", "add", self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        sh("ip", "netns", "delete", self.name, check=False)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.name, *cmd, check=check)

    def timed(self, *cmd: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        t0 = time.perf_counter()
        proc = self.run(*cmd)
        return time.perf_counter() - t0, proc


def kernel_available() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("nft") or not shutil.which("ip"):
        return "nft or ip missing"
    return None


def backend_flags(backend: str) -> list[str]:
    """svcrules flags for a bench backend name."""
    if backend == "nftables":
        return []
    variant = backend.split("-", 1)[1] if "-" in backend else "auto"
    return ["--backend", "iptables", "--iptables", variant]


def iptables_variant(backend: str) -> str:
    """nft or legacy, for iptables-* tools ('iptables' means the system's default)."""
    if "-" in backend:
        return backend.split("-", 1)[1]
    out = sh("iptables", "--version", check=False).stdout
    return "nft" if "nf_tables" in out else "legacy"


def load_compiled(ns: Netns, backend: str, compiled: Path) -> float:
    """Time to load a compiled text into an empty namespace, as the tools do it."""
    if backend == "nftables":
        t, _ = ns.timed("nft", "-f", str(compiled))
        return t
    from svcrules.render.iptables.layout import family_section

    text = compiled.read_text()
    variant = iptables_variant(backend)
    total = 0.0
    for family, tool in (("ipv4", "iptables"), ("ipv6", "ip6tables")):
        part = compiled.with_suffix(f".{family}")
        part.write_text(family_section(text, family))
        t, _ = ns.timed(f"{tool}-{variant}-restore", "--noflush", str(part))
        total += t
    return total


def compile_row(cluster: Path, out: Path, backend: str) -> Row:
    kind = "nftables" if backend == "nftables" else "iptables"
    proc = sh(PY, str(HERE / "measure_compile.py"), str(cluster), str(out), kind)
    return dict(json.loads(proc.stdout))


def sync(ns: Netns, inputs: Path, state: Path, backend: str) -> Row:
    """One `svcrules sync` as an operator runs it: wall time, and the kernel part."""
    wall, proc = ns.timed(
        PY,
        "-m",
        "svcrules",
        "sync",
        str(inputs),
        "--state-dir",
        str(state),
        "--log-format",
        "json",
        "-v",
        *backend_flags(backend),
    )
    event = json.loads(proc.stderr.strip().splitlines()[-1])
    return {
        "wall_s": round(wall, 3),
        "kernel_s": event["kernel_seconds"],
        "operations": event["operations"],
        "mode": event["mode"],
    }


def nft_check(ns: Netns, inputs: Path, state: Path) -> float:
    """What nft alone spends on the transaction svcrules would send for ``inputs`` (read
    with `svcrules diff --output nft`): `nft --check -f`, which fills nft's cache and
    evaluates the commands but commits nothing. svcrules sends element-only
    transactions without nft; this row shows what that avoids (nft 1.0.6 reads every
    chain of every table first for element commands)."""
    proc = ns.run(
        PY, "-m", "svcrules", "diff", str(inputs), "--state-dir", str(state),
        "--output", "nft", check=False,
    )  # fmt: skip
    script = state.parent / f"{state.name}-one-endpoint.nft"
    script.write_text(proc.stdout)
    t, _ = ns.timed("nft", "--check", "-f", str(script))
    return round(t, 4)


def apply_rows(
    n: int, endpoints: int, objs: list[dict[str, Any]], work: Path, compiled: Path, backend: str
) -> Row:
    node = generate.node_config()
    variants = {
        "base": [node, *objs],
        "one_endpoint": [node, *generate.with_changed_endpoint(objs)],
        "one_service": [node, *generate.with_added_service(objs, endpoints)],
        "one_percent": [node, *generate.with_percent_changed(objs, 1.0)],
    }
    files = {}
    for name, items in variants.items():
        files[name] = work / f"{name}-{n}.json"
        generate.write(files[name], items)
    row: Row = {}
    with Netns(f"k{n}") as ns:
        row["kernel_load_s"] = round(load_compiled(ns, backend, compiled), 3)
    with Netns(f"a{n}") as ns:
        state = work / f"state-{n}-{backend}"
        row["full_apply"] = sync(ns, files["base"], state, backend)
        row["noop_sync"] = sync(ns, files["base"], state, backend)
        for change in ("one_endpoint", "one_service", "one_percent"):
            if change == "one_endpoint" and backend == "nftables":
                row["one_endpoint_nft_check_s"] = nft_check(ns, files[change], state)
            row[change] = sync(ns, files[change], state, backend)
            sync(ns, files["base"], state, backend)  # back to base for the next change
    return row


def kube_proxy_row(n: int, objs: list[dict[str, Any]], work: Path) -> Row:
    text = kube_proxy_layout.render(objs)
    path = work / f"kube-proxy-{n}.nft"
    path.write_text(text)
    with Netns(f"p{n}") as ns:
        t, _ = ns.timed("nft", "-f", str(path))
    return {"kernel_load_s": round(t, 3), "bytes": len(text)}


def latency(n: int, endpoints: int, connections: int, backend: str) -> Row:
    """Connection setup to one ClusterIP, with n Services loaded (lab netns topology)."""
    from tests.kernel import backends
    from tests.kernel.lab import Lab

    objs = generate.cluster(n, endpoints)
    svc, sl = objs[0], objs[1]
    svc["spec"]["type"] = "ClusterIP"
    svc["spec"].pop("sessionAffinity", None)
    svc["spec"]["ports"] = svc["spec"]["ports"][:1]
    for p in svc["spec"]["ports"]:
        p.pop("nodePort", None)
    sl["endpoints"] = [
        {"addresses": [f"198.51.100.{10 + i}"], "conditions": {"ready": True}, "nodeName": "node-0"}
        for i in range(1, 5)
    ]
    sl["ports"] = sl["ports"][:1]
    import svcrules

    ruleset = svcrules.compile(
        _inputs([generate.node_config(), *objs]),
        svcrules.NodeConfig.model_validate(generate.node_config()),
    )
    lab_backend = backend if backend == "nftables" else f"iptables-{iptables_variant(backend)}"
    with Lab() as lab:
        backends.install(lab, ruleset, lab_backend)
        lab.probe("client", svc["spec"]["clusterIP"], 80, count=50)  # warm up
        results = lab.probe("client", svc["spec"]["clusterIP"], 80, count=connections, timeout=2.0)
    ok = sorted(r.elapsed for r in results if r.outcome == "ok")
    return {
        "connections": len(results),
        "failed": len(results) - len(ok),
        "p50_ms": round(statistics.median(ok) * 1000, 3),
        "p99_ms": round(ok[int(len(ok) * 0.99) - 1] * 1000, 3),
    }


def _inputs(objs: list[dict[str, Any]]) -> Any:
    from svcrules.inputs.load import load_sources
    from svcrules.inputs.read import Source

    return load_sources(
        [Source("<bench>", json.dumps({"kind": "List", "apiVersion": "v1", "items": objs}))]
    )


def machine() -> Row:
    nft = sh("nft", "--version", check=False).stdout.strip() if shutil.which("nft") else ""
    ipt = (
        sh("iptables", "--version", check=False).stdout.strip() if shutil.which("iptables") else ""
    )
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "nft": nft,
        "iptables": ipt,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


def table(results: Row) -> str:
    lines = [startup.table(results["startup"])] if "startup" in results else []
    for size in results["sizes"]:
        lines.append(f"== {size['services']:,} Services x {size['endpoints']} endpoints")
        for backend, b in size["backends"].items():
            c = b["compile"]
            lines.append(f"  -- {backend}")
            lines.append(
                f"  compile: load {c['load_s']}s + plan/render {c['compile_s']}s = "
                f"{c['total_s']}s, peak RSS {c['peak_rss_mb']} MB"
            )
            lines.append(
                f"  ruleset: {c['bytes']:,} bytes, {c['chains']:,} chains, "
                f"{c['rules']:,} rules, {c['sets']:,} sets/maps, "
                f"{c['elements']:,} elements"
            )
            k = b.get("kernel")
            if k:
                lines.append(f"  kernel load of the compiled text: {k['kernel_load_s']}s")
                for key in (
                    "full_apply",
                    "noop_sync",
                    "one_endpoint",
                    "one_service",
                    "one_percent",
                ):
                    r = k[key]
                    lines.append(
                        f"  {key:13} {r['mode']:11} {r['wall_s']:>8}s end to end, "
                        f"{r['kernel_s']:>7}s kernel, {r['operations']:>7,} operations"
                    )
                if "one_endpoint_nft_check_s" in k:
                    lines.append(
                        "  one_endpoint  the same transaction through nft --check -f: "
                        f"{k['one_endpoint_nft_check_s']}s (its cache of every chain)"
                    )
            lat = b.get("latency")
            if lat:
                base = results.get("latency_baseline", {}).get(backend)
                ratio = (
                    f", p50 ratio vs 10 Services {lat['p50_ms'] / base['p50_ms']:.2f}"
                    if base
                    else ""
                )
                lines.append(
                    f"  data path: p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms "
                    f"over {lat['connections']} connections ({lat['failed']} failed){ratio}"
                )
        kp = size.get("kube_proxy")
        if kp:
            lines.append(
                f"  kube-proxy-style nft layout, kernel load (nft -f): {kp['kernel_load_s']}s"
            )
    for backend, b in results.get("latency_baseline", {}).items():
        lines.append(
            f"== data path with 10 Services, {backend}: p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1k Services only (smoke test)")
    ap.add_argument("--sizes", default="1000,10000,50000", help="Service counts")
    ap.add_argument("--endpoints", type=int, default=10, help="endpoints per Service")
    ap.add_argument(
        "--kube-proxy-max",
        type=int,
        default=10000,
        help="largest size for the kube-proxy-style comparison (slow: 150 s at 10k)",
    )
    ap.add_argument("--connections", type=int, default=2000, help="connections per latency run")
    ap.add_argument(
        "--backends",
        default="nftables,iptables",
        help="comma-separated: nftables, iptables, iptables-nft, iptables-legacy",
    )
    ap.add_argument(
        "--iptables-max",
        type=int,
        default=10000,
        help="largest size for iptables backends (iptables-nft loads 10k in about 2 minutes)",
    )
    ap.add_argument("--no-kernel", action="store_true", help="compile measurements only")
    ap.add_argument(
        "--startup-runs", type=int, default=20, help="fresh processes per start-up measurement"
    )
    ap.add_argument("--output", default=str(HERE / "results.json"))
    args = ap.parse_args()
    sizes = [1000] if args.quick else [int(s) for s in args.sizes.split(",")]
    why_not = "disabled" if args.no_kernel else kernel_available()
    results: Row = {"machine": machine(), "sizes": [], "kernel_skipped": why_not}
    print("-- start-up", file=sys.stderr, flush=True)
    results["startup"] = startup.startup(args.startup_runs)
    with tempfile.TemporaryDirectory(prefix="svcrules-bench-") as tmp:
        work = Path(tmp)
        chosen = [b.strip() for b in args.backends.split(",") if b.strip()]
        if why_not is None:
            results["latency_baseline"] = {
                b: latency(10, args.endpoints, args.connections, b) for b in chosen
            }
        for n in sizes:
            objs = generate.cluster(n, args.endpoints)
            cluster = work / f"cluster-{n}.json"
            generate.write(cluster, [generate.node_config(), *objs])
            size: Row = {"services": n, "endpoints": args.endpoints, "backends": {}}
            for backend in chosen:
                if backend != "nftables" and n > args.iptables_max:
                    continue
                if backend != "nftables" and not shutil.which(
                    f"iptables-{iptables_variant(backend)}-restore"
                ):
                    sys.exit(f"{backend}: iptables tools missing (apt-get install iptables)")
                print(f"-- {n} Services, {backend}", file=sys.stderr, flush=True)
                compiled = work / f"compiled-{n}-{backend}.txt"
                b: Row = {"compile": compile_row(cluster, compiled, backend)}
                if why_not is None:
                    b["kernel"] = apply_rows(n, args.endpoints, objs, work, compiled, backend)
                    b["latency"] = latency(n, args.endpoints, args.connections, backend)
                size["backends"][backend] = b
            if why_not is None and n <= args.kube_proxy_max and "nftables" in chosen:
                size["kube_proxy"] = kube_proxy_row(n, objs, work)
            results["sizes"].append(size)
            Path(args.output).write_text(json.dumps(results, indent=2) + "\n")  # so far
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    if why_not:
        print(f"kernel measurements skipped: {why_not}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
