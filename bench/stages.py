"""Where an incremental run's time goes: the steps of `svcrules sync` for one change,
timed one by one in this process, without the kernel (a fake one takes the transaction).

python bench/stages.py BASE.json CHANGED.json

BASE is compiled first (its compile cache and script stand for the last run); then each
step of a run with CHANGED is timed as plan_change and execute do it. The process start
is not included (bench/startup.py measures it).
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from svcrules.compiler import Ruleset, code_digest, prepare
from svcrules.compiler.compile_cache import compile_plan, dump, load
from svcrules.kernel.nft.driver import NftDriver
from svcrules.kernel.nft.fake import FakeNft
from svcrules.kernel.state import Meta, _encode
from svcrules.plan import program as prog
from svcrules.render.nftables.layout import layout_program, render_tables

T = TypeVar("T")


def main(base: str, changed: str) -> None:
    import tempfile
    from pathlib import Path

    first = prepare([base]).compile(keep=True)
    assert first.next_cache is not None
    with tempfile.TemporaryDirectory() as tmp:
        cache_file = Path(tmp) / "compile-cache"
        cache_file.write_bytes(dump(first.next_cache))
        cache_file.chmod(0o600)
        old = first.nft
        previous = Meta.of_plan(first.plan, "", first.port_digests)  # the last run's
        del first
        gc.collect()
        gc.disable()  # as the svcrules command does while compiling
        rows: list[tuple[str, float]] = []

        def step(name: str, call: Callable[[], T]) -> T:
            started = time.perf_counter()
            result = call()
            rows.append((name, time.perf_counter() - started))
            return result

        job = step("read the input", lambda: prepare([changed]))
        step("digest of the input (no-op check)", lambda: job.digest)
        cache = step("read the compile cache", lambda: load(cache_file, print))
        done = step(
            "cut, recognise, validate and plan what changed, assemble",
            lambda: compile_plan(
                job.sources, (), job.overrides, job.on_invalid, True, code_digest(), cache
            ),
        )
        ruleset = Ruleset(done.plan, done.skipped, done.cache, done.port_digests)
        program = step("rule program", lambda: prog.program(ruleset.plan))
        tables = step("slot allocation and layout", lambda: layout_program(program))
        ruleset._texts["nftables"] = step("render", lambda: render_tables(tables))
        driver = NftDriver(FakeNft())
        tx = step("diff (with stable slots)", lambda: driver.incremental(old, ruleset, set()))
        meta = step(
            "summary (port digests, sizes)",
            lambda: (
                Meta.of_plan(ruleset.plan, "", ruleset.port_digests, previous=previous),
                driver.sizes(ruleset),
            )[0],
        )
        step(
            "state and details files encoded",
            lambda: (
                _encode(tx.applied or ruleset.nft, meta),
                "".join(f"{k}\t{v}\n" for k, v in meta.details.items()).encode(),
            ),
        )
        step("compile cache encoded", lambda: dump(done.cache))
    total = sum(seconds for _, seconds in rows)
    for name, seconds in rows:
        print(f"{name:60s} {seconds:7.3f} s")
    print(f"{'total (no process start, no kernel, no file writes)':60s} {total:7.3f} s")
    print(f"operations: {tx.operations}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1], sys.argv[2])
