"""Load balancing: Maglev against random selection, and endpoint weights (issue 16).

    python bench/balancing.py                       # 10,000 Services x 10 endpoints (root)
    python bench/balancing.py --services 1000 --rounds 4
    python bench/balancing.py --quick               # 100 Services: a smoke test (CI)

The same synthetic cluster (bench/generate.py, seed 1) is compiled twice: with the default
NodeConfig (random selection) and with `spec.loadBalancing: maglev`, which makes every
Service pick its endpoint with Maglev, and `spec.maglev.tableSize: --table-size` (251 by
default, the smallest table; 0 leaves svcrules' default, at least 4,093 slots, with which
the 10k ruleset would hold 44 million map elements, more than nft can load in the bench
machine's memory: docs/performance.md).

Everything is measured in the same run, the two variants alternated, so that their ratio
means something on a machine whose speed varies from day to day:

- compile: bench/measure_compile.py in a fresh process, random and Maglev alternated
  (--compile-runs each; the order of each pair alternates); medians, and the ratio of
  the medians (wall and CPU time);
- kernel load: `nft -f` of each compiled text into an empty network namespace, alternated
  (--load-runs each), with the peak memory of nft; map elements from the compiled text;
- data path: connection setup from the lab's outside client to a ClusterIP whose endpoints
  are the lab's four pods (tests/kernel/lab.py, as bench/run.py's latency()). Two labs run
  side by side and the probes alternate between them in --rounds rounds (the order of the
  targets rotating each round). First both labs hold the same 10-Service random ruleset:
  their ratio (lab B / lab A) is what the two labs differ by themselves. Then, at 10
  Services and at the full size, a crossover: random in lab A and Maglev in lab B for half
  of the rounds, the other way round for the other half, so that what the labs differ by
  cancels out of the pooled figures (each half's ratio is reported too). A second Service
  of each ruleset has its four pods in two EndpointSlices weighted 90 and 10
  (`svcrules.io/weight`): weighted against unweighted, in the same lab.

Reported per Service probed: p50 (median) and p99 (nearest rank), how the connections
spread over the four pods, and the ratios. Prints a table and writes
bench/results-balancing.json. Kernel measurements need root and nft; they run in network
namespaces this script creates and deletes. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import generate  # noqa: E402
import run  # noqa: E402

Obj = dict[str, Any]
Row = dict[str, Any]

MODES = ("random", "maglev")
WEIGHTS = (90, 10)
LOAD_TIMEOUT = 1800.0  # nft -f of a large Maglev ruleset


def node_config(mode: str, table_size: int) -> Obj:
    """The bench's NodeConfig, for random selection or Maglev everywhere."""
    node = generate.node_config()
    if mode == "maglev":
        node["spec"]["loadBalancing"] = "maglev"
        if table_size:
            node["spec"]["maglev"] = {"tableSize": table_size}
    return node


def cluster(services: int, endpoints: int) -> tuple[list[Obj], str, str]:
    """The generated cluster with two Services the lab answers: Service 0 unweighted,
    Service 1 with its pods in two EndpointSlices weighted 90 and 10. Returns the objects
    and both ClusterIPs."""
    if services < 2:
        raise SystemExit("--services must be at least 2")
    objs = generate.cluster(services, endpoints)
    plain = generate.lab_service(objs, 0)
    weighted = generate.lab_service(objs, 1, WEIGHTS)
    return objs, plain, weighted


def picks(text: str) -> Row:
    """How the compiled nftables text picks endpoints: rules with a Maglev hash, rules
    with a random number, and Maglev maps (by name)."""
    return {
        "jhash_rules": text.count(" jhash "),
        "numgen_random_rules": text.count(" numgen random mod ")
        - text.count("typeof numgen random mod "),
        "maglev_maps": text.count("\tmap maglev-"),
    }


