"""svcrules benchmark: compile, full and incremental apply, and the data path, per backend.

    python bench/run.py            # 1k, 10k and 50k Services x 10 endpoints
    python bench/run.py --quick    # 1k only (CI runs this as a smoke test)
    python bench/run.py --backends nftables,iptables-legacy --sizes 1000,10000
    python bench/run.py --sequence # also 30 cron runs in sequence per size (bench/sequence.py)

Backends: nftables, iptables (whichever variant 'iptables' is here), iptables-nft,
iptables-legacy. The iptables ones stop at --iptables-max Services (default 10k).

Also the process start: `svcrules --help` against `python -c pass` and Typer's own
floor (bench/startup.py, median of --startup-runs fresh processes).

Ratios (per size and backend, from measurements of the same run): one changed endpoint,
1 % of Services changed and a no-op sync, end to end, each divided by the full compile
(bench/measure_compile.py in a fresh process); with --sequence also its p50. The
one-endpoint and sequence ratios are also given in CPU time (of the sync process, of the
compile), which other load on a shared machine moves less than wall time.

Prints a table and writes bench/results.json. Kernel measurements need root and
nft; they run in network namespaces this script creates and deletes, never in the
host's. Nothing here asserts a time: the numbers go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
    """One `svcrules sync` as an operator runs it: wall time, the kernel part, and the CPU
    time of the process (user + system; unlike the wall time, barely moved by other load on
    the machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
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
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    event = json.loads(proc.stderr.strip().splitlines()[-1])
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "kernel_s": event["kernel_seconds"],
        "operations": event["operations"],
        "mode": event["mode"],
    }


