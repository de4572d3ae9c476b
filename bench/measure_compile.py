"""Compile one input in a fresh process and report phases, size and peak memory (JSON).

python bench/measure_compile.py CLUSTER OUT [nftables|iptables]
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time

from svcrules.compiler import compile
from svcrules.inputs.config import Overrides, node_config
from svcrules.inputs.load import load_sources
from svcrules.inputs.read import read_sources
from svcrules.kernel.iptables.restore import parse_restore
from svcrules.kernel.nft.diff import parse_script


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(path: str, out: str, backend: str = "nftables") -> None:
    """The phases of ``Job.compile`` (svcrules.compiler) as the commands run them: load,
    then plan and render with the validated objects freed; the peak memory is read as
    the ruleset is done, before anything here counts it."""
    gc.disable()  # as the svcrules command does
    c0 = _cpu()
    t0 = time.perf_counter()
    sources = read_sources([path])
    inputs = load_sources(sources)
    t1 = time.perf_counter()
    ruleset = compile(inputs, node_config(inputs, None, Overrides()))
    del inputs
    text = ruleset.text("iptables" if backend == "iptables" else "nftables")
    t2 = time.perf_counter()
    c2 = _cpu()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    with open(out, "w") as fh:
        fh.write(text)
    chains = rules = sets = elements = 0
    if backend == "iptables":
        for part in parse_restore(text).values():
            chains += len(part.chains)
            rules += sum(len(r) for r in part.chains.values())
    else:
        for table in parse_script(text).values():
            for obj in table.objects.values():
                if obj.kind == "chain":
                    chains += 1
                    rules += len(obj.items)
                else:
                    sets += 1
                    elements += len(obj.items)
    print(
        json.dumps(
            {
                "load_s": round(t1 - t0, 3),
                "compile_s": round(t2 - t1, 3),
                "total_s": round(t2 - t0, 3),
                "cpu_s": round(c2 - c0, 3),  # of total_s; less moved by other load
                "peak_rss_mb": peak,
                "bytes": len(text.encode()),
                "chains": chains,
                "rules": rules,
                "sets": sets,
                "elements": elements,
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    main(*sys.argv[1:4])
