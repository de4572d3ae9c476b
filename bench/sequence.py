"""Cron runs in sequence: one full apply, then consecutive `svcrules sync` runs on one state
directory, each with the next input of a seeded schedule of realistic changes.

    python bench/sequence.py --sizes 1000,10000 --backends nftables       # 30 runs each
    python bench/sequence.py --sizes 1000 --runs 8 --output /tmp/seq.json
    python bench/run.py --sequence ...                                    # as part of the bench

The schedule is made of blocks (eight runs at 10 endpoints per Service), each a seeded
shuffle of:

- endpoint (x2): one pod of a Service recreated: its address leaves the EndpointSlice and a
  new one is appended;
- rollout (4 runs): every pod of one Service (a Deployment's rollout) replaced in steps of
  25 %: each run removes the next quarter of the old addresses and appends as many new
  ones, keeping the order of those that stay, as the EndpointSlice controller does;
- service_added: a new ClusterIP Service with its EndpointSlice;
- service_removed: a Service and its EndpointSlices deleted.

Endpoint changes and rollouts pick Services without internalTrafficPolicy: Local, so that
every input changes the rules.

Every run is a new `svcrules sync` process as cron starts it (bench/run.py's sync(), inside a
network namespace this script creates and deletes). Reported per size and backend: p50, p95
and max end-to-end wall time; p50/p95 CPU time of the sync process (user + system, which
other load on a shared machine moves much less than the wall time); p50/p95 kernel time;
operations p50/max; the modes seen (every run after the full apply should be
"incremental"); and p50 / full compile (wall, and CPU time / CPU time), where the full
compile is bench/measure_compile.py on the starting cluster, in the same run. p50 is the
median; p95 and max are nearest-rank. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import random
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import generate  # noqa: E402
import run  # noqa: E402

Obj = dict[str, Any]
Row = dict[str, Any]

ROLLOUT_FRACTION = 0.25
# A block of the schedule: "rollout" stands for all of its steps.
BLOCK = ("endpoint", "endpoint", "rollout", "service_added", "service_removed")
# New pod addresses and ClusterIPs come from ranges the generated cluster does not use:
# its pods take the first services x endpoints addresses of POD_NET, and
# generate.with_changed_endpoint moves addresses up by 2**22.
_FRESH_PODS = int(generate.POD_NET.network_address) + 3 * (1 << 21)


class Step(NamedTuple):
    """One run's input: what changed, and the whole object list after the change."""

    change: str  # endpoint, rollout, service_added, service_removed
    label: str  # e.g. "rollout ns-3/svc-17 2/4"
    objs: list[Obj]


def schedule(objs: list[Obj], runs: int, seed: int = 1) -> Iterator[Step]:
    """`runs` consecutive inputs starting from `objs` (Services and EndpointSlices of
    generate.cluster); deterministic for a seed. A rollout cut off by `runs` stays half done."""
    rnd = random.Random(seed)
    names = generate.service_names(objs)
    services = len(names)
    per_service = max(1, len(generate.endpoint_addresses(objs, *names[0])))
    pods = iter(range(_FRESH_PODS, int(generate.POD_NET.broadcast_address)))
    added = 0

    def fresh(count: int) -> list[Obj]:
        return [
            generate.endpoint(str(ipaddress.ip_address(next(pods))), rnd.choice(generate.NODES))
            for _ in range(count)
        ]

    def pick(current: list[Obj]) -> tuple[str, str, list[str]]:
        """A Service whose endpoints all count on this node, and their addresses. Not one
        with internalTrafficPolicy: Local: on a node without its endpoints, replacing them
        changes no rule, and the run would be a no-op rather than the change it stands for."""
        names = [
            (o["metadata"]["namespace"], o["metadata"]["name"])
            for o in current
            if o["kind"] == "Service" and o["spec"].get("internalTrafficPolicy") != "Local"
        ]
        for _ in range(100):
            ns, name = rnd.choice(names)
            addresses = generate.endpoint_addresses(current, ns, name)
            if addresses:
                return ns, name, addresses
        raise ValueError("no Service with endpoints to change")

    done = 0
    while True:
        block = list(BLOCK)
        rnd.shuffle(block)
        for unit in block:
            if unit == "endpoint":
                ns, name, addresses = pick(objs)
                gone = rnd.choice(addresses)
                objs = generate.with_endpoints_replaced(objs, ns, name, [gone], fresh(1))
                steps = [Step(unit, f"endpoint {ns}/{name}", objs)]
            elif unit == "rollout":
                ns, name, addresses = pick(objs)
                size = max(1, math.ceil(len(addresses) * ROLLOUT_FRACTION))
                parts = [addresses[i : i + size] for i in range(0, len(addresses), size)]
                steps = []
                for k, old in enumerate(parts, 1):
                    objs = generate.with_endpoints_replaced(objs, ns, name, old, fresh(len(old)))
                    steps.append(Step(unit, f"rollout {ns}/{name} {k}/{len(parts)}", objs))
            elif unit == "service_added":
                ns, name = f"ns-{rnd.randrange(200)}", f"svc-new-{added}"
                ip = str(generate.SERVICE_NET.network_address + 1 + services + added)
                objs = generate.with_service(objs, ns, name, ip, fresh(per_service))
                added += 1
                steps = [Step(unit, f"service added {ns}/{name}", objs)]
            else:
                ns, name = rnd.choice(generate.service_names(objs))
                objs = generate.without_service(objs, ns, name)
                steps = [Step(unit, f"service removed {ns}/{name}", objs)]
            for step in steps:
                yield step
                done += 1
                if done == runs:
                    return