def nft_check(ns: Netns, inputs: Path, state: Path) -> float:
    """What nft alone spends on the transaction svcrules would send for ``inputs`` (read
    with `svcrules diff -o nft`): `nft --check -f`, which fills nft's cache and
    evaluates the commands but commits nothing. svcrules sends element-only
    transactions without nft; this row shows what that avoids (nft 1.0.6 reads every
    chain of every table first for element commands)."""
    proc = ns.run(
        PY, "-m", "svcrules", "diff", str(inputs), "--state-dir", str(state),
        "-o", "nft", check=False,
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


def ratios(b: Row) -> Row:
    """The end-to-end runs as multiples of the full compile of the same run."""
    c, k = b["compile"], b["kernel"]
    full = c["total_s"]

    def per(key: str) -> float | None:
        return round(k[key]["wall_s"] / full, 2) if full else None

    return {
        "full_compile_s": full,
        "one_endpoint_vs_compile": per("one_endpoint"),
        "one_percent_vs_compile": per("one_percent"),
        "noop_vs_compile": per("noop_sync"),
        "one_endpoint_kernel_s": k["one_endpoint"]["kernel_s"],
        "one_endpoint_operations": k["one_endpoint"]["operations"],
        "compile_peak_rss_mb": c["peak_rss_mb"],
        # The same, in CPU time of the processes: on a shared machine, less noisy.
        "one_endpoint_cpu_vs_compile_cpu": (
            round(k["one_endpoint"]["cpu_s"] / c["cpu_s"], 2) if c["cpu_s"] else None
        ),
    }


RATIO_ROWS: tuple[tuple[str, Callable[[Row], str]], ...] = (
    ("full compile (s)", lambda r: f"{r['full_compile_s']}"),
    (
        "one changed endpoint, end to end / full compile",
        lambda r: f"{r['one_endpoint_vs_compile']}",
    ),
    (
        "1 % of Services changed, end to end / full compile",
        lambda r: f"{r['one_percent_vs_compile']}",
    ),
    ("no-op sync, end to end / full compile", lambda r: f"{r['noop_vs_compile']}"),
    (
        "one changed endpoint, kernel (s, operations)",
        lambda r: f"{r['one_endpoint_kernel_s']}s, {r['one_endpoint_operations']}",
    ),
    (
        "one changed endpoint, CPU time / CPU time of full compile",
        lambda r: f"{r['one_endpoint_cpu_vs_compile_cpu']}",
    ),
    ("compile peak RSS (MB)", lambda r: f"{r['compile_peak_rss_mb']:,}"),
    (
        "sequence p50, end to end / full compile",
        lambda r: f"{r.get('sequence_p50_vs_compile', '')}",
    ),
    (
        "sequence p50, CPU time / CPU time of full compile",
        lambda r: f"{r.get('sequence_cpu_p50_vs_compile_cpu', '')}",
    ),
)


def ratio_table(results: Row) -> list[str]:
    lines = []
    backends = dict.fromkeys(b for size in results["sizes"] for b in size["backends"])
    for backend in backends:
        cols = [
            (size["services"], size["backends"][backend]["ratios"])
            for size in results["sizes"]
            if "ratios" in size["backends"].get(backend, {})
        ]
        if not cols:
            continue
        lines.append(f"== ratios to the full compile of this run, {backend}")
        lines.append(f"  {'':58}" + "".join(f"{n:>16,}" for n, _ in cols))
        for label, cell in RATIO_ROWS:
            values = [cell(r) for _, r in cols]
            if any(values):
                lines.append(f"  {label:58}" + "".join(f"{v:>16}" for v in values))
    if "startup" in results:
        lines.append(
            f"== process start (svcrules --help): {results['startup']['svcrules_help_s']}s"
        )
    return lines


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
    cluster_ip = generate.lab_service(objs)
    import svcrules

    ruleset = svcrules.compile(
        _inputs([generate.node_config(), *objs]),
        svcrules.NodeConfig.model_validate(generate.node_config()),
    )
    lab_backend = backend if backend == "nftables" else f"iptables-{iptables_variant(backend)}"
    with Lab() as lab:
        backends.install(lab, ruleset, lab_backend)
        lab.probe("client", cluster_ip, 80, count=50)  # warm up
        results = lab.probe("client", cluster_ip, 80, count=connections, timeout=2.0)
    return latency_row(results)


def latency_row(results: list[Any]) -> Row:
    """p50 (median) and p99 (nearest rank) of the connections that succeeded (lab Results)."""
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
    if "sequence" in results:
        import sequence

        lines.append(sequence.table(results["sequence"]))
    lines += ratio_table(results)
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
    ap.add_argument(
        "--sequence",
        action="store_true",
        help="also cron runs in sequence per size and backend (bench/sequence.py; needs root)",
    )
    ap.add_argument("--sequence-runs", type=int, default=30, help="sync runs in the sequence")
    ap.add_argument("--sequence-seed", type=int, default=1, help="seed of the sequence's schedule")
    ap.add_argument("--output", default=str(HERE / "results.json"))
    args = ap.parse_args()
    sizes = [1000] if args.quick else [int(s) for s in args.sizes.split(",")]
    why_not = "disabled" if args.no_kernel else kernel_available()
    results: Row = {"machine": machine(), "sizes": [], "kernel_skipped": why_not}
    if args.sequence and why_not is None:
        import sequence

        seq: Row = {"runs": args.sequence_runs, "seed": args.sequence_seed, "sizes": []}
        results["sequence"] = seq
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
            seq_size: Row = {"services": n, "endpoints": args.endpoints, "backends": {}}
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
                    b["ratios"] = ratios(b)
                    if "sequence" in results:
                        print(f"-- sequence, {n} Services, {backend}", file=sys.stderr, flush=True)
                        s = sequence.measure(
                            objs,
                            backend,
                            args.sequence_runs,
                            work,
                            args.sequence_seed,
                            compile_s=b["compile"]["total_s"],
                            compile_cpu_s=b["compile"]["cpu_s"],
                        )
                        seq_size["backends"][backend] = s
                        b["ratios"]["sequence_p50_vs_compile"] = s["summary"]["p50_vs_compile"]
                        b["ratios"]["sequence_cpu_p50_vs_compile_cpu"] = s["summary"][
                            "cpu_p50_vs_compile_cpu"
                        ]
                    b["latency"] = latency(n, args.endpoints, args.connections, backend)
                size["backends"][backend] = b
            if why_not is None and n <= args.kube_proxy_max and "nftables" in chosen:
                size["kube_proxy"] = kube_proxy_row(n, objs, work)
            results["sizes"].append(size)
            if "sequence" in results:
                results["sequence"]["sizes"].append(seq_size)
            Path(args.output).write_text(json.dumps(results, indent=2) + "\n")  # so far
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    if why_not:
        print(f"kernel measurements skipped: {why_not}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