def compile_rows(files: dict[str, Path], work: Path, runs: int) -> Row:
    """measure_compile.py in fresh processes, the modes alternated (the order of each
    pair alternating too); medians per mode and ratios maglev / random."""
    samples: dict[str, list[Row]] = {m: [] for m in MODES}
    for i in range(runs):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            print(f"-- compile {mode} ({i + 1}/{runs})", file=sys.stderr, flush=True)
            out = work / f"compiled-{mode}.nft"
            samples[mode].append(run.compile_row(files[mode], out, "nftables"))
    rows: Row = {}
    for mode, rs in samples.items():
        rows[mode] = {
            **rs[-1],
            "total_s": round(statistics.median(r["total_s"] for r in rs), 3),
            "cpu_s": round(statistics.median(r["cpu_s"] for r in rs), 3),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "runs_total_s": [r["total_s"] for r in rs],
        }
        rows[mode].update(picks((work / f"compiled-{mode}.nft").read_text()))
    rows["ratio_total"] = _ratio(rows["maglev"]["total_s"], rows["random"]["total_s"])
    rows["ratio_cpu"] = _ratio(rows["maglev"]["cpu_s"], rows["random"]["cpu_s"])
    rows["ratio_elements"] = _ratio(rows["maglev"]["elements"], rows["random"]["elements"])
    return rows


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def timed_nft(ns: run.Netns, path: Path) -> tuple[float, int]:
    """Wall time and peak RSS (MB) of `nft -f path` in a namespace (ip netns exec execs
    nft in its own process, so wait4's usage is nft's)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, "nft", "-f", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode:
        raise SystemExit(f"nft -f {path} failed (rc={proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss // 1024


def load_rows(work: Path, runs: int) -> Row:
    """`nft -f` of each compiled text into an empty namespace, alternated."""
    samples: dict[str, list[tuple[float, int]]] = {m: [] for m in MODES}
    for i in range(runs):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            print(f"-- kernel load {mode} ({i + 1}/{runs})", file=sys.stderr, flush=True)
            with run.Netns(f"l{mode[0]}{i}") as ns:
                samples[mode].append(timed_nft(ns, work / f"compiled-{mode}.nft"))
    rows: Row = {
        mode: {
            "load_s": round(statistics.median(s[0] for s in ss), 3),
            "runs_load_s": [round(s[0], 3) for s in ss],
            "nft_peak_rss_mb": max(s[1] for s in ss),
        }
        for mode, ss in samples.items()
    }
    rows["ratio_load"] = _ratio(rows["maglev"]["load_s"], rows["random"]["load_s"])
    return rows


def install(lab: Any, text: str) -> float:
    """Replace the node's ruleset with ``text`` (nft -f, one transaction); seconds."""
    lab.reset()
    t0 = time.perf_counter()
    lab.exec("node", "nft", "-f", "-", input=text, timeout=LOAD_TIMEOUT)
    return time.perf_counter() - t0


def probe_rounds(
    targets: dict[str, tuple[Any, str]], connections: int, rounds: range
) -> dict[str, list[tuple[int, Any]]]:
    """``connections`` new TCP connections to each target (name: (lab, ClusterIP)), split
    over ``rounds``; each round visits every target once, the order rotating by one from
    round to round. After a warm-up of 50 connections each. Returns (round, Result) pairs."""
    names = list(targets)
    for lab, ip in targets.values():
        lab.probe("client", ip, 80, count=50)
    results: dict[str, list[tuple[int, Any]]] = {name: [] for name in names}
    for k, r in enumerate(rounds):
        count = connections // len(rounds) + (k < connections % len(rounds))
        for name in names[r % len(names) :] + names[: r % len(names)]:
            lab, ip = targets[name]
            batch = lab.probe("client", ip, 80, count=count, timeout=2.0)
            results[name] += [(r, res) for res in batch]
    return results


def latency_rows(results: dict[str, list[tuple[int, Any]]]) -> Row:
    """p50/p99 and the spread over the pods of each target, and the p50 of each round."""
    out: Row = {}
    for name, pairs in results.items():
        rs = [res for _, res in pairs]
        row = run.latency_row(rs)
        counts = Counter(str(r.backend) for r in rs if r.outcome == "ok")
        row["pods"] = dict(sorted(counts.items()))
        row["p50_ms_by_pod"] = {
            pod: round(statistics.median(r.elapsed for r in rs if str(r.backend) == pod) * 1000, 3)
            for pod in row["pods"]
        }
        row["p50_ms_per_round"] = [
            round(statistics.median(ok) * 1000, 3)
            for k in sorted({i for i, _ in pairs})
            if (ok := [r.elapsed for i, r in pairs if i == k and r.outcome == "ok"])
        ]
        out[name] = row
    return out


def pair(rows: Row, a: str, b: str) -> Row:
    """Ratios b / a of p50 and p99, pooled and per round (min, max)."""
    ra, rb = rows[a], rows[b]
    per_round = [
        round(y / x, 3)
        for x, y in zip(ra["p50_ms_per_round"], rb["p50_ms_per_round"], strict=True)
        if x
    ]
    return {
        "p50": _ratio(rb["p50_ms"], ra["p50_ms"]),
        "p99": _ratio(rb["p99_ms"], ra["p99_ms"]),
        "p50_per_round_min": min(per_round, default=None),
        "p50_per_round_max": max(per_round, default=None),
    }