def nearest_rank(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (q=0.95: the value 95 % of runs do not exceed)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(rows: list[Row], compile_s: float, compile_cpu_s: float) -> Row:
    wall = [r["wall_s"] for r in rows]
    kernel = [r["kernel_s"] for r in rows]
    ops = [r["operations"] for r in rows]
    p50 = statistics.median(wall)
    cpu_p50 = statistics.median(r["cpu_s"] for r in rows)
    by_change: Row = {}
    for change in dict.fromkeys(r["change"] for r in rows):
        mine = [r for r in rows if r["change"] == change]
        by_change[change] = {
            "runs": len(mine),
            "wall_p50_s": round(statistics.median(r["wall_s"] for r in mine), 3),
            "operations_p50": statistics.median(r["operations"] for r in mine),
        }
    return {
        "runs": len(rows),
        "wall_p50_s": round(p50, 3),
        "wall_p95_s": nearest_rank(wall, 0.95),
        "wall_max_s": max(wall),
        "cpu_p50_s": round(cpu_p50, 3),
        "cpu_p95_s": nearest_rank([r["cpu_s"] for r in rows], 0.95),
        "kernel_p50_s": round(statistics.median(kernel), 4),
        "kernel_p95_s": nearest_rank(kernel, 0.95),
        "operations_p50": statistics.median(ops),
        "operations_max": max(ops),
        "modes": dict(Counter(r["mode"] for r in rows)),
        "full_compile_s": compile_s,
        "p50_vs_compile": round(p50 / compile_s, 2) if compile_s else None,
        "full_compile_cpu_s": compile_cpu_s,
        "cpu_p50_vs_compile_cpu": round(cpu_p50 / compile_cpu_s, 2) if compile_cpu_s else None,
        "by_change": by_change,
    }


def measure(
    objs: list[Obj],
    backend: str,
    runs: int,
    work: Path,
    seed: int = 1,
    compile_s: float | None = None,
    compile_cpu_s: float | None = None,
) -> Row:
    """The sequence for one cluster and backend. compile_s (wall) and compile_cpu_s are the
    full compile of `objs` measured in the same run; without them, it is measured here
    (bench/measure_compile.py)."""
    n = len(generate.service_names(objs))
    node = generate.node_config()
    if compile_s is None or compile_cpu_s is None:
        cluster = work / f"seq-cluster-{n}.json"
        generate.write(cluster, [node, *objs])
        out = work / f"seq-compiled-{n}-{backend}.txt"
        row = run.compile_row(cluster, out, backend)
        compile_s, compile_cpu_s = float(row["total_s"]), float(row["cpu_s"])
        out.unlink()
    inputs = work / f"seq-input-{n}-{backend}.json"  # one file, rewritten: as cron's kubectl does
    state = work / f"seq-state-{n}-{backend}"
    rows: list[Row] = []
    with run.Netns(f"s{n}") as ns:
        generate.write(inputs, [node, *objs])
        full = run.sync(ns, inputs, state, backend)
        for i, step in enumerate(schedule(objs, runs, seed), 1):
            generate.write(inputs, [node, *step.objs])
            row = run.sync(ns, inputs, state, backend)
            rows.append({"run": i, "change": step.change, "label": step.label, **row})
            print(
                f"   {i:3} {step.label:32} {row['mode']:11} {row['wall_s']:>7}s "
                f"(CPU {row['cpu_s']:>6}s) {row['operations']:>6} ops",
                file=sys.stderr,
                flush=True,
            )
    return {
        "full_apply": full,
        "summary": summarize(rows, compile_s, compile_cpu_s),
        "runs": rows,
    }


def table(seq: Row) -> str:
    lines = []
    for size in seq["sizes"]:
        for backend, b in size["backends"].items():
            s = b["summary"]
            changes = ", ".join(f"{k} {v['runs']}" for k, v in s["by_change"].items())
            modes = ", ".join(f"{k} {v}" for k, v in s["modes"].items())
            full = b["full_apply"]
            ratio = f" = {s['p50_vs_compile']} x" if s["p50_vs_compile"] is not None else ""
            lines += [
                f"== sequence, {size['services']:,} Services x {size['endpoints']}, {backend}: "
                f"{s['runs']} runs ({changes}) after a full apply of {full['wall_s']}s",
                f"  end to end: p50 {s['wall_p50_s']}s{ratio} full compile "
                f"({s['full_compile_s']}s), p95 {s['wall_p95_s']}s, max {s['wall_max_s']}s",
                f"  CPU time of the process: p50 {s['cpu_p50_s']}s = "
                f"{s['cpu_p50_vs_compile_cpu']} x the full compile's ({s['full_compile_cpu_s']}s), "
                f"p95 {s['cpu_p95_s']}s",
                f"  kernel: p50 {s['kernel_p50_s']}s, p95 {s['kernel_p95_s']}s; operations: "
                f"p50 {s['operations_p50']:g}, max {s['operations_max']:,}; modes: {modes}",
                "  p50 per change: "
                + ", ".join(
                    f"{k} {v['wall_p50_s']}s / {v['operations_p50']:g} ops"
                    for k, v in s["by_change"].items()
                ),
            ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,50000", help="Service counts")
    ap.add_argument("--endpoints", type=int, default=10, help="endpoints per Service (>= 1)")
    ap.add_argument("--runs", type=int, default=30, help="sync runs after the full apply")
    ap.add_argument("--seed", type=int, default=1, help="seed of the schedule")
    ap.add_argument(
        "--backends",
        default="nftables",
        help="comma-separated: nftables, iptables, iptables-nft, iptables-legacy",
    )
    ap.add_argument(
        "--iptables-max", type=int, default=10000, help="largest size for iptables backends"
    )
    ap.add_argument("--output", default=str(HERE / "results-sequence.json"))
    args = ap.parse_args()
    if args.endpoints < 1 or args.runs < 1:
        ap.error("--endpoints and --runs must be at least 1")
    why_not = run.kernel_available()
    if why_not:
        sys.exit(f"the sequence needs the kernel: {why_not}")
    seq: Row = {"runs": args.runs, "seed": args.seed, "sizes": []}
    results: Row = {"machine": run.machine(), "sequence": seq}
    chosen = [b.strip() for b in args.backends.split(",") if b.strip()]
    with tempfile.TemporaryDirectory(prefix="svcrules-seq-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            objs = generate.cluster(n, args.endpoints)
            size: Row = {"services": n, "endpoints": args.endpoints, "backends": {}}
            seq["sizes"].append(size)
            for backend in chosen:
                if backend != "nftables" and n > args.iptables_max:
                    continue
                print(f"-- sequence, {n} Services, {backend}", file=sys.stderr, flush=True)
                size["backends"][backend] = measure(objs, backend, args.runs, Path(tmp), args.seed)
                Path(args.output).write_text(json.dumps(results, indent=2) + "\n")  # so far
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(table(seq))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
