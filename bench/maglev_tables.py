"""Maglev tables without a kernel: how many slots change hands when one of N endpoints
leaves, and what a table costs to compute, per table size.

    .venv/bin/python bench/maglev_tables.py [--endpoints 10] [--cases 40] [--output FILE]

Prints a table and writes JSON. The kernel test (tests/kernel/test_load_balancing.py)
measures the same on real flows for one case; this measures the spread over many.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from svcrules.inputs.model import MAGLEV_SIZES
from svcrules.plan.balancing import maglev_table


def measure(size: int, endpoints: int, cases: int) -> dict[str, float]:
    """Over ``cases`` seeds, remove the first and the middle endpoint of ``endpoints``."""
    moved: list[float] = []
    seconds: list[float] = []
    for seed in range(cases):
        names = [f"10.1.{seed}.{i},8080" for i in range(endpoints)]
        start = time.perf_counter()
        table = maglev_table(names, [100] * endpoints, size, seed)
        seconds.append(time.perf_counter() - start)
        for gone in (0, endpoints // 2):
            rest = names[:gone] + names[gone + 1 :]
            after = maglev_table(rest, [100] * len(rest), size, seed)
            changed = sum(names[a] != rest[b] for a, b in zip(table, after, strict=True))
            moved.append(changed / size)
    moved.sort()
    return {
        "size": size,
        "removals": len(moved),
        "moved_mean": round(statistics.mean(moved), 4),
        "moved_p90": round(moved[int(0.9 * len(moved))], 4),
        "moved_max": round(moved[-1], 4),
        "table_ms": round(statistics.median(seconds) * 1000, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--cases", type=int, default=40, help="seeds (two removals each)")
    ap.add_argument("--sizes", default="251,1021,4093,16381")
    ap.add_argument("--output", default="")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    assert all(s in MAGLEV_SIZES for s in sizes), f"sizes from {MAGLEV_SIZES}"
    rows = [measure(s, args.endpoints, args.cases) for s in sizes]
    print(f"removing 1 of {args.endpoints} endpoints; ideal: {1 / args.endpoints:.1%} moved")
    print("| slots | removals | moved, mean | p90 | max | one table (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']:,} | {r['removals']} | {r['moved_mean']:.1%} | {r['moved_p90']:.1%}"
            f" | {r['moved_max']:.1%} | {r['table_ms']} |"
        )
    if args.output:
        Path(args.output).write_text(
            json.dumps({"endpoints": args.endpoints, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