def p50_ratio(results: dict[str, list[tuple[int, Any]]], a: str, b: str) -> float | None:
    rows = latency_rows({a: results[a], b: results[b]})
    return _ratio(rows[b]["p50_ms"], rows[a]["p50_ms"])


def data_path(
    small: dict[str, str], full: dict[str, str], ips: tuple[str, str], args: argparse.Namespace
) -> Row:
    """The data-path measurement in two labs (see the module doc): a calibration (the same
    random ruleset in both labs), then at 10 Services and at the full size a crossover:
    random in lab A and Maglev in lab B for the first half of the rounds, the other way
    round for the second half, so that what the labs differ by falls out of the pooled
    figures. Each phase reports its own Maglev / random p50 ratio too."""
    from tests.kernel.lab import Lab

    plain, weighted = ips
    half = max(1, args.rounds // 2)
    out: Row = {}
    with Lab() as lab_a, Lab() as lab_b:
        labs = {"a": lab_a, "b": lab_b}
        print("-- data path, calibration (10 Services)", file=sys.stderr, flush=True)
        loads = [round(install(lab, small["random"]), 3) for lab in labs.values()]
        results = probe_rounds(
            {"lab_a": (lab_a, plain), "lab_b": (lab_b, plain)}, args.connections, range(half)
        )
        rows = latency_rows(results)
        out["calibration"] = {
            "services": 10,
            "phases": [{"lab_a": "random", "lab_b": "random", "load_s": loads}],
            "targets": rows,
            "ratios": {"lab_b/lab_a": pair(rows, "lab_a", "lab_b")},
        }
        for stage, texts, n in (("small", small, 10), ("full", full, args.services)):
            merged: dict[str, list[tuple[int, Any]]] = {}
            phases = []
            for phase, held in enumerate((MODES, MODES[::-1])):
                where = f"lab A {held[0]}, lab B {held[1]}"
                print(f"-- data path, {n:,} Services, {where}", file=sys.stderr, flush=True)
                loads = [
                    round(install(lab, texts[m]), 3)
                    for lab, m in zip(labs.values(), held, strict=True)
                ]
                by_mode = dict(zip(held, labs.values(), strict=True))
                targets = {
                    **{m: (by_mode[m], plain) for m in MODES},
                    **{f"{m}_weighted": (by_mode[m], weighted) for m in MODES},
                }
                rounds = range(phase * half, (phase + 1) * half)
                results = probe_rounds(targets, args.connections // 2, rounds)
                phases.append(
                    {
                        "lab_a": held[0],
                        "lab_b": held[1],
                        "load_s": loads,
                        "maglev/random_p50": p50_ratio(results, "random", "maglev"),
                    }
                )
                for name, rs in results.items():
                    merged.setdefault(name, []).extend(rs)
            rows = latency_rows(merged)
            out[stage] = {
                "services": n,
                "phases": phases,
                "targets": rows,
                "ratios": {
                    "maglev/random": pair(rows, "random", "maglev"),
                    "random_weighted/random": pair(rows, "random", "random_weighted"),
                    "maglev_weighted/maglev": pair(rows, "maglev", "maglev_weighted"),
                },
            }
    return out


def check_maglev(table_size: int) -> str | None:
    """Why this svcrules cannot be benchmarked with Maglev, or None."""
    import svcrules

    objs = generate.cluster(2, 3)
    node = node_config("maglev", table_size)
    try:
        text = svcrules.compile(
            run._inputs([node, *objs]), svcrules.NodeConfig.model_validate(node)
        ).nft
    except Exception as exc:  # a NodeConfig without the fields, a bad table size
        return f"the Maglev NodeConfig is refused: {str(exc).strip()[:400]}"
    if picks(text)["jhash_rules"] == 0:
        return "spec.loadBalancing: maglev compiled to no jhash rule (no Maglev here?)"
    return None


def table(results: Row) -> str:
    size = f"{results['services']:,} Services x {results['endpoints']} endpoints"
    lines = [f"== {size}, Maglev spec.maglev.tableSize {results['table_size'] or 'default'}"]
    c = results["compile"]
    lines.append(f"  {'':44}{'random':>16}{'maglev':>16}{'maglev/random':>16}")

    def line(label: str, a: object, b: object, ratio: object = "") -> None:
        lines.append(f"  {label:44}{a!s:>16}{b!s:>16}{ratio!s:>16}")

    r, m = c["random"], c["maglev"]
    line("compile, median (s)", r["total_s"], m["total_s"], c["ratio_total"])
    line("compile CPU time, median (s)", r["cpu_s"], m["cpu_s"], c["ratio_cpu"])
    line("compile peak RSS (MB)", r["peak_rss_mb"], m["peak_rss_mb"])
    line("map and set elements", f"{r['elements']:,}", f"{m['elements']:,}", c["ratio_elements"])
    line("sets and maps", f"{r['sets']:,}", f"{m['sets']:,}")
    line("ruleset bytes", f"{r['bytes']:,}", f"{m['bytes']:,}")
    jhash = [f"{x['jhash_rules']} / {x['numgen_random_rules']}" for x in (r, m)]
    line("rules with jhash / numgen random", *jhash)
    k = results.get("kernel_load")
    if k:
        kr, km = k["random"], k["maglev"]
        line("kernel load, nft -f, median (s)", kr["load_s"], km["load_s"], k["ratio_load"])
        line("nft peak RSS (MB)", k["random"]["nft_peak_rss_mb"], k["maglev"]["nft_peak_rss_mb"])
    for stage, d in results.get("data_path", {}).items():
        lines.append(f"== data path, {stage}: {d['services']:,} Services")
        for ph in d["phases"]:
            ratio = (
                f", maglev/random p50 {ph['maglev/random_p50']}"
                if "maglev/random_p50" in ph
                else ""
            )
            lines.append(
                f"  lab A {ph['lab_a']}, lab B {ph['lab_b']}: loaded in "
                f"{ph['load_s'][0]}s, {ph['load_s'][1]}s{ratio}"
            )
        for name, t in d["targets"].items():
            pods = ", ".join(f"{v}" for v in t["pods"].values())
            lines.append(
                f"  {name:22} p50 {t['p50_ms']:>7} ms  p99 {t['p99_ms']:>7} ms  "
                f"{t['connections']} connections ({t['failed']} failed), pods {pods}"
            )
        for name, q in d["ratios"].items():
            lines.append(
                f"  {name:36} p50 {q['p50']} (rounds {q['p50_per_round_min']}-"
                f"{q['p50_per_round_max']}), p99 {q['p99']}"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 Services, a smoke test")
    ap.add_argument("--services", type=int, default=10000, help="Services in the cluster")
    ap.add_argument("--endpoints", type=int, default=10, help="endpoints per Service")
    ap.add_argument(
        "--table-size", type=int, default=251, help="spec.maglev.tableSize (0: svcrules' default)"
    )
    ap.add_argument("--connections", type=int, default=2000, help="connections per target")
    ap.add_argument("--rounds", type=int, default=10, help="rounds the connections are split in")
    ap.add_argument("--compile-runs", type=int, default=3, help="compiles per mode")
    ap.add_argument("--load-runs", type=int, default=2, help="kernel loads per mode")
    ap.add_argument("--no-kernel", action="store_true", help="compile measurements only")
    ap.add_argument("--output", default=str(HERE / "results-balancing.json"))
    args = ap.parse_args()
    if args.quick:
        args.services, args.connections, args.rounds = 100, 200, 2
        args.compile_runs = args.load_runs = 1
    why = check_maglev(args.table_size)
    if why:
        sys.exit(f"balancing: {why}")
    why_not = "disabled" if args.no_kernel else run.kernel_available()
    results: Row = {
        "machine": run.machine(),
        "services": args.services,
        "endpoints": args.endpoints,
        "table_size": args.table_size,
        "weights": list(WEIGHTS),
        "connections": args.connections,
        "rounds": args.rounds,
        "kernel_skipped": why_not,
    }
    with tempfile.TemporaryDirectory(prefix="svcrules-balancing-") as tmp:
        work = Path(tmp)
        objs, plain, weighted = cluster(args.services, args.endpoints)
        small_objs, _, _ = cluster(10, args.endpoints)
        files: dict[str, Path] = {}
        small: dict[str, str] = {}
        import svcrules

        for mode in MODES:
            node = node_config(mode, args.table_size)
            files[mode] = work / f"cluster-{mode}.json"
            generate.write(files[mode], [node, *objs])
            small[mode] = svcrules.compile(
                run._inputs([node, *small_objs]), svcrules.NodeConfig.model_validate(node)
            ).nft
        results["compile"] = compile_rows(files, work, args.compile_runs)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")  # so far
        if why_not is None:
            results["kernel_load"] = load_rows(work, args.load_runs)
            Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
            full = {m: (work / f"compiled-{m}.nft").read_text() for m in MODES}
            results["data_path"] = data_path(small, full, (plain, weighted), args)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    if why_not:
        print(f"kernel measurements skipped: {why_not}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
