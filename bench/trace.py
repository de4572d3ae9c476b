"""What `svcrules trace` and `check --packets` cost, against the compile they need.

python bench/trace.py [--sizes 1000,10000] [--packets 20] [--output FILE.json]

For each size, a synthetic cluster (bench/generate.py) is compiled once per backend;
then the rules text is parsed and one packet traced (what one `svcrules trace` adds to
the compile), and a further batch of packets is traced against the parsed text (what
each more case of `check --packets` adds). Ratios are to the compile of the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

from svcrules.compiler import compile_paths
from svcrules.trace import Packet
from svcrules.trace.backends import tracer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate


def _packets(objs: list[dict[str, object]], count: int) -> list[Packet]:
    """ClusterIP packets from outside, spread over the Services."""
    services = [o for o in objs if o["kind"] == "Service"]
    step = max(1, len(services) // count)
    out = []
    for svc in services[::step][:count]:
        spec = svc["spec"]
        assert isinstance(spec, dict)
        port = spec["ports"][0]["port"]
        out.append(Packet("192.0.2.100", spec["clusterIPs"][0], port, "tcp", False, ("192.0.2.1",)))
    return out


def measure(size: int, count: int) -> list[dict[str, object]]:
    objs = [generate.node_config(), *generate.cluster(size, 10)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.json"
        generate.write(path, objs)
        for backend in ("nftables", "iptables"):
            t0 = time.perf_counter()
            text = compile_paths([str(path)]).text(backend)
            rows.append(_row(size, backend, text, time.perf_counter() - t0, objs, count))
    return rows


def _row(
    size: int, backend: str, text: str, compiled: float, objs: list[dict[str, object]], count: int
) -> dict[str, object]:
    packets = _packets(objs, count)
    t0 = time.perf_counter()
    follow = tracer(text, backend)  # what trace and check --packets call
    first = follow(packets[0])
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in packets:
        follow(p)
    each = (time.perf_counter() - t0) / len(packets)
    assert first.verdict == "dnat"
    return {
        "services": size,
        "backend": backend,
        "compile_s": round(compiled, 3),
        "parse_and_trace_s": round(one, 3),
        "ratio_to_compile": round(one / compiled, 3),
        "per_further_packet_ms": round(each * 1000, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--packets", type=int, default=20)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    gc.disable()  # as the svcrules command runs
    rows = [r for n in args.sizes.split(",") for r in measure(int(n), args.packets)]
    head = ["services", "backend", "compile_s", "parse_and_trace_s", "ratio_to_compile"]
    head.append("per_further_packet_ms")
    print("  ".join(f"{h:>21}" for h in head))
    for r in rows:
        print("  ".join(f"{r[h]!s:>21}" for h in head))
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
